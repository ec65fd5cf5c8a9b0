"""The quarantine table: every sample or object a stage could not use, with its reason.

A bad sample never stops a big run and never vanishes: the stage records it here and goes on.
One schema for every stage, so ``quarantine.parquet`` files can be concatenated and queried.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from tasks import atomic

SCHEMA = pa.schema(
    [
        ("stage", pa.string()),
        ("source", pa.string()),  # file the bad item came from (image path, annotation file, shard)
        ("image_id", pa.int64()),
        ("annotation_id", pa.int64()),
        ("item_key", pa.string()),  # sample id or object hash, where there is one
        ("reason", pa.string()),  # short machine-readable reason: missing_image, invalid_polygon, ...
        ("detail", pa.string()),  # human-readable detail: the exception text, the offending value
    ]
)


@dataclass(frozen=True)
class QuarantineRecord:
    stage: str
    reason: str
    detail: str = ""
    source: str = ""
    image_id: int | None = None
    annotation_id: int | None = None
    item_key: str = ""


def to_table(records: list[QuarantineRecord]) -> pa.Table:
    return pa.Table.from_pylist([asdict(r) for r in records], schema=SCHEMA)


def write(path: str | Path, records: list[QuarantineRecord]) -> Path:
    return atomic.write_parquet(path, to_table(records))


def counts(records: list[QuarantineRecord]) -> dict[str, int]:
    return dict(sorted(Counter(r.reason for r in records).items()))
