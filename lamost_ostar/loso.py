"""Leave-one-star-out evaluation of the O-star detector: figures that cannot flatter.

Every real O star of the template library is held out in turn (stars that
share data leave together: :func:`lamost_ostar.datasets.library_star_ids`
groups the MILES O stars whose red end was filled from a Pickles O star with
that Pickles star).  The other classes' stars -- B, A ... M, the X impostors
and the real LAMOST spectra (by designation) -- are dealt into the same number
of folds, so that in fold ``k`` a model trained on the stars of all other folds
is tested on fold ``k``'s stars only.  Each fold's tests are:

``o``       LAMOST-like realisations of the held-out O star(s) over the full
            E(B-V) (0-2.5 added to the star's own) and S/N (5-100) ranges;
``b``       the same for the fold's B stars (B0-B1 reported separately);
``x``       the fold's impostors (white dwarfs, hot subdwarfs, Wolf-Rayet);
``survey``  a survey-preset sample (B, A ... M, X at LAMOST fractions, the mock
            release's own reddening and S/N) of the fold's non-O stars: false O
            per million non-O spectra;
``lamost``  the fold's real LAMOST files (non-O): candidates among them.

Out-of-fold logits, the He II evidence (:mod:`lamost_ostar.lines`) and the
truth of every test spectrum are saved (``oof_<model>.npz``), so the tables,
the temperature, the operating point (:func:`lamost_ostar.models.decision.choose_operating_point`)
and the report are recomputed from them without retraining.

Models compared on the same folds and data (:data:`MODEL_KINDS`): the
two-channel CNN (``cnn2``), the paper's one-channel CNN (``cnn1``), and
logistic-regression baselines on one channel (``lr1``) and both (``lr2``);
optionally the CNN with LCGAN / SGAN O samples added (``cnn2+lcgan``,
``cnn2+sgan``), the generators trained on high-S/N realisations of the fold's
training O stars with noise added after generation.  ``cnn2d`` is the CNN
with the position-aware dense head, ``cnn2dx`` that with within-class mixing
(the default's CNN), and ``cnn2dw`` (experimental, run 15) ``cnn2dx`` with a
linear path on the per-pixel standardised input added to its logits: the
``lr2`` baseline inside the network, with ``lr2``'s L2 penalty, trained jointly.
Every CNN kind is a row of :data:`CNN_KINDS`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import (CLASSES_8, OTHER_LABEL, DetectorRecipe, LabelledSpectra, build_detector_training,
                       library_star_ids, load_lamost, mkclass_neighbours, mkclass_training_standards,
                       realise_templates, spread, _simulate_lib, _usable_for_training)

__all__ = ["CLASSES_8", "LosoConfig", "MODEL_KINDS", "assign_folds", "run_loso", "analyse", "render_report",
           "CnnKind", "CNN_KINDS", "evidence", "EVIDENCE_KEYS", "LINE_KEYS", "merge_runs", "pool_runs", "false_o_by_star", "ensemble_oof",
           "mix_within_class", "mix_across_classes", "MEMBER_SEED_STEP", "environment", "apply_rule", "star_test_sets", "saved_fold_model", "member_temperature",
           "ensemble_logits", "rule_candidates", "early_b_weights", "LR_KINDS", "LrKind",
           "split_early_b_labels", "merge_split_logits", "add_interstellar_twins", "config_from_dict"]



@dataclass(frozen=True)
class CnnKind:
    """How a CNN kind of :data:`CNN_KINDS` is built and trained (its input: :func:`model_input`).

    Attributes
    ----------
    head : str or None
        ``build_recogniser``'s head (``"dense"``: position-aware); None: the paper's pooling head.
    mix : bool
        O and B training spectra mixed across stars of their class (:func:`mix_within_class`).
    standardise : bool
        Every pixel of every channel standardised by the training set (saved as ``*.scale.npz``).
    wide : bool
        A linear path on the per-pixel standardised input added to the logits, with ``lr2``'s L2.
    ema : float or None
        Momentum of the weights' exponential moving average the model keeps (None: plain weights).
    cross_mix : float
        O/B mixtures with soft labels added to the training set, this fraction of its O and B
        spectra (:func:`mix_across_classes`); 0: none.
    members : int
        Networks trained on the same training set from different initialisations (member ``m``
        seeded ``seed + MEMBER_SEED_STEP * m``; member 0 is the one-member kind's network), their
        class probabilities combined as the shipped ensemble combines its members
        (:func:`ensemble_logits`, temperatures 1): a deep ensemble.
    early_b_weight : float
        Loss weight of the B0-B1 training spectra relative to the others (:func:`early_b_weights`);
        1: every spectrum weighs the same.
    build : tuple of (str, value) pairs
        Further :func:`lamost_ostar.models.recogniser.build_recogniser` arguments (size and
        regularisation); empty: its defaults.
    """

    head: str | None = None
    mix: bool = False
    standardise: bool = False
    wide: bool = False
    ema: float | None = None
    cross_mix: float = 0.0
    members: int = 1
    early_b_weight: float = 1.0
    build: tuple[tuple[str, Any], ...] = ()


#: the CNN kinds (the run each experimental one belongs to: ``reports/loso/runNN/README.md``)
CNN_KINDS: dict[str, CnnKind] = {
    "cnn2": CnnKind(), "cnn1": CnnKind(), "cnn2d": CnnKind(head="dense"),
    "cnn2dx": CnnKind(head="dense", mix=True),                                   # the default's CNN
    "cnn2dw": CnnKind(head="dense", mix=True, wide=True),                         # run 15
    "cnn1nx": CnnKind(head="dense", mix=True),                                   # run 20
    "cnn2dxs": CnnKind(head="dense", mix=True, standardise=True),                 # run 21
    "cnn2dxse": CnnKind(head="dense", mix=True, standardise=True, ema=0.998),     # run 22
    "cnn2dxsm": CnnKind(head="dense", mix=True, standardise=True, cross_mix=0.2),  # run 23
    "cnn2dxsd2": CnnKind(head="dense", mix=True, standardise=True, members=2),     # run 24
    "cnn2dxsb": CnnKind(head="dense", mix=True, standardise=True, early_b_weight=3.0),  # run 25
    "cnn2dxsr": CnnKind(head="dense", mix=True, standardise=True,                   # run 26
                        build=(("width", 8), ("dropout", 0.5), ("head_l2", 1e-3))),
}

@dataclass(frozen=True)
class LrKind:
    """How a logistic-regression kind of :data:`LR_KINDS` is fitted (its input: :func:`model_input`).

    Attributes
    ----------
    early_b_weight : float
        Loss weight of the B0-B1 training spectra relative to the others (:func:`early_b_weights`).
    split_early_b : bool
        The B0-B1 training spectra are a class of their own in the fit (one more weight vector),
        merged back into B at the output (:func:`merge_split_logits`): the O/B0 boundary gets a
        hyperplane of its own instead of sharing B's with the late-B stars.
    """

    early_b_weight: float = 1.0
    split_early_b: bool = False


#: the logistic-regression kinds (``lr2b``: run 25; ``lr2e``: run 27)
LR_KINDS: dict[str, LrKind] = {"lr2": LrKind(), "lr1": LrKind(), "lr2b": LrKind(early_b_weight=3.0),
                               "lr2e": LrKind(split_early_b=True)}

#: seed offset between the members of a deep-ensemble kind (:attr:`CnnKind.members`)
MEMBER_SEED_STEP = 7919

#: model kinds a LOSO run can compare
MODEL_KINDS: tuple[str, ...] = (*CNN_KINDS, *LR_KINDS, "cnn2+lcgan", "cnn2+sgan", "cnn2d+lcgan", "cnn2d+sgan")

#: S/N (g) and total E(B-V) bins of the tables
SNR_BINS: tuple[tuple[float, float], ...] = ((5, 10), (10, 20), (20, 50), (50, 1e9))
#: S/N bins of the survey sample's tables (it holds spectra below 5 too)
SURVEY_SNR_BINS: tuple[tuple[float, float], ...] = ((0, 5),) + SNR_BINS
EBV_BINS: tuple[tuple[float, float], ...] = ((0, 0.4), (0.4, 0.8), (0.8, 1.5), (1.5, 99))

#: Survey-preset fractions of the non-O classes (the mock's ``survey`` preset
#: plus X impostors at 0.3 %).
SURVEY_NON_O: dict[str, float] = {"B": 0.03, "A": 0.08, "F": 0.28, "G": 0.33, "K": 0.21,
                                  "M": 0.07, "X": 0.003}

#: Iteration cap (lbfgs) of the logistic regressions, unless a run sets its own (``LosoConfig.lr_max_iter``).
LR_MAX_ITER: int = 300


@dataclass
class LosoConfig:
    """Size and settings of a leave-one-star-out run.

    Attributes
    ----------
    recipe : DetectorRecipe
        Training spectra per class and their degradations.
    models : tuple of str
        Model kinds (:data:`MODEL_KINDS`).
    epochs, batch_size, patience : int
        CNN training (early stopping on independent realisations of the
        training stars; the test stars are never seen).
    n_val_per_class : int
        Validation realisations per class (training stars).
    o_per_star, b_per_star, x_per_star : int
        Test realisations per held-out O / B / X star.
    survey_per_fold : int
        Survey-preset non-O spectra per fold (when ``survey_per_class`` is None).
    survey_per_class : dict or None
        Survey sample drawn stratified: spectra per class per fold (the false-O
        rate is re-weighted to the survey fractions :data:`SURVEY_NON_O`), so
        that the classes O candidates come from (B, A) are sampled densely
        enough for a rate of 1e-4.
    save_models : bool
        Save each fold's fitted models under ``models/`` (re-scoring without
        re-training).
    folds : tuple of int or None
        Run only these folds (None: all).
    gan_iterations, gan_samples, gan_snr : int, int, float
        GAN budget, generated O spectra added, minimum S/N of the GAN's
        training realisations.
    lr_c, lr_max_iter : float, int
        Inverse L2 strength and iteration cap of the logistic regressions.
    seed : int
        Master seed.
    interstellar_tests : bool
        Also test on ``o_ism`` / ``b_ism`` / ``survey_ism``: the same O, B
        and survey test realisations (same draws) with the interstellar lines
        and diffuse bands of their added E(B-V) (``MockConfig.interstellar``);
        the standard tables ignore them, :func:`apply_rule` reads them with
        ``interstellar=True``.
    """

    recipe: DetectorRecipe = field(default_factory=DetectorRecipe)
    models: tuple[str, ...] = ("cnn2", "cnn1", "lr2", "lr1")
    epochs: int = 30
    batch_size: int = 32
    patience: int = 5
    learning_rate: float = 1e-3
    n_val_per_class: int = 60
    o_per_star: int = 240
    b_per_star: int = 40
    x_per_star: int = 40
    survey_per_fold: int = 12000
    survey_per_class: dict | None = field(default_factory=lambda: {
        "B": 3000, "A": 2000, "F": 2000, "G": 1500, "K": 1000, "M": 500, "X": 200})
    save_models: bool = True
    folds: tuple[int, ...] | None = None
    gan_iterations: int = 1000
    gan_samples: int = 300
    gan_snr: float = 80.0
    lr_c: float = 0.05
    lr_max_iter: int = LR_MAX_ITER
    seed: int = 0
    profile: str = "full"
    interstellar_tests: bool = False

    @classmethod
    def from_profile(cls, name: str, seed: int = 0) -> "LosoConfig":
        """``tiny`` (seconds: tests), ``quick`` (a few folds), ``full`` (every star)."""
        if name == "tiny":
            return cls(recipe=DetectorRecipe(n_per_class=12), models=("cnn2", "lr2"), epochs=1,
                       batch_size=16, n_val_per_class=4, o_per_star=8, b_per_star=2, x_per_star=2,
                       survey_per_fold=40, survey_per_class={"B": 8, "A": 8, "F": 8, "G": 8, "K": 4,
                                                             "M": 2, "X": 2},
                       folds=(0,), gan_iterations=2, gan_samples=6, lr_max_iter=50, save_models=False,
                       seed=seed, profile=name)
        if name == "quick":
            return cls(folds=(0, 1, 2), seed=seed, profile=name)
        if name == "full":
            return cls(seed=seed, profile=name)
        raise ValueError(f"unknown profile {name!r} (tiny, quick, full)")


# --------------------------------------------------------------------------
# the He II evidence of a prepared batch
# --------------------------------------------------------------------------
#: evidence arrays stored for every test spectrum
EVIDENCE_KEYS: tuple[str, ...] = ("heii_sigma", "hei_sigma", "heii_ew", "log_wprime", "heii_detected",
                                   "metal_veto", "heii_4686_emission", "n_heii_lines", "sdo_index",
                                   "sdo_sigma")


#: single lines whose box EW and error are stored too (``ew_<line>``, ``ew_<line>_err``):
#: the Balmer lines (gravity: hot subdwarfs have broad ones) and the He lines of the O/B boundary
LINE_KEYS: tuple[str, ...] = ("hdelta", "hgamma", "hbeta", "heii_4686", "heii_4541", "hei_4471")


def evidence(prep) -> dict[str, np.ndarray]:
    """He II / He I evidence of a :class:`~lamost_ostar.preprocess.PreparedBatch`."""
    from . import lines

    m = lines.measure_lines(prep.flux, prep.ivar, prep.mask)
    out = {k: np.asarray(getattr(m, k), float) for k in EVIDENCE_KEYS}
    for name in LINE_KEYS:
        ew, err = m.ew_of(name)
        out[f"ew_{name}"], out[f"ew_{name}_err"] = np.asarray(ew, float), np.asarray(err, float)
    return out


# --------------------------------------------------------------------------
# folds
# --------------------------------------------------------------------------
def assign_folds(lib, lamost: LabelledSpectra | None, rng: np.random.Generator
                 ) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """One fold per O split unit; every other star dealt into the folds by class.

    Returns
    -------
    o_units : list of str
        The O split unit held out by each fold (fold ``k`` holds ``o_units[k]``).
    fold_of_star : dict
        Library star (split unit) -> fold.
    fold_of_lamost : dict
        LAMOST star (designation) -> fold.
    """
    ids = library_star_ids(lib)
    mk = np.asarray(lib.mk).astype(str)
    o_units = sorted(np.unique(ids[mk == "O"]).tolist())
    if not o_units:
        raise ValueError("the library has no O star")
    k = len(o_units)
    fold_of_star = {u: i for i, u in enumerate(o_units)}
    for c in sorted(set(mk) - {"O"}):
        stars = rng.permutation(np.unique(ids[mk == c]))
        start = int(rng.integers(0, k))
        for j, s in enumerate(stars):
            fold_of_star.setdefault(str(s), (start + j) % k)
    fold_of_lamost: dict[str, int] = {}
    if lamost is not None and len(lamost):
        for c in np.unique(lamost.labels):
            stars = rng.permutation(np.unique(lamost.star[lamost.labels == c]))
            start = int(rng.integers(0, k))
            for j, s in enumerate(stars):
                fold_of_lamost.setdefault(str(s), (start + j) % k)
    return o_units, fold_of_star, fold_of_lamost


def _take_stars(lib, stars: set[str], keep: bool):
    ids = library_star_ids(lib)
    sel = np.isin(ids, sorted(stars))
    return lib._take(np.flatnonzero(sel if keep else ~sel))


# --------------------------------------------------------------------------
# fold data
# --------------------------------------------------------------------------
def star_test_sets(test_lib, cfg: LosoConfig, rng: np.random.Generator,
                   measure: Callable | None = None) -> dict[str, LabelledSpectra]:
    """The fold's O / B / X test realisations (``o``, ``b``, ``x``) of the stars in ``test_lib``.

    Per star ``cfg.o_per_star`` (``b_per_star``, ``x_per_star``) spectra spread
    evenly over :data:`SNR_BINS`, E(B-V) and the other degradations of
    ``cfg.recipe``; ``measure`` (default :func:`evidence`) fills ``meta``.
    """
    recipe = cfg.recipe
    out: dict[str, LabelledSpectra] = {}
    per_bin = {"O": cfg.o_per_star, "B": cfg.b_per_star, "X": cfg.x_per_star}
    for name, c in (("o", "O"), ("b", "B"), ("x", "X")):
        sub = test_lib.select(c)
        if len(sub) == 0:
            continue
        for target, r, ism in _with_twin(name, rng, cfg.interstellar_tests and c in ("O", "B")):
            parts = []
            n = per_bin[c]
            for lo, hi in SNR_BINS:
                cfg_m = recipe.mock_config(snr_range=(float(lo), float(min(hi, 150.0))),
                                           calib_sigma=recipe.calib_sigma, interstellar=ism)
                per = spread(sub, {c: n // len(SNR_BINS) * max(1, len(np.unique(library_star_ids(sub))))}, r)
                parts.append(realise_templates(sub, per, r, cfg_m, 0.0, measure or evidence, source="test"))
            out[target] = LabelledSpectra.concat(parts)
    return out


def _with_twin(name: str, rng: np.random.Generator, twin: bool) -> list[tuple[str, np.random.Generator, bool]]:
    """``(set name, generator, interstellar)`` of a test set, and of its interstellar twin when asked.

    The twin (``<name>_ism``) replays the set's random draws from a copy of the
    generator taken before them, so the run's other data are those of a run
    without it.
    """
    return [(name, rng, False)] + ([(f"{name}_ism", copy.deepcopy(rng), True)] if twin else [])


def _test_sets(test_lib, lamost_test: LabelledSpectra | None, cfg: LosoConfig,
               rng: np.random.Generator) -> dict[str, LabelledSpectra]:
    """The fold's test spectra (held-out stars only), with evidence in ``meta``."""
    out = star_test_sets(test_lib, cfg, rng)
    # survey-preset sample of the fold's non-O stars, the mock release's own physics
    from .mock import MockConfig

    present = [c for c in SURVEY_NON_O if np.any(np.asarray(test_lib.mk) == c)]
    if present and (cfg.survey_per_class or cfg.survey_per_fold > 0):
        if cfg.survey_per_class:
            counts = np.array([int(cfg.survey_per_class.get(c, 0)) for c in present])
        else:
            frac = np.array([SURVEY_NON_O[c] for c in present])
            counts = np.floor(frac / frac.sum() * cfg.survey_per_fold).astype(int)
            counts[np.argmax(frac)] += cfg.survey_per_fold - counts.sum()
        mk = [c for c, m in zip(present, counts) for _ in range(int(m))]
        ids = dict(zip(np.asarray(test_lib.name).astype(str), library_star_ids(test_lib)))
        mk = list(rng.permutation(mk))
        for target, r, ism in _with_twin("survey", rng, cfg.interstellar_tests):
            parts = [_simulate_lib(test_lib, mk[start:start + 2048], r, MockConfig(interstellar=ism), 0.0,
                                   ids, "survey", evidence) for start in range(0, len(mk), 2048)]
            # weights re-establish the survey mix where a fold lacks a class
            out[target] = LabelledSpectra.concat(parts)
    if lamost_test is not None and len(lamost_test):
        out["lamost"] = lamost_test
    return out


