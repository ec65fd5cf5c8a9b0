"""Operating the pipeline: a Prefect server, a two-node Ray cluster, the pipeline deployment, DVC.

Everything runs on loopback: `prefect server start` on a free local port, a Ray head plus one
worker node (ray.cluster_utils), the pipeline deployment served by `pics serve` from a temporary
copy of the repo and run with `prefect deployment run`, then `prefect flow-run ls`, `prefect
artifact ls` and `dvc exp show` as a user types them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from flows.serve import served_name
from tests.prefect_server import BIN, prefect, prefect_server, stop
from tests.shrink import SHRUNK_OVERRIDES, as_set_args

pytestmark = pytest.mark.slow

STAGE_FLOWS = ("make_sample", "decompose", "render_priors", "train", "evaluate")


def _git_commit_all(repo) -> None:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "snapshot"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env)


def _completed_runs(env: dict, flow: str) -> list[dict]:
    return json.loads(prefect(env, "flow-run", "ls", "--flow-name", flow, "--state-type", "COMPLETED", "-o", "json"))


def test_pipeline_deployment_on_prefect_server_and_two_node_ray(repo_copy, tmp_path):
    from ray.cluster_utils import Cluster

    _git_commit_all(repo_copy)
    deployment = f"pipeline/{served_name('pipeline')}"
    cluster = None
    with open(tmp_path / "services.log", "w") as log:
        try:
            with prefect_server(tmp_path, log) as env:
                # A Ray head and one worker node, each with one CPU, on this machine.
                cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
                cluster.add_node(num_cpus=1)
                cluster.wait_for_nodes()
                assert len(cluster.list_all_nodes()) == 2
                ray_address = cluster.address  # None once the cluster is shut down

                serve = subprocess.Popen([str(BIN / "pics"), "serve", "pipeline"], cwd=repo_copy, env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
                # area_ratio as well: `dvc exp run -S` of a changed value, through a deployment run.
                overrides = [*as_set_args(), f"ray.address={ray_address}", "decompose.area_ratio=0.05"]
                try:
                    deadline = time.monotonic() + 600
                    while deployment not in prefect(env, "deployment", "ls").split():
                        assert serve.poll() is None and time.monotonic() < deadline, "pics serve registered nothing"
                        time.sleep(2)
                    prefect(env, "deployment", "run", deployment, "-p", f"overrides={json.dumps(overrides)}",
                            "-p", "experiment_name=ops-it", "--watch", "--watch-timeout", "840", timeout=900)
                finally:
                    stop([serve])
                pipeline_runs = _completed_runs(env, "pipeline")
                stage_runs = {flow: _completed_runs(env, flow) for flow in STAGE_FLOWS}
                artifacts = json.loads(prefect(env, "artifact", "ls", "-o", "json"))
        finally:
            if cluster is not None:
                cluster.shutdown()

    # The deployment run, as the Prefect server saw it: completed, with the parameters we sent.
    (run,) = pipeline_runs
    assert run["parameters"] == {"overrides": overrides, "experiment_name": "ops-it"}
    # The stage flows ran as child processes of `dvc exp run` and reported to the same server.
    assert all(len(runs) == 1 for runs in stage_runs.values()), {f: len(r) for f, r in stage_runs.items()}
    assert "pipeline-metrics" in {a["key"] for a in artifacts}

    # The DVC experiment, with the run's params and the values of its metrics.
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo_copy,
                           capture_output=True, text=True, check=True, env=env).stdout
    exps = {rev["name"]: rev["data"] for row in json.loads(shown) for e in row.get("experiments") or []
            for rev in e["revs"]}
    params = exps["ops-it"]["params"]["params.yaml"]["data"]
    assert params["train"]["steps"] == SHRUNK_OVERRIDES["train.steps"]
    assert params["ray"]["address"] == ray_address
    assert params["decompose"]["area_ratio"] == 0.05
    metrics = {f: m["data"] for f, m in exps["ops-it"]["metrics"].items()}
    assert metrics["data/train/metrics.json"]["steps"] == SHRUNK_OVERRIDES["train.steps"]
    evaluated = metrics["data/evaluate/metrics.json"]
    assert 0 < evaluated["n_samples"] <= SHRUNK_OVERRIDES["evaluate.max_samples"]
    assert isinstance(evaluated["pics"]["mpsnr"], float)
