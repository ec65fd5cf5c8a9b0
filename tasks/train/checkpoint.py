"""Crash-safe training checkpoints: files first, a marker last, and only marked folders count.

A checkpoint folder holds

- ``trainable.safetensors``: the trained parameters and every buffer (frozen weights come from the
  run's ``init`` model, so a checkpoint of the sd21 preset stays a fraction of the full model);
- ``ema.safetensors``: the EMA shadow of the trained parameters, when EMA is on;
- ``trainer_state.json`` + ``trainer_state.safetensors``: optimizer, LR scheduler, EMA counters,
  RNG states, step, history - the structure as JSON, its tensors and arrays in safetensors. No
  pickle: a checkpoint may sit on shared storage, and unpickling a file runs whatever code its
  writer put in it. Checkpoints of older versions (``trainer_state.pt``, a pickle) are refused,
  never opened;
- ``COMMITTED``: written last. It lists every other file with its size and SHA-256, so a folder
  that was copied only in part (Ray uploads checkpoints file by file, in no set order) is caught
  as surely as one whose writer was killed before the marker, and :func:`load_checkpoint` names
  the file that does not match.

Folders are named ``step-00000100``; :func:`latest_committed` ignores anything without a valid
marker, and :func:`prune` keeps the newest ``k`` committed ones.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pics_model.file_hashes import file_record, mismatch
from tasks import atomic

MARKER = "COMMITTED"
WEIGHTS = "trainable.safetensors"
EMA_WEIGHTS = "ema.safetensors"
STATE = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
PICKLED_STATE = "trainer_state.pt"  # the pickle of older versions: refused, never read
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


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; a contiguous CPU copy of each never does.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def write_checkpoint(directory: str | Path, state: CheckpointState, meta: dict | None = None) -> Path:
    """Write ``state`` into ``directory`` (created empty), fsync every file, then the marker."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if any(d.iterdir()):
        raise CheckpointError(f"{d}: checkpoint folder is not empty")
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode({"step": state.step, **state.trainer}, tensors, "trainer"))
    files = {WEIGHTS: lambda p: save_file(_cpu(state.weights), str(p)),
             STATE_TENSORS: lambda p: save_file(_cpu(tensors), str(p)),
             STATE: lambda p: Path(p).write_text(tree)}
    if state.ema is not None:
        files[EMA_WEIGHTS] = lambda p: save_file(_cpu(state.ema), str(p))
    manifest = {}
    for name, write in files.items():
        with atomic.atomic_path(d / name) as tmp:
            write(tmp)
        manifest[name] = file_record(d / name)
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
        int(marker["step"])
        if not isinstance(marker["files"], dict):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if verify and mismatch(d, marker["files"], MARKER) is not None:
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
    """The state of a committed checkpoint whose every file matches its marker. Raises
    :class:`CheckpointError` naming the file and the fix otherwise; never unpickles anything."""
    d = Path(directory)
    marker = read_marker(d, verify=False)
    if marker is None:
        raise CheckpointError(f"{d}: not a committed checkpoint (no valid {MARKER} marker)")
    refuse_pickled_state(d)
    problem = mismatch(d, marker["files"], MARKER)
    if problem is not None:
        raise CheckpointError(f"{problem}; {_fix(d)}")
    reading = d / STATE_TENSORS
    try:
        tensors = load_file(str(reading), device=str(map_location))
        reading = d / STATE
        trainer = _decode(json.loads(reading.read_text()), tensors)
        step = int(trainer.pop("step"))
        reading = d / EMA_WEIGHTS
        ema = load_file(str(reading), device=str(map_location)) if reading.exists() else None
        reading = d / WEIGHTS
        weights = load_file(str(reading), device=str(map_location))
    except (OSError, SafetensorError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{reading}: unreadable ({type(e).__name__}: {e}); {_fix(d)}") from e
    if step != int(marker["step"]):
        raise CheckpointError(f"{d}: marker says step {marker['step']}, state says {step}")
    return CheckpointState(step=step, weights=weights, trainer=trainer, ema=ema)


def refuse_pickled_state(directory: str | Path) -> None:
    """Raise :class:`CheckpointError` for a checkpoint of an older version, whose trainer state is
    a pickle: it is never opened, whoever wrote it."""
    d = Path(directory)
    if (d / PICKLED_STATE).exists():
        raise CheckpointError(f"{d / PICKLED_STATE}: trainer state in the pickle format of older versions, which is "
                              f"never loaded (unpickling a file can run any code); {_fix(d)}")


def _fix(d: Path) -> str:
    return f"delete the checkpoint folder {d} (training then resumes from an earlier checkpoint, or starts over)"


# -- the trainer state as JSON + safetensors -----------------------------------------------------
# JSON holds the structure; each tensor or numpy array becomes {"__tensor__": key} /
# {"__ndarray__": key} with its data under that key in the safetensors file. Tuples (AdamW's
# betas, random.getstate()) and dicts with non-string keys are tagged so they come back as they were.
_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__")


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if torch.is_tensor(obj) or isinstance(obj, np.ndarray):
        key = str(len(tensors))
        tensors[key] = obj if torch.is_tensor(obj) else torch.from_numpy(np.ascontiguousarray(obj))
        return {"__tensor__" if torch.is_tensor(obj) else "__ndarray__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        plain = all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)) in _TAGS)
        if plain:
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")]
                             for k, v in obj.items()]}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored without pickle")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1 and (tag := next(iter(node))) in _TAGS:
        value = node[tag]
        if tag == "__tensor__":
            return tensors[value]
        if tag == "__ndarray__":
            return tensors[value].cpu().numpy()
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    return {k: _decode(v, tensors) for k, v in node.items()}
