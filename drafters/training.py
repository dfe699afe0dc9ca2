"""Drafter distillation on Ray Train: a text-only LM, MASSV phase 1 (adapt) and phase 2 (distill), an MSD head.

    target   (the demo world only) the target VLM itself learns the answers, image in; same machinery
    text     the small LM learns the answers' language from text (image placeholders stripped, as the
             text-only drafter reads prompts): the baseline drafter, and MASSV's starting point
    adapt    MASSV phase 1: a new projector maps the target's image features into the frozen LM
    distill  MASSV phase 2: projector + LM learn the target's own answers (a corpus the caption job writes)
    msd      an MSD head learns to predict the target's next hidden state from (h_t, x_{t+1}), the frozen
             target computing its hidden states in the loop: text-only first (rows' images left out), then
             each row keeps its image with a probability that ramps linearly from 0 to 1

Rows come from Parquet through Ray Data (`get_dataset_shard`); each worker runs
`train_loop` on its shard. The loss is cross-entropy on answer tokens only (MSD: SmoothL1 to the
target's next hidden state + 0.1 x soft cross-entropy to its next-token distribution, answer
positions only, uniform noise on the input hidden states). Rank 0
reports a checkpoint (safetensors: weights, optimizer state, step) every
`checkpoint_every` steps; after a worker failure Ray Train restarts the group and
the loop resumes from the latest one. The result is saved in the format the
caption job loads: an HF causal-LM directory (text), a MASSV or an MSD directory.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from drafters.causal_lm import CausalLMDraftModel
from drafters.massv import MassvDraftModel, MassvProjector
from drafters.msd import MsdDraftModel
from drafters.registry import drafter_kind
from drafters.text_only import TextOnlyDraftModel
from pipeline.engine.padding import right_pad
from pipeline.engine.prompts import prepare_prompts
from pipeline.engine.target import Target
from pipeline.job.cli import flag
from pipeline.job.ray_cluster import connect as connect_ray
from pipeline.job.storage import absolute, is_remote, url_to_fs

PHASES = ("target", "text", "adapt", "distill", "msd")
IGNORE = -100  # label of positions that carry no loss (prompt and padding)
TRAINING_LOG = "training_log.json"


@dataclass
class TrainConfig:
    phase: str = field(metadata=flag("target (demo world) | text | adapt (MASSV 1) | distill (MASSV 2) | msd",
                                     choices=PHASES))
    data: str = field(metadata=flag("Parquet file or directory (local or s3://) with prompt, answer and\n"
                                    "(adapt, distill) image columns"))
    target: str = field(metadata=flag("the target checkpoint: tokenizer and chat template; image features for\n"
                                      "adapt and distill"))
    output: str = field(metadata=flag("the trained drafter (or target), in the format the caption job loads\n"
                                      "(local or s3://)"))
    drafter: str = field(default="", metadata=flag("start from: a causal-LM directory (text, adapt), a MASSV\n"
                                                   "directory (distill) or an MSD one (msd: optional, a new\n"
                                                   "head otherwise); unused by --phase target"))
    storage_path: str = field(default="out/train_runs", metadata=flag("Ray Train checkpoints (local or s3://)"))
    name: str = field(default="drafter", metadata=flag("the Ray Train run's name"))
    answer_column: str = field(default="answer", metadata=flag("'text' for a corpus written by the caption job"))
    num_workers: int = field(default=1, metadata=flag("Ray Train workers"))
    use_gpu: bool = field(default=False, metadata=flag("one GPU per worker"))
    steps: int = field(default=200, metadata=flag("optimizer steps"))
    batch_size: int = field(default=16, metadata=flag("rows per step and worker"))
    lr: float = field(default=3e-4, metadata=flag("AdamW learning rate"))
    checkpoint_every: int = field(default=50, metadata=flag("steps between checkpoints"))
    max_failures: int = field(default=2, metadata=flag("worker-group restarts from the latest checkpoint"))
    log_every: int = field(default=10, metadata=flag("steps between loss lines"))
    seed: int = field(default=0, metadata=flag("torch seed (plus the worker's rank)"))
    head_layers: int = field(default=1, metadata=flag("msd: decoder layers of a new head"))
    decoupled: bool = field(default=True, metadata=flag(
        "msd: image tokens enter the head as the target's image embeddings (MSD); off: fused\n"
        "with the hidden state like text tokens (a plain EAGLE head)"))
    curriculum: bool = field(default=True, metadata=flag(
        "msd: text-only for the first half of the steps, then a row keeps its image with a\n"
        "probability ramping linearly from 0 to 1 (MSD's); off: images from the start"))
    feature_noise: float = field(default=0.2, metadata=flag("msd: width of the uniform noise on input hidden states"))

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"--phase must be one of {', '.join(PHASES)}, got {self.phase!r}.")
        for name in ("steps", "batch_size", "checkpoint_every", "num_workers", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.phase not in ("target", "msd") and not self.drafter:
            raise ValueError(f"--phase {self.phase} needs --drafter, the checkpoint it starts from.")
        for name in ("data", "target", "drafter", "output", "storage_path"):  # Ray Train workers run elsewhere
            setattr(self, name, absolute(getattr(self, name)))


class TargetModel(nn.Module):
    """The target VLM trained end to end (demo world): forward gives logits [B, L, V]."""

    def __init__(self, vlm: nn.Module):
        super().__init__()
        self.vlm = vlm

    def prompt_tokens(self, input_ids: list[int], positions: list[int]) -> tuple[list[int], list[int]]:
        return input_ids, positions  # the VLM numbers its own positions in forward

    def forward(self, input_ids, attention_mask, vision_inputs=None, token_inputs=None):
        return self.vlm(input_ids=input_ids, attention_mask=attention_mask, **(vision_inputs or {}),
                        **(token_inputs or {})).logits


def build_model(config: TrainConfig, target: Target) -> nn.Module:
    if config.phase == "target":
        target.model.train().requires_grad_(True)
        return TargetModel(target.model)
    target.model.requires_grad_(False)
    if config.phase == "msd":
        if not config.drafter:
            return MsdDraftModel.new(target, config.head_layers, config.decoupled)
        kind, drafter_config = drafter_kind(config.drafter)
        if kind is not MsdDraftModel:
            raise ValueError(f"--phase msd starts from an MSD head or none, but {config.drafter} is {kind.kind}.")
        return MsdDraftModel.from_pretrained(Path(config.drafter), drafter_config, target)
    return build_draft_model(config, target)


def image_probability(config: TrainConfig, step: int) -> float:
    """The chance that a row is trained with its image at this step: text phase 0; msd's curriculum, text-only
    for the first half of the steps, then a linear ramp to 1; other phases 1."""
    if config.phase == "text":
        return 0.0
    if config.phase != "msd" or not config.curriculum:
        return 1.0
    half = config.steps / 2
    return max(0.0, (step - half) / half)


def build_draft_model(config: TrainConfig, target: Target) -> CausalLMDraftModel:
    """The phase's starting drafter, with what it trains set to require grad."""
    kind, drafter_config = drafter_kind(config.drafter)
    if config.phase == "distill" and kind is not MassvDraftModel:
        raise ValueError(f"--phase distill starts from a MASSV drafter (after adapt), but {config.drafter} is "
                         f"{kind.kind}.")
    start = kind.from_pretrained(Path(config.drafter), drafter_config, target.image_token_id, torch.float32)
    if config.phase == "text":
        return TextOnlyDraftModel(start.language_model, target.image_token_id)
    if config.phase == "adapt":
        start.language_model.requires_grad_(False)  # phase 1 trains the projector only
        projector = MassvProjector(target.text_config.hidden_size, start.hidden_size)
        return MassvDraftModel(start.language_model, projector, target.image_token_id)
    return start


