"""Training-loop benchmark: the full Ray Train loop (data loading included) vs the model-only step.

All figures come from one run, on the same preset, data and per-worker batch:
  * model-only: ``training_loss`` + backward + AdamW on one pre-built batch, reused, in this
    process with as many threads as a worker gets (the baseline: no data loading, no DDP);
  * loop, 1 worker: the real ``TorchTrainer`` run (sharded loader, decoding, augmentation,
    priors, DDP hooks, logging) with one worker;
  * loop, N workers: the same with N workers (gloo on CPU), global batch N x the per-worker batch.
Samples/s of a loop run is the median of its logged windows after the first (warm-up) window;
MFU = FLOPs per sample (``PICSModel.flops_per_sample``, stated) x samples/s / (peak x workers),
peak = the measured fp32 matmul rate of one worker's threads on CPU (or --peak-tflops).

Usage (needs the decompose and render_priors outputs, e.g. after ``dvc repro render_priors``):
  python benchmarks/train_loop.py [--steps 16] [--batch 2] [--workers 2] [--set key=value ...]
CPU only here; with a GPU: --set train.use_gpu=true --set model.preset=sd21 ... (not run here).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flows  # noqa: E402,F401  (offline environment)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tasks.params import load_params  # noqa: E402
from tasks.train import checkpoint as ckpt  # noqa: E402
from tasks.train.plan import plan_run  # noqa: E402
from tasks.train.run import fit, peak_flops_per_worker, prepare_init  # noqa: E402


def model_only(plan, batch_size: int, steps: int, warmup: int, threads: int) -> dict:
    from pics_model.modeling_pics import PICSModel

    from tasks.train.batches import BatchBuilder, rows_of_split
    from tasks.train.builders import LossModule
    from tasks.render_priors.store import PriorStore

    torch.set_num_threads(threads)
    model = PICSModel.from_pretrained(plan.init_dir)
    params = model.set_trainable(plan.params.train.trainable)
    opt = torch.optim.AdamW(params, lr=plan.params.train.lr)
    builder = BatchBuilder(plan.resolution, {"rotate_max_deg": 30.0} if plan.params.train.augment else None,
                           PriorStore(plan.priors_dir) if plan.priors_dir else None, plan.object_size,
                           collage=model.config.collage_hint)
    rows = list(rows_of_split(plan.shards_dir, "train", batch_size))
    batch, _ = builder(rows, [np.random.default_rng(i) for i in range(len(rows))])
    t = plan.params.train  # the pipeline's loss: prediction type, mask weight and gate term as trained
    loss_fn = LossModule(model, t.prediction_type, t.mask_weight, t.gate_loss_weight)
    gen = torch.Generator().manual_seed(0)
    model.train()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss, _ = loss_fn(batch, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"samples_per_s": batch_size / statistics.median(times), "step_s": statistics.median(times)}


def loop(base: list[str], workers: int, per_worker: int, steps: int, out: Path) -> tuple[dict, float]:
    params = load_params(None, base + [f"train.num_workers={workers}", f"train.batch_size={workers * per_worker}",
                                       f"train.out={out}"])
    plan = plan_run(params)
    prepare_init(plan, log=lambda *_: None)
    t0 = time.perf_counter()
    final = fit(plan, log=print)
    wall = time.perf_counter() - t0
    rows = ckpt.load_checkpoint(final).trainer["history"]["train"]
    steady = rows[1:] if len(rows) > 1 else rows
    return {"samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
            "data_wait_frac": statistics.median(r["data_wait_frac"] for r in steady),
            "windows": len(steady)}, wall


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16, help="training steps per loop run")
    ap.add_argument("--batch", type=int, default=2, help="samples per worker per step")
    ap.add_argument("--workers", type=int, default=2, help="the multi-worker run's worker count")
    ap.add_argument("--model-steps", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    log_every = max(1, args.steps // 4)
    base = ["train.autoencoder_steps=0",  # VAE quality does not change a step's cost
            f"train.steps={args.steps}", f"train.log_every={log_every}", "train.checkpoint_every=100000",
            "train.sample_every=0", "train.heldout_samples=2", "train.resume=false", "ray.num_cpus=2",
            *args.overrides]
    work = Path(tempfile.mkdtemp(prefix="pics-bench-train-"))
    plan = plan_run(load_params(None, base + [f"train.out={work / 'model'}"]))
    prepare_init(plan, log=lambda *_: None)
    from pics_model.modeling_pics import PICSModel

    flops = float(PICSModel.from_pretrained(plan.init_dir).flops_per_sample(
        with_priors=plan.priors_dir is not None)["total"])
    if args.peak_tflops:
        plan.params.train.peak_tflops = args.peak_tflops
    peak, peak_src = peak_flops_per_worker(plan)
    threads = max(1, int(plan.params.train.cpus_per_worker))

    base_fig = model_only(plan, args.batch, args.model_steps, 2, threads)
    one, wall1 = loop(base, 1, args.batch, args.steps, work / "w1")
    many, wall_n = loop(base, args.workers, args.batch, args.steps, work / f"w{args.workers}")

    def mfu(sps, n):
        return flops * sps / (peak * n)

    res = {
        "device": "cpu", "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "preset": plan.params.model.preset, "per_worker_batch": args.batch, "steps": args.steps,
        "flops_per_sample": flops, "peak_flops_per_worker": peak, "peak_source": peak_src,
        "model_only_samples_per_s": base_fig["samples_per_s"], "model_only_mfu": mfu(base_fig["samples_per_s"], 1),
        "loop_1w_samples_per_s": one["samples_per_s"], "loop_1w_mfu": mfu(one["samples_per_s"], 1),
        "loop_1w_data_wait_frac": one["data_wait_frac"],
        f"loop_{args.workers}w_samples_per_s": many["samples_per_s"],
        f"loop_{args.workers}w_mfu": mfu(many["samples_per_s"], args.workers),
        "ratio_loop_1w_vs_model_only": one["samples_per_s"] / base_fig["samples_per_s"],
        f"scaling_{args.workers}w_vs_1w": many["samples_per_s"] / one["samples_per_s"],
        "wall_s_1w": wall1, f"wall_s_{args.workers}w": wall_n,
    }
    print(f"\ntrain loop benchmark ({res['preset']} preset, CPU, {args.batch} samples/worker/step, "
          f"FLOPs/sample {flops / 1e9:.2f} G, peak/worker {peak / 1e9:.1f} GFLOP/s = {peak_src})")
    print(f"  model-only step          {res['model_only_samples_per_s']:7.2f} samples/s   MFU {res['model_only_mfu']:.3f}")
    print(f"  full loop, 1 worker      {res['loop_1w_samples_per_s']:7.2f} samples/s   MFU {res['loop_1w_mfu']:.3f}"
          f"   ratio vs model-only {res['ratio_loop_1w_vs_model_only']:.2f}x")
    print(f"  full loop, {args.workers} workers     {many['samples_per_s']:7.2f} samples/s   "
          f"MFU {res[f'loop_{args.workers}w_mfu']:.3f}   scaling vs 1 worker {res[f'scaling_{args.workers}w_vs_1w']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
