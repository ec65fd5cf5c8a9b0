"""Arrow schemas of the shards the stages hand to each other, and the object key.

decompose writes SAMPLE_SCHEMA (one row per sample: one image and a group of N >= 2 of its
objects); render_priors writes PRIOR_SCHEMA (one row per distinct object, keyed by object_key).
Lists of length N are in object order; ``pair_*`` lists run over object pairs (i < j) in
lexicographic order, so a pair sample has exactly one entry. Bump SCHEMA_VERSION on any change.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa

SCHEMA_VERSION = 1

SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),  # "{image_id}-{ann_id_0}-{ann_id_1}..."
        ("split", pa.string()),  # "train" | "test"
        ("source_image", pa.string()),  # path relative to the image root
        ("image_id", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image_bytes", pa.binary()),  # the source file's bytes, unchanged (JPEG or PNG)
        ("n_objects", pa.int8()),
        ("annotation_ids", pa.list_(pa.int64())),
        ("category_ids", pa.list_(pa.int64())),
        ("category_names", pa.list_(pa.string())),
        ("masks_rle", pa.list_(pa.string())),  # COCO compressed RLE counts at (height, width)
        ("boxes_tight", pa.list_(pa.list_(pa.float32(), 4))),  # xyxy, source pixels
        ("boxes_expanded", pa.list_(pa.list_(pa.float32(), 4))),  # xyxy, clipped to the image
        ("patches", pa.list_(pa.binary())),  # PNG RGB patch_size^2, white background
        ("patch_masks", pa.list_(pa.binary())),  # PNG L patch_size^2, 255 inside the object
        ("region_map", pa.binary()),  # PNG L preview_resolution^2 on the square-padded target: bit i = expanded box i
        ("pair_box_iou", pa.list_(pa.float32())),
        ("pair_mask_iou", pa.list_(pa.float32())),
        ("pair_contact_px", pa.list_(pa.int32())),  # boundary pixels of one mask within contact_px of the other
        ("depth_ranks", pa.list_(pa.int32())),  # 0 = nearest; null when the dataset has no depth order
        ("amodal_rle", pa.list_(pa.string())),  # full (unoccluded) masks where the dataset has them
    ]
)

PRIOR_SCHEMA = pa.schema(
    [
        ("object_key", pa.string()),
        ("num_views", pa.int32()),
        ("resolution", pa.int32()),
        ("elevation_deg", pa.float32()),
        ("azimuths_deg", pa.list_(pa.float32())),
        ("views", pa.list_(pa.binary())),  # PNG RGBA, resolution^2, one per azimuth
        ("depths", pa.list_(pa.binary())),  # float32 little-endian resolution^2; 0 = no surface
        ("reconstructor", pa.string()),
    ]
)


def object_key(patch_png: bytes, patch_mask_png: bytes) -> str:
    """Content hash of one object (its patch and mask): the same object renders once."""
    h = hashlib.sha256()
    h.update(len(patch_png).to_bytes(8, "little"))
    h.update(patch_png)
    h.update(patch_mask_png)
    return h.hexdigest()[:32]
