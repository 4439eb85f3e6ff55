"""Tests for lamost_ostar.loso (leave-one-star-out protocol) and the detector it ships."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lamost_ostar import loso
from lamost_ostar.datasets import library_star_ids
from lamost_ostar.templates import load_templates

DATA = Path(__file__).resolve().parent / "data"


def test_folds_hold_every_star_once_and_one_o_unit_each():
    lib = loso._usable_for_training(load_templates(), loso.CLASSES_8)
    units, fold_of_star, _ = loso.assign_folds(lib, None, np.random.default_rng(0))
    ids = library_star_ids(lib)
    o_ids = set(ids[np.asarray(lib.mk) == "O"])
    assert units == sorted(o_ids) and len(units) >= 10          # MILES + STELIB + Pickles O stars
    assert set(fold_of_star) == set(ids)                        # every star in exactly one fold
    for k, u in enumerate(units):
        held = {s for s, f in fold_of_star.items() if f == k}
        assert held & o_ids == {u}                              # one O unit per fold
    # no MKCLASS averages or mislabelled stars among the stars
    assert not any(s.startswith("mkclass:") for s in ids) and "HD338529" not in set(ids)


@pytest.fixture
def tiny_run(loso_tiny_run, tmp_path):
    """The session's tiny LOSO run, copied: a test may change its copy."""
    import shutil

    out, path = loso_tiny_run
    copy = tmp_path / "loso"
    shutil.copytree(out, copy)
    return copy, copy / path.relative_to(out)


def test_tiny_run_writes_out_of_fold_data_and_a_report(tiny_run):
    out, path = tiny_run
    text = path.read_text()
    assert "Leave-one-star-out" in text and "| cnn2 |" in text and "| lr2 |" in text
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"cnn2", "lr2"}
    d = loso.load_oof(out / "oof_cnn2.npz")
    assert d["logits"].shape[1] == len(loso.CLASSES_8)
    # every test spectrum is of a star held out by its fold
    folds = json.loads((out / "folds.json").read_text())["folds"]
    held = {f["fold"]: set(f["test_stars"]) for f in folds}
    lib_rows = d["set"] != "lamost"
    assert all(s in held[int(k)] for s, k in zip(d["star"][lib_rows], d["fold"][lib_rows]))
    assert np.isfinite(d["heii_sigma"][d["set"] == "o"]).any()
    # what ran the folds is recorded: code, Python, the packages that change the figures
    env = json.loads((out / "folds.json").read_text())["environments"]
    assert env == res["environments"] and len(env) == 1
    assert env[0]["packages"]["numpy"] == np.__version__ and set(env[0]["packages"]) == set(loso.ENVIRONMENT_PACKAGES)
    assert env[0]["code_version"] and env[0]["python"] and "Environment: code " in text
    # and the machine: the processor and the BLAS kernels picked for it (they change the fits' last digits)
    assert env[0]["cpu"] == loso._cpu_model() and (env[0]["cpu"] is None or f"CPU {env[0]['cpu']}" in text)
    assert env[0]["blas"] == loso._blas_kernels() and all(isinstance(b, str) for b in env[0]["blas"])
    for m in res["models"].values():
        assert "operating_point" in m and "tables" in m and m["temperature"] > 0
        # the hot-subdwarf veto in sigma, set on O spectra; the raw-index veto and none for comparison
        assert m["operating_point"]["max_sdo_sigma"] is not None and m["operating_point"]["max_sdo_index"] is None
        assert {"sdo_index_veto", "no_line_veto"} <= set(m["operating_point_variants"])
        assert m["operating_point_variants"]["sdo_index_veto"]["max_sdo_sigma"] is None
        if len({f["fold"] for f in res["folds"]}) > 1:
            assert {"nested", "nested_sdo_index_veto", "nested_no_line_veto"} <= set(m["tables"])
    assert "hot-subdwarf veto in sigma" in text and "no line veto" in text
    assert "sdo_sigma" in d


def test_detector_trained_with_the_loso_decision_scans_real_files(tiny_run, tmp_path):
    """train_detector registers a two-channel model whose card holds the LOSO rule; the stage uses it."""
    from lamost_ostar import train
    from lamost_ostar.datasets import DetectorRecipe
    from lamost_ostar.models.registry import load_model
    from lamost_ostar.stage import OStarStage

    out, _ = tiny_run
    res = json.loads((out / "results.json").read_text())
    if res["models"]["cnn2"]["operating_point"].get("min_posterior") is None:
        res["models"]["cnn2"]["operating_point"].update(min_posterior=0.5, min_heii_sigma=2.0)
        (out / "results.json").write_text(json.dumps(res))
    version, card = train.train_detector(tmp_path, out / "results.json", recipe=DetectorRecipe(n_per_class=10),
                                         epochs=1, n_val_per_class=3)
    bundle = load_model(version, tmp_path)
    assert bundle.channels == 2 and bundle.card["decision"]["classes"] == list(loso.CLASSES_8)
    assert bundle.card["input_shape"][1] == 2 and "loso" in bundle.card["metrics"]
    stage = OStarStage(version, tmp_path, device="cpu")
    res = stage.process([str(DATA / "io_image_dr7.fits"), str(DATA / "io_not_fits.fits")])
    ok, bad = res
    assert ok.ok and ok.is_candidate in (True, False) and ok.posterior_o is not None
    assert set(ok.probs) == set(loso.CLASSES_8)
    assert ok.evidence is not None and "ew_heii_4541" in ok.evidence
    assert not bad.ok and bad.is_candidate is None


