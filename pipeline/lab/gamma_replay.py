"""Replay: gamma's policy offline, against a drafter's measured acceptance and this machine's measured step costs.

    python jobs/replay_gamma.py                 # the demo world's drafters (text-only, MASSV, MSD), batch 1/8/32
    python jobs/replay_gamma.py --seeds 16 --batch-sizes 32

On a VM whose speed moves by 10% from run to run, two `make bench` runs of one policy differ by more than two
policies do, so a change to `auto` cannot be judged there. Here the policy (the engine's own GammaPolicy, or any
object with its methods) decodes static batches of recorded rows, seeded:
- acceptance: the target's greedy answer per row and, per drafter, how many drafts in a row the target accepts after
  each answer token, drafted by the engine's own steps (`accepted_runs`). With greedy decoding a step with k drafts
  after token t keeps the least of k and that run, whatever the steps before kept: the engine's acceptance, row by row,
  an MSD head's too (it drafts from its own predicted features: teacher forcing, as the replay read a causal LM's
  traces before, would rate its later drafts too well; read off the engine decoding at 8 drafts, as it read an MSD
  head's, a position's rate was that of whichever draft had covered it);
- costs: the median seconds of real engine steps with k drafts at batch sizes b (fitted linear in k per b, then
  interpolated in b), one drafter forward's share, and the drafter's put-off prefill;
- the machine: a drifting speed, a step-to-step spread, stalls, and plain steps right after drafting ones run slow
  (what `gamma.py` measured on this VM: SETTLE's comment).
The replay times plain decoding, every fixed gamma and the policy on the same rows and seeds and prints each against
plain decoding and the best fixed gamma. It ranks policies; the speeds it reports are the model's, not the machine's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from drafters import load_drafter
from pipeline.engine.acceptance import SamplingConfig, accept_greedy
from pipeline.engine.batch import Row, RunningBatch
from pipeline.engine.engine import EngineConfig, SpecDecodeEngine
from pipeline.engine.gamma import AUTO, GammaPolicy
from pipeline.engine.stats import StepTimes, synchronized_time
from pipeline.engine.target import Target
from pipeline.job.cli import flag
from pipeline.job.config import JobConfigError, require_at_least_one
from pipeline.lab.benchmark import DEMO_TARGET, Workload, _int_list, demo_drafters
from pipeline.lab.demo import BENCH_PROMPTS, DEMO_WORLD
from pipeline.lab.report import markdown_table, save_results

AFTER_DRAFTING = (1.26, 1.12, 1.07)  # plain steps right after drafting ones, against steady ones (gamma.py, SETTLE)
AFTER_PREFILL = 1.15  # the first step after a prefill (gamma.py, observe_prefill)


@dataclass
class Traces:
    answers: list[list[int]]  # the target's greedy tokens per row
    runs: dict[str, list[list[int]]]  # per drafter, per row: after answer token j, how many of max_gamma drafts in a
    # row the target accepts (its j+1, j+2, ... tokens)


def record_traces(target: Target, drafters: dict, prompts: list, max_new_tokens: int, max_gamma: int = 8) -> Traces:
    """The target's greedy answers and, per drafter, the drafts the target accepts after each answer token
    (`accepted_runs`)."""
    plain = SpecDecodeEngine(target, None, EngineConfig(gamma=0, max_new_tokens=max_new_tokens))
    answers = [r.tokens for r in plain.generate(prompts)]
    runs = {name: [accepted_runs(target, drafter, prompt, answer, max_gamma)
                   for prompt, answer in zip(prompts, answers)] for name, drafter in drafters.items()}
    return Traces(answers, runs)


@torch.no_grad()
def accepted_runs(target: Target, drafter, prompt, answer: list[int], max_gamma: int) -> list[int]:
    """After each answer token j, the drafts (of max_gamma) the target accepts, drafted by the engine's own steps: the
    row decoded alone, each step drafting max_gamma and keeping none of them, so that it moves on by one token and
    drafts again from every position. Greedy, a step with k drafts after token j keeps min(run, k) of them, whatever
    the steps before kept: the target's states are its own at every position, and a drafter's are rebuilt from them
    (a causal LM's from the tokens, an MSD head's from the target's features: it drafts from its own predicted ones,
    so teacher forcing along the answer would rate its later drafts too well)."""
    batch = RunningBatch(target, drafter)
    batch.admit([Row(len(answer), frozenset())], [prompt], lambda logits: logits.argmax(dim=-1))
    greedy, runs, none = SamplingConfig(), [], torch.zeros(1, dtype=torch.long)
    for j in range(len(answer) - 1):
        drafts = batch.draft(max_gamma, greedy, None)[0]
        accepted, output = (t.cpu() for t in accept_greedy(drafts, batch.verify(drafts)))
        if int(output[0, 0]) != answer[j + 1]:  # (output[0, 0] is the target's token after the answer's first j + 1)
            raise RuntimeError("the target's greedy token moved with the drafts verified beside it: no trace is exact")
        runs.append(min(int(accepted[0]), len(answer) - 1 - j))  # (drafts past the answer's end are of no use)
        batch.rollback(max_gamma, none, output)  # keep none of them: the next step drafts from the next token
        batch.emit(max_gamma, none, output)
    return runs


@dataclass
class StepCosts:
    """Seconds of a step with k drafts at b rows (medians of real steps), a drafter forward, the put-off prefill."""

    step_s: dict[tuple[int, int], float]  # (b, k) -> seconds
    draft_s: dict[int, float]  # b -> one drafter forward
    put_off_prefill_s: dict[int, float]  # b -> the drafter's prefill of b rows
    _fit: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        sizes = sorted({b for b, _ in self.step_s})
        ks = sorted({k for _, k in self.step_s if k > 0})
        fits = [np.polyfit(ks, [self.step_s[b, k] for k in ks], 1) for b in sizes]  # linear in k: smooths the noise
        self._fit = {"b": sizes, "plain": [self.step_s[b, 0] for b in sizes], "slope": [f[0] for f in fits],
                     "intercept": [f[1] for f in fits], "draft": [self.draft_s[b] for b in sizes]}

    def step(self, b: int, k: int) -> float:
        fit = self._fit
        plain = float(np.interp(b, fit["b"], fit["plain"]))
        if k == 0:
            return plain
        return max(float(np.interp(b, fit["b"], fit["intercept"]) + np.interp(b, fit["b"], fit["slope"]) * k), plain)

    def draft(self, b: int, k: int) -> float:
        return min(k * float(np.interp(b, self._fit["b"], self._fit["draft"])), 0.8 * self.step(b, k))

    def put_off_prefill(self, b: int) -> float:
        sizes = sorted(self.put_off_prefill_s)
        return float(np.interp(b, sizes, [self.put_off_prefill_s[s] for s in sizes]))

    @staticmethod
    def target_prefill(b: int) -> float:
        return 1.2e-3 + 0.6e-3 * b  # the same for every policy: it only dilutes the ratios, as in the bench


def measure_step_costs(target: Target, drafter, prompts: list, batch_sizes: list[int], max_gamma: int,
                       steps: int = 3, repeats: int = 3) -> StepCosts:
    """Median seconds of real engine steps: fresh batches of b rows, `steps` timed steps at each k (after the first,
    and for k > 0 the catch-up one), the draft lengths in turn."""
    def admitted(b: int) -> RunningBatch:
        batch = RunningBatch(target, drafter)
        batch.admit([Row(1 << 20, frozenset()) for _ in range(b)], [prompts[i % len(prompts)] for i in range(b)],
                    lambda logits: logits.argmax(dim=-1))
        return batch

    step_s, draft_s, prefill_s = {}, {}, {}
    for b in batch_sizes:
        # every k in turn, `repeats` times: the machine's drift touches them alike (as the bench's timed_round_robin)
        times, forwards = {k: [] for k in range(max_gamma + 1)}, []
        engines = {k: SpecDecodeEngine(target, drafter, EngineConfig(gamma=k)) for k in times}
        for _ in range(repeats):
            for k, engine in engines.items():
                batch = admitted(b)
                for i in range(steps + 1 + (k > 0)):
                    step, _ = engine._step(batch, k)
                    if i >= 1 + (k > 0):
                        times[k].append(step.draft_s + step.besides_drafting_s)
                        if k:
                            forwards.append(step.draft_s / k)
        step_s.update({(b, k): statistics.median(t) for k, t in times.items()})
        draft_s[b] = statistics.median(forwards)
        seconds = []
        for _ in range(repeats):
            batch = admitted(b)
            start = synchronized_time(target.device)
            batch.prefill_put_off()
            seconds.append(synchronized_time(target.device) - start)
        prefill_s[b] = statistics.median(seconds)
    return StepCosts(step_s, draft_s, prefill_s)


class Machine:
    """A VM's speed: a drift (log speed as an AR(1) walk), a step-to-step spread and occasional stalls, seeded."""

    def __init__(self, seed: int, spread: float = 0.10, drift: float = 0.03, stall: float = 0.02):
        self.random, self.log_speed = random.Random(seed), 0.0
        self.spread, self.drift, self.stall = spread, drift, stall

    def factor(self) -> float:
        self.log_speed = 0.99 * self.log_speed + self.random.gauss(0.0, self.drift)
        stalled = 2.5 if self.random.random() < self.stall else 1.0
        return math.exp(self.log_speed + self.random.gauss(0.0, self.spread)) * stalled


