"""render_priors stage without Prefect/Ray: real patches in SAMPLE_SCHEMA shards, dedupe by
object key, quarantine of broken inputs, resume, PRIOR_SCHEMA output, the picture."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.params import RenderPriorsParams
from tasks.quarantine import QuarantineLimitError, check_limit
from tasks.render_priors import pipeline
from tasks.render_priors.coco_objects import load_objects, png_bytes, sample_row, write_sample_shard
from tasks.schema import PRIOR_SCHEMA, object_key


@pytest.fixture(scope="module")
def coco(shared_data):
    objs = load_objects(shared_data / "coco_hf_39769/instances_39769.json", shared_data / "coco_hf_39769")
    by_ann = {o["annotation_id"]: o for o in objs}
    return by_ann[2190839], by_ann[2190842], by_ann[1110067]  # two cats, a remote


def _key(o):
    return object_key(png_bytes(o["patch"]), png_bytes(o["mask"]))


@pytest.fixture()
def samples(tmp_path, coco):
    cat1, cat2, remote = coco
    empty = dict(cat1, mask=np.zeros_like(cat1["mask"]), annotation_id=-1)
    speck = np.zeros_like(cat1["mask"])
    speck[5:7, 5:7] = 255
    tiny = dict(cat2, mask=speck, annotation_id=-2)
    rows0 = [sample_row("39769-a", 39769, [cat1, cat2]),
             sample_row("39769-b", 39769, [cat2, remote]),  # cat2 again: rendered once
             sample_row("39769-c", 39769, [cat1, empty])]
    rows1 = [sample_row("39769-d", 39769, [tiny, remote],
                        patches=[png_bytes(tiny["patch"]), b"\x89PNG broken"],  # corrupt patch bytes
                        masks=[png_bytes(tiny["mask"]), png_bytes(remote["mask"])]),
             sample_row("39769-e", 39769, [remote, cat1])]
    d = tmp_path / "samples"
    write_sample_shard(d / "shards" / "shard-00000.parquet", rows0)
    write_sample_shard(d / "shards" / "shard-00001.parquet", rows1)
    return d


def params(tmp_path, **kw):
    return RenderPriorsParams(out=str(tmp_path / "priors"), shard_size=2, **kw)


def test_stage_dedupes_quarantines_and_counts(samples, tmp_path, coco):
    from tasks.render_priors.store import decode_prior, iter_priors, load_priors, views_on_white

    p = params(tmp_path)
    manifest, results = pipeline.run_serial(p, samples, p.out)
    out = tmp_path / "priors"
    # 10 object references; distinct: cat1, cat2, remote, empty, tiny, corrupt-remote
    assert manifest["samples"] == 5 and manifest["object_refs"] == 10
    assert manifest["distinct_objects"] == 6 and manifest["duplicates"] == 4
    assert manifest["rendered"] == 3
    assert manifest["quarantined"] == {"bad_patch": 1, "degenerate_mesh": 1, "empty_mask": 1}
    assert manifest["rendered"] + sum(manifest["quarantined"].values()) == manifest["distinct_objects"]
    with pytest.raises(QuarantineLimitError, match=r"objects: 3 of 6 quarantined \(50\.0%: bad_patch 1, "
                                                   r"degenerate_mesh 1, empty_mask 1\)"):
        check_limit("render_priors", out, pipeline.quarantine_tallies(manifest), p.max_quarantine_fraction, "x")
    check_limit("render_priors", out, pipeline.quarantine_tallies(manifest), 0.5, "x")  # half: not more than half
    assert manifest["timing"]["render_ms_per_view"] > 0 and manifest["timing"]["wall_s"] > 0
    assert manifest["renderer"]["gl_renderer"]

    q = pq.read_table(out / "quarantine.parquet").to_pylist()
    by_reason = {r["reason"]: r for r in q}
    assert by_reason["empty_mask"]["annotation_id"] == -1 and by_reason["empty_mask"]["source"] == "shard-00000.parquet"
    assert by_reason["degenerate_mesh"]["annotation_id"] == -2
    assert by_reason["bad_patch"]["source"] == "shard-00001.parquet" and "decodable" in by_reason["bad_patch"]["detail"]
    assert all(r["stage"] == "render_priors" and len(r["item_key"]) == 32 for r in q)

    rows = list(iter_priors(out))
    assert sorted(r["object_key"] for r in rows) == sorted(_key(o) for o in coco)  # each once
    for shard in out.glob("shards/*.parquet"):
        assert pq.read_schema(shard).equals(PRIOR_SCHEMA, check_metadata=False)
    prior = decode_prior(rows[0])
    assert prior["views"].shape == (6, 224, 224, 4) and prior["depths"].shape == (6, 224, 224)
    np.testing.assert_allclose(prior["azimuths_deg"], [0, 60, 120, 180, 240, 300])
    assert prior["elevation_deg"] == 15.0 and prior["reconstructor"] == "builtin"
    alpha = prior["views"][..., 3] > 0
    assert ((prior["depths"] > 0) == alpha).all() and alpha.mean() > 0.05
    white = views_on_white(prior["views"])
    assert white.shape == (6, 224, 224, 3) and (white[~alpha] == 255).all()
    got = load_priors(out, {_key(coco[2])})
    assert list(got) == [_key(coco[2])]


def test_resume_renders_only_what_is_missing(samples, tmp_path):
    p = params(tmp_path)
    out = tmp_path / "priors"
    first, results = pipeline.run_serial(p, samples, p.out)
    assert len(results) == 3  # 6 distinct objects / shard_size 2
    again, results2 = pipeline.run_serial(p, samples, p.out)
    assert results2 == [] and again["kept_from_earlier_runs"] == 6 and again["rendered"] == 3

    # A worker killed after writing its parquet but before its record, and a half-written temp file.
    victim = results[1]["shard"]
    (out / "_progress" / f"{victim}.json").unlink()
    (out / "shards" / ".tmp-priors-00009.parquet.abcd").write_bytes(b"partial")
    resumed, results3 = pipeline.run_serial(p, samples, p.out)
    assert [r["objects"] for r in results3] == [results[1]["objects"]]
    assert resumed["rendered"] == 3 and resumed["kept_from_earlier_runs"] == 6 - results[1]["objects"]
    assert not list((out / "shards").glob(".tmp-*"))
    assert resumed["quarantined"] == first["quarantined"]

    # A rendering parameter changes what is rendered: nothing is kept.
    changed, results4 = pipeline.run_serial(params(tmp_path, num_views=3), samples, p.out)
    assert changed["kept_from_earlier_runs"] == 0 and len(results4) == 3
    rows = pq.read_table(next((out / "shards").glob("*.parquet"))).to_pylist()
    assert all(r["num_views"] == 3 for r in rows)


def test_missing_inputs_and_plugins_fail_before_work(samples, tmp_path):
    from tasks.params import ParamsError

    with pytest.raises(ParamsError, match="render_priors.samples.*no sample shards"):
        pipeline.prepare(params(tmp_path), tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ParamsError, match="render_priors.reconstructor:.*'learned_x'"):
        pipeline.prepare(params(tmp_path, reconstructor="learned_x"), samples, tmp_path / "out")
    with pytest.raises(ParamsError, match="render_priors.reconstructor_weights:.*nope.pt"):
        pipeline.prepare(params(tmp_path, reconstructor=f"{__name__}:weighted",
                                reconstructor_weights=str(tmp_path / "nope.pt")), samples, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def weighted(weights, **options):
    from pics_model.geometry import inflate

    return lambda patch, mask: inflate(patch, mask)


weighted.needs_weights = True


def test_renderer_error_is_quarantined_and_run_goes_on(samples, tmp_path, monkeypatch):
    from pics_model.geometry import RendererError
    from pics_model.geometry.renderer import MultiViewRenderer

    real = MultiViewRenderer.render
    calls = []

    def flaky(self, mesh):
        calls.append(1)
        if len(calls) == 2:
            raise RendererError("simulated GL failure")
        return real(self, mesh)

    monkeypatch.setattr(MultiViewRenderer, "render", flaky)
    p = params(tmp_path)
    manifest, _ = pipeline.run_serial(p, samples, p.out)
    assert manifest["quarantined"].get("renderer_error") == 1 and manifest["rendered"] == 2
    q = pq.read_table(tmp_path / "priors" / "quarantine.parquet").to_pylist()
    assert any(r["reason"] == "renderer_error" and "simulated" in r["detail"] for r in q)


def test_plugin_reconstructor_runs_in_the_stage(samples, tmp_path):
    w = tmp_path / "w.pt"
    w.write_bytes(b"weights")
    p = params(tmp_path, reconstructor=f"{__name__}:weighted", reconstructor_weights=str(w))
    manifest, _ = pipeline.run_serial(p, samples, p.out)
    assert manifest["rendered"] == 3
    rows = pq.read_table(next((tmp_path / "priors" / "shards").glob("*.parquet"))).to_pylist()
    assert rows[0]["reconstructor"] == f"{__name__}:weighted"
    # the weight file's content is part of the fingerprint: new weights re-render everything
    fp = manifest["fingerprint"]
    w.write_bytes(b"other weights")
    assert pipeline.fingerprint(p) != fp


def test_grid_picture(samples, tmp_path):
    from PIL import Image

    from tasks.render_priors.grid import write_prior_grid

    p = params(tmp_path)
    pipeline.run_serial(p, samples, p.out)
    path = write_prior_grid(p.out, samples, n=3, tile=64)
    with Image.open(path) as im:
        assert im.size == (7 * 64, 3 * (2 * 64 + 14))
        arr = np.asarray(im.convert("RGB"))
    # first object's patch tile (row 1, col 0) is the real patch, not blank
    assert arr[14:78, :64].std() > 20
    json.loads((tmp_path / "priors" / "manifest.json").read_text())
