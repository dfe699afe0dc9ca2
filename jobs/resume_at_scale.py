"""Resume at scale: what --resume costs the driver and the read stage with 10^6 finished ids (not in CI).

    python jobs/resume_at_scale.py --rows 1000000 --left 64 --files 500 --work out/resume_scale

Lays out a synthetic input of --rows rows in --files Parquet files (one shared image) and an output that already holds
all but --left of them (Parquet parts as the caption job writes them), then times `preflight` (reading
the finished ids) with the driver's peak memory, and the resumed job end to end on a local Ray, which
must write exactly the --left rows. Copied into another checkout, it measures that checkout's code.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.job.cli import flag, parse_config  # noqa: E402


@dataclass
class ResumeScaleConfig:
    rows: int = field(default=1_000_000, metadata=flag("input rows"))
    left: int = field(default=64, metadata=flag("rows not yet in the output"))
    files: int = field(default=500, metadata=flag("input Parquet files (one read task each)"))
    work: str = field(default="out/resume_scale", metadata=flag("where the input and output are laid out"))
    target: str = field(default=str(ROOT / "demo_world" / "target"), metadata=flag("target checkpoint"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lay_out(config: ResumeScaleConfig) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    work = Path(config.work)
    shutil.rmtree(work, ignore_errors=True)
    data, output = work / "data", work / "output"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 40, 40)).save(data / "images" / "0.png")
    ids = pa.array([f"row-{i:08d}" for i in range(config.rows)])
    per_file = -(-config.rows // config.files)
    for start in range(0, config.rows, per_file):
        chunk = ids[start : start + per_file]
        pq.write_table(pa.table({"id": chunk, "prompt": pa.array(["Describe the image."] * len(chunk)),
                                 "image": pa.array(["images/0.png"] * len(chunk))}), data / f"in-{start:08d}.parquet")
    from pipeline.job.output import OUTPUT_SCHEMA

    (output / "parts").mkdir(parents=True)
    done = config.rows - config.left
    for start in range(0, done, 10_000):
        n = min(10_000, done - start)
        columns = {name: pa.nulls(n, type=OUTPUT_SCHEMA.field(name).type) for name in OUTPUT_SCHEMA.names}
        columns["id"] = ids[start : start + n]
        columns["text"] = pa.array(["a red square."] * n)
        pq.write_table(pa.table(columns, schema=OUTPUT_SCHEMA), output / "parts" / f"done-{start:08d}.parquet")
    return data, output


def main(argv: list[str] | None = None) -> None:
    config = parse_config(ResumeScaleConfig, argv, __doc__.split("\n\n")[0])
    data, output = lay_out(config)
    from pipeline.job.caption import run_caption
    from pipeline.job.config import CaptionConfig
    from pipeline.job.preflight import preflight

    job = CaptionConfig(input=str(data), output=str(output), target=config.target, max_new_tokens=4,
                        num_actors=1, gpus_per_actor=0, resume=True, batch_size=64)
    before = peak_rss_mb()
    started = time.perf_counter()
    plan = preflight(job)
    preflight_s = time.perf_counter() - started
    driver_mb = peak_rss_mb()
    del plan
    started = time.perf_counter()
    summary = run_caption(job)
    report = {"config": asdict(config), "finished_ids": config.rows - config.left,
              "preflight_s": round(preflight_s, 2), "driver_peak_rss_mb_before": round(before),
              "driver_peak_rss_mb_after_preflight": round(driver_mb),
              "resumed_job_wall_s": round(time.perf_counter() - started, 2),
              "rows_written_this_run": summary["this_run"]["rows"], "rows_out": summary["rows_out"],
              "duplicate_ids": summary["duplicate_ids"], "driver_peak_rss_mb_end": round(peak_rss_mb())}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
