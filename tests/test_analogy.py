"""3D scene analogies: the point-set export, the descriptor field's frames, the coarse stage on a
pair with a known answer, the metric and baseline definitions, the saved field and `pics analogy`."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from pics_model.context_field import ContextDescriptorField, FieldConfig, FieldFileError
from pics_model.scene_map import MapConfig, compute_map, scene_tensors, yaw
from tasks.analogy import evaluate as ev
from tasks.analogy import transfer as tr
from tasks.analogy.scenes import (Scene, SceneError, densified, eval_pair, generate_scene, generate_spec,
                                  load_scene, object_library, save_scene, split_objects, triplet, yaw_matrix)
from tasks.make_sample.shapes import CATEGORIES

FAST = MapConfig(max_query_objects=1, topk=1, coarse_queries=48)  # fewer candidates, same code
SMALL = FieldConfig(radius=0.35, max_neighbours=16, width=32, layers=1, heads=2, feature_dim=16)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [generate_scene(i, 0, (4, 5), 24) for i in range(3)]


def _turned(scene: Scene, angle: float, shift) -> Scene:
    return Scene((scene.points @ yaw_matrix(angle).T + np.asarray(shift)).astype(np.float32), scene.instance.copy(),
                 scene.label.copy())


def test_export_schema(scenes, tmp_path):
    s = scenes[0]
    assert s.points.dtype == np.float32 and s.points.shape[1] == 3
    assert s.instance.shape == s.label.shape == (len(s.points),)
    floor = s.instance == -1
    assert floor.any() and (s.label[floor] == -1).all() and np.allclose(s.points[floor, 2], 0)
    ids = s.object_ids()
    assert list(ids) == list(range(len(ids))) and 4 <= len(ids) <= 5
    assert all((s.instance == k).sum() == 24 for k in ids)
    assert set(s.label[~floor]) <= {c.id for c in CATEGORIES}
    assert s.points[~floor, 2].min() > -1e-3  # objects rest on or above the floor
    path = save_scene(tmp_path / "s.npz", s)
    back = load_scene(path)
    assert np.array_equal(back.points, s.points) and np.array_equal(back.label, s.label)


def test_bad_scene_files_are_named_with_the_field(tmp_path):
    np.savez(tmp_path / "a.npz", points=np.zeros((4, 3), np.float32), instance=np.zeros(4, np.int32))
    with pytest.raises(SceneError, match=r"a\.npz: field 'label' missing"):
        load_scene(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", points=np.zeros((4, 2), np.float32), instance=np.zeros(4, np.int32),
             label=np.zeros(4, np.int32))
    with pytest.raises(SceneError, match=r"b\.npz: field 'points' must be \[P, 3\]"):
        load_scene(tmp_path / "b.npz")
    with pytest.raises(SceneError, match="no such scene file"):
        load_scene(tmp_path / "missing.npz")


def test_descriptors_follow_rigid_motions_when_read_in_their_frame(scenes):
    torch.manual_seed(0)
    field = ContextDescriptorField(SMALL).eval()
    s = scenes[0]
    angle, shift = 1.1, (0.4, -0.3, 0.0)
    moved = _turned(s, angle, shift)
    q = s.points[s.instance >= 0][::5]
    with torch.no_grad():
        here = field(torch.from_numpy(q), torch.from_numpy(s.points), torch.from_numpy(s.label))
        there = field(torch.from_numpy(moved.points[s.instance >= 0][::5]), torch.from_numpy(moved.points),
                      torch.from_numpy(moved.label), yaw(angle))
        unframed = field(torch.from_numpy(moved.points[s.instance >= 0][::5]), torch.from_numpy(moved.points),
                         torch.from_numpy(moved.label))
    assert torch.allclose(here, there, atol=1e-4)
    assert not torch.allclose(here, unframed, atol=1e-2)  # the frame is what makes them agree
    assert torch.allclose(here.norm(dim=-1), torch.ones(len(q)), atol=1e-5)


def test_coarse_stage_recovers_a_known_rotation(scenes):
    torch.manual_seed(0)
    field = ContextDescriptorField(SMALL).eval()
    s = scenes[1]
    angle, shift = np.pi / 2, np.array([1.5, 0.2, 0.0])
    target = _turned(s, angle, shift)
    query = torch.from_numpy(s.points[s.instance >= 0])
    m = compute_map(field, scene_tensors(s.points, s.label, s.instance),
                    scene_tensors(target.points, target.label, target.instance), query, FAST)
    assert torch.allclose(m.transform.rotation, yaw(angle), atol=1e-3)
    truth = query.numpy() @ yaw_matrix(angle).T + shift
    assert np.abs(m.transform.apply(query).numpy() - truth).max() < 1e-3
    # the fine stage's smoothed displacements keep an exact map exact (to a fraction of the point spacing)
    assert m.displacement is not None
    assert ev.pcp(m(query).numpy(), truth, 0.02) > 0.95


def test_descriptors_and_matches_do_not_depend_on_the_chunk_size(scenes, monkeypatch):
    import pics_model.context_field as cf
    import pics_model.scene_map as sm

    torch.manual_seed(0)
    field = ContextDescriptorField(SMALL).eval()
    s = scenes[0]
    pts, lab = torch.from_numpy(s.points), torch.from_numpy(s.label)
    q = torch.from_numpy(s.points[s.instance >= 0][::3])
    frames = torch.stack([yaw(0.3), yaw(2.0, True)])
    tgt = scene_tensors(s.points, s.label, s.instance)
    t = sm.Similarity(yaw(0.0), 1.0, torch.zeros(3))
    with torch.no_grad():
        whole = field(q.expand(2, -1, -1), pts, lab, frames, torch.tensor([1.0, 1.3]))
        matched, conf = sm.matches(field, q, field(q, pts, lab), tgt, t, FAST)
        monkeypatch.setattr(cf, "MAX_DISTANCES", 3 * len(pts))  # three queries a chunk
        monkeypatch.setattr(sm, "MAX_DISTANCES", 5 * len(pts) * SMALL.feature_dim)
        chunked = field(q.expand(2, -1, -1), pts, lab, frames, torch.tensor([1.0, 1.3]))
        matched_c, conf_c = sm.matches(field, q, field(q, pts, lab), tgt, t, FAST)
    assert torch.allclose(whole, chunked, atol=1e-6)
    assert torch.equal(matched, matched_c) and torch.allclose(conf, conf_c, atol=1e-6)


def test_a_denser_scene_is_thinned_to_the_training_density(scenes):
    from pics_model.context_field import thin_scene
    from tasks.analogy.scenes import point_spacing

    s = scenes[0]
    cfg = FieldConfig(**{**SMALL.__dict__})
    cfg.object_spacing, cfg.floor_spacing = point_spacing(scenes)
    as_trained = thin_scene(*scene_tensors(s.points, s.label, s.instance).values(), cfg)
    assert torch.equal(as_trained[0], torch.from_numpy(s.points))  # sampled like the training scenes: untouched
    d = densified(s, 20, np.random.default_rng(0))
    pts, lab, ins = thin_scene(*scene_tensors(d.points, d.label, d.instance).values(), cfg)
    for k in np.unique(s.instance):  # each object (and the floor) back to about its own count
        n, m = int((ins == int(k)).sum()), int((s.instance == k).sum())
        assert 0.5 * m <= n <= 2.5 * m, (k, n, m)
        assert set(lab[ins == int(k)].tolist()) == {int(s.label[s.instance == k][0])}
        # thinned points stay on their object: within a voxel of its original points
        orig = torch.from_numpy(s.points[s.instance == k])
        reach = cfg.object_spacing if k >= 0 else cfg.floor_spacing
        assert float(torch.cdist(pts[ins == int(k)], orig).min(1).values.max()) < 1.8 * reach
    no_spacing = thin_scene(*scene_tensors(d.points, d.label, d.instance).values(), SMALL)
    assert len(no_spacing[0]) == len(d.points)  # a field saved without spacings reads scenes as they are
    objects_only = thin_scene(*scene_tensors(d.points[d.instance >= 0], d.label[d.instance >= 0],
                                             d.instance[d.instance >= 0]).values(), cfg)
    assert (objects_only[2] >= 0).all() and len(objects_only[0]) < 3 * (s.instance >= 0).sum()  # no floor: no error


def test_thin_dense_maps_a_scene_sampled_twenty_times_denser_as_the_sparse_one(scenes):
    from tasks.analogy.scenes import point_spacing

    torch.manual_seed(0)
    cfg = FieldConfig(**{**SMALL.__dict__})
    cfg.object_spacing, cfg.floor_spacing = point_spacing(scenes)
    field = ContextDescriptorField(cfg).eval()
    s = scenes[1]
    angle, shift = np.pi / 2, np.array([1.5, 0.2, 0.0])
    target = _turned(s, angle, shift)
    query = torch.from_numpy(s.points[s.instance >= 0])
    truth = query.numpy() @ yaw_matrix(angle).T + shift
    dense_s, dense_t = densified(s, 20, np.random.default_rng(1)), densified(target, 20, np.random.default_rng(2))
    m = compute_map(field, scene_tensors(dense_s.points, dense_s.label, dense_s.instance),
                    scene_tensors(dense_t.points, dense_t.label, dense_t.instance), query,
                    dataclasses.replace(FAST, thin_dense=True))
    assert ev.pcp(m(query).numpy(), truth, 0.05) > 0.95


def test_metric_definitions():
    truth = np.zeros((4, 3))
    mapped = np.array([[0.05, 0, 0], [0.2, 0, 0], [0, 0.09, 0], [0, 0, 1.0]])
    assert ev.pcp(mapped, truth, 0.1) == 0.5
    assert ev.pcp(mapped, truth, 0.25) == 0.75
    target = Scene(np.array([[0, 0, 0], [1, 0, 0], [5, 5, 0]], np.float32), np.array([0, 0, 1], np.int32),
                   np.array([3, 3, 4], np.int32))
    # mapped points near object 0's points count for object 0 only, wherever on it they land
    pts = np.array([[0.95, 0.05, 0], [5, 5, 0], [0.5, 0, 0]])
    assert ev.chamfer_accuracy(pts, target, np.array([0, 0, 0]), 0.2) == pytest.approx(1 / 3)


def test_baselines_on_pairs_they_should_solve(scenes):
    s = scenes[2]
    angle, shift = np.pi / 2 + 0.05, np.array([0.7, -0.4, 0.0])
    target = _turned(s, angle, shift)
    query = s.points[s.instance >= 0]
    truth = query @ yaw_matrix(angle).T + shift
    assert ev.pcp(ev.icp_baseline(s, target, query), truth, 0.01) > 0.99
    moved = Scene((s.points + shift).astype(np.float32), s.instance, s.label)  # a pure translation
    assert ev.pcp(ev.centroid_baseline(s, moved, query), query + shift, 1e-4) == 1.0


def test_triplet_and_eval_pair_ground_truth(scenes):
    rng = np.random.default_rng(0)
    lib = object_library(scenes)
    t = triplet(scenes[0], lib, rng, 32, drop=0.0)
    d = np.linalg.norm(t.negative_at[:, None] - t.negative.points[None], axis=-1).min(1)
    assert d.max() < 1e-5  # each negative correspondence is the moved object point itself
    assert len(split_objects(t.positive)) == len(split_objects(t.anchor))
    pair = eval_pair(scenes[1], lib, rng, yaw_jitter_deg=0.0)
    q = pair.source.points[pair.query].astype(np.float64)
    # the truth is a rigid motion of the query points: distances are kept
    assert np.allclose(np.linalg.norm(q[:1] - q, axis=1), np.linalg.norm(pair.truth[:1] - pair.truth, axis=1),
                       atol=1e-4)
    assert 2 <= len(np.unique(pair.truth_instance)) <= 4
    assert len(split_objects(pair.target)) >= len(np.unique(pair.truth_instance)) + 1  # distractors added
    assert ev.chamfer_accuracy(pair.truth, pair.target, pair.truth_instance, 0.15) > 0.95
    swapped = eval_pair(scenes[1], lib, np.random.default_rng(1), yaw_jitter_deg=0.0, swap=True)
    kept = np.unique(swapped.truth_instance)
    same = [swapped.source.label[swapped.query][swapped.truth_instance == k][0] for k in kept]
    assert [swapped.target.object_label(k) for k in kept] == same  # same classes, other shapes
    d = np.linalg.norm(swapped.truth[:, None] - swapped.target.points[None], axis=-1).min(1)
    assert np.median(d) > 0.004  # the truth is where each point's place went, not a point of the new shape


def test_perturbed_eval_pairs_move_each_object_on_its_own(scenes):
    lib = object_library(scenes)
    rigid = eval_pair(scenes[1], lib, np.random.default_rng(2), yaw_jitter_deg=0.0)
    moved = eval_pair(scenes[1], lib, np.random.default_rng(2), yaw_jitter_deg=0.0, perturb_shift=0.05,
                      perturb_yaw_deg=20.0)

    def rigid_residual(pair):  # what one rigid motion of all query points leaves unexplained
        q = pair.source.points[pair.query].astype(np.float64)
        r, t = ev.kabsch(q, pair.truth)
        return float(np.abs(q @ r.T + t - pair.truth).max())

    assert rigid_residual(rigid) < 1e-4 and rigid_residual(moved) > 0.02
    # the truth is still on each target object: its points are the moved source points, resampled
    kept = (moved.target.instance >= 0) & (moved.target.instance <= moved.truth_instance.max())
    d = np.linalg.norm(moved.target.points[kept][:, None] - moved.truth[None], axis=-1).min(1)
    assert d.max() < 0.02  # resampling noise only


def test_paired_difference_and_its_interval():
    from scipy import stats

    from tasks.analogy.stage import paired

    rows, base = [{"k": v} for v in (0.5, 0.9, 1.0, 0.4)], [{"k": v} for v in (0.4, 0.6, 1.0, 0.45)]
    c = paired(rows, base, "k")
    d = np.array([0.1, 0.3, 0.0, -0.05])
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert c["mean"] == pytest.approx(0.0875, abs=1e-4) and c["pairs"] == 4
    assert c["ci95"] == pytest.approx([0.0875 - half, 0.0875 + half], abs=1e-4)
    assert (c["wins"], c["losses"]) == (2, 1)  # 0.0 is a tie
    assert paired(rows[:1], base[:1], "k")["ci95"] is None


def test_info_nce_leaves_out_the_excluded_negatives():
    from pics_model.context_field import info_nce

    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    p = torch.nn.functional.normalize(a + 0.3 * torch.randn(6, 8), dim=-1)
    full = info_nce(a, p)
    assert info_nce(a, p, exclude=torch.zeros(6, 6, dtype=torch.bool)) == pytest.approx(float(full))
    assert float(info_nce(a, p, exclude=torch.ones(6, 6, dtype=torch.bool))) == pytest.approx(0.0, abs=1e-6)
    some = torch.zeros(6, 6, dtype=torch.bool)
    some[0, 1] = some[1, 0] = True
    assert float(info_nce(a, p, exclude=some)) < float(full)


def test_ball_tokens_reach_across_the_radius():
    # points on a line at 0.01 spacing: the 8 nearest of the origin lie within 0.04 of it
    points = torch.stack([torch.arange(60) * 0.01 - 0.3, torch.zeros(60), torch.zeros(60)], -1)
    labels = torch.zeros(60, dtype=torch.long)
    near = ContextDescriptorField(FieldConfig(radius=0.25, max_neighbours=8, width=16, heads=2, feature_dim=8))
    ball = ContextDescriptorField(FieldConfig(radius=0.25, max_neighbours=8, ball_tokens=5, width=16, heads=2,
                                              feature_dim=8))
    dist = torch.cdist(torch.zeros(1, 3), points)
    d_near, _ = near.neighbours(dist, torch.tensor([[0.25]]), 8)
    d_ball, idx = ball.neighbours(dist, torch.tensor([[0.25]]), 8)
    assert float(d_near.max()) <= 0.045 and float(d_ball.max()) > 0.1  # context beyond the nearest
    assert float(d_ball.max()) <= 0.25 and len(set(idx[0].tolist())) == 8  # in the ball, no point twice
    assert torch.equal(torch.sort(d_ball[0, :3]).values, torch.sort(d_near[0]).values[:3])  # nearest kept first
    out = ball(torch.zeros(2, 3), points, labels)
    assert out.shape == (2, 8) and torch.allclose(out.norm(dim=-1), torch.ones(2))


def test_wrong_frames_are_the_coarse_stage_wrong_candidates(scenes):
    from tasks.analogy.train import TrainConfig, wrong_frames

    rng = np.random.default_rng(0)
    t = triplet(scenes[0], object_library(scenes), rng, 32)
    at, frames = wrong_frames(t, TrainConfig(frame_noise_deg=0.0), rng)
    r = frames.numpy()
    assert np.allclose(at, np.einsum("qij,qj->qi", r, t.queries - t.centre) + t.centre, atol=1e-5)
    assert all(not np.allclose(x, np.eye(3), atol=1e-4) for x in r)  # never the right one
    assert np.allclose(np.linalg.norm(at - t.centre, axis=1), np.linalg.norm(t.queries - t.centre, axis=1), atol=1e-5)


def test_triplet_options_follow_the_objects(scenes):
    lib = object_library(scenes)
    plain = triplet(scenes[0], lib, np.random.default_rng(3), 64)
    assert np.array_equal(plain.positive_at, plain.queries)
    moved = triplet(scenes[0], lib, np.random.default_rng(3), 64, jitter_shift=0.05, jitter_yaw_deg=20.0)
    step = np.linalg.norm(moved.positive_at - moved.queries, axis=1)
    assert step.max() > 0.01 and step.max() < 0.5  # each query follows its object's small move
    pivot = triplet(scenes[0], lib, np.random.default_rng(3), 64, negative_pivot=True)
    still = np.all(np.isclose(pivot.negative_at, pivot.queries, atol=1e-6), axis=1)
    assert 0 < still.sum() < len(still)  # one object's queries keep their place, the others move
    turned = triplet(scenes[0], lib, np.random.default_rng(3), 64, yaw_noise_deg=1.0, shift_noise=0.0,
                     negative_min_yaw_deg=45.0)
    radius = np.linalg.norm((turned.queries - turned.centre)[:, :2], axis=1)
    chord = np.linalg.norm(turned.negative_at - turned.queries, axis=1)
    assert np.all(chord >= 2 * radius * np.sin(np.deg2rad(45.0) / 2) - 1e-4)  # at least 45 degrees about its centre


def test_saved_field_is_checked_before_loading(tmp_path):
    field = ContextDescriptorField(SMALL)
    d = field.save(tmp_path / "f")
    assert json.loads((d / "config.json").read_text())["width"] == 32
    loaded = ContextDescriptorField.load(d)
    assert all(torch.equal(a, b) for a, b in zip(field.state_dict().values(), loaded.state_dict().values()))
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(FieldFileError, match="model.safetensors: its sha256 differs"):
        ContextDescriptorField.load(d)


def test_pics_analogy_maps_one_scene_into_another(scenes, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    s = scenes[1]
    target = _turned(s, -np.pi / 2, (0.2, 0.1, 0.0))
    save_scene(tmp_path / "a.npz", s)
    save_scene(tmp_path / "b.npz", target)
    torch.manual_seed(0)
    ContextDescriptorField(SMALL).save(tmp_path / "field")
    args = ["analogy", "--source", str(tmp_path / "a.npz"), "--target", str(tmp_path / "b.npz"),
            "--checkpoint", str(tmp_path / "field"), "--out", str(tmp_path / "map.npz"),
            "--set", "analogy.topk=1", "--set", "analogy.refine_iters=1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "map.npz") as z:
        mapped = z["mapped"]
    assert mapped.shape == s.points.shape
    obj = s.instance >= 0
    assert ev.pcp(mapped[obj], target.points[obj], 0.02) > 0.95
    assert (tmp_path / "map.png").stat().st_size > 0
    r = CliRunner().invoke(app, args[:3] + ["--out", str(tmp_path / "m2.npz")])  # half the mapping options
    assert r.exit_code == 2 and "--target, --checkpoint" in r.output


STACKED = (3, (3, 4))  # generator index and object range of a scene whose object 1 rests on object 0
TINY = ["--set", "make_sample.width=96", "--set", "make_sample.height=72"]


@pytest.fixture(scope="module")
def stacked():
    spec, rng = generate_spec(STACKED[0], 0, STACKED[1])
    from tasks.make_sample.layout import scene_points

    return spec, Scene(**scene_points(spec, rng, 32))


def _without(spec, scene: Scene, k: int):
    """The layout and points with object ``k`` taken away (later objects renumbered)."""
    keep = scene.instance != k
    inst = scene.instance[keep]
    return (dataclasses.replace(spec, objects=[o for i, o in enumerate(spec.objects) if i != k]),
            Scene(scene.points[keep], np.where(inst > k, inst - 1, inst).astype(np.int32), scene.label[keep]))


def test_pair_is_put_back_where_it_was_resting_on_its_support(stacked):
    spec, scene = stacked
    assert tr.interacting_pair(scene, spec) == (0, 1)
    target_spec, target = _without(spec, scene, 1)
    torch.manual_seed(0)
    field = ContextDescriptorField(SMALL).eval()
    new, record = tr.place_pair(field, FAST, scene, spec, target, target_spec, (0, 1), np.random.default_rng(0))
    assert [e.get("identified_with", e.get("inserted_as")) for e in record["objects"]] == [0, 3]
    assert "identified_with" in record["objects"][0] and "inserted_as" in record["objects"][1]
    assert len(new.objects) == 4 and new.objects[3].mode == "transferred"
    # the map is the identity here: the item lands where it was, on its support, not on the floor
    assert np.abs(new.objects[3].pose[:3, 3] - spec.objects[1].pose[:3, 3]).max() < 0.02
    assert tr.support_in(new, 3) == 0


def test_support_check_stands_a_floor_object_on_the_floor(stacked):
    """An inserted object that stood on the floor is not balanced on what its drop point holds."""
    from pics_model.scene_map import Similarity
    from tasks.make_sample.renderer import get_renderer

    spec, _ = stacked
    renderer = get_renderer(64, 64)
    same = Similarity(torch.eye(3), 1.0, torch.zeros(3))
    dropped, where = tr._inserted(spec.objects[0], same, tr.height_field(spec, renderer), renderer)
    assert dropped.pose[2, 3] > tr.LIFTED and "slid" not in where  # onto the object already there
    placed, where = tr._inserted(spec.objects[0], same, tr.height_field(spec, renderer), renderer, on_floor=True)
    assert placed.pose[2, 3] < tr.LIFTED and where["slid"] > 0  # beside it, on the floor
    gap = np.linalg.norm(placed.pose[:2, 3] - spec.objects[0].pose[:2, 3])
    assert abs(gap - where["slid"]) < 0.01 and gap < 0.6


def test_pics_analogy_renders_a_transfer_in_make_sample_format(stacked, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.make_sample.annotate import decode

    save_scene(tmp_path / "a.npz", generate_scene(STACKED[0], 0, STACKED[1], 24), (0, STACKED[0], *STACKED[1]))
    save_scene(tmp_path / "b.npz", generate_scene(1, 0, STACKED[1], 24), (0, 1, *STACKED[1]))  # has class 9 too
    torch.manual_seed(0)
    ContextDescriptorField(SMALL).save(tmp_path / "field")
    args = ["analogy", "--source", str(tmp_path / "a.npz"), "--target", str(tmp_path / "b.npz"),
            "--checkpoint", str(tmp_path / "field"), "--render", str(tmp_path / "t"), "--set", "analogy.topk=1",
            "--set", "analogy.refine_iters=1", *TINY]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    lvis = json.loads((tmp_path / "t" / "annotations.json").read_text())
    (image,) = lvis["images"]
    assert (tmp_path / "t" / "images" / image["file_name"]).stat().st_size > 0
    assert (tmp_path / "t" / "scenes").is_dir() and (tmp_path / "t.png").stat().st_size > 0
    row = json.loads((tmp_path / "t" / "transfer.json").read_text())["samples"][0]
    assert row["pair"] == [0, 1] and row["file_name"] == image["file_name"]
    inserted = {e["inserted_as"] for e in row["objects"] if "inserted_as" in e}
    anns = {a["object_index"]: a for a in lvis["annotations"]}
    assert inserted & set(anns)  # the carried item is seen, masked and ranked in depth
    for a in anns.values():
        assert decode(a["segmentation"], 72, 96).sum() == a["area"] and a["depth_rank"] >= 0
        assert a["placement"] == ("transferred" if a["object_index"] in inserted else a["placement"])


def test_transfer_inputs_are_checked_first_with_file_and_field(scenes, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    save_scene(tmp_path / "plain.npz", scenes[0])  # no generator field
    save_scene(tmp_path / "wrong.npz", scenes[0], (0, 7, 4, 5))  # another scene's generator
    ContextDescriptorField(SMALL).save(tmp_path / "field")
    base = ["analogy", "--checkpoint", str(tmp_path / "field"), "--render", str(tmp_path / "t")]

    def run(source, target, *extra):
        return CliRunner().invoke(app, base + ["--source", str(tmp_path / source), "--target", str(tmp_path / target),
                                               *extra])

    r = run("plain.npz", "plain.npz")
    assert r.exit_code == 2 and "plain.npz: field 'generator' missing" in r.output
    r = run("wrong.npz", "wrong.npz")
    assert r.exit_code == 2 and "wrong.npz: field 'generator' rebuilds objects of classes" in r.output
    r = run("wrong.npz", "wrong.npz", "--pair", "0,9")
    assert r.exit_code == 2 and "wrong.npz: pair [0, 9] must be two different object ids" in r.output
    r = run("wrong.npz", "wrong.npz", "--pair", "zero")
    assert r.exit_code == 2 and "--pair 'zero': expected two object ids" in r.output
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_flow_leaves_scenes_field_and_metrics(prefect_harness, tmp_path):
    from flows.analogy import analogy_flow

    # held out: generator scenes 1-3; in 3 a can rests on a cube, 1 has a cube too: one transfer
    sets = [f"analogy.out={tmp_path / 'analogy'}", "analogy.num_scenes=4", "analogy.heldout_scenes=3",
            "analogy.steps=3", "analogy.eval_pairs=2", "analogy.hard_pairs=2", "analogy.min_objects=3",
            "analogy.max_objects=4", "analogy.points_per_object=16", "analogy.threads=1", "analogy.topk=1",
            "analogy.transfer_samples=1", "make_sample.width=96", "make_sample.height=72"]
    metrics = analogy_flow(overrides=sets)
    out = tmp_path / "analogy"
    assert len(list((out / "scenes").glob("scene-*.npz"))) == 4
    ContextDescriptorField.load(out / "final")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["methods"].keys() == {"ours", "ours_coarse_only", "icp", "centroid"} == metrics["methods"].keys()
    for m in saved["methods"].values():
        assert {"pcp@0.25", "pcp@0.5", "bipcp@0.25", "chamfer@0.25"} <= m.keys()
    assert saved["train"]["steps"] == 3 and (out / "loss.csv").read_text().count("\n") == 4
    assert {"ours", "ours_coarse_only", "untrained", "untrained_coarse_only"} <= saved["hard"]["methods"].keys()
    cmp = saved["hard"]["trained_vs_untrained"]["full"]["pcp@0.25"]
    assert cmp["pairs"] == 2 and cmp["ci95"][0] <= cmp["mean"] <= cmp["ci95"][1]
    assert saved["untrained"]["trained_vs_untrained"]["coarse_only"]["pcp@0.5"]["pairs"] == 2
    assert {"untrained", "untrained_coarse_only"} == saved["untrained"]["methods"].keys()
    assert (out / "report.md").read_text().count("Trained minus untrained") == 2
    assert saved["transfer"]["samples"] == 1
    row = json.loads((out / "transfer" / "transfer.json").read_text())["samples"][0]
    assert (row["source"], row["target"], row["pair"]) == ("scene-00003.npz", "scene-00001.npz", [0, 1])
    assert len(json.loads((out / "transfer" / "annotations.json").read_text())["images"]) == 1
    assert (out / "transfer.png").stat().st_size > 0 and "](transfer.png)" in (out / "report.md").read_text()
    # a rerun replaces its own outputs; a folder of someone else's is refused
    analogy_flow(overrides=sets)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(Exception, match="not marked as an output folder of analogy"):
        analogy_flow(overrides=sets[1:] + [f"analogy.out={tmp_path / 'other'}"])
