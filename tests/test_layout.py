"""pics_model.layout (warp, losses, metrics, packers) and the ``pics layout`` command on tiny inputs."""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pics_model.layout import LayoutConfig, Placement, greedy_pack, layout_metrics, make_element, pack, placed_masks
from pics_model.layout import losses
from pics_model.layout.metrics import evaluate
from pics_model.layout.elements import mip_stack
from pics_model.layout.warp import render, splat

torch.set_num_threads(1)


def _one(v):
    return torch.tensor([float(v)], requires_grad=True)


def _disc(n: int, r: float, cx: float | None = None, cy: float | None = None) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n]
    cx = n / 2 if cx is None else cx
    cy = n / 2 if cy is None else cy
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < r ** 2


def test_warp_places_rotates_and_is_differentiable():
    bar = make_element(np.ones((4, 16), bool))  # 16 px wide, 4 px tall, in a 16 x 16 square
    m = bar.mask[None, None]
    tx, ty, th, size = _one(20), _one(12), _one(0), _one(16)
    a = render(m, tx, ty, th, size, (40, 30), 0, (30, 40))[0].detach().numpy() >= 0.5
    ys, xs = np.nonzero(a)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (12, 28, 10, 14)  # centred at (20, 12)
    up = render(m, tx, ty, _one(math.pi / 2), size, (40, 30), 0, (30, 40))[0].detach().numpy() >= 0.5
    ys, xs = np.nonzero(up)
    assert xs.max() - xs.min() + 1 == 4 and ys.max() - ys.min() + 1 == 16  # turned upright

    # gradients reach every parameter and match finite differences (soft edges, float64)
    blob = np.zeros((20, 32), bool)
    blob[2:18, 4:28] = True
    blob[2:10, 4:12] = False  # not symmetric: the angle matters
    soft = mip_stack([make_element(blob)], 32, blur_px=2.0).double()
    weight = (torch.linspace(0, 1, 50)[None, :] * torch.linspace(1, 2, 40)[:, None]).double()  # canvas 40 x 50

    def loss(params):
        tx, ty, th, size = params.unbind()
        return (render(soft, tx[None], ty[None], th[None], size[None], (40, 30), 5, (40, 50))[0] * weight).sum()

    params = torch.tensor([17.3, 14.1, 0.3, 14.0], dtype=torch.float64, requires_grad=True)
    loss(params).backward()
    grad = params.grad
    assert torch.isfinite(grad).all() and (grad.abs() > 1e-3).all()
    for k in range(4):
        step = torch.zeros(4, dtype=torch.float64)
        step[k] = 1e-4
        fd = (loss(params.detach() + step) - loss(params.detach() - step)).item() / 2e-4
        assert fd == pytest.approx(grad[k].item(), rel=0.02, abs=1e-4)


def test_splat_sums_what_render_renders():
    torch.manual_seed(0)
    masks = torch.rand(4, 1, 12, 12)
    args = (torch.tensor([5.0, 40, 90, 60]), torch.tensor([10.0, 55, 45, 98]), torch.tensor([0.2, 1.0, -0.7, 3.0]),
            torch.tensor([20.0, 30, 25, 16]))
    alpha = render(masks, *args, (100, 100), 10, (48, 48))
    total, logs = splat(masks, *args, (100, 100), 10, (48, 48))
    assert torch.allclose(total, alpha.sum(0), atol=1e-4)
    assert torch.allclose(losses.union_from_logs(logs), losses.union(alpha), atol=1e-4)


