"""Temperature scaling (Guo et al. 2017) of a classifier's logits.

Calibrated probabilities are ``softmax(logits / T)``; ``T`` is fitted once on
held-out validation logits by minimising the negative log-likelihood, stored in
the model card, and applied by :class:`lamost_ostar.models.registry.ModelBundle`.
Pure numpy/scipy; scipy is imported by the fitting functions only, so that
inference (:func:`softmax_t`) does not load it (a second of a scan worker's
start-up on the 2-core dev machine).
"""
from __future__ import annotations

import numpy as np

__all__ = ["softmax_t", "nll", "fit_temperature", "expected_calibration_error"]


def softmax_t(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits / T)`` (numerically stable), float64 ``(N, C)``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of integer ``labels`` under ``softmax(logits / T)``."""
    from scipy.special import log_softmax

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).ravel()
    logp = log_softmax(logits / float(temperature), axis=-1)
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Fit the temperature ``T`` minimising the validation NLL.

    Parameters
    ----------
    logits : ndarray, (N, C)
        Validation logits (never the training set's).
    labels : ndarray of int, (N,)
        True class indices.
    bounds : (float, float)
        Search interval for ``T`` (searched in log T).

    Returns
    -------
    float
        The fitted temperature (> 1 softens over-confident models).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError("logits must be (N, C) with N = len(labels) > 0")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError("labels out of range for the logits' classes")
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda lt: nll(logits, labels, np.exp(lt)),
                          bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-5})
    return float(np.exp(res.x))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence (equal-width bins)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).ravel()
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    total = np.bincount(bins, minlength=n_bins)
    acc = np.bincount(bins, weights=correct, minlength=n_bins)
    cs = np.bincount(bins, weights=conf, minlength=n_bins)
    used = total > 0
    return float(np.abs(acc[used] - cs[used]).sum() / len(labels))
