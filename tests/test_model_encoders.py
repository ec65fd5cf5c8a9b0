"""Object encoders: the real MobileNetV2 weights, DINOv2 loaders (hub vs HF layout), no pickle."""
from __future__ import annotations

import importlib.resources
import pickle

import pytest
import torch

from pics_model.config import DinoV2Arch, ObjectEncoderConfig
from pics_model.dinov2 import DinoV2ViT, load_dinov2_weights, read_state_dict
from pics_model.object_encoder import MOBILENET_WEIGHTS, ObjectEncoder
from pics_model.testing import write_dinov2_hf_folder

ARCH = DinoV2Arch(embed_dim=32, depth=2, num_heads=4, pos_embed_size=56, ffn="swiglu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mobilenet_encoder_uses_the_shipped_imagenet_weights():
    enc = ObjectEncoder(ObjectEncoderConfig(kind="mobilenetv2", image_size=96), context_dim=64)
    path = importlib.resources.files(MOBILENET_WEIGHTS[0]) / MOBILENET_WEIGHTS[1]
    shipped = torch.load(str(path), map_location="cpu", weights_only=True)
    ours = enc.backbone.features.state_dict()
    assert torch.equal(ours["0.0.weight"], shipped["features.0.0.weight"])
    assert torch.equal(ours["18.1.running_var"], shipped["features.18.1.running_var"])
    assert not any(p.requires_grad for p in enc.backbone.parameters())
    assert not enc.backbone.training  # a fresh encoder already runs its frozen BatchNorm in eval mode
    stats = enc.backbone.features[18][1].running_mean.clone()
    enc.backbone_tokens(torch.rand(2, 3, 96, 96))
    assert torch.equal(stats, enc.backbone.features[18][1].running_mean)
    enc.train()
    assert not enc.backbone.training  # frozen BatchNorm statistics stay fixed
    codes = enc(torch.rand(3, 3, 64, 64))  # resized to 96 -> 3x3 map + pooled token
    assert codes.shape == (3, 10, 64)


def test_dinov2_hub_and_hf_layouts_load_the_same_network(tmp_path):
    torch.manual_seed(0)
    src = DinoV2ViT(ARCH)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    torch.save(sd, tmp_path / "dinov2_hub.pth")
    hf = write_dinov2_hf_folder(src, tmp_path / "hf")
    chunked = {k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k: v for k, v in sd.items()}
    torch.save(chunked, tmp_path / "dinov2_chunked.pth")  # hub models built with block_chunks > 0
    a, b, c = DinoV2ViT(ARCH), DinoV2ViT(ARCH), DinoV2ViT(ARCH)
    load_dinov2_weights(a, tmp_path / "dinov2_hub.pth")
    load_dinov2_weights(b, hf)
    load_dinov2_weights(c, tmp_path / "dinov2_chunked.pth")
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in sd.items())
    x = torch.randn(2, 3, 28, 42)  # not the pretraining grid: position embeddings are interpolated
    with torch.no_grad():
        ya, yb, ys = a(x), b(x), src(x)
    assert ya.shape == (2, 1 + 2 * 3, 32)
    assert torch.equal(ya, ys) and torch.allclose(ya, yb, atol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        load_dinov2_weights(DinoV2ViT(ARCH.model_copy(update={"depth": 3})), hf)


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": {"w": Evil()}}, f)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        read_state_dict(tmp_path / "evil.pth")
