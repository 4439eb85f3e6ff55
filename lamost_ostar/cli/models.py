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


def _by_age(rows: list[tuple[str, dict, Path]]) -> list[tuple[str, dict, Path]]:
    """Oldest first, as :func:`lamost_ostar.models.registry.list_versions` orders them."""
    return sorted(rows, key=lambda r: (str(r[1].get("created", "")), str(r[1].get("version", ""))))


def default_version(models_dir: Path | str | None = None) -> tuple[str, dict, Path] | None:
    """(origin, card, directory) of the version ``scan`` uses without ``--model``.

    The same rule as :func:`lamost_ostar.models.registry.load_model` with
    ``version=None`` (the newest user version, else the newest packaged one),
    decided from the cards alone: no Keras/TensorFlow import.
    """
    rows = [r for r in _versions(Path(models_dir) if models_dir else None) if "error" not in r[1]]
    for origin in ("user", "packaged"):
        mine = _by_age([r for r in rows if r[0] == origin])
        if mine:
            return mine[-1]
    return None


def find_version(version: str, models_dir: Path | str | None = None) -> tuple[str, dict, Path] | None:
    """(origin, card, directory) of ``version`` (user directory first), or None; no Keras import."""
    for row in _versions(Path(models_dir) if models_dir else None):
        if row[1].get("version") == version or row[2].name == version:
            return row
    return None


def version_names(models_dir: Path | str | None = None) -> list[str]:
    """Every version name (user, then packaged), for error messages."""
    return [str(c.get("version", d.name)) for _, c, d in _versions(Path(models_dir) if models_dir else None)]


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
    """List every model version: user versions, then packaged ones, newest first in each.

    The version marked '*' is the one ``lamost-ostar scan`` uses without --model.
    """
    rows = _versions(models_dir)
    default = default_version(models_dir)
    default_dir = default[2] if default else None
    if as_json:
        click.echo(json.dumps([dict(c, origin=o, path=str(d), default=d == default_dir)
                               for o, c, d in rows], indent=2))
        return
    if not rows:
        click.echo("no model versions found")
        return
    user = _by_age([r for r in rows if r[0] == "user"])[::-1]
    packaged = _by_age([r for r in rows if r[0] == "packaged"])[::-1]
    rows = user + packaged
    width = max([34] + [len(str(c.get("version", "?"))) for _, c, _ in rows])
    head = (f"  {'version':<{width}} {'origin':<9} {'created':<20} {'classes':<9} {'T':>6} {'test acc':>8} "
            f"{'O rec':>6} {'O prec':>6} {'LOSO O rec':>10} {'false O/M':>9}  gan")
    click.echo(head)
    click.echo("-" * len(head))
    for origin, card, d in rows:
        classes = "".join(card.get("classes", []))
        aug = (card.get("training_data") or {}).get("augmentation", "") \
            if isinstance(card.get("training_data"), dict) else ""
        mark = "*" if d == default_dir else " "
        loso_rec, loso_fpm = loso_figures(card)
        click.echo(
            f"{mark} {str(card.get('version', '?')):<{width}} {origin:<9} {str(card.get('created', ''))[:19]:<20} "
            f"{classes:<9} {_fmt(card.get('temperature')):>6} "
            f"{_fmt(_metric(card, 'test', 'accuracy')):>8} {_fmt(_metric(card, 'test', 'o_recall')):>6} "
            f"{_fmt(_metric(card, 'test', 'o_precision')):>6} {_fmt(loso_rec):>10} "
            f"{'-' if loso_fpm is None else f'{loso_fpm:.0f}':>9}  {'yes' if str(aug).startswith('LCGAN') else 'no'}"
        )
    click.echo("LOSO O rec, false O/M: held-out stars (O recall at S/N >= 10, star-averaged; false O per "
               "million non-O): the mean of the card's clean checks (its rule on seeds it was not chosen on) "
               "where it has them, else the leave-one-star-out operating point")
    if default is not None:
        click.echo(f"* default: the version `lamost-ostar scan` uses without --model "
                   f"({'newest user version' if default[0] == 'user' else 'newest packaged version'})")


