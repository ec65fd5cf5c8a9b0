"""Scene composition: objects that rest on the ground or on each other, touching, seen by a camera.

Placement works on height maps (the z-buffer of an orthographic view from above and from below,
rendered once per object): dropping an object at a grid position lands it on the highest surface
under its footprint, so it rests on the ground or on another object without interpenetrating.
Sliding an object towards an anchor until it would have to climb gives lateral contact. The
camera direction is drawn first so that "in front of" and "behind" mean something.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import trimesh

from tasks.make_sample.renderer import Renderer
from tasks.make_sample.shapes import CATEGORIES, Category, Shape, random_color
from tasks.make_sample.textures import texture

PITCH = 0.005  # height-map cell, scene units (under 1 px at the default camera distance)
WORLD_CELLS = 800  # the world height map covers 4 x 4 units around the origin
CONTACT_GAP = 1e-4  # scene units between resting surfaces (far below a pixel)
LOCAL_CELLS = 192  # one object's height maps: 0.96 x 0.96 units, larger than any footprint


@dataclass
class Placed:
    category: Category
    shape: Shape
    pose: np.ndarray  # (4, 4) local -> world
    center: np.ndarray  # (2,) world height-map cell of the footprint centre
    radius: float  # footprint radius, cells
    flat_top: bool
    mode: str  # how it was placed: first, stack, front, behind, side


@dataclass
class SceneSpec:
    objects: list[Placed]
    camera_pose: np.ndarray
    yfov: float
    ground: np.ndarray  # texture (S, S, 3) uint8
    ground_tile: float  # scene units per texture repeat
    wall: np.ndarray | None  # texture, or None for an open horizon
    wall_tile: float
    wall_distance: float
    center: np.ndarray  # (3,) the cluster centre the camera looks at
    bg_color: np.ndarray
    ambient: np.ndarray
    sun_pose: np.ndarray
    sun_color: np.ndarray
    sun_intensity: float
    info: dict = field(default_factory=dict)


def _rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])


def _look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera pose (OpenGL convention: looks along -z, y up) with world z up."""
    f = target - eye
    f /= np.linalg.norm(f)
    right = np.cross(f, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, f)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, up, -f, eye
    return pose


def _orient(shape: Shape, rng: np.random.Generator, lying: bool) -> trimesh.Trimesh:
    """Copy of the mesh: optionally on its side, spun about z, centred on the z axis, on z = 0."""
    m = shape.mesh.copy()
    if lying:
        m.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [1, 0, 0]))
    m.apply_transform(_rot_z(rng.uniform(0, 2 * np.pi)))
    lo, hi = m.bounds
    m.apply_translation([-(lo[0] + hi[0]) / 2, -(lo[1] + hi[1]) / 2, -lo[2]])
    return m


