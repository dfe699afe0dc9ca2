"""Each family's tiny target through the engine: its exact stack against HF's own forward, no drafter.

    python jobs/family_speed.py                       # LLaVA, Gemma3, Qwen2.5-VL, Qwen3-VL; batch 1/8/32
    python jobs/family_speed.py --families gemma3 --batch-sizes 1

Prints a table (family, batch size, seconds each way, the ratio, whether the tokens are the same) and writes
results.json under --output. What it measures and why: pipeline/lab/family_speed.py. The flags are
FamilySpeedConfig's fields.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.job.cli import run_main  # noqa: E402
from pipeline.lab.family_speed import FamilySpeedConfig, run_family_speed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_main(FamilySpeedConfig, run_family_speed, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
