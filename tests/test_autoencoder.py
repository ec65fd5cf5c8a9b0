"""The tiny KL autoencoder's fit (model.latent=kl): the posterior starts near-deterministic and the fit runs."""
import math

import torch

from pics_model.config import TINY_KL_VAE, VAEConfig
from pics_model.modeling_pics import build_vae
from tasks.train.autoencoder import fit_autoencoder, posterior_std, set_posterior_logvar


def _vae():
    torch.manual_seed(0)
    return build_vae(VAEConfig(**TINY_KL_VAE))


def test_set_posterior_logvar_fixes_the_posterior_std():
    vae = _vae()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert vae.encode(x).latent_dist.std.mean() > 0.3  # a fresh AutoencoderKL: noise-like latents
    set_posterior_logvar(vae, -8.0)
    with torch.no_grad():
        std = vae.encode(x).latent_dist.std
    assert torch.allclose(std, torch.full_like(std, math.exp(-4.0)))


def test_fit_reports_a_small_posterior_std_only_with_logvar_init():
    x = torch.rand(6, 3, 64, 64) * 2 - 1
    low = fit_autoencoder(_vae(), x[:4], x[4:], steps=2, batch_size=2, log=None)
    fresh = fit_autoencoder(_vae(), x[:4], x[4:], steps=2, batch_size=2, logvar_init=None, log=None)
    assert low["posterior_std"] < 0.1 < fresh["posterior_std"]
    assert set(low) >= {"psnr_before", "psnr_after", "posterior_std", "steps", "final_loss"}


def test_posterior_std_is_relative_to_the_latent_spread():
    vae = _vae()
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    set_posterior_logvar(vae, 0.0)  # std 1
    with torch.no_grad():
        spread = vae.encode(x).latent_dist.mean.std()
    assert abs(posterior_std(vae, x) - 1.0 / float(spread)) < 1e-4
