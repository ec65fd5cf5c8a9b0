"""Per-sample evaluation work: run every method on a test sample and score it.

``Evaluator`` is the callable class that Ray Data's ``map_batches`` runs in its actors (one model
load per actor, batches of raw shard rows in, result rows out); the same class runs in-process
for tests and the benchmark's baseline. Every method of one sample shares the boxes, the seed
and the scoring, and each result row carries its composite as PNG bytes.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from tasks.codec import png_bytes
from tasks.evaluate import baselines, metrics, occlusion
from tasks.evaluate.backbones import Embedder, MobileNetV2Features, load_embedder, mobilenetv2_embedder
from tasks.params import EvaluateParams

METHODS = ("pics", "copy_paste", "sequential", "untrained")
GROUND_TRUTH = "ground_truth"
# Score columns, in table order. Proxy names say which backbone stands in for the standard one.
PIXEL_METRICS = ("psnr", "ssim", "mpsnr", "mssim")
PROXY_METRICS = ("lpips_mobilenetv2_proxy", "mlpips_mobilenetv2_proxy", "objsim_mobilenetv2_proxy")
STANDARD_METRICS = ("clip_score", "dinov2_score", "dreamsim")  # only with local weights
SCORE_COLUMNS = PIXEL_METRICS + PROXY_METRICS + STANDARD_METRICS
LOWER_IS_BETTER = {"lpips_mobilenetv2_proxy", "mlpips_mobilenetv2_proxy", "dreamsim", "fid_mobilenetv2_proxy"}

RESULT_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("method", pa.string()), ("error", pa.string()), ("seconds", pa.float64()),
     ("n_objects", pa.int32()), ("overlap_px", pa.int64()), ("height", pa.int32()), ("width", pa.int32()),
     ("with_priors", pa.bool_())]
    + [(c, pa.float64()) for c in SCORE_COLUMNS]
    + [("fid_features", pa.list_(pa.float32())),
       # occlusion-order sums (tasks/evaluate/occlusion.py): token-grid sides L; per step and level
       # credit and ties [S*L], flattened; per level routed and evaluated pixels [L]
       ("occ_levels", pa.list_(pa.int32())), ("occ_credit", pa.list_(pa.float64())),
       ("occ_ties", pa.list_(pa.float64())), ("occ_routed", pa.list_(pa.float64())),
       ("occ_pixels", pa.list_(pa.float64())),
       ("alpha_diff", pa.binary()), ("alpha_grid", pa.int32()), ("visibility", pa.binary()),
       ("png", pa.binary())]
)


@dataclass
class EvalConfig:
    """Everything an actor needs, picklable: the validated ``evaluate:`` section (methods, steps,
    guidance, scheduler, seed, record_alpha, lpips_min_side) and what the plan resolved from it."""

    checkpoint: str  # resolved paths, as strings
    params: EvaluateParams = field(default_factory=EvaluateParams)
    untrained: str | None = None
    priors: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    backbones: dict[str, str] = field(default_factory=dict)  # {"clip": path, ...}
    threads: int | None = None  # torch threads in this worker (Ray actors: their CPU share)


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-sample seed that does not depend on batching, actors or order."""
    return (seed + int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16)) % (2**31)


def _unit(img: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255.0)


