"""The drafter kinds, one table: a drafter directory's kind picks the class that loads, checks and decodes it.

A directory with drafter_config.json names its kind there; a plain HF causal-LM
directory is text-only. A new kind is one module plus one entry in DRAFTER_KINDS.
Weights load from safetensors only, never pickles.
"""

from __future__ import annotations

import json
from pathlib import Path

from drafters.causal_lm import CausalLMDraftModel
from drafters.massv import DRAFTER_CONFIG, MassvDraftModel
from drafters.msd import MsdDraftModel
from drafters.text_only import TextOnlyDraftModel
from pipeline.engine.drafter import Drafter
from pipeline.engine.target import Target

# kind -> the class that loads (`load`), checks (`check`) and trains a drafter of that kind
DRAFTER_KINDS: dict[str, type[CausalLMDraftModel] | type[MsdDraftModel]] = {
    TextOnlyDraftModel.kind: TextOnlyDraftModel,
    MassvDraftModel.kind: MassvDraftModel,
    MsdDraftModel.kind: MsdDraftModel,
}


def read_drafter_config(path: Path) -> dict:
    config_file = Path(path) / DRAFTER_CONFIG
    config = json.loads(config_file.read_text()) if config_file.exists() else {"kind": TextOnlyDraftModel.kind}
    if config.get("kind") not in DRAFTER_KINDS:
        raise ValueError(f"{config_file} names an unknown drafter kind {config.get('kind')!r}: use one of "
                         f"{', '.join(DRAFTER_KINDS)}.")
    return config


def drafter_kind(path: str | Path) -> tuple[type[CausalLMDraftModel] | type[MsdDraftModel], dict]:
    """The kind's class and the directory's drafter config."""
    config = read_drafter_config(Path(path))
    return DRAFTER_KINDS[config["kind"]], config


def load_drafter(path: str | Path | None, target: Target, trust_remote_code: bool = False) -> Drafter | None:
    """Load the drafter at `path` (None or 'none' means no drafter) onto the target's device and dtype.

    Raises ValueError, before any decoding, when it does not fit the target (vocabulary, feature widths).
    """
    if path is None or str(path).lower() == "none":
        return None
    kind, config = drafter_kind(path)
    return kind.load(Path(path), config, target, trust_remote_code)


def check_drafter(path: str | Path, target_tokenizer, target_text_config, name: str,
                  trust_remote_code: bool = False) -> None:
    """Every check load_drafter makes, from config and tokenizer files only (no weights): for the job's preflight."""
    kind, config = drafter_kind(path)
    kind.check(Path(path), config, target_tokenizer, target_text_config, name, trust_remote_code)
