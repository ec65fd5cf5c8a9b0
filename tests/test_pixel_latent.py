"""The tiny preset's latent and object tokens: an exact space-to-depth autoencoder (drop-in for
AutoencoderKL) and appearance tokens that carry the object's colours."""
from __future__ import annotations

import pytest
import torch

from pics_model.config import ObjectEncoderConfig, VAEConfig, get_preset
from pics_model.modeling_pics import PICSModel, build_vae
from pics_model.object_encoder import ObjectEncoder
from pics_model.pixel_autoencoder import PixelShuffleAutoencoder
from tasks.train.autoencoder import reconstruction_psnr


def test_pixel_shuffle_latent_round_trips_exactly():
    vae = PixelShuffleAutoencoder(3, 4)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    dist = vae.encode(x).latent_dist
    assert dist.mean.shape == (2, 48, 16, 16) and vae.config.latent_channels == 48
    assert torch.equal(vae.decode(dist.mode()).sample, x)
    assert float(dist.std.max()) < 1e-6  # a sample of the posterior is the mean
    assert reconstruction_psnr(vae, x) >= 99.0  # finite: the error is floored at 1e-10


def test_pixel_shuffle_rejects_a_side_not_divisible_by_the_factor():
    with pytest.raises(ValueError, match="not divisible by 4"):
        PixelShuffleAutoencoder(3, 4).encode(torch.zeros(1, 3, 62, 64))


def test_vae_config_checks_the_pixel_latent_channels():
    with pytest.raises(ValueError, match="latent_channels must be in_channels"):
        VAEConfig(kind="pixel_shuffle", factor=2, latent_channels=4)
    assert VAEConfig(kind="pixel_shuffle", factor=2, latent_channels=12).downsample_factor == 2
    assert "kind" not in VAEConfig().to_diffusers()  # the AutoencoderKL kwargs stay diffusers'


def test_tiny_preset_encodes_and_decodes_exactly_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = PICSModel(get_preset("tiny"))
    assert isinstance(model.vae, PixelShuffleAutoencoder) and model.config.latent_size == 16
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    factor = model.calibrate_vae_scaling(x)
    z = model.encode_images(x)
    assert z.shape == (2, model.config.vae.latent_channels, 16, 16)
    assert torch.allclose(model.decode_latents(z), x, atol=1e-5)
    model.save_pretrained(tmp_path / "m")
    loaded = PICSModel.from_pretrained(tmp_path / "m")
    assert loaded.config.vae.scaling_factor == pytest.approx(factor)
    assert torch.allclose(loaded.decode_latents(z), x, atol=1e-5)


def test_sd_presets_keep_the_autoencoder_kl():
    from diffusers import AutoencoderKL
    with torch.device("meta"):
        assert isinstance(build_vae(get_preset("sd21").vae), AutoencoderKL)


def test_appearance_tokens_see_the_object_colour_and_train():
    cfg = ObjectEncoderConfig(kind="small", image_size=64, small_channels=(8,), appearance_grid=4)
    enc = ObjectEncoder(cfg, context_dim=16)
    red, blue = torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)
    red[:, 0], blue[:, 2] = 1.0, 1.0
    tokens = enc(torch.cat([red, blue]))
    assert tokens.shape == (2, 1 + 32 * 32 + 16, 16)
    app = enc.appearance_tokens(torch.cat([red, blue]))
    assert torch.equal(tokens[:, -16:], app)
    assert (app[0] - app[1]).abs().amax() > 1e-3  # the colour reaches the code
    model_cfg = get_preset("tiny")
    assert model_cfg.object_encoder.appearance_grid > 0
    with torch.device("meta"):
        model = PICSModel(model_cfg, load_pretrained=False)
    trainable = {id(p) for p in model.set_trainable("reference")}
    assert id(model.object_encoder.appearance.weight) in trainable
    assert id(model.object_encoder.appearance_pos) in trainable


def test_model_latent_param_selects_the_fitted_kl_autoencoder():
    from tasks.params import ModelParams
    kl = ModelParams(preset="tiny", latent="kl").pics_config()
    assert (kl.vae.kind, kl.vae.latent_channels, kl.unet.in_channels, kl.latent_size) == ("kl", 4, 4 + 5 * 16, 16)
    assert ModelParams(preset="tiny").pics_config().vae.kind == "pixel_shuffle"
    with pytest.raises(ValueError, match="tiny preset's"):
        ModelParams(preset="sd21", latent="pixel_shuffle")


def test_unet_first_level_must_hold_every_latent_channel():
    with pytest.raises(ValueError, match="must be >= the 48 latent channels"):
        get_preset("tiny", unet={"block_out_channels": (32, 64)})


def test_hint_reaches_the_unet_input_directly():
    """With hint_concat the masked background enters conv_in; without, only the zero-initialised
    ControlNet outputs carry it, and a fresh model ignores the hint entirely."""
    from pics_model.data import build_item, collate
    from pics_model.testing import synthetic_sample
    import numpy as np

    rng = np.random.default_rng(0)
    batch = collate([build_item(synthetic_sample(rng, n=2, views=0), 64, None, collage=True)])
    torch.manual_seed(0)
    outs = {}
    for concat in (True, False):
        over = {} if concat else {"hint_concat": False, "unet": {"in_channels": 48}}
        model = PICSModel(get_preset("tiny", **over)).eval()
        codes = model.encode_objects(batch["objects"])
        noisy = torch.randn(1, 48, 16, 16, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            a = model(noisy, torch.tensor([500]), batch["hint"], codes, batch["routing_masks"])
            b = model(noisy, torch.tensor([500]), -batch["hint"], codes, batch["routing_masks"])
        outs[concat] = float((a - b).abs().max())
    assert outs[True] > 1e-3 and outs[False] == 0.0


def test_tiny_sampler_starts_from_pure_noise():
    from pics_model.pipeline_pics import make_scheduler
    with torch.device("meta"):
        tiny = PICSModel(get_preset("tiny"), load_pretrained=False)
        sd21 = PICSModel(get_preset("sd21"), load_pretrained=False)
    for name in ("ddim", "dpmsolver++"):
        sched = make_scheduler(name, tiny)
        sched.set_timesteps(2)
        assert sched.timesteps.tolist() == [999, 499]
    sched = make_scheduler("ddim", sd21)  # SD keeps the spacing it was trained and tuned with
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [751, 501, 251, 1]


def test_collage_hint_is_the_tiny_presets_and_switchable():
    from tasks.params import ModelParams

    tiny, off = ModelParams().pics_config(), ModelParams(collage_hint=False).pics_config()
    assert tiny.collage_hint and (tiny.controlnet.conditioning_channels, tiny.unet.in_channels) == (5, 48 + 5 * 16)
    assert not off.collage_hint and (off.controlnet.conditioning_channels, off.unet.in_channels) == (4, 48 + 4 * 16)
    assert not get_preset("sd21").collage_hint and not get_preset("sd15").collage_hint
    with pytest.raises(ValueError, match="conditioning_channels must be 5"):
        get_preset("tiny", controlnet={"conditioning_channels": 4})
