"""Checkpoint commit protocol and the per-rank loader: no Ray, no model, seconds."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tasks.train import checkpoint as ckpt
from tasks.train.data import DataError, ShardIndex, StepBatches, batch_rows, scan_shards
from pics_model.file_hashes import file_record
from tasks.train.state import find_resume


def _state(step: int, value: float = 1.0) -> ckpt.CheckpointState:
    return ckpt.CheckpointState(step=step, weights={"w": torch.full((3, 2), value), "b": torch.arange(4.0)},
                                trainer={"history": {"loss": [[step, value]]}, "rng": torch.get_rng_state()},
                                ema={"w": torch.full((3, 2), value / 2)})


def test_roundtrip_and_marker_written_last(tmp_path):
    d = ckpt.write_checkpoint(tmp_path / ckpt.checkpoint_name(7), _state(7, 2.5), meta={"final": False})
    marker = json.loads((d / ckpt.MARKER).read_text())
    assert marker["step"] == 7
    assert set(marker["files"]) == {ckpt.WEIGHTS, ckpt.STATE, ckpt.STATE_TENSORS, ckpt.EMA_WEIGHTS}
    # the marker is the newest file of the folder: everything it lists was complete before it
    newest = max(d.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == ckpt.MARKER
    s = ckpt.load_checkpoint(d)
    assert s.step == 7 and torch.equal(s.weights["w"], torch.full((3, 2), 2.5))
    assert torch.equal(s.ema["w"], torch.full((3, 2), 1.25)) and s.trainer["history"]["loss"] == [[7, 2.5]]


def test_folder_without_marker_is_ignored(tmp_path):
    ckpt.write_checkpoint(tmp_path / ckpt.checkpoint_name(10), _state(10))
    newer = ckpt.write_checkpoint(tmp_path / ckpt.checkpoint_name(20), _state(20))
    (newer / ckpt.MARKER).unlink()  # a writer killed before its commit
    assert ckpt.latest_committed(tmp_path).name == "step-00000010"
    with pytest.raises(ckpt.CheckpointError, match="not a committed checkpoint"):
        ckpt.load_checkpoint(newer)


def test_partial_copy_with_marker_is_ignored(tmp_path):
    """Ray copies checkpoint files in no set order: a marker beside a truncated file must not count."""
    ckpt.write_checkpoint(tmp_path / ckpt.checkpoint_name(10), _state(10))
    newer = ckpt.write_checkpoint(tmp_path / ckpt.checkpoint_name(20), _state(20))
    data = (newer / ckpt.WEIGHTS).read_bytes()
    (newer / ckpt.WEIGHTS).write_bytes(data[: len(data) // 2])
    assert ckpt.latest_committed(tmp_path).name == "step-00000010"
    (newer / ckpt.WEIGHTS).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit off
    assert ckpt.latest_committed(tmp_path).name == "step-00000010"


def test_load_names_the_file_that_differs_from_the_marker(tmp_path):
    d = ckpt.write_checkpoint(tmp_path / ckpt.checkpoint_name(20), _state(20))
    data = (d / ckpt.WEIGHTS).read_bytes()
    (d / ckpt.WEIGHTS).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit off
    with pytest.raises(ckpt.CheckpointError, match=f"{ckpt.WEIGHTS}: its sha256 differs.*delete the checkpoint"):
        ckpt.load_checkpoint(d)
    (d / ckpt.WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=f"{ckpt.WEIGHTS}: .* bytes.*truncated"):
        ckpt.load_checkpoint(d)


class _Payload:
    """Unpickling this creates the file ``flag``: proof that a pickle ran code."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


