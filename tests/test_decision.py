"""Tests for lamost_ostar.models.decision (prior adjustment, the candidate rule, operating point)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from lamost_ostar.models.decision import (SURVEY_PRIOR, Decision, choose_operating_point, o_score,
                                          prior_adjust)

CLASSES = ["O", "B", "A", "F", "G", "K", "M", "X"]


def test_prior_adjust_is_bayes():
    probs = np.array([[0.5, 0.5, 0, 0, 0, 0, 0, 0], [0.999, 0.001, 0, 0, 0, 0, 0, 0]])
    train = {c: 1 / 8 for c in CLASSES}
    post = prior_adjust(probs, CLASSES, train, SURVEY_PRIOR)
    np.testing.assert_allclose(post.sum(axis=1), 1.0)
    # equal likelihoods for O and B: the posterior is the prior ratio
    assert post[0, 0] == pytest.approx(2e-5 / (2e-5 + 0.03))
    # a likelihood ratio of 999 for O is not enough against a 1500x rarer class
    assert post[1, 0] == pytest.approx(0.999 * 2e-5 / (0.999 * 2e-5 + 0.001 * 0.03))
    assert post[1, 0] < 0.5
    # the same prior changes nothing
    np.testing.assert_allclose(prior_adjust(probs, CLASSES, train, train), probs)


def test_decision_rule_needs_both_tests_and_round_trips():
    d = Decision.balanced(CLASSES, min_posterior=0.5, min_heii_sigma=2.0)
    probs = np.zeros((4, 8))
    probs[:, 0] = [1 - 1e-9, 1 - 1e-9, 0.6, 1 - 1e-9]
    probs[:, 1] = 1 - probs[:, 0]
    out = d.apply(probs, np.array([3.0, 1.0, 5.0, np.nan]))
    assert out.is_candidate.tolist() == [True, False, False, False]   # weak He II; low p; unmeasured
    assert out.p_o[0] == pytest.approx(1 - 1e-9)
    assert 0.99 < out.posterior_o[0] < 1
    card = json.loads(json.dumps(d.to_dict()))
    again = Decision.from_dict(card)
    assert again == d
    assert "He II" in d.describe()
    with pytest.raises(ValueError):
        d.apply(probs)                              # the rule needs the evidence
    # a decision without He II threshold ignores the evidence
    out = Decision.balanced(CLASSES, min_posterior=0.5).apply(probs)
    assert out.is_candidate.tolist() == [True, True, False, True]


def test_operating_point_meets_the_constraints():
    rng = np.random.default_rng(0)
    # O: posterior mostly high, He II significant; negatives: a tail of high posteriors without He II
    n_o, n_neg = 400, 200_000
    o_post = rng.beta(8, 1, n_o)
    o_heii = rng.normal(4, 1.5, n_o)
    o_star = np.repeat(["s1", "s2", "s3", "s4"], n_o // 4)
    neg_post = rng.beta(1, 60, n_neg)
    neg_post[:300] = rng.uniform(0.9, 1.0, 300)           # 1500 per million that look like O
    neg_heii = rng.normal(0, 1, n_neg)
    real_post = np.array([0.95, 0.2])
    real_heii = np.array([0.5, 0.0])
    op = choose_operating_point(o_post, o_heii, o_star, np.ones(n_o, bool), neg_post, neg_heii, None,
                                real_post, real_heii, max_false_per_million=100)
    assert op["feasible"]
    assert op["false_per_million"] <= 100 and op["real_candidates"] == 0
    assert op["min_heii_sigma"] is not None or op["heii_weight"] > 0   # He II makes the target reachable
    d = Decision.from_operating_point(CLASSES, op)
    # the rule's score reproduces the operating point's recall on the O spectra
    score = o_score(o_post, o_heii, d.heii_weight)
    cand = score >= d.min_score
    if d.min_heii_sigma is not None:
        cand &= o_heii >= d.min_heii_sigma
    assert cand.mean() == pytest.approx(op["recall_all"], abs=1e-9)
    cnn_only = choose_operating_point(o_post, o_heii, o_star, np.ones(n_o, bool), neg_post, neg_heii, None,
                                      real_post, real_heii, max_false_per_million=100, heii_grid=(None,),
                                      weight_grid=(0.0,))
    assert op["star_averaged_recall"] > cnn_only["star_averaged_recall"]


def test_score_rule_lets_strong_he_ii_outweigh_a_b_like_network():
    d = Decision.balanced(CLASSES, heii_weight=0.75, min_score=0.0)
    probs = np.zeros((3, 8))
    probs[:, 0] = [0.8, 0.8, 0.9999]
    probs[:, 1] = 1 - probs[:, 0]
    out = d.apply(probs, np.array([8.0, 0.5, np.nan]))
    # posterior odds ~ 4/1500: -2.57 dex; + 0.75 x 8 -> candidate; + 0.75 x 0.5 -> not; NaN counts 0
    assert out.is_candidate.tolist() == [True, False, True]
    assert out.score[0] == pytest.approx(np.log10(4 * 2e-5 / 0.03 / (1 - 4 * 2e-5 / 0.03)) + 6, abs=0.01)
    assert "He II sigma" in d.describe()


def test_decision_imports_no_keras():
    import subprocess

    code = ("import sys, lamost_ostar.models.decision; "
            "print('keras' in sys.modules or 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_hot_subdwarf_veto_drops_high_gravity_he_ii_spectra():
    """max_sdo_index drops spectra above it (NaN passes); its threshold comes from O spectra alone."""
    from lamost_ostar.models.decision import SDO_PERCENTILE, sdo_veto_threshold, sdo_vetoed

    d = Decision.balanced(CLASSES, min_posterior=0.5, max_sdo_index=5.0)
    probs = np.zeros((3, 8))
    probs[:, 0] = 1 - 1e-9
    probs[:, 1] = 1e-9
    out = d.apply(probs, np.zeros(3), np.array([4.0, 6.5, np.nan]))
    assert out.is_candidate.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="sdo_index"):
        d.apply(probs, np.zeros(3))
    assert "hot-subdwarf" in d.describe()
    assert Decision.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    # 1 % of the O spectra above the threshold, by construction
    o = np.random.default_rng(0).normal(2.5, 1.0, 10_000)
    thr = sdo_veto_threshold(np.concatenate([o, [np.nan]]))
    assert np.mean(sdo_vetoed(o, thr)) == pytest.approx(1 - SDO_PERCENTILE / 100, abs=1e-3)
    assert sdo_veto_threshold(np.array([np.nan])) is None and sdo_vetoed(o, None) is False
    # an operating point's threshold travels into the decision
    op = {"min_posterior": 0.5, "max_sdo_index": 6.2}
    assert Decision.from_operating_point(CLASSES, op).max_sdo_index == 6.2


def test_hot_subdwarf_veto_in_sigma():
    """max_sdo_sigma drops spectra above it (NaN passes); one function applies both forms of the
    veto, and their thresholds come from O spectra alone (1 % of them each)."""
    from lamost_ostar.models.decision import SDO_PERCENTILE, line_veto_thresholds, line_vetoed

    d = Decision.balanced(CLASSES, min_posterior=0.5, max_sdo_index=7.0, max_sdo_sigma=2.0)
    probs = np.zeros((4, 8))
    probs[:, 0] = 1 - 1e-9
    probs[:, 1] = 1e-9
    out = d.apply(probs, np.zeros(4), np.array([4.0, 6.5, 7.5, np.nan]), np.array([0.5, 3.0, 1.0, np.nan]))
    assert out.is_candidate.tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="sdo_sigma"):
        d.apply(probs, np.zeros(4), np.zeros(4))
    assert "sigma above the O-star edge" in d.describe()
    assert Decision.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    rng = np.random.default_rng(1)
    o_sigma, o_sdo = rng.normal(-1.0, 1.0, 20_000), rng.normal(2.5, 1.0, 20_000)
    thr = line_veto_thresholds(o_sigma, o_sdo)
    for t, v in ((thr["max_sdo_sigma"], o_sigma), (thr["max_sdo_index"], o_sdo)):
        assert np.mean(line_vetoed(None, None, t, v) if v is o_sigma else line_vetoed(t, v)) == \
            pytest.approx(1 - SDO_PERCENTILE / 100, abs=1e-3)
    assert line_veto_thresholds(None) == {"max_sdo_sigma": None, "max_sdo_index": None}
    assert line_vetoed(None, None, None, None) is False
    rule = Decision.from_operating_point(CLASSES, {"min_posterior": 0.5, **line_veto_thresholds(o_sigma)})
    assert rule.max_sdo_sigma == thr["max_sdo_sigma"] and rule.max_sdo_index is None


def test_class_vetoed_galaxies_and_quasars_only():
    from lamost_ostar.models.decision import VETO_CLASSES, class_vetoed

    got = class_vetoed(["GALAXY", "qso ", "STAR", "Unknown", None, "", "galaxy"])
    assert got.tolist() == [True, True, False, False, False, False, True]
    assert set(VETO_CLASSES) == {"GALAXY", "QSO"}
    assert class_vetoed([]).shape == (0,)
    assert class_vetoed(["Unknown"], veto=("unknown",)).tolist() == [True]


def test_below_snr_floor():
    from lamost_ostar.models.decision import MIN_SNR_G, below_snr_floor

    snr = np.array([0.5, 2.99, 3.0, 50.0, np.nan])
    assert MIN_SNR_G == 3.0
    assert below_snr_floor(snr).tolist() == [True, True, False, False, False]
    assert not below_snr_floor(snr, 0).any() and not below_snr_floor(snr, None).any()
    assert below_snr_floor(snr, 60).tolist() == [True, True, True, True, False]


def test_snr_floor_in_force():
    from lamost_ostar.models.decision import MIN_SNR_G, snr_floor_in_force

    assert snr_floor_in_force() == MIN_SNR_G == snr_floor_in_force(None)
    assert snr_floor_in_force(0) is None and snr_floor_in_force(-1) is None
    assert snr_floor_in_force(5) == 5.0
