"""Scene-map computation time: ours (coarse, coarse + fine) against the ICP and centroid
baselines on the same augmented pairs, plus descriptor-field throughput, and the same pairs with
both scenes sampled ``--dense`` times more densely, rigid and hard pairs of the held-out scenes: the
map reading the dense scenes as they are (the stage's default, the baseline) against reading them
thinned to the training density (``analogy.thin_dense``, `pics_model.context_field.thin_scene`),
time and PCP@0.25.

    python benchmarks/analogy.py [--checkpoint data/analogy/final] [--scenes data/analogy/scenes]
                                 [--pairs 8] [--threads 2] [--dense 20]

Scenes come from the stage's ``scenes/`` when it exists, else a few are generated; the field is
the trained one when ``--checkpoint`` exists, else an untrained one of the default size (timing
does not depend on the weights). Prints seconds per pair for each method (wall and CPU) and
descriptors per second. Other processes on the machine skew every figure: the load average is
printed beside them.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.runtime import configure_environment  # noqa: E402

configure_environment()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pics_model.context_field import ContextDescriptorField  # noqa: E402
from tasks.analogy import evaluate as ev  # noqa: E402
from tasks.analogy.scenes import (Scene, densified, eval_pair, generate_scene, load_scene,  # noqa: E402
                                  object_library, point_spacing)
from tasks.analogy.stage import field_config, map_config  # noqa: E402
from tasks.params import AnalogyParams  # noqa: E402


def _time(fn, pairs) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    for pair in pairs:
        fn(pair.source, pair.target, pair.source.points[pair.query])
    n = len(pairs)
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="data/analogy/final")
    ap.add_argument("--scenes", default="data/analogy/scenes")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dense", type=int, default=20, help="copies of every point, jittered (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = AnalogyParams()
    files = sorted(Path(args.scenes).glob("scene-*.npz"))
    scenes = [load_scene(f) for f in files] or [generate_scene(i, 0, (p.min_objects, p.max_objects),
                                                               p.points_per_object) for i in range(8)]
    ckpt = Path(args.checkpoint)
    field = ContextDescriptorField.load(ckpt) if ckpt.is_dir() else ContextDescriptorField(field_config(p)).eval()
    rng = np.random.default_rng(0)
    library = object_library(scenes)
    pairs = [eval_pair(scenes[i % len(scenes)], library, rng) for i in range(args.pairs)]
    print(f"{len(scenes)} scenes ({'trained' if ckpt.is_dir() else 'untrained'} field), {len(pairs)} pairs, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    full, _ = ev.ours(field, map_config(p, fine=True))
    coarse, _ = ev.ours(field, map_config(p, fine=False))
    for name, fn in (("ours (coarse + fine)", full), ("ours (coarse only)", coarse), ("icp", ev.icp_baseline),
                     ("centroid", ev.centroid_baseline)):
        wall, cpu = _time(fn, pairs)
        print(f"{name:22s} {wall:7.3f} s/pair wall  {cpu:7.3f} s/pair cpu")
    s = scenes[0]
    q = torch.from_numpy(s.points)
    with torch.no_grad():
        t0 = time.perf_counter()
        field(q, q, torch.from_numpy(s.label))
        dt = time.perf_counter() - t0
    print(f"descriptor field: {len(q) / dt:,.0f} descriptors/s ({len(q)} points)")
    if args.dense:
        dense_scenes(field, scenes, args.dense, args.pairs, p)


def dense_scenes(field: ContextDescriptorField, scenes: list[Scene], copies: int, count: int, p: AnalogyParams) -> None:
    """The map on rigid and on hard pairs (other instances, each object shifted and turned) whose
    scenes are sampled ``copies`` times more densely: as they are (the default) and thinned."""
    cfg = field.config
    if not cfg.object_spacing:  # a field saved before spacings were recorded
        cfg = dataclasses.replace(cfg, **dict(zip(("object_spacing", "floor_spacing"), point_spacing(scenes))))
    spaced = ContextDescriptorField(cfg).eval()
    spaced.load_state_dict(field.state_dict())
    size, rng, library = cfg.typical_object_size, np.random.default_rng(1), object_library(scenes)
    held = scenes[-p.heldout_scenes:] if len(scenes) > p.heldout_scenes else scenes  # the stage's held-out scenes
    for kind, extra in (("rigid", {}), ("hard", {"swap": True, "perturb_shift": p.hard_shift,
                                                 "perturb_yaw_deg": p.hard_yaw_deg})):
        pairs = [eval_pair(held[i % len(held)], library, rng, **extra) for i in range(count)]
        dense = [(densified(pair.source, copies, rng), densified(pair.target, copies, rng)) for pair in pairs]
        print(f"{kind} pairs, {copies}x denser ({len(dense[0][0].points)} source points in the first pair):")
        seconds = {}
        for name, thin, inputs in (("as generated", False, [(x.source, x.target) for x in pairs]),
                                   ("denser, as they are", False, dense), ("denser, thinned", True, dense)):
            full, _ = ev.ours(spaced, dataclasses.replace(map_config(p, fine=True), thin_dense=thin))
            t0 = time.perf_counter()
            score = np.mean([ev.pcp(full(src, tgt, pair.source.points[pair.query]), pair.truth, 0.25 * size)
                             for pair, (src, tgt) in zip(pairs, inputs)])
            seconds[name] = (time.perf_counter() - t0) / len(pairs)
            print(f"  {name:20s} {seconds[name]:7.3f} s/pair wall  PCP@0.25 {score:.3f}")
        print(f"  thinning: {seconds['denser, as they are'] / seconds['denser, thinned']:.1f}x faster")


if __name__ == "__main__":
    main()