def test_a_rule_applied_unchanged_to_another_recipe_takes_that_recipes_calibration(tiny_run, tmp_path):
    """calibration_results: the rule from one run; recipe, temperature and tables from another; clean checks carded."""
    from lamost_ostar import train
    from lamost_ostar.datasets import DetectorRecipe
    from lamost_ostar.models.registry import load_model

    out, _ = tiny_run
    res = json.loads((out / "results.json").read_text())
    if res["models"]["cnn2"]["operating_point"].get("min_posterior") is None:
        res["models"]["cnn2"]["operating_point"].update(min_posterior=0.5, min_heii_sigma=2.0)
    rule = tmp_path / "rule.json"
    rule.write_text(json.dumps(res))
    calib = json.loads(json.dumps(res))
    calib["models"]["cnn2"]["temperature"] = 1.7
    calib["config"]["recipe"]["emission_fraction"] = 0.5
    calib_path = tmp_path / "calib.json"
    calib_path.write_text(json.dumps(calib))
    t = loso.apply_rule(out, "cnn2", res["models"]["cnn2"]["operating_point"])
    check = tmp_path / "applied_rule.json"
    check.write_text(json.dumps({"cnn2": {"rule_from": str(rule), "tables": t}}, default=loso._json_default))
    version, card = train.train_detector(tmp_path / "models", rule, recipe=DetectorRecipe(n_per_class=10),
                                         epochs=1, n_val_per_class=3, calibration_results=calib_path,
                                         clean_checks=[check])
    bundle = load_model(version, tmp_path / "models")
    assert bundle.card["temperature"] == pytest.approx(1.7)
    dec = bundle.card["decision"]
    assert dec["min_posterior"] == pytest.approx(res["models"]["cnn2"]["operating_point"]["min_posterior"])
    assert str(calib_path) in dec["chosen_on"] and "applied unchanged" in dec["chosen_on"]
    loso_card = bundle.card["metrics"]["loso"]
    assert loso_card["rule_from"] == str(rule)
    got = loso_card["clean_checks"][str(check)]
    assert got["false_o_per_million"] == pytest.approx(t["false_o_per_million"])
    assert got["real_lamost_candidates"] == t["real_lamost_candidates"]


def test_mix_within_class_mixes_different_stars_of_one_class():
    import numpy as np

    from lamost_ostar.loso import mix_within_class

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 50, 2)).astype(np.float32)
    x[..., 0] /= np.linalg.norm(x[..., 0], axis=1, keepdims=True)
    labels = np.array(["O"] * 10 + ["B"] * 10 + ["A"] * 20)
    star = np.array([f"s{i % 4}" for i in range(10)] + [f"b{i % 5}" for i in range(10)]
                    + [f"a{i}" for i in range(20)])
    out, n = mix_within_class(x, labels, star, np.random.default_rng(1), fraction=0.5)
    changed = np.flatnonzero(np.any(out != x, axis=(1, 2)))
    assert n == 10 and len(changed) == 10 and np.all(labels[changed] != "A")
    assert np.allclose(np.linalg.norm(out[..., 0], axis=1), 1.0, atol=1e-5)
    # every mixed O spectrum lies between the input O spectra (a mixture, not noise)
    o_changed = changed[labels[changed] == "O"]
    for i in o_changed:
        ok = [np.linalg.lstsq(np.stack([x[i, :, 1], x[j, :, 1]], 1), out[i, :, 1], rcond=None)[1]
              for j in range(10) if star[j] != star[i]]
        assert min(r[0] if len(r) else 0.0 for r in ok) < 1e-6
    # one star only: nothing to mix
    same, n1 = mix_within_class(x[:5], labels[:5], np.array(["s"] * 5), np.random.default_rng(2))
    assert n1 == 0 and np.array_equal(same, x[:5])


def test_merge_parallel_runs_and_an_ensemble(tiny_run, tmp_path, load_script):
    """Runs of disjoint folds merge into one; an ensemble's OOF logits come from its members'."""
    import shutil

    out, _ = tiny_run
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(out, a)
    shutil.copytree(out, b)
    # b: the same data presented as another fold (what a parallel run of fold 1 writes)
    for m in ("cnn2", "lr2"):
        d = loso.load_oof(b / f"oof_{m}.npz")
        d["fold"] = d["fold"] + 1
        np.savez_compressed(b / f"oof_{m}.npz", **d)
    f = json.loads((b / "folds.json").read_text())
    for fold in f["folds"]:
        fold["fold"] += 1
    f["environments"] = f["environments"] + [dict(f["environments"][0], python="3.99.0")]
    (b / "folds.json").write_text(json.dumps(f))
    merged = tmp_path / "merged"
    assert sorted(loso.merge_runs([a, b], merged)) == ["cnn2", "lr2"]
    envs = json.loads((merged / "folds.json").read_text())["environments"]    # distinct ones, in order
    assert [e["python"] for e in envs][1:] == ["3.99.0"] and len(envs) == 2
    one, both = loso.load_oof(a / "oof_lr2.npz"), loso.load_oof(merged / "oof_lr2.npz")
    assert len(both["label"]) == 2 * len(one["label"]) and set(both["fold"]) == {0, 1}
    assert [x["fold"] for x in json.loads((merged / "folds.json").read_text())["folds"]] == [0, 1]
    with pytest.raises(ValueError, match="share folds"):
        loso.merge_runs([a, a], tmp_path / "bad")
    name = loso.ensemble_oof(merged, ["cnn2", "lr2"])
    ens = loso.load_oof(merged / f"oof_{name}.npz")
    assert name == "ens-cnn2-lr2" and ens["logits"].shape == both["logits"].shape
    p = np.exp(ens["logits"])
    assert np.all(p.sum(axis=1) <= 1.0 + 1e-9)                 # mean of log probabilities
    res = loso.analyse(merged, ["cnn2", "lr2", name], loso.CLASSES_8)
    assert set(res["models"]) == {"cnn2", "lr2", name}
    mod = load_script("evaluate_loso")
    mod.main(["--out", str(merged), "--reanalyse"])                # the script's results carry them too
    assert json.loads((merged / "results.json").read_text())["environments"] == envs


