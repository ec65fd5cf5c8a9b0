"""The Ray Train worker: ``train_loop_per_worker(config)`` runs on every rank of the TorchTrainer.

One step: the rank's batch (a pure function of seed, step and rank, see ``tasks.train.data``),
the model's ``training_loss`` under DDP (FSDP for the large preset), gradient clipping, AdamW, the
warm-up schedule, EMA. Every ``checkpoint_every`` steps rank 0 writes a checkpoint into a local
temporary folder (marker last) and hands it to ``ray.train.report``, which copies it to the run
folder in storage and keeps the newest ``k``. A worker (re)started by ``FailureConfig`` resumes
from the newest committed checkpoint, so its batches, noise and weights continue exactly where the
checkpoint left them.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks import atomic
from tasks.train import checkpoint as ckpt
from tasks.train.data import PriorStore, StepBatches, scan_shards, step_loader
from tasks.train.spec import RunSpec


class InjectedFailure(RuntimeError):
    """Raised once by the ``train.fail_at_step`` test hook."""


def load_class(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class LossModule(nn.Module):
    """DDP and FSDP only synchronise through ``forward``: route ``training_loss`` through it."""

    def __init__(self, model: nn.Module, prediction_type: str, mask_weight: float):
        super().__init__()
        self.model = model
        self.prediction_type = prediction_type
        self.mask_weight = mask_weight

    def forward(self, batch: dict, generator: torch.Generator | None = None, gate_timesteps=None, **kwargs):
        if gate_timesteps is not None:  # the held-out gate probe, through forward for the same reason
            return gate_probe(self.model, batch, gate_timesteps, generator)
        return self.model.training_loss(batch, generator=generator, prediction_type=self.prediction_type,
                                        mask_weight=self.mask_weight, **kwargs)


def gate_probe(model: nn.Module, batch: dict, timesteps, generator: torch.Generator) -> list[list[tuple]]:
    """A batch of one held-out item, its target noised at each of ``timesteps`` (noise and latent
    drawn from ``generator``), objects always kept; one forward. Returns per timestep the per-ITB
    (weights, routed) maps of ``pipeline_pics.block_gates``."""
    from pics_model.pipeline_pics import block_gates

    dev, k = model.device, len(timesteps)
    latents = model.encode_images(batch["target"].to(dev), generator).to(model.dtype)
    latents = latents.expand(k, *latents.shape[1:])
    noise = torch.randn(latents.shape, generator=generator, device=dev, dtype=latents.dtype)
    t = torch.as_tensor(list(timesteps), device=dev, dtype=torch.long)
    noisy = model.noise_scheduler.add_noise(latents, noise, t)
    priors = batch.get("priors")
    codes = model.encode_objects(batch["objects"].to(dev), None if priors is None else priors.to(dev),
                                 None if priors is None else batch["prior_valid"].to(dev))

    def rep(x: torch.Tensor) -> torch.Tensor:
        return x.to(dev).repeat(k, *([1] * (x.ndim - 1)))

    valid = batch.get("object_valid")
    sink: list = []
    ctx = model.routing(rep(codes), rep(batch["routing_masks"]), None if valid is None else rep(valid), sink)
    model.denoise(noisy, t, rep(batch["hint"]), ctx)
    return [block_gates(sink, ctx, row=i) for i in range(k)]


def unwrap(module: nn.Module) -> nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A 63-bit seed per (run seed, step, rank, stream): noise independent of restarts."""
    h = hashlib.blake2b(f"{seed}/{step}/{rank}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def lr_lambda(spec: RunSpec):
    def f(step: int) -> float:
        if spec.warmup_steps and step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.lr_schedule == "cosine":
            span = max(1, spec.steps - spec.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - spec.warmup_steps) / span)))
        return 1.0
    return f


