"""After training: the final model, ``metrics.json`` for DVC, loss curves (CSV + PNG), samples.

Everything is read from the newest committed checkpoint (its history covers restarts: rows of a
failed attempt after its last checkpoint are gone with it), so a driver that died after training
can rebuild these outputs from storage alone.
"""
from __future__ import annotations

import csv
import io
import shutil
import statistics
from pathlib import Path


from tasks import atomic
from tasks.train import checkpoint as ckpt


def export_final(init_dir: Path, checkpoint_dir: Path, dest: Path, use_ema: bool = True) -> dict:
    """``PICSModel.from_pretrained(init)`` + the checkpoint's trained weights (EMA ones when
    present and ``use_ema``) -> ``dest`` in ``save_pretrained`` format, written atomically."""
    from pics_model.modeling_pics import PICSModel

    state = ckpt.load_checkpoint(checkpoint_dir)
    model = PICSModel.from_pretrained(init_dir)
    weights = dict(state.weights)
    used = "raw"
    if use_ema and state.ema is not None:
        weights.update(state.ema)
        used = "ema"
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise ckpt.CheckpointError(f"{checkpoint_dir}: weights unknown to the model: {unexpected[:5]}")
    with atomic.atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
    return {"weights": used, "step": state.step, "checkpoint": str(checkpoint_dir)}


def export_init(init_dir: Path, dest: Path) -> Path:
    """Copy the run's starting model to ``dest`` (a declared train output): the untrained baseline
    that evaluate compares against, reproducible from DVC's cache on another machine."""
    with atomic.atomic_dir(dest) as tmp:
        shutil.copytree(init_dir, tmp, dirs_exist_ok=True)
    return dest


