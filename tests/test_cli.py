"""`pics` validates its parameters before it imports Prefect or Ray, and it is the one entry point."""
from __future__ import annotations

import os
import subprocess
import sys

import yaml

from tests.conftest import REPO_ROOT

# The CLI in a fresh interpreter; at exit it prints which heavy packages were imported.
_RUN_CLI = """
import atexit, sys
atexit.register(lambda: print(sorted(m for m in ("prefect", "ray", "torch") if m in sys.modules)))
from flows.cli import app
app(sys.argv[1:], prog_name="pics")
"""


def _pics(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-c", _RUN_CLI, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_bad_set_key_is_one_line_and_exit_2_before_prefect_or_ray_is_imported(tmp_path):
    """Old code: a Prefect server started first, then a 26-line traceback named params.yaml, three times."""
    r = _pics("train", "--set", "train.steps=5", "--set", "train.lrr=0.1")
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == ["--set train.lrr=0.1: train.lrr: unknown key"]
    assert r.stdout.strip() == "[]"  # neither prefect, ray nor torch imported

    bad = tmp_path / "params.yaml"
    bad.write_text("evaluate:\n  steps: 0\n")
    r = _pics("evaluate", "--params", str(bad))
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"{bad}: evaluate.steps: Input should be greater than or equal to 1")
    assert r.stdout.strip() == "[]"


def test_dvc_stages_run_pics_commands():
    """Old code: `python -m flows.<stage>`, argparse mains beside the CLI."""
    from typer.main import get_command

    from flows.cli import app

    commands = set(get_command(app).commands)
    for name, stage in yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"].items():
        prog, command = stage["cmd"].split()
        assert prog == "pics" and command in commands, (name, stage["cmd"])
    assert not [f.name for f in (REPO_ROOT / "flows").glob("*.py") if "argparse" in f.read_text()]


def test_the_project_is_the_working_folder_that_holds_params_yaml(tmp_path):
    """Old code: the checkout of the code, so `pics <stage>` in dvc.yaml, run in a copy of the
    repository (`dvc exp run --temp`, the dvc tests), read and wrote the original checkout."""
    (tmp_path / "params.yaml").write_text("ray:\n  num_cpus: 1\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    code = "from tasks.params import resolve_path; print(resolve_path('data/sample'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == str(tmp_path / "data" / "sample")
