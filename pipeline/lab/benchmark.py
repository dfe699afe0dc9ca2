"""The side-by-side benchmark behind jobs/bench.py: what speculation buys over what a user would run otherwise.

On the same prompts, batched the same way (all `rows` prompts in batches of each size):
  HF generate    greedy `model.generate`, target only, one left-padded batch per call
  HF assisted    `generate(assistant_model=...)` with the text-only drafter (batch 1: all HF supports)
  engine         this engine without a drafter, and with each drafter at each gamma
  caption job    the Ray Data job end to end on the same rows (rows/s), to show the pipeline's overhead
Each configuration runs once to warm up (and measure peak memory); then `repeats` rounds time every
configuration of a batch size, batch by batch in turn (each configuration's first batch, then each one's
second, ...), so a drift of the machine's speed touches them alike; tokens/s is the median round. `auto` runs as
`auto_policies` fresh engines in those turns, and its row is the median one's (fresh policies of one code on the same
rows ran up to 5 points apart: a policy's own history sets its later choices); the goals give their range too. Engine
rows also carry tau, acceptance, per-position acceptance, where the time went, the drafter/target cost ratio c, the
verify cost v and the analytic speedups over the engine without a drafter: tau / (1 + gamma * c) (Leviathan et
al.) and tau / (v + gamma * c) (what the goal judges).

`auto`'s two goals are judged head to head: after the sweep over every gamma, each batch size times again, in a
shorter turn, the engine without a drafter, a second engine without a drafter (the control: how far two runs of one
code differ here), each drafter's three fastest fixed gammas of the sweep and its `auto` policies, on at least
`head_to_head_batches` batches and `head_to_head_seconds` of the engine's decoding (the rows repeated; see
head_to_head_rows); the fastest of those gammas there is auto's bar. In the sweep, about 30 configurations a turn put
a run's batch seconds from the engine's it is compared with, and the best of 8 gammas is the luckiest of 8 noisy
figures: a second plain engine in the sweep's turns measured 0.93-1.10x the first at batch 32 (2 batches of the 64
rows), 0.95-1.02x at batch 8; head to head, 0.99-1.02x at batch 1, 8 and 32 (256 rows at batch 32), a row's time
paired with the engine without a drafter's round by round (see Benchmark._head_to_head).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from drafters import TextOnlyDraftModel, drafter_kind, load_drafter
from pipeline.engine.engine import EngineConfig, SpecDecodeEngine
from pipeline.engine.gamma import AUTO, parse_gamma
from pipeline.engine.prompts import build_messages, prepare_prompt
from pipeline.engine.stats import EngineTimes, SpecDecodeCounts, synchronized_time
from pipeline.engine.target import Target
from pipeline.job.charts import bar_chart, line_chart
from pipeline.job.cli import flag
from pipeline.job.config import JobConfigError, require_at_least_one
from pipeline.job.ray_cluster import connect as connect_ray
from pipeline.lab.demo import BENCH_PROMPTS, DEMO_WORLD
from pipeline.lab.report import markdown_table

HF_GENERATE, HF_ASSISTED, ENGINE, CAPTION_JOB = "HF generate", "HF assisted", "engine", "caption job"
DIRECT_PART_ROWS = 512  # rows of the caption job comparison's engine runs timed in turn
DIRECT = "engine direct"  # the engine called in-process on the caption job's rows, to compare the job with
HEAD_TO_HEAD = "engine head to head"  # auto's goals: the engine again, in a shorter turn (see the module's docstring)
CONTROL = "control"  # the gamma of the head to head's second engine without a drafter
# the sweep's fastest fixed gammas a drafter takes into the head to head, where the fastest of them is auto's bar: the
# sweep's own ranking is noisy (its fastest for MSD at batch 8 was gamma 5 in one run, 1.10x plain decoding, and gamma
# 2 in the next, 0.95x)
HEAD_TO_HEAD_GAMMAS = 3
CONTINUOUS_PART_BATCHES = 4  # with continuous batching, the head to head's parts are this many batches' worth of rows
NO_DRAFTER = "-"
STATIC, CONTINUOUS = "static", "continuous"


DEMO_TARGET = str(DEMO_WORLD / "target")
DTYPES = ("auto", "float32", "bfloat16")
FULL = dict(rows=64, batch_sizes=[1, 8, 32], gammas=[*range(1, 9), AUTO], max_new_tokens=48, repeats=3, job_rows=2048,
            auto_policies=3, head_to_head_batches=8, head_to_head_seconds=0.75)
QUICK = dict(rows=4, batch_sizes=[1, 4], gammas=[2, AUTO], max_new_tokens=8, repeats=1, job_rows=8,
             auto_policies=2, head_to_head_batches=2, head_to_head_seconds=0.0)  # CI: seconds


def demo_drafters() -> dict[str, str]:
    return {name: str(DEMO_WORLD / name) for name in ("text-only", "msd", "massv")}  # the caption job runs the last


def require_demo_drafter(name: str) -> None:
    """`name` is a drafter of the demo world; else a JobConfigError listing them."""
    if name not in demo_drafters():
        raise JobConfigError(f"--drafter {name} is not a drafter of the demo world ({', '.join(demo_drafters())}).")


def _named_path(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, path


def _int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _presets(name: str) -> str:
    return f"{FULL[name]}, {QUICK[name]} with --quick".replace("'", "")


@dataclass
class BenchConfig:
    quick: bool = field(default=False, metadata=flag("a few rows and settings (the 'with --quick' values below), "
                                                     "for CI"))
    target: str | None = field(default=None, metadata=flag(
        "target VLM checkpoint directory (default: the demo world's, with its drafters)"))
    drafters: dict[str, str] | None = field(default=None, metadata=flag(
        "a drafter to measure (repeatable); default: the demo world's text-only and massv,\n"
        "or none with --target", name="drafter", parse=_named_path, repeat=True, metavar="NAME=DIR"))
    assistant: str | None = field(default=None, metadata=flag(
        "which text-only drafter HF assisted generation uses (default text-only when present;\n'none' skips it)"))
    prompts: str = field(default=str(DEMO_WORLD / BENCH_PROMPTS), metadata=flag(
        "Parquet with prompt and image (bytes) columns (the demo world's held-out captions)"))
    rows: int | None = field(default=None, metadata=flag(f"prompts to run at every batch size ({_presets('rows')})"))
    batch_sizes: list[int] | None = field(default=None, metadata=flag(
        f"comma-separated ({_presets('batch_sizes')})", parse=_int_list))
    gammas: list[int | str] | None = field(default=None, metadata=flag(
        f"comma-separated draft lengths and/or auto ({_presets('gammas')})", parse=lambda v: v.split(",")))
    max_new_tokens: int | None = field(default=None, metadata=flag(f"({_presets('max_new_tokens')})"))
    repeats: int | None = field(default=None, metadata=flag(
        f"timed runs after the warm-up; the median counts ({_presets('repeats')})"))
    auto_policies: int | None = field(default=None, metadata=flag(
        "fresh `auto` engines per drafter and batch size, timed in turn with the rest; the row is the\n"
        f"median one's ({_presets('auto_policies')})"))
    head_to_head_batches: int | None = field(default=None, metadata=flag(
        "auto's goals: batches of the head to head at each batch size, the rows repeated where they\n"
        f"are fewer (0 skips it, and the goals take the sweep's figures) ({_presets('head_to_head_batches')})"))
    head_to_head_seconds: float | None = field(default=None, metadata=flag(
        "and at least as many rows as the engine without a drafter decodes in this many seconds in\n"
        f"the sweep, in whole batches ({_presets('head_to_head_seconds')})"))
    caption_job: bool = field(default=True, metadata=flag(
        "skip the caption job comparison (the Ray job against the engine called directly, static\n"
        "and continuous batching)"))
    job_rows: int | None = field(default=None, metadata=flag(
        f"rows of that comparison, the prompts repeated ({_presets('job_rows')})"))
    continuous_batching: bool = field(default=False, metadata=flag(
        "run the engine with continuous batching (rows join as others finish) instead of\n"
        "batch by batch as HF generate does"))
    turns_by_pass: bool = field(default=False, metadata=flag(
        "time each configuration's whole pass over the rows in its turn, not batch by batch: each\n"
        "decodes uninterrupted, as an actor does, and the machine's drift weighs more"))
    dtype: str = field(default="auto", metadata=flag(
        "model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16 (the caption\n"
        "job row keeps the job's own, auto)", choices=DTYPES))
    output: str = field(default="out/bench", metadata=flag("where the report and plots go"))

    def __post_init__(self):
        for name, value in (QUICK if self.quick else FULL).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.drafters is None:  # the demo's drafters fit only the demo's target
            self.drafters = demo_drafters() if self.target is None else {}
        self.target = self.target or DEMO_TARGET
        self.drafters = dict(self.drafters)  # NAME=DIR pairs from the command line
        if self.assistant is None:
            self.assistant = "text-only" if "text-only" in self.drafters else None
        elif self.assistant.lower() == "none":
            self.assistant = None
        try:
            self.gammas = [parse_gamma(g) for g in self.gammas]
        except ValueError as error:
            raise JobConfigError(f"--gammas: {error}.") from None
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise JobConfigError(f"--batch-sizes must be positive integers, got {self.batch_sizes}.")
        require_at_least_one({"--rows": self.rows, "--repeats": self.repeats, "--max-new-tokens": self.max_new_tokens,
                              "--job-rows": self.job_rows, "--auto-policies": self.auto_policies})
        if self.head_to_head_batches < 0:
            raise JobConfigError(f"--head-to-head-batches must be 0 (no head to head) or more, got "
                                 f"{self.head_to_head_batches}.")
        if self.head_to_head_seconds < 0:
            raise JobConfigError(f"--head-to-head-seconds must be 0 or more, got {self.head_to_head_seconds}.")
        for name, path in {"target": self.target, "prompts": self.prompts, **self.drafters}.items():
            if not Path(path).exists():
                raise JobConfigError(f"{name} {path} does not exist: pass an existing local path.")
        if self.assistant is not None:
            if self.assistant not in self.drafters:
                raise JobConfigError(f"--assistant {self.assistant} is not one of the drafters {list(self.drafters)}.")
            if drafter_kind(self.drafters[self.assistant])[0] is not TextOnlyDraftModel:
                raise JobConfigError(f"--assistant {self.assistant} must be a text-only drafter (an HF causal LM), "
                                     "as HF assisted generation needs.")


@dataclass
class Measurement:
    method: str
    drafter: str
    gamma: str
    batch_size: int
    rows: int
    seconds: float  # median over the timed runs, all rows
    tokens: int  # generated per run
    peak_memory_mb: float | None  # None where not measured (the caption job runs in other processes)
    identical: int | None = None  # rows whose tokens equal the engine's without a drafter (same batch size)
    speedup: float | None = None  # against HF generate at the same batch size
    counts: dict | None = None  # SpecDecodeCounts.report() over the timed runs
    time_shares: dict | None = None  # EngineTimes.shares()
    rows_per_step: float | None = None  # mean rows in the batch per target forward (rows leave as they finish)
    cost_ratio: float | None = None  # c: one drafter forward / one plain target step, same batch size
    verify_cost: float | None = None  # one verification forward (gamma + 1 tokens a row) / one plain target step
    predicted_speedup: float | None = None  # tau / (1 + mean gamma * c), over the engine without a drafter
    predicted_with_verify: float | None = None  # tau / (v + mean gamma * c), v the measured verify cost
    measured_speedup: float | None = None  # decode phase (prefill excluded), over the engine without a drafter
    against_engine: float | None = None  # caption job: its rows/s over the engine's called directly, same settings
    first_row_s: float | None = None  # caption job: when its first row finished, seconds after it started
    rows_per_s_after_first_row: float | None = None  # caption job: its rate from then on
    batching: str | None = None  # engine direct and caption job: static batches or continuous batching
    round_seconds: list[float] | None = None  # each timed round's seconds, in order (rounds are timed in turn with
    # the batch size's other runs: timed_round_robin), so two runs' ratio round by round shows the timing noise
    policies_tokens_per_s: list[float] | None = None  # auto: each fresh policy's tokens/s (the row is the median one)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


class PeakMemory:
    """Peak memory over a block, in MB: CUDA allocations on a GPU, else the process's resident set (sampled)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._done = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._done.set()
            self._sampler.join()

    def _sample(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, _resident_mb())
            if self._done.wait(0.005):
                return