class HeightField:
    """What is placed so far on the world grid: the top surface of everything (ground = 0), for
    dropping objects onto, and each object's [bottom, top] column per cell, for sliding objects
    along the ground until they meet something in 3D (under a ball's bulge, not at its shadow)."""

    def __init__(self):
        self.top = np.zeros((WORLD_CELLS, WORLD_CELLS))
        self.half = LOCAL_CELLS // 2
        self.placed: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]] = []  # (cell, top, bottom, z)

    def clamp(self, c: np.ndarray) -> np.ndarray:
        return np.clip(np.round(c).astype(int), self.half, WORLD_CELLS - self.half)

    def window(self, c: np.ndarray) -> np.ndarray:
        i, j = c
        return self.top[i - self.half:i + self.half, j - self.half:j + self.half]

    def rest(self, c: np.ndarray, bottom: np.ndarray) -> float:
        """Height at which an object with this bottom map comes to rest at cell ``c``."""
        gap = self.window(c) - bottom
        return max(0.0, float(np.nanmax(gap)))

    def add(self, c: np.ndarray, top: np.ndarray, bottom: np.ndarray, z: float) -> None:
        w = self.window(c)
        w[...] = np.fmax(w, top + z)
        self.placed.append((np.asarray(c), top, bottom, z))

    def collides(self, c: np.ndarray, top: np.ndarray, bottom: np.ndarray, z: float) -> bool:
        """Would an object with these maps at cell ``c``, height ``z``, overlap a placed one?"""
        n = LOCAL_CELLS
        for cj, tj, bj, zj in self.placed:
            di, dj = (np.asarray(cj) - c).astype(int)
            if abs(di) >= n or abs(dj) >= n:
                continue
            r0, r1, c0, c1 = max(0, di), min(n, n + di), max(0, dj), min(n, n + dj)
            a_top, a_bot = top[r0:r1, c0:c1] + z, bottom[r0:r1, c0:c1] + z
            b_top = tj[r0 - di:r1 - di, c0 - dj:c1 - dj] + zj
            b_bot = bj[r0 - di:r1 - di, c0 - dj:c1 - dj] + zj
            if np.any((a_bot < b_top - 1e-6) & (b_bot < a_top - 1e-6)):  # NaN (no surface) compares False
                return True
        return False


def _translation(c: np.ndarray) -> np.ndarray:
    """World xy of an object whose local map is centred on world cell ``c`` (row = y, col = x)."""
    return (c[::-1] - WORLD_CELLS / 2) * PITCH


def place_objects(rng: np.random.Generator, renderer: Renderer, n: int, view_dir: np.ndarray) -> list[Placed]:
    """``view_dir``: horizontal unit vector from the scene towards the camera."""
    field_ = HeightField()
    placed: list[Placed] = []
    origin = np.array([WORLD_CELLS / 2, WORLD_CELLS / 2])
    for k in range(n):
        cat = CATEGORIES[rng.integers(len(CATEGORIES))]
        shape = cat.build(rng)
        mesh = _orient(shape, rng, lying=rng.uniform() < cat.p_lying)
        top, bottom = renderer.heightmaps(mesh, LOCAL_CELLS, PITCH)
        foot = ~np.isnan(bottom)
        ii, jj = np.nonzero(foot)
        radius = float(np.hypot(ii - LOCAL_CELLS / 2, jj - LOCAL_CELLS / 2).max()) if len(ii) else 1.0
        hmax = np.nanmax(top)
        flat_top = bool(np.mean(top[foot] > hmax - 0.01) > 0.3)
        mode = "first"
        if k == 0:
            c = field_.clamp(origin + rng.normal(0, 0.05 / PITCH, 2))
        else:
            anchor = placed[rng.integers(len(placed))]
            can_stack = (anchor.flat_top and radius < anchor.radius * 1.3) or (
                anchor.category.name == "bowl" and radius < anchor.radius * 0.75)
            mode = rng.choice(["stack", "front", "behind", "side"], p=[0.3, 0.3, 0.2, 0.2])
            if mode == "stack" and not can_stack:
                mode = "front" if rng.uniform() < 0.5 else "side"
            if mode == "stack":
                c = field_.clamp(anchor.center + rng.normal(0, 0.25 * anchor.radius, 2))
            else:
                base = {"front": 0.0, "behind": np.pi, "side": np.pi / 2 * rng.choice([-1, 1])}[mode]
                ang = base + rng.uniform(-0.6, 0.6)
                cs, sn = np.cos(ang), np.sin(ang)
                d = np.array([cs * view_dir[0] - sn * view_dir[1], sn * view_dir[0] + cs * view_dir[1]])
                d_cells = d[::-1]  # (x, y) -> (row = y, col = x)
                t_far = int(anchor.radius + radius + 0.03 / PITCH)
                on_ground = CONTACT_GAP

                def blocked(t):
                    return field_.collides(field_.clamp(anchor.center + t * d_cells), top, bottom, on_ground)

                while t_far < WORLD_CELLS // 2 and blocked(t_far):
                    t_far += int(0.04 / PITCH)  # the start is blocked by a third object: start further out
                # slide in along the ground until it meets something: coarse steps, then cell by cell
                t = t_far
                while t > 0 and not blocked(max(t - 6, 0)):  # 6 cells: less than any footprint
                    t = max(t - 6, 0)
                while t > 0 and not blocked(t - 1):
                    t -= 1
                c = field_.clamp(anchor.center + t * d_cells)
                if k > 1 and rng.uniform() < 0.1:  # sometimes near but not touching (never the first pair)
                    c = field_.clamp(c + rng.uniform(0.01, 0.05) / PITCH * d_cells)
        # 0.1 mm above its support: coplanar faces would z-fight. A slid object stays on the ground
        # (it may reach under an overhang); a dropped one lands on the highest surface below it.
        if mode in ("front", "behind", "side") and not field_.collides(c, top, bottom, CONTACT_GAP):
            z = CONTACT_GAP
        else:
            z = field_.rest(c, bottom) + CONTACT_GAP
        field_.add(c, top, bottom, z)
        pose = np.eye(4)
        pose[:2, 3] = _translation(c)
        pose[2, 3] = z
        placed.append(Placed(category=cat, shape=Shape(mesh, shape.colors, shape.metallic, shape.roughness,
                                                       shape.smooth),
                             pose=pose, center=c.astype(float), radius=radius, flat_top=flat_top, mode=str(mode)))
    return placed


