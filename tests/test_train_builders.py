"""The training builders without Ray: the learning-rate schedule (diffusers' get_scheduler) against
the values of the hand-written schedule it replaced, and the failure hook kept out of params.yaml."""
from __future__ import annotations

import json

import pytest
import torch

from tasks.params import ParamsError, TrainParams
from tasks.train.builders import build_optimizer, build_scheduler


def _lrs(t: TrainParams, resume_at: int | None = None) -> list[float]:
    """The learning rate of each of ``t.steps`` updates (as a multiple of train.lr); with
    ``resume_at``, the schedule is rebuilt from its state dict after that many updates."""
    param = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([param], t)
    sched = build_scheduler(opt, t)
    out = []
    for step in range(t.steps):
        if step == resume_at:  # built anew, then loaded, as tasks.train.state.restore does
            opt2 = build_optimizer([param], t)
            sched2 = build_scheduler(opt2, t)
            opt2.load_state_dict(opt.state_dict())
            sched2.load_state_dict(sched.state_dict())
            opt, sched = opt2, sched2
        out.append(opt.param_groups[0]["lr"] / t.lr)
        opt.step()
        sched.step()
    return out


# The replaced lambda, (step + 1) / warmup during the warm-up and 1 after it, gave these for
# warmup_steps=3, steps=8:
OLD_CONSTANT = [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_constant_schedule_matches_the_replaced_one():
    t = TrainParams(steps=8, warmup_steps=3, lr=1e-3, lr_schedule="constant")
    assert _lrs(t) == pytest.approx(OLD_CONSTANT, abs=1e-12)
    assert _lrs(t, resume_at=2) == pytest.approx(OLD_CONSTANT, abs=1e-12)  # a resumed run continues it
    assert _lrs(t.model_copy(update={"warmup_steps": 0})) == [1.0] * 8


def test_cosine_schedule_warms_up_as_before_and_never_runs_at_zero():
    """The warm-up is the replaced schedule's (1/3, 2/3, 1). The decay is diffusers' cosine: it
    starts right after the peak, where the replaced lambda held the peak for one more update
    (1.0, 1.0, 0.950, 0.812, ...), and no update runs at learning rate 0 at either end."""
    t = TrainParams(steps=10, warmup_steps=3, lr=1e-3, lr_schedule="cosine")
    expected = [1 / 3, 2 / 3, 1.0, 0.961940, 0.853553, 0.691342, 0.5, 0.308658, 0.146447, 0.038060]
    assert _lrs(t) == pytest.approx(expected, abs=1e-6)
    assert _lrs(t, resume_at=5) == pytest.approx(expected, abs=1e-6)


def test_failure_hook_is_not_a_parameter(monkeypatch):
    from tasks.train.fault_injection import ENV, FailureInjection, from_env

    assert not {"fail_at_step", "fail_rank", "fail_mode"} & set(TrainParams.model_fields)
    monkeypatch.delenv(ENV, raising=False)
    assert from_env(num_workers=2) is None
    monkeypatch.setenv(ENV, json.dumps({"step": 3, "rank": 1, "mode": "exit"}))
    assert from_env(num_workers=2) == FailureInjection(step=3, rank=1, mode="exit")
    with pytest.raises(ParamsError, match=rf"\${ENV}: rank 1 is not a rank of 1 workers"):
        from_env(num_workers=1)
    monkeypatch.setenv(ENV, json.dumps({"step": 3, "mode": "crash"}))
    with pytest.raises(ParamsError, match=rf"\${ENV}=.*mode"):
        from_env(num_workers=2)
