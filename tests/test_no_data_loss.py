"""No run may lose data: paths stay strings, a stage touches only folders it owns, a missing input
fails before anything is touched, and an unwritable output is one line, not a traceback.

Every test drives the real ``pics`` command (typer's CliRunner). Those that run a flow start the
session's Prefect test server and are marked slow.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks import shards
from tasks.decompose.pipeline import run_serial
from tasks.decompose.synthetic import write_reference_tar, write_synthetic_lvis
from tasks.params import DecomposeParams, ParamsError, load_params


# write_reference_tar adds one incomplete sample to its good ones: above the default quarantine limit
ONE_BAD_SAMPLE_OK = ("--set", "decompose.max_quarantine_fraction=0.5")

def pics(*args) -> "CliRunner.invoke":
    return CliRunner().invoke(app, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def params_file(tmp_path) -> Path:
    """A small params file of our own (the repository's may be mid-edit by another stage)."""
    f = tmp_path / "params.yaml"
    f.write_text("make_sample:\n  num_images: 2\n  width: 96\n  height: 72\n  chunk_size: 2\n  num_workers: 1\n"
                 "decompose:\n  grid_samples: 0\n  shard_size: 4\n")
    return f


@pytest.fixture(scope="module")
def decomposed(tmp_path_factory) -> Path:
    """A real (small) decompose output folder, made without Prefect."""
    d = tmp_path_factory.mktemp("decomposed")
    ann, img = write_synthetic_lvis(d / "src", n_images=6, width=160, height=120, seed=5)
    run_serial(DecomposeParams(shard_size=4, grid_samples=0), ann, img, d / "out")
    return d / "out"


# -- paths are strings -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["a #b", "x: y"])
def test_out_path_with_yaml_syntax_is_used_whole(prefect_harness, tmp_path, params_file, name):
    """Old code: ``--out 'a #b'`` became ``a`` (and replaced it); ``--out 'x: y'`` failed as a dict."""
    cut = tmp_path / "a"  # what YAML made of 'a #b': it must stay as it is
    cut.mkdir()
    (cut / "keep.txt").write_text("mine")
    r = pics("make-sample", "--out", tmp_path / name, "--params", params_file)
    assert r.exit_code == 0, r.output
    assert (tmp_path / name / "annotations.json").is_file()
    assert snapshot(cut) == {"keep.txt": b"mine"}


# -- a stage deletes only what it wrote ------------------------------------------------------------

@pytest.mark.slow
def test_make_sample_refuses_a_folder_with_files_it_did_not_write(prefect_harness, tmp_path, params_file):
    """Old code replaced the whole ``--out`` folder (atomic rename), whatever it held."""
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "photos" / "cat.jpg").write_bytes(b"not a sample")
    before = snapshot(home)
    r = pics("make-sample", "--out", home, "--params", params_file)
    assert r.exit_code == 2 and "not marked as an output folder of make_sample" in r.output, r.output
    assert snapshot(home) == before and not (home / shards.STAGE_MARKER).exists()
    # its own folder it replaces again and again
    assert pics("make-sample", "--out", tmp_path / "s", "--params", params_file).exit_code == 0
    r = pics("make-sample", "--out", tmp_path / "s", "--params", params_file)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s" / shards.STAGE_MARKER).read_text()) == {"stage": "make_sample"}


@pytest.mark.slow
def test_decompose_refuses_another_stages_output(prefect_harness, tmp_path, params_file):
    """Old code: decompose's resume wiped shards/, _progress/, manifest.json of any folder given."""
    ann, img = write_synthetic_lvis(tmp_path / "src", n_images=4, width=160, height=120, seed=2)
    tar = tmp_path / "ref-000000.tar"
    write_reference_tar(tar, n_good=2, seed=0)
    imported = tmp_path / "imported"
    assert pics("import-webdataset", tar, "--out", imported, "--params", params_file, *ONE_BAD_SAMPLE_OK).exit_code == 0
    before = snapshot(imported)
    r = pics("decompose", "--annotations", ann, "--images", img, "--out", imported, "--params", params_file)
    assert r.exit_code == 2 and "holds the output of import_webdataset, not of decompose" in r.output, r.output
    assert snapshot(imported) == before


@pytest.mark.slow
def test_render_priors_refuses_an_unmarked_folder(prefect_harness, tmp_path, params_file, decomposed):
    mine = tmp_path / "mine"
    (mine / "shards").mkdir(parents=True)
    (mine / "shards" / "notes.txt").write_text("not priors")
    r = pics("render-priors", "--samples", decomposed, "--out", mine, "--params", params_file)
    assert r.exit_code == 2 and "not marked as an output folder of render_priors" in r.output, r.output
    assert snapshot(mine) == {"shards/notes.txt": b"not priors"}