def _lamost_with_evidence(data_dir) -> LabelledSpectra | None:
    """Real LAMOST non-O spectra with their evidence (None without the shared data)."""
    from . import io, preprocess

    try:
        lam = load_lamost(data_dir, include_other=True)
    except FileNotFoundError:
        return None
    if not len(lam):
        return None
    batch = io.read_spectra(list(lam.meta["path"]))
    by = {s.path: s for s in batch.spectra}
    prep = preprocess.prepare([by[p] for p in lam.meta["path"]])
    lam.meta.update(evidence(prep))
    lam.meta["pipeline_class"] = np.array([str(by[p].pipeline_class or "") for p in lam.meta["path"]])
    return lam


def class_veto_mask(d: Mapping[str, np.ndarray]) -> np.ndarray:
    """Out-of-fold spectra the stage's pipeline-class veto removes (real LAMOST GALAXY / QSO files).

    Uses the stored ``pipeline_class``; for runs made before it was stored, the
    class is read from the real LAMOST files' headers (their stored ``path``).
    Only the ``lamost`` set has a pipeline class (the simulated sets have none).
    """
    from .models.decision import class_vetoed

    sets = d["set"].astype(str)
    out = np.zeros(len(sets), bool)
    lam = np.flatnonzero(sets == "lamost")
    if not lam.size:
        return out
    if "pipeline_class" in d:
        cls = d["pipeline_class"].astype(str)[lam]
    elif "path" in d:
        from . import io

        paths = d["path"].astype(str)[lam]
        got = {sp.path: sp.pipeline_class for sp in io.read_spectra(sorted(set(paths))).spectra}
        cls = [got.get(p) for p in paths]
    else:
        return out
    out[lam] = class_vetoed(cls)
    return out


def stage_veto_mask(d: Mapping[str, np.ndarray], class_veto: bool = True,
                    min_snr_g: float | None = None) -> np.ndarray:
    """Out-of-fold spectra that the stage's own conditions keep from being candidates.

    The pipeline-class veto (:func:`class_veto_mask`, with ``class_veto``) and the
    S/N floor (:func:`lamost_ostar.models.decision.below_snr_floor` of the stored
    ``snr_g``; ``min_snr_g`` None: :data:`~lamost_ostar.models.decision.MIN_SNR_G`,
    0: none) -- what ``OStarStage`` applies on top of a card's rule.
    """
    from .models.decision import below_snr_floor, snr_floor_in_force

    n = len(d["set"])
    out = class_veto_mask(d) if class_veto else np.zeros(n, bool)
    snr = d.get("snr_g", np.full(n, np.nan)).astype(float)
    return out | below_snr_floor(snr, snr_floor_in_force(min_snr_g))


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------
def mix_within_class(inputs: np.ndarray, labels: np.ndarray, star: np.ndarray, rng: np.random.Generator,
                     fraction: float = 0.5, classes: Sequence[str] = ("O", "B"),
                     weight_range: tuple[float, float] = (0.25, 0.75),
                     group: np.ndarray | None = None,
                     unit_norm_first: bool = True) -> tuple[np.ndarray, int]:
    """Replace a share of the O and B training spectra by mixtures of two stars of the class.

    A composite of two O stars is an O spectrum of a type between theirs (He II
    and He I strengths in between, the same hot continuum), so mixing spectra
    of *different* stars of one class makes spectra of stars the training set
    does not hold -- the variety 10 real O stars lack.  ``fraction`` of each
    class's spectra become ``w a + (1 - w) b`` (``w`` uniform in
    ``weight_range``, ``b`` a spectrum of another star of the class), channel
    by channel; the labels do not change.  ``group`` (optional, (N,)): a
    spectrum is mixed only with one of its own group (the blue-only spectra,
    source ``"mkclass"``, with each other, never with a full-range one).
    ``unit_norm_first``: channel 0 is the unit-norm standardised flux, and a
    mixture's is renormalised (False: an input without it, e.g. the
    continuum-normalised flux alone).  Returns the new inputs and the number
    of spectra mixed.
    """
    out = np.array(inputs, dtype=np.float32, copy=True)
    n_mixed = 0
    group = np.zeros(len(labels), bool) if group is None else np.asarray(group)
    for c, g in [(c, g) for c in classes for g in np.unique(group)]:
        idx = np.flatnonzero((labels == c) & (group == g))
        if idx.size < 2 or len(np.unique(star[idx])) < 2:
            continue
        pick = rng.choice(idx, size=int(round(fraction * idx.size)), replace=False)
        partner = rng.choice(idx, size=pick.size)
        same = star[partner] == star[pick]
        for _ in range(20):                                   # another star for each
            if not same.any():
                break
            partner[same] = rng.choice(idx, size=int(same.sum()))
            same = star[partner] == star[pick]
        pick, partner = pick[~same], partner[~same]
        w = rng.uniform(*weight_range, size=pick.size).astype(np.float32)
        out[pick] = _mixtures(inputs, pick, partner, w, unit_norm_first)
        n_mixed += int(pick.size)
    return out, n_mixed


def _mixtures(inputs: np.ndarray, a: np.ndarray, b: np.ndarray, w: np.ndarray,
              unit_norm_first: bool) -> np.ndarray:
    """``w * inputs[a] + (1 - w) * inputs[b]`` row by row, channel by channel (``(N, npix)`` or
    ``(N, npix, C)``); with ``unit_norm_first`` channel 0, the unit-norm standardised flux, is
    scaled back to unit norm."""
    shape = (-1,) + (1,) * (inputs.ndim - 1)
    mixed = w.reshape(shape) * inputs[a] + (1 - w).reshape(shape) * inputs[b]
    if unit_norm_first:
        ch0 = mixed if mixed.ndim == 2 else mixed[..., 0]
        norm = np.sqrt(np.sum(ch0.astype(np.float64) ** 2, axis=1))
        ch0 /= np.where(norm > 0, norm, 1.0)[:, None].astype(np.float32)
    return mixed


