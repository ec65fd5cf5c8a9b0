"""The `prefect` CLI against a real `prefect server start`, as a user types it: listings, work pools,
`prefect deploy --all` from prefect.yaml and `pics serve`, whose deployments must sit side by side."""
from __future__ import annotations

import importlib
import json
import subprocess
import time

import pytest
import yaml

from flows.serve import DEPLOYMENTS, served_name
from tests.conftest import REPO_ROOT
from tests.prefect_server import BIN, prefect, prefect_server, stop

FLOW_NAMES = {"make-sample": "make_sample", "render-priors": "render_priors"}  # flow names differ from these


def _full_names(served: bool) -> set[str]:
    return {f"{FLOW_NAMES.get(name, name)}/{served_name(name) if served else name}" for _, _, name in DEPLOYMENTS}


def _inspect(env: dict, name: str) -> dict:
    return json.loads(prefect(env, "deployment", "inspect", name, "-o", "json"))


def _overrides_schema(dep: dict) -> dict:
    schema = dep["parameter_openapi_schema"]["properties"]["overrides"]
    return schema.get("anyOf", [schema])


STRING_LIST = {"type": "array", "items": {"type": "string"}}


def test_every_served_flow_takes_overrides_in_one_shape_under_a_name_of_its_own():
    from prefect.utilities.callables import parameter_schema

    yaml_names = {d["name"] for d in yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]}
    served = {served_name(name) for _, _, name in DEPLOYMENTS}
    assert served.isdisjoint(yaml_names)
    for module, attr, name in DEPLOYMENTS:
        fl = getattr(importlib.import_module(module), attr)
        dep = {"name": name, "parameter_openapi_schema": parameter_schema(fl).model_dump()}
        assert STRING_LIST in _overrides_schema(dep), (name, _overrides_schema(dep))


@pytest.mark.slow
def test_cli_listings_and_deployments_of_prefect_yaml_beside_pics_serve(repo_copy, tmp_path):
    with open(tmp_path / "services.log", "w") as log, prefect_server(tmp_path, log) as env:
        # The listings answered 422 with fastapi>=0.151 behind the server (the client sends nulls).
        for listing in (["flow", "ls"], ["flow-run", "ls"], ["deployment", "ls"], ["work-pool", "ls"],
                        ["artifact", "ls"]):
            prefect(env, *listing)

        for pool in ("pics-cpu", "pics-gpu"):
            prefect(env, "work-pool", "create", pool, "--type", "process")
        prefect(dict(env, PICS_REPO=str(repo_copy)), "deploy", "--all", cwd=repo_copy, timeout=300)

        serve = subprocess.Popen([str(BIN / "pics"), "serve"], cwd=repo_copy, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        try:
            expected = _full_names(served=False) | _full_names(served=True)
            deadline = time.monotonic() + 600  # it imports every stage: minutes on a loaded machine
            while not expected <= (listed := set(prefect(env, "deployment", "ls").split())):
                assert serve.poll() is None and time.monotonic() < deadline, (expected - listed, listed)
                time.sleep(2)
        finally:
            stop([serve])

        from_yaml = _inspect(env, "pipeline/pipeline")
        served = _inspect(env, f"pipeline/{served_name('pipeline')}")
        served_stage = _inspect(env, f"decompose/{served_name('decompose')}")
        yaml_stage = _inspect(env, "decompose/decompose")

    # prefect.yaml's run on work pools, `pics serve`'s in its own process: neither overwrote the other.
    assert from_yaml["work_pool_name"] == "pics-cpu" and yaml_stage["work_pool_name"] == "pics-cpu"
    assert served["work_pool_name"] is None and served_stage["work_pool_name"] is None
    # One shape of overrides everywhere: "section.key=value" strings, as `--set` and `dvc exp run -S` take them.
    for dep in (from_yaml, served, served_stage, yaml_stage):
        assert STRING_LIST in _overrides_schema(dep), (dep["name"], _overrides_schema(dep))
    assert from_yaml["parameters"]["overrides"] == []
