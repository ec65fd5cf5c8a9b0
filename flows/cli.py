"""``pics``: the command line, the one entry point of the pipeline (dvc.yaml's stages call it too).

Each command reads params.yaml (or ``--params FILE``), applies its options and ``--set`` overrides and
validates them all before it imports a flow (Prefect, Ray): a bad key or value ends the command at
once with one line that names the key and where it came from, exit code 2. Options named on a
command are shorthands for ``--set section.key=value``; ``--set`` wins last.
"""
from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

import flows  # noqa: F401  (sets the offline environment before Prefect is imported)

if TYPE_CHECKING:
    from tasks.params import Params

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

SetOpt = typer.Option(None, "--set", help="Override a parameter: section.key=value (repeatable).")
ParamsOpt = typer.Option(None, "--params", exists=True, dir_okay=False,
                         help="params.yaml to read (default: the working folder's, else the checkout's).")
SamplesOpt = typer.Option(None, "--samples", help="A decompose output folder.")


def _overrides(section: str, named: dict, extra: Optional[list[str]]) -> list[str]:
    from tasks.params import quote_value

    # Paths typed on the command line are relative to the current folder, not the repository, and
    # are strings whatever they hold: quoted, so the YAML that reads overrides keeps them whole.
    named = {k: (quote_value(v.resolve()) if isinstance(v, Path) else v) for k, v in named.items()}
    out = [f"{section}.{k}={v}" for k, v in named.items() if v is not None]
    return out + list(extra or [])


def _params(params: Optional[Path], set_: Optional[list[str]], section: str = "", named: Optional[dict] = None,
            missing_ok: bool = False) -> "Params":
    """--params (else the project's params.yaml) with the command's options and --set applied,
    validated here, before any flow is imported; a bad one ends the command (exit 2).
    missing_ok: no params.yaml anywhere means the schema's defaults (commands that run no stage)."""
    from tasks.params import ParamsError, load_params

    try:
        return load_params(params, _overrides(section, named or {}, set_), missing_ok=missing_ok)
    except ParamsError as e:
        _fail(e)


