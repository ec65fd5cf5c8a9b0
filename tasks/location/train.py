"""Training the location model: stage 1 maximum likelihood on positives, stage 2 DPO.

A plain torch loop in one process (the model trains in tens of seconds on 2 cores; a Ray Train
worker group would cost more to start than the training takes). Stage 2 starts from a copy of
stage 1 and keeps stage 1 frozen as DPO's reference policy.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pics_model.location_model import LocationConfig, LocationModel, dpo_loss, mle_loss

log = logging.getLogger(__name__)


@dataclass
class Batchable:
    """Queries as tensors: images [N, 3, S, S] in [0, 1], class ids [N], positives and negatives as
    (query index [M], normalised box [M, 4]) and DPO pairs (positive row, negative row) [P, 2]."""

    images: torch.Tensor
    classes: torch.Tensor
    pos_query: torch.Tensor
    pos_box: torch.Tensor
    neg_query: torch.Tensor
    neg_box: torch.Tensor
    pairs: torch.Tensor


def image_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, size, size] in [0, 1] (boxes are normalised, so stretching is exact)."""
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def normalise(boxes: np.ndarray, width: int, height: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4) / np.array([width, height, width, height],
                                                                                   np.float32))


def to_tensors(queries: list[dict], class_names: list[str], size: int) -> Batchable:
    images = torch.stack([image_tensor(q["image"], size) for q in queries]) if queries else torch.zeros(0, 3, size, size)
    classes = torch.tensor([class_names.index(q["category"]) for q in queries], dtype=torch.long)
    pq, pb, nq, nb, pairs = [], [], [], [], []
    for i, q in enumerate(queries):
        p0, n0 = len(pq), len(nq)
        pos, neg = normalise(q["positives"], q["width"], q["height"]), normalise(q["negatives"], q["width"], q["height"])
        pq += [i] * len(pos)
        pb.append(pos)
        nq += [i] * len(neg)
        nb.append(neg)
        pairs += [(p0 + a, n0 + b) for a in range(len(pos)) for b in range(len(neg))]
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, 4)  # noqa: E731
    return Batchable(images, classes, torch.tensor(pq, dtype=torch.long), cat(pb), torch.tensor(nq, dtype=torch.long),
                     cat(nb), torch.tensor(pairs, dtype=torch.long).reshape(-1, 2))


def flip(images: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror the rows where ``mask`` [B] is True: images [B, 3, S, S] and boxes [B, 4] (plausibility
    of a placement does not change in a mirror, and the data is small)."""
    images = torch.where(mask[:, None, None, None], images.flip(-1), images)
    mirrored = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1)
    return images, torch.where(mask[:, None], mirrored, boxes)


class FeatureCache:
    """A frozen encoder's features of every training image and of its mirror, computed once
    (the encoder is the costly part of a step); None for a trainable encoder."""

    def __init__(self, model: LocationModel, images: torch.Tensor, chunk: int = 64):
        self.plain = self.mirrored = None
        if model.frozen_encoder:
            with torch.no_grad():
                enc = lambda x: torch.cat([model.image_features(x[i:i + chunk]) for i in range(0, len(x), chunk)])  # noqa: E731
                self.plain, self.mirrored = enc(images), enc(images.flip(-1))

    def get(self, query: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor | None:
        """Features of images ``query`` [B], mirrored where ``mirrored`` [B] is True."""
        if self.plain is None:
            return None
        return torch.where(mirrored[:, None, None], self.mirrored[query], self.plain[query])


def train_mle(cfg: LocationConfig, data: Batchable, steps: int, batch_size: int, lr: float, seed: int,
              curve: list[dict], label_sigma: float = 0.0) -> LocationModel:
    """Stage 1: a fresh model fitted to the positives (targets smoothed over ``label_sigma`` bins)."""
    torch.manual_seed(seed)
    model = LocationModel(cfg)
    model.train()
    cache = FeatureCache(model, data.images)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(data.pos_box), (batch_size,), generator=g)
        q = data.pos_query[idx]
        mirror = torch.rand(batch_size, generator=g) < 0.5
        images, boxes = flip(data.images[q], data.pos_box[idx], mirror)
        prefix = model.condition(images, data.classes[q], features=cache.get(q, mirror))
        loss = mle_loss(model, prefix, model.tokens_of(boxes), label_sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            curve.append({"stage": "mle", "step": step, "loss": round(float(loss.detach()), 5),
                          "seconds": round(time.perf_counter() - t0, 2)})
    return model.eval()


def pair_logprobs(model: LocationModel, data: Batchable, idx: torch.Tensor,
                  flip_mask: torch.Tensor, cache: FeatureCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p of the positive and negative box of pairs ``idx`` [B] -> ([B], [B])."""
    pi, ni = data.pairs[idx, 0], data.pairs[idx, 1]
    q = data.pos_query[pi]
    images, pos = flip(data.images[q], data.pos_box[pi], flip_mask)
    _, neg = flip(data.images[q], data.neg_box[ni], flip_mask)
    prefix = model.condition(images, data.classes[q], features=None if cache is None else cache.get(q, flip_mask))
    both = model.box_logprob(torch.cat([prefix, prefix]), model.tokens_of(torch.cat([pos, neg])))
    return both[:len(idx)], both[len(idx):]


def train_dpo(stage1: LocationModel, data: Batchable, steps: int, batch_size: int, lr: float, beta: float,
              seed: int, curve: list[dict]) -> LocationModel:
    """Stage 2: DPO from stage 1 on (positive, negative) pairs of the same query, stage 1 frozen as
    the reference."""
    if not len(data.pairs) or steps == 0:
        return copy.deepcopy(stage1)
    policy = copy.deepcopy(stage1).train()
    reference = stage1.eval().requires_grad_(False)
    cache = FeatureCache(reference, data.images)  # a frozen encoder is the same in both models
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(data.pairs), (batch_size,), generator=g)
        fl = torch.rand(batch_size, generator=g) < 0.5
        with torch.no_grad():
            ref_w, ref_l = pair_logprobs(reference, data, idx, fl, cache)
        pol_w, pol_l = pair_logprobs(policy, data, idx, fl, cache)
        loss = dpo_loss(pol_w, pol_l, ref_w, ref_l, beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            margin = float(((pol_w - ref_w) - (pol_l - ref_l)).mean().detach())
            curve.append({"stage": "dpo", "step": step, "loss": round(float(loss.detach()), 5),
                          "margin": round(margin, 4), "seconds": round(time.perf_counter() - t0, 2)})
    return policy.eval()