def _frame(rng: np.random.Generator, objects: list[Placed], view_dir: np.ndarray, aspect: float,
           elevation_deg: tuple[float, float]) -> tuple[np.ndarray, float, np.ndarray, float]:
    """A camera on ``view_dir``'s side that sees the whole cluster: (pose, yfov, centre, radius)."""
    corners = np.concatenate([trimesh.transform_points(o.shape.mesh.bounding_box.vertices, o.pose)
                              for o in objects])
    center = (corners.min(0) + corners.max(0)) / 2
    center[2] *= rng.uniform(0.6, 1.0)
    radius = float(np.linalg.norm(corners - center, axis=1).max())
    yfov = np.deg2rad(rng.uniform(38, 58))
    hfov = 2 * np.arctan(np.tan(yfov / 2) * aspect)
    # the bounding sphere is loose: closer than it allows fills the frame (an edge may be cut)
    dist = radius / np.sin(min(yfov, hfov) / 2) * rng.uniform(0.72, 1.0)
    elev = np.deg2rad(rng.uniform(*elevation_deg))
    eye = center + dist * np.array([np.cos(elev) * view_dir[0], np.cos(elev) * view_dir[1], np.sin(elev)])
    target = center + rng.normal(0, 0.03 * radius, 3)
    return _look_at(eye, target), float(yfov), center, radius


def compose_scene(rng: np.random.Generator, renderer: Renderer, n_objects: int, aspect: float) -> SceneSpec:
    azimuth = rng.uniform(0, 2 * np.pi)
    view_dir = np.array([np.cos(azimuth), np.sin(azimuth)])
    objects = place_objects(rng, renderer, n_objects, view_dir)
    camera_pose, yfov, center, radius = _frame(rng, objects, view_dir, aspect, (8, 42))

    sun_az, sun_el = rng.uniform(0, 2 * np.pi), np.deg2rad(rng.uniform(30, 75))
    sun_dir = -np.array([np.cos(sun_el) * np.cos(sun_az), np.cos(sun_el) * np.sin(sun_az), np.sin(sun_el)])
    sun_pose = _look_at(np.zeros(3) - sun_dir, np.zeros(3))
    tint = np.array([1.0, 1.0, 1.0]) - rng.uniform(0, 0.25, 3)
    has_wall = rng.uniform() < 0.75
    return SceneSpec(
        objects=objects,
        camera_pose=camera_pose,
        yfov=yfov,
        ground=texture(rng),
        ground_tile=float(rng.uniform(0.4, 2.0)),
        wall=texture(rng) if has_wall else None,
        wall_tile=float(rng.uniform(0.5, 3.0)),
        wall_distance=float(radius + rng.uniform(0.2, 1.5)),
        center=center,
        bg_color=random_color(rng, sat=(0.1, 0.5), val=(0.6, 1.0)),
        ambient=np.full(3, rng.uniform(0.3, 0.6)) * tint,
        sun_pose=sun_pose,
        sun_color=tint,
        sun_intensity=float(rng.uniform(2.0, 4.5)),
        info={"view_dir": view_dir, "azimuth": azimuth, "reframed": 0},
    )


