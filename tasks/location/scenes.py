"""Location data from the embedded generator's 3D scenes: removal images with proven boxes.

For a composed scene (``tasks.make_sample.layout``) one object is taken out and the scene rendered
again without it: the background never shows where the object was (no erased-box give-away). The
removed object's own box is a positive for its class; the same object dropped elsewhere on the
ground is another positive when the scene's height field proves it rests there without touching
anything. Negatives are that object (or its box) where the geometry proves it implausible:

  floating      lifted above its support (nothing under it at that height)
  intersecting  at another object's place, overlapping its volume (``HeightField.collides``)
  scale         resting on the ground but scaled far from its real size (x < 0.5 or x > 2)
  off_ground    a box whose bottom edge sees the wall or the sky, not the ground (a camera ray)

Boxes are xyxy pixels of the rendered image, the amodal projection of the object's mesh.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import trimesh

from tasks.decompose.pairing import box_iou
from tasks.make_sample.layout import (CONTACT_GAP, LOCAL_CELLS, PITCH, WORLD_CELLS, HeightField, SceneSpec,
                                      build_scene, compose_scene)
from tasks.make_sample.renderer import Renderer

REASONS = ("floating", "intersecting", "scale", "off_ground")
GROUND_HALF = 4.0  # build_scene's ground square: +-4 units around the scene centre
SCALE_RANGE = (0.5, 2.0)  # a scale outside this is "far from the real size"
MIN_SIDE_PX = 3.0  # a box thinner than this is not an insertion target
MIN_IN_FRAME = 0.6  # at least this fraction of a box's area inside the image
DISTINCT_IOU = 0.5  # positives differ from each other, negatives from every positive, by this IoU


@dataclass
class Camera:
    """Pinhole camera of a scene spec (OpenGL convention, as pyrender renders it)."""

    pose: np.ndarray  # (4, 4) camera -> world
    yfov: float
    width: int
    height: int

    @property
    def focal(self) -> float:
        return 1.0 / np.tan(self.yfov / 2)

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points [N, 3] -> (pixels [N, 2] as (u, v), distance in front of the camera [N])."""
        cam = trimesh.transform_points(points, np.linalg.inv(self.pose))
        depth = -cam[:, 2]
        aspect = self.width / self.height
        safe = np.where(depth > 1e-6, depth, 1e-6)
        x_ndc = self.focal / aspect * cam[:, 0] / safe
        y_ndc = self.focal * cam[:, 1] / safe
        return np.stack([(x_ndc + 1) / 2 * self.width, (1 - y_ndc) / 2 * self.height], 1), depth

    def ray(self, u: float, v: float) -> tuple[np.ndarray, np.ndarray]:
        """(origin, unit direction) in the world of the ray through pixel (u, v)."""
        aspect = self.width / self.height
        d_cam = np.array([(2 * u / self.width - 1) * aspect / self.focal, (1 - 2 * v / self.height) / self.focal, -1.0])
        d = self.pose[:3, :3] @ d_cam
        return self.pose[:3, 3].copy(), d / np.linalg.norm(d)


@dataclass
class Query:
    """One (removal image, class) with its labelled boxes (xyxy pixels)."""

    scene: int
    removed: int  # index of the removed object in the scene spec
    category: str
    image: np.ndarray  # uint8 [H, W, 3], the scene without the object
    positives: list[list[float]] = field(default_factory=list)  # first: the removed object's own box
    negatives: list[list[float]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # one of REASONS per negative
    details: list[str] = field(default_factory=list)  # the measured proof, per negative


def mesh_box(camera: Camera, vertices: np.ndarray) -> list[float] | None:
    """Projected xyxy box of world vertices, clipped to the image; None when a vertex is behind the
    camera, the box is mostly outside the frame, or thinner than MIN_SIDE_PX."""
    uv, depth = camera.project(vertices)
    if (depth <= 0.05).any():
        return None
    x0, y0 = uv.min(0)
    x1, y1 = uv.max(0)
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, camera.width), min(y1, camera.height)
    if cx1 - cx0 < MIN_SIDE_PX or cy1 - cy0 < MIN_SIDE_PX:
        return None
    if (cx1 - cx0) * (cy1 - cy0) < MIN_IN_FRAME * (x1 - x0) * (y1 - y0):
        return None
    return [float(cx0), float(cy0), float(cx1), float(cy1)]


def cell_to_world(c: np.ndarray) -> np.ndarray:
    """World xy of height-map cell ``c`` (row = y, col = x), as ``layout._translation``."""
    return (np.asarray(c, float)[::-1] - WORLD_CELLS / 2) * PITCH


