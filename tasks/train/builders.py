"""What one rank trains with, built from the run plan: the model, its DDP/FSDP wrapper, AdamW, the
learning-rate schedule (diffusers' ``get_scheduler``) and EMA (diffusers' ``EMAModel``).

Each builder is a plain function of the plan's typed ``train`` section; ``tasks.train.loop`` calls
them in order (the order matters: resumed weights go in before the wrapper broadcasts rank 0's).
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tasks.params import TrainParams
from tasks.train.evaluation import gate_probe
from tasks.train.plan import RunPlan


@dataclass(frozen=True)
class Worker:
    """Where this rank runs: its place in the worker group and its device."""
    rank: int
    world: int
    device: torch.device
    amp: bool  # bf16 autocast (train.mixed_precision, resolved by the plan)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)


def current_worker(plan: RunPlan) -> Worker:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    if world != plan.params.train.num_workers:
        raise RuntimeError(f"world size {world} != train.num_workers {plan.params.train.num_workers}")
    return Worker(ctx.get_world_rank(), world, ray.train.torch.get_device(), plan.mixed_precision == "bf16")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class LossModule(nn.Module):
    """DDP and FSDP only synchronise through ``forward``: route ``training_loss`` through it."""

    def __init__(self, model: nn.Module, prediction_type: str, mask_weight: float, gate_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.prediction_type = prediction_type
        self.mask_weight = mask_weight
        self.gate_weight = gate_weight

    def forward(self, batch: dict, generator: torch.Generator | None = None, gate_timesteps=None, **kwargs):
        if gate_timesteps is not None:  # the held-out gate probe, through forward for the same reason
            return gate_probe(self.model, batch, gate_timesteps, generator)
        kwargs = {"mask_weight": self.mask_weight, "gate_weight": self.gate_weight, **kwargs}
        return self.model.training_loss(batch, generator=generator, prediction_type=self.prediction_type, **kwargs)


def build_model(plan: RunPlan):
    """The run's starting model (``<run_dir>/init``) in train mode, with ``train.trainable``
    unfrozen and the speed-ups on. Returns (model, trained parameters, their names)."""
    from pics_model.modeling_pics import PICSModel

    t = plan.params.train
    model = PICSModel.from_pretrained(plan.init_dir)
    # train() now, before any forward: PICSModel's train() is what switches the frozen object
    # backbone's BatchNorm to eval; a fresh model still has it in batch-statistics mode
    model.train()
    params = model.set_trainable(t.trainable)
    ids = {id(p) for p in params}
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    if not names:
        raise ValueError(f"train.trainable={t.trainable!r} selects no parameters")
    denoisers = (model.unet, model.controlnet)
    if t.grad_checkpointing:
        for part in denoisers:
            part.enable_gradient_checkpointing()
    if t.compile:
        for part in denoisers:  # in place, so state-dict keys keep their names
            part.compile()
    return model, params, names


def attach_caches(model, plan: RunPlan) -> dict:
    """The frozen encoders' feature caches (``tasks.train.cache``); {} when train.feature_cache is off."""
    t = plan.params.train
    if not t.feature_cache:
        return {}
    from tasks.train.cache import attach_feature_cache

    return attach_feature_cache(model, objects=plan.augment is None, max_mb=t.feature_cache_mb)


def wrap_model(loss_module: LossModule, strategy: str) -> nn.Module:
    """``loss_module`` under DDP or FSDP through Ray Train (unwrapped when the group has one worker)."""
    import ray.train.torch

    kwargs: dict = {}
    if strategy == "ddp":
        # Trainable experts get no gradient on batches without their region (e.g. no overlap).
        kwargs = {"find_unused_parameters": True}
    elif strategy == "fsdp":
        from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

        kwargs = {"use_orig_params": True,  # frozen and trained weights share FSDP units
                  "auto_wrap_policy": functools.partial(size_based_auto_wrap_policy, min_num_params=int(2e7))}
    return ray.train.torch.prepare_model(loss_module, parallel_strategy=strategy, parallel_strategy_kwargs=kwargs)


def build_optimizer(params: list[nn.Parameter], t: TrainParams) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainParams):
    """``train.lr_schedule`` with ``train.warmup_steps`` of linear warm-up, through diffusers.

    Update ``s`` (0-based) runs at position ``s + 1`` of the schedule: diffusers' warm-up starts at
    0, and a first update at learning rate 0 would waste a batch. So the warm-up goes 1/W, 2/W, ..,
    1 (as this stage always did) and the cosine spans positions 1..steps of a ``steps + 1`` horizon,
    so that no update runs at either end's zero either."""
    from diffusers.optimization import get_scheduler

    for group in optimizer.param_groups:  # what a scheduler started past position 0 scales from
        group.setdefault("initial_lr", group["lr"])
    name = "cosine" if t.lr_schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps + 1,
                         last_epoch=0)


def build_ema(params: list[nn.Parameter], t: TrainParams):
    """diffusers' EMAModel over the trained parameters; None when train.ema_decay is null."""
    if not t.ema_decay:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=t.ema_decay)
