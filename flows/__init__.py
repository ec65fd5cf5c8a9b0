"""Prefect flows: the only entry points of the pipeline's stages (CLI, ``python -m``, dvc.yaml)."""
from tasks.runtime import configure_environment

configure_environment()
