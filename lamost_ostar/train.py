"""Training pipeline of the 7-class recogniser: augment, train, calibrate, evaluate, register.

Used by ``scripts/train_default.py`` (the packaged default model) and by
``lamost-ostar retrain`` (a new model version from a labelled release).

The pipeline (:func:`train_and_register`):

1. the caller gives three splits made *by star* (train / validation / test,
   see :func:`lamost_ostar.datasets.split_by_star`);
2. optionally an LCGAN is trained on the O spectra of the *training* split only
   and its samples are added to the training split (:func:`augment_o`);
3. the recogniser is trained on the training split (Adam 1e-4, early stopping
   on the validation loss, patience 5 -- the paper's protocol);
4. a temperature is fitted on the validation split's logits;
5. the calibrated model is evaluated on the test split, which no step above
   has seen;
6. the model and its card are saved as a new version with the registry; an
   existing version is never overwritten.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets import CLASSES_7, LabelledSpectra, assert_disjoint_stars
from .evaluate import classification_metrics


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    Attributes
    ----------
    classes : tuple of str
        Output classes of the recogniser.
    epochs : int
        Maximum number of epochs (early stopping may end sooner).
    batch_size : int
        Mini-batch size.
    patience : int
        Early-stopping patience in epochs (paper: 5).
    learning_rate : float
        Adam learning rate (paper: 1e-4).
    gan_iterations : int
        LCGAN training iterations for the O augmentation; 0 disables it.
    gan_samples : int
        Number of generated O spectra added to the training split.
    gan_batch_size : int
        LCGAN mini-batch size.
    seed : int
        Seed of every random step.
    """

    classes: tuple[str, ...] = CLASSES_7
    epochs: int = 30
    batch_size: int = 32
    patience: int = 5
    learning_rate: float = 1e-4
    gan_iterations: int = 0
    gan_samples: int = 0
    gan_batch_size: int = 16
    seed: int = 0


@dataclass
class TrainResult:
    """What :func:`train_model` returns."""

    model: object
    temperature: float
    history: dict
    val_metrics: dict
    test_metrics: dict
    test_metrics_uncalibrated: dict
    timings: dict
    train_counts: dict
    gan_used: bool


# --------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------
def augment_o(train: LabelledSpectra, config: TrainConfig, progress: bool = False) -> tuple[LabelledSpectra, dict]:
    """Train an LCGAN on the O spectra of ``train`` and return its samples.

    Returns the generated spectra (label ``O``, source ``lcgan``, one pseudo
    star per sample) and timing information.  Only the training split's O
    spectra are used, so nothing of the validation or test stars leaks in.
    """
    from .models import gan

    o = train.only(["O"])
    if len(o) == 0 or config.gan_iterations <= 0 or config.gan_samples <= 0:
        return LabelledSpectra.empty(train.npix), {}
    t0 = time.perf_counter()
    trainer = gan.make_lcgan(npix=train.npix)
    trainer.fit(o.x, iterations=config.gan_iterations, batch_size=config.gan_batch_size,
                seed=config.seed, progress=progress)
    t_fit = time.perf_counter() - t0
    x = np.asarray(trainer.sample(config.gan_samples, seed=config.seed), dtype=np.float32)
    x = x.reshape(len(x), -1)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    gen = LabelledSpectra(x, ["O"] * len(x), [f"lcgan:{i}" for i in range(len(x))], ["lcgan"] * len(x))
    return gen, {"lcgan_fit_s": t_fit, "lcgan_iterations": config.gan_iterations,
                 "lcgan_trained_on": int(len(o)), "lcgan_trained_on_stars": int(len(np.unique(o.star)))}


def fit_recogniser(train: LabelledSpectra, val: LabelledSpectra, config: TrainConfig,
                   verbose: int = 0) -> tuple[object, dict]:
    """Build and train the recogniser on ``train`` with early stopping on ``val``."""
    from .models import recogniser

    return recogniser.train_recogniser(
        train.x, train.y(config.classes), val.x, val.y(config.classes),
        epochs=config.epochs, batch_size=config.batch_size, patience=config.patience,
        learning_rate=config.learning_rate, n_classes=len(config.classes), verbose=verbose,
    )


