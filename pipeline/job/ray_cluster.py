"""Connecting a job's driver to Ray without ever hanging on a cluster that is gone.

`ray.init()` with no address connects to the cluster recorded in
$RAY_TMPDIR/ray/ray_current_cluster (by `ray start`); when that head was killed
the record stays behind and `ray.init()` retries it for minutes. `connect` checks
the recorded address first (a TCP connect with a short timeout) and, when nothing
answers there, says so in one sentence and starts a local Ray instead. With
RAY_ADDRESS set (`ray job submit`, or a user's choice) Ray is left to do as it does.

A local Ray the job starts itself can have its object store sized for the job: Ray's default (30% of RAM)
is fine for throughput, but a long job's actors map ever more of the store's shared pages (measured by
jobs/soak.py: resident memory grows until it holds the whole store), so a store sized to what the job
keeps in flight keeps their resident memory flat.
"""

from __future__ import annotations

import logging
import os
import socket

import ray

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 3.0


def connect(object_store_mb: int | None = None) -> None:
    """ray.init for a job's driver: the cluster it runs on, the recorded one if it answers, else a local Ray
    (with an object store of object_store_mb when given; a cluster's store is the cluster's to size)."""
    if ray.is_initialized():
        return
    record, address = (None, None) if os.environ.get("RAY_ADDRESS") else recorded_cluster()
    if os.environ.get("RAY_ADDRESS") or (address and answers(address)):
        ray.init()
        return
    if address:
        print(f"warning: the Ray cluster recorded in {record} ({address}) does not answer, so a local Ray is "
              f"started instead; to use a cluster, set RAY_ADDRESS (or start that cluster again), and to stop "
              f"seeing this, delete {record}.", flush=True)
    ray.init(address="local", object_store_memory=object_store_mb * 2**20 if object_store_mb else None)
    store_mb = ray.cluster_resources().get("object_store_memory", 0) / 2**20
    print(f"started a local Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, "
          f"{ray.cluster_resources().get('GPU', 0):g} GPUs, a {store_mb:.0f} MB object store", flush=True)


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

