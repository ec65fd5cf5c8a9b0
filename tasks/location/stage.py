"""The location stage end to end: data -> stage 1 (MLE) -> stage 2 (DPO) -> TPR/FPR report.

``out`` (``location.out``) receives::

    data/           query shards, manifest.json, quarantine.parquet (tasks.location.data / .opa)
    stage1/         the MLE model (DPO's reference and its ablation)   config.json, model.safetensors, sha256.json
    final/          the DPO model, what ``pics propose`` loads
    metrics.json    tpr_at_k, fpr_at_k per method; DPO vs stage 1 paired intervals
    curves.png, training.csv, example.png, report.md
"""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from pics_model.location_model import LocationConfig
from tasks import atomic
from tasks.location import evaluate as ev
from tasks.location.data import generate, read_queries
from tasks.location.propose import draw_boxes, propose_boxes
from tasks.location.train import to_tensors, train_dpo, train_mle
from tasks.shards import claim_output

STAGE = "location"
OWNED = {"data", "stage1", "final", "metrics.json", "curves.png", "training.csv", "example.png", "report.md"}


class LocationInputError(ValueError):
    """The location data cannot train or evaluate a model (an empty split); the message says why."""


def model_config(p, class_names: list[str]) -> LocationConfig:
    encoder = ({"kind": "small", "small_channels": list(p.small_channels)} if p.encoder == "small"
               else {"kind": "mobilenetv2", "feature_blocks": p.feature_blocks})
    return LocationConfig(class_names=class_names, bins=p.bins, box_tokens=p.box_tokens, image_size=p.image_size,
                          d_model=p.d_model, layers=p.layers, heads=p.heads, encoder=encoder,
                          token_pool=p.token_pool, feature_norm=p.feature_norm, fourier=p.fourier)


def claim(out: Path) -> None:
    """Refuse ``out`` unless it is new or the location stage's: call before the data phase writes to it."""
    claim_output(out, STAGE, OWNED)


def build_data(p, out: Path) -> dict:
    """The data phase in this process: the OPA import, or the embedded generator run serially
    (the flow runs the generator's shards on Ray, ``flows.location``)."""
    if p.opa_root:
        from tasks.location.opa import import_opa

        return import_opa(p.opa_root, out / "data")
    return generate(p, out / "data")


def class_names(p, queries: list[dict]) -> list[str]:
    if p.opa_root:
        return sorted({q["category"] for q in queries})
    from tasks.make_sample.shapes import CATEGORIES

    return [c.name for c in CATEGORIES]  # every class the generator draws, seen in training or not


def run(p, out: str | Path, log=print, manifest: dict | None = None, t_data: float = 0.0) -> dict:
    """Train and evaluate on ``out``/data; the data phase runs first unless ``manifest`` (its
    manifest, made ``t_data`` seconds long by the caller) says it is done."""
    out = Path(out)
    claim(out)
    if manifest is None:
        t0 = time.perf_counter()
        manifest = build_data(p, out)
        t_data = time.perf_counter() - t0
    train_q, test_q = read_queries(out / "data", "train"), read_queries(out / "data", "test")
    if not train_q or not test_q:
        raise LocationInputError(f"{out / 'data'}: {len(train_q)} train and {len(test_q)} test queries; the location "
                         "stage needs both (more location.num_scenes, or another test_fraction)")
    log(f"location data: {len(train_q)} train / {len(test_q)} test queries, {manifest['positives']} positives, "
        f"negatives {manifest['negatives_by_reason']} ({t_data:.0f} s)")

    threads = torch.get_num_threads()
    if p.threads:
        torch.set_num_threads(p.threads)
    try:
        m = _train_and_evaluate(p, out, train_q, test_q, manifest, t_data, log)
    finally:
        torch.set_num_threads(threads)
    return m


def _train_and_evaluate(p, out: Path, train_q: list[dict], test_q: list[dict], manifest: dict, t_data: float,
                        log) -> dict:
    cfg = model_config(p, class_names(p, train_q + test_q))
    data = to_tensors(train_q, cfg.class_names, cfg.image_size)
    curve: list[dict] = []
    t1 = time.perf_counter()
    stage1 = train_mle(cfg, data, p.mle_steps, p.batch_size, p.lr, p.seed, curve, p.label_sigma)
    stage1.save_pretrained(out / "stage1")
    final = train_dpo(stage1, data, p.dpo_steps, p.batch_size, p.dpo_lr, p.beta, p.seed, curve)
    final.save_pretrained(out / "final")
    t_train = time.perf_counter() - t1
    log(f"location training: {p.mle_steps} MLE + {p.dpo_steps} DPO steps in {t_train:.0f} s")

    t2 = time.perf_counter()
    result = ev.evaluate({"stage1": stage1, "dpo": final}, test_q, train_q, p.ks, p.iou, p.temperature, p.top_p, p.seed,
                         p.baseline_draws)
    m = ev.metrics(result, p.ks, p.iou, p.bootstrap, p.seed)
    m.update(seconds={"data": round(t_data, 1), "train": round(t_train, 1), "evaluate": round(time.perf_counter() - t2, 1)},
             train_queries=len(train_q), train_pairs=int(len(data.pairs)), data_manifest=manifest["content_hash"])
    write_outputs(out, m, curve, final, test_q, p)
    return m


def _csv(rows: list[dict]) -> bytes:
    keys = sorted({k for r in rows for k in r})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def write_outputs(out: Path, m: dict, curve: list[dict], model, test_q: list[dict], p) -> None:
    atomic.write_bytes(out / "training.csv", _csv(curve))
    with atomic.atomic_path(out / "curves.png") as tmp:
        ev.plot(m, tmp)
    q = test_q[0]
    boxes, scores = propose_boxes(model, q["image"], q["category"], 10, temperature=p.temperature, top_p=p.top_p,
                                  seed=p.seed)
    with atomic.atomic_path(out / "example.png") as tmp:
        draw_boxes(q["image"], boxes, scores, scale=3).save(tmp, format="PNG")
    atomic.write_bytes(out / "report.md", report(m, q).encode())
    atomic.write_json(out / "metrics.json", m)


def report(m: dict, example: dict) -> str:
    rows = ["| method | " + " | ".join(f"K={k}" for k in m["ks"]) + " |", "|---|" + "---|" * len(m["ks"])]
    for what in ("tpr_at_k", "fpr_at_k"):
        for meth, vals in m[what].items():
            rows.append(f"| {what[:3].upper()} {meth} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    d = m["dpo_vs_stage1"]
    paired = [f"| {k} | {f['diff']:+.4f} [{f['ci95'][0]:+.4f}, {f['ci95'][1]:+.4f}] | "
              f"{t['diff']:+.4f} [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}] |" for k, f, t in zip(m["ks"], d["fpr"], d["tpr"])]
    return "\n".join([
        "# Location model: TPR / FPR of sampled boxes",
        "",
        f"{m['queries']} test queries ({m['positives']} positive, {m['negatives']} negative labelled boxes), "
        f"IoU >= {m['iou']}. TPR@K: positive boxes hit by one of K samples / positive boxes; FPR@K likewise "
        "for negatives (a sample counts only for its best-IoU labelled box, if above the threshold).",
        "",
        "![curves](curves.png)",
        "",
        *rows,
        "",
        f"TPR@{m['ks'][0]} of DPO over random: {m['tpr10_over_random']}",
        "",
        "## DPO minus stage 1 (paired bootstrap over queries, 95%)",
        "",
        "| K | FPR difference | TPR difference |",
        "|---|---|---|",
        *paired,
        "",
        f"![example](example.png) 10 DPO proposals for a `{example['category']}` in test query "
        f"{example['query_id']} (green: highest log-probability).",
        "",
        f"seconds: {json.dumps(m['seconds'])}",
        "",
    ])