def test_pool_runs_of_two_seeds(tiny_run, tmp_path):
    """Complete runs of two seeds pool into one folder (a run column), refused for other O units."""
    import shutil

    out, _ = tiny_run
    a, b = tmp_path / "s0", tmp_path / "s1"
    shutil.copytree(out, a)
    shutil.copytree(out, b)
    f = json.loads((b / "folds.json").read_text())
    f["config"]["seed"] = 1
    (b / "folds.json").write_text(json.dumps(f))
    pooled = tmp_path / "pooled"
    assert sorted(loso.pool_runs([a, b], pooled)) == ["cnn2", "lr2"]
    one, both = loso.load_oof(a / "oof_lr2.npz"), loso.load_oof(pooled / "oof_lr2.npz")
    assert len(both["label"]) == 2 * len(one["label"])
    assert np.array_equal(np.unique(both["run"], return_counts=True)[1], [len(one["label"])] * 2)
    assert json.loads((pooled / "folds.json").read_text())["config"]["seed"] == [0, 1]
    assert len(json.loads((pooled / "folds.json").read_text())["environments"]) == 1   # the same one twice
    # the single-line EWs stored for every test spectrum travel with the pool
    assert "ew_hgamma" in both and "ew_heii_4541_err" in both
    res = loso.analyse(pooled, ["lr2"], loso.CLASSES_8)
    assert res["models"]["lr2"]["n"]["o"] == 2 * int(np.sum(one["set"] == "o"))
    per_run = loso.per_run_summary([a])                         # each run's own (clean) nested figures
    assert set(per_run) == {"seed 0"} and "operating_point" in per_run["seed 0"]["lr2"]
    assert set(per_run["seed 0"]["lr2"]["operating_point"]) == set(loso.SUMMARY_KEYS)
    f["o_units"] = f["o_units"][:-1]
    (b / "folds.json").write_text(json.dumps(f))
    with pytest.raises(ValueError, match="O split units"):
        loso.pool_runs([a, b], tmp_path / "bad")


def test_an_ensemble_detector_is_trained_registered_and_scans(tiny_run, tmp_path):
    """train_detector(model_kind='ens-A-B') trains both members and ships their mean as one model."""
    from lamost_ostar import train
    from lamost_ostar.datasets import DetectorRecipe
    from lamost_ostar.models.registry import load_model
    from lamost_ostar.stage import OStarStage

    run, _ = tiny_run
    name = loso.ensemble_oof(run, ["cnn2", "lr2"])
    res = json.loads((run / "results.json").read_text())
    res["models"].update(loso.analyse(run, [name], loso.CLASSES_8)["models"])
    if res["models"][name]["operating_point"].get("min_posterior") is None:
        res["models"][name]["operating_point"].update(min_posterior=0.5, min_heii_sigma=2.0)
    (run / "results.json").write_text(json.dumps(res, default=loso._json_default))
    version, card = train.train_detector(tmp_path / "models", run / "results.json",
                                         recipe=DetectorRecipe(n_per_class=10), epochs=1, n_val_per_class=3,
                                         model_kind=name)
    bundle = load_model(version, tmp_path / "models")
    assert version.startswith("ostar8-ens-cnn2-lr2") and bundle.channels == 2
    members = card["metrics"]["history"]["members"]
    assert set(members) == {"cnn2", "lr2"}
    assert card["train_config"]["lr_max_iter"] == 50            # the LOSO run's own (tiny profile)
    assert members["lr2"]["temperature"] == pytest.approx(res["models"]["lr2"]["temperature"])
    (ok,) = OStarStage(version, tmp_path / "models", device="cpu").process([str(DATA / "io_image_dr7.fits")])
    assert ok.ok and ok.is_candidate in (True, False) and sum(ok.probs.values()) == pytest.approx(1.0)


def test_false_o_by_star_accounts_for_every_non_o_test_spectrum(tiny_run):
    """Per non-O star of the run, spectra and the counts the operating point / nested rule call O."""
    out, _ = tiny_run
    rows = loso.false_o_by_star(out, "lr2")
    d = loso.load_oof(out / "oof_lr2.npz")
    sets, labels = d["set"].astype(str), d["label"].astype(str)
    expected = int(np.sum(np.isin(sets, ["survey", "b", "x"]) & (labels != "O")))
    assert rows and sum(r["n"] for r in rows) == expected
    assert all(0 <= r["operating_point"] <= r["n"] and 0 <= r["nested"] <= r["n"] for r in rows)
    assert [r["nested"] for r in rows] == sorted((r["nested"] for r in rows), reverse=True)


