"""Shared fixtures: the real fixtures folder, one Prefect test harness, one local Ray per session,
one torch thread for tiny-tensor modules, a repository copy for DVC."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tasks.runtime import configure_environment

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PICS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

configure_environment()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real fixtures not found at {SHARED_DATA} (set PICS_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server for the whole session (it takes 7-8 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_api_url(prefect_harness) -> str:
    """The session server's API URL, for the processes a test starts (`PREFECT_API_URL` in their
    environment): they report to it instead of starting a temporary server each (20-30 s apiece).
    A stage's own temporary server stays covered by test_killed_driver, the shared one of
    `pics repro` by test_shared_server."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def local_ray():
    """A local 2-CPU Ray shared by the tests that fan out work (2-4 s to start)."""
    from tasks.runtime import init_ray

    ray = init_ray(num_cpus=2, object_store_mb=300)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module of tiny-tensor tests (`pytestmark = pytest.mark.usefixtures(
    "one_torch_thread")`): OpenMP threads only add sync overhead and thrash on a loaded 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def repo_copy(tmp_path) -> Path:
    """A temporary copy of the repository (tracked files), git- and DVC-initialised, for dvc repro."""
    dst = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        src = REPO_ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    return dst


@pytest.fixture
def schema_defaults(tmp_path):
    """An empty params file: load_params gives the schema's defaults (a missing file is an error)."""
    path = tmp_path / "empty-params.yaml"
    path.write_text("")
    return path
