"""The driver side of a training run: the initial model, the Ray Train TorchTrainer.

``prepare_init`` builds the starting model once per run (tiny: with its autoencoder fitted on the
training images) and saves it atomically to ``<run_dir>/init``; every worker loads it from there,
so all ranks start from the same weights and a restarted run starts from the same init.
``fit`` runs the TorchTrainer (every worker gets the plan, with its typed params) and returns
the newest committed checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from tasks import atomic
from tasks.params import ParamsError
from tasks.train import checkpoint as ckpt
from tasks.train.autoencoder import fit_autoencoder
from tasks.train.fault_injection import from_env as failure_from_env
from tasks.train.plan import Flops, RunPlan, check_resources

INIT_INFO = "init_info.json"


def build_model(plan: RunPlan):
    from pics_model.modeling_pics import PICSModel

    torch.manual_seed(plan.params.train.seed)
    model = PICSModel(plan.params.model.pics_config())
    # the saved config must say what the network learns to predict, or samplers read v as epsilon
    model.set_prediction_type(plan.params.train.prediction_type)
    return model


def _targets(plan: RunPlan, split: str, limit: int | None = None) -> torch.Tensor:
    """Training targets as the model sees them ([-1, 1], square, at the preset's resolution)."""
    from tasks.train.batches import BatchBuilder, rows_of_split

    builder = BatchBuilder(resolution=plan.resolution, augment=None, priors=None)
    items = [builder.item(row, seed=i) for i, row in enumerate(rows_of_split(plan.shards_dir, split, limit))]
    return torch.stack([it["target"] for it in items]) if items else torch.empty(0, 3, plan.resolution, plan.resolution)


def prepare_init(plan: RunPlan, log=print) -> dict:
    """Build and save the starting model unless ``<run_dir>/init`` already holds it."""
    info_path = plan.run_dir / INIT_INFO
    if (plan.init_dir / "config.json").exists() and info_path.exists():
        return json.loads(info_path.read_text())
    t = plan.params.train
    model = build_model(plan)
    info: dict = {"preset": plan.params.model.preset, "autoencoder": None}
    if model.config.vae.kind == "pixel_shuffle":
        info["autoencoder"] = exact_autoencoder_info(plan, model, log)
    elif plan.params.model.preset == "tiny" and t.autoencoder_steps > 0:
        train_x = _targets(plan, "train")
        test_x = _targets(plan, "test", limit=64)
        if len(test_x) == 0:  # no test split: measure on training images and say so
            test_x, info["autoencoder_heldout"] = train_x[:64], "train images (no test split)"
        log(f"[train] fitting the tiny autoencoder on {len(train_x)} training images ({t.autoencoder_steps} steps)")
        info["autoencoder"] = fit_autoencoder(
            model.vae, train_x, test_x, steps=t.autoencoder_steps, lr=t.autoencoder_lr,
            batch_size=t.autoencoder_batch, seed=t.seed, log=log)
        model.calibrate_vae_scaling(train_x)
        info["vae_scaling_factor"] = float(model.vae.config.scaling_factor)
        log(f"[train] autoencoder PSNR {info['autoencoder']['psnr_before']:.2f} -> "
            f"{info['autoencoder']['psnr_after']:.2f} dB (held-out), posterior std "
            f"{info['autoencoder']['posterior_std']:.3f} of the latent spread")
    elif plan.params.model.preset == "tiny":
        info["autoencoder"] = "not fitted (train.autoencoder_steps=0): random VAE"
    with atomic.atomic_dir(plan.init_dir) as tmp:
        model.save_pretrained(tmp)
    atomic.write_json(info_path, info)
    return info


def exact_autoencoder_info(plan: RunPlan, model, log=print) -> dict:
    """The invertible latent needs no fitting: calibrate its scale and measure its held-out PSNR
    (reconstruction_psnr floors the error at 1e-10, so an exact round trip reads 100 dB)."""
    from tasks.train.autoencoder import posterior_std, reconstruction_psnr

    train_x = _targets(plan, "train", limit=256)
    test_x = _targets(plan, "test", limit=64)
    if len(test_x) == 0:
        test_x = train_x[:64]
    model.calibrate_vae_scaling(train_x)
    psnr = reconstruction_psnr(model.vae, test_x)
    log(f"[train] {model.config.vae.kind} latent (f={model.config.vae.factor}): held-out PSNR {psnr:.1f} dB, "
        f"scaling factor {model.config.vae.scaling_factor:.3f}")
    return {"kind": model.config.vae.kind, "psnr_before": psnr, "psnr_after": psnr,
            "posterior_std": posterior_std(model.vae, test_x), "steps": 0,
            "heldout_images": len(test_x), "scaling_factor": float(model.config.vae.scaling_factor)}


def peak_flops_per_worker(plan: RunPlan) -> tuple[float, str]:
    """Peak FLOP/s one worker can reach, and where the figure comes from."""
    t = plan.params.train
    if t.peak_tflops:
        return t.peak_tflops * 1e12, "train.peak_tflops"
    if t.use_gpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        dense_bf16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
        for key, value in dense_bf16.items():
            if key in name:
                return value, f"{name} dense bf16 datasheet"
    # CPU: the fp32 matmul rate of as many threads as a worker gets, measured here and now.
    threads = max(1, int(t.cpus_per_worker))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        a @ b
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            a @ b
            n += 1
        rate = 2 * 1024**3 * n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return rate, f"measured fp32 1024^3 matmul, {threads} thread(s)"


def fit(plan: RunPlan, flops: Flops | None = None, log=print) -> Path:
    """Run the TorchTrainer; returns the newest committed checkpoint of the run. ``flops``: the
    figures for the log's MFU column (None: no MFU)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tasks.runtime import init_ray
    from tasks.train.loop import train_loop_per_worker

    p = plan.params
    done = finished_checkpoint(plan)
    if done is not None:
        log(f"[train] {done} already holds the final step of this run; not training again")
        return done
    failure = failure_from_env(p.train.num_workers)  # a test hook, not a parameter
    ray = init_ray(p.ray.address, p.ray.num_cpus, p.ray.object_store_mb)
    check_resources(plan, ray.cluster_resources())
    removed = ckpt.remove_uncommitted(plan.run_dir)
    if removed:
        log(f"[train] removed {len(removed)} uncommitted checkpoint folder(s) left by a killed run")
    resume_from = ckpt.latest_committed(plan.run_dir)
    if resume_from is not None:
        ckpt.refuse_pickled_state(resume_from)  # here, in one line, not after every worker's retries
    t = p.train
    # Ray Train's print patch echoes each worker print twice on the driver; plain stdout suffices.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan, "flops": flops, "failure": failure},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(
            name=plan.run_name, storage_path=str(plan.run_root),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures)),
    )
    trainer.fit()
    final = ckpt.latest_committed(plan.run_dir)
    if final is None:
        raise RuntimeError(f"{plan.run_dir}: training ended without a committed checkpoint")
    return final


def finished_checkpoint(plan: RunPlan) -> Path | None:
    """The run's final checkpoint when it was already written (a repeated ``dvc repro`` or flow)."""
    latest = ckpt.latest_committed(plan.run_dir)
    if latest is None:
        return None
    marker = ckpt.read_marker(latest, verify=False)
    return latest if marker.get("final") and int(marker["step"]) >= plan.params.train.steps else None


def reset_run(plan: RunPlan) -> None:
    """``train.resume=false``: forget this run's checkpoints (and Ray's record of them)."""
    if plan.run_dir.exists():
        shutil.rmtree(plan.run_dir)


def ensure_startable(plan: RunPlan) -> None:
    if plan.params.train.use_gpu and not torch.cuda.is_available() and plan.params.ray.address is None:
        raise ParamsError("train.use_gpu=true but this machine has no CUDA device (and ray.address is unset)")
