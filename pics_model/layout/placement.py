"""A layout: where every element goes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Placement:
    """Per element: centre (tx, ty) in target pixels, theta in radians (clockwise on screen), and
    scale in target pixels per source pixel. Arrays float64 [N]."""

    tx: np.ndarray
    ty: np.ndarray
    theta: np.ndarray
    scale: np.ndarray

    def records(self, names: list[str]) -> list[dict]:
        return [{"file": n, "tx": float(x), "ty": float(y), "theta": float(t), "scale": float(s)}
                for n, x, y, t, s in zip(names, self.tx, self.ty, self.theta, self.scale)]
