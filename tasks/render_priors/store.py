"""Reading priors back: by object key, decoded to arrays, or composited for the model's loader.

The training loader joins a sample's objects to their priors with ``tasks.schema.object_key``
over the sample's patch and mask PNG bytes (the same bytes render_priors hashed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from tasks.atomic import TMP_PREFIX
from tasks.codec import decode_png
from tasks.shards import shard_dir

SHARD_GLOB = "priors-*.parquet"


def list_prior_shards(out: str | Path) -> list[Path]:
    d = Path(out) / "shards"
    return sorted(p for p in d.glob(SHARD_GLOB) if not p.name.startswith(TMP_PREFIX))


def decode_prior(row: dict) -> dict:
    """A PRIOR_SCHEMA row -> views uint8 [K, R, R, 4] RGBA, depths float32 [K, R, R] (0 = no surface),
    azimuths_deg float32 [K], plus the scalar fields."""
    r = int(row["resolution"])
    views = []
    for b in row["views"]:
        try:
            rgba = decode_png(b, "rgba")
        except ValueError:
            rgba = None
        if rgba is None or rgba.shape != (r, r, 4):
            raise ValueError(f"prior {row['object_key']}: a view is not a {r}x{r} RGBA PNG")
        views.append(rgba)
    depths = [np.frombuffer(b, "<f4").reshape(r, r) for b in row["depths"]]
    return {"object_key": row["object_key"], "num_views": int(row["num_views"]), "resolution": r,
            "elevation_deg": float(row["elevation_deg"]), "reconstructor": row["reconstructor"],
            "azimuths_deg": np.asarray(row["azimuths_deg"], np.float32),
            "views": np.stack(views), "depths": np.stack(depths).astype(np.float32)}


class PriorStore:
    """Prior shards (PRIOR_SCHEMA) keyed by ``object_key``; views stay encoded until asked for
    (``tasks.codec.decode_view``). Read by the training loader and by evaluate."""

    def __init__(self, directory: str | Path):
        files = sorted(p for p in shard_dir(directory).glob("*.parquet") if not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"{directory}: no *.parquet prior shards (run render_priors first)")
        self._rows: dict[str, list[bytes]] = {}
        for f in files:
            t = pq.read_table(f, columns=["object_key", "views"])
            for key, views in zip(t.column("object_key").to_pylist(), t.column("views").to_pylist()):
                self._rows[key] = views

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def views(self, key: str) -> list[bytes] | None:
        return self._rows.get(key)


def views_on_white(views: np.ndarray) -> np.ndarray:
    """RGBA [..., R, R, 4] -> RGB [..., R, R, 3] on white, the object patches' background
    (``pics_model.data`` expects priors as uint8 [K, V, V, 3] and refills rotations with white)."""
    a = views[..., 3:4].astype(np.float32) / 255.0
    return (views[..., :3] * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


def iter_priors(out: str | Path) -> Iterator[dict]:
    for shard in list_prior_shards(out):
        pf = pq.ParquetFile(shard)
        for g in range(pf.num_row_groups):
            yield from pf.read_row_group(g).to_pylist()


def load_priors(out: str | Path, keys: set[str] | None = None) -> dict[str, dict]:
    """object_key -> decoded prior, for ``keys`` (all if None). Reads the key column first."""
    found: dict[str, dict] = {}
    for shard in list_prior_shards(out):
        if keys is not None:
            shard_keys = pq.read_table(shard, columns=["object_key"]).column(0).to_pylist()
            rows = [i for i, k in enumerate(shard_keys) if k in keys]
            if not rows:
                continue
            table = pq.read_table(shard).take(rows)
        else:
            table = pq.read_table(shard)
        for row in table.to_pylist():
            found[row["object_key"]] = decode_prior(row)
    return found
