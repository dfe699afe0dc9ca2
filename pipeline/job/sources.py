"""Input datasets as rows {id, prompt, image, image_url, error}: Parquet, JSONL, image folders, WebDataset tars.

The driver plans the reads (`plan_source`: list files, detect the format, check
the columns, failing at once with one sentence); Ray tasks then read one file, a
chunk of image files, or part of a large file each: a run of a Parquet file's row
groups, or of a JSONL file's lines (`Read`, `split_reads`, `read_rows`).
Every input row becomes exactly one row here: a row that is bad (invalid JSON
line, missing image) carries `error` onward instead of being dropped. Ids come
from the id column, else from the source itself (`<file>#<row>` for tables, the
relative path for images, `<shard>/<key>` for WebDataset), so they are stable
across runs and `--resume` can skip them.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline.job.config import CaptionConfig, JobConfigError
from pipeline.job.output import record_unreadable, row_error
from pipeline.job.resume import FinishedIds
from pipeline.job.storage import is_remote, join, resolve, url_to_fs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EXTENSIONS = {
    "parquet": (".parquet",),
    "jsonl": (".jsonl", ".json", ".ndjson"),
    "webdataset": (".tar",),
    "images": IMAGE_EXTENSIONS,
}
IMAGES_PER_READ = 256
ROWS_PER_BATCH = 1024
# A read task reads its rows and prepares them (Ray Data fuses the two), so a file read whole is prepared by one
# task, on one core, however large the cluster: split_reads splits a large file into reads of about READ_ROWS rows
# (merged up to it), where the input has at most SPLIT_FILES_UP_TO files (more files spread over the cluster by
# themselves). A Parquet file splits by its row groups, at the cost of a read of its footer; a JSONL file has no
# index, so the driver reads it once, in pieces of JSONL_PIECE_BYTES from one line's start to another's, counting
# the lines that start in each (a row's id is its place among the file's rows, whichever task reads it).
READ_ROWS = 2048
SPLIT_FILES_UP_TO = 64
PLAN_READS = 16  # footers or JSONL pieces read at once (object storage answers each in tens of milliseconds)
JSONL_PIECE_BYTES = 1 << 20

SOURCE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("image", pa.binary()),  # inline image bytes
        ("image_url", pa.string()),  # or where to fetch them
        ("error", pa.string()),
    ]
)


@dataclass(frozen=True)
class Read:
    """What one read task reads: files whole, or part of one file, whose first row is the file's row first_row
    (ids are `<file>#<row>` whichever task reads the row): a Parquet file's row groups [start, stop), or a JSONL
    file's bytes [start, stop), from one line's start to another's, whose first line is the file's line first_line
    (an error names the line)."""

    files: tuple[str, ...]
    row_groups: tuple[int, int] | None = None
    byte_range: tuple[int, int] | None = None
    first_row: int = 0
    first_line: int = 1

    @classmethod
    def of(cls, record: dict) -> Read:
        """From its dict (dataclasses.asdict), as a read task gets it: lists where the tuples were."""
        groups, byte_range = record["row_groups"], record["byte_range"]
        return cls(tuple(record["files"]), tuple(groups) if groups else None,
                   tuple(byte_range) if byte_range else None, record["first_row"], record["first_line"])

    def where(self, url: str) -> str:
        """The file's URL, with which part of it when this read has part of it."""
        if self.row_groups is not None:
            return f"{url} (row groups {self.row_groups[0]}-{self.row_groups[1] - 1})"
        return url if self.byte_range is None else f"{url} (lines from {self.first_line})"

    @property
    def part(self) -> dict:
        """What the format's reader is told of the part of the file this read has (nothing: all of it)."""
        if self.row_groups is not None:
            return {"row_groups": self.row_groups, "first_row": self.first_row}
        if self.byte_range is not None:
            return {"byte_range": self.byte_range, "first_row": self.first_row, "first_line": self.first_line}
        return {}


@dataclass
class SourcePlan:
    """What to read and how: made once by the driver, shipped to the read tasks."""

    format: str
    root: str  # dataset location; relative image paths resolve against it
    reads: list[Read]  # one per read task
    id_column: str | None
    prompt_column: str | None
    image_column: str | None
    default_prompt: str
    columns: list[str] = field(default_factory=list)

    def url(self, relative: str) -> str:
        return join(self.root, relative)


