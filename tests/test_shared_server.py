"""`pics repro` / `pics pipeline`: one Prefect server for every stage process DVC starts."""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tasks.runtime import shared_prefect_server
from tests.shrink import SHRUNK_OVERRIDES


@pytest.mark.slow
def test_stage_processes_report_to_the_shared_server_instead_of_starting_their_own(tmp_path, monkeypatch):
    """Old code: each stage process started a temporary server of its own (~20-30 s a stage)."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    sets = [f"--set=make_sample.{k.split('.', 1)[1]}={v}" for k, v in SHRUNK_OVERRIDES.items()
            if k.startswith("make_sample.")]
    with shared_prefect_server() as url:
        assert os.environ["PREFECT_API_URL"] == url
        assert httpx.get(f"{url}/health").status_code == 200
        r = subprocess.run([sys.executable, "-m", "flows.cli", "make-sample", "--out", str(tmp_path / "s"), *sets],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "Starting temporary server" not in r.stdout + r.stderr
        runs = httpx.post(f"{url}/flow_runs/filter", json={}).json()
        assert any(run["state_type"] == "COMPLETED" for run in runs)  # the stage's flow run is on this server
    assert "PREFECT_API_URL" not in os.environ
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")


def test_a_configured_server_wins(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with shared_prefect_server() as url:
        assert url == "http://127.0.0.1:9/api"
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:9/api"
