"""The location model: box tokens, causal decoding, KV-cached sampling, the DPO objective, saving."""
import pytest
import torch

from pics_model.location_model import (LocationConfig, LocationModel, box_values, causal_mask, dequantize, dpo_loss,
                                       mle_loss, quantize)

CLASSES = ["ball", "can", "cone"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LocationModel(LocationConfig(class_names=CLASSES, bins=16, image_size=32, d_model=32, layers=2,
                                        heads=4, encoder={"kind": "small", "small_channels": [8, 16]})).eval()


def _prefix(model, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return model.condition(torch.rand(n, 3, 40, 48, generator=g), torch.arange(n) % len(CLASSES))


def test_quantize_round_trip_within_half_a_bin():
    boxes = torch.rand(100, 4)
    back = dequantize(quantize(boxes, 64), 64)
    assert (back - boxes).abs().max() <= 0.5 / 64 + 1e-6
    assert quantize(torch.tensor([0.0, 1.0, -0.2, 1.3]), 64).tolist() == [0, 63, 0, 63]
    assert torch.equal(quantize(back, 64), quantize(boxes, 64))


def test_causal_mask_hides_the_future(model):
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    prefix = _prefix(model)
    a, b = torch.tensor([[3, 4, 9, 10]]), torch.tensor([[3, 4, 9, 15]])
    # the last token is never input: changing it changes no logit; changing x1 changes later ones
    assert torch.equal(model.logits(prefix, a), model.logits(prefix, b))
    c = torch.tensor([[7, 4, 9, 10]])
    la, lc = model.logits(prefix, a), model.logits(prefix, c)
    assert torch.equal(la[:, 0], lc[:, 0]) and not torch.allclose(la[:, 1], lc[:, 1])


def test_cached_sampling_equals_uncached_and_teacher_forcing(model):
    prefix = _prefix(model)
    t1, lp1 = model.sample(prefix, 12, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(1))
    t2, lp2 = model.sample(prefix, 12, temperature=0.9, top_p=0.9, use_cache=False,
                           generator=torch.Generator().manual_seed(1))
    assert torch.equal(t1, t2)
    torch.testing.assert_close(lp1, lp2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp1, model.box_logprob(prefix.expand(12, -1, -1), t1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["support", "xyxy"])
def test_samples_are_valid_boxes_inside_the_region(model, layout):
    m = LocationModel(LocationConfig(**{**vars(model.cfg), "box_tokens": layout})).eval()
    prefix = _prefix(m)
    for region, inside in (("left", lambda b: (b[:, [0, 2]] <= 0.5).all()),
                           ("bottom", lambda b: (b[:, [1, 3]] >= 0.5).all())):
        boxes = m.boxes_of(m.sample(prefix, 200, generator=torch.Generator().manual_seed(0), region=region)[0])
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert inside(boxes), region
    t, _ = m.sample(prefix, 200, generator=torch.Generator().manual_seed(0))
    assert (m.boxes_of(t)[:, 2] > 0.5).any()  # unrestricted: the right half is reachable


def test_support_tokens_put_the_bottom_edge_first_then_centre_and_size():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(box_values(boxes, "support"), torch.tensor([[0.9, 0.3, 0.7, 0.4], [1.0, 0.5, 1.0, 1.0]]))
    rand = torch.rand(500, 4)
    rand = torch.cat([torch.minimum(rand[:, :2], rand[:, 2:]), torch.maximum(rand[:, :2], rand[:, 2:])], 1)
    back = dequantize(quantize(rand, 64, "support"), 64, "support")
    assert (back[:, 3] - rand[:, 3]).abs().max() <= 0.5 / 64 + 1e-6  # the bottom edge: half a bin
    assert (back - rand).abs().max() <= 1 / 64 + 1e-6  # the others: one bin at most
    assert (back[:, 2:] >= back[:, :2]).all() and (back >= 0).all() and (back <= 1).all()


def test_dpo_loss_sign_and_gradient_direction():
    ref_w, ref_l = torch.tensor([-5.0]), torch.tensor([-5.0])
    at_ref = dpo_loss(ref_w, ref_l, ref_w, ref_l, beta=0.1)
    assert at_ref.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    # policy prefers the positive more than the reference does: lower loss; the reverse: higher
    assert dpo_loss(torch.tensor([-4.0]), torch.tensor([-6.0]), ref_w, ref_l, 0.1) < at_ref
    assert dpo_loss(torch.tensor([-6.0]), torch.tensor([-4.0]), ref_w, ref_l, 0.1) > at_ref
    w, l_ = torch.tensor([-5.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    dpo_loss(w, l_, ref_w, ref_l, 0.1).backward()
    assert w.grad.item() < 0 < l_.grad.item()  # descent raises the positive, lowers the negative


def test_mle_step_raises_the_likelihood_of_the_positive(model):
    m = LocationModel(model.cfg)
    m.load_state_dict(model.state_dict())
    prefix_in = torch.rand(1, 3, 32, 32), torch.tensor([1])
    box = torch.tensor([[2, 8, 6, 14]])
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    before = m.box_logprob(m.condition(*prefix_in), box).item()
    for _ in range(5):
        opt.zero_grad()
        mle_loss(m, m.condition(*prefix_in), box).backward()
        opt.step()
    assert m.box_logprob(m.condition(*prefix_in), box).item() > before


def test_save_and_load_round_trip_and_refuse_a_flipped_byte(model, tmp_path):
    from pics_model.modeling_pics import WeightsError

    model.save_pretrained(tmp_path / "m")
    back = LocationModel.from_pretrained(tmp_path / "m")
    prefix_in = torch.rand(1, 3, 32, 32), torch.tensor([2])
    torch.testing.assert_close(back.box_logprob(back.condition(*prefix_in), torch.tensor([[1, 2, 3, 4]])),
                               model.box_logprob(model.condition(*prefix_in), torch.tensor([[1, 2, 3, 4]])))
    w = tmp_path / "m" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="model.safetensors"):
        LocationModel.from_pretrained(tmp_path / "m")


def test_a_model_saved_before_box_tokens_loads_as_xyxy(model, tmp_path):
    import json

    from pics_model.file_hashes import save_model_folder

    m = LocationModel(LocationConfig(**{**vars(model.cfg), "box_tokens": "xyxy"}))
    old_cfg = {k: v for k, v in json.loads(m.cfg.to_json()).items() if k != "box_tokens"}
    save_model_folder(tmp_path / "old", m, json.dumps(old_cfg), {"pics_location": "1"})
    assert LocationModel.from_pretrained(tmp_path / "old").cfg.box_tokens == "xyxy"
    with pytest.raises(ValueError, match="box_tokens"):
        LocationConfig(class_names=CLASSES, box_tokens="yxyx")
