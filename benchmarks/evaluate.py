"""evaluate throughput and composite latency (tiny preset on CPU here; any preset where a GPU is lent).

    python benchmarks/evaluate.py [--samples DIR] [--checkpoint DIR] [--n 8] [--steps 10] [--actors 2]
                                  [--json FILE]

Inputs: ``--samples`` (a decompose output with a test split) and ``--checkpoint`` (a saved PICS
model); without them the benchmark renders a small embedded dataset (make_sample + decompose) and
saves a randomly initialised tiny model, so it depends on nothing else. Speed does not depend on
the weights' values.

Figures, all measured in this run with the same samples, steps and methods:

1. evaluation through Ray Data with ``--actors`` actors (the flow's path), samples/s and
   composites/s (every sample runs pics, sequential (one call per object), untrained, copy-paste);
2. the baseline: the same Evaluator in this process, one worker (1 thread), no Ray; ratio (1)/(2);
3. copy-paste only (no network), in-process: the floor set by decoding, scoring and writing;
4. ``pics composite`` latency through the CLI (a fresh process: imports + model load + one
   pipeline run) against the pipeline call alone with the model already loaded (the figure the
   model benchmark measures): the ratio is the CLI's fixed overhead.

Actor start-up and model loading are inside (1) and (2): they are what a user waits for. Other
processes on the machine skew every figure, so the load average is printed beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.runtime import configure_environment  # noqa: E402

configure_environment()


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def make_inputs(root: Path, n_images: int) -> tuple[Path, Path]:
    """Embedded scenes -> decompose shards (half test) and a random tiny checkpoint."""
    import torch

    from pics_model.config import get_preset
    from pics_model.modeling_pics import PICSModel
    from tasks.decompose.pipeline import run_serial
    from tasks.make_sample.dataset import assemble, dumps, render_images
    from tasks.params import DecomposeParams, MakeSampleParams

    p = MakeSampleParams(out=str(root / "sample"), num_images=n_images, seed=7)
    res = render_images(p, list(range(n_images)), root / "sample" / "images")
    (root / "sample" / "annotations.json").write_bytes(dumps(assemble(p, res)))
    run_serial(DecomposeParams(test_fraction=0.5), root / "sample" / "annotations.json",
               root / "sample" / "images", root / "decomposed")
    torch.manual_seed(0)
    PICSModel(get_preset("tiny")).save_pretrained(root / "ckpt")
    return root / "decomposed", root / "ckpt"


def plan_for(samples: Path, ckpt: Path, out: Path, n: int, steps: int, actors: int, methods: list[str]):
    from tasks.evaluate import stage
    from tasks.params import load_params

    over = [f"evaluate.samples={samples}", f"evaluate.checkpoint={ckpt}", f"evaluate.untrained={ckpt}",
            f"evaluate.out={out}", f"evaluate.steps={steps}", f"evaluate.max_samples={n}", "evaluate.priors=null",
            "evaluate.batch_size=1", f"evaluate.num_actors={actors}", "evaluate.device=cpu",
            f"evaluate.methods=[{','.join(methods)}]", f"ray.num_cpus={os.cpu_count()}"]
    schema_defaults = out.parent / "empty-params.yaml"
    schema_defaults.write_text("")
    return stage.make_plan(load_params(schema_defaults, over))


def timed(fn):
    t = time.perf_counter()
    table, _ = fn()
    return time.perf_counter() - t, table


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=Path)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--n", type=int, default=8, help="test samples to evaluate")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cli-runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the composite runs")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from tasks.evaluate import stage
    from tasks.runtime import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="pics-bench-eval-"))
    samples, ckpt = args.samples, args.checkpoint
    if samples is None or ckpt is None:
        samples, ckpt = make_inputs(tmp / "inputs", n_images=max(8, 3 * args.n))
    methods = ["pics", "copy_paste", "sequential", "untrained"]
    out: dict = {"device": "cpu", "cpus": os.cpu_count(), "steps": args.steps, "load_before": _load()}

    ray = init_ray(num_cpus=os.cpu_count(), object_store_mb=300)
    plan = plan_for(samples, ckpt, tmp / "ray", args.n, args.steps, args.actors, methods)
    t_ray, tab = timed(lambda: stage.run_ray(plan))
    n = len(set(tab["sample_id"].to_pylist()))
    comps = sum(1 for m in tab["method"].to_pylist() if m in methods)
    ray.shutdown()

    # the baseline is one worker = one core, like each actor (2 OpenMP threads on a busy 2-core
    # machine ran the tiny pipeline 25-60x slower than 1 thread here)
    plan = plan_for(samples, ckpt, tmp / "local", args.n, args.steps, 1, methods)
    plan.cfg.threads = 1
    t_local, _ = timed(lambda: stage.run_local(plan))
    plan = plan_for(samples, ckpt, tmp / "cp", args.n, args.steps, 1, ["copy_paste"])
    plan.cfg.threads = 1
    t_cp, _ = timed(lambda: stage.run_local(plan))
    out.update(samples=n, composites=comps,
               ray={"actors": args.actors, "wall_s": round(t_ray, 2), "samples_per_s": round(n / t_ray, 4),
                    "composites_per_s": round(comps / t_ray, 4)},
               local={"wall_s": round(t_local, 2), "samples_per_s": round(n / t_local, 4),
                      "composites_per_s": round(comps / t_local, 4)},
               copy_paste_only={"wall_s": round(t_cp, 2), "samples_per_s": round(n / t_cp, 4)},
               ray_over_local=round(t_local / t_ray, 3))

    # composite latency: the CLI in a fresh process vs the pipeline call with the model loaded
    from tasks.shards import iter_samples

    s = next(iter_samples(samples, split="test"))
    from PIL import Image

    Image.fromarray(s["image"]).save(tmp / "bg.png")
    objs = []
    for i, (patch, box) in enumerate(zip(s["patches"], s["boxes_tight"])):
        Image.fromarray(patch).save(tmp / f"obj{i}.png")
        objs += ["--object", f"{tmp / f'obj{i}.png'}:{','.join(str(float(v)) for v in box)}"]
    pics = Path(sys.executable).parent / "pics"  # the installed console script, as a user runs it
    cli = [str(pics)] if pics.exists() else [sys.executable, "-m", "flows.cli"]
    cli += ["composite", "--background", str(tmp / "bg.png"), *objs,
           "--checkpoint", str(ckpt), "--out", str(tmp / "comp.png"), "--steps", str(args.steps), "--device", "cpu",
            "--threads", str(args.threads)]
    lat = []
    for _ in range(args.cli_runs):
        t = time.perf_counter()
        subprocess.run(cli, cwd=REPO, check=True, capture_output=True)
        lat.append(time.perf_counter() - t)
    import torch

    from pics_model.modeling_pics import PICSModel
    from pics_model.pipeline_pics import PICSPipeline

    torch.set_num_threads(args.threads)
    pipe = PICSPipeline(PICSModel.from_pretrained(ckpt).eval(), "ddim")
    pipe(s["image"], s["patches"], boxes=s["boxes_tight"], num_inference_steps=1)  # warm-up
    inproc = []
    for _ in range(args.cli_runs):
        t = time.perf_counter()
        pipe(s["image"], s["patches"], boxes=s["boxes_tight"], num_inference_steps=args.steps, guidance_scale=3.0)
        inproc.append(time.perf_counter() - t)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    out["composite_latency"] = {"cli_median_s": round(med(lat), 3), "cli_runs_s": [round(x, 3) for x in lat],
                                "pipeline_median_s": round(med(inproc), 3),
                                "cli_over_pipeline": round(med(lat) / med(inproc), 2)}
    out["load_after"] = _load()

    r, lo = out["ray"], out["local"]
    print(f"evaluate, tiny preset, CPU ({out['cpus']} cores), {n} samples x {len(methods)} methods, "
          f"{args.steps} steps (load {out['load_before']} -> {out['load_after']})")
    print(f"  Ray Data, {args.actors} actors : {r['samples_per_s']:.3f} samples/s, {r['composites_per_s']:.3f} "
          f"composites/s ({r['wall_s']} s)")
    print(f"  in-process, 1 worker: {lo['samples_per_s']:.3f} samples/s, {lo['composites_per_s']:.3f} composites/s "
          f"({lo['wall_s']} s)  -> Ray/baseline = {out['ray_over_local']}x")
    print(f"  copy-paste only     : {out['copy_paste_only']['samples_per_s']:.3f} samples/s")
    c = out["composite_latency"]
    print(f"  pics composite (CLI): {c['cli_median_s']} s median vs pipeline alone {c['pipeline_median_s']} s "
          f"-> CLI overhead x{c['cli_over_pipeline']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
