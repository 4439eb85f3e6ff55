"""Tests for :mod:`lamost_ostar.models.recogniser` (tiny spectra)."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from lamost_ostar.models import recogniser as R  # noqa: E402
from lamost_ostar.models.layers import ChannelAttention1D  # noqa: E402

NPIX = 256


def synthetic(n, n_classes=3, npix=NPIX, seed=0):
    """Class k: one absorption line at its own wavelength, on a random slope, noisy."""
    rng = np.random.default_rng(seed)
    w = np.linspace(0, 1, npix)
    y = rng.integers(0, n_classes, n)
    centres = np.linspace(0.2, 0.8, n_classes)[y]
    slope = rng.uniform(-0.5, 0.5, (n, 1))
    x = 1 + slope * w - 0.6 * np.exp(-0.5 * ((w - centres[:, None]) / 0.02) ** 2)
    x += 0.05 * rng.standard_normal((n, npix))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype("float32"), y


def test_classes_contract():
    assert R.CLASSES_7 == ("O", "B", "A", "F", "G", "K", "M")
    assert R.CLASSES_4 == ("O", "F", "G", "K")
    assert R.classes_for(7) == R.CLASSES_7 and R.classes_for(4) == R.CLASSES_4


@pytest.mark.parametrize("n_classes", [7, 4])
def test_build_shapes(n_classes):
    model = R.build_recogniser(n_classes, npix=NPIX, width=8, depth=2)
    assert model.input_shape == (None, NPIX, 1)
    assert model.output_shape == (None, n_classes)
    assert sum(isinstance(layer, ChannelAttention1D) for layer in model.layers) == 2
    assert any(isinstance(layer, keras.layers.Add) for layer in model.layers)
    logits = R.predict_logits(model, synthetic(5)[0])
    assert logits.shape == (5, n_classes) and logits.dtype == np.float32


def test_full_size_model_is_small():
    assert R.build_recogniser(7).count_params() < 200_000


def test_training_reduces_loss_and_early_stops():
    keras.utils.set_random_seed(0)
    x, y = synthetic(240)
    xv, yv = synthetic(60, seed=1)
    model, hist = R.train_recogniser(x, y, xv, yv, epochs=8, batch_size=32,
                                     learning_rate=3e-3, build_kwargs={"width": 8, "depth": 2})
    assert hist["loss"][-1] < hist["loss"][0]
    assert hist["val_accuracy"][hist["best_epoch"][0]] > 0.6
    assert model.output_shape == (None, 3)
    assert model.run_eagerly is False            # 8 epochs x 8 batches: the steps are compiled
    # patience: stops once val_loss has not improved for `patience` epochs
    model.trainable = False                      # frozen -> constant val_loss
    model2, hist2 = R.train_recogniser(x, y, xv, yv, epochs=50, batch_size=32, patience=1,
                                       learning_rate=0.0, model=model)
    assert len(hist2["loss"]) == 2


def _trainable(model):
    return [np.asarray(v) for v in model.trainable_weights]


def test_ema_of_momentum_zero_is_plain_training_and_averaged_weights_differ():
    """With momentum 0 the average is the weights themselves: the swapping around validation and
    early stopping must give plain training's weights back exactly; with momentum 0.9 they differ."""
    x, y = synthetic(96)
    xv, yv = synthetic(32, seed=1)
    kw = dict(epochs=2, batch_size=32, learning_rate=3e-3, build_kwargs={"width": 8, "depth": 2})
    runs = {}
    for ema in (None, 0.0, 0.9):
        keras.utils.set_random_seed(0)
        model, hist = R.train_recogniser(x, y, xv, yv, ema_momentum=ema, **kw)
        runs[ema] = (model, hist)
    plain, zero, avg = (_trainable(runs[e][0]) for e in (None, 0.0, 0.9))
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(plain, zero))
    assert np.allclose(runs[None][1]["val_loss"], runs[0.0][1]["val_loss"], rtol=1e-5)
    assert not all(np.allclose(a, b, atol=1e-6) for a, b in zip(plain, avg))
    assert np.isfinite(runs[0.9][1]["val_loss"]).all()


