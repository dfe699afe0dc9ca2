"""`auto`'s step costs against the truth: the ratio S(k) / S(0) that gamma's policy estimates at each step, set against
the same ratio in fixed-gamma engines' own step times on the same rows.

    python jobs/gamma_truth.py                                      # text-only at batch 32, 8 reps
    python jobs/gamma_truth.py --drafter msd --batch-size 8 --gammas 0,3,4,5

The engine without a drafter and the engine at each fixed gamma decode the bench's prompts in static batches, batch
by batch in turn with a fresh `auto` engine per rep (a warm-up pass and 3 timed ones: the bench's regime), so a drift
of the machine's speed touches them alike. Each fixed engine's median step time per row count is the truth; every
step `auto` takes, its estimate of S(k) / S(0) for each k it has measured at that step's batch-size bucket is set
against the truth at the step's rows (the nearest row count within 2 that both engines ran). Prints per (bucket, k)
the median log error (its bias: negative when drafting is rated cheaper than it is) and the median absolute one,
and `auto`'s speed against plain decoding and the best fixed gamma over the timed passes (step times only, prefill
excluded), and which draft lengths `auto` chose at each bucket: their shares of its steps over every rep, and each
rep's most chosen (the reps of one policy can settle far apart: the tenth session of 2026-12-05 found one rep of MSD
at batch 8 decoding plainly at 8 rows for all its passes). Where `make bench` judges a policy by speeds that move by a
few points between runs, this judges its estimates: the ninth session of 2026-12-05 found them 10-15% low
(docs/journal.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from drafters import load_drafter
from pipeline.engine.engine import EngineConfig, SpecDecodeEngine
from pipeline.engine.gamma import AUTO, GammaPolicy, batch_bucket
from pipeline.engine.stats import StepTimes
from pipeline.engine.target import Target
from pipeline.job.cli import flag
from pipeline.job.config import JobConfigError, require_at_least_one
from pipeline.lab.benchmark import DEMO_TARGET, Workload, _int_list, demo_drafters, require_demo_drafter
from pipeline.lab.demo import BENCH_PROMPTS, DEMO_WORLD
from pipeline.lab.report import markdown_table, save_results

TIMED_PASSES = 3  # after one warm-up pass, as the bench times its rounds
ROWS_NEAR = 2  # the truth at a step's rows is read at the nearest row count within this many that the engines ran
MIN_STEPS = 3  # steps at a row count before its median counts as the truth


@dataclass
class TruthConfig:
    target: str = field(default=DEMO_TARGET, metadata=flag("target VLM checkpoint directory (the demo world's)"))
    drafter: str = field(default="text-only", metadata=flag("a drafter of the demo world (text-only, massv, msd)"))
    prompts: str = field(default=str(DEMO_WORLD / BENCH_PROMPTS), metadata=flag(
        "Parquet with prompt and image columns (the demo world's held-out captions)"))
    rows: int = field(default=64, metadata=flag("prompts decoded each pass (the bench's)"))
    max_new_tokens: int = field(default=48, metadata=flag("tokens per answer at most (the bench's)"))
    batch_size: int = field(default=32, metadata=flag("static batch size"))
    gammas: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata=flag(
        "comma-separated fixed gammas whose step times are the truth (0, plain decoding, is always among them)",
        parse=_int_list))
    reps: int = field(default=8, metadata=flag("fresh `auto` engines, each a warm-up pass and 3 timed ones"))
    output: str = field(default="out/gamma_truth", metadata=flag("where results.json goes"))

    def __post_init__(self):
        require_at_least_one({"--rows": self.rows, "--reps": self.reps, "--batch-size": self.batch_size,
                              "--max-new-tokens": self.max_new_tokens})
        require_demo_drafter(self.drafter)
        if any(gamma < 0 for gamma in self.gammas):
            raise JobConfigError(f"--gammas must be non-negative integers, got {self.gammas}.")
        self.gammas = sorted({0, *self.gammas})


class _Timed:
    """A gamma policy that also keeps what each step took, (rep, pass, k, rows, seconds), and for `auto` its estimate
    of S(k) / S(0) for each k measured at the step's bucket, just after the step: (rep, pass, rows, {k: ratio})."""

    def __init__(self, policy: GammaPolicy):
        self.policy = policy
        self.steps: list[tuple[int, int, int, int, float]] = []
        self.estimates: list[tuple[int, int, int, dict[int, float]]] = []
        self.now = (0, 0)  # (rep, pass) being decoded

    def __getattr__(self, name):  # the engine calls the policy's other methods as they are
        return getattr(self.policy, name)

    def observe(self, k: int, num_accepted: list[int], step: StepTimes) -> None:
        rows = len(num_accepted)
        self.steps.append((*self.now, k, rows, step.draft_s + step.besides_drafting_s))
        self.policy.observe(k, num_accepted, step)
        costs = self.policy.buckets.get(batch_bucket(rows)) if self.policy.auto else None
        if costs is not None and 0 in costs.log_s:
            plain = self.policy.step_seconds(0, rows)
            self.estimates.append((*self.now, rows, {m: self.policy.step_seconds(m, rows) / plain
                                                     for m in costs.log_s if m}))


