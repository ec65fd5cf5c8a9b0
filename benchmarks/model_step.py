"""Training-step and inference benchmark of the PICS network: plain vs dense, sparse and reference ITBs.

What it measures (all variants in the same run, so the ratios are fair on a shared machine):
  * train: samples/s of one training step (VAE encode + object encode + UNet/ControlNet forward,
    backward over the reference trainable set, AdamW) for
      plain  - diffusers' vanilla blocks (every token cross-attends to all objects' tokens),
      dense  - ITBs, every expert on every token then masked (the reference's way),
      sparse - ITBs, row-sparse experts (default);
      reference - ITBs in the reference's equations (row-sparse, but the gate runs on every token,
               the pair attention's keys span every token, and the gate is bf16 on CUDA);
    MFU from FLOPs counted by FlopCounterMode on the same layout (`PICSModel.flops_per_sample`,
    each variant's own FLOPs; peak from --peak-tflops or the detected GPU).
  * itb: one block on its own at SD's first level (64x64 tokens on GPU, 32x32 by default on CPU;
    dim 320, context 1024, two 257-token codes, ~11% overlap tokens), forward + backward:
    vanilla vs dense vs sparse vs reference.
  * infer: one 2-object composite, DDIM with guidance, batch 1: ours (sparse, guidance batched
    into one pass) vs the reference's way (dense, two passes per step).

Usage:
  python benchmarks/model_step.py                                   # CPU, tiny preset
  python benchmarks/model_step.py --preset sd21 --device cuda --batch 16 32 --compile --dtype bf16
Results print as a table and, with --json, are written to a file.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pics_model.config import get_preset  # noqa: E402
from pics_model.data import build_item, collate, rasterize_boxes  # noqa: E402
from pics_model.interaction_block import InteractionTransformerBlock, RoutingContext  # noqa: E402
from pics_model.modeling_pics import PICSModel, flops_per_sample  # noqa: E402

MODES = ("plain", "dense", "sparse", "reference")
ITB_MODES = ("dense", "sparse", "reference")


def peak_flops(device: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        if "H100" in name or "H200" in name:
            return (756e12 if "PCIe" in name else 989.4e12)  # dense bf16 tensor-core peak
    return None


def overlap_boxes(res: int, n: int = 2, overlap: float = 0.46) -> np.ndarray:
    """n equal boxes in a row, neighbours sharing `overlap` of a width (0.46: ~11% of the area overlaps at n=2)."""
    side = res / (n - (n - 1) * overlap + 0.5)
    return np.array([(side * (0.25 + i * (1 - overlap)), res * 0.3, side * (1.25 + i * (1 - overlap)),
                      res * 0.3 + side) for i in range(n)], np.float32)


def make_batch(cfg, batch: int, n_objects: int = 2) -> dict:
    rng = np.random.default_rng(0)
    r, p = cfg.resolution, cfg.object_encoder.image_size
    items = []
    for _ in range(batch):
        boxes = overlap_boxes(r, n_objects)
        s = {"image": rng.integers(0, 255, (r, r, 3), dtype=np.uint8),
             "boxes_expanded": boxes, "boxes_tight": boxes, "patch_masks": np.ones((n_objects, p, p), np.uint8),
             "patches": rng.integers(0, 255, (n_objects, p, p, 3), dtype=np.uint8)}
        items.append(build_item(s, r, None, None, object_size=p, collage=cfg.collage_hint))
    return collate(items)


def build(preset: str, mode: str, device: str, overrides: dict) -> PICSModel:
    cfg = get_preset(preset, **overrides)
    cfg.itb.enabled = mode != "plain"
    cfg.itb.expert_mode = mode if mode in ITB_MODES else "sparse"
    torch.manual_seed(0)
    if device.startswith("cuda"):  # build in place: the SD presets are ~2.5 B parameters
        with torch.device(device):
            return PICSModel(cfg)
    return PICSModel(cfg).to(device)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Trainer:
    """One variant: model, optimizer, its step function and timings."""

    def __init__(self, args, mode: str, batch_size: int, compiled: bool):
        self.mode, self.batch_size, self.compiled, self.device = mode, batch_size, compiled, args.device
        over = {"resolution": args.resolution} if args.resolution else {}
        self.model = build(args.preset, mode, args.device, over)
        if args.dtype == "bf16":  # frozen input-side networks run in bf16 outright
            self.model.vae.to(torch.bfloat16)
            self.model.object_encoder.backbone.to(torch.bfloat16)
        params = self.model.set_trainable("reference")
        self.n_trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=1e-5, **({"fused": True} if args.device.startswith("cuda") else {}))
        if compiled:
            self.model.compile_denoiser(backend=args.compile_backend, recompile_limit=64)
        self.batch = {k: v.to(args.device) for k, v in make_batch(self.model.config, batch_size).items()}
        self.gen = torch.Generator(device=args.device).manual_seed(0)
        self.amp = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16")
        self.times: list[float] = []
        self.model.train()

    def step(self, record: bool = True):
        sync(self.device)
        t0 = time.perf_counter()
        with self.amp:
            loss, _ = self.model.training_loss(self.batch, self.gen, cond_drop_prob=0.0)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        if record:
            self.times.append(time.perf_counter() - t0)


def bench_train(args) -> list[dict]:
    rows = []
    peak = peak_flops(args.device, args.peak_tflops)
    flops = {}
    for mode in args.modes:  # each variant's own FLOPs, same layout (meta device for the SD presets)
        em = mode if mode in ITB_MODES else "sparse"
        if args.preset == "tiny":
            flops[mode] = build(args.preset, mode, "cpu", {}).flops_per_sample(
                resolution=args.resolution, expert_mode=em, device="cpu")["total"]
        else:
            cfg = get_preset(args.preset)
            cfg.itb.enabled = mode != "plain"
            flops[mode] = flops_per_sample(cfg, resolution=args.resolution, expert_mode=em)["total"]
    for compiled in ([False, True] if args.compile else [False]):
        for bs in args.batch:
            if args.interleave:  # all variants alive, steps round-robin: same machine load for each
                trainers = [Trainer(args, mode, bs, compiled) for mode in args.modes]
                for _ in range(args.warmup):
                    for t in trainers:
                        t.step(record=False)
                for _ in range(args.steps):
                    for t in trainers:
                        t.step()
            else:  # one variant at a time (GPU memory)
                trainers = []
                for mode in args.modes:
                    torch._dynamo.reset()  # each variant compiles afresh (no shared cache entries)
                    t = None
                    try:
                        t = Trainer(args, mode, bs, compiled)
                        for _ in range(args.warmup):
                            t.step(record=False)
                        for _ in range(args.steps):
                            t.step()
                    except torch.cuda.OutOfMemoryError:
                        rows.append({"section": "train", "preset": args.preset, "mode": mode, "batch": bs,
                                     "compiled": compiled, "error": "CUDA out of memory"})
                        print(f"# {mode} batch {bs} compiled={compiled}: CUDA out of memory")
                        t = None
                    if t is None:
                        gc.collect()
                        torch.cuda.empty_cache()
                        continue
                    t.model, t.opt, t.batch = None, None, None
                    gc.collect()
                    if args.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                    trainers.append(t)
            for t in trainers:
                med = float(np.median(t.times))
                sps = bs / med
                row = {"section": "train", "preset": args.preset, "mode": t.mode, "batch": bs,
                       "compiled": compiled, "step_ms": med * 1e3, "samples_per_s": sps,
                       "flops_per_sample": flops[t.mode], "achieved_tflops": flops[t.mode] * sps / 1e12,
                       "mfu": (flops[t.mode] * sps / peak) if peak else None}
                rows.append(row)
    return rows


def bench_itb(args) -> list[dict]:
    """A single block at SD's first level: 64x64 tokens, dim 320 (5 heads), context 1024."""
    from diffusers.models.attention import BasicTransformerBlock
    dev = args.device
    torch.manual_seed(0)
    grid, dim, ctx_dim, n_tok, b = args.itb_grid, 320, 1024, 257, args.itb_batch
    vanilla = BasicTransformerBlock(dim, 5, 64, cross_attention_dim=ctx_dim).to(dev)
    itb = InteractionTransformerBlock(copy.deepcopy(vanilla)).to(dev)
    with torch.no_grad():
        for p in itb.new_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    masks = torch.from_numpy(np.stack([rasterize_boxes(overlap_boxes(grid), grid)] * b)).to(dev)
    x = torch.randn(b, grid * grid, dim, device=dev, requires_grad=True)
    codes = torch.randn(b, 2, n_tok, ctx_dim, device=dev)
    amp = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def run(mode):
        with amp:
            if mode == "vanilla":
                out = vanilla(x, encoder_hidden_states=codes.flatten(1, 2))
            else:
                ctx = RoutingContext(codes, masks, mode=mode)
                out = itb(x, cross_attention_kwargs={"pics_routing": ctx})
        out.float().square().mean().backward()

    fracs = RoutingContext(codes, masks).plan(grid * grid).ov.float().mean().item()
    times = {m: [] for m in ("vanilla", *ITB_MODES)}
    for i in range(args.itb_warmup + args.itb_steps):
        for m in times:
            sync(dev)
            t0 = time.perf_counter()
            run(m)
            sync(dev)
            if i >= args.itb_warmup:
                times[m].append(time.perf_counter() - t0)
    return [{"section": "itb", "mode": m, "grid": grid, "batch": b, "overlap_token_frac": fracs,
             "fwd_bwd_ms": float(np.median(t)) * 1e3} for m, t in times.items()]


