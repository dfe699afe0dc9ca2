"""jobs/bench.py: the quick run reports every method with its statistics, table and plots (shape, not speed);
bad settings fail at once; the goal and prediction arithmetic."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.job.charts import HEIGHT, WIDTH
from pipeline.job.config import JobConfigError
from pipeline.lab.benchmark import (
    AUTO,
    CAPTION_JOB,
    CONTINUOUS,
    CONTROL,
    DIRECT,
    ENGINE,
    HEAD_TO_HEAD,
    HF_ASSISTED,
    HF_GENERATE,
    NO_DRAFTER,
    QUICK,
    STATIC,
    BenchConfig,
    Measurement,
    analytic_speedup,
    goals,
    head_to_head_rows,
)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "jobs"))

import bench  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("turns", [[], ["--turns-by-pass"]])  # batch by batch in turn, or a whole pass a turn
def test_quick_run_reports_every_configuration(tmp_path, turns):
    output = tmp_path / "bench"
    done = subprocess.run([sys.executable, "jobs/bench.py", "--quick", "--output", str(output), *turns], cwd=REPO,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((output / "results.json").read_text())
    rows = QUICK["rows"]
    assert report["rows"] == rows and set(report["machine"]) >= {"device", "dtype", "torch", "transformers"}

    measured = {(m["method"], m["drafter"], m["gamma"], m["batch_size"], m["batching"]): m
                for m in report["measurements"]}
    expected = {(HF_ASSISTED, "text-only", "HF default", 1, None)}
    expected |= {(method, "massv", AUTO, max(QUICK["batch_sizes"]), batching)
                 for method in (DIRECT, CAPTION_JOB) for batching in (STATIC, CONTINUOUS)}
    for batch_size in QUICK["batch_sizes"]:
        expected |= {(HF_GENERATE, NO_DRAFTER, NO_DRAFTER, batch_size, None),
                     (ENGINE, NO_DRAFTER, NO_DRAFTER, batch_size, None)}
        expected |= {(ENGINE, d, str(g), batch_size, None)
                     for d in ("text-only", "massv", "msd") for g in QUICK["gammas"]}
        # auto's goals, head to head: each drafter's best fixed gamma (the one there is) and auto, plain twice
        expected |= {(HEAD_TO_HEAD, NO_DRAFTER, gamma, batch_size, None) for gamma in (NO_DRAFTER, CONTROL)}
        expected |= {(HEAD_TO_HEAD, d, str(g), batch_size, None)
                     for d in ("text-only", "massv", "msd") for g in QUICK["gammas"]}
    assert set(measured) == expected
    assert len(report["measurements"]) == len(expected)

    for key, m in measured.items():
        assert m["tokens"] > 0 and m["seconds"] > 0, key
        if key[0] in (DIRECT, CAPTION_JOB):  # the caption job comparison: its own rows, no HF generate to compare
            assert m["rows"] == QUICK["job_rows"] and m["speedup"] is None, key
            assert (m["against_engine"] is not None) == (key[0] == CAPTION_JOB), key
            if key[0] == DIRECT:  # fresh auto policies each way, the row the median one's
                assert len(m["policies_tokens_per_s"]) == QUICK["auto_policies"], key
                assert m["tokens"] / m["seconds"] in m["policies_tokens_per_s"], key
            continue
        if key[0] == HEAD_TO_HEAD:  # at least head_to_head_batches batches, the rows repeated
            assert m["rows"] == max(rows, QUICK["head_to_head_batches"] * key[3]) and m["identical"] == m["rows"], key
            assert (m["policies_tokens_per_s"] is not None) == (m["gamma"] == AUTO), key
            continue
        assert m["rows"] == rows and m["speedup"] > 0, key
        if key[0] != ENGINE:
            continue
        assert m["identical"] == rows, f"{key}: greedy output must equal the engine's without a drafter"
        # auto: fresh policies timed in turn, the row the median one's (every one of them exact: identical above)
        assert (m["policies_tokens_per_s"] is not None) == (m["gamma"] == AUTO), key
        if m["gamma"] == AUTO:
            assert len(m["policies_tokens_per_s"]) == QUICK["auto_policies"]
            assert m["tokens"] / m["seconds"] in m["policies_tokens_per_s"]
        assert m["counts"]["sequences"] == rows * QUICK["repeats"]
        assert sum(m["time_shares"].values()) == pytest.approx(1.0, abs=0.02)
        if m["drafter"] == NO_DRAFTER:
            assert m["time_shares"]["draft"] == 0 and m["cost_ratio"] is None
        elif m["gamma"] != AUTO:
            gamma = int(m["gamma"])
            assert 1 <= m["counts"]["tau"] <= gamma + 1
            assert len(m["counts"]["acceptance_per_position"]) == gamma
            assert m["cost_ratio"] > 0 and m["measured_speedup"] > 0
            mean_gamma = m["counts"]["drafted"] / m["counts"]["steps"]
            assert m["predicted_speedup"] == pytest.approx(
                analytic_speedup(m["counts"]["tau"], mean_gamma, m["cost_ratio"]))
            assert m["predicted_with_verify"] == pytest.approx(
                analytic_speedup(m["counts"]["tau"], mean_gamma, m["cost_ratio"], m["verify_cost"]))
    assert measured[(HF_ASSISTED, "text-only", "HF default", 1, None)]["identical"] is not None
    assert {g["goal"] for g in report["goals"]} and all(set(g) == {"goal", "figure", "met", "detail"}
                                                        for g in report["goals"])

    table = (output / "table.md").read_text()
    labels = {HF_GENERATE, HF_ASSISTED, ENGINE, HEAD_TO_HEAD} | {f"{m}, {b}" for m in (DIRECT, CAPTION_JOB)
                                                    for b in (STATIC, CONTINUOUS)}
    assert sum(line.split("|")[1].strip() in labels for line in table.splitlines() if line.startswith("|")) \
        == len(expected)
    for name in ("speedup_vs_batch", "tau_vs_gamma", "speedup_vs_gamma", "acceptance_per_position"):
        chart = Image.open(output / f"{name}.png")
        assert chart.format == "PNG" and chart.size == (WIDTH, HEIGHT)
    assert "measured speedup >= 90%" in done.stdout and "continuous batching never slower" in done.stdout


@pytest.mark.parametrize("flags, message", [
    (["--batch-sizes", "0"], "--batch-sizes must be positive"),
    (["--gammas", "2,x"], "--gammas"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--job-rows", "0"], "--job-rows must be at least 1"),
    (["--head-to-head-batches", "-1"], "--head-to-head-batches must be 0 (no head to head) or more"),
    (["--head-to-head-seconds", "-0.5"], "--head-to-head-seconds must be 0 or more"),
    (["--drafter", "mine=/nonexistent/drafter"], "drafter"),
    (["--assistant", "massv"], "must be a text-only drafter"),
    (["--assistant", "nope"], "is not one of the drafters"),
])
def test_bad_settings_fail_at_once_with_one_sentence(flags, message, capsys):
    assert bench.main(flags) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1


def test_flags_build_one_config():
    config = bench.parse_args(["--quick", "--no-caption-job", "--gammas", "1,auto"])
    assert config.rows == QUICK["rows"] and config.gammas == [1, AUTO] and not config.caption_job
    assert set(config.drafters) == {"text-only", "msd", "massv"} and config.assistant == "text-only"
    target = str(REPO / "demo_world" / "target")
    assert bench.parse_args(["--target", target]).drafters == {}  # the demo's drafters fit only the demo's target
    with pytest.raises(JobConfigError):
        BenchConfig(prompts="/nonexistent.parquet")


def test_analytic_speedup():
    assert analytic_speedup(tau=4.0, mean_gamma=3, cost_ratio=0.0) == 4.0
    assert analytic_speedup(tau=4.0, mean_gamma=3, cost_ratio=1.0) == 1.0
    assert analytic_speedup(tau=3.0, mean_gamma=4, cost_ratio=0.25) == 1.5
    assert analytic_speedup(tau=3.0, mean_gamma=4, cost_ratio=0.25, verify_cost=2.0) == 1.0


def test_head_to_head_rows_cover_batches_and_seconds():
    # (the workload's rows, rows a part, parts at least, what plain decoding covers in head_to_head_seconds)
    assert head_to_head_rows(64, 1, 8, 62.0) == 64  # batch 1: the workload's rows already take longer
    assert head_to_head_rows(64, 8, 8, 215.0) == 216  # batch 8: whole batches past what plain decoding covers
    assert head_to_head_rows(64, 32, 8, 0.0) == 256  # no seconds asked: the batches alone
    assert head_to_head_rows(64, 32, 8, 604.0) == 608
    assert head_to_head_rows(64, 128, 2, 300.0) == 384  # continuous batching: whole parts


def _m(method, drafter, gamma, batch_size, seconds, **extra) -> Measurement:
    return Measurement(method, drafter, gamma, batch_size, rows=8, seconds=seconds, tokens=100, peak_memory_mb=1.0,
                       speedup=1.0 / seconds, **extra)


def test_goals_judge_each_figure():
    measurements = [
        _m(HF_GENERATE, NO_DRAFTER, NO_DRAFTER, 1, 1.0),
        _m(HF_ASSISTED, "text-only", "HF default", 1, 0.8),
        _m(ENGINE, NO_DRAFTER, NO_DRAFTER, 1, 0.9),
        _m(ENGINE, "text-only", AUTO, 1, 0.6),
        _m(ENGINE, "massv", "3", 1, 0.4, predicted_speedup=2.5, predicted_with_verify=2.5, measured_speedup=2.4,
           round_seconds=[0.38, 0.4, 0.44]),
        _m(ENGINE, "massv", "3", 8, 1.2, predicted_speedup=2.0, predicted_with_verify=1.5, measured_speedup=1.2),
        _m(ENGINE, "massv", AUTO, 1, 0.45, round_seconds=[0.5, 0.45, 0.42]),
        _m(HF_GENERATE, NO_DRAFTER, NO_DRAFTER, 8, 1.0),
        _m(ENGINE, NO_DRAFTER, NO_DRAFTER, 8, 1.1, round_seconds=[1.0, 1.1, 1.2]),
        _m(ENGINE, "massv", AUTO, 8, 1.1, round_seconds=[1.2, 1.1, 1.0], policies_tokens_per_s=[100 / 1.3, 100 / 1.1,
                                                                                                 100 / 1.0]),
        _m(DIRECT, "massv", AUTO, 32, 1.0, batching=STATIC, policies_tokens_per_s=[90, 100, 110]),
        _m(DIRECT, "massv", AUTO, 32, 1 / 0.9, batching=CONTINUOUS, policies_tokens_per_s=[80, 90, 100]),
        _m(CAPTION_JOB, "massv", AUTO, 32, 5.0, batching=STATIC, against_engine=0.2),
        _m(CAPTION_JOB, "massv", AUTO, 32, 5 / 1.2, batching=CONTINUOUS, against_engine=0.24),
    ]
    judged = {g["goal"]: g for g in goals(measurements, "massv")}
    at_1, at_8 = judged["massv >= 2.0x HF generate at batch 1"], judged["massv >= 1.3x HF generate at batch 8"]
    assert at_1["figure"] == 2.5 and at_1["met"] and "best fixed gamma 3" in at_1["detail"]
    assert at_8["figure"] == pytest.approx(1 / 1.1, abs=1e-3) and not at_8["met"]
    never_below = judged["gamma=auto >= 0.95x the engine without a drafter (same batch size)"]
    assert never_below["figure"] == pytest.approx(1.0) and never_below["met"]
    # each round's ratio as well as the medians': the noise the figure carries
    assert "massv at batch 8, round by round 0.83-1.20" in never_below["detail"]
    # and the fresh policies' spread: a policy's own history sets its later choices
    assert "its 3 fresh policies 0.85-1.10" in never_below["detail"]
    near_best = judged["gamma=auto within 5% of the best fixed gamma at batch 1 and 8"]
    assert near_best["figure"] == pytest.approx(0.4 / 0.45, abs=1e-3) and not near_best["met"]
    assert "massv at batch 1 (best fixed gamma 3, round by round 0.76-1.05)" in near_best["detail"]
    plain = judged["engine without a drafter >= HF generate at every batch size"]
    assert not plain["met"] and "batch 8" in plain["detail"]
    assisted = judged["engine with text-only >= 1.2x HF assisted generation at batch 1"]
    assert assisted["figure"] == pytest.approx(0.8 / 0.6, abs=1e-3) and assisted["met"]
    batching = judged["continuous batching never slower than static batches (8 rows)"]
    assert batching["figure"] == pytest.approx(0.9) and not batching["met"]  # the engine's 0.9x, below the job's
    assert batching["detail"] == ("engine 0.90x, caption job 1.20x, the engine's continuous batching 3 fresh policies "
                                  "0.80-1.00 against the median static policy")
    analytic = judged["measured speedup >= 90% of the analytic tau / (v + gamma c), v the measured verify cost"]
    assert analytic["figure"] == pytest.approx(0.8) and not analytic["met"]  # batch 8's, the lower of two medians
    assert "batch 1 0.96, batch 8 0.80" in analytic["detail"]


def test_auto_goals_are_judged_head_to_head():
    """Where the head to head ran, auto's two goals take its figures (the sweep's fastest fixed gammas timed again,
    not the best of the sweep's noisy figures), and say the control's figure and the sweep's."""
    sweep = [
        _m(HF_GENERATE, NO_DRAFTER, NO_DRAFTER, 8, 1.0),
        _m(ENGINE, NO_DRAFTER, NO_DRAFTER, 8, 1.0),
        _m(ENGINE, "msd", "4", 8, 0.8),
        _m(ENGINE, "msd", "5", 8, 0.7),  # the luckiest of the sweep's gammas
        _m(ENGINE, "msd", AUTO, 8, 0.8),
    ]
    head_to_head = [
        _m(HEAD_TO_HEAD, NO_DRAFTER, NO_DRAFTER, 8, 1.0),
        _m(HEAD_TO_HEAD, NO_DRAFTER, CONTROL, 8, 1.02),
        _m(HEAD_TO_HEAD, "msd", "4", 8, 0.77),  # the sweep's fastest gammas timed again: the fastest is the bar
        _m(HEAD_TO_HEAD, "msd", "5", 8, 0.76),
        _m(HEAD_TO_HEAD, "msd", AUTO, 8, 0.78),
    ]
    judged = {g["goal"]: g for g in goals(sweep + head_to_head, None)}
    near_best = judged["gamma=auto within 5% of the best fixed gamma at batch 1 and 8"]
    assert near_best["figure"] == pytest.approx(0.76 / 0.78) and near_best["met"]
    assert "control (a second engine without a drafter) 0.98 at batch 8" in near_best["detail"]
    assert "in the sweep 0.88 (msd at batch 8)" in near_best["detail"]
    never_below = judged["gamma=auto >= 0.95x the engine without a drafter (same batch size)"]
    assert never_below["figure"] == pytest.approx(1 / 0.78) and never_below["met"]
    alone = {g["goal"]: g for g in goals(sweep, None)}  # without a head to head, the sweep's figures
    assert alone["gamma=auto within 5% of the best fixed gamma at batch 1 and 8"]["figure"] == pytest.approx(0.7 / 0.8)


def test_charts_draw_every_series():
    from pipeline.job.charts import COLOURS, bar_chart, line_chart

    lines = line_chart({"a": [(1, 1.0), (8, 2.0)], "b": [(1, 0.5), (8, 0.7), (99, 5.0)]}, "t", "x", "y", [1, 8],
                       reference=1.0)
    bars = bar_chart({"a": [0.9, 0.5], "b": [0.8, 0.0, 0.1]}, "t", "position")
    for png in (lines, bars):
        image = Image.open(io.BytesIO(png)).convert("RGB")
        colours = {colour for _, colour in image.getcolors(WIDTH * HEIGHT)}
        rgb = {tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)) for hex_colour in COLOURS[:2]}
        assert image.size == (WIDTH, HEIGHT) and rgb <= colours
