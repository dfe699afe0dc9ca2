"""Command lines generated from a job's config dataclass: one flag per field, defaults and help written once.

Every job (caption, train_drafter, bench) declares its flags as its config's fields:

    batch_size: int = field(default=32, metadata=flag("rows per engine batch on one actor"))

gives `--batch-size N` with "(default 32)" in its help. A field without a default is a
required flag; a bool is a switch (`--keep-images`, or `--no-caption-job` when it
defaults to True). `flag(...)` may also give `parse` (text -> value, for lists and
NAME=DIR pairs), `choices`, `name` (the flag's own name) and `repeat` (the flag may be
given many times; the field gets the list). Values are checked by the config's own
__post_init__, so Python callers and the command line get the same errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Callable


def flag(help: str, *, parse: Callable[[str], Any] | None = None, choices: tuple | None = None,
         name: str | None = None, repeat: bool = False, metavar: str | None = None) -> dict:
    """Field metadata describing its command-line flag."""
    return {"help": help, "parse": parse, "choices": choices, "name": name, "repeat": repeat, "metavar": metavar}


def config_parser(config_cls: type, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if not field.init or "help" not in field.metadata:
            continue
        meta = field.metadata
        default = _default(field)
        flag_name = "--" + (meta["name"] or field.name).replace("_", "-")
        help_text = meta["help"]
        if default is dataclasses.MISSING:
            kwargs = {"required": True}
        elif hints[field.name] is bool:
            if default:
                flag_name = "--no-" + (meta["name"] or field.name).replace("_", "-")
            parser.add_argument(flag_name, dest=field.name, action="store_false" if default else "store_true",
                                help=help_text)
            continue
        else:
            kwargs = {"default": argparse.SUPPRESS}  # the dataclass's default applies
            if default is not None:
                help_text += f" (default {_show(default)})"
        kwargs.update(help=help_text, dest=field.name, type=meta["parse"] or _scalar_type(hints[field.name]))
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if meta["repeat"]:
            kwargs["action"] = "append"
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag_name, **kwargs)
    return parser


def parse_config(config_cls: type, argv: list[str] | None, description: str):
    """The config built from the command line (argparse exits with 2 on malformed flags; the config's own
    checks raise as they do for Python callers)."""
    return config_cls(**vars(config_parser(config_cls, description).parse_args(argv)))


def run_main(config_cls: type, run: Callable[[Any], Any], argv: list[str] | None, description: str) -> int:
    """A job script's main: the config from the command line, then run(config); 2 with one sentence on stderr when
    the configuration is bad."""
    from pipeline.job.config import JobConfigError  # config.py builds its flags with this module

    try:
        config = parse_config(config_cls, argv, description)
    except JobConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run(config)
    return 0


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _scalar_type(hint) -> Callable[[str], Any]:
    """int, float or str for a field's annotation (`float | None` -> float; any other union -> str, parsed
    by the config)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint in (int, float, str):
        return hint
    if len(args) == 1 and args[0] in (int, float, str):
        return args[0]
    return str
