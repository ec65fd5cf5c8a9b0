"""Occlusion-order accuracy of the alpha gate, per block, as in the paper's analysis of s_a - s_b.

Definition (also in docs/metrics.md). For every object pair (a, b) of a sample with amodal masks
(the embedded dataset):

* Evaluated pixels: the truly occluded ones (both amodal masks set) where one of the two is the
  visible object (its modal mask): a_front or b_front. Pixels where a third object hides both
  are left out.
* Per ITB call (block), on the block's own token grid (side g, cells of the square-padded frame):
  a token is *routed* to the pair when both objects' routing masks at that level hold it (the
  block's overlap set). There the gate's order is sign(s_a - s_b), read from the block's routing
  weights: alpha_a / alpha_b = exp((s_a - s_b) / tau) for any softmax gate, so the sign of
  ln alpha_a - ln alpha_b is that of s_a - s_b. |ln alpha_a - ln alpha_b| <= TIE_EPS is a tie.
* A routed token earns, per evaluated pixel it holds, 1 when the gate prefers that pixel's visible
  object, 0 when it prefers the other, 1/2 on a tie (a neutral gate scores exactly 1/2).
* accuracy = credit / routed pixels (pixel-weighted tokens, so every block counts the same
  occluded area whatever its resolution); coverage = routed pixels / evaluated pixels, reported
  separately (unrouted pixels are not in the accuracy).
Per sample the sums are kept per denoising step and per token-grid level; `summarize` pools them
(over levels, steps and samples) and puts a bootstrap interval over samples on the pooled value.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tasks.evaluate.stats import bootstrap_ci

TIE_EPS = 1e-5  # on ln alpha_a - ln alpha_b = (s_a - s_b) / tau


def cell_fraction(masks: np.ndarray, grid: int) -> np.ndarray:
    """[N, H, W] masks -> [N, grid, grid] covered fraction of each cell of the centred square frame."""
    n, h, w = masks.shape
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    sq = torch.zeros(n, 1, s, s, dtype=torch.float64)
    sq[:, 0, top:top + h, left:left + w] = torch.from_numpy(np.asarray(masks) > 0).double()
    return F.adaptive_avg_pool2d(sq, grid)[:, 0].numpy()


@dataclass
class OcclusionTruth:
    """Which object of each pair is visible on its occluded pixels; counted per token grid on demand."""

    pairs: list[tuple[int, int, np.ndarray, np.ndarray]]  # (a, b, a_front [H,W] bool, b_front [H,W] bool)
    _by_side: dict = field(default_factory=dict, repr=False)

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def at(self, side: int) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        """(a, b, a_front pixels [side, side], b_front pixels [side, side]) per pair."""
        if side not in self._by_side:
            out = []
            for a, b, fa, fb in self.pairs:
                h, w = fa.shape
                area = (max(h, w) / side) ** 2
                counts = cell_fraction(np.stack([fa, fb]), side) * area
                out.append((a, b, counts[0], counts[1]))
            self._by_side[side] = out
        return self._by_side[side]


def occlusion_truth(sample: dict) -> OcclusionTruth:
    """The sample's truth from ``amodal_masks`` and ``masks`` (modal); empty when either is missing."""
    amodal, modal = sample.get("amodal_masks"), sample.get("masks")
    if amodal is None or modal is None or len(amodal) != len(modal):
        return OcclusionTruth([])
    pairs = []
    for a in range(len(amodal)):
        for b in range(a + 1, len(amodal)):
            both = (amodal[a] > 0) & (amodal[b] > 0)
            va, vb = modal[a] > 0, modal[b] > 0
            fa, fb = both & va & ~vb, both & vb & ~va
            if fa.any() or fb.any():
                pairs.append((a, b, fa, fb))
    return OcclusionTruth(pairs)