def loso_figures(card: dict) -> tuple[float | None, float | None]:
    """A detector's held-out figures: (star-averaged O recall at S/N >= 10, false O per million).

    The mean over the card's clean checks (its rule applied unchanged to LOSO
    runs of seeds it was not chosen on, ``metrics.loso.clean_checks``) where it
    has them, since the card's LOSO tables of a rule applied to another recipe
    are those of the calibration run's own operating point; else that
    operating point (``metrics.loso.tables.operating_point``).  None where the
    card has neither (not a detector).
    """
    checks = _metric(card, "loso", "clean_checks") or {}
    rows = [c for c in checks.values() if isinstance(c, dict)] if isinstance(checks, dict) else []
    rec = [c["o_recall_star_averaged_snr_ge_10"] for c in rows if c.get("o_recall_star_averaged_snr_ge_10") is not None]
    fpm = [c["false_o_per_million"] for c in rows if c.get("false_o_per_million") is not None]
    if rec and fpm:
        return sum(rec) / len(rec), sum(fpm) / len(fpm)
    op = _metric(card, "loso", "tables", "operating_point") or {}
    if not isinstance(op, dict):
        return None, None
    return op.get("o_recall_star_averaged_snr_ge_10"), op.get("false_o_per_million")


def _wrap(label: str, text: str, width: int = 100) -> list[str]:
    import textwrap

    pad = " " * 15
    lines = textwrap.wrap(str(text), width=width - len(pad)) or [""]
    return [f"  {label:<13}{lines[0]}"] + [pad + ln for ln in lines[1:]]


def _counts(d) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items()) if isinstance(d, dict) else str(d)


def render_card(card: dict, origin: str, path: Path, is_default: bool) -> str:
    """A model card as text: provenance, training data, a metrics table, the confusion matrix."""
    L = [f"model {card.get('version', path.name)}  ({origin}{', default for scan' if is_default else ''})"]
    L.append(f"  {'path':<13}{path}")
    L.append(f"  {'created':<13}{card.get('created', '-')}")
    classes = [str(c) for c in card.get("classes", [])]
    L.append(f"  {'classes':<13}{' '.join(classes) or '-'}")
    t = card.get("temperature")
    cal = card.get("calibration")
    L.append(f"  {'temperature':<13}{_fmt(t)}" + (f"  ({cal})" if cal else ""))
    backend = card.get("keras_backend", "?")
    versions = ", ".join(f"{k} {v}" for k, v in (card.get("backend_version") or {}).items())
    L.append(f"  {'backend':<13}{backend} (keras {card.get('keras_version', '?')}"
             + (f", {versions}" if versions else "") + ")"
             + (f"; {card['n_params']:,d} parameters" if isinstance(card.get("n_params"), int) else "")
             + (f"; input {card['npix']} pixels" if card.get("npix") else ""))
    L.append(f"  {'code':<13}{card.get('code_version', '-')}")
    if card.get("sha256"):
        L.append(f"  {'sha256':<13}{card['sha256']}")
    td = card.get("training_data")
    if isinstance(td, dict):
        if td.get("description"):
            L += _wrap("training", td["description"])
        for key in ("augmentation", "split"):
            if td.get(key):
                L += _wrap("", f"{key}: {td[key]}")
        for sp in td.get("splits") or []:
            if isinstance(sp, dict):
                L += _wrap("", f"{sp.get('split', '?')}: {sp.get('n_spectra', '?')} spectra "
                               f"({_counts(sp.get('spectra_per_class', {}))})")
    elif td:
        L += _wrap("training", td)
    cfg = card.get("train_config")
    if isinstance(cfg, dict) and cfg:
        L += _wrap("config", ", ".join(f"{k} {v}" for k, v in cfg.items() if k != "classes"))

    metrics = card.get("metrics") or {}
    scored = [(k, m) for k, m in metrics.items()
              if isinstance(m, dict) and isinstance(m.get("accuracy"), (int, float))]
    if scored:
        L += ["", f"  {'metrics':<20}{'n':>6} {'accuracy':>9} {'O recall':>9} {'O prec':>8} "
                  f"{'log loss':>9} {'ECE':>7}"]
        for name, m in scored:
            L.append(f"  {name:<20}{_fmt(m.get('n')):>6} {_fmt(m.get('accuracy')):>9} "
                     f"{_fmt(m.get('o_recall')):>9} {_fmt(m.get('o_precision')):>8} "
                     f"{_fmt(m.get('log_loss')):>9} {_fmt(m.get('ece')):>7}")
    cm_name, cm = next(((k, m) for k, m in scored if k == "test" and m.get("confusion")),
                       next(((k, m) for k, m in scored if m.get("confusion")), (None, None)))
    if cm is not None:
        labels = [str(c) for c in cm.get("classes", classes)]
        matrix = cm["confusion"]
        w = max(7, *(len(str(v)) + 2 for row in matrix for v in row))
        L += ["", f"  confusion matrix ({cm_name}; rows: true class, columns: predicted)"]
        L.append("  " + " " * 6 + "".join(f"{c:>{w}}" for c in labels) + f"{'recall':>9}")
        recall = cm.get("recall") or {}
        for lab, row in zip(labels, matrix):
            L.append(f"  {lab:<6}" + "".join(f"{v:>{w}}" for v in row) + f"{_fmt(recall.get(lab)):>9}")
        prec = cm.get("precision") or {}
        if prec:
            L.append(f"  {'prec.':<6}" + "".join(f"{_fmt(prec.get(c)):>{w}}" for c in labels))
    return "\n".join(L)


