"""The analogy stage as plain functions: scenes -> trained field -> scored maps.

Writes under ``out``: ``scenes/`` (every generated scene as a point-set .npz), ``final/`` (the
descriptor field: config.json, model.safetensors, sha256.json), ``loss.csv`` and
``metrics.json``, ``transfer/`` (arrangement transfers rendered in make_sample's format),
``transfer.png`` and ``report.md``, each in one atomic rename (a killed run leaves the previous ones
whole). The folder may also hold DVC's .gitignore and the stage marker, which are left alone.
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
from tasks.analogy import transfer as tr
from tasks.analogy.scenes import (Scene, eval_pair, generate_scene, generate_spec, object_library,
                                  save_scene, scene_name)
from tasks.analogy.train import TrainConfig, train_field
from tasks.params import AnalogyParams, MakeSampleParams

SCENES, FINAL, METRICS, LOSS = "scenes", "final", "metrics.json", "loss.csv"
TRANSFER, TRANSFER_PNG, REPORT = "transfer", "transfer.png", "report.md"
OWNED = {SCENES, FINAL, METRICS, LOSS, TRANSFER, TRANSFER_PNG, REPORT, ".gitignore"}  # DVC writes .gitignore beside the outs it tracks


def field_config(p: AnalogyParams) -> FieldConfig:
    return FieldConfig(radius=p.radius, max_neighbours=p.max_neighbours,
                       ball_tokens=p.ball_tokens, width=p.width, layers=p.layers,
                       heads=p.heads, feature_dim=p.feature_dim)


def map_config(p: AnalogyParams, fine: bool = True) -> MapConfig:
    return MapConfig(num_yaws=p.num_yaws, flips=p.flips, scales=tuple(p.scales), topk=p.topk,
                     refine_iters=p.refine_iters, rbf_smoothing=p.rbf_smoothing, thin_dense=p.thin_dense, fine=fine,
                     seed=p.seed)


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
            save_scene(tmp / scene_name(i), scenes[-1], (p.seed, i, p.min_objects, p.max_objects))
    log(f"generated {len(scenes)} scenes in {time.perf_counter() - t0:.0f} s")
    return scenes


def eval_pairs(p: AnalogyParams, train: list[Scene], heldout: list[Scene], hard: bool = False):
    """Pairs from the held-out scenes, distractors from the training scenes' objects. ``hard``:
    ``hard_pairs`` pairs whose kept objects are other instances, each shifted and turned."""
    rng = np.random.default_rng(np.random.SeedSequence([p.seed, 3 if hard else 2]))
    library = object_library(train)
    if hard:
        return [eval_pair(heldout[i % len(heldout)], library, rng, yaw_jitter_deg=p.yaw_jitter_deg, swap=True,
                          perturb_shift=p.hard_shift, perturb_yaw_deg=p.hard_yaw_deg) for i in range(p.hard_pairs)]
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





def evaluate_field(p: AnalogyParams, field: ContextDescriptorField, train: list[Scene], heldout: list[Scene],
                   log=print) -> dict:
    """Scores on the paper's pairs (``methods``) and, when ``hard_pairs``, on the harder pairs
    (``hard``). An untrained field of the same shape (seeded) is scored on both, on the same pairs
    (forward maps only): ``untrained`` (the rigid pairs) and ``hard``, each with the paired
    difference trained - untrained (``trained_vs_untrained``)."""
    torch.set_num_threads(p.threads)
    size = field.config.typical_object_size
    full, coarse = ev.ours(field, map_config(p))
    methods = {"ours": full, "ours_coarse_only": coarse, "icp": ev.icp_baseline, "centroid": ev.centroid_baseline}
    pairs = eval_pairs(p, train, heldout)
    result = ev.evaluate(methods, pairs, size, log)
    summary = result["methods"]
    best_baseline = max(summary[b]["pcp@0.25"] for b in ("icp", "centroid"))
    metrics = {"methods": summary, "pairs": result["pairs"], "typical_object_size": round(size, 4),
               "pcp@0.25_over_best_baseline": round(summary["ours"]["pcp@0.25"] - best_baseline, 4)}
    torch.manual_seed(p.seed + 1)
    untrained = ContextDescriptorField(field.config).eval()
    u_full, u_coarse = ev.ours(untrained, map_config(p))
    rigid = ev.evaluate({"untrained": u_full, "untrained_coarse_only": u_coarse}, pairs, size, log, cycle=False)
    metrics["untrained"] = {"methods": rigid["methods"],
                            "trained_vs_untrained": comparison({**result["rows"], **rigid["rows"]})}
    if p.hard_pairs:
        hard = ev.evaluate({**methods, "untrained": u_full, "untrained_coarse_only": u_coarse},
                           eval_pairs(p, train, heldout, hard=True), size, log, cycle=False)  # forward maps: time
        metrics["hard"] = {"methods": hard["methods"], "pairs": hard["pairs"], "shift": p.hard_shift,
                           "yaw_deg": p.hard_yaw_deg, "pcp@0.25_over_untrained": round(
                               hard["methods"]["ours"]["pcp@0.25"] - hard["methods"]["untrained"]["pcp@0.25"], 4),
                           "trained_vs_untrained": comparison(hard["rows"])}
    return metrics


def comparison(rows: dict[str, list[dict]]) -> dict:
    """``paired`` trained - untrained, for the full map and the coarse-only ablation, PCP@0.25 and @0.5."""
    return {part: {key: paired(rows[ours], rows[base], key) for key in ("pcp@0.25", "pcp@0.5")}
            for part, ours, base in (("full", "ours", "untrained"),
                                     ("coarse_only", "ours_coarse_only", "untrained_coarse_only"))}


def paired(rows: list[dict], base: list[dict], key: str, level: float = 0.95) -> dict:
    """The per-pair difference ``rows`` - ``base`` in ``key`` over the same pairs: its mean, the
    ``level`` Student-t interval of the mean, and how many pairs it is above / below zero (by more
    than 0.005)."""
    from scipy import stats

    d = np.array([r[key] - b[key] for r, b in zip(rows, base)])
    mean = float(d.mean())
    half = float(stats.t.ppf((1 + level) / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None
    return {"mean": round(mean, 4), "ci95": None if half is None else [round(mean - half, 4), round(mean + half, 4)],
            "pairs": len(d), "wins": int((d > 0.005).sum()), "losses": int((d < -0.005).sum())}


def pick_transfers(p: AnalogyParams, heldout: list[Scene], spec_of) -> list[tuple[int, int, tuple[int, int]]]:
    """``transfer_samples`` (source, target, (support, item)) among the held-out scenes. First the
    sources with an object resting on another whose target, the next held-out scene holding an
    object of the support's class, gives the map somewhere to put the pair; then, to fill up (the
    stage always renders some), the other sources' `interacting_pair` into the next scene.
    ``spec_of(i)``: the layout of held-out scene i."""
    classes = [{s.object_label(k) for k in s.object_ids()} for s in heldout]
    good, fill = [], []
    for i, scene in enumerate(heldout):
        if len(good) == p.transfer_samples:
            break
        spec = spec_of(i)
        support, item = tr.interacting_pair(scene, spec)
        later = [(i + d) % len(heldout) for d in range(1, len(heldout))] or [i]
        j = next((j for j in later if scene.object_label(support) in classes[j]), None)
        if tr.resting_support(scene, spec, item) >= 0 and j is not None:
            good.append((i, j, (support, item)))
        else:
            fill.append((i, later[0], (support, item)))
    return (good + fill)[:p.transfer_samples]


def held_out_spec(p: AnalogyParams, i: int):
    """The layout (meshes, poses) of held-out scene ``i``, rebuilt by the generator."""
    index = p.num_scenes - p.heldout_scenes + i
    return generate_spec(index, p.seed, (p.min_objects, p.max_objects))[0]


def transfer_samples(p: AnalogyParams, sample: MakeSampleParams, field: ContextDescriptorField,
                     heldout: list[Scene], out: Path, log=print) -> dict:
    """Arrangement transfers between held-out scenes, rendered into ``out/transfer`` (make_sample's
    format, with transfer.json) and drawn in ``out/transfer.png``; returns their summary."""
    t0 = time.perf_counter()
    first = p.num_scenes - p.heldout_scenes  # generator index of heldout[0]
    specs: dict = {}  # rebuilding a layout costs its composition: once each

    def spec_of(i: int):
        return specs[i] if i in specs else specs.setdefault(i, held_out_spec(p, i))

    transfers = []
    for i, j, pair in pick_transfers(p, heldout, spec_of):
        transfers.append(tr.transfer(field, map_config(p), (scene_name(first + i), heldout[i], spec_of(i)),
                                     (scene_name(first + j), heldout[j], spec_of(j)), pair,
                                     p.seed + len(transfers), sample.width / sample.height))
    _, views = tr.write_samples(sample, transfers, out / TRANSFER, p.seed)
    atomic.write_bytes(out / TRANSFER_PNG, tr.draw(sample, transfers, views, p.seed))
    rows = [t.summary() for t in transfers]
    kept = [r["relation_kept"] for r in rows if r["relation_kept"] is not None]
    log(f"rendered {len(rows)} arrangement transfers in {time.perf_counter() - t0:.0f} s")
    return {"samples": len(rows), "relation_kept": round(float(np.mean(kept)), 4) if kept else None,
            "seconds": round(time.perf_counter() - t0, 1)}


def report(metrics: dict) -> str:
    """report.md: the score tables and the transfer picture."""
    def table(methods: dict) -> list[str]:
        rows = ["| method | PCP@0.25 | PCP@0.5 | bi-PCP@0.25 | chamfer@0.25 |", "|---|---|---|---|---|"]
        def cell(m: dict, key: str) -> str:
            return f"{m[key]:.3f}" if key in m else "-"

        return rows + [f"| {n} | " + " | ".join(cell(m, k) for k in ("pcp@0.25", "pcp@0.5", "bipcp@0.25", "chamfer@0.25"))
                       + " |" for n, m in methods.items()]

    def versus(cmp: dict, which: str) -> list[str]:
        rows = ["", f"Trained minus untrained field on the same {which} (mean per-pair difference, 95% paired "
                    "t interval, pairs better / worse):", "", "| map | PCP@0.25 | PCP@0.5 |", "|---|---|---|"]
        return rows + [f"| {part} | " + " | ".join(
            f"{c['mean']:+.3f} " + (f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]" if c["ci95"] else "(one pair)")
            + f", {c['wins']}/{c['losses']}" for c in (m["pcp@0.25"], m["pcp@0.5"])) + " |" for part, m in cmp.items()]

    lines = [f"# analogy: {metrics['pairs']} held-out pairs (rigid: turned, resampled, distractors)", ""]
    u = metrics.get("untrained", {})
    lines += table({**metrics["methods"], **u.get("methods", {})})
    if u:
        lines[0] += "; the untrained field (a random-weight field of the same shape): forward maps only"
        lines += versus(u["trained_vs_untrained"], "rigid pairs")
    if "hard" in metrics:
        h = metrics["hard"]
        lines += ["", f"## {h['pairs']} hard pairs: other instances, each object shifted (std {h['shift']}) and "
                      f"turned (std {h['yaw_deg']} deg); an untrained field of the same shape for comparison; "
                      "forward maps only (no bi-PCP)", ""]
        lines += table(h["methods"])
        if "trained_vs_untrained" in h:
            lines += versus(h["trained_vs_untrained"], "hard pairs")
    t = metrics.get("transfer", {})
    if t.get("samples"):
        kept = "no source pair rested one on the other" if t["relation_kept"] is None else \
            f"the item rests on the support's place in {t['relation_kept']:.2f} of those resting on one"
        lines += ["", f"## arrangement transfer: {t['samples']} samples in transfer/ (make_sample format); {kept}", "",
                  f"![transfers]({TRANSFER_PNG})"]
    return "\n".join(lines) + "\n"
