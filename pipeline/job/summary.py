"""The job's summary: <output>/summary.json (totals, rates, throughput, the config), acceptance.png, a console table.

Totals are SpecDecodeCounts summed over every part of the output (so they stay right
across resumed runs, actors and nodes); rates come from those summed counts, computed
once, in stats.py.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.engine.stats import SpecDecodeCounts
from pipeline.job.charts import acceptance_chart
from pipeline.job.output import OUTPUT_SCHEMA, part_files, unreadable_files
from pipeline.job.storage import join, url_to_fs

SUMMARY_FILE = "summary.json"
ACCEPTANCE_PLOT = "acceptance.png"
_COUNT_COLUMNS = ["num_generated_tokens", "num_steps", "num_drafted", "num_accepted"]
# A rate after the first row means something once the rows outnumber the engines' first batches several times over:
# rows that all fit in them finish in one burst (128 demo rows in batches of 64: 1369 rows/s "after the first").
RATE_BATCHES = 4


def part_counts(table: pa.Table) -> SpecDecodeCounts:
    """The SpecDecodeCounts of a table of output rows, summed (failed rows count nothing)."""
    sums = {c: int(pc.sum(table[c]).as_py() or 0) for c in _COUNT_COLUMNS}
    return SpecDecodeCounts(
        num_sequences=int(pc.sum(pc.is_null(table["error"])).as_py() or 0),
        num_generated_tokens=sums["num_generated_tokens"],
        num_steps=sums["num_steps"],
        num_drafted=sums["num_drafted"],
        num_accepted=sums["num_accepted"],
        drafted_per_position=_sum_lists(table["drafted_per_position"]),
        accepted_per_position=_sum_lists(table["accepted_per_position"]),
    )


def summarize(output: str, config_dict: dict, wall_time_s: float, run_parts: set[str],
              started_at: float | None = None) -> dict:
    """Totals over every part of the output, plus this run's throughput (over the parts it wrote) and, given when
    the run started (Unix seconds), its start-up apart from its decoding (see decoding_phase)."""
    fs, _ = url_to_fs(output)
    tables, total, this_run = [], SpecDecodeCounts(), SpecDecodeCounts()
    run_rows, finished = 0, []
    for part in part_files(output):
        ours = part in run_parts  # (earlier runs' parts may predate the finished_at column)
        with fs.open(part, "rb") as f:
            table = pq.read_table(f, columns=["id", "error", "node_id", *_COUNT_COLUMNS, "drafted_per_position",
                                              "accepted_per_position", *(["finished_at"] if ours else [])])
        if ours:
            finished.append(table["finished_at"])
            table = table.drop_columns(["finished_at"])
        tables.append(table)
        counts = part_counts(table)
        total.observe(counts)
        if ours:
            run_rows += table.num_rows
            this_run.observe(counts)
    table = pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()
    failed = table.filter(pc.is_valid(table["error"]))
    nodes = table.group_by("node_id").aggregate([("id", "count"), ("num_generated_tokens", "sum")])
    return {
        "output": output,
        "rows_out": table.num_rows,
        "rows_failed": failed.num_rows,
        "duplicate_ids": table.num_rows - len(pc.unique(table["id"])),
        "errors": _top_errors(failed),
        "unreadable_files": unreadable_files(output),  # input files this run could not read: their rows are missing
        "generated_tokens": total.num_generated_tokens,
        "steps": total.num_steps,
        "drafted": total.num_drafted,
        "accepted": total.num_accepted,
        "mean_accepted_length": total.mean_accepted_length,
        "acceptance_rate": total.acceptance_rate,
        "acceptance_per_position": total.acceptance_per_position,
        "this_run": {
            "rows": run_rows,
            "generated_tokens": this_run.num_generated_tokens,
            "wall_time_s": wall_time_s,
            "rows_per_s": run_rows / wall_time_s if wall_time_s else 0.0,
            "tokens_per_s": this_run.num_generated_tokens / wall_time_s if wall_time_s else 0.0,
            # rows in one engine batch on every actor at once (the most actors the job may run)
            **decoding_phase(finished, started_at, config_dict["batch_size"] * max(config_dict["num_actors"])),
        },
        "nodes": {
            str(n): {"rows": r, "generated_tokens": t}
            for n, r, t in zip(*(nodes[c].to_pylist() for c in ("node_id", "id_count", "num_generated_tokens_sum")))
        },
        "config": config_dict,
    }


def decoding_phase(finished: list[pa.ChunkedArray], started_at: float | None, batch_rows: int) -> dict:
    """When this run's first row finished, in seconds after the run started (its start-up: Ray Data's, the actors'
    model loads, the first rows' preparation and decoding), and, where it finished RATE_BATCHES times the rows of
    one batch on every actor (batch_rows) or more, its rows per second from then to its last row: what a longer
    run's rate tends to. Empty without a start time or a finished row."""
    times = pc.drop_null(pa.chunked_array(finished, pa.float64())).to_numpy() if finished else np.zeros(0)
    if started_at is None or not len(times):
        return {}
    phase = {"first_row_s": float(times.min() - started_at)}
    if len(times) >= RATE_BATCHES * batch_rows and times.max() > times.min():
        phase["rows_per_s_after_first_row"] = float((len(times) - 1) / (times.max() - times.min()))
    return phase


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
        *([f"{'first row finished after':<26}{run['first_row_s']:.1f} s"
           + (f"; {run['rows_per_s_after_first_row']:.2f} rows/s after it" if "rows_per_s_after_first_row" in run
              else "")] if "first_row_s" in run else []),
        f"{'mean accepted length':<26}{summary['mean_accepted_length']:.2f}",
        f"{'acceptance rate':<26}{summary['acceptance_rate']:.1%}",
        f"{'acceptance by position':<26}"
        + (" ".join(f"{p:.2f}" for p in summary["acceptance_per_position"]) or "-"),
    ]
    for message, count in summary["errors"].items():
        lines.append(f"{'  error':<26}{count} x {message}")
    for record in summary["unreadable_files"]:
        lines.append(f"{'unreadable input file':<26}{record['file']}: {record['error']}")
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