class FixedGamma:
    """A policy that always drafts k (0: plain decoding)."""

    def __init__(self, k: int):
        self.k = k

    def choose(self, batch_size: int, prefill_waits: bool = False, emitted: list[int] | None = None,
               drains: bool = False) -> int:
        return self.k

    def observe(self, k, num_accepted, step) -> None:
        pass

    def observe_prefill(self) -> None:
        pass

    def observe_drafter_prefill(self, batch_size, rows, seconds) -> None:
        pass

    def observe_finished(self, lengths) -> None:
        pass


def replay(policy, answers: list[list[int]], runs: list[list[int]], costs: StepCosts, batch_size: int, seed: int,
           passes: int = 4, timed_from: int = 1) -> float:
    """Seconds the policy takes over the rows in static batches of batch_size, `passes` times (the policy learns
    throughout; passes before timed_from are not counted, as the bench's warm-up), at the machine's usual speed: the
    machine's noise is in what the policy times, not in the score (a run's drift moved its seconds by about a tenth
    from seed to seed, more than policies differ, and 32 seeds' means by 2 points)."""
    machine = Machine(seed)
    total, plain_run, pending = 0.0, len(AFTER_DRAFTING), 1
    for done_passes in range(passes):
        seconds = 0.0
        for start in range(0, len(answers), batch_size):
            rows = list(range(start, min(start + batch_size, len(answers))))
            seconds += costs.target_prefill(len(rows))
            policy.observe_prefill()
            emitted = {i: 1 for i in rows}  # the prefill emits each row's first token
            active = [i for i in rows if len(answers[i]) > 1]
            prefill_waits, first = True, True
            pending = 1  # what a drafter catches up on: the tokens of these rows since their prefill, not before it
            while active:
                b = len(active)
                k = policy.choose(b, prefill_waits, [emitted[i] for i in active], drains=True)  # static batches
                if k and prefill_waits:
                    prefill = costs.put_off_prefill(b)
                    seconds += prefill
                    policy.observe_drafter_prefill(b, b, prefill * machine.factor())
                    prefill_waits = False
                speed = machine.factor()
                step = costs.step(b, k) * (AFTER_PREFILL if first else 1.0)
                if k == 0 and plain_run < len(AFTER_DRAFTING):
                    step *= AFTER_DRAFTING[plain_run]
                catch_up = costs.draft(b, 1) * 0.05 * pending if k else 0.0  # the tokens decoded plainly since
                step_s, draft_s = (step + catch_up) * speed, (costs.draft(b, k) + catch_up) * speed if k else 0.0
                kept, finished = [], []
                for i in active:
                    length = len(answers[i])
                    drafts, tokens = row_step(runs[i], emitted[i], length, k)
                    kept.append(drafts)  # as the engine tells the policy
                    emitted[i] += tokens
                    if emitted[i] >= length:
                        finished.append(length)
                policy.observe(k, kept, StepTimes(draft_s, step_s - draft_s))
                policy.observe_finished(finished)
                active = [i for i in active if emitted[i] < len(answers[i])]
                seconds += step + catch_up
                plain_run = plain_run + 1 if k == 0 else 0
                pending = pending + 1 if k == 0 else 1
                first = False
        if done_passes >= timed_from:
            total += seconds
    return total


