"""Import the reference implementation's WebDataset tar shards into our shard schema.

A reference sample is the members ``<key>.bg.jpg`` (the full target image), ``<key>.obj0.png``,
``<key>.obj1.png`` (each object cropped on white) and ``<key>.mask0.png``, ``<key>.mask1.png``
(full-resolution instance masks). The WebDataset key is the member path up to the first dot of
its file name. We keep the target's bytes unchanged, encode the masks as RLE, and derive boxes,
patches and region maps with the same code and parameters as ``decompose`` (the reference's own
patches are re-padded from its object crops). The reference carries no category or COCO ids:
category ids are -1. Ids are hashes of the tar's label (its path below the folder common to all
imported tars, so same-named tars in different folders differ) and the sample key: a member name
is never copied into an id. Python's ``tarfile`` reads the tars, so no webdataset dependency is
needed; a truncated tar keeps its complete samples.
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import UnidentifiedImageError

from pics_model.data import expand_boxes, region_map
from tasks import atomic, quarantine
from tasks.codec import decode_png, decode_rgb, encode_png
from tasks.decompose import masks as M
from tasks.decompose import pairing, sample
from tasks.decompose.shard import SHARDS_DIR, _rng, write_samples
from tasks.quarantine import QuarantineRecord
from tasks.schema import SCHEMA_VERSION
from tasks.sharded_stage import shard_name
from tasks.decompose.inputs import InputError
from tasks.decompose.pipeline import GRID_FILES
from tasks.params import DecomposeParams
from tasks.shards import claim_output, content_hash

STAGE = "import_webdataset"
REQUIRED = ("bg.jpg", "obj0.png", "mask0.png", "obj1.png", "mask1.png")
_TAR_REASONS = {"unreadable_tar", "truncated_tar"}  # records about a whole tar, not one sample


def split_key(member_name: str) -> tuple[str, str]:
    """``"a/b/000123.obj0.png"`` -> (``"a/b/000123"``, ``"obj0.png"``), as WebDataset groups members."""
    d, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


def _digest(label: str, key: str) -> bytes:
    # NUL separates: it occurs in neither a path nor a member name, so no two (label, key) pairs collide.
    return hashlib.sha256(f"{label}\0{key}".encode("utf-8", "surrogateescape")).digest()


def sample_id(label: str, key: str) -> str:
    return f"wds-{_digest(label, key).hex()[:20]}"


def _image_id(label: str, key: str) -> int:
    return int.from_bytes(_digest(label, key)[:8], "little") & 0x7FFFFFFFFFFFFFFF


def printable(name: str) -> str:
    """A member name as text that any writer accepts: undecodable bytes become ``\\xNN`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _detail(e: Exception) -> str:
    """The error text without object reprs (``<_io.BytesIO object at 0x7f...>``): details are reproducible."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<member data>", str(e))


def tar_labels(tars: list[str]) -> list[tuple[str, str]]:
    """(tar, label) for each distinct tar, in label order. The label is the tar's path below the
    folder common to all of them: ``a/x.tar`` and ``b/x.tar`` stay apart, one tar is its file name."""
    by_path: dict[str, str] = {}
    for t in sorted(tars):
        by_path.setdefault(os.path.realpath(t), t)  # the same file named twice is imported once
    if not by_path:
        return []
    common = os.path.commonpath([os.path.dirname(p) for p in by_path])
    return sorted(((t, Path(os.path.relpath(p, common)).as_posix()) for p, t in by_path.items()),
                  key=lambda tl: tl[1])


def _ended_cleanly(tf: tarfile.TarFile) -> bool:
    """After iterating: True when the archive ends with its end-of-archive (zero) block, as a
    complete tar does; tarfile stops silently at a header cut short or missing."""
    try:
        tf.fileobj.seek(tf.offset)
        block = tf.fileobj.read(tarfile.BLOCKSIZE)
    except (OSError, EOFError):  # a compressed tar cut short
        return False
    return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


def read_tar(path: str | Path) -> tuple[dict[str, dict[str, bytes]], str | None, str | None]:
    """(members by sample key, key of the sample a truncation cut, why the tar ended early).

    WebDataset stores a sample's members one after another, so when the tar is cut the samples
    before the one being read are complete and kept. The one being read is dropped: even a cut at
    a member boundary cannot tell whether more of its members (``obj2.png``...) followed.
    """
    groups: dict[str, dict[str, bytes]] = defaultdict(dict)
    current, cut = None, None
    with tarfile.open(path) as tf:
        try:
            for m in tf:
                if m.isfile():
                    current, ext = split_key(m.name)
                    groups[current][ext] = tf.extractfile(m).read()
        except (tarfile.ReadError, EOFError) as e:
            cut = f"truncated: {e}"
        else:
            if not _ended_cleanly(tf):
                cut = f"truncated: no end-of-archive block after byte {tf.offset}"
    if cut is None:
        return dict(groups), None, None
    groups.pop(current, None)
    return dict(groups), current, cut


def _convert(label: str, key: str, members: dict[str, bytes], p: DecomposeParams) -> dict:
    """One reference sample -> one SAMPLE_SCHEMA row; raises ValueError(reason, detail)."""
    missing = [m for m in REQUIRED if m not in members]
    if missing:
        raise ValueError("missing_member", f"no {', '.join(missing)}")
    data = members["bg.jpg"]
    try:
        rgb = decode_rgb(data)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError("truncated_image" if "truncat" in str(e).lower() else "unreadable_image",
                         _detail(e)) from None
    H, W = rgb.shape[:2]
    n = 2
    while f"obj{n}.png" in members and f"mask{n}.png" in members:
        n += 1
    masks, objs = [], []
    for k in range(n):
        try:
            m = (decode_png(members[f"mask{k}.png"], "gray") > 127).astype(np.uint8)
            o = decode_rgb(members[f"obj{k}.png"])
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError("unreadable_member", f"obj{k}/mask{k}: {_detail(e)}") from None
        if m.shape != (H, W):
            raise ValueError("mask_size_mismatch", f"mask{k} is {m.shape[1]}x{m.shape[0]}, bg.jpg is {W}x{H}")
        if not m.any():
            raise ValueError("empty_mask", f"mask{k} has no pixel set")
        masks.append(m)
        objs.append(o)
    image_id = _image_id(label, key)
    rng = _rng(p.seed, image_id)
    split = "test" if rng.random() < p.test_fraction else "train"
    rles = [M.encode(m) for m in masks]
    tight = [M.mask_box(r) for r in rles]
    expanded, patches, pmasks = [], [], []
    for k in range(n):
        pad = float(rng.uniform(*p.patch_pad))
        factor = float(rng.uniform(*p.box_expand))
        expanded.append(expand_boxes(np.array(tight[k], np.float64), factor, W, H)[0].tolist())
        x0, y0, x1, y1 = (int(v) for v in tight[k])
        crop_mask = masks[k][y0:y1, x0:x1]
        o = objs[k]
        if o.shape[:2] != crop_mask.shape:  # the object crop is the tight box, possibly resized
            import cv2

            crop_mask = cv2.resize(crop_mask, (o.shape[1], o.shape[0]), interpolation=cv2.INTER_NEAREST)
        pt, pm = sample.make_patch(o, crop_mask, [0, 0, o.shape[1], o.shape[0]], pad, p.patch_size)
        patches.append(encode_png(pt, p.png_compression))
        pmasks.append(encode_png(pm, p.png_compression))
    rmap = region_map(expanded, H, W, p.preview_resolution)
    tb = np.array(tight, np.float64)
    box_iou, mask_iou, contact = [], [], []
    for a in range(n):
        for b in range(a + 1, n):
            box_iou.append(float(pairing.box_iou(tb[a:a + 1], tb[b:b + 1])[0, 0]))
            mask_iou.append(float(mask_utils.iou([rles[a]], [rles[b]], [0])[0][0]))
            contact.append(pairing.contact_length(masks[a], tight[a], masks[b], tight[b], p.contact_px))
    return {
        "sample_id": sample_id(label, key), "split": split, "source_image": f"{label}:{printable(key)}.bg.jpg",
        "image_id": image_id, "width": W, "height": H, "image_bytes": data, "n_objects": n,
        "annotation_ids": list(range(n)), "category_ids": [-1] * n, "category_names": [""] * n,
        "masks_rle": [M.rle_string(r) for r in rles], "boxes_tight": tight, "boxes_expanded": expanded,
        "patches": patches, "patch_masks": pmasks, "region_map": encode_png(rmap, p.png_compression),
        "pair_box_iou": box_iou, "pair_mask_iou": mask_iou, "pair_contact_px": contact,
        "depth_ranks": None, "amodal_rle": None,
    }


def import_tar(tar: str, out: str, index: int, params: DecomposeParams, label: str | None = None) -> dict:
    """One reference tar -> ``shards/shard-<index>.parquet``; returns counts and quarantine records.

    ``label`` (default: the file name) seeds the sample ids; :func:`tar_labels` gives each tar its own."""
    import cv2

    cv2.setNumThreads(1)
    label = label or Path(tar).name
    rows, qrecs = [], []
    groups, cut_key, cut = {}, None, None
    try:
        groups, cut_key, cut = read_tar(tar)
    except (tarfile.TarError, OSError) as e:
        qrecs.append(QuarantineRecord(STAGE, "unreadable_tar", _detail(e), tar))
    if cut is not None:
        qrecs.append(QuarantineRecord(STAGE, "truncated_tar", cut, tar))
    if cut_key is not None:
        qrecs.append(QuarantineRecord(STAGE, "truncated_sample", f"the tar ends inside or right after it ({cut})",
                                      f"{tar}:{printable(cut_key)}", item_key=sample_id(label, cut_key)))
    for key in sorted(groups):
        try:
            rows.append(_convert(label, key, groups[key], params))
        except ValueError as e:
            reason, detail = e.args if len(e.args) == 2 else ("invalid_sample", _detail(e))
            qrecs.append(QuarantineRecord(STAGE, reason, detail, f"{tar}:{printable(key)}",
                                          item_key=sample_id(label, key)))
    rel, sha = None, None
    if rows:
        rel = f"{SHARDS_DIR}/{shard_name(index)}.parquet"
        sha = write_samples(Path(out) / rel, rows)
    return {"tar": tar, "file": rel, "sha256": sha, "samples_seen": len(groups) + (cut_key is not None),
            "samples": len(rows), "tar_unreadable": any(q.reason == "unreadable_tar" for q in qrecs),
            "tar_truncated": cut is not None,
            "quarantined": dict(Counter(q.reason for q in qrecs if q.reason not in _TAR_REASONS)),
            "quarantine": [asdict(q) for q in qrecs]}


def check_tars(tars: list[str]) -> None:
    """Every tar must be a readable file before the output folder is touched (a mistyped name
    would otherwise import nothing over the previous import)."""
    missing = [t for t in tars if not Path(t).is_file()]
    if missing:
        raise InputError(f"{missing[0]}: no such tar file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def clear_output(out: Path) -> None:
    """An import is not resumable (a tar is quick): drop the shards of an earlier import first,
    in a folder that holds only an import's output (see tasks.shards.claim_output)."""
    import shutil

    claim_output(out, STAGE, {SHARDS_DIR, "manifest.json", "quarantine.parquet"} | GRID_FILES)
    shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    for f in ("manifest.json", "quarantine.parquet"):
        (out / f).unlink(missing_ok=True)


def finalize(out: Path, results: list[dict], params: DecomposeParams, tars: list[str]) -> dict:
    qrecs = [QuarantineRecord(**q) for r in results for q in r["quarantine"]]
    quarantine.write(out / "quarantine.parquet", qrecs)
    quarantined: Counter = Counter()
    for r in results:
        quarantined.update(r["quarantined"])
    manifest = {
        "schema_version": SCHEMA_VERSION, "stage": "import_webdataset", "inputs": {"tars": tars},
        "params": params.model_dump(), "images_seen": sum(r["samples_seen"] for r in results),
        "images_with_pair": sum(r["samples"] for r in results), "samples": sum(r["samples"] for r in results),
        "skipped": {}, "quarantined": dict(sorted(quarantined.items())), "quarantined_annotations": {},
        "quarantine_rows": len(qrecs), "tars_unreadable": [r["tar"] for r in results if r["tar_unreadable"]],
        "tars_truncated": [r["tar"] for r in results if r["tar_truncated"]],
        "shards": [{"file": r["file"], "samples": r["samples"], "sha256": r["sha256"]} for r in results if r["file"]],
        "content_hash": content_hash(out),
    }
    atomic.write_json(out / "manifest.json", manifest)
    return manifest


def quarantine_tallies(manifest: dict) -> dict[str, tuple[int, dict[str, int]]]:
    """Samples seen and quarantined; a tar that could not be opened at all counts as one lost input."""
    unreadable = len(manifest["tars_unreadable"])
    lost = {"unreadable_tar": unreadable} if unreadable else {}
    return {"samples": (manifest["images_seen"] + unreadable, {**manifest["quarantined"], **lost})}