@torch.no_grad()
def bench_infer(args) -> list[dict]:
    from pics_model.pipeline_pics import PICSPipeline
    rows = []
    over = {"resolution": args.resolution} if args.resolution else {}
    model = build(args.preset, "sparse", args.device, over).eval()
    if args.dtype == "bf16":
        model.to(torch.bfloat16)
    cfg = model.config
    r = cfg.resolution
    rng = np.random.default_rng(0)
    bg = rng.integers(0, 255, (r, r, 3), dtype=np.uint8)
    p = cfg.object_encoder.image_size
    objs = [rng.integers(0, 255, (p, p, 3), dtype=np.uint8) for _ in range(2)]
    boxes = overlap_boxes(r)
    pipe = PICSPipeline(model, "ddim")
    steps, g = args.infer_steps, 5.0
    pipe(bg, objs, boxes=boxes, num_inference_steps=2, guidance_scale=g, seed=0)  # warm-up
    sync(args.device)
    t0 = time.perf_counter()
    pipe(bg, objs, boxes=boxes, num_inference_steps=steps, guidance_scale=g, seed=0)
    sync(args.device)
    ours = time.perf_counter() - t0
    # the reference's way: dense experts, conditional and unconditional as two separate passes
    batch = pipe.prepare(bg, objs, boxes=boxes)[0]
    dev, dt = model.device, model.dtype
    objects = batch["objects"].to(dev, dt)
    codes_c, codes_u = model.encode_objects(objects), model.encode_objects(torch.zeros_like(objects))
    hint, masks = batch["hint"].to(dev, dt), batch["routing_masks"].to(dev, dt)
    ctx_c = RoutingContext(codes_c, masks, mode="dense")
    ctx_u = RoutingContext(codes_u, masks, mode="dense")
    sched = pipe.scheduler
    sched.set_timesteps(steps, device=dev)
    lat = torch.randn(1, cfg.unet.in_channels, cfg.latent_size, cfg.latent_size, device=dev, dtype=dt)
    sync(args.device)
    t0 = time.perf_counter()
    for t in sched.timesteps:
        tt = t.expand(1).to(dev)
        e_c = model.denoise(lat, tt, hint, ctx_c)
        e_u = model.denoise(lat, tt, hint, ctx_u)
        lat = sched.step(e_u + g * (e_c - e_u), t, lat).prev_sample
    model.decode_latents(lat)
    sync(args.device)
    ref = time.perf_counter() - t0
    rows.append({"section": "infer", "variant": "ours (sparse, batched guidance)", "steps": steps,
                 "seconds_per_composite": ours, "ms_per_step": ours / steps * 1e3})
    rows.append({"section": "infer", "variant": "reference way (dense, 2 passes/step)", "steps": steps,
                 "seconds_per_composite": ref, "ms_per_network_eval": ref / (2 * steps) * 1e3})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "sd15", "sd21"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resolution", type=int, default=None, help="default: the preset's (tiny 64, sd 512)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="default: tiny 2 4, sd 16 32")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: cpu fp32, cuda bf16")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile'd UNet/ControlNet")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend; 'aot_eager' checks graph capture without code generation")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: robust on a shared 2-core box)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--sections", nargs="+", default=["train", "itb", "infer"], choices=["train", "itb", "infer"])
    ap.add_argument("--itb-grid", type=int, default=None, help="default: cuda 64 (SD level 1), cpu 32")
    ap.add_argument("--itb-batch", type=int, default=None, help="default: cpu 1, cuda 16")
    ap.add_argument("--itb-steps", type=int, default=5)
    ap.add_argument("--itb-warmup", type=int, default=1)
    ap.add_argument("--infer-steps", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or ([16, 32] if args.preset != "tiny" else [2, 4])
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.itb_batch = args.itb_batch or (16 if cuda else 1)
    args.itb_grid = args.itb_grid or (64 if cuda else 32)
    args.interleave = not cuda
    if not cuda:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    dev_name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                        f"{os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"# model_step benchmark: preset={args.preset} device={dev_name} dtype={args.dtype} "
          f"torch={torch.__version__} load avg at start={load0[0]:.1f}")
    rows: list[dict] = []
    if "train" in args.sections:
        rows += bench_train(args)
    if "itb" in args.sections:
        rows += bench_itb(args)
    if "infer" in args.sections:
        rows += bench_infer(args)
    print(f"# load avg at end={os.getloadavg()[0]:.1f}")
    report(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev_name, "args": vars(args), "rows": rows}, indent=2))
    return 0