def test_losses_zero_exactly_when_the_layout_is_perfect():
    target = torch.zeros(20, 20)
    target[:, :10] = 1
    left, right = target.clone(), 1 - target
    assert losses.containment(losses.union(left[None]), target) == pytest.approx(0, abs=1e-9)
    assert losses.containment(losses.union(right[None]), target) > 0  # all outside, nothing inside
    half = torch.zeros(20, 20)
    half[:, :5] = 1
    assert losses.containment(losses.union(half[None]), target) > 0  # inside, but uncovered pixels
    # weighted: one pixel outside costs outside_weight times one uncovered inside
    one_out, one_in = left.clone(), left.clone()
    one_out[0, 15] = 1
    one_in[0, 0] = 0
    assert losses.containment(one_out, target, 100.0) == pytest.approx(100 * losses.containment(one_in, target, 100.0))

    apart = torch.stack([left, right])
    assert losses.overlap(apart.sum(0)) == 0
    shifted = torch.zeros(20, 20)
    shifted[:, 8:18] = 1
    assert losses.overlap(torch.stack([left, shifted]).sum(0)) == pytest.approx(2 * 20 / 400)

    assert losses.uniformity(left, target, [3, 5]) == 0
    holes = left.clone()
    holes[::4, ::4] = 0  # scattered one-pixel holes vanish under dilation...
    block = left.clone()
    block[:, :5] = 0  # ...a wide empty band does not
    assert losses.uniformity(holes, target, [3, 5]) == 0 < losses.uniformity(block, target, [3, 5])

    # pair mode: the chosen pair at its target share and every other pair apart costs nothing
    a, b, c = torch.zeros(3, 20, 20)
    a[:10, :10], b[5:15, :10], c[16:, 10:] = 1, 1, 1  # a and b share half of a, c touches nobody
    assert losses.pair_overlap_loss(torch.stack([a, b, c]), [(0, 1)], 0.5) == pytest.approx(0, abs=1e-9)
    assert losses.pair_overlap_loss(torch.stack([a, b, c]), [(0, 1)], 0.2) > 0
    assert losses.pair_overlap_loss(torch.stack([a, b, c]), [(1, 2)], 0.0) > 0  # a-b shared, not chosen


def test_metric_definitions_on_a_constructed_case():
    target = np.zeros((10, 20), bool)
    target[:, :10] = True  # 100 target pixels
    a = np.zeros_like(target)
    a[:, :5] = True  # 50 inside
    b = np.zeros_like(target)
    b[:, 4:12] = True  # 10 shared with a, 20 outside
    m = layout_metrics(np.stack([a, b]), target)
    assert m == {"coverage": pytest.approx(1.0), "overlap": pytest.approx(0.1), "exceed": pytest.approx(0.2)}

    # evaluate() counts what lies outside the frame too
    square = make_element(np.ones((10, 10), bool))
    frame_target = np.ones((20, 20), bool)
    masks, metrics = evaluate([square], Placement(np.array([20.0]), np.array([10.0]), np.zeros(1), np.ones(1)),
                              frame_target)
    assert masks.shape == (1, 20, 20) and masks.sum() == 50  # the left half, in the frame
    assert metrics["exceed"] == pytest.approx(50 / 400) and metrics["coverage"] == pytest.approx(50 / 400)


def _squares(n=4, side=12):
    return [make_element(np.ones((side, side - 2 * i), bool), f"e{i}") for i in range(n)]


def test_pack_separates_stacked_elements_and_keeps_them_inside():
    target = np.zeros((48, 48), bool)
    target[4:44, 4:44] = True
    elements = _squares()
    cfg = LayoutConfig(resolutions=[24, 48], iterations=[40, 20])
    placement, info = pack(elements, target, cfg)
    _, before = evaluate(elements, info["initial"], target)
    masks, after = evaluate(elements, placement, target)
    assert after["overlap"] == 0 and after["exceed"] < 0.01
    assert after["coverage"] > 0.4 and masks.any((1, 2)).all()
    assert [lv["resolution"] for lv in info["levels"]] == [24, 48]


