"""Tests for :mod:`lamost_ostar.models.calibration`."""
from __future__ import annotations

import numpy as np
import pytest

from lamost_ostar.models.calibration import (
    expected_calibration_error,
    fit_temperature,
    nll,
    softmax_t,
)


def test_softmax_t():
    p = softmax_t(np.array([[0.0, 0.0], [1000.0, 0.0]]), 1.0)
    np.testing.assert_allclose(p, [[0.5, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(softmax_t(np.array([[2.0, 0.0]]), 2.0),
                               softmax_t(np.array([[1.0, 0.0]])))
    with pytest.raises(ValueError):
        softmax_t(np.zeros((1, 2)), 0.0)


@pytest.mark.parametrize("true_t", [0.5, 1.0, 3.0])
def test_recovers_known_temperature(true_t):
    """Labels drawn from softmax(z); a model reporting logits z * T_true is fitted T ~ T_true."""
    rng = np.random.default_rng(0)
    z = rng.normal(scale=2.0, size=(20000, 7))
    p = softmax_t(z)
    labels = (p.cumsum(1) > rng.random((len(z), 1))).argmax(1)
    t = fit_temperature(z * true_t, labels)
    assert abs(t - true_t) / true_t < 0.05
    assert nll(z * true_t, labels, t) <= nll(z * true_t, labels, 1.0) + 1e-12


def test_ece_drops_after_scaling():
    rng = np.random.default_rng(1)
    z = rng.normal(scale=2.0, size=(5000, 4))
    labels = (softmax_t(z).cumsum(1) > rng.random((len(z), 1))).argmax(1)
    over = z * 3
    t = fit_temperature(over, labels)
    assert expected_calibration_error(softmax_t(over, t), labels) < \
        expected_calibration_error(softmax_t(over), labels)


def test_bad_input():
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((3, 2)), np.array([0, 1, 2]))
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((3, 2)), np.array([0, 1]))
