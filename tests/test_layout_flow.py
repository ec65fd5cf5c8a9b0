"""The layout flow on a real sample shard (COCO 39769's objects, cut as decompose cuts them)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tasks.render_priors.coco_objects import load_objects, sample_row, write_sample_shard

pytestmark = pytest.mark.slow


def test_flow_packs_dataset_silhouettes_into_each_target_and_reports(prefect_harness, shared_data, tmp_path):
    from prefect.artifacts import Artifact

    from flows.layout import layout_flow

    objs = load_objects(shared_data / "coco_hf_39769/instances_39769.json", shared_data / "coco_hf_39769", size=96)
    samples = tmp_path / "samples"
    # the first object twice: one silhouette, counted once
    write_sample_shard(samples / "shards" / "shard-00000.parquet",
                       [sample_row("a", 39769, objs[:3]), sample_row("b", 39769, [objs[0], *objs[3:]])])
    out = tmp_path / "layout"
    (out / "targets" / "stale").mkdir(parents=True)  # an earlier run's target that is no longer asked for
    from tasks.shards import mark_output

    mark_output(out, "layout")
    res = layout_flow(overrides=[f"layout.samples={samples}", f"layout.out={out}", "layout.targets=[circle,letter]",
                                 "layout.target_size=64", "layout.iterations=[30,20,10]", "layout.threads=1"])
    distinct = len(objs)
    assert res["elements"] == distinct
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"circle", "letter"} and sorted(p.name for p in (out / "targets").iterdir()) == [
        "circle", "letter"]
    for name, per in metrics.items():
        assert set(per) == {"start", "greedy", "optimised"}
        assert per["optimised"]["overlap"] <= 0.01 and per["greedy"]["overlap"] == 0
        lay = json.loads((out / "targets" / name / "layout.json").read_text())
        assert len(lay["elements"]) == distinct and (lay["width"], lay["height"]) == (64, 64)
        assert len(list((out / "targets" / name / "masks").glob("*.png"))) == distinct
        written = json.loads((out / "targets" / name / "metrics.json").read_text())
        assert written["coverage"] == pytest.approx(per["optimised"]["coverage"])
    report = np.asarray(Image.open(out / "report.png"))
    assert report.shape[0] > 2 * 240 and report.shape[1] >= 4 * 240  # two rows of four panels
    art = Artifact.get("layout")
    assert art and "| circle | optimised |" in art.data and "data:image/jpeg;base64," in art.data
