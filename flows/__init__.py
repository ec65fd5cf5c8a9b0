"""Prefect flows: the only entry points of the pipeline's stages (CLI, ``python -m``, dvc.yaml)."""
from tasks.runtime import configure_environment, start_watchdog

configure_environment()
start_watchdog()  # a killed driver leaves no Prefect server or Ray process behind
