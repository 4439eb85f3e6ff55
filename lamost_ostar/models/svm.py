"""GAN-train and GAN-test (Shmelkov et al. 2018) with an RBF ``NuSVC``, as in the paper.

The paper scores generated O spectra with a binary O-vs-F support vector machine
(``sklearn.svm.NuSVC``, Gaussian kernel):

* **GAN-test** (authenticity): train on real data (Data set 3: real O, up-sampled
  by duplication, + real F) and test on Data set 4 (generated O + real spectra).
* **GAN-train** (diversity): train on Data set 4 (generated O + real spectra) and
  test on real data (Data set 2).

The functions take arrays (spectra as rows, standardised with eq. 1) and labels
and return accuracies; building the data sets is :mod:`lamost_ostar.datasets`'s job.
"""
from __future__ import annotations

import numpy as np
from sklearn.svm import NuSVC

__all__ = ["fit_svm", "svm_accuracy", "gan_test", "gan_train"]


def _flat(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(len(x), -1)


def fit_svm(x: np.ndarray, y: np.ndarray, *, nu: float = 0.5, gamma: str | float = "scale",
            seed: int = 0) -> NuSVC:
    """Fit ``NuSVC(kernel="rbf")`` on spectra ``x`` (N, npix) and labels ``y``.

    ``nu`` is lowered automatically when infeasible for the class balance
    (NuSVC needs ``nu <= 2 * min(n_class) / N``).
    """
    x, y = _flat(x), np.asarray(y).ravel()
    if len(x) != len(y):
        raise ValueError("x and y lengths differ")
    counts = np.unique(y, return_counts=True)[1]
    if len(counts) < 2:
        raise ValueError("the SVM needs at least two classes in its training set")
    nu = min(nu, 0.99 * 2 * counts.min() / len(y))
    return NuSVC(nu=nu, kernel="rbf", gamma=gamma, random_state=seed).fit(x, y)


def svm_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, **kwargs) -> float:
    """Accuracy on ``(test_x, test_y)`` of an RBF NuSVC trained on ``(train_x, train_y)``."""
    clf = fit_svm(train_x, train_y, **kwargs)
    test_y = np.asarray(test_y).ravel()
    return float(np.mean(clf.predict(_flat(test_x)) == test_y))


def gan_test(real_x: np.ndarray, real_y: np.ndarray, gen_x: np.ndarray, gen_y: np.ndarray,
             **kwargs) -> float:
    """GAN-test: train on real (Data set 3), accuracy on generated (Data set 4).

    Parameters
    ----------
    real_x, real_y : arrays
        Real training spectra and labels (e.g. 1 = O, 0 = F).
    gen_x, gen_y : arrays
        The test set: generated O spectra (and any real spectra of the other
        class(es) that Data set 4 holds) with their labels.
    **kwargs
        ``nu``, ``gamma``, ``seed`` for :func:`fit_svm`.
    """
    return svm_accuracy(real_x, real_y, gen_x, gen_y, **kwargs)


def gan_train(gen_x: np.ndarray, gen_y: np.ndarray, real_x: np.ndarray, real_y: np.ndarray,
              **kwargs) -> float:
    """GAN-train: train on generated (Data set 4), accuracy on real (Data set 2)."""
    return svm_accuracy(gen_x, gen_y, real_x, real_y, **kwargs)