@models.command("show")
@click.argument("version", required=False)
@models_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw card (JSON).")
def show_cmd(version: str | None, models_dir: Path | None, as_json: bool) -> None:
    """Print the model card of VERSION (default: the version ``scan`` would use)."""
    rows = _versions(models_dir)
    if not rows:
        _fail("no model versions found")
    default = default_version(models_dir)
    if version is None:
        pick = default or rows[-1]
    else:
        pick = find_version(version, models_dir)
        if pick is None:
            _fail(f"no model version {version!r} (see `lamost-ostar models list`)")
    origin, card, d = pick
    is_default = default is not None and d == default[2]
    if as_json:
        card = dict(card)
        card.setdefault("metrics", {}).pop("history", None)
        click.echo(json.dumps(dict(card, origin=origin, path=str(d), default=is_default), indent=2))
        return
    click.echo(render_card(card, origin, d, is_default))


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
@click.option("--library/--no-library", default=True, show_default=True,
              help="Also train on LAMOST-like realisations of the packaged template stars (every class, "
                   "B stars and hot impostors included).")
@click.option("--library-per-class", type=click.IntRange(min=1), default=300, show_default=True,
              help="Template realisations per class with --library.")
@click.option("--model-kind", default=None,
              help="cnn2, cnn2d, cnn2dx, lr2 or an ensemble ens-A-B (e.g. ens-cnn2d-lr2) "
                   "[default: the kind of the packaged default model].")
