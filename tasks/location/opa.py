"""Import the OPA dataset (Object Placement Assessment, bcmi) into location query shards.

OPA's layout (the dataset's README and GracoNet's ``tool/preprocess.py``)::

    ROOT/background/<category>/<bg_id>.jpg       COCO backgrounds, grouped by the class they accept
    ROOT/foreground/<category>/<fg_id>.jpg       (+ mask_<fg_id>.jpg): the object a composite pasted
    ROOT/train_set.csv, ROOT/test_set.csv        fg_id, bg_id, position, scale, label, img_name, mask_name

``position`` is the pasted object's box ``[x, y, w, h]`` (top-left corner, background pixels) and
``label`` 1 means annotators judged the placement plausible. Rows of one (background, category)
become one query: label-1 boxes its positives, label-0 boxes its negatives (reason ``opa_label_0``,
a human judgement rather than a geometric proof). A row that cannot be read is quarantined with
the file and field that failed; the other rows of its query still count.
"""
from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict
from pathlib import Path

from tasks.location.data import STAGE, row, write_manifest, write_shard
from tasks.quarantine import QuarantineRecord
from tasks.sharded_stage import PROGRESS_DIR, RUN_FILES, SHARDS_DIR
from tasks.shards import claim_output

SPLIT_FILES = {"train": "train_set.csv", "test": "test_set.csv"}
COLUMNS = ("fg_id", "bg_id", "position", "scale", "label", "img_name", "mask_name")


class OPAFormatError(ValueError):
    """The OPA folder is not in OPA's layout (a missing CSV or column)."""


def foreground_categories(root: Path) -> dict[str, str]:
    """fg_id -> category, from ``foreground/<category>/<fg_id>.jpg`` (masks are ``mask_*``)."""
    out = {}
    for f in sorted((root / "foreground").glob("*/*.jpg")):
        if not f.name.startswith("mask"):
            out[f.stem] = f.parent.name
    return out


def parse_position(text: str, where: str) -> list[float]:
    """``"[x, y, w, h]"`` -> xyxy; ValueError naming ``where`` when malformed."""
    try:
        v = json.loads(text)
        x, y, w, h = (float(t) for t in v)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: position {text!r} is not [x, y, w, h] ({e})") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"{where}: position {text!r} has a non-positive width or height")
    return [x, y, x + w, y + h]


def _read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise OPAFormatError(f"{csv_path}: missing column(s) {', '.join(missing)} (OPA's are {', '.join(COLUMNS)})")
        return list(reader)


def group_queries(root: Path, split: str, fg_cat: dict[str, str]) -> tuple[dict, list[QuarantineRecord]]:
    """(bg_id, category) -> {"pos": [...], "neg": [...]} of one split's CSV, and its bad rows."""
    csv_path = root / SPLIT_FILES[split]
    if not csv_path.is_file():
        raise OPAFormatError(f"{csv_path}: missing (an OPA folder has {' and '.join(SPLIT_FILES.values())})")
    groups: dict = defaultdict(lambda: {"pos": [], "neg": []})
    bad = []
    for i, r in enumerate(_read_rows(csv_path), start=2):  # line 1 is the header
        where = f"{csv_path}:{i}"
        try:
            cat = fg_cat.get(r["fg_id"])
            if cat is None:
                raise KeyError(f"{where}: fg_id {r['fg_id']!r} has no foreground/<category>/{r['fg_id']}.jpg")
            box = parse_position(r["position"], where)
            if r["label"].strip() not in ("0", "1"):
                raise ValueError(f"{where}: label {r['label']!r} is neither 0 nor 1")
        except (KeyError, ValueError) as e:
            bad.append(QuarantineRecord(STAGE, "bad_opa_row", str(e).strip("'\""), source=str(csv_path),
                                        item_key=f"{r.get('fg_id')}_{r.get('bg_id')}"))
            continue
        groups[(r["bg_id"], cat)]["pos" if r["label"].strip() == "1" else "neg"].append(box)
    return groups, bad


def import_opa(root: str | Path, out: str | Path, queries_per_shard: int = 256) -> dict:
    """OPA under ``root`` -> query shards, manifest and quarantine under ``out``."""
    from PIL import Image

    root, out = Path(root), Path(out)
    if not (root / "background").is_dir() or not (root / "foreground").is_dir():
        raise OPAFormatError(f"{root}: not an OPA folder (needs background/ and foreground/)")
    claim_output(out, STAGE, RUN_FILES)  # the generator's files too: the same folder may hold either
    for d in (SHARDS_DIR, PROGRESS_DIR):  # an earlier run's (claim_output checked): every shard is written anew
        shutil.rmtree(out / d, ignore_errors=True)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    fg_cat = foreground_categories(root)
    rows, bad, seen = [], [], 0
    for split in SPLIT_FILES:
        groups, bad_rows = group_queries(root, split, fg_cat)
        bad += bad_rows
        for (bg_id, cat), boxes in sorted(groups.items()):
            seen += 1
            img = root / "background" / cat / f"{bg_id}.jpg"
            try:
                data = img.read_bytes()
                with Image.open(img) as im:
                    w, h = im.size
            except OSError as e:
                bad.append(QuarantineRecord(STAGE, "missing_background", f"{img}: {e}", source=str(img),
                                            item_key=f"{bg_id}_{cat}"))
                continue
            if not boxes["pos"]:
                continue  # nothing to learn or score against: only implausible placements were labelled
            n = len(boxes["neg"])
            rows.append(row(f"opa-{split}-{bg_id}-{cat}", "opa", split, bg_id, cat, w, h, data, boxes["pos"],
                            boxes["neg"], ["opa_label_0"] * n, ["annotators judged it implausible"] * n))
    results = []
    for i, s in enumerate(range(0, max(len(rows), 1), queries_per_shard)):
        chunk = rows[s:s + queries_per_shard]
        write_shard(out / "shards", i, chunk)
        results.append({"rows": len(chunk), "positives": sum(len(r["positives"]) // 4 for r in chunk),
                        "reasons": {"opa_label_0": sum(len(r["negatives"]) // 4 for r in chunk)},
                        "quarantine": bad if i == 0 else []})
    return write_manifest(out, results, "opa", {"root": str(root), "groups": seen})
