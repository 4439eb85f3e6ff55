"""The O-candidate decision: classifier probabilities + survey prior + He II evidence.

A recogniser trained on balanced classes returns ``p(c | x)`` for a training
prior of (about) equal classes.  A survey has O stars at ~2e-5 of its
spectra, so the probability that a spectrum *in the survey* is an O star is the
prior-adjusted posterior (Bayes, the likelihoods being the same)::

    posterior(c | x) = p(c | x) w_c / sum_k p(k | x) w_k,   w_c = pi_survey(c) / pi_train(c)

Both are stored: ``p_o`` (balanced, what the network says) and
``posterior_o`` (at the survey prior).

The candidate rule (:class:`Decision`) is a two-parameter score, not a second
network: with a dozen real O stars a fitted combiner would learn those stars
again, while a weight and a threshold are few enough to be chosen on held-out
stars (:func:`choose_operating_point`), and an astronomer can read why a
spectrum is a candidate::

    o_score      = log10(posterior_o / (1 - posterior_o)) + heii_weight * clip(heii_sigma, -3, 8)
    is_candidate = o_score >= min_score  and  heii_sigma >= min_heii_sigma (if set)

``heii_sigma`` is the combined significance of He II absorption (4200, 4541,
4686, 5411 A) measured on the spectrum itself (:mod:`lamost_ostar.lines`):
only O stars (and a few impostors: hot subdwarfs, some WR and central stars)
show it.  The score is naive Bayes: the network's survey-prior odds times a
likelihood ratio of the independent He II measurement that is log-linear in
its significance (for a Gaussian statistic of mean ``mu`` under "O" and 0
otherwise, ``log LR = mu z - mu^2 / 2``), ``heii_weight`` dex per sigma.  So
strong He II rescues an O star the network half-confuses with a B star, and a
B supergiant the network calls O is dropped when its spectrum shows no He II.
A spectrum whose He II lines cannot be measured (masked) counts as
``heii_sigma = 0`` in the score and fails a ``min_heii_sigma`` gate.

He-rich hot subdwarfs (sdO/sdOB) show He II too, and the classifier, having
seen one such star, cannot learn them: the **hot-subdwarf veto**
``max_sdo_index`` drops a spectrum whose ``sdo_index`` (mean EW of H-delta
and H-gamma + 2 EW(He II 4686), :func:`lamost_ostar.lines.sdo_index`: broad
Balmer lines *and* strong He II 4686, a high-gravity star) is above the 99th
percentile of held-out O-star spectra -- a threshold set on O stars alone, so
that it costs 1 % of them by construction and was never fitted to an
impostor.  The raw index does not know the S/N, so the threshold is set by the
noisiest O spectra and a high-S/N subdwarf passes; ``max_sdo_sigma`` is the
same veto in units of the index's error, ``sdo_sigma`` = how many sigma the
index lies above the O-star edge (:data:`lamost_ostar.lines.SDO_O_EDGE`, the
highest index of the noise-free O templates), threshold again the 99th
percentile of held-out O-star spectra.  A NaN index (lines not measurable)
passes; :func:`line_vetoed` applies whichever vetoes a rule has.
(``heii_weight = 0`` and no ``min_score`` give the plain posterior cut
``posterior_o >= min_posterior``.)

The **S/N floor** (:func:`below_snr_floor`, :data:`MIN_SNR_G`) and the
**pipeline-class veto** (:func:`class_vetoed`) are not part of a card's
rule: the stage applies them on top (``OStarStage(min_snr_g=3, class_veto=True)``),
so they hold for every model version.  A spectrum of S/N(g) below 3 is noise to
the classifier and to the He II measurement.  A spectrum the survey pipeline calls a galaxy
or a quasar (:data:`VETO_CLASSES`) is never a candidate: the models are trained
on stars only, and an extragalactic spectrum's redshifted lines can fall on the
He lines.

Pure numpy; the decision is a JSON-able dict in the model card (``decision``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "SURVEY_PRIOR",
    "SCORE_CLIP",
    "Decision",
    "DecisionOutput",
    "prior_adjust",
    "sharpened",
    "o_score",
    "choose_operating_point",
    "SDO_PERCENTILE",
    "sdo_veto_threshold",
    "sdo_vetoed",
    "line_vetoed",
    "line_veto_thresholds",
    "VETO_CLASSES",
    "class_vetoed",
    "MIN_SNR_G",
    "below_snr_floor",
    "snr_floor_in_force",
]

#: No spectrum with a g-band S/N below this is an O candidate (the stage's S/N floor).
MIN_SNR_G: float = 3.0


def snr_floor_in_force(min_snr_g: float | None = None) -> float | None:
    """The S/N floor a caller's ``min_snr_g`` means where None is "the default".

    None: :data:`MIN_SNR_G`; a value <= 0: no floor (None); else the value.
    (``OStarStage(min_snr_g=None)`` itself means no floor: it takes the value in force.)
    """
    value = MIN_SNR_G if min_snr_g is None else float(min_snr_g)
    return value if value > 0 else None


def below_snr_floor(snr_g: np.ndarray, min_snr_g: float | None = MIN_SNR_G) -> np.ndarray:
    """Whether each spectrum's g-band S/N is below the candidate floor ``min_snr_g``.

    Why a floor: at S/N 3 per pixel a 10 A window of ~1 A pixels measures an
    equivalent width to about +-1 A, more than the He II 4200/4541 lines of an O star have
    (0.3-0.8 A); below it a spectrum is noise to the classifier and to the line
    evidence alike.  On a held-out run every A/F/G spectrum of the survey mix the
    shipped rule called O had S/N(g) <= 2.8 (reports/loso/run8).  An unknown
    S/N (NaN) is not below the floor; ``min_snr_g`` None or <= 0: no floor.

    Parameters
    ----------
    snr_g : numpy.ndarray
        ``(N,)`` g-band S/N, NaN where unknown.
    min_snr_g : float or None
        The floor (:data:`MIN_SNR_G`).

    Returns
    -------
    numpy.ndarray
        bool ``(N,)``.
    """
    snr_g = np.asarray(snr_g, dtype=np.float64)
    if min_snr_g is None or min_snr_g <= 0:
        return np.zeros(snr_g.shape, bool)
    return np.isfinite(snr_g) & (snr_g < float(min_snr_g))


#: Survey-pipeline classes (LAMOST CLASS) that are never O candidates.
VETO_CLASSES: tuple[str, ...] = ("GALAXY", "QSO")


def class_vetoed(pipeline_class: Sequence[str | None],
                 veto: Sequence[str] = VETO_CLASSES) -> np.ndarray:
    """Whether each spectrum's pipeline CLASS is one of ``veto`` (case and blanks ignored).

    Parameters
    ----------
    pipeline_class : sequence of str or None
        LAMOST pipeline CLASS per spectrum (None or empty: not known, not vetoed).
    veto : sequence of str
        Classes that are never O candidates (:data:`VETO_CLASSES`).

    Returns
    -------
    numpy.ndarray
        bool ``(N,)``.
    """
    names = {v.strip().upper() for v in veto}
    return np.array([str(c or "").strip().upper() in names for c in pipeline_class], dtype=bool)


#: Class fractions of a LAMOST low-resolution release used as the survey prior:
#: O ~ 200 in 10 million spectra; B, A..M roughly LAMOST's mix (the mock's
#: ``survey`` preset); X = hot non-MK impostors (white dwarfs, hot subdwarfs,
#: Wolf-Rayet stars), a few per thousand.
SURVEY_PRIOR: dict[str, float] = {"O": 2e-5, "B": 0.03, "A": 0.08, "F": 0.28, "G": 0.33,
                                  "K": 0.21, "M": 0.07, "X": 0.003}


def sharpened(probs: np.ndarray, power: float) -> np.ndarray:
    """``probs**power`` renormalised per row (softmax at temperature ``T / power``), in log space."""
    probs = np.asarray(probs, dtype=np.float64)
    if power == 1.0 or probs.size == 0:
        return probs
    with np.errstate(divide="ignore"):
        lp = power * np.log(probs)
    lp -= np.max(lp, axis=1, keepdims=True)
    e = np.exp(lp)
    return e / e.sum(axis=1, keepdims=True)


def prior_adjust(probs: np.ndarray, classes: Sequence[str], train_prior: Mapping[str, float],
                 target_prior: Mapping[str, float]) -> np.ndarray:
    """Posterior class probabilities at ``target_prior`` from probabilities at ``train_prior``.

    Parameters
    ----------
    probs : numpy.ndarray
        ``(N, C)`` class probabilities under the training prior.
    classes : sequence of str
        Class of each column.
    train_prior, target_prior : mapping
        Class -> prior; classes absent from ``target_prior`` get prior 0.

    Returns
    -------
    numpy.ndarray
        float64 ``(N, C)``, rows summing to 1 (NaN rows stay NaN).
    """
    probs = np.asarray(probs, dtype=np.float64)
    w = np.array([float(target_prior.get(c, 0.0)) / float(train_prior[c]) for c in classes])
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"probs must be (N, {len(classes)})")
    num = probs * w[None, :]
    den = num.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


@dataclass
class DecisionOutput:
    """What :meth:`Decision.apply` returns, one value per spectrum."""

    p_o: np.ndarray             #: balanced (training-prior) p(O)
    posterior_o: np.ndarray     #: p(O) at the survey prior
    is_candidate: np.ndarray    #: bool, the rule's verdict
    score: np.ndarray | None = None   #: the O score (None for a plain posterior cut)


@dataclass
class Decision:
    """The O-candidate rule with its priors and thresholds (stored in the model card).

    Attributes
    ----------
    classes : list of str
        Model output classes.
    train_prior : dict
        Class fractions the probabilities refer to (the training balance).
    survey_prior : dict
        Class fractions of the survey (:data:`SURVEY_PRIOR`).
    min_posterior : float
        Minimum ``posterior_o``.
    min_heii_sigma : float or None
        Minimum He II evidence (``lines`` combined significance); None = not used.
    min_p_o : float or None
        Minimum balanced p(O) (the rule of model versions without a decision
        in their card: ``p_o >= 0.5``); None = not used.
    heii_weight : float
        Dex of survey-prior odds per sigma of He II absorption in the score.
    min_score : float or None
        Minimum O score; None = the plain posterior cut ``min_posterior``.
    max_sdo_index : float or None
        Hot-subdwarf veto: spectra with ``sdo_index`` above it are not
        candidates (NaN passes); None = not used.
    max_sdo_sigma : float or None
        Hot-subdwarf veto in sigma: spectra with ``sdo_sigma`` above it are
        not candidates (NaN passes); None = not used.
    sharpen : float
        The decision's probabilities are ``p**sharpen`` renormalised, i.e. the
        softmax at temperature ``T / sharpen`` instead of the calibration
        temperature ``T`` (chosen with the thresholds: a calibrated p(O) is
        not necessarily the best ranking for a 2e-5 prior).
    chosen_on : str
        What data the thresholds were chosen on, and the targets.
    figures : dict
        The figures achieved at the operating point on that data.
    """

    classes: list[str]
    train_prior: dict[str, float]
    survey_prior: dict[str, float] = field(default_factory=lambda: dict(SURVEY_PRIOR))
    min_posterior: float = 0.5
    min_heii_sigma: float | None = None
    min_p_o: float | None = None
    heii_weight: float = 0.0
    min_score: float | None = None
    sharpen: float = 1.0
    max_sdo_index: float | None = None
    max_sdo_sigma: float | None = None
    chosen_on: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    kind: str = "rule"

    @classmethod
    def balanced(cls, classes: Sequence[str], **kwargs: Any) -> "Decision":
        """A decision for a model trained on equal class fractions."""
        classes = [str(c) for c in classes]
        return cls(classes=classes, train_prior={c: 1.0 / len(classes) for c in classes}, **kwargs)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Decision":
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (the card's ``decision``)."""
        return asdict(self)

    @property
    def o_index(self) -> int:
        return self.classes.index("O")

    def posterior(self, probs: np.ndarray) -> np.ndarray:
        """``(N, C)`` posteriors at the survey prior (of the sharpened probabilities)."""
        return prior_adjust(sharpened(probs, self.sharpen), self.classes, self.train_prior, self.survey_prior)

    def apply(self, probs: np.ndarray, heii_sigma: np.ndarray | None = None,
              sdo_index: np.ndarray | None = None,
              sdo_sigma: np.ndarray | None = None) -> DecisionOutput:
        """Apply the rule to ``probs`` (``(N, C)``, training prior) and the line evidence.

        ``heii_sigma`` NaN (lines not measurable) fails the He II test;
        ``sdo_index`` and ``sdo_sigma`` (needed when the rule has
        ``max_sdo_index`` / ``max_sdo_sigma``) NaN pass the vetoes.
        """
        probs = np.asarray(probs, dtype=np.float64)
        post = self.posterior(probs)[:, self.o_index] if len(probs) else np.zeros(0)
        needs_z = self.min_heii_sigma is not None or (self.min_score is not None and self.heii_weight != 0)
        if needs_z and heii_sigma is None:
            raise ValueError("this decision needs the He II evidence (heii_sigma)")
        z = np.asarray(heii_sigma, dtype=np.float64) if heii_sigma is not None else np.zeros(len(post))
        score = None
        if self.min_score is not None:
            score = o_score(post, z, self.heii_weight)
            ok = score >= self.min_score
        else:
            ok = np.isfinite(post) & (post >= self.min_posterior)
        if self.min_p_o is not None and len(probs):
            ok &= probs[:, self.o_index] >= self.min_p_o
        if self.min_heii_sigma is not None:
            ok &= np.isfinite(z) & (z >= self.min_heii_sigma)
        ok &= ~np.asarray(line_vetoed(self.max_sdo_index, sdo_index, self.max_sdo_sigma, sdo_sigma),
                          dtype=bool)
        return DecisionOutput(p_o=probs[:, self.o_index] if len(probs) else np.zeros(0),
                              posterior_o=post, is_candidate=ok, score=score)

    @classmethod
    def from_operating_point(cls, classes: Sequence[str], op: Mapping[str, Any], **kwargs: Any) -> "Decision":
        """The balanced-prior decision of a :func:`choose_operating_point` result."""
        if op.get("min_score") is None and op.get("min_posterior") is None:
            raise ValueError("the operating point has no threshold")
        sharpen = float(op.get("sharpen", 1.0))
        for key in ("max_sdo_index", "max_sdo_sigma"):
            if op.get(key) is not None:
                kwargs.setdefault(key, float(op[key]))
        if op.get("heii_weight") or op.get("min_score") is not None:
            return cls.balanced(classes, heii_weight=float(op.get("heii_weight") or 0.0),
                                min_score=op.get("min_score"), min_heii_sigma=op.get("min_heii_sigma"),
                                min_posterior=float(op.get("min_posterior") or 0.0), sharpen=sharpen,
                                **kwargs)
        return cls.balanced(classes, min_posterior=float(op["min_posterior"]),
                            min_heii_sigma=op.get("min_heii_sigma"), sharpen=sharpen, **kwargs)

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> "Decision":
        """The decision of a model card; versions without one keep their rule ``p_o >= 0.5``."""
        if card.get("decision"):
            return cls.from_dict(card["decision"])
        return cls.balanced(card["classes"], min_posterior=0.0, min_p_o=0.5,
                            chosen_on="model version without a decision: p(O) >= 0.5 (the old default)")

    def describe(self) -> str:
        """One line: the rule in words."""
        if self.min_p_o is not None and self.min_posterior <= 0 and self.min_score is None:
            return f"p(O) >= {self.min_p_o:.3g}"
        if self.min_score is not None:
            s = (f"log10 odds of p(O) at the survey prior (O = {self.survey_prior.get('O', 0):.1e}) + "
                 f"{self.heii_weight:g} x He II sigma >= {self.min_score:.3g}")
            if self.min_heii_sigma is not None:
                s += f" and He II absorption >= {self.min_heii_sigma:.3g} sigma"
            return s + self._veto_words()
        s = f"posterior p(O) at the survey prior (O = {self.survey_prior.get('O', 0):.1e}) >= {self.min_posterior:.3g}"
        if self.min_heii_sigma is not None:
            s += f" and He II absorption >= {self.min_heii_sigma:.3g} sigma"
        return s + self._veto_words()

    def _veto_words(self) -> str:
        s = ""
        if self.max_sdo_index is not None:
            s += f" and hot-subdwarf index <= {self.max_sdo_index:.3g} A"
        if self.max_sdo_sigma is not None:
            s += f" and hot-subdwarf index <= {self.max_sdo_sigma:.3g} sigma above the O-star edge"
        return s