def plan_source(config: CaptionConfig) -> SourcePlan:
    """List and check the input; raises JobConfigError (one sentence) when the job cannot read it."""
    location = config.input if is_remote(config.input) else os.path.abspath(config.input.removeprefix("file://"))
    fs, path = url_to_fs(location)
    if not fs.exists(path):
        raise JobConfigError(f"input {config.input} does not exist: check the path or URL.")
    if fs.isdir(path):
        root = location.rstrip("/")
        base = path.rstrip("/") + "/"
        files = [p[len(base) :] for p in sorted(fs.find(path)) if p.startswith(base)]
        files = [f for f in files if not any(part.startswith((".", "_")) for part in f.split("/"))]
    else:  # one file: its directory is the dataset location
        root, files = location.rsplit("/", 1)[0], [location.rsplit("/", 1)[1]]
    fmt = config.format if config.format != "auto" else _detect_format(files, config.input)
    files = [f for f in files if f.lower().endswith(EXTENSIONS[fmt])]
    if not files:
        raise JobConfigError(f"input {config.input} holds no {fmt} files ({', '.join(EXTENSIONS[fmt])}).")
    if fmt == "images":
        reads = [Read(tuple(files[i : i + IMAGES_PER_READ])) for i in range(0, len(files), IMAGES_PER_READ)]
    else:
        reads = [Read((f,)) for f in files]
    plan = SourcePlan(fmt, root, reads, None, None, None, config.prompt)
    plan.columns = _columns(plan)
    not_applicable = {"images": ("--id-column", "--prompt-column", "--image-column"), "webdataset": ("--image-column",)}
    given = {"--id-column": config.id_column, "--prompt-column": config.prompt_column,
             "--image-column": config.image_column}
    for flag in not_applicable.get(fmt, ()):
        if given[flag]:
            raise JobConfigError(f"{flag} does not apply to {fmt} input: leave it out.")
    if fmt == "images":
        return plan
    plan.id_column = _column(plan, "--id-column", config.id_column, "id")
    plan.prompt_column = _column(plan, "--prompt-column", config.prompt_column, "prompt")
    if fmt != "webdataset":  # WebDataset images are the shard's image members
        plan.image_column = _column(plan, "--image-column", config.image_column, "image")
    return plan


def split_reads(plan: SourcePlan) -> list[Read]:
    """The plan's reads, a large Parquet or JSONL file split into reads of about READ_ROWS rows where the input has
    at most SPLIT_FILES_UP_TO files (a file of one read, or whose footer or lines cannot be read, stays whole)."""
    files = [read.files[0] for read in plan.reads]
    if plan.format not in ("parquet", "jsonl") or len(files) > SPLIT_FILES_UP_TO:
        return plan.reads
    with ThreadPoolExecutor(PLAN_READS) as pool:
        if plan.format == "parquet":
            sizes = list(pool.map(lambda relative: _row_group_sizes(plan.url(relative)), files))
            return [read for relative, groups in zip(files, sizes) for read in _row_group_reads(relative, groups)]
        return [read for relative in files for read in _jsonl_reads(relative, plan.url(relative), pool)]


def read_rows(plan: SourcePlan, read: Read, skip_ids: FinishedIds | None = None,
              on_unreadable: Callable[[str, Exception, int], None] | None = None):
    """Yield pyarrow tables (SOURCE_SCHEMA) for one read task's files, leaving out ids in `skip_ids`.

    A file that cannot be read (or stops being readable midway) is reported through `on_unreadable(url,
    error, rows read from it)` and the task goes on with the next file; without a callback it raises.
    """
    reader = {"parquet": _parquet_rows, "jsonl": _jsonl_rows, "webdataset": _tar_rows, "images": _image_rows}
    part = read.part
    skip_ids = skip_ids if skip_ids is not None else FinishedIds()
    rows = []
    for relative in read.files:
        count = 0
        try:
            for row in reader[plan.format](plan, [relative], **part):
                count += 1
                rows.append(row)
                if len(rows) == ROWS_PER_BATCH:
                    yield from _unfinished(rows, skip_ids)
                    rows = []
        except Exception as exc:
            if on_unreadable is None:
                raise
            on_unreadable(read.where(plan.url(relative)), exc, count)
    yield from _unfinished(rows, skip_ids)


