"""Arrangement transfer: carry an interacting pair of objects (one resting on or against the other)
from a source scene into a target scene by the scene map, and render the result as a new
composition sample in make_sample's format (image, visible and amodal masks, depth order, point set).

Each of the pair's objects is placed by the map: a yaw-and-translation fit (Procrustes, no mirror:
meshes are not flipped) of its source points onto their images. A support whose image lands on a
target object of its own class is *identified* with it (the target already has it there: nothing
is added); the item, and a support that is not identified, are *inserted*: the source's mesh at
the fitted yaw and floor position, dropped onto the target's height field (make_sample's
placement) so that it rests on what lies under it, support first. Support check: an inserted
object that stood on the floor in the source stands on the floor here too (where the drop would
rest it on a target object, it slides to the nearest free floor place, and the item with it): no
book balanced on a lying bottle. The camera is reframed on the grown cluster from the target's side.

Meshes are rebuilt from the generator: a scene file written by the analogy stage carries a
``generator`` field (seed, index, min_objects, max_objects of `scenes.generate_spec`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

from pics_model.context_field import ContextDescriptorField
from pics_model.scene_map import MapConfig, compute_map, procrustes_yaw, scene_tensors
from tasks import atomic
from tasks.analogy.scenes import GENERATOR, Scene, SceneError, generate_spec, load_scene
from tasks.plots import figure_png, pyplot

TRANSFER_JSON = "transfer.json"  # beside annotations.json: where each sample's objects came from
LIFTED = 1e-3  # scene units above the floor: an object resting on another, not on the ground


def load_spec(path: str | Path, scene: Scene):
    """The generator's layout (meshes, poses) of the scene file at ``path``, checked against its points."""
    try:
        with np.load(path, allow_pickle=False) as z:
            gen = z[GENERATOR] if GENERATOR in z.files else None
    except (OSError, ValueError) as e:
        raise SceneError(f"{path}: not a readable .npz scene ({e})") from None
    if gen is None:
        raise SceneError(f"{path}: field {GENERATOR!r} missing: arrangement transfer rebuilds the scene's meshes "
                         "from it (scene files written by the analogy stage, data/analogy/scenes, carry it)")
    if gen.shape != (4,) or not np.issubdtype(gen.dtype, np.integer) or gen[2] < 1 or gen[3] < gen[2]:
        raise SceneError(f"{path}: field {GENERATOR!r} must be 4 integers (seed, index, min_objects, "
                         f"max_objects), got {gen.dtype} {gen.tolist()}")
    spec, _ = generate_spec(int(gen[1]), int(gen[0]), (int(gen[2]), int(gen[3])))
    labels = [scene.object_label(k) for k in scene.object_ids()]
    if labels != [o.category.id for o in spec.objects]:
        raise SceneError(f"{path}: field {GENERATOR!r} rebuilds objects of classes "
                         f"{[o.category.id for o in spec.objects]}, the points hold {labels}")
    return spec


def resting_support(scene: Scene, spec, item: int) -> int:
    """The object ``item`` rests on, -1: the floor. Whether it is lifted comes from its pose in
    ``spec`` (sparse surface samples need not reach an object's bottom); what it rests on, from the
    points: the owner of most points nearest its lowest ones."""
    if spec.objects[item].pose[2, 3] < LIFTED:
        return -1
    pts = scene.object_points(item)
    low = pts[pts[:, 2] < pts[:, 2].min() + 0.01]
    others = (scene.instance >= 0) & (scene.instance != item)
    _, nn = cKDTree(scene.points[others]).query(low)
    return int(np.bincount(scene.instance[others][nn]).argmax())


