"""Binding PyOpenGL to a headless platform and importing pyrender safely.

PyOpenGL picks its platform (EGL, OSMesa, GLX) once, at the first ``import OpenGL.GL`` of a
process, from ``PYOPENGL_PLATFORM``. So the platform must be chosen before anything imports
OpenGL, and one process can never switch: asking for another platform afterwards is an error,
not a silent fallback. Ray workers that need a different platform get it via ``runtime_env``.
"""
from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

from .errors import RendererError

PLATFORMS = ("egl", "osmesa")
# The library PyOpenGL's OSMesa platform loads (libOSMesa.so or .so.N, Debian's libosmesa6). When it
# is missing, PyOpenGL does not raise: its platform's GL is None and `import OpenGL.GL` later fails
# with an AttributeError. A module attribute so that a test can name a library that does not exist.
OSMESA_LIBRARY = "OSMesa"


def bound_platform() -> str | None:
    """The platform OpenGL is already bound to in this process, or None if not bound yet
    (PyOpenGL binds when ``OpenGL.platform`` is first imported)."""
    if "OpenGL.platform" not in sys.modules:
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
        require_osmesa()
    import pyrender

    return pyrender


def require_osmesa() -> None:
    """Raise RendererError unless libOSMesa loads and PyOpenGL has its OSMesa bindings."""
    from OpenGL.platform import ctypesloader

    # PyOpenGL's own loader and name, so this finds exactly what its OSMesa platform would.
    if ctypesloader.loadLibrary(ctypes.cdll, OSMESA_LIBRARY, mode=ctypes.RTLD_GLOBAL) is None:
        raise RendererError(f"OSMesa unavailable: lib{OSMESA_LIBRARY}.so not found; it needs "
                            "`apt-get install libosmesa6` (or use render_priors.platform: egl)")
    try:
        from OpenGL import osmesa  # noqa: F401
    except Exception as e:  # PyOpenGL < 3.1.5 has no OSMesa bindings
        raise RendererError(f"OSMesa unavailable ({type(e).__name__}: {e}); it needs PyOpenGL>=3.1.10 "
                            "(pip install PyOpenGL==3.1.10 after pyrender)") from e
