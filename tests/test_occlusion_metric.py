"""Occlusion-order accuracy per block (tasks/evaluate/occlusion.py) on constructed gates and layouts,
and its bootstrap interval. The pipeline's per-block gate maps it reads: tests/test_model_pipeline.py."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.evaluate import occlusion
from tasks.evaluate.stats import bootstrap_ci

LEVELS = (8, 4, 2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _layout(rng: np.random.Generator, size: int = 16) -> dict:
    """Two random rectangles that overlap; object 0 (or 1, at random) is in front where they do."""
    amodal = np.zeros((2, size, size), np.uint8)
    for k in range(2):
        y0, x0 = rng.integers(0, size // 2, 2)
        y1, x1 = rng.integers(size // 2 + 1, size + 1, 2)
        amodal[k, y0:y1, x0:x1] = 1
    front = int(rng.integers(0, 2))
    modal = amodal.copy()
    modal[1 - front][amodal[front] > 0] = 0
    return {"amodal_masks": amodal, "masks": modal, "front": front}


def _routed(sample: dict, side: int) -> np.ndarray:
    """Routing masks at one level: the objects' amodal boxes, a token where half its area is inside."""
    return occlusion.cell_fraction(sample["amodal_masks"], side) >= 0.5


def _gate(sample: dict, side: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """One block's (weights, routed): 1 on exclusive tokens, the gate's alpha where both route."""
    routed = _routed(sample, side)
    both = routed[0] & routed[1]
    f = sample["front"]
    a_front = {"half": 0.5, "front": 0.9, "inverted": 0.1}[kind]
    w = routed.astype(np.float32)
    w[f][both], w[1 - f][both] = a_front, 1 - a_front
    return w, routed


def _stats(sample: dict, kind: str, steps: int = 2) -> dict:
    truth = occlusion.occlusion_truth(sample)
    gates = [[_gate(sample, g, kind) for g in LEVELS] for _ in range(steps)]
    return occlusion.sample_stats(gates, truth)


@pytest.mark.parametrize("kind,expected", [("half", 0.5), ("front", 1.0), ("inverted", 0.0)])
def test_accuracy_reads_the_gate_not_the_layout(kind, expected):
    rng = np.random.default_rng(0)
    stats = [_stats(_layout(rng), kind) for _ in range(20)]
    out = occlusion.summarize(stats)
    assert out["occlusion_accuracy"] == expected
    assert all(v == expected for v in out["occlusion_accuracy_by_level"].values())
    assert out["occlusion_curve"] == [expected, expected]
    assert out["occlusion_ties"] == (1.0 if kind == "half" else 0.0)
    assert 0 < out["occlusion_coverage"] <= 1
    lo, hi = out["occlusion_accuracy_ci95"]
    assert lo == hi == expected  # every sample scores the same: no spread to resample


def test_unrouted_pixels_are_coverage_not_errors():
    """A pixel whose token is not routed to both objects leaves the accuracy and lowers coverage
    (the old score counted it wrong)."""
    s = _layout(np.random.default_rng(3))
    truth = occlusion.occlusion_truth(s)
    w, routed = _gate(s, 8, "front")
    drop = routed.copy()
    ys, xs = np.nonzero(drop[0] & drop[1])
    drop[1, ys[0], xs[0]] = False  # one overlap token loses object 1
    w[1, ys[0], xs[0]] = 0.0
    full = occlusion.summarize([occlusion.sample_stats([[(w, routed)]], truth)])
    part = occlusion.summarize([occlusion.sample_stats([[(w, drop)]], truth)])
    assert full["occlusion_accuracy"] == part["occlusion_accuracy"] == 1.0
    assert part["occlusion_coverage"] < full["occlusion_coverage"]


def test_truth_follows_visibility_and_order_of_objects():
    s = _layout(np.random.default_rng(1))
    swapped = {"amodal_masks": s["amodal_masks"][::-1], "masks": s["masks"][::-1], "front": 1 - s["front"]}
    for kind in ("front", "inverted"):
        a, b = occlusion.summarize([_stats(s, kind)]), occlusion.summarize([_stats(swapped, kind)])
        assert a["occlusion_accuracy"] == b["occlusion_accuracy"]
    # pixels a third object hides (neither modal mask) are not evaluated; no modal masks, no truth
    hidden = {**s, "masks": np.zeros_like(s["masks"])}
    assert not occlusion.occlusion_truth(hidden)
    assert not occlusion.occlusion_truth({"amodal_masks": None, "masks": s["masks"]})


def test_tie_is_read_on_the_log_ratio():
    w = np.array([[0.5, 0.5 + 1e-7, 0.7, 0.0]], np.float32)
    assert occlusion.gate_order(w, 1 - w).tolist() == [[0.0, 0.0, 1.0, -1.0]]
    assert occlusion.gate_order(np.zeros(2), np.zeros(2)).tolist() == [0.0, 0.0]  # unreadable: a tie


def test_bootstrap_interval_contains_the_estimate_and_shrinks():
    rng = np.random.default_rng(0)

    def ci_of(n):
        x = rng.binomial(1, 0.7, n).astype(float)
        ci = bootstrap_ci(lambda i: x[i].mean(1), n)
        assert ci[0] <= x.mean() <= ci[1]
        return ci[1] - ci[0]

    assert ci_of(400) < ci_of(25) / 2
    x = np.arange(5.0)
    assert bootstrap_ci(lambda i: x[i].mean(1), 5) == bootstrap_ci(lambda i: x[i].mean(1), 5)  # fixed seed
    assert bootstrap_ci(lambda i: x[i].mean(1), 1) is None


def test_mixed_samples_give_an_interval_around_the_pooled_accuracy():
    rng = np.random.default_rng(2)
    stats = [_stats(_layout(rng), "front" if k % 3 else "inverted") for k in range(30)]
    out = occlusion.summarize(stats)
    lo, hi = out["occlusion_accuracy_ci95"]
    assert 0 < lo < out["occlusion_accuracy"] < hi < 1


def test_training_gate_probe_gives_per_timestep_block_maps():
    """The held-out probe of training (tasks/train/evaluation.py): one forward of the item at each probe
    timestep, each giving every block's maps; the same generator seed gives the same maps."""
    import torch

    from pics_model.config import get_preset
    from pics_model.data import build_item, collate
    from pics_model.modeling_pics import PICSModel
    from pics_model.testing import synthetic_sample
    from tasks.train.evaluation import gate_probe

    torch.manual_seed(0)
    model = PICSModel(get_preset("tiny")).eval()
    cfg = model.config
    batch = collate([build_item(synthetic_sample(np.random.default_rng(0), views=None), cfg.resolution, None,
                                object_size=cfg.object_encoder.image_size, collage=cfg.collage_hint)])
    runs = [gate_probe(model, batch, [100, 900], torch.Generator().manual_seed(5)) for _ in range(2)]
    assert len(runs[0]) == 2 and len(runs[0][0]) == len(model.itb_blocks())
    for (w0, r0), (w1, r1) in zip(runs[0][1], runs[1][1]):
        assert w0.shape == r0.shape and w0.shape[0] == 2 and (r0 == r1).all() and np.array_equal(w0, w1)