def test_apply_rule_reproduces_the_runs_own_operating_point_and_the_script_writes_it(tiny_run, load_script):
    """A run's own operating point, applied with apply_rule, gives analyse's table; the script
    applies another run's rules (here the same run's results.json) and writes applied_rule.json."""
    import json

    out, _ = tiny_run
    res = json.loads((out / "results.json").read_text())
    mine = res["models"]["lr2"]
    t = loso.apply_rule(out, "lr2", mine["operating_point"])
    ref = mine["tables"]["operating_point"]
    for key in ("o_recall_star_averaged_snr_ge_10", "b_to_o", "x_to_o", "false_o_per_million",
                "real_lamost_candidates", "survey_false_o_count"):
        assert t[key] == pytest.approx(ref[key]), key
    # the stars behind the false O: the same verdicts as false_o_by_star's operating point
    by_star = {(r["star"], r["set"]): r["operating_point"] for r in loso.false_o_by_star(out, "lr2")}
    assert {(r["star"], r["set"]): r["called_o"] for r in t["false_o_by_star"]} == \
        {k: v for k, v in by_star.items() if v}
    survey = [r for r in t["false_o_by_star"] if r["set"] == "survey"]
    assert sum(r["called_o"] for r in survey) == t["survey_false_o_count"]
    mod = load_script("evaluate_loso")
    mod.main(["--out", str(out), "--apply-rule", str(out / "results.json")])
    applied = json.loads((out / "applied_rule.json").read_text())
    assert applied["lr2"]["tables"]["survey_false_o_count"] == ref["survey_false_o_count"]


def test_mix_within_class_keeps_groups_apart():
    """Blue-only spectra (group True) are mixed only with each other."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 30, 2)).astype(np.float32)
    labels = np.array(["O"] * 40)
    star = np.array([f"s{i}" for i in range(40)])
    group = np.arange(40) >= 20
    x[group, 20:] = 0.0                                           # blue-only: nothing beyond pixel 20
    out, n = loso.mix_within_class(x, labels, star, np.random.default_rng(3), fraction=0.5, group=group)
    assert n == 20 and np.all(out[group, 20:] == 0.0)
    assert np.any(out[~group, 20:] != x[~group, 20:])             # the full-range ones were mixed too


def test_loso_fold_leaves_out_the_standards_near_its_stars(tmp_path):
    import dataclasses

    cfg = loso.LosoConfig.from_profile("tiny")
    cfg.models = ("lr2",)
    cfg.recipe = dataclasses.replace(cfg.recipe, mkclass_fraction=0.5)
    loso.run_loso(cfg, tmp_path, log=lambda *a: None)
    fold = json.loads((tmp_path / "folds.json").read_text())["folds"][0]
    assert fold["o_unit"] == "HD030614"
    assert {"mkclass:O9Ia", "mkclass:O9Ib", "mkclass:B0Ia", "mkclass:B0Ib"} <= set(fold["mkclass_left_out"])
    assert "mkclass=" in fold["train"] and "blue_cut=" in fold["train"]
    assert json.loads((tmp_path / "results.json").read_text())["config"]["recipe"]["mkclass_fraction"] == 0.5


def test_class_veto_mask_from_stored_classes_and_from_the_files(tiny_run):
    """The real LAMOST galaxies of a run are what the scan's class veto removes; runs made before
    the class was stored get it from the files' headers; every table leaves them out."""
    out, _ = tiny_run
    d = loso.load_oof(out / "oof_lr2.npz")
    mask = loso.class_veto_mask(d)
    lam = d["set"] == "lamost"
    assert not mask[~lam].any()
    if not lam.any():
        pytest.skip("no real LAMOST files in the tiny run (shared data absent)")
    cls = d["pipeline_class"].astype(str)
    assert mask.tolist() == (lam & np.isin(cls, ["GALAXY", "QSO"])).tolist()
    old = {k: v for k, v in d.items() if k != "pipeline_class"}
    assert loso.class_veto_mask(old).tolist() == mask.tolist()
    res = json.loads((out / "results.json").read_text())
    assert res["class_veto"] is True and res["min_snr_g"] == 3.0
    for m in res["models"].values():
        assert set(m["class_vetoed"]) == set(d["star"][mask].astype(str))
        vetoed = set(m["class_vetoed"])
        for t in m["tables"].values():
            assert not vetoed & set(t["real_lamost_candidate_stars"])
    op = res["models"]["lr2"]["operating_point"]
    with_veto = loso.apply_rule(out, "lr2", op)
    without = loso.apply_rule(out, "lr2", op, class_veto=False)
    assert with_veto["real_lamost_candidates"] <= without["real_lamost_candidates"]


def test_class_veto_mask_only_touches_real_lamost_rows_and_the_snr_floor_every_row():
    d = {"set": np.array(["o", "survey", "lamost", "lamost", "lamost"]),
         "pipeline_class": np.array(["nan", "nan", "GALAXY", "STAR", "QSO"]),
         "snr_g": np.array([20.0, 1.5, 30.0, 2.0, np.nan])}
    assert loso.class_veto_mask(d).tolist() == [False, False, True, False, True]
    assert loso.stage_veto_mask(d).tolist() == [False, True, True, True, True]
    assert loso.stage_veto_mask(d, class_veto=False).tolist() == [False, True, False, True, False]
    assert loso.stage_veto_mask(d, class_veto=False, min_snr_g=0).tolist() == [False] * 5


