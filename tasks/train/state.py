"""One rank's training state and its checkpoints: what ``tasks.train.checkpoint`` writes (marker
last) through ``ray.train.report``, and how a (re)started worker finds and restores the newest
committed one, so its batches, noise and weights continue exactly where the checkpoint left them.
"""
from __future__ import annotations

import hashlib
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.train import checkpoint as ckpt
from tasks.train.builders import LossModule, Worker


def new_history() -> dict[str, list]:
    return {"train": [], "loss": [], "heldout": [], "events": [], "quarantine": [], "occlusion": []}


@dataclass
class TrainState:
    """What one rank trains and what its checkpoints hold. Built inside the worker; never pickled."""
    worker: Worker
    strategy: str  # ddp | fsdp
    model: nn.Module  # the unwrapped PICSModel: checkpoints, samples, EMA
    loss_module: LossModule  # the model's training loss as a module
    net: nn.Module  # loss_module under DDP/FSDP: what the ranks step together
    params: list[nn.Parameter]  # the trained parameters (FSDP: its views of them)
    param_names: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: Any | None  # diffusers EMAModel
    caches: dict = field(default_factory=dict)  # tasks.train.cache feature caches by name
    step: int = 0
    history: dict = field(default_factory=new_history)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_digest(model: nn.Module, names: list[str]) -> str:
    """SHA-256 over the named parameters' bytes: equal digests mean bit-identical weights."""
    params = dict(model.named_parameters())
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode())
        h.update(params[n].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def find_resume(reported: Path | None, run_dir: Path) -> tuple[ckpt.CheckpointState | None, str | None]:
    """The newest committed checkpoint among Ray's latest reported one (``reported``) and a scan
    of ``run_dir`` (which also finds checkpoints of a driver that died before Ray recorded them).
    Folders without a valid marker are ignored. Returns (state, path) or (None, None)."""
    best: tuple[int, str, ckpt.CheckpointState | None] | None = None
    if reported is not None and ckpt.is_committed(reported):
        state = ckpt.load_checkpoint(reported)
        best = (state.step, str(reported), state)
    scanned = ckpt.latest_committed(run_dir)
    if scanned is not None:
        step = int(ckpt.read_marker(scanned, verify=False)["step"])
        if best is None or step > best[0]:
            best = (step, str(scanned), None)
    if best is None:
        return None, None
    step, path, state = best
    return (state if state is not None else ckpt.load_checkpoint(path)), path


def find_resume_of_worker(run_dir: Path) -> tuple[ckpt.CheckpointState | None, str | None]:
    """:func:`find_resume` with the checkpoint Ray hands this worker (if any)."""
    import ray.train

    reported = ray.train.get_checkpoint()
    if reported is None:
        return find_resume(None, run_dir)
    with reported.as_directory() as d:  # a download when storage is remote
        return find_resume(Path(d), run_dir)


def load_weights(model: nn.Module, param_names: list[str], state: ckpt.CheckpointState) -> None:
    own = model.state_dict()
    unknown = sorted(set(state.weights) - set(own))
    missing = sorted(set(param_names) - set(state.weights))
    if unknown or missing:
        raise ckpt.CheckpointError(f"checkpoint does not match the model: unknown {unknown[:5]}, "
                                   f"missing {missing[:5]}")
    model.load_state_dict(state.weights, strict=False)


def restore(ts: TrainState, state: ckpt.CheckpointState, resumed_from: str) -> None:
    """Optimizer, schedule, EMA, random streams, history and step from ``state`` (the weights
    went in before the model was wrapped: :func:`load_weights`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(ts.net, ts.optimizer, state.trainer["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    ts.scheduler.load_state_dict(state.trainer["scheduler"])
    if ts.ema is not None:
        if state.ema is None:
            raise ckpt.CheckpointError("checkpoint has no EMA weights but train.ema_decay is set")
        ts.ema.load_state_dict({**state.trainer["ema"],
                                "shadow_params": [state.ema[n].to(ts.worker.device) for n in ts.param_names]})
    set_rng_state(state.trainer["rng"])
    ts.history = state.trainer["history"]
    ts.history.setdefault("occlusion", [])  # checkpoints written before the gate probe existed
    ts.step = state.step
    ts.history["events"].append({"step": ts.step, "event": "resumed", "from": resumed_from, "time": time.time()})


def save(ts: TrainState, metrics: dict, final: bool = False) -> None:
    """All ranks call this (FSDP gathers, and ray.train.report is a barrier); rank 0 writes the
    checkpoint into a local temporary folder and hands it to Ray, which copies it into the run."""
    import ray.train
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(ts.net, ts.optimizer, options=opts)
    if ts.worker.rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=ckpt.checkpoint_name(ts.step))
        return
    keep = set(ts.param_names) | {n for n, _ in ts.model.named_buffers()}
    weights = {k.removeprefix("model."): v for k, v in model_sd.items() if k.removeprefix("model.") in keep}
    ema = None
    trainer: dict[str, Any] = {"optimizer": optim_sd, "scheduler": ts.scheduler.state_dict(),
                               "rng": rng_state(), "history": ts.history}
    if ts.ema is not None:
        ema_sd = ts.ema.state_dict()
        ema = dict(zip(ts.param_names, ema_sd.pop("shadow_params")))
        trainer["ema"] = ema_sd
    meta = {"final": final, "world_size": ts.worker.world, "param_names_sha": hashlib.sha256(
        "\n".join(ts.param_names).encode()).hexdigest()}
    tmp = Path(tempfile.mkdtemp(prefix="pics-ckpt-"))
    try:
        ckpt.write_checkpoint(tmp / "c", ckpt.CheckpointState(ts.step, weights, trainer, ema), meta)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp / "c")),
                         checkpoint_dir_name=ckpt.checkpoint_name(ts.step))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