def gate_order(wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """+1 where the gate prefers a (s_a > s_b), -1 where b, 0 on a tie (or when neither can be read)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.log(wa.astype(np.float64)) - np.log(wb.astype(np.float64))
    d = np.nan_to_num(d, nan=0.0)
    return np.where(d > TIE_EPS, 1.0, np.where(d < -TIE_EPS, -1.0, 0.0))


def block_credit(weights: np.ndarray, routed: np.ndarray, truth: OcclusionTruth) -> np.ndarray:
    """One block: weights [N,g,g] routing weights, routed [N,g,g] bool routing masks ->
    [credit, tied, routed, evaluated] pixel sums over the sample's pairs."""
    out = np.zeros(4, np.float64)
    for a, b, fa, fb in truth.at(weights.shape[-1]):
        both = routed[a] & routed[b]
        order = gate_order(weights[a], weights[b])
        px = fa + fb
        out[0] += float((both * (fa * (order > 0) + fb * (order < 0) + 0.5 * px * (order == 0))).sum())
        out[1] += float((both * px * (order == 0)).sum())
        out[2] += float((both * px).sum())
        out[3] += float(px.sum())
    return out


def sample_stats(gate_steps: list[list[tuple[np.ndarray, np.ndarray]]], truth: OcclusionTruth,
                 levels: list[int] | None = None) -> dict:
    """gate_steps: per denoising step (or probe timestep), per block, (weights, routed) [N,g,g].

    Returns {"levels": [g...], "credit" [S,L], "ties" [S,L], "routed" [L], "pixels" [L]}: sums over
    the blocks at each level (routed/pixels do not change between steps: the step-0 values).
    """
    if levels is None:
        levels = sorted({w.shape[-1] for step in gate_steps for w, _ in step}, reverse=True)
    col = {g: i for i, g in enumerate(levels)}
    acc = np.zeros((len(gate_steps), len(levels), 4), np.float64)
    for s, blocks in enumerate(gate_steps):
        for weights, routed in blocks:
            acc[s, col[weights.shape[-1]]] += block_credit(weights, routed, truth)
    first = acc[0] if len(acc) else np.zeros((len(levels), 4))
    return {"levels": list(levels), "credit": acc[..., 0], "ties": acc[..., 1],
            "routed": first[:, 2], "pixels": first[:, 3]}


def summarize(stats: list[dict], n_boot: int = 1000, seed: int = 0) -> dict | None:
    """Pool per-sample stats of one method (same levels): accuracy over all steps and blocks, its
    bootstrap 95 % interval over samples, per level, per step, coverage and ties. None when no
    sample has an evaluated pixel."""
    stats = [s for s in stats if s["pixels"].sum() > 0]
    if not stats:
        return None
    levels = stats[0]["levels"]
    if any(s["levels"] != levels for s in stats):
        raise ValueError(f"occlusion stats disagree on the token-grid levels: {[s['levels'] for s in stats][:3]}")
    steps = stats[0]["credit"].shape[0]
    credit = np.stack([s["credit"] for s in stats])  # [n,S,L]
    ties = np.stack([s["ties"] for s in stats])
    covered = np.stack([s["routed"] for s in stats])  # [n,L], one step
    pixels = np.stack([s["pixels"] for s in stats])
    routed = covered * steps  # the accuracy's denominator: every step's blocks
    out: dict = {"occlusion_samples": len(stats), "occlusion_coverage": _ratio(covered.sum(), pixels.sum())}
    num, den = credit.sum((1, 2)), routed.sum(1)
    if den.sum() > 0:
        out["occlusion_accuracy"] = _ratio(num.sum(), den.sum())
        keep = den > 0
        out["occlusion_accuracy_ci95"] = bootstrap_ci(lambda i: num[keep][i].sum(1) / den[keep][i].sum(1),
                                                      int(keep.sum()), n_boot, seed)
        out["occlusion_ties"] = _ratio(ties.sum(), den.sum())
        out["occlusion_curve"] = [_ratio(credit[:, k].sum(), covered.sum()) for k in range(steps)]
    names = [f"{g}x{g}" for g in levels]
    out["occlusion_accuracy_by_level"] = {n: _ratio(credit[:, :, i].sum(), routed[:, i].sum())
                                          for i, n in enumerate(names) if routed[:, i].sum() > 0}
    out["occlusion_coverage_by_level"] = {n: _ratio(covered[:, i].sum(), pixels[:, i].sum())
                                          for i, n in enumerate(names) if pixels[:, i].sum() > 0}
    return out


def pooled_sums(stats: dict) -> tuple[float, float]:
    """(credit, routed) of one sample over all steps and levels: the pieces of the pooled ratio."""
    steps = stats["credit"].shape[0]
    return float(stats["credit"].sum()), float(stats["routed"].sum() * steps)


def _ratio(a: float, b: float) -> float | None:
    return round(float(a) / float(b), 6) if b > 0 else None


def visibility_map(truth: OcclusionTruth, grid: int, a: int = 0, b: int = 1) -> np.ndarray:
    """[grid, grid] for the pair (a, b): + where a is the visible one, - where b is (pixel weights)."""
    out = np.zeros((grid, grid), np.float32)
    for pa, pb, fa, fb in truth.at(grid):
        if {pa, pb} == {a, b}:
            diff = (fa - fb) if pa == a else (fb - fa)
            out += (diff / max(float(np.abs(diff).max()), 1e-9)).astype(np.float32)
    return out
