"""Generative location model: where in a background does an object of class c go?

"Generative Location Modeling for Spatially Aware Object Insertion" (Yun & Wiggers, 2024) at
its smallest: an autoregressive transformer decoder emits a box as four tokens (x1, y1, x2, y2),
each coordinate of the box normalised by the image size and quantised into ``bins`` bins. With
``box_tokens="support"`` the four tokens are (y2, cx, h, w) instead: the bottom edge first (where
the box meets its support surface, which fixes its depth), then the centre column, then the
height and width that depth allows (so a size never has to be learnt as a difference of corners).

Sequence (decoder-only, causal)::

    [ image tokens (L) | class token | object token | BOS | x1 | y1 | x2 ]  ->  logits of x1, y1, x2, y2
      ObjectEncoder on      nn.Embedding   ObjectEncoder.pooled of the
      the background        of the class   object patch, or a learned "no patch"

The background goes through the project's object encoder family (``ObjectEncoder``: its small
trainable CNN or the frozen ImageNet MobileNetV2, optionally cut after ``feature_blocks`` blocks
for a finer mid-level map), average-pooled by ``token_pool``; the feature-map tokens get a learned
position embedding (a CNN map flattened to tokens does not say where each token was). With
``fourier`` > 0 both the image tokens' (x, y) centres and the box tokens' bin values also get fixed
sin/cos features of the same frequencies through a learned linear map: bin 20 starts out close
to bin 21, and a bin's value close to the image tokens at that place, which 64 independent
learned embeddings have to discover from a few hundred boxes. A frozen encoder's features can be
computed once (:meth:`LocationModel.image_features`) and passed to :meth:`~LocationModel.condition`.

Sampling draws K boxes in parallel with a KV cache (the prefix is encoded once, then one token a
step), with temperature, top-p and an optional region: every coordinate is restricted to the
bins inside a normalised region (x0, y0, x1, y1), e.g. ``REGIONS["left"]``, the controlled
sampling of the paper's positional instructions. x2 > x1 and y2 > y1 are always enforced.

Training objectives: :func:`mle_loss` (stage 1, positives) and :func:`dpo_loss` (stage 2,
Rafailov et al. 2023, against the frozen stage-1 model on (positive, negative) pairs).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .config import ObjectEncoderConfig
from .file_hashes import CONFIG_NAME, WEIGHTS_NAME, save_model_folder
from .modeling_pics import verify_saved
from .object_encoder import ObjectEncoder

COORDS = 4  # four values a box: see box_values
BOX_TOKENS = ("support", "xyxy")
REGIONS = {"anywhere": (0.0, 0.0, 1.0, 1.0), "left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0),
           "top": (0.0, 0.0, 1.0, 0.5), "bottom": (0.0, 0.5, 1.0, 1.0)}


@dataclass
class LocationConfig:
    class_names: list[str]
    bins: int = 64
    image_size: int = 64  # the background is resized to image_size x image_size
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    box_tokens: str = "xyxy"  # the coordinate order: "xyxy" or "support" (y2, cx, h, w); see box_values
    encoder: dict = field(default_factory=lambda: {"kind": "small", "small_channels": [32, 64, 128]})
    token_pool: int = 1  # average-pool the encoder's feature map by this factor (fewer image tokens)
    feature_norm: bool = False  # LayerNorm on the encoder's features before its projector
    fourier: int = 0  # frequencies of the fixed sin/cos position (image tokens) and value (box tokens) features

    def __post_init__(self):
        if self.box_tokens not in BOX_TOKENS:
            raise ValueError(f"box_tokens {self.box_tokens!r}: choose one of {', '.join(BOX_TOKENS)}")

    def encoder_config(self) -> ObjectEncoderConfig:
        return ObjectEncoderConfig(**{**self.encoder, "image_size": self.image_size})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# box <-> tokens


def box_values(boxes: torch.Tensor, layout: str) -> torch.Tensor:
    """Normalised xyxy boxes [..., 4] -> the four decoded values [..., 4] in the model's order:
    ``xyxy`` (x1, y1, x2, y2) or ``support`` (y2, cx, h, w): bottom edge first (where the box meets
    its support, hence its depth), then the centre column, then the size that depth allows."""
    if layout == "xyxy":
        return boxes
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([y2, (x1 + x2) / 2, y2 - y1, x2 - x1], -1)


def values_box(values: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :func:`box_values`: [..., 4] -> normalised xyxy boxes, clamped to the frame."""
    if layout == "xyxy":
        return values
    y2, cx, h, w = values.unbind(-1)
    return torch.stack([cx - w / 2, y2 - h, cx + w / 2, y2], -1).clamp(0, 1)