#: Percentile of held-out O-star spectra that sets the hot-subdwarf veto (1 % of O stars vetoed).
SDO_PERCENTILE: float = 99.0


def sdo_veto_threshold(o_sdo_index: np.ndarray, percentile: float = SDO_PERCENTILE) -> float | None:
    """``max_sdo_index`` from O-star spectra only: their ``percentile``-th ``sdo_index`` (None if none)."""
    z = np.asarray(o_sdo_index, dtype=np.float64)
    z = z[np.isfinite(z)]
    return float(np.percentile(z, percentile)) if z.size else None


def sdo_vetoed(sdo_index: np.ndarray | None, max_sdo_index: float | None) -> np.ndarray | bool:
    """True where the hot-subdwarf veto drops a spectrum (NaN index passes)."""
    if max_sdo_index is None or sdo_index is None:
        return False
    with np.errstate(invalid="ignore"):
        return np.asarray(sdo_index, dtype=np.float64) > max_sdo_index


def line_veto_thresholds(o_sdo_sigma: np.ndarray | None, o_sdo_index: np.ndarray | None = None
                         ) -> dict[str, float | None]:
    """The line vetoes' thresholds from O-star spectra alone (an index given as None: veto off).

    Returns
    -------
    dict
        ``max_sdo_sigma`` and ``max_sdo_index``, the :data:`SDO_PERCENTILE`-th
        percentiles of the O spectra's ``sdo_sigma`` and ``sdo_index`` (the
        keys of :class:`Decision`); None where the index is not given or has
        no finite value.
    """
    return {"max_sdo_sigma": None if o_sdo_sigma is None else sdo_veto_threshold(o_sdo_sigma),
            "max_sdo_index": None if o_sdo_index is None else sdo_veto_threshold(o_sdo_index)}


