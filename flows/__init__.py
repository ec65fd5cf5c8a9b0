"""Prefect flows: the pipeline's stages, which the ``pics`` CLI (flows/cli.py) and dvc.yaml run."""
from tasks.runtime import configure_environment, start_watchdog

configure_environment()
start_watchdog()  # a killed driver leaves no Prefect server or Ray process behind
