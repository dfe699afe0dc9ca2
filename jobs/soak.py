"""Memory soak of the caption job (not in CI): many demo rows through the job while resident memory is sampled.

    python jobs/soak.py --rows 100000 --work out/soak

Repeats the demo world's held-out prompts with new ids to --rows rows, runs the demo's speculative
job (MASSV, gamma auto, batch 64) on a local Ray, and every --every seconds samples the rows
written so far (the output parts' Parquet footers), the driver's resident memory and each engine
actor's (Linux /proc). Writes samples.json and memory.png under --work and prints, per process,
the growth from the sample nearest --warm rows to its last one while rows were written: the goal
is under 10%. Resident memory is split into private pages and the shared pages of Ray's object
store it has mapped.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.job.cli import flag, parse_config  # noqa: E402

GOAL = 0.10  # largest growth allowed after warm-up


@dataclass
class SoakConfig:
    rows: int = field(default=100_000, metadata=flag("rows through the job"))
    warm: int = field(default=20_000, metadata=flag("rows written when warm-up counts as over"))
    every: float = field(default=5.0, metadata=flag("seconds between samples"))
    max_new_tokens: int = field(default=48, metadata=flag("answer length cap"))
    work: str = field(default="out/soak", metadata=flag("input, output and the report go here"))
    object_store_mb: int | None = field(default=None, metadata=flag(
        "object store size of the local Ray the soak starts (default: Ray's, 30%% of RAM)"))


def rss_mb(pid: int) -> dict[str, float] | None:
    """Resident MB: the total, and its private part (anon) apart from mapped shared memory (shmem: Ray's
    object store, whose pages a process counts once it has read objects there)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return {name: int(fields[key].split()[0]) / 1024 for name, key in
                (("rss", "VmRSS"), ("anon", "RssAnon"), ("shmem", "RssShmem"))}
    except (OSError, KeyError, ValueError):
        return None


def actor_pids() -> list[int]:
    """Processes whose title names the engine actor (Ray titles its workers ray::<what they run>)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"CaptionActor" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return sorted(pids)


class RowCounter:
    """Rows written so far: each finished part's footer is read once."""

    def __init__(self, parts: Path):
        self.parts = parts
        self.counted: dict[str, int] = {}

    def __call__(self) -> int:
        import pyarrow.parquet as pq

        for path in self.parts.glob("*.parquet") if self.parts.exists() else []:
            if path.name not in self.counted:
                try:
                    self.counted[path.name] = pq.ParquetFile(path).metadata.num_rows
                except Exception:  # still being written: counted at the next sample
                    continue
        return sum(self.counted.values())


def sample_until(done: threading.Event, config: SoakConfig, parts: Path, samples: list[dict]) -> None:
    count_rows, started = RowCounter(parts), time.perf_counter()
    while not done.wait(config.every):
        processes = {"driver": rss_mb(os.getpid()), **{f"actor {pid}": rss_mb(pid) for pid in actor_pids()}}
        samples.append({"seconds": round(time.perf_counter() - started, 1), "rows": count_rows(),
                        "processes": {name: mb for name, mb in processes.items() if mb is not None}})
        shown = "  ".join(f"{name} {mb['rss']:.0f} MB (private {mb['anon']:.0f})"
                          for name, mb in samples[-1]["processes"].items())
        print(f"[soak] {samples[-1]['seconds']:7.0f} s  {samples[-1]['rows']:7d} rows  {shown}", flush=True)


def growth(samples: list[dict], warm: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Per process and measure (rss, anon, shmem): (MB at its first sample with >= warm rows, MB at its last one
    taken while rows were still being written: later ones can catch the actors shutting down)."""
    final = max((s["rows"] for s in samples), default=0)
    out = {}
    for name in {name for s in samples for name in s["processes"]}:
        seen = [s for s in samples if name in s["processes"] and warm <= s["rows"] < final]
        if len(seen) >= 2:
            first, last = seen[0]["processes"][name], seen[-1]["processes"][name]
            out[name] = {measure: (first[measure], last[measure]) for measure in first}
    return out


def chart(samples: list[dict], path: Path) -> None:
    from pipeline.job.charts import line_chart

    series = {}
    for name in sorted({name for s in samples for name in s["processes"]}):
        for measure, label in (("rss", "resident"), ("anon", "private")):
            series[f"{name}, {label}"] = [(s["rows"], s["processes"][name][measure]) for s in samples
                                          if name in s["processes"]]
    path.write_bytes(line_chart(series, "Memory over a soak of the caption job", "rows written",
                                "MB (private: without mapped object-store pages)"))


def main() -> int:
    config = parse_config(SoakConfig, None, __doc__)
    print(f"soak config: {json.dumps(asdict(config))}", flush=True)
    from pipeline.job.caption import run_caption
    from pipeline.lab.demo import demo_configs

    work = Path(config.work)
    job = demo_configs(work, rows=config.rows, max_new_tokens=config.max_new_tokens)["speculative"]
    job.object_store_mb = config.object_store_mb
    samples: list[dict] = []
    done = threading.Event()
    sampler = threading.Thread(target=sample_until, args=(done, config, Path(job.output) / "parts", samples))
    sampler.start()
    try:
        summary = run_caption(job)
    finally:
        done.set()
        sampler.join()
    (work / "samples.json").write_text(json.dumps(samples, indent=1))
    chart(samples, work / "memory.png")
    print(f"rows written {summary['rows_out']} of {config.rows}; memory from {config.warm} rows to each "
          "process's last sample while rows were being written:")
    worst = 0.0
    for name, measures in sorted(growth(samples, config.warm).items()):
        for measure, (start, end) in measures.items():
            change = (end - start) / start if start else 0.0
            if measure == "rss":
                worst = max(worst, change)
            print(f"  {name:14s} {measure:6s} {start:7.0f} MB -> {end:7.0f} MB  ({change:+.1%})")
    print(f"goal: resident growth under {GOAL:.0%} -> {'met' if worst < GOAL else 'missed'}; "
          f"samples.json and memory.png under {work}")
    return 0 if worst < GOAL and summary["rows_out"] == config.rows else 1


if __name__ == "__main__":
    sys.exit(main())
