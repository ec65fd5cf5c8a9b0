"""`dvc repro` of the real dvc.yaml in a temporary copy of the repository, on a shrunk params.yaml,
every stage runs through its Prefect flow."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tasks.params import apply_overrides, load_params
from tests.shrink import as_set_args

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, timeout: float = 1800) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as on a user's machine: imports leave __pycache__/ in deps
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("PREFECT_API_URL", None)  # stages start their own temporary server, as in `make run`
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout


def test_dvc_repro_runs_every_stage(repo_copy):
    params_file = repo_copy / "params.yaml"
    shrunk = apply_overrides(yaml.safe_load(params_file.read_text()), as_set_args())
    params_file.write_text(yaml.safe_dump(shrunk, sort_keys=False))
    load_params(params_file)  # the shrunk file is still valid under the schema
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "snapshot"]):
        _git(repo_copy, *args)

    _run([sys.executable, "-m", "dvc", "repro"], repo_copy)

    data = repo_copy / "data"
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

    # Everything is up to date now, bytecode of the stages' code included: a second repro runs nothing.
    status = _run([sys.executable, "-m", "dvc", "status"], repo_copy)
    assert "changed" not in status
    again = _run([sys.executable, "-m", "dvc", "repro"], repo_copy)
    assert "Running stage" not in again, again

    # The run, recorded as a user records it: dvc.lock, metrics and plots are git's.
    _git(repo_copy, "add", "-A")
    _git(repo_copy, "commit", "-qm", "baseline run")
    committed = _git(repo_copy, "ls-files").split()
    assert {"dvc.lock", "data/train/metrics.json", "data/train/heldout.csv",
            "data/evaluate/metrics.json", "data/evaluate/plots/occlusion.csv"} <= set(committed)

    # An experiment that reruns evaluate only; `dvc exp show`/`exp diff` compare real values.
    _run([sys.executable, "-m", "dvc", "exp", "run", "--name", "one-sample", "-S", "evaluate.max_samples=1"], repo_copy)
    shown = json.loads(_run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo_copy))
    (baseline,) = [row for row in shown if row["rev"] != "workspace"]  # the commit the experiment is based on
    exp = next(r["data"] for e in baseline["experiments"] for r in e["revs"] if r["name"] == "one-sample")
    assert baseline["data"]["metrics"]["data/evaluate/metrics.json"]["data"] == _scalars(eval_metrics)
    assert baseline["data"]["metrics"]["data/train/metrics.json"]["data"] == _scalars(train_metrics)
    assert exp["metrics"]["data/evaluate/metrics.json"]["data"]["n_samples"] == 1
    assert exp["metrics"]["data/train/metrics.json"]["data"] == _scalars(train_metrics)  # train did not rerun
    assert exp["params"]["params.yaml"]["data"]["evaluate"]["max_samples"] == 1
    diff = json.loads(_run([sys.executable, "-m", "dvc", "exp", "diff", "HEAD", "one-sample", "--json"], repo_copy))
    changed = diff["params"]["params.yaml"]["evaluate.max_samples"]
    assert (changed["old"], changed["new"]) == (shrunk["evaluate"]["max_samples"], 1)
    assert diff["metrics"]["data/evaluate/metrics.json"]["n_samples"] == {
        "old": eval_metrics["n_samples"], "new": 1, "diff": 1 - eval_metrics["n_samples"]}

    # The plots page renders offline: vega inlined, no script from the network, one line per method.
    _run([sys.executable, "-m", "dvc", "plots", "show", "-o", "plots-page"], repo_copy)
    page = (repo_copy / "plots-page" / "index.html").read_text()
    assert "<script src" not in page and page.count("vegaEmbed(") >= 4
    assert '"color": {"field": "method"' in page and '"color": {"field": "weights"' in page


def _scalars(metrics):
    """A metrics file as DVC reads it: lists (intervals such as ci95) are not metrics to DVC."""
    if isinstance(metrics, dict):
        return {k: _scalars(v) for k, v in metrics.items() if not isinstance(v, list)}
    return metrics


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout
