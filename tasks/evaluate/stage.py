"""The evaluate stage as plain functions: plan, Ray Data inference, outputs. flows/evaluate.py wraps
them in Prefect tasks; tests and the benchmark call them directly.

Outputs under ``evaluate.out``::

    metrics.json            DVC metrics: per-method means, FID proxy, occlusion accuracy, counts
    summary.json            the same with the per-step occlusion curves
    scores.parquet          one row per (sample, method), ground truth included (no images)
    composites/part-*.parquet  (sample_id, method, png) for every composite
    plots/occlusion.csv     DVC plot: occlusion-order accuracy per denoising step and method
    plots/methods.csv       DVC plot: masked metrics per method
    quarantine.parquet      samples that failed, with the reason
    report/index.html, report/grid.png, report/occlusion.png
"""
from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks import atomic, quarantine
from tasks.evaluate import summary as summ
from tasks.evaluate.inference import GROUND_TRUTH, EvalConfig, find_untrained
from tasks.params import EvaluateParams, Params, resolve_path


READ_CPUS = 0.1


class EvaluateInputError(ValueError):
    """A missing or unusable input; the message names the file and the params key."""


@dataclass
class Plan:
    params: EvaluateParams
    out: Path
    samples: Path
    shards: list[Path]
    n_test: int
    cfg: EvalConfig
    num_actors: int
    use_gpu: bool
    actor_cpus: float = 1.0
    notes: list[str] = field(default_factory=list)


def make_plan(params: Params) -> Plan:
    from tasks.shards import count_samples, list_shards

    p: EvaluateParams = params.evaluate
    notes: list[str] = []
    samples = resolve_path(p.samples)
    shards = list_shards(samples) if samples.is_dir() else []
    if not shards:
        raise EvaluateInputError(f"{samples} (evaluate.samples): no decompose shards found; run `pics decompose`")
    n_test = count_samples(samples, "test")
    if n_test == 0:
        raise EvaluateInputError(f"{samples} (evaluate.samples): the shards hold no test-split samples")
    needs_model = {"pics", "sequential"} & set(p.methods)
    ckpt = resolve_path(p.checkpoint)
    if needs_model and not (ckpt / "config.json").is_file():
        raise EvaluateInputError(f"{ckpt} (evaluate.checkpoint): not a saved PICSModel (no config.json); "
                                 "run `pics train` or point evaluate.checkpoint at one")
    if needs_model:
        _check_weights(ckpt, "evaluate.checkpoint")
    untrained = None
    if "untrained" in p.methods:
        if p.untrained == "auto":
            untrained = find_untrained(ckpt)
            if untrained is None:
                notes.append(f"untrained baseline skipped: no saved model at {ckpt.parent / 'init'}")
        elif p.untrained:
            untrained = resolve_path(p.untrained)
            if not (untrained / "config.json").is_file():
                raise EvaluateInputError(f"{untrained} (evaluate.untrained): not a saved PICSModel")
        else:
            notes.append("untrained baseline skipped: evaluate.untrained is null")
        if untrained is not None:
            _check_weights(untrained, "evaluate.untrained")
    priors = resolve_path(p.priors) if p.priors else None
    if priors is not None:
        folder = priors / "shards" if (priors / "shards").is_dir() else priors  # render_priors output or shards
        if folder.is_dir() and any(folder.glob("*.parquet")):
            priors = folder
        else:
            notes.append(f"no prior shards in {priors} (evaluate.priors): objects are encoded without multi-view priors")
            priors = None
    backbones = {k: str(resolve_path(v)) for k, v in
                 {"clip": p.clip_path, "dinov2": p.dinov2_path, "dreamsim": p.dreamsim_path}.items() if v}
    if not backbones:
        notes.append("no CLIP / DINOv2 / DreamSim weights given: object similarity is the MobileNetV2 proxy only")
    import torch

    use_gpu = p.device != "cpu" and torch.cuda.is_available()
    if use_gpu:
        num_actors = min(p.num_actors, torch.cuda.device_count())
    else:
        num_actors = min(p.num_actors, params.ray.num_cpus or os.cpu_count() or 1)
    cpus = params.ray.num_cpus or os.cpu_count() or 1
    threads = 1 if use_gpu else max(1, cpus // num_actors)
    # Ray Data's ListFiles step always asks for a whole CPU and the actor pool starts first: the
    # actors' (logical) reservation leaves one CPU free or they starve the read. Their real CPU
    # use is set by `threads`, not by this number.
    actor_cpus = (cpus - 1) / num_actors if cpus > 1 else 0.0
    cfg = EvalConfig(checkpoint=str(ckpt), params=p, untrained=str(untrained) if untrained else None,
                     priors=str(priors) if priors else None, device="cuda" if use_gpu else "cpu",
                     backbones=backbones, threads=threads)
    return Plan(params=p, out=resolve_path(p.out), samples=samples, shards=shards, n_test=n_test,
                cfg=cfg, num_actors=num_actors, use_gpu=use_gpu, actor_cpus=round(actor_cpus, 3), notes=notes)


def run_ray(plan: Plan, log=None) -> tuple[pa.Table, dict]:
    """Ray Data batch inference over the test split; composites are written as results stream in.

    Returns (result rows without PNGs, timing). Output order is made deterministic afterwards.
    """
    import ray

    from tasks.evaluate.inference import Evaluator

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # max_samples takes the same first N every run
    ctx.enable_progress_bars = False  # _consume logs progress per result batch instead
    # Reading is light: a sliver of a CPU each, so that the actors never starve it.
    ds = ray.data.read_parquet([str(s) for s in plan.shards], num_cpus=READ_CPUS).filter(
        expr="split == 'test'", num_cpus=READ_CPUS)
    if plan.params.max_samples:
        ds = ds.limit(plan.params.max_samples)
    # shards hold hundreds of rows in one block; small blocks let every actor get work
    ds = ds.repartition(target_num_rows_per_block=plan.params.batch_size)
    res = {"num_gpus": 1, "num_cpus": READ_CPUS} if plan.use_gpu else {"num_cpus": plan.actor_cpus}
    ds = ds.map_batches(Evaluator, fn_constructor_args=(plan.cfg,), batch_size=plan.params.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=plan.num_actors), batch_format="pyarrow", **res)
    return _consume(plan, ds.iter_batches(batch_format="pyarrow", batch_size=None), log)


