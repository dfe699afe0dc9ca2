"""The caption/VQA job on Ray Data: read -> prepare (CPU tasks) -> engine (actor pool) -> Parquet + summary.json.

    source files --read tasks--> rows {id, prompt, image|image_url, error}
      --CPU tasks: fetch, decode, chat template, tokenise--> rows {id, prompt, prepared, error}
      --actor pool (one target + drafter per actor, num_gpus each)--> OUTPUT_SCHEMA rows
      --write_parquet--> <output>/parts/*.parquet, then <output>/summary.json

An input file that cannot be read is skipped and listed in the summary (`unreadable_files`), and the
job counts as incomplete; every other file's rows are written. Everything that can be wrong with the
job is checked first (preflight.py), so a bad configuration fails in seconds with one sentence, before
any cluster work. `caption(dataset, config)` runs the same stages on a Dataset of the caller's rows.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipeline.engine.families import context_length
from pipeline.job.actor import CaptionActor
from pipeline.job.config import CaptionConfig
from pipeline.job.output import forget_unreadable, part_files, parts_dir
from pipeline.job.preflight import JobPlan, check_models, plan_resources, preflight
from pipeline.job.preprocess import prepare_batch
from pipeline.job.ray_cluster import connect as connect_ray
from pipeline.job.sources import SourcePlan, read_task, source_rows, split_reads
from pipeline.job.storage import url_to_fs
from pipeline.job.summary import format_summary, summarize, write_summary

# Writing a part is brief I/O; its tasks ask for no CPU. Ray Data reserves each stage at least one task's
# resources, upstream stages first, so with the read and prepare stages holding the CPUs a write asking for any
# CPU got no budget: finished rows queued in the object store until the end of the job (measured on 2 CPUs:
# none of 30,336 finished rows written after 130 s). Asking for none, their number is capped instead (one per
# engine actor): uncapped, Ray started a new worker process for each write running beside another, and their
# start-up took the CPU from the engine (2048 demo rows on 2 CPUs: 20.3 s, 16.3 s with one write at a time).
WRITE_CPUS = 0

# Continuous batching: each block Ray Data hands an actor holds up to BLOCK_ROWS rows (at most four engine
# batches, at least one; with static batches a block is one batch). A block costs the actor Ray Data's handling and
# the job a write task and a part file: on 8192 demo rows (2 CPUs, batch 32), blocks of 32 rows ran the job at
# 158-166 rows/s, of 128 at 184-188, of 256 at 194, while a larger first block arrives later and memory holds more
# rows (a real image's prepared row is MBs). The engine prefills waiting rows a batch's worth at a time, ahead of
# the places they take as rows finish; the rows waiting behind the running batch must last until Ray Data hands the
# actor its next block after one completes (a block completes with its slowest row). Three blocks of 32 did not: on
# 2048 demo rows the engine ran dry 15 times (about 0.15 s of work per block on CPU); eight never did.
BLOCK_ROWS = 128
BATCHES_PER_BLOCK = 4
MIN_BLOCKS_IN_FLIGHT = 3
MIN_ROWS_IN_FLIGHT = 256

# Ray Data shapes a map task's output into blocks of up to the dataset's target_max_block_size (128 MB by default),
# and a read task reads a file's rows and prepares them in one fused task: at the default, no prepared row of a file
# reached an engine actor before 128 MB of them (or the whole file) had been prepared (2048 demo rows in one file,
# 26 MB: the actor idled 2.2 s, waiting for the read task to finish). The job's blocks hold about one actor block's
# rows instead (from the size of a probe row prepared at preflight), at least MIN_BLOCK_BYTES (a block is a Ray
# object: tiny ones cost more to hand on than to carry) and at most Ray's default.
MIN_BLOCK_BYTES = 1 << 20


def actor_blocks(config: CaptionConfig) -> tuple[int, int]:
    """(rows per block handed to an engine actor, blocks in flight per actor)."""
    if not config.continuous_batching:
        return config.batch_size, 1  # one static batch per block
    rows = max(config.batch_size, min(BATCHES_PER_BLOCK * config.batch_size, BLOCK_ROWS))
    return rows, max(MIN_BLOCKS_IN_FLIGHT, -(-MIN_ROWS_IN_FLIGHT // rows))


def block_bytes(config: CaptionConfig, prepared_row_bytes: int | None, ray_default: int | None) -> int | None:
    """The job's target_max_block_size: about one actor block of prepared rows (see MIN_BLOCK_BYTES)."""
    if not prepared_row_bytes or ray_default is None:
        return ray_default
    return min(max(actor_blocks(config)[0] * prepared_row_bytes, MIN_BLOCK_BYTES), ray_default)


