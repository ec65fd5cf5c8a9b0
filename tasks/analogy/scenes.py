"""3D scenes as labelled point sets, and the scene pairs the analogy stage learns and is scored on.

A scene is the ``.npz`` that the embedded generator exports (tasks/make_sample/layout.scene_points):
``points`` [P, 3] float32 scene units, ``instance`` [P] int (object index, -1 floor), ``label`` [P]
int (LVIS category id, -1 floor). Everything here works on those arrays with numpy:

- training triplets as in the paper: a positive (each object swapped for another instance of its
  class, rescaled to its size, same place) and a negative (per-object yaw and ground-plane
  translation noise), with the positions that correspond to the anchor's query points;
- evaluation pairs with known ground truth: keep a few neighbouring objects, turn the whole scene
  by a multiple of 90 degrees plus jitter, add distractor objects.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pics_model.context_field import median_spacing
from tasks import atomic
from tasks.make_sample.layout import floor_grid

FIELDS = {"points": (np.floating, 2), "instance": (np.integer, 1), "label": (np.integer, 1)}
GENERATOR = "generator"  # optional: (seed, index, min_objects, max_objects) the scene was generated from


class SceneError(ValueError):
    """A scene file that is missing, unreadable or does not follow the point-set schema."""


@dataclass
class Scene:
    points: np.ndarray  # [P, 3] float32
    instance: np.ndarray  # [P] int32, -1 floor
    label: np.ndarray  # [P] int32, -1 floor

    def object_ids(self) -> np.ndarray:
        return np.unique(self.instance[self.instance >= 0])

    def object_points(self, k: int) -> np.ndarray:
        return self.points[self.instance == k]

    def object_label(self, k: int) -> int:
        return int(self.label[self.instance == k][0])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"points": self.points, "instance": self.instance, "label": self.label}


def load_scene(path: str | Path) -> Scene:
    """Read and check a scene ``.npz`` (no pickle); a bad file raises SceneError naming it and the field."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise SceneError(f"{path}: no such scene file") from None
    except (OSError, ValueError) as e:
        raise SceneError(f"{path}: not a readable .npz scene ({e})") from None
    for name, (kind, ndim) in FIELDS.items():
        if name not in data:
            raise SceneError(f"{path}: field {name!r} missing (has {sorted(data)})")
        a = data[name]
        if a.ndim != ndim or not np.issubdtype(a.dtype, kind):
            raise SceneError(f"{path}: field {name!r} must be {ndim}-d {kind.__name__}, got {a.dtype} {a.shape}")
    p = len(data["points"])
    if data["points"].shape[1:] != (3,):
        raise SceneError(f"{path}: field 'points' must be [P, 3], got {data['points'].shape}")
    for name in ("instance", "label"):
        if len(data[name]) != p:
            raise SceneError(f"{path}: field {name!r} has {len(data[name])} entries, 'points' has {p}")
    if not np.isfinite(data["points"]).all():
        raise SceneError(f"{path}: field 'points' holds NaN or infinite values")
    return Scene(data["points"].astype(np.float32), data["instance"].astype(np.int32), data["label"].astype(np.int32))


def save_scene(path: str | Path, scene: Scene, generator: tuple[int, int, int, int] | None = None) -> Path:
    """``generator``: (seed, index, min_objects, max_objects) of `generate_spec`, stored so that the
    scene's meshes can be rebuilt (arrangement transfer renders them)."""
    buf = io.BytesIO()
    extra = {} if generator is None else {GENERATOR: np.asarray(generator, np.int64)}
    np.savez_compressed(buf, **scene.arrays(), **extra)
    return atomic.write_bytes(path, buf.getvalue())


def scene_name(index: int) -> str:
    return f"scene-{index:05d}.npz"


def generate_spec(index: int, seed: int, num_objects: tuple[int, int]):
    """The embedded generator's layout ``index`` (tasks/make_sample/layout.SceneSpec: meshes and
    poses) and the random stream it leaves, which `generate_scene` samples the points from."""
    from tasks.make_sample.layout import compose_scene
    from tasks.make_sample.renderer import get_renderer

    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    spec = compose_scene(rng, get_renderer(64, 64), int(rng.integers(num_objects[0], num_objects[1] + 1)), 4 / 3)
    return spec, rng