def _fail(e: object, code: int = 2) -> None:
    typer.secho(str(e), fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _on_files(doing: str, given: dict, also: object = None) -> bool:
    """For the commands that either run their stage or work on the files their options name:
    False when none of ``given`` (option -> value) nor ``also`` (an optional extra) is set (run the
    stage), True when all of ``given`` are; some but not all end the command (exit 2), naming the missing."""
    if not any(given.values()) and also is None:
        return False
    missing = [k for k, v in given.items() if not v]
    if missing:
        _fail(f"{doing} needs {', '.join(missing)} too (or none of them to run the stage)")
    return True


# Causes of a failed write that the person running the command can fix: one line, no traceback.
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


@contextmanager
def _user_errors(*errors: type[Exception]):
    """Bad inputs (``errors``), and an output that cannot be written (read-only, no permission,
    disk full), end the command with one red line and exit code 2 (too much quarantined: 3)."""
    from tasks.params import ParamsError
    from tasks.quarantine import LIMIT_EXIT_CODE, QuarantineLimitError

    try:
        yield
    except QuarantineLimitError as e:
        _fail(e, LIMIT_EXIT_CODE)
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
    p = _params(params, set_, "make_sample", {"out": out, "num_images": num_images})
    from flows.make_sample import make_sample_flow

    with _user_errors():
        make_sample_flow(params=p)


@app.command()
def decompose(
    annotations: Optional[Path] = typer.Option(None, help="LVIS v1/v0.5 or COCO instances JSON."),
    images: Optional[Path] = typer.Option(None, help="Image root folder."),
    out: Optional[Path] = typer.Option(None, help="Output folder (shards/, quarantine.parquet, manifest.json)."),
    set_: Optional[list[str]] = SetOpt,
    params: Optional[Path] = ParamsOpt,
):
    """Mine interacting object groups and write training shards."""
    p = _params(params, set_, "decompose", {"annotations": annotations, "images": images, "out": out})
    from flows.decompose import decompose_flow
    from tasks.decompose.inputs import InputError

    with _user_errors(InputError):
        decompose_flow(params=p)


@app.command("show-samples")
def show_samples(
    samples_arg: Optional[Path] = typer.Argument(None, metavar="[SAMPLES]", hidden=True, show_default=False,
                                                 help="The same as --samples (older scripts)."),
    samples: Optional[Path] = typer.Option(None, "--samples",
                                           help="A decompose output folder (default: decompose.out)."),
    out: Optional[Path] = typer.Option(None, help="PNG to write (default: SAMPLES/samples.png)."),
    n: int = typer.Option(8, help="Number of samples to draw."),
    set_: Optional[list[str]] = SetOpt,
    params: Optional[Path] = ParamsOpt,
):
    """Draw a grid of decomposed samples: target, masked background, patches, region masks."""
    if samples_arg and samples:
        _fail("give the decompose output folder once: --samples DIR (or, as before, a positional DIR)")
    p = _params(params, set_, missing_ok=True)
    from tasks.params import resolve_path

    samples = samples or samples_arg or resolve_path(p.decompose.out)
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
    p = _params(params, set_)
    from flows.decompose import import_webdataset_flow
    from tasks.decompose.inputs import InputError

    with _user_errors(InputError):
        import_webdataset_flow(tars=[str(t) for t in tars], out=str(out), params=p)


@app.command("render-priors")
def render_priors(
    samples: Optional[Path] = SamplesOpt,
    out: Optional[Path] = typer.Option(None, help="Output folder for prior shards."),
    set_: Optional[list[str]] = SetOpt,
    params: Optional[Path] = ParamsOpt,
):
    """Reconstruct each object in 3D and render K views (multi-view shape priors)."""
    p = _params(params, set_, "render_priors", {"samples": samples, "out": out})
    from flows.render_priors import render_priors_flow

    with _user_errors():
        render_priors_flow(params=p)


@app.command()
def train(
    out: Optional[Path] = typer.Option(None, help="Output folder (final/, metrics.json, runs/)."),
    set_: Optional[list[str]] = SetOpt,
    params: Optional[Path] = ParamsOpt,
):
    """Train the PICS model with Ray Train."""
    p = _params(params, set_, "train", {"out": out})
    from flows.train import train_flow
    from pics_model.modeling_pics import WeightsError
    from tasks.train.checkpoint import CheckpointError

    with _user_errors(CheckpointError, WeightsError):
        train_flow(params=p)


@app.command()
def evaluate(
    checkpoint: Optional[Path] = typer.Option(None, help="A saved PICS model folder (default: evaluate.checkpoint)."),
    samples: Optional[Path] = SamplesOpt,
    out: Optional[Path] = typer.Option(None, help="Output folder (metrics.json, scores.parquet, report/)."),
    set_: Optional[list[str]] = SetOpt,
    params: Optional[Path] = ParamsOpt,
):
    """Evaluate a checkpoint on the test split: metrics, baselines, report."""
    p = _params(params, set_, "evaluate", {"checkpoint": checkpoint, "samples": samples, "out": out})
    from flows.evaluate import evaluate_flow
    from pics_model.pipeline_pics import NonFiniteOutputError
    from tasks.evaluate.stage import EvaluateInputError

    with _user_errors(EvaluateInputError, NonFiniteOutputError):
        evaluate_flow(params=p)


@app.command()
def analogy(
    source: Optional[Path] = typer.Option(None, help="Source scene .npz (points, instance, label)."),
    target: Optional[Path] = typer.Option(None, help="Target scene .npz."),
    checkpoint: Optional[Path] = typer.Option(None, help="A trained field folder (e.g. data/analogy/final)."),
    out: Optional[Path] = typer.Option(None, help="Map to write (.npz: mapped [P,3], ...); a .png beside it."),
    query: Optional[Path] = typer.Option(None, help="Points to map (.npz with points [Q,3]); default: the source's."),
    render: Optional[Path] = typer.Option(None, help="Arrangement transfer: carry the source's interacting pair "
                                          "into the target, render it into this folder (make_sample's format) "
                                          "and a .png beside it. Scenes need the 'generator' field "
                                          "(data/analogy/scenes have it)."),
    pair: Optional[str] = typer.Option(None, help="With --render: SUPPORT,ITEM object ids of the source "
                                       "(default: an object resting on another)."),
    set_: Optional[list[str]] = SetOpt,
    params: Optional[Path] = ParamsOpt,
):
    """3D scene analogies. With --source/--target/--checkpoint and --out and/or --render: map one
    scene into another, or transfer an arrangement. Without them: the stage (generate scenes, train
    the field, score maps against baselines, render transfers)."""
    p = _params(params, set_)
    from pics_model.context_field import FieldFileError
    from tasks.analogy.scenes import SceneError

    given = {"--source": source, "--target": target, "--checkpoint": checkpoint, "--out or --render": out or render}
    with _user_errors(SceneError, FieldFileError):
        if not _on_files("analogy: mapping one scene", given, also=query or pair):
            from flows.analogy import analogy_flow

            analogy_flow(params=p)
            return
        from tasks.analogy.apply import map_files
        from tasks.analogy.stage import map_config
        from tasks.analogy.transfer import parse_pair, transfer_files

        cfg = map_config(p.analogy)
        ids = parse_pair(pair) if pair is not None else None  # checked before anything is computed
        if ids is not None and render is None:
            _fail("analogy: --pair is for an arrangement transfer: give --render too")
        # the transfer first: it checks every input (the generator fields too) before it computes
        paths = transfer_files(source, target, checkpoint, render, ids, cfg, p.make_sample, p.analogy.seed) \
            if render else ()
        if out:
            paths += map_files(source, target, checkpoint, out, query, cfg)
        for path in paths:
            typer.echo(str(path))


@app.command()
def pipeline(
    set_: Optional[list[str]] = SetOpt,
    name: Optional[str] = typer.Option(None, help="DVC experiment name."),
    in_workspace: bool = typer.Option(False, help="Run in the workspace instead of a temporary copy."),
):
    """Run the whole pipeline as one DVC experiment (`dvc exp run -S ...`) on the project's params.yaml."""
    _params(None, set_)  # DVC reads the project's params.yaml: the overrides are checked against it
    from flows.pipeline import pipeline_flow

    from tasks.runtime import shared_prefect_server

    with _user_errors(), shared_prefect_server():  # the stages DVC starts report to the flow's server
        pipeline_flow(overrides=list(set_ or []), experiment_name=name, temp=not in_workspace)


@app.command()
def repro(stages: Optional[list[str]] = typer.Argument(None, help="dvc.yaml stages (default: every stage).")):
    """`dvc repro` with one Prefect server for all its stages (what `make run` runs)."""
    _params(None, None)  # a bad params.yaml fails here, before DVC starts
    from flows.pipeline import run_dvc
    from tasks.params import project_root
    from tasks.runtime import shared_prefect_server

    with _user_errors(), shared_prefect_server():
        try:
            run_dvc(project_root(), ["repro", *(stages or [])], echo=True)
        except RuntimeError as e:
            _fail(str(e).splitlines()[0])


@app.command()
def serve(only: Optional[list[str]] = typer.Argument(None, help="Deployment names (default: all).")):
    """Serve every stage and the pipeline as Prefect deployments from this process."""
    from flows.serve import serve_all

    serve_all(only or None)


@app.command("convert-reference")
def convert_reference(
    checkpoint: Path = typer.Argument(..., exists=True, dir_okay=False, help="The reference's Lightning checkpoint."),
    out_dir: Path = typer.Argument(..., help="Model folder to write (config.json, model.safetensors, sha256.json)."),
    preset: str = typer.Option("sd21", help="Preset with a KL autoencoder: sd21 | sd15."),
    dinov2: Optional[Path] = typer.Option(None, help="Local DINOv2 weights (otherwise the checkpoint's)."),
    stable_diffusion: Optional[Path] = typer.Option(None, help="Local diffusers SD folder (optional)."),
):
    """Convert the reference implementation's checkpoint into a model folder in the reference mode."""
    from pics_model.convert_reference import convert

    with _user_errors(ValueError):
        report = convert(checkpoint, out_dir, preset, str(dinov2) if dinov2 else None,
                         str(stable_diffusion) if stable_diffusion else None)
    typer.echo(report.summary())


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
    class_: Optional[str] = typer.Option(None, "--class", help="Class of --object images given without a mask or "
                                         "box: the location model proposes their box."),
    location_checkpoint: Optional[Path] = typer.Option(None, help="Location model for --class (default: "
                                                       "data/location/final)."),
    set_: Optional[list[str]] = SetOpt,
    layout: Optional[str] = typer.Option(None, help="auto: --object values are plain images, laid out in "
                                         "--region first (the layout: section of params.yaml)."),
    region: Optional[str] = typer.Option(None, help="x0,y0,x1,y1: where --layout auto puts the objects."),
    params: Optional[Path] = ParamsOpt,
):
    """Composite objects into a background with a trained checkpoint (sampler settings: params.yaml's evaluate)."""
    named = {"steps": steps, "guidance": guidance, "scheduler": scheduler, "seed": seed}
    # outside a project (an installed pics, no params.yaml): the schema's evaluate defaults
    p = _params(params, set_, "evaluate", named, missing_ok=True)
    from flows.composite import CompositeInputError, composite_cli
    from pics_model.modeling_pics import WeightsError
    from pics_model.pipeline_pics import NonFiniteOutputError

    with _user_errors(CompositeInputError, WeightsError, NonFiniteOutputError):
        path = composite_cli(str(background) if background else None, object_, str(checkpoint), str(out),
                             p, device=device, threads=threads,
                             sample_dir=str(sample_dir) if sample_dir else None, class_name=class_,
                             location_checkpoint=str(location_checkpoint) if location_checkpoint else None,
                             layout=layout, region=region)
    typer.echo(str(path))


