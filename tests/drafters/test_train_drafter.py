"""Drafter training on Ray Train, minutes-scale on tiny data: text -> adapt -> corpus -> distill, and a worker failure.

Each phase must lower its loss, write checkpoints, and produce a drafter the
caption job loads and that stays lossless; the corpus the caption job writes
with --keep-images feeds --phase distill as it is.
"""

from __future__ import annotations

import json
import threading
import time

import pandas as pd
import pytest
import ray
import torch

from drafters import load_drafter
from drafters.training import (
    TRAINING_LOG,
    TrainConfig,
    build_draft_model,
    load_training_state,
    run_training,
    save_training_state,
)
from pipeline.lab import scenes
from pipeline.job.caption import run_caption
from pipeline.job.config import CaptionConfig
from pipeline.engine.target import Target

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray(s3_server):  # the S3 variables are set before Ray starts, so its workers see them too
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    return {
        "text": scenes.write_parquet(scenes.text_records(64, seed=1), root / "text.parquet"),
        "caption": scenes.write_parquet(scenes.records(64, seed=2, kind="caption"), root / "caption.parquet"),
        "instruct": scenes.write_parquet(scenes.records(48, seed=3, kind="instruct"), root / "instruct" / "x.parquet"),
    }


def train(phase, data_path, start, output, tmp_path, **overrides) -> dict:
    settings = dict(phase=phase, data=str(data_path), target=str(start["target"]), drafter=str(start["from"]),
                    output=str(output), storage_path=str(tmp_path / "runs"), name=phase, steps=24, batch_size=8,
                    lr=3e-3, checkpoint_every=8, log_every=4)
    run_training(TrainConfig(**{**settings, **overrides}))
    return json.loads((output / TRAINING_LOG).read_text())


def checkpoints(run_directory) -> list:
    return [p for p in run_directory.glob("checkpoint_*") if p.is_dir()]


def assert_learned(history: dict) -> None:
    losses = history["losses"]
    assert len(losses) == history["config"]["steps"]
    assert sum(losses[-4:]) / 4 < 0.95 * sum(losses[:4]) / 4, losses


def test_text_adapt_corpus_distill(local_ray, world, data, tmp_path):
    target = world["llava"]["target"]
    text_only = tmp_path / "text-only"
    assert_learned(train("text", data["text"], {"target": target, "from": world["llava"]["text-only"]}, text_only,
                         tmp_path))
    assert len(checkpoints(tmp_path / "runs" / "text")) == 2  # CheckpointConfig(num_to_keep=2)
    adapted = tmp_path / "massv-1"
    assert_learned(train("adapt", data["caption"], {"target": target, "from": text_only}, adapted, tmp_path))

    corpus = tmp_path / "corpus"
    run_caption(CaptionConfig(input=str(data["instruct"].parent), output=str(corpus), target=str(target),
                              drafter=str(adapted), gamma=3, max_new_tokens=12, keep_images=True, num_actors=1,
                              gpus_per_actor=0))
    frame = pd.read_parquet(corpus / "parts")
    assert frame["image"].notna().all() and frame["error"].isna().all()

    distilled = tmp_path / "massv-2"
    history = train("distill", corpus / "parts", {"target": target, "from": adapted}, distilled, tmp_path,
                    answer_column="text")
    assert_learned(history)

    loaded = Target.load(str(target))
    assert load_drafter(text_only, loaded).kind == "text-only"
    assert load_drafter(adapted, loaded).kind == load_drafter(distilled, loaded).kind == "massv"
    # the distilled drafter in the caption job: answers identical to the target's own
    outputs = {}
    for name, drafter in (("plain", "none"), ("distilled", str(distilled))):
        run_caption(CaptionConfig(input=str(data["instruct"].parent), output=str(tmp_path / name), target=str(target),
                                  drafter=drafter, gamma=3, max_new_tokens=12, num_actors=1, gpus_per_actor=0))
        outputs[name] = pd.read_parquet(tmp_path / name / "parts").set_index("id")["text"].sort_index()
    assert outputs["plain"].equals(outputs["distilled"])


