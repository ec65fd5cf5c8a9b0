"""Image-quality metrics of the evaluate stage, pure torch (no Prefect, no Ray).

Conventions: images are float tensors ``[B, 3, H, W]`` in ``[0, 1]``; a region mask is a bool
tensor ``[B, H, W]``. Per-image functions return ``[B]`` float64; a masked metric whose region is
empty for an image is NaN for that image (it is left out of the means, and counted).

The "m" variants (mPSNR, mSSIM, mLPIPS) are the paper's metrics "on the intersection region of the
two objects". The paper gives no code; the exact definitions used here (also in docs/metrics.md):

* Overlap region ``M``: the pixels covered by at least two of the sample's object boxes, each box
  being the one the model is conditioned on (the expanded box, mapped into the evaluation frame),
  rasterised by pixel centres: pixel (x, y) is in box (x0, y0, x1, y1) iff x0 <= x + 0.5 < x1 and
  y0 <= y + 0.5 < y1. For a pair this is the intersection of the two boxes; for N objects the
  union of the pairwise intersections. (Modal silhouettes of occluding objects barely intersect,
  which is why boxes, the model's own routing regions, define the overlap.)
* ``psnr``: ``10 log10(1 / MSE)`` with MSE over all channels and pixels (mPSNR: pixels in ``M``),
  data range 1. Identical images give MSE 0; PSNR is capped at ``PSNR_CAP_DB``.
* ``ssim``: Gaussian SSIM of Wang et al. 2004 as scikit-image computes it with
  ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1``: 11 x 11 window,
  K1 = 0.01, K2 = 0.03, per channel. The SSIM map is averaged over channels and over the pixels at
  least 5 px from the border (the window's half width); mSSIM averages the same map over the
  pixels of ``M`` that are at least 5 px from the border. mSSIM with ``M`` = the whole image equals SSIM.
* ``lpips_proxy``: the LPIPS formula (unit-normalise each feature vector across channels, squared
  difference, spatial mean, mean over layers) on five layers of the ImageNet MobileNetV2, with
  uniform layer weights instead of LPIPS's learned linear heads. mLPIPS: the spatial mean is
  weighted by ``M`` area-resampled to each layer's grid. Not comparable to published LPIPS.
* ``frechet_distance``: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) over pooled features; with
  MobileNetV2 features it is reported as ``fid_mobilenetv2_proxy``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PSNR_CAP_DB = 100.0
SSIM_SIGMA = 1.5
SSIM_WIN = 11  # int(3.5 * sigma + 0.5) * 2 + 1, scikit-image's truncation of the Gaussian
SSIM_BORDER = (SSIM_WIN - 1) // 2


def _check(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> None:
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be [B, C, H, W]")
    if mask is not None and tuple(mask.shape) != (pred.shape[0], *pred.shape[2:]):
        raise ValueError(f"mask {tuple(mask.shape)} must be [B, H, W] = {(pred.shape[0], *pred.shape[2:])}")


def rasterise_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes ``[N, 4]`` xyxy (pixels, float) -> bool masks ``[N, H, W]``, by pixel centres."""
    from pics_model.data import box_masks

    return torch.from_numpy(box_masks(torch.as_tensor(boxes, dtype=torch.float64).numpy(), height, width))


def overlap_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The "m" region ``[H, W]``: pixels inside at least two of the boxes ``[N, 4]`` (xyxy)."""
    return rasterise_boxes(boxes, height, width).sum(0) >= 2


def psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR in dB ``[B]`` (data range 1); with ``mask`` the MSE runs over the masked pixels only."""
    _check(pred, target, mask)
    err = (pred.double() - target.double()).square().mean(dim=1)  # [B, H, W], mean over channels
    if mask is None:
        mse = err.flatten(1).mean(1)
    else:
        m = mask.to(err.dtype)
        n = m.flatten(1).sum(1)
        mse = (err * m).flatten(1).sum(1) / n
        mse = torch.where(n > 0, mse, torch.full_like(mse, float("nan")))
    out = 10.0 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_CAP_DB / 10)))
    return torch.where(torch.isnan(mse), mse, out)


