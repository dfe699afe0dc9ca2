"""Output rows and resume: what --resume guarantees about parts torn by a kill mid-write."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.job.output import OUTPUT_SCHEMA, existing_ids, output_row, parts_dir, remove_parts
from pipeline.job.resume import FinishedIds


def write_part(path, ids):
    rows = [output_row(i, "Describe.", None, "a failed row", {"gamma": "3"}) for i in ids]
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), path)


def test_every_prefix_of_a_part_is_found_torn_and_its_rows_redone(tmp_path):
    """Parquet writes its footer last, so whatever prefix a kill leaves is unreadable: resume removes it."""
    parts = tmp_path / "out" / "parts"
    parts.mkdir(parents=True)
    write_part(parts / "a.parquet", [f"a{i}" for i in range(50)])
    write_part(parts / "b.parquet", [f"b{i}" for i in range(50)])
    whole = (parts / "b.parquet").read_bytes()
    for cut in range(0, len(whole), max(1, len(whole) // 40)):
        (parts / "b.parquet").write_bytes(whole[:cut])
        ids, torn = existing_ids(str(tmp_path / "out"))
        assert len(ids) == 50 and all(f"a{i}" in ids for i in range(50)), cut  # b's rows are redone
        assert not ids.contains([f"b{i}" for i in range(50)]).any(), cut
        assert torn == [str(parts / "b.parquet")], cut
    remove_parts(str(tmp_path / "out"), torn)
    assert sorted(p.name for p in parts.iterdir()) == ["a.parquet"] and parts_dir(str(tmp_path / "out")) == str(parts)


def test_finished_ids_are_exact_and_compact():
    ids = [f"shard-{i // 1000}.parquet#{i % 1000}" for i in range(20000)]
    finished = FinishedIds.of([ids[:12000], ids[10000:15000]])  # overlapping batches, as parts may repeat ids
    assert len(finished) == 15000 and finished.high.nbytes + finished.low.nbytes == 15000 * 16
    found = finished.contains(ids)
    assert found[:15000].all() and not found[15000:].any()
    assert "shard-3.parquet#7" in finished and "shard-3.parquet#7 " not in finished
    assert not FinishedIds() and FinishedIds().contains(["x"]).tolist() == [False]
