"""The gamma replay: its acceptance is the engine's, and it ranks policies on costs and traces made up to decide."""

import pytest

from drafters import load_drafter
from pipeline.engine.engine import EngineConfig, SpecDecodeEngine
from pipeline.engine.gamma import GammaPolicy
from pipeline.engine.target import Target
from pipeline.job.config import JobConfigError
from pipeline.lab.benchmark import DEMO_TARGET, Workload, demo_drafters
from pipeline.lab.demo import BENCH_PROMPTS, DEMO_WORLD
from pipeline.lab.gamma_replay import (
    AFTER_PREFILL,
    FixedGamma,
    ReplayConfig,
    StepCosts,
    Traces,
    compare,
    record_traces,
    replay,
    run_replay,
    save_recording,
    steps_and_kept,
)


@pytest.mark.parametrize("name", ["text-only", "massv", "msd"])
def test_replayed_steps_are_the_engines(name):
    """Greedy, a step with k drafts keeps the least of k and the drafts the target accepts from that position: the
    recorded runs give each row the engine's own steps and accepted drafts at every gamma, an MSD head's too (it
    drafts from its own predicted features: read off the engine decoding at max_gamma, its traces matched the engine
    at that gamma only)."""
    target = Target.load(DEMO_TARGET)
    drafter = load_drafter(demo_drafters()[name], target)
    prompts = Workload(target, str(DEMO_WORLD / BENCH_PROMPTS), 6).prompts
    traces = record_traces(target, {name: drafter}, prompts, max_new_tokens=24, max_gamma=5)
    runs = traces.runs[name]
    assert any(runs[0]) and {run for row in runs for run in row} > {0, 5}  # drafts kept, refused, and all kept
    for k in (1, 3, 5):
        engine = SpecDecodeEngine(target, drafter, EngineConfig(gamma=k, max_new_tokens=24))
        results = [engine.generate([prompt])[0] for prompt in prompts]
        assert [r.tokens for r in results] == traces.answers
        replayed = [steps_and_kept(row, len(answer), k) for row, answer in zip(runs, traces.answers)]
        assert [r.counts.num_steps for r in results] == [steps for steps, _ in replayed]
        assert [r.counts.num_accepted for r in results] == [kept for _, kept in replayed]


def runs_of(right: list[bool], max_gamma: int = 8) -> list[int]:
    """Runs (Traces.runs) of a drafter whose prediction after answer token j is right where right[j] is."""
    return [next((n for n, ok in enumerate(right[j:j + max_gamma]) if not ok), min(max_gamma, len(right) - j))
            for j in range(len(right))]


def costs(draft_s: float) -> StepCosts:
    """Made-up step costs: a plain step 1 ms at any batch size, each draft draft_s more."""
    step_s = {(b, k): 1e-3 + k * draft_s for b in (1, 8) for k in range(5)}
    return StepCosts(step_s, {1: draft_s, 8: draft_s}, {1: 1e-4, 8: 2e-4})


def test_the_replay_ranks_policies():
    """Drafts right 9 times in 10 and cheap: drafting pays, `auto` comes near the best fixed gamma; drafts always wrong:
    plain decoding is best and `auto` stays near it. The replay is seeded: the same seed, the same seconds."""
    answers = [[1] * 30 for _ in range(16)]
    good = Traces(answers, {"good": [runs_of([j % 10 != 9 for j in range(29)]) for _ in answers]})
    [cheap] = compare(lambda: GammaPolicy(gamma="auto", max_gamma=4), good, {"good": costs(0.1e-3)}, [8], 3, 4)
    assert cheap["best_vs_plain"] > 2 and cheap["policy_vs_best"] > 0.8
    useless = Traces(answers, {"useless": [[0] * 29 for _ in answers]})
    [wrong] = compare(lambda: GammaPolicy(gamma="auto", max_gamma=4), useless, {"useless": costs(0.2e-3)}, [8], 3, 4)
    assert wrong["best_vs_plain"] < 1 and wrong["policy_vs_plain"] > 0.9
    once = [replay(FixedGamma(2), answers, good.runs["good"], costs(0.1e-3), 8, seed=5) for _ in range(2)]
    assert once[0] == once[1]


def test_a_recording_is_replayed_as_recorded(tmp_path):
    """Policies of two checkouts compare on one recording: replayed from it (no model loaded, nothing timed), the
    table is the one the recorded traces and costs give; a drafter the recording lacks is named at once."""
    answers = [[1] * 30 for _ in range(8)]
    traces = Traces(answers, {"massv": [runs_of([j % 10 != 9 for j in range(29)]) for _ in answers]})
    recording = tmp_path / "recording.json"
    save_recording(str(recording), traces, {"massv": costs(0.1e-3)})
    config = ReplayConfig(drafters=["massv"], batch_sizes=[8], max_gamma=4, seeds=2, output=str(tmp_path / "out"),
                          recording=str(recording))
    replayed = run_replay(config, log=lambda _: None)
    assert replayed == compare(lambda: GammaPolicy(gamma="auto", max_gamma=4), traces, {"massv": costs(0.1e-3)},
                               [8], 2, 4)
    with pytest.raises(JobConfigError, match="holds no traces of \\['msd'\\]"):
        run_replay(ReplayConfig(drafters=["msd"], recording=str(recording), output=str(tmp_path / "out")),
                   log=lambda _: None)


class _PlainThenDraftAtTheSecondBatch(FixedGamma):
    """Plain decoding, but 2 drafts on the first step of the second batch; keeps that step's times."""

    def __init__(self):
        super().__init__(0)
        self.prefills, self.steps_in_batch, self.drafting_step = 0, 0, None

    def observe_prefill(self) -> None:
        self.prefills, self.steps_in_batch = self.prefills + 1, 0

    def choose(self, batch_size, prefill_waits=False, emitted=None, drains=False) -> int:
        self.steps_in_batch += 1
        return 2 if self.prefills == 2 and self.steps_in_batch == 1 else 0

    def observe(self, k, num_accepted, step) -> None:
        if k:
            self.drafting_step = step


def test_a_drafter_catches_up_on_its_batchs_tokens_alone():
    """The drafter's prefill of a batch is put off until a step drafts; that step catches up on the tokens the batch
    emitted since its prefill, not on every plain step before it (the first batch's, decoded plainly throughout)."""
    answers = [[1] * 30 for _ in range(16)]
    runs = [runs_of([True] * 29) for _ in answers]
    made_up = costs(0.1e-3)
    policy = _PlainThenDraftAtTheSecondBatch()
    replay(policy, answers, runs, made_up, 8, seed=1, passes=1, timed_from=0)
    step = policy.drafting_step
    catch_up = made_up.draft(8, 1) * 0.05 * 1  # one token since the batch's prefill
    assert step.draft_s / (step.draft_s + step.verify_s) == pytest.approx(
        (made_up.draft(8, 2) + catch_up) / (made_up.step(8, 2) * AFTER_PREFILL + catch_up))
