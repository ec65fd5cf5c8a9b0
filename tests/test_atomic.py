"""Atomic writes: a failed writer leaves neither a partial file nor the temporary one."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import atomic, quarantine


def test_failed_write_leaves_old_content_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    atomic.write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-way")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_dir_replaces_whole_directory(tmp_path):
    d = tmp_path / "ckpt"
    with atomic.atomic_dir(d) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError):
        with atomic.atomic_dir(d) as tmp:
            (tmp / "b").write_text("2")
            raise ValueError
    assert sorted(p.name for p in d.iterdir()) == ["a"]
    with atomic.atomic_dir(d) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in d.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_clean_tmp_removes_leftovers(tmp_path):
    (tmp_path / f"{atomic.TMP_PREFIX}x.parquet.123").write_bytes(b"")
    (tmp_path / f"{atomic.TMP_PREFIX}dir.1").mkdir()
    (tmp_path / "keep.parquet").write_bytes(b"")
    assert atomic.clean_tmp(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.parquet"]


def test_quarantine_round_trip(tmp_path):
    recs = [
        quarantine.QuarantineRecord("decompose", "missing_image", "no such file", "img/1.jpg", 1, None),
        quarantine.QuarantineRecord("decompose", "invalid_polygon", "3 coordinates", "ann.json", 2, 7),
        quarantine.QuarantineRecord("decompose", "missing_image", "", "img/3.jpg", 3, None),
    ]
    path = quarantine.write(tmp_path / "q.parquet", recs)
    t = pq.read_table(path)
    assert t.schema.equals(quarantine.SCHEMA)
    assert t.column("reason").to_pylist() == ["missing_image", "invalid_polygon", "missing_image"]
    assert t.column("annotation_id").to_pylist() == [None, 7, None]
    assert quarantine.counts(recs) == {"invalid_polygon": 1, "missing_image": 2}
    assert quarantine.to_table([]).num_rows == 0 and isinstance(quarantine.to_table([]), pa.Table)
