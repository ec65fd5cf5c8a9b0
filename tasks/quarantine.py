"""The quarantine table: every sample or object a stage could not use, with its reason.

A bad sample never stops a big run and never vanishes: the stage records it here and goes on.
One schema for every stage, so ``quarantine.parquet`` files can be concatenated and queried.
A run that quarantined every input of a kind, or more than its ``max_quarantine_fraction``, still
writes all its outputs, then fails (:func:`check_limit`) so that scripts and DVC notice.
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


# Exit status of a command whose run wrote its outputs but quarantined too much (2: bad usage or input).
LIMIT_EXIT_CODE = 3


class QuarantineLimitError(RuntimeError):
    """The run wrote all its outputs but quarantined too much of its input; the message is the summary."""


def summary(stage: str, tallies: dict[str, tuple[int, dict[str, int]]], top: int = 3) -> str:
    """``images: 99 of 100 quarantined (99.0%: missing_image 99); annotations: 0 of 412 quarantined``."""
    parts = []
    for what, (seen, by_reason) in tallies.items():
        n = sum(by_reason.values())
        line = f"{what}: {n} of {seen} quarantined"
        if n:
            reasons = sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
            line += f" ({100 * n / max(seen, 1):.1f}%: {', '.join(f'{r} {c}' for r, c in reasons)})"
        parts.append(line)
    return f"{stage}: " + "; ".join(parts)


def check_limit(stage: str, out: str | Path, tallies: dict[str, tuple[int, dict[str, int]]], max_fraction: float,
                param: str) -> str:
    """The run's summary; raises :class:`QuarantineLimitError` with it when, for any kind of input
    (``tallies``: kind -> (seen, quarantined by reason)), every one or more than ``max_fraction`` of
    them was quarantined. Call it after the outputs are written: they stay, for the post-mortem."""
    text = summary(stage, tallies)
    over = [what for what, (seen, by_reason) in tallies.items()
            if seen and (sum(by_reason.values()) == seen or sum(by_reason.values()) / seen > max_fraction)]
    if over:
        raise QuarantineLimitError(
            f"{text}\nquarantined more {' and '.join(over)} than {param} = {max_fraction} allows "
            f"(or all of them); outputs written to {out} (manifest.json, quarantine.parquet)")
    return text