def interacting_pair(scene: Scene, spec) -> tuple[int, int]:
    """(support, item): the first object resting on another; else the two closest objects (touching
    side by side), the larger-footprint one as support."""
    for k in scene.object_ids():
        s = resting_support(scene, spec, int(k))
        if s >= 0:
            return s, int(k)
    ids = [int(k) for k in scene.object_ids()]
    gaps = {(a, b): float(cKDTree(scene.object_points(a)).query(scene.object_points(b))[0].min())
            for i, a in enumerate(ids) for b in ids[i + 1:]}
    a, b = min(gaps, key=gaps.get)
    area = [float(np.prod(np.ptp(scene.object_points(k)[:, :2], 0))) for k in (a, b)]
    return (a, b) if area[0] >= area[1] else (b, a)


def parse_pair(text: str) -> tuple[int, int]:
    """``SUPPORT,ITEM`` (two object ids) as given to ``pics analogy --pair``."""
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise SceneError(f"--pair {text!r}: expected two object ids, SUPPORT,ITEM (e.g. 0,2)") from None
    return a, b


def check_pair(path: str | Path, scene: Scene, pair: tuple[int, int]) -> None:
    ids = set(int(k) for k in scene.object_ids())
    if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= ids:
        raise SceneError(f"{path}: pair {list(pair)} must be two different object ids of the scene "
                         f"(field 'instance' holds {sorted(ids)})")


def identified_with(mapped: np.ndarray, label: int, target: Scene, threshold: float) -> int:
    """The target object of class ``label`` on which most mapped points land (within
    ``threshold`` of its points), or -1 when fewer than half land on one."""
    obj = target.instance >= 0
    d, nn = cKDTree(target.points[obj]).query(mapped)
    owner = target.instance[obj][nn]
    hit = owner[(d < threshold)]
    if not len(hit):
        return -1
    best = int(np.bincount(hit).argmax())
    return best if target.object_label(best) == label and (hit == best).sum() >= len(mapped) / 2 else -1


def floor_cell(field, cell: np.ndarray, bottom: np.ndarray, companion=None, reach: int = 120,
               step: int = 4) -> np.ndarray | None:
    """The cell nearest ``cell`` (on a ``step`` grid, within ``reach`` cells) where an object with
    this bottom map rests on the floor, not on something placed, and where ``companion`` (cell
    offset, bottom map: the item it carries) finds the floor clear too, so that it will rest on
    this object and nothing else; None: no such cell."""
    r = np.arange(-reach, reach + 1, step)
    offsets = np.stack(np.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)
    offsets = offsets[np.argsort(np.linalg.norm(offsets, axis=1), kind="stable")]
    for o in offsets[np.linalg.norm(offsets, axis=1) <= reach]:
        c = field.clamp(cell + o)
        if field.rest(c, bottom) < LIFTED and (companion is None or clear(field, c, companion)):
            return c
    return None


def clear(field, cell: np.ndarray, companion) -> bool:
    """Whether the companion (cell offset from ``cell``, bottom map) would rest on the floor."""
    return field.rest(field.clamp(cell + companion[0]), companion[1]) < LIFTED


def footprint(placed, fit, renderer, offset: np.ndarray | None = None):
    """A source object (make_sample ``Placed``) turned and moved by ``fit`` (yaw + translation;
    then by ``offset`` in xy): (mesh, top and bottom height maps, origin, world cell)."""
    from tasks.make_sample.layout import LOCAL_CELLS, PITCH, WORLD_CELLS

    turn = np.eye(4)
    turn[:3, :3] = fit.rotation.double().numpy()
    mesh = placed.shape.mesh.copy()
    mesh.apply_transform(turn)  # about its own vertical axis: still centred, still on z = 0
    origin = fit.apply(torch.as_tensor(placed.pose[:3, 3], dtype=torch.float32)[None])[0].double().numpy()
    if offset is not None:
        origin[:2] += offset
    top, bottom = renderer.heightmaps(mesh, LOCAL_CELLS, PITCH)
    return mesh, top, bottom, origin, np.round(origin[1::-1] / PITCH + WORLD_CELLS / 2).astype(int)  # (row = y, col = x)


