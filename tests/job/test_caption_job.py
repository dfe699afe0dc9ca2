"""The caption job on a real local Ray: every row exactly once, lossless drafting, bad rows, and S3 end to end.

S3 is moto's server on 127.0.0.1 (conftest's s3_server), with s3fs as the client; input,
output and both checkpoints live in it.
"""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
import ray
from conftest import prepare_rows, ragged_rows, write_caption_dataset
from PIL import Image

from pipeline.engine.engine import EngineConfig, SpecDecodeEngine
from pipeline.job.caption import run_caption
from pipeline.job.charts import HEIGHT, WIDTH
from pipeline.job.config import CaptionConfig, JobConfigError
from pipeline.job.output import OUTPUT_SCHEMA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray(s3_server):
    ray.init(num_cpus=4, include_dashboard=False)  # 2 actors x 1 CPU, plus CPUs for reading and preparing
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}, "loopback only"
    yield
    ray.shutdown()


def read_output(output) -> pd.DataFrame:
    return pd.read_parquet(f"{output}/parts")


def job(world, data, output, tmp_path, **overrides) -> CaptionConfig:
    settings = dict(input=str(data), output=str(output), target=str(world["llava"]["target"]), max_new_tokens=6,
                    batch_size=16, num_actors=2, gpus_per_actor=0, model_cache=str(tmp_path / "cache"))
    settings.update(overrides)
    return CaptionConfig(**settings)


def check_exactly_once(frame: pd.DataFrame, expected: dict[str, str | None]) -> None:
    assert sorted(frame["id"]) == sorted(expected), "every input row exactly once"
    for row in frame.itertuples():
        if expected[row.id] is None:
            assert pd.isna(row.error) and isinstance(row.text, str) and row.num_generated_tokens >= 1, row
        else:
            assert row.error.startswith(expected[row.id]) and pd.isna(row.text), row


def test_local_job_every_row_once_and_drafter_lossless(local_ray, world, tmp_path):
    """Plain with static batches and MASSV with continuous batching (the default): the same answers, every row once."""
    data = tmp_path / "data"
    expected = write_caption_dataset(data, num_good=100)
    plain = run_caption(job(world, data, tmp_path / "plain", tmp_path, drafter="none", continuous_batching=False))
    started = time.time()
    drafted = run_caption(job(world, data, tmp_path / "drafted", tmp_path, drafter=str(world["llava"]["massv"]),
                              gamma=3, batch_size=8))
    ended = time.time()
    without, with_drafter = read_output(tmp_path / "plain"), read_output(tmp_path / "drafted")
    check_exactly_once(without, expected)
    check_exactly_once(with_drafter, expected)
    assert list(with_drafter.columns) == OUTPUT_SCHEMA.names

    merged = without.merge(with_drafter, on="id", suffixes=("_plain", "_drafted"))
    ok = merged[merged["error_plain"].isna()]
    assert (ok["text_plain"] == ok["text_drafted"]).all(), "a drafter must never change a greedy answer"
    assert (ok["num_generated_tokens_plain"] == ok["num_generated_tokens_drafted"]).all()
    assert ok["num_drafted_drafted"].sum() > 0 and ok["num_drafted_plain"].sum() == 0

    # per-row counts add up to the summary, which reads back from summary.json as written
    on_disk = json.loads((tmp_path / "drafted" / "summary.json").read_text())
    assert on_disk["rows_out"] == drafted["rows_out"] == len(expected)
    assert on_disk["rows_failed"] == len([e for e in expected.values() if e]) and on_disk["duplicate_ids"] == 0
    assert on_disk["accepted"] == ok["num_accepted_drafted"].sum()
    tau = 1 + ok["num_accepted_drafted"].sum() / ok["num_steps_drafted"].sum()
    assert on_disk["mean_accepted_length"] == pytest.approx(tau)
    assert on_disk["config"]["drafter"] == str(world["llava"]["massv"])
    assert plain["acceptance_rate"] == 0.0 and plain["this_run"]["rows"] == len(expected)
    assert sum(node["rows"] for node in on_disk["nodes"].values()) == len(expected)
    # when each decoded row finished, and the run's start-up apart from its decoding
    finished = with_drafter["finished_at"]
    assert (finished.notna() == with_drafter["error"].isna()).all() and finished.dropna().between(started, ended).all()
    run = on_disk["this_run"]  # 100 rows in batches of 8 on 2 actors: a rate after the first row (not in 16s)
    assert "rows_per_s_after_first_row" not in plain["this_run"] and plain["this_run"]["first_row_s"] > 0
    assert 0 < run["first_row_s"] <= finished.min() - started + 0.5 and run["first_row_s"] < run["wall_time_s"]
    assert run["rows_per_s_after_first_row"] == pytest.approx(
        (finished.count() - 1) / (finished.max() - finished.min()))
    chart = Image.open(tmp_path / "drafted" / "acceptance.png")
    assert chart.format == "PNG" and chart.size == (WIDTH, HEIGHT)
    assert not (tmp_path / "plain" / "acceptance.png").exists()  # nothing drafted, nothing to chart


