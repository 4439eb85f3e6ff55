"""Tests for lamost_ostar.train: the train/calibrate/register pipeline and retrain."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lamost_ostar import datasets as ds
from lamost_ostar import train
from lamost_ostar.preprocess import NPIX


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from lamost_ostar import mock

    out = tmp_path_factory.mktemp("release")
    # 4 stars per class: enough for a train/validation/test split by star
    mock.write_release(out, mock.MockConfig(n=28, preset="balanced", seed=11))
    return out


def _tiny_existing_version(root):
    import keras

    from lamost_ostar.models import registry

    inp = keras.Input((NPIX, 1))
    out = keras.layers.Dense(7)(keras.layers.GlobalAveragePooling1D()(inp))
    return registry.save_model_version(keras.Model(inp, out), root, {"classes": list(ds.CLASSES_7)})


def test_retrain_registers_new_version_without_overwriting(release, tmp_path):
    from lamost_ostar.models import registry

    models = tmp_path / "models"
    old = _tiny_existing_version(models)
    old_card = (models / old / "card.json").read_text()
    old_sha = registry.sha256_file(models / old / "model.keras")

    res = train.retrain(release / "truth.csv", release, models, gan_iterations=1, epochs=1,
                        batch_size=8, seed=0, n_library_per_class=6, lr_max_iter=50)
    assert res["version"] != old
    versions = [c["version"] for c in registry.list_versions(models)]
    assert versions == [old, res["version"]]
    # the old version is untouched
    assert (models / old / "card.json").read_text() == old_card
    assert registry.sha256_file(models / old / "model.keras") == old_sha
    card = json.loads((models / res["version"] / "card.json").read_text())
    # the same kind of model as the default: two channels, X impostors, He II evidence, operating point
    assert card["classes"] == list(ds.CLASSES_8)
    assert card["input_shape"] == [NPIX, 2]
    assert card["decision"]["classes"] == list(ds.CLASSES_8) and card["decision"]["min_posterior"] >= 0
    assert "candidates" in card["metrics"]["test"]
    assert card["temperature"] > 0
    assert "LCGAN" in card["training_data"]["augmentation"]
    assert card["train_config"]["model_kind"] == train.default_model_kind()      # the default's kind
    # and the default's blue-only MKCLASS share (the packaged default was trained with one)
    assert train.default_mkclass_fraction() > 0
    assert card["train_config"]["mkclass_fraction"] == train.default_mkclass_fraction()
    assert "blue-only MKCLASS" in card["training_data"]["description"]
    # and its Be/Oe emission share (0 for a default trained without it)
    assert card["train_config"]["emission_fraction"] == train.default_emission_fraction()
    splits = {s["split"]: s for s in card["training_data"]["splits"]}
    assert set(splits) == {"train", "validation", "test"}
    assert card["metrics"]["test"]["n"] == splits["test"]["n_spectra"] > 0
    # the new version loads and predicts calibrated probabilities
    bundle = registry.load_model(res["version"], models)
    assert bundle.channels == 2
    p = bundle.predict_proba(np.random.default_rng(0).random((2, NPIX, 2)).astype(np.float32))
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)


def test_retrain_an_ensemble(release, tmp_path):
    """--model-kind ens-A-B: both members trained, each calibrated on the validation split."""
    from lamost_ostar.models import registry

    res = train.retrain(release / "truth.csv", release, tmp_path, gan_iterations=0, epochs=1, batch_size=8,
                        seed=0, n_library_per_class=6, model_kind="ens-cnn2-lr2", lr_max_iter=50)
    card = json.loads((tmp_path / res["version"] / "card.json").read_text())
    assert card["train_config"]["model_kind"] == "ens-cnn2-lr2"
    members = card["metrics"]["history"]["members"]
    assert set(members) == {"cnn2", "lr2"} and all(m["temperature"] > 0 for m in members.values())
    bundle = registry.load_model(res["version"], tmp_path)
    p = bundle.predict_proba(np.random.default_rng(0).random((2, NPIX, 2)).astype(np.float32))
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)


def test_retrain_rejects_unusable_labels(release, tmp_path):
    lab = tmp_path / "labels.csv"
    lab.write_text("path,mk\nnope.fits.gz,O\n")
    with pytest.raises(ValueError, match="no usable labelled spectra"):
        train.retrain(lab, release, tmp_path / "m", gan_iterations=0, epochs=1)


def test_train_model_refuses_shared_star():
    x = np.random.default_rng(0).random((4, 16)).astype(np.float32)
    a = ds.LabelledSpectra(x[:2], ["O", "B"], ["s1", "s2"], ["t", "t"])
    b = ds.LabelledSpectra(x[2:], ["O", "B"], ["s1", "s3"], ["t", "t"])
    with pytest.raises(AssertionError, match="s1"):
        train.train_model(a, b, b, train.TrainConfig(epochs=1))


def test_softmax_temperature():
    z = np.array([[2.0, 0.0], [0.0, 0.0]])
    p1 = train.softmax(z)
    p2 = train.softmax(z, 2.0)
    np.testing.assert_allclose(p1.sum(1), 1)
    assert p2[0, 0] < p1[0, 0]


def test_real_lamost_check_keeps_the_scans_conditions(tmp_path):
    """The packaged-model check on real LAMOST files applies the scan's class veto, as the LOSO choice did.

    A model that calls everything O: the galaxy file (pipeline CLASS GALAXY) is kept out by the
    class veto and does not raise the threshold; the star file does, until it is no candidate.
    """
    import shutil

    from lamost_ostar.models import recogniser
    from lamost_ostar.models.decision import Decision

    data = Path(__file__).parent / "data"
    lam = tmp_path / "lamost"
    lam.mkdir()
    for f in ("io_image_dr7.fits", "io_galaxy_dr7.fits.gz"):
        shutil.copy(data / f, lam / f)
    (lam / "manifest.csv").write_text(
        "file,cls,subclass,mk,snrg,desig\n"
        "io_image_dr7.fits,STAR,G3,G,153.72,LAMOST J013730.44+252537.7\n"
        "io_galaxy_dr7.fits.gz,GALAXY,Non,,9.69,LAMOST J103025.27+360334.7\n")
    classes = list(ds.CLASSES_8)
    icpt = np.where(np.array(classes) == "O", 20.0, 0.0)
    model = recogniser.linear_model_from_sklearn(np.zeros((len(classes), NPIX * 2)), icpt,
                                                 np.zeros(NPIX * 2), np.ones(NPIX * 2), channels=2)
    decision = Decision.balanced(classes, min_score=-5.0, heii_weight=0.0)
    new, record = train._no_real_lamost_candidates(model, decision, 1.0, classes, 2, tmp_path)
    assert record["checked"] and record["n_files"] == 2 and record["scan_conditions"]
    assert record["rule_alone_candidates_at_loso_threshold"] == 2
    assert record["candidates_at_loso_threshold"] == 1
    assert [Path(p).name for p in record["candidate_files"]] == ["io_image_dr7.fits"]
    assert [Path(p).name for p in record["kept_out_by_scan_conditions"]] == ["io_galaxy_dr7.fits.gz"]
    assert new.min_score > decision.min_score and record["candidates_after"] == 0
    assert "scan's conditions in force" in new.chosen_on
