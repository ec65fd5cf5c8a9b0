"""The decompose flows end to end: Prefect test harness, local Ray, resume after a real kill, CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks import shards
from tasks.decompose.pipeline import run_serial
from tasks.decompose.synthetic import write_synthetic_lvis
from tasks.params import DecomposeParams, load_params

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_lvis(tmp_path_factory.mktemp("synth"), n_images=30, width=320, height=240, seed=11)


@pytest.fixture()
def params_file(tmp_path) -> str:
    """A params file of our own: the repository's params.yaml may be mid-edit by another stage."""
    f = tmp_path / "params.yaml"
    f.write_text("ray:\n  num_cpus: 2\n")
    return str(f)


def _overrides(ann, img, out, **kw) -> list[str]:
    items = {"annotations": ann, "images": img, "out": out, "shard_size": 8, "grid_samples": 4, **kw}
    return [f"decompose.{k}={v}" for k, v in items.items()]


def _files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in shards.list_shards(out)}


def test_flow_on_ray_matches_serial_and_resumes(prefect_harness, local_ray, synth, tmp_path, params_file):
    from prefect.artifacts import Artifact

    from flows.decompose import decompose_flow

    ann, img = synth
    out = tmp_path / "flow"
    res = decompose_flow(params=load_params(params_file, _overrides(ann, img, out)))
    assert res["shards_run"] == 4 and res["shards_kept"] == 0
    assert res["images_seen"] == 30 and res["samples"] > 10
    assert set(res["timings_s"]) == {"decode", "masks", "crops", "encode", "write"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["content_hash"] == res["content_hash"] == shards.content_hash(out)
    assert (out / "quarantine.parquet").is_file()
    assert (out / "samples.png").is_file() and (out / "samples.html").is_file()

    # Ray workers, in whatever order they finished, wrote exactly what one process writes.
    p = DecomposeParams(annotations=str(ann), images=str(img), out=str(tmp_path / "serial"), shard_size=8,
                        grid_samples=4)
    run_serial(p, ann, img, tmp_path / "serial")
    assert _files(out) == _files(tmp_path / "serial")

    art = Artifact.get("decompose-samples")
    assert art and "data:image/jpeg;base64," in art.data and f"| samples | {res['samples']} |" in art.data

    again = decompose_flow(params=load_params(params_file, _overrides(ann, img, out)))
    assert again["shards_run"] == 0 and again["shards_kept"] == 4
    assert again["content_hash"] == res["content_hash"]


def test_flow_fails_at_once_on_malformed_input(prefect_harness, synth, tmp_path, params_file):
    from typer.testing import CliRunner

    from flows.cli import app

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "width": 10}], "annotations": [], "categories": []}))
    r = CliRunner().invoke(app, ["decompose", "--annotations", str(bad), "--images", str(synth[1]),
                                 "--out", str(tmp_path / "out"), "--params", params_file])
    assert r.exit_code == 2
    assert str(bad) in r.output and "images[0].height" in r.output
    r = CliRunner().invoke(app, ["decompose", "--annotations", str(synth[0]), "--images", str(tmp_path / "none"),
                                 "--out", str(tmp_path / "out"), "--params", params_file])
    assert r.exit_code == 2 and "image root" in r.output


def test_import_webdataset_flow(prefect_harness, tmp_path, params_file):
    from flows.decompose import import_webdataset_flow
    from tasks.decompose.synthetic import write_reference_tar

    tars = []
    for k in range(2):  # one name in two folders
        tars.append(tmp_path / f"part{k}" / "lvis-000000.tar")
        tars[-1].parent.mkdir()
        write_reference_tar(tars[-1], n_good=2, seed=k)
    sets = ["decompose.grid_samples=2", "decompose.max_quarantine_fraction=0.5"]  # one sample in three is bad
    res = import_webdataset_flow(tars=[str(t) for t in tars], out=str(tmp_path / "out"),
                                 params=load_params(params_file, sets))
    assert res["samples"] == 4 and res["quarantined"] == {"missing_member": 2}
    assert len(shards.list_shards(tmp_path / "out")) == 2 and (tmp_path / "out" / "samples.png").is_file()
    ids = [r["sample_id"] for r in shards.iter_rows(tmp_path / "out", columns=["sample_id"])]
    assert len(set(ids)) == 4


