"""cluster.yaml (the Ray cluster-launcher config for AWS) is one `ray up` accepts, and says what we mean.

The config is filled out with Ray's AWS defaults and checked against Ray's own cluster-config schema
(ray/autoscaler/ray-schema.json, through `validate_config`), exactly as `ray up` does before it touches AWS;
nothing here needs AWS credentials or the network. Beyond the schema: the GPU worker type declares a GPU
and autoscales (min_workers < max_workers), the head declares no GPU, the project is synced to every node
and installed by setup_commands. A config with a misspelled key or a wrong type must be rejected, which
shows the validator really checks something.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def validate(config: dict) -> dict:
    """What `ray up` does first: merge the provider's defaults, then validate. Returns the merged config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_is_valid_and_autoscales_gpu_workers(config):
    prepared = validate(config)

    assert config["cluster_name"] == "vlm-specdec"
    assert config["provider"]["type"] == "aws"
    node_types = config["available_node_types"]
    head_type = config["head_node_type"]
    head = node_types[head_type]
    assert "GPU" not in head["resources"], "no GPU work belongs on the head"

    workers = {name: spec for name, spec in node_types.items() if name != head_type}
    gpu_workers = {name: spec for name, spec in workers.items() if spec["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, f"no worker type declares a GPU: {workers}"
    for name, spec in gpu_workers.items():
        assert spec["min_workers"] < spec["max_workers"], f"{name} does not autoscale"
        assert spec["max_workers"] <= config["max_workers"], f"{name} can never reach its max_workers"
        assert "IamInstanceProfile" in spec["node_config"], f"{name} has no instance profile for S3"

    # The project is synced to every node from the repository root and installed there.
    assert config["file_mounts"] == {"~/vlm-specdec": "."}
    assert (REPO / "pyproject.toml").is_file()
    assert any("pip install -e ~/vlm-specdec" in cmd for cmd in config["setup_commands"])
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands run on both kinds of node
        assert any("pip install -e ~/vlm-specdec" in cmd for cmd in prepared[key]), key
    assert ".venv" in config["rsync_exclude"]

    assert any("ray start --head" in cmd for cmd in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in cmd for cmd in config["worker_start_ray_commands"])

    # No credentials in the file: S3 access comes from instance profiles.
    text = CLUSTER_YAML.read_text()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", "AKIA"):
        assert secret not in text


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        pytest.param(
            lambda c: c.__setitem__("max_worker", c.pop("max_workers")),
            "'max_worker' was unexpected",
            id="misspelled-top-level-key",
        ),
        pytest.param(lambda c: c.__setitem__("max_workers", "eight"), "is not of type 'integer'", id="wrong-type"),
        pytest.param(
            lambda c: c["available_node_types"][c["head_node_type"]].pop("node_config"),
            "'node_config' is a required property",
            id="missing-node-config",
        ),
    ],
)
def test_validator_rejects_a_broken_config(config, break_it, message):
    broken = copy.deepcopy(config)
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError, match=message):
        validate(broken)