def test_two_workers_on_uneven_s3_data_resume_after_a_worker_is_killed(local_ray, world, tmp_path):
    """Two DDP workers (gloo) with --data and --storage-path on s3:// (moto), 61 rows for batches of 8: Ray Train
    splits rows equally (a remainder left out each epoch) and the loop counts steps, not epochs, so both ranks take
    every step together across epochs (a rank with a batch more would wait on a collective forever). One worker is
    killed after a checkpoint: Ray Train restarts the group, which resumes from it; each step is done once."""
    import psutil
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("training")
    fs.put(str(scenes.write_parquet(scenes.text_records(61, seed=5), tmp_path / "text.parquet")),
           "training/data/text.parquet")
    killed = []

    def kill_the_worker_after_a_checkpoint():
        deadline = time.monotonic() + 180
        # two checkpoint directories: the first of them is surely registered by then
        while time.monotonic() < deadline:
            fs.invalidate_cache()
            stored = fs.find("training/runs/text", withdirs=True) if fs.exists("training/runs/text") else []
            if len({path.split("checkpoint_")[1].split("/")[0] for path in stored if "checkpoint_" in path}) >= 2:
                break
            time.sleep(0.2)
        for process in psutil.process_iter(["cmdline"]):
            if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
                process.kill()
                killed.append(process.pid)
                return

    killer = threading.Thread(target=kill_the_worker_after_a_checkpoint)
    killer.start()
    history = train("text", "s3://training/data/", {"target": world["llava"]["target"],
                                                    "from": world["llava"]["text-only"]},
                    tmp_path / "text-only", tmp_path, steps=40, num_workers=2, storage_path="s3://training/runs")
    killer.join()
    assert killed, "a training worker was killed"
    assert len(history["resumed_at"]) == 1 and history["resumed_at"][0] % 8 == 0 and history["resumed_at"][0] > 0
    assert len(history["losses"]) == 40  # the steps after the checkpoint were redone, none twice


def test_training_state_restores_weights_and_optimizer_exactly_and_strictly(world, targets, tmp_path):
    """What a resumed worker loads: the trained weights and AdamW's moments (the next step lands exactly where the
    uninterrupted run's does), and nothing that does not fit this phase's trainable weights."""
    target = targets["llava"]

    def start(phase: str):
        config = TrainConfig(phase=phase, data="unused", target=str(world["llava"]["target"]),
                             drafter=str(world["llava"]["massv"]), output=str(tmp_path / "unused"))
        model = build_draft_model(config, target)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step(model, optimizer, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 300, (2, 8), generator=generator)
        ids[:, 1:3] = target.image_token_id  # two image positions a row: the projector is trained too
        features = torch.randn(4, target.text_config.hidden_size, generator=generator)
        loss = model(ids, torch.ones_like(ids), features).logsumexp(dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    trained, optimizer = start("distill")
    for seed in range(3):
        step(trained, optimizer, seed)
    save_training_state(tmp_path, trained, optimizer, (3, [1.0, 0.9, 0.8], []))

    resumed, resumed_optimizer = start("distill")
    assert load_training_state(tmp_path, resumed, resumed_optimizer) == (3, [1.0, 0.9, 0.8], [])
    for (name, a), b in zip(trained.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    step(trained, optimizer, 3)
    step(resumed, resumed_optimizer, 3)
    for (name, a), b in zip(trained.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name}: the optimizer state did not come back"

    adapt, adapt_optimizer = start("adapt")  # trains the projector only: the distill checkpoint does not fit
    with pytest.raises(ValueError, match="does not hold this phase's trainable weights"):
        load_training_state(tmp_path, adapt, adapt_optimizer)


def test_rows_without_an_answer_leave_before_the_split():
    """Failed corpus rows (null or empty answers) are dropped before Ray Train splits the data, so no rank ever
    skips a batch its peers train on (which would leave DDP's collectives and the epochs out of step)."""
    import pyarrow as pa

    from drafters.training import _with_answers

    batch = pa.table({"prompt": ["p"] * 4, "text": ["a red square.", None, "", "two shapes."]})
    assert _with_answers(batch, "text")["text"].to_pylist() == ["a red square.", "two shapes."]

