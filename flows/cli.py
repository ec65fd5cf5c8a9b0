"""``pics``: the command line. Each command loads params.yaml, applies overrides, runs a flow.

Options named on a command are shorthands for ``--set section.key=value``; ``--set`` wins last.
Imports of the flows are lazy so that ``pics --help`` stays fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

import flows  # noqa: F401  (sets the offline environment before Prefect is imported)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

SetOpt = typer.Option(None, "--set", help="Override a parameter: section.key=value (repeatable).")
ParamsOpt = typer.Option(None, "--params", help="params.yaml to read (default: the repository's).")


def _overrides(section: str, named: dict, extra: Optional[list[str]]) -> list[str]:
    # Paths typed on the command line are relative to the current folder, not the repository.
    named = {k: (v.resolve() if isinstance(v, Path) else v) for k, v in named.items()}
    out = [f"{section}.{k}={v}" for k, v in named.items() if v is not None]
    return out + list(extra or [])


def _fail(e: Exception) -> None:
    typer.secho(str(e), fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command("make-sample")
def make_sample(
    out: Optional[Path] = typer.Option(None, help="Output folder for the generated dataset."),
    num_images: Optional[int] = typer.Option(None, help="Number of images to render."),
    set_: Optional[list[str]] = SetOpt,
    params: Optional[Path] = ParamsOpt,
):
    """Render the embedded LVIS-format dataset (objects that occlude and touch)."""
    from flows.make_sample import make_sample_flow
    from tasks.params import ParamsError

    try:
        make_sample_flow(overrides=_overrides("make_sample", {"out": out, "num_images": num_images}, set_),
                         params_file=str(params) if params else None)
    except ParamsError as e:
        _fail(e)


@app.command()
def decompose(
    annotations: Optional[Path] = typer.Option(None, help="LVIS v1/v0.5 or COCO instances JSON."),
    images: Optional[Path] = typer.Option(None, help="Image root folder."),
    out: Optional[Path] = typer.Option(None, help="Output folder (shards/, quarantine.parquet, manifest.json)."),
    set_: Optional[list[str]] = SetOpt,
    params: Optional[Path] = ParamsOpt,
):
    """Mine interacting object groups and write training shards."""
    from flows.decompose import decompose_flow
    from tasks.decompose.inputs import InputError
    from tasks.params import ParamsError

    named = {"annotations": annotations, "images": images, "out": out}
    try:
        decompose_flow(overrides=_overrides("decompose", named, set_), params_file=str(params) if params else None)
    except (ParamsError, InputError) as e:
        _fail(e)


@app.command("show-samples")
def show_samples(
    samples: Path = typer.Argument(..., help="A decompose output folder."),
    out: Optional[Path] = typer.Option(None, help="PNG to write (default: DIR/samples.png)."),
    n: int = typer.Option(8, help="Number of samples to draw."),
):
    """Draw a grid of decomposed samples: target, masked background, patches, region masks."""
    from tasks.decompose.visualize import write_sample_grid

    path = write_sample_grid(samples, out, n=n)
    typer.echo(str(path))


@app.command("import-webdataset")
def import_webdataset(
    tars: list[Path] = typer.Argument(..., help="Reference WebDataset .tar shards."),
    out: Path = typer.Option(..., help="Output folder in our shard schema."),
    set_: Optional[list[str]] = SetOpt,
    params: Optional[Path] = ParamsOpt,
):
    """Import the reference implementation's tar shards (bg.jpg, obj0.png, mask0.png, ...)."""
    from flows.decompose import import_webdataset_flow
    from tasks.params import ParamsError

    try:
        import_webdataset_flow(tars=[str(t) for t in tars], out=str(out), overrides=list(set_ or []),
                               params_file=str(params) if params else None)
    except ParamsError as e:
        _fail(e)


@app.command("render-priors")
def render_priors(
    samples: Optional[Path] = typer.Option(None, help="A decompose output folder."),
    out: Optional[Path] = typer.Option(None, help="Output folder for prior shards."),
    set_: Optional[list[str]] = SetOpt,
    params: Optional[Path] = ParamsOpt,
):
    """Reconstruct each object in 3D and render K views (multi-view shape priors)."""
    from flows.render_priors import render_priors_flow
    from tasks.params import ParamsError

    try:
        render_priors_flow(overrides=_overrides("render_priors", {"samples": samples, "out": out}, set_),
                           params_file=str(params) if params else None)
    except ParamsError as e:
        _fail(e)


