"""decompose throughput: images/s and samples/s per core, one worker vs Ray workers, time split.

    python benchmarks/decompose.py [--images 1000] [--width 640] [--height 480] [--workers 2]

Generates random LVIS-v1-format data (star polygons on smooth noise JPEGs, 2-5 objects an image)
so it depends on nothing else, then decomposes it three times with the same code and parameters:

1. one process, no Ray, no Prefect (the baseline; gives the decode/masks/crops/encode/write split)
2. the pipeline's fan-out (``flows.sharded.run_shards``: a Prefect task per shard, each one Ray
   task), 1 worker in flight
3. the same, ``--workers`` in flight

and checks the three outputs are byte-identical. The scaling ratio is (3) over (2); (3) over (1)
is printed too. (2) and (3) include Prefect's per-shard task overhead (15-35 ms a shard), as the
pipeline pays it. Ray start-up, the Prefect server and the workers' first imports are paid before
timing.
Other processes on the machine skew every figure: the load average and the CPU share that this
benchmark got are printed beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flows  # noqa: E402,F401  (offline Prefect/Ray environment before Prefect is imported)
from flows.sharded import run_shards  # noqa: E402
from prefect import flow  # noqa: E402

from tasks.decompose import pipeline  # noqa: E402
from tasks.decompose.synthetic import write_synthetic_lvis  # noqa: E402
from tasks.params import DecomposeParams  # noqa: E402
from tasks.runtime import init_ray  # noqa: E402


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


class Phase:
    """Wall time, machine busy fraction, load average and this process's CPU time over a block."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.j0 = _busy_jiffies()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.cpu0
        b1, t1 = _busy_jiffies()
        self.machine_busy = (b1 - self.j0[0]) / max(t1 - self.j0[1], 1)  # 1.0 = every core busy
        self.load = os.getloadavg()[0]


