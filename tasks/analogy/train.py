"""Train the contextual descriptor field on scene triplets: a plain torch loop on CPU.

Each step draws ``batch_scenes`` training scenes, builds a triplet of each (tasks/analogy/scenes.py)
and takes the InfoNCE loss between the anchor's query descriptors and the positive's descriptors at
the corresponding places, the negative scene's descriptors of the same object points being extra
negatives. The positive is read in a frame turned by a few degrees of noise, so that descriptors
tolerate the residual yaw the scene map's refinement has to remove.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from pics_model.context_field import ContextDescriptorField, FieldConfig, info_nce
from pics_model.scene_map import yaw
from tasks.analogy.scenes import Scene, Triplet, object_library, point_spacing, triplet, typical_object_size


@dataclass
class TrainConfig:
    steps: int = 400
    batch_scenes: int = 2
    queries: int = 48
    lr: float = 1e-3
    temperature: float = 0.2
    frame_noise_deg: float = 4.0
    yaw_noise_deg: float = 90.0
    shift_noise: float = 0.15
    drop: float = 0.2
    distractors: tuple[int, int] = (0, 2)
    jitter_shift: float = 0.0  # positive: each object also moved by N(0, this) on the floor
    jitter_yaw_deg: float = 0.0  # and turned by N(0, this)
    negative_min_yaw_deg: float = 0.0  # negative: each object turned by at least this
    negative_pivot: bool = False  # negative: one kept object stays, its queries' negatives differ by context only
    near: float = 0.0  # scene units: queries of one scene this close are not each other's negatives
    frame_negatives: bool = False  # also the positive at each query's wrong-candidate image (turned, flipped)
    num_yaws: int = 4
    seed: int = 0


def _descriptors(field: ContextDescriptorField, scene: Scene, at: np.ndarray, frame: torch.Tensor | None = None):
    return field(torch.from_numpy(at), torch.from_numpy(scene.points), torch.from_numpy(scene.label), frame)


def wrong_frames(t: Triplet, cfg: TrainConfig, rng: np.random.Generator) -> tuple[np.ndarray, torch.Tensor]:
    """Each query's image under a wrong coarse candidate, as the scene map draws them: turned about
    its object's footprint centre by k * 360 / num_yaws degrees, mirrored or not, (k, mirror) not
    (0, no), plus the frame noise; returns the images [Q, 3] and their frames [Q, 3, 3]."""
    n = len(t.queries)
    flip = rng.integers(2, size=n).astype(bool)
    k = rng.integers(cfg.num_yaws, size=n)
    k[~flip] = rng.integers(1, cfg.num_yaws, size=int((~flip).sum())) if cfg.num_yaws > 1 else 0
    frames = torch.stack([yaw(2 * np.pi * kk / cfg.num_yaws + np.deg2rad(rng.normal(0, cfg.frame_noise_deg)), bool(f))
                          for kk, f in zip(k, flip)])
    at = np.einsum("qij,qj->qi", frames.double().numpy(), t.queries - t.centre) + t.centre
    return at.astype(np.float32), frames


def triplet_loss(field: ContextDescriptorField, triplets: list[Triplet], cfg: TrainConfig,
                 rng: np.random.Generator) -> torch.Tensor:
    a, p, n = [], [], []
    for t in triplets:
        frame = yaw(np.deg2rad(rng.normal(0, cfg.frame_noise_deg)))
        a.append(_descriptors(field, t.anchor, t.queries))
        p.append(_descriptors(field, t.positive, t.positive_at, frame))
        n.append(_descriptors(field, t.negative, t.negative_at, frame))
        if cfg.frame_negatives:
            at, frames = wrong_frames(t, cfg, rng)
            n.append(field(torch.from_numpy(at)[:, None], torch.from_numpy(t.positive.points),
                           torch.from_numpy(t.positive.label), frames)[:, 0])
    return info_nce(torch.cat(a), torch.cat(p), torch.cat(n), cfg.temperature, near_pairs(triplets, cfg.near))


def near_pairs(triplets: list[Triplet], near: float) -> torch.Tensor | None:
    """[N, N] bool over all queries of the batch: the same scene and within ``near`` of each other
    (None when ``near`` is 0)."""
    if near <= 0:
        return None
    q = torch.from_numpy(np.concatenate([t.queries for t in triplets]))
    scene = torch.from_numpy(np.concatenate([np.full(len(t.queries), i) for i, t in enumerate(triplets)]))
    return (torch.cdist(q, q) < near) & (scene[:, None] == scene[None])


def train_field(scenes: list[Scene], field_cfg: FieldConfig, cfg: TrainConfig, log=None) -> tuple[
        ContextDescriptorField, list[dict]]:
    """The trained field and its loss curve [{step, loss, seconds}]."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    field_cfg.typical_object_size = typical_object_size(scenes)
    field_cfg.object_spacing, field_cfg.floor_spacing = point_spacing(scenes)
    field = ContextDescriptorField(field_cfg)
    library = object_library(scenes)
    opt = torch.optim.Adam(field.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    curve, t0 = [], time.perf_counter()
    for step in range(1, cfg.steps + 1):
        batch = [triplet(scenes[i], library, rng, cfg.queries, cfg.yaw_noise_deg, cfg.shift_noise, cfg.drop,
                         cfg.distractors, cfg.jitter_shift, cfg.jitter_yaw_deg, cfg.negative_min_yaw_deg,
                         cfg.negative_pivot) for i in rng.integers(len(scenes), size=cfg.batch_scenes)]
        loss = triplet_loss(field, batch, cfg, rng)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        curve.append({"step": step, "loss": float(loss.detach()), "seconds": round(time.perf_counter() - t0, 2)})
        if log and (step % 50 == 0 or step == cfg.steps):
            log(f"step {step}/{cfg.steps} loss {float(loss.detach()):.3f} ({time.perf_counter() - t0:.0f} s)")
    return field.eval(), curve
