"""``pics composite``: put N objects into a background with a trained PICS checkpoint.

    pics composite --background IMG --object IMG:MASK --object IMG:x0,y0,x1,y1 [--object ...]
                   --checkpoint DIR --out FILE [--steps --guidance --scheduler --seed --device]

Each ``--object`` is an object image (on white, or RGBA: transparent pixels become white) and,
after the last ``:``, where it goes in the background: a mask image of the background's size
(the object's tight box is taken from its pixels) or a box ``x0,y0,x1,y1`` in background pixels.
``--layout auto --region x0,y0,x1,y1`` instead takes plain ``--object IMG`` values and lays the
objects out in that region first (tasks/layout/place.py: pics_model.layout with each object
overlapping the next). ``--sample-dir DIR`` instead reads the reference implementation's sample layout: ``DIR/image.jpg``
(background), ``DIR/object_k.png`` and ``DIR/object_k_mask.png`` (its placement mask, the
background's size) for k = 0, 1, ... The same through Python: :func:`composite` (and
:func:`read_sample_dir`). Not a pipeline stage, so no Prefect here: a call is one model load and
one pipeline run. Bad inputs raise :class:`CompositeInputError` naming the file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from tasks.params import EvaluateParams, Params

_SAMPLER = EvaluateParams()  # the defaults of steps, guidance, scheduler and seed: the evaluate section's

BOX_RE = re.compile(r"^\s*-?\d+(\.\d*)?\s*(,\s*-?\d+(\.\d*)?\s*){3}$")


class CompositeInputError(ValueError):
    """An unusable input to ``pics composite``; the message names the file or option."""


@dataclass
class ObjectSpec:
    image: object  # path, PIL image or uint8 array
    mask: object | None = None  # path, PIL image or array [H, W] in the background's frame
    box: Sequence[float] | None = None  # xyxy, background pixels


def parse_object(spec: str) -> ObjectSpec:
    """``"obj.png:mask.png"`` or ``"obj.png:10,20,110,140"`` -> ObjectSpec."""
    if ":" not in spec:
        raise CompositeInputError(f"--object {spec!r}: expected IMG:MASK or IMG:x0,y0,x1,y1")
    img, where = spec.rsplit(":", 1)
    if not img or not where:
        raise CompositeInputError(f"--object {spec!r}: expected IMG:MASK or IMG:x0,y0,x1,y1")
    if BOX_RE.match(where):
        return ObjectSpec(image=img, box=[float(v) for v in where.split(",")])
    return ObjectSpec(image=img, mask=where)


def read_sample_dir(directory) -> tuple[Path, list[ObjectSpec]]:
    """The reference's sample layout -> (background path, objects with their placement masks)."""
    d = Path(directory)
    if not d.is_dir():
        raise CompositeInputError(f"--sample-dir {d}: no such directory")
    background = d / "image.jpg"
    if not background.is_file():
        raise CompositeInputError(f"--sample-dir {d}: missing image.jpg (the background)")
    specs = []
    while (d / f"object_{len(specs)}.png").is_file():
        k = len(specs)
        mask = d / f"object_{k}_mask.png"
        if not mask.is_file():
            raise CompositeInputError(f"--sample-dir {d}: object_{k}.png has no placement mask {mask.name}")
        specs.append(ObjectSpec(image=d / f"object_{k}.png", mask=mask))
    if not specs:
        raise CompositeInputError(f"--sample-dir {d}: no object_0.png")
    stray = sorted(p.name for p in d.glob("object_*.png") if p.name not in
                   {n for i in range(len(specs)) for n in (f"object_{i}.png", f"object_{i}_mask.png")})
    if stray:
        raise CompositeInputError(f"--sample-dir {d}: {stray} do not continue object_0..object_{len(specs) - 1}")
    return background, specs


def _open(src, what: str) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, np.ndarray):
        return Image.fromarray(src)
    path = Path(src)
    if not path.is_file():
        raise CompositeInputError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise CompositeInputError(f"{what} {path}: cannot read the image ({e})") from None


def _name(src, fallback: str) -> str:
    return str(src) if isinstance(src, (str, Path)) else fallback


