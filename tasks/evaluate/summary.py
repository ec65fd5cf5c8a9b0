"""Result rows -> the summary: per-method means, FID, occlusion-order curves, the side-by-side table."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from tasks.evaluate import metrics, occlusion
from tasks.evaluate.inference import GROUND_TRUTH, LOWER_IS_BETTER, METHODS, SCORE_COLUMNS
from tasks.evaluate.stats import bootstrap_ci

# paired comparisons reported in metrics.json: (a, b) -> "a_vs_b", differences a - b per sample
PAIRED = (("pics", "untrained"), ("pics", "sequential"), ("sequential", "untrained"))
MASKED = ("mpsnr", "mssim", "mlpips_mobilenetv2_proxy")
TABLE_COLUMNS = ("mpsnr", "mssim", "mlpips_mobilenetv2_proxy", "psnr", "ssim", "lpips_mobilenetv2_proxy",
                 "fid_mobilenetv2_proxy", "objsim_mobilenetv2_proxy", "clip_score", "dinov2_score", "dreamsim")


def _num(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else round(float(v), 6)


def summarize(results: pa.Table) -> dict:
    """The metrics.json content: {"methods": {method: {metric: mean, ...}}, "occlusion": {...}, counts}."""
    ok = results.filter(pa.compute.is_null(results["error"]))
    rows = ok.select([c for c in ok.column_names if c not in ("png", "alpha_diff", "visibility")]).to_pylist()
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    gt = {r["sample_id"]: r["fid_features"] for r in by_method.get(GROUND_TRUTH, [])}
    with_priors = sum(1 for r in by_method.get(GROUND_TRUTH, []) if r.get("with_priors"))
    out: dict = {"methods": {}, "n_samples": len(gt), "n_with_priors": with_priors, "n_failed": int(len(set(
        results.filter(pa.compute.invert(pa.compute.is_null(results["error"])))["sample_id"].to_pylist())))}
    for method in [m for m in METHODS if m in by_method]:
        rs = by_method[method]
        s: dict = {"n": len(rs)}
        for c in SCORE_COLUMNS:
            vals = [r[c] for r in rs if r[c] is not None]
            if vals:
                s[c] = _num(float(np.mean(vals)))
        s["n_overlap"] = sum(1 for r in rs if r["mpsnr"] is not None)
        mine = {r["sample_id"]: r["fid_features"] for r in rs if r["sample_id"] in gt}
        if len(mine) >= 2:
            fake = torch.tensor(list(mine.values()))
            real = torch.tensor([gt[i] for i in mine])
            s["fid_mobilenetv2_proxy"] = _num(metrics.frechet_distance(real, fake))
        s["seconds_per_sample"] = _num(float(np.mean([r["seconds"] for r in rs])))
        occ = occlusion.summarize([occlusion_stats(r) for r in rs if r.get("occ_levels")])
        if occ:
            s.update(occ)
        out["methods"][method] = s
    ms = out["methods"]
    pairs = {f"{a}_vs_{b}": paired(by_method[a], by_method[b]) for a, b in PAIRED if a in by_method and b in by_method}
    if pairs:
        out["paired"] = pairs
    if "pics" in ms and "untrained" in ms:
        # what training bought on the overlap: positive = the trained model is better
        out["trained_minus_untrained"] = {
            c: _num((ms["pics"][c] - ms["untrained"][c]) * (-1 if c in LOWER_IS_BETTER else 1))
            for c in MASKED if ms["pics"].get(c) is not None and ms["untrained"].get(c) is not None}
    return out


def occlusion_stats(row: dict) -> dict:
    """A result row's occlusion columns -> the per-sample stats of `occlusion.summarize`."""
    levels = list(row["occ_levels"])
    shape = (-1, len(levels))
    return {"levels": levels, "credit": np.asarray(row["occ_credit"], np.float64).reshape(shape),
            "ties": np.asarray(row["occ_ties"], np.float64).reshape(shape),
            "routed": np.asarray(row["occ_routed"], np.float64), "pixels": np.asarray(row["occ_pixels"], np.float64)}


def paired(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """Per-sample paired differences a - b (sign flipped where lower is better, so > 0 = a better):
    mean, bootstrap 95 % interval over samples, standard error of the mean, and how many samples
    a wins, per metric; for occlusion accuracy the difference of the pooled accuracies on the
    samples both have, with the same paired bootstrap."""
    b = {r["sample_id"]: r for r in rows_b}
    out = {}
    for c in MASKED + ("psnr", "ssim"):
        d = [(r[c] - b[r["sample_id"]][c]) * (-1 if c in LOWER_IS_BETTER else 1) for r in rows_a
             if r["sample_id"] in b and r[c] is not None and b[r["sample_id"]][c] is not None]
        if len(d) >= 2:
            x = np.asarray(d)
            out[c] = {"mean": _num(x.mean()), "ci95": bootstrap_ci(lambda i: x[i].mean(1), len(x)),
                      "sem": _num(x.std(ddof=1) / math.sqrt(len(x))), "wins": int((x > 0).sum()), "n": len(x)}
    both = [(occlusion.pooled_sums(occlusion_stats(r)), occlusion.pooled_sums(occlusion_stats(b[r["sample_id"]])))
            for r in rows_a if r.get("occ_levels") and r["sample_id"] in b and b[r["sample_id"]].get("occ_levels")]
    both = [(sa, sb) for sa, sb in both if sa[1] > 0 and sb[1] > 0]
    if len(both) >= 2:
        (ca, ra), (cb, rb) = (np.asarray(v).T for v in zip(*both))
        diff = lambda i: ca[i].sum(-1) / ra[i].sum(-1) - cb[i].sum(-1) / rb[i].sum(-1)  # noqa: E731
        out["occlusion_accuracy"] = {"mean": _num(float(diff(np.arange(len(ca))))),
                                     "ci95": bootstrap_ci(diff, len(ca)), "n": len(ca)}
    return out


def comparison_rows(summary: dict) -> list[dict]:
    """One row per method with the table's columns (None where a metric was not computed)."""
    return [{"method": m, **{c: s.get(c) for c in TABLE_COLUMNS}, "occlusion_accuracy": s.get("occlusion_accuracy"),
             "n": s["n"]} for m, s in summary["methods"].items()]


def dvc_metrics(summary: dict) -> dict:
    """metrics.json for DVC: flat numbers per method (no curves), plus counts."""
    out = {"n_samples": summary["n_samples"], "n_failed": summary["n_failed"]}
    if "trained_minus_untrained" in summary:
        out["trained_minus_untrained"] = summary["trained_minus_untrained"]
    if "paired" in summary:
        out["paired"] = summary["paired"]
    for m, s in summary["methods"].items():
        # curves stay in summary.json; intervals ([low, high]) are metrics
        out[m] = {k: v for k, v in s.items() if v is not None and (not isinstance(v, list) or k.endswith("_ci95"))}
    return out


def occlusion_plot_rows(summary: dict) -> list[dict]:
    """DVC plot data: accuracy per denoising step and method."""
    rows = []
    for m, s in summary["methods"].items():
        for step, v in enumerate(s.get("occlusion_curve") or []):
            rows.append({"method": m, "step": step, "accuracy": v})
    return rows


def method_plot_rows(summary: dict) -> list[dict]:
    return [{"method": m, "mpsnr": s.get("mpsnr"), "mssim": s.get("mssim"),
             "mlpips_mobilenetv2_proxy": s.get("mlpips_mobilenetv2_proxy"), "psnr": s.get("psnr")}
            for m, s in summary["methods"].items()]
