"""The layout stage's elements: distinct object silhouettes (and pixels) of decompose's shards."""
from __future__ import annotations

from pathlib import Path

from pics_model.layout import Element, make_element
from tasks.codec import decode_png
from tasks.shards import iter_rows, list_shards
from tasks.params import ParamsError
from tasks.schema import object_key

MIN_PIXELS = 30  # silhouettes smaller than this (patch pixels) are slivers, not objects


def dataset_elements(samples: str | Path, limit: int) -> list[Element]:
    """The first ``limit`` distinct objects (by content key) in shard order, named by their key."""
    if not list_shards(samples):
        raise ParamsError(f"layout.samples {samples}: no sample shards (shard-*.parquet); run decompose first")
    out, seen = [], set()
    for row in iter_rows(samples, columns=["patches", "patch_masks"]):
        for patch, mask_png in zip(row["patches"], row["patch_masks"]):
            key = object_key(patch, mask_png)
            if key in seen:
                continue
            seen.add(key)
            mask = decode_png(mask_png, "gray") >= 128
            if mask.sum() < MIN_PIXELS:
                continue
            out.append(make_element(mask, key, decode_png(patch)))
            if len(out) == limit:
                return out
    if not out:
        raise ParamsError(f"layout.samples {samples}: no object silhouette of {MIN_PIXELS}+ pixels")
    return out