def _inserted(placed, fit, field, renderer, on_floor: bool = False, offset: np.ndarray | None = None,
              companion=None):
    """A copy of a source object (make_sample ``Placed``) turned and moved by ``fit`` (yaw +
    translation; then by ``offset`` in xy), dropped onto ``field`` (a make_sample HeightField)
    where it lands. ``on_floor``: it stood on the floor in the source, so it must here too (the
    support check): where the drop would rest it on a target object (a book on a lying bottle), or
    where ``companion`` (the item it carries: cell offset, bottom map) would not find the floor
    clear under it, it slides to the nearest place where both hold. Returns the placed object and a
    record (``slid``: how far it moved, scene units)."""
    from tasks.make_sample.layout import CONTACT_GAP, PITCH, Placed, _translation
    from tasks.make_sample.shapes import Shape

    mesh, top, bottom, origin, cell = footprint(placed, fit, renderer, offset)
    cell = field.clamp(cell)
    record = {"mapped_origin": [round(float(v), 4) for v in origin]}
    if on_floor and (field.rest(cell, bottom) >= LIFTED or (companion is not None and not clear(field, cell, companion))):
        free = floor_cell(field, cell, bottom, companion)
        if free is not None:
            record["slid"] = round(float(np.linalg.norm(free - cell) * PITCH), 4)
            cell = free
    z = field.rest(cell, bottom) + CONTACT_GAP
    field.add(cell, top, bottom, z)
    pose = np.eye(4)
    pose[:2, 3], pose[2, 3] = _translation(cell), z
    shape = Shape(mesh, placed.shape.colors, placed.shape.metallic, placed.shape.roughness, placed.shape.smooth)
    moved = Placed(placed.category, shape, pose, cell.astype(float), placed.radius, placed.flat_top, "transferred")
    return moved, {**record, "rest_height": round(float(z), 4)}


def height_field(spec, renderer):
    """make_sample's HeightField of a composed scene's objects (what new objects are dropped on)."""
    from tasks.make_sample.layout import LOCAL_CELLS, PITCH, HeightField

    field = HeightField()
    for o in spec.objects:
        top, bottom = renderer.heightmaps(o.shape.mesh, LOCAL_CELLS, PITCH)
        field.add(np.round(o.center).astype(int), top, bottom, float(o.pose[2, 3]))
    return field


def place_pair(field: ContextDescriptorField, cfg: MapConfig, source: Scene, source_spec, target: Scene,
               target_spec, pair: tuple[int, int], rng: np.random.Generator, aspect: float = 4 / 3):
    """The target's layout with the pair (support, item) carried over: (new spec, record of what
    was identified or inserted). The item is always inserted (it is what is being arranged); the
    support is identified with a target object of its class where its image lands on one."""
    from tasks.make_sample.layout import _frame
    from tasks.make_sample.renderer import get_renderer

    query = np.concatenate([source.object_points(k) for k in pair])
    m = compute_map(field, scene_tensors(source.points, source.label, source.instance),
                    scene_tensors(target.points, target.label, target.instance), torch.from_numpy(query), cfg)
    threshold = 0.25 * field.config.typical_object_size
    renderer = get_renderer(64, 64)
    heights = height_field(target_spec, renderer)
    objects, record = list(target_spec.objects), {"cost": round(float(m.cost), 4), "objects": []}
    slide = None  # xy the inserted support slid by (support check), which the item follows

    def fit_of(k: int):  # yaw + translation of source object k onto its image (no mirror: meshes are not flipped)
        pts = torch.from_numpy(source.object_points(k))
        return procrustes_yaw(pts, m(pts), torch.ones(len(pts)), torch.eye(3), 1.0)

    for k in sorted(pair, key=lambda k: float(source.object_points(k)[:, 2].min())):  # supports first
        pts = torch.from_numpy(source.object_points(k))
        mapped = m(pts)
        entry = {"source_object": k, "category_id": source.object_label(k)}
        same = identified_with(mapped.numpy(), source.object_label(k), target, threshold) if k == pair[0] else -1
        if same >= 0:
            record["objects"].append({**entry, "identified_with": same})
            continue
        fit = fit_of(k)
        on_floor = source_spec.objects[k].pose[2, 3] < LIFTED
        companion = None
        if k == pair[0] and source_spec.objects[pair[1]].pose[2, 3] >= LIFTED:  # its item rests on it
            _, _, bottom, _, cell = footprint(source_spec.objects[pair[1]], fit_of(pair[1]), renderer)
            companion = (cell - footprint(source_spec.objects[k], fit, renderer)[4], bottom)
        placed, where = _inserted(source_spec.objects[k], fit, heights, renderer, on_floor,
                                  None if k == pair[0] else slide, companion)
        if k == pair[0] and "slid" in where:  # the item goes where its support went
            slide = placed.pose[:2, 3] - np.asarray(where["mapped_origin"][:2])
        record["objects"].append({**entry, "inserted_as": len(objects), **where})
        objects.append(placed)
    view_dir = target_spec.info["view_dir"]
    camera, yfov, centre, radius = _frame(rng, objects, view_dir, aspect, (8, 42))
    spec = dataclasses.replace(target_spec, objects=objects, camera_pose=camera, yfov=yfov, center=centre,
                               wall_distance=max(target_spec.wall_distance, radius + 0.2),
                               info={**target_spec.info, "reframed": 0})
    return spec, record


