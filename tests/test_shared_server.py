"""`pics repro` / `pics pipeline`: one Prefect server for every stage process DVC starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tasks.runtime import shared_prefect_server
from tests.shrink import SHRUNK_OVERRIDES


_SCRIPT = """
import json, os, subprocess, sys
import httpx
from tasks.runtime import shared_prefect_server
out, sets = sys.argv[1], sys.argv[2:]
with shared_prefect_server() as url:
    health = httpx.get(f"{url}/health").status_code
    r = subprocess.run([sys.executable, "-m", "flows.cli", "make-sample", "--out", out, *sets],
                       capture_output=True, text=True, timeout=600)
    runs = httpx.post(f"{url}/flow_runs/filter", json={}).json()
try:
    httpx.get(f"{url}/health")
    stopped = False
except httpx.ConnectError:
    stopped = True
print(json.dumps({"health": health, "rc": r.returncode, "log": r.stdout + r.stderr, "stopped": stopped,
                  "states": [run["state_type"] for run in runs], "left": os.environ.get("PREFECT_API_URL")}))
"""


@pytest.mark.slow
def test_stage_processes_report_to_the_shared_server_instead_of_starting_their_own(tmp_path):
    """Old code: each stage process started a temporary server of its own (~20-30 s a stage).
    Run in a subprocess: Prefect caches its settings per process, so a server URL exported here
    would outlive the server for later tests."""
    sets = [f"--set=make_sample.{k.split('.', 1)[1]}={v}" for k, v in SHRUNK_OVERRIDES.items()
            if k.startswith("make_sample.")]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "s"), *sets], capture_output=True, text=True,
                       timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["health"] == 200 and res["rc"] == 0, res["log"][-2000:]
    assert "Starting temporary server" not in res["log"]
    assert "COMPLETED" in res["states"]  # the stage's flow run is on the shared server
    assert res["stopped"] and res["left"] is None


def test_a_configured_server_wins(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with shared_prefect_server() as url:
        assert url == "http://127.0.0.1:9/api"
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:9/api"
