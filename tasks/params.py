"""The one typed schema over ``params.yaml``.

Every stage reads its section from here. Unknown keys and bad values are rejected with a message
that names the dotted key (``decompose.area_ratio: ...``), so a typo in params.yaml or in a
``--set key=value`` override fails before any work starts.

Each stage owns one section class below; add fields there, with a default and a one-line reason.
The defaults here are the ones: params.yaml lists every key with the same value (tests/test_params.py
holds the two together; decompose's shard_size and pairs_per_image are the embedded run's own), and
the CLI validates once and hands the flows the validated ``Params``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout; site-packages for an installed pics


def project_root() -> Path:
    """The folder that holds params.yaml and that its relative paths (data/...) start from: the
    working folder when it holds a params.yaml (dvc.yaml's stages run ``pics`` there, also in the
    copy that ``dvc exp run --temp`` makes, while the code comes from the checkout), else the
    checkout this code runs from (``pics`` in a subfolder), else, for an installed (non-editable)
    pics, the working folder, so nothing is read or written in site-packages."""
    cwd = Path.cwd()
    if (cwd / "params.yaml").is_file() or not (REPO_ROOT / "params.yaml").is_file():
        return cwd
    return REPO_ROOT


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayParams(Section):
    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:10001" for a cluster
    num_cpus: int | None = Field(None, ge=1)  # local Ray only; None lets Ray count the cores
    object_store_mb: int = Field(500, ge=100)
    storage_path: str | None = None  # shared path (NFS, s3://...) that multi-node checkpoints need


class MakeSampleParams(Section):
    out: str = "data/sample"
    num_images: int = Field(160, ge=1)
    width: int = Field(320, ge=64)
    height: int = Field(240, ge=64)
    min_objects: int = Field(2, ge=2)
    max_objects: int = Field(4, ge=2)
    seed: int = 0
    image_format: Literal["jpg", "png"] = "jpg"  # jpg like COCO/LVIS; png for lossless pixels
    jpeg_quality: int = Field(95, ge=50, le=100)
    segmentation: Literal["polygon", "rle"] = "polygon"  # polygon like LVIS (exact, holes bridged)
    min_visible_pixels: int = Field(20, ge=1)  # fewer visible pixels: no annotation, reason recorded
    shadows: bool = True  # directional shadows: objects visibly rest on what they touch
    chunk_size: int = Field(40, ge=1)  # images per Prefect task / Ray task
    num_workers: int = Field(1, ge=1)  # >1: chunks fan out over Ray (pays off for big runs only)

    @model_validator(mode="after")
    def _objects_range(self):
        if self.max_objects < self.min_objects:
            raise ValueError("max_objects must be >= min_objects")
        return self


class DecomposeParams(Section):
    annotations: str = "data/sample/annotations.json"
    images: str = "data/sample/images"
    out: str = "data/decomposed"
    pairing: Literal["reference", "interaction"] = "interaction"
    area_ratio: float = Field(0.02, ge=0.0, lt=1.0)
    pairs_per_image: int = Field(1, ge=1)  # params.yaml's embedded run: 6 (every pair of an image)
    group_size: int = Field(2, ge=2, le=4)  # 2: pairs; 3-4: groups for the N-object model
    contact_px: int = Field(2, ge=0)  # silhouettes at most this many pixels apart count as touching
    duplicate_mask_iou: float = Field(0.5, gt=0.0, le=1.0)  # interaction: higher mask IoU = one object labelled twice
    containment_tol_px: float = Field(2.0, ge=0.0)
    patch_size: int = Field(224, ge=32)
    patch_pad: tuple[float, float] = (1.1, 1.4)
    box_expand: tuple[float, float] = (1.1, 1.2)
    preview_resolution: int = Field(512, ge=32)  # side of the region map (the sample preview only)
    test_fraction: float = Field(0.2, ge=0.0, le=1.0)
    # images per shard: the unit of work, of resume and of a Prefect task (params.yaml's embedded run: 64)
    shard_size: int = Field(256, ge=1)
    num_workers: int = Field(2, ge=1)  # shards in flight at once (Ray tasks of one CPU each)
    seed: int = 0
    png_compression: int = Field(1, ge=0, le=9)  # zlib level of patch/mask PNGs: 1 is ~3x faster than 6, ~10% larger
    grid_samples: int = Field(8, ge=0)  # samples drawn in the flow's picture (samples.png/html); 0: none
    # more images or annotations quarantined than this (or all): outputs written, then exit 3
    max_quarantine_fraction: float = Field(0.1, ge=0.0, le=1.0)


class RenderPriorsParams(Section):
    samples: str = "data/decomposed"
    out: str = "data/priors"
    num_views: int = Field(6, ge=1)
    elevation_deg: float = 15.0
    resolution: int = Field(224, ge=16)
    platform: Literal["egl", "osmesa"] = "egl"
    reconstructor: str = "builtin"
    reconstructor_weights: str | None = None
    shard_size: int = Field(256, ge=1)
    num_workers: int = Field(2, ge=1)
    yfov_deg: float = Field(30.0, gt=1.0, lt=120.0)  # narrow: little perspective bulge, front view ~ mask
    grid_size: int = Field(64, ge=8)  # built-in reconstructor: cells on the patch's long side
    thickness: float = Field(1.0, gt=0.0)  # built-in reconstructor: 1.0 inflates a disc into a ball
    gl_threads: int = Field(1, ge=1)  # llvmpipe threads per worker (LP_NUM_THREADS); one worker per core
    grid_objects: int = Field(4, ge=0)  # objects drawn in the flow's picture (priors.png); 0: none
    max_quarantine_fraction: float = Field(0.1, ge=0.0, le=1.0)  # more objects quarantined (or all): exit 3

    @model_validator(mode="after")
    def _elevation(self):
        if not -89.0 <= self.elevation_deg <= 89.0:
            raise ValueError("elevation_deg must be in [-89, 89]")
        return self


class ModelParams(Section):
    preset: Literal["tiny", "sd15", "sd21"] = "tiny"
    stable_diffusion_path: str | None = None  # local diffusers-format SD folder (sd15/sd21)
    dinov2_path: str | None = None  # local DINOv2 weights (sd15/sd21)
    # None: the preset's own (tiny: mobilenetv2; sd15/sd21: dinov2)
    object_encoder: Literal["mobilenetv2", "dinov2", "small"] | None = None
    # tiny preset's latent. pixel_shuffle: exact space-to-depth (f=4, 48 channels, no fitting);
    # kl: a small AutoencoderKL fitted on the training images (train.autoencoder_*), the former default
    latent: Literal["pixel_shuffle", "kl"] | None = None
    use_shape_prior: bool = True
    tau: float = Field(0.5, gt=0.0)
    expert_mode: Literal["sparse", "dense", "reference"] = "sparse"
    max_objects: int = Field(4, ge=1)  # objects per composite the model accepts (ITBs are general in N)
    cond_drop_prob: float = Field(0.1, ge=0.0, le=1.0)  # objects -> zero image in training, for guidance
    # None: the preset's (tiny: on; sd15/sd21: off). The objects drawn into the hint (pics_model/data.py)
    collage_hint: bool | None = None
    # The x0 estimate is the hint's RGB plus the network's output (PICSConfig.collage_residual; x0
    # prediction only). None: on where it applies (tiny, pixel_shuffle latent, collage hint), else off
    collage_residual: bool | None = None

    @model_validator(mode="after")
    def _latent(self):
        if self.latent == "pixel_shuffle" and self.preset != "tiny":
            raise ValueError(f"latent=pixel_shuffle is the tiny preset's; {self.preset} keeps its AutoencoderKL")
        if self.collage_residual and not self._residual_applies():
            raise ValueError("collage_residual needs the tiny preset's pixel_shuffle latent and the collage hint")
        return self

    def _residual_applies(self) -> bool:
        return self.preset == "tiny" and self.latent != "kl" and self.collage_hint is not False

    def residual(self) -> bool:
        """Whether the network's x0 estimate starts from the hint (``collage_residual`` resolved)."""
        return self._residual_applies() if self.collage_residual is None else self.collage_residual

    def pics_config(self):
        """This section as the network's ``PICSConfig``: the one place that maps params.yaml's
        ``model:`` keys to the library's fields, so ``pics_model`` knows no pipeline key names.
        None keeps the preset's value."""
        from pics_model.config import PRESETS, TINY_KL_VAE, get_preset, hint_layout

        over: dict[str, Any] = {"tau": self.tau, "expert_mode": self.expert_mode, "max_objects": self.max_objects}
        if self.stable_diffusion_path is not None:
            over["stable_diffusion_path"] = self.stable_diffusion_path
        if self.latent == "kl" and self.preset == "tiny":
            over["vae"] = TINY_KL_VAE
            over["unet"] = {"out_channels": 4}  # in_channels: hint_layout
        base = PRESETS[self.preset]()
        hint_layout(over, base, base.collage_hint if self.collage_hint is None else self.collage_hint)
        if self.residual():
            over["collage_residual"] = True
            over["scheduler"] = {"prediction_type": "sample"}
        over["shape_encoder"] = {"enabled": self.use_shape_prior}
        over["objective"] = {"cond_drop_prob": self.cond_drop_prob}
        encoder: dict[str, Any] = {}
        if self.object_encoder is not None:
            if self.object_encoder != PRESETS[self.preset]().object_encoder.kind:  # each has its input size
                encoder["image_size"] = {"dinov2": 224, "mobilenetv2": 96, "small": 64}[self.object_encoder]
            encoder["kind"] = self.object_encoder
        if self.dinov2_path is not None:
            encoder["weights_path"] = self.dinov2_path
        if encoder:
            over["object_encoder"] = encoder
        return get_preset(self.preset, **over)


