"""Training variants of the contextual descriptor field, each scored against an untrained field of
the same shape on the stage's hard pairs (other instances, each object shifted and turned):

    python benchmarks/analogy_variants.py [--run DIR] [--pairs 16] [--kind hard|rigid] [--set analogy.key=value ...] [train.key=value ...]

``--set analogy.*`` changes the stage's parameters (field shape, steps, ...); ``train.KEY=VALUE``
sets a `tasks.analogy.train.TrainConfig` field the stage does not expose (e.g. ``train.near=0.1``,
``train.frame_negatives=True``, ``train.jitter_shift=0.03``, ``train.distractors=(2,5)``). Scenes come
from ``--run`` (the stage's ``scenes/``), the pairs are the stage's (same seeds), the untrained field
is the stage's (seed + 1). Prints the training time and loss, each field's mean PCP@0.25 of the full
map and of its coarse stage, and the trained - untrained paired difference with a 95% t interval.
One thread; writes nothing.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
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
from tasks.analogy import stage  # noqa: E402
from tasks.analogy.scenes import load_scene  # noqa: E402
from tasks.analogy.train import train_field  # noqa: E402
from tasks.params import load_params  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="data/analogy")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--kind", choices=("hard", "rigid"), default="hard", help="the stage's hard or rigid pairs")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("train", nargs="*", help="train.KEY=VALUE (TrainConfig fields)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = load_params(None, [f"analogy.hard_pairs={args.pairs}", f"analogy.eval_pairs={args.pairs}", "analogy.threads=1", *args.sets]).analogy
    tc = stage.train_config(p)
    for item in args.train:
        key, value = item.removeprefix("train.").split("=", 1)
        if key not in {f.name for f in dataclasses.fields(tc)}:
            raise SystemExit(f"{item}: not a TrainConfig field")
        setattr(tc, key, type(getattr(tc, key))(ast.literal_eval(value)))
    print(tc, flush=True)
    train, heldout = stage.split(p, [load_scene(f) for f in sorted((Path(args.run) / stage.SCENES).glob("scene-*.npz"))])
    t0 = time.perf_counter()
    field, curve = train_field(train, stage.field_config(p), tc)
    print(f"train {time.perf_counter() - t0:.0f} s, loss {curve[0]['loss']:.3f} -> "
          f"{np.mean([c['loss'] for c in curve[-20:]]):.3f} (last 20 steps)", flush=True)
    torch.manual_seed(p.seed + 1)  # the stage's untrained field
    fields = {"trained": field, "untrained": ContextDescriptorField(field.config).eval()}
    size = field.config.typical_object_size
    rows = {name: [] for name in fields}
    for pair in stage.eval_pairs(p, train, heldout, hard=args.kind == "hard"):
        q = pair.source.points[pair.query].astype(np.float64)
        for name, f in fields.items():
            full, coarse = ev.ours(f, stage.map_config(p))
            rows[name].append({"full": ev.pcp(full(pair.source, pair.target, q), pair.truth, 0.25 * size),
                               "coarse": ev.pcp(coarse(pair.source, pair.target, q), pair.truth, 0.25 * size)})
    for part in ("full", "coarse"):
        c = stage.paired(rows["trained"], rows["untrained"], part)
        means = {n: round(float(np.mean([r[part] for r in rs])), 3) for n, rs in rows.items()}
        print(f"{part}: PCP@0.25 {means}, trained - untrained {c['mean']:+.3f} "
              f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}], better/worse on {c['wins']}/{c['losses']} of {c['pairs']}")


if __name__ == "__main__":
    main()
