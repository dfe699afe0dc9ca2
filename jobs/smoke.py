"""Smoke run of the engine on locally built tiny models (the main job until the caption job lands).

    python jobs/smoke.py [--family llava|gemma3] [--out out/smoke]

Builds a tiny random LLaVA-style target plus drafters (nothing is downloaded), runs
the engine without a drafter and with each drafter on a small batch of synthetic
image prompts, checks that greedy outputs are identical, and prints a summary.
The target has 8 decoder layers of which only the first changes the residual
stream, so "massv-shallow-oracle" (that first layer) drafts exactly at 1/8 of
the decoder cost and shows what speculation buys; the random drafters show that
it never changes an output.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from drafters import load_drafter  # noqa: E402
from pipeline import tiny_models  # noqa: E402
from pipeline.engine import EngineConfig, SpecDecodeEngine  # noqa: E402
from pipeline.preprocess import prepare_prompt  # noqa: E402
from pipeline.stats import SpecDecodeCounts  # noqa: E402
from pipeline.target import Target  # noqa: E402


def synthetic_rows(n: int) -> list[tuple[str, Image.Image]]:
    questions = ["Describe the image.", "What colour is the shape?", "How many shapes are there?"]
    rows = []
    for i in range(n):
        colour = [(220, 30, 30), (30, 160, 60), (40, 60, 220), (230, 200, 40)][i % 4]
        image = Image.new("RGB", (32 + 4 * i, 32), (128, 128, 128))
        image.paste(colour, (4, 4, 20, 20))
        rows.append((questions[i % len(questions)] + " " * (i % 2), image))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava", choices=tiny_models.FAMILIES)
    parser.add_argument("--out", default="out/smoke", help="where the tiny checkpoints are written")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--gamma", default="3")
    args = parser.parse_args()
    print(f"config: {vars(args)}")

    out = Path(args.out) / args.family
    checkpoints = tiny_models.build_world(args.family, out, target_layers=8, active_layers=1)
    target = Target.load(str(checkpoints["target"]))
    prompts = [prepare_prompt(target.processor, p, im, target.context_length) for p, im in synthetic_rows(args.rows)]
    print(f"target {out / 'target'} on {target.device} ({target.model.dtype}); {len(prompts)} rows")

    SpecDecodeEngine(target).generate(prompts)  # warm-up, so the first timed row is not charged for it
    baseline, baseline_seconds = None, None
    print(f"\n{'drafter':<22}{'tau':>7}{'accept':>8}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'speedup':>9}"
          "  same output as no drafter")
    for name in ["none", "text-only", "massv", "massv-oracle", "massv-shallow-oracle"]:
        drafter = load_drafter(checkpoints.get(name), target)
        engine = SpecDecodeEngine(target, drafter, EngineConfig(gamma=args.gamma, max_new_tokens=args.max_new_tokens))
        start = time.perf_counter()
        results = engine.generate(prompts)
        seconds = time.perf_counter() - start
        total = SpecDecodeCounts()
        for r in results:
            total.observe(r.counts)
        tokens = [r.tokens for r in results]
        baseline, baseline_seconds = baseline or tokens, baseline_seconds or seconds
        same = "yes" if tokens == baseline else "NO"
        print(
            f"{name:<22}{total.mean_accepted_length:>7.2f}{total.acceptance_rate:>8.2f}{total.num_generated_tokens:>8}"
            f"{seconds:>9.2f}{total.num_generated_tokens / seconds:>8.0f}{baseline_seconds / seconds:>8.2f}x  {same}"
        )
    print(f"\nfirst row (random weights, so the text is noise): {results[0].text!r} ({results[0].finish_reason})")
    print(f"checkpoints in {out}")


if __name__ == "__main__":
    main()
