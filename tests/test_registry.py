"""Tests for :mod:`lamost_ostar.models.registry`."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from lamost_ostar.models import registry as REG  # noqa: E402
from lamost_ostar.models.calibration import softmax_t  # noqa: E402
from lamost_ostar.models.recogniser import CLASSES_7, build_recogniser  # noqa: E402

NPIX = 128


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return build_recogniser(7, npix=NPIX, width=4, depth=1)


@pytest.fixture()
def x():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, NPIX)).astype("float32")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_save_load_same_predictions_and_card(model, x, tmp_path):
    version = REG.save_model_version(
        model, tmp_path, {"classes": CLASSES_7, "temperature": 1.7,
                          "training_data": "unit test", "metrics": {"acc": 0.5}})
    assert version.startswith("ostar7-") and len(version.split("-")[-1]) == 8
    card = json.loads((tmp_path / version / "card.json").read_text())
    for key in ("version", "created", "classes", "temperature", "npix", "keras_backend",
                "keras_version", "backend_version", "code_version", "training_data",
                "metrics", "sha256"):
        assert key in card, key
    assert card["sha256"] == REG.sha256_file(tmp_path / version / "model.keras")
    assert card["npix"] == NPIX and card["classes"] == list(CLASSES_7)
    assert (tmp_path / version / "card.md").is_file()

    bundle = REG.load_model(version, tmp_path, packaged_dir=tmp_path / "none")
    assert bundle.version == version and bundle.classes == CLASSES_7
    assert bundle.temperature == 1.7 and bundle.class_index("O") == 0
    logits = keras.ops.convert_to_numpy(model(x[..., None], training=False))
    np.testing.assert_allclose(bundle.predict_logits(x), logits, rtol=1e-5, atol=1e-6)
    proba = bundle.predict_proba(x, batch_size=4)
    assert proba.shape == (6, 7)
    np.testing.assert_allclose(proba, softmax_t(logits, 1.7), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(proba.sum(1), 1, rtol=1e-5)


def test_never_overwrites_and_newest_wins(model, tmp_path):
    v1 = REG.save_model_version(model, tmp_path, {"classes": CLASSES_7})
    v2 = REG.save_model_version(model, tmp_path, {"classes": CLASSES_7})
    assert v1 != v2                                # same model, same second: suffixed
    # two saves in one second are listed in the order they were made (created has microseconds)
    assert [c["version"] for c in REG.list_versions(tmp_path)] == [v1, v2]
    time.sleep(1.1)
    v3 = REG.save_model_version(model, tmp_path, {"classes": CLASSES_7, "prefix": "ostar7x"})
    versions = [c["version"] for c in REG.list_versions(tmp_path)]
    assert set(versions) == {v1, v2, v3} and versions[-1] == v3
    assert REG.load_model(None, tmp_path, packaged_dir=tmp_path / "none").version == v3


def test_falls_back_to_packaged_then_clear_error(model, tmp_path):
    packaged, user = tmp_path / "packaged", tmp_path / "user"
    vp = REG.save_model_version(model, packaged, {"classes": CLASSES_7})
    assert REG.load_model(None, user, packaged_dir=packaged).version == vp
    assert REG.load_model(None, None, packaged_dir=packaged).version == vp
    assert REG.load_model(vp, user, packaged_dir=packaged).version == vp
    with pytest.raises(REG.ModelNotFoundError, match="no model version found"):
        REG.load_model(None, user, packaged_dir=tmp_path / "empty")
    with pytest.raises(REG.ModelNotFoundError, match="not found"):
        REG.load_model("ostar7-nope", user, packaged_dir=packaged)


def test_integrity_and_bad_cards(model, tmp_path):
    v = REG.save_model_version(model, tmp_path, {"classes": CLASSES_7})
    with open(tmp_path / v / "model.keras", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(REG.ModelIntegrityError):
        REG.load_model(v, tmp_path, packaged_dir=tmp_path / "none")
    with pytest.raises(ValueError, match="classes"):
        REG.save_model_version(model, tmp_path, {"classes": ("O", "F")})
    with pytest.raises(ValueError, match="computed"):
        REG.save_model_version(model, tmp_path, {"classes": CLASSES_7, "sha256": "x"})
    (tmp_path / "half-written").mkdir()            # no card.json: ignored
    assert [c["version"] for c in REG.list_versions(tmp_path)] == [v]
    assert REG.list_versions(tmp_path / "missing") == []


def test_default_models_dir():
    assert REG.default_models_dir({"LAMOST_OSTAR_MODELS": "/x/y"}).as_posix() == "/x/y"
    assert REG.default_models_dir({}).parts[-2:] == (".lamost_ostar", "models")


def test_engine_argument(tmp_path):
    with pytest.raises(ValueError, match="engine must be one of"):
        REG.load_model(engine="onnx")
