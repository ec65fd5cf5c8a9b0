"""render_priors throughput: views/s per core at 224 px (EGL, OSMesa) and objects/s end to end,
against the naive way (a new renderer per view), all measured in this run.

    python benchmarks/render_priors.py [--views 6] [--resolution 224] [--variants 4] [--workers 2]

Inputs are real: every instance of the COCO/LVIS fixtures in ../shared/data whose image is there
(cats, remotes, couch, bed, people, a baseball scene), cut like decompose cuts patches, each in
``--variants`` orientations (flips / quarter turns) so that there are enough distinct objects.

Part 1, per core: one child process per GL platform, pinned to one CPU with llvmpipe limited to
one thread (LP_NUM_THREADS=1), so its rate is a per-core rate:
  * ours: one renderer reused for every view of every object (``MultiViewRenderer.render``: mesh
    upload + shading bake + K views), and the steady state of the same scene re-rendered;
  * naive: a new OffscreenRenderer (GL context) per view, same shading;
  * pyrender defaults: reused renderer but pyrender's lit PBR shader and 4x MSAA;
  * objects/s in one process: PNG decode -> reconstruct -> K views -> PNG/depth encode, ours vs naive.
Part 2, the stage: ``run_serial`` (one process, no Ray; the baseline) and the pipeline's fan-out
(``flows.sharded.run_shards``: a Prefect task per shard, each one Ray task) with 1 and ``--workers``
workers on the same sample shard (reading, writing parquet and Prefect's 15-35 ms per shard task
included). Ray start-up, the Prefect server and worker warm-up are paid before timing.

This machine is a shared 2-core CPU box (Mesa llvmpipe, no GPU was lent): the load average is
printed beside the figures. Other processes skew every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import Clock  # noqa: E402  (the repository is on the path now)
SHARED = Path(os.environ.get("PICS_SHARED_DATA", REPO.parent / "shared" / "data"))


def real_objects(variants: int) -> list[dict]:
    import numpy as np

    from tasks.render_priors.coco_objects import load_objects

    objs = load_objects(SHARED / "coco_hf_39769/instances_39769.json", SHARED / "coco_hf_39769")
    objs += load_objects(SHARED / "coco_mmpose/test_coco.json", SHARED / "coco_mmpose")
    objs += load_objects(SHARED / "lvis/lvis_val_100.json", SHARED / "lvis/images")
    ops = [lambda a: a, lambda a: a[:, ::-1], lambda a: np.rot90(a, 1), lambda a: np.rot90(a, 3)]
    return [dict(o, patch=np.ascontiguousarray(f(o["patch"])), mask=np.ascontiguousarray(f(o["mask"])))
            for f in ops[:variants] for o in objs]


# ---------------------------------------------------------------- part 1: one pinned process --

def child(platform: str, views: int, resolution: int, variants: int, naive_objects: int) -> dict:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import numpy as np

    from pics_model.geometry import MultiViewRenderer, RendererError, get_reconstructor
    from tasks.render_priors.coco_objects import png_bytes
    from tasks.codec import decode_png, encode_rgba
    from tasks.render_priors.work import encode_depth

    try:
        r = MultiViewRenderer(resolution=resolution, num_views=views, elevation_deg=15.0, platform=platform)
    except RendererError as e:
        return {"platform": platform, "unavailable": str(e)}
    pr = r._pr
    objs = real_objects(variants)
    recon = get_reconstructor("builtin", grid_size=64)
    blobs = [(png_bytes(o["patch"]), png_bytes(o["mask"])) for o in objs]
    t = time.perf_counter()
    meshes = [recon(o["patch"], o["mask"] > 127) for o in objs]
    recon_s = time.perf_counter() - t
    r.render(meshes[0])  # shader compile, first context use

    with Clock() as ours:
        for m in meshes:
            r.render(m)
    n_views = len(meshes) * views

    # steady state: one mesh in the scene, only the camera moves (no upload, no bake)
    node = r._scene.add(r.to_pyrender(meshes[0]))
    center, radius, dist = r.frame(meshes[0].vertices)
    poses = r.poses(center, dist)
    r._camera.znear, r._camera.zfar = dist - 1.01 * radius, dist + 1.01 * radius
    reps = 20
    with Clock() as steady:
        for i in range(reps * views):
            r._scene.set_pose(r._camera_node, poses[i % views])
            r._renderer.render(r._scene, flags=pr.RenderFlags.FLAT)
    r._scene.remove_node(node)

    def naive_views(mesh):
        """A fresh GL context per view: what reuse saves."""
        center, radius, dist = r.frame(mesh.vertices)
        out = []
        for pose in r.poses(center, dist):
            ren = pr.OffscreenRenderer(resolution, resolution)
            scene = pr.Scene(bg_color=[0, 0, 0, 0])
            scene.add(r.to_pyrender(mesh))
            scene.add(pr.PerspectiveCamera(yfov=r.yfov, znear=dist - 1.01 * radius, zfar=dist + 1.01 * radius),
                      pose=pose)
            out.append(ren.render(scene, flags=pr.RenderFlags.FLAT))
            ren.delete()
        return out

    def end_to_end(blob_list, naive: bool) -> None:
        for pb, mb in blob_list:
            mesh = recon(decode_png(pb, "rgb"), decode_png(mb, "gray") >= 128)
            if naive:
                res = naive_views(mesh)
                color = [c for c, _ in res]
                depth = [d for _, d in res]
                for c, d in zip(color, depth):
                    encode_rgba(np.dstack([c, (d > 0).astype(np.uint8) * 255]))
                    encode_depth(d)
            else:
                v = r.render(mesh)
                for c, d in zip(v.color, v.depth):
                    encode_rgba(c)
                    encode_depth(d)

    with Clock() as e2e:
        end_to_end(blobs, naive=False)
    # the naive paths last: each pyrender renderer they delete terminates the shared EGL display
    sub = meshes[:naive_objects]
    with Clock() as naive:
        for m in sub:
            naive_views(m)

    # pyrender's defaults: lit PBR shader, 4x MSAA framebuffer (EGL only: OSMesa has no MSAA path)
    default = pr.OffscreenRenderer(resolution, resolution)
    with Clock() as defaults:
        for m in sub:
            center, radius, dist = r.frame(m.vertices)
            scene = pr.Scene(bg_color=[0, 0, 0, 0], ambient_light=[0.3] * 3)
            scene.add(pr.Mesh.from_trimesh(m))
            cam = scene.add(pr.PerspectiveCamera(yfov=r.yfov, znear=dist - 1.01 * radius, zfar=dist + 1.01 * radius))
            light = scene.add(pr.DirectionalLight(intensity=3.0))
            for pose in r.poses(center, dist):
                scene.set_pose(cam, pose)
                scene.set_pose(light, pose)
                default.render(scene, flags=pr.RenderFlags.RGBA)
    default.delete()
    with Clock() as e2e_naive:
        end_to_end(blobs[:naive_objects], naive=True)

    def rate(n, clock):
        return {"wall": round(n / clock.wall, 1), "cpu": round(n / clock.cpu, 1),
                "cpu_share": round(clock.cpu / clock.wall, 2)}

    return {
        "platform": platform, "gl_renderer": r.gl_renderer, "objects": len(meshes),
        "mean_faces": round(sum(len(m.faces) for m in meshes) / len(meshes)),
        "reconstruct_ms_per_object": round(1e3 * recon_s / len(meshes), 2),
        "views_per_s_ours": rate(n_views, ours),
        "views_per_s_steady": rate(reps * views, steady),
        "views_per_s_naive": rate(len(sub) * views, naive),
        "views_per_s_pyrender_defaults": rate(len(sub) * views, defaults),
        "objects_per_s_ours": rate(len(blobs), e2e),
        "objects_per_s_naive": rate(naive_objects, e2e_naive),
    }


def run_child(platform: str, args) -> dict:
    env = dict(os.environ, PYOPENGL_PLATFORM=platform, LP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--child", platform, "--views", str(args.views),
           "--resolution", str(args.resolution), "--variants", str(args.variants),
           "--naive-objects", str(args.naive_objects)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        return {"platform": platform, "error": res.stderr[-1500:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- part 2: the stage ----------

def stage(args, work: Path) -> dict:
    from flows.sharded import run_shards
    from tasks.params import RenderPriorsParams
    from tasks.render_priors import pipeline
    from tasks.render_priors.coco_objects import sample_row, write_sample_shard
    from tasks.runtime import init_ray

    objs = real_objects(args.variants)
    rows = [sample_row(f"s{i}", o["image_id"], [o]) for i, o in enumerate(objs)]
    samples = work / "samples"
    write_sample_shard(samples / "shards" / "shard-00000.parquet", rows)
    n = len(objs)
    shard = max(1, n // (2 * args.workers))  # a few shards per worker

    def params(out, shard_size=shard):
        return RenderPriorsParams(samples=str(samples), out=str(out), num_views=args.views,
                                  resolution=args.resolution, shard_size=shard_size)

    t = time.perf_counter()
    manifest, results = pipeline.run_serial(params(work / "serial"), samples, work / "serial")
    serial_s = time.perf_counter() - t

    init_ray(num_cpus=args.workers, object_store_mb=300)
    plan = pipeline.prepare(params(work / "warm", shard_size=1), samples, work / "warm")
    plan.works[args.workers * 2:] = []
    run_shards(pipeline.RENDER_PRIORS, plan, args.workers)  # workers up, GL contexts made

    ray_s = {}
    for workers in (1, args.workers):
        out = work / f"ray{workers}"
        t = time.perf_counter()
        plan = pipeline.prepare(params(out), samples, out)
        res = run_shards(pipeline.RENDER_PRIORS, plan, workers)
        pipeline.finalize(plan, res, time.perf_counter() - t)
        ray_s[workers] = time.perf_counter() - t
    split = pipeline.sum_timings(results)
    return {
        "objects": n, "rendered": manifest["rendered"], "quarantined": manifest["quarantined"],
        "objects_per_s_serial": round(n / serial_s, 2),
        "objects_per_s_ray_1": round(n / ray_s[1], 2),
        f"objects_per_s_ray_{args.workers}": round(n / ray_s[args.workers], 2),
        "serial_split_s": split,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--variants", type=int, default=4, help="orientations of each real object (1-4)")
    ap.add_argument("--naive-objects", type=int, default=6, help="objects for the slow naive paths")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--platforms", default="egl,osmesa")
    ap.add_argument("--skip-stage", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.views, args.resolution, args.variants, args.naive_objects)))
        return
    if not SHARED.is_dir():
        raise SystemExit(f"real fixtures not found at {SHARED} (set PICS_SHARED_DATA)")
    print(f"render_priors benchmark: {args.views} views at {args.resolution} px, CPU only (no GPU lent), "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    report = {"per_core": [run_child(p, args) for p in args.platforms.split(",")]}
    for r in report["per_core"]:
        if "views_per_s_ours" not in r:
            print(f"\n[{r['platform']}] not measured: {r.get('unavailable') or r.get('error')}")
            continue
        print(f"\n[{r['platform']}] {r['gl_renderer']}, pinned to one core, {r['objects']} real objects "
              f"(~{r['mean_faces']} faces each; reconstruct {r['reconstruct_ms_per_object']} ms/object)")
        print("  rates per wall second | per CPU second of this process (= per core when the core is ours)"
              " | CPU share it got")

        def line(label, key, base=None):
            v = r[key]
            ratio = f"   ours x{r[base]['cpu'] / v['cpu']:.1f} (CPU), x{r[base]['wall'] / v['wall']:.1f} (wall)" if base else ""
            print(f"  {label:<62} {v['wall']:8.1f} | {v['cpu']:8.1f} | {v['cpu_share']:.2f}{ratio}")

        line("views/s, ours (reused renderer; upload + bake per object)", "views_per_s_ours")
        line("views/s, ours steady state (only the camera moves)", "views_per_s_steady")
        line("views/s, naive (new renderer per view)", "views_per_s_naive", "views_per_s_ours")
        line("views/s, pyrender defaults (lit PBR shader, 4x MSAA, reused)", "views_per_s_pyrender_defaults",
             "views_per_s_ours")
        line("objects/s end to end, ours (decode, reconstruct, render, encode)", "objects_per_s_ours")
        line("objects/s end to end, naive", "objects_per_s_naive", "objects_per_s_ours")
        best = r["views_per_s_ours"]["cpu"]
        print(f"  target >= 150 views/s per core (per CPU second, ours): {'met' if best >= 150 else 'NOT met'}")
    if not args.skip_stage:
        work = Path(tempfile.mkdtemp(prefix="bench-priors-"))
        try:
            import flows  # noqa: F401  (offline Prefect/Ray environment before Prefect is imported)
            from prefect import flow

            s = flow(name="benchmark-render-priors")(lambda: stage(args, work))()  # as the pipeline runs it
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report["stage"] = s
        print(f"\n[stage, EGL] {s['objects']} objects: serial {s['objects_per_s_serial']} objects/s, Ray 1 worker "
              f"{s['objects_per_s_ray_1']}, Ray {args.workers} workers {s[f'objects_per_s_ray_{args.workers}']} "
              f"objects/s (x{s[f'objects_per_s_ray_{args.workers}'] / s['objects_per_s_ray_1']:.2f} over 1 worker)")
        print(f"  serial time split (s): {s['serial_split_s']}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