def object_views(img: np.ndarray, masks: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """Each object as its input patch was cut: the tight box, white outside the object's mask,
    padded to a square with white. uint8 [s, s, 3] each."""
    out = []
    for m, (x0, y0, x1, y1) in zip(masks, np.asarray(boxes).round().astype(int)):
        crop = img[y0:y1, x0:x1].copy()
        crop[m[y0:y1, x0:x1] == 0] = 255
        h, w = crop.shape[:2]
        s = max(h, w, 1)
        sq = np.full((s, s, 3), 255, np.uint8)
        sq[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = crop
        out.append(sq)
    return out


class Evaluator:
    """Callable over a batch of raw decompose rows (pyarrow.Table) -> result rows (pyarrow.Table)."""

    def __init__(self, cfg: EvalConfig):
        from pics_model.modeling_pics import PICSModel
        from pics_model.pipeline_pics import PICSPipeline

        self.cfg = cfg
        p = cfg.params
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        dev = cfg.device
        self.device = torch.device("cuda" if dev == "auto" and torch.cuda.is_available() else
                                   ("cpu" if dev == "auto" else dev))
        need_model = {"pics", "sequential"} & set(p.methods)
        self.model = PICSModel.from_pretrained(cfg.checkpoint).to(self.device).eval() if need_model else None
        self.pipe = (PICSPipeline(self.model, p.scheduler, full_resolution=p.full_resolution)
                     if self.model is not None else None)
        self.untrained_pipe = None
        if "untrained" in p.methods and cfg.untrained:
            m0 = PICSModel.from_pretrained(cfg.untrained).to(self.device).eval()
            self.untrained_pipe = PICSPipeline(m0, p.scheduler, full_resolution=p.full_resolution)
        cfg_model = (self.model or getattr(self.untrained_pipe, "model", None))
        self.box_expand = cfg_model.config.box_expand if cfg_model is not None else 1.15
        self.use_priors = bool(cfg.priors) and cfg_model is not None and cfg_model.config.shape_encoder.enabled
        self.priors = None
        if self.use_priors:
            from tasks.render_priors.store import PriorStore

            self.priors = PriorStore(cfg.priors)
        self.net = MobileNetV2Features().to(self.device)
        self.embedder: Embedder = mobilenetv2_embedder()
        self.embedder.module.to(self.device)
        self.standard = {k: load_embedder(k, p, key=f"evaluate.{k}_path") for k, p in cfg.backbones.items() if p}
        for emb in self.standard.values():
            emb.module.to(self.device)

    # ------------------------------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> pa.Table:
        from pics_model.pipeline_pics import NonFiniteOutputError

        rows = batch.to_pylist() if isinstance(batch, pa.Table) else _rows_from_columns(batch)
        out: list[dict] = []
        for row in rows:
            try:
                out.extend(self.evaluate_row(row))
            except NonFiniteOutputError:
                raise  # a broken model, not a bad sample: no score is measured on NaN
            except Exception as e:  # noqa: BLE001 - one bad sample is quarantined, the run goes on
                out.append({"sample_id": str(row.get("sample_id")), "method": "",
                            "error": f"{type(e).__name__}: {e}"})
        return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)

    def _priors(self, row: dict) -> np.ndarray | None:
        if self.priors is None:
            return None
        from tasks.schema import object_key
        from tasks.codec import decode_view

        views = [self.priors.views(object_key(p, m)) for p, m in zip(row["patches"], row["patch_masks"])]
        if any(v is None for v in views):
            return None
        return np.stack([np.stack([decode_view(b) for b in v]) for v in views])

    def composites(self, row: dict) -> tuple[dict, dict[str, dict]]:
        """Decode one row and run every method: (sample, {method: {"image", "seconds", "alpha"}})."""
        from pics_model.data import expand_boxes
        from tasks.shards import decode_sample

        p = self.cfg.params
        s = decode_sample(row)
        h, w = s["image"].shape[:2]
        s["expanded"] = expand_boxes(s["boxes_tight"], self.box_expand, w, h)
        priors = self._priors(row)
        s["with_priors"] = priors is not None
        seed = sample_seed(p.seed, s["sample_id"])
        t0 = time.perf_counter()
        inpainted = baselines.erase_and_inpaint(s["image"], s["expanded"])
        t_inpaint = time.perf_counter() - t0
        results: dict[str, dict] = {}
        for method in p.methods:
            t0 = time.perf_counter()
            alpha = gates = None
            if method == "copy_paste":
                img = baselines.copy_paste(s, s["expanded"], inpainted)
                extra = t_inpaint
            elif method == "sequential":
                img = baselines.sequential(self.pipe, s, s["expanded"], steps=p.steps, guidance=p.guidance,
                                           seed=seed, background=inpainted, priors=priors)
                extra = t_inpaint
            else:
                pipe = self.pipe if method == "pics" else self.untrained_pipe
                if pipe is None:
                    continue  # untrained requested but no init model: the summary says so
                o = pipe(s["image"], s["patches"], boxes=s["boxes_tight"], num_inference_steps=p.steps,
                         guidance_scale=p.guidance, seed=seed, record_alpha=p.record_alpha, priors=priors,
                         output_type="pil", patch_masks=s["patch_masks"])
                img, alpha, gates, extra = np.asarray(o.images[0]), o.alpha_maps, o.gate_maps, 0.0
                if not np.allclose(o.boxes[0], s["expanded"], atol=1e-3):
                    raise RuntimeError(f"{s['sample_id']}: pipeline used boxes {o.boxes[0].tolist()}, "
                                       f"evaluation expected {s['expanded'].tolist()}")
            results[method] = {"image": img, "seconds": time.perf_counter() - t0 + extra, "alpha": alpha,
                               "gates": gates}
        return s, results

    @torch.no_grad()
    def evaluate_row(self, row: dict) -> list[dict]:
        s, results = self.composites(row)
        h, w = s["image"].shape[:2]
        overlap = metrics.overlap_mask(torch.from_numpy(s["expanded"]), h, w)
        methods = list(results)
        gt = _unit(s["image"])
        preds = torch.stack([_unit(results[m]["image"]) for m in methods])
        gts = gt[None].expand_as(preds)
        ov = overlap[None].expand(len(methods), h, w)
        dev = self.device
        scores = {
            "psnr": metrics.psnr(preds, gts), "ssim": metrics.ssim(preds, gts),
            "mpsnr": metrics.psnr(preds, gts, ov), "mssim": metrics.ssim(preds, gts, ov),
            "lpips_mobilenetv2_proxy": metrics.lpips_proxy(self.net, preds.to(dev), gts.to(dev),
                                                           min_side=self.cfg.params.lpips_min_side).cpu(),
            "mlpips_mobilenetv2_proxy": metrics.lpips_proxy(self.net, preds.to(dev), gts.to(dev), ov.to(dev),
                                                            min_side=self.cfg.params.lpips_min_side).cpu(),
        }
        feats = self.embedder.embed(torch.cat([gt[None], preds]).to(dev)).cpu()
        # object fidelity: each object cut from the composite like its input patch, vs that patch
        n = len(s["boxes_tight"])
        ref = torch.stack([_unit(p) for p in s["patches"]])
        crops = [_square224(v) for m in methods
                 for v in object_views(results[m]["image"], s["masks"], s["boxes_tight"])]
        crops = torch.stack(crops)
        sims = {"objsim_mobilenetv2_proxy": self._objsim(self.embedder, crops, ref, n, len(methods))}
        for kind, emb in self.standard.items():
            cos = self._objsim(emb, crops, ref, n, len(methods))
            sims[{"clip": "clip_score", "dinov2": "dinov2_score", "dreamsim": "dreamsim"}[kind]] = (
                100 * cos.clamp_min(0) if kind == "clip" else (1 - cos if kind == "dreamsim" else cos))

        grid = self._grid()
        truth = occlusion.occlusion_truth(s) if grid else occlusion.OcclusionTruth([])
        rows = [{"sample_id": s["sample_id"], "method": GROUND_TRUTH, "n_objects": n, "overlap_px": int(overlap.sum()),
                 "with_priors": s["with_priors"],
                 "height": h, "width": w, "fid_features": feats[0].tolist(), "png": png_bytes(s["image"]),
                 "alpha_grid": grid or None,
                 "visibility": occlusion.visibility_map(truth, grid).astype(np.float16).tobytes() if grid else None}]
        for i, m in enumerate(methods):
            r = {"sample_id": s["sample_id"], "method": m, "seconds": results[m]["seconds"], "n_objects": n,
                 "overlap_px": int(overlap.sum()), "height": h, "width": w,
                 "fid_features": feats[i + 1].tolist(), "png": png_bytes(results[m]["image"])}
            for k, v in {**scores, **sims}.items():
                r[k] = _finite(v[i])
            alpha, gates = results[m]["alpha"], results[m]["gates"]
            if alpha:
                r["alpha_grid"] = alpha[0].shape[-1]
            if gates and truth:
                st = occlusion.sample_stats(gates, truth)
                r.update(occ_levels=st["levels"], occ_credit=st["credit"].ravel().tolist(),
                         occ_ties=st["ties"].ravel().tolist(), occ_routed=st["routed"].tolist(),
                         occ_pixels=st["pixels"].tolist())
                if n >= 2:
                    r["alpha_diff"] = np.stack([a[0] - a[1] for a in alpha]).astype(np.float16).tobytes()
            rows.append(r)
        return rows

    def _grid(self) -> int | None:
        m = self.model or getattr(self.untrained_pipe, "model", None)
        return m.config.latent_size if m is not None and self.cfg.params.record_alpha else None

    def _objsim(self, emb: Embedder, crops: torch.Tensor, ref: torch.Tensor, n: int, k: int) -> torch.Tensor:
        dev = self.device
        e_crop = emb.embed(crops.to(dev)).cpu().view(k, n, -1)
        e_ref = emb.embed(ref.to(dev)).cpu()
        return metrics.cosine(e_crop, e_ref[None].expand_as(e_crop)).mean(1)


def _square224(img: np.ndarray) -> torch.Tensor:
    return _unit(np.asarray(Image.fromarray(img).resize((224, 224), Image.Resampling.BICUBIC)))


def _finite(v) -> float | None:
    v = float(v)
    return None if np.isnan(v) else v


def _rows_from_columns(batch: dict) -> list[dict]:
    keys = list(batch)
    return [dict(zip(keys, vals)) for vals in zip(*(batch[k] for k in keys))]


def find_untrained(checkpoint: str | Path) -> Path | None:
    """The model a training run started from: ``<train.out>/init`` beside ``<train.out>/final``,
    a declared output of the train stage (so ``dvc pull`` brings it along)."""
    init = Path(checkpoint).parent / "init"
    return init if (init / "config.json").is_file() else None
