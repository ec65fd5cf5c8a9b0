"""Neural contextual scene map: a dense map F(x) = s R x + t + d(x) from a source scene to a
target scene that carries each region to the region with the same spatial context (Kim et al.,
ICCV 2025), computed from a trained `ContextDescriptorField`.

- Coarse stage: candidate similarity transforms, one per (source query object, target object of
  the same class, yaw k * 2 pi / num_yaws, with and without a mirror flip, scale): the rotation
  turns about the source object's centroid and the translation lands it on the target object's
  centroid. Each candidate costs the mean squared distance between the source descriptors of the
  query points and the target descriptors at their images, read in the candidate's frame. The
  ``topk`` cheapest are refined: each query point is matched to the nearby target point with the
  closest descriptor, a confidence-weighted yaw-only Procrustes updates the transform, a few
  rounds; the transform with the lowest cost (refined or not) wins.
- Fine stage: per-point displacements d(x) towards each point's descriptor match, made smooth by
  a thin-plate-spline RBF interpolator (scipy) fitted on the query points.

Scenes are given as tensors: points [P, 3] float, labels [P] int (-1 floor), instance [P] int (-1 floor).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.interpolate import RBFInterpolator

from .context_field import MAX_DISTANCES, ContextDescriptorField, thin_scene


@dataclass
class MapConfig:
    num_yaws: int = 4
    flips: bool = True
    scales: tuple[float, ...] = (1.0,)
    coarse_queries: int = 128  # query points the candidates are scored on (a fixed random subset)
    max_query_objects: int = 4  # source objects nearest the query that seed candidates
    topk: int = 3  # candidates refined
    refine_iters: int = 4
    match_radius: float = 0.5  # in field radii: how far from its image a point's match may lie
    match_temperature: float = 0.05  # confidence exp(-squared descriptor distance / temperature)
    fine: bool = True  # False: the coarse-only ablation
    rbf_smoothing: float = 0.5
    fine_queries: int = 1024  # query points the fine stage's spline is fitted on (a fixed random subset)
    thin_dense: bool = False  # read a scene sampled far more densely than the field's training scenes thinned (`thin_scene`)
    seed: int = 0


@dataclass
class Similarity:
    """x -> scale * x @ rotation.T + translation; ``rotation`` may hold a mirror flip."""
    rotation: torch.Tensor  # [3, 3]
    scale: float
    translation: torch.Tensor  # [3]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x @ self.rotation.T + self.translation


@dataclass
class SceneMap:
    """A computed map: ``transform`` (coarse) and, with the fine stage, the RBF of displacements."""
    transform: Similarity
    cost: float
    displacement: RBFInterpolator | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.transform.apply(x)
        if self.displacement is not None:
            y = y + torch.as_tensor(self.displacement(x.double().numpy()), dtype=y.dtype)
        return y


def yaw(angle: float, flip: bool = False) -> torch.Tensor:
    c, s = np.cos(angle), np.sin(angle)
    r = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float32)
    return r @ torch.diag(torch.tensor([-1.0, 1.0, 1.0])) if flip else r


def _centroids(points: torch.Tensor, instance: torch.Tensor) -> dict[int, torch.Tensor]:
    return {int(k): points[instance == k].mean(0) for k in torch.unique(instance[instance >= 0])}


def _label_of(labels: torch.Tensor, instance: torch.Tensor) -> dict[int, int]:
    return {int(k): int(labels[instance == k][0]) for k in torch.unique(instance[instance >= 0])}


def query_objects(query: torch.Tensor, points: torch.Tensor, instance: torch.Tensor, limit: int) -> list[int]:
    """Source objects nearest the query points (by their closest point), at most ``limit``."""
    objs = [int(k) for k in torch.unique(instance[instance >= 0])]
    near = [float(torch.cdist(query, points[instance == k]).min()) for k in objs]
    return [objs[i] for i in np.argsort(near)[:limit]]


def candidates(query: torch.Tensor, source: dict, target: dict, cfg: MapConfig) -> list[Similarity]:
    """Similarity transforms from each query object onto each same-class target object, per yaw,
    flip and scale. A pair of scenes with no class in common falls back to centroid alignment."""
    src_c, tgt_c = _centroids(source["points"], source["instance"]), _centroids(target["points"], target["instance"])
    src_l, tgt_l = _label_of(source["labels"], source["instance"]), _label_of(target["labels"], target["instance"])
    pairs = [(a, b) for a in query_objects(query, source["points"], source["instance"], cfg.max_query_objects)
             for b in tgt_c if src_l[a] == tgt_l[b]]
    anchors = [(src_c[a], tgt_c[b]) for a, b in pairs] or [(query.mean(0), target["points"].mean(0))]
    out = []
    for a, b in anchors:
        for k in range(cfg.num_yaws):
            for flip in ([False, True] if cfg.flips else [False]):
                r = yaw(2 * np.pi * k / cfg.num_yaws, flip)
                for s in cfg.scales:
                    out.append(Similarity(r, float(s), b - s * a @ r.T))
    return out


@torch.no_grad()
def costs(field: ContextDescriptorField, query: torch.Tensor, query_desc: torch.Tensor, target: dict,
          transforms: list[Similarity], chunk: int = 32) -> torch.Tensor:
    """[C] mean squared descriptor distance between the query points and their images."""
    out = []
    for i in range(0, len(transforms), chunk):
        part = transforms[i:i + chunk]
        images = torch.stack([t.apply(query) for t in part])
        frames = torch.stack([t.rotation for t in part])
        scales = torch.tensor([t.scale for t in part])
        d = field(images, target["points"], target["labels"], frames, scales)
        out.append(((d - query_desc) ** 2).sum(-1).mean(-1))
    return torch.cat(out)


@torch.no_grad()
def matches(field: ContextDescriptorField, query: torch.Tensor, query_desc: torch.Tensor, target: dict,
            t: Similarity, cfg: MapConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query point's descriptor match among the target points near its image: the matched
    position [Q, 3] (its own image where nothing is near) and a confidence [Q] in (0, 1],
    exp(-squared descriptor distance / temperature); 0 where nothing is near. Query rows go in
    chunks that hold at most ``MAX_DISTANCES`` descriptor-dimension entries (any scene size)."""
    image = t.apply(query)
    reach = cfg.match_radius * field.config.radius * t.scale
    points = target["points"]
    step = max(1, MAX_DISTANCES // max(len(points), 1))
    used = torch.zeros(len(points), dtype=torch.bool)  # only the target points some image can reach need descriptors
    for i in range(0, len(image), step):
        used |= (torch.cdist(image[i:i + step], points) <= reach).any(0)
    pts = points[used]
    best, idx = torch.full((len(query),), float("inf")), torch.zeros(len(query), dtype=torch.long)
    if len(pts):
        tgt_desc = field(pts, points, target["labels"], t.rotation, t.scale)
        step = max(1, MAX_DISTANCES // (len(pts) * tgt_desc.shape[1]))
        for i in range(0, len(image), step):
            near = torch.cdist(image[i:i + step], pts) <= reach
            dist = ((query_desc[i:i + step, None] - tgt_desc[None]) ** 2).sum(-1).masked_fill(~near, float("inf"))
            best[i:i + step], idx[i:i + step] = dist.min(1)
    has = torch.isfinite(best)
    matched = torch.where(has[:, None], pts[idx] if len(pts) else image, image)
    return matched, torch.where(has, torch.exp(-best.clamp(max=1e4) / cfg.match_temperature), torch.zeros_like(best))


def procrustes_yaw(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, flip: torch.Tensor,
                   scale: float) -> Similarity:
    """Weighted least squares y ~ scale * Rz(theta) flip x + t over theta and t (the yaw only:
    scenes stand on the same floor)."""
    w = w / w.sum().clamp_min(1e-9)
    a, b = x @ flip.T, y
    ca, cb = (w[:, None] * a).sum(0), (w[:, None] * b).sum(0)
    a0, b0 = a - ca, b - cb
    num = (w * (a0[:, 0] * b0[:, 1] - a0[:, 1] * b0[:, 0])).sum()
    den = (w * (a0[:, 0] * b0[:, 0] + a0[:, 1] * b0[:, 1])).sum()
    r = yaw(float(torch.atan2(num, den))) @ flip
    return Similarity(r, scale, cb - scale * ca @ yaw(float(torch.atan2(num, den))).T)


def _flip_part(t: Similarity) -> torch.Tensor:
    """The mirror of a transform's rotation (identity or the x flip)."""
    return torch.diag(torch.tensor([-1.0 if float(torch.det(t.rotation)) < 0 else 1.0, 1.0, 1.0]))


def refine(field: ContextDescriptorField, query: torch.Tensor, query_desc: torch.Tensor, target: dict,
           t: Similarity, cfg: MapConfig) -> Similarity:
    flip = _flip_part(t)
    for _ in range(cfg.refine_iters):
        matched, conf = matches(field, query, query_desc, target, t, cfg)
        if float(conf.sum()) <= 0:
            break
        t = procrustes_yaw(query, matched, conf, flip, t.scale)
    return t


def scene_tensors(points, labels, instance) -> dict:
    return {"points": torch.as_tensor(points, dtype=torch.float32), "labels": torch.as_tensor(labels).long(),
            "instance": torch.as_tensor(instance).long()}


@torch.no_grad()
def compute_map(field: ContextDescriptorField, source: dict, target: dict, query: torch.Tensor,
                cfg: MapConfig) -> SceneMap:
    """The map from ``source`` to ``target`` (dicts of `scene_tensors`) for the region around
    ``query`` [Q, 3] (source points to carry over). With ``cfg.thin_dense``, scenes sampled far
    more densely than the field's training scenes are read thinned to their density (`thin_scene`)."""
    if cfg.thin_dense:
        source, target = (dict(zip(("points", "labels", "instance"), thin_scene(s["points"], s["labels"], s["instance"],
                                                                               field.config))) for s in (source, target))
    g = torch.Generator().manual_seed(cfg.seed)
    sub = query[torch.randperm(len(query), generator=g)[:cfg.coarse_queries]]
    sub_desc = field(sub, source["points"], source["labels"])
    pool = candidates(sub, source, target, cfg)
    c = costs(field, sub, sub_desc, target, pool)
    best = None
    for i in torch.argsort(c)[:cfg.topk].tolist():
        t = refine(field, sub, sub_desc, target, pool[i], cfg)
        cost = float(costs(field, sub, sub_desc, target, [t])[0])
        if float(c[i]) <= cost:  # refinement may not make a candidate worse
            t, cost = pool[i], float(c[i])
        if best is None or cost < best.cost:
            best = SceneMap(t, cost)
    if cfg.fine:
        fit = query if len(query) <= cfg.fine_queries else query[torch.randperm(len(query), generator=g)[:cfg.fine_queries]]
        best.displacement = fine_displacements(field, fit, source, target, best.transform, cfg)
    return best


def fine_displacements(field: ContextDescriptorField, query: torch.Tensor, source: dict, target: dict,
                       t: Similarity, cfg: MapConfig) -> RBFInterpolator:
    """Per-point displacements towards each query point's descriptor match (confidence-weighted:
    an unsure point keeps its coarse image), smoothed by a thin-plate-spline RBF fitted on
    ``query`` (the map evaluates it anywhere)."""
    desc = field(query, source["points"], source["labels"])
    matched, conf = matches(field, query, desc, target, t, cfg)
    shift = (matched - t.apply(query)) * conf[:, None]
    x = query.double().numpy()
    _, keep = np.unique(np.round(x, 6), axis=0, return_index=True)  # the spline needs distinct points
    return RBFInterpolator(x[keep], shift[keep].double().numpy(), kernel="thin_plate_spline",
                           smoothing=cfg.rbf_smoothing)
