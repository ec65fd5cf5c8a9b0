"""TPR / FPR of sampled boxes as K grows, the protocol of the location-modeling paper.

For each test query a method draws K boxes (the first K of one draw of max(ks), so curves are
nested). A drawn box counts only when its best-IoU labelled box reaches the threshold: it then
hits that box, a positive or a negative. Per K:

    TPR@K = positive boxes hit / positive boxes      FPR@K = negative boxes hit / negative boxes

pooled over the test queries (the paper does not publish its normalisation; this one grows with
K like its curves and is 0 for a method that never lands on a labelled box). Intervals: a paired
bootstrap over queries (the same resampled queries for both methods, same random draws per query).

The two model-free baselines (random boxes, the class-size prior at random positions) cost
nothing to draw, so each query's hits are their mean over ``baseline_draws`` independent draws of
K boxes: the baseline's expected rate, not one draw's luck (on 27 test queries one draw of random
boxes gives TPR@10 anywhere in about 0.01..0.09, sd 0.019 around its mean of 0.048).
"""
from __future__ import annotations

import numpy as np
import torch

from pics_model.location_model import LocationModel
from tasks.decompose.pairing import box_iou
from tasks.location.train import image_tensor, normalise

METHODS = ("random", "class_prior", "stage1", "dpo")


def random_boxes(n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, 4] normalised boxes, each side's two edges uniform in [0, 1] and sorted."""
    xs, ys = np.sort(rng.uniform(0, 1, (n, 2)), 1), np.sort(rng.uniform(0, 1, (n, 2)), 1)
    return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1)


def class_sizes(train_queries: list[dict]) -> dict[str, np.ndarray]:
    """class -> normalised (w, h) [M, 2] of its training positives: the class-size prior."""
    out: dict[str, list] = {}
    for q in train_queries:
        b = normalise(q["positives"], q["width"], q["height"]).numpy()
        out.setdefault(q["category"], []).append(np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1))
    return {k: np.concatenate(v) for k, v in out.items()}