def quantize(boxes: torch.Tensor, bins: int, layout: str = "xyxy") -> torch.Tensor:
    """Normalised xyxy boxes [..., 4] in [0, 1] -> tokens [..., 4] long in [0, bins)."""
    return (box_values(boxes.clamp(0, 1), layout).clamp(0, 1) * bins).floor().long().clamp(0, bins - 1)


def dequantize(tokens: torch.Tensor, bins: int, layout: str = "xyxy") -> torch.Tensor:
    """Tokens [..., 4] -> normalised xyxy boxes [..., 4] from the bin centres (``xyxy``: error <=
    0.5 / bins per edge; ``support``: the bottom edge 0.5 / bins, the others 1 / bins)."""
    return values_box((tokens.float() + 0.5) / bins, layout)


def fourier_features(v: torch.Tensor, n: int) -> torch.Tensor:
    """Values [..., c] in [0, 1] -> [..., 2 n c]: sin and cos of pi 2^j v, j < n, per value."""
    a = v[..., None] * (math.pi * 2.0 ** torch.arange(n, device=v.device, dtype=v.dtype))
    return torch.cat([a.sin(), a.cos()], -1).flatten(-2)


def causal_mask(n: int, device=None) -> torch.Tensor:
    """[n, n] bool, True where attention is allowed: position i sees positions <= i."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


# ---------------------------------------------------------------------------------------------
# decoder


class Block(nn.Module):
    """Pre-norm transformer block whose attention can append to and read a KV cache."""

    def __init__(self, d: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. ``cache``: a list holding (k, v) [B, H, S, D/H] of the S
        earlier positions (empty at first); it is extended with this call's T positions."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        past = 0
        if cache is not None:
            if cache:
                past = cache[0][0].shape[2]
                k, v = torch.cat([cache[0][0], k], 2), torch.cat([cache[0][1], v], 2)
                cache[0] = (k, v)
            else:
                cache.append((k, v))
        # the new rows see every cached position and, among themselves, the causal triangle
        mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device)
        mask[:, past:] = causal_mask(t, x.device)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class LocationModel(nn.Module):
    def __init__(self, cfg: LocationConfig, load_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.encoder = ObjectEncoder(cfg.encoder_config(), d, load_weights=load_weights)
        self.feature_norm = nn.LayerNorm(self.encoder.backbone_dim) if cfg.feature_norm else nn.Identity()
        with torch.no_grad():  # how many tokens the encoder gives at this size
            probe = torch.zeros(1, 3, cfg.image_size, cfg.image_size)
            self.map_side = int(round((self.encoder.backbone_tokens(probe).shape[1] - 1) ** 0.5)) // cfg.token_pool
            if self.map_side < 1:
                raise ValueError(f"token_pool {cfg.token_pool} is larger than the encoder's feature map")
            n_img = 1 + self.map_side ** 2 + (0 if self.encoder.appearance is None else
                                              self.encoder.appearance_tokens(probe).shape[1])
        self.image_pos = nn.Parameter(torch.randn(1, n_img, d) * 0.02)
        if cfg.fourier:
            self.position_proj = nn.Linear(4 * cfg.fourier, d)  # image token centre (x, y)
            self.value_proj = nn.Linear(2 * cfg.fourier, d)  # box token bin value
        self.class_embed = nn.Embedding(len(cfg.class_names), d)
        self.patch_proj = nn.Linear(self.encoder.backbone_dim, d)
        self.no_patch = nn.Parameter(torch.zeros(1, 1, d))
        self.token_embed = nn.Embedding(cfg.bins + 1, d)  # + BOS
        self.box_pos = nn.Parameter(torch.randn(1, COORDS, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.bins)

    @property
    def bos(self) -> int:
        return self.cfg.bins

    def class_ids(self, names: list[str]) -> torch.Tensor:
        try:
            return torch.tensor([self.cfg.class_names.index(n) for n in names], device=self.head.weight.device)
        except ValueError:
            unknown = sorted(set(names) - set(self.cfg.class_names))
            raise ValueError(f"unknown class {unknown}; this model knows {self.cfg.class_names}") from None

    @property
    def frozen_encoder(self) -> bool:
        """The background encoder does not train: its features can be computed once."""
        return not self.encoder.trains_backbone

    def image_features(self, background: torch.Tensor) -> torch.Tensor:
        """background [B, 3, H, W] in [0, 1] -> encoder features [B, 1 + s^2, backbone dim]: the
        global mean, then the feature map average-pooled by ``token_pool`` to s x s, row-major."""
        tokens = self.encoder.backbone_tokens(background)
        side = int(round((tokens.shape[1] - 1) ** 0.5))
        fmap = tokens[:, 1:].transpose(1, 2).reshape(len(tokens), -1, side, side)
        if self.cfg.token_pool > 1:
            fmap = F.avg_pool2d(fmap, self.cfg.token_pool)
        return torch.cat([tokens[:, :1], fmap.flatten(2).transpose(1, 2)], 1)

    def condition(self, background: torch.Tensor, class_ids: torch.Tensor,
                  patch: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """background [B, 3, H, W] in [0, 1], class_ids [B] long, patch [B, 3, P, P] in [0, 1] or
        None -> prefix [B, L + 2, D]. ``features``: :meth:`image_features` of the background,
        computed earlier (a frozen encoder's are the same every step)."""
        if features is None:
            features = self.image_features(background)
        img = self.encoder.projector(self.feature_norm(features))
        if self.encoder.appearance is not None:
            img = torch.cat([img, self.encoder.appearance_tokens(background)], 1)
        img = img + self.image_pos
        if self.cfg.fourier:  # the map tokens' centres; the mean token (and appearance tokens) get none
            n, s = self.map_side ** 2, self.map_side
            c = (torch.arange(s, device=img.device, dtype=img.dtype) + 0.5) / s
            xy = torch.stack([c.repeat(s), c.repeat_interleave(s)], 1)  # row-major (x, y)
            pos = self.position_proj(fourier_features(xy, self.cfg.fourier))
            img = torch.cat([img[:, :1], img[:, 1:1 + n] + pos, img[:, 1 + n:]], 1)
        cls = self.class_embed(class_ids)[:, None]
        if patch is None:
            obj = self.no_patch.expand(len(background), -1, -1)
        else:
            obj = self.patch_proj(self.encoder.pooled(patch))[:, None]
        return torch.cat([img, cls, obj], 1)

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens [B, T] (BOS first) at box positions start..start+T-1 -> [B, T, D]."""
        x = self.token_embed(tokens) + self.box_pos[:, start:start + tokens.shape[1]]
        if self.cfg.fourier:
            value = (tokens.float() + 0.5) / self.cfg.bins
            x = x + self.value_proj(fourier_features(value[..., None], self.cfg.fourier)) * (tokens < self.bos)[..., None]
        return x

    def _run(self, x: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i])
        return self.head(self.ln_f(x))

    def logits(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: prefix [B, L, D], tokens [B, 4] -> logits [B, 4, bins] (coordinate i
        predicted from the prefix and tokens < i)."""
        inp = torch.cat([torch.full_like(tokens[:, :1], self.bos), tokens[:, :COORDS - 1]], 1)
        out = self._run(torch.cat([prefix, self._embed(inp, 0)], 1))
        return out[:, -COORDS:]

    def box_logprob(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log p(box | prefix) [B], summed over the 4 coordinate tokens."""
        lp = self.logits(prefix, tokens).log_softmax(-1)
        return lp.gather(-1, tokens[..., None]).squeeze(-1).sum(-1)

    # -----------------------------------------------------------------------------------------
    def tokens_of(self, boxes: torch.Tensor) -> torch.Tensor:
        """Normalised xyxy boxes [..., 4] -> this model's tokens [..., 4]."""
        return quantize(boxes, self.cfg.bins, self.cfg.box_tokens)

    def boxes_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """This model's tokens [..., 4] -> normalised xyxy boxes [..., 4]."""
        return dequantize(tokens, self.cfg.bins, self.cfg.box_tokens)

    def _allowed(self, step: int, drawn: torch.Tensor, region: tuple[float, float, float, float]) -> torch.Tensor:
        """[B, bins] bool: the bins token ``step`` may take inside ``region`` (normalised x0, y0, x1,
        y1) given the tokens ``drawn`` [B, step] so far, so that the box has x2 > x1, y2 > y1."""
        if self.cfg.box_tokens == "xyxy":
            return self._allowed_xyxy(step, drawn, region)
        n, eps = self.cfg.bins, 1e-6
        v = (torch.arange(n, device=drawn.device)[None].float() + 0.5) / n  # each bin's value
        got = (drawn.float() + 0.5) / n  # (y2, cx, h) drawn so far
        # a region edge on the frame's edge gets half a bin of slack: decoding clamps to the frame,
        # and a box touching the frame (a clipped object) has its cx and w rounded apart
        x0, y0, x1, y1 = (e - 0.5 / n if e == 0.0 else e + 0.5 / n if e == 1.0 else e for e in region)
        if step == 0:  # bottom edge: inside the region, room above it for the smallest height
            allowed = (v >= region[1] + 0.5 / n - eps) & (v <= y1 + eps)
        elif step == 1:  # centre column: room on both sides for the smallest width
            allowed = (v >= region[0] + 0.25 / n - eps) & (v <= region[2] - 0.25 / n + eps)
        elif step == 2:  # height: the top edge stays inside the region
            allowed = v <= got[:, :1] - y0 + eps
        else:  # width: both side edges stay inside the region
            allowed = v / 2 <= torch.minimum(got[:, 1:2] - x0, x1 - got[:, 1:2]) + eps
        allowed = allowed.expand(len(drawn), -1)
        if not allowed.any(-1).all():
            raise ValueError(f"region {region} is narrower than one of {n} bins: no box fits")
        return allowed

    def _allowed_xyxy(self, step: int, drawn: torch.Tensor, region: tuple[float, float, float, float]) -> torch.Tensor:
        n = self.cfg.bins
        lo_v, hi_v = (region[0], region[2]) if step % 2 == 0 else (region[1], region[3])
        lo = min(int(math.floor(lo_v * n)), n - 2)
        hi = max(int(math.ceil(hi_v * n)) - 1, lo + 1)  # at least two bins: room for both corners
        bins = torch.arange(n, device=drawn.device)[None]
        if step < 2:  # the near corner leaves a bin for the far one
            return ((bins >= lo) & (bins < hi)).expand(len(drawn), -1)
        return (bins > drawn[:, step - 2:step - 1]) & (bins <= hi)

    @staticmethod
    def _pick(logits: torch.Tensor, allowed: torch.Tensor, temperature: float, top_p: float,
              generator: torch.Generator | None) -> torch.Tensor:
        """Sample one token per row of logits [B, bins] among ``allowed`` bins, tempered and
        truncated to the smallest set whose probability reaches ``top_p``."""
        logits = logits.masked_fill(~allowed, float("-inf")) / temperature
        probs = logits.softmax(-1)
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the top token is always kept
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)

    @torch.no_grad()
    def sample(self, prefix: torch.Tensor, k: int, temperature: float = 1.0, top_p: float = 1.0,
               region: str | tuple[float, float, float, float] = "anywhere", use_cache: bool = True,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """prefix [1, L, D] (one query) -> (tokens [k, 4] long, log p(box) [k] under the untempered
        model). ``use_cache=False`` re-runs the whole sequence every step (the benchmark's baseline)."""
        region = REGIONS[region] if isinstance(region, str) else tuple(region)
        prefix = prefix.expand(k, -1, -1)
        drawn = torch.empty(k, 0, dtype=torch.long, device=prefix.device)
        logp = torch.zeros(k, device=prefix.device)
        caches = [[] for _ in self.blocks] if use_cache else None
        nxt = torch.cat([prefix, self._embed(torch.full((k, 1), self.bos, device=prefix.device), 0)], 1)
        for step in range(COORDS):
            if use_cache:
                out = self._run(nxt, caches)[:, -1]
            else:
                inp = torch.cat([torch.full((k, 1), self.bos, device=prefix.device), drawn], 1)
                out = self._run(torch.cat([prefix, self._embed(inp, 0)], 1))[:, -1]
            tok = self._pick(out, self._allowed(step, drawn, region), temperature, top_p, generator)
            logp += out.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
            drawn = torch.cat([drawn, tok[:, None]], 1)
            if step + 1 < COORDS:
                nxt = self._embed(tok[:, None], step + 1)
        return drawn, logp

    # -----------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json + model.safetensors, then sha256.json (checked by :meth:`from_pretrained`)."""
        return save_model_folder(directory, self, self.cfg.to_json(), {"pics_location": "1"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> "LocationModel":
        d = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d}: not a saved location model (missing {name})")
        verify_saved(d)
        try:
            saved = json.loads((d / CONFIG_NAME).read_text())
            cfg = LocationConfig(**{"box_tokens": "xyxy", **saved})  # saved before box_tokens: x1, y1, x2, y2
        except (TypeError, ValueError) as e:
            raise ValueError(f"{d / CONFIG_NAME}: not a location model config ({e})") from None
        model = cls(cfg, load_weights=False)
        model.load_state_dict(load_file(str(d / WEIGHTS_NAME), device=map_location), strict=True)
        return model.eval()


# ---------------------------------------------------------------------------------------------
# objectives


def smoothed_targets(tokens: torch.Tensor, bins: int, sigma: float) -> torch.Tensor:
    """tokens [...] -> target distributions [..., bins]: a Gaussian of ``sigma`` bins around each
    token (one-hot when sigma is 0). Neighbouring bins are nearly the same box edge; a hard target
    calls a one-bin miss as wrong as a miss across the image."""
    if sigma <= 0:
        return F.one_hot(tokens, bins).float()
    d = torch.arange(bins, device=tokens.device)[None].float() - tokens.reshape(-1, 1).float()
    w = torch.exp(-0.5 * (d / sigma) ** 2)
    return (w / w.sum(-1, keepdim=True)).reshape(*tokens.shape, bins)


def mle_loss(model: LocationModel, prefix: torch.Tensor, tokens: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
    """Stage 1: mean cross-entropy of the positive boxes' tokens [B, 4] (against Gaussian-smoothed
    targets of ``sigma`` bins when sigma > 0, :func:`smoothed_targets`)."""
    logits = model.logits(prefix, tokens)
    if sigma <= 0:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
    return -(smoothed_targets(tokens, model.cfg.bins, sigma) * logits.log_softmax(-1)).sum(-1).mean()


def dpo_loss(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Stage 2 (DPO): mean of -log sigmoid(beta [(log pi_w - log ref_w) - (log pi_l - log ref_l)])
    over pairs; every argument is log p(box) [B] of the winner (w, positive) or loser (l, negative)."""
    return -F.logsigmoid(beta * ((policy_w - ref_w) - (policy_l - ref_l))).mean()
