"""Operating the pipeline: a Prefect server, a two-node Ray cluster, the pipeline deployment, DVC.

Everything runs on loopback: `prefect server start` on a free local port, a Ray head plus one
worker node (ray.cluster_utils), the pipeline deployment served from a temporary copy of the repo,
and `dvc exp show` in that copy afterwards.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.shrink import SHRUNK_OVERRIDES

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def _git_commit_all(repo: Path) -> None:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "snapshot"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env)


def test_pipeline_deployment_on_prefect_server_and_two_node_ray(repo_copy, tmp_path):
    from ray.cluster_utils import Cluster

    _git_commit_all(repo_copy)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    procs: list[subprocess.Popen] = []
    log = open(tmp_path / "services.log", "w")
    cluster = None
    try:
        procs.append(subprocess.Popen(
            [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            env=env, stdout=log, stderr=subprocess.STDOUT))
        _wait_http(f"{api}/health", 120)

        # A Ray head and one worker node, each with one CPU, on this machine.
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        cluster.add_node(num_cpus=1)
        address = cluster.address
        cluster.wait_for_nodes()
        assert len(cluster.list_all_nodes()) == 2

        procs.append(subprocess.Popen([sys.executable, "-m", "flows.serve", "pipeline"], cwd=repo_copy, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
        # area_ratio as well: `dvc exp run -S` of a changed value, through a deployment run.
        overrides = dict(SHRUNK_OVERRIDES, **{"ray.address": cluster.address, "decompose.area_ratio": 0.05})
        trigger = subprocess.run(
            [sys.executable, "-c", _TRIGGER, json.dumps(overrides)], cwd=repo_copy, env=env,
            capture_output=True, text=True, timeout=900)
        assert trigger.returncode == 0, trigger.stdout[-3000:] + trigger.stderr[-3000:] + _tail(tmp_path / "services.log")
        run = json.loads(trigger.stdout.strip().splitlines()[-1])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        if cluster is not None:
            cluster.shutdown()
        log.close()

    # The deployment run, as the Prefect API saw it: completed, with the parameters we sent.
    assert run["state"] == "COMPLETED", run
    assert run["deployment"] == "pipeline"
    assert run["parameters"]["overrides"]["ray.address"] == overrides["ray.address"]
    assert run["parameters"]["experiment_name"] == "ops-it"
    # The stage flows ran as child processes of `dvc exp run` and reported to the same server.
    assert {"make_sample", "decompose", "render_priors", "train", "evaluate"} <= set(run["flow_names"])

    # The DVC experiment, with the run's params and its metrics.
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo_copy,
                           capture_output=True, text=True, check=True, env=env).stdout
    exps = {rev["name"]: rev["data"] for row in json.loads(shown) for e in row.get("experiments") or []
            for rev in e["revs"]}
    assert "ops-it" in exps
    params = exps["ops-it"]["params"]["params.yaml"]["data"]
    assert params["train"]["steps"] == SHRUNK_OVERRIDES["train.steps"]
    assert params["ray"]["address"] == address
    assert params["decompose"]["area_ratio"] == 0.05
    metrics = exps["ops-it"]["metrics"]
    assert "data/train/metrics.json" in metrics and "data/evaluate/metrics.json" in metrics


def _tail(p: Path, n: int = 4000) -> str:
    return p.read_text()[-n:] if p.exists() else ""


# Runs in a subprocess so that this test process never starts a temporary Prefect server.
_TRIGGER = r"""
import asyncio, json, sys, time
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

overrides = json.loads(sys.argv[1])

async def wait_for_deployment(timeout=180):
    # `pics serve` registers the deployment a few seconds after it starts.
    deadline = time.monotonic() + timeout
    async with get_client() as c:
        while True:
            try:
                return await c.read_deployment_by_name("pipeline/pipeline")
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)

asyncio.run(wait_for_deployment())
fr = run_deployment("pipeline/pipeline", parameters={"overrides": overrides, "experiment_name": "ops-it"},
                    timeout=840)

async def describe():
    async with get_client() as c:
        fr2 = await c.read_flow_run(fr.id)
        dep = await c.read_deployment(fr2.deployment_id)
        # Raw filter requests: the 3.8.8 client's filter bodies carry nulls that the server (with
        # fastapi<0.155) rejects with 422.
        runs = (await c.request("POST", "/flow_runs/filter", json={"limit": 200, "offset": 0})).json()
        names = set()
        for r in runs:
            names.add((await c.read_flow(r["flow_id"])).name)
        return {"state": fr2.state.type.value, "parameters": fr2.parameters, "deployment": dep.name,
                "flow_names": sorted(names)}

print(json.dumps(asyncio.run(describe())))
"""
