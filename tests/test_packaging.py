"""pyproject.toml declares what requirements.txt pins, and an installed (non-editable) pics works
from the working folder without writing beside its own code."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[1]


def _requirements(lines: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]
    return {canonicalize_name(r.name): r for r in reqs}


def test_pyproject_declares_the_requirements_the_lock_satisfies():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirements(project["dependencies"] + project["optional-dependencies"]["test"])
    pinned = _requirements((REPO_ROOT / "requirements.txt").read_text().splitlines())
    assert {k: str(r) for k, r in declared.items()} == {k: str(r) for k, r in pinned.items()}
    assert str(declared["torch"].specifier) == "==2.13.0"  # never an open-ended (multi-GB) torch
    locked = {canonicalize_name(n): v for n, _, v in
              (line.partition("==") for line in (REPO_ROOT / "requirements.lock").read_text().splitlines())}
    for name, req in declared.items():
        assert req.specifier.contains(locked[name], prereleases=True), f"lock's {name}=={locked[name]} breaks {req}"


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.slow
def test_installed_pics_reads_params_from_the_working_folder(repo_copy, tmp_path, prefect_api_url):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(repo_copy)],
                   check=True, timeout=300)
    installed = _files(site)
    # A clean environment: this process's PREFECT_HOME etc. point into the checkout.
    # The session's Prefect server: no temporary one (20-30 s; test_killed_driver covers that path).
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)),
           "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1", "PREFECT_API_URL": prefect_api_url}
    where = subprocess.run([sys.executable, "-c", "import flows; print(flows.__file__)"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where  # not the checkout's editable install
    pics = [str(site / "bin" / "pics"), "make-sample", "--num-images", "2"]

    empty = tmp_path / "empty"
    empty.mkdir()
    res = subprocess.run(pics, cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"{empty / 'params.yaml'}: not found" in res.stderr

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(repo_copy / "params.yaml", project)
    res = subprocess.run(pics, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (project / "data/sample/annotations.json").is_file()
    assert _files(site) == installed
