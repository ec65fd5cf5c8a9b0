"""The plain, picklable description of one training run that the driver hands to every worker."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RunSpec:
    # where things are (run_dir is shared by all workers: local disk, or NFS with ray.storage_path)
    run_dir: str
    init_dir: str  # the starting PICSModel (save_pretrained format), autoencoder already fitted
    shards_dir: str
    priors_dir: str | None
    model_class: str = "pics_model.modeling_pics:PICSModel"
    batch_builder: str = "tasks.train.batches:BatchBuilder"  # (rows, rngs) -> (batch, quarantine)
    # schedule
    steps: int = 300
    global_batch: int = 8
    num_workers: int = 2
    seed: int = 0
    # optimisation
    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 20
    lr_schedule: str = "constant"  # constant | cosine (after warm-up)
    grad_clip: float = 1.0
    trainable: str = "reference"
    prediction_type: str = "epsilon"
    mask_weight: float = 0.0
    ema_decay: float | None = 0.999
    mixed_precision: str = "no"  # "bf16" | "no" (resolved by the driver: bf16 only on GPU)
    grad_checkpointing: bool = False
    compile: bool = False
    strategy: str = "ddp"  # ddp | fsdp
    # data
    resolution: int = 64
    object_size: int | None = None  # objects and prior views are resized to this in the loader
    augment: dict | None = field(default_factory=dict)  # AugmentConfig fields; None: no augmentation
    loader_workers: int = 0
    feature_cache: bool = True
    feature_cache_mb: float = 1024.0
    # cadence
    log_every: int = 10
    checkpoint_every: int = 100
    eval_every: int = 0  # 0: held-out loss only at the start and the end
    sample_every: int = 100
    heldout_samples: int = 16
    occlusion_timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)  # held-out gate probe; () = off
    sample_count: int = 4
    sample_steps: int = 10
    sample_guidance: float = 3.0
    # cost accounting
    flops_per_sample: float | None = None  # training FLOPs of one sample (forward + backward)
    peak_flops_per_worker: float | None = None
    # test hooks
    fail_at_step: int | None = None
    fail_rank: int = 0
    fail_mode: str = "raise"  # raise | exit

    @property
    def per_rank_batch(self) -> int:
        return self.global_batch // self.num_workers

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        return cls(**d)
