"""Held-out evaluation during training: the denoising loss and the alpha gate's occlusion-order
accuracy on a fixed held-out set, with noise fixed per item (so they compare across steps, runs
and numbers of workers). Rank r takes items r, r + W, ...; the sums are all-reduced, so every rank
returns the same values. Sample composites are ``tasks.train.samples``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from tasks.train.data import step_seed, to_device

if TYPE_CHECKING:
    from tasks.train.state import TrainState


def gate_probe(model: nn.Module, batch: dict, timesteps, generator: torch.Generator) -> list[list[tuple]]:
    """A batch of one held-out item, its target noised at each of ``timesteps`` (noise and latent
    drawn from ``generator``), objects always kept; one forward. Returns per timestep the per-ITB
    (weights, routed) maps of ``pipeline_pics.block_gates``."""
    from pics_model.pipeline_pics import block_gates

    dev, k = model.device, len(timesteps)
    latents = model.encode_images(batch["target"].to(dev), generator).to(model.dtype)
    latents = latents.expand(k, *latents.shape[1:])
    noise = torch.randn(latents.shape, generator=generator, device=dev, dtype=latents.dtype)
    t = torch.as_tensor(list(timesteps), device=dev, dtype=torch.long)
    noisy = model.noise_scheduler.add_noise(latents, noise, t)
    priors = batch.get("priors")
    codes = model.encode_objects(batch["objects"].to(dev), None if priors is None else priors.to(dev),
                                 None if priors is None else batch["prior_valid"].to(dev))

    def rep(x: torch.Tensor) -> torch.Tensor:
        return x.to(dev).repeat(k, *([1] * (x.ndim - 1)))

    valid = batch.get("object_valid")
    sink: list = []
    ctx = model.routing(rep(codes), rep(batch["routing_masks"]), None if valid is None else rep(valid), sink)
    model.denoise(noisy, t, rep(batch["hint"]), ctx)
    return [block_gates(sink, ctx, row=i) for i in range(k)]


@dataclass
class HeldOut:
    """The fixed held-out set: each item a batch of one without augmentation, and per item which
    object is visible where they occlude (empty where unknown; [] when the probe is off)."""
    items: list[dict]
    truths: list
    timesteps: list[int]  # train.occlusion_timesteps: the gate probe's noise levels


def load_heldout(shards_dir, count: int, builder, timesteps: list[int]) -> HeldOut:
    """The first ``count`` test rows (training rows when the shards have no test split)."""
    from tasks.evaluate.occlusion import occlusion_truth
    from tasks.shards import decode_sample
    from tasks.train.batches import heldout_items, heldout_rows

    rows = heldout_rows(shards_dir, count)
    # which object is visible where they occlude (embedded data: amodal masks); empty elsewhere
    truths = [occlusion_truth(decode_sample(r)) for r in rows] if timesteps else []
    return HeldOut(heldout_items(builder, rows), truths, list(timesteps))


def _eval_net(state: TrainState) -> nn.Module:
    # FSDP: only the wrapper holds whole weights; DDP: the local module, no collective per forward
    return state.net if state.strategy == "fsdp" else state.loss_module


def _items_of_rank(state: TrainState, n: int):
    """(index, item index) of this rank's items, padded to the same count on every rank."""
    w = state.worker
    for k in range(math.ceil(n / w.world)):
        i = k * w.world + w.rank
        yield i, min(i, n - 1)


@torch.no_grad()
def heldout_loss(state: TrainState, items: list[dict], seed: int) -> float:
    """Mean loss over ``items`` with fixed noise and timesteps per item (independent of the
    number of workers), without conditioning dropout and without the gate's occlusion-order term:
    it measures the conditional denoiser, comparable across ``train.gate_loss_weight``."""
    import torch.distributed as dist

    w, net = state.worker, _eval_net(state)
    was_training = state.model.training
    state.model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for i, j in _items_of_rank(state, len(items)):
        gen = torch.Generator(w.device).manual_seed(step_seed(seed, -1, i, stream=1))
        with w.autocast():
            loss, _ = net(to_device(items[j], w.device), gen, cond_drop_prob=0.0, gate_weight=0.0)
        if i < len(items):  # padding rounds keep FSDP's collectives in step; they do not count
            total += torch.tensor([float(loss), 1.0], dtype=torch.float64)
    if w.world > 1:
        dist.all_reduce(total)
    state.model.train(was_training)
    return float(total[0] / total[1])


@torch.no_grad()
def heldout_occlusion(state: TrainState, heldout: HeldOut, seed: int) -> dict | None:
    """Occlusion-order accuracy of the gate on the held-out items (tasks/evaluate/occlusion.py) at
    ``heldout.timesteps``, fixed noise per item. None when the probe is off or no item knows its
    occlusion order."""
    import torch.distributed as dist

    from tasks.evaluate import occlusion

    ts, items, truths = heldout.timesteps, heldout.items, heldout.truths
    if not ts or not any(truths):
        return None
    w, net, model = state.worker, _eval_net(state), state.model
    lat = model.config.latent_size
    levels = [int(math.isqrt(n)) for n in model.token_counts((lat, lat))]
    nl = len(levels)
    rows = torch.zeros(len(items), 2 * len(ts) * nl + 2 * nl, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for i, j in _items_of_rank(state, len(items)):
        gen = torch.Generator(w.device).manual_seed(step_seed(seed, -1, i, stream=2))
        with w.autocast():
            gates = net(to_device(items[j], w.device), gen, gate_timesteps=ts)
        if i < len(items) and truths[i]:  # padding rounds keep FSDP's collectives in step
            st = occlusion.sample_stats(gates, truths[i], levels)
            rows[i] = torch.from_numpy(np.concatenate([st["credit"].ravel(), st["ties"].ravel(),
                                                       st["routed"], st["pixels"]]))
    if w.world > 1:
        dist.all_reduce(rows)
    model.train(was_training)
    n_sl = len(ts) * nl
    stats = [{"levels": levels, "credit": r[:n_sl].reshape(len(ts), nl),
              "ties": r[n_sl:2 * n_sl].reshape(len(ts), nl),
              "routed": r[2 * n_sl:2 * n_sl + nl], "pixels": r[2 * n_sl + nl:]} for r in rows.numpy()]
    out = occlusion.summarize(stats)
    if out is not None:
        out["occlusion_by_timestep"] = dict(zip(map(str, ts), out.pop("occlusion_curve", [])))
    return out


def evaluate_heldout(state: TrainState, heldout: HeldOut, seed: int, weights: str) -> None:
    """The held-out loss and the gate's occlusion accuracy at this step, into the history.
    ``weights``: "raw" or "ema", which weights the model holds now."""
    loss = heldout_loss(state, heldout.items, seed)
    state.history["heldout"].append({"step": state.step, "loss": loss, "weights": weights})
    occ = heldout_occlusion(state, heldout, seed)
    if occ is not None:
        state.history["occlusion"].append({"step": state.step, "weights": weights, **occ})