def test_reestimate_batchnorm_moves_only_the_moving_statistics():
    keras.utils.set_random_seed(0)
    model = R.build_recogniser(3, npix=NPIX, width=8, depth=2)
    x, _ = synthetic(100)
    before = _trainable(model)
    bn = model.get_layer("stem_bn")
    mean0 = np.asarray(bn.moving_mean).copy()
    assert R.reestimate_batchnorm(model, x, batch_size=32) == 3          # whole batches only
    assert all(np.array_equal(a, b) for a, b in zip(before, _trainable(model)))
    assert not np.allclose(np.asarray(bn.moving_mean), mean0)
    assert R.reestimate_batchnorm(model, x[:10], batch_size=32) == 1     # one short batch
    plain = keras.Sequential([keras.Input((NPIX, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    assert R.reestimate_batchnorm(plain, x) == 0


def test_soft_labels_train_with_categorical_cross_entropy():
    """Rows of class probabilities train the same network; validation keeps integer labels."""
    keras.utils.set_random_seed(0)
    x, y = synthetic(120)
    xv, yv = synthetic(30, seed=1)
    soft = np.eye(3, dtype=np.float32)[y] * 0.9 + 0.1 / 3
    model, hist = R.train_recogniser(x, soft, xv, yv, epochs=2, batch_size=32, learning_rate=3e-3,
                                     build_kwargs={"width": 8, "depth": 2})
    assert model.output_shape == (None, 3) and np.isfinite(hist["val_loss"]).all()
    assert 0.0 <= hist["val_accuracy"][-1] <= 1.0
    assert model.run_eagerly is True             # 2 epochs x 4 batches: too few steps to compile
    with pytest.raises(ValueError, match="soft labels have 3 columns"):
        R.train_recogniser(x, soft, xv, yv, epochs=1, n_classes=4, build_kwargs={"width": 8, "depth": 2})


def test_bad_shapes():
    model = R.build_recogniser(4, npix=NPIX, width=8, depth=1)
    with pytest.raises(ValueError):
        R.predict_logits(model, np.zeros((2, NPIX + 1), "float32"))
    with pytest.raises(ValueError):
        R.as_model_input(np.zeros((2, NPIX, 3), "float32"))
    with pytest.raises(ValueError):          # a two-channel input for a one-channel model
        R.predict_logits(model, np.zeros((2, NPIX, 2), "float32"))
    assert R.predict_logits(model, np.zeros((0, NPIX), "float32")).shape == (0, 4)


def test_two_channel_model_round_trip(tmp_path):
    """The reddening-proof model takes (N, NPIX, 2); its input scaling survives save/load."""
    import keras

    model = R.build_recogniser(7, npix=NPIX, width=8, depth=1, channels=2)
    assert model.input_shape == (None, NPIX, 2)
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0, 1 / np.sqrt(NPIX), (3, NPIX)), 1 + 0.1 * rng.normal(size=(3, NPIX))],
                 axis=-1).astype("float32")
    a = R.predict_logits(model, x)
    model.save(tmp_path / "m.keras")
    b = R.predict_logits(keras.saving.load_model(tmp_path / "m.keras", compile=False), x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):          # a one-channel input for a two-channel model
        R.predict_logits(model, x[..., 0])
    with pytest.raises(ValueError):
        R.build_recogniser(7, npix=NPIX, channels=3)


def test_npix_matches_preprocess():
    preprocess = pytest.importorskip("lamost_ostar.preprocess")
    from lamost_ostar.models import gan

    assert R.NPIX == gan.NPIX == preprocess.NPIX
    assert R.build_recogniser(7).input_shape == (None, preprocess.NPIX, 1)


def test_ensemble_model_averages_calibrated_log_probabilities(tmp_path):
    import keras

    from lamost_ostar.models.recogniser import ensemble_model, linear_model_from_sklearn

    rng = np.random.default_rng(0)
    npix, c = 64, 3
    a = linear_model_from_sklearn(rng.normal(size=(c, npix * 2)), rng.normal(size=c), np.zeros(npix * 2),
                                  np.ones(npix * 2), npix=npix, channels=2, name="a")
    b = linear_model_from_sklearn(rng.normal(size=(c, npix * 2)), rng.normal(size=c), np.zeros(npix * 2),
                                  np.ones(npix * 2), npix=npix, channels=2, name="b")
    ens = ensemble_model([a, b], [2.0, 0.5])
    x = rng.normal(size=(5, npix, 2)).astype(np.float32)

    def logsm(z, t):
        z = z / t
        return z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)

    want = (logsm(np.asarray(a(x)), 2.0) + logsm(np.asarray(b(x)), 0.5)) / 2
    np.testing.assert_allclose(np.asarray(ens(x)), want, rtol=1e-5, atol=1e-5)
    ens.save(tmp_path / "ens.keras")
    back = keras.saving.load_model(tmp_path / "ens.keras")
    np.testing.assert_allclose(np.asarray(back(x)), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="two or more"):
        ensemble_model([a], [1.0])


