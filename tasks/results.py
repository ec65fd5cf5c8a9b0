"""The README's results section, generated from a run's metrics files, never typed.

``pics results`` copies the run's metrics (``data/evaluate/metrics.json``, ``data/train/metrics.json``
and the held-out occlusion curve ``data/train/occlusion.csv``) into ``docs/results/`` (the snapshot
that git keeps), draws the figures there and rewrites the README between the ``markers()`` comments
from that snapshot alone. ``pics results --check`` (and tests/test_results.py) fail when the README
block differs from what the snapshot generates, so the numbers cannot go stale. ``--block NAME``
writes another block (``<!-- NAME:begin -->``) from its own snapshot: the longer profile's
``results-long`` from ``docs/results/long``.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

from tasks import atomic

BLOCK = "results"  # the README block of the main job's run; others (e.g. "results-long") name their own


def markers(block: str = BLOCK) -> tuple[str, str]:
    """The README comments that enclose the generated ``block``."""
    return f"<!-- {block}:begin -->", f"<!-- {block}:end -->"


EVALUATE, TRAIN, CURVE = "evaluate_metrics.json", "train_metrics.json", "train_occlusion.csv"
METHODS_PNG, CURVE_PNG = "methods.png", "occlusion_training.png"
LABELS = {"pics": "PICS", "sequential": "sequential (painter)", "untrained": "untrained", "copy_paste": "copy-paste"}


class ResultsError(ValueError):
    """A missing or unreadable metrics file, or a README without the markers; names the file."""


def _load_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ResultsError(f"{path}: not valid JSON ({e})") from e


def _curve(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return list(csv.DictReader(io.StringIO(path.read_text())))


def snapshot(evaluate: Path, train: Path, curve: Path | None, dest: Path) -> None:
    """Copy the run's metrics files into ``dest`` (the evaluate metrics are required)."""
    if not evaluate.is_file():
        raise ResultsError(f"{evaluate}: no evaluate metrics; run `pics evaluate` first")
    _load_json(evaluate)
    dest.mkdir(parents=True, exist_ok=True)
    for src, name in ((evaluate, EVALUATE), (train, TRAIN), (curve, CURVE)):
        if src is not None and src.is_file():
            shutil.copyfile(src, dest / name)
        elif (dest / name).exists():
            (dest / name).unlink()  # a stale file of an earlier snapshot: this run has none


