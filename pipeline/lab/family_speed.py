"""Each family's tiny target through the engine: its exact stack against HF's own forward, no drafter.

    python jobs/family_speed.py                       # LLaVA, Gemma3, Qwen2.5-VL, Qwen3-VL; batch 1/8/32
    python jobs/family_speed.py --families gemma3 --batch-sizes 1

The demo world (and so `make bench`) is LLaVA's; this measures what the exact stacks (fused.py) do for every
family the engine runs, on the tiny targets the tests build (real HF classes, hidden 64, 4 layers): the engine
decodes the same rows in static batches with the target's decoder on its exact stack, then on HF's forward (prefill
included, through whichever path each takes), rounds in turn, and checks the tokens are the same. Prints one table
row per family and batch size and writes results.json under --output. Tiny models on a CPU are bound by calls, not
arithmetic: the ratios say what the stack saves in calls, not what a real checkpoint on a GPU would gain.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.engine.decoder import RaggedDecoder
from pipeline.engine.engine import EngineConfig, SpecDecodeEngine
from pipeline.engine.fused import HF_FORWARD
from pipeline.engine.prompts import prepare_prompt
from pipeline.engine.target import Target
from pipeline.job.cli import flag
from pipeline.job.config import JobConfigError, require_at_least_one
from pipeline.lab import tiny_models
from pipeline.lab.benchmark import _int_list
from pipeline.lab.report import markdown_table, save_results


@dataclass
class FamilySpeedConfig:
    families: list[str] = field(default_factory=lambda: list(tiny_models.FAMILIES), metadata=flag(
        f"comma-separated families ({', '.join(tiny_models.FAMILIES)})", parse=lambda v: v.split(",")))
    rows: int = field(default=64, metadata=flag("rows decoded (the tiny models' sample rows, every fifth text-only)"))
    max_new_tokens: int = field(default=48, metadata=flag("tokens per row (EOS ignored: every row decodes them all)"))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32], metadata=flag(
        "comma-separated static batch sizes", parse=_int_list))
    rounds: int = field(default=3, metadata=flag("timed rounds after a warm-up (the median counts)"))
    output: str = field(default="out/family_speed", metadata=flag("where results.json goes"))

    def __post_init__(self):
        unknown = [f for f in self.families if f not in tiny_models.FAMILIES]
        if unknown:
            raise JobConfigError(f"--families: {unknown} are not families of the tiny models "
                                 f"({', '.join(tiny_models.FAMILIES)}).")
        require_at_least_one({"--rows": self.rows, "--max-new-tokens": self.max_new_tokens, "--rounds": self.rounds,
                              "--batch-sizes": min(self.batch_sizes)})


def measure_family(family: str, config: FamilySpeedConfig, directory: Path) -> list[dict]:
    """Per batch size: median seconds of the engine on the exact stack and on HF's forward, and whether their tokens
    are the same."""
    target = Target.load(str(tiny_models.build_target(family, directory / family)))
    prompts = [prepare_prompt(target.processor, text, image, target.context_length)
               for text, image in tiny_models.sample_rows(config.rows)]
    decoders = {"exact stack": target.decoder, "HF forward": RaggedDecoder(target.model, target.family, HF_FORWARD)}
    engine = SpecDecodeEngine(target, None, EngineConfig(gamma=0, max_new_tokens=config.max_new_tokens,
                                                         ignore_eos=True))
    results = []
    for batch_size in config.batch_sizes:
        seconds, tokens = {name: [] for name in decoders}, {}
        for round_ in range(config.rounds + 1):  # the first warms up
            for name, decoder in decoders.items():  # in turn: the machine's drift touches both alike
                target.decoder = decoder
                start = time.perf_counter()
                outputs = [r for i in range(0, len(prompts), batch_size)
                           for r in engine.generate(prompts[i : i + batch_size])]
                if round_:
                    seconds[name].append(time.perf_counter() - start)
                tokens[name] = [r.tokens for r in outputs]
        target.decoder = decoders["exact stack"]
        exact, hf = (statistics.median(seconds[name]) for name in decoders)
        results.append({"family": family, "batch_size": batch_size, "exact_s": exact, "hf_forward_s": hf,
                        "speedup": hf / exact, "same_tokens": tokens["exact stack"] == tokens["HF forward"]})
    return results


def results_table(results: list[dict]) -> str:
    return markdown_table(
        ["family", "batch", "exact stack (s)", "HF forward (s)", "exact stack vs HF forward", "same tokens"],
        [[r["family"], str(r["batch_size"]), f"{r['exact_s']:.3f}", f"{r['hf_forward_s']:.3f}", f"{r['speedup']:.2f}x",
          "yes" if r["same_tokens"] else "NO"] for r in results])


def run_family_speed(config: FamilySpeedConfig, log=print) -> list[dict]:
    log(f"family speed config: {json.dumps(dataclasses.asdict(config))}")
    results = []
    with tempfile.TemporaryDirectory() as directory:
        for family in config.families:
            measured = measure_family(family, config, Path(directory))
            log(f"{family}: " + ", ".join(f"batch {r['batch_size']} {r['speedup']:.2f}x" for r in measured))
            results += measured
    log(results_table(results))
    save_results(config, results, log)
    return results