def truth_by_rows(steps: list[tuple[int, int, int, int, float]]) -> dict[int, float]:
    """Median step seconds per row count, the first rep's warm-up pass left out (row counts with MIN_STEPS steps or
    more)."""
    by_rows = defaultdict(list)
    for rep, pass_, _, rows, seconds in steps:
        if (rep, pass_) != (0, 0):
            by_rows[rows].append(seconds)
    return {rows: statistics.median(times) for rows, times in by_rows.items() if len(times) >= MIN_STEPS}


def true_ratio(truth: dict[int, dict[int, float]], k: int, rows: int) -> float | None:
    """S(k) / S(0) in the fixed engines' step times at these rows, or the nearest within ROWS_NEAR both ran."""
    for near in sorted(range(rows - ROWS_NEAR, rows + ROWS_NEAR + 1), key=lambda r: (abs(r - rows), r)):
        if near in truth.get(k, {}) and near in truth[0]:
            return truth[k][near] / truth[0][near]
    return None


def estimate_errors(estimates: list[tuple[int, int, int, dict[int, float]]],
                    truth: dict[int, dict[int, float]]) -> dict[tuple[int, int], list[float]]:
    """log(estimate / truth) per (bucket, k), over the timed passes' steps."""
    errors = defaultdict(list)
    for _, pass_, rows, ratios in estimates:
        if pass_ == 0:
            continue
        for k, ratio in ratios.items():
            true = true_ratio(truth, k, rows)
            if true:
                errors[(batch_bucket(rows), k)].append(math.log(ratio / true))
    return errors


def choices_by_bucket(steps: list[tuple[int, int, int, int, float]]) -> dict[int, dict[int, Counter]]:
    """bucket -> rep -> how many steps chose each draft length, over the timed passes."""
    choices = defaultdict(lambda: defaultdict(Counter))
    for rep, pass_, k, rows, _ in steps:
        if pass_ > 0:
            choices[batch_bucket(rows)][rep][k] += 1
    return choices


def timed_seconds(steps: list[tuple[int, int, int, int, float]]) -> float:
    """Step seconds in the timed passes (every rep's warm-up pass left out, the fixed engines' too: the same passes
    `auto` is timed in)."""
    return sum(seconds for _, pass_, _, _, seconds in steps if pass_ > 0)


