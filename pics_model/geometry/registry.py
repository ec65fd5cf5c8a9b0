"""Reconstructor plug-ins: ``name -> factory(weights, **options) -> Reconstructor``.

A reconstructor is any callable ``(patch [H, W, 3|4] uint8, mask [H, W] bool) -> trimesh.Trimesh``
(textured, watertight, front facing +z, see ``inflate.py`` for the world frame). Plug-ins are
found, in this order, by:

1. ``register_reconstructor("name")`` at import time of a module you import yourself;
2. the ``pics.reconstructors`` entry-point group of installed packages (``name = "pkg.mod:factory"``);
3. a dotted path ``"pkg.module:factory"`` given directly as the name.

A learned reconstructor declares ``needs_weights=True``; it is then only ever built with an
existing local weight file (``render_priors.reconstructor_weights``), never downloads, and a
missing plug-in or weight file raises at start-up instead of falling back to the built-in one.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Protocol

import trimesh

from .errors import ReconstructorNotFoundError, WeightsNotFoundError
from .inflate import InflateConfig, inflate

ENTRY_POINT_GROUP = "pics.reconstructors"


class Reconstructor(Protocol):
    def __call__(self, patch, mask) -> trimesh.Trimesh: ...


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Reconstructor]
    needs_weights: bool


_REGISTRY: dict[str, _Entry] = {}


def register_reconstructor(name: str, *, needs_weights: bool = False):
    """Decorator registering ``factory(weights: Path | None, **options) -> Reconstructor``."""

    def deco(factory):
        _REGISTRY[name] = _Entry(factory, needs_weights)
        factory.needs_weights = needs_weights
        return factory

    return deco


def available_reconstructors() -> list[str]:
    names = set(_REGISTRY)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def _lookup(name: str) -> _Entry:
    if name in _REGISTRY:
        return _REGISTRY[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            factory = ep.load()
            return _REGISTRY.get(name) or _Entry(factory, getattr(factory, "needs_weights", False))
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ReconstructorNotFoundError(f"reconstructor {name!r}: cannot import it ({e})") from e
        return _Entry(factory, getattr(factory, "needs_weights", False))
    raise ReconstructorNotFoundError(
        f"no reconstructor plug-in named {name!r}; available: {available_reconstructors()} "
        f"(register one with register_reconstructor, the {ENTRY_POINT_GROUP!r} entry point, "
        "or name it as 'package.module:factory')")


def get_reconstructor(name: str = "builtin", weights: str | Path | None = None,
                      **options: Any) -> Reconstructor:
    """Build the reconstructor ``name``; checks its weight file before anything is rendered."""
    entry = _lookup(name)
    if entry.needs_weights:
        if weights is None:
            raise WeightsNotFoundError(
                f"reconstructor {name!r} needs weights: set render_priors.reconstructor_weights "
                "to a local file")
        weights = Path(weights).expanduser()
        if not weights.exists():
            raise WeightsNotFoundError(f"reconstructor {name!r}: weight file {weights} does not exist")
    elif weights is not None:
        raise ValueError(f"reconstructor {name!r} takes no weights, but weights={weights} was given")
    return entry.factory(weights, **options)


@register_reconstructor("builtin")
def _builtin(weights: None = None, **options: Any) -> Reconstructor:
    cfg = InflateConfig(**options)
    return lambda patch, mask: inflate(patch, mask, cfg)


def reconstruct(patch, mask=None, *, reconstructor: str = "builtin",
                weights: str | Path | None = None, **options: Any) -> trimesh.Trimesh:
    """One-shot convenience: ``get_reconstructor(...)(patch, mask)``. In a loop, build the
    reconstructor once with :func:`get_reconstructor` (a learned one loads its weights there)."""
    return get_reconstructor(reconstructor, weights, **options)(patch, mask)
