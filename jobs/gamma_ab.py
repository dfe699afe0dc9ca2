"""`auto` against another version of itself, in one process, in turn: a git revision's gamma.py, or this one's with
constants changed.

    python jobs/gamma_ab.py --baseline HEAD~3                                   # MASSV at batch 32, static batches
    python jobs/gamma_ab.py --drafter msd --continuous --baseline-constants SETTLE=4

Prints each engine's seconds per round (the engine without a drafter, `auto` as this tree has it, the baseline's),
its speed against plain decoding per round and their median, and the draft lengths each `auto` chose per bucket;
writes results.json under --output. Why one process: pipeline/lab/gamma_ab.py. The flags are ABConfig's fields.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.job.cli import run_main  # noqa: E402
from pipeline.lab.gamma_ab import ABConfig, run_ab  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_main(ABConfig, run_ab, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
