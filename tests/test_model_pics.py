"""PICSModel on the tiny preset: structure, training loss, gradient reach, save/load, presets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pics_model.config import PICSConfig, get_preset
from pics_model.data import build_item, collate
from pics_model.interaction_block import InteractionTransformerBlock
from pics_model.modeling_pics import PICSModel, WeightsError
from pics_model.testing import synthetic_sample


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return PICSModel(get_preset("tiny"))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    big_overlap = np.array([[0, 0, 56, 46], [24, 4, 80, 48], [10, 10, 40, 40]], np.float32)
    items = [build_item(synthetic_sample(rng, n=n, views=2, boxes=big_overlap[:n]), 64, None, collage=True)
             for n in (2, 3)]
    return collate(items)


def test_every_transformer_block_is_an_itb(tiny):
    from diffusers.models.attention import BasicTransformerBlock
    assert not any(isinstance(m, BasicTransformerBlock) for m in tiny.modules())
    assert len(tiny.itb_blocks()) == 10  # UNet 7 + ControlNet 3
    assert tiny.controlnet.controlnet_cond_embedding.conv_in.in_channels == 5  # the collage hint
    assert tiny.config.latent_size == 16


def test_presets_match_the_paper_layout():
    with torch.device("meta"):
        sd21 = PICSModel(get_preset("sd21"))
        sd15 = PICSModel(get_preset("sd15"))
    assert len(sd21.itb_blocks()) == 23  # 16 in the UNet, 7 in the ControlNet
    assert sd21.unet.config.cross_attention_dim == 1024 and sd15.unet.config.cross_attention_dim == 768
    assert sd21.vae.config.block_out_channels == (128, 256, 512, 512) and sd21.config.latent_size == 64
    assert sd21.object_encoder.backbone_dim == 1536  # DINOv2 ViT-g/14
    assert sd21.object_encoder.projector.out_features == 1024
    itb = sd21.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert isinstance(itb, InteractionTransformerBlock) and itb.gate_q.out_features == 1024


def test_config_overrides_and_params_mapping():
    cfg = get_preset("tiny", tau=0.3, expert_mode="dense", itb={"max_objects": 3}, resolution=128)
    assert (cfg.itb.tau, cfg.itb.expert_mode, cfg.itb.max_objects, cfg.resolution) == (0.3, "dense", 3, 128)
    with pytest.raises(ValueError, match="unknown"):
        get_preset("tiny", not_a_field=1)
    with pytest.raises(ValueError, match="ambiguous"):
        get_preset("tiny", block_out_channels=(8, 8))
    assert PICSConfig.from_json(cfg.to_json()) == cfg
    from tasks.params import ModelParams
    mapped = ModelParams(tau=0.25, use_shape_prior=False).pics_config()
    assert mapped.preset == "tiny" and mapped.itb.tau == 0.25 and not mapped.shape_encoder.enabled


def test_timestep_schedule(tiny):
    uniform = tiny.sample_timesteps(40000, torch.Generator().manual_seed(0), "cpu")
    assert abs((uniform >= 500).float().mean().item() - 0.5) < 0.01  # tiny trains from scratch: U[0,1000)
    objective = tiny.config.objective
    tiny.config.objective = objective.model_copy(update={"high_t_prob": 0.3})  # AnyDoor's, the SD presets'
    try:
        t = tiny.sample_timesteps(40000, torch.Generator().manual_seed(0), "cpu")
    finally:
        tiny.config.objective = objective
    assert t.min() >= 0 and t.max() <= 999
    high = (t >= 500).float().mean().item()
    assert abs(high - 0.3 * 0.5) < 0.01  # 30% from U[0,1000): half of those land in [500,1000)


def test_training_loss_and_gradient_reach(tiny, batch):
    params = tiny.set_trainable("reference")
    names = {id(p): n for n, p in tiny.named_parameters()}
    trainable = {names[id(p)] for p in params}
    assert not any(n.startswith("vae.") for n in trainable)
    assert not any(n.startswith("unet.down_blocks") and ".gate" not in n and ".back_" not in n for n in trainable)
    assert any(n.startswith("unet.up_blocks") for n in trainable)
    assert {n for n in trainable if n.startswith("object_encoder")} == {
        "object_encoder.projector.weight", "object_encoder.projector.bias", "object_encoder.appearance.weight",
        "object_encoder.appearance.bias", "object_encoder.appearance_pos"}
    itb_params = [p for blk in tiny.itb_blocks() for p in blk.parameters() if p.requires_grad]
    assert all(p.requires_grad for blk in tiny.itb_blocks() for p in blk.new_parameters())
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    flags = {n: p.requires_grad for n, p in tiny.named_parameters()}
    tiny.train()
    opt = torch.optim.SGD(params, lr=0.05)
    g = torch.Generator().manual_seed(0)
    try:
        # ControlNet ITBs sit behind two zero-initialised layers (the ControlNet's zero convs, then
        # the back-attention's output): the second update opens the last of them
        for _ in range(3):
            opt.zero_grad()
            loss, stats = tiny.training_loss(batch, g, mask_weight=1.0, cond_drop_prob=0.0)
            assert torch.isfinite(loss) and stats["overlap_frac"] > 0 and stats["cond_dropped"] == 0
            loss.backward()
            opt.step()
        dead = [names[id(p)] for p in itb_params if p.grad is None or p.grad.abs().sum() == 0]
        assert not dead, dead[:5]
        assert not any(p.grad is not None for n, p in tiny.named_parameters() if n.startswith("vae."))
    finally:
        tiny.load_state_dict(state)
        for n, p in tiny.named_parameters():
            p.requires_grad_(flags[n])
        tiny.zero_grad(set_to_none=True)
        tiny.eval()


def test_prediction_types_and_cond_drop(tiny, batch):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        lv, _ = tiny.training_loss(batch, g, prediction_type="v_prediction")
        _, st = tiny.training_loss(batch, g, cond_drop_prob=1.0)
        # x0 prediction: same noise and timesteps, only the target differs
        le, _ = tiny.training_loss(batch, torch.Generator().manual_seed(2), prediction_type="epsilon")
        lx, _ = tiny.training_loss(batch, torch.Generator().manual_seed(2), prediction_type="sample")
    assert torch.isfinite(lv) and st["cond_dropped"] == 2
    assert torch.isfinite(lx) and abs(float(lx - le)) > 1e-3
    with pytest.raises(ValueError, match="prediction_type"):
        tiny.training_loss(batch, g, prediction_type="x0")


def test_shape_encoder_starts_neutral_and_is_view_order_invariant(tiny, batch):
    objs, pri, pv = batch["objects"], batch["priors"], batch["prior_valid"]
    with torch.no_grad():
        assert torch.equal(tiny.encode_objects(objs, pri, pv), tiny.encode_objects(objs))
        tiny.shape_encoder.out.weight.normal_(0, 0.1)
        a = tiny.encode_objects(objs, pri, pv)
        b = tiny.encode_objects(objs, pri.flip(2), pv)
        tiny.shape_encoder.out.weight.zero_()
    assert not torch.allclose(a, tiny.encode_objects(objs)) and torch.allclose(a, b, atol=1e-5)


def test_save_load_round_trip(tiny, batch, tmp_path):
    with torch.no_grad():
        for blk in tiny.itb_blocks():  # make the new parameters matter
            blk.back_attn.to_out[0].weight.normal_(0, 0.02)
    tiny.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "sha256.json"]
    loaded = PICSModel.from_pretrained(tmp_path / "m")
    assert loaded.config == tiny.config
    sa, sb = tiny.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        codes = tiny.encode_objects(batch["objects"])
        args = (torch.randn(2, tiny.config.vae.latent_channels, 16, 16), torch.tensor([10, 700]), batch["hint"], codes,
                batch["routing_masks"], batch["object_valid"])
        assert torch.equal(tiny(*args), loaded(*args))
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        (tmp_path / "m" / "model.safetensors").unlink()
        PICSModel.from_pretrained(tmp_path / "m")


def test_corrupted_weights_are_refused_naming_the_file(tiny, tmp_path):
    d = tiny.save_pretrained(tmp_path / "m")
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0x40]))  # same size: a tensor byte, not the header
    with pytest.raises(WeightsError, match=f"{weights}: its sha256 differs.*copy or download the model folder again"):
        PICSModel.from_pretrained(d)
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=f"{weights}: .* bytes, sha256.json recorded .*truncated"):
        PICSModel.from_pretrained(d)
    with pytest.raises(WeightsError, match=f"{weights}: not a readable safetensors file"):
        PICSModel.from_pretrained(d, verify=False)  # unverified, a truncated file is still named


def test_folder_without_hashes_is_refused_until_resaved(tiny, tmp_path):
    d = tiny.save_pretrained(tmp_path / "m")
    (d / "sha256.json").unlink()  # as saved by an older version
    with pytest.raises(WeightsError, match="sha256.json: missing.*verify=False"):
        PICSModel.from_pretrained(d)
    PICSModel.from_pretrained(d, verify=False).save_pretrained(d)  # the documented way to adopt it
    assert PICSModel.from_pretrained(d).config == tiny.config


def test_flops_estimate(tiny):
    sparse = tiny.flops_per_sample(expert_mode="sparse", device="cpu")
    dense = tiny.flops_per_sample(expert_mode="dense", device="cpu")
    infer = tiny.flops_per_sample(expert_mode="sparse", training=False, device="cpu")
    assert 0 < sparse["denoiser"] < dense["denoiser"]
    assert infer["denoiser"] < sparse["denoiser"]
    assert sparse["total"] == sparse["denoiser"] + sparse["vae_encode"] + sparse["object_encoder"]


def test_gradient_checkpointing_passes_routing_through(tiny, batch):
    """diffusers' checkpointing calls blocks positionally; the routing must still arrive."""
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    grads = []
    for ckpt in (False, True):
        if ckpt:
            tiny.unet.enable_gradient_checkpointing()
            tiny.controlnet.enable_gradient_checkpointing()
        tiny.train()
        tiny.zero_grad(set_to_none=True)
        loss, _ = tiny.training_loss(batch, g(), cond_drop_prob=0.0)
        loss.backward()
        blk = tiny.unet.up_blocks[0].attentions[0].transformer_blocks[0]
        grads.append((loss.detach(), blk.gate_q.weight.grad.clone()))
    tiny.unet.disable_gradient_checkpointing()
    tiny.controlnet.disable_gradient_checkpointing()
    tiny.zero_grad(set_to_none=True)
    tiny.eval()
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
    assert grads[0][1].abs().sum() > 0


