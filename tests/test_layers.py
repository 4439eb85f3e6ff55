"""Tests for :mod:`lamost_ostar.models.layers`."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from lamost_ostar.models.layers import (  # noqa: E402
    ChannelAttention1D,
    LocallyConnected1D,
    SpectrumScaler,
    lc_output_length,
)


def naive_lc1d(x, kernel, bias, kernel_size, strides, padding):
    """Loop reference: out[b, o, f] = sum_{k, c} xpad[b, o*s + k, c] W[o, k*C + c, f] + b[o, f]."""
    n, length, channels = x.shape
    if padding == "same":
        out_len = -(-length // strides)
        total = max((out_len - 1) * strides + kernel_size - length, 0)
        x = np.pad(x, ((0, 0), (total // 2, total - total // 2), (0, 0)))
    else:
        out_len = (length - kernel_size) // strides + 1
    out = np.zeros((n, out_len, kernel.shape[-1]))
    for o in range(out_len):
        for k in range(kernel_size):
            for c in range(channels):
                out[:, o, :] += x[:, o * strides + k, c][:, None] * kernel[o, k * channels + c, :]
        out[:, o, :] += bias[o]
    return out


@pytest.mark.parametrize(
    "length,channels,filters,kernel_size,strides,padding",
    [
        (17, 1, 3, 3, 1, "valid"),
        (17, 2, 4, 3, 2, "valid"),
        (16, 3, 2, 4, 3, "valid"),
        (17, 2, 3, 3, 1, "same"),
        (16, 2, 3, 4, 2, "same"),
        (15, 1, 2, 5, 3, "same"),
        (9, 2, 2, 1, 1, "valid"),
    ],
)
def test_matches_naive_reference(length, channels, filters, kernel_size, strides, padding):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, length, channels)).astype("float32")
    layer = LocallyConnected1D(filters, kernel_size, strides=strides, padding=padding,
                               bias_initializer="random_normal")
    y = keras.ops.convert_to_numpy(layer(x))
    expected_len = lc_output_length(length, kernel_size, strides, padding)
    assert y.shape == (3, expected_len, filters)
    assert layer.kernel.shape == (expected_len, kernel_size * channels, filters)
    ref = naive_lc1d(x, keras.ops.convert_to_numpy(layer.kernel),
                     keras.ops.convert_to_numpy(layer.bias), kernel_size, strides, padding)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_eq6_output_length():
    # o = (n + 2p - f)/s + 1
    assert lc_output_length(100, 5, 1, "valid") == 96
    assert lc_output_length(100, 5, 2, "valid") == 48
    assert lc_output_length(100, 5, 2, "same") == 50
    with pytest.raises(ValueError):
        lc_output_length(10, 3, 1, "causal")


def test_weights_not_shared_and_init_scale():
    layer = LocallyConnected1D(8, 3, padding="same")
    layer.build((None, 500, 4))
    w = keras.ops.convert_to_numpy(layer.kernel)
    assert not np.allclose(w[0], w[1])
    # Glorot limit for one position: sqrt(6 / (fan_in + fan_out)) = sqrt(6 / (12 + 8))
    limit = np.sqrt(6 / 20)
    assert 0.5 * limit < np.abs(w).max() <= limit + 1e-6


def test_serialisation_roundtrip(tmp_path):
    inp = keras.Input((32, 2))
    out = LocallyConnected1D(3, 5, strides=2, padding="same", activation="relu")(inp)
    out = ChannelAttention1D(4)(out)
    model = keras.Model(inp, out)
    x = np.random.default_rng(1).normal(size=(2, 32, 2)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)
    cfg = model.layers[1].get_config()
    assert cfg["strides"] == 2 and cfg["padding"] == "same" and cfg["filters"] == 3


def test_channel_attention_shapes_and_gating():
    layer = ChannelAttention1D(6, kernel_size=3)
    x = np.random.default_rng(2).normal(size=(2, 40, 3)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    assert y.shape == (2, 40, 6)
    conv = keras.ops.convert_to_numpy(layer.conv(x))
    gate = y / np.where(conv == 0, 1, conv)
    # one weight per (sample, channel), constant along the length, in (0, 1)
    assert np.allclose(gate, gate[:, :1, :], atol=1e-4)
    assert (gate > 0).all() and (gate < 1).all()


def test_gradients_flow():
    inp = keras.Input((20, 1))
    out = LocallyConnected1D(2, 3, padding="same")(inp)
    model = keras.Model(inp, keras.layers.Flatten()(out))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = np.random.default_rng(3).normal(size=(16, 20, 1)).astype("float32")
    y = np.zeros((16, 40), "float32")
    first = model.train_on_batch(x, y)
    for _ in range(10):
        last = model.train_on_batch(x, y)
    assert last < first


def test_spectrum_scaler_roundtrip_and_saving(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 10, 1)).astype("float32")
    mean, scale = rng.normal(size=(10, 1)), 0.5
    inp = keras.Input((10, 1))
    fwd, inv = SpectrumScaler(), SpectrumScaler(inverse=True)
    model = keras.Model(inp, inv(fwd(inp)))
    np.testing.assert_allclose(model.predict(x, verbose=0), x, atol=1e-6)   # identity at first
    fwd.set_statistics(mean, scale)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fwd(x)), (x - mean) / scale, rtol=1e-5,
                               atol=1e-6)
    inv.set_statistics(mean, scale)
    np.testing.assert_allclose(model.predict(x, verbose=0), x, rtol=1e-5, atol=1e-5)
    model.save(tmp_path / "s.keras")
    loaded = keras.saving.load_model(tmp_path / "s.keras")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded.layers[1].offset), mean[:, :],
                               rtol=1e-6)
    assert not fwd.trainable_weights
    with pytest.raises(ValueError):
        fwd.set_statistics(mean, 0.0)
