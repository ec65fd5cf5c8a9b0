"""Image-space collage (pics_model.layout): 100 real silhouettes into a target shape.

    python benchmarks/layout.py [--elements 100] [--size 256] [--target star] [--threads 1]

Elements: the first ``--elements`` polygon instances of ../shared/data/lvis/lvis_val_100.json
(real LVIS silhouettes, rasterised from their polygons; no image needed). One run prints:

1. quality and time of three packers on the same elements and target:
   * hierarchical: the differentiable method with the params.yaml schedule (64 -> 128 -> 256 px);
   * single-resolution: the same method, every iteration at the finest level, same total iterations;
   * greedy: the object-space baseline (largest first, tightest free position, shrink when stuck);
   targets: overlap <= 0.1 %, exceed ~ 0, coverage >= 0.6, hierarchical >= 1.5x faster than
   single-resolution at equal or better coverage;
2. the cost of one iteration (render + losses + backward + Adam step) at several resolutions, for
   simple elements (squares) and complex ones (the LVIS outlines) of the same sizes: it grows with
   the resolution, not with the outlines.

Times are wall seconds and this process's CPU seconds (torch limited to ``--threads``). This is a
shared 2-core machine: the load average is printed; other processes inflate the wall times.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import Clock  # noqa: E402  (the repository is on the path now)
SHARED = Path(os.environ.get("PICS_SHARED_DATA", REPO.parent / "shared" / "data"))


def lvis_silhouettes(n: int, min_area: float = 400.0) -> list:
    """The first ``n`` polygon instances (area >= min_area) as bool masks cropped to their box."""
    import numpy as np
    from pycocotools import mask as mask_utils

    data = json.loads((SHARED / "lvis" / "lvis_val_100.json").read_text())
    images = {im["id"]: im for im in data["images"]}
    out = []
    for ann in data["annotations"]:
        if ann["area"] < min_area or not isinstance(ann["segmentation"], list):
            continue
        im = images[ann["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], im["height"], im["width"]))
        m = mask_utils.decode(rle).astype(bool)
        ys, xs = np.nonzero(m)
        out.append(m[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
        if len(out) == n:
            break
    return out


def run_packer(name, fn):
    from pics_model.layout.metrics import evaluate

    with Clock() as clk:
        placement, info = fn()
    _, m = evaluate(ELEMENTS, placement, TARGET)
    print(f"{name:18s} coverage {m['coverage']:.3f}  overlap {100 * m['overlap']:.3f} %  exceed "
          f"{100 * m['exceed']:.3f} %  wall {clk.wall:6.1f} s  cpu {clk.cpu:6.1f} s", flush=True)
    return m, clk


def per_iteration(elements, target, resolution: int, iters: int, cfg, start) -> tuple[float, float]:
    """(wall, cpu) milliseconds per iteration of one level at ``resolution``, from placement
    ``start`` (the same for both element sets: same sizes, same windows, only the outlines differ)."""
    from dataclasses import replace

    from pics_model.layout import pack

    c = replace(cfg, resolutions=[resolution], iterations=[iters], reseed_share=1.0, separate_rounds=0)
    pack(elements, target, replace(c, iterations=[2]), init=start)  # warm-up (first-call allocations)
    with Clock() as clk:
        pack(elements, target, c, init=start)
    return 1000 * clk.wall / iters, 1000 * clk.cpu / iters


def main() -> None:
    global ELEMENTS, TARGET
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=100)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--target", default="star")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=10, help="iterations timed per resolution in part 2")
    args = ap.parse_args()

    import numpy as np
    import torch

    from pics_model.layout import greedy_pack, make_elements, pack
    from tasks.layout.targets import make_target
    from tasks.params import load_params

    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()}, {os.cpu_count()} cores, torch threads {args.threads}")
    masks = lvis_silhouettes(args.elements)
    ELEMENTS, TARGET = make_elements(masks), make_target(args.target, args.size)
    cfg = load_params(REPO / "params.yaml").layout.config()
    total = sum(cfg.iterations)
    print(f"{len(ELEMENTS)} LVIS silhouettes into a {args.size}px {args.target} ({int(TARGET.sum())} px); "
          f"schedule {cfg.resolutions} x {cfg.iterations}\n")

    print("1. packers")
    from dataclasses import replace

    # not timed: the first Adam imports torch._dynamo (seconds of CPU), which would be charged to
    # whichever packer runs first
    pack(ELEMENTS[:2], TARGET, replace(cfg, iterations=[1] * len(cfg.iterations)))

    hier, t_h = run_packer("hierarchical", lambda: pack(ELEMENTS, TARGET, cfg))
    single, t_s = run_packer(f"single {cfg.resolutions[-1]}px", lambda: pack(
        ELEMENTS, TARGET, replace(cfg, resolutions=cfg.resolutions[-1:], iterations=[total])))
    greedy, t_g = run_packer("greedy", lambda: greedy_pack(ELEMENTS, TARGET))
    print(f"hierarchical vs single-resolution: {t_s.cpu / t_h.cpu:.2f}x faster (cpu), {t_s.wall / t_h.wall:.2f}x "
          f"(wall); coverage {hier['coverage']:.3f} vs {single['coverage']:.3f}")
    checks = {"overlap <= 0.1 %": hier["overlap"] <= 0.001, "exceed ~ 0 (< 0.1 %)": hier["exceed"] < 0.001,
              "coverage >= 0.6": hier["coverage"] >= 0.6, "speed-up >= 1.5x (cpu)": t_s.cpu / t_h.cpu >= 1.5,
              "coverage >= single's": hier["coverage"] >= single["coverage"]}
    print("targets: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()))

    print(f"\n2. ms per iteration ({len(ELEMENTS)} elements, {args.iters} iterations, wall / cpu)")
    # squares with the outlines' boxes (so the same extents) and one start for both
    squares = make_elements([np.ones((int(m.shape[0]), int(m.shape[1])), bool) for m in masks])
    _, info = pack(ELEMENTS, TARGET, replace(cfg, iterations=[0] * len(cfg.iterations), separate_rounds=0,
                                             reseed_share=1.0))
    start = info["initial"]
    print(f"{'resolution':>10s} {'squares':>17s} {'LVIS outlines':>17s}")
    for res in (64, 128, 256, 512):
        if res > args.size:  # pack caps a level at the target's side
            break
        rows = [per_iteration(els, TARGET, res, args.iters, cfg, start) for els in (squares, ELEMENTS)]
        print(f"{res:>10d} " + " ".join(f"{w:7.1f} / {c:7.1f}" for w, c in rows), flush=True)


if __name__ == "__main__":
    main()
