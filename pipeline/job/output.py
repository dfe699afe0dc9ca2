"""The job's output rows: one Parquet row per input row (OUTPUT_SCHEMA), and resume by id.

    <output>/parts/*.parquet        the rows: pd.read_parquet(f"{output}/parts")
    <output>/_unreadable/*.json     input files a read task could not read (this run's), for the summary

Counts in each row are the engine's per-sample SpecDecodeCounts. `existing_ids`
is what --resume skips; a part that cannot be read was torn by a kill while it
was written, and is removed so its rows are redone (summary.py reads the rest).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.job.resume import FinishedIds
from pipeline.job.storage import join, url_to_fs

if TYPE_CHECKING:
    from pipeline.engine.engine import GenerationResult

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
        ("finished_at", pa.float64()),  # when the engine finished the row (Unix seconds; null where it did not)
        ("target", pa.string()),
        ("drafter", pa.string()),  # null without a drafter
        ("node_id", pa.string()),  # the Ray node whose actor decoded the row
        ("image", pa.binary()),  # the input image's bytes with --keep-images (a distillation corpus), else null
        ("error", pa.string()),  # null when the row succeeded
    ]
)
PARTS_DIR = "parts"
UNREADABLE_DIR = "_unreadable"


def output_row(row_id: str, prompt: str | None, result: GenerationResult | None, error: str | None,
               run: dict, image: bytes | None = None, finished_at: float | None = None) -> dict:
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
            finished_at=finished_at,
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


def existing_ids(output: str) -> tuple[FinishedIds, list[str]]:
    """(ids already written, parts that cannot be read: left by a run killed while writing them).

    Read one part's id column at a time into 16-byte digests, so 10^7 ids stay in a few hundred MB."""
    fs, _ = url_to_fs(output)
    incomplete = []

    def id_columns():
        for part in part_files(output):
            try:
                with fs.open(part, "rb") as f:
                    ids = pq.read_table(f, columns=["id"]).column("id").to_pylist()
            except Exception:  # a torn part has no footer
                incomplete.append(part)
                continue
            yield ids

    finished = FinishedIds.of(id_columns())  # consumes every part before `incomplete` is returned
    return finished, incomplete


def remove_parts(output: str, parts: list[str]) -> None:
    fs, _ = url_to_fs(output)
    for part in parts:
        log.warning("removing %s, an incomplete part left by an interrupted run; its rows will be redone", part)
        fs.rm(part)


def row_error(exc: BaseException) -> str:
    """An unexpected exception as a row's error: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def record_unreadable(output: str, url: str, exc: BaseException, rows_read: int) -> None:
    """Note an input file a read task could not (fully) read; the summary lists it and the job is incomplete."""
    fs, path = url_to_fs(join(output, UNREADABLE_DIR))
    fs.makedirs(path, exist_ok=True)
    record = {"file": url, "error": row_error(exc), "rows_read_before_the_error": rows_read}
    with fs.open(join(path, hashlib.sha256(url.encode()).hexdigest()[:16] + ".json"), "w") as f:
        json.dump(record, f)


def unreadable_files(output: str) -> list[dict]:
    """This run's records of input files that could not be read, by file name."""
    fs, path = url_to_fs(join(output, UNREADABLE_DIR))
    fs.invalidate_cache()
    if not fs.exists(path):
        return []
    records = []
    for name in fs.find(path):
        with fs.open(name, "r") as f:
            records.append(json.load(f))
    return sorted(records, key=lambda r: r["file"])


def forget_unreadable(output: str) -> None:
    """A new run reads every file again: the last run's records go."""
    fs, path = url_to_fs(join(output, UNREADABLE_DIR))
    if fs.exists(path):
        fs.rm(path, recursive=True)