def _csv(rows: list[dict], columns: list[str]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue().encode()


def _plot(history: dict, path: Path) -> None:
    from tasks.plots import pyplot, save_png

    steps = [s for s, _ in history["loss"]]
    losses = [l for _, l in history["loss"]]
    fig, ax = pyplot().subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="train loss (per step)")
    k = max(1, len(losses) // 30)
    if len(losses) >= k:
        smooth = [sum(losses[i - k + 1:i + 1]) / k for i in range(k - 1, len(losses))]
        ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"train loss (mean of {k})")
    for weights, marker in (("raw", "o"), ("ema", "s")):
        pts = [(h["step"], h["loss"]) for h in history["heldout"] if h.get("weights") == weights]
        if pts:
            ax.plot(*zip(*pts), marker=marker, ls="--", label=f"held-out loss ({weights} weights)")
    for e in history["events"]:
        if e.get("event") == "resumed":
            ax.axvline(e["step"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    save_png(fig, path)


def occlusion_rows(history: dict) -> list[dict]:
    """The held-out occlusion-order curve: one row per evaluation (step, weights), pooled accuracy
    with its bootstrap interval, coverage, ties, and the accuracy per token-grid level."""
    rows = []
    for h in history.get("occlusion", []):
        ci = h.get("occlusion_accuracy_ci95") or [None, None]
        row = {"step": h["step"], "weights": h["weights"], "accuracy": h.get("occlusion_accuracy"),
               "ci95_low": ci[0], "ci95_high": ci[1], "coverage": h.get("occlusion_coverage"),
               "ties": h.get("occlusion_ties"), "samples": h.get("occlusion_samples")}
        row.update({f"accuracy_{k}": v for k, v in (h.get("occlusion_accuracy_by_level") or {}).items()})
        rows.append(row)
    return rows


def occlusion_metrics(history: dict, step: int, weights: str) -> dict:
    """metrics.json entries: the held-out occlusion accuracy at the start and of the final weights."""
    def at(s, w):
        v = [h for h in history.get("occlusion", []) if h["step"] == s and h["weights"] == w]
        return v[-1] if v else {}

    first, last = at(0, "raw"), at(step, weights)
    if not last:
        return {}
    return {"occlusion_accuracy_initial": first.get("occlusion_accuracy"),
            "occlusion_accuracy_final": last.get("occlusion_accuracy"),
            "occlusion_accuracy_final_ci95": last.get("occlusion_accuracy_ci95"),
            "occlusion_accuracy_final_by_level": last.get("occlusion_accuracy_by_level"),
            "occlusion_coverage": last.get("occlusion_coverage"),
            "occlusion_ties_final": last.get("occlusion_ties"),
            "occlusion_samples": last.get("occlusion_samples")}


def write_outputs(out: Path, run_dir: Path, checkpoint_dir: Path, init_info: dict, extra: dict) -> dict:
    """Write ``metrics.json``, ``loss.csv``, ``heldout.csv``, ``occlusion.csv``, ``train_log.csv``,
    ``loss.png`` and copy sample composites into ``out``; returns the metrics."""
    state = ckpt.load_checkpoint(checkpoint_dir)
    h = state.trainer["history"]
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out / "loss.csv", _csv([{"step": s, "loss": l} for s, l in h["loss"]], ["step", "loss"]))
    atomic.write_bytes(out / "heldout.csv", _csv(h["heldout"], ["step", "loss", "weights"]))
    occ = occlusion_rows(h)
    occ_cols = ["step", "weights", "accuracy", "ci95_low", "ci95_high", "coverage", "ties", "samples"]
    occ_cols += sorted({k for r in occ for k in r} - set(occ_cols), key=lambda k: (len(k), k), reverse=True)
    atomic.write_bytes(out / "occlusion.csv", _csv(occ, occ_cols))
    cols = ["step", "loss", "lr", "grad_norm", "samples_per_s", "data_wait_frac", "mfu", "mem_mb",
            "cache_vae_hit_rate", "cache_objects_hit_rate"]
    atomic.write_bytes(out / "train_log.csv", _csv(h["train"], cols))
    _plot(h, out / "loss.png")

    samples_src, samples_dst = run_dir / "samples", out / "samples"
    if samples_src.is_dir():
        with atomic.atomic_dir(samples_dst) as tmp:
            for p in sorted(samples_src.glob("*.png")):
                shutil.copy2(p, tmp / p.name)

    def heldout(step, weights):
        v = [x["loss"] for x in h["heldout"] if x["step"] == step and x["weights"] == weights]
        return v[-1] if v else None

    rows = h["train"]
    tail = [l for _, l in h["loss"][-max(1, len(h["loss"]) // 10):]]
    # steady-state throughput: skip the first logged window (warm-up, allocator, first batches)
    steady = rows[1:] if len(rows) > 1 else rows
    initial, final_raw = heldout(0, "raw"), heldout(state.step, "raw")
    final_ema = heldout(state.step, "ema")
    ae = init_info.get("autoencoder")
    metrics = {
        "steps": state.step,
        "heldout_loss_initial": initial,
        "heldout_loss_final": final_raw,
        "heldout_loss_final_ema": final_ema,
        "heldout_loss_ratio": (final_raw / initial) if initial and final_raw is not None else None,
        "train_loss_last10pct": sum(tail) / len(tail) if tail else None,
        "samples_per_s": statistics.median(r["samples_per_s"] for r in steady) if steady else None,
        "mfu": statistics.median(r["mfu"] for r in steady) if steady and "mfu" in steady[0] else None,
        "peak_mem_mb": max((r["mem_mb"] for r in rows), default=None),
        "data_wait_frac": statistics.median(r["data_wait_frac"] for r in steady) if steady else None,
        "feature_cache_vae_hit_rate": rows[-1].get("cache_vae_hit_rate") if rows else None,
        "restarts": sum(1 for e in h["events"] if e.get("event") == "resumed"),
        "quarantined_samples": len(h.get("quarantine", [])),
        "autoencoder_psnr_before": ae.get("psnr_before") if isinstance(ae, dict) else None,
        "autoencoder_psnr_after": ae.get("psnr_after") if isinstance(ae, dict) else None,
        "autoencoder_psnr_heldout": ae.get("psnr_after") if isinstance(ae, dict) else None,
        "autoencoder_posterior_std": ae.get("posterior_std") if isinstance(ae, dict) else None,
        "ranks_identical": len(set(h.get("rank_digests") or [])) == 1 if h.get("rank_digests") else None,
        # the exported model's weights: EMA when the run kept them
        **occlusion_metrics(h, state.step, "ema" if final_ema is not None else "raw"),
        **extra,
    }
    atomic.write_json(out / "metrics.json", metrics)
    if h.get("quarantine"):
        from tasks import quarantine

        quarantine.write(out / "quarantine.parquet", [quarantine.QuarantineRecord(**r) for r in h["quarantine"]])
    return metrics


def load_history(checkpoint_dir: Path) -> dict:
    return ckpt.load_checkpoint(checkpoint_dir).trainer["history"]
