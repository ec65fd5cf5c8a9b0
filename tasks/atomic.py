"""Writes that are never visible half-done: write under a temporary name, then rename.

A rename within one directory is atomic on POSIX file systems, so a reader sees either the old
file, the new one, or none, never a partial one. Temporary names start with ``.tmp-`` so readers
(and resume logic) can ignore leftovers of a killed run.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TMP_PREFIX = ".tmp-"


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")


def _name_real_path(e: OSError, tmp: Path, path: Path) -> None:
    """A failed write(2) (e.g. disk full) names no file, a failed open the temporary one: make the
    error name the path the caller asked for."""
    if e.filename is None or e.filename == str(tmp):
        e.filename = str(path)


@contextmanager
def _staged(path: str | Path) -> Iterator[tuple[Path, Path]]:
    """(``path``, a temporary sibling to build it in): the sibling is removed whatever happens,
    and a failed write names ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield path, tmp
    except OSError as e:
        _name_real_path(e, tmp, path)
        raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path; on success it is fsynced and renamed onto ``path``."""
    with _staged(path) as (path, tmp):
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_parquet(path: str | Path, table, **write_options) -> Path:
    """``table`` as parquet (``pq.write_table`` options; zstd unless ``compression`` is given)."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **{"compression": "zstd", **write_options})
    return Path(path)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` in one rename."""
    with _staged(path) as (path, tmp):
        tmp.mkdir()
        yield tmp
        if path.exists():
            old = _tmp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)


def clean_tmp(directory: str | Path) -> int:
    """Remove leftovers of killed writers in ``directory``; returns how many were removed."""
    n = 0
    d = Path(directory)
    if not d.exists():
        return 0
    for p in d.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        n += 1
    return n