def support_in(scene_spec, item: int) -> int:
    """The object a placed object rests on in a composed layout, from its scene points; -1 floor."""
    from tasks.make_sample.layout import scene_points

    return resting_support(Scene(**scene_points(scene_spec, np.random.default_rng(0), 96)), scene_spec, item)


def target_of(record: dict, k: int) -> int:
    """Where source object ``k`` of the pair is in the result: its identified or inserted index."""
    e = next(e for e in record["objects"] if e["source_object"] == k)
    return e.get("identified_with", e.get("inserted_as"))


@dataclasses.dataclass
class Transfer:
    """One arrangement transfer: the scenes it joins and what it made."""
    source_name: str
    target_name: str
    source_spec: object  # make_sample SceneSpec
    target_spec: object
    pair: tuple[int, int]  # (support, item) in the source
    spec: object  # the composed result
    record: dict

    def summary(self) -> dict:
        """transfer.json's row: the record, and whether the item rests on the support's place in
        the result as it rested on the support in the source (null: the source pair only touches)."""
        item, support = target_of(self.record, self.pair[1]), target_of(self.record, self.pair[0])
        rests_on = support_in(self.spec, item)
        lifted = self.source_spec.objects[self.pair[1]].pose[2, 3] > LIFTED
        return {"source": self.source_name, "target": self.target_name, "pair": list(self.pair), **self.record,
                "item_rests_on": rests_on, "relation_kept": bool(rests_on == support) if lifted else None}


def transfer(field: ContextDescriptorField, cfg: MapConfig, source: tuple[str, Scene, object],
             target: tuple[str, Scene, object], pair: tuple[int, int] | None, seed: int, aspect: float) -> Transfer:
    """Carry ``pair`` (default: the source's `interacting_pair`) of ``source`` (name, points, spec)
    into ``target``."""
    pair = pair or interacting_pair(source[1], source[2])
    rng = np.random.default_rng(seed)
    spec, record = place_pair(field, cfg, source[1], source[2], target[1], target[2], pair, rng, aspect)
    return Transfer(source[0], target[0], source[2], target[2], pair, spec, record)