def _f(v, digits: int = 3, sign: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _ci(ci, digits: int = 3, sign: bool = False) -> str:
    return f"[{_f(ci[0], digits, sign)}, {_f(ci[1], digits, sign)}]" if ci else "-"


def _est(d: dict, digits: int) -> str:
    """A paired difference with its interval, or "-" when it was not computed."""
    if d.get("mean") is None:
        return "-"
    return f"{_f(d['mean'], digits, True)} {_ci(d.get('ci95'), digits, True)}"


def _methods_table(ev: dict) -> list[str]:
    lines = ["| method | mPSNR (dB) | mSSIM | mLPIPS proxy | PSNR (dB) | occlusion accuracy [95 % CI] | "
             "gate coverage | n |", "|---|---|---|---|---|---|---|---|"]
    for m, label in LABELS.items():
        s = ev.get(m)
        if not isinstance(s, dict):
            continue
        occ = (f"{_f(s.get('occlusion_accuracy'))} {_ci(s.get('occlusion_accuracy_ci95'))}"
               if s.get("occlusion_accuracy") is not None else "-")
        lines.append(f"| {label} | {_f(s.get('mpsnr'), 2)} | {_f(s.get('mssim'))} | "
                     f"{_f(s.get('mlpips_mobilenetv2_proxy'))} | {_f(s.get('psnr'), 2)} | {occ} | "
                     f"{_f(s.get('occlusion_coverage'))} | {s.get('n', '-')} |")
    return lines


def _paired_table(ev: dict) -> list[str]:
    paired = ev.get("paired") or {}
    if not paired:
        return []
    lines = ["| paired per sample | mPSNR difference (dB) [95 % CI] | wins | mSSIM difference [95 % CI] | "
             "occlusion accuracy difference [95 % CI] |", "|---|---|---|---|---|"]
    for name, d in paired.items():
        a, b = name.split("_vs_")
        mp, ms, oc = d.get("mpsnr") or {}, d.get("mssim") or {}, d.get("occlusion_accuracy") or {}
        wins = f"{mp['wins']}/{mp['n']}" if "wins" in mp else "-"
        lines.append(f"| {LABELS.get(a, a)} - {LABELS.get(b, b)} | {_est(mp, 2)} | {wins} | {_est(ms, 3)} | "
                     f"{_est(oc, 3)} |")
    return lines


def _levels(ev: dict) -> str:
    parts = []
    for m in ("pics", "untrained"):
        s = ev.get(m) or {}
        acc, cov = s.get("occlusion_accuracy_by_level") or {}, s.get("occlusion_coverage_by_level") or {}
        if acc:
            parts.append(f"{LABELS[m]}: " + ", ".join(f"{k} {_f(v)} (coverage {_f(cov.get(k))})"
                                                      for k, v in acc.items()))
    return "Occlusion accuracy per token-grid level: " + "; ".join(parts) + "." if parts else ""


def _training(tr: dict | None) -> str:
    if not tr:
        return ""
    bits = [f"{tr.get('steps')} steps; held-out diffusion loss {_f(tr.get('heldout_loss_initial'))} -> "
            f"{_f(tr.get('heldout_loss_final'))}"]
    if tr.get("autoencoder_psnr_after") is not None:
        bits.append(f"autoencoder held-out reconstruction {_f(tr.get('autoencoder_psnr_before'), 1)} -> "
                    f"{_f(tr.get('autoencoder_psnr_after'), 1)} dB")
    if tr.get("occlusion_accuracy_final") is not None:
        bits.append(f"held-out occlusion accuracy {_f(tr.get('occlusion_accuracy_initial'))} -> "
                    f"{_f(tr.get('occlusion_accuracy_final'))} {_ci(tr.get('occlusion_accuracy_final_ci95'))} "
                    f"on {tr.get('occlusion_samples')} samples")
    return "Training: " + "; ".join(bits) + "."


def render(results_dir: Path, link_dir: str, block: str = BLOCK) -> str:
    """The README block (markers included) from the snapshot in ``results_dir``; figures are linked
    as ``link_dir/<name>`` when they exist."""
    begin, end = markers(block)
    ev = _load_json(results_dir / EVALUATE)
    lines = [begin, f"<!-- generated by `pics results` from {link_dir}/: do not edit by hand -->"]
    if ev is None:
        lines.append("No results recorded yet: run the pipeline (`make run`), then `pics results`.")
        return "\n".join(lines + [end])
    tr = _load_json(results_dir / TRAIN)
    lines.append(f"Evaluation on {ev.get('n_samples')} test samples ({ev.get('n_failed')} quarantined); "
                 "occlusion accuracy and the intervals are defined in docs/metrics.md.")
    lines += [""] + _methods_table(ev)
    paired = _paired_table(ev)
    if paired:
        lines += [""] + paired
    for text in (_levels(ev), _training(tr)):
        if text:
            lines += ["", text]
    figs = [f"![{alt}]({link_dir}/{name})" for name, alt in ((METHODS_PNG, "methods"),
                                                             (CURVE_PNG, "held-out occlusion accuracy"))
            if (results_dir / name).is_file()]
    if figs:
        lines += [""] + [" ".join(figs)]
    return "\n".join(lines + [end])


def draw_figures(results_dir: Path) -> list[Path]:
    """methods.png (mPSNR and occlusion accuracy per method, with intervals) and, when the curve
    was recorded, occlusion_training.png; stale figures of an earlier snapshot are removed."""
    from tasks.plots import finish_accuracy_axes, pyplot, save_png

    plt = pyplot()
    ev = _load_json(results_dir / EVALUATE) or {}
    out = []
    methods = [m for m in LABELS if isinstance(ev.get(m), dict)]
    if methods:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
        ax1.bar([LABELS[m] for m in methods], [ev[m].get("mpsnr") or 0 for m in methods], color="tab:blue")
        ax1.set_ylabel("mPSNR (dB)")
        occ = [m for m in methods if ev[m].get("occlusion_accuracy") is not None]
        for i, m in enumerate(occ):
            v, ci = ev[m]["occlusion_accuracy"], ev[m].get("occlusion_accuracy_ci95")
            err = [[v - ci[0]], [ci[1] - v]] if ci else None
            ax2.bar(i, v, yerr=err, capsize=4, color="tab:orange")
        ax2.set_xticks(range(len(occ)), [LABELS[m] for m in occ])
        ax2.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("occlusion accuracy (95 % CI)")
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", labelsize=8)
        out.append(save_png(fig, results_dir / METHODS_PNG))
    elif (results_dir / METHODS_PNG).exists():
        (results_dir / METHODS_PNG).unlink()
    rows = [r for r in _curve(results_dir / CURVE) if r.get("accuracy") not in ("", None)]
    if rows:
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        for weights, marker in (("raw", "o"), ("ema", "s")):
            pts = [r for r in rows if r["weights"] == weights]
            if pts:
                x = [int(r["step"]) for r in pts]
                y = [float(r["accuracy"]) for r in pts]
                lo = [float(r["ci95_low"] or r["accuracy"]) for r in pts]
                hi = [float(r["ci95_high"] or r["accuracy"]) for r in pts]
                ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]],
                            marker=marker, capsize=3, label=f"{weights} weights")
        finish_accuracy_axes(ax, "training step", "held-out occlusion accuracy", "chance / neutral gate")
        out.append(save_png(fig, results_dir / CURVE_PNG))
    elif (results_dir / CURVE_PNG).exists():
        (results_dir / CURVE_PNG).unlink()
    return out


def replace_block(readme_text: str, text: str, readme: Path, block: str = BLOCK) -> str:
    begin, end = markers(block)
    if (readme_text.count(begin) != 1 or readme_text.count(end) != 1
            or readme_text.index(begin) > readme_text.index(end)):
        raise ResultsError(f"{readme}: needs exactly one {begin} ... {end} pair")
    head, rest = readme_text.split(begin)
    _, tail = rest.split(end)
    return head + text + tail


def current_block(readme: Path, block: str = BLOCK) -> str:
    text = readme.read_text()
    replace_block(text, "", readme, block)  # the markers' check
    begin, end = markers(block)
    return begin + text.split(begin)[1].split(end)[0] + end


def write_readme(readme: Path, results_dir: Path, block: str = BLOCK) -> bool:
    """Rewrite the README's ``block`` from the snapshot; True when it changed."""
    text = readme.read_text()
    link = results_dir.resolve().relative_to(readme.parent.resolve()).as_posix()
    new = replace_block(text, render(results_dir, link, block), readme, block)
    if new != text:
        atomic.write_bytes(readme, new.encode())
    return new != text


def check_readme(readme: Path, results_dir: Path, block: str = BLOCK) -> str | None:
    """None when the README's ``block`` is what the snapshot generates, else a message saying so."""
    link = results_dir.resolve().relative_to(readme.parent.resolve()).as_posix()
    if current_block(readme, block) == render(results_dir, link, block):
        return None
    return f"{readme}: the {block} section is not what {results_dir} generates; run `pics results`"
