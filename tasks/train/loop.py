"""The Ray Train worker: ``train_loop_per_worker(config)`` runs on every rank of the TorchTrainer.

One step: the rank's batch (a pure function of seed, step and rank, see ``tasks.train.data``),
the model's ``training_loss`` under DDP (FSDP for the large preset), gradient clipping, AdamW, the
warm-up schedule, EMA. Every ``checkpoint_every`` steps the ranks save a checkpoint
(``tasks.train.state``); a worker (re)started by ``FailureConfig`` resumes from the newest
committed one. The parts are built by ``tasks.train.builders``; held-out evaluation is
``tasks.train.evaluation``.
"""
from __future__ import annotations

import resource
import time

import torch

from tasks.train import builders, state as st
from tasks.train.batches import BatchBuilder
from tasks.render_priors.store import PriorStore
from tasks.train.data import StepBatches, scan_shards, step_loader, step_seed, to_device
from tasks.train.evaluation import HeldOut, evaluate_heldout, load_heldout
from tasks.train.fault_injection import FailureInjection, maybe_fail
from tasks.train.plan import Flops, RunPlan


def build_state(plan: RunPlan) -> st.TrainState:
    """This rank's model, wrapper, optimizer, schedule and EMA, resumed from the newest committed
    checkpoint when there is one."""
    t = plan.params.train
    worker = builders.current_worker(plan)
    builders.seed_everything(t.seed)
    model, params, names = builders.build_model(plan)
    caches = builders.attach_caches(model, plan)
    resume, resumed_from = st.find_resume_of_worker(plan.run_dir)
    if resume is not None:  # before the wrapper broadcasts rank 0's weights
        st.load_weights(model, names, resume)
    loss_module = builders.LossModule(model, t.prediction_type, t.mask_weight, t.gate_loss_weight)
    net = builders.wrap_model(loss_module, plan.strategy)
    if plan.strategy == "fsdp" and worker.world > 1:
        # FSDP replaces the parameters by views of its flat shards: optimise those
        params = [p for p in net.parameters() if p.requires_grad]
    optimizer = builders.build_optimizer(params, t)
    ts = st.TrainState(worker, plan.strategy, model, loss_module, net, params, names, optimizer,
                       builders.build_scheduler(optimizer, t), builders.build_ema(params, t), caches)
    if resume is not None:
        st.restore(ts, resume, resumed_from)
    return ts


def train_step(ts: st.TrainState, batch: dict, seed: int, grad_clip: float) -> tuple[float, float, dict]:
    """One optimizer step on this rank's ``batch``; returns (loss averaged over ranks, grad norm,
    this rank's loss terms from ``training_loss``)."""
    import torch.distributed as dist

    w = ts.worker
    gen = torch.Generator(w.device).manual_seed(step_seed(seed, ts.step, w.rank))
    with w.autocast():
        loss, terms = ts.net(to_device(batch, w.device), gen)
    loss.backward()
    if hasattr(ts.net, "clip_grad_norm_"):  # FSDP: the norm over every rank's shard
        grad_norm = ts.net.clip_grad_norm_(grad_clip)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(ts.params, grad_clip)
    ts.optimizer.step()
    ts.scheduler.step()
    ts.optimizer.zero_grad(set_to_none=True)
    if ts.ema is not None:
        ts.ema.step(ts.params)
    ts.step += 1
    mean_loss = loss.detach().float().cpu()
    if w.world > 1:
        dist.all_reduce(mean_loss)
        mean_loss /= w.world
    return float(mean_loss), float(grad_norm), terms


