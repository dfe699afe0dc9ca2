"""`auto` against another version of itself, in one process: the engine without a drafter, `auto` as this tree has
it, and `auto` from another revision's gamma.py (or this one's with some constants changed), each side as `policies`
fresh engines, decoding the same rows in turn.

    python jobs/gamma_ab.py --baseline HEAD~3                                   # MASSV at batch 32, static batches
    python jobs/gamma_ab.py --drafter msd --continuous --baseline-constants SETTLE=4

Why one process, and turns: this VM's speed differs from one process to the next by up to 20% (the engine without a
drafter took 3.6 s for 2048 rows in one process and 3.0 s in the next), and drifts by tens of percent within one.
The eighteenth session of 2026-12-06 compared two policies in processes run alternately and found continuous
batching 8-20% slower with one of them; in one process, in turn, the two ran 0.977x and 0.974x plain decoding
(the nineteenth session, docs/journal.md). So the engines decode each batch (static) or each DIRECT_PART_ROWS
rows (continuous batching) one after the other, the one going first moving round, after a warm-up pass that also
teaches each `auto` what a long job's actor would have learnt. And one policy's history sets its later choices (two
engines of the same code, on the same rows in one process, ran 0.89x and 0.94x plain decoding), so each side is
several fresh engines. Prints per engine its seconds in each round, its speed against plain decoding per round and
their median, per side the median over its engines' rounds, where each engine's time went against plain decoding's
(prefill, the drafter's put-off prefills among it, the steps, the rest; how many steps drafted), and the draft lengths
each `auto` chose per batch-size bucket; checks that every engine gave the same tokens (greedy); writes results.json
under --output. The split says what a speed is made of: at MASSV's static batch of 32 on the demo world, a policy
that decoded plainly lost 2.4-2.7% to its calls and its probes' drafter prefills, one that drafted in every batch
3.5-4.5% to the drafter's prefills its steps did not earn back (the twenty-fifth session, docs/journal.md).

The baseline's gamma.py is loaded as a module of its own, so its GammaPolicy must still fit the engine's calls
(`choose(batch_size, prefill_waits, emitted, drains)`, `observe`, ...): revisions from before a change of that
protocol do not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from drafters import load_drafter
from pipeline.engine import gamma
from pipeline.engine.engine import EngineConfig, SpecDecodeEngine
from pipeline.engine.gamma import AUTO, batch_bucket
from pipeline.engine.stats import EngineTimes
from pipeline.engine.target import Target
from pipeline.job.cli import flag
from pipeline.job.config import JobConfigError, require_at_least_one
from pipeline.lab.benchmark import (
    DEMO_TARGET,
    DIRECT_PART_ROWS,
    Workload,
    decode_parts,
    demo_drafters,
    require_demo_drafter,
)
from pipeline.lab.demo import BENCH_PROMPTS, DEMO_WORLD
from pipeline.lab.report import markdown_table, save_results

REPO = Path(__file__).resolve().parents[2]
PLAIN, AUTO_HERE, AUTO_BASELINE = "plain", "auto (this tree)", "auto (baseline)"


@dataclass
class ABConfig:
    target: str = field(default=DEMO_TARGET, metadata=flag("target VLM checkpoint directory (the demo world's)"))
    drafter: str = field(default="massv", metadata=flag("a drafter of the demo world (text-only, massv, msd)"))
    prompts: str = field(default=str(DEMO_WORLD / BENCH_PROMPTS), metadata=flag(
        "Parquet with prompt and image columns (the demo world's held-out captions)"))
    rows: int = field(default=1024, metadata=flag("prompts decoded each round (the bench's 64, repeated)"))
    max_new_tokens: int = field(default=48, metadata=flag("tokens per answer at most (the bench's)"))
    batch_size: int = field(default=32, metadata=flag("static batch size, or the batch kept full (--continuous)"))
    continuous: bool = field(default=False, metadata=flag("continuous batching instead of static batches"))
    repeats: int = field(default=8, metadata=flag("timed rounds, after a warm-up one"))
    policies: int = field(default=2, metadata=flag(
        "fresh `auto` engines per side: a policy's own history sets its later choices (two of the same code, on\n"
        "the same rows in one process, ran 0.89x and 0.94x plain decoding)"))
    baseline: str = field(default="HEAD", metadata=flag(
        "the other policy: a git revision of this repository (its pipeline/engine/gamma.py) or a gamma.py file"))
    baseline_constants: str = field(default="", metadata=flag(
        "integer constants of the baseline's gamma.py set before it runs, NAME=value[,NAME=value...] (e.g.\n"
        "SETTLE=4: PAIR_GAP, derived from it, follows)"))
    output: str = field(default="out/gamma_ab", metadata=flag("where results.json goes"))

    def __post_init__(self):
        require_at_least_one({"--rows": self.rows, "--repeats": self.repeats, "--batch-size": self.batch_size,
                              "--max-new-tokens": self.max_new_tokens, "--policies": self.policies})
        require_demo_drafter(self.drafter)
        self.constants()  # fails now, not after the models load

    def constants(self) -> dict[str, int]:
        """--baseline-constants as {name: value}; each name must be an integer constant of gamma.py."""
        constants = {}
        for item in filter(None, (part.strip() for part in self.baseline_constants.split(","))):
            name, _, value = item.partition("=")
            if not isinstance(getattr(gamma, name.strip(), None), int) or not value.strip().lstrip("-").isdigit():
                raise JobConfigError(f"--baseline-constants takes NAME=integer pairs naming gamma.py's integer "
                                     f"constants (SETTLE, PAIR_GAP, REDECIDE, ...), got {item!r}.")
            constants[name.strip()] = int(value)
        return constants


def baseline_source(baseline: str) -> str:
    """The text of the baseline's gamma.py: a file, else pipeline/engine/gamma.py at a git revision."""
    if Path(baseline).is_file():
        return Path(baseline).read_text()
    shown = subprocess.run(["git", "show", f"{baseline}:pipeline/engine/gamma.py"], cwd=REPO,
                           capture_output=True, text=True)
    if shown.returncode != 0:
        raise JobConfigError(f"--baseline {baseline} is neither a gamma.py file nor a git revision of {REPO} "
                             f"with pipeline/engine/gamma.py (git: {shown.stderr.strip()}).")
    return shown.stdout


