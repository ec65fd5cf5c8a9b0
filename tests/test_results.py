"""The README's results section is generated from metrics files (`pics results`), never typed."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from flows.cli import app
from tasks import results
from tasks.params import REPO_ROOT

BEGIN, END = results.markers()

EVALUATE = {
    "n_samples": 36, "n_failed": 0,
    "pics": {"n": 36, "mpsnr": 13.7012, "mssim": 0.41234, "mlpips_mobilenetv2_proxy": 0.2871, "psnr": 19.98,
             "occlusion_accuracy": 0.61234, "occlusion_accuracy_ci95": [0.55012, 0.67345],
             "occlusion_coverage": 0.83, "occlusion_accuracy_by_level": {"16x16": 0.64, "8x8": 0.58},
             "occlusion_coverage_by_level": {"16x16": 0.9, "8x8": 0.7}},
    "sequential": {"n": 36, "mpsnr": 13.3, "mssim": 0.4, "mlpips_mobilenetv2_proxy": 0.3, "psnr": 19.5},
    "untrained": {"n": 36, "mpsnr": 9.2, "mssim": 0.3, "mlpips_mobilenetv2_proxy": 0.4, "psnr": 15.0,
                  "occlusion_accuracy": 0.5, "occlusion_accuracy_ci95": [0.5, 0.5], "occlusion_coverage": 0.83},
    "copy_paste": {"n": 36, "mpsnr": 24.68, "mssim": 0.9, "mlpips_mobilenetv2_proxy": 0.05, "psnr": 30.1},
    "paired": {"pics_vs_untrained": {"mpsnr": {"mean": 4.5012, "ci95": [3.9, 5.1], "wins": 33, "n": 36},
                                     "occlusion_accuracy": {"mean": 0.11234, "ci95": [0.05, 0.17], "n": 36}},
               "pics_vs_sequential": {"mpsnr": {"mean": 0.4, "ci95": [-0.1, 0.9], "wins": 20, "n": 36}}},
}
TRAIN = {"steps": 300, "heldout_loss_initial": 1.1, "heldout_loss_final": 0.051, "autoencoder_psnr_before": 11.0,
         "autoencoder_psnr_after": 20.2, "occlusion_accuracy_initial": 0.5, "occlusion_accuracy_final": 0.6,
         "occlusion_accuracy_final_ci95": [0.52, 0.68], "occlusion_samples": 16}
CURVE = ("step,weights,accuracy,ci95_low,ci95_high,coverage,ties,samples\n0,raw,0.5,0.5,0.5,0.8,1.0,16\n"
         "300,raw,0.58,0.5,0.66,0.8,0.0,16\n300,ema,0.6,0.52,0.68,0.8,0.0,16\n")


def _run(tmp_path, *extra):
    run = tmp_path / "data"
    (run / "evaluate").mkdir(parents=True, exist_ok=True)
    (run / "train").mkdir(parents=True, exist_ok=True)
    (run / "evaluate" / "metrics.json").write_text(json.dumps(EVALUATE))
    (run / "train" / "metrics.json").write_text(json.dumps(TRAIN))
    (run / "train" / "occlusion.csv").write_text(CURVE)
    readme = tmp_path / "README.md"
    if not readme.exists():
        readme.write_text(f"# x\n\n## Results\n\n{BEGIN}\nhand-typed 0.64\n{END}\n\n## After\n")
    args = ["results", "--evaluate", str(run / "evaluate" / "metrics.json"), "--train",
            str(run / "train" / "metrics.json"), "--readme", str(readme), "--out", str(tmp_path / "docs" / "results")]
    return CliRunner().invoke(app, args + list(extra)), readme


def test_results_command_writes_the_block_and_figures_from_the_metrics(tmp_path):
    res, readme = _run(tmp_path)
    assert res.exit_code == 0, res.output
    text = readme.read_text()
    assert "hand-typed 0.64" not in text and text.startswith("# x\n\n## Results\n\n") and text.endswith("## After\n")
    block = results.current_block(readme)
    for shown in ("| PICS | 13.70 | 0.412 | 0.287 | 19.98 | 0.612 [0.550, 0.673] | 0.830 | 36 |",
                  "| PICS - untrained | +4.50 [+3.90, +5.10] | 33/36 |", "+0.112 [+0.050, +0.170]",
                  "16x16 0.640 (coverage 0.900)", "held-out occlusion accuracy 0.500 -> 0.600 [0.520, 0.680] on 16",
                  "![methods](docs/results/methods.png)"):
        assert shown in block, shown
    snap = tmp_path / "docs" / "results"
    assert json.loads((snap / results.EVALUATE).read_text()) == EVALUATE
    assert (snap / results.METHODS_PNG).stat().st_size > 0 and (snap / results.CURVE_PNG).stat().st_size > 0
    assert CliRunner().invoke(app, ["results", "--check", "--readme", str(readme), "--out", str(snap)]).exit_code == 0
    # the same metrics give the same README; a snapshot that moves on makes the check fail
    again, _ = _run(tmp_path)
    assert again.exit_code == 0 and readme.read_text() == text
    (snap / results.EVALUATE).write_text(json.dumps({**EVALUATE, "n_samples": 35}))
    stale = CliRunner().invoke(app, ["results", "--check", "--readme", str(readme), "--out", str(snap)])
    assert stale.exit_code == 2 and "run `pics results`" in stale.output


def test_results_command_names_a_missing_metrics_file(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{BEGIN}\n{END}\n")
    res = CliRunner().invoke(app, ["results", "--evaluate", str(tmp_path / "none.json"), "--readme", str(readme),
                                   "--out", str(tmp_path / "snap")])
    assert res.exit_code == 2 and "none.json" in res.output and "pics evaluate" in res.output


def test_a_second_block_has_its_own_markers_and_snapshot(tmp_path):
    """`--block results-long` writes its own block from its own snapshot and leaves the main one."""
    readme = tmp_path / "README.md"
    begin, end = results.markers("results-long")
    readme.write_text(f"{BEGIN}\nmain\n{END}\n\n{begin}\nhand-typed\n{end}\n")
    res, _ = _run(tmp_path, "--block", "results-long")
    assert res.exit_code == 0, res.output
    text = readme.read_text()
    assert f"{BEGIN}\nmain\n{END}" in text and "hand-typed" not in text
    assert "| PICS | 13.70 |" in results.current_block(readme, "results-long")
    snap = str(tmp_path / "docs" / "results")
    check = ["results", "--check", "--readme", str(readme), "--out", snap]
    assert CliRunner().invoke(app, check + ["--block", "results-long"]).exit_code == 0
    assert CliRunner().invoke(app, check).exit_code == 2  # the main block is still hand-typed


def test_repository_readme_is_what_its_results_snapshot_generates():
    assert results.check_readme(REPO_ROOT / "README.md", REPO_ROOT / "docs" / "results") is None
    assert results.check_readme(REPO_ROOT / "README.md", REPO_ROOT / "docs" / "results" / "long",
                                "results-long") is None
