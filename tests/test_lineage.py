"""Lineage: every project module a stage's flow can import is a dependency of that stage in
dvc.yaml, so editing it makes `dvc repro` rerun the stage (coarse folder deps cover their files).

The imports are read from the source (every `import` statement, also those inside functions:
stage code imports heavy modules lazily, where a `sys.modules` snapshot after importing the flow
would not see them), followed transitively through the project's own modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> Path | None:
    """The project file of a dotted module name (None for third-party and stdlib modules)."""
    base = REPO_ROOT.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imported_names(path: Path) -> set[str]:
    """Dotted names of every module ``path`` imports, with each parent package (Python runs it)."""
    package = path.relative_to(REPO_ROOT).parent.parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package[:len(package) - node.level + 1] if node.level else ()
            base = ".".join((*parts, *(node.module.split(".") if node.module else ())))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}


def project_imports(entry: Path) -> set[str]:
    """Repo-relative paths of the project files ``entry`` imports, directly or through others."""
    seen, todo = set(), [entry]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(m for m in map(_module_file, _imported_names(f)) if m is not None)
    return {f.relative_to(REPO_ROOT).as_posix() for f in seen}


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_imports_is_a_dependency(stage):
    flow = REPO_ROOT / "flows" / f"{stage}.py"
    assert flow.is_file(), f"dvc.yaml stage {stage!r} has no flow module {flow}"
    missing = sorted(p for p in project_imports(flow) if not _covered(p, STAGES[stage]["deps"]))
    assert not missing, f"dvc.yaml: stage {stage!r} imports {missing} but does not list them in deps"


def test_the_import_walk_sees_lazy_imports_inside_functions():
    """The layout flow imports its report module only inside the flow function: the walk must still find it."""
    assert "tasks/layout/report.py" in project_imports(REPO_ROOT / "flows" / "layout.py")


def test_evaluate_reads_only_what_train_declares():
    """The untrained baseline (train's init model) is a train output, so `dvc pull` brings it."""
    train_outs = {next(iter(o)) if isinstance(o, dict) else o for o in STAGES["train"]["outs"]}
    assert "data/train/init" in train_outs and "data/train/init" in STAGES["evaluate"]["deps"]
