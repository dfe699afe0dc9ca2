"""The caption job's one typed config object: built from flags or in Python, logged at start, passed whole to actors."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from pipeline.engine.gamma import parse_gamma
from pipeline.job.cli import flag
from pipeline.job.storage import DEFAULT_MODEL_CACHE, absolute, absolute_checkpoint

FORMATS = ("auto", "parquet", "jsonl", "images", "webdataset")
DEFAULT_PROMPT = "Describe the image."


class JobConfigError(ValueError):
    """The job cannot start as configured; the message is one sentence saying what to fix."""


def require_at_least_one(flags: dict[str, int]) -> None:
    """Each flag's value is at least 1; else a JobConfigError naming the first that is not."""
    for name, value in flags.items():
        if value < 1:
            raise JobConfigError(f"{name} must be at least 1, got {value}.")


def parse_num_actors(value: str | int | tuple[int, int]) -> tuple[int, int]:
    """'4' -> (4, 4), a fixed pool; '1,8' -> (1, 8), an autoscaling pool."""
    if isinstance(value, tuple):
        low, high = value
    elif isinstance(value, int):
        low = high = value
    else:
        parts = str(value).split(",")
        try:
            low, high = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
        except ValueError:
            raise JobConfigError(f"--num-actors must be N or MIN,MAX, got {value!r}.") from None
        if len(parts) > 2:
            raise JobConfigError(f"--num-actors must be N or MIN,MAX, got {value!r}.")
    if not 1 <= low <= high:
        raise JobConfigError(f"--num-actors needs 1 <= MIN <= MAX, got {value!r}.")
    return low, high


@dataclass
class CaptionConfig:
    input: str = field(metadata=flag(
        "dataset: Parquet/JSONL file or directory, image folder, or WebDataset .tar shards;\n"
        "a local path or fsspec URL (s3://...)"))
    output: str = field(metadata=flag("directory for Parquet parts and summary.json (local or s3://)"))
    target: str = field(metadata=flag("target VLM checkpoint directory (local or s3://)"))
    drafter: str = field(default="none", metadata=flag("drafter directory (local or s3://), or 'none'"))
    gamma: int | str = field(default="auto", metadata=flag("draft length per step: an integer, or 'auto'"))
    temperature: float = field(default=0.0, metadata=flag("0 is greedy"))
    top_p: float = field(default=1.0, metadata=flag("nucleus sampling threshold"))
    max_new_tokens: int = field(default=128, metadata=flag("tokens per answer at most"))
    batch_size: int = field(default=32, metadata=flag("rows per engine batch on one actor"))
    continuous_batching: bool = field(default=True, metadata=flag(
        "keep each actor's batch full across the blocks Ray Data hands it (rows of the next\n"
        "block join as others finish); off: one static batch per block, drained to its\n"
        "slowest row"))
    num_actors: tuple[int, int] = field(default=(1, 1), metadata=flag(
        "engine actors: N, or MIN,MAX for an autoscaling pool", metavar="N|MIN,MAX"))
    gpus_per_actor: float | None = field(default=None, metadata=flag(
        "GPUs per engine actor (default 1 when the cluster has GPUs, else 0)"))
    cpus_per_actor: float = field(default=1.0, metadata=flag("CPUs per engine actor"))
    prompt: str = field(default=DEFAULT_PROMPT, metadata=flag("instruction for rows without a prompt column"))
    id_column: str | None = field(default=None, metadata=flag(
        "column with row ids (default 'id' when present, else ids derived from the source:\n"
        "<file>#<row>, the image path, <shard>/<key>)"))
    prompt_column: str | None = field(default=None, metadata=flag(
        "column with prompts (default 'prompt' when present, else --prompt)"))
    image_column: str | None = field(default=None, metadata=flag(
        "column with images: bytes, a path/URL (relative to the dataset), a data: URL,\n"
        "or {bytes, path} (default 'image' when present)"))
    format: str = field(default="auto", metadata=flag("input format (auto: from file names)", choices=FORMATS))
    resume: bool = field(default=False, metadata=flag("skip ids already in --output and add the rest"))
    max_image_pixels: int = field(default=64_000_000, metadata=flag(
        "images with more pixels are refused before they are decoded (the row gets an error)"))
    keep_images: bool = field(default=False, metadata=flag(
        "also write each row's image bytes (column image): a self-distillation corpus\n"
        "that jobs/train_drafter.py --phase distill reads as it is"))
    seed: int | None = field(default=None, metadata=flag("seed for sampling (temperature > 0)"))
    object_store_mb: int | None = field(default=None, metadata=flag(
        "object store of the local Ray the job starts when there is no cluster (default Ray's,\n"
        "30%% of RAM); a store sized to the job keeps the actors' resident memory flat"))
    model_cache: str = field(default=DEFAULT_MODEL_CACHE, metadata=flag("per-node copy of s3:// checkpoints"))
    trust_remote_code: bool = field(default=False, metadata=flag("allow checkpoints' own Python code"))

    def __post_init__(self):
        self.input, self.output = absolute(self.input), absolute(self.output)  # actors run elsewhere
        self.target, self.drafter = absolute_checkpoint(self.target), absolute_checkpoint(self.drafter)
        self.num_actors = parse_num_actors(self.num_actors)
        try:
            self.gamma = parse_gamma(self.gamma)
        except ValueError as exc:
            raise JobConfigError(f"--gamma must be a non-negative integer or 'auto': {exc}") from None
        checks = [
            (self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}."),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}."),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {self.max_new_tokens}."),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}."),
            (self.object_store_mb is None or self.object_store_mb >= 75,
             f"--object-store-mb must be at least 75 (Ray's smallest store), got {self.object_store_mb}."),
            (self.max_image_pixels >= 1, f"--max-image-pixels must be at least 1, got {self.max_image_pixels}."),
            (self.gpus_per_actor is None or self.gpus_per_actor >= 0, "--gpus-per-actor must be >= 0."),
            (self.cpus_per_actor > 0, f"--cpus-per-actor must be > 0, got {self.cpus_per_actor}."),
            (self.format in FORMATS, f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}."),
            (bool(self.prompt and self.prompt.strip()), "--prompt must not be empty."),
        ]
        for ok, message in checks:
            if not ok:
                raise JobConfigError(message)

    @property
    def drafter_name(self) -> str | None:
        return None if str(self.drafter).lower() == "none" else self.drafter

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)
