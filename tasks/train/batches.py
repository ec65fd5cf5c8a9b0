"""Shard rows -> model batches: decode (tasks.shards), attach priors, build_item + collate.

A row that fails to decode or build is not fatal: it is replaced by another row of the same
batch (the batch keeps its size, so DDP ranks stay in step) and recorded for the quarantine table.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from tasks.schema import object_key
from tasks.codec import decode_view
from tasks.render_priors.store import PriorStore
from tasks.train.data import shard_files


# Decoded prior views per object, per loader process. The K views of an object are the same in
# every epoch (augmentation comes after), and decoding them was the bulk of the loader's time.
PRIOR_CACHE_OBJECTS = 2048


class BatchBuilder:
    """Callable ``(rows, rngs) -> (batch, quarantine_records)`` used by ``StepBatches``."""

    def __init__(self, resolution: int, augment: dict | None, priors: PriorStore | None,
                 object_size: int | None = None, collage: bool = False):
        from pics_model.data import AugmentConfig

        self.resolution = resolution
        self.collage = collage  # the model's collage hint (PICSConfig.collage_hint)
        self.augment = AugmentConfig(**augment) if augment is not None else None
        self.priors = priors
        self.object_size = object_size
        self._views: OrderedDict[str, np.ndarray] = OrderedDict()

    def prior_views(self, key: str) -> np.ndarray | None:
        """uint8 [K,S,S,3] for one object (S = object_size, the encoder's input size), or None.
        Views are resized before augmentation: the encoder never sees more than S pixels."""
        if key in self._views:
            self._views.move_to_end(key)
            return self._views[key]
        views = self.priors.views(key)
        if views is None:
            return None
        arr = np.stack([decode_view(b, self.object_size) for b in views])
        self._views[key] = arr
        while len(self._views) > PRIOR_CACHE_OBJECTS:
            self._views.popitem(last=False)
        return arr

    def sample(self, row: dict) -> dict:
        from tasks.shards import decode_sample

        sample = decode_sample(row)
        if self.priors is not None:
            keys = [object_key(p, m) for p, m in zip(row["patches"], row["patch_masks"])]
            views = [self.prior_views(k) for k in keys]
            # all-or-nothing per sample: build_item takes one [N,K,V,V,3] array or none
            sample["priors"] = np.stack(views) if all(v is not None for v in views) else None
        return sample

    def item(self, row: dict, seed: int | None = None, rng: np.random.Generator | None = None,
             augment: bool = True) -> dict:
        from pics_model.data import build_item

        if rng is None and seed is not None:
            rng = np.random.default_rng(seed)
        return build_item(self.sample(row), self.resolution, rng, self.augment if augment else None,
                          object_size=self.object_size, source=row.get("sample_id"), collage=self.collage)

    @staticmethod
    def collate(items: list[dict]) -> dict:
        from pics_model.data import collate

        return collate(items)

    def __call__(self, rows: list[dict], rngs: list[np.random.Generator]):
        items, bad = [], []
        for row, rng in zip(rows, rngs):
            try:
                items.append(self.item(row, rng=rng))
            except Exception as e:  # noqa: BLE001 - any bad row goes to quarantine, the run goes on
                bad.append({"stage": "train", "reason": "bad_sample", "detail": f"{type(e).__name__}: {e}",
                            "source": "", "item_key": str(row.get("sample_id", "")),
                            "image_id": row.get("image_id"), "annotation_id": None})
        if not items:
            raise RuntimeError(f"every sample of a batch failed to build: {[b['detail'] for b in bad][:3]}")
        while len(items) < len(rows):
            items.append(items[len(items) % max(1, len(rows) - len(bad))])
        return self.collate(items), bad


def rows_of_split(shards_dir: str | Path, split: str, limit: int | None = None) -> Iterator[dict]:
    """Rows of ``split`` in shard order (file name, row), at most ``limit``."""
    n = 0
    for f in shard_files(shards_dir):
        table = pq.read_table(f)
        for row in table.to_pylist():
            if row["split"] != split:
                continue
            yield row
            n += 1
            if limit is not None and n >= limit:
                return


def heldout_rows(shards_dir: str | Path, count: int) -> list[dict]:
    """The fixed held-out rows: the first ``count`` test rows, or training rows when the shards
    have no test split."""
    return list(rows_of_split(shards_dir, "test", count)) or list(rows_of_split(shards_dir, "train", count))


def heldout_items(builder: BatchBuilder, rows: list[dict]) -> list[dict]:
    """``rows`` without augmentation, each as a batch of one (so its noise and timestep depend
    only on its position, not on the world size)."""
    return [builder.collate([builder.item(r, seed=i, augment=False)]) for i, r in enumerate(rows)]