def predict_logits(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of ``model`` for standardised spectra ``x`` (N, NPIX), float64."""
    from .models import recogniser

    return np.asarray(recogniser.predict_logits(model, x, batch_size=batch_size), dtype=np.float64)


def softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``z / temperature``."""
    z = np.asarray(z, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature fitted on validation logits (``models.calibration``)."""
    from .models import calibration

    return float(calibration.fit_temperature(logits, y))


def train_model(train: LabelledSpectra, val: LabelledSpectra, test: LabelledSpectra,
                config: TrainConfig, verbose: int = 0, progress: bool = False) -> TrainResult:
    """Augment (optional), train, calibrate on ``val`` and evaluate on ``test``.

    ``train``, ``val`` and ``test`` must not share a star (checked).
    """
    import keras

    assert_disjoint_stars(train, val, test)
    keras.utils.set_random_seed(config.seed)
    timings: dict = {}
    gen, gan_info = augment_o(train, config, progress=progress)
    timings.update(gan_info)
    train_all = LabelledSpectra.concat([train, gen])
    t0 = time.perf_counter()
    model, history = fit_recogniser(train_all, val, config, verbose=verbose)
    timings["recogniser_fit_s"] = time.perf_counter() - t0
    n_epochs = len(history.get("loss", [])) or 1
    timings["recogniser_epochs"] = n_epochs
    timings["recogniser_s_per_epoch"] = timings["recogniser_fit_s"] / n_epochs
    timings["recogniser_train_spectra"] = len(train_all)

    classes = config.classes
    val_logits = predict_logits(model, val.x)
    temperature = fit_temperature(val_logits, val.y(classes)) if len(val) else 1.0
    test_logits = predict_logits(model, test.x)
    test_y = test.y(classes)
    return TrainResult(
        model=model,
        temperature=temperature,
        history=history,
        val_metrics=classification_metrics(val.y(classes), softmax(val_logits, temperature), classes),
        test_metrics=classification_metrics(test_y, softmax(test_logits, temperature), classes),
        test_metrics_uncalibrated=classification_metrics(test_y, softmax(test_logits), classes),
        timings=timings,
        train_counts={"spectra": train_all.counts(), "stars": train.star_counts(),
                      "generated_o": int(len(gen))},
        gan_used=bool(len(gen)),
    )


def split_summary(name: str, data: LabelledSpectra) -> dict:
    """A JSON-able description of one split (for the model card)."""
    return {
        "split": name,
        "n_spectra": int(len(data)),
        "spectra_per_class": data.counts(),
        "stars_per_class": data.star_counts(),
        "sources": {str(s): int((data.source == s).sum()) for s in np.unique(data.source)},
        "o_stars": sorted(str(s) for s in np.unique(data.star[(data.labels == "O") & (data.source != "lcgan")])),
    }


def register(result: TrainResult, splits: dict[str, LabelledSpectra], config: TrainConfig,
             models_dir: str | Path, description: str, extra: dict | None = None) -> str:
    """Save ``result`` as a new model version in ``models_dir``; return the version."""
    from .models import registry

    training_data = {
        "description": description,
        "split": "by star (LAMOST DESIG; template name for library stars); no star in two splits",
        "splits": [split_summary(k, v) for k, v in splits.items()],
        "augmentation": ("LCGAN samples of the training split's O stars: "
                         f"{result.train_counts.get('generated_o', 0)} spectra, "
                         f"{config.gan_iterations} iterations") if result.gan_used
        else "none (no LCGAN augmentation in this version)",
    }
    metrics = {
        "test": result.test_metrics,
        "test_uncalibrated": result.test_metrics_uncalibrated,
        "validation": result.val_metrics,
        "timings": result.timings,
        "history": result.history,
    }
    if extra:
        metrics.update(extra)
    card = {
        "classes": list(config.classes),
        "temperature": result.temperature,
        "training_data": training_data,
        "metrics": metrics,
        "train_config": dataclasses.asdict(config),
        "calibration": "temperature scaling fitted on the validation split (NLL)",
    }
    return registry.save_model_version(result.model, models_dir, card)


# --------------------------------------------------------------------------
# drivers
# --------------------------------------------------------------------------
def train_default(models_dir: str | Path, config: TrainConfig, plan=None, data_dir: str | Path | None = None,
                  verbose: int = 0, progress: bool = False) -> tuple[str, TrainResult]:
    """Train the default 7-class model on real + mock spectra and register it.

    Splits come from :func:`lamost_ostar.datasets.build_seven_class_splits`
    (seeded with ``config.seed``).
    """
    from .datasets import SplitPlan, build_seven_class_splits

    plan = plan or SplitPlan(classes=config.classes)
    rng = np.random.default_rng(config.seed)
    t0 = time.perf_counter()
    splits = build_seven_class_splits(plan, rng, data_dir=data_dir)
    t_data = time.perf_counter() - t0
    result = train_model(splits["train"], splits["validation"], splits["test"], config,
                         verbose=verbose, progress=progress)
    result.timings["build_data_s"] = t_data
    description = (
        "Real LAMOST A/F/G/K/M spectra (shared DR1/DR7 files, star = DESIG) + LAMOST-like "
        "realisations of the real MILES/Pickles templates (mock simulator: RV, reddening, "
        "calibration distortion, noise from real LAMOST S/N and instrument model) + mock "
        "mixtures of neighbouring templates of the same split; O: the six real O stars "
        "(MILES HD057060, HD057061, HD209975; Pickles o5v, o8iii, o9v) in four split units"
    )
    version = register(result, splits, config, models_dir, description,
                       extra={"split_plan": dataclasses.asdict(plan)})
    return version, result


def retrain(labels_csv: str | Path, release_dir: str | Path, models_dir: str | Path, *,
            gan_iterations: int = 2000, gan_samples: int | None = None, epochs: int = 30,
            batch_size: int = 32, seed: int = 0, test_fraction: float = 0.15,
            val_fraction: float = 0.15, library: bool = True, n_library_per_class: int = 300,
            learning_rate: float = 1e-3, progress: bool = False, model_kind: str | None = None,
            lr_c: float = 0.05, lr_max_iter: int | None = None) -> dict:
    """Retrain the O-star detector on a labelled release and register a new version.

    Builds the same kind of model as the packaged default (``model_kind=None``:
    the default's kind, from its card; or ``cnn2``, ``cnn2d``, ``cnn2dx``,
    ``lr2`` or an ensemble ``ens-A-B``): two input channels (standardised +
    continuum-normalised flux), the He II evidence and an O-candidate
    operating point.

    1. The labelled spectra (:func:`lamost_ostar.datasets.load_labelled_release`)
       are split **by star** into train / validation / test.
    2. Training set: the release's training split, plus (``library=True``)
       LAMOST-like realisations of the packaged template stars
       (:class:`~lamost_ostar.datasets.DetectorRecipe`, ``n_library_per_class``
       per class: every class of the detector, B and the X impostors included),
       plus -- when the training split holds O stars -- ``gan_samples`` LCGAN
       spectra regenerated from them (``gan_iterations``; noise at their S/N
       added after generation).
    3. The two-channel model is trained (a CNN with early stopping on the
       validation split; an ensemble: each member, its temperature fitted on
       the validation split); the temperature is fitted on the validation split.
    4. The operating point (:func:`lamost_ostar.models.decision.choose_operating_point`)
       is chosen on the validation split -- held-out stars -- with the targets
       of the default model (<= 100 false O per million non-O re-weighted to
       the survey mix, <= 5 % of B called O, star-averaged O recall maximised);
       with no O star in the validation split the rule keeps the default
       model's thresholds and the card says so.
    5. Test-split metrics at that operating point go into the card.

    ``lr_c`` and ``lr_max_iter`` are the inverse L2 strength and the iteration
    cap of a logistic-regression model or member (``lr_max_iter`` None:
    :data:`lamost_ostar.loso.LR_MAX_ITER`).

    Returns
    -------
    dict
        ``version``, ``models_dir``, ``description``, ``metrics`` (test,
        calibrated), ``temperature``, ``decision``, ``skipped``, ``gan_used``.
    """

    from .datasets import (CLASSES_8, DetectorRecipe, add_noise, build_detector_training, load_labelled_release,
                           split_by_star, _usable_for_training)
    from .loso import LR_MAX_ITER, SURVEY_NON_O
    from .models import gan, recogniser, registry
    from .models.calibration import fit_temperature
    from .models.decision import Decision, choose_operating_point
    from .preprocess import normalise
    from .templates import load_templates

    if test_fraction + val_fraction >= 0.9:
        raise ValueError("test + validation fractions must leave at least 10 % for training")
    rel = load_labelled_release(labels_csv, release_dir)
    data = rel.data
    if len(data) == 0:
        reasons = ", ".join(sorted({r for _, r in rel.skipped})[:3])
        raise ValueError(f"no usable labelled spectra in {release_dir} ({reasons or 'empty labels'})")
    if len(np.unique(data.labels)) < 2:
        raise ValueError("the labelled spectra hold fewer than two classes")
    rng = np.random.default_rng(seed)
    train_r, val, test = split_by_star(data, [1 - val_fraction - test_fraction, val_fraction, test_fraction], rng)
    if len(val) == 0 or len(test) == 0:
        raise ValueError("too few stars for a train/validation/test split by star "
                         f"({len(np.unique(data.star))} stars)")
    classes = CLASSES_8 if library else tuple(c for c in CLASSES_8 if c in set(data.labels))
    if "O" not in classes:
        raise ValueError("no O class: the release has no O star and library=False")
    parts = [train_r]
    timings: dict = {}
    mkclass_fraction = default_mkclass_fraction() if library else 0.0
    emission_fraction = default_emission_fraction() if library else 0.0
    if library:
        lib = _usable_for_training(load_templates(), classes)
        recipe = DetectorRecipe(n_per_class=n_library_per_class, mkclass_fraction=mkclass_fraction,
                                emission_fraction=emission_fraction)
        parts.append(build_detector_training(lib, recipe, rng))
    o = train_r.only(["O"])
    gan_used = False
    if len(o) and gan_iterations > 0:
        n_gen = gan_samples if gan_samples is not None else max(len(o), n_library_per_class // 2)
        if n_gen > 0:
            t0 = time.perf_counter()
            trainer = gan.make_lcgan(npix=o.npix)
            trainer.fit(o.x, iterations=gan_iterations, batch_size=16, seed=seed, progress=progress)
            x = np.asarray(trainer.sample(n_gen, seed=seed), np.float64).reshape(n_gen, -1)
            snr = np.nan_to_num(np.asarray(o.meta.get("snr_g", np.full(len(o), 30.0)), float), nan=30.0)
            x = add_noise(x, rng.choice(snr, n_gen), rng)
            parts.append(LabelledSpectra(x, ["O"] * n_gen, [f"lcgan:{i}" for i in range(n_gen)], ["lcgan"] * n_gen,
                                         xn=normalise(x, np.zeros(x.shape, bool))[0]))
            timings.update(lcgan_fit_s=time.perf_counter() - t0, lcgan_iterations=gan_iterations,
                           lcgan_trained_on=int(len(o)), generated_o=int(n_gen))
            gan_used = True
    train = LabelledSpectra.concat(parts).only(classes)
    assert_disjoint_stars(train.subset(train.source == "release"), val, test)
    kind = model_kind or default_model_kind()
    lr_max_iter = LR_MAX_ITER if lr_max_iter is None else int(lr_max_iter)
    t0 = time.perf_counter()
    fit = dict(epochs=epochs, batch_size=batch_size, patience=5, learning_rate=learning_rate, lr_c=lr_c,
               lr_max_iter=lr_max_iter, seed=seed, verbose=0)
    if kind.startswith("ens-"):
        members = kind[4:].split("-")
        fitted = [_fit_member(m, train, val, classes, **fit) for m in members]
        temps = [float(fit_temperature(predict_logits(mod, val.inputs(2)), val.y(classes))) for mod, _ in fitted]
        model = recogniser.ensemble_model([mod for mod, _ in fitted], temps)
        history = {"members": {m: {"temperature": t, "history": h} for m, t, (_, h) in zip(members, temps, fitted)}}
    else:
        model, history = _fit_member(kind, train, val, classes, **fit)
    timings["recogniser_fit_s"] = time.perf_counter() - t0
    z_val = predict_logits(model, val.inputs(2))
    temperature = float(fit_temperature(z_val, val.y(classes)))
    decision, chosen = _release_decision(classes, softmax(z_val, temperature), val, SURVEY_NON_O,
                                         Decision, choose_operating_point)
    z_test = predict_logits(model, test.inputs(2))
    p_test = softmax(z_test, temperature)
    test_metrics = classification_metrics(test.y(classes), p_test, classes)
    verdict = decision.apply(p_test, test.meta.get("heii_sigma"), test.meta.get("sdo_index"),
                             test.meta.get("sdo_sigma"))
    is_o = test.labels == "O"
    test_metrics["candidates"] = {
        "rule": decision.describe(),
        "o_recall": float(np.mean(verdict.is_candidate[is_o])) if is_o.any() else None,
        "non_o_called_o": int(np.sum(verdict.is_candidate[~is_o])), "n_non_o": int(np.sum(~is_o))}
    description = (f"labelled release {Path(release_dir).resolve()} via {Path(labels_csv).resolve()}: "
                   f"{len(data)} spectra of {len(np.unique(data.star))} stars used, "
                   f"{len(rel.skipped)} rows skipped"
                   + ("; + LAMOST-like realisations of the packaged template stars" if library else "")
                   + (f" and {mkclass_fraction:g} x {n_library_per_class} blue-only MKCLASS standard spectra "
                      "per class (as the default model)" if mkclass_fraction > 0 else "")
                   + (f"; {emission_fraction:g} of the O and B realisations with Be/Oe-like Balmer emission "
                      "(as the default model)" if emission_fraction > 0 else ""))
    card = {
        "classes": list(classes),
        "temperature": temperature,
        "decision": decision.to_dict(),
        "training_data": {
            "description": description,
            "split": "by star (the labels' designation, else the file's DESIG); no star in two splits",
            "splits": [split_summary(k, v) for k, v in (("train", train), ("validation", val), ("test", test))],
            "augmentation": (f"LCGAN samples of the training split's O stars: {timings.get('generated_o', 0)} "
                             f"spectra, {gan_iterations} iterations") if gan_used
            else "none (no O star in the training split, or gan_iterations = 0)",
        },
        "metrics": {"test": test_metrics, "validation_operating_point": chosen, "timings": timings,
                    "history": history, "skipped_rows": len(rel.skipped)},
        "calibration": "temperature scaling fitted on the validation split (held-out stars)",
        "train_config": {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                         "seed": seed, "library": library, "n_library_per_class": n_library_per_class,
                         "mkclass_fraction": mkclass_fraction, "emission_fraction": emission_fraction,
                         "gan_iterations": gan_iterations, "lr_c": lr_c, "lr_max_iter": lr_max_iter,
                         "model_kind": kind},
        "prefix": f"ostar{len(classes)}d",
    }
    version = registry.save_model_version(model, models_dir, card)
    return {"version": version, "models_dir": str(models_dir), "description": description,
            "metrics": test_metrics, "temperature": temperature, "decision": decision.describe(),
            "skipped": len(rel.skipped), "gan_used": gan_used}


def _default_card() -> dict:
    """The card of the packaged default version ({} when none is packaged)."""
    from .models.registry import PACKAGED_MODELS_DIR, list_versions

    cards = list_versions(PACKAGED_MODELS_DIR)
    return cards[-1] if cards else {}


def default_model_kind() -> str:
    """The model kind of the packaged default version (its card's ``train_config.model_kind``).

    ``cnn2`` (the two-channel CNN) for a default whose card does not say.
    """
    return str((_default_card().get("train_config") or {}).get("model_kind") or "cnn2")


def _default_recipe_share(key: str) -> float:
    """A share of the packaged default's training recipe (0 where its card has none)."""
    recipe = (_default_card().get("training_data") or {}).get("recipe") or {}
    return float(recipe.get(key) or 0.0)


def default_mkclass_fraction() -> float:
    """The blue-only MKCLASS share of the packaged default's training recipe (0 for older cards)."""
    return _default_recipe_share("mkclass_fraction")


def default_emission_fraction() -> float:
    """The Be/Oe emission share of the packaged default's training recipe (0 for older cards)."""
    return _default_recipe_share("emission_fraction")


def _release_decision(classes, p_val, val, survey_non_o, Decision, choose_operating_point):
    """Operating point chosen on a release's validation split (see :func:`retrain`)."""
    default = Decision.balanced(classes, min_posterior=0.5, min_heii_sigma=2.0,
                                chosen_on="default thresholds: the validation split holds no O star")
    is_o = val.labels == "O"
    if not is_o.any():
        return default, {"feasible": False, "reason": "no O star in the validation split"}
    from .models.decision import line_veto_thresholds, line_vetoed

    post = default.posterior(p_val)[:, classes.index("O")]
    heii = np.asarray(val.meta.get("heii_sigma", np.full(len(val), np.nan)), float)
    # hot-subdwarf veto (in sigma) from the validation O spectra alone (1 % of them)
    sigma = None if val.meta.get("sdo_sigma") is None else np.asarray(val.meta["sdo_sigma"], float)
    vetoes = line_veto_thresholds(None if sigma is None else sigma[is_o])
    post = np.where(line_vetoed(None, None, vetoes["max_sdo_sigma"], sigma), 0.0, post)
    snr = np.asarray(val.meta.get("snr_g", np.full(len(val), np.nan)), float)
    neg = ~is_o
    w = np.zeros(len(val))
    for c, f in survey_non_o.items():
        sel = neg & (val.labels == c)
        if sel.any():
            w[sel] = f / sel.sum()
    is_b = val.labels == "B"
    op = choose_operating_point(post[is_o], heii[is_o], val.star[is_o], (np.nan_to_num(snr, nan=99.0) >= 10)[is_o],
                                post[neg], heii[neg], w[neg] if w[neg].sum() > 0 else None,
                                np.zeros(0), np.zeros(0), b_posterior=post[is_b], b_heii=heii[is_b])
    if not op.get("feasible") or (op.get("min_score") is None and op.get("min_posterior") is None):
        return default, dict(op, reason="no operating point met the targets on the validation split")
    op.update(vetoes)
    dec = Decision.from_operating_point(
        classes, op, chosen_on=("the release's validation split (held-out stars): max star-averaged O "
                                "recall at S/N >= 10 with <= 100 false O per million (survey mix) and "
                                "<= 5 % of B called O"),
        figures={k: op[k] for k in ("star_averaged_recall", "false_per_million", "b_to_o")})
    return dec, op


# --------------------------------------------------------------------------
# the O-star detector (two channels + He II evidence + operating point)
# --------------------------------------------------------------------------
def decision_from_loso(results: dict, model_kind: str = "cnn2"):
    """The :class:`~lamost_ostar.models.decision.Decision` and temperature chosen by a LOSO run.

    Parameters
    ----------
    results : dict
        ``results.json`` of :func:`lamost_ostar.loso.run_loso`.
    model_kind : str
        The model whose operating point to use.

    Returns
    -------
    (Decision, float)
    """
    from .models.decision import Decision

    r = results["models"][model_kind]
    op = r["operating_point"]
    if op.get("min_posterior") is None:
        raise ValueError(f"the LOSO run found no operating point for {model_kind}")
    classes = list(results["config"]["recipe"]["classes"])
    n_folds = len({f["fold"] for f in results.get("folds", [])})
    chosen = (f"leave-one-star-out, {n_folds} folds ({len(results.get('o_units', []))} O units): "
              "maximum star-averaged O recall at S/N >= 10 with <= 100 false O per million non-O "
              "(survey-preset mock of held-out stars), 0 candidates among the real LAMOST files "
              "(out of fold) and <= 5 % of held-out B spectra at S/N >= 10 called O")
    nested = (r.get("tables") or {}).get("nested") or {}
    figures = {k: op[k] for k in ("star_averaged_recall", "recall_all", "false_per_million",
                                  "real_candidates", "b_to_o") if k in op}
    if nested:
        figures["nested"] = {k: nested.get(k) for k in ("o_recall_star_averaged_snr_ge_10", "false_o_per_million",
                                                        "b_to_o", "b0_b1_to_o", "real_lamost_candidates")}
    per_run = {run: figs[model_kind] for run, figs in (results.get("per_run") or {}).items() if model_kind in figs}
    if per_run:
        chosen = f"pooled runs ({', '.join(per_run)}), " + chosen
        figures["per_run"] = per_run
    dec = Decision.from_operating_point(classes, op, chosen_on=chosen, figures=figures)
    return dec, float(r["temperature"])


def _clean_check_summary(path: str | Path, model_kind: str) -> dict:
    """The headline figures of one ``applied_rule.json`` (a fixed rule on another seed's run):
    those :func:`lamost_ostar.loso.per_run_summary` keeps, and the real LAMOST files scored."""
    from .loso import SUMMARY_KEYS

    d = json.loads(Path(path).read_text())[model_kind]
    t = d["tables"]
    return {"rule_from": d.get("rule_from"), **{k: t.get(k) for k in (*SUMMARY_KEYS, "real_lamost_n")}}


def _no_real_lamost_candidates(model, decision, temperature: float, classes, channels: int, data_dir):
    """Make sure no real LAMOST file of the shared data is a candidate of *this* model.

    The LOSO operating point guarantees it out of fold; the model trained on
    every star gives other scores, so its every real file (the stars it was
    trained on and the galaxies / unknowns it never saw) is scored, and the
    score threshold is raised just above the highest where one would pass.
    As in the LOSO run that chose the rule and in the scan, the stage's own
    conditions are in force (:func:`lamost_ostar.loso.stage_veto_mask`: files
    the LAMOST pipeline calls GALAXY or QSO, spectra below the S/N floor); the
    record also counts the files the rule alone would pass.
    Returns the (possibly raised) decision and a record of the check.
    """
    from . import loso
    from .models import recogniser

    lam = loso._lamost_with_evidence(data_dir)
    if lam is None:
        return decision, {"checked": False, "reason": "no shared LAMOST data"}
    probs = softmax(recogniser.predict_logits(model, lam.inputs(channels)), temperature)
    heii = np.asarray(lam.meta["heii_sigma"], float)
    sdo = np.asarray(lam.meta["sdo_index"], float)
    sigma = np.asarray(lam.meta["sdo_sigma"], float)
    paths = np.asarray(lam.meta["path"]).astype(str)
    kept = ~loso.stage_veto_mask({"set": np.full(len(lam), "lamost"), "pipeline_class": lam.meta["pipeline_class"],
                                  "snr_g": np.asarray(lam.meta["snr_g"], float)})
    out = decision.apply(probs, heii, sdo, sigma)
    rule = out.is_candidate
    cand = rule & kept
    record = {"checked": True, "n_files": int(len(lam)), "scan_conditions": True,
              "candidates_at_loso_threshold": int(cand.sum()),
              "candidate_files": paths[cand].tolist(),
              "rule_alone_candidates_at_loso_threshold": int(rule.sum()),
              "kept_out_by_scan_conditions": paths[rule & ~kept].tolist()}
    if cand.any() and decision.min_score is not None:
        passing = out.score[cand]
        raised = float(np.max(passing)) + 0.01
        record.update(loso_min_score=decision.min_score, raised_min_score=raised)
        decision = dataclasses.replace(
            decision, min_score=raised,
            chosen_on=decision.chosen_on + f"; threshold raised from {decision.min_score:.3f} to {raised:.3f} so "
                      "that no real LAMOST file of the shared data is a candidate of this model "
                      f"({len(passing)} was, at the LOSO threshold, with the scan's conditions in force)")
        record["candidates_after"] = int((decision.apply(probs, heii, sdo, sigma).is_candidate & kept).sum())
    return decision, record


def _fit_member(kind: str, train, val, classes, *, epochs: int, batch_size: int, patience: int,
                learning_rate: float, lr_c: float, lr_max_iter: int, seed: int, verbose: int):
    """One model of kind ``lr1``/``lr2`` (logistic regression as a Keras model) or ``cnn*``."""
    import keras

    from .models import recogniser

    keras.utils.set_random_seed(seed)
    if kind in ("lr2", "lr1"):
        from .loso import fit_logistic

        ch = 2 if kind == "lr2" else 1
        feats = train.inputs(ch).reshape(len(train), -1)
        scaler, clf = fit_logistic(feats, train.y(classes), c=lr_c, max_iter=lr_max_iter)
        coef = np.zeros((len(classes), feats.shape[1]))
        icpt = np.full(len(classes), -1e4)
        coef[clf.classes_], icpt[clf.classes_] = clf.coef_, clf.intercept_
        model = recogniser.linear_model_from_sklearn(coef, icpt, scaler.mean_, scaler.scale_, channels=ch)
        z_val = recogniser.predict_logits(model, val.inputs(ch))
        return model, {"loss": [], "best_epoch": [0], "n_iter": int(np.max(clf.n_iter_)),
                       "val_accuracy": [float(np.mean(z_val.argmax(1) == val.y(classes)))]}
    x_train = train.inputs(2)
    if kind == "cnn2dx":
        from .loso import mix_within_class

        x_train, _ = mix_within_class(x_train, train.labels, train.star, np.random.default_rng([seed, 7]),
                                      group=train.source == "mkclass")
    return recogniser.train_recogniser(
        x_train, train.y(classes), val.inputs(2), val.y(classes), epochs=epochs,
        batch_size=batch_size, patience=patience, learning_rate=learning_rate, n_classes=len(classes),
        build_kwargs={"head": "dense"} if kind.startswith("cnn2d") else None, verbose=verbose)


def train_detector(models_dir: str | Path, loso_results: str | Path, *, recipe=None, epochs: int = 30,
                   batch_size: int = 32, patience: int = 5, learning_rate: float = 1e-3,
                   n_val_per_class: int = 100, seed: int = 0, data_dir: str | Path | None = None,
                   model_kind: str = "cnn2", verbose: int = 0,
                   calibration_results: str | Path | None = None,
                   clean_checks: Sequence[str | Path] = (), lr_max_iter: int | None = None
                   ) -> tuple[str, dict]:
    """Train the two-channel detector on every star and register it with the LOSO decision.

    The network is trained like one LOSO fold but on all template stars and all
    real LAMOST files (:func:`lamost_ostar.datasets.build_detector_training`),
    with early stopping on independent realisations of the same stars.  Its
    calibration temperature and its O-candidate rule come from the
    leave-one-star-out run (out-of-fold data only), whose tables go into the
    card.

    Parameters
    ----------
    loso_results : path
        ``results.json`` of the LOSO run (usually pooled seeds) whose operating
        point becomes the model's rule.
    calibration_results : path, optional
        ``results.json`` of LOSO runs of *this* model's training recipe, when
        the rule comes from runs of another recipe (a fixed rule applied
        unchanged, as in a clean check): the recipe, the temperatures and the
        LOSO tables of the card come from it, the rule from ``loso_results``.
        Default: both from ``loso_results``.
    clean_checks : paths
        ``applied_rule.json`` files of :func:`lamost_ostar.loso.apply_rule`
        (runs of other seeds scored with this rule, unchanged); their summary
        goes into the card (``metrics.loso.clean_checks``).
    lr_max_iter : int, optional
        Iteration cap of a logistic-regression member.  Default: the LOSO
        run's, as its ``lr_c`` (the members are fitted like the run's folds).

    Returns
    -------
    (version, card_extra)
    """
    from . import loso
    from .datasets import DetectorRecipe, build_detector_training, load_lamost
    from .models import recogniser, registry
    from .templates import load_templates

    results = json.loads(Path(loso_results).read_text())
    decision, temperature = decision_from_loso(results, model_kind)
    if calibration_results is not None:
        calib = json.loads(Path(calibration_results).read_text())
        temperature = float(calib["models"][model_kind]["temperature"])
        decision = dataclasses.replace(decision, chosen_on=(
            decision.chosen_on + f"; rule from {loso_results} applied unchanged to this model, whose training "
            f"recipe and temperatures come from other runs ({calibration_results}, out-of-fold logits)"))
    else:
        calib = results
    if recipe is None:
        recipe = DetectorRecipe.from_dict(calib["config"]["recipe"])
    classes = tuple(recipe.classes)
    rng = np.random.default_rng(seed)
    lib = loso._usable_for_training(load_templates(), classes)
    try:
        lamost = load_lamost(data_dir).only(classes)
    except FileNotFoundError:
        lamost = None
    t0 = time.perf_counter()
    train = build_detector_training(lib, recipe, rng, lamost=lamost)
    val = build_detector_training(lib, dataclasses.replace(recipe, n_per_class=n_val_per_class, mix_fraction=0.0),
                                  rng, None)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    loso_config = calib.get("config") or {}
    lr_c = float(loso_config.get("lr_c", 0.05))
    if lr_max_iter is None:      # the LOSO folds' own cap (LR_MAX_ITER in runs older than the setting)
        lr_max_iter = int(loso_config.get("lr_max_iter", loso.LR_MAX_ITER))
    fit = dict(epochs=epochs, batch_size=batch_size, patience=patience, learning_rate=learning_rate,
               lr_c=lr_c, lr_max_iter=lr_max_iter, seed=seed, verbose=verbose)
    if model_kind.startswith("ens-"):
        # an ensemble: every member trained on the same spectra, averaged through its own
        # out-of-fold temperature (the same combination as loso.ensemble_oof)
        members = model_kind[4:].split("-")
        fitted = [_fit_member(m, train, val, classes, **fit) for m in members]
        temps = [float(calib["models"][m]["temperature"]) for m in members]
        model = recogniser.ensemble_model([f[0] for f in fitted], temps)
        history = {"loss": fitted[0][1]["loss"], "best_epoch": [0],
                   "val_accuracy": [float(np.mean(recogniser.predict_logits(model, val.inputs(2)).argmax(1)
                                                  == val.y(classes)))],
                   "members": {m: {"temperature": t, "history": h} for m, t, (_, h) in zip(members, temps, fitted)}}
    else:
        model, history = _fit_member(model_kind, train, val, classes, **fit)
    t_fit = time.perf_counter() - t0
    decision, real_check = _no_real_lamost_candidates(model, decision, temperature, classes,
                                                      2 if model_kind != "lr1" else 1, data_dir)
    loso_m = calib["models"][model_kind]
    checks = {str(c): _clean_check_summary(c, model_kind) for c in clean_checks}
    card = {
        "classes": list(classes),
        "temperature": temperature,
        "decision": decision.to_dict(),
        "training_data": {
            "description": (
                "LAMOST-like realisations of every real template star (MILES, STELIB re-reddened, "
                "Pickles; HD338529 left out, mislabelled) + mixtures of neighbouring templates + the "
                "real LAMOST A/F/G/K/M files; degradations as in 'recipe'; "
                + (f"+ {recipe.mkclass_fraction:g} x n_per_class blue-only spectra per class (MKCLASS "
                   "averaged MK standards O4-M, 3800-5600 A, the rest masked; X: its own templates cut "
                   "to that band)" if recipe.mkclass_fraction > 0 else "MKCLASS blue-only averages not used")
                + (f"; {recipe.emission_fraction:g} of the O and B single-star realisations with Be/Oe-like "
                   "Balmer emission (H-alpha EW "
                   f"{recipe.emission_ew_range[0]:g}-{recipe.emission_ew_range[1]:g} A)"
                   if recipe.emission_fraction > 0 else "")),
            "train": train.describe(), "validation": val.describe(),
            "recipe": dataclasses.asdict(recipe),
            "build_seconds": t_data,
        },
        "metrics": {
            "loso": {"operating_point": loso_m["operating_point"],
                     "operating_point_without_he_ii": loso_m.get("operating_point_without_he_ii"),
                     "tables": loso_m["tables"], "p_o_by_ebv": loso_m.get("p_o_by_ebv"),
                     "o_units": calib.get("o_units"), "config": calib.get("config"),
                     "rule_from": str(loso_results),
                     **({"clean_checks": checks} if checks else {}),
                     "baselines": {k: {"operating_point": v["operating_point"],
                                       "summary": {key: v["tables"]["operating_point"].get(key)
                                                   for key in ("o_recall_star_averaged_snr_ge_10", "b_to_o",
                                                               "b0_b1_to_o", "false_o_per_million",
                                                               "real_lamost_candidates")}
                                       if "operating_point" in v["tables"] else None}
                                   for k, v in calib["models"].items() if k != model_kind}},
            "validation_same_stars": {"best_epoch": history["best_epoch"][0],
                                      "val_accuracy": history["val_accuracy"][history["best_epoch"][0]]},
            "history": history,
            "timings": {"fit_seconds": t_fit, "epochs": len(history["loss"])},
            "model_kind": model_kind,
        },
        "real_lamost_check": real_check,
        "calibration": ("temperature scaling fitted on the leave-one-star-out out-of-fold logits "
                        "(held-out stars), not on the training stars"),
        "train_config": {"epochs": epochs, "batch_size": batch_size, "patience": patience,
                         "learning_rate": learning_rate, "seed": seed, "lr_c": lr_c, "lr_max_iter": lr_max_iter,
                         "model_kind": model_kind},
        "prefix": f"ostar{len(classes)}-{model_kind}",
    }
    version = registry.save_model_version(model, models_dir, card)
    return version, card
