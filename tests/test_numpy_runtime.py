"""Tests for :mod:`lamost_ostar.models.numpy_runtime`: numpy inference of saved Keras models.

Every packaged model version is evaluated by both engines on the same input and
must agree; a small model built here exercises every option of every layer the
runtime claims, and layers it does not know must be refused when the graph is
built (never silently mis-evaluated).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lamost_ostar.models.numpy_runtime import (
    NumpyGraph, UnsupportedModelError, conv1d, max_pool1d,
)
from lamost_ostar.models.registry import PACKAGED_MODELS_DIR, list_versions, load_model

ROOT = Path(__file__).resolve().parents[1]


def _input(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Spectra-like input: a unit-norm first channel, a continuum-normalised second one."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    x[..., 0] = x[..., 0] / np.linalg.norm(x[..., 0], axis=1, keepdims=True)
    if shape[-1] == 2:
        x[..., 1] = 1.0 + 0.05 * x[..., 1]
    return x


PACKAGED = [c["version"] for c in list_versions(PACKAGED_MODELS_DIR)]


@pytest.mark.parametrize("version", PACKAGED)
def test_packaged_models_agree_with_keras(version):
    keras_bundle = load_model(version)
    numpy_bundle = load_model(version, engine="numpy")
    assert numpy_bundle.engine == "numpy" and keras_bundle.engine == "keras"
    assert numpy_bundle.channels == keras_bundle.channels
    assert numpy_bundle.npix == keras_bundle.npix
    x = _input(40, tuple(keras_bundle.model.input_shape[1:]))
    a = numpy_bundle.predict_logits(x, batch_size=16)
    b = keras_bundle.predict_logits(x, batch_size=16)
    assert a.shape == b.shape and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(numpy_bundle.predict_proba(x), keras_bundle.predict_proba(x),
                               rtol=1e-4, atol=1e-5)


def _every_layer_model():
    import keras

    from lamost_ostar.models.layers import ChannelAffine, ChannelAttention1D, ScaledLogSoftmax

    keras.utils.set_random_seed(3)
    inp = keras.Input((101, 2), name="flux")
    h = ChannelAffine((0.0, 1.0), (3.0, 5.0))(inp)
    a = keras.layers.Conv1D(6, 7, strides=3, padding="valid", activation="relu")(h)
    a = keras.layers.MaxPooling1D(3, strides=2, padding="valid")(a)
    a = keras.layers.BatchNormalization()(a)
    a = keras.layers.GlobalAveragePooling1D()(a)
    b = keras.layers.Conv1D(5, 4, strides=2, padding="same", use_bias=False)(h)
    b = keras.layers.BatchNormalization(center=False)(b)
    b = keras.layers.ReLU()(b)
    b = ChannelAttention1D(5, 3)(b)
    b = keras.layers.MaxPooling1D(2, padding="same")(b)
    b = keras.layers.Activation("tanh")(b)
    b = keras.layers.Flatten()(b)
    b = keras.layers.Dropout(0.5)(b)
    b = keras.layers.Dense(6, activation="sigmoid")(b)
    h = keras.layers.Add()([a, b])
    h = keras.layers.Rescaling(2.0, offset=-0.5)(h)
    z1 = keras.layers.Dense(4)(h)
    z2 = keras.layers.Dense(4, use_bias=False)(h)
    out = keras.layers.Average()([ScaledLogSoftmax(1.3)(z1), ScaledLogSoftmax(0.7)(z2)])
    model = keras.Model(inp, out)
    # non-trivial BatchNormalization statistics
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([w + np.random.default_rng(1).uniform(0.2, 1.0, w.shape).astype(np.float32)
                               for w in layer.get_weights()])
    return model


def test_every_supported_layer_matches_keras(tmp_path):
    model = _every_layer_model()
    path = tmp_path / "m.keras"
    model.save(path)
    graph = NumpyGraph.from_keras_file(path)
    assert graph.input_shape == (None, 101, 2)
    x = _input(9, (101, 2), seed=5)
    np.testing.assert_allclose(graph(x, batch_size=4), model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
    assert graph(x[:0]).shape == (0, 4)
    with pytest.raises(ValueError, match="expected input"):
        graph(x[:, :50])


def test_nested_model_and_shared_names(tmp_path):
    """A functional model inside another (the ensemble's layout), two layers of each class."""
    import keras

    keras.utils.set_random_seed(0)
    inner_in = keras.Input((64, 1))
    h = keras.layers.Conv1D(3, 5, padding="same")(inner_in)
    h = keras.layers.Conv1D(2, 3, strides=2, padding="same")(h)
    inner = keras.Model(inner_in, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
    inp = keras.Input((64, 1))
    out = keras.layers.Dense(2)(inner(inp))
    model = keras.Model(inp, out)
    model.save(tmp_path / "n.keras")
    x = _input(5, (64, 1), seed=2)
    np.testing.assert_allclose(NumpyGraph.from_keras_file(tmp_path / "n.keras")(x),
                               model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda k, i: k.layers.Conv1D(2, 3, dilation_rate=2)(i),
    lambda k, i: k.layers.LSTM(2)(i),
    lambda k, i: k.layers.ReLU(max_value=6.0)(i),
    lambda k, i: k.layers.Dense(2, activation="softmax")(k.layers.Flatten()(i)),
])
def test_unknown_layers_are_refused_when_built(tmp_path, make):
    import keras

    inp = keras.Input((16, 1))
    model = keras.Model(inp, make(keras, inp))
    model.save(tmp_path / "u.keras")
    with pytest.raises(UnsupportedModelError):
        NumpyGraph.from_keras_file(tmp_path / "u.keras")


def test_not_a_model_file(tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UnsupportedModelError, match="not a readable Keras 3 model file"):
        NumpyGraph.from_keras_file(bad)


@pytest.mark.parametrize("length,k,stride,padding", [
    (50, 7, 2, "same"), (51, 7, 2, "same"), (49, 5, 1, "same"), (40, 1, 2, "same"),
    (33, 4, 3, "valid"), (30, 3, 1, "valid"),
])
@pytest.mark.parametrize("c_in", [2, 9])
def test_conv1d_against_direct_sum(length, k, stride, padding, c_in):
    rng = np.random.default_rng(length + k)
    x = rng.normal(size=(3, length, c_in)).astype(np.float32)
    kern = rng.normal(size=(k, c_in, 4)).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    y = conv1d(x, kern, bias, stride, padding)
    if padding == "same":
        out = -(-length // stride)
        total = max((out - 1) * stride + k - length, 0)
        xp = np.pad(x, ((0, 0), (total // 2, total - total // 2), (0, 0)))
    else:
        out = (length - k) // stride + 1
        xp = x
    ref = np.stack([np.einsum("nkc,kco->no", xp[:, i * stride:i * stride + k], kern) for i in range(out)], 1)
    np.testing.assert_allclose(y, ref + bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length,pool,stride,padding", [
    (11, 2, 2, "same"), (10, 2, 2, "same"), (10, 2, 2, "valid"), (11, 3, 2, "same"), (12, 3, 2, "valid")])
def test_max_pool1d(length, pool, stride, padding):
    x = np.random.default_rng(0).normal(size=(2, length, 3)).astype(np.float32)
    out = -(-length // stride) if padding == "same" else (length - pool) // stride + 1
    xp = np.pad(x, ((0, 0), (0, pool), (0, 0)), constant_values=-np.inf)
    if padding == "same":
        total = max((out - 1) * stride + pool - length, 0)
        xp = np.pad(x, ((0, 0), (total // 2, total - total // 2 + pool), (0, 0)), constant_values=-np.inf)
    ref = np.stack([xp[:, i * stride:i * stride + pool].max(1) for i in range(out)], 1)
    np.testing.assert_array_equal(max_pool1d(x, pool, stride, padding), ref)


def test_numpy_engine_never_imports_keras():
    """A stage on the numpy engine, in a fresh interpreter: no Keras, no TensorFlow."""
    code = ("import sys; from lamost_ostar.stage import OStarStage; s = OStarStage(engine='numpy'); "
            "import glob; r = s.process(sorted(glob.glob('tests/data/io_*.fits*'))); "
            "print(s.engine, sum(x.ok for x in r), 'keras' in sys.modules, 'tensorflow' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    engine, n_ok, keras_in, tf_in = out.stdout.split()
    assert (engine, keras_in, tf_in) == ("numpy", "False", "False")
    assert int(n_ok) >= 4


def test_two_output_model_is_refused_when_built(tmp_path):
    import keras

    inp = keras.Input((16, 1))
    h = keras.layers.Flatten()(inp)
    keras.Model(inp, [keras.layers.Dense(2)(h), keras.layers.Dense(3)(h)]).save(tmp_path / "two.keras")
    with pytest.raises(UnsupportedModelError, match="outputs"):
        NumpyGraph.from_keras_file(tmp_path / "two.keras")


@pytest.mark.parametrize("axis", [(1, 2), -1])
def test_fixed_normalization_matches_keras(tmp_path, axis):
    """The wide path of ``cnn2dw``: a fixed per-pixel (or per-channel) Normalization."""
    import keras

    rng = np.random.default_rng(3)
    shape = (37, 2) if axis == (1, 2) else (2,)
    mean = rng.normal(size=shape).astype(np.float32)
    var = rng.uniform(0.1, 3.0, shape).astype(np.float32)
    var.flat[0] = 0.0                                     # a constant pixel: Keras divides by epsilon
    inp = keras.Input((37, 2))
    h = keras.layers.Normalization(axis=axis, mean=mean, variance=var)(inp)
    out = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    model = keras.Model(inp, out)
    model.save(tmp_path / "n.keras")
    x = _input(6, (37, 2), seed=4)
    x[:, 0, 0] = mean.flat[0]
    graph = NumpyGraph.from_keras_file(tmp_path / "n.keras")
    np.testing.assert_allclose(graph(x), model.predict(x, verbose=0), rtol=1e-4, atol=1e-4)
