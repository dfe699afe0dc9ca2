"""The caption job as users run it: `ray job submit` against a `ray start --head` cluster, and kill + --resume.

Both drive jobs/caption.py in separate processes, exactly as the README shows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import free_port, write_caption_dataset

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env() -> dict:
    env = os.environ.copy()
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # `python` in the job entrypoint is this environment's
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.6x local clusters use token auth; submit must use it too
    return env


def caption_flags(world, data, output, *extra) -> list[str]:
    return ["--input", str(data), "--output", str(output), "--target", str(world["llava"]["target"]),
            "--drafter", str(world["llava"]["massv"]), "--gamma", "2", "--num-actors", "1", *extra]


def test_ray_job_submit_against_a_local_head(world, tmp_path):
    data = tmp_path / "data"
    expected = write_caption_dataset(data, num_good=20, parts=2)
    env = _env()
    port, dashboard = free_port(), free_port()
    start = [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
             "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=3", "--include-dashboard=true",
             "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        submit = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                  "--working-dir", ".", "--", "python", "jobs/caption.py",
                  *caption_flags(world, data, tmp_path / "out", "--max-new-tokens", "4")]
        done = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in done.stdout and "rows written (this run)" in done.stdout
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    frame = pd.read_parquet(tmp_path / "out" / "parts")
    assert sorted(frame["id"]) == sorted(expected)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows_out"] == len(expected)


def test_killed_job_resumed_writes_every_row_exactly_once(world, tmp_path):
    data, output = tmp_path / "data", tmp_path / "out"
    expected = write_caption_dataset(data, num_good=150, parts=3)
    flags = caption_flags(world, data, output, "--max-new-tokens", "48", "--batch-size", "4")
    job = subprocess.Popen([sys.executable, "jobs/caption.py", *flags], cwd=REPO, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((output / "parts").glob("*.parquet")) and time.monotonic() < deadline:
            assert job.poll() is None, "the job ended before any part was written"
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started
        job.wait()
    first = pd.read_parquet(output / "parts")
    assert 0 < len(first) < len(expected), "the kill must land midway"
    (output / "parts" / "torn.parquet").write_bytes(b"PAR1 half a file")  # as a kill mid-write leaves one

    resumed = subprocess.run([sys.executable, "jobs/caption.py", *flags, "--resume"], cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {len(set(first['id']))} rows" in resumed.stdout
    final = pd.read_parquet(output / "parts")
    assert sorted(final["id"]) == sorted(expected), "every id exactly once after resume"
    summary = json.loads((output / "summary.json").read_text())
    assert summary["duplicate_ids"] == 0 and summary["rows_out"] == summary["rows_in"] == len(expected)
    assert summary["this_run"]["rows"] == len(expected) - len(set(first["id"]))
