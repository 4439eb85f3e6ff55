"""Classification metrics shared by training, ``retrain`` and the paper's evaluation."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix ``C[i, j]`` = number of class ``i`` predicted as ``j``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def classification_metrics(
    y_true: np.ndarray, proba: np.ndarray, classes: Sequence[str], positive: str = "O"
) -> dict:
    """Accuracy, per-class precision/recall, confusion matrix and log-loss.

    Parameters
    ----------
    y_true : array of int
        True class indices into ``classes``.
    proba : array (N, C)
        Predicted probabilities.
    classes : sequence of str
        Class names.
    positive : str
        Class whose precision/recall are also given at top level (``o_precision``...).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    n_classes = len(classes)
    y_pred = proba.argmax(axis=1) if len(proba) else np.zeros(0, np.int64)
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / cm.sum(axis=0)
        recall = tp / cm.sum(axis=1)
    eps = 1e-12
    logloss = float(-np.mean(np.log(np.clip(proba[np.arange(len(y_true)), y_true], eps, 1)))) if len(y_true) else float("nan")
    out = {
        "n": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "log_loss": logloss,
        "ece": expected_calibration_error(y_true, proba) if len(y_true) else float("nan"),
        "classes": list(classes),
        "confusion": cm.tolist(),
        "precision": {c: _f(p) for c, p in zip(classes, precision)},
        "recall": {c: _f(r) for c, r in zip(classes, recall)},
        "support": {c: int(s) for c, s in zip(classes, cm.sum(axis=1))},
    }
    if positive in classes:
        k = list(classes).index(positive)
        out[f"{positive.lower()}_precision"] = _f(precision[k])
        out[f"{positive.lower()}_recall"] = _f(recall[k])
    return out


def _f(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error of the top-class confidence (equal-width bins)."""
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y_true
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)
