"""Side-by-side speed and acceptance benchmark: HF generate, HF assisted generation, this engine without and
with each drafter at each gamma, and the Ray caption job, on the same held-out prompts.

    python jobs/bench.py                      # the demo world, batch 1/8/32, gamma 1..8 and auto
    python jobs/bench.py --quick              # seconds: the same report on a few rows (CI runs it)
    python jobs/bench.py --target DIR --drafter text=DIR --drafter massv=DIR --prompts FILE.parquet

Writes results.json, table.md and PNG plots (speedup vs batch size, tau vs gamma, measured vs
predicted speedup vs gamma, per-position acceptance) under --output, and prints the table and the
speed goals it reports against. CUDA+bf16 when a GPU is present, else CPU+float32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.lab.benchmark import QUICK, BenchConfig, demo_drafters, run_benchmark  # noqa: E402
from pipeline.job.config import JobConfigError  # noqa: E402


def _named_path(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, path


def _int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    defaults = BenchConfig.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"a few rows and settings, for CI: {QUICK}")
    p.add_argument("--output", default=defaults["output"].default, help="where the report and plots go")
    p.add_argument("--target", default=None, help="target VLM checkpoint directory (default: the demo world's)")
    p.add_argument("--drafter", action="append", type=_named_path, default=None, metavar="NAME=DIR",
                   help="a drafter to measure (repeatable); default: the demo world's text-only and massv, "
                        "or none with --target")
    p.add_argument("--assistant", default=None,
                   help="which text-only drafter HF assisted generation uses (default text-only when present; "
                        "'none' skips it)")
    p.add_argument("--prompts", default=None, help="Parquet with prompt and image (bytes) columns "
                                                   "(default: the demo world's held-out captions)")
    p.add_argument("--rows", type=int, default=None, help="prompts to run at every batch size (default 64)")
    p.add_argument("--batch-sizes", type=_int_list, default=None, help="default 1,8,32")
    p.add_argument("--gammas", default=None, help="comma-separated draft lengths and/or auto (default 1..8,auto)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 48")
    p.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up; the median counts "
                                                             "(default 3)")
    p.add_argument("--no-caption-job", action="store_true", help="skip the Ray caption job")
    p.add_argument("--continuous-batching", action="store_true",
                   help="run the engine with continuous batching (rows join as others finish) instead of batch by "
                        "batch as HF generate does")
    args = p.parse_args(argv)

    values = dict(QUICK) if args.quick else {}
    if args.target is not None:
        values["target"] = args.target
        values["drafters"] = {}
    if args.drafter is not None:
        values["drafters"] = dict(args.drafter)
    drafters = values.get("drafters", demo_drafters())
    if args.assistant is not None:
        values["assistant"] = None if args.assistant.lower() == "none" else args.assistant
    elif "text-only" not in drafters:
        values["assistant"] = None
    for flag in ("prompts", "rows", "batch_sizes", "max_new_tokens", "repeats", "output"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    if args.gammas is not None:
        values["gammas"] = args.gammas.split(",")
    values["caption_job"] = not args.no_caption_job
    values["continuous_batching"] = args.continuous_batching
    return BenchConfig(**values)


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
    except JobConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_benchmark(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
