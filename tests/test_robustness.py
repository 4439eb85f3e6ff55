"""Tests for lamost_ostar.robustness (probes on a finished LOSO run's saved fold models)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lamost_ostar import loso, robustness
from lamost_ostar.datasets import _usable_for_training
from lamost_ostar.templates import load_templates

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved_run(loso_tiny_run, tmp_path_factory):
    """The session's tiny LOSO run (its fold models saved), copied, with an ensemble, analysed."""
    import shutil

    out = tmp_path_factory.mktemp("loso_saved") / "run"
    shutil.copytree(loso_tiny_run[0], out)
    name = loso.ensemble_oof(out, ["cnn2", "lr2"])
    res = loso.analyse(out, ["cnn2", "lr2", name], loso.CLASSES_8)
    (out / "results.json").write_text(json.dumps(res, default=loso._json_default))
    return out


def test_probe_realisations_differ_only_by_the_emission():
    cfg = loso.LosoConfig.from_profile("tiny")
    cfg.b_per_star = 8
    lib = _usable_for_training(load_templates(), loso.CLASSES_8)
    units, fold_of_star, _ = loso.assign_folds(lib, None, np.random.default_rng(0))
    test_lib = loso._take_stars(lib, {s for s, f in fold_of_star.items() if f == 0}, True)
    plain = robustness._probe_spectra(test_lib, 0, cfg, 0.0)
    be = robustness._probe_spectra(test_lib, 0, cfg, 40.0)
    assert set(plain) == set(be) == {"o", "b"}
    for name in plain:
        a, b = plain[name], be[name]
        assert np.array_equal(a.star, b.star)
        np.testing.assert_array_equal(a.meta["ebv_total"], b.meta["ebv_total"])   # same draws
        assert not np.allclose(a.x, b.x)                                           # but emission


def test_emission_probe_scores_held_out_stars_with_the_saved_fold_models(saved_run):
    res_models = json.loads((saved_run / "results.json").read_text())["models"]
    rules = {m: r["operating_point"] for m, r in res_models.items()}
    out = robustness.emission_probe(saved_run, rules, ["cnn2", "lr2"], levels=(0.0, 40.0), log=lambda m: None)
    assert list(out["levels"]) == ["0", "40"]
    assert out["n"]["0"] == out["n"]["40"] and out["n"]["0"]["o"] > 0 and out["n"]["0"]["b"] > 0
    for lv in out["levels"].values():
        assert set(lv) == {"cnn2", "lr2", "ens-cnn2-lr2"}
        for t in lv.values():
            r = t["o_recall_star_averaged"]
            assert r is None or 0.0 <= r <= 1.0
            assert 0.0 <= t["median_p_o"]["o"] <= 1.0 and t["b_to_o"] is not None
    text = robustness.render_emission(out, "own rule")
    assert "| 40 Å |" in text and "## ens-cnn2-lr2" in text


def test_saved_fold_model_matches_the_run_for_its_own_real_lamost_rows(saved_run):
    """The saved logistic regression reproduces the logits the run stored for the same spectra."""
    d = loso.load_oof(saved_run / "oof_lr2.npz")
    lam = loso._lamost_with_evidence(None)
    if lam is None or not np.any(d["set"] == "lamost"):
        pytest.skip("no real LAMOST files in the tiny run (shared data absent)")
    rows = np.flatnonzero(d["set"] == "lamost")
    index = {str(p): i for i, p in enumerate(lam.meta["path"])}
    sub = lam.subset(np.array([index[str(p)] for p in d["path"][rows]]))
    z = loso.saved_fold_model(saved_run, "lr2", 0, len(d["classes"]))(sub)
    np.testing.assert_allclose(z, d["logits"][rows], rtol=1e-5, atol=1e-4)   # float32 inputs


def test_script_writes_results_and_report(saved_run, tmp_path):
    out = tmp_path / "emission"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "loso_emission.py"), str(saved_run),
                        "--rule", str(saved_run / "results.json"), "--members", "cnn2,lr2", "--levels", "0,15",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["levels"]) == {"0", "15"} and "ens-cnn2-lr2" in res["levels"]["0"]
    assert (out / "report.md").read_text().startswith("# Balmer emission on held-out stars")
