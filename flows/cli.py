"""``pics``: the command line. Each command loads params.yaml, applies overrides, runs a flow.

Options named on a command are shorthands for ``--set section.key=value``; ``--set`` wins last.
Imports of the flows are lazy so that ``pics --help`` stays fast.
"""
from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

import flows  # noqa: F401  (sets the offline environment before Prefect is imported)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

SetOpt = typer.Option(None, "--set", help="Override a parameter: section.key=value (repeatable).")
ParamsOpt = typer.Option(None, "--params", exists=True, dir_okay=False,
                         help="params.yaml to read (default: the checkout's; for an installed pics, the working folder's).")


def _overrides(section: str, named: dict, extra: Optional[list[str]]) -> list[str]:
    from tasks.params import quote_value

    # Paths typed on the command line are relative to the current folder, not the repository, and
    # are strings whatever they hold: quoted, so the YAML that reads overrides keeps them whole.
    named = {k: (quote_value(v.resolve()) if isinstance(v, Path) else v) for k, v in named.items()}
    out = [f"{section}.{k}={v}" for k, v in named.items() if v is not None]
    return out + list(extra or [])


def _params_file(params: Optional[Path]) -> str:
    """--params, else the project's params.yaml: a missing one fails here, before a flow starts."""
    from tasks.params import default_params_file

    return str(params or default_params_file())


def _fail(e: object) -> None:
    from tasks.quarantine import LIMIT_EXIT_CODE, QuarantineLimitError

    typer.secho(str(e), fg=typer.colors.RED, err=True)
    raise typer.Exit(LIMIT_EXIT_CODE if isinstance(e, QuarantineLimitError) else 2)


# Causes of a failed write that the person running the command can fix: one line, no traceback.
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


@contextmanager
def _user_errors(*errors: type[Exception]):
    """Bad parameters or inputs (``errors``), and an output that cannot be written (read-only, no
    permission, disk full), end the command with one red line and exit code 2."""
    from tasks.params import ParamsError

    try:
        yield
    except (ParamsError, *errors) as e:
        _fail(e)
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        _fail(f"{e.filename or 'an output file'}: {e.strerror}")


@app.command("make-sample")
def make_sample(
    out: Optional[Path] = typer.Option(None, help="Output folder for the generated dataset."),
    num_images: Optional[int] = typer.Option(None, help="Number of images to render."),
    set_: Optional[list[str]] = SetOpt,
    params: Optional[Path] = ParamsOpt,
):
    """Render the embedded LVIS-format dataset (objects that occlude and touch)."""
    from flows.make_sample import make_sample_flow

    with _user_errors():
        make_sample_flow(overrides=_overrides("make_sample", {"out": out, "num_images": num_images}, set_),
                         params_file=_params_file(params))


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
    from tasks.quarantine import QuarantineLimitError

    named = {"annotations": annotations, "images": images, "out": out}
    with _user_errors(InputError, QuarantineLimitError):
        decompose_flow(overrides=_overrides("decompose", named, set_), params_file=_params_file(params))


@app.command("show-samples")
def show_samples(
    samples: Path = typer.Argument(..., help="A decompose output folder."),
    out: Optional[Path] = typer.Option(None, help="PNG to write (default: DIR/samples.png)."),
    n: int = typer.Option(8, help="Number of samples to draw."),
):
    """Draw a grid of decomposed samples: target, masked background, patches, region masks."""
    from tasks.decompose.visualize import write_sample_grid
    from tasks.shards import list_shards

    if not list_shards(samples):  # also keeps a mistyped folder from being created by the write
        _fail(f"{samples}: no sample shards (shard-*.parquet) there; give a decompose output folder")
    with _user_errors():
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
    from tasks.decompose.inputs import InputError
    from tasks.quarantine import QuarantineLimitError

    with _user_errors(InputError, QuarantineLimitError):
        import_webdataset_flow(tars=[str(t) for t in tars], out=str(out), overrides=list(set_ or []),
                               params_file=_params_file(params))


@app.command("render-priors")
def render_priors(
    samples: Optional[Path] = typer.Option(None, help="A decompose output folder."),
    out: Optional[Path] = typer.Option(None, help="Output folder for prior shards."),
    set_: Optional[list[str]] = SetOpt,
    params: Optional[Path] = ParamsOpt,
):
    """Reconstruct each object in 3D and render K views (multi-view shape priors)."""
    from flows.render_priors import render_priors_flow
    from tasks.quarantine import QuarantineLimitError

    with _user_errors(QuarantineLimitError):
        render_priors_flow(overrides=_overrides("render_priors", {"samples": samples, "out": out}, set_),
                           params_file=_params_file(params))


