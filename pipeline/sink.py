"""The job's output: one Parquet row per input row (OUTPUT_SCHEMA), resume by id, and summary.json.

    <output>/parts/*.parquet   the rows: pd.read_parquet(f"{output}/parts")
    <output>/summary.json      totals, rates, throughput, the config

Counts in each row are the engine's per-sample SpecDecodeCounts; the summary
sums them over every part of the output, so it stays right across resumed
runs, actors and nodes, and computes rates only at the end.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.engine import GenerationResult
from pipeline.plots import acceptance_chart
from pipeline.storage import join, url_to_fs

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
SUMMARY_FILE = "summary.json"
ACCEPTANCE_PLOT = "acceptance.png"
PARTS_DIR = "parts"
_COUNT_COLUMNS = ["num_generated_tokens", "num_steps", "num_drafted", "num_accepted"]


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


def summarize(output: str, config_dict: dict, wall_time_s: float, run_parts: set[str]) -> dict:
    """Totals over every part of the output, plus this run's throughput (over the parts it wrote)."""
    fs, _ = url_to_fs(output)
    tables, run_rows, run_tokens = [], 0, 0
    for part in part_files(output):
        with fs.open(part, "rb") as f:
            table = pq.read_table(f, columns=["id", "error", "node_id", *_COUNT_COLUMNS, "drafted_per_position",
                                              "accepted_per_position"])
        tables.append(table)
        if part in run_parts:
            run_rows += table.num_rows
            run_tokens += int(pc.sum(table["num_generated_tokens"]).as_py() or 0)
    table = pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()
    sums = {c: int(pc.sum(table[c]).as_py() or 0) for c in _COUNT_COLUMNS}
    drafted = _sum_lists(table["drafted_per_position"])
    accepted = _sum_lists(table["accepted_per_position"])
    failed = table.filter(pc.is_valid(table["error"]))
    nodes = table.group_by("node_id").aggregate([("id", "count"), ("num_generated_tokens", "sum")])
    return {
        "output": output,
        "rows_out": table.num_rows,
        "rows_failed": failed.num_rows,
        "duplicate_ids": table.num_rows - len(pc.unique(table["id"])),
        "errors": _top_errors(failed),
        "generated_tokens": sums["num_generated_tokens"],
        "steps": sums["num_steps"],
        "drafted": sums["num_drafted"],
        "accepted": sums["num_accepted"],
        "mean_accepted_length": 1 + sums["num_accepted"] / sums["num_steps"] if sums["num_steps"] else 1.0,
        "acceptance_rate": sums["num_accepted"] / sums["num_drafted"] if sums["num_drafted"] else 0.0,
        "acceptance_per_position": [a / d if d else 0.0 for a, d in zip(accepted, drafted)],
        "this_run": {
            "rows": run_rows,
            "generated_tokens": run_tokens,
            "wall_time_s": wall_time_s,
            "rows_per_s": run_rows / wall_time_s if wall_time_s else 0.0,
            "tokens_per_s": run_tokens / wall_time_s if wall_time_s else 0.0,
        },
        "nodes": {
            str(n): {"rows": r, "generated_tokens": t}
            for n, r, t in zip(*(nodes[c].to_pylist() for c in ("node_id", "id_count", "num_generated_tokens_sum")))
        },
        "config": config_dict,
    }


def write_summary(output: str, summary: dict) -> str:
    """summary.json, and acceptance.png (per-position acceptance) when anything was drafted."""
    fs, path = url_to_fs(output)
    with fs.open(join(path, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    if summary["drafted"]:
        drafter = str(summary["config"]["drafter"]).rsplit("/", 1)[-1]
        title = (f"acceptance by draft position: tau {summary['mean_accepted_length']:.2f}, "
                 f"acceptance rate {summary['acceptance_rate']:.1%}, drafter {drafter}")
        with fs.open(join(path, ACCEPTANCE_PLOT), "wb") as f:
            f.write(acceptance_chart(summary["acceptance_per_position"], title))
    return join(output, SUMMARY_FILE)


def format_summary(summary: dict) -> str:
    """A table a person reads at the end of the job."""
    run = summary["this_run"]
    lines = [
        f"{'output':<26}{summary['output']}",
        f"{'rows written (this run)':<26}{summary['rows_out']} ({run['rows']})",
        f"{'rows failed':<26}{summary['rows_failed']}",
        f"{'generated tokens':<26}{summary['generated_tokens']}",
        f"{'wall time (this run)':<26}{run['wall_time_s']:.1f} s",
        f"{'throughput (this run)':<26}{run['rows_per_s']:.2f} rows/s, {run['tokens_per_s']:.1f} tokens/s",
        f"{'mean accepted length':<26}{summary['mean_accepted_length']:.2f}",
        f"{'acceptance rate':<26}{summary['acceptance_rate']:.1%}",
        f"{'acceptance by position':<26}"
        + (" ".join(f"{p:.2f}" for p in summary["acceptance_per_position"]) or "-"),
    ]
    for message, count in summary["errors"].items():
        lines.append(f"{'  error':<26}{count} x {message}")
    return "\n".join(lines)


def _sum_lists(column: pa.ChunkedArray) -> list[int]:
    """Element-wise sum of a list<int> column whose lists may differ in length."""
    total = np.zeros(0, dtype=np.int64)
    for chunk in column.chunks:
        offsets = chunk.offsets.to_numpy()
        if offsets[-1] == offsets[0]:
            continue
        parents = np.repeat(np.arange(len(chunk)), np.diff(offsets))
        positions = np.arange(offsets[0], offsets[-1]) - offsets[:-1][parents]
        values = chunk.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
        sums = np.bincount(positions, weights=values).astype(np.int64)
        total = np.pad(total, (0, max(0, len(sums) - len(total))))
        total[: len(sums)] += sums
    return total.tolist()


def _top_errors(failed: pa.Table, limit: int = 10) -> dict[str, int]:
    if failed.num_rows == 0:
        return {}
    counts = failed.group_by("error").aggregate([("id", "count")]).sort_by([("id_count", "descending")])
    return dict(zip(counts["error"].to_pylist()[:limit], counts["id_count"].to_pylist()[:limit]))
