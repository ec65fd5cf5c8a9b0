"""The sharded-stage skeleton: plan -> process shard -> finalize -> publish.

decompose and render_priors are the same machine, and so is every sharded stage to come: the
driver plans the work as shards, one Ray task (one CPU) per shard writes that shard's parquet file
and then its small progress record into the output folder, and the driver merges the records into
``manifest.json`` and ``quarantine.parquet``. This module is that machine's plain half (no
Prefect); ``flows.sharded`` runs it as Prefect tasks on Ray, :func:`run_serial` in one process
(tests, the benchmarks' baseline). Both call the same stage functions, so they write the same bytes.

A new stage plugs in with a :class:`ShardedStage`, four functions of its own::

    STAGE = ShardedStage(
        name="my_stage",            # ownership marker, quarantine records; Prefect tasks "my-stage-*"
        prepare=pipeline.prepare,   # (*args) -> plan; driver: check inputs, claim the folder, resume, plan
        process_shard=work.process_shard,  # (work, ctx) -> record; one Ray worker: write one shard
        finalize=pipeline.finalize,  # (plan, results, wall_s) -> manifest; driver: merge the records
    )

``prepare`` returns a plan: any object with ``ctx`` (picklable; put once in Ray's object store and
handed to every shard) and ``pending`` (the shards to run in this run: picklable works, each with
a unique ``name``: subclasses of :class:`ShardWork`). It builds the plan from these helpers, in this
order::

    fp = fingerprint(params, NOT_IN_FINGERPRINT, ALGORITHM_VERSION, inputs_sha256=...)
    prepare_run_dir(out, fp, STAGE_NAME, extra_owned_files)   # refuse foreign folders; a new fp starts over
    done = resume(out, fp)                    # shard name -> progress record kept from a killed run
    pending = [w for w in all_works if w.name not in done]

``process_shard(work, ctx)`` does one shard with one core (``Timers`` splits its time), writes
``shards/<name>.parquet`` with :func:`write_shard` (atomic), then ``_progress/<name>.json`` with
:func:`write_progress`, and returns the record. A record holds at least ``shard`` (the name),
``fingerprint``, ``file`` (None when the shard had no rows), ``sha256`` and ``quarantine`` (a
list of ``tasks.quarantine.QuarantineRecord`` dicts); anything else the stage wants to count. A
shard is done when both files exist and agree (:func:`resume`), so a killed run loses only the
shards in flight. ``finalize(plan, results, wall_s)`` merges the kept and new records
(:func:`merge_records`), writes ``quarantine.parquet`` (``tasks.quarantine.write``) and
``manifest.json`` (``atomic.write_json``) and returns the manifest; ``wall_s`` is the seconds since
prepare started, for a stage that records its speed.

Workers write their shards themselves and return only the small record, so no data travels back
to the driver; on a cluster the output folder (and the inputs) must be on storage every node sees.
Randomness must come from the item (e.g. a generator seeded by an image id), never from the worker
or the order, so that a shard's bytes do not depend on who ran it.

Output folder of a sharded stage::

    .pics-stage.json             the owning stage (tasks.shards.claim_output)
    shards/<name>.parquet        the data, one file per shard that had rows
    _progress/<name>.json        per-shard record (written after the parquet)
    _progress/run.json           fingerprint of the run these shards belong to
    quarantine.parquet           every input the stage could not use, with its reason
    manifest.json                counts (they add up), params, shard list
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from pics_model.file_hashes import sha256_file
from tasks import atomic
from tasks.schema import SCHEMA_VERSION
from tasks.shards import claim_output

SHARDS_DIR = "shards"
PROGRESS_DIR = "_progress"
# What a sharded stage writes besides its shards and progress records.
RUN_FILES = {SHARDS_DIR, PROGRESS_DIR, "manifest.json", "quarantine.parquet"}


@dataclass(frozen=True)
class ShardedStage:
    """One sharded stage's own functions; see the module doc for what each must do."""

    name: str
    prepare: Callable[..., Any]
    process_shard: Callable[[Any, Any], dict]
    finalize: Callable[[Any, list[dict], float | None], dict]
    # ctx -> keyword arguments of Ray's ``.options()`` for the shard tasks (e.g. a runtime_env)
    ray_options: Callable[[Any], dict] | None = None

    @property
    def task_prefix(self) -> str:
        return self.name.replace("_", "-")


def shard_name(index: int, prefix: str = "shard") -> str:
    """A shard's name: the stem of its parquet file in ``shards/`` and of its progress record."""
    return f"{prefix}-{index:05d}"


@dataclass
class ShardWork:
    """One shard of a plan: a stage's work dataclass subclasses this, adds the shard's items and,
    for names other than ``shard-NNNNN``, sets ``prefix``."""

    index: int
    prefix: ClassVar[str] = "shard"

    @property
    def name(self) -> str:
        return shard_name(self.index, self.prefix)


