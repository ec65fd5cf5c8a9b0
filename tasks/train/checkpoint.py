"""Crash-safe training checkpoints: files first, a marker last, and only marked folders count.

A checkpoint folder holds

- ``trainable.safetensors``: the trained parameters and every buffer (frozen weights come from the
  run's ``init`` model, so a checkpoint of the sd21 preset stays a fraction of the full model);
- ``ema.safetensors``: the EMA shadow of the trained parameters, when EMA is on;
- ``trainer_state.pt``: optimizer, LR scheduler, EMA counters, RNG states, step, history;
- ``COMMITTED``: written last. It lists every other file with its size and SHA-256, so a folder
  that was copied only in part (Ray uploads checkpoints file by file, in no set order) is caught
  as surely as one whose writer was killed before the marker.

Folders are named ``step-00000100``; :func:`latest_committed` ignores anything without a valid
marker, and :func:`prune` keeps the newest ``k`` committed ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tasks import atomic

MARKER = "COMMITTED"
WEIGHTS = "trainable.safetensors"
EMA_WEIGHTS = "ema.safetensors"
STATE = "trainer_state.pt"
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, uncommitted or does not match the model it is loaded into."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class CheckpointState:
    """Everything a worker needs to continue a run exactly where the checkpoint left it."""

    step: int
    weights: dict[str, torch.Tensor]
    trainer: dict[str, Any] = field(default_factory=dict)  # optimizer, scheduler, rng, history...
    ema: dict[str, torch.Tensor] | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; a contiguous CPU copy of each never does.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def write_checkpoint(directory: str | Path, state: CheckpointState, meta: dict | None = None) -> Path:
    """Write ``state`` into ``directory`` (created empty), fsync every file, then the marker."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if any(d.iterdir()):
        raise CheckpointError(f"{d}: checkpoint folder is not empty")
    files = {WEIGHTS: lambda p: save_file(_cpu(state.weights), str(p)),
             STATE: lambda p: torch.save({"step": state.step, **state.trainer}, p)}
    if state.ema is not None:
        files[EMA_WEIGHTS] = lambda p: save_file(_cpu(state.ema), str(p))
    manifest = {}
    for name, write in files.items():
        with atomic.atomic_path(d / name) as tmp:
            write(tmp)
        manifest[name] = {"bytes": (d / name).stat().st_size, "sha256": _sha256(d / name)}
    marker = {"step": state.step, "files": manifest, "time": time.time(), **(meta or {})}
    atomic.write_json(d / MARKER, marker)  # the commit point: nothing before it counts
    _fsync_dir(d)
    return d


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_marker(directory: str | Path, verify: bool = True) -> dict | None:
    """The marker of a committed folder, or None when it is absent, unreadable or (``verify``)
    when a listed file is missing or differs in size or hash."""
    d = Path(directory)
    try:
        marker = json.loads((d / MARKER).read_text())
        files = marker["files"]
        int(marker["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if verify:
        for name, info in files.items():
            p = d / name
            if not p.is_file() or p.stat().st_size != info["bytes"]:
                return None
            if _sha256(p) != info["sha256"]:
                return None
    return marker


def is_committed(directory: str | Path, verify: bool = True) -> bool:
    return read_marker(directory, verify) is not None


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """All ``step-*`` folders under ``root`` (committed or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(out)


def latest_committed(root: str | Path, verify: bool = True) -> Path | None:
    """The newest folder under ``root`` whose marker is present and whose files match it."""
    for _, path in reversed(list_checkpoints(root)):
        if is_committed(path, verify):
            return path
    return None


def prune(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` committed checkpoints, and uncommitted folders older
    than the newest committed one (leftovers of killed writers). Returns what was removed."""
    ckpts = list_checkpoints(root)
    committed = [(s, p) for s, p in ckpts if is_committed(p, verify=False)]
    if not committed:
        return []
    newest = committed[-1][0]
    keep_paths = {p for _, p in committed[-keep:]} if keep > 0 else set()
    removed = []
    for step, path in ckpts:
        stale = (path not in keep_paths) if is_committed(path, verify=False) else step <= newest
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    atomic.clean_tmp(root)
    return removed


def remove_uncommitted(root: str | Path) -> list[Path]:
    """Delete every ``step-*`` folder without a valid marker. Only when no writer is running
    (the driver calls it before the trainer starts)."""
    removed = []
    for _, path in list_checkpoints(root):
        if not is_committed(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> CheckpointState:
    d = Path(directory)
    marker = read_marker(d)
    if marker is None:
        raise CheckpointError(f"{d}: not a committed checkpoint (no valid {MARKER} marker)")
    trainer = torch.load(d / STATE, map_location=map_location, weights_only=False)
    step = int(trainer.pop("step"))
    if step != int(marker["step"]):
        raise CheckpointError(f"{d}: marker says step {marker['step']}, state says {step}")
    ema = load_file(str(d / EMA_WEIGHTS), device=str(map_location)) if (d / EMA_WEIGHTS).exists() else None
    return CheckpointState(step=step, weights=load_file(str(d / WEIGHTS), device=str(map_location)),
                           trainer=trainer, ema=ema)
