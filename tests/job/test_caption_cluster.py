"""The caption job on a two-node Ray cluster simulated on this machine, each node declaring one GPU."""

from __future__ import annotations

import pandas as pd
import pytest
import ray
from conftest import write_caption_dataset

from pipeline.job.caption import run_caption
from pipeline.job.config import CaptionConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}, "loopback only"
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def both_actors_before_rows():
    """Rows go out once the pool's two actors are up: the first actor up could otherwise decode all 60 short rows
    before the other has imported its modules (it did, once, on a fresh clone), and the test would not see a node."""
    context = ray.data.DataContext.get_current()
    before, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 120
    yield
    context.wait_for_min_actors_s = before


def test_one_actor_per_gpu_on_each_node(two_nodes, both_actors_before_rows, world, tmp_path):
    data = tmp_path / "data"
    expected = write_caption_dataset(data, num_good=60, parts=2)
    # gpus_per_actor unset: the cluster has GPUs, so each actor takes one, and two actors need both nodes
    config = CaptionConfig(input=str(data), output=str(tmp_path / "out"), target=str(world["llava"]["target"]),
                           drafter=str(world["llava"]["text-only"]), max_new_tokens=4, batch_size=4, num_actors=2,
                           model_cache=str(tmp_path / "cache"))
    summary = run_caption(config)
    frame = pd.read_parquet(tmp_path / "out" / "parts")
    assert sorted(frame["id"]) == sorted(expected)
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(nodes) == 2 and set(frame["node_id"]) == nodes
    assert all(n["rows"] > 0 for n in summary["nodes"].values())
