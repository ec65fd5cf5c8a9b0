"""Operating the whole pipeline as a user does, in a temporary copy of the repository on a shrunk
params.yaml: a Prefect server (`prefect server start` on a free loopback port), a Ray head plus one
worker node (ray.cluster_utils), then

- `pics repro` (what `make run` runs: `dvc repro` of the real dvc.yaml), every stage through its
  Prefect flow, on the cluster, reporting to the server;
- the pipeline deployment served by `pics serve` and run with `prefect deployment run`: a DVC
  experiment (`dvc exp run --temp -S ...`) that changes an evaluate parameter, so evaluate alone
  reruns, in DVC's temporary workspace;
- `prefect flow-run ls`, `prefect artifact ls`, `dvc exp show`/`exp diff`/`plots show` as a user
  types them.

One pipeline run serves every check: the shrunk pipeline takes minutes on 2 cores.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from flows.serve import served_name
from tasks.params import apply_overrides, load_params
from tests.prefect_server import BIN, prefect, prefect_server, stop
from tests.shrink import SHRUNK_OVERRIDES, as_set_args

pytestmark = pytest.mark.slow

STAGE_FLOWS = ("make_sample", "decompose", "render_priors", "train", "evaluate", "location", "analogy", "layout")


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 1800) -> str:
    env = dict(env, DVC_NO_ANALYTICS="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as on a user's machine: imports leave __pycache__/ in deps
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout


def _dvc(repo: Path, env: dict, *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], repo, env)


def _completed_runs(env: dict, flow: str) -> list[dict]:
    return json.loads(prefect(env, "flow-run", "ls", "--flow-name", flow, "--state-type", "COMPLETED", "-o", "json"))


def test_pics_repro_and_a_deployment_run_experiment_on_prefect_server_and_two_node_ray(repo_copy, tmp_path):
    from ray.cluster_utils import Cluster

    params_file = repo_copy / "params.yaml"
    deployment = f"pipeline/{served_name('pipeline')}"
    overrides = ["evaluate.max_samples=2"]  # `dvc exp run -S` of a changed value, through a deployment run
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

                shrunk = apply_overrides(yaml.safe_load(params_file.read_text()),
                                         [*as_set_args(), f"ray.address={ray_address}"])
                params_file.write_text(yaml.safe_dump(shrunk, sort_keys=False))
                load_params(params_file)  # the shrunk file is still valid under the schema
                for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "snapshot"]):
                    _git(repo_copy, *args)

                out = _run([str(BIN / "pics"), "repro"], repo_copy, env)
                assert "Running stage 'layout'" in out and "Starting temporary server" not in out, out[-4000:]
                eval_metrics, train_metrics = _check_repro_outputs(repo_copy, shrunk)

                # Everything is up to date now, bytecode of the stages' code included: a second repro runs nothing.
                assert "changed" not in _dvc(repo_copy, env, "status")
                again = _dvc(repo_copy, env, "repro")
                assert "Running stage" not in again, again
                # The run, recorded as a user records it: dvc.lock, metrics and plots are git's.
                _git(repo_copy, "add", "-A")
                _git(repo_copy, "commit", "-qm", "baseline run")
                committed = _git(repo_copy, "ls-files").split()
                assert {"dvc.lock", "data/train/metrics.json", "data/train/heldout.csv",
                        "data/evaluate/metrics.json", "data/evaluate/plots/occlusion.csv"} <= set(committed)

                serve = subprocess.Popen([str(BIN / "pics"), "serve", "pipeline"], cwd=repo_copy, env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
                try:
                    deadline = time.monotonic() + 600
                    while deployment not in prefect(env, "deployment", "ls").split():
                        assert serve.poll() is None and time.monotonic() < deadline, "pics serve registered nothing"
                        time.sleep(2)
                    prefect(env, "deployment", "run", deployment, "-p", f"overrides={json.dumps(overrides)}",
                            "-p", "experiment_name=one-sample", "--watch", "--watch-timeout", "840", timeout=900)
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
    assert run["parameters"] == {"overrides": overrides, "experiment_name": "one-sample"}
    # Every stage process of `pics repro`, and evaluate again under `dvc exp run`, reported to the same server.
    assert {f: len(r) for f, r in stage_runs.items()} == {f: 2 if f == "evaluate" else 1 for f in STAGE_FLOWS}
    assert "pipeline-metrics" in {a["key"] for a in artifacts}

    # The DVC experiment next to its baseline commit: the run's params and the values of its metrics.
    shown = json.loads(_dvc(repo_copy, env, "exp", "show", "--json"))
    (baseline,) = [row for row in shown if row["rev"] != "workspace"]  # the commit the experiment is based on
    exp = next(r["data"] for e in baseline["experiments"] for r in e["revs"] if r["name"] == "one-sample")
    assert baseline["data"]["metrics"]["data/evaluate/metrics.json"]["data"] == _scalars(eval_metrics)
    assert baseline["data"]["metrics"]["data/train/metrics.json"]["data"] == _scalars(train_metrics)
    params = exp["params"]["params.yaml"]["data"]
    assert params["evaluate"]["max_samples"] == 2 and params["ray"]["address"] == ray_address
    assert params["train"]["steps"] == SHRUNK_OVERRIDES["train.steps"]
    evaluated = exp["metrics"]["data/evaluate/metrics.json"]["data"]
    assert evaluated["n_samples"] == 2 and isinstance(evaluated["pics"]["mpsnr"], float)
    assert exp["metrics"]["data/train/metrics.json"]["data"] == _scalars(train_metrics)  # train did not rerun
    diff = json.loads(_dvc(repo_copy, env, "exp", "diff", "HEAD", "one-sample", "--json"))
    changed = diff["params"]["params.yaml"]["evaluate.max_samples"]
    assert (changed["old"], changed["new"]) == (shrunk["evaluate"]["max_samples"], 2)
    assert diff["metrics"]["data/evaluate/metrics.json"]["n_samples"] == {
        "old": eval_metrics["n_samples"], "new": 2, "diff": 2 - eval_metrics["n_samples"]}

    # The plots page renders offline: vega inlined, no script from the network, one line per method.
    _dvc(repo_copy, env, "plots", "show", "-o", "plots-page")
    page = (repo_copy / "plots-page" / "index.html").read_text()
    assert "<script src" not in page and page.count("vegaEmbed(") >= 4
    assert '"color": {"field": "method"' in page and '"color": {"field": "weights"' in page


def _check_repro_outputs(repo: Path, shrunk: dict) -> tuple[dict, dict]:
    """What `pics repro` left under data/; returns (evaluate's metrics, train's metrics)."""
    data = repo / "data"
    manifest = json.loads((data / "decomposed" / "manifest.json").read_text())
    assert manifest["images_seen"] == shrunk["make_sample"]["num_images"]
    assert manifest["samples"] > 0
    assert (manifest["images_with_pair"] + sum(manifest["skipped"].values())
            + sum(manifest["quarantined"].values())) == manifest["images_seen"]
    shards = sorted((data / "decomposed" / "shards").glob("*.parquet"))
    assert sum(pq.read_metadata(s).num_rows for s in shards) == manifest["samples"]
    assert (data / "decomposed" / "quarantine.parquet").exists()
    assert (data / "decomposed" / "samples.png").stat().st_size > 0
    assert list((data / "priors").rglob("*.parquet"))
    assert (data / "train" / "final" / "model.safetensors").exists()
    train_metrics = json.loads((data / "train" / "metrics.json").read_text())
    assert train_metrics["steps"] == shrunk["train"]["steps"]
    eval_metrics = json.loads((data / "evaluate" / "metrics.json").read_text())
    assert eval_metrics
    assert list((data / "evaluate" / "report").glob("*.html"))
    assert set(json.loads((data / "layout" / "metrics.json").read_text())) == set(shrunk["layout"]["targets"])
    return eval_metrics, train_metrics


def _scalars(metrics):
    """A metrics file as DVC reads it: lists (intervals such as ci95) and empty sections (the paired
    intervals of a single sample) are not metrics to DVC."""
    if isinstance(metrics, dict):
        kept = {k: _scalars(v) for k, v in metrics.items() if not isinstance(v, list)}
        return {k: v for k, v in kept.items() if v != {}}
    return metrics


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout
