"""Input sources: every format gives one row per input row, stable ids, resolved image references, clear errors."""

from __future__ import annotations

import base64
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.job.config import CaptionConfig, JobConfigError
from pipeline.job.resume import FinishedIds
from pipeline.job.sources import READ_ROWS, Read, plan_source, read_rows, split_reads


def png(colour=(200, 30, 30), size=(8, 6)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def config(input_path, **overrides) -> CaptionConfig:
    return CaptionConfig(input=str(input_path), output="unused", target="unused", **overrides)


def all_rows(cfg: CaptionConfig, skip=FinishedIds()) -> list[dict]:
    plan = plan_source(cfg)
    return [row for read in plan.reads for table in read_rows(plan, read, skip) for row in table.to_pylist()]


def test_parquet_image_forms_and_derived_ids(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png())
    records = [
        {"prompt": "inline", "image": png()},
        {"prompt": "relative", "image": "images/a.png"},
        {"prompt": "hf dict", "image": {"bytes": png(), "path": None}},
        {"prompt": "data url", "image": "data:image/png;base64," + base64.b64encode(png()).decode()},
        {"prompt": "missing", "image": None},
        {"prompt": "empty", "image": ""},
    ]
    # each image form in its own file, since a Parquet column has one type
    for i, record in enumerate(records):
        pq.write_table(pa.Table.from_pylist([record]), tmp_path / f"part-{i}.parquet")
    rows = {row["prompt"]: row for row in all_rows(config(tmp_path))}
    assert rows["inline"]["image"] == png() and rows["inline"]["id"] == "part-0.parquet#0"
    assert rows["relative"]["image_url"] == f"{tmp_path}/images/a.png"
    assert rows["hf dict"]["image"] == png()
    assert rows["data url"]["image"] == png()
    assert rows["missing"]["error"] == "image is missing"
    assert rows["empty"]["error"] == "image is empty"
    assert sum(row["error"] is None for row in rows.values()) == 4


def test_a_parquet_files_row_groups_are_split_into_reads_with_the_whole_files_ids(tmp_path):
    """A file of many row groups is read by several tasks, each a run of about READ_ROWS rows; the rows and
    their ids (from their place in the file) are the file's read whole; a file of one row group is read whole."""
    rows = 2 * READ_ROWS + READ_ROWS // 2
    table = pa.table({"prompt": [f"p{i}" for i in range(rows)], "image": [png()] * rows})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=READ_ROWS // 8)
    pq.write_table(table.slice(0, 10), tmp_path / "small.parquet")
    plan = plan_source(config(tmp_path))
    assert plan.reads == [Read(("big.parquet",)), Read(("small.parquet",))]  # planned whole; split where it pays
    reads = split_reads(plan)
    assert [(read.row_groups, read.first_row) for read in reads if read.files == ("big.parquet",)] == [
        ((0, 8), 0), ((8, 16), READ_ROWS), ((16, 20), 2 * READ_ROWS)]
    assert [read for read in reads if read.files == ("small.parquet",)] == [Read(("small.parquet",))]

    split = [row for read in reads for table in read_rows(plan, read) for row in table.to_pylist()]
    whole = [row for read in plan.reads for table in read_rows(plan, read) for row in table.to_pylist()]
    assert sorted(split, key=lambda r: r["id"]) == sorted(whole, key=lambda r: r["id"])
    assert len({row["id"] for row in split}) == rows + 10
    assert {row["id"] for row in split if row["prompt"] == f"p{rows - 1}"} == {f"big.parquet#{rows - 1}"}


def write_mixed_jsonl(directory) -> None:
    """big.jsonl: 400 lines, blank ones, lines that are not JSON and lines of 900+ bytes among them, the three line
    endings, no newline at the end; small.jsonl: one line."""
    endings, lines = ["\n", "\r\n", "\r"], []
    for i in range(400):
        kind = i % 23
        line = ("   " if kind == 5 else "not json" if kind == 7 else
                json.dumps({"prompt": f"p{i} \u00e9" + "x" * (900 if kind == 11 else i % 50), "image": "a.png"}))
        lines.append(line + endings[i % 3])
    (directory / "big.jsonl").write_bytes("".join(lines).rstrip().encode())
    (directory / "small.jsonl").write_text('{"prompt": "s"}\n')


def test_a_jsonl_file_is_split_into_reads_with_the_whole_files_ids_and_line_numbers(tmp_path, monkeypatch):
    """A JSONL file larger than a piece is read by several tasks, each a run of its lines (cut at lines' starts:
    pieces of 512 bytes here, runs of about 40 rows); the rows, their ids and the line numbers in their errors are
    the file's read whole, through blank lines, lines that are not JSON, lines longer than a piece, the three line
    endings and no newline at the end; a file smaller than a piece is read whole."""
    from pipeline.job import sources

    monkeypatch.setattr(sources, "JSONL_PIECE_BYTES", 512)
    monkeypatch.setattr(sources, "READ_ROWS", 40)
    write_mixed_jsonl(tmp_path)
    plan = plan_source(config(tmp_path, image_column="image"))
    reads = split_reads(plan)
    big = [read for read in reads if read.files == ("big.jsonl",)]
    assert len(big) > 5 and all(read.byte_range for read in big)
    assert [read.byte_range[0] for read in big[1:]] == [read.byte_range[1] for read in big[:-1]]  # end to end
    assert [read for read in reads if read.files == ("small.jsonl",)] == [Read(("small.jsonl",))]

    split = [row for read in reads for table in read_rows(plan, read) for row in table.to_pylist()]
    whole = [row for read in plan.reads for table in read_rows(plan, read) for row in table.to_pylist()]
    assert split == whole and len(whole) == 400 - 18 + 1  # blank lines are no rows
    assert {row["error"] for row in whole if row["id"] == "big.jsonl#6"} == {"line 8 is not a JSON object"}
    assert [row["id"] for row in whole if row["prompt"] == "p399 \u00e9" + "x" * 49] == ["big.jsonl#381"]


def test_a_jsonl_files_last_line_past_its_piece_without_a_newline_is_read(tmp_path, monkeypatch):
    """The last line starts in one piece, runs through the next and ends the file without a newline: its piece
    reads on to the end of the file (before, it counted nothing there, and the split reads lost the row)."""
    from pipeline.job import sources

    monkeypatch.setattr(sources, "JSONL_PIECE_BYTES", 512)
    monkeypatch.setattr(sources, "READ_ROWS", 20)
    lines = [json.dumps({"prompt": f"p{i}"}) for i in range(100)] + [json.dumps({"prompt": "x" * 3000})]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines))
    plan = plan_source(config(tmp_path))
    reads = split_reads(plan)
    assert len(reads) > 3
    split = [row for read in reads for table in read_rows(plan, read) for row in table.to_pylist()]
    assert split == [row for table in read_rows(plan, plan.reads[0]) for row in table.to_pylist()]
    assert split[-1]["id"] == "rows.jsonl#100" and split[-1]["prompt"] == "x" * 3000