def test_interstellar_twins_are_the_same_draws_and_change_nothing_else(tmp_path):
    base = loso.LosoConfig.from_profile("tiny", seed=3)
    base.models, base.save_models = ("lr2",), True
    twin = loso.LosoConfig.from_profile("tiny", seed=3)
    twin.models, twin.interstellar_tests = ("lr2",), True
    loso.run_loso(base, tmp_path / "plain", log=lambda *a: None)
    loso.run_loso(twin, tmp_path / "twin", log=lambda *a: None)
    a, b = loso.load_oof(tmp_path / "plain" / "oof_lr2.npz"), loso.load_oof(tmp_path / "twin" / "oof_lr2.npz")
    sa, sb = a["set"].astype(str), b["set"].astype(str)
    assert "o_ism" in set(sb) and "o_ism" not in set(sa)
    for k in set(sa):                         # every other test set, and so the model, is unchanged
        np.testing.assert_array_equal(a["logits"][sa == k], b["logits"][sb == k])
    o, oi = sb == "o", sb == "o_ism"
    np.testing.assert_array_equal(b["ebv"][o], b["ebv"][oi])
    np.testing.assert_array_equal(b["star"][o], b["star"][oi])
    assert not np.array_equal(b["logits"][o], b["logits"][oi])
    # the rule on the twins: the O rows are o_ism; a run without twins says so
    op = json.loads((tmp_path / "twin" / "results.json").read_text())["models"]["lr2"]["operating_point"]
    plain_t = loso.apply_rule(tmp_path / "twin", "lr2", op)
    twin_t = loso.apply_rule(tmp_path / "twin", "lr2", op, interstellar=True)
    assert "survey_ism" in set(sb)
    np.testing.assert_array_equal(b["ebv"][sb == "survey"], b["ebv"][sb == "survey_ism"])
    assert plain_t["survey_n"] == twin_t["survey_n"] > 0
    assert set(plain_t["o_recall_per_star"]) == set(twin_t["o_recall_per_star"])
    with pytest.raises(ValueError, match="no interstellar test sets"):
        loso.apply_rule(tmp_path / "plain", "lr2", op, interstellar=True)
    # a finished run without twins gets them afterwards, from its saved models and its own data drawn again
    assert loso.add_interstellar_twins(tmp_path / "plain", ["lr2"], log=lambda *a: None) > 0
    c = loso.load_oof(tmp_path / "plain" / "oof_lr2.npz")
    sc = c["set"].astype(str)
    for k in ("o_ism", "b_ism", "survey_ism"):
        np.testing.assert_allclose(c["logits"][sc == k], b["logits"][sb == k], atol=1e-4)
    assert loso.add_interstellar_twins(tmp_path / "plain", ["lr2"], log=lambda *a: None) == 0
    n = len(c["set"])
    assert loso.add_interstellar_twins(tmp_path / "plain", ["lr2"], log=lambda *a: None, replace=True) > 0
    r = loso.load_oof(tmp_path / "plain" / "oof_lr2.npz")
    assert len(r["set"]) == n
    np.testing.assert_allclose(r["logits"][r["set"] == "o_ism"], c["logits"][sc == "o_ism"], atol=1e-9)


def test_interstellar_twins_do_not_depend_on_the_training_recipe():
    """The interstellar draws are a function of the generator's state (mock.side_stream): a fold's
    twins are the same spectra whether or not its training set was drawn with interstellar features."""
    import dataclasses

    from lamost_ostar.templates import load_templates

    lib = loso._usable_for_training(load_templates(), loso.CLASSES_8)
    _, fold_of_star, _ = loso.assign_folds(lib, None, np.random.default_rng(3))
    got = []
    for ism in (False, True):
        cfg = loso.LosoConfig.from_profile("tiny", seed=3)
        cfg.interstellar_tests = True
        cfg.recipe = dataclasses.replace(cfg.recipe, interstellar=ism)
        *_, tests, _ = loso._fold_data(cfg, 0, lib, None, fold_of_star, {}, None)
        got.append(tests)
    for k in ("o", "o_ism", "survey", "survey_ism"):
        np.testing.assert_array_equal(got[0][k].x, got[1][k].x)


