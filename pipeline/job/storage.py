"""Paths and object storage: fsspec URLs (local or s3:// through s3fs), model checkpoints copied once per node.

A checkpoint is a local directory, an fsspec URL, or a Hugging Face repo id (`org/name`, when no
such local path exists), which is resolved exactly as `from_pretrained` resolves it: from the
local HF cache, downloading only when the Hub is reachable and HF_HUB_OFFLINE is not set.

s3fs reads the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION, AWS_ENDPOINT_URL, profiles, instance roles). Credentials are never
logged: only URLs are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import uuid
from pathlib import Path

import fsspec
from filelock import FileLock

DEFAULT_MODEL_CACHE = "~/.cache/vlm-specdec/models"
WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_COMPLETE = ".complete"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_remote(url: str) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def absolute_checkpoint(url: str) -> str:
    """A checkpoint's location for every node: Hub repo ids as they are, anything else as `absolute` makes it."""
    return url if is_hub_id(url) else absolute(url)


def is_hub_id(url: str) -> bool:
    """`org/name` with no such local path: a Hugging Face repo id."""
    return bool(_HUB_ID.match(str(url))) and not os.path.exists(str(url))


def hub_snapshot(repo_id: str, weights: bool = True) -> str:
    """The local snapshot directory of a Hub repo, as from_pretrained finds it (the HF cache first).

    weights=False fetches configs, tokenizers and processors only when something must be downloaded;
    a snapshot already in the cache is returned whole either way."""
    from huggingface_hub import snapshot_download

    ignore = None if weights else [f"*{suffix}" for suffix in WEIGHT_SUFFIXES + PICKLE_SUFFIXES]
    return snapshot_download(repo_id, ignore_patterns=ignore)


def absolute(url: str) -> str:
    """URLs as they are, local paths made absolute (Ray workers may run in another directory)."""
    if not url or is_remote(url) or str(url).lower() == "none":
        return url
    return os.path.abspath(str(url).removeprefix("file://"))


def url_to_fs(url: str):
    """(filesystem, path within it) for a local path or any fsspec URL."""
    return fsspec.core.url_to_fs(str(url))


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URL, keeping its protocol."""
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def resolve(reference: str, base: str) -> str:
    """An image reference from a table: absolute paths and URLs as they are, relative ones against `base`."""
    if "://" in reference or reference.startswith("/"):
        return reference
    return join(base, reference)


def check_writable(url: str) -> None:
    """Create the output location and prove it takes a file; raises OSError with the reason."""
    fs, path = url_to_fs(url)
    fs.makedirs(path, exist_ok=True)
    probe = join(path, f".write-probe-{uuid.uuid4().hex}")
    with fs.open(probe, "wb") as f:
        f.write(b"ok")
    fs.rm(probe)


def model_files(url: str) -> list[str]:
    """Every file of a checkpoint directory, relative to it."""
    fs, path = url_to_fs(url)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{url} is not a directory")
    root = path.rstrip("/") + "/"
    return sorted(p[len(root) :] for p in fs.find(path) if p.startswith(root))


def safetensors_header(url: str) -> dict:
    """The JSON header of a .safetensors file, read without its tensor data (a cheap integrity check)."""
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100_000_000:
            raise ValueError(f"{url} has an implausible safetensors header length {length}")
        return json.loads(f.read(length))


def localize(url: str, cache_dir: str = DEFAULT_MODEL_CACHE, weights: bool = True) -> str:
    """A local directory holding the checkpoint at `url`, copied at most once per node.

    Local paths are returned as they are, Hub repo ids as their snapshot in the HF cache (each node
    resolves its own, as from_pretrained does). Remote ones are copied into `cache_dir`
    under a lock, into a temporary directory renamed when complete, so concurrent
    actors on one node share a single copy and a crash never leaves a partial one.
    weights=False copies only configs, tokenizer and processor files (for the driver's checks).
    """
    if is_hub_id(url):
        return hub_snapshot(str(url), weights)
    if not is_remote(url):
        return str(url).removeprefix("file://")
    fs, path = url_to_fs(url)
    name = path.rstrip("/").rsplit("/", 1)[-1]
    kind = "full" if weights else "light"
    digest = hashlib.sha256(f"{url}|{kind}".encode()).hexdigest()[:16]
    cache = Path(os.path.expanduser(cache_dir))
    cache.mkdir(parents=True, exist_ok=True)
    local = cache / f"{name}-{digest}"
    with FileLock(str(local) + ".lock"):
        if (local / _COMPLETE).exists():
            return str(local)
        staging = cache / f".{name}-{digest}-{uuid.uuid4().hex}"
        root = path.rstrip("/") + "/"
        for relative in model_files(url):
            if not weights and relative.endswith(WEIGHT_SUFFIXES + PICKLE_SUFFIXES):
                continue
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(root + relative, str(destination))
        (staging / _COMPLETE).write_text(url)
        shutil.rmtree(local, ignore_errors=True)
        staging.rename(local)
    return str(local)