def test_elements_start_at_one_box_size_whatever_their_source_size():
    big, small = make_element(np.ones((60, 40), bool)), make_element(np.ones((6, 4), bool))
    target = _disc(64, 30)
    still = dict(resolutions=[32], iterations=[0], reseed_share=1.0, separate_rounds=0)
    _, info = pack([big, small], target, LayoutConfig(**still))
    start = info["initial"]
    assert start.scale[0] * 60 == pytest.approx(start.scale[1] * 6)  # the paper code's normalised size
    assert (start.scale ** 2 * [2400, 24]).sum() == pytest.approx(0.55 * target.sum())  # init_fill of the target
    _, kept = pack([big, small], target, LayoutConfig(equal_size=False, **still))
    assert kept["initial"].scale[0] == kept["initial"].scale[1]  # one scale: source sizes kept


def test_pack_fills_a_disc_with_mixed_elements_without_overlap():
    rng = np.random.default_rng(0)
    elements = []
    for i in range(16):
        h, w = rng.integers(6, 14, 2)
        elements.append(make_element(_disc(max(h, w), max(h, w) / 2) if i % 3 == 0 else np.ones((h, w), bool)))
    target = _disc(64, 30)
    placement, _ = pack(elements, target, LayoutConfig(resolutions=[32, 64], iterations=[60, 40]))
    _, m = evaluate(elements, placement, target)
    # measured: 0.753 (0.701 when the overlap weight grew x10 towards the last level)
    assert m["coverage"] > 0.74 and m["overlap"] == 0 and m["exceed"] < 0.005, m


def test_pair_overlap_mode_makes_consecutive_elements_overlap():
    target = np.zeros((48, 48), bool)
    target[4:44, 4:44] = True
    elements = _squares(3)
    kw = dict(resolutions=[24, 48], iterations=[40, 40], rotate=False)
    shared = {}
    for share in (0.0, 0.3):
        placement, _ = pack(elements, target, LayoutConfig(pair_overlap=share, **kw))
        m = placed_masks(elements, placement, (48, 48))
        shared[share] = [(m[i] & m[i + 1]).sum() / min(m[i].sum(), m[i + 1].sum()) for i in range(2)]
        assert (placement.theta == 0).all()
    assert max(shared[0.0]) < 0.02
    assert all(0.1 < s < 0.5 for s in shared[0.3]), shared


def test_greedy_packer_never_overlaps_or_leaves_the_target():
    target = _disc(64, 30)
    elements = _squares(6, 14)
    placement, info = greedy_pack(elements, target)
    _, m = evaluate(elements, placement, target)
    assert info["unplaced"] == 0 and m["overlap"] == 0 and m["exceed"] == 0 and m["coverage"] > 0.3


def test_layout_params_carry_every_config_field_with_its_default():
    from tasks.params import LayoutParams

    assert asdict(LayoutParams().config()) == asdict(LayoutConfig())


def test_composite_layout_puts_upright_objects_in_the_region_overlapping_the_next(tiny_inputs):
    from tasks.layout.place import layout_objects
    from tasks.params import LayoutParams

    d = tiny_inputs
    images = [d / "els" / "b0.png", d / "els" / "b1.png", d / "a_red.png"]
    p = LayoutParams(iterations=[30, 20, 10], threads=1)
    masks = layout_objects(images, (20, 10, 84, 58), (100, 70), p)
    assert len(masks) == 3 and all(m.shape == (70, 100) and m.any() for m in masks)
    inside = np.zeros((70, 100), bool)
    inside[10:58, 20:84] = True
    assert not any((m & ~inside).any() for m in masks)
    for a, b in zip(masks, masks[1:]):
        assert (a & b).sum() > 0.05 * min(a.sum(), b.sum())  # each object overlaps the next


# ------------------------------------------------------------------------------ the command --

@pytest.fixture()
def tiny_inputs(tmp_path):
    """A disc target, two RGBA elements in a folder and one object on white."""
    Image.fromarray(_disc(48, 22).astype(np.uint8) * 255).save(tmp_path / "target.png")
    d = tmp_path / "els"
    d.mkdir()
    for i, (h, w) in enumerate([(10, 18), (14, 8)]):
        rgba = np.zeros((20, 20, 4), np.uint8)
        rgba[..., :3] = (30 * i, 180, 90)
        rgba[2:2 + h, 1:1 + w, 3] = 255
        Image.fromarray(rgba).save(d / f"b{i}.png")
    white = np.full((16, 16, 3), 255, np.uint8)
    white[3:13, 6:10] = (200, 20, 20)
    Image.fromarray(white).save(tmp_path / "a_red.png")
    return tmp_path


