"""Size and SHA-256 of saved files: recorded after the files are written, checked before they are read.

A model folder (``PICSModel.save_pretrained``) and a training checkpoint (``tasks.train.checkpoint``)
both record ``{file name: {"bytes": ..., "sha256": ...}}`` once their files are complete, so a
truncated, partly copied or bit-flipped file is refused by name instead of loading as a model
(safetensors checks its header, not the bytes of the tensors).
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of one file's bytes, read in chunks (the one file hash of the project)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_record(path: str | Path) -> dict:
    """``{"bytes": size, "sha256": hex digest}`` of one file."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def mismatch(directory: str | Path, records: dict, listed_in: str) -> str | None:
    """Which file of ``directory`` differs from its entry in ``records`` (read from the file
    ``listed_in``) and how, or None when every listed file matches."""
    for name, rec in records.items():
        p = Path(directory) / name
        try:
            size, want_size, want_sha = p.stat().st_size, int(rec["bytes"]), str(rec["sha256"])
        except FileNotFoundError:
            return f"{p}: missing ({listed_in} lists it)"
        except (OSError, KeyError, TypeError, ValueError) as e:
            return f"{p}: unreadable, or its entry in {listed_in} is malformed ({type(e).__name__}: {e})"
        if size != want_size:
            return f"{p}: {size} bytes, {listed_in} recorded {want_size} (truncated or copied in part)"
        if file_record(p)["sha256"] != want_sha:
            return f"{p}: its sha256 differs from the one {listed_in} recorded (the file is corrupted)"
    return None