def test_marked_folder_with_foreign_files_is_refused(tmp_path, decomposed):
    """The marker alone is not enough: a file the stage did not write would go with the folder."""
    ann, img = write_synthetic_lvis(tmp_path / "src", n_images=4, width=160, height=120, seed=2)
    out = tmp_path / "out"
    p = DecomposeParams(shard_size=4, grid_samples=0)
    run_serial(p, ann, img, out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(shards.OutputNotOwnedError, match="did not write \\(notes.txt\\)"):
        run_serial(p.model_copy(update={"seed": 1}), ann, img, out)  # a changed fingerprint would clean the folder
    assert snapshot(out) == before


# -- missing inputs fail before anything is touched ------------------------------------------------

@pytest.mark.slow
def test_import_of_a_missing_tar_fails_and_keeps_the_previous_import(prefect_harness, tmp_path, params_file):
    """Old code: exit 0, the previous import's shards deleted, an empty manifest written."""
    tar = tmp_path / "ref-000000.tar"
    write_reference_tar(tar, n_good=2, seed=0)
    out = tmp_path / "imported"
    assert pics("import-webdataset", tar, "--out", out, "--params", params_file, *ONE_BAD_SAMPLE_OK).exit_code == 0
    before = snapshot(out)
    r = pics("import-webdataset", tmp_path / "typo.tar", "--out", out, "--params", params_file)
    assert r.exit_code == 2 and f"{tmp_path / 'typo.tar'}: no such tar file" in r.output, r.output
    assert snapshot(out) == before


def test_show_samples_on_a_missing_folder_creates_nothing(tmp_path):
    """Old code: exit 0, the folder created, an empty grid drawn into it."""
    r = pics("show-samples", tmp_path / "typo")
    assert r.exit_code == 2 and "no sample shards" in r.output
    assert not (tmp_path / "typo").exists()


def test_params_naming_a_missing_file_is_an_error(tmp_path):
    """Old code: a missing ``--params`` file silently meant the defaults."""
    r = pics("composite", "--background", "bg.png", "--object", "o.png:m.png", "--checkpoint", "ck",
             "--out", tmp_path / "c.png", "--params", tmp_path / "typo.yaml")
    assert r.exit_code == 2 and "typo.yaml" in r.output and "does not exist" in r.output
    with pytest.raises(ParamsError, match="typo.yaml: no such params file"):  # a Python caller's load_params
        load_params(tmp_path / "typo.yaml")


def test_params_file_with_a_repeated_key_or_section_is_an_error(tmp_path):
    """Old code: PyYAML kept the last of the repeated keys, silently."""
    f = tmp_path / "params.yaml"
    for text, key, line in [("evaluate:\n  steps: 5\n  seed: 1\n  steps: 50\n", "steps", 4),
                            ("evaluate:\n  steps: 5\nmodel:\n  tau: 1.0\nevaluate:\n  seed: 2\n", "evaluate", 5)]:
        f.write_text(text)
        r = pics("composite", "--background", "bg.png", "--object", "o.png:m.png", "--checkpoint", "ck",
                 "--out", tmp_path / "c.png", "--params", f)
        assert r.exit_code == 2, r.output
        assert str(f) in r.output and f"key '{key}' repeats" in r.output and f"line {line}" in r.output


# -- an unwritable output is one line ----------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(where: Path, options: str):
    """A small tmpfs mounted at ``where`` (root can write through chmod, not through a read-only
    or full mount); skips where mounting is not allowed."""
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, f"pics-test-{uuid.uuid4().hex[:6]}", str(where)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("options, cause", [("ro,size=64k", "Read-only file system"),
                                            ("size=8k", "No space left on device")])
def test_unwritable_output_is_one_line(tmp_path, decomposed, options, cause):
    with tmpfs(tmp_path / "mnt", options) as mnt:
        target = mnt / "grid.png"
        r = pics("show-samples", decomposed, "--out", target, "--n", "4")
        assert r.exit_code == 2, r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)
        assert r.output.strip() == f"{target}: {cause}"


@pytest.mark.slow
def test_read_only_output_of_a_flow_is_one_line(prefect_harness, tmp_path, params_file):
    with tmpfs(tmp_path / "mnt", "ro,size=64k") as mnt:
        r = pics("make-sample", "--out", mnt / "sample", "--params", params_file)
        assert r.exit_code == 2, r.output
        assert r.output.strip().splitlines()[-1] == f"{mnt / 'sample'}: Read-only file system"