def _layout(*args):
    from flows.cli import app

    return CliRunner().invoke(app, ["layout", *map(str, args), "--set", "layout.iterations=[15,15,10]",
                                    "--set", "layout.threads=1"])


def test_cli_writes_layout_masks_collage_and_metrics_in_input_order(tiny_inputs):
    d, out = tiny_inputs, tiny_inputs / "out"
    r = _layout("--elements", d / "els", d / "a_red.png", "--target", d / "target.png", "--out", out)
    assert r.exit_code == 0, r.output
    lay = json.loads((out / "layout.json").read_text())
    files = [e["file"] for e in lay["elements"]]
    assert files == [str(d / "els" / "b0.png"), str(d / "els" / "b1.png"), str(d / "a_red.png")]
    masks = [np.asarray(Image.open(out / "masks" / f"{i:03d}.png")) > 0 for i in range(3)]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["000.png", "001.png", "002.png"]
    areas = [18 * 10, 8 * 14, 4 * 10]  # source silhouette pixels
    for m, e, area in zip(masks, lay["elements"], areas):
        assert m.shape == (48, 48)
        ys, xs = np.nonzero(m)
        assert abs(xs.mean() + 0.5 - e["tx"]) < 1.5 and abs(ys.mean() + 0.5 - e["ty"]) < 1.5  # its own place
        assert m.sum() == pytest.approx(area * e["scale"] ** 2, rel=0.3)  # its own size
    metrics = json.loads((out / "metrics.json").read_text())
    stack = np.stack(masks)
    target = np.asarray(Image.open(d / "target.png")) > 0
    assert metrics["coverage"] == pytest.approx((stack.any(0) & target).sum() / target.sum())
    assert metrics["overlap"] == pytest.approx((stack.sum(0) >= 2).sum() / target.sum())
    assert set(metrics) >= {"coverage", "overlap", "exceed", "seconds"} and metrics["elements"] == 3
    collage = np.asarray(Image.open(out / "collage.png").convert("RGB"))
    assert collage.shape == (48, 48, 3)
    red = masks[2]
    assert (collage[red][:, 0] > 150).mean() > 0.8  # the red object is drawn in its own pixels

    again = _layout("--elements", d / "els", "--target", d / "target.png", "--out", out, "--set", "layout.method=greedy")
    assert again.exit_code == 0, again.output
    assert len(json.loads((out / "layout.json").read_text())["elements"]) == 2
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["000.png", "001.png"]


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"missing.png: no such file or folder"),
    ("empty_target", r"black.png: empty mask"),
    ("blank_element", r"blank.png: empty silhouette"),
    ("foreign_out", r"not empty and not marked as an output folder of layout"),
    ("bad_param", r"layout: .*resolutions and iterations need the same, non-zero, length"),
])
def test_cli_bad_inputs_fail_clearly(tiny_inputs, case, pattern):
    d = tiny_inputs
    els, target, out, extra = d / "els", d / "target.png", d / "out", []
    if case == "missing":
        els = d / "missing.png"
    elif case == "empty_target":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "black.png")
        target = d / "black.png"
    elif case == "blank_element":
        Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(d / "blank.png")
        els = d / "blank.png"
    elif case == "foreign_out":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        extra = ["--set", "layout.resolutions=[32]"]
    r = _layout("--elements", els, "--target", target, "--out", out, *extra)
    assert r.exit_code == 2, r.output
    assert re.search(pattern, r.output.replace("\n", " ")), r.output
    if case == "foreign_out":
        assert (out / "notes.txt").read_text() == "mine" and not (out / "layout.json").exists()