def train(ts: st.TrainState, plan: RunPlan, builder: BatchBuilder, heldout: HeldOut, samples=None,
          flops: Flops | None = None, failure: FailureInjection | None = None) -> None:
    """Steps until ``train.steps``: log, evaluate, write samples and checkpoint on their cadences."""
    t, rank = plan.params.train, ts.worker.rank
    if ts.step == 0 and not ts.history["heldout"]:
        evaluate_heldout(ts, heldout, t.seed, "raw")
    if ts.step >= t.steps:
        return
    dataset = StepBatches(scan_shards(plan.shards_dir, "train"), builder, ts.step, t.steps, rank,
                          ts.worker.world, plan.per_rank_batch, t.seed)
    loader = iter(step_loader(dataset, t.loader_workers))
    bar = None
    if rank == 0:
        from ray.experimental.tqdm_ray import tqdm

        bar = tqdm(total=t.steps, desc="train", position=0)
        bar.update(ts.step)
    ts.model.train()
    window = {"t": 0.0, "data": 0.0, "n": 0}
    while ts.step < t.steps:
        t0 = time.perf_counter()
        step, (batch, quarantined) = next(loader)
        assert step == ts.step, (step, ts.step)
        t_data = time.perf_counter() - t0
        ts.history["quarantine"] += quarantined
        loss, grad_norm, terms = train_step(ts, batch, t.seed, t.grad_clip)
        window = {"t": window["t"] + time.perf_counter() - t0, "data": window["data"] + t_data, "n": window["n"] + 1}
        ts.history["loss"].append([ts.step, loss])
        if bar is not None:
            bar.update(1)
        if ts.step % t.log_every == 0 or ts.step == t.steps:
            log(ts, plan, loss, grad_norm, window, flops, terms.get("gate_loss"))
            window = {"t": 0.0, "data": 0.0, "n": 0}
        maybe_fail(failure, ts.step, rank, plan.run_dir)
        if t.eval_every and ts.step % t.eval_every == 0 and ts.step < t.steps:
            evaluate_heldout(ts, heldout, t.seed, "raw")
        if samples is not None and rank == 0 and t.sample_every and (
                ts.step % t.sample_every == 0 or ts.step == t.steps):
            samples(ts.model, ts.step)
        if ts.step % t.checkpoint_every == 0 and ts.step < t.steps:
            st.save(ts, {"step": ts.step, "loss": loss})
    if bar is not None:
        bar.close()


def finish(ts: st.TrainState, plan: RunPlan, heldout: HeldOut) -> None:
    """Final held-out losses and occlusion accuracies (raw and EMA weights), per-rank digests,
    the final checkpoint."""
    import torch.distributed as dist

    t = plan.params.train
    if ts.history.get("rank_digests") and ts.step >= t.steps:
        return  # resumed from the final checkpoint itself: nothing left to do or to write
    done = {h["weights"] for h in ts.history["heldout"] if h["step"] == t.steps}
    if "raw" not in done:
        evaluate_heldout(ts, heldout, t.seed, "raw")
    if ts.ema is not None and "ema" not in done:
        ts.ema.store(ts.params)
        ts.ema.copy_to(ts.params)
        evaluate_heldout(ts, heldout, t.seed, "ema")
        ts.ema.restore(ts.params)
    digest = st.weights_digest(ts.model, ts.param_names) if plan.strategy != "fsdp" else None
    digests = [digest] * ts.worker.world
    if ts.worker.world > 1:
        dist.all_gather_object(digests, digest)
    ts.history["rank_digests"] = digests
    last = ts.history["loss"][-1][1] if ts.history["loss"] else float("nan")
    st.save(ts, {"step": ts.step, "loss": last}, final=True)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def log(ts: st.TrainState, plan: RunPlan, loss: float, grad_norm: float, window: dict, flops: Flops | None,
        gate_loss: float | None = None) -> None:
    """One row of the training log (throughput over the window since the last row) into the history;
    gate_loss: rank 0's occlusion-order term of this step (train.gate_loss_weight > 0)."""
    sps = plan.params.train.batch_size * window["n"] / max(window["t"], 1e-9)
    row = {"step": ts.step, "loss": loss, "lr": ts.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
           "samples_per_s": sps, "data_wait_frac": window["data"] / max(window["t"], 1e-9),
           "mem_mb": memory_mb(ts.worker.device), "time": time.time()}
    for name, cache in ts.caches.items():
        row[f"cache_{name}_hit_rate"] = cache.stats()["hit_rate"]
    if gate_loss is not None:
        row["gate_loss"] = gate_loss
    if flops is not None:
        row["mfu"] = flops.per_sample * sps / (flops.peak_per_worker * ts.worker.world)
    ts.history["train"].append(row)
    if ts.worker.rank == 0:
        # A live, non-authoritative log for people watching; the checkpoint holds the history.
        line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                        if k != "time")
        print(f"[train] {line}", flush=True)


def train_loop_per_worker(config: dict) -> None:
    """``config``: {"plan": RunPlan, "flops": Flops | None, "failure": FailureInjection | None}."""
    plan: RunPlan = config["plan"]
    t = plan.params.train
    ts = build_state(plan)
    priors = PriorStore(plan.priors_dir) if plan.priors_dir else None
    builder = BatchBuilder(resolution=plan.resolution, augment=plan.augment, priors=priors,
                           object_size=plan.object_size, collage=ts.model.config.collage_hint)
    heldout = load_heldout(plan.shards_dir, t.heldout_samples, builder, t.occlusion_timesteps)
    samples = None
    if t.sample_every and plan.strategy != "fsdp":  # FSDP: rank 0 alone cannot run the sharded model
        from tasks.train.samples import SampleWriter

        samples = SampleWriter(t, builder, plan.shards_dir, plan.run_dir / "samples")
    train(ts, plan, builder, heldout, samples, config.get("flops"), config.get("failure"))
    finish(ts, plan, heldout)
