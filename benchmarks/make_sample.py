"""make_sample throughput: images/s rendered, one process vs Ray workers, time split.

    python benchmarks/make_sample.py [--images 160] [--width 320] [--height 240] [--workers 2]

Renders the same images (the default embedded dataset's parameters) twice with the same code:

1. one process, no Ray, no Prefect: the baseline, with the layout / render / annotate /
   encode+write split (layout includes the height-map renders used for placement)
2. Ray, ``--workers`` tasks in flight, chunks of ``chunk_size`` images, each worker reusing
   one OpenGL renderer

and checks both outputs are byte-identical. The ratio is (2) over (1) on rendering wall time;
Ray start-up (and each worker's first pyrender import, a one-off per worker) is printed apart and
also folded into an end-to-end ratio. Prefect's flow start is left out: it does not scale with
images. CPU figures: llvmpipe (Mesa's software OpenGL) unless a GPU EGL device is present.
Other processes on the machine skew every figure: the load average is printed beside them.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.runtime import configure_environment  # noqa: E402

configure_environment()

from tasks.make_sample import dataset  # noqa: E402
from tasks.params import MakeSampleParams  # noqa: E402
from tasks.runtime import init_ray  # noqa: E402


def _write(p: MakeSampleParams, out: Path, results: list[dict]) -> None:
    (out / dataset.ANNOTATIONS).write_bytes(dataset.dumps(dataset.assemble(p, results)))


def baseline(p: MakeSampleParams, out: Path) -> tuple[float, dict, list[dict]]:
    dataset.render_images(p, [0], out / "warmup")  # the renderer's first context and shaders
    t0, c0 = time.perf_counter(), time.process_time()
    results = dataset.render_images(p, list(range(p.num_images)), out / dataset.IMAGES)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    split = {k: sum(r["timing"][k] for r in results) for k in results[0]["timing"]}
    split["cpu_s"] = cpu
    _write(p, out, results)
    return wall, split, results


def on_ray(p: MakeSampleParams, out: Path, workers: int) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    ray = init_ray(num_cpus=workers, object_store_mb=300)
    remote = ray.remote(num_cpus=1)(dataset.render_images)
    ray.get([remote.remote(p, [0], str(out / "warmup")) for _ in range(workers)])  # start workers
    t_start = time.perf_counter() - t0
    t1 = time.perf_counter()
    parts = dataset.chunks(p.num_images, p.chunk_size)
    chunks = ray.get([remote.remote(p, c, str(out / dataset.IMAGES)) for c in parts])
    wall = time.perf_counter() - t1
    _write(p, out, [r for c in chunks for r in c])
    ray.shutdown()
    return wall, t_start, t_start + wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=20)
    a = ap.parse_args()
    p = MakeSampleParams(num_images=a.images, width=a.width, height=a.height, chunk_size=a.chunk_size)
    keep = os.environ.get("PICS_BENCH_KEEP")
    with tempfile.TemporaryDirectory(prefix="pics-bench-ms-") as tmp:
        tmp = keep or tmp
        one, many = Path(tmp) / "one", Path(tmp) / "ray"
        load0 = os.getloadavg()[0]
        w1, split, results = baseline(p, one)
        wr, t_start, e2e = on_ray(p, many, a.workers)
        load1 = os.getloadavg()[0]
        same = filecmp.cmp(one / dataset.ANNOTATIONS, many / dataset.ANNOTATIONS, shallow=False) and all(
            filecmp.cmp(f, many / dataset.IMAGES / f.name, shallow=False) for f in (one / dataset.IMAGES).iterdir())
    n = p.num_images
    inst = sum(len(r["annotations"]) for r in results)
    print(f"make_sample benchmark: {n} images {p.width}x{p.height}, {inst} instances, cores={os.cpu_count()}, "
          f"load average {load0:.1f} -> {load1:.1f}")
    print(f"  1 process : {w1:6.2f} s  {n / w1:6.2f} images/s  (cpu {split['cpu_s']:.2f} s, "
          f"{1000 * split['cpu_s'] / n:.0f} ms cpu/image incl. llvmpipe threads)")
    print("    split   : " + ", ".join(f"{k} {v:.2f} s ({100 * v / w1:.0f}%)"
                                       for k, v in split.items() if k != "cpu_s"))
    print(f"  ray x{a.workers}    : {wr:6.2f} s  {n / wr:6.2f} images/s  (+{t_start:.2f} s Ray start and worker warm-up)")
    print(f"  ratio ray/1 (rendering): {w1 / wr:.2f}x   end to end incl. Ray start: {w1 / e2e:.2f}x")
    print(f"  outputs byte-identical: {same}")
    if not same or inst < n:
        sys.exit(1)  # a benchmark of a broken renderer is no figure


if __name__ == "__main__":
    main()
