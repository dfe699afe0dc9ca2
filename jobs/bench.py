"""Side-by-side speed and acceptance benchmark: HF generate, HF assisted generation, this engine without and
with each drafter at each gamma, and the Ray caption job, on the same held-out prompts.

    python jobs/bench.py                      # the demo world, batch 1/8/32, gamma 1..8 and auto
    python jobs/bench.py --quick              # seconds: the same report on a few rows (CI runs it)
    python jobs/bench.py --target DIR --drafter text=DIR --drafter massv=DIR --prompts FILE.parquet

Writes results.json, table.md and PNG plots (speedup vs batch size, tau vs gamma, measured vs
predicted speedup vs gamma, per-position acceptance) under --output, and prints the table and the
speed goals it reports against. CUDA+bf16 when a GPU is present, else CPU+float32. The flags are
BenchConfig's fields (pipeline/lab/benchmark.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.job.cli import parse_config, run_main  # noqa: E402
from pipeline.lab.benchmark import BenchConfig, run_benchmark  # noqa: E402


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    return parse_config(BenchConfig, argv, __doc__)


def main(argv: list[str] | None = None) -> int:
    return run_main(BenchConfig, run_benchmark, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
