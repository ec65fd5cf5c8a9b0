"""Single-view 3D reconstruction and multi-view rendering for PICS shape priors (pure library).

    from pics_model.geometry import reconstruct, get_renderer
    mesh = reconstruct(patch_rgb, mask)            # watertight, textured trimesh.Trimesh
    views = get_renderer(num_views=6).render(mesh)  # MultiView: color [6,224,224,4], depth [6,224,224]

No orchestration here (no Prefect/Ray): ``tasks/render_priors`` drives it. Importing this package
does not import OpenGL; the GL platform is bound when the first renderer is built (``gl.py``).
Plug-in reconstructors: see ``README.md`` beside this file and ``registry.py``.
"""
from .errors import (DegenerateMeshError, EmptyMaskError, GeometryError, ReconstructorNotFoundError,
                     RendererError, WeightsNotFoundError)
from .inflate import InflateConfig, as_patch_and_mask, inflate
from .registry import (Reconstructor, available_reconstructors, get_reconstructor, reconstruct,
                       register_reconstructor)
from .renderer import MultiView, MultiViewRenderer, mesh_parts, drop_renderer, get_renderer, look_at

__all__ = [
    "DegenerateMeshError", "EmptyMaskError", "GeometryError", "ReconstructorNotFoundError",
    "RendererError", "WeightsNotFoundError", "InflateConfig", "as_patch_and_mask", "inflate",
    "Reconstructor", "available_reconstructors", "get_reconstructor", "reconstruct",
    "register_reconstructor", "MultiView", "MultiViewRenderer", "mesh_parts", "drop_renderer",
    "get_renderer", "look_at",
]
