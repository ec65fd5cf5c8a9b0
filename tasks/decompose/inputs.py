"""Read and check an instance-annotation file: LVIS v1 (``coco_url``), LVIS v0.5 (``file_name``), COCO.

Structural defects (not JSON, a missing list, an annotation without ``image_id``...) fail at once
with :class:`InputError` naming the file and the field: nothing useful can come of such a file.
Defects of single annotations that a big real dataset may well contain (an annotation pointing at
an unknown image or category) are quarantined here; mask defects are quarantined by the workers.

Indexing is done by the libraries' own classes (``lvis.LVIS`` for LVIS, ``pycocotools.coco.COCO``
for COCO) fed the already-parsed JSON, so a 1 GB LVIS file is read and parsed once.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tasks.quarantine import QuarantineRecord

STAGE = "decompose"


class InputError(ValueError):
    """The annotation file or the image root is unusable; the message names the file and field."""


@dataclass
class Dataset:
    path: Path
    format: str  # "lvis_v1" | "lvis_v0.5" | "coco"
    sha256: str
    images: dict[int, dict]  # image id -> image record
    anns_by_image: dict[int, list[dict]]  # usable annotations per image (known image and category)
    categories: dict[int, str]  # category id -> name
    quarantine: list[QuarantineRecord] = field(default_factory=list)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _need(cond: bool, path: Path, where: str, what: str) -> None:
    if not cond:
        raise InputError(f"{path}: {where}: {what}")


def _check_list(data: dict, key: str, path: Path) -> list:
    _need(key in data, path, key, "missing (an instance-annotation file needs images, annotations, categories)")
    _need(isinstance(data[key], list), path, key, f"must be a list, got {type(data[key]).__name__}")
    return data[key]


def _check_structure(data, path: Path) -> None:
    _need(isinstance(data, dict), path, "<top level>", f"must be a JSON object, got {type(data).__name__}")
    images = _check_list(data, "images", path)
    anns = _check_list(data, "annotations", path)
    cats = _check_list(data, "categories", path)
    seen: set[int] = set()
    for i, im in enumerate(images):
        w = f"images[{i}]"
        _need(isinstance(im, dict), path, w, "must be an object")
        for k in ("id", "width", "height"):
            _need(k in im, path, f"{w}.{k}", "missing")
            _need(_is_int(im[k]), path, f"{w}.{k}", f"must be an integer, got {im[k]!r}")
        _need(im["width"] > 0 and im["height"] > 0, path, f"{w}.width/height",
              f"must be positive, got {im['width']}x{im['height']}")
        _need(isinstance(im.get("file_name"), str) or isinstance(im.get("coco_url"), str), path,
              f"{w}.file_name", "missing (LVIS v1 needs coco_url, LVIS v0.5 and COCO need file_name)")
        _need(im["id"] not in seen, path, f"{w}.id", f"duplicate image id {im['id']}")
        seen.add(im["id"])
    for i, c in enumerate(cats):
        w = f"categories[{i}]"
        _need(isinstance(c, dict), path, w, "must be an object")
        _need(_is_int(c.get("id")), path, f"{w}.id", f"missing or not an integer ({c.get('id')!r})")
        _need(isinstance(c.get("name"), str), path, f"{w}.name", "missing or not a string")
    for i, a in enumerate(anns):
        # One cheap test per annotation (LVIS train has 1.3 M); the detailed one only on failure.
        if not (type(a) is dict and type(a.get("id")) is int and type(a.get("image_id")) is int
                and type(a.get("category_id")) is int and "segmentation" in a):
            w = f"annotations[{i}]"
            _need(isinstance(a, dict), path, w, "must be an object")
            for k in ("id", "image_id", "category_id"):
                _need(k in a, path, f"{w}.{k}", "missing")
                _need(_is_int(a[k]), path, f"{w}.{k}", f"must be an integer, got {a[k]!r}")
            _need("segmentation" in a, path, f"{w}.segmentation", "missing (decompose needs instance masks)")


def detect_format(data: dict) -> str:
    cats = data["categories"]
    is_lvis = any(("synset" in c or "frequency" in c) for c in cats[:50])
    if not is_lvis:
        return "coco"
    has_file_name = any("file_name" in im for im in data["images"][:50])
    return "lvis_v0.5" if has_file_name else "lvis_v1"


def _index(data: dict, fmt: str) -> tuple[dict, dict]:
    """(image id -> record, image id -> annotations) from the library's own index."""
    if fmt.startswith("lvis"):
        from lvis import LVIS

        class _ParsedLVIS(LVIS):
            def __init__(self, dataset):  # LVIS() only takes a path; the JSON is already parsed
                import logging

                self.logger = logging.getLogger("lvis")
                self.dataset = dataset
                self._create_index()

        idx = _ParsedLVIS(data)
        return idx.imgs, idx.img_ann_map
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco.imgs, coco.imgToAnns


