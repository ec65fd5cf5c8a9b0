"""A test-only hook, outside params.yaml: one worker fails once after a given step, so tests can
check that Ray Train restarts the group and the run resumes from its newest checkpoint.

Set ``PICS_TRAIN_INJECT_FAILURE`` in the driver's environment, e.g.
``{"step": 3, "rank": 1, "mode": "exit"}`` (mode "raise": an exception; "exit": a killed process).
The driver reads it when the run starts and hands it to the workers with the plan.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks import atomic
from tasks.params import ParamsError

ENV = "PICS_TRAIN_INJECT_FAILURE"


class InjectedFailure(RuntimeError):
    """Raised once by the failure hook (mode "raise")."""


class FailureInjection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    step: int = Field(ge=1)  # fail after this training step
    rank: int = Field(0, ge=0)
    mode: Literal["raise", "exit"] = "raise"


def from_env(num_workers: int) -> FailureInjection | None:
    raw = os.environ.get(ENV)
    if not raw:
        return None
    try:
        failure = FailureInjection.model_validate_json(raw)
    except ValidationError as e:
        raise ParamsError(f"${ENV}={raw!r}: {e.errors()[0]['msg']} at {e.errors()[0]['loc']}") from None
    if failure.rank >= num_workers:
        raise ParamsError(f"${ENV}: rank {failure.rank} is not a rank of {num_workers} workers")
    return failure


def maybe_fail(failure: FailureInjection | None, step: int, rank: int, run_dir: Path) -> None:
    """Fail if this is the step and rank, the first time only (a flag file in the run remembers)."""
    if failure is None or step != failure.step or rank != failure.rank:
        return
    flag = run_dir / f".injected-failure-{failure.step}"
    if flag.exists():
        return
    atomic.write_bytes(flag, b"1")
    print(f"[train] injecting a failure on rank {rank} after step {step} ({failure.mode})", flush=True)
    if failure.mode == "exit":
        os._exit(3)  # a killed worker: no exception, no clean-up
    raise InjectedFailure(f"injected failure after step {step} on rank {rank}")