def read_task(batch: pa.Table, plan: SourcePlan, skip: ray.ObjectRef, output: str):
    """The job's read stage (a Ray Data task): rows of this task's files, leaving out the finished ids in `skip`
    (mapped from the object store, zero-copy); a file that cannot be read is recorded for the summary, not fatal.
    It lives here, not with the job's stages, so a read task's process imports no model code."""
    finished = ray.get(skip)
    for read in batch.column("read").to_pylist():
        yield from read_rows(plan, Read.of(read), finished, on_unreadable=partial(record_unreadable, output))


def source_rows(batch: pa.Table, plan: SourcePlan) -> pa.Table:
    """A caller's rows (`caption(dataset, config)`) as SOURCE_SCHEMA rows; anything wrong with one becomes its
    error."""
    return pa.Table.from_pylist([source_row(plan, record) for record in batch.to_pylist()], schema=SOURCE_SCHEMA)


def _unfinished(rows: list[dict], skip_ids: FinishedIds):
    """The rows whose ids are not written yet, as one table (none when there are none)."""
    done = skip_ids.contains([row["id"] for row in rows])
    rows = [row for row, finished in zip(rows, done) if not finished]
    if rows:
        yield pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)


def _detect_format(names: list[str], where: str) -> str:
    """Tables or shards when there are any (images beside them are what they refer to), else an image folder."""
    found = {fmt for name in names for fmt, exts in EXTENSIONS.items() if name.lower().endswith(exts)}
    if len(found) > 1:
        found.discard("images")
    if len(found) == 1:
        return found.pop()
    if not found:
        raise JobConfigError(
            f"input {where} holds no Parquet, JSONL, image or .tar files: point --input at a dataset."
        )
    raise JobConfigError(f"input {where} mixes {' and '.join(sorted(found))} files: pass --format to pick one.")


def _columns(plan: SourcePlan) -> list[str]:
    """Column names of the first file (tables) or the first sample's JSON metadata (WebDataset)."""
    first = plan.url(plan.reads[0].files[0])
    fs, path = url_to_fs(first)
    if plan.format == "parquet":
        with fs.open(path, "rb") as f:
            return pq.read_schema(f).names
    if plan.format == "jsonl":
        with fs.open(path, "rb") as f:  # bytes that are not UTF-8 fail their read task, not the plan
            for line in _text_lines(f, errors="replace"):
                if line.strip():
                    try:
                        return list(json.loads(line))
                    except (json.JSONDecodeError, TypeError):
                        raise JobConfigError(f"{first} does not start with a JSON object per line.") from None
        return []
    if plan.format == "webdataset":
        for sample in _tar_samples(first):
            meta = sample.get("json")
            return list(json.loads(meta)) if meta else []
    return []


def _column(plan: SourcePlan, flag: str, requested: str | None, default: str) -> str | None:
    if requested is None:
        return default if default in plan.columns else None
    if requested not in plan.columns:
        where = "the JSON metadata of" if plan.format == "webdataset" else "the columns of"
        raise JobConfigError(
            f"{flag} {requested!r} is not in {where} {plan.url(plan.reads[0].files[0])} "
            f"(found: {', '.join(plan.columns) or 'none'}): pass one of those."
        )
    return requested


def source_row(plan: SourcePlan, record: dict) -> dict:
    """One SOURCE_SCHEMA row from a record of a caller's Dataset (`caption`): columns the record lacks are absent
    (no id: one derived from its prompt and image; no prompt: the default prompt)."""
    present = replace(plan, id_column=plan.id_column if plan.id_column in record else None,
                      prompt_column=plan.prompt_column if plan.prompt_column in record else None)
    digest = hashlib.blake2b(digest_size=12)
    for value in (record.get(plan.prompt_column), record.get(plan.image_column)):
        digest.update(value if isinstance(value, bytes) else repr(value).encode())
    return _row(present, "row-" + digest.hexdigest(), record, plan.image_column)


def _row(plan: SourcePlan, derived_id: str, record: dict, image_column: str | None) -> dict:
    """One SOURCE_SCHEMA row from a table record; anything wrong with it becomes this row's error."""
    try:
        return _checked_row(plan, derived_id, record, image_column)
    except Exception as exc:  # whatever the record holds, it is one row: never the read task's failure
        return {"id": derived_id, "prompt": None, "image": None, "image_url": None, "error": row_error(exc)}


