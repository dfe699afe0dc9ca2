"""The embedded demo of the caption job: the committed demo world (demo_world/, built by jobs/build_demo_world.py).

A small LLaVA trained on synthetic scenes, its MASSV drafter (phase 1+2), and
held-out scene instructions. The demo captions them without and with the drafter
and compares the two runs: same answers, fewer target steps.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.job.config import CaptionConfig

DEMO_WORLD = Path(__file__).resolve().parents[2] / "demo_world"
DEMO_OUT = Path("out/demo")
WARM_UP_ROWS = 16  # a first short run, so neither compared run pays Ray's cold start
BENCH_PROMPTS = "bench/held_out_captions.parquet"  # under a world: held-out caption prompts for jobs/bench.py


def demo_configs(output_root: Path = DEMO_OUT, rows: int | None = None, max_new_tokens: int = 48,
                 gamma: int | str = "auto") -> dict[str, CaptionConfig]:
    """Caption-job configs "plain" (no drafter) and "speculative" (MASSV) over the demo's held-out prompts.

    rows: repeat the prompts (with new ids) to this many rows, for timing on more work.
    """
    prompts = DEMO_WORLD / "prompts"
    if rows is not None:
        table = pq.read_table(prompts)
        repeated = pa.concat_tables([table] * (rows // table.num_rows + 1)).slice(0, rows)
        ids = pa.array([f"{i:06d}-{row_id}" for i, row_id in enumerate(repeated["id"].to_pylist())])
        prompts = output_root / "prompts"
        shutil.rmtree(prompts, ignore_errors=True)
        prompts.mkdir(parents=True)
        pq.write_table(repeated.set_column(repeated.schema.get_field_index("id"), "id", ids), prompts / "rows.parquet")
    configs = {}
    for name, drafter in (("plain", "none"), ("speculative", str(DEMO_WORLD / "massv"))):
        output = output_root / f"captions-{name}"
        shutil.rmtree(output, ignore_errors=True)  # the demo's own output: a fresh run each time
        configs[name] = CaptionConfig(input=str(prompts), output=str(output), target=str(DEMO_WORLD / "target"),
                                      drafter=drafter, gamma=gamma, max_new_tokens=max_new_tokens, batch_size=64)
    return configs


def compare(plain_output: str, speculative_output: str) -> str:
    """How many answers are identical between the two runs (all of them, at temperature 0)."""
    import pandas as pd

    plain = pd.read_parquet(f"{plain_output}/parts")[["id", "text"]]
    speculative = pd.read_parquet(f"{speculative_output}/parts")[["id", "text"]]
    merged = plain.merge(speculative, on="id", suffixes=("_plain", "_speculative"))
    same = int((merged["text_plain"] == merged["text_speculative"]).sum())
    return f"identical answers with and without the drafter: {same}/{len(plain)}"