def _random_spectra(seed: int):
    """48 random two-channel spectra of the 8 classes, 3 stars per class: ``(data, x, xn)``."""
    import numpy as np

    from lamost_ostar.datasets import LabelledSpectra

    rng = np.random.default_rng(seed)
    n, npix = 48, 3909
    x = rng.normal(1.0, 0.1, size=(n, npix)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    xn = rng.normal(1.0, 0.05, size=(n, npix)).astype(np.float32)
    labels = np.array(list("OBAFGKMX") * 6)
    star = np.array([f"{c}{i % 3}" for i, c in enumerate(labels)])
    return LabelledSpectra(x, labels, star, np.full(n, "lib"), xn=xn), x, xn


def test_cnn1nx_sees_only_the_continuum_normalised_flux(tmp_path):
    """The line-only CNN's input is the normalised flux; its mixtures are not renormalised; its logits do
    not change when the standardised flux (the continuum shape) does."""
    import numpy as np

    from lamost_ostar.datasets import LabelledSpectra

    data, x, xn = _random_spectra(5)
    n, npix = x.shape
    labels, star = data.labels, data.star
    assert loso.model_input("cnn1nx", data).shape == (n, npix, 1)
    assert np.array_equal(loso.model_input("cnn1nx", data)[..., 0], xn)
    assert np.array_equal(loso.model_input("cnn1", data)[..., 0], x)
    assert loso.model_input("lr2", data).shape == (n, npix, 2)
    mixed, k = loso.mix_within_class(xn[..., None], labels, star, np.random.default_rng(1),
                                     unit_norm_first=False)
    changed = np.flatnonzero(np.any(mixed != xn[..., None], axis=(1, 2)))
    assert k > 0 and len(changed) == k
    assert np.all(mixed.mean(axis=(1, 2))[changed] > 0.9)    # still ~1: not scaled to unit norm
    cfg = loso.LosoConfig.from_profile("tiny")
    other = LabelledSpectra(x[::-1].copy(), labels, star, np.full(n, "lib"), xn=xn)
    logits, info = loso._fit_predict("cnn1nx", data, data, {"a": data, "b": other}, cfg,
                                     list(loso.CLASSES_8), seed=3, log=lambda *a: None)
    assert info["mixed"] > 0 and logits["a"].shape == (n, len(loso.CLASSES_8))
    assert np.allclose(logits["a"], logits["b"], atol=1e-5)


@pytest.mark.parametrize("kind", ["cnn2dxs", "cnn2dxse"])
def test_cnn2dxs_standardises_every_pixel_and_its_saved_model_scores_the_same(tmp_path, kind):
    """The CNN on per-pixel standardised input (and its weight-averaged twin) keeps its training scale
    beside the saved model, and the fold's saved model (``saved_fold_model``) gives the logits the run
    stored."""
    import numpy as np

    data, x, _ = _random_spectra(6)
    npix = x.shape[1]
    cfg = loso.LosoConfig.from_profile("tiny")
    (tmp_path / "models").mkdir()
    logits, info = loso._fit_predict(kind, data, data, {"a": data}, cfg, list(loso.CLASSES_8), seed=3,
                                     log=lambda *a: None, save_to=tmp_path / "models" / f"fold00_{kind}")
    z = np.load(tmp_path / "models" / f"fold00_{kind}.scale.npz")
    assert z["mean"].shape == z["std"].shape == (npix, 2) and np.all(z["std"] > 0)
    again = loso.saved_fold_model(tmp_path, kind, 0, len(loso.CLASSES_8))(data)
    assert np.allclose(again, logits["a"], atol=1e-4)


def test_deep_ensemble_kind_shares_its_first_member_and_saves_every_member(tmp_path):
    """``cnn2dxsd2`` trains two networks from different seeds and combines them as the shipped ensemble
    does; ``cnn2dxs`` in the same fold reuses member 0 instead of training it again (also when the run
    saves its models, as the full profile does); the saved members give back the run's logits."""
    data, _, _ = _random_spectra(8)
    cfg = loso.LosoConfig.from_profile("tiny")
    classes = list(loso.CLASSES_8)
    fitted: dict = {}
    (tmp_path / "models").mkdir()
    ens, info = loso._fit_predict("cnn2dxsd2", data, data, {"a": data}, cfg, classes, seed=3,
                                  log=lambda *a: None, save_to=tmp_path / "models" / "fold00_cnn2dxsd2",
                                  fitted=fitted)
    assert len(info["members"]) == 2 and len(fitted) == 2
    members = [fitted[k][0]["a"] for k in sorted(fitted, key=lambda k: k[-1])]
    assert not np.allclose(members[0], members[1])
    assert np.allclose(ens["a"], loso.ensemble_logits(members, [1.0, 1.0]))
    one, info1 = loso._fit_predict("cnn2dxs", data, data, {"a": data}, cfg, classes, seed=3,
                                   log=lambda *a: None, save_to=tmp_path / "models" / "fold00_cnn2dxs",
                                   fitted=fitted)
    assert info1["reused"] and np.array_equal(one["a"], members[0]) and len(fitted) == 2
    assert sorted(p.name for p in (tmp_path / "models").glob("*.keras")) == [
        "fold00_cnn2dxs.keras", "fold00_cnn2dxsd2_m0.keras", "fold00_cnn2dxsd2_m1.keras"]
    again = loso.saved_fold_model(tmp_path, "cnn2dxsd2", 0, len(classes))(data)
    assert np.allclose(again, ens["a"], atol=1e-4)
    assert np.allclose(loso.saved_fold_model(tmp_path, "cnn2dxs", 0, len(classes))(data), one["a"], atol=1e-4)


def test_mix_across_classes_soft_labels_and_groups():
    """O/B mixtures carry their mixing weight as the label, stay within their group, renormalise channel 0."""
    rng = np.random.default_rng(0)
    n, npix = 40, 30
    x = rng.uniform(0.5, 1.5, size=(n, npix, 2)).astype(np.float32)
    x[..., 0] /= np.linalg.norm(x[..., 0], axis=1, keepdims=True)
    labels = np.array(["O"] * 10 + ["B"] * 10 + ["A"] * 10 + ["O"] * 5 + ["B"] * 5)
    group = np.arange(n) >= 30                                   # the last ten: blue-only
    x[group, 20:] = 0.0
    before = x.copy()
    classes = list(loso.CLASSES_8)
    xm, y = loso.mix_across_classes(x, labels, classes, np.random.default_rng(3), fraction=0.5, group=group)
    assert np.array_equal(x, before)                            # originals untouched
    assert len(xm) == len(y) == 10 + 5                          # half of (20) and of (10)
    assert np.allclose(y.sum(axis=1), 1) and np.all(y[:, 2:] == 0)
    assert np.all((y[:, 0] > 0) & (y[:, 0] < 1)) and np.allclose(y[:, 1], 1 - y[:, 0])
    assert np.allclose(np.linalg.norm(xm[..., 0], axis=1), 1, atol=1e-5)
    assert np.sum(np.all(xm[:, 20:] == 0, axis=(1, 2))) == 5    # the blue-only mixtures are blue-only
    none, y0 = loso.mix_across_classes(x[20:30], labels[20:30], classes, rng)   # no O or B: nothing
    assert none.shape == (0, npix, 2) and y0.shape == (0, len(classes))


def test_cnn2dxsm_trains_on_soft_labelled_mixtures():
    data, _, _ = _random_spectra(7)
    cfg = loso.LosoConfig.from_profile("tiny")
    logits, info = loso._fit_predict("cnn2dxsm", data, data, {"a": data}, cfg, list(loso.CLASSES_8), seed=3,
                                     log=lambda *a: None)
    n_ob = int(np.isin(data.labels, ["O", "B"]).sum())
    assert info["cross_mixed"] == round(0.2 * n_ob) and logits["a"].shape == (len(data), len(loso.CLASSES_8))


def test_early_b_weights_weigh_the_b0_b1_spectra():
    """B0-B1 spectra weigh ``weight`` times the others, scaled to a mean of 1; weight 1 is no weights."""
    data, _, _ = _random_spectra(9)
    sub = np.array([f"{c}{i % 10}" if c in "OB" else c for i, c in enumerate(data.labels)])
    sub[1], sub[9] = "B0.5", "B1.5"                             # data.labels[1] and [9] are "B"
    data.meta["subclass"] = sub
    w = loso.early_b_weights(data, 3.0)
    early = (data.labels == "B") & np.isin(sub, ["B0", "B0.5", "B1", "B1.5"])
    assert early[[1, 9]].all() and 0 < early.sum() < (data.labels == "B").sum()
    assert np.isclose(w.mean(), 1.0) and np.allclose(w[early] / w[~early][0], 3.0)
    assert np.all(w[~early] == w[~early][0])
    assert loso.early_b_weights(data, 1.0) is None


def test_lr2b_fits_with_the_early_b_weights():
    """``lr2b`` is ``lr2`` fitted with the B0-B1 weights, and the weights change the fit."""
    data, _, _ = _random_spectra(10)
    data.meta["subclass"] = np.array([f"{c}{i % 4}" if c in "OB" else c for i, c in enumerate(data.labels)])
    cfg = loso.LosoConfig.from_profile("tiny")
    classes = list(loso.CLASSES_8)
    got = [loso._fit_predict(k, data, data, {"a": data}, cfg, classes, seed=3, log=lambda *a: None)[0]["a"]
           for k in ("lr2b", "lr2")]
    assert got[0].shape == (len(data), len(classes)) and not np.allclose(got[0], got[1])


def test_lr2e_fits_b0_b1_as_a_class_of_its_own_and_merges_it_into_b(tmp_path):
    """``lr2e``: the B0-B1 training spectra are a ninth class in the fit; the logits handed on are
    over the eight classes, p(B) the sum of the two B parts, and the saved fold model gives the same."""
    from scipy.special import softmax

    data, _, _ = _random_spectra(10)
    is_b = data.labels == "B"
    data.meta["subclass"] = np.where(is_b, np.where(np.cumsum(is_b) % 2 == 0, "B0", "B5"), data.labels)
    cfg = loso.LosoConfig.from_profile("tiny")
    classes = list(loso.CLASSES_8)
    y = loso.split_early_b_labels(data, classes)
    early = (data.labels == "B") & np.isin(data.meta["subclass"], ["B0", "B1"])
    assert np.all(y[early] == len(classes)) and np.array_equal(y[~early], data.y(classes)[~early])
    (tmp_path / "models").mkdir()
    logits, info = loso._fit_predict("lr2e", data, data, {"a": data}, cfg, classes, seed=3, log=lambda *a: None,
                                     save_to=tmp_path / "models" / "fold00_lr2e")
    z = logits["a"]
    assert z.shape == (len(data), len(classes)) and info["early_b"] == int(early.sum()) > 0
    saved = dict(np.load(tmp_path / "models" / "fold00_lr2e.npz"))
    fitted = list(saved["classes"])
    assert fitted[-1] == len(classes) and int(saved["merged_into"]) == classes.index("B")
    x = (loso.model_input("lr2e", data).reshape(len(data), -1) - saved["mean"]) / saved["scale"]
    p_fit = softmax(x @ saved["coef"].T + saved["intercept"], axis=1)   # the fitted classes, B0-B1 last
    p8 = softmax(z, axis=1)
    k = classes.index("B")
    assert np.allclose(p8[:, k], p_fit[:, fitted.index(k)] + p_fit[:, -1])
    assert all(np.allclose(p8[:, c], p_fit[:, fitted.index(c)]) for c in fitted[:-1] if c != k)
    assert np.allclose(loso.saved_fold_model(tmp_path, "lr2e", 0, len(classes))(data), z)
    plain = loso._fit_predict("lr2", data, data, {"a": data}, cfg, classes, seed=3, log=lambda *a: None)[0]["a"]
    assert not np.allclose(softmax(plain, axis=1), p8)


@pytest.fixture
def trainings(monkeypatch):
    """Every call of the (real) ``recogniser.train_recogniser``: ``(kwargs, trained model)`` in order."""
    from lamost_ostar.models import recogniser

    calls = []
    real = recogniser.train_recogniser

    def spy(*args, **kwargs):
        model, hist = real(*args, **kwargs)
        calls.append((kwargs, model))
        return model, hist

    monkeypatch.setattr(recogniser, "train_recogniser", spy)
    return calls


def test_cnn2dxsb_trains_with_the_early_b_weights(trainings):
    """``cnn2dxsb`` hands ``early_b_weights`` of its training set to the (real) training."""
    data, _, _ = _random_spectra(10)
    data.meta["subclass"] = np.array([f"{c}{i % 4}" if c in "OB" else c for i, c in enumerate(data.labels)])
    logits, info = loso._fit_predict("cnn2dxsb", data, data, {"a": data}, loso.LosoConfig.from_profile("tiny"),
                                     list(loso.CLASSES_8), seed=3, log=lambda *a: None)
    assert logits["a"].shape == (len(data), len(loso.CLASSES_8))
    assert len(trainings) == 1
    assert np.array_equal(trainings[0][0].get("sample_weight"), loso.early_b_weights(data, 3.0))
    early = (data.labels == "B") & np.isin(data.meta["subclass"], ["B0", "B1"])
    assert info["early_b"] == int(early.sum()) > 0


def test_cnn2dxsr_is_cnn2dxs_smaller_and_more_regularised(trainings):
    """``cnn2dxsr`` trains ``cnn2dxs``'s network at half the width, dropout 0.5, head L2 1e-3."""
    from lamost_ostar.models import recogniser

    data, _, _ = _random_spectra(6)
    kind = loso.CNN_KINDS["cnn2dxsr"]
    assert kind == loso.CnnKind(head="dense", mix=True, standardise=True, build=kind.build)
    logits, _ = loso._fit_predict("cnn2dxsr", data, data, {"a": data}, loso.LosoConfig.from_profile("tiny"),
                                  list(loso.CLASSES_8), seed=3, log=lambda *a: None)
    assert logits["a"].shape == (len(data), len(loso.CLASSES_8))
    ((_, model),) = trainings
    assert model.get_layer("stem_conv").filters == 8
    assert {layer.rate for layer in model.layers if layer.__class__.__name__ == "Dropout"} == {0.5}
    assert model.get_layer("head_dense").kernel_regularizer.l2 == pytest.approx(1e-3)
    default = recogniser.build_recogniser(8, head="dense")
    assert default.get_layer("stem_conv").filters == 16
    assert default.get_layer("head_dense").kernel_regularizer.l2 == pytest.approx(1e-4)


def test_train_recogniser_checks_sample_weight_length():
    from lamost_ostar.models import recogniser

    x = np.ones((4, 64, 2), np.float32)
    with pytest.raises(ValueError, match="one value per training spectrum"):
        recogniser.train_recogniser(x, np.zeros(4, int), x, np.zeros(4, int), epochs=1, n_classes=2,
                                    sample_weight=np.ones(3))


def test_cnn_kinds_table():
    """Every CNN kind is a row of one table; the others are the baselines and GAN variants; an unknown
    kind is refused."""
    assert set(loso.CNN_KINDS) <= set(loso.MODEL_KINDS)
    assert loso.CNN_KINDS["cnn2dx"] == loso.CnnKind(head="dense", mix=True)
    assert loso.CNN_KINDS["cnn2dxse"].ema and loso.CNN_KINDS["cnn2dxse"].standardise
    assert not any(k.ema for name, k in loso.CNN_KINDS.items() if name != "cnn2dxse")
    assert [name for name, k in loso.CNN_KINDS.items() if k.members > 1] == ["cnn2dxsd2"]
    data, _, _ = _random_spectra(1)
    with pytest.raises(ValueError, match="unknown model kind 'cnn9'"):
        loso._fit_predict("cnn9", data, data, {}, loso.LosoConfig.from_profile("tiny"), list(loso.CLASSES_8),
                          seed=0, log=lambda *a: None)


def test_evaluate_loso_script_options_set_the_recipe(load_script):
    """--n-per-class, --mkclass-fraction, --emission-fraction and --interstellar-training reach the run's
    recipe; unset, the profile's."""
    mod = load_script("evaluate_loso")
    cfg = mod.config_from_args(mod.build_parser().parse_args(
        ["--profile", "full", "--seed", "7", "--models", "cnn2dx,lr2", "--n-per-class", "1200",
         "--mkclass-fraction", "0.5", "--emission-fraction", "0.25", "--interstellar-training"]))
    assert (cfg.seed, cfg.models) == (7, ("cnn2dx", "lr2"))
    assert (cfg.recipe.n_per_class, cfg.recipe.mkclass_fraction, cfg.recipe.emission_fraction) == (1200, 0.5, 0.25)
    assert cfg.recipe.interstellar is True
    default = mod.config_from_args(mod.build_parser().parse_args(["--profile", "full"]))
    assert default.recipe == loso.LosoConfig.from_profile("full").recipe

