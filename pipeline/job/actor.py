"""The GPU stage: a Ray Data actor that holds one target + drafter pair and runs the engine over large batches.

Each actor loads its models once (from the node's local copy when they live in
object storage). One decoding thread runs the engine; every block Ray Data hands
the actor queues its rows there and waits for their results. With continuous
batching (the default) several blocks are in flight on an actor at once, so rows
of the next block join the running batch as rows of the last one finish, instead
of the batch draining to its slowest row at the end of every block. Rows fail
alone (the engine isolates them); rows that failed upstream pass through with
their error.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future

import pyarrow as pa
import ray
import torch

from drafters import load_drafter
from pipeline.engine.acceptance import SamplingConfig
from pipeline.engine.engine import EngineConfig, SpecDecodeEngine
from pipeline.engine.target import Target
from pipeline.job.config import CaptionConfig
from pipeline.job.output import OUTPUT_SCHEMA, output_row
from pipeline.job.preprocess import decode_prepared
from pipeline.job.storage import localize

log = logging.getLogger(__name__)


def engine_config(config: CaptionConfig) -> EngineConfig:
    sampling = SamplingConfig(temperature=config.temperature, top_p=config.top_p, seed=config.seed)
    return EngineConfig(gamma=config.gamma, max_new_tokens=config.max_new_tokens, sampling=sampling)


class CaptionActor:
    def __init__(self, config: CaptionConfig):
        self.threads = max(1, int(config.cpus_per_actor))
        if not torch.cuda.is_available():
            torch.set_num_threads(self.threads)
        target_dir = localize(config.target, config.model_cache)
        self.target = Target.load(target_dir, trust_remote_code=config.trust_remote_code)
        drafter_dir = localize(config.drafter_name, config.model_cache) if config.drafter_name else None
        drafter = load_drafter(drafter_dir, self.target, trust_remote_code=config.trust_remote_code)
        self.engine = SpecDecodeEngine(self.target, drafter, engine_config(config))
        self.batch_size = config.batch_size
        self.run_columns = {
            "gamma": str(config.gamma),
            "target": config.target,
            "drafter": config.drafter_name,
            "node_id": ray.get_runtime_context().get_node_id(),
        }
        self.work = threading.Event()
        threading.Thread(target=self._decode, name="engine", daemon=True).start()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        pending = {i: self._submit(row) for i, row in enumerate(rows) if row["error"] is None}
        finished_at = {}  # set by the engine's thread as each row's result is (rows finish out of order)
        for i, future in pending.items():
            future.add_done_callback(lambda _, i=i: finished_at.__setitem__(i, time.time()))
        self.work.set()
        out = []
        for i, row in enumerate(rows):
            result, error = None, row["error"]
            if i in pending:
                try:
                    result = await asyncio.wrap_future(pending[i])
                except Exception as exc:
                    log.warning("generation failed for row %s: %s: %s", row["id"], type(exc).__name__, exc)
                    error = f"generation failed: {type(exc).__name__}: {exc}"
            out.append(output_row(row["id"], row["prompt"], result, error, self.run_columns, row["image"],
                                  finished_at.get(i)))
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def _submit(self, row: dict) -> Future:
        """The row's future result from the engine (one whose prepared prompt cannot be read fails at once)."""
        try:
            return self.engine.submit(decode_prepared(row["prepared"]))
        except Exception as exc:
            failed = Future()
            failed.set_exception(exc)
            return failed

    def _decode(self) -> None:
        """The engine's thread: decode whatever is queued, then wait for more."""
        if not torch.cuda.is_available():
            torch.set_num_threads(self.threads)  # per thread under OpenMP
        while True:
            self.work.wait()
            self.work.clear()  # a row queued from here on sets it again, so none is left waiting
            try:
                self.engine.run(self.batch_size)
            except Exception:  # a fault of the engine's own: its rows got the error; later rows start afresh
                log.exception("the engine failed; the rows it held carry the error")