def line_vetoed(max_sdo_index: float | None, sdo_index: np.ndarray | None,
                max_sdo_sigma: float | None = None, sdo_sigma: np.ndarray | None = None
                ) -> np.ndarray | bool:
    """True where a line veto drops a spectrum: ``sdo_index`` above ``max_sdo_index`` or
    ``sdo_sigma`` above ``max_sdo_sigma`` (NaN passes; a None threshold is off).

    Raises
    ------
    ValueError
        A threshold is set but its index is not given.
    """
    if max_sdo_index is not None and sdo_index is None:
        raise ValueError("this decision needs the hot-subdwarf index (sdo_index)")
    if max_sdo_sigma is not None and sdo_sigma is None:
        raise ValueError("this decision needs the hot-subdwarf significance (sdo_sigma)")
    return sdo_vetoed(sdo_index, max_sdo_index) | sdo_vetoed(sdo_sigma, max_sdo_sigma)


#: He II significance range that enters the score (beyond it a line is just "strong")
SCORE_CLIP: tuple[float, float] = (-3.0, 8.0)


def o_score(posterior_o: np.ndarray, heii_sigma: np.ndarray, heii_weight: float) -> np.ndarray:
    """The O score: log10 survey-prior odds + ``heii_weight`` x clipped He II sigma (NaN sigma = 0)."""
    post = np.clip(np.asarray(posterior_o, dtype=np.float64), 1e-300, 1.0 - 1e-16)
    z = np.nan_to_num(np.asarray(heii_sigma, dtype=np.float64), nan=0.0)
    with np.errstate(invalid="ignore"):
        odds = np.log10(post) - np.log10(1.0 - post)
    return np.where(np.isfinite(posterior_o), odds + heii_weight * np.clip(z, *SCORE_CLIP), -np.inf)


