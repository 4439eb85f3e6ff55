"""Tests for :mod:`lamost_ostar.models.gan` (tiny spectra, a few seconds)."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from lamost_ostar.models import gan as G  # noqa: E402
from lamost_ostar.models.layers import LocallyConnected1D  # noqa: E402

NPIX = 64


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _template(npix=NPIX):
    w = np.linspace(0, 1, npix)
    return 1.5 - 0.8 * w - 0.5 * np.exp(-0.5 * ((w - 0.3) / 0.03) ** 2)


def _real(n=48, npix=NPIX, seed=0):
    rng = np.random.default_rng(seed)
    x = _template(npix) * (1 + 0.1 * rng.standard_normal((n, 1)))
    return (x + 0.02 * rng.standard_normal((n, npix))).astype("float32")


def _linear_models(npix=8, latent=3):
    z = keras.Input((latent,))
    g = keras.Model(z, keras.layers.Reshape((npix, 1))(keras.layers.Dense(npix)(z)), name="g")
    x = keras.Input((npix, 1))
    d = keras.Model(x, keras.layers.Dense(1)(keras.layers.Flatten()(x)), name="d")
    return g, d


def test_shapes_and_parameter_counts():
    for build in (G.build_lcgan_generator, G.build_sgan_generator):
        g = build(npix=250)
        assert g.input_shape == (None, G.LATENT_DIM)
        assert g.output_shape == (None, 250, 1)
    lc = G.build_lcgan_generator(npix=250)
    assert any(isinstance(layer, LocallyConnected1D) for layer in lc.layers)
    d = G.build_discriminator(npix=250)
    assert d.output_shape == (None, 1)
    assert any(isinstance(layer, keras.layers.Dropout) for layer in d.layers)
    # full-size generator stays a few million parameters
    assert G.build_lcgan_generator().count_params() < 4_000_000


def test_gradients_are_kept_apart():
    """One SGD(lr=1) step equals minus the analytic gradients of d_loss (for D) and
    g_loss (for G) separately: no leakage through the stop-gradients."""
    npix, latent, b, alpha, beta = 8, 3, 5, 0.1, 0.05
    g, d = _linear_models(npix, latent)
    model = G.GANModel(g, d, alpha=alpha, beta=beta)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0))
    rng = np.random.default_rng(0)
    real = rng.normal(size=(b, npix, 1)).astype("float32")
    z = rng.normal(size=(b, latent)).astype("float32")
    wg, bg = (keras.ops.convert_to_numpy(v) for v in g.trainable_variables)
    wd, bd = (keras.ops.convert_to_numpy(v) for v in d.trainable_variables)
    fake = z @ wg + bg                      # (b, npix)
    s_real = real[..., 0] @ wd[:, 0] + bd[0]
    s_fake = fake @ wd[:, 0] + bd[0]
    # d_loss = mean BCE(1-alpha, s_real) + mean BCE(beta, s_fake)
    r = (_sigmoid(s_real) - (1 - alpha)) / b
    f = (_sigmoid(s_fake) - beta) / b
    grad_wd = real[..., 0].T @ r + fake.T @ f
    grad_bd = r.sum() + f.sum()
    # g_loss = mean BCE(1, s_fake) through the generator only
    gg = (_sigmoid(s_fake) - 1) / b         # dL/ds
    dfake = gg[:, None] * wd[:, 0][None, :]  # (b, npix)
    grad_wg = z.T @ dfake
    grad_bg = dfake.sum(0)
    model.train_on_batch([real, z])
    new = [keras.ops.convert_to_numpy(v) for v in (*g.trainable_variables, *d.trainable_variables)]
    np.testing.assert_allclose(wg - new[0], grad_wg, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bg - new[1], grad_bg, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(wd - new[2], grad_wd[:, None], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bd - new[3], grad_bd, rtol=1e-4, atol=1e-6)


def test_ttur_learning_rates():
    """First RMSprop step moves a weight by ~lr / sqrt(1 - rho): 1e-4 for G, 1.5e-4 for D."""
    g, d = _linear_models()
    trainer = G.GANTrainer(g, d, generator_lr=1e-4, discriminator_lr=1.5e-4)
    before = [keras.ops.convert_to_numpy(v).copy() for v in g.trainable_variables]
    before_d = [keras.ops.convert_to_numpy(v).copy() for v in d.trainable_variables]
    rng = np.random.default_rng(1)
    trainer.train_step(rng.normal(size=(4, 8, 1)).astype("float32"),
                       rng.normal(size=(4, 3)).astype("float32"))
    step_g = np.abs(keras.ops.convert_to_numpy(g.trainable_variables[0]) - before[0])
    step_d = np.abs(keras.ops.convert_to_numpy(d.trainable_variables[0]) - before_d[0])
    scale = 1 / np.sqrt(0.1)
    np.testing.assert_allclose(np.median(step_g), 1e-4 * scale, rtol=0.02)
    np.testing.assert_allclose(np.median(step_d), 1.5e-4 * scale, rtol=0.02)


def test_trainer_takes_a_model_subclass():
    """A loss variant subclasses GANModel and reuses its discriminate() (scripts/gan_variants.py)."""
    seen = []

    class Variant(G.GANModel):
        def call(self, inputs, training=False):
            real, z = inputs
            seen.append(training)
            return self.discriminate(real, self.generator(z, training=training), training)

    g, d = _linear_models()
    trainer = G.GANTrainer(g, d, model_class=Variant)
    assert isinstance(trainer.model, Variant)
    rng = np.random.default_rng(2)
    logs = trainer.train_step(rng.normal(size=(4, 8, 1)).astype("float32"),
                              rng.normal(size=(4, 3)).astype("float32"))
    assert seen and np.isfinite(logs["d_loss"]) and np.isfinite(logs["g_loss"])


@pytest.mark.parametrize("make", [G.make_lcgan, G.make_sgan])
def test_training_learns_and_checkpoints(make, tmp_path):
    keras.utils.set_random_seed(0)
    gan = make(npix=NPIX)
    template = G.standardise(_template()[None])[0]
    before = np.median(gan.sample(32, seed=3) @ template)
    calls = []
    hist = gan.fit(_real(), iterations=150, batch_size=32, checkpoint_every=75,
                   checkpoint_dir=tmp_path, callback=lambda it, tr, p: calls.append((it, p)),
                   progress=False)
    assert len(hist.d_loss) == len(hist.g_loss) == 150
    assert gan.model.run_eagerly is False                         # 150 iterations: compiled
    assert np.mean(hist.d_loss[-20:]) < np.mean(hist.d_loss[:5])  # D learns
    after = np.median(gan.sample(32, seed=3) @ template)
    assert after > max(before, 0.4)                               # G moves towards the data
    assert [c[0] for c in calls] == [75, 150]
    assert gan.statistics_set                                     # mean spectrum in the scalers
    offset = keras.ops.convert_to_numpy(gan.generator.get_layer("denormalise").offset)[:, 0]
    assert np.corrcoef(offset, template)[0, 1] > 0.99
    assert sorted(hist.checkpoints) == [75, 150]
    loaded = G.load_generator(hist.checkpoints[150])
    np.testing.assert_allclose(G.sample_generator(loaded, 4, seed=9), gan.sample(4, seed=9),
                               rtol=1e-5, atol=1e-6)


def test_a_short_first_fit_runs_eagerly():
    gan = G.make_sgan(npix=NPIX)
    hist = gan.fit(_real(), iterations=G.EAGER_MAX_ITERATIONS, batch_size=4, progress=False)
    assert gan.model.run_eagerly is True and len(hist.d_loss) == G.EAGER_MAX_ITERATIONS
    assert np.isfinite(hist.d_loss).all() and np.isfinite(hist.g_loss).all()


def test_sample_is_standardised_and_seeded():
    gan = G.make_lcgan(npix=NPIX)
    s = gan.sample(5, seed=1)
    assert s.shape == (5, NPIX) and s.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(s, gan.sample(5, seed=1))


def test_bad_input():
    gan = G.make_sgan(npix=NPIX)
    with pytest.raises(ValueError):
        gan.fit(np.zeros((4, NPIX + 1), "float32"), iterations=1, progress=False)
    with pytest.raises(ValueError):
        gan.fit(np.full((4, NPIX), np.nan, "float32"), iterations=1, progress=False)
