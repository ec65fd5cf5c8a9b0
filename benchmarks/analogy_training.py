"""What training the descriptor field adds: the trained field against an untrained one of the same
shape (seeded), on the stage's rigid pairs and its hard pairs (other instances, each object shifted
and turned), with where the difference could come from.

    python benchmarks/analogy_training.py [--run data/analogy] [--pairs 6] [--kinds hard,rigid]

Per pair kind and field, means over the pairs (all PCP at 0.25 of the typical object size; forward
maps only):

* ``full`` / ``coarse``: PCP of the map and of its coarse (refined similarity) stage alone;
* ``pool_oracle``: the best PCP any coarse candidate (class-anchored centroid alignment x yaw x flip)
  reaches before refinement, ``pool_picked``: the PCP of the candidate the field's cost picks, and
  ``pool_oracle_rank``: how many candidates the field scores cheaper than the best one;
* ``retrieval``: each query point's nearest target descriptor anywhere in the target scene (read in
  the true frame), no map at all: the descriptors' own power to find the corresponding place.

Scenes and field from ``--run`` (the stage's output folder: ``scenes/``, ``final/``); the pairs are
the stage's (same seeds), so the figures match metrics.json's where both exist. Writes nothing;
prints one JSON line per pair and the means.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.runtime import configure_environment  # noqa: E402

configure_environment()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pics_model.context_field import ContextDescriptorField  # noqa: E402
from pics_model.scene_map import candidates, compute_map, costs, scene_tensors, yaw  # noqa: E402
from tasks.analogy import evaluate as ev  # noqa: E402
from tasks.analogy import stage  # noqa: E402
from tasks.analogy.scenes import load_scene  # noqa: E402
from tasks.params import load_params  # noqa: E402


@torch.no_grad()
def diagnose(field: ContextDescriptorField, pair, cfg, size: float) -> dict:
    src = scene_tensors(pair.source.points, pair.source.label, pair.source.instance)
    tgt = scene_tensors(pair.target.points, pair.target.label, pair.target.instance)
    q = torch.as_tensor(pair.source.points[pair.query], dtype=torch.float32)
    hit = 0.25 * size
    m = compute_map(field, src, tgt, q, cfg)
    out = {"full": ev.pcp(m(q).numpy(), pair.truth, hit), "coarse": ev.pcp(m.transform.apply(q).numpy(), pair.truth, hit)}
    sub = q[torch.randperm(len(q), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.coarse_queries]]
    pool = candidates(sub, src, tgt, cfg)  # the same subset and pool compute_map scores
    cost = costs(field, sub, field(sub, src["points"], src["labels"]), tgt, pool)
    scores = [ev.pcp(t.apply(q).numpy(), pair.truth, hit) for t in pool]
    best = int(np.argmax(scores))
    out.update(pool_oracle=max(scores), pool_picked=scores[int(cost.argmin())],
               pool_oracle_rank=int((cost < cost[best]).sum()))
    dq = field(q, src["points"], src["labels"])
    dt = field(tgt["points"], tgt["points"], tgt["labels"], yaw(pair.yaw))
    out["retrieval"] = ev.pcp(pair.target.points[torch.cdist(dq, dt).argmin(1).numpy()], pair.truth, hit)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="data/analogy")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--kinds", default="hard,rigid")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    p = load_params(None, [f"analogy.eval_pairs={args.pairs}", f"analogy.hard_pairs={args.pairs}"]).analogy
    train, heldout = stage.split(p, [load_scene(f) for f in sorted((run / stage.SCENES).glob("scene-*.npz"))])
    fields = {"trained": ContextDescriptorField.load(run / stage.FINAL)}
    torch.manual_seed(p.seed + 1)  # the stage's untrained field
    fields["untrained"] = ContextDescriptorField(fields["trained"].config).eval()
    size, cfg = fields["trained"].config.typical_object_size, stage.map_config(p)
    means = {}
    for kind in args.kinds.split(","):
        rows = {name: [] for name in fields}
        for i, pair in enumerate(stage.eval_pairs(p, train, heldout, hard=kind == "hard")):
            for name, field in fields.items():
                rows[name].append(diagnose(field, pair, cfg, size))
            print(json.dumps({"kind": kind, "pair": i, **{n: {k: round(v, 3) for k, v in r[-1].items()}
                                                          for n, r in rows.items()}}), flush=True)
        means[kind] = {n: {k: round(float(np.mean([x[k] for x in r])), 3) for k in r[0]} for n, r in rows.items()}
    print(json.dumps({"pairs": args.pairs, "means": means}, indent=1))


if __name__ == "__main__":
    main()