def prior_boxes(n: int, sizes: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """A size drawn from the class's training boxes, at a uniformly random position inside the image."""
    if sizes is None or not len(sizes):
        return random_boxes(n, rng)
    wh = sizes[rng.integers(len(sizes), size=n)]
    x0, y0 = rng.uniform(0, 1 - wh[:, 0]), rng.uniform(0, 1 - wh[:, 1])
    return np.stack([x0, y0, x0 + wh[:, 0], y0 + wh[:, 1]], 1)


def model_boxes(model: LocationModel, q: dict, n: int, temperature: float, top_p: float, seed: int) -> np.ndarray:
    img = image_tensor(q["image"], model.cfg.image_size)[None]
    with torch.no_grad():
        prefix = model.condition(img, model.class_ids([q["category"]]))
        tokens, _ = model.sample(prefix, n, temperature, top_p, generator=torch.Generator().manual_seed(seed))
    return model.boxes_of(tokens).numpy()


def hits(drawn: np.ndarray, positives: np.ndarray, negatives: np.ndarray, ks: list[int], thr: float) -> np.ndarray:
    """[len(ks), 2]: positive and negative labelled boxes hit by the first K drawn boxes (normalised xyxy)."""
    labelled = np.concatenate([positives, negatives]) if len(negatives) else positives
    iou = box_iou(drawn, labelled)  # [n, P + N]
    best = iou.argmax(1)
    counted = iou.max(1) >= thr
    out = np.zeros((len(ks), 2), int)
    for i, k in enumerate(ks):
        hit = set(best[:k][counted[:k]].tolist())
        out[i] = [sum(1 for h in hit if h < len(positives)), sum(1 for h in hit if h >= len(positives))]
    return out


def evaluate(models: dict[str, LocationModel], test: list[dict], train: list[dict], ks: list[int], thr: float,
             temperature: float, top_p: float, seed: int, baseline_draws: int = 1) -> dict:
    """Per method, per query: hits [Q, len(ks), 2] (the baselines': the mean over ``baseline_draws``
    draws); and the label counts [Q, 2]."""
    sizes = class_sizes(train)
    n = max(ks)
    per_method = {m: [] for m in METHODS}
    totals = []
    for qi, q in enumerate(test):
        rng = np.random.default_rng([seed, qi])
        pos = normalise(q["positives"], q["width"], q["height"]).numpy()
        neg = normalise(q["negatives"], q["width"], q["height"]).numpy()
        totals.append([len(pos), len(neg)])
        baselines = {"random": lambda: random_boxes(n, rng),
                     "class_prior": lambda: prior_boxes(n, sizes.get(q["category"]), rng)}
        for name, draw in baselines.items():
            per_method[name].append(np.mean([hits(draw(), pos, neg, ks, thr) for _ in range(baseline_draws)], 0))
        for name, model in models.items():  # the same seed for both models: paired draws
            per_method[name].append(hits(model_boxes(model, q, n, temperature, top_p, seed * 100003 + qi),
                                         pos, neg, ks, thr))
    return {"hits": {m: np.asarray(v) for m, v in per_method.items()}, "totals": np.asarray(totals)}


def rates(hit: np.ndarray, totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """hits [Q, K, 2], totals [Q, 2] -> pooled (TPR [K], FPR [K])."""
    s = hit.sum(0)
    t = totals.sum(0)
    return s[:, 0] / max(t[0], 1), s[:, 1] / max(t[1], 1)


def paired_interval(a: np.ndarray, b: np.ndarray, totals: np.ndarray, which: int, n_boot: int,
                    seed: int) -> list[dict]:
    """Per K: the pooled rate difference b - a (``which`` 0: TPR, 1: FPR) with a 95% paired bootstrap
    interval over queries."""
    rng = np.random.default_rng(seed)
    q = len(totals)
    diff = rates(b, totals)[which] - rates(a, totals)[which]
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(q, size=q)
        boots.append(rates(b[idx], totals[idx])[which] - rates(a[idx], totals[idx])[which])
    lo, hi = np.percentile(np.asarray(boots), [2.5, 97.5], axis=0)
    return [{"diff": round(float(d), 5), "ci95": [round(float(x), 5), round(float(y), 5)]}
            for d, x, y in zip(diff, lo, hi)]


def metrics(result: dict, ks: list[int], thr: float, n_boot: int, seed: int) -> dict:
    hits_, totals = result["hits"], result["totals"]
    out = {"ks": list(ks), "iou": thr, "queries": int(len(totals)), "positives": int(totals[:, 0].sum()),
           "negatives": int(totals[:, 1].sum()), "tpr_at_k": {}, "fpr_at_k": {}}
    for m in METHODS:
        tpr, fpr = rates(hits_[m], totals)
        out["tpr_at_k"][m] = [round(float(v), 5) for v in tpr]
        out["fpr_at_k"][m] = [round(float(v), 5) for v in fpr]
    out["dpo_vs_stage1"] = {
        "fpr": paired_interval(hits_["stage1"], hits_["dpo"], totals, 1, n_boot, seed),
        "tpr": paired_interval(hits_["stage1"], hits_["dpo"], totals, 0, n_boot, seed),
    }
    # scalars at the first K, for `dvc metrics show` (it skips lists)
    out[f"at_k{ks[0]}"] = {m: {"tpr": out["tpr_at_k"][m][0], "fpr": out["fpr_at_k"][m][0]} for m in METHODS}
    r = out["tpr_at_k"]["random"][0]
    out["tpr10_over_random"] = None if r == 0 else round(out["tpr_at_k"]["dpo"][0] / r, 3)
    return out


def plot(m: dict, path) -> None:
    """TPR-FPR curves (one point per K) and TPR / FPR against K, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for meth in METHODS:
        tpr, fpr = m["tpr_at_k"][meth], m["fpr_at_k"][meth]
        axes[0].plot(fpr, tpr, marker="o", ms=3, label=meth)
        axes[1].plot(m["ks"], tpr, marker="o", ms=3, label=meth)
        axes[2].plot(m["ks"], fpr, marker="o", ms=3, label=meth)
    axes[0].set(xlabel="FPR", ylabel="TPR", title=f"TPR vs FPR, K = {m['ks'][0]}..{m['ks'][-1]} (IoU {m['iou']})")
    axes[1].set(xlabel="K", ylabel="TPR", title="TPR at K")
    axes[2].set(xlabel="K", ylabel="FPR", title="FPR at K")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