def test_padded_size_powers_of_two_capped_at_batch():
    assert [R.padded_size(n, 256) for n in (1, 16, 17, 100, 129, 255, 256)] == [16, 16, 32, 128, 256, 256, 256]
    assert R.padded_size(5, 8) == 8 and R.padded_size(3, 2) == 3


@pytest.mark.parametrize("n", [1, 7, 33, 70])
def test_predict_logits_padding_does_not_change_real_rows(n):
    """Batches go through predict_on_batch zero-padded; the real rows equal the model's own output."""
    model = R.build_recogniser(3, npix=NPIX, width=8, depth=2)
    x = synthetic(n, seed=n)[0]
    ref = keras.ops.convert_to_numpy(model(x[..., None], training=False))
    got = R.predict_logits(model, x, batch_size=32)
    assert got.shape == (n, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # the same rows give the same logits whatever batch they are in
    np.testing.assert_allclose(R.predict_logits(model, x[:1], batch_size=32), got[:1], rtol=1e-4, atol=1e-5)


def test_wide_path_is_the_linear_model_on_standardised_pixels(tmp_path):
    """``wide=(mean, var)`` adds a dense layer on per-pixel standardised input to the logits."""
    x, _ = synthetic(40, npix=64)
    x2 = np.stack([x, 1 + 0.1 * x], axis=-1)
    mean, var = x2.mean(axis=0), x2.var(axis=0)
    model = R.build_recogniser(3, npix=64, width=8, depth=1, channels=2, head="dense",
                               wide=(mean, var), wide_l2=1e-3)
    assert model.output_shape == (None, 3)
    wide = model.get_layer("wide_logits")
    assert wide.kernel.shape == (64 * 2, 3) and model.losses        # L2 on the wide kernel
    # with the deep logits zeroed, the output is the linear model on (x - mean) / std
    deep = model.get_layer("logits")
    deep.set_weights([np.zeros_like(w) for w in deep.get_weights()])
    rng = np.random.default_rng(0)
    k, b = rng.standard_normal((128, 3)).astype("float32"), rng.standard_normal(3).astype("float32")
    wide.set_weights([k, b])
    z = ((x2 - mean) / np.sqrt(var)).reshape(len(x2), -1) @ k + b
    np.testing.assert_allclose(R.predict_logits(model, x2), z, rtol=1e-3, atol=1e-3)
    # the standardisation constants travel with the saved model
    path = tmp_path / "w.keras"
    model.save(path)
    back = keras.saving.load_model(path, compile=False)
    np.testing.assert_allclose(R.predict_logits(back, x2), z, rtol=1e-3, atol=1e-3)
    # and the scan's numpy engine runs it
    from lamost_ostar.models.numpy_runtime import NumpyGraph

    np.testing.assert_allclose(NumpyGraph.from_keras_file(path)(x2), z, rtol=1e-3, atol=1e-3)