def world_to_cell(xy: np.ndarray) -> np.ndarray:
    return (np.asarray(xy, float) / PITCH + WORLD_CELLS / 2)[::-1]


class SceneGeometry:
    """A composed scene's objects as height maps, to test placements of one object against the rest."""

    def __init__(self, spec: SceneSpec, renderer: Renderer):
        self.spec = spec
        # each placed mesh is already oriented and centred at its local origin (layout._orient)
        self.maps = [renderer.heightmaps(o.shape.mesh, LOCAL_CELLS, PITCH) for o in spec.objects]

    def field(self, skip: set[int]) -> HeightField:
        """Height field of every object except those in ``skip``."""
        f = HeightField()
        for k, o in enumerate(self.spec.objects):
            if k not in skip:
                top, bottom = self.maps[k]
                f.add(f.clamp(o.center), top, bottom, float(o.pose[2, 3]))
        return f

    def removable(self, j: int) -> bool:
        """No other object rests on object ``j`` (taking it out would leave one floating)."""
        for i, o in enumerate(self.spec.objects):
            z = float(o.pose[2, 3])
            if i == j or z < 2 * CONTACT_GAP:
                continue
            support = self.field({i, j}).rest(self.spec.objects[i].center.astype(int), self.maps[i][1])
            if support + CONTACT_GAP < z - 1e-3:
                return False
        return True

    def on_ground(self, ground: HeightField, j: int, c: np.ndarray) -> bool:
        """Object ``j`` dropped at cell ``c`` lands on the ground, touches nothing, and stands in front
        of the wall on the ground square."""
        top, bottom = self.maps[j]
        # a flat base's height map sits a rounding error (~1e-8) off z = 0: compare with the contact gap
        if ground.rest(c, bottom) > CONTACT_GAP or ground.collides(c, top, bottom, CONTACT_GAP):
            return False
        margin = self.spec.objects[j].radius * PITCH
        return self.ground_point_ok(cell_to_world(c), margin)

    def ground_point_ok(self, xy: np.ndarray, margin: float = 0.0) -> bool:
        s = self.spec
        if np.any(np.abs(xy - s.center[:2]) > GROUND_HALF - margin):
            return False
        if s.wall is None:
            return True
        v = s.info["view_dir"]
        back = s.center[:2] - v * s.wall_distance
        return float(np.dot(xy - back, v)) > margin


def vertices_at(mesh: trimesh.Trimesh, c: np.ndarray, z: float, scale: float = 1.0) -> np.ndarray:
    """World vertices of a local mesh (centred, base on z = 0) scaled about its base and put at cell ``c``."""
    return mesh.vertices * scale + np.array([*cell_to_world(c), z])


def _distinct(box: list[float], others: list[list[float]]) -> bool:
    if not others:
        return True
    return float(box_iou(np.asarray([box]), np.asarray(others)).max()) < DISTINCT_IOU


def ground_positives(geo: SceneGeometry, ground: HeightField, cam: Camera, j: int, rng: np.random.Generator,
                     boxes: list[list[float]], want: int, attempts: int = 60) -> list[np.ndarray]:
    """Add up to ``want`` boxes of object ``j`` resting elsewhere on the ground to ``boxes``; returns
    the cells used (the places the negatives start from)."""
    mesh = geo.spec.objects[j].shape.mesh
    cells = []
    for _ in range(attempts):
        if len(cells) >= want:
            break
        # a ground point seen at a random pixel: candidates land in the frame, not off it
        o, d = cam.ray(rng.uniform(0, cam.width), rng.uniform(0, cam.height))
        if d[2] >= -1e-9:
            continue
        c = ground.clamp(world_to_cell((o + d * (-o[2] / d[2]))[:2]))
        if not geo.on_ground(ground, j, c):
            continue
        box = mesh_box(cam, vertices_at(mesh, c, CONTACT_GAP))
        if box is not None and _distinct(box, boxes):
            boxes.append(box)
            cells.append(c)
    return cells


def off_ground_box(geo: SceneGeometry, cam: Camera, box: list[float]) -> tuple[list[float], str] | None:
    """``box`` moved up until its bottom-centre pixel's ray misses the ground in front of the wall."""
    x0, y0, x1, y1 = box
    h = y1 - y0
    for dy in np.arange(h * 0.5, cam.height, max(1.0, h * 0.25)):
        if y0 - dy < 0:
            return None
        bottom_v = y1 - dy
        o, d = cam.ray((x0 + x1) / 2, bottom_v)
        if d[2] >= -1e-9:
            return [x0, y0 - dy, x1, y1 - dy], f"bottom edge at v={bottom_v:.1f} looks above the horizon"
        hit = o + d * (-o[2] / d[2])
        if not geo.ground_point_ok(hit[:2]):
            return [x0, y0 - dy, x1, y1 - dy], (f"bottom edge at v={bottom_v:.1f} meets the ground plane at "
                                                f"({hit[0]:.2f}, {hit[1]:.2f}), behind the wall or off the ground")
    return None


