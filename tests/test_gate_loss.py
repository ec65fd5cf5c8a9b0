"""The occlusion-order loss on the alpha gate (pics_model/gate_loss.py) and its inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pics_model.config import get_preset
from pics_model.data import build_item, collate
from pics_model.gate_loss import occlusion_order_loss
from pics_model.modeling_pics import PICSModel
from pics_model.testing import synthetic_sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _one_block(scores: list[float], covers: list[bool], hw=(1, 1)):
    """One block's sink record for B=1, one token: scores [1,N,1] with grad, covers [1,N,1]."""
    s = torch.tensor(scores, requires_grad=True)
    return s, [(hw, s.view(1, -1, 1), torch.tensor(covers).view(1, -1, 1))]


def test_loss_is_the_cross_entropy_towards_the_visible_object():
    s, records = _one_block([0.3, -0.2], [True, True])
    visible = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)  # object 0 shows on the whole token
    loss = occlusion_order_loss(records, visible, tau=0.5)
    expected = -torch.log_softmax(torch.tensor([0.3, -0.2]) / 0.5, 0)[0]
    assert math.isclose(float(loss.detach()), float(expected), rel_tol=1e-6)
    loss.backward()
    assert s.grad[0] < 0 < s.grad[1]  # descent raises the visible object's score, lowers the other's


def test_the_target_is_the_visible_share_among_covering_objects_only():
    # three objects; object 2 does not cover the token, so its visible pixels do not count
    s, records = _one_block([0.0, 0.0, 5.0], [True, True, False])
    visible = torch.tensor([0.2, 0.6, 0.2]).view(1, 3, 1, 1)
    loss = occlusion_order_loss(records, visible, tau=1.0)
    assert math.isclose(float(loss.detach()), -(0.25 * math.log(0.5) + 0.75 * math.log(0.5)), rel_tol=1e-6)


def test_background_only_tokens_dropped_rows_and_single_cover_tokens_do_not_count():
    _, records = _one_block([1.0, -1.0], [True, True])
    nothing_shows = torch.zeros(1, 2, 1, 1)
    assert float(occlusion_order_loss(records, nothing_shows, tau=0.5).detach()) == 0.0
    shows = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    assert float(occlusion_order_loss(records, shows, tau=0.5, rows=torch.tensor([False])).detach()) == 0.0
    _, exclusive = _one_block([1.0, 0.0], [True, False])
    assert float(occlusion_order_loss(exclusive, shows, tau=0.5).detach()) == 0.0


def test_visible_masks_are_pooled_onto_each_block_grid():
    # 2x2 token grid, 4x4 target: object 0 visible on the top-left token only, object 1 elsewhere
    visible = torch.zeros(1, 2, 4, 4)
    visible[0, 0, :2, :2] = 1
    visible[0, 1] = 1 - visible[0, 0]
    s = torch.zeros(1, 2, 4, requires_grad=True)
    covers = torch.zeros(1, 2, 4, dtype=torch.bool)
    covers[0, :, 0] = True  # the top-left token is the only overlap
    loss = occlusion_order_loss([((2, 2), s, covers)], visible, tau=1.0)
    loss.backward()
    assert math.isclose(float(loss.detach()), math.log(2), rel_tol=1e-6)
    assert s.grad[0, 0, 0] < 0 < s.grad[0, 1, 0] and (s.grad[:, :, 1:] == 0).all()


def test_build_item_places_instance_masks_on_the_square_frame():
    rng = np.random.default_rng(0)
    sample = synthetic_sample(rng, n=2, views=0, boxes=np.array([[4, 4, 40, 30], [20, 10, 70, 38]], np.float32))
    h, w = sample["image"].shape[:2]
    masks = np.zeros((2, h, w), np.uint8)
    masks[0, 5:20, 6:30] = 1
    masks[1, 12:36, 22:60] = 1
    masks[0, 12:20, 22:30] = 0  # object 1 in front where they meet
    item = build_item({**sample, "masks": masks}, 32, None)
    side = max(h, w)
    area = (side / 32) ** 2
    assert torch.allclose(item["visible"].sum((1, 2)) * area, torch.tensor(masks.sum((1, 2)), dtype=torch.float32),
                          rtol=0.05)  # adaptive pooling windows overlap when 32 does not divide the side
    top = (side - h) // 2 * 32 / side  # the square padding stays empty
    assert item["visible"][:, : int(top)].sum() == 0
    with pytest.raises(ValueError, match="masks"):
        build_item({**sample, "masks": masks[:, :-1]}, 32, None)
    batch = collate([item, build_item({**sample, "masks": masks}, 32, None)])
    assert batch["visible"].shape == (2, 2, 32, 32)
    assert "visible" not in collate([item, build_item(sample, 32, None)])  # all or none


def test_training_loss_trains_the_gate_through_the_scores():
    torch.manual_seed(0)
    model = PICSModel(get_preset("tiny"))
    rng = np.random.default_rng(0)
    boxes = np.array([[0, 0, 56, 46], [24, 4, 80, 48]], np.float32)
    sample = synthetic_sample(rng, n=2, views=0, boxes=boxes)
    h, w = sample["image"].shape[:2]
    masks = np.zeros((2, h, w), np.uint8)
    masks[0, :46, :56] = 1
    masks[1, 4:48, 24:80] = 1
    masks[0, 4:46, 24:56] = 0  # object 1 in front on the whole overlap
    batch = collate([build_item({**sample, "masks": masks}, 64, None, collage=True)])
    gate_q = [blk.gate_q.weight for blk in model.itb_blocks()]
    g = torch.Generator().manual_seed(0)
    loss, stats = model.training_loss(batch, g, cond_drop_prob=0.0, gate_weight=1.0)
    # an untrained gate is a tie: the loss is ln 2 on every overlap token
    assert math.isclose(stats["gate_loss"], math.log(2), rel_tol=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate_q)
    _, plain = model.training_loss(batch, torch.Generator().manual_seed(0), cond_drop_prob=0.0)
    assert "gate_loss" not in plain
