"""Binding PyOpenGL to a headless platform and importing pyrender safely.

PyOpenGL picks its platform (EGL, OSMesa, GLX) once, at the first ``import OpenGL.GL`` of a
process, from ``PYOPENGL_PLATFORM``. So the platform must be chosen before anything imports
OpenGL, and one process can never switch: asking for another platform afterwards is an error,
not a silent fallback. Ray workers that need a different platform get it via ``runtime_env``.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from .errors import RendererError

PLATFORMS = ("egl", "osmesa")


def bound_platform() -> str | None:
    """The platform OpenGL is already bound to in this process, or None if not imported yet."""
    if "OpenGL.GL" not in sys.modules:
        return None
    return os.environ.get("PYOPENGL_PLATFORM") or "default"


def import_pyrender(platform: str = "egl"):
    """Bind OpenGL to ``platform`` (if nothing bound it yet) and return the pyrender module."""
    if platform not in PLATFORMS:
        raise RendererError(f"unknown GL platform {platform!r}; choose one of {PLATFORMS}")
    bound = bound_platform()
    if bound is None:
        os.environ["PYOPENGL_PLATFORM"] = platform
    elif bound != platform:
        raise RendererError(
            f"OpenGL is already bound to {bound!r} in this process; platform {platform!r} needs a "
            "fresh process (set PYOPENGL_PLATFORM before anything imports OpenGL)")
    # pyrender 0.1.45 still uses np.infty (removed in numpy 2) in bounds and shadow code.
    if not hasattr(np, "infty"):
        np.infty = np.inf
    if platform == "osmesa":
        try:
            from OpenGL import osmesa  # noqa: F401
        except Exception as e:  # missing libOSMesa.so or PyOpenGL < 3.1.5
            raise RendererError(
                f"OSMesa unavailable ({type(e).__name__}: {e}); it needs `apt-get install libosmesa6` "
                "and PyOpenGL>=3.1.10 (pip install PyOpenGL==3.1.10 after pyrender)") from e
    import pyrender

    return pyrender
