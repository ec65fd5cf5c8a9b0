"""Fan output shards out over Ray: one Ray task (one CPU) per shard, at most ``num_workers`` in flight.

The GL platform is bound when a process first imports OpenGL, so the remote function carries it
(and llvmpipe's thread count) in its ``runtime_env``: Ray then runs it in workers started with
those variables, never in a worker that already bound another platform. Workers write their
shards into the output folder (on a cluster: storage every node sees) and return small records.
"""
from __future__ import annotations

from tasks.render_priors.work import RenderContext, ShardWork, process_shard
from tasks.shards import run_bounded_on_ray

_REMOTES: dict = {}


def gl_env(params: dict) -> dict[str, str]:
    return {"PYOPENGL_PLATFORM": params["platform"], "LP_NUM_THREADS": str(params["gl_threads"])}


def remote_process_shard(params: dict):
    """``process_shard`` as a Ray remote function for this GL environment (created once)."""
    key = tuple(sorted(gl_env(params).items()))
    if key not in _REMOTES:
        import ray

        _REMOTES[key] = ray.remote(num_cpus=1, max_retries=1)(process_shard).options(
            runtime_env={"env_vars": gl_env(params)})
    return _REMOTES[key]


def run_on_ray(works: list[ShardWork], ctx: RenderContext, num_workers: int) -> list[dict]:
    """Process shards on the running Ray (no Prefect): the benchmark's fan-out; results in order."""
    return run_bounded_on_ray(remote_process_shard(ctx.params), works, ctx, num_workers)