def run_local(plan: Plan, log=None) -> tuple[pa.Table, dict]:
    """The same work in this process, one Evaluator, no Ray (tests, the benchmark's baseline)."""
    from tasks.evaluate.inference import Evaluator
    from tasks.shards import iter_rows

    def batches():
        ev = Evaluator(plan.cfg)
        limit, size, rows = plan.params.max_samples, plan.params.batch_size, []
        for i, row in enumerate(iter_rows(plan.samples, split="test")):
            if limit and i >= limit:
                break
            rows.append(row)
            if len(rows) == size:
                yield ev(pa.Table.from_pylist(rows))
                rows = []
        if rows:
            yield ev(pa.Table.from_pylist(rows))

    return _consume(plan, batches(), log)


def _consume(plan: Plan, batches, log=None) -> tuple[pa.Table, dict]:
    t0 = time.perf_counter()
    parts, done = [], set()
    total = min(plan.n_test, plan.params.max_samples or plan.n_test)
    with atomic.atomic_dir(plan.out / "composites") as tmp:
        for i, b in enumerate(batches):
            if b.num_rows == 0:
                continue
            pngs = b.select(["sample_id", "method", "png"]).filter(pa.compute.invert(pa.compute.is_null(b["png"])))
            pq.write_table(pngs, tmp / f"part-{i:05d}.parquet", compression="none")
            parts.append(b.drop_columns(["png"]))
            done.update(b["sample_id"].to_pylist())
            if log is not None:
                log(f"evaluated {len(done)}/{total} samples ({time.perf_counter() - t0:.1f} s)")
    wall = time.perf_counter() - t0
    table = pa.concat_tables(parts) if parts else None
    if table is not None:
        table = table.sort_by([("sample_id", "ascending"), ("method", "ascending")])
    n = 0 if table is None else len(set(table["sample_id"].to_pylist()))
    return table, {"wall_s": round(wall, 3), "samples": n, "samples_per_s": round(n / wall, 4) if wall else None}


def read_composites(out: Path, sample_ids: set[str]) -> dict[tuple[str, str], bytes]:
    found = {}
    for part in sorted((out / "composites").glob("part-*.parquet")):
        for r in pq.read_table(part).to_pylist():
            if r["sample_id"] in sample_ids:
                found[(r["sample_id"], r["method"])] = r["png"]
    return found