def test_loads_a_local_diffusers_stable_diffusion_folder(tmp_path):
    """unet/ vae/ scheduler/ in diffusers format (written here offline, tiny layout)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from pics_model.config import TINY_KL_VAE
    kl = {"vae": TINY_KL_VAE, "unet": {"in_channels": 4, "out_channels": 4}, "hint_concat": False}  # as SD folders
    cfg = get_preset("tiny", **kl)
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**cfg.unet.to_diffusers())
    vae = AutoencoderKL(**{**cfg.vae.to_diffusers(), "scaling_factor": 0.5})
    unet.save_pretrained(tmp_path / "sd" / "unet")
    vae.save_pretrained(tmp_path / "sd" / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.02).save_pretrained(
        tmp_path / "sd" / "scheduler")
    m = PICSModel(get_preset("tiny", stable_diffusion_path=str(tmp_path / "sd"), **kl))
    ref = unet.state_dict()
    ours = m.unet.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in ref.items())  # ITBs adopted the pretrained weights
    assert torch.equal(m.controlnet.down_blocks[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[0].conv1.weight)
    assert m.config.vae.scaling_factor == 0.5 and m.config.scheduler.beta_start == 0.001
    odd = {**cfg.unet.to_diffusers(), "time_embedding_type": "fourier"}
    with pytest.raises(ValueError, match="cannot reproduce"):
        from pics_model.config import UNetConfig
        UNetConfig.from_diffusers(odd)
    with pytest.raises(FileNotFoundError, match="not a diffusers Stable Diffusion folder"):
        PICSModel(get_preset("tiny", stable_diffusion_path=str(tmp_path), **kl))


def test_collage_residual_starts_the_x0_estimate_from_the_hint():
    from tasks.params import ModelParams

    torch.manual_seed(0)
    model = PICSModel(ModelParams(collage_residual=True).pics_config())
    assert model.config.collage_residual and model.config.scheduler.prediction_type == "sample"
    rng = np.random.default_rng(0)
    boxes = np.array([[0, 0, 56, 46], [24, 4, 80, 48]], np.float32)
    sample = synthetic_sample(rng, n=2, views=0, boxes=boxes)
    sample["image"][:] = (200, 60, 30)  # one colour: the fill of the boxes must be exactly it
    batch = collate([build_item(sample, 64, None, collage=True)])
    torch.nn.init.zeros_(model.unet.conv_out.weight)
    torch.nn.init.zeros_(model.unet.conv_out.bias)
    codes = model.encode_objects(batch["objects"])
    noisy = torch.randn(1, 48, 16, 16)
    hint = batch["hint"]
    with torch.no_grad():
        x0 = model(noisy, torch.tensor([500]), hint, codes, batch["routing_masks"])
        start = model.decode_latents(x0, clamp=False)
    # a network that outputs zero returns the hint where it is known: the background and the collage
    known = (hint[:, 3:4] < 0.5) | (hint[:, 4:5] >= 1)
    assert torch.allclose(start[known.expand_as(start)], hint[:, :3][known.expand_as(start)], atol=1e-5)
    # a silhouette's edge pixel (coverage < 1) blends its colour over the fill of the box around it
    edge = ((hint[:, 3:4] >= 0.5) & (hint[:, 4:5] > 0) & (hint[:, 4:5] < 1)).expand_as(start)
    assert edge.any() and not torch.allclose(start[edge], hint[:, :3][edge], atol=1e-3)
    known = known | (hint[:, 4:5] > 0)
    # and fills the boxes' uncovered pixels from the background around the boxes, not from the
    # silhouettes (noise patches) and not grey (0)
    hole = ~known.expand_as(start)
    colour = torch.tensor([200, 60, 30]).div(255).mul(2).sub(1)[None, :, None, None].expand_as(start)
    assert hole.any() and torch.allclose(start[hole], colour[hole], atol=0.05)  # bicubic ringing at the pad
    with pytest.raises(ValueError, match="collage_residual"):
        model.set_prediction_type("v_prediction")
    with pytest.raises(ValueError, match="collage_residual"):
        get_preset("tiny", collage_residual=True)  # the tiny preset's epsilon scheduler
    with pytest.raises(ValueError, match="collage_residual"):
        ModelParams(collage_residual=True, preset="sd21")
