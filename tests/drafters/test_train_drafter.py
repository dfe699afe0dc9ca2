"""Drafter training on Ray Train, minutes-scale on tiny data: text -> adapt -> corpus -> distill, and an MSD head
trained by two workers, one of them killed.

Each phase must lower its loss, write checkpoints, and produce a drafter the
caption job loads and that stays lossless; the corpus the caption job writes
with --keep-images feeds --phase distill as it is.
"""

from __future__ import annotations

import io
import json
import threading
import time

import pandas as pd
import pytest
import ray
import torch
from conftest import ragged_rows
from PIL import Image

from drafters import load_drafter
from drafters.training import (
    TRAINING_LOG,
    TrainConfig,
    build_draft_model,
    load_training_state,
    run_training,
    save_training_state,
)
from pipeline.engine.engine import EngineConfig, SpecDecodeEngine
from pipeline.engine.prompts import prepare_prompt
from pipeline.engine.target import Target
from pipeline.job.caption import run_caption
from pipeline.job.config import CaptionConfig
from pipeline.lab import scenes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray(s3_server):  # the S3 variables are set before Ray starts, so its workers see them too
    ray.init(num_cpus=4, include_dashboard=False)
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}, "loopback only"
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    return {
        "text": scenes.write_parquet(scenes.text_records(192, seed=1), root / "text.parquet"),
        "caption": scenes.write_parquet(scenes.records(192, seed=2, kind="caption"), root / "caption.parquet"),
        "instruct": scenes.write_parquet(scenes.records(96, seed=3, kind="instruct"), root / "instruct" / "x.parquet"),
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
    # the distilled drafter: answers identical to the target's own (the corpus's, greedy), its drafts accepted
    rows = pd.read_parquet(data["instruct"]).to_dict("records")
    prompts = [prepare_prompt(loaded.processor, row["prompt"], Image.open(io.BytesIO(row["image"])),
                              loaded.context_length) for row in rows]
    engine = SpecDecodeEngine(loaded, load_drafter(distilled, loaded), EngineConfig(gamma=3, max_new_tokens=12))
    results = engine.generate(prompts, max_batch_size=16)
    assert [r.text for r in results] == frame.set_index("id").loc[[row["id"] for row in rows], "text"].tolist()
    assert sum(r.counts.num_accepted for r in results) > 0


def test_two_workers_on_uneven_s3_data_resume_after_a_worker_is_killed(local_ray, world, tmp_path):
    """An MSD head trained by two DDP workers (gloo) with --data and --storage-path on s3:// (moto), 125 text rows for
    batches of 8: Ray Train splits rows equally (a remainder left out each epoch) and the loop counts steps, not
    epochs, so both ranks take every step together across epochs (a rank with a batch more would wait on a collective
    forever). One worker is killed after a checkpoint: Ray Train restarts the group, which resumes from it; each step
    is done once. The head learns, and in the engine it is accepted and lossless."""
    import psutil
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("training")
    fs.put(str(scenes.write_parquet(scenes.text_records(125, seed=5), tmp_path / "text.parquet")),
           "training/data/text.parquet")
    killed = []

    def kill_the_worker_after_a_checkpoint():
        deadline = time.monotonic() + 180
        snapshot = "training/runs/msd/checkpoint_manager_snapshot.json"  # Ray Train's record of registered ones
        while time.monotonic() < deadline:
            fs.invalidate_cache()
            if fs.exists(snapshot) and "checkpoint_" in fs.cat(snapshot).decode():
                break
            time.sleep(0.2)
        for process in psutil.process_iter(["cmdline"]):
            if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
                process.kill()
                killed.append(process.pid)
                return

    killer = threading.Thread(target=kill_the_worker_after_a_checkpoint)
    killer.start()
    head = tmp_path / "msd"
    history = train("msd", "s3://training/data/", {"target": world["llava"]["target"], "from": ""}, head, tmp_path,
                    steps=40, num_workers=2, storage_path="s3://training/runs")
    killer.join()
    assert killed, "a training worker was killed"
    assert len(history["resumed_at"]) == 1 and history["resumed_at"][0] % 8 == 0 and history["resumed_at"][0] > 0
    assert len(history["losses"]) == 40  # the steps after the checkpoint were redone, none twice
    assert_learned(history)

    target = Target.load(str(world["llava"]["target"]))
    prompts = [prepare_prompt(target.processor, prompt, image, target.context_length)
               for prompt, image in ragged_rows(8)]
    config = EngineConfig(gamma=3, max_new_tokens=12)
    plain = SpecDecodeEngine(target, None, config).generate(prompts)
    drafted = SpecDecodeEngine(target, load_drafter(head, target), config).generate(prompts)
    assert [r.tokens for r in drafted] == [r.tokens for r in plain]
    assert sum(r.counts.num_accepted for r in drafted) > 0, "the trained head's drafts are accepted"


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


def test_msd_batch_pairs_each_hidden_state_with_the_next_token(world, targets, data):
    """An MSD training batch from image rows: at column t the pair (h_t, x_{t+1}) at the target's position of
    x_{t+1}, one image embedding per image token, and h_{t+1} to predict, with the answer's positions marked."""
    from drafters.training import IGNORE, build_model, encode_batch

    target = targets["llava"]
    config = TrainConfig(phase="msd", data="unused", target=str(world["llava"]["target"]), output="unused",
                         feature_noise=0.0)
    rows = pd.read_parquet(data["caption"]).head(3).to_dict("records")
    batch = encode_batch(rows, config, target, build_model(config, target), target.device)
    ids = batch["next_ids"]
    assert int((ids == target.image_token_id).sum()) == batch["image_embeds"].shape[0] > 0
    prompts = [prepare_prompt(target.processor, row["prompt"], Image.open(io.BytesIO(row["image"])),
                              target.context_length) for row in rows]
    features = target.image_features({name: torch.cat([p.vision_inputs[name] for p in prompts])
                                      for name in prompts[0].vision_inputs})
    assert torch.allclose(batch["image_embeds"], features.float(), atol=1e-5)  # the vectors the target consumed
    assert torch.equal(batch["hidden_states"][:, 1:], batch["next_features"][:, :-1])  # h_{t+1} is the next input
    answer = batch["labels"] != IGNORE
    assert torch.equal(batch["labels"][answer], ids[answer])  # a label marks x_{t+1} when it is an answer token
    first = batch["attention_mask"][0].bool()
    assert batch["position_ids"][0][first].tolist() == list(range(1, int(first.sum()) + 1))  # LLaVA: x_{t+1} at t+1


def test_msd_training_state_restores_exactly(world, targets, tmp_path):
    """An MSD head's checkpoint holds fc and its decoder layer (not the target's shared embedding and LM head), and
    a resumed head with its AdamW state takes the next step exactly as the uninterrupted one."""
    from drafters.training import build_model, feature_loss

    target = targets["llava"]
    hidden = target.text_config.hidden_size
    config = TrainConfig(phase="msd", data="unused", target=str(world["llava"]["target"]), output=str(tmp_path / "x"))

    def start():
        torch.manual_seed(0)
        model = build_model(config, target)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step(model, optimizer, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 300, (2, 8), generator=generator)
        ids[:, 1:3] = target.image_token_id  # image positions enter as the target's image embeddings
        features = torch.randn(2, 8, hidden, generator=generator)
        predicted = model(features, ids, torch.ones_like(ids), torch.arange(8).expand(2, 8),
                          torch.randn(4, hidden, generator=generator))
        loss = feature_loss(predicted, torch.randn(2, 8, hidden, generator=generator), ids, model.logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    trained, optimizer = start()
    assert not any("embed" in name or "lm_head" in name for name, _ in trained.named_parameters())
    for seed in range(3):
        step(trained, optimizer, seed)
    save_training_state(tmp_path, trained, optimizer, (3, [0.5, 0.4, 0.3], []))
    resumed, resumed_optimizer = start()
    assert load_training_state(tmp_path, resumed, resumed_optimizer) == (3, [0.5, 0.4, 0.3], [])
    step(trained, optimizer, 3)
    step(resumed, resumed_optimizer, 3)
    for (name, a), b in zip(trained.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name}: the optimizer state did not come back"


def test_rows_without_an_answer_leave_before_the_split(local_ray):
    """Failed corpus rows (null or empty answers) are dropped before Ray Train splits the data, so no rank ever
    skips a batch its peers train on (which would leave DDP's collectives and the epochs out of step)."""
    import pyarrow as pa

    from drafters.training import with_answers

    data = ray.data.from_arrow(pa.table({"prompt": ["p"] * 4, "text": ["a red square.", None, "", "two shapes."]}))
    assert [row["text"] for row in with_answers(data, "text").take_all()] == ["a red square.", "two shapes."]

