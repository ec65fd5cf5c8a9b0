"""Fit the tiny preset's autoencoder on the training images, so latent diffusion has real latents.

The tiny preset has no pretrained VAE (nothing downloads). A randomly initialised, frozen VAE
maps every image to noise-like latents that decode to garbage: the diffusion loss would then be
about nothing. A few hundred steps of reconstruction training on the run's own training images
(L2 + a small KL term, the VAE objective without the GAN and LPIPS terms) give an autoencoder that
reconstructs; its held-out PSNR is measured before and after and recorded with the run.

A fresh AutoencoderKL starts with posterior std about 1, and a few hundred steps only bring it
down to about half the spread of the posterior means: the latents the diffusion model is trained
on would then be mostly encoder noise, and its loss would sit on that noise. SD's VAE has a
near-deterministic posterior, so the fit starts the log-variance low (``logvar_init``) and lets
training move it from there.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor, batch: int = 16) -> float:
    """Mean PSNR (dB, images in [-1, 1] mapped to [0, 1]) of ``decode(encode(x).mode())``."""
    vae.eval()
    scores = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((rec - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        scores += (-10 * torch.log10(mse)).tolist()
    return float(sum(scores) / max(1, len(scores)))


@torch.no_grad()
def set_posterior_logvar(vae, value: float) -> None:
    """Make the log-variance half of ``quant_conv``'s output (the posterior's ``logvar`` channels)
    the constant ``value`` (zero weights, bias ``value``); training moves it from there."""
    conv = getattr(vae, "quant_conv", None)
    if conv is None:
        raise ValueError("set_posterior_logvar: this AutoencoderKL has no quant_conv (use_quant_conv=False)")
    c = vae.config.latent_channels
    conv.weight[c:].zero_()
    conv.bias[c:].fill_(value)


@torch.no_grad()
def posterior_std(vae, images: torch.Tensor, batch: int = 16) -> float:
    """Mean posterior std over ``images``, relative to the std of the posterior means (1: the
    latents are as much noise as signal)."""
    vae.eval()
    stds, means = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i:i + batch]).latent_dist
        stds.append(dist.std.mean())
        means.append(dist.mean)
    return float(torch.stack(stds).mean() / torch.cat(means).std().clamp_min(1e-12))


def fit_autoencoder(vae, train_images: torch.Tensor, heldout_images: torch.Tensor, steps: int = 300,
                    lr: float = 2e-3, batch_size: int = 16, kl_weight: float = 1e-6, seed: int = 0,
                    logvar_init: float | None = -8.0, log=print) -> dict:
    """Train ``vae`` (a diffusers ``AutoencoderKL``) in place on ``train_images`` [N, 3, H, W] in
    [-1, 1], with random horizontal flips. ``logvar_init``: the posterior log-variance to start
    from (None: keep the initialisation). Returns PSNRs before/after on ``heldout_images`` and the
    mean posterior std on them after the fit."""
    if len(train_images) == 0:
        raise ValueError("fit_autoencoder: no training images")
    g = torch.Generator().manual_seed(seed)
    before = reconstruction_psnr(vae, heldout_images)
    if logvar_init is not None:
        set_posterior_logvar(vae, logvar_init)
    params = [p for p in vae.parameters()]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    vae.train()
    t0 = time.perf_counter()
    loss_val = float("nan")
    for step in range(steps):
        idx = torch.randint(len(train_images), (min(batch_size, len(train_images)),), generator=g)
        x = train_images[idx]
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_val = float(loss.detach())
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"[autoencoder] step {step + 1}/{steps} loss {loss_val:.4f}")
    for p, w in zip(params, was):
        p.requires_grad_(w)
    vae.eval()
    after = reconstruction_psnr(vae, heldout_images)
    return {"psnr_before": before, "psnr_after": after, "posterior_std": posterior_std(vae, heldout_images),
            "steps": steps, "final_loss": loss_val,
            "seconds": time.perf_counter() - t0, "train_images": len(train_images),
            "heldout_images": len(heldout_images)}
