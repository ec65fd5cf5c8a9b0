"""The one typed schema over ``params.yaml``.

Every stage reads its section from here. Unknown keys and bad values are rejected with a message
that names the dotted key (``decompose.area_ratio: ...``), so a typo in params.yaml or in a
``--set key=value`` override fails before any work starts.

Each stage owns one section class below; add fields there, with a default and a one-line reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout; site-packages for an installed pics


def project_root() -> Path:
    """The folder that holds params.yaml and that its relative paths (data/...) start from: the
    checkout this code runs from (editable install, ``python -m``, dvc.yaml), else, for an
    installed (non-editable) pics, the working folder, so nothing is read or written in site-packages."""
    return REPO_ROOT if (REPO_ROOT / "params.yaml").is_file() else Path.cwd()


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
    pairs_per_image: int = Field(1, ge=1)
    group_size: int = Field(2, ge=2, le=4)  # 2: pairs; 3-4: groups for the N-object model
    contact_px: int = Field(2, ge=0)  # silhouettes at most this many pixels apart count as touching
    duplicate_mask_iou: float = Field(0.5, gt=0.0, le=1.0)  # interaction: higher mask IoU = one object labelled twice
    containment_tol_px: float = Field(2.0, ge=0.0)
    patch_size: int = Field(224, ge=32)
    patch_pad: tuple[float, float] = (1.1, 1.4)
    box_expand: tuple[float, float] = (1.1, 1.2)
    train_resolution: int = Field(512, ge=32)
    test_fraction: float = Field(0.2, ge=0.0, le=1.0)
    shard_size: int = Field(256, ge=1)  # images per shard: the unit of work, of resume and of a Prefect task
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


class TrainParams(Section):
    out: str = "data/train"
    steps: int = Field(600, ge=1)
    batch_size: int = Field(8, ge=1)  # global: split evenly over num_workers
    lr: float = Field(1e-4, gt=0.0)
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
    trainable: str = "reference"  # PICSModel.set_trainable spec: the design notes' trained set
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    mask_weight: float = Field(1.0, ge=0.0)  # extra loss weight inside the object boxes
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
    sample_guidance: float = Field(3.0, ge=0.0)
    peak_tflops: float | None = Field(None, gt=0.0)  # per worker, for MFU; None: measured/known
    # test hook: one worker fails once after this step (raise, or exit = a killed process)
    fail_at_step: int | None = Field(None, ge=1)
    fail_rank: int = Field(0, ge=0)
    fail_mode: Literal["raise", "exit"] = "raise"


class EvaluateParams(Section):
    checkpoint: str = "data/train/final"
    out: str = "data/evaluate"
    steps: int = Field(20, ge=1)
    guidance: float = Field(3.0, ge=0.0)
    scheduler: Literal["ddim", "dpmsolver++"] = "ddim"
    seed: int = 0
    samples: str = "data/decomposed"  # decompose output; its test split is evaluated
    priors: str | None = "data/priors"  # render_priors output, used when the model has a shape encoder
    untrained: str | None = "auto"  # baseline model; "auto": <run_dir>/init named by <checkpoint>/../run.json
    methods: list[Literal["pics", "copy_paste", "sequential", "untrained"]] = ["pics", "copy_paste", "sequential",
                                                                                 "untrained"]
    max_samples: int | None = Field(None, ge=1)  # first N test samples (shard order); None: all
    batch_size: int = Field(2, ge=1)  # rows per map_batches call
    num_actors: int = Field(2, ge=1)  # Ray Data actors (CPU); with CUDA: min(this, GPUs), one GPU each
    device: Literal["auto", "cpu", "cuda"] = "auto"
    record_alpha: bool = True  # alpha maps per step: occlusion-order accuracy and the report's maps
    grid_samples: int = Field(6, ge=0)
    lpips_min_side: int = Field(224, ge=32)  # feature metrics upsample smaller images to this short side
    clip_path: str | None = None  # local CLIP image tower (TorchScript or HF folder): clip_score
    dinov2_path: str | None = None  # local DINOv2 (TorchScript or HF folder): dinov2_score
    dreamsim_path: str | None = None  # local DreamSim ensemble (TorchScript): dreamsim


class Params(Section):
    ray: RayParams = RayParams()
    make_sample: MakeSampleParams = MakeSampleParams()
    decompose: DecomposeParams = DecomposeParams()
    render_priors: RenderPriorsParams = RenderPriorsParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()


class ParamsError(ValueError):
    """params.yaml or an override is invalid; the message names the file and the dotted key."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid parameters"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
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
        raise ParamsError(f"override {item!r}: expected key=value, e.g. decompose.area_ratio=0.05")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ParamsError(f"override {item!r}: empty key")
    return path, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {item!r}: {p} is not a section")
        node[path[-1]] = value
    return data


def default_params_file() -> Path:
    """The project's params.yaml; ParamsError when there is none (an installed pics run outside a project)."""
    path = project_root() / "params.yaml"
    if not path.is_file():
        raise ParamsError(f"{path}: not found. An installed pics reads params.yaml from the working "
                          "folder: run it in a project folder that has one, or pass --params FILE")
    return path


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    """Read ``path`` (default: the project's params.yaml), apply ``key=value`` overrides, validate
    everything. A ``path`` that does not exist is an error, and so is a missing default."""
    if path and not Path(path).is_file():
        raise ParamsError(f"{path}: no such params file")
    path = Path(path) if path else default_params_file()
    if path.exists():
        try:
            with path.open() as f:  # a stream, so that YAML errors name the file
                data = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ParamsError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ParamsError(f"{path}: top level must be a mapping of sections")
    else:
        data = {}
    data = apply_overrides(data, overrides)
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise ParamsError(_format_errors(e, str(path))) from None


def resolve_path(p: str | Path, root: Path | None = None) -> Path:
    """Paths in params.yaml are relative to the project root (see :func:`project_root`)."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else (root or project_root()) / p
