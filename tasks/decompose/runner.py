"""Fan shards out over Ray: one Ray task (one CPU) per shard, at most ``num_workers`` in flight.

Workers write their shard into the output folder themselves and return only the small progress
record, so no sample bytes travel back to the driver. On a cluster the output folder must be on
storage that every node sees (the same goes for the image root).
"""
from __future__ import annotations

from tasks.decompose.shard import ShardContext, ShardWork, process_shard
from tasks.shards import run_bounded_on_ray

_REMOTE = None


def remote_process_shard():
    """``process_shard`` as a Ray remote function (created once, after Ray is up)."""
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(num_cpus=1, max_retries=1)(process_shard)
    return _REMOTE


def run_on_ray(works: list[ShardWork], ctx: ShardContext, num_workers: int) -> list[dict]:
    """Process shards on the running Ray (no Prefect): used by the benchmark; results in shard order."""
    return run_bounded_on_ray(remote_process_shard(), works, ctx, num_workers)