@app.command()
def train(set_: Optional[list[str]] = SetOpt, params: Optional[Path] = ParamsOpt):
    """Train the PICS model with Ray Train."""
    from flows.train import train_flow
    from tasks.params import ParamsError

    try:
        train_flow(overrides=list(set_ or []), params_file=str(params) if params else None)
    except ParamsError as e:
        _fail(e)


@app.command()
def evaluate(set_: Optional[list[str]] = SetOpt, params: Optional[Path] = ParamsOpt):
    """Evaluate a checkpoint on the test split: metrics, baselines, report."""
    from flows.evaluate import evaluate_flow
    from tasks.params import ParamsError

    try:
        evaluate_flow(overrides=list(set_ or []), params_file=str(params) if params else None)
    except ParamsError as e:
        _fail(e)


@app.command()
def pipeline(
    set_: Optional[list[str]] = SetOpt,
    name: Optional[str] = typer.Option(None, help="DVC experiment name."),
    in_workspace: bool = typer.Option(False, help="Run in the workspace instead of a temporary copy."),
):
    """Run the whole pipeline as one DVC experiment (`dvc exp run -S ...`)."""
    import yaml

    from flows.pipeline import pipeline_flow
    from tasks.params import ParamsError

    overrides = {}
    for s in set_ or []:
        k, _, v = s.partition("=")
        overrides[k] = yaml.safe_load(v)
    try:
        pipeline_flow(overrides=overrides, experiment_name=name, temp=not in_workspace)
    except ParamsError as e:
        _fail(e)


@app.command()
def serve(only: Optional[list[str]] = typer.Argument(None, help="Deployment names (default: all).")):
    """Serve every stage and the pipeline as Prefect deployments from this process."""
    from flows.serve import serve_all

    serve_all(only or None)


@app.command()
def composite(
    background: Path = typer.Option(..., help="Background image."),
    object_: list[str] = typer.Option(..., "--object", help="IMG:MASK or IMG:x0,y0,x1,y1 (repeatable, in order)."),
    checkpoint: Path = typer.Option(..., help="A saved PICS model folder (e.g. data/train/final)."),
    out: Path = typer.Option(..., help="Composite image to write (.png, .jpg)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: evaluate.steps)."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance (default: evaluate.guidance)."),
    scheduler: Optional[str] = typer.Option(None, help="ddim | dpmsolver++ (default: evaluate.scheduler)."),
    seed: Optional[int] = typer.Option(None, help="Noise seed (default: evaluate.seed)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: one per core)."),
    params: Optional[Path] = ParamsOpt,
):
    """Composite objects into a background with a trained checkpoint."""
    from flows.composite import CompositeInputError, composite_cli
    from tasks.params import ParamsError

    try:
        path = composite_cli(str(background), object_, str(checkpoint), str(out), steps=steps, guidance=guidance,
                             scheduler=scheduler, seed=seed, device=device, threads=threads,
                             params_file=str(params) if params else None)
    except (CompositeInputError, ParamsError) as e:
        _fail(e)
    typer.echo(str(path))


@app.command()
def results(
    evaluate: Optional[Path] = typer.Option(None, help="Evaluate metrics (default: <evaluate.out>/metrics.json)."),
    train: Optional[Path] = typer.Option(None, help="Train metrics (default: <train.out>/metrics.json)."),
    readme: Optional[Path] = typer.Option(None, help="README to rewrite (default: the repository's)."),
    out: Optional[Path] = typer.Option(None, help="Snapshot folder in git (default: docs/results)."),
    check: bool = typer.Option(False, "--check", help="Only check that the README matches the snapshot."),
    params: Optional[Path] = ParamsOpt,
):
    """Write the README's results section and figures from the run's metrics files (a snapshot in docs/results)."""
    from tasks import results as res
    from tasks.params import REPO_ROOT, ParamsError, load_params, resolve_path

    readme = (readme or REPO_ROOT / "README.md").resolve()
    out = (out or REPO_ROOT / "docs" / "results").resolve()
    try:
        if check:
            problem = res.check_readme(readme, out)
            if problem:
                _fail(res.ResultsError(problem))
            typer.echo(f"{readme}: results section matches {out}")
            return
        p = load_params(params, [])
        ev = (evaluate or resolve_path(p.evaluate.out) / "metrics.json").resolve()
        tr_dir = (train.parent if train else resolve_path(p.train.out)).resolve()
        res.snapshot(ev, (train or tr_dir / "metrics.json").resolve(), tr_dir / "occlusion.csv", out)
        for fig in res.draw_figures(out):
            typer.echo(str(fig))
        res.write_readme(readme, out)
    except (res.ResultsError, ParamsError) as e:
        _fail(e)
    typer.echo(str(readme))


if __name__ == "__main__":
    app()
