"""Serve every stage flow and the pipeline as deployments from this process (``pics serve``).

For a single box: ``pics serve`` against a Prefect server (``PREFECT_API_URL``), then trigger runs
from the UI, ``prefect deployment run 'pipeline/pipeline-serve' -p overrides='["train.steps=50"]'`` or
``prefect.deployments.run_deployment``. For real infrastructure use the work-pool deployments in
prefect.yaml (``prefect deploy --all``) and a worker per pool.

A deployment is named by flow and deployment name, so the served ones carry a ``-serve`` suffix:
``pics serve`` and ``prefect deploy --all`` against one server then register side by side instead of
overwriting each other (``decompose/decompose`` runs on a work pool, ``decompose/decompose-serve`` here).
"""
from __future__ import annotations

import importlib

import flows  # noqa: F401

# (module, flow function, deployment name): one deployment per stage and one for the pipeline.
DEPLOYMENTS = [
    ("flows.make_sample", "make_sample_flow", "make-sample"),
    ("flows.decompose", "decompose_flow", "decompose"),
    ("flows.render_priors", "render_priors_flow", "render-priors"),
    ("flows.train", "train_flow", "train"),
    ("flows.evaluate", "evaluate_flow", "evaluate"),
    ("flows.analogy", "analogy_flow", "analogy"),
    ("flows.pipeline", "pipeline_flow", "pipeline"),
]


def served_name(name: str) -> str:
    """The name ``pics serve`` registers deployment ``name`` under (prefect.yaml uses ``name`` itself)."""
    return f"{name}-serve"


def build_deployments(only: list[str] | None = None, limit: int = 1):
    out = []
    for module, attr, name in DEPLOYMENTS:
        if only and name not in only:
            continue
        fl = getattr(importlib.import_module(module), attr)
        out.append(fl.to_deployment(name=served_name(name), tags=["pics"], concurrency_limit=limit))
    return out


def serve_all(only: list[str] | None = None) -> None:
    from prefect import serve

    serve(*build_deployments(only))