@flow(name="benchmark-decompose")
def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=50)
    ap.add_argument("--pairing", default="interaction", choices=["reference", "interaction"])
    ap.add_argument("--objects", type=int, nargs=2, default=(2, 5), metavar=("MIN", "MAX"),
                    help="objects per image (LVIS averages about 12)")
    ap.add_argument("--workdir", default=None, help="where to generate data (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="pics-bench-decompose-"))
    ncpu = os.cpu_count()
    print(f"machine: {ncpu} cores, load average before {os.getloadavg()}; CPU only (no GPU involved)")
    with Phase() as gen:
        ann, img = write_synthetic_lvis(work / "data", n_images=args.images, width=args.width, height=args.height,
                                        seed=0, objects=tuple(args.objects))
    print(f"generated {args.images} {args.width}x{args.height} images in {gen.wall:.1f} s")
    params = DecomposeParams(pairing=args.pairing, shard_size=args.shard_size, grid_samples=0)

    out, cpu = {}, {}
    with Phase() as serial:
        manifest, results = pipeline.run_serial(params, ann, img, work / "serial")
    split = pipeline.sum_timings(results)
    out["serial"], cpu["serial"] = serial, sum(r["cpu_s"] for r in results)

    init_ray(num_cpus=max(args.workers, 1), object_store_mb=300)
    warm = write_synthetic_lvis(work / "warm", n_images=4, width=args.width, height=args.height, seed=1)
    plan = pipeline.prepare(params.model_copy(update={"shard_size": 1}), *warm, work / "warm_out")
    run_shards(pipeline.DECOMPOSE, plan, args.workers)  # workers started and their imports done

    hashes = {"serial": manifest["content_hash"]}
    for name, n in (("ray1", 1), (f"ray{args.workers}", args.workers)):
        plan = pipeline.prepare(params, ann, img, work / name)
        with Phase() as ph:
            res = run_shards(pipeline.DECOMPOSE, plan, n)
        m = pipeline.finalize(plan, res)
        hashes[name] = m["content_hash"]
        out[name], cpu[name] = ph, sum(r["cpu_s"] for r in res)
    identical = len(set(hashes.values())) == 1

    n_img, n_smp = manifest["images_seen"], manifest["samples"]
    rows = []
    for name, ph in out.items():
        workers = 1 if name in ("serial", "ray1") else args.workers
        rows.append({"run": name, "workers": workers, "wall_s": round(ph.wall, 2),
                     "images_per_s": round(n_img / ph.wall, 1), "samples_per_s": round(n_smp / ph.wall, 1),
                     "images_per_s_per_core": round(n_img / ph.wall / workers, 1),
                     "samples_per_s_per_core": round(n_smp / ph.wall / workers, 1),
                     "cpu_s": round(cpu[name], 2), "images_per_cpu_s": round(n_img / cpu[name], 1),
                     "machine_busy": round(ph.machine_busy, 2), "load_avg_1min": round(ph.load, 2)})
    serial_share = serial.cpu / serial.wall  # < 1: other processes took part of our core
    total = sum(split.values())
    ratio = out[f"ray{args.workers}"].wall and out["ray1"].wall / out[f"ray{args.workers}"].wall
    ratio_serial = serial.wall / out[f"ray{args.workers}"].wall
    per_core = rows[0]["images_per_s_per_core"]
    per_cpu_s = rows[0]["images_per_cpu_s"]
    # LVIS v1 train on 16 cores: the measured per-core rate, scaled with the measured efficiency.
    efficiency = ratio / args.workers
    lvis_images = 100_000
    proj_s = lvis_images / (per_core * 16 * efficiency)
    proj_cpu_s = lvis_images / (per_cpu_s * 16 * min(efficiency, 1.0))

    print(f"\n{n_img} images -> {n_smp} samples ({manifest['images_with_pair']} images with a pair), "
          f"{args.objects[0]}-{args.objects[1]} objects an image, pairing={args.pairing}, shard_size={args.shard_size}")
    print(f"{'run':8} {'workers':>7} {'wall s':>8} {'img/s':>8} {'smp/s':>8} {'img/s/core':>11} "
          f"{'smp/s/core':>11} {'img/cpu-s':>10} {'busy':>5} {'load':>5}")
    for r in rows:
        print(f"{r['run']:8} {r['workers']:>7} {r['wall_s']:>8} {r['images_per_s']:>8} {r['samples_per_s']:>8} "
              f"{r['images_per_s_per_core']:>11} {r['samples_per_s_per_core']:>11} {r['images_per_cpu_s']:>10} "
              f"{r['machine_busy']:>5} {r['load_avg_1min']:>5}")
    print("(img/s/core: wall clock; img/cpu-s: per CPU second the workers actually got, which other "
          "processes on a shared machine do not distort)")
    print("\ntime split of the one-process run (s, share):  " + "  ".join(
        f"{k} {v:.2f} ({v / total:.0%})" for k, v in split.items()))
    print(f"one-process run got {serial_share:.0%} of a core (CPU time / wall time)")
    print(f"\nFIGURE  {per_core} images/s per core wall clock, {rows[0]['images_per_cpu_s']} images per CPU "
          f"second (target >= 40/s per core) on {args.width}x{args.height}")
    print(f"RATIO   {ratio:.2f}x with {args.workers} Ray workers vs 1 Ray worker (target >= 1.8); "
          f"{ratio_serial:.2f}x vs the one-process baseline")
    print(f"outputs byte-identical across the three runs: {identical}")
    print(f"PROJECTION LVIS v1 train ({lvis_images} images) on 16 cores, {efficiency:.0%} scaling efficiency: "
          f"{proj_s / 60:.1f} min at the wall-clock rate, {proj_cpu_s / 60:.1f} min at the CPU-time rate "
          f"(16 uncontended cores)")
    result = {"images": n_img, "samples": n_smp, "width": args.width, "height": args.height, "runs": rows,
              "time_split_s": split, "serial_cpu_share": round(serial_share, 3), "ratio_vs_ray1": round(ratio, 3),
              "ratio_vs_serial": round(ratio_serial, 3), "identical": identical,
              "projection_lvis_16_cores_min": round(proj_s / 60, 2),
              "projection_lvis_16_cores_cpu_rate_min": round(proj_cpu_s / 60, 2), "cores": ncpu}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    if not identical:
        raise SystemExit("outputs differ between runs")
    return result


if __name__ == "__main__":
    main()
