"""An exact cache of the frozen encoders' outputs, keyed by a hash of each input image.

The frozen input-side networks (the VAE encoder on the target, the object backbone on objects and
prior views) cost a large share of a training step (tiny preset: 2.0 of 3.05 GFLOPs a sample).
Their outputs depend only on their input, so they can be reused across epochs:

- VAE: the posterior moments of each target image. ``PICSModel.encode_images`` still draws its
  own noise from the step's generator.
- object backbone: the tokens of each object patch / prior view. Augmented objects differ every
  epoch and never hit, so this part is on only when augmentation is off (``train.augment=false``);
  zeroed objects (conditioning dropout) hit either way.

Misses are computed one image at a time, so an entry never depends on which other images shared
its batch: a run that restarts with an empty cache reproduces the uninterrupted run bit for bit
(against an uncached run the values agree to float rounding of batched convolutions).

The cache attaches to one model instance by wrapping ``vae.encode`` and
``object_encoder.backbone_tokens``; parameter names and state dicts are unchanged. Entries are
held in CPU memory up to ``max_mb`` (oldest dropped first).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


def row_keys(x: torch.Tensor, tag: str = "") -> list[str]:
    """One content hash per leading-axis row of ``x`` (dtype and shape included)."""
    flat = x.detach().to("cpu").contiguous()
    head = f"{tag}|{flat.dtype}|{tuple(flat.shape[1:])}".encode()
    return [hashlib.blake2b(head + row.numpy().tobytes(), digest_size=16).hexdigest() for row in flat.view(len(flat), -1)]


@dataclass
class FeatureCache:
    max_bytes: int
    entries: OrderedDict = field(default_factory=OrderedDict)
    bytes: int = 0
    hits: int = 0
    misses: int = 0

    def lookup(self, keys: list[str], compute, device) -> torch.Tensor:
        """Rows for ``keys``; ``compute(i)`` gives row ``i`` ([1, ...]) on a miss."""
        rows = []
        for i, k in enumerate(keys):
            if k in self.entries:
                self.hits += 1
                self.entries.move_to_end(k)
                rows.append(self.entries[k].to(device))
            else:
                self.misses += 1
                t = compute(i)[0]
                self._put(k, t.detach().to("cpu"))
                rows.append(t)
        return torch.stack(rows)

    def _put(self, key: str, t: torch.Tensor) -> None:
        self.entries[key] = t
        self.bytes += t.numel() * t.element_size()
        while self.bytes > self.max_bytes and self.entries:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0,
                "entries": len(self.entries), "mb": self.bytes / 2**20}


def attach_feature_cache(model, objects: bool, max_mb: float = 1024.0) -> dict[str, FeatureCache]:
    """Wrap ``model.vae.encode`` (always) and ``model.object_encoder.backbone_tokens`` (``objects``)."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    caches: dict[str, FeatureCache] = {}
    vae = model.vae
    vae_encode = vae.encode
    vcache = caches["vae"] = FeatureCache(int(max_mb * 2**20 / (2 if objects else 1)))

    def encode(x, return_dict: bool = True):
        with torch.no_grad():
            moments = vcache.lookup(row_keys(x, "vae"), lambda i: vae_encode(x[i:i + 1]).latent_dist.parameters,
                                    x.device)
        dist = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    vae.encode = encode
    if objects:
        enc = model.object_encoder
        if enc.trains_backbone:
            raise ValueError("feature cache: the object backbone trains; its outputs cannot be cached")
        tokens = enc.backbone_tokens
        ocache = caches["objects"] = FeatureCache(int(max_mb * 2**20 / 2))

        def backbone_tokens(images, resize: bool = True):
            with torch.no_grad():
                return ocache.lookup(row_keys(images, f"obj{int(resize)}"),
                                     lambda i: tokens(images[i:i + 1], resize), images.device)

        enc.backbone_tokens = backbone_tokens
    return caches
