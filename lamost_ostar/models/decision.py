"""The O-candidate decision: classifier probabilities + survey prior + He II evidence.

A recogniser trained on balanced classes returns ``p(c | x)`` for a training
prior of (about) equal classes.  A survey has O stars at ~2e-5 of its
spectra, so the probability that a spectrum *in the survey* is an O star is the
prior-adjusted posterior (Bayes, the likelihoods being the same)::

    posterior(c | x) = p(c | x) w_c / sum_k p(k | x) w_k,   w_c = pi_survey(c) / pi_train(c)

Both are stored: ``p_o`` (balanced, what the network says) and
``posterior_o`` (at the survey prior).

The candidate rule (:class:`Decision`) is deliberately a *rule*, not a second
learnt model: with a dozen real O stars a fitted combiner would learn those
stars again, while the rule's two thresholds are few enough to be chosen on
held-out stars (:func:`choose_operating_point`) and an astronomer can read why
a spectrum is a candidate::

    is_candidate = posterior_o >= min_posterior  and  heii_sigma >= min_heii_sigma

``heii_sigma`` is the combined significance of He II absorption (4200, 4541,
4686 A) measured on the spectrum itself (:mod:`lamost_ostar.lines`): only O
stars (and a few impostors: hot subdwarfs, some WR and central stars) show
it, so it removes B stars and artefacts that the network calls O, at the cost
of the faintest late-O spectra whose He II is lost in the noise.  A spectrum
whose He II lines cannot be measured (masked) is not a candidate.

Pure numpy; the decision is a JSON-able dict in the model card (``decision``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "SURVEY_PRIOR",
    "Decision",
    "DecisionOutput",
    "prior_adjust",
    "choose_operating_point",
]

#: Class fractions of a LAMOST low-resolution release used as the survey prior:
#: O ~ 200 in 10 million spectra; B, A..M roughly LAMOST's mix (the mock's
#: ``survey`` preset); X = hot non-MK impostors (white dwarfs, hot subdwarfs,
#: Wolf-Rayet stars), a few per thousand.
SURVEY_PRIOR: dict[str, float] = {"O": 2e-5, "B": 0.03, "A": 0.08, "F": 0.28, "G": 0.33,
                                  "K": 0.21, "M": 0.07, "X": 0.003}


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
        """``(N, C)`` posteriors at the survey prior."""
        return prior_adjust(probs, self.classes, self.train_prior, self.survey_prior)

    def apply(self, probs: np.ndarray, heii_sigma: np.ndarray | None = None) -> DecisionOutput:
        """Apply the rule to ``probs`` (``(N, C)``, training prior) and the He II evidence.

        ``heii_sigma`` NaN (lines not measurable) fails the He II test.
        """
        probs = np.asarray(probs, dtype=np.float64)
        post = self.posterior(probs)[:, self.o_index] if len(probs) else np.zeros(0)
        ok = np.isfinite(post) & (post >= self.min_posterior)
        if self.min_p_o is not None and len(probs):
            ok &= probs[:, self.o_index] >= self.min_p_o
        if self.min_heii_sigma is not None:
            if heii_sigma is None:
                raise ValueError("this decision needs the He II evidence (heii_sigma)")
            z = np.asarray(heii_sigma, dtype=np.float64)
            ok &= np.isfinite(z) & (z >= self.min_heii_sigma)
        return DecisionOutput(p_o=probs[:, self.o_index] if len(probs) else np.zeros(0),
                              posterior_o=post, is_candidate=ok)

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> "Decision":
        """The decision of a model card; versions without one keep their rule ``p_o >= 0.5``."""
        if card.get("decision"):
            return cls.from_dict(card["decision"])
        return cls.balanced(card["classes"], min_posterior=0.0, min_p_o=0.5,
                            chosen_on="model version without a decision: p(O) >= 0.5 (the old default)")

    def describe(self) -> str:
        """One line: the rule in words."""
        if self.min_p_o is not None and self.min_posterior <= 0:
            return f"p(O) >= {self.min_p_o:.3g}"
        s = f"posterior p(O) at the survey prior (O = {self.survey_prior.get('O', 0):.1e}) >= {self.min_posterior:.3g}"
        if self.min_heii_sigma is not None:
            s += f" and He II absorption >= {self.min_heii_sigma:.3g} sigma"
        return s


def _quantile_grid(values: np.ndarray, n: int = 200) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.array([0.5])
    return np.unique(np.quantile(v, np.linspace(0.0, 1.0, n)))


def choose_operating_point(
    o_posterior: np.ndarray, o_heii: np.ndarray, o_star: np.ndarray, o_ok: np.ndarray,
    neg_posterior: np.ndarray, neg_heii: np.ndarray, neg_weight: np.ndarray | None,
    real_posterior: np.ndarray, real_heii: np.ndarray, *,
    b_posterior: np.ndarray | None = None, b_heii: np.ndarray | None = None, max_b_rate: float = 0.05,
    max_false_per_million: float = 100.0, max_real: int = 0,
    heii_grid: Sequence[float | None] = (None, 0.0, 1.0, 1.5, 2.0, 2.5, 3.0),
    posterior_grid: np.ndarray | None = None,
) -> dict[str, Any]:
    """Choose ``(min_posterior, min_heii_sigma)`` on held-out data.

    The operating point maximises the star-averaged O recall (over ``o_ok``
    spectra, e.g. S/N >= 10) subject to (a) at most ``max_false_per_million``
    false O per million non-O spectra of a survey-preset sample, (b) at most
    ``max_real`` candidates among real non-O spectra and (c) at most
    ``max_b_rate`` of held-out B spectra (``b_posterior``, ``b_heii``) called
    O, when given; among equal recalls the
    one with fewer false O wins.  Returns the thresholds and the figures there
    (``None`` thresholds when no point meets the constraints: the most
    conservative point is then returned with ``feasible = False``).

    Parameters
    ----------
    o_posterior, o_heii, o_star, o_ok : numpy.ndarray
        Held-out O spectra: posterior p(O), He II evidence, star id, and
        whether the spectrum counts for the recall target.
    neg_posterior, neg_heii : numpy.ndarray
        Survey-preset non-O spectra (held-out stars).
    neg_weight : numpy.ndarray, optional
        Weight of each non-O spectrum (e.g. to re-weight classes to the survey
        mix); default 1.
    real_posterior, real_heii : numpy.ndarray
        Real non-O spectra (e.g. real LAMOST files).
    """
    o_posterior = np.asarray(o_posterior, float)
    o_heii = np.asarray(o_heii, float)
    o_star = np.asarray(o_star).astype(str)
    o_ok = np.asarray(o_ok, bool)
    neg_posterior = np.asarray(neg_posterior, float)
    neg_heii = np.asarray(neg_heii, float)
    w = np.ones(len(neg_posterior)) if neg_weight is None else np.asarray(neg_weight, float)
    real_posterior = np.asarray(real_posterior, float)
    real_heii = np.asarray(real_heii, float)
    grid = (posterior_grid if posterior_grid is not None
            else np.unique(np.concatenate([_quantile_grid(neg_posterior, 400), _quantile_grid(o_posterior, 200),
                                           [0.5, 0.9, 0.99]])))
    stars = np.unique(o_star[o_ok])
    best: dict[str, Any] | None = None
    fallback: dict[str, Any] | None = None
    b_post = np.zeros(0) if b_posterior is None else np.asarray(b_posterior, float)
    b_he_arr = np.zeros(0) if b_heii is None else np.asarray(b_heii, float)
    for z in heii_grid:
        o_he = np.ones(len(o_posterior), bool) if z is None else (np.isfinite(o_heii) & (o_heii >= z))
        b_he = np.ones(len(b_post), bool) if z is None else (np.isfinite(b_he_arr) & (b_he_arr >= z))
        n_he = np.ones(len(neg_posterior), bool) if z is None else (np.isfinite(neg_heii) & (neg_heii >= z))
        r_he = np.ones(len(real_posterior), bool) if z is None else (np.isfinite(real_heii) & (real_heii >= z))
        for t in grid:
            o_c = o_he & (o_posterior >= t)
            fpm = 1e6 * float(np.sum(w * (n_he & (neg_posterior >= t)))) / max(float(w.sum()), 1e-300)
            n_real = int(np.sum(r_he & (real_posterior >= t)))
            b_rate = float(np.mean(b_he & (b_post >= t))) if len(b_post) else 0.0
            rec = [float(np.mean(o_c[o_ok & (o_star == s)])) for s in stars]
            star_avg = float(np.mean(rec)) if rec else float("nan")
            point = {"min_posterior": float(t), "min_heii_sigma": z, "star_averaged_recall": star_avg,
                     "recall_all": float(np.mean(o_c)) if len(o_c) else float("nan"),
                     "false_per_million": fpm, "real_candidates": n_real, "b_to_o": b_rate,
                     "feasible": True}
            if fpm <= max_false_per_million and n_real <= max_real and b_rate <= max_b_rate:
                key = (star_avg, -fpm)
                if best is None or key > (best["star_averaged_recall"], -best["false_per_million"]):
                    best = point
            elif fallback is None or (fpm, n_real) < (fallback["false_per_million"], fallback["real_candidates"]):
                fallback = dict(point, feasible=False)
    return best if best is not None else (fallback or {"feasible": False})
