"""A per-rank sharded loader over the decompose (and render_priors) Parquet shards.

Every rank reads the same index of ``(shard file, row)`` for the training split. Each epoch the
index is permuted with a seed that depends only on (seed, epoch), then cut into ``world_size``
disjoint blocks of equal length, so ranks never see the same sample within an epoch and all ranks
take the same number of steps (DDP needs that). A step's batch is a pure function of
(seed, step, rank): augmentation draws from ``default_rng([seed, epoch, row])``. That makes resume
exact: a worker restarted at step ``k`` sees the batches an uninterrupted run would have seen.

Why not Ray Data: on 2 cores its map tasks compete with the two training workers for the same CPUs,
and its streaming split cannot resume mid-epoch at a given step. The per-rank loader fans decoding
out to ``torch.utils.data`` workers instead (``train.loader_workers``).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

SAMPLE_COLUMNS_REQUIRED = ("sample_id", "split", "image_bytes", "patches", "patch_masks", "boxes_expanded")


class DataError(ValueError):
    """The shards cannot feed this run (missing, empty, wrong schema, too few samples)."""


@dataclass(frozen=True)
class ShardIndex:
    """Rows of one split across the shard files, in a fixed order (file name, row)."""

    files: tuple[str, ...]
    rows: tuple[tuple[int, int], ...]  # (file index, row index in that file)

    def __len__(self) -> int:
        return len(self.rows)


def shard_files(directory: str | Path) -> list[Path]:
    d = Path(directory)
    files = sorted(p for p in d.glob("*.parquet") if not p.name.startswith("."))
    if not files:
        raise DataError(f"{d}: no *.parquet shards found (run the stage that writes them first)")
    return files


def scan_shards(directory: str | Path, split: str | None) -> ShardIndex:
    """Index the rows of ``split`` (None: all) by reading only the ``split`` column."""
    files = shard_files(directory)
    rows: list[tuple[int, int]] = []
    for i, f in enumerate(files):
        try:
            schema = pq.read_schema(f)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{f}: not a readable Parquet file: {e}") from e
        missing = [c for c in SAMPLE_COLUMNS_REQUIRED if c not in schema.names]
        if missing:
            raise DataError(f"{f}: not a sample shard, missing column(s) {', '.join(missing)}")
        splits = pq.read_table(f, columns=["split"]).column("split").to_pylist()
        rows += [(i, r) for r, s in enumerate(splits) if split is None or s == split]
    return ShardIndex(tuple(str(f) for f in files), tuple(rows))


class RowReader:
    """Random access to shard rows with a small LRU of decoded tables (shards are row-grouped
    files of a few hundred samples; one table in memory serves many consecutive reads)."""

    def __init__(self, files: tuple[str, ...], cache_files: int = 4):
        self.files = files
        self.cache_files = cache_files
        self._tables: OrderedDict[int, pa.Table] = OrderedDict()

    def row(self, file_index: int, row_index: int) -> dict[str, Any]:
        table = self._tables.get(file_index)
        if table is None:
            table = pq.read_table(self.files[file_index])
            self._tables[file_index] = table
            while len(self._tables) > self.cache_files:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(file_index)
        return table.slice(row_index, 1).to_pylist()[0]


def steps_per_epoch(n_samples: int, world_size: int, per_rank_batch: int) -> int:
    return (n_samples // world_size) // per_rank_batch


def batch_rows(index: ShardIndex, step: int, rank: int, world_size: int, per_rank_batch: int,
               seed: int) -> tuple[int, list[int]]:
    """(epoch, positions into ``index.rows``) of this rank's batch at ``step``."""
    spe = steps_per_epoch(len(index), world_size, per_rank_batch)
    if spe < 1:
        raise DataError(f"{len(index)} training samples cannot fill one step of {per_rank_batch} "
                        f"per worker x {world_size} workers")
    epoch, pos = divmod(step, spe)
    perm = np.random.default_rng([seed, epoch]).permutation(len(index))
    per_rank = len(index) // world_size
    mine = perm[rank * per_rank:(rank + 1) * per_rank]
    return epoch, [int(i) for i in mine[pos * per_rank_batch:(pos + 1) * per_rank_batch]]


class StepBatches(torch.utils.data.IterableDataset):
    """Yields ``(step, batch)`` for steps ``[start, stop)`` of one rank, in order.

    With ``torch.utils.data.DataLoader(num_workers=n, batch_size=None)``, loader worker ``w``
    builds steps ``w, w + n, ...``; the loader's round-robin over workers restores step order.
    ``make_batch(rows, rngs)`` turns decoded-row dicts into a collated batch.
    """

    def __init__(self, index: ShardIndex, make_batch: Callable[[list[dict], list[np.random.Generator]], Any],
                 start: int, stop: int, rank: int, world_size: int, per_rank_batch: int, seed: int,
                 cache_files: int = 4):
        super().__init__()
        self.index, self.make_batch = index, make_batch
        self.start, self.stop = start, stop
        self.rank, self.world_size, self.per_rank_batch, self.seed = rank, world_size, per_rank_batch, seed
        self.cache_files = cache_files

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        reader = RowReader(self.index.files, self.cache_files)
        for step in range(self.start + wid, self.stop, nw):
            epoch, positions = batch_rows(self.index, step, self.rank, self.world_size, self.per_rank_batch, self.seed)
            rows, rngs = [], []
            for p in positions:
                f, r = self.index.rows[p]
                rows.append(reader.row(f, r))
                rngs.append(np.random.default_rng([self.seed, epoch, p]))
            yield step, self.make_batch(rows, rngs)


def _as_is(x):
    return x


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A 63-bit seed per (run seed, step, rank, stream): noise independent of restarts."""
    h = hashlib.blake2b(f"{seed}/{step}/{rank}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def step_loader(dataset: StepBatches, num_workers: int = 0) -> torch.utils.data.DataLoader:
    # batch_size=None: the dataset yields whole batches; _as_is keeps them exactly as built
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_as_is,
                                       persistent_workers=False, prefetch_factor=2 if num_workers else None)