def _resident_mb() -> float:
    try:  # Linux: the current resident set
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # elsewhere: the process's peak so far (KB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


@dataclass
class Timed:
    """One run of timed_round_robin: its timed rounds' seconds and outputs, and its warm-up's peak memory."""

    round_seconds: list[float]
    outputs: list[list]  # per round
    peak_mb: float | None
    average: Callable[[list[float]], float] = statistics.median  # of the rounds: a run's seconds

    @property
    def seconds(self) -> float:
        return self.average(self.round_seconds)


def timed_round_robin(runs: dict[object, list], repeats: int, device: torch.device,
                      after_warm_up: dict | None = None, warm_up: bool = True) -> dict[object, Timed]:
    """Per run: its Timed (seconds and outputs of each timed round, peak MB of its warm-up run, None without one). A
    run is a list of parts (its batches, each returning a list of outputs). Each run is warmed up first (unless
    warm_up is False: the runs are warm already); then, `repeats` times, every part of every run in turn: part 1 of
    each run, then part 2 of each, ... A VM's speed drifts by tens of percent over seconds (the same row's plain steps
    took 1.05 ms in one pass and 1.88 in the next), so runs timed whole one after another differed by more than what
    they measured; batch by batch, a drift touches every run alike and their ratios stay honest. Each turn starts one
    run further on, so no run always follows the same one (HF generate's large batches, say)."""
    peaks = dict.fromkeys(runs)
    for key, parts in runs.items() if warm_up else ():
        with PeakMemory(device) as memory:
            for part in parts:
                part()
        peaks[key] = memory.peak_mb
        if after_warm_up and key in after_warm_up:
            after_warm_up[key]()
    seconds = {key: [0.0] * repeats for key in runs}
    outputs = {key: [[] for _ in range(repeats)] for key in runs}
    keys, turns = list(runs), max(len(parts) for parts in runs.values())
    for repeat in range(repeats):
        for i in range(turns):
            first = (repeat * turns + i) % len(keys)
            for key in keys[first:] + keys[:first]:
                parts = runs[key]
                if i < len(parts):
                    start = synchronized_time(device)
                    outputs[key][repeat] += parts[i]()
                    seconds[key][repeat] += synchronized_time(device) - start
    return {key: Timed(seconds[key], outputs[key], peaks[key]) for key in runs}


