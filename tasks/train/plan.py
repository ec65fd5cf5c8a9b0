"""Everything checked before a worker starts: params, shards, priors, resources; and the run folder.

``plan_run`` turns validated params into a :class:`RunPlan` or raises ``ParamsError`` with a
message naming the parameter or file at fault. It touches no Ray state: the resource check
(:func:`check_resources`) runs after Ray is up, still before the trainer starts.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tasks.params import Params, ParamsError, resolve_path
from tasks.train.data import DataError, scan_shards, shard_files

# train.* keys that change how a run is executed or observed but not what it computes: they stay
# out of the run's identity, so changing them resumes the same run instead of starting over.
OPERATIONAL_KEYS = {"out", "num_workers", "use_gpu", "cpus_per_worker", "max_failures", "resume",
                    "loader_workers", "feature_cache", "feature_cache_mb", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every",
                    "sample_count", "sample_steps", "sample_guidance", "peak_tflops", "eval_every", "occlusion_timesteps"}


@dataclass
class RunPlan:
    params: Params
    out: Path
    run_root: Path  # RunConfig.storage_path
    run_name: str  # RunConfig.name; checkpoints live in run_root / run_name
    shards_dir: Path
    priors_dir: Path | None
    strategy: str
    mixed_precision: str
    resolution: int
    object_size: int
    n_train: int
    n_test: int

    @property
    def run_dir(self) -> Path:
        return self.run_root / self.run_name

    @property
    def init_dir(self) -> Path:
        return self.run_dir / "init"

    @property
    def per_rank_batch(self) -> int:
        return self.params.train.batch_size // self.params.train.num_workers

    @property
    def augment(self) -> dict | None:
        """pics_model.data.AugmentConfig fields for the training batches; None: no augmentation."""
        t = self.params.train
        return {"rotate_max_deg": t.rotation_deg} if t.augment else None


@dataclass(frozen=True)
class Flops:
    """The figures behind the MFU column of the training log."""
    per_sample: float  # training FLOPs of one sample (forward + backward)
    peak_per_worker: float  # FLOP/s one worker can reach


def _fingerprint(files: list[Path]) -> list[tuple[str, int]]:
    return [(f.name, f.stat().st_size) for f in files]


def plan_run(params: Params) -> RunPlan:
    t, m = params.train, params.model
    try:
        cfg = m.pics_config()
    except ValueError as e:
        raise ParamsError(f"model.preset={m.preset!r}: {e}") from None
    if t.batch_size % t.num_workers:
        raise ParamsError(f"train.batch_size={t.batch_size} cannot be split evenly over "
                          f"train.num_workers={t.num_workers} workers (use a multiple of {t.num_workers})")
    strategy = t.strategy if t.strategy != "auto" else ("fsdp" if m.preset == "sd21" and t.use_gpu else "ddp")
    if strategy == "fsdp" and not t.use_gpu:
        raise ParamsError("train.strategy=fsdp needs train.use_gpu=true (Ray Train's FSDP is GPU-only)")
    if strategy == "fsdp" and t.ema_decay:
        raise ParamsError("train.ema_decay: EMA is not supported with FSDP here; set train.ema_decay=null")
    storage = params.ray.storage_path
    if storage and "://" in storage:
        raise ParamsError(f"ray.storage_path={storage!r}: checkpoints need a filesystem path that every "
                          "node mounts (NFS or similar); URI schemes are not supported by the train stage")

    shards_dir = resolve_path(params.decompose.out) / "shards"
    try:
        train_index = scan_shards(shards_dir, "train")
        test_index = scan_shards(shards_dir, "test")
    except DataError as e:
        raise ParamsError(f"decompose.out={params.decompose.out!r}: {e}") from None
    per_rank = t.batch_size // t.num_workers
    if len(train_index) // t.num_workers < per_rank:
        raise ParamsError(f"train.batch_size={t.batch_size}: the train split has {len(train_index)} samples in "
                          f"{shards_dir}, fewer than one batch of {per_rank} per worker x {t.num_workers} workers")

    priors_dir = None
    if m.use_shape_prior:
        priors_dir = resolve_path(params.render_priors.out) / "shards"
        try:
            shard_files(priors_dir)
        except DataError as e:
            raise ParamsError(f"model.use_shape_prior is true but render_priors.out={params.render_priors.out!r} "
                              f"has no prior shards: {e} (run render_priors, or set model.use_shape_prior=false)") from None
    resolution = cfg.resolution

    mixed = t.mixed_precision if t.mixed_precision != "auto" else ("bf16" if t.use_gpu else "no")
    identity = {
        "model": m.model_dump(),
        # the resolved network config too: a changed preset (pics_model/config.py) is a new run,
        # not a finished one to reuse
        "model_config": json.loads(cfg.to_json()),
        "train": {k: v for k, v in t.model_dump().items() if k not in OPERATIONAL_KEYS},
        "mixed_precision": mixed,
        "strategy": strategy,
        "shards": _fingerprint(shard_files(shards_dir)),
        "priors": _fingerprint(shard_files(priors_dir)) if priors_dir else None,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = resolve_path(t.out)
    run_root = Path(storage) if storage else out / "runs"
    return RunPlan(params=params, out=out, run_root=run_root, run_name=f"train-{digest}", shards_dir=shards_dir,
                   priors_dir=priors_dir, strategy=strategy, mixed_precision=mixed, resolution=resolution,
                   object_size=cfg.object_encoder.image_size, n_train=len(train_index), n_test=len(test_index))


def check_resources(plan: RunPlan, cluster: dict) -> None:
    """Fail now, not after a silent wait for resources that will never appear (local Ray only)."""
    t = plan.params.train
    need_cpu = t.num_workers * t.cpus_per_worker
    if plan.params.ray.address is None and cluster.get("CPU", 0) < need_cpu:
        raise ParamsError(f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker} needs "
                          f"{need_cpu:g} CPUs; the local Ray has {cluster.get('CPU', 0):g} (ray.num_cpus)")
    if t.use_gpu and plan.params.ray.address is None and cluster.get("GPU", 0) < t.num_workers:
        raise ParamsError(f"train.use_gpu=true with {t.num_workers} workers needs {t.num_workers} GPUs; "
                          f"Ray sees {cluster.get('GPU', 0):g}")
