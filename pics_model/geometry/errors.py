"""Errors of the geometry library. Each carries a short machine-readable ``reason`` that the
render_priors stage writes into the quarantine table unchanged."""
from __future__ import annotations


class GeometryError(RuntimeError):
    """Base class: one object could not be reconstructed or rendered."""

    reason = "geometry_error"


class EmptyMaskError(GeometryError):
    reason = "empty_mask"


class DegenerateMeshError(GeometryError):
    reason = "degenerate_mesh"


class RendererError(GeometryError):
    reason = "renderer_error"


class ReconstructorNotFoundError(LookupError):
    """``render_priors.reconstructor`` names no registered plug-in (a configuration error, not a
    per-object failure: the run stops)."""


class WeightsNotFoundError(FileNotFoundError):
    """A learned reconstructor's weight file is missing or was not given (configuration error)."""
