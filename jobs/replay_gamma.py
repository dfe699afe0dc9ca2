"""Replay gamma's policy offline against the demo world's measured acceptance and this machine's step costs.

    python jobs/replay_gamma.py                           # text-only, MASSV and MSD, batch 1/8/32, 8 seeds
    python jobs/replay_gamma.py --seeds 16 --batch-sizes 32
    python jobs/replay_gamma.py --recording out/replay/recording.json   # records there, or replays that recording:
                                                                      # run it from two checkouts to compare policies

Prints, per drafter and batch size, the best fixed gamma and the policy (`auto`) against plain decoding and against
that gamma, means over the seeds, and writes results.json under --output. What it models and why:
pipeline/lab/gamma_replay.py. The flags are ReplayConfig's fields.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.job.cli import run_main  # noqa: E402
from pipeline.lab.gamma_replay import ReplayConfig, run_replay  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_main(ReplayConfig, run_replay, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