def _check_weights(folder: Path, key: str) -> None:
    """A model folder whose files differ from their recorded hashes fails the plan in one line,
    not later in every inference actor."""
    from pics_model.modeling_pics import WeightsError, verify_saved

    try:
        verify_saved(folder)
    except WeightsError as e:
        raise EvaluateInputError(f"{e} ({key})") from None


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    atomic.write_bytes(path, buf.getvalue().encode())


def write_outputs(plan: Plan, table: pa.Table, timing: dict) -> dict:
    """scores, quarantine, metrics/summary JSON, DVC plot data, the report. Returns the summary."""
    from tasks.evaluate import report
    from tasks.shards import iter_samples

    out = plan.out
    if table is None:
        raise EvaluateInputError(f"{plan.samples}: no test sample was evaluated")
    atomic.write_parquet(out / "scores.parquet", table)
    bad = table.filter(pa.compute.invert(pa.compute.is_null(table["error"]))).to_pylist()
    records = [quarantine.QuarantineRecord(stage="evaluate", reason="evaluate_failed", detail=r["error"],
                                           source=str(plan.samples), item_key=r["sample_id"]) for r in bad]
    quarantine.write(out / "quarantine.parquet", records)
    summary = summ.summarize(table)
    if plan.cfg.priors and summary["n_with_priors"] < summary["n_samples"]:
        plan.notes.append(f"{summary['n_samples'] - summary['n_with_priors']} of {summary['n_samples']} samples had "
                          f"objects without prior views in {plan.cfg.priors}: encoded without priors")
    summary.update(timing=timing, notes=plan.notes, params=plan.params.model_dump())
    atomic.write_json(out / "summary.json", summary)
    atomic.write_json(out / "metrics.json", summ.dvc_metrics(summary))
    _write_csv(out / "plots" / "occlusion.csv", summ.occlusion_plot_rows(summary))
    _write_csv(out / "plots" / "methods.csv", summ.method_plot_rows(summary))

    # the report: the samples with the most truly occluded pixels (ties: by id)
    ok = table.filter(pa.compute.is_null(table["error"])).select(
        ["sample_id", "method", "occ_pixels", "alpha_diff", "alpha_grid", "visibility"]).to_pylist()
    occ = {}
    for r in ok:
        if r["method"] != GROUND_TRUTH:
            occ[r["sample_id"]] = max(occ.get(r["sample_id"], 0.0), sum(r["occ_pixels"] or []))
        else:
            occ.setdefault(r["sample_id"], 0.0)
    chosen = sorted(occ, key=lambda k: (-occ[k], k))[: plan.params.grid_samples]
    rdir = out / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    grid_name = None
    if chosen:
        from pics_model.data import expand_boxes

        pngs = read_composites(out, set(chosen))
        rows = [{**r, "png": pngs.get((r["sample_id"], r["method"]))} for r in ok if r["sample_id"] in chosen]
        box_expand = _box_expand(plan)
        decoded = {}
        for s in iter_samples(plan.samples, split="test"):
            if s["sample_id"] in chosen:
                h, w = s["image"].shape[:2]
                s["expanded"] = expand_boxes(s["boxes_tight"], box_expand, w, h)
                decoded[s["sample_id"]] = s
        decoded = {k: decoded[k] for k in chosen if k in decoded}
        report.write_grid(pa.Table.from_pylist(rows), decoded, rdir / "grid.png", plan.params.steps)
        grid_name = "grid.png"
    occ_png = report.write_occlusion_plot(summary, rdir / "occlusion.png")
    report.write_html(summary, summary["params"], rdir / "index.html", grid_name, "occlusion.png" if occ_png else None,
                      plan.notes)
    return summary


def _box_expand(plan: Plan) -> float:
    from pics_model.config import PICSConfig

    for path in (plan.cfg.checkpoint, plan.cfg.untrained):
        if path and (Path(path) / "config.json").is_file():
            return PICSConfig.load(Path(path) / "config.json").box_expand
    return PICSConfig().box_expand


__all__ = ["Plan", "make_plan", "run_ray", "run_local", "write_outputs", "EvaluateInputError"]