def reframe(rng: np.random.Generator, spec: SceneSpec, aspect: float) -> None:
    """Another, higher camera for a scene where an object is hidden: a look from above the
    occluder. The backdrop turns with the camera; objects, lights and textures stay."""
    k = spec.info["reframed"] = spec.info["reframed"] + 1
    az = spec.info["azimuth"] + rng.uniform(-0.5, 0.5)
    view_dir = np.array([np.cos(az), np.sin(az)])
    lo = min(20.0 + 12.0 * k, 60.0)
    spec.camera_pose, spec.yfov, _, _ = _frame(rng, spec.objects, view_dir, aspect, (lo, lo + 15.0))
    spec.info["view_dir"] = view_dir


def _grid(pyrender, origin: np.ndarray, du: np.ndarray, dv: np.ndarray, tex: np.ndarray, tile: float, n: int = 8):
    """A textured flat rectangle ``origin + s du + t dv`` as an n x n grid of quads."""
    s, t = np.meshgrid(np.linspace(0, 1, n + 1), np.linspace(0, 1, n + 1))
    s, t = s.ravel(), t.ravel()
    pos = origin + s[:, None] * du + t[:, None] * dv
    uv = np.stack([s * np.linalg.norm(du), t * np.linalg.norm(dv)], 1) / tile
    normal = np.cross(du, dv)
    normal /= np.linalg.norm(normal)
    k = np.arange(n * n) + np.repeat(np.arange(n), n)  # lower-left vertex of each cell
    faces = np.concatenate([np.stack([k, k + 1, k + n + 2], 1), np.stack([k, k + n + 2, k + n + 1], 1)])
    mat = pyrender.MetallicRoughnessMaterial(
        baseColorTexture=pyrender.Texture(source=tex, source_channels="RGB"),
        metallicFactor=0.0, roughnessFactor=0.9, alphaMode="OPAQUE", doubleSided=True)
    prim = pyrender.Primitive(positions=pos.astype(np.float32), normals=np.tile(normal, (len(pos), 1)).astype(np.float32),
                              texcoord_0=uv.astype(np.float32), indices=faces, material=mat)
    return pyrender.Mesh([prim])


def _adder(pyrender, scene):
    """``scene.add`` with nodes that hash by insertion order.

    pyrender keeps nodes in sets and draws opaque meshes in set order; with the default
    identity hash that order follows memory addresses, so wherever two surfaces tie in the depth
    buffer (the wall meeting the ground, a few MSAA samples) the pixel changes from run to run.
    """

    class OrderedNode(pyrender.Node):
        def __init__(self, seq: int, **kw):
            super().__init__(**kw)
            self._seq = seq

        def __hash__(self):
            return self._seq

    count = iter(range(1 << 30))

    def add(obj, pose=None):
        kind = {pyrender.Mesh: "mesh", pyrender.Camera: "camera", pyrender.Light: "light"}
        key = next(v for k, v in kind.items() if isinstance(obj, k))
        node = OrderedNode(next(count), matrix=pose, **{key: obj})
        scene.add_node(node)
        return node

    return add


