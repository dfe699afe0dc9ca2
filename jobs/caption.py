"""Caption or answer questions about every image of a dataset with a VLM, speculatively decoded, on Ray.

    ray job submit --working-dir . -- python jobs/caption.py \
        --input s3://bucket/prompts/ --output s3://bucket/captions/ \
        --target s3://bucket/models/target --drafter s3://bucket/models/massv --gpus-per-actor 1 --num-actors 1,8

Runs on the Ray cluster it is submitted to, or starts a local one. Writes Parquet
parts (one row per input row; see README for the schema) and summary.json under --output.
From Python: `pipeline.job.caption.run_caption(CaptionConfig(...))`.

With no arguments (`python jobs/caption.py`) it runs the embedded demo on a local
Ray: the committed demo world's held-out scenes, captioned without and with its
MASSV drafter, compared (outputs, summaries and acceptance.png under out/demo).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.job.config import DEFAULT_PROMPT, FORMATS, CaptionConfig, JobConfigError  # noqa: E402
from pipeline.job.storage import DEFAULT_MODEL_CACHE  # noqa: E402


def parse_args(argv: list[str] | None = None) -> CaptionConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", required=True, help="dataset: Parquet/JSONL file or directory, image folder, or\n"
                   "WebDataset .tar shards; a local path or fsspec URL (s3://...)")
    p.add_argument("--output", required=True, help="directory for Parquet parts and summary.json (local or s3://)")
    p.add_argument("--target", required=True, help="target VLM checkpoint directory (local or s3://)")
    p.add_argument("--drafter", default="none", help="drafter directory (local or s3://), or 'none' (default)")
    p.add_argument("--gamma", default="auto", help="draft length per step: an integer, or 'auto' (default)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer at most (default 128)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per engine batch on one actor (default 32)")
    p.add_argument("--num-actors", default="1", help="engine actors: N, or MIN,MAX for an autoscaling pool")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs per engine actor; default 1 when the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per engine actor (default 1)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"instruction for rows without a prompt column\n"
                   f"(default {DEFAULT_PROMPT!r})")
    p.add_argument("--id-column", default=None, help="column with row ids (default 'id' when present,\n"
                   "else ids derived from the source: <file>#<row>, the image path, <shard>/<key>)")
    p.add_argument("--prompt-column", default=None, help="column with prompts (default 'prompt' when present)")
    p.add_argument("--image-column", default=None, help="column with images: bytes, a path/URL (relative to the\n"
                   "dataset), a data: URL, or {bytes, path} (default 'image' when present)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="input format (default: from file names)")
    p.add_argument("--resume", action="store_true", help="skip ids already in --output and add the rest")
    p.add_argument("--keep-images", action="store_true", help="also write each row's image bytes (column image):\n"
                   "a self-distillation corpus that jobs/train_drafter.py --phase distill reads as it is")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    p.add_argument("--model-cache", default=DEFAULT_MODEL_CACHE, help="per-node copy of s3:// checkpoints")
    p.add_argument("--trust-remote-code", action="store_true", help="allow checkpoints' own Python code (off)")
    args = p.parse_args(argv)
    return CaptionConfig(**{k: v for k, v in vars(args).items()})


def run_demo() -> None:
    import ray

    from pipeline.job.caption import run_caption
    from pipeline.lab.demo import compare, demo_configs

    configs = demo_configs()
    ray.init()  # once, so neither run is charged for starting Ray
    summaries = {name: run_caption(config) for name, config in configs.items()}
    plain, speculative = (summaries[name]["this_run"] for name in ("plain", "speculative"))
    print("\ndemo: the same rows captioned without and with a drafter (tokens/s over each run's whole wall time)")
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

        run_caption(parse_args(argv)) if argv else run_demo()
    except JobConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