def mix_across_classes(inputs: np.ndarray, labels: np.ndarray, classes: Sequence[str], rng: np.random.Generator,
                       fraction: float = 0.2, pair: tuple[str, str] = ("O", "B"),
                       group: np.ndarray | None = None,
                       unit_norm_first: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mixtures of the two classes of ``pair`` with soft labels: the O/B boundary made explicit.

    ``round(fraction * n)`` new spectra (``n``: the spectra of both classes),
    each ``w * a + (1 - w) * b`` of a random spectrum ``a`` of ``pair[0]`` and
    ``b`` of ``pair[1]`` of the same ``group`` (blue-only with blue-only), ``w``
    uniform in (0, 1), labelled ``w`` of ``pair[0]`` and ``1 - w`` of
    ``pair[1]``: what an O+B composite looks like, and how O-like it is.  The
    unit-norm channel 0 is renormalised (``unit_norm_first``).  Returns the
    new inputs and their soft labels ``(M, len(classes))``; the originals are
    not changed.
    """
    k_a, k_b = list(classes).index(pair[0]), list(classes).index(pair[1])
    group = np.zeros(len(labels), bool) if group is None else np.asarray(group)
    xs, ws = [], []
    for g in np.unique(group):
        ia = np.flatnonzero((labels == pair[0]) & (group == g))
        ib = np.flatnonzero((labels == pair[1]) & (group == g))
        m = int(round(fraction * (ia.size + ib.size)))
        if ia.size == 0 or ib.size == 0 or m == 0:
            continue
        a, b = rng.choice(ia, size=m), rng.choice(ib, size=m)
        w = rng.uniform(0.0, 1.0, size=m).astype(np.float32)
        xs.append(_mixtures(inputs, a, b, w, unit_norm_first).astype(np.float32))
        ws.append(w)
    y = np.zeros((sum(len(w) for w in ws), len(classes)), np.float32)
    if not xs:
        return np.zeros((0,) + inputs.shape[1:], np.float32), y
    w = np.concatenate(ws)
    y[:, k_a], y[:, k_b] = w, 1 - w
    return np.concatenate(xs), y


def early_b_weights(data: LabelledSpectra, weight: float) -> np.ndarray | None:
    """Per-spectrum loss weights: ``weight`` for the B0-B1 spectra (B, subtype < 2 in
    ``meta["subclass"]``), 1 for the others, scaled to a mean of 1 (None when ``weight`` is 1).

    The operating point at the survey prior is set by the few non-O spectra scored highest, and
    those are early-B stars (runs 11-24: B0-B0.5 dwarfs and giants such as lambda Lep); weighting
    them asks the fit to spend its capacity on the O/B0 boundary.  A training spectrum replaced by
    a mixture (:func:`mix_within_class`) keeps its own weight.
    """
    if weight == 1.0:
        return None
    w = np.where(_early_b(data), float(weight), 1.0)
    return (w / w.mean()).astype(np.float32)


def split_early_b_labels(data: LabelledSpectra, classes: Sequence[str]) -> np.ndarray:
    """Class indices of ``data`` with its B0-B1 spectra (:func:`_early_b`) given index
    ``len(classes)``, a training class of their own (:attr:`LrKind.split_early_b`)."""
    y = data.y(classes)
    y[_early_b(data)] = len(classes)
    return y


def merge_split_logits(z: np.ndarray, n_classes: int, into: int) -> np.ndarray:
    """Logits over the first ``n_classes`` columns of ``z``, the split-off class (column
    ``n_classes``) merged into class ``into`` (B) by ``logaddexp``: the softmax then gives
    p(B) = p(B2-B9) + p(B0-B1) and every other class's probability unchanged."""
    z = np.asarray(z, np.float64)
    out = z[:, :n_classes].copy()
    out[:, into] = np.logaddexp(z[:, into], z[:, n_classes])
    return out


def _lr_logits(scores: np.ndarray, fitted: np.ndarray, n_classes: int, merged_into: int | None) -> np.ndarray:
    """Logits over ``n_classes`` from a logistic regression's decision scores over the classes it
    was fitted on (``fitted``: their indices; a class it never saw gets -1e4), its split-off B0-B1
    class (index ``n_classes``, :attr:`LrKind.split_early_b`) merged into ``merged_into``."""
    full = np.full((len(scores), n_classes + (merged_into is not None)), -1e4)
    full[:, fitted] = scores
    return full if merged_into is None else merge_split_logits(full, n_classes, merged_into)


def _early_b(data: LabelledSpectra) -> np.ndarray:
    """The B0-B1 spectra of ``data``: labelled B, subtype < 2 in ``meta["subclass"]``."""
    sub = np.asarray(data.meta.get("subclass", np.full(len(data), "")), dtype=str)
    return (data.labels == "B") & (np.nan_to_num(_subtype(sub), nan=9.0) < 2)


def _input_name(kind: str) -> str:
    """Which input a model kind takes (:func:`model_input`): ``"normalised"``, ``"x"`` or ``"both"``."""
    base = kind.split("+")[0]
    if base.startswith("cnn1n"):
        return "normalised"
    return "x" if base in ("cnn1", "lr1") else "both"


def model_input(kind: str, data: LabelledSpectra) -> np.ndarray:
    """A model kind's input ``(N, NPIX, channels)``: ``cnn1``/``lr1`` the paper's ``x/||x||``,
    ``cnn1n*`` the continuum-normalised flux alone (its lines, no continuum shape), the others both."""
    name = _input_name(kind)
    if name == "normalised":
        return data.normalised[..., None]
    return data.inputs(1 if name == "x" else 2)


def _standardised(x: np.ndarray, scale: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """``(x - mean) / std`` per pixel and channel (``scale``: None leaves ``x`` as it is)."""
    return x if scale is None else ((x - scale[0]) / scale[1]).astype(np.float32)


def fit_logistic(x: np.ndarray, y: np.ndarray, *, c: float, max_iter: int = LR_MAX_ITER,
                 sample_weight: np.ndarray | None = None) -> tuple[Any, Any]:
    """The logistic-regression baseline's fit: features standardised, then an L2 logistic regression.

    Used by the LOSO folds (``lr*`` kinds) and by the shipped models' linear
    members (:mod:`lamost_ostar.train`), so both are fitted alike.

    Parameters
    ----------
    x : ndarray, (N, n_features)
        Flattened model input.
    y : ndarray of int
        Class indices.
    c, max_iter : float, int
        Inverse L2 strength and iteration cap.
    sample_weight : ndarray, optional
        (N,) loss weight of each spectrum.

    Returns
    -------
    (StandardScaler, LogisticRegression)
        Both fitted.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=max_iter).fit(scaler.transform(x), y, sample_weight=sample_weight)
    return scaler, clf


def _fit_predict(kind: str, train: LabelledSpectra, val: LabelledSpectra, tests: dict[str, LabelledSpectra],
                 cfg: LosoConfig, classes: Sequence[str], seed: int, log,
                 gan_input: LabelledSpectra | None = None,
                 save_to: Path | None = None,
                 fitted: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Train one model kind on ``train`` and return the logits of every test set.

    ``fitted``: the fold's networks already trained, by what defines them (input, recipe,
    seed); a CNN kind whose network (or deep-ensemble member) is there reuses it (its logits,
    and the network when saving models) instead of training it again, and adds those it trains.
    """
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    base = kind.split("+")[0]
    if base in CNN_KINDS:
        import keras

        from .models import recogniser

        spec = CNN_KINDS[base]
        build = {"head": spec.head} if spec.head else {}
        build = {**build, **dict(spec.build)} or None
        if "+" in kind:
            train = LabelledSpectra.concat([train, _gan_samples(kind.split("+")[1], train, gan_input, cfg,
                                                                 seed, info)])
        x_train = model_input(kind, train)
        ch = x_train.shape[-1]
        if spec.wide:
            # a linear path on per-pixel standardised input (the lr2 baseline inside the network),
            # its L2 matched to lr2's C on this training set
            x64 = x_train.reshape(len(x_train), -1, ch).astype(np.float64)
            build = dict(build or {}, wide=(x64.mean(axis=0), x64.var(axis=0)),
                         wide_l2=1.0 / (2.0 * cfg.lr_c * len(x_train)))
            del x64
        # blue-only spectra mix with each other; channel 0 is unit-norm unless the input is cnn1n*'s
        blue_only, unit_norm_first = train.source == "mkclass", not base.startswith("cnn1n")
        if spec.mix:
            x_train, info["mixed"] = mix_within_class(x_train, train.labels, train.star,
                                                      np.random.default_rng([seed, 7]),
                                                      group=blue_only, unit_norm_first=unit_norm_first)
        y_train = train.y(classes)
        sample_weight = early_b_weights(train, spec.early_b_weight)
        if sample_weight is not None:
            info["early_b"] = int(_early_b(train).sum())
        if spec.cross_mix:
            if sample_weight is not None:
                raise ValueError(f"{kind}: cross-class mixtures have no B0-B1 weight")
            x_add, y_add = mix_across_classes(x_train, train.labels, classes, np.random.default_rng([seed, 9]),
                                              fraction=spec.cross_mix, group=blue_only,
                                              unit_norm_first=unit_norm_first)
            x_train = np.concatenate([x_train, x_add])
            y_train = np.concatenate([np.eye(len(classes), dtype=np.float32)[y_train], y_add])
            info["cross_mixed"] = int(len(x_add))
        scale = None
        if spec.standardise:
            # every pixel of every channel standardised by the training set, as lr2's scaler does
            sd = x_train.std(axis=0)
            scale = (x_train.mean(axis=0), np.where(sd > 1e-8, sd, 1.0).astype(np.float32))
            x_train = _standardised(x_train, scale)
        x_val, y_val = _standardised(model_input(kind, val), scale), val.y(classes)
        tested = [name for name, d in tests.items() if len(d)]
        same = (_input_name(kind), dataclasses.replace(spec, members=1), seed)
        if "+" in kind:
            fitted = None  # GAN samples are drawn afresh
        members, fits = [], []
        for m in range(spec.members):
            key = (*same, m)
            if fitted is not None and key in fitted:
                logits_m, fit, model = fitted[key]
                fit = {**fit, "reused": True}
            else:
                keras.utils.set_random_seed(seed + MEMBER_SEED_STEP * m)
                model, hist = recogniser.train_recogniser(
                    x_train, y_train, x_val, y_val, epochs=cfg.epochs,
                    batch_size=cfg.batch_size, patience=cfg.patience, learning_rate=cfg.learning_rate,
                    n_classes=len(classes), build_kwargs=build, ema_momentum=spec.ema,
                    sample_weight=sample_weight)
                fit = {"epochs": len(hist["loss"]), "best_epoch": hist["best_epoch"][0],
                       "val_accuracy": hist["val_accuracy"][hist["best_epoch"][0]]}
                # each test set's input built as it is scored (the survey set is large)
                logits_m = {name: recogniser.predict_logits(model, _standardised(model_input(kind, tests[name]),
                                                                                 scale))
                            for name in tested}
                if fitted is not None:
                    fitted[key] = (logits_m, fit, model)
            members.append(logits_m)
            fits.append(fit)
            if save_to is not None:
                path = _member_stems(save_to, spec.members)[m]
                model.save(path.with_suffix(".keras"))
                if scale is not None:
                    np.savez(path.with_suffix(".scale.npz"), mean=scale[0], std=scale[1])
        info.update(fits[0] if spec.members == 1 else {"members": fits})
        logits = {name: members[0][name] if spec.members == 1
                  else ensemble_logits([z[name] for z in members], [1.0] * spec.members)
                  for name in tested}
    elif base in LR_KINDS:
        def feats(d):
            return model_input(kind, d).reshape(len(d), -1)

        lr = LR_KINDS[base]
        y, into = train.y(classes), None
        if lr.split_early_b:
            y, into = split_early_b_labels(train, classes), list(classes).index("B")
            info["early_b"] = int(np.sum(y == len(classes)))
        scaler, clf = fit_logistic(feats(train), y, c=cfg.lr_c, max_iter=cfg.lr_max_iter,
                                   sample_weight=early_b_weights(train, lr.early_b_weight))
        info["n_iter"] = int(np.max(clf.n_iter_))
        if save_to is not None:
            np.savez_compressed(save_to.with_suffix(".npz"), coef=clf.coef_, intercept=clf.intercept_,
                                classes=clf.classes_, mean=scaler.mean_, scale=scaler.scale_,
                                **({} if into is None else {"merged_into": into}))
        logits = {name: _lr_logits(clf.decision_function(scaler.transform(feats(d))), clf.classes_,
                                   len(classes), into)
                  for name, d in tests.items() if len(d)}
    else:
        raise ValueError(f"unknown model kind {kind!r} (one of {', '.join(MODEL_KINDS)})")
    info["fit_seconds"] = time.perf_counter() - t0  # and the test sets' logits
    logits = {name: np.asarray(z, np.float64) for name, z in logits.items()}
    log(f"    {kind}: fitted in {info['fit_seconds']:.0f} s {json.dumps({k: v for k, v in info.items() if k != 'fit_seconds'})}")
    return logits, info


def _gan_samples(kind: str, train: LabelledSpectra, gan_input: LabelledSpectra | None, cfg: LosoConfig,
                 seed: int, info: dict) -> LabelledSpectra:
    """Generated O spectra from a GAN trained on high-S/N realisations of the training O stars.

    The generator learns clean spectra (``gan_input``: S/N >= ``gan_snr``);
    LAMOST noise at the S/N of the training O spectra is added to the samples
    afterwards (:func:`lamost_ostar.datasets.add_noise`: an augmentation, not
    something the GAN has to learn).
    """
    from .datasets import add_noise
    from .models import gan
    from .preprocess import normalise

    o = train.only(["O"])
    real = gan_input if gan_input is not None and len(gan_input) else o
    make = {"lcgan": gan.make_lcgan, "sgan": gan.make_sgan}[kind]
    t0 = time.perf_counter()
    trainer = make(o.npix)
    trainer.fit(real.x, iterations=cfg.gan_iterations, batch_size=16, seed=seed, progress=False)
    x = np.asarray(trainer.sample(cfg.gan_samples, seed=seed), np.float64).reshape(cfg.gan_samples, -1)
    rng = np.random.default_rng(seed)
    snr = rng.choice(np.nan_to_num(np.asarray(o.meta.get("snr_g", np.full(len(o), 30.0)), float), nan=30.0),
                     cfg.gan_samples)
    x = add_noise(x, snr, rng)
    info[f"{kind}_seconds"] = time.perf_counter() - t0
    info[f"{kind}_trained_on"] = int(len(real))
    xn = normalise(x, np.zeros(x.shape, bool))[0]
    return LabelledSpectra(x, ["O"] * len(x), [f"{kind}:{i}" for i in range(len(x))], [kind] * len(x), xn=xn)


# --------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------
_META_KEEP = (("snr_g", "ebv_total", "ebv", "subclass", "kind", "template", "path", "pipeline_class")
              + EVIDENCE_KEYS
              + tuple(f"ew_{n}{e}" for n in LINE_KEYS for e in ("", "_err")))


def run_loso(cfg: LosoConfig, out_dir: str | Path, data_dir: str | Path | None = None,
             lib=None, log: Callable[[str], None] = print) -> Path:
    """Run the leave-one-star-out protocol; write ``oof_<model>.npz``, ``results.json`` and ``report.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    lib, lamost, o_units, fold_of_star, fold_of_lamost, standards = _run_setup(cfg, data_dir, lib, log)
    classes = list(cfg.recipe.classes)
    folds = list(range(len(o_units))) if cfg.folds is None else [f for f in cfg.folds if f < len(o_units)]
    store: dict[str, list[dict]] = {m: [] for m in cfg.models}
    fold_info = []
    envs = [environment()]
    log(f"LOSO: {len(o_units)} O units ({', '.join(o_units)}); running folds {folds}; models {cfg.models}")
    for k in folds:
        t0 = time.perf_counter()
        held, train_lib, std_k, train, val, tests, rng_k = _fold_data(cfg, k, lib, lamost, fold_of_star,
                                                                      fold_of_lamost, standards)
        gan_input = None
        if any("+" in m for m in cfg.models):
            o_lib = train_lib.select("O")
            gan_input = realise_templates(o_lib, spread(o_lib, {"O": max(cfg.gan_samples, 200)}, rng_k), rng_k,
                                          cfg.recipe.mock_config(snr_range=(cfg.gan_snr, 4 * cfg.gan_snr),
                                                                 ebv_ranges={"O": (0.0, 0.5)}))
        t_data = time.perf_counter() - t0
        log(f"fold {k} (O {o_units[k]}): train {train.describe()}; tests "
            + ", ".join(f"{n} {len(d)}" for n, d in tests.items()) + f"; data {t_data:.0f} s")
        info = {"fold": k, "o_unit": o_units[k], "test_stars": sorted(held), "data_seconds": t_data,
                "train": train.describe(), "models": {}}
        if standards is not None:
            info["mkclass_left_out"] = sorted(set(standards.name.tolist()) - set(std_k.name.tolist()))
        fitted: dict = {}  # networks trained in this fold, shared by kinds that differ in members only
        for m in cfg.models:
            save_to = None
            if cfg.save_models:
                (out / "models").mkdir(exist_ok=True)
                save_to = out / "models" / f"fold{k:02d}_{_safe(m)}"
            logits, minfo = _fit_predict(m, train, val, tests, cfg, classes, seed=cfg.seed * 1000 + k, log=log,
                                         gan_input=gan_input, save_to=save_to, fitted=fitted)
            info["models"][m] = minfo
            for name, z in logits.items():
                d = tests[name]
                rec = {"fold": np.full(len(d), k), "set": np.full(len(d), name), "label": d.labels,
                       "star": d.star, "logits": z}
                for key in _META_KEEP:
                    if key in d.meta:
                        rec[key] = d.meta[key]
                store[m].append(rec)
        fold_info.append(info)
        for m in cfg.models:
            _save_oof(out / f"oof_{_safe(m)}.npz", store[m], classes)
        (out / "folds.json").write_text(json.dumps({"config": _config_dict(cfg), "o_units": o_units,
                                                    "environments": envs, "folds": fold_info},
                                                   indent=1, default=str))
        log(f"fold {k} done in {time.perf_counter() - t0:.0f} s")
    results = analyse(out, cfg.models, classes)
    results["config"] = _config_dict(cfg)
    results["o_units"] = o_units
    results["environments"] = envs
    results["real_lamost_files"] = 0 if lamost is None else int(len(lamost))
    results["folds"] = fold_info
    results["total_seconds"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    path = out / "report.md"
    path.write_text(render_report(results))
    return path


def _run_setup(cfg: LosoConfig, data_dir: str | Path | None, lib=None,
               log: Callable[[str], None] = print) -> tuple:
    """A run's data that no fold draws: ``(lib, lamost, o_units, fold_of_star, fold_of_lamost, standards)``.

    The templates usable for training, every readable real LAMOST file (stars of
    the classes, trained on in the other folds, and galaxies / unknowns, label
    N, never trained on: none may become a candidate), the folds (drawn from
    ``cfg.seed``'s generator) and the MKCLASS standards of the recipe.
    """
    from .templates import load_templates

    lib = _usable_for_training(lib if lib is not None else load_templates(), cfg.recipe.classes)
    lamost = _lamost_with_evidence(data_dir)
    if lamost is not None:
        lamost = lamost.only(list(cfg.recipe.classes) + [OTHER_LABEL])
    else:
        log(f"WARNING: no real LAMOST files found (data dir {data_dir or 'default: ../shared/data'}): this run "
            "trains on no real LAMOST spectrum and has no real-LAMOST test set")
    o_units, fold_of_star, fold_of_lamost = assign_folds(lib, lamost, np.random.default_rng(cfg.seed))
    standards = mkclass_training_standards(cfg.recipe.classes) if cfg.recipe.mkclass_fraction > 0 else None
    return lib, lamost, o_units, fold_of_star, fold_of_lamost, standards


def _fold_data(cfg: LosoConfig, k: int, lib, lamost: LabelledSpectra | None, fold_of_star: Mapping[str, int],
               fold_of_lamost: Mapping[str, int], standards) -> tuple:
    """Fold ``k``'s data, drawn from its own generator: ``(held, train_lib, std_k, train, val, tests, rng_k)``.

    ``rng_k`` is returned in the state after the test sets (the GAN input, when
    asked for, is drawn from it next).
    """
    rng_k = np.random.default_rng([cfg.seed, k])
    held = {s for s, f in fold_of_star.items() if f == k}
    train_lib, test_lib = _take_stars(lib, held, False), _take_stars(lib, held, True)
    lam_train = lam_test = None
    if lamost is not None:
        in_k = np.array([fold_of_lamost.get(s, -1) == k for s in lamost.star])
        lam_train, lam_test = lamost.subset(np.flatnonzero(~in_k)), lamost.subset(np.flatnonzero(in_k))
    # the MKCLASS standards that could average a held-out star leave with it; the blue-only
    # share has its own random streams, so the rest of the fold's data are those of a run without it
    std_k = None if standards is None else standards._take(
        np.flatnonzero(~mkclass_neighbours(standards, test_lib)))
    train = build_detector_training(train_lib, cfg.recipe, rng_k, lamost=lam_train, mkclass=std_k,
                                    extra_rng=np.random.default_rng([cfg.seed, k, 17]))
    val = build_detector_training(train_lib, dataclasses.replace(cfg.recipe, n_per_class=cfg.n_val_per_class,
                                                                 mix_fraction=0.0), rng_k, None, mkclass=std_k,
                                  extra_rng=np.random.default_rng([cfg.seed, k, 18]))
    tests = _test_sets(test_lib, lam_test, cfg, rng_k)
    return held, train_lib, std_k, train, val, tests, rng_k


def config_from_dict(d: Mapping[str, Any]) -> LosoConfig:
    """The :class:`LosoConfig` of a run's ``folds.json`` / ``results.json`` ``config``."""
    known = {f.name for f in dataclasses.fields(LosoConfig)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known and k != "recipe"}
    if isinstance(kw.get("seed"), tuple):
        raise ValueError("a pooled run's config (several seeds) cannot be replayed")
    return LosoConfig(recipe=DetectorRecipe.from_dict(d["recipe"]), **kw)


def add_interstellar_twins(out_dir: str | Path, models: Sequence[str], data_dir: str | Path | None = None,
                           log: Callable[[str], None] = print, replace: bool = False) -> int:
    """Score the interstellar twin test sets with a finished run's saved fold models.

    For runs made without ``interstellar_tests`` (or before the survey twin
    existed): each fold's data are drawn again from its own generator, exactly
    as the run drew them (checked: the re-drawn ``o`` set must score the
    logits the run stored, else ``RuntimeError``), and the twins the run lacks
    (``o_ism``, ``b_ism``, ``survey_ism``) are scored by that fold's saved
    models and appended to ``oof_<model>.npz``.  ``replace``: the twins the
    run has are dropped and drawn again too (runs whose twins were drawn by
    earlier code).  Returns the number of spectra added per model.
    """
    out = Path(out_dir)
    meta = json.loads((out / "folds.json").read_text())
    cfg = dataclasses.replace(config_from_dict(meta["config"]), interstellar_tests=True)
    lib, lamost, _, fold_of_star, fold_of_lamost, standards = _run_setup(cfg, data_dir, log=log)
    oof = {m: load_oof(out / f"oof_{_safe(m)}.npz") for m in models}
    if replace:
        for m, d in oof.items():
            keep = ~np.char.endswith(d["set"].astype(str), "_ism")
            oof[m] = {k: (v if k == "classes" else v[keep]) for k, v in d.items()}
    added = 0
    new: dict[str, list[dict]] = {m: [] for m in models}
    for f in sorted({int(x["fold"]) for x in meta["folds"]}):
        t0 = time.perf_counter()
        *_, tests, _ = _fold_data(cfg, f, lib, lamost, fold_of_star, fold_of_lamost, standards)
        for m in models:
            d = oof[m]
            have = set(d["set"][d["fold"] == f].astype(str))
            predict = saved_fold_model(out, m, f, len(d["classes"]))
            stored = d["logits"][(d["fold"] == f) & (d["set"] == "o")]
            if "o" in tests and not np.allclose(predict(tests["o"]), stored, atol=1e-3):
                raise RuntimeError(f"fold {f}: the re-drawn O test set does not score as the run stored it "
                                   f"(model {m}): not the run's data")
            for name, data in tests.items():
                if not name.endswith("_ism") or name in have or not len(data):
                    continue
                rec = {"fold": np.full(len(data), f), "set": np.full(len(data), name), "label": data.labels,
                       "star": data.star, "logits": predict(data)}
                rec.update({key: data.meta[key] for key in _META_KEEP if key in data.meta})
                new[m].append(rec)
        log(f"fold {f}: twins scored in {time.perf_counter() - t0:.0f} s")
    for m in models:
        if new[m] or replace:
            d = oof[m]
            _save_oof(out / f"oof_{_safe(m)}.npz", [{k: d[k] for k in d if k != "classes"}, *new[m]],
                      [str(c) for c in d["classes"]])
            added = sum(len(r["set"]) for r in new[m])
    return added


def _safe(name: str) -> str:
    return name.replace("+", "_")


def _config_dict(cfg: LosoConfig) -> dict:
    return dataclasses.asdict(cfg)


#: packages whose versions change a run's figures (recorded by :func:`environment`)
ENVIRONMENT_PACKAGES: tuple[str, ...] = ("numpy", "scipy", "scikit-learn", "tensorflow", "keras", "astropy",
                                         "fitsio")


def environment() -> dict[str, Any]:
    """What produced a run's figures besides its config: code version, Python, package versions, backend.

    A fresh install can resolve newer packages; the same seed and code then
    give slightly different figures (run 22: ``lr2``'s seed-19 recall moved by
    0.09 points between two installs of the same code).  Stored in
    ``folds.json`` / ``results.json`` as ``environments`` (one entry per
    distinct environment that ran folds of the run).  The processor and the
    BLAS kernels numpy and scikit-learn use are recorded too: the same install
    on another processor family picks other kernels, and the logistic
    regressions' fits differ in their last digits (run 25: ``lr2``'s seed-19
    iteration counts on an AMD EPYC against runs 22-24's).
    """
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from . import code_version

    packages = {}
    for name in ENVIRONMENT_PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {"code_version": code_version(), "python": platform.python_version(), "packages": packages,
            "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"), "cpu": _cpu_model(),
            "blas": _blas_kernels()}


def _cpu_model() -> str | None:
    """The processor's model name (Linux ``/proc/cpuinfo``; elsewhere ``platform.processor()``)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


def _blas_kernels() -> list[str]:
    """The BLAS libraries loaded in this process and the kernels they picked
    (``threadpoolctl``: e.g. ``"openblas 0.3.30 Haswell"``); empty when unknown."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover - scikit-learn depends on it
        return []
    from importlib import import_module

    for module in ("numpy", "scipy.linalg"):   # numpy's BLAS, and scipy's (scikit-learn's solvers)
        import_module(module)
    return sorted({" ".join(str(i.get(k)) for k in ("internal_api", "version", "architecture") if i.get(k))
                   for i in threadpool_info() if i.get("user_api") == "blas"})


def _environments_of(infos: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The distinct ``environments`` of several runs' ``folds.json``, in order of first appearance."""
    out: list[dict[str, Any]] = []
    for e in (e for info in infos for e in info.get("environments", [])):
        if dict(e) not in out:
            out.append(dict(e))
    return out


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _save_oof(path: Path, recs: list[dict], classes: Sequence[str]) -> None:
    if not recs:
        return
    keys = sorted({k for r in recs for k in r})
    arrays: dict[str, np.ndarray] = {}
    for key in keys:
        vals = []
        for r in recs:
            n = len(r["label"])
            if key in r:
                vals.append(np.asarray(r[key]))
            elif key == "logits":
                vals.append(np.full((n, len(classes)), np.nan))
            else:
                vals.append(np.full(n, np.nan))
        kinds = {v.dtype.kind for v in vals}
        if kinds & set("USO"):
            vals = [v.astype(str) for v in vals]
        arrays[key] = np.concatenate(vals)
    arrays["classes"] = np.array(classes)
    _write_oof(path, arrays)


def _write_oof(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write out-of-fold ``arrays`` to ``path`` through a temporary file (no reader sees half a file)."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def _concat_oof(got: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Out-of-fold arrays of several runs concatenated on their common keys (classes of the first)."""
    keys = set.intersection(*(set(g) for g in got)) - {"classes"}
    merged = {k: np.concatenate([g[k] for g in got]) for k in keys}
    merged["classes"] = got[0]["classes"]
    return merged


def load_oof(path: str | Path) -> dict[str, np.ndarray]:
    """The out-of-fold arrays of one model (``oof_<model>.npz``)."""
    with np.load(path, allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


def merge_runs(parts: Sequence[str | Path], out_dir: str | Path) -> list[str]:
    """Merge LOSO runs of disjoint folds (e.g. run in parallel) into ``out_dir``.

    Every ``oof_<model>.npz`` of the parts is concatenated (the parts must
    hold different folds of the same configuration), ``folds.json`` merged,
    and the fold models copied.  Returns the model kinds merged.
    """
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [Path(p) for p in parts]
    infos = [json.loads((p / "folds.json").read_text()) for p in parts]
    folds = [f for info in infos for f in info["folds"]]
    seen = [f["fold"] for f in folds]
    if len(seen) != len(set(seen)):
        raise ValueError(f"the runs share folds: {sorted(seen)}")
    cfgs = [{k: v for k, v in info["config"].items() if k != "folds"} for info in infos]
    if any(c != cfgs[0] for c in cfgs[1:]):
        raise ValueError("the runs were made with different configurations")
    models = sorted({f.name[4:-4] for p in parts for f in p.glob("oof_*.npz")})
    for m in models:
        got = [load_oof(p / f"oof_{m}.npz") for p in parts if (p / f"oof_{m}.npz").exists()]
        _write_oof(out / f"oof_{m}.npz", _concat_oof(got))
    for p in parts:
        if (p / "models").is_dir():
            shutil.copytree(p / "models", out / "models", dirs_exist_ok=True)
    config = dict(infos[0]["config"], folds=sorted(seen))
    folds = sorted(folds, key=lambda f: f["fold"])
    (out / "folds.json").write_text(json.dumps({"config": config, "o_units": infos[0]["o_units"],
                                                "environments": _environments_of(infos),
                                                "folds": folds}, indent=1, default=str))
    return [m.replace("_", "+") for m in models]


def pool_runs(runs: Sequence[str | Path], out_dir: str | Path) -> list[str]:
    """Pool complete LOSO runs of different seeds into ``out_dir``.

    Each run must hold every fold of the same protocol (same O split units,
    same configuration apart from the seed); their out-of-fold arrays are
    concatenated (a ``run`` column says which) for every model kind present in
    all of them.  An operating point chosen on the pooled data rests on twice
    the held-out spectra of one run, and on two independent trainings of every
    fold.  The **nested** figure of a pooled folder is *not* clean (a B star of
    fold k in one run may sit in another fold of the other run, whose data
    then choose fold k's thresholds): quote each run's own nested figure.
    Returns the model kinds pooled.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [Path(r) for r in runs]
    infos = [json.loads((r / "folds.json").read_text()) for r in runs]
    if any(i["o_units"] != infos[0]["o_units"] for i in infos[1:]):
        raise ValueError("the runs hold different O split units")
    cfgs = [{k: v for k, v in i["config"].items() if k not in ("seed", "models")} for i in infos]
    if any(c != cfgs[0] for c in cfgs[1:]):
        raise ValueError("the runs were made with different configurations")
    models = sorted(set.intersection(*({f.name[4:-4] for f in r.glob("oof_*.npz")} for r in runs)))
    for m in models:
        got = [load_oof(r / f"oof_{m}.npz") for r in runs]
        merged = _concat_oof(got)
        merged["run"] = np.concatenate([np.full(len(g["label"]), i) for i, g in enumerate(got)])
        _write_oof(out / f"oof_{m}.npz", merged)
    config = dict(infos[0]["config"], seed=[i["config"].get("seed") for i in infos],
                  pooled_runs=[str(r) for r in runs])
    folds = [dict(f, run=i) for i, info in enumerate(infos) for f in info["folds"]]
    (out / "folds.json").write_text(json.dumps({"config": config, "o_units": infos[0]["o_units"],
                                                "environments": _environments_of(infos),
                                                "folds": folds}, indent=1, default=str))
    return [m.replace("_", "+") for m in models]


#: figures of one rule that :func:`per_run_summary` keeps
SUMMARY_KEYS: tuple[str, ...] = ("o_recall_star_averaged_snr_ge_10", "false_o_per_million", "b_to_o",
                                 "b0_b1_to_o", "x_to_o", "real_lamost_candidates")


def per_run_summary(runs: Sequence[str | Path]) -> dict:
    """Each pooled run's own operating-point and nested figures (from its ``results.json``).

    ``{"seed <s>": {model: {"operating_point": {...}, "nested": {...}}}}``: the
    clean nested figure of every run, which a pooled folder cannot give.
    """
    out: dict[str, dict] = {}
    for r in runs:
        res = json.loads((Path(r) / "results.json").read_text())
        key = f"seed {res.get('config', {}).get('seed')}"
        out[key] = {m: {rule: {k: v["tables"][rule].get(k) for k in SUMMARY_KEYS}
                        for rule in ("operating_point", "nested") if rule in v["tables"]}
                    for m, v in res.get("models", {}).items()}
    return out


def ensemble_oof(out_dir: str | Path, members: Sequence[str], name: str | None = None) -> str:
    """An ensemble's out-of-fold data from its members': ``oof_<name>.npz``.

    The ensemble's logits are the mean of the members' calibrated log
    probabilities (each member's logits divided by its temperature fitted on
    the same out-of-fold spectra, then log-softmax): the geometric mean of
    their probabilities.  The members must have been run on the same folds
    (their test spectra are the same, row for row).
    """
    out = Path(out_dir)
    name = name or "ens-" + "-".join(members)
    data = [load_oof(out / f"oof_{_safe(m)}.npz") for m in members]
    ref = data[0]
    for m, d in zip(members[1:], data[1:]):
        for key in ("fold", "set", "label", "star"):
            if d[key].shape != ref[key].shape or not np.array_equal(d[key], ref[key]):
                raise ValueError(f"{m} and {members[0]} were not run on the same spectra ({key} differs)")
    temps = [member_temperature(d) for d in data]
    merged = dict(ref)
    merged["logits"] = ensemble_logits([d["logits"] for d in data], temps)
    _write_oof(out / f"oof_{name}.npz", merged)
    return name


def member_temperature(d: Mapping[str, np.ndarray]) -> float:
    """An ensemble member's temperature, fitted on its out-of-fold O / B / X / survey spectra."""
    from .models.calibration import fit_temperature

    classes = [str(c) for c in d["classes"]]
    y = np.array([classes.index(c) if c in classes else -1 for c in d["label"]])
    z = np.asarray(d["logits"], np.float64)
    ok = np.isin(d["set"].astype(str), ["o", "b", "x", "survey"]) & (y >= 0) & np.all(np.isfinite(z), axis=1)
    return float(fit_temperature(z[ok], y[ok]))


def ensemble_logits(logits: Sequence[np.ndarray], temperatures: Sequence[float]) -> np.ndarray:
    """Mean of the members' log-softmax of ``logits / temperature`` (a geometric mean of probabilities)."""
    logp = []
    for z, t in zip(logits, temperatures):
        zt = np.asarray(z, np.float64) / float(t)
        zt = zt - np.max(zt, axis=1, keepdims=True)
        logp.append(zt - np.log(np.sum(np.exp(zt), axis=1, keepdims=True)))
    return np.mean(logp, axis=0)


# --------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------
def _softmax(z: np.ndarray, t: float) -> np.ndarray:
    z = np.asarray(z, np.float64) / t
    z = z - np.nanmax(z, axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _bin_label(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}" if hi < 1e6 else f">{lo:g}"


def _subtype(sub: np.ndarray) -> np.ndarray:
    """Numeric subtype from a SUBCLASS string ('B0', 'B1', ...), NaN if none."""
    out = np.full(len(sub), np.nan)
    for i, s in enumerate(np.asarray(sub).astype(str)):
        digits = "".join(ch for ch in s[1:] if ch.isdigit() or ch == ".")
        try:
            out[i] = float(digits) if digits else np.nan
        except ValueError:
            pass
    return out


#: Sharpening powers of the probabilities tried with the thresholds (decision
#: temperature = calibration temperature / power).
SHARPEN_GRID: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)


def _select(probs, heii, is_o, o_ok, star, surv, w, real, b_ok, classes, subset, max_fpm, veto=None,
            **grid) -> dict:
    """The best operating point over the sharpening grid, on the spectra in ``subset``.

    ``veto`` (bool array): spectra that no threshold can make candidates (the
    hot-subdwarf veto, applied before the thresholds are chosen).
    """
    from .models.decision import Decision, choose_operating_point

    best = None
    o = classes.index("O")
    for k in grid.pop("sharpen_grid", SHARPEN_GRID):
        post = Decision.balanced(classes, sharpen=k).posterior(probs)[:, o]
        if veto is not None:
            post = np.where(veto, 0.0, post)
        so, ss, sr, sb = (subset & m for m in (is_o, surv, real, b_ok))
        op = choose_operating_point(post[so], heii[so], star[so], o_ok[so], post[ss], heii[ss], w[ss],
                                    post[sr], heii[sr], b_posterior=post[sb], b_heii=heii[sb],
                                    max_b_rate=0.05, max_false_per_million=max_fpm, **grid)
        op["sharpen"] = float(k)
        key = (op.get("feasible", False), op.get("star_averaged_recall", -1.0), -op.get("false_per_million", 1e9))
        if best is None or key > best[0]:
            best = (key, op)
    return best[1]


def _survey_weights(sets: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Weights of the survey-mock spectra: every non-O class at its survey fraction over the run."""
    surv = sets == "survey"
    w = np.zeros(len(sets))
    for c, f in SURVEY_NON_O.items():
        sel = surv & (label == c)
        if sel.any():
            w[sel] = f / sel.sum()
    return w


def _table_inputs(d: Mapping[str, np.ndarray]) -> tuple:
    """The arrays :func:`_tables` needs besides the verdicts, from out-of-fold data."""
    n = len(d["set"])
    sets, label = d["set"].astype(str), d["label"].astype(str)
    return (sets == "o", sets == "b", sets == "x", sets == "survey", sets == "lamost",
            _survey_weights(sets, label), d["star"].astype(str),
            d.get("snr_g", np.full(n, np.nan)).astype(float),
            d.get("ebv_total", np.full(n, np.nan)).astype(float),
            _subtype(d.get("subclass", np.full(n, "")).astype(str)), label,
            d.get("kind", np.full(n, "")).astype(str))


def apply_rule(out_dir: str | Path, model: str, op: Mapping[str, Any], class_veto: bool = True,
               min_snr_g: float | None = None, interstellar: bool = False) -> dict:
    """Tables of a fixed operating point on another run's out-of-fold data (a clean check).

    ``op`` is an operating point as :func:`analyse` stores it (e.g. the
    ``operating_point`` of a pooled run, the rule a shipped model carries); it
    is applied unchanged to ``oof_<model>.npz`` of ``out_dir`` (a run made
    after the rule was chosen), the probabilities calibrated with that run's
    own out-of-fold temperature (as :func:`analyse` does; run it first).
    ``class_veto``: real LAMOST files the pipeline calls GALAXY or QSO are not
    candidates, nor (``min_snr_g``) spectra below the S/N floor
    (:func:`stage_veto_mask`), as in the scan.  ``interstellar``: the O, B
    and (where the run has it) survey rows of the tables are the interstellar
    twins (``o_ism``, ``b_ism``, ``survey_ism``, of a run with
    ``LosoConfig.interstellar_tests``) instead of ``o``, ``b``, ``survey``.

    Returns
    -------
    dict
        :func:`_tables` of the verdicts (recall per star, B->O, false O per
        million, real LAMOST candidates, by S/N and E(B-V)), and
        ``false_o_by_star``: the non-O stars (survey, B and X test sets) with
        at least one spectrum called O, most first (``star``, ``label``,
        ``subclass``, ``set``, ``fold``, ``n`` spectra, ``called_o``).
    """
    _, d, classes, probs, heii = _analysed_run(out_dir, model)
    cand = rule_candidates(op, classes, probs, heii, d, class_veto, min_snr_g)
    if interstellar:
        sets = d["set"].astype(str)
        if not np.isin(sets, ["o_ism", "b_ism"]).any():
            raise ValueError(f"{out_dir} has no interstellar test sets (run with interstellar_tests)")
        twins = [t for t in ("o", "b", "survey") if np.any(sets == f"{t}_ism")]
        d = dict(d, set=np.select([sets == t for t in twins] + [sets == f"{t}_ism" for t in twins],
                                  [f"{t}_plain" for t in twins] + twins, sets))
    t = _tables(cand, *_table_inputs(d))
    t["false_o_by_star"] = sorted((r for r in _non_o_star_rows(d, {"called_o": cand}) if r["called_o"]),
                                  key=lambda r: (-r["called_o"], r["star"]))
    return t


def rule_candidates(op: Mapping[str, Any], classes: Sequence[str], probs: np.ndarray, heii: np.ndarray,
                    d: Mapping[str, np.ndarray], class_veto: bool = True,
                    min_snr_g: float | None = None) -> np.ndarray:
    """Candidate verdicts of the fixed operating point ``op`` on out-of-fold-like data ``d``.

    ``probs`` are the calibrated probabilities of ``d``'s rows, ``heii`` their
    He II evidence; the line vetoes come from ``d`` (:func:`_line_indices`) and
    the stage's own conditions (:func:`stage_veto_mask`) apply, as in the scan.
    """
    from .models.decision import Decision

    cand = _verdict(Decision.from_operating_point(classes, op), probs, heii, _line_indices(d),
                    np.ones(len(probs), bool))
    return cand & ~stage_veto_mask(d, class_veto, min_snr_g)


def _non_o_star_rows(d: Mapping[str, np.ndarray], verdicts: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per non-O star of the survey, B and X test sets: its spectra and, per verdict, how many are O."""
    sets, star, label = d["set"].astype(str), d["star"].astype(str), d["label"].astype(str)
    sub = d.get("subclass", np.full(len(star), "")).astype(str)
    fold = d["fold"].astype(int)
    rows = []
    for st_set in ("survey", "b", "x"):
        sel = (sets == st_set) & (label != "O")
        for st in np.unique(star[sel]):
            m = sel & (star == st)
            i = int(np.flatnonzero(m)[0])
            rows.append({"star": str(st), "label": str(label[i]), "subclass": str(sub[i]), "set": st_set,
                         "fold": int(fold[i]), "n": int(m.sum()),
                         **{k: int(v[m].sum()) for k, v in verdicts.items()}})
    return rows


def _analysed_run(out_dir: str | Path, model: str) -> tuple:
    """``(results of model, out-of-fold data, classes, calibrated probs, heii_sigma)`` of an analysed run."""
    out = Path(out_dir)
    r = json.loads((out / "results.json").read_text())["models"][model]
    d = load_oof(out / f"oof_{_safe(model)}.npz")
    probs = _softmax(d["logits"], float(r["temperature"]))
    heii = d.get("heii_sigma", np.full(len(probs), np.nan)).astype(float)
    return r, d, [str(c) for c in d["classes"]], probs, heii


def _line_indices(d: Mapping[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    """The line-veto indices of out-of-fold data: ``sdo`` (raw index) and ``sigma`` (``sdo_sigma``).

    Stored arrays win; else they are computed from the stored single-line EWs
    and errors (runs made before the index existed); None where neither is there.
    """
    from .lines import sdo_index, sdo_sigma

    lines = ("hdelta", "hgamma", "heii_4686")
    ews = [d[f"ew_{n}"].astype(float) for n in lines] if "ew_hdelta" in d else None
    sdo = (d["sdo_index"].astype(float) if "sdo_index" in d
           else None if ews is None else sdo_index(*ews))
    sigma = (d["sdo_sigma"].astype(float) if "sdo_sigma" in d
             else None if ews is None or "ew_hdelta_err" not in d
             else sdo_sigma(*ews, *(d[f"ew_{n}_err"].astype(float) for n in lines)))
    return {"sigma": sigma, "sdo": sdo}


def _verdict(rule, probs: np.ndarray, heii: np.ndarray, index: Mapping[str, np.ndarray | None],
             sel: np.ndarray) -> np.ndarray:
    """``rule``'s candidate verdicts on the spectra ``sel`` of out-of-fold data (with its line indices)."""
    return rule.apply(probs[sel], heii[sel], *(None if index[k] is None else index[k][sel]
                                               for k in ("sdo", "sigma"))).is_candidate


def false_o_by_star(out_dir: str | Path, model: str, class_veto: bool = True,
                    min_snr_g: float | None = None) -> list[dict[str, Any]]:
    """Which non-O stars a LOSO run's rules call O: per star, spectra and counts called O.

    Re-applies the operating point and, fold by fold, the nested rules stored in
    ``results.json`` (run :func:`analyse` first) to ``oof_<model>.npz``.  Rows
    (sorted by the nested count): ``star``, ``label``, ``subclass``, ``set``
    (``survey`` / ``b`` / ``x``), ``fold``, ``n``, ``nested``, ``operating_point``.
    The stage's own conditions (:func:`stage_veto_mask`) apply, as in :func:`analyse`.
    """
    from .models.decision import Decision

    r, d, classes, probs, heii = _analysed_run(out_dir, model)
    index = _line_indices(d)
    fold = d["fold"].astype(int)

    kept = ~stage_veto_mask(d, class_veto, min_snr_g)

    def verdict(op, sel):
        return _verdict(Decision.from_operating_point(classes, op), probs, heii, index, sel) & kept[sel]

    everything = np.ones(len(probs), bool)
    at_op = verdict(r["operating_point"], everything)
    nested = np.zeros(len(probs), bool)
    for f, op in (r.get("nested_operating_points") or {}).items():
        sel = fold == int(f)
        nested[sel] = verdict(op, sel)
    rows = _non_o_star_rows(d, {"nested": nested, "operating_point": at_op})
    return sorted(rows, key=lambda row: (-row["nested"], -row["operating_point"], row["star"]))


def analyse(out_dir: str | Path, models: Sequence[str], classes: Sequence[str],
            max_false_per_million: float = 100.0, class_veto: bool = True,
            min_snr_g: float | None = None) -> dict:
    """Tables and operating points from the saved out-of-fold arrays.

    Three rules are tabulated besides the arg-max: ``operating_point`` (the
    rule chosen on all out-of-fold data: what a model trained on every star
    ships), ``nested`` (for every fold the rule chosen on the *other* folds,
    applied to it: the figure that does not profit from choosing the
    thresholds on the same stars), and ``no_he_ii`` (the best posterior-only
    cut).  Where the out-of-fold data hold the line indices (``sdo_index``,
    or the single-line EWs they are made of) the operating point and the
    nested rule include the hot-subdwarf veto in sigma (``sdo_sigma``,
    :func:`lamost_ostar.models.decision.line_veto_thresholds`), its threshold
    set on the O spectra of the same folds as the other thresholds;
    ``sdo_index_veto`` / ``nested_sdo_index_veto`` (the veto on the raw index,
    the rule of run 4) and ``no_line_veto`` / ``nested_no_line_veto`` (none)
    are the same choice with the other veto or none.  The stage's own
    conditions (:func:`stage_veto_mask`: with ``class_veto`` the real LAMOST files
    the pipeline calls GALAXY or QSO, and spectra below the S/N floor
    ``min_snr_g``) are never candidates, in the choice of every rule and in every
    table, as in ``OStarStage``.
    """
    from .models.calibration import fit_temperature
    from .models.decision import Decision, line_veto_thresholds, line_vetoed, snr_floor_in_force

    out = Path(out_dir)
    res: dict[str, Any] = {"models": {}, "class_veto": bool(class_veto),
                           "min_snr_g": snr_floor_in_force(min_snr_g)}
    for m in models:
        path = out / f"oof_{_safe(m)}.npz"
        if not path.exists():
            continue
        d = load_oof(path)
        classes = [str(c) for c in d["classes"]]
        y = np.array([classes.index(c) if c in classes else -1 for c in d["label"]])
        sets = d["set"].astype(str)
        ok_fit = np.isin(sets, ["o", "b", "x", "survey"]) & (y >= 0) & np.all(np.isfinite(d["logits"]), axis=1)
        # temperature on held-out spectra
        bal = np.flatnonzero(ok_fit)
        t = float(fit_temperature(d["logits"][bal], y[bal])) if bal.size else 1.0
        probs = _softmax(d["logits"], t)
        heii = d.get("heii_sigma", np.full(len(y), np.nan)).astype(float)
        inputs = _table_inputs(d)
        is_o, is_b, is_x, surv, real, w, star, snr, ebv = inputs[:9]
        fold = d["fold"].astype(int)
        argmax_o = probs.argmax(axis=1) == classes.index("O")
        o_ok = is_o & (snr >= 10)
        b_ok = is_b & (snr >= 10)
        index = _line_indices(d)
        cveto = stage_veto_mask(d, class_veto, min_snr_g)
        veto_sets = {"": ("sigma",) if index["sigma"] is not None else ("sdo",) if index["sdo"] is not None else ()}
        if veto_sets[""] == ("sigma",) and index["sdo"] is not None:
            veto_sets["sdo_index_veto"] = ("sdo",)
        if veto_sets[""]:
            veto_sets["no_line_veto"] = ()
        args = (probs, heii, is_o, o_ok, star, surv, w, real, b_ok, classes)
        everything = np.ones(len(y), bool)

        def chosen(subset, vetoes=veto_sets[""]):
            """Operating point on ``subset`` (with the vetoes set on its O spectra)."""
            thr = line_veto_thresholds(*(index[k][is_o & subset] if k in vetoes else None
                                         for k in ("sigma", "sdo")))
            veto = line_vetoed(thr["max_sdo_index"], index["sdo"], thr["max_sdo_sigma"], index["sigma"])
            veto = cveto if veto is False else (np.asarray(veto, bool) | cveto)
            p = _select(*args, subset, max_false_per_million, veto=veto if veto.any() else None)
            p.update(thr)
            return p

        op = chosen(everything)
        op_cnn = _select(*args, everything, max_false_per_million, veto=cveto if cveto.any() else None,
                         heii_grid=(None,), weight_grid=(0.0,))
        rules = {"argmax": argmax_o}
        variants = [("operating_point", op), ("no_he_ii", op_cnn)]
        variants += [(tag, chosen(everything, vs)) for tag, vs in veto_sets.items() if tag]
        for name, p in variants:
            if p.get("min_score") is None and p.get("min_posterior") is None:
                continue
            rule = Decision.from_operating_point(classes, p)
            rules[name] = _verdict(rule, probs, heii, index, everything)
            if name == "operating_point" and (rule.heii_weight or rule.min_heii_sigma is not None):
                # the same threshold without the He II evidence: what the combination buys
                rules["operating_point_posterior_only"] = \
                    rule.posterior(probs)[:, classes.index("O")] >= p["min_posterior"]
        # nested: each fold judged by the rule (and vetoes) chosen on the other folds
        nested_ops = {}
        if len(np.unique(fold)) > 1:
            for tag, vetoes in veto_sets.items():
                nested = np.zeros(len(y), bool)
                for f in np.unique(fold):
                    p = chosen(fold != f, vetoes)
                    if not tag:
                        nested_ops[int(f)] = p
                    if p.get("min_score") is None and p.get("min_posterior") is None:
                        continue
                    nested[fold == f] = _verdict(Decision.from_operating_point(classes, p), probs, heii, index,
                                                 fold == f)
                rules["nested" + (f"_{tag}" if tag else "")] = nested
        tables = {rname: _tables(cand & ~cveto, *inputs) for rname, cand in rules.items()}
        # p(O) of the O spectra by E(B-V) (one- vs two-channel comparison)
        med = {}
        for lo, hi in EBV_BINS:
            sel = is_o & (ebv >= lo) & (ebv < hi)
            med[_bin_label(lo, hi)] = {"n": int(sel.sum()),
                                       "median_p_o": float(np.median(probs[sel, classes.index("O")])) if sel.any() else None}
        res["models"][m] = {"temperature": t, "operating_point": op, "operating_point_without_he_ii": op_cnn,
                            "operating_point_variants": {k: p for k, p in variants[2:]},
                            "nested_operating_points": nested_ops,
                            "tables": tables, "p_o_by_ebv": med,
                            "class_vetoed": sorted(np.unique(star[cveto & real]).tolist()),
                            "n": {str(s): int(np.sum(sets == s)) for s in np.unique(sets)}}
    return res


def _rate(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if len(x) else None


def _tables(cand, is_o, is_b, is_x, surv, real, w, star, snr, ebv, subtype, label, kind) -> dict:
    t: dict[str, Any] = {}
    stars = np.unique(star[is_o])
    hi_snr = snr >= 10
    t["o_recall_per_star"] = {s: {"all": _rate(cand[is_o & (star == s)]),
                                  "snr_ge_10": _rate(cand[is_o & (star == s) & hi_snr])} for s in stars}
    per = [v["snr_ge_10"] for v in t["o_recall_per_star"].values() if v["snr_ge_10"] is not None]
    t["o_recall_star_averaged_snr_ge_10"] = float(np.mean(per)) if per else None
    per_all = [v["all"] for v in t["o_recall_per_star"].values() if v["all"] is not None]
    t["o_recall_star_averaged"] = float(np.mean(per_all)) if per_all else None
    early = is_b & (subtype < 2)
    t["b_to_o"] = _rate(cand[is_b])
    t["b_to_o_snr_ge_10"] = _rate(cand[is_b & hi_snr])
    t["b0_b1_to_o"] = _rate(cand[early])
    t["b2_plus_to_o"] = _rate(cand[is_b & ~(subtype < 2)])
    t["x_to_o"] = _rate(cand[is_x])
    t["x_to_o_by_kind"] = {str(k): _rate(cand[is_x & (kind == k)]) for k in np.unique(kind[is_x])}
    ws = w[surv]
    fpm = 1e6 * float(np.sum(ws * cand[surv])) / max(float(ws.sum()), 1e-300) if surv.any() else None
    t["false_o_per_million"] = fpm
    t["survey_false_o_count"] = int(np.sum(cand[surv]))
    t["survey_n"] = int(surv.sum())
    t["survey_false_o_by_class"] = {str(c): int(np.sum(cand[surv & (label == c)])) for c in np.unique(label[surv])}
    t["real_lamost_candidates"] = int(np.sum(cand[real]))
    t["real_lamost_n"] = int(real.sum())
    t["real_lamost_candidate_stars"] = sorted(np.unique(star[real & cand]).tolist())
    by_snr: dict[str, Any] = {}
    for lo, hi in SURVEY_SNR_BINS:
        s = (snr >= lo) & (snr < hi)
        sw = ws[s[surv]] if surv.any() else np.zeros(0)
        by_snr[_bin_label(lo, hi)] = {
            "o_recall": _rate(cand[is_o & s]), "b_to_o": _rate(cand[is_b & s]),
            "b0_b1_to_o": _rate(cand[early & s]),
            "false_o_per_million": (1e6 * float(np.sum(sw * cand[surv & s])) / float(sw.sum())) if sw.sum() > 0 else None,
            "real_lamost": f"{int(np.sum(cand[real & s]))}/{int(np.sum(real & s))}"}
    t["by_snr"] = by_snr
    by_ebv: dict[str, Any] = {}
    for lo, hi in EBV_BINS:
        e = (ebv >= lo) & (ebv < hi)
        sw = ws[e[surv]] if surv.any() else np.zeros(0)
        by_ebv[_bin_label(lo, hi)] = {
            "o_recall": _rate(cand[is_o & e]), "o_recall_snr_ge_10": _rate(cand[is_o & e & hi_snr]),
            "b_to_o": _rate(cand[is_b & e]), "b0_b1_to_o": _rate(cand[early & e]),
            "false_o_per_million": (1e6 * float(np.sum(sw * cand[surv & e])) / float(sw.sum())) if sw.sum() > 0 else None}
    t["by_ebv"] = by_ebv
    return t


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def _num(v, fmt="{:.0f}") -> str:
    return "–" if v is None else fmt.format(v)


#: report words of the rules chosen with fewer line vetoes (``no_sdo_veto``: results of run 4)
_FEWER_VETOES: dict[str, str] = {"no_line_veto": "no line veto", "no_sdo_veto": "no hot-subdwarf veto",
                                 "sdo_index_veto": "veto on the raw sdO index"}


def render_report(results: dict) -> str:
    """Markdown report of a LOSO run (every figure names its data)."""
    from .lines import SDO_O_EDGE as _SDO_EDGE

    cfg = results.get("config", {})
    lines = ["# Leave-one-star-out evaluation of the O-star detector", ""]
    names = list(results.get("models", {}))
    trained = [m for m in names if not m.startswith("ens-")]
    ensembles = [m for m in names if m.startswith("ens-")]
    cmd = (f"python scripts/evaluate_loso.py --profile {cfg.get('profile')} --seed {cfg.get('seed')} "
           f"--models {','.join(trained)} --out runs/loso")
    if cfg.get("folds") is not None:
        cmd += f" --folds {','.join(str(k) for k in cfg['folds'])}"
    again = "python scripts/evaluate_loso.py --out runs/loso --reanalyse" + "".join(
        f" --ensemble {','.join(m[4:].split('-'))}" for m in ensembles)
    lines += [f"Reproduce: `{cmd}`, then `{again}` (re-derives the tables from the saved out-of-fold "
              "data" + (", and builds the ensembles from their members' out-of-fold logits" if ensembles else "")
              + "; `runs/` is git-ignored; folds may run in parallel into separate folders, merged with "
              "`--reanalyse --merge A,B`).", ""]
    total = results.get("total_seconds") or sum(
        f.get("data_seconds", 0) + sum(m.get("fit_seconds", 0) for m in f.get("models", {}).values())
        for f in results.get("folds", []))
    lines += [f"Profile `{cfg.get('profile')}`, seed {cfg.get('seed')}; "
              f"{len(results.get('o_units', []))} O split units: {', '.join(results.get('o_units', []))}.",
              f"Folds run: {[f['fold'] for f in results.get('folds', [])]}; total "
              f"{total / 60:.1f} min (data + fits).", ""]
    for env in results.get("environments", []):
        pk = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items() if v)
        hw = "".join(f"; {k} {', '.join(v) if isinstance(v, list) else v}" for k, v in
                     (("CPU", env.get("cpu")), ("BLAS", env.get("blas"))) if v)
        lines += [f"Environment: code {env.get('code_version')}, Python {env.get('python')}, "
                  f"Keras backend {env.get('keras_backend')}; {pk}{hw}.", ""]
    lines += ["Data behind every number: in fold k the models are trained on LAMOST-like realisations of the",
              "template stars of all other folds (+ their real LAMOST files) and tested on fold k's stars only:",
              "O = the held-out O star(s), E(B-V) 0-2.5 added to the star's own, S/N 5-100 (equal shares of the",
              "S/N bins); B / X = the fold's B stars / impostors, same ranges; survey = survey-preset sample",
              "of the fold's non-O stars with the mock release's own reddening and S/N, re-weighted to the",
              "survey mix (B 3 %, A 8 %, F 28 %, G 33 %, K 21 %, M 7 %, X 0.3 %); real LAMOST = the fold's",
              "shared real LAMOST files (all non-O). Recall 'S/N >= 10' counts O spectra with S/N(g) >= 10.", ""]
    if results.get("class_veto"):
        vetoed = sorted({s for m in results.get("models", {}).values() for s in m.get("class_vetoed", [])})
        lines += ["Pipeline-class veto (as the scan's default): real LAMOST files the LAMOST pipeline calls",
                  f"GALAXY or QSO are never candidates, in every rule and table ({len(vetoed)} such files here).", ""]
    if results.get("min_snr_g"):
        lines += [f"S/N floor (as the scan's default): no spectrum with S/N(g) < {results['min_snr_g']:g} is a candidate,",
                  "in every rule and table (the O test spectra have S/N >= 5: the floor costs them nothing here).", ""]
    models = results.get("models", {})
    lines += ["## Summary",
              "",
              "Operating point: chosen on these out-of-fold data (false O <= "
              f"{_num(results.get('max_false_per_million', 100.0))} per million, 0 real LAMOST",
              "candidates, <= 5 % of B at S/N >= 10 called O, maximising the star-averaged O recall at S/N >= 10);",
              "the **nested** row judges every fold by the rule chosen on the other folds only -- the figure",
              "that does not profit from choosing thresholds on the stars it is scored on. The rules include",
              "the hot-subdwarf veto in sigma: sdO index = mean EW(H-delta, H-gamma) + 2 EW(He II 4686), in",
              f"units of its error above the O-star edge ({_SDO_EDGE:g} A, the highest index of the noise-free O",
              "templates), above the 99th percentile of the O spectra of the folds that choose the rule; the",
              "'veto on the raw sdO index' rows (run 4's rule: raw index above the O spectra's 99th",
              "percentile) and 'no line veto' rows are the same choice with that veto or none.", "",
              "| model | rule | O recall, star-avg, S/N>=10 | O recall, star-avg, all | B->O | B0-B1->O | X->O | false O per million | real LAMOST candidates |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m, r in models.items():
        variants = dict(r.get("operating_point_variants") or {})
        if r.get("operating_point_without_sdo_veto"):          # results of run 4
            variants["no_sdo_veto"] = r["operating_point_without_sdo_veto"]
        for rule in ("argmax", "no_he_ii", "no_line_veto", "nested_no_line_veto", "no_sdo_veto",
                     "nested_no_sdo_veto", "sdo_index_veto", "nested_sdo_index_veto", "operating_point", "nested"):
            t = r["tables"].get(rule)
            if t is None:
                continue
            nested = rule.startswith("nested")
            op = (r["operating_point"] if rule in ("operating_point", "nested")
                  else variants.get(rule, {}) if rule in variants
                  else {} if nested else r.get("operating_point_without_he_ii", {}))
            desc = {"argmax": "arg-max class O",
                    "no_he_ii": f"posterior >= {op.get('min_posterior', float('nan')):.3g} (sharpen {op.get('sharpen', 1):g})",
                    "operating_point": _rule_words(op),
                    "nested": "**nested**: each fold by the rule chosen on the other folds"}.get(rule)
            if desc is None:
                desc = (f"nested, {_FEWER_VETOES[rule[7:]]}" if nested
                        else _rule_words(op) + f" ({_FEWER_VETOES[rule]})")
            if rule not in ("argmax",) and not nested and not op.get("feasible", True):
                desc += " (targets not met)"
            lines.append(f"| {m} | {desc} | {_pct(t['o_recall_star_averaged_snr_ge_10'])} | "
                         f"{_pct(t['o_recall_star_averaged'])} | {_pct(t['b_to_o'])} | {_pct(t['b0_b1_to_o'])} | "
                         f"{_pct(t['x_to_o'])} | {_num(t['false_o_per_million'])} | "
                         f"{t['real_lamost_candidates']}/{t['real_lamost_n']} |")
    lines.append("")
    lines += _comparison_sections(models)
    for m, r in models.items():
        t = r["tables"].get("operating_point") or r["tables"]["argmax"]
        lines += [f"## {m}", "", f"Temperature {r['temperature']:.3f} (fitted on the out-of-fold logits). "
                  f"Test spectra: {r['n']}.", "",
                  "Per held-out O star (operating point):", "",
                  "| O star | recall, all | recall, S/N >= 10 |", "|---|---|---|"]
        for s, v in t["o_recall_per_star"].items():
            lines.append(f"| {s} | {_pct(v['all'])} | {_pct(v['snr_ge_10'])} |")
        lines += ["", "By S/N (g):", "", "| S/N | O recall | B->O | B0-B1->O | false O per million | real LAMOST |",
                  "|---|---|---|---|---|---|"]
        for b, v in t["by_snr"].items():
            lines.append(f"| {b} | {_pct(v['o_recall'])} | {_pct(v['b_to_o'])} | {_pct(v['b0_b1_to_o'])} | "
                         f"{_num(v['false_o_per_million'])} | {v['real_lamost']} |")
        lines += ["", "By total E(B-V):", "",
                  "| E(B-V) | O recall | O recall S/N>=10 | median p(O) of O | B->O | B0-B1->O | false O per million |",
                  "|---|---|---|---|---|---|---|"]
        for b, v in t["by_ebv"].items():
            mp = r["p_o_by_ebv"].get(b, {}).get("median_p_o")
            lines.append(f"| {b} | {_pct(v['o_recall'])} | {_pct(v['o_recall_snr_ge_10'])} | "
                         f"{_num(mp, '{:.2f}')} | {_pct(v['b_to_o'])} | {_pct(v['b0_b1_to_o'])} | "
                         f"{_num(v['false_o_per_million'])} |")
        lines += ["", f"Survey false O by class (count of {t['survey_n']}): {t['survey_false_o_by_class']}; "
                  f"impostors called O by kind: {t['x_to_o_by_kind']}; real LAMOST candidates: "
                  f"{t['real_lamost_candidate_stars'] or 'none'}.", ""]
    return "\n".join(lines) + "\n"


def _rule_words(op: dict) -> str:
    """The operating point's rule in a few words."""
    if op.get("min_score") is None:
        words = f"posterior >= {op.get('min_posterior', float('nan')):.3g}"
    else:
        words = f"log odds + {op.get('heii_weight', 0):g} x He II sigma >= {op['min_score']:.2f}"
    if op.get("sharpen", 1.0) != 1.0:
        words += f" (sharpen {op['sharpen']:g})"
    if op.get("min_heii_sigma") is not None:
        words += f", He II >= {op['min_heii_sigma']:g} sigma"
    if op.get("max_sdo_index") is not None:
        words += f", sdO index <= {op['max_sdo_index']:.2f} A"
    if op.get("max_sdo_sigma") is not None:
        words += f", sdO index <= {op['max_sdo_sigma']:.2f} sigma above the O-star edge"
    return words


def _comparison_sections(models: dict) -> list[str]:
    """One- vs two-channel by E(B-V), and what the He II test adds to the posterior cut."""
    out: list[str] = []
    if models:
        bins = [_bin_label(lo, hi) for lo, hi in EBV_BINS]
        out += ["## Reddening: O stars by total E(B-V), every model on the same spectra", "",
                "Median p(O) (balanced, calibrated) and recall at arg-max / at the model's operating point "
                "(S/N >= 10).", "",
                "| model | " + " | ".join(f"E(B-V) {b}" for b in bins) + " |",
                "|---|" + "---|" * len(bins)]
        for m, r in models.items():
            cells = []
            for b in bins:
                mp = r["p_o_by_ebv"].get(b, {}).get("median_p_o")
                am = r["tables"]["argmax"]["by_ebv"].get(b, {}).get("o_recall_snr_ge_10")
                op = (r["tables"].get("operating_point") or {}).get("by_ebv", {}).get(b, {}).get("o_recall_snr_ge_10")
                cells.append(f"{_num(mp, '{:.2f}')} / {_pct(am)} / {_pct(op)}")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    rows = []
    for m, r in models.items():
        a, b = r["tables"].get("operating_point_posterior_only"), r["tables"].get("operating_point")
        if a is None or b is None:
            continue
        rows.append(f"| {m} | {_pct(a['o_recall_star_averaged_snr_ge_10'])} -> {_pct(b['o_recall_star_averaged_snr_ge_10'])} | "
                    f"{_num(a['false_o_per_million'])} -> {_num(b['false_o_per_million'])} | "
                    f"{_pct(a['b_to_o'])} -> {_pct(b['b_to_o'])} | {_pct(a['b0_b1_to_o'])} -> {_pct(b['b0_b1_to_o'])} | "
                    f"{_pct(a['x_to_o'])} -> {_pct(b['x_to_o'])} | "
                    f"{a['real_lamost_candidates']} -> {b['real_lamost_candidates']} |")
    if rows:
        out += ["## What the He II evidence adds", "",
                "At each model's operating point: the posterior cut alone at the score threshold's "
                "posterior (He II sigma 0) -> the rule with the He II evidence (the false-O reduction "
                "and the recall cost or gain of the combination).", "",
                "| model | O recall star-avg S/N>=10 | false O per million | B->O | B0-B1->O | X->O | real LAMOST |",
                "|---|---|---|---|---|---|---|", *rows, ""]
    return out


def _member_stems(stem: Path, members: int) -> list[Path]:
    """Where a CNN kind's saved networks are: ``stem`` itself for one, ``{stem}_m{m}`` for each member."""
    return [stem] if members == 1 else [stem.with_name(f"{stem.name}_m{m}") for m in range(members)]


def saved_fold_model(out_dir: str | Path, model: str, fold: int,
                     n_classes: int) -> Callable[[LabelledSpectra], np.ndarray]:
    """Fold ``fold``'s model ``model`` saved in a run's ``models/``, loaded once: ``data -> logits``.

    The run must have been made with ``save_models`` (the CNNs as ``.keras``,
    the logistic regressions as ``.npz`` of their scaler and coefficients).
    Classes a logistic regression never saw get -1e4, as in :func:`run_loso`.
    """
    stem = Path(out_dir) / "models" / f"fold{int(fold):02d}_{_safe(model)}"
    if model.split("+")[0].startswith("cnn"):
        import keras

        from .models import recogniser

        n = CNN_KINDS[model.split("+")[0]].members
        nets, scales = [], []
        for s in _member_stems(stem, n):
            nets.append(keras.saving.load_model(s.with_suffix(".keras"), compile=False))
            sc = s.with_suffix(".scale.npz")
            scales.append(tuple(np.load(sc)[k] for k in ("mean", "std")) if sc.exists() else None)

        def predict_cnn(data: LabelledSpectra) -> np.ndarray:
            z = [np.asarray(recogniser.predict_logits(net, _standardised(model_input(model, data), scale)),
                            np.float64) for net, scale in zip(nets, scales)]
            return z[0] if n == 1 else ensemble_logits(z, [1.0] * n)

        return predict_cnn
    z = dict(np.load(stem.with_suffix(".npz")))

    def predict(data: LabelledSpectra) -> np.ndarray:
        x = (model_input(model, data).reshape(len(data), -1) - z["mean"]) / z["scale"]
        return _lr_logits(x @ z["coef"].T + z["intercept"], z["classes"], n_classes,
                          int(z["merged_into"]) if "merged_into" in z else None)

    return predict


def add_lamost_others(out_dir: str | Path, models: Sequence[str], data_dir: str | Path | None = None,
                      log: Callable[[str], None] = print) -> int:
    """Score the real non-star LAMOST files (label N) with a finished run's saved fold models.

    For runs made before :func:`run_loso` included them: each file is given to
    fold ``crc32(designation) mod K`` and scored by that fold's saved model
    (no file was trained on), then appended to ``oof_<model>.npz`` as set
    ``lamost``.  Returns the number of files added.
    """
    import zlib

    out = Path(out_dir)
    lam = _lamost_with_evidence(data_dir)
    if lam is None:
        return 0
    others = lam.only([OTHER_LABEL])
    folds = json.loads((out / "folds.json").read_text())["folds"]
    k_all = len(json.loads((out / "folds.json").read_text())["o_units"])
    run_folds = {int(f["fold"]) for f in folds}
    fold_of = np.array([zlib.crc32(str(s).encode()) % k_all for s in others.star])
    keep = np.isin(fold_of, sorted(run_folds))
    others, fold_of = others.subset(np.flatnonzero(keep)), fold_of[keep]
    for m in models:
        path = out / f"oof_{_safe(m)}.npz"
        d = load_oof(path)
        if np.any((d["set"] == "lamost") & (d["label"] == OTHER_LABEL)):
            continue
        logits = np.zeros((len(others), len(d["classes"])))
        for f in np.unique(fold_of):
            sel = fold_of == f
            logits[sel] = saved_fold_model(out, m, int(f), len(d["classes"]))(others.subset(np.flatnonzero(sel)))
        rec = {"fold": fold_of, "set": np.full(len(others), "lamost"), "label": others.labels,
               "star": others.star, "logits": logits}
        for key in _META_KEEP:
            if key in others.meta:
                rec[key] = others.meta[key]
        existing = {key: d[key] for key in d if key != "classes"}
        _save_oof(path, [existing, rec], [str(c) for c in d["classes"]])
        log(f"{m}: {len(others)} non-star real LAMOST files scored by their folds' saved models")
    return int(len(others))