def encode_batch(rows: list[dict], config: TrainConfig, target: Target, model: nn.Module, device,
                 with_images: float | None = None) -> dict:
    """Right-padded input ids, attention mask and labels (answer tokens + EOS only), plus the image inputs:
    raw vision inputs for the target phase, the target's image features for MASSV phases, none for text;
    for msd, the head's inputs and targets from the target's hidden states. A row keeps its image with
    probability with_images (by default the phase's at the end of training)."""
    with_images = image_probability(config, config.steps) if with_images is None else with_images
    sequences, labels, positions = [], [], []
    eos = min(target.eos_token_ids) if target.eos_token_ids else None
    images = []
    for row in rows:
        keep = row.get("image") and (with_images >= 1 or float(torch.rand(())) < with_images)
        images.append(Image.open(io.BytesIO(row["image"])) if keep else None)
    prompts = prepare_prompts(target.processor, [(row["prompt"], image) for row, image in zip(rows, images)],
                              target.context_length)
    failed = next((p for p in prompts if isinstance(p, Exception)), None)
    if failed is not None:  # a corpus row that cannot be prepared stops training, as one prepared alone did
        raise failed
    for row, prompt, target_positions in zip(rows, prompts, target.prompt_positions(prompts)):
        # what the drafter reads, where (text-only: no placeholders, numbered from 0); answers continue after
        prompt_ids, prompt_positions = model.prompt_tokens(prompt.input_ids, target_positions)
        answer_ids = target.tokenizer(row[config.answer_column], add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids + ([eos] if eos is not None else [])
        sequences.append(prompt_ids + answer_ids)
        labels.append([IGNORE] * len(prompt_ids) + answer_ids)
        positions.append(prompt_positions + [prompt_positions[-1] + 1 + j for j in range(len(answer_ids))])
    input_ids, lengths = right_pad(sequences, target.pad_token_id, device)
    attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "labels": right_pad(labels, IGNORE, device)[0]}
    vision = [p.vision_inputs for p in prompts if p.vision_inputs]
    vision = {k: torch.cat([v[k] for v in vision]).to(device) for k in vision[0]} if vision else {}
    if config.phase in ("target", "msd"):
        batch["vision_inputs"] = vision
        batch["token_inputs"] = {
            name: right_pad([p.token_inputs[name] + [0] * (len(s) - len(p.input_ids)) for p, s in
                             zip(prompts, sequences)], 0, device)[0]
            for name in prompts[0].token_inputs
        }
        if config.phase == "msd":
            batch = head_batch(batch, right_pad(positions, 0, device)[0], target, config.feature_noise)
    else:
        batch["position_ids"] = right_pad(positions, 0, device)[0]
        if config.phase != "text":
            batch["image_features"] = target.image_features(vision).float() if vision else None
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def head_batch(batch: dict, positions: torch.Tensor, target: Target, noise: float) -> dict:
    """An MSD head's training batch from the target's: pairs (h_t + noise, x_{t+1}) at the target's positions of
    x_{t+1}, the image embeddings the target consumed, and what the head predicts, h_{t+1} (answer positions)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    layers = target.model(input_ids=ids, attention_mask=mask, **batch["vision_inputs"], **batch["token_inputs"],
                          output_hidden_states=True).hidden_states
    hidden = layers[-1].float()  # [B, L, H]
    # what the target consumed at its image placeholders: its input embeddings there (no second vision pass)
    image_embeds = layers[0][ids == target.image_token_id].float() if batch["vision_inputs"] else None
    inputs = hidden[:, :-1]
    return {"hidden_states": inputs + noise * (torch.rand_like(inputs) - 0.5), "next_ids": ids[:, 1:],
            "attention_mask": mask[:, 1:], "position_ids": positions[:, 1:], "image_embeds": image_embeds,
            "next_features": hidden[:, 1:], "labels": batch["labels"][:, 1:]}


def feature_loss(predicted: torch.Tensor, next_features: torch.Tensor, labels: torch.Tensor, lm_head) -> torch.Tensor:
    """MSD's loss at answer positions: predicted [B, L, H] vs the target's next hidden states [B, L, H] (SmoothL1)
    + 0.1 x cross-entropy of the head's next-token distribution to the target's; labels [B, L] (IGNORE elsewhere)."""
    answer = labels != IGNORE
    predicted, true = predicted[answer], next_features[answer]  # [N, H]
    target_probs = F.softmax(lm_head(true).float(), dim=-1)
    soft_cross_entropy = -(target_probs * F.log_softmax(lm_head(predicted).float(), dim=-1)).sum(-1).mean()
    return F.smooth_l1_loss(predicted, true) + 0.1 * soft_cross_entropy


def training_loss(model: nn.Module, inner: nn.Module, inputs: dict) -> torch.Tensor:
    """The phase's loss for a batch from encode_batch (model: DDP-wrapped or not; inner: the model itself)."""
    labels = inputs.pop("labels")
    if "next_features" in inputs:
        next_features = inputs.pop("next_features")
        return feature_loss(model(**inputs), next_features, labels, inner.logits)
    return answer_loss(model(**inputs), labels)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over answer positions: logits [B, L, V], labels [B, L] (IGNORE elsewhere)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def train_loop(loop_config: dict) -> None:
    """Ray Train's per-worker loop."""
    import ray.train
    import ray.train.torch

    config = TrainConfig(**loop_config)
    context = ray.train.get_context()
    torch.manual_seed(config.seed + context.get_world_rank())
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    target = Target.load(config.target, device=device, dtype=torch.float32)
    model = build_model(config, target).to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr)
    step, losses, resumed_at = 0, [], []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step, losses, resumed_at = load_training_state(Path(directory), model, optimizer)
        resumed_at.append(step)
        print(f"[{config.phase}] resumed from the checkpoint at step {step}", flush=True)
    model = ray.train.torch.prepare_model(model) if context.get_world_size() > 1 else model
    inner = model.module if hasattr(model, "module") else model
    shard = ray.train.get_dataset_shard("train")
    started = time.perf_counter()
    while step < config.steps:
        for batch in shard.iter_batches(batch_size=config.batch_size, batch_format="pandas"):
            inputs = encode_batch(batch.to_dict("records"), config, target, inner, device,
                                  image_probability(config, step))
            loss = training_loss(model, inner, inputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            if step % config.log_every == 0 and context.get_world_rank() == 0:
                recent = sum(losses[-config.log_every :]) / config.log_every
                print(f"[{config.phase}] step {step}/{config.steps} loss {recent:.4f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
            if step % config.checkpoint_every == 0 or step == config.steps:
                report(config, inner, optimizer, (step, losses, resumed_at), context.get_world_rank())
            if step >= config.steps:
                break
    if context.get_world_rank() == 0:
        save_drafter(config, inner, target, {"losses": losses, "resumed_at": resumed_at})


def report(config: TrainConfig, model: nn.Module, optimizer, progress: tuple, rank: int) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    step, losses, _ = progress
    metrics = {"step": step, "loss": sum(losses[-config.log_every :]) / len(losses[-config.log_every :])}
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            save_training_state(Path(directory), model, optimizer, progress)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def save_training_state(directory: Path, model: nn.Module, optimizer, progress: tuple) -> None:
    """Trainable weights and AdamW moments as safetensors (no pickles); step, losses, resumptions as JSON."""
    step, losses, resumed_at = progress
    trainable = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, directory / "weights.safetensors")
    names = {id(p): name for name, p in model.named_parameters()}
    moments = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                moments[f"{names[id(p)]}::{key}"] = value.detach().contiguous().clone()
    save_file(moments, directory / "optimizer.safetensors")
    (directory / "progress.json").write_text(json.dumps({"step": step, "losses": losses, "resumed_at": resumed_at}))


def load_training_state(directory: Path, model: nn.Module, optimizer) -> tuple[int, list[float], list[int]]:
    """Restore exactly what save_training_state wrote: every trainable weight, no other (strict)."""
    weights = load_file(directory / "weights.safetensors")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        different = sorted(set(weights) ^ trainable)
        raise ValueError(f"checkpoint {directory} does not hold this phase's trainable weights "
                         f"({len(different)} differ, e.g. {different[0]}): resume with the phase that wrote it.")
    model.load_state_dict(weights, strict=False)  # frozen weights come from the starting checkpoint
    by_name = dict(model.named_parameters())
    for key, value in load_file(directory / "optimizer.safetensors").items():
        name, state_key = key.split("::")
        optimizer.state[by_name[name]][state_key] = value
    progress = json.loads((directory / "progress.json").read_text())
    return progress["step"], progress["losses"], progress["resumed_at"]


def save_drafter(config: TrainConfig, model: nn.Module, target: Target, history: dict) -> None:
    """The trained model in the caption job's format, written locally then copied when the output is remote."""
    with tempfile.TemporaryDirectory() as staging:
        local = Path(staging) if is_remote(config.output) else Path(config.output)
        if isinstance(model, TargetModel):
            model.vlm.save_pretrained(local)
            target.processor.save_pretrained(local)
        else:
            model.save_pretrained(local, target.tokenizer)
        (local / TRAINING_LOG).write_text(json.dumps({"config": asdict(config), **history}, indent=1))
        if is_remote(config.output):
            fs, path = url_to_fs(config.output)
            fs.put(str(local) + os.sep, path, recursive=True)


def with_answers(data, column: str):
    """The rows of a Ray dataset whose answer is present and not empty. A column expression, not a function of
    ours, so Ray's read workers need not import this module (seconds each); null answers compare to null and
    are dropped too."""
    from ray.data.expressions import col

    return data.filter(expr=col(column) != "")


def run_training(config: TrainConfig):
    """Start the Ray Train job (on the current cluster, or a local one) and wait for it; returns its Result."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    connect_ray()
    print(f"train drafter config:\n{json.dumps(asdict(config), indent=2)}", flush=True)
    # Rows without an answer (failed corpus rows) leave before the split: every rank then gets as many
    # batches per epoch and takes a step on each, so DDP's collectives and the epochs stay in step.
    data = with_answers(ray.data.read_parquet(config.data), config.answer_column)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=asdict(config),
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=config.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": data},
    )
    return trainer.fit()

