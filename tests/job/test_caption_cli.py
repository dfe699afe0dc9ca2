"""The caption job as users run it, in separate processes as the README shows: `python jobs/caption.py` killed midway,
then resumed with `ray job submit` against a `ray start --head` cluster; a first run with hub ids offline and a stale
cluster record; a driver stuck connecting ends on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_caption_dataset

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env(**extra) -> dict:
    """This session's Ray environment (conftest: own RAY_TMPDIR, loopback), `python` from this venv."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", **extra}  # Ray 2.6x heads use token auth; submit must too
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # `python` in the job entrypoint is this environment's
    return env


@contextmanager
def ray_head(ray_tmpdir: Path):
    """`ray start --head --block` in a session of its own, with its own RAY_TMPDIR and ports Ray picks; yields the
    dashboard address. Stopped by signalling its process group: only this head's processes, never another Ray."""
    env = _env(RAY_TMPDIR=str(ray_tmpdir))
    start = [str(BIN / "ray"), "start", "--head", "--block", "--port=0", "--dashboard-port=0",
             "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=3", "--include-dashboard=true",
             "--disable-usage-stats"]
    head = subprocess.Popen(start, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        address, seen = None, []
        while address is None:
            line = head.stdout.readline()
            assert line, "ray start --head ended before it was ready:\n" + "".join(seen[-20:])
            seen.append(line)
            found = re.search(r"(http://127\.0\.0\.1:\d+)' ray job submit", line)
            address = found and found.group(1)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def caption_flags(world, data, output, *extra) -> list[str]:
    return ["--input", str(data), "--output", str(output), "--target", str(world["llava"]["target"]),
            "--drafter", str(world["llava"]["massv"]), "--gamma", "2", "--num-actors", "1", *extra]


def wait_until_unchanged(directory: Path, quiet_s: float = 3.0, limit_s: float = 60.0) -> None:
    """Until the directory's files have not changed for quiet_s seconds (Ray's workers outlive a killed driver
    by a moment: they stop when they notice their raylet is gone)."""
    def state():
        return sorted((p.name, p.stat().st_size) for p in directory.glob("*"))

    deadline, last, since = time.monotonic() + limit_s, state(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.2)
        if (now := state()) != last:
            last, since = now, time.monotonic()


def test_killed_job_resumed_through_ray_job_submit_writes_every_row_exactly_once(world, tmp_path, private_ray):
    """A job run as `python jobs/caption.py` is killed midway (driver and its local Ray); `ray job submit
    --working-dir . -- python jobs/caption.py ... --resume` against a local head then finishes it: every id once."""
    data, output = tmp_path / "data", tmp_path / "out"
    expected = write_caption_dataset(data, num_good=80, parts=3)
    flags = caption_flags(world, data, output, "--max-new-tokens", "48", "--batch-size", "4")
    # Each driver starts its own local Ray under its own RAY_TMPDIR: the killed one leaves its address behind.
    job = subprocess.Popen([sys.executable, "jobs/caption.py", *flags], cwd=REPO,
                           env=_env(RAY_TMPDIR=str(Path(private_ray) / "killed")),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(list((output / "parts").glob("*.parquet"))) < 2 and time.monotonic() < deadline:
            assert job.poll() is None, "the job ended before two parts were written"
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started
        job.wait()
    wait_until_unchanged(output / "parts")  # a write task already under way when the kill landed may still finish
    first = pd.read_parquet(output / "parts")
    assert 0 < len(first) < len(expected), "the kill must land midway"
    # A kill during a write leaves a prefix of the part (Parquet's footer is written last): tear one part so.
    torn = max((output / "parts").glob("*.parquet"), key=lambda part: part.stat().st_size)
    torn_ids = set(pd.read_parquet(torn)["id"])
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    first = first[~first["id"].isin(torn_ids)]

    with ray_head(Path(private_ray) / "head") as (dashboard, env):
        submit = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", ".", "--",
                  "python", "jobs/caption.py", *flags, "--resume"]
        resumed = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "succeeded" in resumed.stdout and "rows written (this run)" in resumed.stdout
    assert f"resuming: {len(set(first['id']))} rows" in resumed.stdout
    final = pd.read_parquet(output / "parts")
    assert sorted(final["id"]) == sorted(expected), "every id exactly once after resume"
    summary = json.loads((output / "summary.json").read_text())
    assert summary["duplicate_ids"] == 0 and summary["rows_out"] == summary["rows_in"] == len(expected)
    assert summary["this_run"]["rows"] == len(expected) - len(set(first["id"]))


def lay_out_hub_cache(cache: Path, repo_id: str, checkpoint: Path) -> None:
    """A Hugging Face cache holding `repo_id` at revision main, as `huggingface_hub` writes it."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(checkpoint, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_first_run_with_hub_ids_offline_and_a_stale_cluster_record(world, tmp_path, private_ray):
    """A new user's first run, in one job:
    - --target/--drafter org/name are found in the local HF cache as from_pretrained finds them; nothing downloads
      (HF_HUB_OFFLINE), and a repo that is in neither place is a one-sentence error before any cluster work;
    - a killed `ray start --head` left its address recorded: the job says so in one sentence, does not hang, and
      runs on a local Ray, with the object store it was asked for."""
    import socket

    cache = tmp_path / "hf"
    lay_out_hub_cache(cache, "tiny/llava", world["llava"]["target"])
    lay_out_hub_cache(cache, "tiny/llava-massv", world["llava"]["massv"])
    data = tmp_path / "data"
    expected = write_caption_dataset(data, num_good=6, parts=1)
    ray_tmpdir = Path(private_ray) / "stale"
    (ray_tmpdir / "ray").mkdir(parents=True)
    flags = ["--input", str(data), "--output", str(tmp_path / "out"), "--target", "tiny/llava",
             "--drafter", "tiny/llava-massv", "--gamma", "2", "--num-actors", "1", "--max-new-tokens", "4"]
    with socket.socket() as gone:  # bound, never listening: connections to it are refused, as to a dead head
        gone.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{gone.getsockname()[1]}"
        (ray_tmpdir / "ray" / "ray_current_cluster").write_text(address)
        env = _env(RAY_TMPDIR=str(ray_tmpdir), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
        env.pop("RAY_ADDRESS", None)
        started = time.monotonic()
        done = subprocess.run([sys.executable, "jobs/caption.py", *flags, "--object-store-mb", "100"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    warning = next(line for line in done.stdout.splitlines() if line.startswith("warning:"))
    assert address in warning and "does not answer" in warning and "RAY_ADDRESS" in warning
    assert "started a local Ray: " in done.stdout and "a 100 MB object store" in done.stdout
    assert time.monotonic() - started < 180
    frame = pd.read_parquet(tmp_path / "out" / "parts")
    assert sorted(frame["id"]) == sorted(expected) and set(frame["target"]) == {"tiny/llava"}
    assert frame["num_drafted"].sum() > 0

    missing = [*flags[:4], "--target", "nobody/absent", "--output", str(tmp_path / "out2")]
    refused = subprocess.run([sys.executable, "jobs/caption.py", *missing], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: target nobody/absent is neither a local directory nor a Hugging Face")


def test_sigterm_ends_a_driver_stuck_connecting_to_its_cluster(world, tmp_path, private_ray):
    """With RAY_ADDRESS at a head that does not answer, ray.init waits inside Ray's C++ code (where Python's own
    handlers, Ray's included, do not run: before the fix the driver was still there 30 s after SIGTERM)."""
    import socket
    import threading

    data = tmp_path / "data"
    write_caption_dataset(data, num_good=2, parts=1)
    with socket.socket() as gone:
        gone.bind(("127.0.0.1", 0))
        env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{gone.getsockname()[1]}"}
        driver = subprocess.Popen([sys.executable, "jobs/caption.py", *caption_flags(world, data, tmp_path / "out")],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        connecting, lines = threading.Event(), []

        def read() -> None:
            for line in driver.stdout:
                lines.append(line)
                if "Connecting to existing Ray cluster" in line:
                    connecting.set()

        threading.Thread(target=read, daemon=True).start()
        try:
            assert connecting.wait(120), "".join(lines)[-3000:]
            time.sleep(3)  # well inside the connection attempt
            sent = time.monotonic()
            driver.send_signal(signal.SIGTERM)
            assert driver.wait(timeout=15) == 128 + signal.SIGTERM
            assert time.monotonic() - sent < 5, time.monotonic() - sent
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
    assert any("stopped by SIGTERM" in line for line in lines)