@click.option("--quiet", is_flag=True, help="No progress output.")
def retrain(labels_csv: Path, release_dir: Path, models_dir: Path | None, gan_iterations: int,
            gan_samples: int | None, epochs: int, batch_size: int, seed: int,
            test_fraction: float, val_fraction: float, library: bool, library_per_class: int,
            model_kind: str | None, quiet: bool) -> None:
    """Retrain the O-star detector on a labelled release and register a new version.

    Builds the default model's kind: a two-channel recogniser, the He II
    evidence and an O-candidate operating point.  Regenerates the LCGAN
    augmentation from the release's O stars (training split only), trains,
    calibrates and chooses the operating point on a validation split, and
    evaluates on a held-out test split (all split by star).  Existing versions
    are kept.
    """
    from .. import train

    kinds = ("cnn2", "cnn2d", "cnn2dx", "lr2")
    if model_kind is not None and model_kind not in kinds and not (
            model_kind.startswith("ens-") and len(model_kind[4:].split("-")) >= 2
            and all(m in kinds for m in model_kind[4:].split("-"))):
        _fail(f"retrain: unknown --model-kind {model_kind!r} (one of {', '.join(kinds)}, or ens-A-B of them)")
    try:
        result = train.retrain(
            labels_csv, release_dir, models_dir or default_models_dir(),
            gan_iterations=gan_iterations, gan_samples=gan_samples, epochs=epochs,
            batch_size=batch_size, seed=seed, test_fraction=test_fraction,
            val_fraction=val_fraction, library=library, n_library_per_class=library_per_class,
            progress=not quiet, model_kind=model_kind,
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
    c = m.get("candidates") or {}
    click.echo(f"O-candidate rule: {result['decision']}; on the test split: O recall {_fmt(c.get('o_recall'))}, "
               f"{c.get('non_o_called_o', 0)} of {c.get('n_non_o', 0)} non-O spectra called O")


@click.command()
@click.option("--protocol", type=click.Choice(["paper", "loso"]), default="paper", show_default=True,
              help="paper: the paper's GAN-train/GAN-test protocol; loso: leave-one-star-out evaluation "
                   "of the O-star detector (every real O star held out in turn).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report directory [default: runs/evaluation or runs/loso, git-ignored, so the "
                   "committed reports are never overwritten by accident].")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Shared real-data directory (default ../shared/data next to the repository).")
@click.option("--profile", type=click.Choice(["tiny", "small", "paper", "quick", "full"]), default=None,
              help="Size: paper protocol tiny|small|paper [small]; loso tiny|quick|full [full].")
@click.option("--runs", type=click.IntRange(min=1), default=None, help="Runs per setting (paper protocol).")
@click.option("--gan-iterations", type=click.IntRange(min=1), default=None, help="GAN iterations.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None,
              help="Score the GANs every so many iterations (paper protocol).")
@click.option("--folds", default=None, metavar="K,K,...", help="Run only these folds (loso).")
@click.option("--models", "model_kinds", default=None, metavar="KIND,...",
              help="Model kinds to compare (loso): cnn2, cnn1, lr2, lr1, cnn2+lcgan, cnn2+sgan.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--model-version", default=None, help="Model version for the survey evaluation (paper).")
@models_dir_option
@click.option("--survey-release", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A survey-preset mock release (with truth.csv) to evaluate the model on (paper).")
@click.option("--no-survey", is_flag=True, help="Paper protocol: leave out the 7-class survey part.")
def evaluate(protocol: str, out_dir: Path | None, data_dir: Path | None, profile: str | None,
             runs: int | None, gan_iterations: int | None, checkpoint_every: int | None,
             folds: str | None, model_kinds: str | None, seed: int, model_version: str | None,
             models_dir: Path | None, survey_release: Path | None, no_survey: bool) -> None:
    """Evaluate: the paper's protocol, or the detector's leave-one-star-out table (report + figures)."""
    out_dir = out_dir or Path("runs") / ("evaluation" if protocol == "paper" else "loso")
    try:
        if protocol == "paper":
            from .. import evaluate as ev

            if profile not in (None, "tiny", "small", "paper"):
                raise ValueError(f"profile {profile!r} is not one of the paper protocol's (tiny, small, paper)")
            cfg = ev.EvalConfig.from_profile(profile or "small", seed=seed).override(
                runs=runs, gan_iterations=gan_iterations, checkpoint_every=checkpoint_every)
            cfg.survey = not no_survey
            path = ev.run_evaluation(cfg, out_dir, data_dir=data_dir, survey_release=survey_release,
                                     model_version=model_version, models_dir=models_dir)
        else:
            from .. import loso

            if profile not in (None, "tiny", "quick", "full"):
                raise ValueError(f"profile {profile!r} is not one of the loso protocol's (tiny, quick, full)")
            cfg = loso.LosoConfig.from_profile(profile or "full", seed=seed)
            if folds:
                try:
                    cfg.folds = tuple(int(k) for k in folds.split(","))
                except ValueError:
                    raise ValueError(f"--folds takes fold numbers like 0,3,7, not {folds!r}") from None
            if model_kinds:
                kinds = tuple(k.strip() for k in model_kinds.split(",") if k.strip())
                bad = [k for k in kinds if k not in loso.MODEL_KINDS]
                if bad:
                    raise ValueError(f"unknown model kind(s) {', '.join(bad)} (one of {', '.join(loso.MODEL_KINDS)})")
                cfg.models = kinds
            if gan_iterations is not None:
                cfg.gan_iterations = gan_iterations
            path = loso.run_loso(cfg, out_dir, data_dir=data_dir, log=lambda m: click.echo(m, err=True))
    except (ValueError, FileNotFoundError) as exc:
        _fail(f"evaluate: {exc}")
    click.echo(f"report written to {path}")
