"""The whole pipeline as one flow: a DVC experiment whose ``-S`` overrides are the run's parameters.

``dvc repro`` and a deployment run share one code path: dvc.yaml calls the stage flows, and this
flow only asks DVC to run dvc.yaml as an experiment. Every deployment run therefore lands in
``dvc exp show`` with its params, metrics, data and checkpoint versions. DVC allows one command at
a time per repository, so runs queue on a file lock instead of failing on DVC's lock.

    pics pipeline --set decompose.area_ratio=0.05 --name my-exp
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from filelock import FileLock
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

import flows  # noqa: F401
from tasks.params import load_params, project_root

_EXP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def dvc_lock(repo: Path) -> FileLock:
    """The lock every DVC command of ours takes on ``repo`` (DVC's own lock fails instead of waiting)."""
    (repo / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    return FileLock(str(repo / ".dvc" / "tmp" / "pics-dvc.lock"))


def run_dvc(repo: Path, args: list[str], logger=None, timeout: float | None = None, echo: bool = False) -> str:
    """Run one DVC command under the repo lock, streaming its output to the logger (``echo``: to
    this process's stdout)."""
    cmd = [sys.executable, "-m", "dvc", *args]
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    # The stages call `pics <stage>`: this interpreter's bin (where its `pics` is) first on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    lines: list[str] = []
    with dvc_lock(repo):
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        start = time.monotonic()
        for line in proc.stdout:
            lines.append(line)
            if logger:
                logger.info(line.rstrip())
            if echo:
                print(line, end="", flush=True)
            if timeout and time.monotonic() - start > timeout:
                proc.kill()
                raise TimeoutError(f"dvc {' '.join(args)} ran past {timeout} s")
        rc = proc.wait()
    out = "".join(lines)
    if rc != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed with exit code {rc}:\n{out[-4000:]}")
    return out


def experiment_record(repo: Path, name: str) -> dict:
    """The experiment's params and metrics as ``dvc exp show --json`` reports them."""
    rows = json.loads(run_dvc(repo, ["exp", "show", "--json", "--no-fetch"]))
    for row in rows:
        for exp in row.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name") == name:
                    data = rev.get("data") or {}
                    return {
                        "rev": rev.get("rev"),
                        "params": {f: v.get("data", {}) for f, v in (data.get("params") or {}).items()},
                        "metrics": {f: v.get("data", {}) for f, v in (data.get("metrics") or {}).items()},
                    }
    raise LookupError(f"experiment {name!r} not found in `dvc exp show` of {repo}")


@flow(name="pipeline")
def pipeline_flow(
    overrides: list[str] | None = None,
    experiment_name: str | None = None,
    repo: str | None = None,
    temp: bool = True,
) -> dict:
    """Run make_sample -> decompose -> render_priors -> train -> evaluate as one DVC experiment.

    overrides: "section.key=value" strings, as every stage flow takes them, e.g. ["train.steps=50",
        "ray.address=auto"]; validated against the schema before DVC starts, then passed as `-S`.
    experiment_name: the DVC experiment's name (default: pipeline-<flow run id>).
    repo: the DVC repository (default: this checkout, or the working folder for an installed pics).
    temp: run in DVC's temporary workspace so the checkout's params.yaml is left alone.
    """
    logger = get_run_logger()
    repo_path = Path(repo).resolve() if repo else project_root()
    sets = list(overrides or [])
    load_params(repo_path / "params.yaml", sets)  # a bad key fails here, before any stage runs

    if experiment_name is None:
        from prefect.runtime import flow_run

        experiment_name = f"pipeline-{str(flow_run.id or 'local')[:8]}"
    if not _EXP_NAME.match(experiment_name):
        raise ValueError(f"experiment_name {experiment_name!r}: use letters, digits, '.', '_' and '-'")

    args = ["exp", "run", "--name", experiment_name]
    if temp:
        args.append("--temp")
    for s in sets:
        args += ["-S", s]
    logger.info("dvc %s", " ".join(args))
    run_dvc(repo_path, args, logger)
    record = experiment_record(repo_path, experiment_name)
    rows = [
        {"file": f, "metric": k, "value": v}
        for f, m in record["metrics"].items()
        for k, v in _flatten(m).items()
    ]
    create_table_artifact(rows or [{"file": "-", "metric": "-", "value": "-"}],
                          key="pipeline-metrics", description=f"DVC experiment {experiment_name}")
    return {"experiment": experiment_name, **record}


def _flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