def head_to_head_rows(rows: int, part_rows: int, parts: int, plain_rows: float) -> int:
    """Rows of a batch size's head to head: the workload's, at least `parts` parts of `part_rows` (a batch, or a
    continuous-batching part), and at least `plain_rows` (what the engine without a drafter decodes in
    head_to_head_seconds) in whole parts. Sized by batches alone, batch 8's 64 rows took each engine 0.24 s a round
    against 0.77 s at batch 1, and the control (a second engine without a drafter) read 0.96-1.07x the first there
    in four `make bench` runs (0.98-1.03 at batch 1 and 32); at 256 rows a round, in five one-row runs each, 0.99-1.00
    against 0.98-1.02 at 64 (`jobs/bench.py --drafter massv=demo_world/massv --batch-sizes 8 --gammas 3,4,5,auto
    --no-caption-job --head-to-head-batches 32`, the twenty-sixth session in docs/journal.md)."""
    return max(rows, parts * part_rows, math.ceil(plain_rows / part_rows) * part_rows)


def analytic_speedup(tau: float, mean_gamma: float, cost_ratio: float, verify_cost: float = 1.0) -> float:
    """Expected speedup over plain decoding when a verification costs v plain target steps (1 in Leviathan et al.,
    2023) and each draft token c of one."""
    return tau / (verify_cost + mean_gamma * cost_ratio)


class Workload:
    """The benchmark's rows, as engine prompts and as HF processor inputs, batched per batch size."""

    def __init__(self, target: Target, path: str, rows: int):
        table = pq.read_table(path, columns=["prompt", "image"])
        records = (table.to_pylist() * (rows // max(table.num_rows, 1) + 1))[:rows]
        self.texts = [r["prompt"] for r in records]
        self.images = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in records]
        self.records = records
        self.target = target
        self.prompts = [prepare_prompt(target.processor, text, image, target.context_length)
                        for text, image in zip(self.texts, self.images)]

    def __len__(self) -> int:
        return len(self.prompts)

    def hf_batches(self, batch_size: int) -> list[dict]:
        """What a user writes for HF generate: chat template, left padding, the processor on the batch."""
        processor = self.target.processor
        processor.tokenizer.padding_side = "left"
        batches = []
        for i in range(0, len(self), batch_size):
            texts = [processor.apply_chat_template(build_messages(t, 1), add_generation_prompt=True)
                     for t in self.texts[i : i + batch_size]]
            images = [[image] for image in self.images[i : i + batch_size]]
            inputs = processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.target.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.target.model.dtype)
            batches.append(inputs)
        return batches


def hf_generate_tokens(target: Target, batches: list[dict], max_new_tokens: int, **generate_kwargs) -> list[list[int]]:
    """Greedy HF generate over the batches; each row's tokens up to and including its first EOS."""
    rows = []
    for inputs in batches:
        with torch.no_grad():
            generated = target.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                              **generate_kwargs)[:, inputs["input_ids"].shape[1]:]
        for tokens in generated.tolist():
            end = next((i + 1 for i, t in enumerate(tokens) if t in target.eos_token_ids), len(tokens))
            rows.append(tokens[:end])
    return rows


def decode_all(engine: SpecDecodeEngine, prompts: list, batch_size: int, continuous: bool) -> list:
    """Every prompt through the engine: batch_size rows at once, the next joining as rows finish (continuous), or
    batch by batch, each drained to its slowest row (as HF generate runs)."""
    return _whole_pass(decode_parts(engine, prompts, batch_size, continuous))


def _whole_pass(parts: list) -> list:
    """The parts' outputs, run one after the other as one part (one turn for a whole pass)."""
    return [output for part in parts for output in part()]


