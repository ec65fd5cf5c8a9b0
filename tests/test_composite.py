"""``pics composite`` and its Python API on real images, including the bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from flows.composite import CompositeInputError, ObjectSpec, composite, parse_object

STEPS = ["--steps", "2", "--guidance", "2.0", "--seed", "3", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    from pics_model.config import get_preset
    from pics_model.modeling_pics import PICSModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ckpt") / "model"
    PICSModel(get_preset("tiny")).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def scene(shared_data, tmp_path_factory):
    """A real background (COCO 39769, 640x480), two real object crops, a mask and a box."""
    d = tmp_path_factory.mktemp("scene")
    bg = Image.open(shared_data / "coco_hf_39769" / "000000039769.png").convert("RGB")
    src = Image.open(sorted((shared_data / "coco_mmpose").glob("*.jpg"))[0]).convert("RGB")
    src.crop((100, 50, 260, 250)).save(d / "obj1.png")
    rgba = src.crop((300, 100, 420, 220)).convert("RGBA")
    alpha = np.zeros((120, 120), np.uint8)
    alpha[10:110, 20:100] = 255
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(d / "obj2.png")
    mask = np.zeros((bg.height, bg.width), np.uint8)
    mask[200:330, 150:290] = 255
    Image.fromarray(mask).save(d / "mask1.png")
    bg.save(d / "bg.png")
    return {"dir": d, "bg": d / "bg.png", "obj1": d / "obj1.png", "obj2": d / "obj2.png", "mask1": d / "mask1.png",
            "box2": "250,240,400,380", "size": bg.size}


def _run(*args):
    return CliRunner().invoke(app, ["composite", *map(str, args)])


def test_cli_composites_real_images_and_matches_python_api(scene, tiny_checkpoint, tmp_path):
    out = tmp_path / "comp.png"
    r = _run("--background", scene["bg"], "--object", f"{scene['obj1']}:{scene['mask1']}",
             "--object", f"{scene['obj2']}:{scene['box2']}", "--checkpoint", tiny_checkpoint, "--out", out, *STEPS)
    assert r.exit_code == 0, r.output
    img = np.asarray(Image.open(out).convert("RGB"))
    bg = np.asarray(Image.open(scene["bg"]).convert("RGB"))
    assert img.shape == bg.shape
    # pasted back only inside the expanded boxes: far outside them the background is untouched,
    # inside them the model regenerated the pixels
    assert np.array_equal(img[:150], bg[:150]) and np.array_equal(img[:, 450:], bg[:, 450:])
    assert np.abs(img[210:320, 160:280].astype(int) - bg[210:320, 160:280]).mean() > 1.0
    api = composite(scene["bg"], [ObjectSpec(scene["obj1"], mask=scene["mask1"]),
                                  ObjectSpec(scene["obj2"], box=[250, 240, 400, 380])],
                    tiny_checkpoint, steps=2, guidance=2.0, seed=3, device="cpu", threads=1)
    assert np.array_equal(np.asarray(api), img)


def test_layout_auto_places_plain_objects_in_the_region_then_composites(scene, tiny_checkpoint, tmp_path):
    out = tmp_path / "auto.png"
    objects = ["--object", scene["obj1"], "--object", scene["obj2"]]
    r = _run("--background", scene["bg"], *objects, "--layout", "auto", "--region", "200,200,440,420",
             "--checkpoint", tiny_checkpoint, "--out", out, *STEPS)
    assert r.exit_code == 0, r.output
    img = np.asarray(Image.open(out).convert("RGB"))
    bg = np.asarray(Image.open(scene["bg"]).convert("RGB"))
    # the objects went into the region (pasted back within their expanded boxes, near it), not elsewhere
    assert np.array_equal(img[:150], bg[:150]) and np.array_equal(img[:, 500:], bg[:, 500:])
    assert np.abs(img[200:420, 200:440].astype(int) - bg[200:420, 200:440]).mean() > 1.0
    missing = _run("--background", scene["bg"], *objects, "--layout", "auto", "--checkpoint", tiny_checkpoint,
                   "--out", out, *STEPS)
    assert missing.exit_code == 2 and "--layout auto needs --region" in missing.output


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"obj_missing.png: no such file"),
    ("unreadable", r"not_an_image.png: cannot read the image"),
    ("mask_size", r"small_mask.png: size 100x80 does not match the background .*bg.png \(640x480\)"),
    ("box_outside", r"box .* lies outside the background .*640x480"),
    ("empty_mask", r"empty_mask.png: empty mask"),
    ("too_many", r"5 objects, but the model .* takes at most 4"),
    ("no_colon", r"expected IMG:MASK or IMG:x0,y0,x1,y1"),
    ("bad_out", r"unknown image extension '.xyz'"),
])
def test_cli_bad_inputs_fail_clearly(scene, tiny_checkpoint, tmp_path, case, pattern):
    d = scene["dir"]
    obj = f"{scene['obj1']}:{scene['mask1']}"
    objects = [obj]
    out = tmp_path / "x.png"
    if case == "missing":
        objects = [f"{d / 'obj_missing.png'}:{scene['mask1']}"]
    elif case == "unreadable":
        (tmp_path / "not_an_image.png").write_text("hello")
        objects = [f"{tmp_path / 'not_an_image.png'}:{scene['mask1']}"]
    elif case == "mask_size":
        Image.fromarray(np.full((80, 100), 255, np.uint8)).save(tmp_path / "small_mask.png")
        objects = [f"{scene['obj1']}:{tmp_path / 'small_mask.png'}"]
    elif case == "box_outside":
        objects = [f"{scene['obj1']}:600,400,700,470"]
    elif case == "empty_mask":
        Image.fromarray(np.zeros((480, 640), np.uint8)).save(tmp_path / "empty_mask.png")
        objects = [f"{scene['obj1']}:{tmp_path / 'empty_mask.png'}"]
    elif case == "too_many":
        objects = [obj] * 5
    elif case == "no_colon":
        objects = [str(scene["obj1"])]
    elif case == "bad_out":
        out = tmp_path / "x.xyz"
    args = ["--background", scene["bg"], "--checkpoint", tiny_checkpoint, "--out", out, *STEPS]
    for o in objects:
        args += ["--object", o]
    r = _run(*args)
    assert r.exit_code == 2, r.output
    import re

    assert re.search(pattern, " ".join(r.output.split())), r.output
    assert not out.exists()


def test_cli_missing_checkpoint_and_unreadable_background(scene, tmp_path):
    r = _run("--background", scene["bg"], "--object", f"{scene['obj1']}:{scene['mask1']}",
             "--checkpoint", tmp_path / "nope", "--out", tmp_path / "x.png", *STEPS)
    assert r.exit_code == 2 and "not a saved PICS model (missing config.json)" in r.output
    (tmp_path / "bg.jpg").write_bytes(b"\xff\xd8 broken")
    r = _run("--background", tmp_path / "bg.jpg", "--object", f"{scene['obj1']}:{scene['mask1']}",
             "--checkpoint", tmp_path / "nope", "--out", tmp_path / "x.png", *STEPS)
    assert r.exit_code == 2 and "bg.jpg: cannot read the image" in " ".join(r.output.split())


def _object_args(scene):
    return ["--background", scene["bg"], "--object", f"{scene['obj1']}:{scene['mask1']}"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_cli_refuses_corrupted_weights_naming_the_file(scene, tiny_checkpoint, tmp_path, damage):
    """A same-size byte flip used to composite an all-black region and exit 0; a truncated file
    ended in a safetensors traceback that did not name it."""
    import shutil

    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-4] + b"\xff\xff\xff\x7f" if damage == "flip" else data[: len(data) // 2])  # a NaN
    out = tmp_path / "comp.png"
    r = _run(*_object_args(scene), "--checkpoint", ckpt, "--out", out, *STEPS)
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and f"{weights}: " in r.output, r.output  # one line, naming the file
    assert not out.exists()


def test_cli_non_finite_model_output_is_an_error_not_an_image(scene, tmp_path):
    import torch

    from pics_model.config import get_preset
    from pics_model.modeling_pics import PICSModel

    torch.manual_seed(0)
    model = PICSModel(get_preset("tiny"))
    with torch.no_grad():
        model.unet.conv_out.bias.fill_(float("nan"))  # a diverged run, saved (and hashed) as it was
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "comp.png"
    r = _run(*_object_args(scene), "--checkpoint", tmp_path / "model", "--out", out, *STEPS)
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and "the denoised latents are NaN or inf" in r.output, r.output
    assert not out.exists()


def test_parse_object_specs():
    assert parse_object("a.png:m.png") == ObjectSpec("a.png", mask="m.png")
    assert parse_object("dir:with/a.png:1,2.5,30,40") == ObjectSpec("dir:with/a.png", box=[1.0, 2.5, 30.0, 40.0])
    with pytest.raises(CompositeInputError):
        parse_object("a.png:")


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    """The tiny model's weights saved twice: as converted from the reference (its config) and as ours."""
    import torch

    from pics_model.config import get_preset
    from pics_model.convert_reference import reference_config
    from pics_model.modeling_pics import PICSModel

    torch.manual_seed(0)
    model = PICSModel(get_preset("tiny"))
    with torch.no_grad():
        for blk in model.itb_blocks():  # a trained-like gate and back-attention, so the mode matters
            for p in blk.new_parameters():
                p.add_(torch.randn_like(p) * 0.2)
    root = tmp_path_factory.mktemp("refckpt")
    model.save_pretrained(root / "ours")
    model.config = reference_config(model.config)
    model.save_pretrained(root / "reference")
    return root