def test_a_jsonl_file_in_object_storage_splits_as_on_disk(s3_server, tmp_path, monkeypatch):
    """The same file in S3 (moto's server, s3fs): the same reads, and through them, as read whole, the file's rows
    (their images resolved against the bucket's folder)."""
    import s3fs

    from pipeline.job import sources

    monkeypatch.setattr(sources, "JSONL_PIECE_BYTES", 512)
    monkeypatch.setattr(sources, "READ_ROWS", 40)
    write_mixed_jsonl(tmp_path)
    fs = s3fs.S3FileSystem()
    fs.mkdir("sources-bucket")
    fs.put(str(tmp_path / "big.jsonl"), "sources-bucket/rows/big.jsonl")
    local, remote = plan_source(config(tmp_path)), plan_source(config("s3://sources-bucket/rows"))
    reads = split_reads(remote)
    assert reads == [read for read in split_reads(local) if read.files == ("big.jsonl",)] and len(reads) > 5
    split = [row for read in reads for table in read_rows(remote, read) for row in table.to_pylist()]
    whole = [row for read in local.reads if read.files == ("big.jsonl",) for table in read_rows(local, read)
             for row in table.to_pylist()]
    for row in whole:
        if row["image_url"]:
            row["image_url"] = "s3://sources-bucket/rows/" + row["image_url"].rsplit("/", 1)[1]
    assert split == whole
    assert [row for read in remote.reads for table in read_rows(remote, read) for row in table.to_pylist()] == whole


