"""The sharded-stage skeleton with a stage of its own: a new stage plugs in with a plan and a
per-shard function, and gets resume, ownership and the manifest merge for free."""
from __future__ import annotations

import ast
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from tasks import atomic, sharded_stage
from tasks.sharded_stage import SHARDS_DIR, ShardedStage
from tasks.shards import OutputNotOwnedError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Work:
    index: int
    words: list[str]

    @property
    def name(self) -> str:
        return f"words-{self.index:05d}"


@dataclass
class Plan:
    ctx: dict
    works: list[Work]
    pending: list[Work]
    done: dict[str, dict]


def prepare(params: dict, words: list[str], out: str) -> Plan:
    out = Path(out)
    fp = sharded_stage.fingerprint(params, {"out"}, 1, words=words)
    sharded_stage.prepare_run_dir(out, fp, "word_lengths", set())
    done = sharded_stage.resume(out, fp)
    size = params["shard_size"]
    works = [Work(i, words[k:k + size]) for i, k in enumerate(range(0, len(words), size))]
    return Plan({"out": str(out), "fingerprint": fp}, works, [w for w in works if w.name not in done], done)


def process_shard(work: Work, ctx: dict) -> dict:
    out = Path(ctx["out"])
    rows = [{"word": w, "length": len(w)} for w in work.words if w.isalpha()]
    bad = [{"item_key": w, "reason": "not_a_word"} for w in work.words if not w.isalpha()]
    path = out / SHARDS_DIR / f"{work.name}.parquet"
    record = {"shard": work.name, "fingerprint": ctx["fingerprint"], "file": None, "sha256": None,
              "quarantine": bad, "rows": len(rows)}
    if rows:
        record["sha256"] = sharded_stage.write_shard(path, pa.Table.from_pylist(rows))
        record["file"] = f"{SHARDS_DIR}/{path.name}"
    sharded_stage.write_progress(out, record)
    return record


def finalize(plan: Plan, results: list[dict], wall_s: float | None) -> dict:
    out = Path(plan.ctx["out"])
    records = sharded_stage.merge_records(out, plan.done, results, [w.name for w in plan.works])
    manifest = {"rows": sum(r["rows"] for r in records),
                "quarantined": dict(Counter(q["reason"] for r in records for q in r["quarantine"]))}
    atomic.write_json(out / "manifest.json", manifest)
    return manifest


WORD_LENGTHS = ShardedStage("word_lengths", prepare, process_shard, finalize)
WORDS = ["alpha", "beta", "x1", "gamma", "delta", "", "epsilon", "zeta"]


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / SHARDS_DIR).glob("*.parquet"))}


def test_new_stage_plugs_in_and_resumes(tmp_path):
    out = tmp_path / "out"
    params = {"shard_size": 3, "out": str(out)}
    plan, manifest, results = sharded_stage.run_serial(WORD_LENGTHS, params, WORDS, str(out))
    assert len(results) == 3 and manifest == {"rows": 6, "quarantined": {"not_a_word": 2}}
    assert json.loads((out / ".pics-stage.json").read_text()) == {"stage": "word_lengths"}
    first = _shard_bytes(out)

    # Nothing left to do: every shard is kept.
    _, again, results = sharded_stage.run_serial(WORD_LENGTHS, params, WORDS, str(out))
    assert results == [] and again == manifest

    # A worker killed between its two writes: the shard without a record is done again, alone.
    (out / "_progress" / "words-00001.json").unlink()
    _, resumed, results = sharded_stage.run_serial(WORD_LENGTHS, params, WORDS, str(out))
    assert [r["shard"] for r in results] == ["words-00001"] and resumed == manifest
    assert _shard_bytes(out) == first

    # A corrupted shard fails its recorded sha256 and is done again.
    (out / SHARDS_DIR / "words-00000.parquet").write_bytes(b"garbage")
    _, _, results = sharded_stage.run_serial(WORD_LENGTHS, params, WORDS, str(out))
    assert [r["shard"] for r in results] == ["words-00000"] and _shard_bytes(out) == first

    # Other parameters: another fingerprint, so everything is done again.
    _, _, results = sharded_stage.run_serial(WORD_LENGTHS, {**params, "shard_size": 4}, WORDS, str(out))
    assert len(results) == 2 and len(_shard_bytes(out)) == 2


def test_new_stage_refuses_a_folder_it_does_not_own(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputNotOwnedError, match="not marked as an output folder of word_lengths"):
        sharded_stage.run_serial(WORD_LENGTHS, {"shard_size": 3}, WORDS, str(out))
    assert (out / "notes.txt").read_text() == "mine"


def test_evaluate_does_not_import_training_internals():
    """evaluate reads priors and decodes views through shared modules, not through tasks.train."""
    offenders = []
    for f in sorted((REPO / "tasks" / "evaluate").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{f.name}: {n}" for n in names if n == "tasks.train" or n.startswith("tasks.train.")]
    assert offenders == []
