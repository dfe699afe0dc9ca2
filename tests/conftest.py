"""Shared fixtures: tiny checkpoints of every family, built once per session, ragged prompts, HF generate's output
for them (the engine tests' reference), and a Ray of our own.

Every Ray the suite starts (in-process clusters, `ray start --head`, the jobs' subprocesses)
keeps its files and its "current cluster" record under one temporary RAY_TMPDIR of this
session and binds loopback only, so no test connects to a Ray it did not start, and none
leaves an address behind that would make a later `ray.init()` hang.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

# Ray reads this when it is imported (test modules import it at collection), not at ray.init: so here, before
# any of them. With it, Ray takes 127.0.0.1 as the node address, not a routable one.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.engine.prompts import prepare_prompt  # noqa: E402
from pipeline.engine.target import Target  # noqa: E402
from pipeline.lab import tiny_models  # noqa: E402
from pipeline.lab.tiny_models import sample_rows as ragged_rows  # noqa: E402, F401  (tests import it from here)

MAX_NEW = 24  # tokens per row in the engine's fidelity tests (`references`)

RAY_ENVIRONMENT = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # for the subprocesses too
}


@pytest.fixture(scope="session", autouse=True)
def private_ray():
    """RAY_TMPDIR of this session's own (short: Ray's unix socket paths must stay under 108 bytes), loopback."""
    directory = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    variables = {**RAY_ENVIRONMENT, "RAY_TMPDIR": directory}
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    yield directory
    for name, value in saved.items():
        os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server on loopback, one for the session (s3fs caches its clients, endpoint included); the
    standard AWS variables point s3fs (and the workers of every Ray started after it) at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # the server binds a free port
    server.start()
    _, port = server.get_host_and_port()
    variables = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    yield variables["AWS_ENDPOINT_URL"]
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    server.stop()


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """family -> {"target", "text-only", "massv", "massv-oracle", "massv-noisy"} checkpoint directories."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny_models.build_world(family, root / family) for family in tiny_models.FAMILIES}


@pytest.fixture(scope="session")
def targets(world):
    return {family: Target.load(str(paths["target"])) for family, paths in world.items()}


def prepare_rows(target: Target, rows):
    return [prepare_prompt(target.processor, p, im, target.context_length) for p, im in rows]


def hf_greedy(target: Target, prompt, max_new_tokens: int) -> list[int]:
    """The target's own greedy output for one row, through HF generate (no padding)."""
    inputs = {"input_ids": torch.tensor([prompt.input_ids], device=target.device)}
    inputs.update({k: v.to(target.device) for k, v in prompt.vision_inputs.items()})
    inputs.update({k: torch.tensor([v], device=target.device) for k, v in prompt.token_inputs.items()})
    out = target.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt.input_ids) :].tolist()


# Rows the caption job must fail one by one (id -> the start of its error), with good rows around them.
BAD_ROWS = {
    "bad-undecodable": "image cannot be decoded",
    "bad-missing-image": "image is missing",
    "bad-missing-file": "image file not found",
    "bad-empty-prompt": "prompt is empty",
    "bad-null-prompt": "prompt is empty",
    "bad-long-prompt": "prompt is",  # ... N tokens, which leaves no room in the target's context of 512
}


def write_caption_dataset(directory: Path, num_good: int, parts: int = 3) -> dict[str, str | None]:
    """Parquet parts with image paths relative to `directory` plus BAD_ROWS; returns id -> expected error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (directory / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, (prompt, image) in enumerate(ragged_rows(num_good, text_only_every=0)):
        image.save(directory / f"images/{i}.png")
        records.append({"id": f"row-{i}", "prompt": prompt, "image": f"images/{i}.png"})
    (directory / "images" / "garbage.png").write_bytes(b"this is not an image")
    records += [
        {"id": "bad-undecodable", "prompt": "Describe.", "image": "images/garbage.png"},
        {"id": "bad-missing-image", "prompt": "Describe.", "image": None},
        {"id": "bad-missing-file", "prompt": "Describe.", "image": "images/absent.png"},
        {"id": "bad-empty-prompt", "prompt": "  ", "image": "images/0.png"},
        {"id": "bad-null-prompt", "prompt": None, "image": "images/0.png"},
        {"id": "bad-long-prompt", "prompt": "word " * 600, "image": "images/0.png"},
    ]
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("image", pa.string())])
    for p in range(parts):
        pq.write_table(pa.Table.from_pylist(records[p::parts], schema=schema), directory / f"part-{p}.parquet")
    return {r["id"]: BAD_ROWS.get(r["id"]) for r in records}


@pytest.fixture(scope="module")
def references(targets):
    """family -> (13 prepared rows, HF greedy output of each row run alone). Qwen rows' images differ in size, so
    their grids and image-token counts differ per row."""
    out = {}
    for family, target in targets.items():
        prompts = prepare_rows(target, ragged_rows(13))
        out[family] = (prompts, [hf_greedy(target, p, MAX_NEW) for p in prompts])
    return out
