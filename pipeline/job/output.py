"""The job's output rows: one Parquet row per input row (OUTPUT_SCHEMA), and resume by id.

    <output>/parts/*.parquet   the rows: pd.read_parquet(f"{output}/parts")

Counts in each row are the engine's per-sample SpecDecodeCounts. `existing_ids`
is what --resume skips; a part that cannot be read was torn by a kill while it
was written, and is removed so its rows are redone (summary.py reads the rest).
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.engine.engine import GenerationResult
from pipeline.job.storage import join, url_to_fs

log = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("text", pa.string()),  # null when error is set
        ("num_generated_tokens", pa.int64()),
        ("num_steps", pa.int64()),  # target verification forwards after the prefill
        ("num_drafted", pa.int64()),
        ("num_accepted", pa.int64()),
        ("mean_accepted_length", pa.float64()),  # tau = 1 + accepted / steps
        ("acceptance_rate", pa.float64()),  # accepted / drafted
        ("drafted_per_position", pa.list_(pa.int64())),
        ("accepted_per_position", pa.list_(pa.int64())),
        ("gamma", pa.string()),  # the configured draft length: an integer or "auto"
        ("finish_reason", pa.string()),  # "stop" (EOS) or "length"
        ("latency_s", pa.float64()),  # from the start of the row's engine batch to its last token
        ("target", pa.string()),
        ("drafter", pa.string()),  # null without a drafter
        ("node_id", pa.string()),  # the Ray node whose actor decoded the row
        ("image", pa.binary()),  # the input image's bytes with --keep-images (a distillation corpus), else null
        ("error", pa.string()),  # null when the row succeeded
    ]
)
PARTS_DIR = "parts"


def output_row(row_id: str, prompt: str | None, result: GenerationResult | None, error: str | None,
               run: dict, image: bytes | None = None) -> dict:
    """One OUTPUT_SCHEMA row; `run` holds the per-job columns (gamma, target, drafter, node_id)."""
    row = {name: None for name in OUTPUT_SCHEMA.names}
    row.update(run, id=row_id, prompt=prompt, error=error, image=image)
    if result is not None:
        counts = result.counts
        row.update(
            text=result.text,
            num_generated_tokens=counts.num_generated_tokens,
            num_steps=counts.num_steps,
            num_drafted=counts.num_drafted,
            num_accepted=counts.num_accepted,
            mean_accepted_length=counts.mean_accepted_length,
            acceptance_rate=counts.acceptance_rate,
            drafted_per_position=counts.drafted_per_position,
            accepted_per_position=counts.accepted_per_position,
            finish_reason=result.finish_reason,
            latency_s=counts.latency_s,
        )
    return row


def parts_dir(output: str) -> str:
    return join(output, PARTS_DIR)


def part_files(output: str) -> list[str]:
    fs, path = url_to_fs(parts_dir(output))
    fs.invalidate_cache()  # object stores list through a cache; other processes wrote these parts
    if not fs.exists(path):
        return []
    return sorted(p for p in fs.find(path) if p.endswith(".parquet") and "/." not in p[len(path) :])


def existing_ids(output: str) -> tuple[frozenset[str], list[str]]:
    """(ids already written, parts that cannot be read: left by a run killed while writing them)."""
    fs, _ = url_to_fs(output)
    ids, incomplete = set(), []
    for part in part_files(output):
        try:
            with fs.open(part, "rb") as f:
                ids.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
        except Exception:
            incomplete.append(part)
    return frozenset(ids), incomplete


def remove_parts(output: str, parts: list[str]) -> None:
    fs, _ = url_to_fs(output)
    for part in parts:
        log.warning("removing %s, an incomplete part left by an interrupted run; its rows will be redone", part)
        fs.rm(part)