def run_truth(config: TruthConfig, make_policy=None, log=print) -> dict:
    """Decode, compare, print and save; returns the results: errors per (bucket, k) and the speeds."""
    log(f"gamma truth config: {json.dumps(dataclasses.asdict(config))}")
    make_policy = make_policy or (lambda: GammaPolicy(gamma=AUTO))
    target = Target.load(config.target)
    drafter = load_drafter(demo_drafters()[config.drafter], target)
    prompts = Workload(target, config.prompts, config.rows).prompts
    batches = [prompts[i:i + config.batch_size] for i in range(0, len(prompts), config.batch_size)]
    fixed = {}
    for gamma in config.gammas:
        engine = SpecDecodeEngine(target, drafter if gamma else None,
                                  EngineConfig(gamma=gamma, max_new_tokens=config.max_new_tokens))
        engine.gamma_policy = _Timed(engine.gamma_policy)
        fixed[gamma] = engine
    autos = []
    for rep in range(config.reps):
        engine = SpecDecodeEngine(target, drafter, EngineConfig(gamma=AUTO, max_new_tokens=config.max_new_tokens))
        engine.gamma_policy = _Timed(make_policy())
        autos.append(engine.gamma_policy)
        runs = [*fixed.values(), engine]
        for pass_ in range(1 + TIMED_PASSES):
            for run in runs:
                run.gamma_policy.now = (rep, pass_)
            for i, batch in enumerate(batches):
                turn = (rep + pass_ + i) % len(runs)  # who goes first moves round
                for run in runs[turn:] + runs[:turn]:
                    run.generate(batch)
        log(f"rep {rep + 1}/{config.reps} done")
    truth = {gamma: truth_by_rows(engine.gamma_policy.steps) for gamma, engine in fixed.items()}
    errors = estimate_errors([e for timed in autos for e in timed.estimates], truth)
    seconds = {gamma: timed_seconds(engine.gamma_policy.steps) for gamma, engine in fixed.items()}
    auto_s = sum(timed_seconds(timed.steps) for timed in autos)
    best = min((g for g in seconds if g), key=seconds.get, default=0)
    choices = choices_by_bucket([step for timed in autos for step in timed.steps])
    results = {
        "errors": [{"bucket": bucket, "k": k, "steps": len(v), "median": statistics.median(v),
                    "median_abs": statistics.median(map(abs, v))} for (bucket, k), v in sorted(errors.items())],
        "choices": [{"bucket": bucket, "steps": dict(sorted(sum(by_rep.values(), Counter()).items())),
                     "most_chosen_per_rep": [by_rep[rep].most_common(1)[0][0] if rep in by_rep else None
                                             for rep in range(config.reps)]}
                    for bucket, by_rep in sorted(choices.items())],
        "fixed_vs_plain": {g: seconds[0] / s for g, s in seconds.items()},
        "auto_vs_plain": seconds[0] / auto_s, "best_fixed": best, "auto_vs_best_fixed": seconds[best] / auto_s}
    log(truth_table(results))
    log(choices_table(results))
    log(f"step time over the timed passes: auto {results['auto_vs_plain']:.3f}x plain decoding, "
        f"{results['auto_vs_best_fixed']:.3f} of the best fixed gamma ({best}: "
        f"{results['fixed_vs_plain'][best]:.3f}x plain decoding)")
    save_results(config, [results], log)
    return results


def bucket_rows(bucket: int) -> str:
    """The batch sizes a bucket holds, 2^(b-1) to 2^b - 1 (batch_bucket)."""
    return f"{2 ** (bucket - 1)}-{2 ** bucket - 1}"


def truth_table(results: dict) -> str:
    """Per (bucket, k): the estimates' median log error against the truth, its median absolute value, and how many
    steps' estimates it rests on."""
    return markdown_table(
        ["bucket (rows)", "k", "steps", "median log error", "median abs"],
        [[bucket_rows(e["bucket"]), str(e["k"]), str(e["steps"]), f"{e['median']:+.3f}", f"{e['median_abs']:.3f}"]
         for e in results["errors"]])


def choices_table(results: dict) -> str:
    """Per bucket: `auto`'s timed steps there, the share of them with each draft length, and each rep's most chosen."""
    rows = []
    for c in results["choices"]:
        total = sum(c["steps"].values())
        shares = ", ".join(f"{k}: {n / total:.0%}" if n >= 0.005 * total else f"{k}: <1%"
                           for k, n in c["steps"].items())
        reps = ", ".join("-" if k is None else str(k) for k in c["most_chosen_per_rep"])
        rows.append([bucket_rows(c["bucket"]), str(total), shares, reps])
    return markdown_table(["bucket (rows)", "steps", "draft lengths chosen (share of steps)", "most chosen, per rep"],
                          rows)
