"""A DINOv2 vision transformer with the torch-hub state-dict layout, and offline weight loading.

No DINOv2 implementation is installed here (no `transformers`, no `dinov2` package, and nothing
may be downloaded), so this module is the architecture of facebookresearch/dinov2's
`DinoVisionTransformer` written out (patch embed, CLS (+ registers), bicubic position-embedding
interpolation with the 0.1 offset, pre-norm blocks with LayerScale, MLP or fused SwiGLU FFN,
final LayerNorm). Parameter names equal the hub's (`blocks.{i}.attn.qkv.weight`, ...) so a hub
checkpoint (`dinov2_vitg14_pretrain.pth`) loads with ``strict=True``; an HF-format folder
(`config.json` + `model.safetensors` of `Dinov2Model`) is key-mapped into the same layout.
Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors, never unpickled.

Not verified here against the real DINOv2 outputs (no reference implementation or weights are
available offline); the two loaders are checked against each other in the tests.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import DinoV2Arch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, t, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _SwiGLU(nn.Module):
    """dinov2's SwiGLUFFNFused: hidden = 8-aligned 2/3 of mlp_ratio * dim."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class _LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, arch: DinoV2Arch):
        super().__init__()
        d = arch.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = _Attention(d, arch.num_heads)
        self.ls1 = _LayerScale(d)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        hidden = int(d * arch.mlp_ratio)
        self.mlp = _SwiGLU(d, hidden) if arch.ffn == "swiglu" else _Mlp(d, hidden)
        self.ls2 = _LayerScale(d)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2ViT(nn.Module):
    """images [B,3,H,W] (ImageNet-normalised) -> tokens [B, 1 + (H/14)(W/14), D] = CLS + patches,
    after the final LayerNorm (dinov2's x_norm_clstoken / x_norm_patchtokens); registers dropped."""

    def __init__(self, arch: DinoV2Arch):
        super().__init__()
        self.arch = arch
        d, grid = arch.embed_dim, arch.pos_embed_size // arch.patch_size
        self.patch_embed = _PatchEmbed(arch.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # unused at inference; kept for strict loading
        self.register_tokens = nn.Parameter(torch.zeros(1, arch.num_register_tokens, d)) \
            if arch.num_register_tokens else None
        self.blocks = nn.ModuleList([_Block(arch) for _ in range(arch.depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    @property
    def embed_dim(self) -> int:
        return self.arch.embed_dim

    def _pos(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        npatch, grid = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == grid and h == w:
            return self.pos_embed
        pos = self.pos_embed.float()
        m = int(math.sqrt(grid))
        h0, w0 = h // self.arch.patch_size, w // self.arch.patch_size
        patch_pos = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        off = self.arch.interpolate_offset
        kw = {"scale_factor": ((h0 + off) / m, (w0 + off) / m)} if off else {"size": (h0, w0)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.arch.interpolate_antialias, **kw)
        if patch_pos.shape[-2:] != (h0, w0):
            raise RuntimeError(f"DINOv2 position grid {tuple(patch_pos.shape[-2:])} != {(h0, w0)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat([pos[:, :1], patch_pos], 1).to(x.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, _, h, w = images.shape
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], 1)
        x = x + self._pos(x, h, w)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype), x[:, 1:]], 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        r = self.arch.num_register_tokens
        return torch.cat([x[:, :1], x[:, 1 + r:]], 1)


# ----------------------------------------------------------------------------------------------
# weight loading (no pickle)

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file with ``weights_only=True`` (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary objects: say so instead of unpickling
        raise ValueError(f"{path}: not a plain tensor checkpoint (refusing to unpickle): {e}") from e
    for key in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    return sd


def hf_to_hub_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' `Dinov2Model` keys -> torch-hub `DinoVisionTransformer` keys (q/k/v fused)."""
    out: dict[str, torch.Tensor] = {}
    simple = {
        "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
        "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    }
    layer_map = {
        "norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
        "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3",
    }
    sd = {k.removeprefix("dinov2."): v for k, v in sd.items()}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v.reshape(1, -1) if k == "embeddings.mask_token" else v
            continue
        if not k.startswith("encoder.layer."):
            continue  # pooler/classifier heads are not part of the backbone
        rest = k[len("encoder.layer."):]
        idx, sub = rest.split(".", 1)
        if sub.startswith("attention.attention."):
            name, kind = sub[len("attention.attention."):].rsplit(".", 1)  # query|key|value, weight|bias
            qkv.setdefault((int(idx), kind), {})[name] = v
            continue
        for src, dst in layer_map.items():
            if sub.startswith(src + ".") or sub == src:
                out[f"blocks.{idx}.{dst}{sub[len(src):]}"] = v
                break
    for (idx, kind), parts in qkv.items():
        out[f"blocks.{idx}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out


def arch_from_hf_config(cfg: dict) -> DinoV2Arch:
    return DinoV2Arch(embed_dim=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
                      num_heads=cfg["num_attention_heads"], patch_size=cfg.get("patch_size", 14),
                      mlp_ratio=cfg.get("mlp_ratio", 4.0), ffn="swiglu" if cfg.get("use_swiglu_ffn") else "mlp",
                      num_register_tokens=cfg.get("num_register_tokens", 0),
                      pos_embed_size=cfg.get("image_size", 518))


def load_dinov2_weights(model: DinoV2ViT, path: str | Path) -> None:
    """Load hub-format weights (file) or an HF-format folder into `model` (strict)."""
    path = Path(path)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path}: HF-format DINOv2 folder needs config.json")
        arch = arch_from_hf_config(json.loads(cfg_file.read_text()))
        if arch.model_dump(exclude={"interpolate_offset", "interpolate_antialias"}) != \
                model.arch.model_dump(exclude={"interpolate_offset", "interpolate_antialias"}):
            raise ValueError(f"{cfg_file}: architecture {arch} does not match the configured {model.arch}")
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{path}: no model.safetensors / pytorch_model.bin")
        sd = hf_to_hub_state_dict(read_state_dict(weights))
    else:
        sd = read_state_dict(path)
    # a hub model built with block_chunks > 0 stores "blocks.<chunk>.<i>."; i is global
    sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: DINOv2 weights do not fit the configured ViT: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