class TrainParams(Section):
    out: str = "data/train"
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)  # global: split evenly over num_workers
    lr: float = Field(1e-3, gt=0.0)  # tiny preset from scratch; fine-tuning sd15/sd21: 1e-5 (the reference's)
    seed: int = 0
    # Ray Train
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"  # auto: FSDP for sd21 (GPU), DDP otherwise
    max_failures: int = Field(2, ge=0)  # worker-group restarts from the newest checkpoint
    resume: bool = True  # False: discard this run's earlier checkpoints and start over
    # optimisation
    warmup_steps: int = Field(20, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = Field(0.01, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    # PICSModel.set_trainable spec. tiny has no pretrained UNet to keep frozen: full; sd15/sd21: reference (the paper's)
    trainable: str = "full"
    # sample (x0): with the collage hint, epsilon and v left speckle in the boxes (docs/fidelity_log.md)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "sample"
    mask_weight: float = Field(1.0, ge=0.0)  # extra loss weight inside the object boxes
    gate_loss_weight: float = Field(0.5, ge=0.0)  # occlusion-order loss on the alpha gate (pics_model/gate_loss.py)
    ema_decay: float | None = Field(0.999, gt=0.0, lt=1.0)  # None: no EMA
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"  # auto: bf16 autocast on GPU only
    grad_checkpointing: bool = False
    compile: bool = False
    # data
    augment: bool = True  # flip / colour / rotation of pics_model.data.AugmentConfig
    rotation_deg: float = Field(30.0, ge=0.0, le=180.0)  # paper: U(-pi/6, pi/6)
    loader_workers: int = Field(0, ge=0)  # torch DataLoader processes per worker
    feature_cache: bool = True  # reuse frozen VAE (and, without augmentation, object) features by input hash
    feature_cache_mb: float = Field(1024.0, gt=0.0)  # per worker, CPU memory
    # a tiny KL autoencoder (model.latent=kl) is fitted on the training images before PICS training
    autoencoder_steps: int = Field(200, ge=0)
    autoencoder_lr: float = Field(2e-3, gt=0.0)
    autoencoder_batch: int = Field(4, ge=1)
    # cadence and outputs
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(100, ge=0)  # held-out loss every N steps (always at the start and the end)
    heldout_samples: int = Field(16, ge=1)
    # held-out occlusion-order accuracy of the alpha gate (with the held-out loss): one forward per
    # sample at each of these noise timesteps; [] turns it off
    occlusion_timesteps: list[int] = [100, 300, 500, 700, 900]
    sample_every: int = Field(100, ge=0)  # 0: no sample composites
    sample_count: int = Field(4, ge=1)
    sample_steps: int = Field(10, ge=1)
    sample_guidance: float = Field(1.0, ge=0.0)
    peak_tflops: float | None = Field(None, gt=0.0)  # per worker, for MFU; None: measured/known


class EvaluateParams(Section):
    checkpoint: str = "data/train/final"
    out: str = "data/evaluate"
    steps: int = Field(2, ge=1)  # fewer scored higher mPSNR on the tiny preset (README)
    guidance: float = Field(1.0, ge=0.0)  # 1: no classifier-free guidance (scored higher than 3 on tiny)
    scheduler: Literal["ddim", "dpmsolver++"] = "ddim"
    full_resolution: bool = True  # collage-residual models: composite at the source's resolution (PICSPipeline)
    seed: int = 0
    samples: str = "data/decomposed"  # decompose output; its test split is evaluated
    priors: str | None = "data/priors"  # render_priors output, used when the model has a shape encoder
    untrained: str | None = "auto"  # baseline model; "auto": <checkpoint>/../init (train exports it)
    methods: list[Literal["pics", "copy_paste", "sequential", "untrained"]] = ["pics", "copy_paste", "sequential",
                                                                                 "untrained"]
    max_samples: int | None = Field(None, ge=1)  # first N test samples (shard order); None: all
    batch_size: int = Field(2, ge=1)  # rows per map_batches call
    num_actors: int = Field(2, ge=1)  # Ray Data actors (CPU); with CUDA: min(this, GPUs), one GPU each
    device: Literal["auto", "cpu", "cuda"] = "auto"
    record_alpha: bool = True  # alpha maps per step: occlusion-order accuracy and the report's maps
    grid_samples: int = Field(6, ge=0)
    lpips_min_side: int = Field(224, ge=32)  # feature metrics upsample smaller images to this short side
    clip_path: str | None = None  # local Hugging Face CLIP folder (needs transformers): clip_score
    dinov2_path: str | None = None  # local Hugging Face DINOv2 folder (safetensors): dinov2_score
    dreamsim_path: str | None = None  # refused: DreamSim ships as code (pics never runs a file's code)


class LocationParams(Section):
    """The location model stage (issue 14): removal-render data, MLE then DPO training, TPR/FPR."""

    out: str = "data/location"
    opa_root: str | None = None  # an OPA folder (tasks/location/opa.py): train on it instead of rendering
    # data: embedded scenes, each rendered again without one of its objects
    num_scenes: int = Field(256, ge=1)
    width: int = Field(128, ge=32)
    height: int = Field(96, ge=32)
    min_objects: int = Field(2, ge=2)
    max_objects: int = Field(4, ge=2)
    removals_per_scene: int = Field(2, ge=1)
    positives_per_query: int = Field(4, ge=1)  # the removed object's box + others where it provably rests
    negatives_per_reason: int = Field(2, ge=0)
    shadows: bool = False  # the shadow map costs ~0.1 s a render on llvmpipe
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)  # of scenes
    seed: int = 0
    shard_size: int = Field(16, ge=1)  # scenes per shard
    num_workers: int = Field(1, ge=1)  # >1: shards fan out over Ray
    max_quarantine_fraction: float = Field(0.5, ge=0.0, le=1.0)
    # model (pics_model/location_model.py)
    bins: int = Field(64, ge=4)
    box_tokens: Literal["xyxy", "support"] = "xyxy"  # x1, y1, x2, y2; or support: (y2, cx, h, w), bottom edge first
    image_size: int = Field(128, ge=32)
    encoder: Literal["small", "mobilenetv2"] = "mobilenetv2"  # the object encoder family's backbone (mobilenetv2: frozen ImageNet)
    small_channels: list[int] = [16, 32, 64]  # the small CNN's widths: 3 stride-2 levels, 8 x 8 tokens at 64 px
    feature_blocks: int | None = Field(14, ge=1, le=19)  # mobilenetv2: keep its first n blocks (None: all); 14: 96-d, stride 16
    token_pool: int = Field(2, ge=1)  # average-pool the encoder's feature map by this factor
    feature_norm: bool = True  # LayerNorm on the encoder's features before the projector
    fourier: int = Field(6, ge=0)  # sin/cos frequencies of image-token positions and box-token values (0: none)
    d_model: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    # training: stage 1 maximum likelihood on positives, stage 2 DPO against the frozen stage 1
    mle_steps: int = Field(1500, ge=1)
    dpo_steps: int = Field(150, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    dpo_lr: float = Field(2e-4, gt=0.0)
    beta: float = Field(0.1, gt=0.0)
    label_sigma: float = Field(1.5, ge=0.0)  # stage 1 targets: a Gaussian of this many bins around each token
    # evaluation: K boxes per test query, counted at an IoU threshold against labelled boxes
    ks: list[int] = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    iou: float = Field(0.5, gt=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    bootstrap: int = Field(1000, ge=10)
    threads: int | None = Field(1, ge=1)  # torch CPU threads for training and evaluation (None: torch's default)
    baseline_draws: int = Field(20, ge=1)  # random and class-prior hits: the mean over this many draws of K boxes
class LayoutParams(Section):
    """``pics layout`` and the layout stage (pics_model.layout.LayoutConfig carries the method's fields)."""

    samples: str = "data/decomposed"  # stage: whose object silhouettes are packed
    out: str = "data/layout"
    targets: list[Literal["circle", "heart", "star", "letter"]] = ["circle", "heart", "star", "letter"]
    letter: str = Field("S", min_length=1, max_length=1)  # the "letter" target's character
    target_size: int = Field(160, ge=32)  # stage: the procedural targets' side, px
    max_elements: int = Field(40, ge=1)  # stage: distinct silhouettes packed per target
    method: Literal["differentiable", "greedy"] = "differentiable"  # pics layout's packer
    threads: int | None = Field(1, ge=1)  # torch CPU threads (None: torch's default); two spin-waited under load
    # the method (paper: Wang & Lu 2025); see pics_model/layout/optimize.py
    resolutions: list[int] = [64, 128, 256]  # level long sides, coarse to fine (capped at the target's)
    iterations: list[int] = [100, 60, 40]
    w_containment: float = Field(1.0, ge=0.0)
    w_overlap: float = Field(20.0, ge=0.0)
    overlap_ramp: float = Field(1.0, ge=1.0)
    w_uniformity: float = Field(0.2, ge=0.0)
    w_pair: float = Field(1.0, ge=0.0)
    outside_weight: float = Field(100.0, ge=1.0)
    lr_position: float = Field(0.5, gt=0.0)
    lr_angle: float = Field(0.05, ge=0.0)
    lr_scale: float = Field(0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.9)  # Adam (paper code)
    init_fill: float = Field(0.55, gt=0.0, le=1.0)
    equal_size: bool = True  # elements normalised to one box size first (paper code); False: source sizes kept
    rotate: bool = True
    pair_overlap: float = Field(0.0, ge=0.0, lt=1.0)  # > 0: each pair (i, i+1) shares this much of the smaller
    composite_pair_overlap: float = Field(0.15, ge=0.0, lt=1.0)  # pics composite --layout auto's pair_overlap
    uniformity_kernels: list[int] = [5, 11, 17]
    blur_px: float = Field(1.0, ge=0.0)
    margin: float = Field(0.1, ge=0.0)
    reseed_share: float = Field(0.5, gt=0.0)  # >= 1: never
    separate_rounds: int = Field(20, ge=0)

    @model_validator(mode="after")
    def _levels(self):
        if len(self.resolutions) != len(self.iterations) or not self.resolutions:
            raise ValueError("resolutions and iterations need the same, non-zero, length")
        if min(self.resolutions) < 8 or min(self.iterations) < 0:
            raise ValueError("resolutions must be >= 8 and iterations >= 0")
        return self

    def config(self, **changes):
        """The method's fields as a pics_model LayoutConfig (``changes`` override some)."""
        from dataclasses import fields

        from pics_model.layout import LayoutConfig

        return LayoutConfig(**{f.name: getattr(self, f.name) for f in fields(LayoutConfig)} | changes)


class AnalogyParams(Section):
    """3D scene analogies (tasks/analogy): scenes from the embedded generator, a contextual
    descriptor field trained on triplets, scene maps scored on augmented pairs."""
    out: str = "data/analogy"
    num_scenes: int = Field(96, ge=4)  # generated layouts (point sets only, no images)
    heldout_scenes: int = Field(16, ge=1)  # the last ones: evaluation pairs come from these only
    min_objects: int = Field(4, ge=2)
    max_objects: int = Field(7, ge=2)
    points_per_object: int = Field(64, ge=8)
    seed: int = 0
    # descriptor field
    radius: float = Field(0.35, gt=0.0)  # scene units
    max_neighbours: int = Field(24, ge=4)
    ball_tokens: int = Field(0, ge=0)  # of the neighbours, drawn across the radius (the context), not nearest
    width: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    feature_dim: int = Field(64, ge=8)
    # training (seconds on 2 cores ~ steps * batch_scenes * queries / 300)
    steps: int = Field(200, ge=1)
    batch_scenes: int = Field(2, ge=1)
    queries: int = Field(48, ge=2)
    lr: float = Field(1e-3, gt=0.0)
    temperature: float = Field(0.2, gt=0.0)
    threads: int = Field(1, ge=1)  # torch CPU threads (small tensors: more spin-wait on a busy box)
    # scene map
    num_yaws: int = Field(4, ge=1)
    flips: bool = True
    scales: list[float] = [1.0]
    topk: int = Field(3, ge=1)
    refine_iters: int = Field(4, ge=0)
    rbf_smoothing: float = Field(0.5, ge=0.0)
    thin_dense: bool = False  # true: scenes sampled far more densely than the training scenes are read thinned to it
    # evaluation pairs
    eval_pairs: int = Field(8, ge=1)
    yaw_jitter_deg: float = Field(10.0, ge=0.0, le=45.0)
    eval_swap_instances: bool = False  # true: kept objects become other instances of their class (harder)
    # harder held-out pairs (instances swapped, layout perturbed per object), scored for the trained
    # field and an untrained one of the same shape: what training adds
    hard_pairs: int = Field(12, ge=0)
    hard_shift: float = Field(0.05, ge=0.0)  # per-object floor shift, scene units (std)
    hard_yaw_deg: float = Field(20.0, ge=0.0)  # per-object turn about its own axis (std)
    # arrangement transfer: held-out interacting pairs carried into other held-out scenes, rendered
    # in make_sample's format (its section's size and formats) under transfer/, with transfer.png
    transfer_samples: int = Field(3, ge=1)  # the stage's outputs include them

    @model_validator(mode="after")
    def _ranges(self):
        if self.max_objects < self.min_objects:
            raise ValueError("max_objects must be >= min_objects")
        if self.heldout_scenes >= self.num_scenes:
            raise ValueError("heldout_scenes must be fewer than num_scenes")
        if self.ball_tokens > self.max_neighbours:
            raise ValueError("ball_tokens must be at most max_neighbours (they are drawn among them)")
        return self


class Params(Section):
    ray: RayParams = RayParams()
    make_sample: MakeSampleParams = MakeSampleParams()
    decompose: DecomposeParams = DecomposeParams()
    render_priors: RenderPriorsParams = RenderPriorsParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    location: LocationParams = LocationParams()
    analogy: AnalogyParams = AnalogyParams()
    layout: LayoutParams = LayoutParams()

    @model_validator(mode="after")
    def _residual_predicts_x0(self):
        if self.model.residual() and self.train.prediction_type != "sample":
            raise ValueError(f"train.prediction_type {self.train.prediction_type!r}: the model's collage_residual "
                             "predicts x0 ('sample'); set model.collage_residual=false for epsilon or v")
        return self


class ParamsError(ValueError):
    """params.yaml or an override is invalid; the message names the file and the dotted key."""


def _source_of(loc: tuple, overrides: list[str], path: Path | None) -> str:
    """Where the value at ``loc`` came from: the last ``--set`` that wrote at or under it, else the file."""
    for item in reversed(overrides):
        key = tuple(parse_override(item)[0])
        n = min(len(key), len(loc))
        if key[:n] == tuple(str(p) for p in loc[:n]):
            return f"--set {item}"
    return str(path) if path else "defaults"


def _format_errors(err: ValidationError, overrides: list[str], path: Path | None) -> str:
    """One line per error: where the value came from, the dotted key, what is wrong."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        what = ("unknown key" if e["type"] == "extra_forbidden" else
                e["msg"] if isinstance(got, dict) else f"{e['msg']} (got {got!r})")  # a section: no dump of it
        lines.append(f"{_source_of(e['loc'], overrides, path)}: {key}: {what}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} repeats the one at line {seen[key] + 1}", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def quote_value(text: str) -> str:
    """``text`` as a quoted YAML scalar that :func:`parse_override` reads back unchanged: a path
    typed on the command line stays a string even when it holds ``' #'`` or ``': '``."""
    return yaml.safe_dump(str(text), default_style='"', width=float("inf")).strip()


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"decompose.area_ratio=0.05"`` -> (["decompose", "area_ratio"], 0.05); values parse as YAML."""
    if "=" not in item:
        raise ParamsError(f"--set {item}: expected key=value, e.g. decompose.area_ratio=0.05")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ParamsError(f"--set {item}: empty key")
    return path, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ParamsError(f"--set {item}: {p} is not a section")
        node[path[-1]] = value
    return data


def default_params_file() -> Path:
    """The project's params.yaml; ParamsError when there is none (an installed pics run outside a project)."""
    path = project_root() / "params.yaml"
    if not path.is_file():
        raise ParamsError(f"{path}: not found. An installed pics reads params.yaml from the working "
                          "folder: run it in a project folder that has one, or pass --params FILE")
    return path


def load_params(path: str | Path | None = None, overrides: list[str] | None = None,
                missing_ok: bool = False) -> Params:
    """Read ``path`` (default: the project's params.yaml), apply ``key=value`` overrides, validate
    everything. A ``path`` that does not exist is an error, and so is a missing default unless
    ``missing_ok`` (then the schema's defaults are the base)."""
    if path and not Path(path).is_file():
        raise ParamsError(f"{path}: no such params file")
    if path is None and missing_ok and not (project_root() / "params.yaml").is_file():
        data: dict = {}
    else:
        path = Path(path) if path else default_params_file()
        try:
            with path.open() as f:  # a stream, so that YAML errors name the file
                data = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ParamsError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ParamsError(f"{path}: top level must be a mapping of sections")
    data = apply_overrides(data, overrides)
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise ParamsError(_format_errors(e, list(overrides or []), path)) from None


def stage_params(params: Params | None, overrides: list[str] | None) -> Params:
    """A flow's parameters: ``params`` as the CLI validated them, or, for a deployment run, the
    project's params.yaml with ``overrides`` ("section.key=value" strings, as ``--set`` takes them)."""
    if params is None:
        return load_params(None, overrides)
    if overrides:
        raise ParamsError("give validated params or overrides, not both")
    return params


def resolve_path(p: str | Path, root: Path | None = None) -> Path:
    """Paths in params.yaml are relative to the project root (see :func:`project_root`)."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else (root or project_root()) / p