def load_annotations(path: str | Path) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: annotation file not found (decompose.annotations)")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None
    _check_structure(data, path)
    fmt = detect_format(data)
    imgs, img_anns = _index(data, fmt)
    categories = {c["id"]: c["name"] for c in data["categories"]}

    quarantine: list[QuarantineRecord] = []
    anns_by_image: dict[int, list[dict]] = {}
    for image_id, anns in img_anns.items():
        known = image_id in imgs
        kept = []
        for a in anns:
            if not known:
                quarantine.append(QuarantineRecord(STAGE, "unknown_image", f"image_id {image_id} not in images",
                                                   str(path), image_id, a["id"]))
            elif a["category_id"] not in categories:
                quarantine.append(QuarantineRecord(STAGE, "unknown_category",
                                                   f"category_id {a['category_id']} not in categories",
                                                   str(path), image_id, a["id"]))
            else:
                kept.append(a)
        if known:
            anns_by_image[image_id] = sorted(kept, key=lambda a: a["id"])
    return Dataset(path, fmt, hashlib.sha256(raw).hexdigest(), dict(imgs), anns_by_image, categories, quarantine)


def check_image_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: image root not found or not a folder (decompose.images)")
    return root


_COCO2014 = re.compile(r"^COCO_[a-z]+\d{4}_(\d+\.\w+)$")


def image_candidates(record: dict) -> list[str]:
    """Relative paths an image may have under the root, most specific first.

    LVIS v1 has only ``coco_url`` (``.../val2017/000000266409.jpg``); LVIS v0.5 names COCO-2014 files
    (``COCO_val2014_000000266409.jpg``) for images usually stored under their 2017 names.
    """
    out: list[str] = []
    fn = record.get("file_name")
    if isinstance(fn, str) and fn:
        out.append(fn)
        base = os.path.basename(fn)
        out.append(base)
        m = _COCO2014.match(base)
        if m:
            out.append(m.group(1))
    url = record.get("coco_url")
    if isinstance(url, str) and url:
        parts = url.rstrip("/").split("/")
        if len(parts) >= 2:
            out.append("/".join(parts[-2:]))
        out.append(parts[-1])
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def leaves_root(rel: str) -> bool:
    """True for a name that points outside the image root: absolute, or climbing out with ``..``.

    Decided on the name alone (no symlink is followed): a root may well be a link farm into a
    dataset elsewhere, but an annotation file must not steer the stage to read any file it names.
    """
    return os.path.isabs(rel) or os.path.normpath(rel).split(os.sep, 1)[0] == os.pardir


def name_outside_root(record: dict) -> str | None:
    """The first of the record's image names that leaves the root, if any (such an image is never read)."""
    return next((rel for rel in image_candidates(record) if leaves_root(rel)), None)


def resolve_image(root: Path, record: dict) -> str | None:
    for rel in image_candidates(record):
        if not leaves_root(rel) and (root / rel).is_file():
            return rel
    return None
