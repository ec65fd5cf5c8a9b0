"""Object categories of the embedded dataset, built from trimesh primitives.

Each category names a real LVIS class (name, WordNet synset, synonyms) so that the generated
file reads like LVIS, and builds a randomly sized, randomly coloured mesh in a local frame:
upright, centred on the z axis, resting on z = 0. Colours are per-vertex (smooth shapes) or
per-face (boxes, for crisp patterns); a pattern is a function of the local position.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import trimesh
from trimesh import creation, remesh

Rgb = np.ndarray  # (3,) float in [0, 1]


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    synset: str
    synonyms: tuple[str, ...]
    definition: str
    build: Callable[[np.random.Generator], "Shape"]
    # probability of lying on its side rather than standing upright
    p_lying: float = 0.0


@dataclass
class Shape:
    mesh: trimesh.Trimesh  # local frame, z up
    colors: np.ndarray  # (V, 3) uint8 per vertex of ``mesh`` (faces unmerged when per-face)
    metallic: float
    roughness: float
    smooth: bool  # smooth shading (merged vertices) or flat per face


# ---------------------------------------------------------------------------------------------
# colours and patterns


def random_color(rng: np.random.Generator, sat=(0.35, 0.95), val=(0.35, 0.95)) -> Rgb:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*sat), rng.uniform(*val)))


def _contrast(rng: np.random.Generator, c: Rgb) -> Rgb:
    h, s, v = colorsys.rgb_to_hsv(*c)
    h = (h + rng.uniform(0.25, 0.75)) % 1.0
    v = 1.0 - v if abs(v - 0.5) > 0.2 else rng.uniform(0.85, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, min(1.0, s + 0.1), max(0.25, v)))


def pattern(rng: np.random.Generator, size: float) -> Callable[[np.ndarray], np.ndarray]:
    """A random surface pattern: points (N, 3) in the local frame -> colours (N, 3) in [0, 1]."""
    a = random_color(rng)
    b = _contrast(rng, a)
    kind = rng.choice(["solid", "stripes", "checker", "bands", "gradient"], p=[0.3, 0.2, 0.2, 0.15, 0.15])
    period = size * rng.uniform(0.18, 0.4)
    axis = np.eye(3)[rng.integers(0, 3)]

    def solid(p):
        return np.broadcast_to(a, p.shape).copy()

    def stripes(p):
        return np.where((np.floor(p @ axis / period) % 2 == 0)[:, None], a, b)

    def checker(p):
        return np.where((np.floor(p / period).sum(1) % 2 == 0)[:, None], a, b)

    def bands(p):  # horizontal bands, one contrasting band in the middle: a label
        z = p[:, 2]
        lo, hi = np.quantile(z, [0.35, 0.65]) if len(z) else (0, 0)
        return np.where(((z > lo) & (z < hi))[:, None], b, a)

    def gradient(p):
        z = p[:, 2]
        t = ((z - z.min()) / max(np.ptp(z), 1e-9))[:, None] if len(z) else z[:, None]
        return (1 - t) * a + t * b

    return {"solid": solid, "stripes": stripes, "checker": checker, "bands": bands, "gradient": gradient}[kind]


def _finish(mesh: trimesh.Trimesh, paint, max_edge: float | None, smooth: bool, metallic: float,
            roughness: float) -> Shape:
    """Rest the mesh on z = 0 and colour it; ``max_edge`` subdivides flat faces so that patterns
    have vertices to live on. Triangle counts stay near 1-2k: software GL pays per triangle."""
    if max_edge is not None:
        v, f = remesh.subdivide_to_size(mesh.vertices, mesh.faces, max_edge=max_edge)
        mesh = trimesh.Trimesh(v, f, process=True)
    mesh.apply_translation([0, 0, -mesh.bounds[0, 2]])
    if smooth:
        cols = paint(mesh.vertices)
    else:
        mesh.unmerge_vertices()  # one vertex per face corner: crisp per-face colours
        cols = np.repeat(paint(mesh.triangles_center), 3, axis=0)
    cols = np.clip(np.asarray(cols) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Shape(mesh=mesh, colors=cols, metallic=metallic, roughness=roughness, smooth=smooth)


# ---------------------------------------------------------------------------------------------
# builders: sizes are in scene units (about metres); objects stay within a 0.9 x 0.9 footprint


def ball(rng):
    r = rng.uniform(0.09, 0.2)
    m = creation.icosphere(subdivisions=3, radius=r)
    if rng.uniform() < 0.4:  # beach-ball gores
        a, b = random_color(rng), random_color(rng)
        k = int(rng.integers(3, 5))

        def paint(p):
            ang = np.arctan2(p[:, 1], p[:, 0])
            return np.where((np.floor(ang / (np.pi / k)) % 2 == 0)[:, None], a, b)
    else:
        paint = pattern(rng, 2 * r)
    return _finish(m, paint, None, True, rng.uniform(0.0, 0.1), rng.uniform(0.3, 0.8))


def _lathe(radius, z: np.ndarray) -> trimesh.Trimesh:
    """A solid of revolution with a ring at every ``z`` (so that colour bands stay sharp)."""
    prof = [(0.0, z[0])] + [(float(radius(t)), float(t)) for t in z] + [(0.0, z[-1])]
    return _revolved(np.array(prof))


def _rings(h: float, edges: list[float], n: int = 10) -> np.ndarray:
    """Ring heights: an even spread plus a pair of close rings at each colour edge (fraction of h)."""
    z = list(np.linspace(0, h, n))
    for e in edges:
        z += [e * h - 1e-3 * h, e * h + 1e-3 * h]
    return np.unique(np.clip(z, 0, h))


def can(rng):
    r, h = rng.uniform(0.06, 0.11), rng.uniform(0.18, 0.32)
    rim = 0.08
    m = _lathe(lambda t: r * (0.94 if (t < rim * h * 0.5 or t > h * (1 - rim * 0.5)) else 1.0),
               _rings(h, [rim, 1 - rim, 0.43, 0.57], 4))
    metal = np.array([0.78, 0.78, 0.8]) * rng.uniform(0.8, 1.0)
    label = random_color(rng)
    stripe = _contrast(rng, label)

    def paint(p):
        z = p[:, 2] - p[:, 2].min()
        col = np.where(((z > rim * h) & (z < (1 - rim) * h))[:, None], label, metal)
        return np.where((np.abs(z - h / 2) < 0.07 * h)[:, None], stripe, col)

    return _finish(m, paint, None, True, 0.5, rng.uniform(0.25, 0.5))


def cone(rng):
    r, h = rng.uniform(0.09, 0.16), rng.uniform(0.28, 0.48)
    m = _lathe(lambda t: r * (1 - t / h) + 1e-3, _rings(h, [0.35, 0.5, 0.62, 0.72], 8))
    body = np.array([1.0, rng.uniform(0.3, 0.5), 0.05]) if rng.uniform() < 0.6 else random_color(rng)
    band = np.array([0.95, 0.95, 0.95])

    def paint(p):
        t = (p[:, 2] - p[:, 2].min()) / h
        on = ((t > 0.35) & (t < 0.5)) | ((t > 0.62) & (t < 0.72))
        return np.where(on[:, None], band, body)

    return _finish(m, paint, None, True, 0.0, rng.uniform(0.5, 0.9))


def doughnut(rng):
    big = rng.uniform(0.08, 0.14)
    small = big * rng.uniform(0.38, 0.5)
    m = creation.torus(major_radius=big, minor_radius=small, major_sections=24, minor_sections=20)
    dough = np.array([0.78, 0.55, 0.3]) * rng.uniform(0.8, 1.05)
    icing = random_color(rng, sat=(0.2, 0.7), val=(0.5, 1.0)) if rng.uniform() < 0.7 else dough
    cut = small * rng.uniform(0.0, 0.4)

    def paint(p):
        return np.where((p[:, 2] - p[:, 2].mean() > cut)[:, None], icing, dough)

    return _finish(m, paint, None, True, 0.0, 0.8)


def _revolved(profile: np.ndarray) -> trimesh.Trimesh:
    """Revolve a closed (radius, z) profile about z; fix winding so normals point outwards."""
    m = creation.revolve(profile, sections=24)
    m.fix_normals()
    return m


def bowl(rng):
    R, h, t = rng.uniform(0.13, 0.22), rng.uniform(0.07, 0.13), 0.012
    foot = R * 0.45
    s = np.linspace(0.0, 1.0, 9)
    r, z = foot + (R - foot) * np.sin(s * np.pi / 2), h * (1 - np.cos(s * np.pi / 2))
    outer = [(0.0, 0.0)] + list(zip(r, z))
    inner = list(zip(r[::-1] - t, np.maximum(z[::-1], t))) + [(0.0, t)]
    m = _revolved(np.array(outer + inner))
    return _finish(m, pattern(rng, 2 * R), None, True, rng.uniform(0.0, 0.2), rng.uniform(0.2, 0.6))


def bottle(rng):
    r, h = rng.uniform(0.05, 0.09), rng.uniform(0.26, 0.42)
    neck = r * rng.uniform(0.3, 0.42)
    shoulder = h * rng.uniform(0.55, 0.68)
    top = shoulder + 0.18 * h
    m = _lathe(lambda t: np.interp(t, [0, shoulder, top, h], [r, r, neck, neck]),
               _rings(h, [0.2, 0.45, shoulder / h, top / h], 6))
    glass = random_color(rng, sat=(0.4, 0.9), val=(0.25, 0.7))
    label = random_color(rng, val=(0.7, 1.0))

    def paint(p):
        z = p[:, 2] - p[:, 2].min()
        return np.where(((z > 0.2 * h) & (z < 0.45 * h))[:, None], label, glass)

    return _finish(m, paint, None, True, 0.1, 0.15)


def book(rng):
    w, d, th = rng.uniform(0.2, 0.32), rng.uniform(0.15, 0.24), rng.uniform(0.03, 0.07)
    m = creation.box(extents=[w, d, th])
    cover = random_color(rng)
    pages = np.array([0.93, 0.91, 0.84])
    eps = 1e-4

    def paint(c):
        # face centres: the two covers and the spine (-x) in the cover colour, the rest is paper
        on_cover = (np.abs(c[:, 2] - c[:, 2].mean()) > th / 2 - eps) | (c[:, 0] < -w / 2 + eps)
        return np.where(on_cover[:, None], cover, pages)

    return _finish(m, paint, None, False, 0.0, rng.uniform(0.5, 0.9))


def crate(rng):
    e = rng.uniform(0.18, 0.42, size=3)
    e[2] = min(e[2], 0.35)
    m = creation.box(extents=e)
    wood = np.array([0.62, 0.45, 0.26]) * rng.uniform(0.75, 1.15)
    if rng.uniform() < 0.5:  # planks: alternate tone along z
        n = int(rng.integers(3, 6))
        dark = wood * 0.78

        def paint(c):
            k = np.floor((c[:, 2] - c[:, 2].min()) / (e[2] / n))
            return np.where((k % 2 == 0)[:, None], wood, dark)
    else:
        paint = pattern(rng, float(e.max()))
    return _finish(m, paint, float(e.min()) / 3, False, 0.0, rng.uniform(0.6, 0.95))


def cube(rng):
    s = rng.uniform(0.09, 0.18)
    m = creation.box(extents=[s, s, s])
    return _finish(m, pattern(rng, s), s / 4, False, rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.8))


CATEGORIES: tuple[Category, ...] = (
    Category(1, "ball", "ball.n.06", ("ball",), "a spherical object used as a plaything", ball),
    Category(2, "can", "can.n.01", ("can", "tin_can"), "airtight sealed metal container", can, p_lying=0.35),
    Category(3, "cone", "cone.n.01", ("cone", "traffic_cone"), "a cone-shaped object used to direct traffic",
             cone, p_lying=0.15),
    Category(4, "doughnut", "doughnut.n.02", ("doughnut", "donut"), "a small ring-shaped friedcake", doughnut),
    Category(5, "bowl", "bowl.n.03", ("bowl",), "a round dish open at the top", bowl),
    Category(6, "bottle", "bottle.n.01", ("bottle",), "a vessel for storing drinks or other liquids",
             bottle, p_lying=0.4),
    Category(7, "book", "book.n.01", ("book",), "a bound written work", book),
    Category(8, "crate", "crate.n.01", ("crate",), "a rugged box, usually of wood", crate),
    Category(9, "cube", "cube.n.05", ("cube", "square_block"), "a block in the shape of a cube", cube),
)
