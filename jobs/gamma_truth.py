"""`auto`'s step costs against the truth: its S(k) / S(0) estimates set against fixed-gamma engines' step times.

    python jobs/gamma_truth.py                                      # text-only at batch 32, 8 reps
    python jobs/gamma_truth.py --drafter msd --batch-size 8 --gammas 0,3,4,5

Prints, per batch-size bucket and draft length, the median log error of `auto`'s estimates (negative: drafting rated
cheaper than it is) and its median absolute value, the draft lengths `auto` chose at each bucket (shares of its
steps, and each rep's most chosen), and `auto`'s speed against plain decoding and the best fixed gamma; writes
results.json under --output. What it compares and why: pipeline/lab/gamma_truth.py. The flags are
TruthConfig's fields.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.job.cli import run_main  # noqa: E402
from pipeline.lab.gamma_truth import TruthConfig, run_truth  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_main(TruthConfig, run_truth, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