def negatives(geo: SceneGeometry, ground: HeightField, cam: Camera, j: int, cells: list[np.ndarray],
              rng: np.random.Generator, q: Query, per_reason: int) -> None:
    """Append proven negatives of object ``j`` to ``q`` (at most ``per_reason`` of each reason)."""
    obj = geo.spec.objects[j]
    mesh, (top, bottom) = obj.shape.mesh, geo.maps[j]
    h = float(mesh.bounds[1, 2] - mesh.bounds[0, 2])

    def add(box, reason, detail):
        if box is not None and _distinct(box, q.positives) and _distinct(box, q.negatives):
            q.negatives.append(box)
            q.reasons.append(reason)
            q.details.append(detail)
            return True
        return False

    starts = list(cells)
    rng.shuffle(starts)
    n = 0
    for c in starts:  # floating: lifted above the ground where it rests, nothing beneath
        z = CONTACT_GAP + h * rng.uniform(0.6, 1.5)
        support = ground.rest(c, bottom)
        if support < z - 0.1 * h and n < per_reason:
            n += add(mesh_box(cam, vertices_at(mesh, c, z)), "floating",
                     f"base {z - support:.3f} units above its support")
    n = 0
    others = [k for k in range(len(geo.spec.objects)) if k != j]
    rng.shuffle(others)
    for k in others:  # intersecting: standing where another object stands
        c = ground.clamp(geo.spec.objects[k].center + rng.normal(0, 0.2 * obj.radius, 2))
        if n < per_reason and ground.collides(c, top, bottom, CONTACT_GAP):
            n += add(mesh_box(cam, vertices_at(mesh, c, CONTACT_GAP)), "intersecting",
                     f"overlaps the volume of object {k} ({geo.spec.objects[k].category.name})")
    n = 0
    for c in starts:  # scale: on the ground, far too small or too large for its class at that depth
        s = rng.uniform(0.25, 0.45) if rng.uniform() < 0.5 else rng.uniform(2.2, 3.5)
        if n < per_reason and not (SCALE_RANGE[0] <= s <= SCALE_RANGE[1]):
            n += add(mesh_box(cam, vertices_at(mesh, c, CONTACT_GAP, s)), "scale",
                     f"x{s:.2f} the size of a real {obj.category.name} at that depth")
    n = 0
    for box in list(q.positives):  # off_ground: the bottom edge sees the wall or the sky
        moved = off_ground_box(geo, cam, box) if n < per_reason else None
        if moved is not None:
            n += add(moved[0], "off_ground", moved[1])


def render_color(renderer: Renderer, spec: SceneSpec, width: int, height: int, shadows: bool) -> np.ndarray:
    """RGB [H, W, 3] uint8 of a scene spec."""
    scene, nodes = build_scene(renderer.pyrender, spec, width, height)
    return renderer.render(scene, [], width, height, shadows=shadows, labels=np.zeros((height, width), np.int32)).rgb


def scene_queries(renderer: Renderer, seed: int, index: int, width: int, height: int, n_objects: tuple[int, int],
                  removals: int, positives: int, negatives_per_reason: int, shadows: bool) -> list[Query]:
    """Compose scene ``index`` (seeded by (seed, index)), remove up to ``removals`` of its objects one
    at a time and return one query per removal: its image and labelled boxes."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    n = int(rng.integers(n_objects[0], n_objects[1] + 1))
    spec = compose_scene(rng, renderer, n, width / height)
    geo = SceneGeometry(spec, renderer)
    cam = Camera(spec.camera_pose, spec.yfov, width, height)
    candidates = [j for j in rng.permutation(n) if geo.removable(int(j))]
    queries = []
    for j in (int(j) for j in candidates):
        if len(queries) >= removals:
            break
        obj = spec.objects[j]
        own = mesh_box(cam, trimesh.transform_points(obj.shape.mesh.vertices, obj.pose))
        if own is None:
            continue  # out of frame in this view: no positive to learn from
        ground = geo.field({j})
        without = dataclasses.replace(spec, objects=[o for k, o in enumerate(spec.objects) if k != j])
        q = Query(scene=index, removed=j, category=obj.category.name,
                  image=render_color(renderer, without, width, height, shadows), positives=[own])
        cells = ground_positives(geo, ground, cam, j, rng, q.positives, positives - 1)
        negatives(geo, ground, cam, j, cells or [obj.center.astype(int)], rng, q, negatives_per_reason)
        queries.append(q)
    return queries
