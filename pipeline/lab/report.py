"""What the lab's measuring scripts share: a markdown table of their results, and results.json with their config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def save_results(config, results: list[dict], log=print) -> Path:
    """results.json under config.output: the config (a dataclass) and the results."""
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps({"config": dataclasses.asdict(config), "results": results}, indent=2))
    log(f"wrote {path}")
    return path