def _checked_row(plan: SourcePlan, derived_id: str, record: dict, image_column: str | None) -> dict:
    row_id = record.get(plan.id_column) if plan.id_column else None
    prompt = record.get(plan.prompt_column) if plan.prompt_column else plan.default_prompt
    row = {"id": str(row_id) if row_id is not None else derived_id, "prompt": prompt, "image": None,
           "image_url": None, "error": None}
    if prompt is not None and not isinstance(prompt, str):
        row["prompt"], row["error"] = None, f"prompt is a {type(prompt).__name__}, not text"
    if image_column is None:
        return row
    value = record.get(image_column)
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str) and value.startswith("data:"):
        try:
            value = base64.b64decode(value.split(",", 1)[1], validate=True)
        except (IndexError, ValueError):
            row["error"] = "image data URL is not valid base64"
            return row
    if isinstance(value, (bytes, bytearray)):
        row["image"] = bytes(value) if value else None
    elif isinstance(value, str) and value.strip():
        row["image_url"] = resolve(value.strip(), plan.root)
    if row["image"] is None and row["image_url"] is None and row["error"] is None:
        row["error"] = "image is empty" if value in (b"", "") else "image is missing"
    return row


def _row_group_sizes(url: str) -> list[int] | None:
    """Rows per row group of a Parquet file, from its footer; None when it cannot be read (its read task says why)."""
    try:
        fs, path = url_to_fs(url)
        with fs.open(path, "rb") as f:
            metadata = pq.ParquetFile(f).metadata
        return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    except Exception:
        return None


def _row_group_reads(relative: str, sizes: list[int] | None) -> list[Read]:
    """A Parquet file's reads: runs of its row groups of about READ_ROWS rows (the whole file when it is one run,
    or its footer could not be read)."""
    runs = _runs(sizes or [])
    if len(runs) <= 1:
        return [Read((relative,))]
    return [Read((relative,), row_groups=(start, stop), first_row=first_row) for start, stop, first_row in runs]


