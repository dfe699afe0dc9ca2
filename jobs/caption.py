"""Caption or answer questions about every image of a dataset with a VLM, speculatively decoded, on Ray.

    ray job submit --working-dir . -- python jobs/caption.py \
        --input s3://bucket/prompts/ --output s3://bucket/captions/ \
        --target s3://bucket/models/target --drafter s3://bucket/models/massv --gpus-per-actor 1 --num-actors 1,8

Runs on the Ray cluster it is submitted to, or starts a local one. Writes Parquet
parts (one row per input row; see README for the schema) and summary.json under --output.
Exit status: 0 done, 2 a bad job (one sentence, before any cluster work), 3 incomplete (some
input files could not be read; they are listed in summary.json).
From Python: `pipeline.job.caption.run_caption(CaptionConfig(...))`.

With no arguments (`python jobs/caption.py`) it runs the embedded demo on a local
Ray: the committed demo world's held-out scenes, captioned without and with its
MASSV drafter, compared (outputs, summaries and acceptance.png under out/demo).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.job.signals import exit_promptly_on_signals  # noqa: E402  (standard library only)

if __name__ == "__main__":
    exit_promptly_on_signals()  # before any import below starts a thread

from pipeline.job.cli import parse_config  # noqa: E402
from pipeline.job.config import CaptionConfig, JobConfigError  # noqa: E402


def run_demo() -> None:
    from pipeline.job.caption import run_caption
    from pipeline.job.ray_cluster import connect as connect_ray
    from pipeline.lab.demo import DEMO_OUT, WARM_UP_ROWS, compare, demo_configs

    configs = demo_configs()
    connect_ray()  # once, so neither run is charged for starting Ray
    # A short run first starts Ray's worker processes, so the plain run does not pay the cold start that the
    # speculative run after it would skip; each run still starts its own actor and loads its own models.
    run_caption(demo_configs(DEMO_OUT / "warm-up", rows=WARM_UP_ROWS)["plain"])
    summaries = {name: run_caption(config) for name, config in configs.items()}
    plain, speculative = (summaries[name]["this_run"] for name in ("plain", "speculative"))
    print(f"\ndemo: the same rows captioned without and with a drafter (tokens/s over each run's whole wall time, "
          f"actor start and model loading included; both after a {WARM_UP_ROWS}-row warm-up run)")
    print(f"  plain        {plain['tokens_per_s']:8.1f} tokens/s")
    print(f"  speculative  {speculative['tokens_per_s']:8.1f} tokens/s   "
          f"tau {summaries['speculative']['mean_accepted_length']:.2f}   "
          f"x{speculative['tokens_per_s'] / max(plain['tokens_per_s'], 1e-9):.2f}")
    print(f"  {compare(configs['plain'].output, configs['speculative'].output)}")
    print(f"  outputs: {configs['speculative'].output}/parts/*.parquet, summary.json and acceptance.png")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        from pipeline.job.caption import run_caption

        if not argv:
            run_demo()
            return 0
        summary = run_caption(parse_config(CaptionConfig, argv, __doc__.split("\n\n")[0]))
    except JobConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary["unreadable_files"]:
        print(f"incomplete: {len(summary['unreadable_files'])} input files could not be read (listed in "
              f"summary.json under unreadable_files); fix or remove them and run again with --resume.",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