def load_object(src, what: str) -> np.ndarray:
    """An object image -> uint8 [P, P, 3] on white, padded to a square (as the training patches)."""
    im = _open(src, what)
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    rgb = np.asarray(im.convert("RGB"))
    h, w = rgb.shape[:2]
    if min(h, w) < 1:
        raise CompositeInputError(f"{what} {_name(src, '')}: empty image")
    s = max(h, w)
    sq = np.full((s, s, 3), 255, np.uint8)
    sq[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = rgb
    return sq


def load_mask(src, what: str, size: tuple[int, int], bg_name: str) -> np.ndarray:
    """A placement mask -> bool [H, W]; it must have the background's size and hold pixels."""
    if isinstance(src, np.ndarray) and src.ndim == 2:
        m = src > 0
    else:
        m = np.asarray(_open(src, what).convert("L")) >= 128
    w, h = size
    if m.shape != (h, w):
        raise CompositeInputError(f"{what} {_name(src, '<array>')}: size {m.shape[1]}x{m.shape[0]} does not match "
                                  f"the background {bg_name} ({w}x{h})")
    if not m.any():
        raise CompositeInputError(f"{what} {_name(src, '<array>')}: empty mask, the object would lie outside "
                                  "the image")
    return m


def check_box(box: Sequence[float], what: str, size: tuple[int, int], bg_name: str) -> np.ndarray:
    b = np.asarray(box, np.float64).reshape(-1)
    w, h = size
    if b.shape != (4,) or not np.isfinite(b).all():
        raise CompositeInputError(f"{what}: a box is four numbers x0,y0,x1,y1, got {list(box)}")
    x0, y0, x1, y1 = b
    if not (x1 > x0 and y1 > y0):
        raise CompositeInputError(f"{what}: box {list(b)} is empty (need x0 < x1 and y0 < y1)")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise CompositeInputError(f"{what}: box {list(b)} lies outside the background {bg_name} ({w}x{h})")
    return b.astype(np.float32)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CompositeInputError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CompositeInputError(f"--device {name!r}: CUDA is not available on this machine")
    return dev


def _check_checkpoint(checkpoint) -> "object":
    from pics_model.config import PICSConfig

    d = Path(checkpoint)
    for name in ("config.json", "model.safetensors"):
        if not (d / name).is_file():
            raise CompositeInputError(f"--checkpoint {d}: not a saved PICS model (missing {name})")
    try:
        return PICSConfig.load(d / "config.json")
    except ValueError as e:
        raise CompositeInputError(f"--checkpoint {d}: {e}") from None


def composite(background, objects: Sequence, checkpoint, masks: Sequence | None = None,
              boxes: Sequence | None = None, *, steps: int = _SAMPLER.steps, guidance: float = _SAMPLER.guidance,
              scheduler: str = _SAMPLER.scheduler, seed: int = _SAMPLER.seed, device: str = "auto", out=None,
              model=None, threads: int | None = None):
    """Composite ``objects`` into ``background`` with the model saved at ``checkpoint``.

    background: path / PIL / uint8 [H, W, 3]. objects: N images (path / PIL / array) or ObjectSpecs.
    masks / boxes: per object, a placement mask (background-sized) or an xyxy box; an ObjectSpec
    carries its own. model: an already loaded PICSModel (skips loading; ``checkpoint`` may be None).
    threads: torch CPU threads (default: torch's, one per core; on a busy machine 1 can be far faster).
    Returns the composite as a PIL image (also written to ``out`` when given).
    """
    from pics_model.pipeline_pics import SCHEDULERS

    bg_name = _name(background, "<background>")
    bg = np.asarray(_open(background, "--background").convert("RGB"))
    size = (bg.shape[1], bg.shape[0])
    specs = []
    for i, o in enumerate(objects):
        if isinstance(o, ObjectSpec):
            specs.append(o)
        else:
            specs.append(ObjectSpec(o, None if masks is None else masks[i], None if boxes is None else boxes[i]))
    if not specs:
        raise CompositeInputError("no --object given")
    if steps < 1:
        raise CompositeInputError(f"--steps must be >= 1, got {steps}")
    if guidance < 0:
        raise CompositeInputError(f"--guidance must be >= 0, got {guidance}")
    if scheduler not in SCHEDULERS:
        raise CompositeInputError(f"--scheduler {scheduler!r}: choose one of {list(SCHEDULERS)}")
    cfg = model.config if model is not None else _check_checkpoint(checkpoint)
    if len(specs) > cfg.itb.max_objects:
        raise CompositeInputError(f"{len(specs)} objects, but the model at {checkpoint} takes at most "
                                  f"{cfg.itb.max_objects} (itb.max_objects)")
    if out is not None and Path(out).suffix.lower() not in Image.registered_extensions():
        raise CompositeInputError(f"--out {out}: unknown image extension {Path(out).suffix!r} (use .png or .jpg)")
    patches, tight = [], []
    for i, sp in enumerate(specs):
        what = f"--object {i + 1}"
        patches.append(load_object(sp.image, f"{what} image"))
        if (sp.mask is None) == (sp.box is None):
            raise CompositeInputError(f"{what} ({_name(sp.image, '')}): give exactly one of a mask or a box")
        if sp.mask is not None:
            from pics_model.data import tight_box_from_mask

            tight.append(tight_box_from_mask(load_mask(sp.mask, f"{what} mask", size, bg_name)))
        else:
            tight.append(check_box(sp.box, f"{what} box", size, bg_name))
    side = max(p.shape[0] for p in patches)
    patches = np.stack([p if p.shape[0] == side else
                        np.asarray(Image.fromarray(p).resize((side, side), Image.Resampling.BICUBIC)) for p in patches])

    dev = _device(device)
    if threads is not None:
        if threads < 1:
            raise CompositeInputError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    if model is None:
        from pics_model.modeling_pics import PICSModel

        model = PICSModel.from_pretrained(checkpoint)
    model = model.to(dev).eval()
    from pics_model.pipeline_pics import NonFiniteOutputError, PICSPipeline

    try:
        result = PICSPipeline(model, scheduler)(bg, patches, boxes=np.stack(tight), num_inference_steps=steps,
                                                guidance_scale=guidance, seed=seed)
    except NonFiniteOutputError as e:
        raise NonFiniteOutputError(f"--checkpoint {checkpoint}: {e}") from None
    img = result.images[0]
    if out is not None:
        from tasks import atomic

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(out) as tmp:
            img.save(tmp, format=Image.registered_extensions()[Path(out).suffix.lower()])
    return img


def _proposed(obj: str, background: str, class_name: str, checkpoint: str | None) -> ObjectSpec:
    """An object given without mask or box: the location model proposes its box (issue 14)."""
    from tasks.location.propose import best_box
    from tasks.params import resolve_path

    try:
        return ObjectSpec(image=obj, box=best_box(background, obj, class_name,
                                                  checkpoint or resolve_path("data/location/final")))
    except (ValueError, FileNotFoundError) as e:
        raise CompositeInputError(f"--object {obj!r} with --class {class_name!r}: {e}") from None


def auto_layout_specs(background, objects: list[str], region: str | None, layout_params) -> list[ObjectSpec]:
    """``--layout auto``: each object's placement mask from a layout of all of them in ``region``."""
    from tasks.layout.io import LayoutInputError
    from tasks.layout.place import layout_objects

    if region is None:
        raise CompositeInputError("--layout auto needs --region x0,y0,x1,y1 (where the objects go)")
    if not BOX_RE.match(region):
        raise CompositeInputError(f"--region {region!r}: expected x0,y0,x1,y1")
    bg = _open(background, "--background")
    box = check_box([float(v) for v in region.split(",")], "--region", bg.size, _name(background, "<background>"))
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    try:
        masks = layout_objects(objects, (x0, y0, x1, y1), bg.size, layout_params)
    except LayoutInputError as e:
        raise CompositeInputError(str(e)) from None
    return [ObjectSpec(image=o, mask=m) for o, m in zip(objects, masks)]


def composite_cli(background: str | None, objects: list[str] | None, checkpoint: str, out: str,
                  params: Params, device: str = "auto", threads: int | None = None,
                  sample_dir: str | None = None, class_name: str | None = None,
                  location_checkpoint: str | None = None, layout: str | None = None,
                  region: str | None = None) -> Path:
    """The command: steps, guidance, scheduler and seed are the ``evaluate:`` section's (``pics
    composite`` validated it), so a CLI composite matches what the evaluation measured.
    `sample_dir` replaces background/objects; an object without mask or box and ``class_name``:
    the location model proposes its box; `layout="auto"` places plain object images in `region`
    (the ``layout:`` section's method)."""
    if layout not in (None, "auto"):
        raise CompositeInputError(f"--layout {layout!r}: the only layout is 'auto'")
    if sample_dir is not None:
        if background is not None or objects:
            raise CompositeInputError("--sample-dir replaces --background and --object: give one or the other")
        background, specs = read_sample_dir(sample_dir)
    elif background is None or not objects:
        raise CompositeInputError("give --background and at least one --object, or --sample-dir")
    elif layout == "auto":
        specs = auto_layout_specs(background, objects, region, params.layout)
    else:
        specs = [_proposed(o, background, class_name, location_checkpoint) if class_name and ":" not in o
                 else parse_object(o) for o in objects]
    sampler = params.evaluate
    composite(background, specs, checkpoint, steps=sampler.steps, guidance=sampler.guidance,
              scheduler=sampler.scheduler, seed=sampler.seed, device=device, out=out, threads=threads)
    return Path(out)