def _runs(sizes: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive parts of these sizes (rows) gathered into runs of about READ_ROWS rows: (first part, stop, rows
    before the run)."""
    runs, start, before, rows = [], 0, 0, 0
    for part, size in enumerate(sizes):
        if rows and rows + size > READ_ROWS:
            runs.append((start, part, before))
            start, before, rows = part, before + rows, 0
        rows += size
    return runs + [(start, len(sizes), before)] if sizes else []


def _jsonl_reads(relative: str, url: str, pool: ThreadPoolExecutor) -> list[Read]:
    """A JSONL file's reads: runs of its pieces of about READ_ROWS rows (the whole file when it is one run, or its
    pieces could not be read: its read task says why)."""
    try:
        fs, path = url_to_fs(url)
        size = fs.size(path)
        pieces = [p for p in pool.map(partial(_jsonl_piece, fs, path, size), range(-(-size // JSONL_PIECE_BYTES)))
                  if p is not None]
    except Exception:
        return [Read((relative,))]
    runs = _runs([rows for _, _, _, rows in pieces])
    if len(runs) <= 1:
        return [Read((relative,))]
    lines_before = [0]
    for _, _, lines, _ in pieces:
        lines_before.append(lines_before[-1] + lines)
    return [Read((relative,), byte_range=(pieces[start][0], pieces[stop - 1][1]), first_row=first_row,
                 first_line=1 + lines_before[start]) for start, stop, first_row in runs]


def _jsonl_piece(fs, path: str, size: int, index: int) -> tuple[int, int, int, int] | None:
    """Piece `index` of a JSONL file: (start, stop, lines, rows) of the lines that start in its JSONL_PIECE_BYTES
    (bytes from a line's start to another's; rows: the lines that are not blank), None when none starts there."""
    begin, end = index * JSONL_PIECE_BYTES, min((index + 1) * JSONL_PIECE_BYTES, size)
    base = max(begin - 1, 0)  # the byte before the piece: a line starts at `begin` when it is a newline
    with fs.open(path, "rb") as f:
        f.seek(base)
        data = bytearray(f.read(end - base))
        start = 0 if begin == 0 else data.find(b"\n", 0, len(data) - 1) + 1
        if begin and not start:  # no line starts here: the piece lies inside a longer line, which its piece counts
            return None
        stop = len(data) if end == size else data.find(b"\n", end - 1 - base) + 1
        while not stop:  # the piece's last line goes on past it: read on to its end, or to the file's
            more = f.read(JSONL_PIECE_BYTES)
            if not more:  # the file ends without a newline
                stop = len(data)
            elif (newline := more.find(b"\n")) >= 0:
                stop = len(data) + newline + 1
            data += more
    lines = _text_lines(io.BytesIO(data[start:stop]), errors="replace")  # its read task says what is wrong
    count = rows = 0
    for line in lines:
        count, rows = count + 1, rows + bool(line.strip())
    return base + start, base + stop, count, rows


def _text_lines(binary, errors: str = "strict"):
    """The lines of UTF-8 text open for bytes (universal newlines, as a file open for text splits them)."""
    return io.TextIOWrapper(binary, encoding="utf-8", errors=errors, newline="")


class _Range(io.RawIOBase):
    """`length` bytes of a file open for bytes, from where it stands, and not a byte further (text decoding reads
    ahead: past a read's range, it failed on another read's bytes)."""

    def __init__(self, file, length: int):
        self.file, self.left = file, length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.file.read(min(len(buffer), self.left))
        buffer[: len(data)] = data
        self.left -= len(data)
        return len(data)


def _parquet_rows(plan: SourcePlan, relatives: list[str], row_groups: tuple[int, int] | None = None,
                  first_row: int = 0):
    wanted = [c for c in (plan.id_column, plan.prompt_column, plan.image_column) if c]
    groups = None if row_groups is None else list(range(*row_groups))
    for relative in relatives:
        fs, path = url_to_fs(plan.url(relative))
        index = first_row
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BATCH, columns=wanted, row_groups=groups):
                for record in batch.to_pylist():
                    yield _row(plan, f"{relative}#{index}", record, plan.image_column)
                    index += 1


def _jsonl_rows(plan: SourcePlan, relatives: list[str], byte_range: tuple[int, int] | None = None,
                first_row: int = 0, first_line: int = 1):
    for relative in relatives:
        fs, path = url_to_fs(plan.url(relative))
        with fs.open(path, "rb") as f:
            if byte_range:
                f.seek(byte_range[0])
            index = first_row
            lines = _text_lines(io.BufferedReader(_Range(f, byte_range[1] - byte_range[0])) if byte_range else f)
            for number, line in enumerate(lines, start=first_line):
                if not line.strip():
                    continue
                derived = f"{relative}#{index}"
                index += 1
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError
                except ValueError:
                    yield {"id": derived, "prompt": None, "image": None, "image_url": None,
                           "error": f"line {number} is not a JSON object"}
                    continue
                yield _row(plan, derived, record, plan.image_column)


def _image_rows(plan: SourcePlan, relatives: list[str]):
    for relative in relatives:
        yield {"id": relative, "prompt": plan.default_prompt, "image": None, "image_url": plan.url(relative),
               "error": None}


def _tar_samples(url: str):
    """WebDataset samples of one shard, as {extension: bytes, "__key__": key}, in shard order."""
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        sample: dict = {}
        for member in tar:
            if not member.isfile():
                continue
            directory, _, base = member.name.rpartition("/")
            key, _, extension = base.partition(".")
            key = f"{directory}/{key}" if directory else key
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample["__key__"] = key
            sample[extension.lower()] = tar.extractfile(member).read()
        if sample:
            yield sample


def _tar_rows(plan: SourcePlan, relatives: list[str]):
    image_extensions = [e.lstrip(".") for e in IMAGE_EXTENSIONS]
    for relative in relatives:
        for sample in _tar_samples(plan.url(relative)):
            try:
                meta = json.loads(sample["json"]) if "json" in sample else {}
            except ValueError:
                meta = {}
            row = _row(plan, f"{relative}/{sample['__key__']}", meta, image_column=None)
            row["image"] = next((sample[e] for e in image_extensions if sample.get(e)), None)
            if row["image"] is None and row["error"] is None:
                row["error"] = "image is missing"
            yield row


def image_from_row(row: dict) -> bytes | None:
    """The row's image bytes, fetched from image_url when not inline (raises OSError when unreachable)."""
    if row.get("image") is not None:
        return row["image"]
    if row.get("image_url"):
        fs, path = url_to_fs(row["image_url"])
        return fs.cat_file(path)
    return None
