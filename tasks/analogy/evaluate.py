"""Score scene maps on augmented pairs with known ground truth: ours (coarse + fine, and the
coarse-only ablation) against two baselines, all on the same pairs in the same run.

Metrics (thresholds are fractions of the typical object size, the median bounding-box diagonal):
- ``pcp@f``: fraction of query points mapped within f * size of where they truly are;
- ``bipcp@f``: the same for the cycle G(F(x)) against x, G the map computed back from target to
  source for the mapped points (cycle consistency);
- ``chamfer@f``: fraction of mapped points within f * size of the true object's points in the
  target (landing on the right object, anywhere on it).
Baselines: ``icp`` (rigid ICP on all points, from the four 90-degree yaws, the lowest residual
kept) and ``centroid`` (each point moved with its object onto the nearest same-class object's
centroid, both scenes centred on their objects).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from scipy.spatial import cKDTree

from pics_model.context_field import ContextDescriptorField
from pics_model.scene_map import MapConfig, compute_map, scene_tensors
from tasks.analogy.scenes import EvalPair, Scene

THRESHOLDS = (0.25, 0.5)

# a method maps query points [Q, 3] of ``source`` into ``target``
Method = Callable[[Scene, Scene, np.ndarray], np.ndarray]


def pcp(mapped: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    """Percentage of correct points: the fraction within ``threshold`` of the truth."""
    return float(np.mean(np.linalg.norm(mapped - truth, axis=-1) < threshold))


def chamfer_accuracy(mapped: np.ndarray, target: Scene, truth_instance: np.ndarray, threshold: float) -> float:
    """Fraction of mapped points within ``threshold`` of the nearest point of their true object."""
    hits = np.zeros(len(mapped), bool)
    for k in np.unique(truth_instance):
        rows = truth_instance == k
        d, _ = cKDTree(target.points[target.instance == k]).query(mapped[rows])
        hits[rows] = d < threshold
    return float(hits.mean())


def kabsch(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rigid (R, t) minimising |R a + t - b|^2 over rows (no reflection)."""
    ca, cb = a.mean(0), b.mean(0)
    u, _, vt = np.linalg.svd((a - ca).T @ (b - cb))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, cb - ca @ r.T


def icp_baseline(source: Scene, target: Scene, query: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Rigid ICP of all source points onto all target points; starts: centroids aligned at the four
    90-degree yaws; the start with the lowest final mean residual wins."""
    src, tgt = source.points.astype(np.float64), target.points.astype(np.float64)
    tree = cKDTree(tgt)
    best = None
    for k in range(4):
        c, s = np.cos(k * np.pi / 2), np.sin(k * np.pi / 2)
        r = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
        t = tgt.mean(0) - src.mean(0) @ r.T
        for _ in range(iterations):
            _, nn = tree.query(src @ r.T + t)
            r, t = kabsch(src, tgt[nn])
        residual = float(tree.query(src @ r.T + t)[0].mean())
        if best is None or residual < best[0]:
            best = (residual, r, t)
    return query @ best[1].T + best[2]


def centroid_baseline(source: Scene, target: Scene, query: np.ndarray) -> np.ndarray:
    """Each query point follows its object (the object of its nearest source point) by the
    translation onto the nearest same-class target centroid, both scenes centred on their objects."""
    def centred(s: Scene):
        obj = s.instance >= 0
        mean = s.points[obj].mean(0)
        ids = np.unique(s.instance[obj])
        return mean, {int(k): (int(s.label[s.instance == k][0]), s.points[s.instance == k].mean(0) - mean) for k in ids}

    src_mean, src_objs = centred(source)
    tgt_mean, tgt_objs = centred(target)
    obj = source.instance >= 0
    _, nn = cKDTree(source.points[obj]).query(query)
    owner = source.instance[obj][nn]
    out = query - src_mean + tgt_mean
    for k in np.unique(owner):
        label, c = src_objs[int(k)]
        same = [tc for tl, tc in tgt_objs.values() if tl == label]
        if same:
            goal = min(same, key=lambda tc: float(np.linalg.norm(tc - c)))
            out[owner == k] += goal - c
    return out


def ours(field: ContextDescriptorField, cfg: MapConfig) -> tuple[Method, Method]:
    """(full map, coarse-only ablation), sharing one coarse computation per call with the same inputs."""
    cache: dict = {}

    def run(source: Scene, target: Scene, query: np.ndarray):
        key = (id(source), id(target), query.tobytes())
        if key not in cache:
            if len(cache) >= 8:  # a pair asks for at most 4 maps: the oldest are of an earlier pair
                cache.pop(next(iter(cache)))
            m = compute_map(field, scene_tensors(source.points, source.label, source.instance),
                            scene_tensors(target.points, target.label, target.instance),
                            torch.as_tensor(query, dtype=torch.float32), cfg)
            q = torch.as_tensor(query, dtype=torch.float32)
            cache[key] = (m(q).numpy(), m.transform.apply(q).numpy())
        return cache[key]

    return (lambda s, t, q: run(s, t, q)[0]), (lambda s, t, q: run(s, t, q)[1])


def score(method: Method, pair: EvalPair, size: float, cycle: bool = True) -> dict:
    """PCP and chamfer accuracy of the map; with ``cycle``, bi-PCP too (a second map, back)."""
    query = pair.source.points[pair.query].astype(np.float64)
    t0 = time.perf_counter()
    mapped = np.asarray(method(pair.source, pair.target, query), np.float64)
    seconds = time.perf_counter() - t0
    back = np.asarray(method(pair.target, pair.source, mapped), np.float64) if cycle else None
    out = {"seconds": seconds}
    for f in THRESHOLDS:
        out[f"pcp@{f}"] = pcp(mapped, pair.truth, f * size)
        if cycle:
            out[f"bipcp@{f}"] = pcp(back, query, f * size)
        out[f"chamfer@{f}"] = chamfer_accuracy(mapped, pair.target, pair.truth_instance, f * size)
    return out


def evaluate(methods: dict[str, Method], pairs: list[EvalPair], size: float, log=None, cycle: bool = True) -> dict:
    """{method: {metric: mean over pairs}} plus per-pair rows; ``cycle``: bi-PCP too (twice the maps)."""
    rows = {name: [] for name in methods}
    for i, pair in enumerate(pairs):
        for name, method in methods.items():
            rows[name].append(score(method, pair, size, cycle))
        if log:
            log(f"pair {i + 1}/{len(pairs)}: " + ", ".join(f"{n} {rows[n][-1]['pcp@0.25']:.2f}" for n in methods))
    summary = {name: {k: round(float(np.mean([r[k] for r in rs])), 4) for k in rs[0]} for name, rs in rows.items()}
    return {"methods": summary, "pairs": len(pairs), "rows": rows}