def _plant(d, name: str, data: bytes) -> None:
    """What someone with write access to the checkpoint storage can do: replace a file and
    rewrite the marker to match (the marker is no signature)."""
    (d / name).write_bytes(data)
    marker = json.loads((d / ckpt.MARKER).read_text())
    marker["files"][name] = file_record(d / name)
    (d / ckpt.MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("name", ["trainer_state.pt", ckpt.STATE, ckpt.STATE_TENSORS])
def test_pickled_trainer_state_is_refused_and_never_run(tmp_path, name):
    run = tmp_path / "run"
    d = ckpt.write_checkpoint(run / ckpt.checkpoint_name(30), _state(30))
    flag = tmp_path / "payload-ran"
    _plant(d, name, pickle.dumps({"step": 30, "history": _Payload(flag)}))
    with pytest.raises(ckpt.CheckpointError, match=name.replace(".", r"\.")):
        find_resume(None, run)  # what a (re)started worker does
    assert not flag.exists()


def test_prune_keeps_newest_k_and_drops_stale_uncommitted(tmp_path):
    for s in (10, 20, 30, 40):
        ckpt.write_checkpoint(tmp_path / ckpt.checkpoint_name(s), _state(s))
    stale = tmp_path / ckpt.checkpoint_name(25)
    stale.mkdir()
    inflight = tmp_path / ckpt.checkpoint_name(50)  # newer than every committed one: maybe being written
    inflight.mkdir()
    ckpt.prune(tmp_path, keep=2)
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["step-00000030", "step-00000040", "step-00000050"]
    assert ckpt.remove_uncommitted(tmp_path) == [inflight]
    assert ckpt.latest_committed(tmp_path).name == "step-00000040"


def test_nonempty_target_is_refused(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "junk").write_text("x")
    with pytest.raises(ckpt.CheckpointError, match="not empty"):
        ckpt.write_checkpoint(d, _state(1))


# -- the per-rank loader -----------------------------------------------------------------------

def _write_shards(d, n_train=22, n_test=5):
    d.mkdir(parents=True)
    rows = [{"sample_id": f"s{i}", "split": "train" if i < n_train else "test", "image_bytes": b"",
             "patches": [b""], "patch_masks": [b""], "boxes_expanded": [[0.0, 0.0, 1.0, 1.0]]}
            for i in range(n_train + n_test)]
    pq.write_table(pa.Table.from_pylist(rows[:13]), d / "part-000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[13:]), d / "part-001.parquet")


def test_ranks_see_disjoint_samples_and_resume_is_exact(tmp_path):
    _write_shards(tmp_path / "shards")
    index = scan_shards(tmp_path / "shards", "train")
    assert len(index) == 22 and len(scan_shards(tmp_path / "shards", "test")) == 5
    world, b = 2, 3  # 22 // 2 = 11 per rank -> 3 steps of 3 per epoch
    for step in range(6):
        seen = [set(batch_rows(index, step, r, world, b, seed=1)[1]) for r in range(world)]
        assert not (seen[0] & seen[1]) and all(len(s) == b for s in seen)
    epoch0 = [p for s in range(3) for r in range(world) for p in batch_rows(index, s, r, world, b, 1)[1]]
    assert len(set(epoch0)) == len(epoch0) == 18  # no repeats within an epoch
    assert batch_rows(index, 3, 0, world, b, 1)[0] == 1  # step 3 starts epoch 1

    def make_batch(rows, rngs):
        return [r["sample_id"] for r in rows], [float(g.random()) for g in rngs]

    full = list(StepBatches(index, make_batch, 0, 7, 1, world, b, seed=1))
    resumed = list(StepBatches(index, make_batch, 4, 7, 1, world, b, seed=1))
    assert resumed == full[4:]  # same samples and same augmentation draws after a restart
    # Two loader processes interleave back into step order. Run in a fresh interpreter: forking this
    # pytest process, which by now may hold Ray and Prefect threads, can kill the loader workers.
    script = (
        "import json, sys\n"
        "from tasks.train.data import StepBatches, scan_shards, step_loader\n"
        "def make_batch(rows, rngs):\n"
        "    return [r['sample_id'] for r in rows], [float(g.random()) for g in rngs]\n"
        "index = scan_shards(sys.argv[1], 'train')\n"
        "out = [[s, x] for s, x in step_loader(StepBatches(index, make_batch, 0, 7, 1, 2, 3, seed=1), 2)]\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "shards")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout.strip().splitlines()[-1])
    assert two == json.loads(json.dumps(full))


def test_scan_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="no \\*.parquet shards"):
        scan_shards(tmp_path, "train")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match="missing column"):
        scan_shards(tmp_path, "train")
    with pytest.raises(DataError, match="cannot fill one step"):
        batch_rows(ShardIndex(("f",), ((0, 0), (0, 1))), 0, 0, 2, 2, 0)