def decode_parts(engine: SpecDecodeEngine, prompts: list, batch_size: int, continuous: bool) -> list:
    """decode_all as parts to time in turn (timed_round_robin): one per batch, or one for continuous batching."""
    if continuous:
        return [partial(engine.generate, prompts, max_batch_size=batch_size)]
    return [partial(engine.generate, prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]


def _print(line: str) -> None:
    print(line, flush=True)  # progress shows even when stdout is a file


class Benchmark:
    def __init__(self, config: BenchConfig, log=_print):
        self.config = config
        self.log = log
        dtype = None if config.dtype == "auto" else getattr(torch, config.dtype)
        self.target = Target.load(config.target, dtype=dtype)
        self.drafters = {name: load_drafter(path, self.target) for name, path in config.drafters.items()}
        self.workload = Workload(self.target, config.prompts, config.rows)
        self.measurements: list[Measurement] = []

    def run(self) -> list[Measurement]:
        for batch_size in self.config.batch_sizes:
            self._batch_size(batch_size)
        if self.config.caption_job:
            self._caption_job_against_the_engine()
        return self.measurements

    def _batch_size(self, batch_size: int) -> None:
        """Every method at this batch size, timed round-robin (timed_round_robin): HF generate (and assisted
        generation at batch 1), the engine without a drafter, and each drafter at each gamma."""
        config, device = self.config, self.target.device
        hf_batches = self.workload.hf_batches(batch_size)
        runs = {HF_GENERATE: [partial(hf_generate_tokens, self.target, [b], config.max_new_tokens) for b in hf_batches]}
        if batch_size == 1 and config.assistant is not None:
            assistant = self.drafters[config.assistant].model.language_model
            runs[HF_ASSISTED] = [partial(hf_generate_tokens, self.target, [b], config.max_new_tokens,
                                         assistant_model=assistant) for b in hf_batches]
        def policies_of(gamma) -> range:  # fresh engines per drafter at this gamma
            return range(config.auto_policies if gamma == AUTO else 1)

        engines = {(None, 0, 0): self._new_engine(None, 0)}
        engines.update({(name, gamma, policy): self._new_engine(name, gamma)
                        for name in self.drafters for gamma in config.gammas for policy in policies_of(gamma)})
        for key, engine in engines.items():
            runs[key] = decode_parts(engine, self.workload.prompts, batch_size, config.continuous_batching)
        if config.turns_by_pass:
            runs = {key: [partial(_whole_pass, parts)] for key, parts in runs.items()}
        # the warm-up teaches auto gamma, as a long-running actor would learn; it is not timed
        reset_times = {key: partial(setattr, engine, "times", EngineTimes()) for key, engine in engines.items()}
        timings = timed_round_robin(runs, config.repeats, device, reset_times)

        plain = self._engine_run(None, 0, batch_size, engines[(None, 0, 0)], timings[(None, 0, 0)])
        reference = plain.tokens
        for method in (HF_GENERATE, HF_ASSISTED):
            if method in timings:
                timed = timings[method]
                self._add(Measurement(method, config.assistant if method == HF_ASSISTED else NO_DRAFTER,
                                      "HF default" if method == HF_ASSISTED else NO_DRAFTER, batch_size,
                                      len(self.workload), timed.seconds, sum(map(len, timed.outputs[-1])),
                                      timed.peak_mb, round_seconds=timed.round_seconds),
                          timed.outputs[-1], reference)
        self._add(plain.measurement, reference, reference)
        plain_step_s = plain.times.seconds_per_verify
        for name, gamma, policy in engines:
            if name is None or policy:
                continue
            policies = [self._engine_run(name, gamma, batch_size, engines[(name, gamma, i)],
                                         timings[(name, gamma, i)])
                        for i in policies_of(gamma)]
            run = median_one(policies, lambda r: r.measurement.seconds)
            m = run.measurement
            if gamma == AUTO:
                m.policies_tokens_per_s = [r.measurement.tokens_per_s for r in policies]
                # every policy's tokens must be the target's: the row counts the fewest identical rows among them
                worst = min(policies, key=lambda r: identical_rows(r.tokens, reference))
                run = dataclasses.replace(run, tokens=worst.tokens)
            if plain_step_s and run.times.num_draft_forwards:
                m.cost_ratio = run.times.seconds_per_draft_forward / plain_step_s
                m.verify_cost = run.times.seconds_per_verify / plain_step_s
                mean_gamma = m.counts["drafted"] / m.counts["steps"] if m.counts["steps"] else 0.0
                m.predicted_speedup = analytic_speedup(m.counts["tau"], mean_gamma, m.cost_ratio)
                m.predicted_with_verify = analytic_speedup(m.counts["tau"], mean_gamma, m.cost_ratio, m.verify_cost)
            m.measured_speedup = plain.times.decode_s / run.times.decode_s if run.times.decode_s else None
            self._add(m, run.tokens, reference)
        if config.head_to_head_batches and AUTO in config.gammas and self.drafters:
            self._head_to_head(batch_size, engines)

    def _head_to_head(self, batch_size: int, engines: dict) -> None:
        """auto's goals at this batch size (see the module's docstring): the engine without a drafter, a second one
        (the control, warmed up here), each drafter's HEAD_TO_HEAD_GAMMAS fastest fixed gammas of the sweep and its
        auto policies (warm from the sweep, their policies learning on), timed in turn on head_to_head_rows rows. A
        row's time is paired with the engine without a drafter's round by round: that engine's mean round times the
        median of the row's rounds' ratios to it. Every run is timed in every round, so a round's ratio compares the
        same moments of the machine, where two runs' median rounds can fall in different rounds (the rounds of one run
        spread by up to 40% here: the control at 0.96x the engine it copies by median rounds); and one round's stall
        does not move the figure (by mean rounds the control measured 0.79x at batch 32, one of its rounds 1.7x the
        engine's)."""
        config = self.config
        # with continuous batching, each part is CONTINUOUS_PART_BATCHES batches' worth of rows decoded with rows
        # joining (one part for the whole pass left a run one timing a round: the control measured 1.12x the engine
        # it copies at batch 1)
        part_rows = batch_size * (CONTINUOUS_PART_BATCHES if config.continuous_batching else 1)
        plain = next(m for m in _engine_rows(self.measurements, NO_DRAFTER) if m.batch_size == batch_size)
        rows = head_to_head_rows(len(self.workload), part_rows, config.head_to_head_batches,
                                 config.head_to_head_seconds * plain.rows_per_s)
        prompts = (self.workload.prompts * -(-rows // len(self.workload)))[:rows]
        chosen = {(None, NO_DRAFTER, 0): engines[(None, 0, 0)], (None, CONTROL, 0): self._new_engine(None, 0)}
        for name in self.drafters:
            for fixed in _fastest_fixed(self.measurements, name, batch_size, HEAD_TO_HEAD_GAMMAS):
                chosen[(name, fixed.gamma, 0)] = engines[(name, int(fixed.gamma), 0)]
            chosen.update({(name, AUTO, i): engines[(name, AUTO, i)] for i in range(config.auto_policies)})
        runs = {key: [part for i in range(0, rows, part_rows)
                      for part in decode_parts(engine, prompts[i : i + part_rows], batch_size,
                                               config.continuous_batching)]
                for key, engine in chosen.items()}
        if config.turns_by_pass:
            runs = {key: [partial(_whole_pass, parts)] for key, parts in runs.items()}
        for part in runs[(None, CONTROL, 0)]:  # the rest are warm from the sweep
            part()
        for engine in chosen.values():
            engine.times = EngineTimes()
        timings = timed_round_robin(runs, config.repeats, self.target.device, warm_up=False)
        plain_rounds = timings[(None, NO_DRAFTER, 0)].round_seconds

        def paired(rounds: list[float]) -> float:
            return statistics.fmean(plain_rounds) * statistics.median(r / p for r, p in zip(rounds, plain_rounds))

        reference = None
        for drafter, gamma in dict.fromkeys(key[:2] for key in timings):
            measured = []
            for key in (key for key in timings if key[:2] == (drafter, gamma)):
                timed = dataclasses.replace(timings[key], average=paired)
                run = self._engine_run(drafter, gamma if drafter else 0, batch_size, chosen[key], timed)
                reference = reference or run.tokens  # the engine's without a drafter: the first
                run.measurement.identical = identical_rows(run.tokens, reference)
                measured.append(dataclasses.replace(run.measurement, method=HEAD_TO_HEAD, gamma=gamma))
            m = median_one(measured, lambda m: m.seconds)
            if gamma == AUTO:
                m.policies_tokens_per_s = [p.tokens_per_s for p in measured]
                m.identical = min(p.identical for p in measured)  # every policy's tokens must be the target's
            self._add(m)

    def _new_engine(self, drafter_name: str | None, gamma: int | str) -> SpecDecodeEngine:
        drafter = self.drafters[drafter_name] if drafter_name else None
        config = EngineConfig(gamma=gamma, max_new_tokens=self.config.max_new_tokens)
        return SpecDecodeEngine(self.target, drafter, config)

    def _engine_run(self, drafter_name: str | None, gamma: int | str, batch_size: int, engine: SpecDecodeEngine,
                    timed: Timed) -> _EngineRun:
        counts = SpecDecodeCounts()
        for result in (r for results in timed.outputs for r in results):
            counts.observe(result.counts)
        last = timed.outputs[-1]
        measurement = Measurement(
            ENGINE, drafter_name or NO_DRAFTER, str(gamma) if drafter_name else NO_DRAFTER, batch_size, len(last),
            timed.seconds, sum(len(r.tokens) for r in last), timed.peak_mb,
            counts=counts.report(), time_shares=engine.times.shares(), rows_per_step=engine.times.mean_rows_per_step,
            round_seconds=timed.round_seconds)
        return _EngineRun(measurement, engine.times, [r.tokens for r in last])

    def _add(self, m: Measurement, tokens: list[list[int]] | None = None,
             reference: list[list[int]] | None = None) -> None:
        """Record a measurement: its speedup over HF generate at its batch size and, given a reference, how many
        rows it decoded identically."""
        if reference is not None:
            m.identical = identical_rows(tokens, reference)
        self.measurements.append(m)
        hf = self._hf_generate(m.batch_size)  # measured first at each batch size
        if hf is not None and hf.rows == m.rows:  # the same rows (the caption job comparison runs more)
            m.speedup = hf.seconds / m.seconds
        self.log(progress_line(m))

    def _hf_generate(self, batch_size: int) -> Measurement | None:
        return next((m for m in self.measurements if m.method == HF_GENERATE and m.batch_size == batch_size), None)

    def _caption_job_against_the_engine(self) -> None:
        """On job_rows rows (the prompts repeated), with the last drafter (MASSV by default) at gamma auto and the
        largest batch size: the engine called directly, then the Ray caption job end to end, each with static
        batches and with continuous batching. The engine's runs (with a drafter, auto_policies fresh engines each way,
        the median one's figure counting) are timed in turn, DIRECT_PART_ROWS rows at a time, `repeats` times after a
        warm-up pass (timed_round_robin: one timing each, one after the other, put continuous batching at 0.96x
        static in one run and 1.17x in the next). The job's time is its wall time
        (actor start and model load included, Ray's start not); its actor decodes on cpus_per_actor (1) thread,
        the engine here on torch's."""
        import shutil

        from pipeline.job.caption import run_caption
        from pipeline.job.config import CaptionConfig

        config = self.config
        drafter_name = list(config.drafters)[-1] if config.drafters else None
        gamma = AUTO if drafter_name else NO_DRAFTER
        batch_size = max(config.batch_sizes)
        workload = Workload(self.target, config.prompts, config.job_rows)
        # fresh auto policies of one code on the same rows ran up to 5 points apart: each way runs several, the median
        # one's figure counts, as for the auto rows
        policies = range(config.auto_policies if drafter_name else 1)
        engines = {(batching, policy): SpecDecodeEngine(self.target, self.drafters.get(drafter_name),
                                                        EngineConfig(gamma=gamma if drafter_name else 0,
                                                                     max_new_tokens=config.max_new_tokens))
                   for batching in (STATIC, CONTINUOUS) for policy in policies}
        chunks = [workload.prompts[i:i + DIRECT_PART_ROWS] for i in range(0, len(workload), DIRECT_PART_ROWS)]
        runs = {key: [partial(decode_all, engine, chunk, batch_size, key[0] == CONTINUOUS) for chunk in chunks]
                for key, engine in engines.items()}
        # the warm-up pass teaches auto gamma, as an actor's would learn; it is not timed
        reset_times = {key: partial(setattr, engine, "times", EngineTimes()) for key, engine in engines.items()}
        timings = timed_round_robin(runs, config.repeats, self.target.device, reset_times)
        direct = {}
        for batching in (STATIC, CONTINUOUS):
            measured = []
            for policy in policies:
                timed, engine = timings[(batching, policy)], engines[(batching, policy)]
                results = timed.outputs[-1]
                measured.append(Measurement(DIRECT, drafter_name or NO_DRAFTER, gamma, batch_size, len(results),
                                            timed.seconds, sum(len(r.tokens) for r in results), None,
                                            rows_per_step=engine.times.mean_rows_per_step, batching=batching,
                                            round_seconds=timed.round_seconds))
            m = direct[batching] = median_one(measured, lambda m: m.seconds)
            if drafter_name:
                m.policies_tokens_per_s = [p.tokens_per_s for p in measured]
            self._add(m)

        root = Path(config.output) / "caption-job"
        inputs = root / "prompts"
        inputs.mkdir(parents=True, exist_ok=True)
        table = pa.table({"id": [f"row-{i:06d}" for i in range(len(workload))], "prompt": workload.texts,
                          "image": [r["image"] for r in workload.records]})
        pq.write_table(table, inputs / "rows.parquet")
        connect_ray()  # before the clock: run_caption's wall time leaves out starting Ray
        for batching in (STATIC, CONTINUOUS):
            job = CaptionConfig(input=str(inputs), output=str(root / f"captions-{batching}"), target=config.target,
                                drafter=config.drafters[drafter_name] if drafter_name else "none", gamma=gamma,
                                max_new_tokens=config.max_new_tokens, batch_size=batch_size,
                                continuous_batching=batching == CONTINUOUS)
            shutil.rmtree(job.output, ignore_errors=True)
            summary = run_caption(job)
            m = Measurement(CAPTION_JOB, drafter_name or NO_DRAFTER, gamma, batch_size, summary["rows_out"],
                            summary["this_run"]["wall_time_s"], summary["generated_tokens"], None, batching=batching)
            m.against_engine = m.rows_per_s / direct[batching].rows_per_s
            m.first_row_s = summary["this_run"].get("first_row_s")
            m.rows_per_s_after_first_row = summary["this_run"].get("rows_per_s_after_first_row")
            self._add(m)


@dataclass
class _EngineRun:
    measurement: Measurement
    times: EngineTimes
    tokens: list[list[int]]


def _fmt(value, spec: str = ".2f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def method_label(m: Measurement) -> str:
    return f"{m.method}, {m.batching}" if m.batching else m.method


def progress_line(m: Measurement) -> str:
    line = (f"batch {m.batch_size:>3} | {method_label(m):<12} {m.drafter:<10} gamma {m.gamma:<10} "
            f"{m.tokens_per_s:8.1f} tok/s {m.rows_per_s:7.2f} rows/s  x{_fmt(m.speedup)}")
    if m.counts:
        line += f"  tau {m.counts['tau']:.2f}"
    if m.predicted_with_verify and m.measured_speedup:
        line += f"  decode speedup {m.measured_speedup:.2f} (predicted {m.predicted_with_verify:.2f})"
    if m.against_engine is not None:
        line += f"  ({m.against_engine:.2f}x the engine's rows/s called directly, {m.rows} rows)"
    return line


COLUMNS = ["method", "drafter", "gamma", "batch", "rows", "tokens/s", "rows/s", "vs HF generate", "tau", "acceptance",
           "per-position acceptance", "c", "verify cost", "predicted (v = 1)", "predicted (measured v)",
           "measured (decode)", "measured / predicted (measured v)",
           "time: prefill / draft / verify / other", "rows per step", "peak MB", "identical"]


def table_row(m: Measurement) -> list[str]:
    counts = m.counts or {}
    shares = m.time_shares
    ratio = m.measured_speedup / m.predicted_with_verify if m.predicted_with_verify and m.measured_speedup else None
    return [
        method_label(m), m.drafter, m.gamma, str(m.batch_size), str(m.rows), _fmt(m.tokens_per_s, ".1f"),
        _fmt(m.rows_per_s, ".2f"),
        _fmt(m.speedup) + ("x" if m.speedup else ""),
        _fmt(counts.get("tau")) if m.drafter != NO_DRAFTER and counts else "-",
        _fmt(counts.get("acceptance_rate")) if counts.get("drafted") else "-",
        " ".join(f"{a:.2f}" for a in counts.get("acceptance_per_position", [])) or "-",
        _fmt(m.cost_ratio), _fmt(m.verify_cost), _fmt(m.predicted_speedup), _fmt(m.predicted_with_verify),
        _fmt(m.measured_speedup), _fmt(ratio),
        " / ".join(f"{100 * shares[k]:.0f}%" for k in ("prefill", "draft", "verify", "other")) if shares else "-",
        _fmt(m.rows_per_step, ".1f"), _fmt(m.peak_memory_mb, ".0f"),
        f"{m.identical}/{m.rows}" if m.identical is not None else "-",
    ]


def measurements_table(measurements: list[Measurement]) -> str:
    return markdown_table(COLUMNS, [table_row(m) for m in measurements])


def _engine_rows(measurements: list[Measurement], drafter: str | None = None, gamma: str | None = None,
                 method: str = ENGINE):
    return [m for m in measurements if m.method == method and (drafter is None or m.drafter == drafter)
            and (gamma is None or m.gamma == gamma)]


def _best_fixed(measurements: list[Measurement], drafter: str, batch_size: int,
                method: str = ENGINE) -> Measurement | None:
    return next(iter(_fastest_fixed(measurements, drafter, batch_size, 1, method)), None)


def _fastest_fixed(measurements: list[Measurement], drafter: str, batch_size: int, count: int,
                   method: str = ENGINE) -> list[Measurement]:
    """The drafter's `count` fastest fixed gammas at this batch size, fastest first."""
    fixed = [m for m in _engine_rows(measurements, drafter, method=method)
             if m.batch_size == batch_size and m.gamma not in (AUTO, CONTROL)]
    return sorted(fixed, key=lambda m: m.tokens_per_s, reverse=True)[:count]


def round_by_round(m: Measurement, reference: Measurement) -> str:
    """m's speed over the reference's in each timed round, as the clause ", round by round lo-hi" ("" with fewer than
    two rounds): rounds are timed in turn, so the machine's drift touches both alike, and the range is how far the
    ratio of their medians can be trusted (two runs of the bench put `auto` with MSD at batch 8 at 0.89 and 0.95 of
    its best fixed gamma)."""
    if not m.round_seconds or len(m.round_seconds) < 2 or len(m.round_seconds) != len(reference.round_seconds or ()):
        return ""
    ratios = sorted(theirs / ours for ours, theirs in zip(m.round_seconds, reference.round_seconds))
    return f", round by round {ratios[0]:.2f}-{ratios[-1]:.2f}"


def median_one(runs: list, seconds: Callable) -> object:
    """The run whose seconds are the median (of an even count, the slower of the middle two): the figure that counts
    where fresh policies of one code ran in turn."""
    return sorted(runs, key=seconds)[len(runs) // 2]


def identical_rows(tokens: list[list[int]], reference: list[list[int]]) -> int:
    """Rows whose tokens equal the reference's."""
    return sum(a == b for a, b in zip(tokens, reference))


def policy_range(m: Measurement, reference: Measurement, whose: str = "its") -> str:
    """The clause ", its N fresh policies lo-hi" for an auto row run as several policies ("" for one): each policy's
    speed over the reference's."""
    if not m.policies_tokens_per_s or len(m.policies_tokens_per_s) < 2:
        return ""
    ratios = sorted(t / reference.tokens_per_s for t in m.policies_tokens_per_s)
    return f", {whose} {len(ratios)} fresh policies {ratios[0]:.2f}-{ratios[-1]:.2f}"


def _auto_against(measurements: list[Measurement], method: str) -> tuple[tuple | None, tuple | None]:
    """auto's two goals among one method's rows (the sweep's or the head to head's): (figure, where, detail)
    against the engine without a drafter at any batch size, and against the best fixed gamma at batch 1 and 8 (None
    where nothing compares)."""
    autos = _engine_rows(measurements, gamma=AUTO, method=method)
    plain_at = {m.batch_size: m for m in _engine_rows(measurements, NO_DRAFTER, NO_DRAFTER, method)}
    against_plain = [(m.tokens_per_s / plain_at[m.batch_size].tokens_per_s, m) for m in autos
                     if m.batch_size in plain_at]
    plain_goal = None
    if against_plain:
        figure, worst = min(against_plain, key=lambda pair: pair[0])
        plain = plain_at[worst.batch_size]
        where = f"{worst.drafter} at batch {worst.batch_size}"
        plain_goal = (figure, where, f"{where}{round_by_round(worst, plain)}{policy_range(worst, plain)}")
    against_best = []
    for m in autos:
        best = _best_fixed(measurements, m.drafter, m.batch_size, method) if m.batch_size in (1, 8) else None
        if best is not None:
            against_best.append((m.tokens_per_s / best.tokens_per_s, m, best))
    best_goal = None
    if against_best:
        figure, worst, best = min(against_best, key=lambda triple: triple[0])
        where = f"{worst.drafter} at batch {worst.batch_size}"
        best_goal = (figure, where, f"{where} (best fixed gamma {best.gamma}{round_by_round(worst, best)}"
                                    f"{policy_range(worst, best)}); "
                                    + ", ".join(f"{m.drafter} b{m.batch_size} {ratio:.2f}"
                                                for ratio, m, _ in against_best))
    return plain_goal, best_goal


def goals(measurements: list[Measurement], massv: str | None) -> list[dict]:
    """The issue's speed goals, each with the measured figure and whether it was met (reported, never asserted)."""
    results = []

    def goal(text: str, figure: float | None, threshold: float, detail: str = "") -> None:
        if figure is not None:
            results.append({"goal": text, "figure": round(figure, 6), "met": figure >= threshold, "detail": detail})

    batch_sizes = sorted({m.batch_size for m in measurements if m.method == ENGINE})
    for batch_size, threshold in ((1, 2.0), (8, 1.3)):
        if massv and batch_size in batch_sizes:
            auto = [m for m in _engine_rows(measurements, massv, AUTO) if m.batch_size == batch_size]
            best = _best_fixed(measurements, massv, batch_size)
            figure = max([m.speedup for m in auto + ([best] if best else [])], default=None)
            detail = f"auto {_fmt(auto[0].speedup if auto else None)}x" + (
                f", best fixed gamma {best.gamma}: {best.speedup:.2f}x" if best else "")
            goal(f"{massv} >= {threshold}x HF generate at batch {batch_size}", figure, threshold, detail)
    head_to_head = any(m.method == HEAD_TO_HEAD and m.gamma == AUTO for m in measurements)
    judged_by = _auto_against(measurements, HEAD_TO_HEAD if head_to_head else ENGINE)
    sweep = _auto_against(measurements, ENGINE) if head_to_head else None
    where_from = ""  # head to head: its rows and the control's figures
    if head_to_head:
        plain_at = {m.batch_size: m for m in _engine_rows(measurements, NO_DRAFTER, NO_DRAFTER, HEAD_TO_HEAD)}
        controls = sorted((m.batch_size, m.tokens_per_s / plain_at[m.batch_size].tokens_per_s)
                          for m in _engine_rows(measurements, NO_DRAFTER, CONTROL, HEAD_TO_HEAD))
        where_from = (f"; head to head ({', '.join(f'{m.rows} rows at batch {b}' for b, m in sorted(plain_at.items()))}"
                      f"), the control (a second engine without a drafter) "
                      f"{', '.join(f'{ratio:.2f} at batch {b}' for b, ratio in controls)} of the first")
    for which, text in enumerate(("gamma=auto >= 0.95x the engine without a drafter (same batch size)",
                                  "gamma=auto within 5% of the best fixed gamma at batch 1 and 8")):
        if judged_by[which]:
            figure, _, detail = judged_by[which]
            earlier = sweep[which] if sweep else None
            goal(text, figure, 0.95, f"lowest: {detail}{where_from}"
                 + (f"; in the sweep {earlier[0]:.2f} ({earlier[1]})" if earlier else ""))
    plain = _engine_rows(measurements, NO_DRAFTER)
    if plain:
        worst = min(plain, key=lambda m: m.speedup)
        goal("engine without a drafter >= HF generate at every batch size", worst.speedup, 1.0,
             f"lowest at batch {worst.batch_size}")
    assisted = next((m for m in measurements if m.method == HF_ASSISTED), None)
    if assisted:
        same_drafter = [m for m in _engine_rows(measurements, assisted.drafter) if m.batch_size == assisted.batch_size]
        auto = next((m for m in same_drafter if m.gamma == AUTO), None)
        best = max(same_drafter, key=lambda m: m.tokens_per_s, default=None)
        if best:
            goal(f"engine with {assisted.drafter} >= 1.2x HF assisted generation at batch 1",
                 best.tokens_per_s / assisted.tokens_per_s, 1.2,
                 f"auto {_fmt(auto.tokens_per_s / assisted.tokens_per_s if auto else None)}x, "
                 f"best gamma {best.gamma}")
    fixed = [m for m in _engine_rows(measurements) if m.predicted_with_verify and m.measured_speedup
             and m.gamma != AUTO]
    if fixed:
        ratios = [m.measured_speedup / m.predicted_with_verify for m in fixed]
        medians = {b: statistics.median(r for m, r in zip(fixed, ratios) if m.batch_size == b)
                   for b in sorted({m.batch_size for m in fixed})}
        worst = min(medians, key=medians.get)
        plain = next((m for m in measurements if m.method == ENGINE and m.drafter == NO_DRAFTER
                      and m.batch_size == worst), None)
        fuller = (statistics.median(m.rows_per_step / plain.rows_per_step for m in fixed if m.batch_size == worst)
                  if plain and plain.rows_per_step else None)
        goal("measured speedup >= 90% of the analytic tau / (v + gamma c), v the measured verify cost",
             medians[worst], 0.9,
             f"median per batch size over {len(fixed)} fixed-gamma runs: "
             + ", ".join(f"batch {b} {r:.2f}" for b, r in medians.items())
             + f"; {sum(r >= 0.9 for r in ratios)} runs meet it; at batch {worst} the drafters' runs kept "
             f"{_fmt(fuller)} of plain decoding's rows per step (the batch drains unevenly); against "
             f"tau / (1 + gamma c) the median is "
             f"{statistics.median(m.measured_speedup / m.predicted_speedup for m in fixed):.2f}")
    jobs = {m.batching: m for m in measurements if m.method == CAPTION_JOB}
    direct = {m.batching: m for m in measurements if m.method == DIRECT}
    if CONTINUOUS in jobs:
        job = jobs[CONTINUOUS]
        goal(f"caption job >= 0.6x the engine's rows/s called directly ({job.rows} rows, continuous batching)",
             job.against_engine, 0.6, f"{job.rows_per_s:.1f} against {direct[CONTINUOUS].rows_per_s:.1f} rows/s; "
             f"with static batches {_fmt(jobs[STATIC].against_engine if STATIC in jobs else None)}x"
             + (f"; its first row finished after {job.first_row_s:.1f} s, then {job.rows_per_s_after_first_row:.1f} "
                f"rows/s ({job.rows_per_s_after_first_row / direct[CONTINUOUS].rows_per_s:.2f}x the engine's)"
                if job.rows_per_s_after_first_row is not None else ""))
    if len(jobs) == len(direct) == 2:
        gains = {where: runs[CONTINUOUS].rows_per_s / runs[STATIC].rows_per_s
                 for where, runs in (("engine", direct), ("caption job", jobs))}
        spread = policy_range(direct[CONTINUOUS], direct[STATIC], "the engine's continuous batching")
        goal(f"continuous batching never slower than static batches ({job.rows} rows)", min(gains.values()), 1.0,
             ", ".join(f"{where} {gain:.2f}x" for where, gain in gains.items())
             + (f"{spread} against the median static policy" if spread else ""))
    return results


def goals_table(results: list[dict]) -> str:
    rows = [[g["goal"], f"{g['figure']:.2f}", "yes" if g["met"] else "no", g["detail"]] for g in results]
    return markdown_table(["goal", "measured", "met", "detail"], rows)


def charts(measurements: list[Measurement], config: BenchConfig) -> dict[str, bytes]:
    """The PNG plots: speedup vs batch size, tau vs gamma, measured vs predicted speedup, per-position acceptance."""
    batch_sizes = config.batch_sizes
    speedup = {"engine, no drafter": [(m.batch_size, m.speedup) for m in _engine_rows(measurements, NO_DRAFTER)]}
    for name in config.drafters:
        speedup[f"{name}, auto"] = [(m.batch_size, m.speedup) for m in _engine_rows(measurements, name, AUTO)]
        best = [_best_fixed(measurements, name, b) for b in batch_sizes]
        speedup[f"{name}, best gamma"] = [(m.batch_size, m.speedup) for m in best if m]
    speedup["HF assisted"] = [(m.batch_size, m.speedup) for m in measurements if m.method == HF_ASSISTED]
    fixed_gammas = [g for g in config.gammas if g != AUTO]
    first = batch_sizes[0]

    def by_gamma(name: str, value) -> list[tuple[int, float]]:
        return [(int(m.gamma), value(m)) for m in _engine_rows(measurements, name)
                if m.batch_size == first and m.gamma != AUTO]

    tau = {name: by_gamma(name, lambda m: m.counts["tau"]) for name in config.drafters}
    predicted = {}
    for name in config.drafters:
        predicted[f"{name} measured"] = by_gamma(name, lambda m: m.measured_speedup or 0.0)
        predicted[f"{name} predicted"] = by_gamma(name, lambda m: m.predicted_with_verify or 0.0)
    longest = max(fixed_gammas, default=None)
    per_position = {m.drafter: m.counts["acceptance_per_position"] for m in _engine_rows(measurements)
                    if m.batch_size == first and m.gamma == str(longest)}
    return {
        "speedup_vs_batch.png": line_chart(speedup, "speedup over HF generate (same batch size)", "batch size",
                                           "speedup", batch_sizes, reference=1.0),
        "tau_vs_gamma.png": line_chart(tau, f"tau (tokens per target step) vs gamma, batch {first}", "gamma",
                                       "tau", fixed_gammas),
        "speedup_vs_gamma.png": line_chart(predicted, f"decode speedup over the engine without a drafter, batch "
                                           f"{first}: measured and tau/(v+gamma c)", "gamma", "speedup", fixed_gammas,
                                           reference=1.0),
        "acceptance_per_position.png": bar_chart(per_position, f"acceptance per draft position, gamma {longest}, "
                                                 f"batch {first}", "draft position", "accepted"),
    }


def machine(dtype: torch.dtype) -> dict:
    """What the figures were measured on (dtype: the target's)."""
    import transformers

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, " \
                 f"{torch.get_num_threads()} torch threads"
    return {"device": device, "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def run_benchmark(config: BenchConfig, log=_print) -> dict:
    """Measure everything, write results.json, table.md and the plots under config.output; returns the report."""
    log(f"config: {json.dumps(dataclasses.asdict(config))}")
    started = time.perf_counter()
    benchmark = Benchmark(config, log)
    massv = next((n for n, d in reversed(benchmark.drafters.items()) if d.kind == "massv"), None)
    measurements = benchmark.run()
    report = {"machine": machine(benchmark.target.model.dtype), "config": dataclasses.asdict(config),
              "rows": len(benchmark.workload),
              "seconds": time.perf_counter() - started,
              "measurements": [dataclasses.asdict(m) | {"tokens_per_s": m.tokens_per_s} for m in measurements],
              "goals": goals(measurements, massv)}
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(report, indent=2))
    described = ", ".join(f"{k} {v}" for k, v in report["machine"].items())
    batching = "continuous batching" if config.continuous_batching else "batch by batch, as HF generate"
    tables = f"{measurements_table(measurements)}\n\n{goals_table(report['goals'])}"
    (output / "table.md").write_text(f"{len(benchmark.workload)} prompts from {config.prompts}, at most "
                                     f"{config.max_new_tokens} new tokens, greedy, engine {batching}; {described}\n\n"
                                     f"{tables}\n")
    for name, png in charts(measurements, config).items():
        (output / name).write_bytes(png)
    log(f"\n{tables}\n\nmachine: {described}\n"
        f"wrote results.json, table.md and plots under {output} in {report['seconds']:.0f} s")
    return report
