"""Benchmark the engine against HF `model.generate` on locally built tiny models: tau and time at batch sizes 1 and 8.

    python jobs/bench_engine.py [--family llava|gemma3] [--max-new-tokens N] [--repeats R]

Builds a tiny random target plus a random text-only drafter and an oracle MASSV
drafter (the target's own LM, so its drafts should be accepted; nothing is downloaded),
then for each batch size times, on the same greedy prompts, HF generate and the
engine without a drafter and with each drafter at each gamma: one warm-up run,
then the median over the repeats. One engine serves all runs of a configuration,
so gamma "auto" keeps what it learned in the warm-up; tau and acceptance rate count
all the timed runs. Information only: tiny models on CPU say little about real
models on a GPU, and other processes on the machine distort the times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

JOBS_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(JOBS_DIR.parent), str(JOBS_DIR)]  # the repo's packages, and smoke.py

from smoke import synthetic_rows  # noqa: E402

from drafters import load_drafter  # noqa: E402
from pipeline import tiny_models  # noqa: E402
from pipeline.engine import EngineConfig, SpecDecodeEngine, synchronized_time  # noqa: E402
from pipeline.gamma import parse_gamma  # noqa: E402
from pipeline.preprocess import build_messages, prepare_prompt  # noqa: E402
from pipeline.stats import SpecDecodeCounts  # noqa: E402
from pipeline.target import Target  # noqa: E402


def timed_runs(run, repeats: int, device: torch.device) -> tuple[float, list]:
    """Median seconds of `run()` over `repeats` after one warm-up, and the results of the timed runs."""
    run()
    seconds, results = [], []
    for _ in range(repeats):
        start = synchronized_time(device)
        results.append(run())
        seconds.append(synchronized_time(device) - start)
    return statistics.median(seconds), results


def hf_generate_runner(target: Target, rows, max_new_tokens: int):
    """A function that runs HF greedy generate on the rows as one left-padded batch and returns the tokens generated."""
    processor = target.processor
    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template(build_messages(p, 1), add_generation_prompt=True) for p, _ in rows]
    images = [[image] for _, image in rows]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt").to(target.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(target.model.dtype)
    prompt_length = inputs["input_ids"].shape[1]
    eos = torch.tensor(sorted(target.eos_token_ids), device=target.device)

    @torch.no_grad()
    def run() -> int:
        generated = target.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)[:, prompt_length:]
        is_eos = torch.isin(generated, eos)
        first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, generated.shape[1])
        return int(first_eos.sum())

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava", choices=tiny_models.FAMILIES)
    parser.add_argument("--out", default="out/bench", help="the tiny checkpoints are written to OUT/<family>")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--gammas", default="3,auto")
    parser.add_argument("--target-layers", type=int, default=4, help="decoder layers of the tiny target")
    parser.add_argument(
        "--active-layers", type=int, default=None,
        help="keep only the first N target layers active and add a drafter made of them "
             "(massv-shallow-oracle: every draft accepted at a fraction of the target's cost)",
    )
    args = parser.parse_args()
    print(f"config: {vars(args)}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    gammas = [parse_gamma(g) for g in args.gammas.split(",")]

    out = Path(args.out) / args.family
    checkpoints = tiny_models.build_world(args.family, out, args.target_layers, args.active_layers)
    target = Target.load(str(checkpoints["target"]))
    names = ["text-only", "massv-oracle"] + (["massv-shallow-oracle"] if args.active_layers else [])
    drafters = {name: load_drafter(checkpoints[name], target) for name in names}
    print(f"device: {target.device} ({target.model.dtype}); checkpoints in {out}\n")

    columns = ["method", "drafter", "gamma", "batch", "tokens", "seconds (median)", "tokens/s",
               "speedup vs HF generate (same batch)", "tau", "acceptance rate"]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for batch_size in batch_sizes:
        rows = synthetic_rows(batch_size)
        prompts = [prepare_prompt(target.processor, p, im, target.context_length) for p, im in rows]

        hf_run = hf_generate_runner(target, rows, args.max_new_tokens)
        hf_seconds, hf_tokens = timed_runs(hf_run, args.repeats, target.device)
        print(f"| HF generate | - | - | {batch_size} | {hf_tokens[-1]} | {hf_seconds:.3f} "
              f"| {hf_tokens[-1] / hf_seconds:.0f} | 1.00 | - | - |")

        configs = [("none", None, 0)] + [(name, d, g) for name, d in drafters.items() for g in gammas]
        for name, drafter, gamma in configs:
            engine = SpecDecodeEngine(target, drafter, EngineConfig(gamma=gamma, max_new_tokens=args.max_new_tokens))
            seconds, runs = timed_runs(lambda: engine.generate(prompts), args.repeats, target.device)
            counts = SpecDecodeCounts()
            for result in (r for results in runs for r in results):
                counts.observe(result.counts)
            tokens = counts.num_generated_tokens // args.repeats
            print(f"| engine | {name} | {gamma if drafter else '-'} | {batch_size} | {tokens} | {seconds:.3f} "
                  f"| {tokens / seconds:.0f} | {hf_seconds / seconds:.2f} "
                  f"| {counts.mean_accepted_length:.2f} | {counts.acceptance_rate:.2f} |")


if __name__ == "__main__":
    main()