def _gaussian_taps(dtype) -> torch.Tensor:
    x = torch.arange(SSIM_WIN, dtype=torch.float64) - SSIM_BORDER
    g = torch.exp(-x.square() / (2 * SSIM_SIGMA**2))
    return (g / g.sum()).to(dtype)


def _blur_valid(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of ``[B, C, H, W]``, 'valid' part only: ``[B, C, H-10, W-10]``."""
    c = x.shape[1]
    x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, taps.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def ssim_map(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM averaged over channels ``[B, H, W]``; NaN on the 5 px border it does not cover.

    A separable Gaussian (two depthwise 11-tap passes) instead of torchmetrics' 2-D window: same
    numbers (tests check both against scikit-image), several times faster on CPU.
    """
    if min(pred.shape[-2:]) < SSIM_WIN:
        raise ValueError(f"SSIM needs images of at least {SSIM_WIN} px a side, got {tuple(pred.shape[-2:])}")
    x, y = pred.double(), target.double()
    c = x.shape[1]
    stats = _blur_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), _gaussian_taps(x.dtype))
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(c, dim=1)
    var_x, var_y, cov = e_xx - mu_x.square(), e_yy - mu_y.square(), e_xy - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return F.pad(s.mean(1), (SSIM_BORDER,) * 4, value=float("nan"))


def ssim(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SSIM ``[B]``: the map's mean over interior pixels (and, with ``mask``, over its pixels only)."""
    _check(pred, target, mask)
    smap = ssim_map(pred, target)
    valid = ~torch.isnan(smap)
    if mask is not None:
        valid &= mask.bool()
    n = valid.flatten(1).sum(1)
    out = torch.where(valid, smap, torch.zeros_like(smap)).flatten(1).sum(1) / n.clamp_min(1)
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def _upscale(x: torch.Tensor, min_side: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if min(h, w) >= min_side:
        return x
    s = min_side / min(h, w)
    return F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False)


@torch.no_grad()
def lpips_proxy(net, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                min_side: int = 224) -> torch.Tensor:
    """LPIPS-style distance ``[B]`` (0 = identical) on ``net.taps`` (a MobileNetV2Features).

    Images whose short side is under ``min_side`` are upsampled first (ImageNet features of 64 px
    images are mostly border effects); the mask follows the same resampling.
    """
    _check(pred, target, mask)
    x, y = _upscale(pred.float(), min_side), _upscale(target.float(), min_side)
    m = None if mask is None else _upscale(mask[:, None].float(), min_side)
    fx, fy = net.taps(x), net.taps(y)
    per_layer = []
    for a, b in zip(fx, fy):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        d = (a - b).square().sum(1, keepdim=True)  # [B, 1, h, w]
        if m is None:
            per_layer.append(d.mean(dim=(1, 2, 3)))
        else:
            w = F.adaptive_avg_pool2d(m, d.shape[-2:])
            n = w.sum(dim=(1, 2, 3))
            per_layer.append(torch.where(n > 0, (d * w).sum(dim=(1, 2, 3)) / n.clamp_min(1e-12),
                                         torch.full_like(n, float("nan"))))
    return torch.stack(per_layer, 0).mean(0).double()


class StoredFeatures(nn.Module):
    """The `feature` module of torchmetrics' FID for embeddings already computed.

    The evaluate workers embed each image once with our MobileNetV2 (``Embedder.embed``) and store
    the vector in the results table (so a resumed run does not embed again); the summary feeds
    those vectors to the metric, so its feature step is the identity.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (N >= 2 each).

    ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^1/2), unbiased covariances, as
    torchmetrics' ``FrechetInceptionDistance`` computes it (in float64) with stored features.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = feats_a.double(), feats_b.double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"Fréchet distance needs >= 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    fid = FrechetInceptionDistance(feature=StoredFeatures(a.shape[1]))
    fid.update(a, real=True)
    fid.update(b, real=False)
    return float(fid.compute())


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity ``[N]`` of embeddings ``[N, D]``."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1)
