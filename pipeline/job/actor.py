"""The GPU stage: a Ray Data actor that holds one target + drafter pair and runs the engine over large batches.

Each actor loads its models once (from the node's local copy when they live in
object storage). Rows that failed upstream pass through with their error; a
batch the engine cannot run is retried row by row, so one poisonous row gets
its own error instead of failing its neighbours.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import ray
import torch

from drafters import load_drafter
from pipeline.engine.acceptance import SamplingConfig
from pipeline.job.config import CaptionConfig
from pipeline.engine.engine import EngineConfig, GenerationResult, SpecDecodeEngine
from pipeline.job.preprocess import decode_prepared
from pipeline.job.output import OUTPUT_SCHEMA, output_row
from pipeline.job.storage import localize
from pipeline.engine.target import Target

log = logging.getLogger(__name__)


def engine_config(config: CaptionConfig) -> EngineConfig:
    sampling = SamplingConfig(temperature=config.temperature, top_p=config.top_p, seed=config.seed)
    return EngineConfig(gamma=config.gamma, max_new_tokens=config.max_new_tokens, sampling=sampling)


class CaptionActor:
    def __init__(self, config: CaptionConfig):
        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, int(config.cpus_per_actor)))
        target_dir = localize(config.target, config.model_cache)
        self.target = Target.load(target_dir, trust_remote_code=config.trust_remote_code)
        drafter_dir = localize(config.drafter_name, config.model_cache) if config.drafter_name else None
        drafter = load_drafter(drafter_dir, self.target, trust_remote_code=config.trust_remote_code)
        self.engine = SpecDecodeEngine(self.target, drafter, engine_config(config))
        self.run_columns = {
            "gamma": str(config.gamma),
            "target": config.target,
            "drafter": config.drafter_name,
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        ready = [i for i, row in enumerate(rows) if row["error"] is None]
        results: dict[int, GenerationResult | str] = dict(zip(ready, self._generate([rows[i] for i in ready])))
        out = []
        for i, row in enumerate(rows):
            result = results.get(i)
            error = result if isinstance(result, str) else row["error"]
            result = None if isinstance(result, str) else result
            out.append(output_row(row["id"], row["prompt"], result, error, self.run_columns, row["image"]))
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def _generate(self, rows: list[dict]) -> list[GenerationResult | str]:
        """Results in row order; a row the engine fails on gets its error message instead."""
        if not rows:
            return []
        try:
            return self.engine.generate([decode_prepared(row["prepared"]) for row in rows])
        except Exception as exc:
            if len(rows) == 1:
                log.exception("generation failed for row %s", rows[0]["id"])
                return [f"generation failed: {type(exc).__name__}: {exc}"]
            log.warning("batch of %d failed (%s); retrying its rows one at a time", len(rows), exc)
            return [result for row in rows for result in self._generate([row])]
