"""Connecting a job's driver to Ray without ever hanging on a cluster that is gone.

`ray.init()` with no address connects to the cluster recorded in
$RAY_TMPDIR/ray/ray_current_cluster (by `ray start`); when that head was killed
the record stays behind and `ray.init()` retries it for minutes. `connect` checks
the recorded address first (a TCP connect with a short timeout) and, when nothing
answers there, says so in one sentence and starts a local Ray instead. With
RAY_ADDRESS set (`ray job submit`, or a user's choice) Ray is left to do as it does.
"""

from __future__ import annotations

import logging
import os
import socket

import ray

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 3.0


def connect(**init_kwargs) -> None:
    """ray.init for a job's driver: the cluster it runs on, the recorded one if it answers, else a local Ray."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**init_kwargs)
        return
    record, address = recorded_cluster()
    if address and not answers(address):
        print(f"warning: the Ray cluster recorded in {record} ({address}) does not answer, so a local Ray is "
              f"started instead; to use a cluster, set RAY_ADDRESS (or start that cluster again), and to stop "
              f"seeing this, delete {record}.", flush=True)
        ray.init(address="local", **init_kwargs)
        return
    ray.init(**init_kwargs)


def recorded_cluster() -> tuple[str, str | None]:
    """(the record's path, the GCS address it holds or None)."""
    from ray._common.utils import get_ray_address_file

    record = get_ray_address_file(None)
    try:
        with open(record) as f:
            return record, f.read().strip() or None
    except OSError:
        return record, None


def answers(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether something accepts TCP connections at host:port within the timeout."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False