@app.command()
def layout(
    elements: Optional[list[Path]] = typer.Option(None, "--elements", help="Element images or folders of them "
                                                  "(silhouette: alpha, else non-white pixels); more may follow as arguments."),
    more_elements: Optional[list[Path]] = typer.Argument(None, help="More element images (e.g. --elements dir/*.png)."),
    target: Optional[Path] = typer.Option(None, help="Target mask (white inside, or alpha)."),
    out: Optional[Path] = typer.Option(None, help="Output folder: layout.json, masks/, collage.png, metrics.json."),
    set_: Optional[list[str]] = SetOpt,
    params: Optional[Path] = ParamsOpt,
):
    """Pack elements into a target shape: image-space collage by differentiable rendering.
    With --elements/--target/--out: one packing. Without them: the stage (the decomposed dataset's
    silhouettes packed into the layout.targets shapes, data/layout)."""
    p = _params(params, set_, missing_ok=True)
    from tasks.layout.io import LayoutInputError

    given = {"--elements": elements or more_elements, "--target": target, "--out": out}
    with _user_errors(LayoutInputError):
        if not _on_files("layout: packing files", given):
            from flows.layout import layout_flow

            layout_flow(params=p)
            return
        from tasks.layout.stage import run_files

        metrics = run_files([*(elements or []), *(more_elements or [])], target, out, p.layout)
    typer.echo(" ".join(f"{k}={v}" for k, v in metrics.items()))