def test_too_much_quarantined_writes_outputs_then_exits_3(prefect_harness, local_ray, tmp_path, params_file):
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.decompose.synthetic import rect, write_dataset, write_reference_tar

    pair = [{"segmentation": rect(10, 10, 60, 60)}, {"segmentation": rect(50, 50, 100, 80)}]
    ann, root = write_dataset(tmp_path / "ds", [{"id": i, "width": 120, "height": 90, "objects": pair, "file": i > 2}
                                                for i in range(1, 6)])  # images 1 and 2 missing: 40 %
    cmd = ["decompose", "--annotations", str(ann), "--images", str(root), "--params", params_file,
           "--set", "decompose.grid_samples=0"]
    r = CliRunner().invoke(app, [*cmd, "--out", str(tmp_path / "some")])
    assert r.exit_code == 3, r.output
    assert "images: 2 of 5 quarantined (40.0%: missing_image 2)" in r.output
    assert "decompose.max_quarantine_fraction = 0.1" in r.output
    m = json.loads((tmp_path / "some" / "manifest.json").read_text())  # everything written all the same
    assert m["quarantined"] == {"missing_image": 2} and m["images_with_pair"] == 3
    assert pq.read_table(tmp_path / "some" / "quarantine.parquet").num_rows == 2
    assert m["content_hash"] == shards.content_hash(tmp_path / "some") and len(shards.list_shards(tmp_path / "some"))
    r = CliRunner().invoke(app, [*cmd, "--out", str(tmp_path / "ok"), "--set", "decompose.max_quarantine_fraction=0.5"])
    assert r.exit_code == 0, r.output

    for f in root.iterdir():  # every image gone: a failure at any fraction
        f.unlink()
    r = CliRunner().invoke(app, [*cmd, "--out", str(tmp_path / "none"), "--set", "decompose.max_quarantine_fraction=1.0"])
    assert r.exit_code == 3, r.output
    assert json.loads((tmp_path / "none" / "manifest.json").read_text())["quarantined"] == {"missing_image": 5}

    tar = tmp_path / "lvis-000000.tar"
    write_reference_tar(tar, n_good=0)  # its one sample lacks mask1.png
    r = CliRunner().invoke(app, ["import-webdataset", str(tar), "--out", str(tmp_path / "wds"), "--params", params_file,
                                 "--set", "decompose.max_quarantine_fraction=1.0"])
    assert r.exit_code == 3 and "samples: 1 of 1 quarantined (100.0%: missing_member 1)" in r.output
    assert (tmp_path / "wds" / "manifest.json").is_file() and (tmp_path / "wds" / "quarantine.parquet").is_file()


_KILLABLE = """
import sys
from tasks.decompose.pipeline import run_serial
from tasks.params import DecomposeParams, load_params
p = DecomposeParams(shard_size=1, grid_samples=0)
run_serial(p, sys.argv[1], sys.argv[2], sys.argv[3])
"""


def test_killed_run_exposes_no_partial_shard_and_resumes(synth, tmp_path):
    ann, img = synth
    out = tmp_path / "out"
    ref = tmp_path / "ref"
    run_serial(DecomposeParams(shard_size=1, grid_samples=0), ann, img, ref)
    n_total = len(shards.list_shards(ref))
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(ann), str(img), str(out)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(shards.list_shards(out)) < 3 and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    visible = shards.list_shards(out)
    assert 3 <= len(visible) < n_total
    for p in visible:  # every visible shard is complete and equal to the uninterrupted run's
        pq.read_table(p)
        assert p.read_bytes() == (ref / "shards" / p.name).read_bytes()
    # A kill between a shard's rename and its progress record leaves a complete shard that the
    # resumed run redoes (identically); shards with a record must be kept untouched.
    recorded = [p for p in visible if (out / "_progress" / f"{p.stem}.json").is_file()]
    assert recorded
    before = {p.name: os.stat(p).st_mtime_ns for p in recorded}
    m, results = run_serial(DecomposeParams(shard_size=1, grid_samples=0), ann, img, out)
    assert len(results) < 30  # the finished shards were not redone
    assert {p.name: os.stat(p).st_mtime_ns for p in visible if p.name in before} == before
    assert _files(out) == _files(ref) and m["content_hash"] == shards.content_hash(ref)
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".tmp-")]