def build_scene(pyrender, spec: SceneSpec, width: int, height: int):
    """The pyrender scene of a spec; returns (scene, object nodes in spec order)."""
    scene = pyrender.Scene(bg_color=np.append(spec.bg_color, 1.0), ambient_light=spec.ambient)
    add = _adder(pyrender, scene)
    nodes = []
    for o in spec.objects:
        m, s = o.shape.mesh, o.shape
        mat = pyrender.MetallicRoughnessMaterial(baseColorFactor=[1.0, 1.0, 1.0, 1.0], metallicFactor=s.metallic,
                                                 roughnessFactor=s.roughness, alphaMode="OPAQUE")
        prim = pyrender.Primitive(positions=m.vertices.astype(np.float32),
                                  normals=m.vertex_normals.astype(np.float32),
                                  color_0=s.colors, indices=m.faces, material=mat)
        nodes.append(add(pyrender.Mesh([prim]), o.pose))

    # ground: a textured square under the cluster, as a grid: big triangles shade unevenly in llvmpipe
    g = 4.0
    cx, cy = spec.center[:2]
    add(_grid(pyrender, np.array([cx - g, cy - g, 0.0]), np.array([2 * g, 0, 0]), np.array([0, 2 * g, 0]),
                    spec.ground, spec.ground_tile))
    if spec.wall is not None:
        v = spec.info["view_dir"]
        back = spec.center[:2] - v * spec.wall_distance
        side = np.array([-v[1], v[0]])
        w = 6.0
        # the wall starts below the ground so the ground hides its foot: no shared, z-fighting edge
        add(_grid(pyrender, np.array([*(back - w * side), -0.05]), np.array([*(2 * w * side), 0.0]),
                        np.array([0, 0, 4.0]), spec.wall, spec.wall_tile))

    cam = pyrender.PerspectiveCamera(yfov=spec.yfov, aspectRatio=width / height, znear=0.05, zfar=30.0)
    add(cam, spec.camera_pose)
    add(pyrender.DirectionalLight(color=spec.sun_color, intensity=spec.sun_intensity), spec.sun_pose)
    return scene, nodes


FLOOR_SPACING = 0.1  # scene units between floor points
FLOOR_MARGIN = 0.2  # the floor grid reaches this far beyond the objects' footprints


def floor_grid(object_points: np.ndarray) -> np.ndarray:
    """[F, 3] floor points (z = 0) on a grid under the objects' footprints, with a margin."""
    lo, hi = object_points[:, :2].min(0) - FLOOR_MARGIN, object_points[:, :2].max(0) + FLOOR_MARGIN
    gx, gy = np.meshgrid(np.arange(lo[0], hi[0], FLOOR_SPACING), np.arange(lo[1], hi[1], FLOOR_SPACING))
    return np.stack([gx.ravel(), gy.ravel(), np.zeros(gx.size)], 1)


def scene_points(spec: SceneSpec, rng: np.random.Generator, per_object: int = 64) -> dict[str, np.ndarray]:
    """The scene as a labelled point set (the 3D scene analogy stage's input, tasks/analogy):
    ``points`` [P, 3] float32 scene units (``per_object`` area-uniform surface samples of each
    object, then a floor grid under the objects at z = 0), ``instance`` [P] int32 (object index,
    -1 floor), ``label`` [P] int32 (LVIS category id, -1 floor)."""
    pts, inst, lab = [], [], []
    for k, o in enumerate(spec.objects):
        local, _ = trimesh.sample.sample_surface(o.shape.mesh, per_object, seed=rng)
        pts.append(trimesh.transform_points(local, o.pose))
        inst.append(np.full(per_object, k))
        lab.append(np.full(per_object, o.category.id))
    floor = floor_grid(np.concatenate(pts))
    pts.append(floor)
    inst.append(np.full(len(floor), -1))
    lab.append(np.full(len(floor), -1))
    return {"points": np.concatenate(pts).astype(np.float32), "instance": np.concatenate(inst).astype(np.int32),
            "label": np.concatenate(lab).astype(np.int32)}