def write_samples(p, transfers: list[Transfer], out: Path, seed: int) -> tuple[Path, list]:
    """Render each result as image i of a make_sample-format folder ``out`` (images/, scenes/,
    annotations.json) plus transfer.json; one atomic rename. ``p``: make_sample's params (size,
    format, segmentation). Returns the folder and each sample's views."""
    from tasks.make_sample import dataset

    results, views = [], []
    with atomic.atomic_dir(out) as tmp:
        (tmp / dataset.IMAGES).mkdir()
        for i, t in enumerate(transfers):
            v = dataset.view_scene(p, t.spec, np.random.default_rng([seed, i]))
            results.append(dataset.write_sample(p, i, t.spec, v, tmp / dataset.IMAGES, {}))
            views.append(v)
        atomic.write_bytes(tmp / dataset.ANNOTATIONS, dataset.dumps(dataset.assemble(p, results)))
        rows = [{"file_name": r["image"]["file_name"], **t.summary()} for r, t in zip(results, transfers)]
        atomic.write_json(tmp / TRANSFER_JSON, {"samples": rows})
    return out, views


SUPPORT_COLOUR, ITEM_COLOUR = "#ff2d2d", "#2dd4ff"


def _outlined(ax, rgb: np.ndarray, labels: np.ndarray, colours: dict[int, str], title: str) -> None:
    """The image with the visible mask of each object ``k`` in ``colours`` outlined in its colour."""
    ax.imshow(rgb)
    for k, colour in colours.items():
        if k is not None and (labels == k + 1).any():
            ax.contour(labels == k + 1, levels=[0.5], colors=colour, linewidths=1.5)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def draw(p, transfers: list[Transfer], results: list, seed: int) -> bytes:
    """PNG, a row per transfer: the source (support outlined red, item blue), the target as it was
    (the object identified with the support, red), the result (support red, carried item blue)."""
    plt = pyplot()

    from tasks.make_sample import dataset

    fig, axes = plt.subplots(len(transfers), 3, figsize=(9, 2.4 * len(transfers)), dpi=100, squeeze=False)
    for row, t, res in zip(axes, transfers, results):
        src = dataset.view_scene(p, dataclasses.replace(t.source_spec, info=dict(t.source_spec.info)),
                                 np.random.default_rng([seed, 1]))
        tgt = dataset.view_scene(p, dataclasses.replace(t.target_spec, info=dict(t.target_spec.info)),
                                 np.random.default_rng([seed, 2]))
        support, item = target_of(t.record, t.pair[0]), target_of(t.record, t.pair[1])
        identified = support if support < len(t.target_spec.objects) else None
        names = [t.source_spec.objects[k].category.name for k in t.pair]
        _outlined(row[0], src.rgb, src.labels, {t.pair[0]: SUPPORT_COLOUR, t.pair[1]: ITEM_COLOUR},
                  f"source {t.source_name}: {names[1]} on {names[0]}")
        _outlined(row[1], tgt.rgb, tgt.labels, {identified: SUPPORT_COLOUR},
                  f"target {t.target_name}" + ("" if identified is None else f": its {names[0]}"))
        _outlined(row[2], res.rgb, res.labels, {support: SUPPORT_COLOUR, item: ITEM_COLOUR},
                  f"result: {names[1]} carried over" + ("" if identified is not None else f" with the {names[0]}"))
    return figure_png(fig)


def transfer_files(source_path: str | Path, target_path: str | Path, checkpoint: str | Path, out: str | Path,
                   pair: tuple[int, int] | None, cfg: MapConfig, sample_params, seed: int = 0) -> tuple[Path, Path]:
    """``pics analogy --render OUT``: checks every input first, then writes ``out`` (a make_sample
    folder of one sample, plus transfer.json) and ``out``.png (source | target | result)."""
    source, target = load_scene(source_path), load_scene(target_path)
    if pair is not None:
        check_pair(source_path, source, pair)
    source_spec, target_spec = load_spec(source_path, source), load_spec(target_path, target)
    field = ContextDescriptorField.load(checkpoint)
    aspect = sample_params.width / sample_params.height
    t = transfer(field, cfg, (Path(source_path).name, source, source_spec),
                 (Path(target_path).name, target, target_spec), pair, seed, aspect)
    folder, views = write_samples(sample_params, [t], Path(out), seed)
    png = atomic.write_bytes(Path(out).with_suffix(".png"), draw(sample_params, [t], views, seed))
    return folder, png