def generate_scene(index: int, seed: int, num_objects: tuple[int, int], per_object: int) -> Scene:
    """Scene ``index`` of the embedded generator's layouts (no images are rendered: the renderer
    only supplies the height maps that objects are dropped and slid on)."""
    from tasks.make_sample.layout import scene_points

    spec, rng = generate_spec(index, seed, num_objects)
    return Scene(**scene_points(spec, rng, per_object))


# ---------------------------------------------------------------------------------------------
# objects: what a scene is made of, and how scenes are put back together


@dataclass
class Obj:
    label: int
    local: np.ndarray  # [N, 3] points around its footprint centre, resting on z = 0
    position: np.ndarray  # (3,) footprint centre (x, y) and the height it rests at

    def world(self) -> np.ndarray:
        return self.local + self.position


def split_objects(scene: Scene) -> list[Obj]:
    out = []
    for k in scene.object_ids():
        pts = scene.object_points(k).astype(np.float64)
        lo, hi = pts.min(0), pts.max(0)
        position = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]])
        out.append(Obj(scene.object_label(k), pts - position, position))
    return out


def assemble(objects: list[Obj]) -> Scene:
    """Objects (in order: instance k is objects[k]) plus a fresh floor grid under them."""
    pts = [o.world() for o in objects]
    floor = floor_grid(np.concatenate(pts))
    n = [len(p) for p in pts]
    return Scene(np.concatenate(pts + [floor]).astype(np.float32),
                 np.concatenate([np.full(m, k) for k, m in enumerate(n)] + [np.full(len(floor), -1)]).astype(np.int32),
                 np.concatenate([np.full(m, o.label) for m, o in zip(n, objects)]
                                + [np.full(len(floor), -1)]).astype(np.int32))


def object_size(local: np.ndarray) -> float:
    """Diagonal of the object's bounding box."""
    return float(np.linalg.norm(local.max(0) - local.min(0)))


def typical_object_size(scenes: list[Scene]) -> float:
    """Median bounding-box diagonal over every object: the unit of the PCP thresholds."""
    return float(np.median([object_size(o.local) for s in scenes for o in split_objects(s)]))


def point_spacing(scenes: list[Scene]) -> tuple[float, float]:
    """(object, floor) `median_spacing`, the median over the scenes: how densely they are sampled."""
    objects = [median_spacing(s.points[s.instance >= 0].astype(np.float64)) for s in scenes]
    floors = [median_spacing(s.points[s.instance < 0].astype(np.float64)) for s in scenes]
    return float(np.median(objects)), float(np.median(floors))


def densified(scene: Scene, copies: int, rng: np.random.Generator, jitter: float = 0.006) -> Scene:
    """The scene as a denser scan would sample it: every point ``copies`` times, each copy moved by
    N(0, jitter) per axis (the tests' and benchmarks' stand-in for a user's dense scene)."""
    pts = np.concatenate([scene.points + rng.normal(0, jitter, scene.points.shape) for _ in range(copies)])
    return Scene(pts.astype(np.float32), np.tile(scene.instance, copies), np.tile(scene.label, copies))


def yaw_matrix(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def object_library(scenes: list[Scene]) -> dict[int, list[np.ndarray]]:
    """Every object's local points, by label: what swaps and distractors draw from."""
    lib: dict[int, list[np.ndarray]] = {}
    for s in scenes:
        for o in split_objects(s):
            lib.setdefault(o.label, []).append(o.local)
    return lib


def _footprint_clear(candidate: np.ndarray, placed: list[np.ndarray], gap: float) -> bool:
    others = np.concatenate(placed)[:, :2]
    d = np.linalg.norm(candidate[:, None, :2] - others[None], axis=-1)
    return bool(d.min() > gap)


def add_distractors(objects: list[Obj], library: dict[int, list[np.ndarray]], rng: np.random.Generator,
                    count: int, gap: float = 0.03, tries: int = 30) -> list[Obj]:
    """``count`` library objects at random yaw on the floor around the cluster, each clear of
    what is there (a try that overlaps is redrawn; one that never fits is left out)."""
    objects = list(objects)
    cloud = np.concatenate([o.world() for o in objects])
    centre, spread = cloud[:, :2].mean(0), float(np.linalg.norm(cloud[:, :2] - cloud[:, :2].mean(0), axis=1).max())
    labels = sorted(library)
    for _ in range(count):
        label = labels[rng.integers(len(labels))]
        local = library[label][rng.integers(len(library[label]))] @ yaw_matrix(rng.uniform(0, 2 * np.pi)).T
        for _ in range(tries):
            ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.0) * (spread + 0.3)
            pos = np.array([centre[0] + rad * np.cos(ang), centre[1] + rad * np.sin(ang), 0.0])
            if _footprint_clear(local + pos, [o.world() for o in objects], gap):
                objects.append(Obj(label, local, pos))
                break
    return objects