def load_policy_module(source: str, constants: dict[str, int]) -> ModuleType:
    """gamma.py's text as a module of its own (this tree's stays as it is), each constant's module-level assignment
    rewritten before it runs, so what is derived from it (PAIR_GAP from SETTLE, field defaults) follows."""
    for constant, value in constants.items():
        source, found = re.subn(rf"^{constant} = [^#\n]*", f"{constant} = {value}  ", source, flags=re.MULTILINE)
        if not found:
            raise JobConfigError(f"--baseline-constants names {constant}, which the baseline's gamma.py does not "
                                 f"assign at module level.")
    name = f"gamma_baseline_{sum(m.startswith('gamma_baseline_') for m in sys.modules)}"
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(source)
    try:
        spec = importlib.util.spec_from_file_location(name, file.name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    finally:
        Path(file.name).unlink()
    return module


class _CountedChoices:
    """A gamma policy that also counts, in the timed rounds only, the draft lengths it ran per batch-size bucket and
    the drafter's put-off prefills (how many, their seconds)."""

    def __init__(self, policy):
        self.policy = policy
        self.counting = False
        self.choices: Counter = Counter()  # (bucket, k) -> steps
        self.drafter_prefills, self.drafter_prefill_s = 0, 0.0

    def __getattr__(self, name):  # the engine calls the policy's other methods as they are
        return getattr(self.policy, name)

    def observe(self, k, num_accepted, step) -> None:
        if self.counting:
            self.choices[(batch_bucket(len(num_accepted)), k)] += 1
        self.policy.observe(k, num_accepted, step)

    def observe_drafter_prefill(self, batch_size: int, rows: int, seconds: float) -> None:
        if self.counting:
            self.drafter_prefills += 1
            self.drafter_prefill_s += seconds
        self.policy.observe_drafter_prefill(batch_size, rows, seconds)


def time_against(times: EngineTimes, plain: EngineTimes) -> dict[str, float]:
    """Where an engine's time went against plain decoding's over the same rows, in seconds more (negative: less):
    prefill (the drafter's put-off prefills are in it), the steps (drafting and verification), the rest (bookkeeping,
    the policy's calls, admission, the loop) and the whole."""
    return {"prefill": times.prefill_s - plain.prefill_s,
            "steps": times.draft_s + times.verify_s - plain.draft_s - plain.verify_s,
            "other": times.other_s - plain.other_s, "total": times.total_s - plain.total_s}


def engine_split(engine: SpecDecodeEngine, plain: SpecDecodeEngine) -> dict[str, float]:
    """time_against, with plain decoding's whole time, the engine's steps, how many drafted, and its drafter's
    prefills (an `auto` engine's, counted by _CountedChoices)."""
    policy = engine.gamma_policy
    counted = isinstance(policy, _CountedChoices)
    return {**time_against(engine.times, plain.times), "plain_total": plain.times.total_s,
            "steps_run": engine.times.num_steps,
            "drafting_steps": sum(steps for (_, k), steps in policy.choices.items() if k) if counted else 0,
            "drafter_prefills": policy.drafter_prefills if counted else 0,
            "drafter_prefill_s": policy.drafter_prefill_s if counted else 0.0}


def run_ab(config: ABConfig, log=print) -> dict:
    """Decode in turn, compare, print and save; returns the results."""
    log(f"gamma A/B config: {json.dumps(dataclasses.asdict(config))}")
    baseline = load_policy_module(baseline_source(config.baseline), config.constants())
    target = Target.load(config.target)
    drafter = load_drafter(demo_drafters()[config.drafter], target)
    prompts = Workload(target, config.prompts, config.rows).prompts
    settings = EngineConfig(gamma=AUTO, max_new_tokens=config.max_new_tokens)
    engines = {PLAIN: SpecDecodeEngine(target, None, EngineConfig(gamma=0, max_new_tokens=config.max_new_tokens))}
    sides = {AUTO_HERE: gamma.GammaPolicy, AUTO_BASELINE: baseline.GammaPolicy}
    for side, policy in sides.items():
        for i in range(1, config.policies + 1):
            engine = engines[f"{side} {i}"] = SpecDecodeEngine(target, drafter, settings)
            engine.gamma_policy = _CountedChoices(policy(gamma=AUTO))
    chunk = DIRECT_PART_ROWS if config.continuous else config.batch_size
    parts = {name: [part for i in range(0, len(prompts), chunk)
                    for part in decode_parts(engine, prompts[i:i + chunk], config.batch_size, config.continuous)]
             for name, engine in engines.items()}
    names = list(engines)
    seconds = {name: [0.0] * config.repeats for name in names}
    tokens = {name: [] for name in names}
    for round_ in range(1 + config.repeats):  # round 0 warms up, untimed
        for name in names[1:]:
            engines[name].gamma_policy.counting = round_ > 0
        if round_ == 1:
            for engine in engines.values():
                engine.times = EngineTimes()
        for i in range(len(parts[PLAIN])):
            turn = (round_ + i) % len(names)  # who goes first moves round
            for name in names[turn:] + names[:turn]:
                start = time.perf_counter()
                results = parts[name][i]()
                if round_:
                    seconds[name][round_ - 1] += time.perf_counter() - start
                if round_ == config.repeats:
                    tokens[name] += [r.tokens for r in results]
        if round_:
            log(f"round {round_}/{config.repeats}: " + ", ".join(f"{n} {seconds[n][round_ - 1]:.2f} s" for n in names))
    vs_plain = {name: [p / s for p, s in zip(seconds[PLAIN], seconds[name])] for name in names}
    of_side = {side: [name for name in names if name.startswith(side)] for side in sides}
    results = {
        "seconds": seconds,
        "vs_plain": vs_plain,
        "median_vs_plain": {name: statistics.median(v) for name, v in vs_plain.items()},
        "side_median_vs_plain": {side: statistics.median(r for name in of_side[side] for r in vs_plain[name])
                                 for side in sides},
        "choices": {name: {f"{bucket},{k}": steps
                           for (bucket, k), steps in sorted(engines[name].gamma_policy.choices.items())}
                    for name in names[1:]},
        "identical": all(tokens[name] == tokens[PLAIN] for name in names),
        "time_against_plain": {name: engine_split(engines[name], engines[PLAIN]) for name in names},
    }
    log(ab_table(results))
    log(time_table(results))
    for side in sides:
        log(f"{side}: {results['side_median_vs_plain'][side]:.3f}x plain decoding, the median of its engines' "
            f"rounds")
    for name in names[1:]:
        log(f"{name}: draft lengths chosen, shares of its steps by bucket (rows): "
            f"{choices_line(results['choices'][name])}")
    log(f"every engine gave the same tokens: {results['identical']}")
    save_results(config, [results], log)
    return results


def ab_table(results: dict) -> str:
    rows = [[name, " ".join(f"{s:.2f}" for s in results["seconds"][name]),
             " ".join(f"{r:.3f}" for r in results["vs_plain"][name]), f"{results['median_vs_plain'][name]:.3f}"]
            for name in results["seconds"]]
    return markdown_table(["engine", "seconds per round", "x plain decoding per round", "median"], rows)


def time_table(results: dict) -> str:
    """Where each engine's time went against plain decoding's over the timed rounds (EngineTimes), in ms and as a
    share of plain decoding's whole time."""
    rows = []
    for name, split in results["time_against_plain"].items():
        share = split["plain_total"] or 1.0
        cells = [f"{1e3 * split[part]:+.1f} ({100 * split[part] / share:+.1f}%)"
                 for part in ("prefill", "steps", "other", "total")]
        rows.append([name, *cells, f"{split['drafter_prefills']} ({1e3 * split['drafter_prefill_s']:.1f} ms)",
                     f"{split['drafting_steps']} / {split['steps_run']}"])
    return markdown_table(["engine", "prefill", "steps (draft + verify)", "other", "all", "drafter prefills",
                           "drafting steps / steps"], rows)


def choices_line(choices: dict[str, int]) -> str:
    """'bucket,k' -> steps as '8-15: 0 95%, 3 5%; ...' (shares of every step)."""
    total = sum(choices.values()) or 1
    by_bucket: dict[int, list[str]] = {}
    for key, steps in choices.items():
        bucket, k = map(int, key.split(","))
        by_bucket.setdefault(bucket, []).append(f"{k} {100 * steps / total:.0f}%")
    return "; ".join(f"{2 ** (b - 1)}-{2 ** b - 1}: {', '.join(shares)}" for b, shares in sorted(by_bucket.items()))
