"""Ray overhead of the caption job: its rows/s against the engine called directly in one process, same rows.

    python jobs/bench_caption.py [--rows 256] [--max-new-tokens 32] [--batch-size 32] [--drafter none]

Both paths decode the images, apply the chat template and run the engine with
the same target, drafter, batch size and (on CPU) torch threads as one actor;
the direct path has its models loaded before the clock starts, the job pays for
its actors' start-up and loading (as users do).
Prints a Markdown table. Information, not a test: the ratio depends on the machine.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from drafters import load_drafter  # noqa: E402
from pipeline.actor import engine_config  # noqa: E402
from pipeline.caption import run_caption  # noqa: E402
from pipeline.demo import demo_configs  # noqa: E402
from pipeline.engine import SpecDecodeEngine  # noqa: E402
from pipeline.preprocess import prepare_prompt  # noqa: E402
from pipeline.target import Target  # noqa: E402


def run_direct(config) -> tuple[float, int]:
    """(seconds, generated tokens) for the engine in this process over the job's input rows."""
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(config.cpus_per_actor)))  # the threads one actor gets
    target = Target.load(config.target)
    drafter = load_drafter(config.drafter_name, target)
    engine = SpecDecodeEngine(target, drafter, engine_config(config))
    rows = pq.read_table(config.input).to_pylist()
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(rows), config.batch_size):
        batch = rows[i : i + config.batch_size]
        prompts = [prepare_prompt(target.processor, r["prompt"], Image.open(io.BytesIO(r["image"])),
                                  target.context_length) for r in batch]
        tokens += sum(len(result.tokens) for result in engine.generate(prompts))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--drafter", choices=["none", "massv"], default="massv", help="the demo world's")
    parser.add_argument("--out", default="out/bench_caption")
    args = parser.parse_args()
    print(f"config: {vars(args)}")

    configs = demo_configs(Path(args.out), rows=args.rows, max_new_tokens=args.max_new_tokens)
    config = configs["plain" if args.drafter == "none" else "speculative"]
    config.batch_size = args.batch_size
    direct_s, direct_tokens = run_direct(config)

    started = time.perf_counter()
    ray.init()
    ray_start_s = time.perf_counter() - started
    summary = run_caption(config)
    job_s = summary["this_run"]["wall_time_s"]

    print(f"\n{args.rows} rows, {args.max_new_tokens} new tokens at most, batch {args.batch_size}, "
          f"drafter {args.drafter}\n")
    print("| path | wall s | rows/s | tokens/s | vs direct |")
    print("|---|---:|---:|---:|---:|")
    print(f"| engine in one process | {direct_s:.1f} | {args.rows / direct_s:.2f} | {direct_tokens / direct_s:.1f} "
          "| 1.00x |")
    print(f"| caption job on Ray Data, 1 actor | {job_s:.1f} | {args.rows / job_s:.2f} "
          f"| {summary['generated_tokens'] / job_s:.1f} | {direct_s / job_s:.2f}x |")
    print(f"\n(ray.init took a further {ray_start_s:.1f} s; the job's time includes its checks, actor start-up "
          "and model loading, and writing Parquet)")


if __name__ == "__main__":
    main()
