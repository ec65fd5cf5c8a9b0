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


def _run(cmd: list[str], cwd: Path, timeout: float = 900) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
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
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "snapshot"]):
        subprocess.run(cmd, cwd=repo_copy, check=True)

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

    # Everything is up to date now. (`dvc exp run -S decompose.area_ratio=0.05` is exercised through the
    # pipeline deployment in test_operations.py, which runs exactly that command.)
    status = _run([sys.executable, "-m", "dvc", "status"], repo_copy)
    assert "changed" not in status
