"""The analogy stage as plain functions: scenes -> trained field -> scored maps.

Writes under ``out``: ``scenes/`` (every generated scene as a point-set .npz), ``final/`` (the
descriptor field: config.json, model.safetensors, sha256.json), ``loss.csv`` and
``metrics.json``, each in one atomic rename (a killed run leaves the previous ones whole). The
folder may also hold DVC's .gitignore and the stage marker, which are left alone.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np
import torch

from pics_model.context_field import ContextDescriptorField, FieldConfig
from pics_model.scene_map import MapConfig
from tasks import atomic
from tasks.analogy import evaluate as ev
from tasks.analogy.scenes import Scene, eval_pair, generate_scene, object_library, save_scene, scene_name
from tasks.analogy.train import TrainConfig, train_field
from tasks.params import AnalogyParams

SCENES, FINAL, METRICS, LOSS = "scenes", "final", "metrics.json", "loss.csv"
OWNED = {SCENES, FINAL, METRICS, LOSS, ".gitignore"}  # DVC writes .gitignore beside the outs it tracks


def field_config(p: AnalogyParams) -> FieldConfig:
    return FieldConfig(radius=p.radius, max_neighbours=p.max_neighbours, width=p.width, layers=p.layers,
                       heads=p.heads, feature_dim=p.feature_dim)


def map_config(p: AnalogyParams, fine: bool = True) -> MapConfig:
    return MapConfig(num_yaws=p.num_yaws, flips=p.flips, scales=tuple(p.scales), topk=p.topk,
                     refine_iters=p.refine_iters, rbf_smoothing=p.rbf_smoothing, fine=fine, seed=p.seed)


def train_config(p: AnalogyParams) -> TrainConfig:
    return TrainConfig(steps=p.steps, batch_scenes=p.batch_scenes, queries=p.queries, lr=p.lr,
                       temperature=p.temperature, seed=p.seed)


def make_scenes(p: AnalogyParams, out: Path, log=print) -> list[Scene]:
    """Generate the scenes and write them to ``out/scenes``."""
    scenes = []
    t0 = time.perf_counter()
    with atomic.atomic_dir(out / SCENES) as tmp:
        for i in range(p.num_scenes):
            scenes.append(generate_scene(i, p.seed, (p.min_objects, p.max_objects), p.points_per_object))
            save_scene(tmp / scene_name(i), scenes[-1])
    log(f"generated {len(scenes)} scenes in {time.perf_counter() - t0:.0f} s")
    return scenes


def eval_pairs(p: AnalogyParams, train: list[Scene], heldout: list[Scene]):
    """Pairs from the held-out scenes, distractors from the training scenes' objects."""
    rng = np.random.default_rng(np.random.SeedSequence([p.seed, 2]))
    library = object_library(train)
    return [eval_pair(heldout[i % len(heldout)], library, rng, yaw_jitter_deg=p.yaw_jitter_deg,
                      swap=p.eval_swap_instances) for i in range(p.eval_pairs)]


def write_loss(path: Path, curve: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["step", "loss", "seconds"])
    w.writeheader()
    w.writerows(curve)
    atomic.write_bytes(path, buf.getvalue().encode())


def split(p: AnalogyParams, scenes: list[Scene]) -> tuple[list[Scene], list[Scene]]:
    """(training scenes, held-out scenes): the last ``heldout_scenes`` are held out."""
    return scenes[:-p.heldout_scenes], scenes[-p.heldout_scenes:]


def train_and_save(p: AnalogyParams, out: Path, train: list[Scene], log=print) -> tuple[ContextDescriptorField, dict]:
    """Train the field, write ``final/`` and ``loss.csv``; returns the field and a summary."""
    torch.set_num_threads(p.threads)
    t0 = time.perf_counter()
    field, curve = train_field(train, field_config(p), train_config(p), log)
    seconds = time.perf_counter() - t0
    with atomic.atomic_dir(out / FINAL) as tmp:
        field.save(tmp)
    write_loss(out / LOSS, curve)
    return field, {"steps": p.steps, "seconds": round(seconds, 1), "first_loss": round(curve[0]["loss"], 4),
                   "final_loss": round(curve[-1]["loss"], 4)}


def run(p: AnalogyParams, out: Path, log=print) -> dict:
    """Generate, train, save, evaluate into ``out`` (a fresh folder); returns the metrics."""
    scenes = make_scenes(p, out, log)
    train, heldout = split(p, scenes)
    field, train_info = train_and_save(p, out, train, log)
    metrics = evaluate_field(p, field, train, heldout, log)
    metrics["train"] = train_info
    atomic.write_json(out / METRICS, metrics)
    return metrics


def evaluate_field(p: AnalogyParams, field: ContextDescriptorField, train: list[Scene], heldout: list[Scene],
                   log=print) -> dict:
    torch.set_num_threads(p.threads)
    size = field.config.typical_object_size
    full, coarse = ev.ours(field, map_config(p))
    methods = {"ours": full, "ours_coarse_only": coarse, "icp": ev.icp_baseline, "centroid": ev.centroid_baseline}
    result = ev.evaluate(methods, eval_pairs(p, train, heldout), size, log)
    summary = result["methods"]
    best_baseline = max(summary[b]["pcp@0.25"] for b in ("icp", "centroid"))
    return {"methods": summary, "pairs": result["pairs"], "typical_object_size": round(size, 4),
            "pcp@0.25_over_best_baseline": round(summary["ours"]["pcp@0.25"] - best_baseline, 4)}