def _sample_dir(scene, d):
    """The scene in the reference's layout: image.jpg, object_k.png, object_k_mask.png."""
    d.mkdir()
    Image.open(scene["bg"]).save(d / "image.jpg", quality=95)
    w, h = scene["size"]
    for k, (obj, (x0, y0, x1, y1)) in enumerate([(scene["obj1"], (150, 200, 290, 330)),
                                                 (scene["obj2"], (250, 240, 400, 380))]):
        Image.open(obj).convert("RGB").save(d / f"object_{k}.png")
        m = np.zeros((h, w), np.uint8)
        m[y0:y1, x0:x1] = 255
        Image.fromarray(m).save(d / f"object_{k}_mask.png")
    return d


def test_sample_dir_with_a_converted_reference_folder_needs_no_flags(scene, reference_checkpoint, tmp_path):
    d = _sample_dir(scene, tmp_path / "sample")
    outs = {}
    for name in ("reference", "ours"):
        outs[name] = tmp_path / f"{name}.png"
        r = _run("--sample-dir", d, "--checkpoint", reference_checkpoint / name, "--out", outs[name], *STEPS)
        assert r.exit_code == 0, r.output
    img = np.asarray(Image.open(outs["reference"]).convert("RGB")).astype(int)
    bg = np.asarray(Image.open(d / "image.jpg").convert("RGB")).astype(int)
    # the reference folder pastes back inside the x1.1 boxes: the ring out to x1.15 is background
    # (box 2, 150x140 px centred at (325, 310): x1.1 ends at x = 407.5, x1.15 at x = 411.25)
    assert np.array_equal(img[250:370, 408:411], bg[250:370, 408:411])
    ours = np.asarray(Image.open(outs["ours"]).convert("RGB")).astype(int)
    assert np.abs(ours[250:370, 408:411] - bg[250:370, 408:411]).mean() > 1.0
    # mode and mask rule come from the folder: same weights, different composite inside the boxes
    assert np.abs(img[240:330, 250:290] - ours[240:330, 250:290]).mean() > 1.0


@pytest.mark.parametrize("case, pattern", [
    ("no_image", r"missing image.jpg"),
    ("no_mask", r"object_1.png has no placement mask object_1_mask.png"),
    ("gap", r"\['object_3.png'\] do not continue object_0..object_1"),
    ("both", r"--sample-dir replaces --background and --object"),
])
def test_sample_dir_bad_layouts_fail_clearly(scene, tiny_checkpoint, tmp_path, case, pattern):
    d = _sample_dir(scene, tmp_path / "sample")
    extra = []
    if case == "no_image":
        (d / "image.jpg").unlink()
    elif case == "no_mask":
        (d / "object_1_mask.png").unlink()
    elif case == "gap":
        (d / "object_3.png").write_bytes((d / "object_1.png").read_bytes())  # no object_2: a gap
    elif case == "both":
        extra = ["--background", scene["bg"]]
    r = _run("--sample-dir", d, *extra, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "x.png", *STEPS)
    assert r.exit_code == 2, r.output
    import re

    assert re.search(pattern, " ".join(r.output.split())), r.output