# ---------------------------------------------------------------------------------------------
# training triplets


@dataclass
class Triplet:
    anchor: Scene
    positive: Scene
    negative: Scene
    queries: np.ndarray  # [Q, 3] points of the anchor
    positive_at: np.ndarray  # [Q, 3] where each query's context is found in the positive
    negative_at: np.ndarray  # [Q, 3] the same object point in the negative (its context changed)
    centre: np.ndarray | None = None  # [Q, 3] the footprint centre (z = 0) of each query's object


def swap_instances(objects: list[Obj], library: dict[int, list[np.ndarray]], rng: np.random.Generator) -> list[Obj]:
    """Each object replaced by a random instance of its class, rescaled to its size, same place."""
    out = []
    for o in objects:
        pool = library.get(o.label) or [o.local]
        other = pool[rng.integers(len(pool))] @ yaw_matrix(rng.uniform(0, 2 * np.pi)).T
        scale = object_size(o.local) / max(object_size(other), 1e-6)
        out.append(Obj(o.label, other * scale, o.position.copy()))
    return out


def triplet(scene: Scene, library: dict[int, list[np.ndarray]], rng: np.random.Generator, num_queries: int,
            yaw_noise_deg: float = 90.0, shift_noise: float = 0.15, drop: float = 0.0,
            distractors: tuple[int, int] = (0, 0), jitter_shift: float = 0.0, jitter_yaw_deg: float = 0.0,
            negative_min_yaw_deg: float = 0.0, negative_pivot: bool = False) -> Triplet:
    """Anchor = ``scene``; positive = instances swapped (then, beyond the paper, each other object
    dropped with probability ``drop`` and a few distractors added, so the context learnt survives
    the evaluation pairs' edits); negative = per-object yaw ~ N(0, yaw_noise) and xy ~ N(0, shift_noise).
    Queries are anchor object points whose object stays in the positive.
    Beyond the paper: ``jitter_shift`` / ``jitter_yaw_deg``, each positive object is also moved on
    the floor by N(0, shift) and turned about its own axis by N(0, yaw) (the same context, laid out
    a little differently: ``positive_at`` follows each query's object); ``negative_min_yaw_deg``,
    each negative object turns by at least this much (a barely disturbed object is no negative);
    ``negative_pivot``, one kept object stays put in the negative, so that its queries' negatives
    differ from the anchor by their context only (hard negatives: not by their own object's turn)."""
    objects = split_objects(scene)
    swapped = swap_instances(objects, library, rng)
    jitter = [(yaw_matrix(np.deg2rad(rng.normal(0, jitter_yaw_deg))), np.array([*rng.normal(0, jitter_shift, 2), 0.0]))
              if jitter_shift or jitter_yaw_deg else (np.eye(3), np.zeros(3)) for _ in objects]
    swapped = [Obj(o.label, o.local @ r.T, o.position + t) for o, (r, t) in zip(swapped, jitter)]
    keep = [k for k in range(len(objects)) if rng.uniform() >= drop]
    if not keep:
        keep = [int(rng.integers(len(objects)))]
    extra = int(rng.integers(distractors[0], distractors[1] + 1))
    positive = assemble(add_distractors([swapped[k] for k in keep], library, rng, extra))
    moved = []
    for o in objects:
        angle = rng.normal(0, yaw_noise_deg)
        if negative_min_yaw_deg:
            angle = np.sign(angle or 1.0) * max(abs(angle), negative_min_yaw_deg)
        turn = yaw_matrix(np.deg2rad(angle))
        moved.append((turn, np.array([*rng.normal(0, shift_noise, 2), 0.0])))
    if negative_pivot:
        moved[keep[int(rng.integers(len(keep)))]] = (np.eye(3), np.zeros(3))
    negative = assemble([Obj(o.label, o.local @ r.T, o.position + t) for o, (r, t) in zip(objects, moved)])

    which = np.concatenate([np.full(len(o.local), k) for k, o in enumerate(objects)])
    local = np.concatenate([o.local for o in objects])
    pick = rng.choice(np.flatnonzero(np.isin(which, keep)), size=num_queries)
    queries = np.stack([local[i] + objects[which[i]].position for i in pick])
    positive_at = np.stack([local[i] @ jitter[which[i]][0].T + objects[which[i]].position + jitter[which[i]][1]
                            for i in pick])
    negative_at = np.stack([local[i] @ moved[which[i]][0].T + objects[which[i]].position + moved[which[i]][1]
                            for i in pick])
    centre = np.stack([objects[which[i]].position * [1, 1, 0] for i in pick])
    return Triplet(assemble(objects), positive, negative, queries.astype(np.float32), positive_at.astype(np.float32),
                   negative_at.astype(np.float32), centre.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# evaluation pairs


@dataclass
class EvalPair:
    source: Scene
    target: Scene
    query: np.ndarray  # [Q] indices of source points to map (the kept objects' points)
    truth: np.ndarray  # [Q, 3] where each query point is in the target
    truth_instance: np.ndarray  # [Q] the target object each query point belongs to
    yaw: float  # the whole-scene turn, radians


def eval_pair(scene: Scene, library: dict[int, list[np.ndarray]], rng: np.random.Generator,
              keep: tuple[int, int] = (2, 4), distractors: tuple[int, int] = (2, 5),
              yaw_jitter_deg: float = 10.0, keep_fraction: float = 0.8, noise: float = 0.003,
              swap: bool = False, perturb_shift: float = 0.0, perturb_yaw_deg: float = 0.0) -> EvalPair:
    """Target = an anchor object and its nearest neighbours (2-4 objects), turned about their
    centre by k * 90 deg + U(-jitter, jitter), moved, resampled (a random ``keep_fraction`` of each
    object's points, plus noise), with distractor objects around them. Source = ``scene``.
    Beyond the paper's pairs, so that the target is another scene with the same arrangement rather
    than the same geometry: ``swap``, the kept objects become other instances of their class,
    rescaled, same place; ``perturb_shift`` / ``perturb_yaw_deg``, each kept object is moved on the
    floor by N(0, shift) and turned about its own axis by N(0, yaw) (a non-rigid change of layout).
    The truth is where each point's place went."""
    objects = split_objects(scene)
    shapes = swap_instances(objects, library, rng) if swap else objects
    still = (np.eye(3), np.zeros(3))  # no draws when unperturbed: the rigid pairs stay as they were
    wobble = [(yaw_matrix(np.deg2rad(rng.normal(0, perturb_yaw_deg))), np.array([*rng.normal(0, perturb_shift, 2), 0.0]))
              if perturb_shift or perturb_yaw_deg else still for _ in objects]
    anchor = objects[rng.integers(len(objects))].position
    order = np.argsort([np.linalg.norm(o.position[:2] - anchor[:2]) for o in objects])
    kept = order[:min(int(rng.integers(keep[0], keep[1] + 1)), len(objects))]
    yaw = rng.integers(4) * np.pi / 2 + np.deg2rad(rng.uniform(-yaw_jitter_deg, yaw_jitter_deg))
    turn = yaw_matrix(yaw)
    centre = np.mean([objects[k].position for k in kept], axis=0) * [1, 1, 0]
    shift = np.array([*rng.normal(0, 0.3, 2), 0.0])

    def move(x: np.ndarray) -> np.ndarray:
        return (x - centre) @ turn.T + centre + shift

    target_objects, truth, truth_instance, query = [], [], [], []
    for j, k in enumerate(kept):
        idx = np.flatnonzero(scene.instance == scene.object_ids()[k])
        turn_k, shift_k = wobble[k]
        home = objects[k].position

        def place(x: np.ndarray) -> np.ndarray:  # the object's own perturbation, then the whole scene's
            return move((x - home) @ turn_k.T + home + shift_k)

        world = place(scene.points[idx].astype(np.float64))
        shape = place(shapes[k].world())
        sub = rng.random(len(shape)) < keep_fraction
        sampled = shape[sub] + rng.normal(0, noise, (int(sub.sum()), 3))
        pos = place(home)
        target_objects.append(Obj(objects[k].label, sampled - pos, pos))
        query.append(idx)
        truth.append(world)
        truth_instance.append(np.full(len(idx), j))
    target_objects = add_distractors(target_objects, library, rng,
                                     int(rng.integers(distractors[0], distractors[1] + 1)))
    return EvalPair(scene, assemble(target_objects), np.concatenate(query), np.concatenate(truth).astype(np.float32),
                    np.concatenate(truth_instance).astype(np.int32), float(yaw))
