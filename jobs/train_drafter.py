"""Train a drafter on Ray Train: text-only LM, MASSV phase 1 (adapt) or MASSV phase 2 (distill).

    python jobs/train_drafter.py --phase text    --data texts/    --target T --drafter small-lm/ --output text-only/
    python jobs/train_drafter.py --phase adapt   --data captions/ --target T --drafter text-only/ --output massv-1/
    python jobs/train_drafter.py --phase distill --data corpus/   --target T --drafter massv-1/ --output massv-2/ \
        --answer-column text

--data is Parquet (local or s3://) with prompt, answer and image (PNG/JPEG bytes)
columns; a corpus written by the caption job (`--keep-images`) is read as it is
with --answer-column text. Checkpoints go under --storage-path; --output is a
drafter directory the caption job loads; the flags are TrainConfig's fields. On a cluster:
`ray job submit --working-dir . -- python jobs/train_drafter.py ... --num-workers 4 --use-gpu`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.job.signals import exit_promptly_on_signals  # noqa: E402  (standard library only)

if __name__ == "__main__":
    exit_promptly_on_signals()  # before any import below starts a thread

from drafters.training import TrainConfig, run_training  # noqa: E402
from pipeline.job.cli import parse_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(TrainConfig, argv, __doc__.split("\n\n")[0])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_training(config)
    print(f"final metrics: {result.metrics}; drafter saved to {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
