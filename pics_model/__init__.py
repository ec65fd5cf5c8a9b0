"""PICS: pairwise (N-object) image compositing with interaction transformer blocks, on diffusers.

A pure torch/diffusers library (no Prefect, Ray or DVC imports). Heavy modules load lazily so
`import pics_model` stays cheap for data-only users.
"""
from __future__ import annotations

from importlib import import_module

from .config import PICSConfig, get_preset

_LAZY = {
    "PICSModel": "modeling_pics",
    "PICSPipeline": "pipeline_pics",
    "PICSPipelineOutput": "pipeline_pics",
    "InteractionTransformerBlock": "interaction_block",
    "RoutingContext": "interaction_block",
    "AugmentConfig": "data",
    "build_item": "data",
    "collate": "data",
    "rotate_object": "data",
    "expand_boxes": "data",
}

__all__ = ["PICSConfig", "get_preset", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