def run_caption(config: CaptionConfig) -> dict:
    """Run the job to completion on the current Ray cluster (a local one when none is running); returns the summary."""
    print(f"caption job config:\n{config.to_json()}", flush=True)
    start, started_at = time.perf_counter(), time.time()
    plan = preflight(config)
    if plan.skip_ids:
        print(f"resuming: {len(plan.skip_ids)} rows already in {config.output} are skipped", flush=True)
    connect_ray(config.object_store_mb)
    forget_unreadable(config.output)
    parts_before = set(part_files(config.output))
    fs, parts_path = url_to_fs(parts_dir(config.output))  # written through fsspec, as everything else is
    build_dataset(config, plan).write_parquet(parts_path, filesystem=PyFileSystem(FSSpecHandler(fs)),
                                              ray_remote_args={"num_cpus": WRITE_CPUS},
                                              concurrency=config.num_actors[1])
    run_parts = set(part_files(config.output)) - parts_before
    summary = summarize(config.output, config.to_dict(), time.perf_counter() - start, run_parts, started_at)
    summary["rows_skipped_by_resume"] = len(plan.skip_ids)
    summary["rows_in"] = summary["this_run"]["rows"] + len(plan.skip_ids)  # every row read is written once
    where = write_summary(config.output, summary)
    print(format_summary(summary), flush=True)
    print(f"summary: {where}", flush=True)
    return summary


def build_dataset(config: CaptionConfig, plan: JobPlan) -> ray.data.Dataset:
    # A large Parquet or JSONL file split into several reads prepares in parallel where two CPU tasks can run at once;
    # where one can (a 2-CPU machine with one engine actor), splitting only adds tasks: the job on 8192 demo rows in
    # one file of 512-row groups, four runs each in turn, took 41.3 s split into 4 reads against 39.7 s whole.
    spare = ray.cluster_resources().get("CPU", 0) - config.num_actors[1] * config.cpus_per_actor
    reads = split_reads(plan.source) if spare >= 2 else plan.source.reads
    files = ray.data.from_items([{"read": asdict(r)} for r in reads], override_num_blocks=min(len(reads), 1000))
    # the job's own datasets only: from_items copied the driver's DataContext
    files.context.target_max_block_size = block_bytes(config, plan.prepared_row_bytes,
                                                      files.context.target_max_block_size)
    rows = files.map_batches(
        read_task, batch_size=1, batch_format="pyarrow",
        # the finished ids go to the object store once; each read task maps them, zero-copy
        fn_kwargs={"plan": plan.source, "skip": ray.put(plan.skip_ids), "output": config.output},
    )
    return _engine_stages(rows, config, plan.processor, plan.context_length)


def caption(dataset: ray.data.Dataset, config: CaptionConfig) -> ray.data.Dataset:
    """The caption job's stages on a Dataset of your own: rows in, a Dataset of OUTPUT_SCHEMA rows out.

    Compose it into your own Ray Data pipeline as you would a `ray.data.llm` processor; it is lazy, so
    nothing runs until you write, iterate or materialize the result. Input columns are the job's: ids in
    config.id_column ("id" by default; a row without one gets an id derived from its prompt and image),
    prompts in config.prompt_column ("prompt"; config.prompt where a row has none), images in
    config.image_column ("image": bytes, a path or URL, a data: URL, or {bytes, path}; relative paths
    resolve against config.input). config.output is not used: the caller decides where rows go. The
    models are checked first, as the job checks them (JobConfigError, one sentence); every row, whatever
    is wrong with it, comes out once, with its error. Ray Data hands rows on in blocks of up to your Dataset's
    context.target_max_block_size (128 MB by default), so where prepared rows are small, lower it before the
    engine waits for 128 MB of them: the job sets its own to `block_bytes` (about one actor block of rows).
    """
    processor, text_config = check_models(config)
    plan = SourcePlan("rows", config.input, [], config.id_column or "id", config.prompt_column or "prompt",
                      config.image_column or "image", config.prompt)
    rows = dataset.map_batches(source_rows, batch_format="pyarrow", fn_kwargs={"plan": plan})
    return _engine_stages(rows, config, processor, context_length(text_config))


def _engine_stages(rows: ray.data.Dataset, config: CaptionConfig, processor, context: int | None) -> ray.data.Dataset:
    """SOURCE_SCHEMA rows -> prepared on CPU tasks -> the engine actors -> OUTPUT_SCHEMA rows."""
    gpus = plan_resources(config, ray.cluster_resources())
    low, high = config.num_actors
    block_rows, blocks = actor_blocks(config)
    # Streaming repartitions cut prepare calls of one engine batch and the actors' blocks, so work spreads over
    # every task and actor even from a single input file, and keep Ray Data from fusing the CPU stage into the
    # engine actors.
    return (
        rows.repartition(target_num_rows_per_block=config.batch_size)
        .map_batches(
            prepare_batch,
            batch_size=None,
            batch_format="pyarrow",
            fn_kwargs={"processor": processor, "context_length": context,
                       "keep_images": config.keep_images, "max_image_pixels": config.max_image_pixels},
        )
        .repartition(target_num_rows_per_block=block_rows)
        .map_batches(
            CaptionActor,
            fn_constructor_kwargs={"config": config},
            batch_size=block_rows,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=blocks),
            max_concurrency=blocks,  # blocks an actor takes at once; its one engine thread decodes their rows
            num_gpus=gpus,
            num_cpus=config.cpus_per_actor,
        )
    )
