"""No file we load can run code: every loader call in the project's Python source is one that
cannot unpickle. Read from the source (ast), so a new `torch.load` without ``weights_only=True``,
an ``np.load(..., allow_pickle=True)`` or a `pickle.load` anywhere fails here, not in a review.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pics_model", "tasks", "flows", "benchmarks", "docs", "tests")


def _keyword(call: ast.Call, name: str):
    """The constant value of keyword ``name`` in ``call`` (None when absent or not a constant)."""
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def _callee(call: ast.Call) -> str:
    f = call.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return f"{f.value.id}.{f.attr}"
    return f.id if isinstance(f, ast.Name) else ""


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """'line: call' for each call in ``source`` that could unpickle what it reads."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _callee(node)
        if name == "torch.load" and _keyword(node, "weights_only") is not True:
            found.append(f"{node.lineno}: torch.load without weights_only=True")
        elif name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") is True:
            found.append(f"{node.lineno}: np.load(allow_pickle=True)")
        elif name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load", "cloudpickle.load"):
            found.append(f"{node.lineno}: {name}")
    return found


def test_the_scan_finds_each_unsafe_loader():
    bad = ("torch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\n"
           "pickle.loads(b)\ntorch.load(p, weights_only=True)\nnp.load(p, allow_pickle=False)\n")
    assert [f.split(":")[0] for f in unsafe_loads(bad)] == ["1", "2", "3", "4"]


def test_no_loader_in_the_project_can_unpickle():
    files = [f for d in SOURCES for f in sorted((REPO_ROOT / d).rglob("*.py"))]
    assert len(files) > 50  # the scan sees the project
    problems = [f"{f.relative_to(REPO_ROOT)}:{p}" for f in files for p in unsafe_loads(f.read_text(), str(f))]
    assert not problems, "loaders that can run code from a file:\n" + "\n".join(problems)
