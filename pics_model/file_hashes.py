"""Size and SHA-256 of saved files: recorded after the files are written, checked before they are read.

A model folder (``PICSModel.save_pretrained``) and a training checkpoint (``tasks.train.checkpoint``)
both record ``{file name: {"bytes": ..., "sha256": ...}}`` once their files are complete, so a
truncated, partly copied or bit-flipped file is refused by name instead of loading as a model
(safetensors checks its header, not the bytes of the tensors).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HASHES_NAME = "sha256.json"  # size + SHA-256 of the two files above, written after them


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


def replace_atomically(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model_folder(directory: str | Path, module, config_json: str, metadata: dict[str, str]) -> Path:
    """A model folder: ``config_json`` as config.json and every tensor of ``module`` as
    model.safetensors (each replaced atomically), then sha256.json with both files' size and
    SHA-256, written last so its presence means the other two are complete."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    writers = {WEIGHTS_NAME: lambda p: save_file(state, p, metadata={"format": "pt", **metadata}),
               CONFIG_NAME: lambda p: Path(p).write_text(config_json)}
    for name, write in writers.items():
        replace_atomically(d / name, write)
    hashes = json.dumps({name: file_record(d / name) for name in writers}, indent=2)
    replace_atomically(d / HASHES_NAME, lambda p: Path(p).write_text(hashes))
    return d