def row_step(runs: list[int], emitted: int, length: int, k: int) -> tuple[int, int]:
    """A step with k drafts of a row of `length` tokens, `emitted` of them out: the drafts it keeps and the tokens it
    emits (its last token may be a draft)."""
    run, left = accepted_run(runs, emitted, k), length - emitted
    return min(run, left), min(run + 1, left)


def steps_and_kept(runs: list[int], length: int, k: int) -> tuple[int, int]:
    """The steps a row of `length` tokens takes with k drafts a step (the prefill emits its first token), and the
    drafts it keeps."""
    emitted, steps, kept = 1, 0, 0
    while emitted < length:
        drafts, tokens = row_step(runs, emitted, length, k)
        emitted, steps, kept = emitted + tokens, steps + 1, kept + drafts
    return steps, kept


def accepted_run(runs: list[int], emitted: int, k: int) -> int:
    """The drafts the target accepts in a step with k drafts, `emitted` answer tokens out (within the answer)."""
    return min(runs[emitted - 1], k) if emitted - 1 < len(runs) else 0


def compare(make_policy, traces: Traces, costs: dict[str, StepCosts], batch_sizes: list[int], seeds: int,
            max_gamma: int) -> list[dict]:
    """Per drafter and batch size: mean seconds over the seeds of plain decoding, each fixed gamma and the policy."""
    results = []
    for name, accepted in traces.runs.items():
        for batch_size in batch_sizes:
            runs = {"plain": lambda: FixedGamma(0), **{str(k): (lambda k=k: FixedGamma(k))
                                                      for k in range(1, max_gamma + 1)}, "policy": make_policy}
            seconds = {label: statistics.mean(replay(make(), traces.answers, accepted, costs[name], batch_size, seed)
                                              for seed in range(seeds)) for label, make in runs.items()}
            best = min((s, label) for label, s in seconds.items() if label not in ("plain", "policy"))
            results.append({"drafter": name, "batch_size": batch_size, "seconds": seconds, "best_gamma": best[1],
                            "policy_vs_plain": seconds["plain"] / seconds["policy"],
                            "policy_vs_best": best[0] / seconds["policy"],
                            "best_vs_plain": seconds["plain"] / best[0]})
    return results