@app.command()
def train(set_: Optional[list[str]] = SetOpt, params: Optional[Path] = ParamsOpt):
    """Train the PICS model with Ray Train."""
    from flows.train import train_flow
    from pics_model.modeling_pics import WeightsError
    from tasks.train.checkpoint import CheckpointError

    with _user_errors(CheckpointError, WeightsError):
        train_flow(overrides=list(set_ or []), params_file=_params_file(params))


@app.command()
def evaluate(set_: Optional[list[str]] = SetOpt, params: Optional[Path] = ParamsOpt):
    """Evaluate a checkpoint on the test split: metrics, baselines, report."""
    from flows.evaluate import evaluate_flow
    from pics_model.pipeline_pics import NonFiniteOutputError
    from tasks.evaluate.stage import EvaluateInputError

    with _user_errors(EvaluateInputError, NonFiniteOutputError):
        evaluate_flow(overrides=list(set_ or []), params_file=_params_file(params))


@app.command()
def pipeline(
    set_: Optional[list[str]] = SetOpt,
    name: Optional[str] = typer.Option(None, help="DVC experiment name."),
    in_workspace: bool = typer.Option(False, help="Run in the workspace instead of a temporary copy."),
):
    """Run the whole pipeline as one DVC experiment (`dvc exp run -S ...`)."""
    from flows.pipeline import pipeline_flow
    from tasks.params import ParamsError

    try:
        pipeline_flow(overrides=list(set_ or []), experiment_name=name, temp=not in_workspace)
    except ParamsError as e:
        _fail(e)


@app.command()
def serve(only: Optional[list[str]] = typer.Argument(None, help="Deployment names (default: all).")):
    """Serve every stage and the pipeline as Prefect deployments from this process."""
    from flows.serve import serve_all

    serve_all(only or None)


@app.command()
def composite(
    background: Optional[Path] = typer.Option(None, help="Background image."),
    object_: Optional[list[str]] = typer.Option(None, "--object",
                                                help="IMG:MASK or IMG:x0,y0,x1,y1 (repeatable, in order); IMG with --layout auto."),
    sample_dir: Optional[Path] = typer.Option(None, help="Instead of --background/--object: a folder in the "
                                              "reference's layout (image.jpg, object_k.png, object_k_mask.png)."),
    checkpoint: Path = typer.Option(..., help="A saved PICS model folder (e.g. data/train/final)."),
    out: Path = typer.Option(..., help="Composite image to write (.png, .jpg)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (default: evaluate.steps)."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance (default: evaluate.guidance)."),
    scheduler: Optional[str] = typer.Option(None, help="ddim | dpmsolver++ (default: evaluate.scheduler)."),
    seed: Optional[int] = typer.Option(None, help="Noise seed (default: evaluate.seed)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: one per core)."),
    layout: Optional[str] = typer.Option(None, help="auto: --object values are plain images, laid out in "
                                         "--region first (the layout: section of params.yaml)."),
    region: Optional[str] = typer.Option(None, help="x0,y0,x1,y1: where --layout auto puts the objects."),
    params: Optional[Path] = ParamsOpt,
):
    """Composite objects into a background with a trained checkpoint."""
    from flows.composite import CompositeInputError, composite_cli
    from pics_model.modeling_pics import WeightsError
    from pics_model.pipeline_pics import NonFiniteOutputError

    with _user_errors(CompositeInputError, WeightsError, NonFiniteOutputError):
        path = composite_cli(str(background) if background else None, object_, str(checkpoint), str(out),
                             steps=steps, guidance=guidance, scheduler=scheduler, seed=seed, device=device,
                             threads=threads, params_file=str(params) if params else None,
                             sample_dir=str(sample_dir) if sample_dir else None, layout=layout, region=region)
    typer.echo(str(path))


@app.command()
def layout(
    elements: list[Path] = typer.Option(..., "--elements", help="Element images or folders of them (silhouette: "
                                        "alpha, else non-white pixels); more may follow as arguments."),
    more_elements: Optional[list[Path]] = typer.Argument(None, help="More element images (e.g. --elements dir/*.png)."),
    target: Path = typer.Option(..., help="Target mask (white inside, or alpha)."),
    out: Path = typer.Option(..., help="Output folder: layout.json, masks/, collage.png, metrics.json."),
    set_: Optional[list[str]] = SetOpt,
    params: Optional[Path] = ParamsOpt,
):
    """Pack elements into a target shape: image-space collage by differentiable rendering."""
    from tasks.layout.io import LayoutInputError
    from tasks.layout.stage import run_files
    from tasks.params import load_params

    with _user_errors(LayoutInputError):
        p = load_params(_params_file(params), list(set_ or [])).layout
        metrics = run_files([*elements, *(more_elements or [])], target, out, p)
    typer.echo(" ".join(f"{k}={v}" for k, v in metrics.items()))


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