def test_parquet_id_and_columns_by_flag(tmp_path):
    table = pa.Table.from_pylist([{"key": f"k{i}", "question": f"q{i}", "pic": png()} for i in range(3)])
    pq.write_table(table, tmp_path / "data.parquet")
    rows = all_rows(config(tmp_path / "data.parquet", id_column="key", prompt_column="question", image_column="pic"))
    assert [(r["id"], r["prompt"]) for r in rows] == [("k0", "q0"), ("k1", "q1"), ("k2", "q2")]
    skipped = all_rows(config(tmp_path, id_column="key", prompt_column="question", image_column="pic"),
                       skip=FinishedIds.of([["k1", "k1", "absent"]]))
    assert [r["id"] for r in skipped] == ["k0", "k2"]


def test_jsonl_bad_line_becomes_error_row_and_default_prompt(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "x.png").write_bytes(png())
    lines = [json.dumps({"image": "pics/x.png"}), "{not json", "", json.dumps({"image": "pics/nope.png"})]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    rows = all_rows(config(tmp_path, prompt="Say what you see."))
    assert [r["id"] for r in rows] == ["rows.jsonl#0", "rows.jsonl#1", "rows.jsonl#2"]
    assert rows[0]["prompt"] == "Say what you see." and rows[0]["image_url"].endswith("pics/x.png")
    assert rows[1]["error"] == "line 2 is not a JSON object"
    assert rows[2]["error"] is None  # the missing file is found out when the image is fetched


def test_image_folder_one_row_per_image(tmp_path):
    for name in ("b/2.png", "a.jpg", "c.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(png())
    (tmp_path / ".hidden.png").write_bytes(png())
    rows = all_rows(config(tmp_path, format="images"))
    assert sorted(r["id"] for r in rows) == ["a.jpg", "b/2.png", "c.webp"]
    assert all(r["prompt"] == "Describe the image." and r["image_url"].startswith(str(tmp_path)) for r in rows)


def test_webdataset_shards_as_img2dataset_writes_them(tmp_path):
    for shard in range(2):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tar:
            for i in range(3):
                key = f"{shard:05d}{i:04d}"
                members = {"jpg": png(), "txt": b"a caption", "json": json.dumps({"key": key, "url": "http://x"})}
                if i == 2:
                    del members["jpg"]  # a sample whose download failed
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data if isinstance(data, bytes) else data.encode()))
    rows = all_rows(config(tmp_path))
    assert len(rows) == 6
    assert rows[0]["id"] == "00000.tar/000000000" and rows[0]["image"] == png()
    assert [r["error"] for r in rows if r["error"]] == ["image is missing", "image is missing"]
    by_key = all_rows(config(tmp_path, id_column="key"))
    assert [r["id"] for r in by_key][:2] == ["000000000", "000000001"]


@pytest.mark.parametrize(
    "setup, overrides, message",
    [
        (lambda d: None, {"input_name": "absent"}, "does not exist"),
        (lambda d: (d / "notes.txt").write_text("x"), {}, "holds no Parquet, JSONL, image or .tar files"),
        (lambda d: ((d / "a.jsonl").write_text("{}\n"), (d / "b.parquet").write_bytes(b"")), {}, "pass --format"),
        (lambda d: pq.write_table(pa.table({"prompt": ["x"]}), d / "t.parquet"), {"image_column": "img"},
         "--image-column 'img' is not in the columns of"),
        (lambda d: (d / "a.png").write_bytes(png()), {"prompt_column": "q"}, "does not apply to images input"),
    ],
)
def test_bad_inputs_fail_with_one_sentence(tmp_path, setup, overrides, message):
    setup(tmp_path)
    name = overrides.pop("input_name", None)
    with pytest.raises(JobConfigError, match=message):
        plan_source(config(tmp_path / name if name else tmp_path, **overrides))
