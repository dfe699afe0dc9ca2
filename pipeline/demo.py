"""The embedded demo of the caption job: a tiny world built here (nothing is downloaded) and a prompt dataset.

The target is a tiny random LLaVA whose 8 decoder layers leave the residual
stream to the first one alone, and the drafter is that first layer behind a
MASSV projector: every draft is accepted at 1/8 of the target's decoder cost,
so the demo shows what speculation buys, and that answers stay identical.
Trained demo checkpoints replace this world in a later change.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import tiny_models
from pipeline.config import CaptionConfig

DEMO_DIR = Path("out/demo")


def build_demo(directory: Path = DEMO_DIR, rows: int = 96, max_new_tokens: int = 48) -> dict[str, CaptionConfig]:
    """Checkpoints and prompts under `directory`; returns the job configs "plain" (no drafter) and "speculative"."""
    world = tiny_models.build_world("llava", directory / "models", target_layers=8, active_layers=1)
    prompts = directory / "prompts"
    prompts.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (prompt, image) in enumerate(tiny_models.sample_rows(rows, text_only_every=0)):
        encoded = io.BytesIO()
        image.save(encoded, "PNG")
        records.append({"id": f"demo-{i:04d}", "prompt": prompt, "image": encoded.getvalue()})
    pq.write_table(pa.Table.from_pylist(records), prompts / "prompts.parquet")
    configs = {}
    for name, drafter in (("plain", "none"), ("speculative", str(world["massv-shallow-oracle"]))):
        output = directory / f"captions-{name}"
        shutil.rmtree(output, ignore_errors=True)  # the demo's own output: a fresh run each time
        configs[name] = CaptionConfig(input=str(prompts), output=str(output), target=str(world["target"]),
                                      drafter=drafter, gamma="auto", max_new_tokens=max_new_tokens, batch_size=32)
    return configs


def compare(plain_output: str, speculative_output: str) -> str:
    """How many answers are identical between the two runs (all of them, at temperature 0)."""
    import pandas as pd

    plain = pd.read_parquet(f"{plain_output}/parts")[["id", "text"]]
    speculative = pd.read_parquet(f"{speculative_output}/parts")[["id", "text"]]
    merged = plain.merge(speculative, on="id", suffixes=("_plain", "_speculative"))
    same = int((merged["text_plain"] == merged["text_speculative"]).sum())
    return f"identical answers with and without the drafter: {same}/{len(plain)}"