def fingerprint(params: dict, not_in_fingerprint: set[str], algorithm: int, **inputs) -> str:
    """sha256 of what decides a shard's bytes: the parameters but the ``not_in_fingerprint`` ones
    (they change how, not what), the schema and algorithm versions, and ``inputs`` (input hashes)."""
    keyed = {k: v for k, v in params.items() if k not in not_in_fingerprint}
    blob = json.dumps({**inputs, "params": keyed, "schema": SCHEMA_VERSION, "algorithm": algorithm},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare_run_dir(out: Path, fingerprint: str, stage: str, owned: set[str]) -> None:
    """Make ``out`` ready for a sharded run with ``fingerprint``: refused unless ``stage`` owns it
    (``tasks.shards.claim_output``; ``owned``: the stage's files besides :data:`RUN_FILES`); then a
    previous run's shards, progress, manifest and quarantine go when its fingerprint differs
    (another run's outputs, or none), and temporary files of writers killed mid-write go always."""
    claim_output(out, stage, owned | RUN_FILES)
    run_file = out / PROGRESS_DIR / "run.json"
    previous = json.loads(run_file.read_text()).get("fingerprint") if run_file.is_file() else None
    if previous != fingerprint:
        for d in (SHARDS_DIR, PROGRESS_DIR):
            shutil.rmtree(out / d, ignore_errors=True)
        for f in ("manifest.json", "quarantine.parquet"):
            (out / f).unlink(missing_ok=True)
        atomic.write_json(run_file, {"fingerprint": fingerprint})
    for d in (out, out / SHARDS_DIR, out / PROGRESS_DIR):
        d.mkdir(parents=True, exist_ok=True)
        atomic.clean_tmp(d)


def kept_progress(out: Path, rec_path: Path, fingerprint: str) -> dict | None:
    """A finished shard's progress record, if the run that wrote it had the same fingerprint and
    the shard file it names is intact; otherwise None (the shard is done again)."""
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("fingerprint") != fingerprint:
        return None
    if rec.get("file"):
        f = out / rec["file"]
        if not f.is_file() or sha256_file(f) != rec.get("sha256"):
            return None
    return rec


def resume(out: Path, fingerprint: str) -> dict[str, dict]:
    """Shard name -> progress record of every shard an earlier run with ``fingerprint`` finished
    (after :func:`prepare_run_dir`). Records that do not hold, and shard files without a record
    (a worker killed between the two writes), are removed: those shards are done again."""
    done: dict[str, dict] = {}
    for rec_path in sorted((out / PROGRESS_DIR).glob("*.json")):
        if rec_path.name == "run.json":
            continue
        rec = kept_progress(out, rec_path, fingerprint)
        if rec is None:
            rec_path.unlink(missing_ok=True)
        else:
            done[rec["shard"]] = rec
    for f in (out / SHARDS_DIR).glob("*.parquet"):
        if f.stem not in done:
            f.unlink()
    return done


def write_shard(path: Path, table, **write_options) -> str:
    """Atomically write ``table`` as parquet (``pq.write_table`` options); returns its sha256."""
    return sha256_file(atomic.write_parquet(path, table, **write_options))


def write_progress(out: Path, record: dict) -> None:
    """The shard's progress record, written last: the shard counts as done once it exists."""
    atomic.write_json(Path(out) / PROGRESS_DIR / f"{record['shard']}.json", record)


def merge_records(out: Path, done: dict[str, dict], results: list[dict], names: list[str]) -> list[dict]:
    """Kept and new progress records of the shards ``names``, in that order; raises when one has none."""
    records = {**done, **{r["shard"]: r for r in results}}
    missing = [n for n in names if n not in records]
    if missing:
        raise RuntimeError(f"{out}: shards without a result: {missing[:5]}")
    return [records[n] for n in names]


def sum_timings(results: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: round(sum(r.get("timings", {}).get(k, 0.0) for r in results), 4) for k in keys}


class Timers:
    """Wall seconds per phase of a shard's work: ``with timers("encode"): ...``; totals in ``t``."""

    def __init__(self, keys: tuple[str, ...]):
        self.t = dict.fromkeys(keys, 0.0)

    @contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[key] += time.perf_counter() - t0


def run_serial(stage: ShardedStage, *args) -> tuple[Any, dict, list[dict]]:
    """The whole stage in this process, no Prefect and no Ray: (plan, manifest, new records)."""
    t0 = time.perf_counter()
    plan = stage.prepare(*args)
    results = [stage.process_shard(w, plan.ctx) for w in plan.pending]
    return plan, stage.finalize(plan, results, time.perf_counter() - t0), results


_REMOTES: dict = {}


def remote_process_shard(stage: ShardedStage, ctx):
    """``stage.process_shard`` as a Ray remote function (one CPU, one retry), made once per options."""
    options = stage.ray_options(ctx) if stage.ray_options else {}
    key = (stage.name, json.dumps(options, sort_keys=True))
    if key not in _REMOTES:
        import ray

        remote = ray.remote(num_cpus=1, max_retries=1)(stage.process_shard)
        _REMOTES[key] = remote.options(**options) if options else remote
    return _REMOTES[key]