def _weighted_tail(values: np.ndarray, weights: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Sum of ``weights`` of ``values >= t`` for every threshold ``t`` (vectorised)."""
    if len(values) == 0:
        return np.zeros(len(thresholds))
    order = np.argsort(values)
    v, w = values[order], weights[order]
    tail = np.concatenate([np.cumsum(w[::-1])[::-1], [0.0]])
    return tail[np.searchsorted(v, thresholds, side="left")]


def choose_operating_point(
    o_posterior: np.ndarray, o_heii: np.ndarray, o_star: np.ndarray, o_ok: np.ndarray,
    neg_posterior: np.ndarray, neg_heii: np.ndarray, neg_weight: np.ndarray | None,
    real_posterior: np.ndarray, real_heii: np.ndarray, *,
    b_posterior: np.ndarray | None = None, b_heii: np.ndarray | None = None, max_b_rate: float = 0.05,
    max_false_per_million: float = 100.0, max_real: int = 0,
    heii_grid: Sequence[float | None] = (None, 0.0, 1.0, 2.0, 3.0),
    weight_grid: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5),
) -> dict[str, Any]:
    """Choose the rule's parameters ``(heii_weight, min_score, min_heii_sigma)`` on held-out data.

    For every He II weight and gate of the grids, every O score seen on the
    held-out O spectra is a candidate threshold.  The operating point maximises
    the star-averaged O recall (over ``o_ok`` spectra, e.g. S/N >= 10) subject
    to (a) at most ``max_false_per_million`` false O per million non-O spectra
    of a survey-preset sample, (b) at most ``max_real`` candidates among real
    non-O spectra and (c) at most ``max_b_rate`` of held-out B spectra
    (``b_posterior``, ``b_heii``) called O, when given; among equal recalls
    the one with fewer false O wins, then the smaller weight.  ``weight_grid =
    (0,)`` and ``heii_grid`` give the plain posterior cut and posterior + He II
    gate rules.  When no point meets the constraints the most conservative
    point is returned with ``feasible = False``.

    Returns
    -------
    dict
        ``heii_weight``, ``min_score``, ``min_heii_sigma``, ``min_posterior``
        (the posterior that the score threshold means at He II sigma 0),
        ``star_averaged_recall``, ``recall_all``, ``false_per_million``,
        ``real_candidates``, ``b_to_o``, ``feasible``.
    """
    f = lambda a: np.asarray(a, dtype=float)   # noqa: E731
    o_post, o_z, neg_post, neg_z = f(o_posterior), f(o_heii), f(neg_posterior), f(neg_heii)
    real_post, real_z = f(real_posterior), f(real_heii)
    o_star = np.asarray(o_star).astype(str)
    o_ok = np.asarray(o_ok, bool)
    w = np.ones(len(neg_post)) if neg_weight is None else f(neg_weight)
    b_post = np.zeros(0) if b_posterior is None else f(b_posterior)
    b_z = np.zeros(0) if b_heii is None else f(b_heii)
    stars = np.unique(o_star[o_ok])
    best: dict[str, Any] | None = None
    fallback: dict[str, Any] | None = None
    for beta in weight_grid:
        so, sn, sr, sb = (o_score(p, z, beta) for p, z in ((o_post, o_z), (neg_post, neg_z),
                                                           (real_post, real_z), (b_post, b_z)))
        for gate in heii_grid:
            def gated(score, z):
                if gate is None:
                    return score
                return np.where(np.isfinite(z) & (z >= gate), score, -np.inf)
            go, gn, gr, gb = gated(so, o_z), gated(sn, neg_z), gated(sr, real_z), gated(sb, b_z)
            thr = np.unique(go[np.isfinite(go)])
            if thr.size == 0:
                continue
            thr = np.concatenate([thr, [np.inf]])
            fpm = 1e6 * _weighted_tail(gn, w, thr) / max(float(w.sum()), 1e-300)
            n_real = _weighted_tail(gr, np.ones(len(gr)), thr)
            b_rate = _weighted_tail(gb, np.ones(len(gb)), thr) / max(len(gb), 1)
            rec = np.mean([_weighted_tail(go[o_ok & (o_star == st)],
                                          np.ones(int(np.sum(o_ok & (o_star == st)))), thr)
                           / max(int(np.sum(o_ok & (o_star == st))), 1) for st in stars], axis=0) \
                if len(stars) else np.full(len(thr), np.nan)
            rec_all = _weighted_tail(go, np.ones(len(go)), thr) / max(len(go), 1)
            ok = (fpm <= max_false_per_million) & (n_real <= max_real) & (b_rate <= max_b_rate)
            for i in (np.flatnonzero(ok) if ok.any() else []):
                key = (rec[i], -fpm[i], -beta)
                if best is None or key > best["_key"]:
                    best = _point(beta, thr[i], gate, rec[i], rec_all[i], fpm[i], n_real[i], b_rate[i], True)
                    best["_key"] = key
            j = int(np.lexsort((n_real, fpm))[0])
            if fallback is None or (fpm[j], n_real[j]) < (fallback["false_per_million"], fallback["real_candidates"]):
                fallback = _point(beta, thr[j], gate, rec[j], rec_all[j], fpm[j], n_real[j], b_rate[j], False)
    if best is not None:
        best.pop("_key")
        return best
    return fallback or {"feasible": False}


def _point(beta, t, gate, rec, rec_all, fpm, n_real, b_rate, feasible) -> dict[str, Any]:
    t = float(t)
    post = (1.0 / (1.0 + 10.0 ** (-t))) if np.isfinite(t) else 1.0
    return {"heii_weight": float(beta), "min_score": t if np.isfinite(t) else None, "min_heii_sigma": gate,
            "min_posterior": float(post), "star_averaged_recall": float(rec), "recall_all": float(rec_all),
            "false_per_million": float(fpm), "real_candidates": int(n_real), "b_to_o": float(b_rate),
            "feasible": bool(feasible)}