def results_table(results: list[dict]) -> str:
    return markdown_table(
        ["drafter", "batch", "best fixed gamma", "its speed vs plain", "policy vs plain", "policy vs best fixed"],
        [[r["drafter"], str(r["batch_size"]), r["best_gamma"], f"{r['best_vs_plain']:.3f}x",
          f"{r['policy_vs_plain']:.3f}x", f"{r['policy_vs_best']:.3f}"] for r in results])


@dataclass
class ReplayConfig:
    target: str = field(default=DEMO_TARGET, metadata=flag("target VLM checkpoint directory (the demo world's)"))
    drafters: list[str] = field(default_factory=lambda: list(demo_drafters()), metadata=flag(
        "comma-separated drafters of the demo world (text-only, massv, msd)", parse=lambda v: v.split(",")))
    prompts: str = field(default=str(DEMO_WORLD / BENCH_PROMPTS), metadata=flag(
        "Parquet with prompt and image columns (the demo world's held-out captions)"))
    rows: int = field(default=64, metadata=flag("prompts replayed (the bench's)"))
    max_new_tokens: int = field(default=48, metadata=flag("tokens per answer at most (the bench's)"))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32], metadata=flag(
        "comma-separated static batch sizes", parse=_int_list))
    max_gamma: int = field(default=8, metadata=flag("fixed gammas 1..max_gamma, and auto's upper bound"))
    seeds: int = field(default=8, metadata=flag("noise seeds each configuration is replayed with (mean)"))
    output: str = field(default="out/replay", metadata=flag("where results.json goes"))
    recording: str | None = field(default=None, metadata=flag(
        "a JSON file of the traces and step costs: replayed from where it exists (no model loaded, nothing timed), "
        "else recorded there; policies compared on one recording meet the same machine (this VM's step costs move "
        "by a tenth to a third between recordings)"))

    def __post_init__(self):
        require_at_least_one({"--rows": self.rows, "--seeds": self.seeds, "--max-gamma": self.max_gamma,
                              "--max-new-tokens": self.max_new_tokens, "--batch-sizes": min(self.batch_sizes)})
        unknown = [d for d in self.drafters if d not in demo_drafters()]
        if unknown:
            raise JobConfigError(f"--drafters: {unknown} are not drafters of the demo world "
                                 f"({', '.join(demo_drafters())}).")


