"""Train a drafter on Ray Train: text-only LM, MASSV phase 1 (adapt) or MASSV phase 2 (distill).

    python jobs/train_drafter.py --phase text    --data texts/    --target T --drafter small-lm/ --output text-only/
    python jobs/train_drafter.py --phase adapt   --data captions/ --target T --drafter text-only/ --output massv-1/
    python jobs/train_drafter.py --phase distill --data corpus/   --target T --drafter massv-1/ --output massv-2/ \
        --answer-column text

--data is Parquet (local or s3://) with prompt, answer and image (PNG/JPEG bytes)
columns; a corpus written by the caption job (`--keep-images`) is read as it is
with --answer-column text. Checkpoints go under --storage-path; --output is a
drafter directory the caption job loads. On a cluster:
`ray job submit --working-dir . -- python jobs/train_drafter.py ... --num-workers 4 --use-gpu`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drafters.training import PHASES, TrainConfig, run_training  # noqa: E402


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--phase", required=True, choices=PHASES, help="text | adapt (MASSV 1) | distill (MASSV 2)")
    p.add_argument("--data", required=True, help="Parquet file or directory with prompt, answer, image columns")
    p.add_argument("--target", required=True, help="target VLM directory (tokenizer, chat template, image features)")
    p.add_argument("--drafter", required=True, help="starting drafter: causal-LM dir (text, adapt) or MASSV dir")
    p.add_argument("--output", required=True, help="where the trained drafter is saved (local or s3://)")
    p.add_argument("--storage-path", default="out/train_runs", help="Ray Train checkpoints (local or s3://)")
    defaults = TrainConfig(phase="text", data="", target="", drafter="", output="", storage_path="/")
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("phase", "data", "target", "drafter", "output", "storage_path"):
            continue
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=f"(default {default})")
        else:
            p.add_argument(flag, type=type(default), default=default, help=f"(default {default})")
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_training(config)
    print(f"final metrics: {result.metrics}; drafter saved to {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
