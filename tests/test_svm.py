"""Tests for :mod:`lamost_ostar.models.svm` (GAN-train / GAN-test) on tiny data."""
from __future__ import annotations

import numpy as np
import pytest

from lamost_ostar.models.svm import fit_svm, gan_test, gan_train, svm_accuracy


def spectra(n, centre, seed, npix=64, noise=0.05):
    rng = np.random.default_rng(seed)
    w = np.linspace(0, 1, npix)
    x = 1 - 0.5 * np.exp(-0.5 * ((w - centre) / 0.05) ** 2) + noise * rng.standard_normal((n, npix))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_good_generator_scores_high_bad_scores_low():
    real_o, real_f = spectra(40, 0.3, 0), spectra(40, 0.7, 1)
    x3 = np.vstack([real_o, real_f])
    y3 = np.r_[np.ones(40), np.zeros(40)]
    good = spectra(40, 0.3, 2)                  # "generated" O like the real ones
    bad = spectra(40, 0.7, 3)                   # a generator that makes F-like spectra
    test_f = spectra(40, 0.7, 4)
    y4 = np.r_[np.ones(40), np.zeros(40)]
    assert gan_test(x3, y3, np.vstack([good, test_f]), y4) > 0.95
    assert gan_test(x3, y3, np.vstack([bad, test_f]), y4) < 0.6
    real2 = np.vstack([spectra(30, 0.3, 5), spectra(30, 0.7, 6)])
    y2 = np.r_[np.ones(30), np.zeros(30)]
    assert gan_train(np.vstack([good, test_f]), y4, real2, y2) > 0.95


def test_nu_adjusted_for_imbalance_and_errors():
    x = np.vstack([spectra(3, 0.3, 0), spectra(30, 0.7, 1)])
    y = np.r_[np.ones(3), np.zeros(30)]
    clf = fit_svm(x, y, nu=0.5)                  # 0.5 infeasible for 3 vs 30
    assert clf.nu < 2 * 3 / 33
    assert svm_accuracy(x, y, x, y) > 0.8
    with pytest.raises(ValueError):
        fit_svm(x, np.zeros(len(x)))