def run_replay(config: ReplayConfig, make_policy=None, log=print) -> list[dict]:
    """Record the traces and step costs (or read them from config.recording), replay every configuration, print and
    save the table."""
    log(f"replay config: {json.dumps(dataclasses.asdict(config))}")
    sizes = sorted({1, *[b for b in (2, 4, 8, 16, 32, 64) if b < max(config.batch_sizes)], max(config.batch_sizes)})
    if config.recording and Path(config.recording).exists():
        traces, costs = load_recording(config.recording, config.drafters)
        log(f"replaying the recording {config.recording}")
    else:
        traces, costs = record(config, sizes)
        if config.recording:
            save_recording(config.recording, traces, costs)
            log(f"recorded the traces and step costs in {config.recording}")
    for name in config.drafters:
        runs = [run for row in traces.runs[name] for run in row]
        steps = ", ".join(f"{b}: {costs[name].step(b, 0) * 1e3:.2f} / {costs[name].step(b, config.max_gamma) * 1e3:.2f}"
                          for b in sizes)
        log(f"{name}: {sum(runs) / max(len(runs), 1):.2f} of {config.max_gamma} drafts accepted after an answer token "
            f"on average; a step's ms plain / with {config.max_gamma} drafts at batch size {steps}")
    make_policy = make_policy or (lambda: GammaPolicy(gamma=AUTO, max_gamma=config.max_gamma))
    results = compare(make_policy, traces, costs, config.batch_sizes, config.seeds, config.max_gamma)
    log(results_table(results))
    save_results(config, results, log)
    return results


def record(config: ReplayConfig, sizes: list[int]) -> tuple[Traces, dict[str, StepCosts]]:
    """The demo world's traces and this machine's step costs for config's drafters, at these batch sizes."""
    target = Target.load(config.target)
    drafters = {name: load_drafter(demo_drafters()[name], target) for name in config.drafters}
    workload = Workload(target, config.prompts, config.rows)
    traces = record_traces(target, drafters, workload.prompts, config.max_new_tokens, config.max_gamma)
    costs = {name: measure_step_costs(target, drafter, workload.prompts, sizes, config.max_gamma)
             for name, drafter in drafters.items()}
    return traces, costs


def save_recording(path: str, traces: Traces, costs: dict[str, StepCosts]) -> None:
    recording = {"answers": traces.answers, "runs": traces.runs,
                 "costs": {name: {"step_s": [[b, k, s] for (b, k), s in c.step_s.items()],
                                  "draft_s": [[b, s] for b, s in c.draft_s.items()],
                                  "put_off_prefill_s": [[b, s] for b, s in c.put_off_prefill_s.items()]}
                           for name, c in costs.items()}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(recording))


def load_recording(path: str, drafters: list[str]) -> tuple[Traces, dict[str, StepCosts]]:
    """save_recording's traces and costs, of these drafters (a JobConfigError names any the recording lacks)."""
    recording = json.loads(Path(path).read_text())
    if "runs" not in recording:
        raise JobConfigError(f"--recording {path} holds traces of an older kind (the drafters' right predictions, not "
                             f"their accepted runs): record anew at another path.")
    missing = [name for name in drafters if name not in recording["runs"] or name not in recording["costs"]]
    if missing:
        raise JobConfigError(f"--recording {path} holds no traces of {missing} (it has "
                             f"{', '.join(recording['runs'])}): replay those drafters, or record anew elsewhere.")
    costs = {name: StepCosts({(b, k): s for b, k, s in c["step_s"]}, {b: s for b, s in c["draft_s"]},
                             {b: s for b, s in c["put_off_prefill_s"]})
             for name, c in recording["costs"].items() if name in drafters}
    return Traces(recording["answers"], {name: recording["runs"][name] for name in drafters}), costs