def to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_digest(model: nn.Module, names: list[str]) -> str:
    """SHA-256 over the named parameters' bytes: equal digests mean bit-identical weights."""
    params = dict(model.named_parameters())
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode())
        h.update(params[n].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def apply_speedups(model: nn.Module, spec: RunSpec) -> None:
    # Prefer the backbone's own switches; compile in place so state-dict keys keep their names.
    parts = [getattr(model, n) for n in ("unet", "controlnet") if isinstance(getattr(model, n, None), nn.Module)]
    if spec.grad_checkpointing:
        targets = [p for p in parts if hasattr(p, "enable_gradient_checkpointing")]
        if hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing()
        elif targets:
            for p in targets:
                p.enable_gradient_checkpointing()
        else:
            raise ValueError("train.grad_checkpointing: the model exposes no enable_gradient_checkpointing()")
    if spec.compile:
        for p in parts or [model]:
            p.compile()


def find_resume(reported: Path | None, run_dir: Path) -> tuple[ckpt.CheckpointState | None, str | None]:
    """The newest committed checkpoint among Ray's latest reported one (``reported``) and a scan
    of ``run_dir`` (which also finds checkpoints of a driver that died before Ray recorded them).
    Folders without a valid marker are ignored. Returns (state, path) or (None, None)."""
    best: tuple[int, str, ckpt.CheckpointState | None] | None = None
    if reported is not None and ckpt.is_committed(reported):
        state = ckpt.load_checkpoint(reported)
        best = (state.step, str(reported), state)
    scanned = ckpt.latest_committed(run_dir)
    if scanned is not None:
        step = int(ckpt.read_marker(scanned, verify=False)["step"])
        if best is None or step > best[0]:
            best = (step, str(scanned), None)
    if best is None:
        return None, None
    step, path, state = best
    return (state if state is not None else ckpt.load_checkpoint(path)), path


class Trainer:
    """State and steps of one rank. Built inside the worker; nothing here is pickled."""

    def __init__(self, spec: RunSpec):
        import ray.train
        import ray.train.torch

        self.spec = spec
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if self.world != spec.num_workers:
            raise RuntimeError(f"world size {self.world} != train.num_workers {spec.num_workers}")
        self.device = ray.train.torch.get_device()
        self.run_dir = Path(spec.run_dir)
        self.amp = spec.mixed_precision == "bf16"

        torch.manual_seed(spec.seed)
        np.random.seed(spec.seed % 2**32)
        random.seed(spec.seed)

        cls = load_class(spec.model_class)
        self.model = cls.from_pretrained(spec.init_dir)
        # train() now, before any forward: PICSModel's train() is what switches the frozen object
        # backbone's BatchNorm to eval; a fresh model still has it in batch-statistics mode
        self.model.train()
        self.params = list(self.model.set_trainable(spec.trainable))
        ids = {id(p) for p in self.params}
        self.param_names = [n for n, p in self.model.named_parameters() if id(p) in ids]
        if not self.param_names:
            raise ValueError(f"train.trainable={spec.trainable!r} selects no parameters")
        apply_speedups(self.model, spec)
        self.caches = {}
        if spec.feature_cache:
            from tasks.train.cache import attach_feature_cache

            self.caches = attach_feature_cache(self.model, objects=spec.augment is None, max_mb=spec.feature_cache_mb)
        # held-out loss without conditioning dropout: it measures the conditional denoiser
        accepts = inspect.signature(self.model.training_loss).parameters
        self.eval_kwargs = {"cond_drop_prob": 0.0} if "cond_drop_prob" in accepts else {}

        self.history: dict[str, list] = {"train": [], "loss": [], "heldout": [], "events": [], "quarantine": [],
                                         "occlusion": []}
        state, resumed_from = self._find_resume()
        if state is not None:
            self._load_weights(state)

        self.wrapper = LossModule(self.model, spec.prediction_type, spec.mask_weight)
        kwargs: dict[str, Any] = {}
        if spec.strategy == "ddp":
            # Trainable experts get no gradient on batches without their region (e.g. no overlap).
            kwargs = {"find_unused_parameters": True}
        elif spec.strategy == "fsdp":
            import functools

            from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

            kwargs = {"use_orig_params": True,  # frozen and trained weights share FSDP units
                      "auto_wrap_policy": functools.partial(size_based_auto_wrap_policy, min_num_params=int(2e7))}
        self.ddp = ray.train.torch.prepare_model(self.wrapper, parallel_strategy=spec.strategy,
                                                 parallel_strategy_kwargs=kwargs)
        if spec.strategy == "fsdp" and self.world > 1:
            # FSDP replaces the parameters by views of its flat shards: optimise those
            self.params = [p for p in self.ddp.parameters() if p.requires_grad]

        self.optimizer = torch.optim.AdamW(self.params, lr=spec.lr, betas=tuple(spec.betas),
                                           weight_decay=spec.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(spec))
        self.ema = None
        if spec.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=spec.ema_decay)
        self.step = 0
        if state is not None:
            self._load_trainer_state(state)
            self.history["events"].append({"step": self.step, "event": "resumed", "from": resumed_from,
                                           "time": time.time()})

    # -- checkpoints -------------------------------------------------------------------------
    def _find_resume(self) -> tuple[ckpt.CheckpointState | None, str | None]:
        import ray.train

        reported = ray.train.get_checkpoint()
        if reported is None:
            return find_resume(None, self.run_dir)
        with reported.as_directory() as d:  # a download when storage is remote
            return find_resume(Path(d), self.run_dir)

    def _load_weights(self, state: ckpt.CheckpointState) -> None:
        own = self.model.state_dict()
        unknown = sorted(set(state.weights) - set(own))
        missing = sorted(set(self.param_names) - set(state.weights))
        if unknown or missing:
            raise ckpt.CheckpointError(f"checkpoint does not match the model: unknown {unknown[:5]}, "
                                       f"missing {missing[:5]}")
        self.model.load_state_dict(state.weights, strict=False)

    def _load_trainer_state(self, state: ckpt.CheckpointState) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.ddp, self.optimizer, state.trainer["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state.trainer["scheduler"])
        if self.ema is not None:
            if state.ema is None:
                raise ckpt.CheckpointError("checkpoint has no EMA weights but train.ema_decay is set")
            self.ema.load_state_dict({**state.trainer["ema"],
                                      "shadow_params": [state.ema[n].to(self.device) for n in self.param_names]})
        set_rng_state(state.trainer["rng"])
        self.history = state.trainer["history"]
        self.history.setdefault("occlusion", [])  # checkpoints written before the gate probe existed
        self.step = state.step

    def save(self, metrics: dict, final: bool = False) -> None:
        """All ranks call this (FSDP gathers, and ray.train.report is a barrier)."""
        import ray.train
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(self.ddp, self.optimizer, options=opts)
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=ckpt.checkpoint_name(self.step))
            return
        keep = set(self.param_names) | {n for n, _ in self.model.named_buffers()}
        weights = {k.removeprefix("model."): v for k, v in model_sd.items() if k.removeprefix("model.") in keep}
        ema = None
        trainer: dict[str, Any] = {"optimizer": optim_sd, "scheduler": self.scheduler.state_dict(),
                                   "rng": rng_state(), "history": self.history}
        if self.ema is not None:
            ema_sd = self.ema.state_dict()
            ema = dict(zip(self.param_names, ema_sd.pop("shadow_params")))
            trainer["ema"] = ema_sd
        meta = {"final": final, "world_size": self.world, "param_names_sha": hashlib.sha256(
            "\n".join(self.param_names).encode()).hexdigest()}
        from ray.train import Checkpoint

        tmp = Path(tempfile.mkdtemp(prefix="pics-ckpt-"))
        try:
            ckpt.write_checkpoint(tmp / "c", ckpt.CheckpointState(self.step, weights, trainer, ema), meta)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(tmp / "c")),
                             checkpoint_dir_name=ckpt.checkpoint_name(self.step))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def heldout_loss(self, items: list[dict]) -> float:
        """Mean loss over ``items`` with fixed noise and timesteps per item (independent of the
        number of workers): rank r takes items r, r + W, ...; sums are all-reduced."""
        import torch.distributed as dist

        eval_model = self.ddp if self.spec.strategy == "fsdp" else self.wrapper
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        rounds = math.ceil(len(items) / self.world)
        for k in range(rounds):
            i = k * self.world + self.rank
            item = items[min(i, len(items) - 1)]
            gen = torch.Generator(self.device).manual_seed(step_seed(self.spec.seed, -1, i, stream=1))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss, _ = eval_model(to_device(item, self.device), gen, **self.eval_kwargs)
            if i < len(items):  # padding rounds keep FSDP's collectives in step; they do not count
                total += torch.tensor([float(loss), 1.0], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(total)
        self.model.train(was_training)
        return float(total[0] / total[1])

    @torch.no_grad()
    def heldout_occlusion(self, items: list[dict], truths: list) -> dict | None:
        """Occlusion-order accuracy of the gate on the held-out items (tasks/evaluate/occlusion.py)
        at ``spec.occlusion_timesteps``, fixed noise per item; rank r takes items r, r + W, ...
        and the per-item sums are all-reduced, so every rank returns the same summary. None when
        the probe is off or no item knows its occlusion order."""
        import torch.distributed as dist

        from tasks.evaluate import occlusion

        ts = list(self.spec.occlusion_timesteps)
        if not ts or not any(truths) or not hasattr(self.model, "token_counts"):
            return None
        lat = self.model.config.latent_size
        levels = [int(math.isqrt(n)) for n in self.model.token_counts((lat, lat))]
        nl = len(levels)
        width = 2 * len(ts) * nl + 2 * nl
        rows = torch.zeros(len(items), width, dtype=torch.float64)
        eval_model = self.ddp if self.spec.strategy == "fsdp" else self.wrapper
        was_training = self.model.training
        self.model.eval()
        for k in range(math.ceil(len(items) / self.world)):
            i = k * self.world + self.rank
            item = items[min(i, len(items) - 1)]
            gen = torch.Generator(self.device).manual_seed(step_seed(self.spec.seed, -1, i, stream=2))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                gates = eval_model(to_device(item, self.device), gen, gate_timesteps=ts)
            if i < len(items) and truths[i]:  # padding rounds keep FSDP's collectives in step
                st = occlusion.sample_stats(gates, truths[i], levels)
                rows[i] = torch.from_numpy(np.concatenate([st["credit"].ravel(), st["ties"].ravel(),
                                                           st["routed"], st["pixels"]]))
        if self.world > 1:
            dist.all_reduce(rows)
        self.model.train(was_training)
        a = rows.numpy()
        n_sl = len(ts) * nl
        stats = [{"levels": levels, "credit": r[:n_sl].reshape(len(ts), nl),
                  "ties": r[n_sl:2 * n_sl].reshape(len(ts), nl),
                  "routed": r[2 * n_sl:2 * n_sl + nl], "pixels": r[2 * n_sl + nl:]} for r in a]
        out = occlusion.summarize(stats)
        if out is not None:
            out["occlusion_by_timestep"] = dict(zip(map(str, ts), out.pop("occlusion_curve", [])))
        return out

    def evaluate_heldout(self, heldout: list[dict], truths: list, weights: str) -> None:
        """The held-out loss and the gate's occlusion accuracy at this step, into the history."""
        self.history["heldout"].append({"step": self.step, "loss": self.heldout_loss(heldout), "weights": weights})
        occ = self.heldout_occlusion(heldout, truths)
        if occ is not None:
            self.history["occlusion"].append({"step": self.step, "weights": weights, **occ})

    # -- the loop ----------------------------------------------------------------------------
    def run(self, make_batch, heldout: list[dict], samples_fn=None, truths: list | None = None) -> None:
        import torch.distributed as dist

        spec = self.spec
        truths = truths or []
        index = scan_shards(spec.shards_dir, "train")
        if self.step == 0 and not self.history["heldout"]:
            self.evaluate_heldout(heldout, truths, "raw")
        if self.step >= spec.steps:
            return
        dataset = StepBatches(index, make_batch, self.step, spec.steps, self.rank, self.world,
                              spec.per_rank_batch, spec.seed)
        loader = iter(step_loader(dataset, spec.loader_workers))
        bar = None
        if self.rank == 0:
            from ray.experimental.tqdm_ray import tqdm

            bar = tqdm(total=spec.steps, desc="train", position=0)
            bar.update(self.step)
        self.model.train()
        window = {"t": 0.0, "data": 0.0, "n": 0}
        while self.step < spec.steps:
            t0 = time.perf_counter()
            step, (batch, quarantined) = next(loader)
            assert step == self.step, (step, self.step)
            t_data = time.perf_counter() - t0
            self.history["quarantine"] += quarantined
            batch = to_device(batch, self.device)
            gen = torch.Generator(self.device).manual_seed(step_seed(spec.seed, step, self.rank))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss, stats = self.ddp(batch, gen)
            loss.backward()
            if hasattr(self.ddp, "clip_grad_norm_"):  # FSDP: the norm over every rank's shard
                grad_norm = self.ddp.clip_grad_norm_(spec.grad_clip)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, spec.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.step(self.params)
            self.step += 1
            mean_loss = loss.detach().float().cpu()
            if self.world > 1:
                dist.all_reduce(mean_loss)
                mean_loss /= self.world
            window["t"] += time.perf_counter() - t0
            window["data"] += t_data
            window["n"] += 1
            self.history["loss"].append([self.step, float(mean_loss)])
            if bar is not None:
                bar.update(1)
            if self.step % spec.log_every == 0 or self.step == spec.steps:
                self._log(float(mean_loss), float(grad_norm), window)
                window = {"t": 0.0, "data": 0.0, "n": 0}
            self._maybe_fail()
            if spec.eval_every and self.step % spec.eval_every == 0 and self.step < spec.steps:
                self.evaluate_heldout(heldout, truths, "raw")
            if samples_fn is not None and self.rank == 0 and spec.sample_every and (
                    self.step % spec.sample_every == 0 or self.step == spec.steps):
                samples_fn(self.model, self.step)
            if self.step % spec.checkpoint_every == 0 and self.step < spec.steps:
                self.save({"step": self.step, "loss": float(mean_loss)})
        if bar is not None:
            bar.close()

    def finish(self, heldout: list[dict], truths: list | None = None) -> None:
        """Final held-out losses and occlusion accuracies (raw and EMA weights), per-rank digests,
        the final checkpoint."""
        import torch.distributed as dist

        if self.history.get("rank_digests") and self.step >= self.spec.steps:
            return  # resumed from the final checkpoint itself: nothing left to do or to write
        done = {h["weights"] for h in self.history["heldout"] if h["step"] == self.spec.steps}
        truths = truths or []
        if "raw" not in done:
            self.evaluate_heldout(heldout, truths, "raw")
        if self.ema is not None and "ema" not in done:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
            self.evaluate_heldout(heldout, truths, "ema")
            self.ema.restore(self.params)
        digest = weights_digest(self.model, self.param_names) if self.spec.strategy != "fsdp" else None
        digests = [digest] * self.world
        if self.world > 1:
            dist.all_gather_object(digests, digest)
        self.history["rank_digests"] = digests
        last = self.history["loss"][-1][1] if self.history["loss"] else float("nan")
        self.save({"step": self.step, "loss": last}, final=True)

    def _log(self, loss: float, grad_norm: float, window: dict) -> None:
        spec = self.spec
        sps = spec.global_batch * window["n"] / max(window["t"], 1e-9)
        row = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
               "samples_per_s": sps, "data_wait_frac": window["data"] / max(window["t"], 1e-9),
               "mem_mb": memory_mb(self.device), "time": time.time()}
        for name, cache in self.caches.items():
            row[f"cache_{name}_hit_rate"] = cache.stats()["hit_rate"]
        if spec.flops_per_sample and spec.peak_flops_per_worker:
            row["mfu"] = spec.flops_per_sample * sps / (spec.peak_flops_per_worker * self.world)
        self.history["train"].append(row)
        if self.rank == 0:
            # A live, non-authoritative log for people watching; the checkpoint holds the history.
            line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                            if k != "time")
            print(f"[train] {line}", flush=True)

    def _maybe_fail(self) -> None:
        spec = self.spec
        if spec.fail_at_step is None or self.step != spec.fail_at_step or self.rank != spec.fail_rank:
            return
        flag = self.run_dir / f".injected-failure-{spec.fail_at_step}"
        if flag.exists():
            return
        atomic.write_bytes(flag, b"1")
        print(f"[train] injecting a failure on rank {self.rank} after step {self.step} ({spec.fail_mode})", flush=True)
        if spec.fail_mode == "exit":
            os._exit(3)  # a killed worker: no exception, no clean-up
        raise InjectedFailure(f"injected failure after step {self.step} on rank {self.rank}")


def train_loop_per_worker(config: dict) -> None:
    from tasks.evaluate.occlusion import occlusion_truth
    from tasks.shards import decode_sample
    from tasks.train.batches import heldout_items, heldout_rows

    spec = RunSpec.from_dict(config)
    trainer = Trainer(spec)
    priors = PriorStore(spec.priors_dir) if spec.priors_dir else None
    builder = load_class(spec.batch_builder)(resolution=spec.resolution, augment=spec.augment, priors=priors,
                           object_size=spec.object_size, collage=trainer.model.config.collage_hint)
    rows = heldout_rows(spec)
    heldout = heldout_items(spec, builder, rows)
    # which object is visible where they occlude (embedded data: amodal masks); empty elsewhere
    truths = [occlusion_truth(decode_sample(r)) for r in rows] if spec.occlusion_timesteps else []
    samples = None
    if spec.sample_every and spec.strategy != "fsdp":  # FSDP: rank 0 alone cannot run the sharded model
        from tasks.train.samples import SampleWriter

        samples = SampleWriter(spec, builder, heldout)
    trainer.run(builder, heldout, samples, truths)
    trainer.finish(heldout, truths)
