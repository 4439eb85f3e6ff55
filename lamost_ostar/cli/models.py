"""``lamost-ostar models list|show``, ``lamost-ostar retrain`` and ``lamost-ostar evaluate``."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

ENV_MODELS = "LAMOST_OSTAR_MODELS"


def default_models_dir() -> Path:
    """User models directory: ``$LAMOST_OSTAR_MODELS`` or ``~/.lamost_ostar/models``."""
    env = os.environ.get(ENV_MODELS)
    return Path(env).expanduser() if env else Path.home() / ".lamost_ostar" / "models"


def packaged_models_dir() -> Path:
    """Directory of the model versions shipped inside the package."""
    return Path(__file__).resolve().parents[1] / "data" / "models"


models_dir_option = click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"User model versions directory (default ${ENV_MODELS} or ~/.lamost_ostar/models).",
)


def _fail(message: str) -> None:
    raise click.ClickException(message.splitlines()[0] if message else "failed")


def _versions(models_dir: Path | None) -> list[tuple[str, dict, Path]]:
    """(origin, card, directory) of every version: user ones, then packaged ones."""
    out: list[tuple[str, dict, Path]] = []
    for origin, root in (("user", models_dir or default_models_dir()), ("packaged", packaged_models_dir())):
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            card = d / "card.json"
            if d.is_dir() and not d.name.startswith(".") and card.is_file() and (d / "model.keras").is_file():
                try:
                    out.append((origin, json.loads(card.read_text()), d))
                except (OSError, json.JSONDecodeError):
                    out.append((origin, {"version": d.name, "error": "unreadable card.json"}, d))
    return out


def _metric(card: dict, *keys: str):
    v = card.get("metrics", {})
    for k in keys:
        if not isinstance(v, dict):
            return None
        v = v.get(k)
    return v


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


@click.group()
def models() -> None:
    """List and inspect model versions (packaged default and user versions)."""


@models.command("list")
@models_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the cards as JSON.")
def list_cmd(models_dir: Path | None, as_json: bool) -> None:
    """List every model version: user versions, then packaged ones, newest first in each."""
    rows = _versions(models_dir)
    if as_json:
        click.echo(json.dumps([dict(c, origin=o, path=str(d)) for o, c, d in rows], indent=2))
        return
    if not rows:
        click.echo("no model versions found")
        return
    user = sorted([r for r in rows if r[0] == "user"], key=lambda r: r[1].get("created", ""), reverse=True)
    packaged = sorted([r for r in rows if r[0] == "packaged"], key=lambda r: r[1].get("created", ""),
                      reverse=True)
    rows = user + packaged
    head = f"{'version':<34} {'origin':<9} {'created':<20} {'classes':<14} {'T':>6} {'test acc':>8} {'O rec':>6} {'O prec':>6}  gan"
    click.echo(head)
    click.echo("-" * len(head))
    for origin, card, _ in rows:
        classes = "".join(card.get("classes", []))
        aug = card.get("training_data", {}).get("augmentation", "")
        click.echo(
            f"{str(card.get('version', '?')):<34} {origin:<9} {str(card.get('created', ''))[:19]:<20} "
            f"{classes:<14} {_fmt(card.get('temperature')):>6} "
            f"{_fmt(_metric(card, 'test', 'accuracy')):>8} {_fmt(_metric(card, 'test', 'o_recall')):>6} "
            f"{_fmt(_metric(card, 'test', 'o_precision')):>6}  {'yes' if str(aug).startswith('LCGAN') else 'no'}"
        )


@models.command("show")
@click.argument("version", required=False)
@models_dir_option
def show_cmd(version: str | None, models_dir: Path | None) -> None:
    """Print the model card of VERSION (default: the version ``scan`` would use)."""
    rows = _versions(models_dir)
    if not rows:
        _fail("no model versions found")
    if version is None:
        user = sorted([r for r in rows if r[0] == "user"], key=lambda r: r[1].get("created", ""))
        pick = user[-1] if user else rows[-1]
    else:
        match = [r for r in rows if r[1].get("version") == version or r[2].name == version]
        if not match:
            _fail(f"no model version {version!r} (see `lamost-ostar models list`)")
        pick = match[0]
    origin, card, d = pick
    card = dict(card)
    card.setdefault("metrics", {}).pop("history", None)
    click.echo(json.dumps(dict(card, origin=origin, path=str(d)), indent=2))


@click.command()
@click.option("--labels", "labels_csv", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with a 'path' (relative to --release) or 'obsid' column and an 'mk' (or 'class') column.")
@click.option("--release", "release_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Root directory of the labelled release.")
@models_dir_option
@click.option("--gan-iterations", type=click.IntRange(min=0), default=2000, show_default=True,
              help="LCGAN iterations for the O augmentation (0: no augmentation).")
@click.option("--gan-samples", type=click.IntRange(min=0), default=None,
              help="Generated O spectra added to the training split (default: enough to balance the O class, "
                   "and at least as many as its real O spectra).")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True,
              help="Maximum recogniser epochs (early stopping, patience 5).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--test-fraction", type=click.FloatRange(0.05, 0.6), default=0.15, show_default=True,
              help="Fraction of the stars (per class) held out for the test split.")
@click.option("--val-fraction", type=click.FloatRange(0.05, 0.6), default=0.15, show_default=True,
              help="Fraction of the stars (per class) used for early stopping and calibration.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def retrain(labels_csv: Path, release_dir: Path, models_dir: Path | None, gan_iterations: int,
            gan_samples: int | None, epochs: int, batch_size: int, seed: int,
            test_fraction: float, val_fraction: float, quiet: bool) -> None:
    """Retrain the 7-class recogniser on a labelled release and register a new version.

    Regenerates the LCGAN augmentation from the release's O stars (training
    split only), trains, calibrates on a validation split and evaluates on a
    held-out test split (all split by star).  Existing versions are kept.
    """
    from .. import train

    try:
        result = train.retrain(
            labels_csv, release_dir, models_dir or default_models_dir(),
            gan_iterations=gan_iterations, gan_samples=gan_samples, epochs=epochs,
            batch_size=batch_size, seed=seed, test_fraction=test_fraction,
            val_fraction=val_fraction, progress=not quiet,
        )
    except (ValueError, FileNotFoundError, KeyError) as exc:
        _fail(f"retrain: {exc}")
    m = result["metrics"]
    click.echo(f"registered model version {result['version']} in {result['models_dir']}")
    click.echo(f"training data: {result['description']}")
    click.echo(
        f"held-out test ({m['n']} spectra): accuracy {_fmt(m['accuracy'])}, "
        f"O recall {_fmt(m.get('o_recall'))}, O precision {_fmt(m.get('o_precision'))}, "
        f"T = {result['temperature']:.3f}"
    )


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("reports/evaluation"), show_default=True, help="Report directory.")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Shared real-data directory (default ../shared/data next to the repository).")
@click.option("--profile", type=click.Choice(["tiny", "small", "paper"]), default="small", show_default=True,
              help="Size of the evaluation (tiny: seconds, for tests; small: minutes on 2 CPU cores).")
@click.option("--runs", type=click.IntRange(min=1), default=None, help="Runs per setting (median reported).")
@click.option("--gan-iterations", type=click.IntRange(min=1), default=None, help="GAN iterations.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None,
              help="Score the GANs every so many iterations (accuracy vs iteration).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--model-version", default=None, help="Model version for the survey evaluation.")
@models_dir_option
@click.option("--survey-release", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A survey-preset mock release (with truth.csv) to evaluate the 7-class model on.")
def evaluate(out_dir: Path, data_dir: Path | None, profile: str, runs: int | None,
             gan_iterations: int | None, checkpoint_every: int | None, seed: int, model_version: str | None,
             models_dir: Path | None, survey_release: Path | None) -> None:
    """Run the paper's evaluation protocol and write REPORT (markdown + PNG)."""
    from .. import evaluate as ev

    try:
        cfg = ev.EvalConfig.from_profile(profile, seed=seed).override(
            runs=runs, gan_iterations=gan_iterations, checkpoint_every=checkpoint_every)
        path = ev.run_evaluation(cfg, out_dir, data_dir=data_dir, survey_release=survey_release,
                                 model_version=model_version, models_dir=models_dir)
    except (ValueError, FileNotFoundError) as exc:
        _fail(f"evaluate: {exc}")
    click.echo(f"report written to {path}")
