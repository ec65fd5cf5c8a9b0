"""Contextual descriptor field of a 3D scene (Kim et al., "Learning 3D Scene Analogies with Neural
Contextual Scene Maps", ICCV 2025): a unit vector for any point in space that describes what lies
around it, so that points with the same spatial context in two scenes get close descriptors.

For a query point q, up to ``max_neighbours`` scene points within ``radius`` of it each become a
token: the ``max_neighbours - ball_tokens`` nearest, and ``ball_tokens`` drawn across the rest of
the ball (by a fixed per-point priority, like pytorch3d's ball query over shuffled points, which
the paper's code uses). The nearest alone see mostly the query's own object (on the embedded
scenes 15% of the 24 nearest lie on other objects, 47% of the ball): the context is the ball.
Each token is an MLP of the offset (p - q) / radius, concatenated with a learnt
embedding of the point's semantic label (floor included). A small transformer reads the tokens
after a learnt summary token; the summary token's output, projected and L2-normalised, is the
descriptor. Nothing here is rotation invariant: a descriptor is taken in a *frame* (rotation R,
scale s), i.e. offsets are read as R^T (p - q) / s, which is how the scene map compares a source
point with its image under a candidate similarity transform. Trained with InfoNCE (`info_nce`).

Saved as a folder: config.json + model.safetensors + sha256.json (sizes and SHA-256 of both,
checked before loading, as for the PICS model); never pickle.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from scipy.spatial import cKDTree
from torch import nn

from .file_hashes import CONFIG_NAME, HASHES_NAME, WEIGHTS_NAME, mismatch, save_model_folder


@dataclass
class FieldConfig:
    radius: float = 0.35  # scene units: the context a descriptor sees
    max_neighbours: int = 32
    ball_tokens: int = 0  # of those, drawn across the ball rather than nearest (0: the nearest only)
    width: int = 64  # transformer width (position 32 + semantic 32 per token)
    layers: int = 2
    heads: int = 4
    feature_dim: int = 64  # descriptor size
    num_labels: int = 1204  # LVIS v1 category ids 1..1203; -1 (floor) is embedded too
    typical_object_size: float = 0.4  # the unit of the PCP thresholds; set from the training scenes
    # the training scenes' sampling (`median_spacing` of their object points and floor points): a
    # scene sampled much more densely is thinned to it (`thin_scene`); 0: never thinned
    object_spacing: float = 0.0
    floor_spacing: float = 0.0


MAX_DISTANCES = 1 << 22  # query-to-point distances held at once (16 MiB of float32)


class FieldFileError(ValueError):
    """A saved field folder that is incomplete or whose bytes differ from its sha256.json."""


class ContextDescriptorField(nn.Module):
    def __init__(self, config: FieldConfig):
        super().__init__()
        self.config = config
        half = config.width // 2
        self.position = nn.Sequential(nn.Linear(3, half), nn.ReLU(), nn.Linear(half, half))
        self.semantic = nn.Embedding(config.num_labels + 1, config.width - half)  # index label + 1: floor is 0
        self.summary = nn.Parameter(torch.randn(1, 1, config.width) * 0.02)
        layer = nn.TransformerEncoderLayer(config.width, config.heads, 2 * config.width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.head = nn.Linear(config.width, config.feature_dim)

    def forward(self, queries: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
                frame: torch.Tensor | None = None, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Descriptors [..., Q, D] of ``queries`` [..., Q, 3] in one scene (``points`` [P, 3],
        ``labels`` [P] int, -1 floor), each batch entry read in its frame: ``frame`` [..., 3, 3]
        (rotation, possibly with a flip; default identity) and ``scale`` [...] or a float.
        Rows are described in chunks of at most ``MAX_DISTANCES / P`` queries, so that a scene of
        any size fits in memory (every query is described on its own: chunks change nothing)."""
        cfg = self.config
        lead = queries.shape[:-2]
        q = queries.reshape(-1, queries.shape[-2], 3)  # [B, Q, 3]
        b, nq = q.shape[:2]
        if frame is None:
            frame = torch.eye(3, dtype=q.dtype, device=q.device).expand(b, 3, 3)
        frame = frame.reshape(b, 3, 3).repeat_interleave(nq, 0)  # [B*Q, 3, 3]
        scale = torch.as_tensor(scale, dtype=q.dtype, device=q.device).reshape(-1)
        scale = scale.expand(b) if scale.numel() == 1 else scale.reshape(b)
        reach = (cfg.radius * scale).repeat_interleave(nq)  # [B*Q]
        rows = q.reshape(-1, 3)
        step = max(1, MAX_DISTANCES // max(len(points), 1))
        out = [self.describe(rows[i:i + step], frame[i:i + step], reach[i:i + step], points, labels)
               for i in range(0, len(rows), step)]
        return torch.cat(out).reshape(*lead, nq, cfg.feature_dim)

    def describe(self, q: torch.Tensor, frame: torch.Tensor, reach: torch.Tensor, points: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        """Descriptors [N, D] of the points ``q`` [N, 3], each read in its ``frame`` [N, 3, 3]
        within its ``reach`` [N] (the radius times the frame's scale)."""
        k = min(self.config.max_neighbours, len(points))
        reach = reach[:, None]
        dist, idx = self.neighbours(torch.cdist(q, points), reach, k)  # [N, k]
        offset = (points[idx] - q[:, None]) @ frame / reach[..., None]  # R^T (p - q) as rows
        tokens = torch.cat([self.position(offset), self.semantic(labels[idx].long() + 1)], -1)
        far = dist > reach  # [N, k]
        x = torch.cat([self.summary.expand(len(tokens), 1, -1), tokens], 1)
        pad = torch.cat([torch.zeros_like(far[:, :1]), far], 1)
        out = self.encoder(x, src_key_padding_mask=pad)[:, 0]
        return F.normalize(self.head(out), dim=-1)

    def neighbours(self, dist: torch.Tensor, reach: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, index) [N, k] of the tokens of each row of ``dist`` [N, P]: the nearest
        ``k - ball_tokens``, then ``ball_tokens`` of the other points within ``reach`` [N, 1] in the
        order of a fixed low-discrepancy priority per point index (fewer in the ball: the nearest
        outside, masked later as out of reach)."""
        ball = min(self.config.ball_tokens, k)
        near_d, near_i = dist.topk(k - ball, largest=False)
        if not ball:
            return near_d, near_i
        priority = torch.frac(torch.arange(dist.shape[1], device=dist.device, dtype=dist.dtype) * 0.6180339887)
        score = torch.where(dist <= reach, 1.0 + priority, -dist)
        score = score.scatter(1, near_i, float("-inf"))  # not twice
        idx = torch.cat([near_i, score.topk(ball).indices], 1)
        return dist.gather(1, idx), idx

    # ------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """config.json + model.safetensors, then sha256.json of both (checked by `load`). Files
        are written in place: a stage writes into a temporary folder it renames when complete
        (tasks.atomic.atomic_dir)."""
        return save_model_folder(directory, self, json.dumps(asdict(self.config), indent=2, sort_keys=True) + "\n",
                                 {"pics_model": "context_field"})

    @classmethod
    def load(cls, directory: str | Path) -> "ContextDescriptorField":
        """The field saved in ``directory``, after checking its files against sha256.json."""
        d = Path(directory)
        try:
            records = json.loads((d / HASHES_NAME).read_text())
            config = FieldConfig(**json.loads((d / CONFIG_NAME).read_text()))
        except FileNotFoundError as e:
            raise FieldFileError(f"{e.filename}: missing; {d} is not a saved context field "
                                 "(train one with `pics analogy`, the analogy stage)") from None
        except (OSError, ValueError, TypeError) as e:
            raise FieldFileError(f"{d}: unreadable config.json or sha256.json ({e})") from None
        problem = mismatch(d, {n: records.get(n, {}) for n in (CONFIG_NAME, WEIGHTS_NAME)}, HASHES_NAME)
        if problem:
            raise FieldFileError(problem)
        field = cls(config)
        try:
            field.load_state_dict(load_file(str(d / WEIGHTS_NAME)))
        except (SafetensorError, RuntimeError) as e:
            raise FieldFileError(f"{d / WEIGHTS_NAME}: does not hold this config's weights ({e})") from None
        return field.eval()


SPACING_NEIGHBOUR = 8  # the density measure: median distance to a point's 8th nearest neighbour


def median_spacing(points: np.ndarray) -> float:
    """Median distance from each point [N, 3] to its ``SPACING_NEIGHBOUR``-th nearest other point
    (to the farthest where there are fewer; 0 for fewer than 2 points): how densely a surface is
    sampled, steadier than the nearest neighbour, which random sampling makes very close."""
    if len(points) < 2:
        return 0.0
    k = min(SPACING_NEIGHBOUR, len(points) - 1)
    d, _ = cKDTree(points).query(points, k=k + 1)
    return float(np.median(d[:, k]))


def _voxel_means(points: torch.Tensor, instance: torch.Tensor, size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One point per (instance, voxel of ``size``): the mean of its points [V, 3], and the index of
    its first point [V] (whose label and instance it keeps)."""
    cells = torch.cat([instance[:, None].long(), torch.floor(points / size).long()], 1)
    _, group = torch.unique(cells, dim=0, return_inverse=True)
    n = int(group.max()) + 1
    first = torch.full((n,), len(points)).scatter_reduce(0, group, torch.arange(len(points)), "amin")
    mean = torch.zeros(n, 3, dtype=points.dtype).index_add(0, group, points)
    return mean / torch.bincount(group, minlength=n)[:, None].to(points.dtype), first


def thin_scene(points: torch.Tensor, labels: torch.Tensor, instance: torch.Tensor,
               config: FieldConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scene as the field was trained to read it: a descriptor is made of the nearest points,
    so a scene sampled far more densely than the training scenes shows each one a smaller
    neighbourhood. Its object points (per object) and its floor points, when their
    `median_spacing` is under half the field's ``object_spacing`` / ``floor_spacing``, become one
    point per voxel (the mean of its points), the voxel size found by bisection so that the
    spacing comes back to the field's (within 10 %). Others are left as they are. Returns
    (points, labels, instance)."""
    out = []
    for part, spacing in ((instance >= 0, config.object_spacing), (instance < 0, config.floor_spacing)):
        pts, lab, ins = points[part], labels[part], instance[part]
        if spacing > 0 and len(pts) > SPACING_NEIGHBOUR and median_spacing(pts.double().numpy()) < spacing / 2:
            lo, hi = 0.0, 2.0 * spacing  # voxel sizes: too fine (or none), coarse enough
            for _ in range(12):
                mid = (lo + hi) / 2
                if median_spacing(_voxel_means(pts, ins, mid)[0].double().numpy()) < spacing:
                    lo = mid
                else:
                    hi = mid
                if hi - lo < 0.05 * spacing:
                    break
            mean, first = _voxel_means(pts, ins, hi)
            pts, lab, ins = mean, lab[first], ins[first]
        out.append((pts, lab, ins))
    return tuple(torch.cat(parts) for parts in zip(*out))


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None = None,
             temperature: float = 0.2, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE over corresponding rows: ``anchor`` [N, D] row i should match ``positive`` row i
    rather than any other positive row or any row of ``negative`` [M, D] (the same points in a
    scene whose context was disturbed); symmetric in anchor and positive. Inputs are unit vectors.
    ``exclude`` [N, N] bool: pairs (i, j), j != i, left out as negatives of each other (places so
    close that they share their context: no negatives, the false negatives of the loss)."""
    others = positive if negative is None else torch.cat([positive, negative])
    target = torch.arange(len(anchor), device=anchor.device)
    forward = anchor @ others.T / temperature
    backward = positive @ anchor.T / temperature
    if exclude is not None:
        off = exclude & ~torch.eye(len(anchor), dtype=torch.bool, device=anchor.device)
        forward = torch.cat([forward[:, :len(anchor)].masked_fill(off, float("-inf")), forward[:, len(anchor):]], 1)
        backward = backward.masked_fill(off.T, float("-inf"))
    return (F.cross_entropy(forward, target) + F.cross_entropy(backward, target)) / 2
