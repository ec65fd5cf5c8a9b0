"""The train stage: PICS on Ray Train, from the decompose and render_priors shards.

    pics train [--set train.steps=50 --set train.num_workers=1 ...] [--params FILE]

Steps (each a Prefect task): plan and validate (fails before any worker starts), build the
initial model (tiny: fit its autoencoder), run the TorchTrainer (crash-safe checkpoints, resume),
export ``<train.out>/final`` and write metrics, loss curves and sample composites.
"""
from __future__ import annotations

import time

import flows  # noqa: F401  (offline environment before Prefect/Ray are imported)
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import atomic
from tasks.params import Params, stage_params


def _log():
    try:
        return get_run_logger().info
    except Exception:  # noqa: BLE001 - outside a flow run
        return print


@task(name="train-plan", cache_policy=NO_CACHE)
def plan_task(params):
    from tasks.train.plan import plan_run
    from tasks.train.run import ensure_startable, reset_run

    plan = plan_run(params)
    ensure_startable(plan)
    if not params.train.resume:
        reset_run(plan)
    return plan


@task(name="train-init", cache_policy=NO_CACHE)
def init_task(plan):
    from tasks.train.run import prepare_init

    return prepare_init(plan, log=_log())


@task(name="train-fit", cache_policy=NO_CACHE)
def fit_task(plan, init_info):
    from pics_model.modeling_pics import PICSModel

    from tasks.train.plan import Flops
    from tasks.train.run import fit, peak_flops_per_worker

    model = PICSModel.from_pretrained(plan.init_dir)
    breakdown = model.flops_per_sample(with_priors=plan.priors_dir is not None)
    flops = float(breakdown["total"])
    peak, peak_src = peak_flops_per_worker(plan)
    del model
    t0 = time.perf_counter()
    final_ckpt = fit(plan, Flops(flops, peak), log=_log())
    return final_ckpt, {"flops_per_sample": flops, "flops_per_sample_breakdown": breakdown,
                        "peak_flops_per_worker": peak, "peak_flops_source": peak_src,
                        "wall_s": time.perf_counter() - t0}


@task(name="train-report", cache_policy=NO_CACHE)
def report_task(plan, init_info, final_ckpt, extra):
    from tasks.train.report import export_final, export_init, write_outputs

    exported = export_final(plan.init_dir, final_ckpt, plan.out / "final", use_ema=bool(plan.params.train.ema_decay))
    export_init(plan.init_dir, plan.out / "init")
    t = plan.params.train
    extra = {**extra, "final_weights": exported["weights"], "num_workers": t.num_workers,
             "global_batch": t.batch_size, "device": "gpu" if t.use_gpu else "cpu", "strategy": plan.strategy,
             "preset": plan.params.model.preset, "train_samples": plan.n_train, "test_samples": plan.n_test}
    metrics = write_outputs(plan.out, plan.run_dir, final_ckpt, init_info, extra)
    atomic.write_json(plan.out / "run.json", {"run_dir": str(plan.run_dir), "checkpoint": str(final_ckpt),
                                              "init": init_info})
    return metrics


@flow(name="train")
def train_flow(overrides: list[str] | None = None, params: Params | None = None) -> dict:
    """Train the PICS model; returns the metrics written to ``<train.out>/metrics.json`` plus paths."""
    params = stage_params(params, overrides)
    plan = plan_task(params)
    init_info = init_task(plan)
    final_ckpt, extra = fit_task(plan, init_info)
    metrics = report_task(plan, init_info, final_ckpt, extra)
    return {**metrics, "out": str(plan.out), "final": str(plan.out / "final"), "checkpoint": str(final_ckpt),
            "run_dir": str(plan.run_dir)}
