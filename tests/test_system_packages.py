"""system-packages.txt names every Debian package the project uses, so a green run on a machine
with packages installed by hand cannot hide a missing install step: each shared library that a
render, a report plot and the stages' imports load must come from a listed package, from its
dependencies, from the Python interpreter's own extension modules, or from the venv's wheels."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import os, sys
    import cv2, matplotlib, pyarrow.parquet, pycocotools.mask, skimage, torch, trimesh
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pics_model.geometry import get_renderer
    get_renderer(resolution=32, num_views=1, elevation_deg=15.0).render(trimesh.creation.icosphere())
    plt.figure().savefig(sys.argv[1])
    for line in open("/proc/self/maps"):
        path = line.split(maxsplit=5)[-1].strip()
        if ".so" in path:
            print(os.path.realpath(path))
""")


def listed_packages() -> list[str]:
    lines = (REPO_ROOT / "system-packages.txt").read_text().splitlines()
    return [name for line in lines for name in line.split("#")[0].split()]


def test_readme_names_every_system_package():
    readme = (REPO_ROOT / "README.md").read_text()
    assert [p for p in listed_packages() if f"`{p}`" not in readme] == []


def _dependency_closure(packages: list[str]) -> set[str]:
    out = subprocess.run(["apt-cache", "depends", "--recurse", "--installed", "--no-recommends", "--no-suggests",
                          "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *packages],
                         capture_output=True, text=True, check=True).stdout
    return {line.split(":")[0] for line in out.splitlines() if line and not line.startswith((" ", "<"))}


def _interpreter_libraries() -> set[str]:
    """Libraries the interpreter's own extension modules link (a pyenv build links Tk, OpenSSL, ...)."""
    dynload = Path(os.__file__).parent / "lib-dynload"  # the base interpreter's, also in a venv
    modules = [str(p) for p in dynload.glob("*.so")] + [os.path.realpath(sys.executable)]
    out = subprocess.run(["ldd", *modules], capture_output=True, text=True).stdout
    return {os.path.realpath(m) for m in re.findall(r"=> (/\S+)", out)}


def _owners(libraries: set[str]) -> dict[str, str]:
    """library -> its Debian package ('' for a file no package owns); dpkg may record /lib for /usr/lib."""
    aliases = {path: lib for lib in libraries for path in (lib, re.sub(r"^/usr/lib/", "/lib/", lib))}
    out = subprocess.run(["dpkg", "-S", *aliases], capture_output=True, text=True).stdout
    owners = dict.fromkeys(libraries, "")
    for line in out.splitlines():
        packages, _, path = line.rpartition(": ")
        if path in aliases and not line.startswith("diversion"):
            owners[aliases[path]] = packages.split(":")[0]
    return owners


@pytest.mark.skipif(not all(shutil.which(t) for t in ("dpkg", "apt-cache", "ldd")), reason="not a Debian system")
def test_loaded_system_libraries_come_from_listed_packages(tmp_path):
    res = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "plot.png")], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    own = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
    system = {lib for lib in res.stdout.split() if not lib.startswith(tuple(own))} - _interpreter_libraries()
    allowed = _dependency_closure(listed_packages())
    unlisted = {lib: pkg for lib, pkg in _owners(system).items() if pkg not in allowed}
    assert unlisted == {}, "add these packages to system-packages.txt (or stop using them)"