@app.command()
def results(
    evaluate: Optional[Path] = typer.Option(None, help="Evaluate metrics (default: <evaluate.out>/metrics.json)."),
    train: Optional[Path] = typer.Option(None, help="Train metrics (default: <train.out>/metrics.json)."),
    readme: Optional[Path] = typer.Option(None, help="README to rewrite (default: the repository's)."),
    out: Optional[Path] = typer.Option(None, help="Snapshot folder in git (default: docs/results)."),
    check: bool = typer.Option(False, "--check", help="Only check that the README matches the snapshot."),
    block: str = typer.Option("results", help="README block to write: <!-- BLOCK:begin --> ... <!-- BLOCK:end --> "
                                              "(the longer profile's: results-long, --out docs/results/long)."),
    set_: Optional[list[str]] = SetOpt,
    params: Optional[Path] = ParamsOpt,
):
    """Write the README's results section and figures from the run's metrics files (a snapshot in docs/results)."""
    from tasks import results as res
    from tasks.params import REPO_ROOT, resolve_path

    readme = (readme or REPO_ROOT / "README.md").resolve()
    out = (out or REPO_ROOT / "docs" / "results").resolve()
    try:
        if check:
            problem = res.check_readme(readme, out, block)
            if problem:
                _fail(res.ResultsError(problem))
            typer.echo(f"{readme}: results section matches {out}")
            return
        p = _params(params, set_)
        ev = (evaluate or resolve_path(p.evaluate.out) / "metrics.json").resolve()
        tr_dir = (train.parent if train else resolve_path(p.train.out)).resolve()
        res.snapshot(ev, (train or tr_dir / "metrics.json").resolve(), tr_dir / "occlusion.csv", out)
        for fig in res.draw_figures(out):
            typer.echo(str(fig))
        res.write_readme(readme, out, block)
    except res.ResultsError as e:
        _fail(e)
    typer.echo(str(readme))


