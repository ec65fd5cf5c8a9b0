"""Sampling speed of the location model: boxes/s with the KV cache vs re-running the whole sequence.

Both decoders sample K boxes for one background in the same run, with the same weights and the same
random draws (so the boxes are identical: checked), interleaved over ``--repeats`` rounds so a
shared machine slows both alike; the median round counts. A saved model (``--checkpoint``) or a
fresh one of the params' size.

Usage:
  python benchmarks/location.py                                  # CPU, params.yaml's location size
  python benchmarks/location.py --checkpoint data/location/final --k 10 100 --device cuda --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pics_model.location_model import LocationModel  # noqa: E402


def load_model(checkpoint: str | None, device: str) -> LocationModel:
    if checkpoint:
        return LocationModel.from_pretrained(checkpoint).to(device)
    from tasks.location.stage import model_config
    from tasks.make_sample.shapes import CATEGORIES
    from tasks.params import load_params

    torch.manual_seed(0)
    cfg = model_config(load_params().location, [c.name for c in CATEGORIES])
    return LocationModel(cfg).eval().to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(model: LocationModel, k: int, repeats: int, device: str) -> dict:
    s = model.cfg.image_size
    prefix = model.condition(torch.rand(1, 3, s, s, device=device), torch.tensor([0], device=device))
    times = {"cached": [], "uncached": []}
    boxes = {}
    for r in range(repeats + 1):  # round 0 warms up
        for name, cache in (("cached", True), ("uncached", False)):
            g = torch.Generator(device=device).manual_seed(r)
            sync(device)
            t0 = time.perf_counter()
            boxes[name], _ = model.sample(prefix, k, 1.0, 0.95, use_cache=cache, generator=g)
            sync(device)
            if r:
                times[name].append(time.perf_counter() - t0)
        assert torch.equal(boxes["cached"], boxes["uncached"]), "cached and uncached sampling disagree"
    out = {"k": k, "prefix_tokens": int(prefix.shape[1])}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[f"{name}_boxes_per_s"] = round(k / med, 1)
        out[f"{name}_ms"] = round(med * 1000, 2)
    out["speedup"] = round(out["uncached_ms"] / out["cached_ms"], 2)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--k", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    model = load_model(args.checkpoint, args.device)
    rows = [bench(model, k, args.repeats, args.device) for k in args.k]
    print(f"{'K':>5} {'prefix':>6} {'cached box/s':>13} {'uncached box/s':>15} {'speedup':>8}")
    for r in rows:
        print(f"{r['k']:>5} {r['prefix_tokens']:>6} {r['cached_boxes_per_s']:>13} {r['uncached_boxes_per_s']:>15} "
              f"{r['speedup']:>8}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "torch_threads": torch.get_num_threads(),
                                               "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