def report(rows: list[dict]) -> None:
    train = [r for r in rows if r["section"] == "train" and "error" not in r]
    if train:
        print("\ntraining step (reference trainable set, AdamW)")
        print(f"{'mode':9} {'batch':>5} {'compiled':>8} {'step ms':>9} {'samples/s':>10} {'GFLOP/sample':>13} "
              f"{'TFLOP/s':>8} {'MFU':>6}")
        for r in train:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            print(f"{r['mode']:9} {r['batch']:>5} {str(r['compiled']):>8} {r['step_ms']:>9.1f} "
                  f"{r['samples_per_s']:>10.2f} {r['flops_per_sample'] / 1e9:>13.2f} {r['achieved_tflops']:>8.3f} "
                  f"{mfu:>6}")
        for bs in sorted({r["batch"] for r in train}):
            by = {(r["mode"], r["compiled"]): r["samples_per_s"] for r in train if r["batch"] == bs}
            parts = []
            for comp in (False, True):
                if ("sparse", comp) in by and ("plain", comp) in by:
                    parts.append(f"sparse/plain{' compiled' if comp else ''} = {by['sparse', comp] / by['plain', comp]:.2f}x")
            if ("sparse", True) in by and ("dense", False) in by:
                parts.append(f"sparse compiled / dense eager = {by['sparse', True] / by['dense', False]:.2f}x")
            if ("sparse", False) in by and ("dense", False) in by:
                parts.append(f"sparse/dense eager = {by['sparse', False] / by['dense', False]:.2f}x")
            print(f"ratios at batch {bs}: " + "; ".join(parts))
    itb = [r for r in rows if r["section"] == "itb"]
    if itb:
        r0 = itb[0]
        print(f"\nsingle block fwd+bwd at {r0['grid']}x{r0['grid']} tokens, dim 320, ctx 1024, 2x257-token codes, "
              f"batch {r0['batch']}, overlap tokens {r0['overlap_token_frac']:.1%}")
        base = {r["mode"]: r["fwd_bwd_ms"] for r in itb}
        for r in itb:
            print(f"  {r['mode']:9} {r['fwd_bwd_ms']:9.1f} ms  ({r['fwd_bwd_ms'] / base['vanilla']:.2f}x vanilla)")
        print(f"  sparse is {base['dense'] / base['sparse']:.2f}x faster than dense")
        if "reference" in base:
            print(f"  reference mode costs {base['reference'] / base['sparse']:.2f}x sparse")
    inf = [r for r in rows if r["section"] == "infer"]
    if inf:
        print(f"\ninference: one 2-object composite, {inf[0]['steps']} DDIM steps, guidance 5, batch 1")
        for r in inf:
            print(f"  {r['variant']:40} {r['seconds_per_composite']:8.2f} s")
        print(f"  speed-up {inf[1]['seconds_per_composite'] / inf[0]['seconds_per_composite']:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