def test_s3_input_output_and_models(local_ray, s3_server, world, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("bucket")
    data = tmp_path / "data"
    expected = write_caption_dataset(data, num_good=24, parts=2)
    fs.put(str(data), "bucket/prompts", recursive=True)
    fs.put(str(world["llava"]["target"]), "bucket/models/target", recursive=True)
    fs.put(str(world["llava"]["massv"]), "bucket/models/massv", recursive=True)

    config = job(world, "s3://bucket/prompts", "s3://bucket/captions", tmp_path, target="s3://bucket/models/target",
                 drafter="s3://bucket/models/massv", gamma=2)
    summary = run_caption(config)

    fs.invalidate_cache()
    assert fs.exists("bucket/captions/summary.json") and fs.ls("bucket/captions/parts")
    with fs.open("bucket/captions/summary.json") as f:
        assert json.load(f)["rows_out"] == summary["rows_out"] == len(expected)
    frame = pd.read_parquet("bucket/captions/parts", filesystem=fs)
    check_exactly_once(frame, expected)
    assert frame["drafter"].unique().tolist() == ["s3://bucket/models/massv"]
    # each checkpoint was copied into the node's cache once (plus a light copy for the driver's checks)
    cached = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert cached == ["massv", "massv", "target", "target"]


def test_cpu_actors_that_would_starve_the_cpu_stages_are_refused(local_ray, world, tmp_path):
    data = tmp_path / "data"
    write_caption_dataset(data, num_good=2, parts=1)
    with pytest.raises(JobConfigError, match="4 engine actors x 1 CPU take all 4 CPUs of the cluster"):
        run_caption(job(world, data, tmp_path / "out", tmp_path, num_actors=4))


def test_crashed_actor_is_restarted_and_its_batch_retried(local_ray, world, tmp_path):
    import threading

    import psutil

    data = tmp_path / "data"
    expected = write_caption_dataset(data, num_good=120, parts=2)
    output = tmp_path / "out"
    killed = []

    def kill_an_actor_midway():
        deadline = time.monotonic() + 120
        while not list((output / "parts").glob("*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.1)
        for process in psutil.process_iter(["cmdline"]):
            if "MapWorker(MapBatches(CaptionActor))" in " ".join(process.info["cmdline"] or []):
                process.kill()  # as an out-of-memory kill or a lost GPU would
                killed.append(len(list((output / "parts").glob("*.parquet"))))
                return

    killer = threading.Thread(target=kill_an_actor_midway)
    killer.start()
    summary = run_caption(job(world, data, output, tmp_path, max_new_tokens=24, batch_size=4, num_actors=1))
    killer.join()
    assert killed and killed[0] < len(expected) // 4, "an engine actor was killed while the job ran"
    check_exactly_once(read_output(output), expected)
    assert summary["duplicate_ids"] == 0


def test_sampling_with_a_drafter_through_the_job(local_ray, world, tmp_path):
    """--temperature/--top-p/--seed reach the engine of every actor, with a drafter that is often accepted."""
    data = tmp_path / "data"
    expected = write_caption_dataset(data, num_good=24, parts=1)
    drafter = str(world["llava"]["massv-noisy"])
    greedy = run_caption(job(world, data, tmp_path / "greedy", tmp_path, drafter=drafter, gamma=3, max_new_tokens=12))
    sampled = run_caption(job(world, data, tmp_path / "sampled", tmp_path, drafter=drafter, gamma=3,
                              max_new_tokens=12, temperature=0.8, top_p=0.9, seed=11))
    frame = read_output(tmp_path / "sampled")
    check_exactly_once(frame, expected)
    assert sampled["config"]["temperature"] == 0.8 and sampled["config"]["top_p"] == 0.9
    assert sampled["config"]["seed"] == 11
    assert 0 < sampled["accepted"] < sampled["drafted"] and greedy["accepted"] > 0
    answers = read_output(tmp_path / "greedy").merge(frame, on="id", suffixes=("_greedy", "_sampled"))
    answers = answers[answers["error_greedy"].isna()]
    assert (answers["text_greedy"] != answers["text_sampled"]).sum() >= len(answers) // 2, "sampling took effect"


def test_a_batch_the_engine_fails_is_retried_row_by_row(local_ray, world, targets, tmp_path, caplog):
    """A row that breaks its batch (here: it lacks the per-token input its neighbours carry, so the batch cannot
    be padded together) but runs alone, and a row that fails even alone: each gets its own outcome."""
    import asyncio

    import pyarrow as pa
    from conftest import hf_greedy, prepare_rows, ragged_rows

    from pipeline.engine.prompts import PreparedPrompt
    from pipeline.job.actor import CaptionActor
    from pipeline.job.preprocess import PREPARED_SCHEMA, encode_prepared

    target = targets["gemma3"]
    prompts = prepare_rows(target, ragged_rows(4, text_only_every=2))
    breaks_batch = PreparedPrompt(prompts[1].input_ids)  # a text-only row without its token_type_ids
    fails_alone = PreparedPrompt([target.vocab_size + 7] * 5)  # a token id outside the vocabulary
    rows = [prompts[0], breaks_batch, prompts[2], fails_alone, prompts[3], None]
    batch = pa.Table.from_pylist(  # the last row's prepared bytes are garbage: safetensors raises its own class
        [{"id": f"row-{i}", "prompt": "p", "prepared": encode_prepared(p) if p else b"\x05garbage", "image": None,
          "error": None} for i, p in enumerate(rows)], schema=PREPARED_SCHEMA)
    config = job(world, tmp_path, tmp_path / "out", tmp_path, target=str(world["gemma3"]["target"]),
                 drafter=str(world["gemma3"]["massv-noisy"]), gamma=3, max_new_tokens=8)
    with caplog.at_level("WARNING", logger="pipeline.engine.engine"):
        out = asyncio.run(CaptionActor(config)(batch)).to_pylist()
    assert "a prefill of 5 rows failed" in caplog.text and "admitting them one at a time" in caplog.text
    assert [row["id"] for row in out] == [f"row-{i}" for i in range(6)]
    assert out[3]["error"].startswith("generation failed: ") and out[3]["text"] is None
    assert out[5]["error"].startswith("generation failed: SafetensorError") and out[5]["text"] is None
    for row, prompt in zip([out[i] for i in (0, 1, 2, 4)], [rows[i] for i in (0, 1, 2, 4)]):
        assert row["error"] is None
        assert row["num_generated_tokens"] == len(hf_greedy(target, prompt, 8))
        assert row["text"] == target.tokenizer.decode(hf_greedy(target, prompt, 8), skip_special_tokens=True)


def test_hostile_rows_fail_alone_and_leave_their_neighbours_unchanged(local_ray, world, tmp_path):
    """A decompression bomb, an image over the pixel budget and a prompt holding the placeholder's text each get
    their own error; the other rows' answers equal those of a run without them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    expected = write_caption_dataset(data, num_good=12, parts=1)
    clean = run_caption(job(world, data, tmp_path / "clean", tmp_path))
    hostile = tmp_path / "hostile"
    Image.new("1", (20000, 20000)).save(data / "images" / "bomb.png")  # 400M pixels in a few KB
    Image.new("1", (10000, 8000)).save(data / "images" / "huge.png")  # 80M: over the 64M budget, under PIL's
    rows = [{"id": "bomb", "prompt": "Describe.", "image": "images/bomb.png"},
            {"id": "huge", "prompt": "Describe.", "image": "images/huge.png"},
            {"id": "markup", "prompt": "What is in <image> here?", "image": "images/0.png"}]
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("image", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), data / "part-hostile.parquet")
    summary = run_caption(job(world, data, hostile, tmp_path))
    frame = read_output(hostile).set_index("id")
    assert sorted(frame.index) == sorted([*expected, "bomb", "huge", "markup"]) and summary["duplicate_ids"] == 0
    assert frame.loc["bomb", "error"].startswith("DecompressionBombError: ")
    assert frame.loc["huge", "error"].startswith("image is 10000x8000 pixels, over the budget of 64,000,000")
    assert frame.loc["markup", "error"].startswith("prompt contains the model's special token text '<image>'")
    before = read_output(tmp_path / "clean").set_index("id")
    assert frame.loc[before.index, "text"].equals(before["text"]) and clean["rows_out"] == len(expected)


def test_an_unreadable_input_file_is_listed_and_the_rest_is_written(local_ray, world, tmp_path, capsys):
    """A corrupt Parquet file among good ones: its neighbours' rows are written once, the summary names it with its
    error, the exit status says the job is incomplete, and --resume after removing it completes the job."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from jobs.caption import main

    data, output = tmp_path / "data", tmp_path / "out"
    expected = write_caption_dataset(data, num_good=10, parts=2)
    (data / "part-9-corrupt.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 8 + b"PAR1")
    flags = ["--input", str(data), "--output", str(output), "--target", str(world["llava"]["target"]),
             "--max-new-tokens", "4", "--num-actors", "1", "--gpus-per-actor", "0",
             "--model-cache", str(tmp_path / "cache")]
    assert main(flags) == 3
    assert "incomplete: 1 input files could not be read" in capsys.readouterr().err
    summary = json.loads((output / "summary.json").read_text())
    [record] = summary["unreadable_files"]
    assert record["file"].endswith("part-9-corrupt.parquet") and record["rows_read_before_the_error"] == 0
    assert record["error"].split(":")[0] in ("ArrowInvalid", "OSError")
    check_exactly_once(read_output(output), expected)

    (data / "part-9-corrupt.parquet").unlink()
    assert main([*flags, "--resume"]) == 0
    assert json.loads((output / "summary.json").read_text())["unreadable_files"] == []
    check_exactly_once(read_output(output), expected)


def forty_rows(tmp_path):
    """A dataset folder with 40 images, and 40 records {prompt, image (its relative path)} for a table of them."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    records = []
    for i, (prompt, image) in enumerate(ragged_rows(40, text_only_every=0)):
        image.save(data / f"images/{i}.png")
        records.append({"prompt": prompt, "image": f"images/{i}.png"})
    return data, records


def test_one_parquet_file_is_read_by_several_tasks(local_ray, world, tmp_path, monkeypatch):
    """One file of 40 rows in row groups of 4, split into reads of 8 rows (READ_ROWS lowered, in the driver
    that plans the reads, so that a small file makes several), its sixth row group corrupt: the other reads' rows
    are written once, each with the id its place in the file gives it, and the summary names the lost read's row
    groups (read whole, the file gave no row at all)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.job import sources

    monkeypatch.setattr(sources, "READ_ROWS", 8)
    data, records = forty_rows(tmp_path)
    path = data / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=4)
    metadata, content = pq.ParquetFile(path).metadata, bytearray(path.read_bytes())
    for column in range(metadata.num_columns):  # page headers that cannot be parsed
        offset = metadata.row_group(5).column(column).data_page_offset
        content[offset : offset + 24] = b"\xff" * 24
    path.write_bytes(bytes(content))
    config = job(world, data, tmp_path / "out", tmp_path, num_actors=1)
    assert len(sources.split_reads(sources.plan_source(config))) == 5  # 4 CPUs: 3 beside the engine actor

    summary = run_caption(config)
    [record] = summary["unreadable_files"]
    assert record["file"].endswith("rows.parquet (row groups 4-5)") and record["rows_read_before_the_error"] == 0
    written = {f"rows.parquet#{i}": None for i in range(40) if not 16 <= i < 24}
    check_exactly_once(read_output(tmp_path / "out"), written)


def test_one_jsonl_file_is_read_by_several_tasks(local_ray, world, tmp_path, monkeypatch):
    """One JSONL file of 40 rows split into reads of about 8 rows (its pieces and READ_ROWS lowered in the driver
    that plans the reads), one line's bytes not UTF-8: the other reads' rows are written once, each with the id its
    place in the file gives it, and the summary names the lost read by its first line (read whole, the file gave no
    row at all)."""
    from pipeline.job import sources

    monkeypatch.setattr(sources, "JSONL_PIECE_BYTES", 128)
    monkeypatch.setattr(sources, "READ_ROWS", 8)
    data, records = forty_rows(tmp_path)
    lines = [json.dumps(record).encode() for record in records]
    lines[19] = lines[19].replace(b'"prompt": "', b'"prompt": "\xff')  # not UTF-8
    (data / "rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    config = job(world, data, tmp_path / "out", tmp_path, num_actors=1)
    reads = sources.split_reads(sources.plan_source(config))  # 4 CPUs: 3 beside the engine actor
    bad = sum(len(line) + 1 for line in lines[:19])  # where line 20 starts
    [lost] = [i for i, read in enumerate(reads) if read.byte_range[0] <= bad < read.byte_range[1]]
    assert len(reads) >= 4 and 0 < lost < len(reads) - 1
    lost_rows = range(reads[lost].first_row, reads[lost + 1].first_row)

    summary = run_caption(config)
    [record] = summary["unreadable_files"]
    assert record["file"].endswith(f"rows.jsonl (lines from {reads[lost].first_line})")
    written = {f"rows.jsonl#{i}": None for i in range(40) if i not in lost_rows}
    check_exactly_once(read_output(tmp_path / "out"), written)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_targets_through_the_job(local_ray, world, targets, family, tmp_path):
    """The caption job on M-RoPE targets with a MASSV drafter: every row once, each answer the target's own."""
    data = tmp_path / "data"
    expected = write_caption_dataset(data, num_good=24)
    summary = run_caption(job(world, data, tmp_path / "out", tmp_path, target=str(world[family]["target"]),
                              drafter=str(world[family]["massv-noisy"]), gamma=3, max_new_tokens=12))
    frame = read_output(tmp_path / "out")
    check_exactly_once(frame, expected)
    target = targets[family]
    plain = SpecDecodeEngine(target, None, EngineConfig(max_new_tokens=12)).generate(
        prepare_rows(target, ragged_rows(24, text_only_every=0)))
    answers = dict(zip(frame["id"], frame["text"]))
    assert [answers[f"row-{i}"] for i in range(24)] == [r.text for r in plain]
    assert summary["mean_accepted_length"] > 1.5, summary


def test_ray_data_native_entry_point(local_ray, world, targets, tmp_path):
    """caption(dataset, config): a Dataset of the caller's rows in, output rows out, composed lazily."""
    import io

    from ray.data.expressions import col

    from pipeline.job.caption import caption

    images = ragged_rows(10, text_only_every=0)
    items = []
    for i, (prompt, image) in enumerate(images):
        data = io.BytesIO()
        image.save(data, format="PNG")
        items.append({"id": f"r{i}", "prompt": prompt, "image": data.getvalue()})
    items += [{"id": "bad", "prompt": "Describe.", "image": b"not an image"},
              {"id": None, "prompt": images[0][0], "image": items[0]["image"]}]
    config = CaptionConfig(input=str(tmp_path), output=str(tmp_path / "unused"), target=str(world["llava"]["target"]),
                           drafter=str(world["llava"]["massv-noisy"]), gamma=3, max_new_tokens=8, batch_size=4,
                           num_actors=1, gpus_per_actor=0)
    output = caption(ray.data.from_items(items), config)
    answered = output.filter(expr=col("error").is_null())  # composes like any Dataset
    frame = output.to_pandas().set_index("id")
    assert len(frame) == len(items) and answered.count() == len(items) - 1
    assert frame.loc["bad", "error"].startswith("image cannot be decoded")
    derived = [row_id for row_id in frame.index if row_id.startswith("row-")]
    assert len(derived) == 1
    target = targets["llava"]
    plain = SpecDecodeEngine(target, None, EngineConfig(max_new_tokens=8)).generate(prepare_rows(target, images))
    assert [frame.loc[f"r{i}", "text"] for i in range(10)] == [r.text for r in plain]
    assert frame.loc[derived[0], "text"] == plain[0].text
    assert frame["num_drafted"].sum() > 0 and not (tmp_path / "unused").exists()