@app.command()
def location(
    out: Optional[Path] = typer.Option(None, help="Output folder (data/, stage1/, final/, metrics.json, report.md)."),
    opa_root: Optional[Path] = typer.Option(None, help="Train on an OPA dataset folder instead of the embedded scenes."),
    set_: Optional[list[str]] = SetOpt,
    params: Optional[Path] = ParamsOpt,
):
    """Train and evaluate the location model (where to insert an object): MLE, then DPO."""
    p = _params(params, set_, "location", {"out": out, "opa_root": opa_root})
    from flows.location import location_flow
    from tasks.location.opa import OPAFormatError
    from tasks.location.stage import LocationInputError

    with _user_errors(OPAFormatError, LocationInputError):
        location_flow(params=p)


@app.command()
def propose(
    background: Path = typer.Option(..., exists=True, dir_okay=False, help="Background image."),
    class_: str = typer.Option(..., "--class", help="Class of the object to insert (one the model knows)."),
    object_: Optional[Path] = typer.Option(None, "--object", exists=True, dir_okay=False,
                                           help="The object's image (its code conditions the model too)."),
    checkpoint: Path = typer.Option(..., help="A saved location model folder (e.g. data/location/final)."),
    k: int = typer.Option(10, "-k", min=1, help="Number of boxes to sample."),
    out: Path = typer.Option(..., help="boxes.json to write; the boxes drawn go beside it as .png."),
    region: str = typer.Option("anywhere", help="anywhere | left | right | top | bottom (controlled sampling)."),
    temperature: float = typer.Option(1.0, min=0.01),
    top_p: float = typer.Option(0.95, min=0.01, max=1.0),
    seed: int = typer.Option(0),
):
    """Propose K boxes where an object of a class fits in a background (xyxy pixels + log-prob scores)."""
    from pics_model.modeling_pics import WeightsError
    from tasks.location.propose import propose as run

    with _user_errors(WeightsError, ValueError, FileNotFoundError):
        result = run(background, class_, checkpoint, k, out, object_, region, temperature, top_p, seed)
    typer.echo(f"{out} ({len(result['boxes'])} boxes), {result['png']}")


if __name__ == "__main__":
    app()
