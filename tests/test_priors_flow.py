"""render_priors flow end to end: Prefect test harness, local Ray workers, artifact, resume, CLI."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tasks.render_priors import pipeline
from tasks.render_priors.coco_objects import load_objects, sample_row, write_sample_shard

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def samples(shared_data, tmp_path_factory):
    objs = load_objects(shared_data / "coco_hf_39769/instances_39769.json", shared_data / "coco_hf_39769")
    cats = [o for o in objs if o["category_id"] == 17]
    remotes = [o for o in objs if o["category_id"] == 75]
    d = tmp_path_factory.mktemp("flow") / "samples"
    write_sample_shard(d / "shards" / "shard-00000.parquet",
                       [sample_row("a", 39769, cats), sample_row("b", 39769, [cats[0], remotes[0]]),
                        sample_row("c", 39769, [remotes[1], cats[1]])])
    return d


def _rows(out):
    rows = {}
    for f in sorted((out / "shards").glob("*.parquet")):
        for r in pq.read_table(f).to_pylist():
            rows[r["object_key"]] = r
    return rows


def test_flow_on_ray_matches_serial_and_resumes(prefect_harness, local_ray, samples, tmp_path):
    from prefect.artifacts import Artifact

    from flows.render_priors import render_priors_flow
    from tasks.params import RenderPriorsParams

    out = tmp_path / "priors"
    overrides = [f"render_priors.samples={samples}", f"render_priors.out={out}", "render_priors.shard_size=2",
                 "render_priors.grid_objects=4"]
    res = render_priors_flow(overrides=overrides)
    assert res["samples"] == 3 and res["distinct_objects"] == 4 and res["rendered"] == 4
    assert res["shards_run"] == 2 and res["quarantined"] == {}
    assert (out / "priors.png").is_file() and res["grid"] == str(out / "priors.png")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["duplicates"] == 2 and manifest["renderer"]["gl_renderer"]

    # Two Ray workers (EGL, one llvmpipe thread each) wrote what one process writes.
    p = RenderPriorsParams(samples=str(samples), out=str(tmp_path / "serial"), shard_size=2)
    pipeline.run_serial(p, samples, p.out)
    ray_rows, serial_rows = _rows(out), _rows(tmp_path / "serial")
    assert ray_rows.keys() == serial_rows.keys() and len(ray_rows) == 4
    for k in ray_rows:
        assert ray_rows[k]["views"] == serial_rows[k]["views"]

    art = Artifact.get("render-priors")
    assert art and "data:image/jpeg;base64," in art.data and "| rendered | 4 |" in art.data

    again = render_priors_flow(overrides=overrides)
    assert again["shards_run"] == 0 and again["kept_from_earlier_runs"] == 4 and again["rendered"] == 4


def test_cli_exits_3_after_writing_outputs_when_every_object_is_quarantined(prefect_harness, local_ray, shared_data,
                                                                              tmp_path):
    import numpy as np
    from typer.testing import CliRunner

    from flows.cli import app

    objs = load_objects(shared_data / "coco_hf_39769/instances_39769.json", shared_data / "coco_hf_39769")
    empty = [dict(o, mask=np.zeros_like(o["mask"])) for o in objs[:2]]
    d = tmp_path / "samples"
    write_sample_shard(d / "shards" / "shard-00000.parquet", [sample_row("a", 39769, empty)])
    r = CliRunner().invoke(app, ["render-priors", "--samples", str(d), "--out", str(tmp_path / "o"),
                                 "--set", "render_priors.max_quarantine_fraction=1.0",
                                 "--set", "render_priors.grid_objects=0"])
    assert r.exit_code == 3 and "objects: 2 of 2 quarantined (100.0%: empty_mask 2)" in r.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["quarantined"] == {"empty_mask": 2}
    assert pq.read_table(tmp_path / "o" / "quarantine.parquet").num_rows == 2


def test_cli_reports_bad_inputs(prefect_harness, samples, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    r = CliRunner().invoke(app, ["render-priors", "--samples", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no sample shards" in r.output
    r = CliRunner().invoke(app, ["render-priors", "--samples", str(samples), "--out", str(tmp_path / "o"),
                                 "--set", "render_priors.reconstructor=nope"])
    assert r.exit_code == 2 and "render_priors.reconstructor" in r.output and "'nope'" in r.output
