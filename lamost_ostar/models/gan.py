"""LCGAN (the paper's generator of O-type spectra) and the SGAN baseline.

Architecture (``npix`` = spectrum length, 3921 on the common grid)
------------------------------------------------------------------
LCGAN generator (:func:`build_lcgan_generator`), paper Fig. 3-4:
    z ~ N(0, 1), 1 x 900  ->  Dense projection to ``L0 = ceil(npix / 4)`` positions
    -> (L0, 1) -> LocallyConnected1D(16, k=3, same) + LeakyReLU(0.2)
    -> [UpSampling1D(2) -> LocallyConnected1D(8, k=3, same) + LeakyReLU] x 2
    -> LocallyConnected1D(1, k=3, same) (linear) -> crop to ``npix``
    -> SpectrumScaler (fixed de-normalisation, see "Data scale").
    The Dense projection is ours: integer up-sampling of 900 cannot reach an
    arbitrary ``npix`` (900 x 4 = 3600 < 3921), so the noise is first mapped to
    ``npix / 4`` positions.  Few filters and k = 3 keep the unshared weights in
    check: about 2.6 M parameters at npix = 3921 (0.9 M of them the projection).
SGAN baseline generator (:func:`build_sgan_generator`), after Zheng et al. (2020):
    the same projection and up-sampling schedule with ordinary shared-weight
    Conv1D (32, 16, 8 filters, k = 5) + BatchNormalization + LeakyReLU: a
    standard DCGAN-style 1-D generator.  We do not have Zheng et al.'s exact
    layer list; this is the "standard convolutional 1-D GAN" of the issue.
Discriminator (:func:`build_discriminator`, shared by both):
    SpectrumScaler (fixed normalisation) ->
    4 x [Conv1D(k=5..7, stride 2) + LeakyReLU(0.2) + Dropout(0.3)] -> Flatten -> Dense(1)
    (a logit).  Dropout is the paper's source of randomness in training.

Training
--------
Binary cross-entropy on logits with one-sided label smoothing: real spectra are
labelled ``1 - alpha``, generated ones ``0 + beta`` (paper, "One Side Label
Smoothing"; ``beta = 0`` is the strictly one-sided form).  The generator
minimises the non-saturating loss ``-log D(G(z))`` (eq. 8).  TTUR: RMSprop with
learning rate 1e-4 for the generator and 1.5e-4 for the discriminator (LCGAN);
the SGAN baseline uses one rate (1e-4) for both, as it has no TTUR.

How the training step stays backend agnostic
--------------------------------------------
Keras 3 has no portable gradient API, so a hand-written ``train_step`` must use
``tf.GradientTape`` / ``jax.grad`` / ``torch.autograd``.  Instead, the GAN is ONE
:class:`keras.Model` (:class:`GANModel`) whose forward pass returns the three
discriminator outputs needed and whose ``compute_loss`` returns
``d_loss + g_loss``; Keras' own per-backend ``train_step`` differentiates it.
Gradients are kept apart with ``keras.ops.stop_gradient``:

* ``d_loss`` sees the generated batch through ``stop_gradient`` -> no gradient to G;
* ``g_loss`` sees the discriminator through ``stateless_call`` with
  ``stop_gradient``-ed weights -> no gradient to D.

Both discriminator passes use one snapshot of D's weights (``ops.copy``), so the
frozen pass can never see weights the optimizer has already updated.

So D's gradient is exactly ``grad d_loss`` and G's exactly ``grad g_loss``, both
taken at the same parameters and applied in one optimizer step (simultaneous
rather than alternating updates; the TTUR analysis of Heusel et al. 2017 is for
this simultaneous form).  The two learning rates come from
:class:`TwoTimeScaleRMSprop`, an RMSprop whose ``update_step`` scales the rate
for the discriminator's variables.  Only ``keras``/``keras.ops`` are used.

Data scale
----------
Inputs are the pipeline's standardised spectra ``x / ||x||_2`` (eq. 1), whose
pixels are ~1/sqrt(npix).  Inside the GAN they are multiplied by ``sqrt(npix)``
(unit RMS).  With ``normalise=True`` (default) the first :meth:`GANTrainer.fit`
also sets two fixed :class:`~lamost_ostar.models.layers.SpectrumScaler` layers
from the training spectra: the discriminator's input layer subtracts their mean
spectrum and divides by the residual RMS, and the generator's output layer
undoes that.  So both networks work on the variations about the mean O
spectrum (the generator starts at "mean spectrum + small noise" instead of
having to grow every pixel from zero at RMSprop's 1e-4 per step), while their
inputs/outputs stay spectra.  The same is done for LCGAN and SGAN.  The
statistics are saved inside every generator checkpoint, and
:meth:`GANTrainer.sample` re-normalises generated spectra with eq. 1.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import ops

from .layers import LocallyConnected1D, SpectrumScaler

from ..preprocess import NPIX

__all__ = [
    "LATENT_DIM",
    "build_lcgan_generator",
    "build_sgan_generator",
    "build_discriminator",
    "TwoTimeScaleRMSprop",
    "GANModel",
    "GANTrainer",
    "make_lcgan",
    "make_sgan",
    "load_generator",
    "sample_generator",
    "standardise",
]

#: length of the generator's noise vector (paper: 1 x 900)
LATENT_DIM = 900
_PACKAGE = "lamost_ostar"


def standardise(x: np.ndarray) -> np.ndarray:
    """Row-wise ``x / ||x||_2`` (the paper's eq. 1), safe for all-zero rows."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _base_length(npix: int, n_up: int) -> int:
    return math.ceil(npix / 2**n_up)


def _project_and_reshape(z: Any, npix: int, n_up: int) -> tuple[Any, int]:
    length = _base_length(npix, n_up)
    h = keras.layers.Dense(length, name="project")(z)
    h = keras.layers.LeakyReLU(0.2)(h)
    return keras.layers.Reshape((length, 1))(h), length


def _crop(h: Any, npix: int, full: int) -> Any:
    if full > npix:
        h = keras.layers.Cropping1D((0, full - npix), name="crop")(h)
    return h


def _upsampling_generator(npix: int, latent_dim: int, filters: tuple[int, ...],
                          stage: Any, out: Any, name: str) -> keras.Model:
    """The generator schedule LCGAN and SGAN share: noise -> projection -> stages.

    ``stage(h, i, f)`` builds stage ``i`` with ``f`` filters (an ``UpSampling1D(2)``
    precedes every stage after the first, a LeakyReLU follows each); ``out`` is
    the final one-channel layer; the result is cropped to ``npix`` and mapped
    back from the normalised scale.
    """
    z = keras.Input((latent_dim,), name="z")
    h, length = _project_and_reshape(z, npix, len(filters) - 1)
    for i, f in enumerate(filters):
        if i:
            h = keras.layers.UpSampling1D(2)(h)
            length *= 2
        h = keras.layers.LeakyReLU(0.2)(stage(h, i, f))
    h = SpectrumScaler(inverse=True, name="denormalise")(_crop(out(h), npix, length))
    return keras.Model(z, h, name=name)


def build_lcgan_generator(
    npix: int = NPIX,
    latent_dim: int = LATENT_DIM,
    filters: tuple[int, ...] = (16, 8, 8),
    kernel_size: int = 3,
    name: str = "lcgan_generator",
) -> keras.Model:
    """LCGAN generator: noise -> locally connected + up-sampling stages -> spectrum.

    Parameters
    ----------
    npix : int
        Output length.
    latent_dim : int
        Noise length (paper: 900).
    filters : tuple of int
        Filters of the locally connected stages; an ``UpSampling1D(2)`` precedes
        every stage after the first.
    kernel_size : int
        Kernel length of every locally connected layer.
    name : str
        Model name (variable paths start with it).

    Returns
    -------
    keras.Model
        ``(batch, latent_dim) -> (batch, npix, 1)``, unit-RMS scale.
    """
    def stage(h: Any, i: int, f: int) -> Any:
        return LocallyConnected1D(f, kernel_size, padding="same", name=f"lc{i}")(h)

    out = LocallyConnected1D(1, kernel_size, padding="same", name="lc_out")
    return _upsampling_generator(npix, latent_dim, filters, stage, out, name)


def build_sgan_generator(
    npix: int = NPIX,
    latent_dim: int = LATENT_DIM,
    filters: tuple[int, ...] = (32, 16, 8),
    kernel_size: int = 5,
    name: str = "sgan_generator",
) -> keras.Model:
    """SGAN baseline generator: the same schedule with shared-weight Conv1D + BatchNorm.

    Parameters and return value as :func:`build_lcgan_generator`.
    """
    def stage(h: Any, i: int, f: int) -> Any:
        h = keras.layers.Conv1D(f, kernel_size, padding="same", name=f"conv{i}")(h)
        return keras.layers.BatchNormalization(name=f"bn{i}")(h)

    out = keras.layers.Conv1D(1, kernel_size, padding="same", name="conv_out")
    return _upsampling_generator(npix, latent_dim, filters, stage, out, name)


def build_discriminator(
    npix: int = NPIX,
    filters: tuple[int, ...] = (16, 32, 64, 64),
    kernel_sizes: tuple[int, ...] = (7, 5, 5, 5),
    dropout: float = 0.3,
    name: str = "discriminator",
) -> keras.Model:
    """Convolutional discriminator with dropout, ``(batch, npix, 1) -> (batch, 1)`` logits."""
    x = keras.Input((npix, 1), name="spectrum")
    h = SpectrumScaler(name="normalise")(x)
    for i, (f, k) in enumerate(zip(filters, kernel_sizes)):
        h = keras.layers.Conv1D(f, k, strides=2, padding="same", name=f"conv{i}")(h)
        h = keras.layers.LeakyReLU(0.2)(h)
        h = keras.layers.Dropout(dropout)(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(x, keras.layers.Dense(1, name="logit")(h), name=name)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TwoTimeScaleRMSprop(keras.optimizers.RMSprop):
    """RMSprop with two learning rates (TTUR, Heusel et al. 2017).

    Variables registered with :meth:`set_fast_variables` (the discriminator's)
    are updated with ``learning_rate * fast_factor``; all others with
    ``learning_rate``.  Backend agnostic: only ``update_step`` is overridden.

    Parameters
    ----------
    learning_rate : float
        Rate of the slow variables (the generator; paper 1e-4).
    fast_factor : float
        Ratio fast / slow (paper 1.5e-4 / 1e-4 = 1.5).
    **kwargs
        Passed to :class:`keras.optimizers.RMSprop`.
    """

    def __init__(self, learning_rate: float = 1e-4, fast_factor: float = 1.5, **kwargs: Any):
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.fast_factor = float(fast_factor)
        self._fast_ids: set[int] = set()
        self._fast_indices: set[int] = set()

    def set_fast_variables(self, variables: list) -> None:
        """Register the variables to update with the fast rate (before ``build``)."""
        self._fast_ids = {id(v) for v in variables}

    def build(self, var_list: list) -> None:
        super().build(var_list)
        self._fast_indices = {
            self._get_variable_index(v) for v in var_list if id(v) in self._fast_ids
        }

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        if self._get_variable_index(variable) in self._fast_indices:
            learning_rate = learning_rate * self.fast_factor
        super().update_step(gradient, variable, learning_rate)

    def get_config(self) -> dict:
        config = super().get_config()
        config["fast_factor"] = self.fast_factor
        return config


def _bce_logits(target: float, logits: Any) -> Any:
    """Mean binary cross-entropy of logits against a constant (smoothed) label."""
    t = ops.full_like(logits, target)
    return ops.mean(keras.losses.binary_crossentropy(t, logits, from_logits=True))


class GANModel(keras.Model):
    """Generator + discriminator as one Keras model (see module notes).

    Input ``[real, z]`` (unit-RMS real spectra ``(b, npix, 1)``, noise
    ``(b, latent_dim)``); output a dict of discriminator logits ``d_real``,
    ``d_fake`` (generated batch, generator frozen) and ``d_gen`` (generated batch,
    discriminator frozen).  ``compute_loss`` returns ``d_loss + g_loss``.
    """

    def __init__(self, generator: keras.Model, discriminator: keras.Model,
                 alpha: float = 0.1, beta: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if generator.name == discriminator.name:
            raise ValueError("generator and discriminator need different names")
        self.generator = generator
        self.discriminator = discriminator
        self.alpha = float(alpha)
        self.beta = float(beta)

    def call(self, inputs: Any, training: bool = False) -> dict:
        real, z = inputs
        return self.discriminate(real, self.generator(z, training=training), training)

    def discriminate(self, real: Any, fake: Any, training: bool = False) -> dict:
        """The three discriminator outputs for a real and a generated batch (see class notes)."""
        disc = self.discriminator
        # Read every discriminator variable ONCE (``ops.copy`` makes a real
        # read; ``convert_to_tensor`` of a TF variable returns the variable and
        # defers the read) and use that snapshot for both paths.  With lazily
        # read weights TensorFlow's graph sometimes ran the frozen path after
        # the optimizer had already updated D (G's gradient then used the new
        # D; caught by tests/test_gan.py::test_gradients_are_kept_apart).
        weights = [ops.copy(v) for v in disc.trainable_variables]
        state = [ops.copy(v) for v in disc.non_trainable_variables]
        both = ops.concatenate([real, ops.stop_gradient(fake)], axis=0)
        d_both, state = disc.stateless_call(weights, state, both, training=training)
        frozen = [ops.stop_gradient(w) for w in weights]
        d_gen, state = disc.stateless_call(frozen, state, fake, training=training)
        for variable, value in zip(disc.non_trainable_variables, state):
            variable.assign(value)  # e.g. the dropout seed state
        n = ops.shape(real)[0]
        return {"d_real": d_both[:n], "d_fake": d_both[n:], "d_gen": d_gen}

    def _gan_losses(self, y_pred: dict) -> tuple[Any, Any]:
        d_loss = _bce_logits(1.0 - self.alpha, y_pred["d_real"]) + _bce_logits(
            self.beta, y_pred["d_fake"]
        )
        g_loss = _bce_logits(1.0, y_pred["d_gen"])
        return d_loss, g_loss

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        d_loss, g_loss = self._gan_losses(y_pred)
        return d_loss + g_loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None) -> dict:
        d_loss, g_loss = self._gan_losses(y_pred)
        return {"d_loss": d_loss, "g_loss": g_loss}


@dataclass
class GANHistory:
    """Losses per iteration and the checkpoints written."""

    iteration: list[int] = field(default_factory=list)
    d_loss: list[float] = field(default_factory=list)
    g_loss: list[float] = field(default_factory=list)
    checkpoints: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0


#: A trainer whose first :meth:`GANTrainer.fit` runs at most this many iterations runs its
#: steps eagerly: on 2 CPU cores compiling the LCGAN's D + G step costs about 2 s, and an
#: iteration costs about 0.07 s compiled against 0.2 s eagerly (batches of 4), so the two
#: break even near 15 iterations.
EAGER_MAX_ITERATIONS: int = 8


class GANTrainer:
    """Train a GAN on standardised spectra, checkpoint it, sample from it.

    Parameters
    ----------
    generator, discriminator : keras.Model
        See :func:`build_lcgan_generator` / :func:`build_discriminator`.
    generator_lr, discriminator_lr : float
        RMSprop learning rates (TTUR; paper 1e-4 and 1.5e-4).
    alpha, beta : float
        Label smoothing: real labelled ``1 - alpha``, generated ``0 + beta``.
    kind : str
        A label ("lcgan", "sgan") kept in the history/checkpoint names.
    model_class : type
        :class:`GANModel` or a subclass (a variant of the losses, e.g. in
        ``scripts/gan_variants.py``).
    normalise : bool
        Set the networks' ``SpectrumScaler`` layers (generator layer
        ``"denormalise"``, discriminator layer ``"normalise"``; skipped where
        absent) from the spectra of the first :meth:`fit` (mean spectrum and
        residual RMS, unit-RMS scale); later fits keep those statistics.

    Examples
    --------
    >>> gan = make_lcgan(npix=3921)                       # doctest: +SKIP
    >>> hist = gan.fit(o_spectra, iterations=2000, batch_size=32,
    ...                checkpoint_every=250, checkpoint_dir="ckpt")  # doctest: +SKIP
    >>> fake = gan.sample(1000, seed=1)                   # (1000, 3921), eq. 1
    """

    def __init__(
        self,
        generator: keras.Model,
        discriminator: keras.Model,
        *,
        generator_lr: float = 1e-4,
        discriminator_lr: float = 1.5e-4,
        alpha: float = 0.1,
        beta: float = 0.0,
        kind: str = "gan",
        normalise: bool = True,
        model_class: type[GANModel] = GANModel,
    ) -> None:
        self.generator = generator
        self.discriminator = discriminator
        self.kind = kind
        self.npix = int(discriminator.input_shape[1])
        self.latent_dim = int(generator.input_shape[-1])
        if int(generator.output_shape[1]) != self.npix:
            raise ValueError("generator output length != discriminator input length")
        self.model = model_class(generator, discriminator, alpha=alpha, beta=beta,
                                 name=f"{kind}_trainer")
        optimizer = TwoTimeScaleRMSprop(
            learning_rate=generator_lr, fast_factor=discriminator_lr / generator_lr
        )
        optimizer.set_fast_variables(discriminator.trainable_variables)
        self.model.compile(optimizer=optimizer)
        self.history = GANHistory()
        self.iterations_done = 0
        self.normalise = bool(normalise)
        self.statistics_set = False

    def _set_statistics(self, real: np.ndarray) -> None:
        """Mean spectrum and residual RMS of unit-RMS ``real`` into the scalers."""
        scalers = [_find_layer(self.generator, "denormalise"),
                   _find_layer(self.discriminator, "normalise")]
        scalers = [s for s in scalers if s is not None]
        if not scalers:
            return
        mean = real.mean(axis=0)
        rms = float(np.sqrt(np.mean((real - mean) ** 2)))
        scale = rms if rms > 1e-6 else 1.0
        for scaler in scalers:
            scaler.set_statistics(mean, scale)
        self.statistics_set = True

    # -- data -------------------------------------------------------------------
    def _prepare(self, real_x: np.ndarray) -> np.ndarray:
        real_x = np.asarray(real_x, dtype=np.float32)
        if real_x.ndim == 3 and real_x.shape[-1] == 1:
            real_x = real_x[..., 0]
        if real_x.ndim != 2 or real_x.shape[1] != self.npix:
            raise ValueError(f"real_x must be (N, {self.npix}), got {real_x.shape}")
        if len(real_x) == 0 or not np.isfinite(real_x).all():
            raise ValueError("real_x must be non-empty and finite")
        return (standardise(real_x) * np.sqrt(self.npix))[..., None]

    def train_step(self, real_batch: np.ndarray, z: np.ndarray) -> dict[str, float]:
        """One simultaneous D + G update on a unit-RMS batch; returns the losses."""
        logs = self.model.train_on_batch([real_batch, z], return_dict=True)
        return {k: float(v) for k, v in logs.items()}

    def fit(
        self,
        real_x: np.ndarray,
        iterations: int,
        batch_size: int = 32,
        *,
        checkpoint_every: int | None = None,
        checkpoint_dir: str | Path | None = None,
        callback: Callable[[int, "GANTrainer", Path | None], None] | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> GANHistory:
        """Train for ``iterations`` batches (one D and one G update each).

        Parameters
        ----------
        real_x : ndarray, (N, npix) or (N, npix, 1)
            Real spectra, standardised with eq. 1 (re-standardised here anyway).
        iterations : int
            Number of training iterations (batches).  A first call of at most
            :data:`EAGER_MAX_ITERATIONS` runs the steps eagerly (not compiled).
        batch_size : int
            Real and generated spectra per iteration (each).
        checkpoint_every : int, optional
            Every so many iterations save the generator to
            ``checkpoint_dir/<kind>-generator-<iteration>.keras`` (if a directory
            is given) and call ``callback``.
        checkpoint_dir : path, optional
            Where checkpoints go (created).
        callback : callable, optional
            ``callback(iteration, trainer, checkpoint_path_or_None)``, e.g. to
            sample and score the generator at this iteration (paper Fig. 7).
        seed : int
            Seed of the batch and noise draws.
        progress : bool
            Show a tqdm bar with d_loss / g_loss.

        Returns
        -------
        GANHistory
            Cumulative over calls (iterations continue counting).
        """
        import time

        from tqdm.auto import tqdm

        if iterations < 1 or batch_size < 1:
            raise ValueError("iterations and batch_size must be positive")
        real = self._prepare(real_x)
        if self.normalise and not self.statistics_set:
            self._set_statistics(real)
        rng = np.random.default_rng(seed)
        ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if ckdir is not None:
            ckdir.mkdir(parents=True, exist_ok=True)
        if self.model.train_function is None:     # not trained yet: compile the step or not
            self.model.run_eagerly = iterations <= EAGER_MAX_ITERATIONS
        t0 = time.perf_counter()
        bar = tqdm(range(iterations), desc=self.kind, disable=not progress, leave=False)
        for _ in bar:
            idx = rng.integers(0, len(real), batch_size)
            z = rng.standard_normal((batch_size, self.latent_dim), dtype=np.float32)
            logs = self.train_step(real[idx], z)
            self.iterations_done += 1
            it = self.iterations_done
            self.history.iteration.append(it)
            self.history.d_loss.append(logs["d_loss"])
            self.history.g_loss.append(logs["g_loss"])
            bar.set_postfix(d_loss=f"{logs['d_loss']:.3f}", g_loss=f"{logs['g_loss']:.3f}")
            if checkpoint_every and it % checkpoint_every == 0:
                path = None
                if ckdir is not None:
                    path = ckdir / f"{self.kind}-generator-{it:06d}.keras"
                    self.generator.save(path)
                    self.history.checkpoints[it] = str(path)
                if callback is not None:
                    callback(it, self, path)
        self.history.seconds += time.perf_counter() - t0
        return self.history

    def sample(self, n: int, seed: int | None = None, batch_size: int = 256) -> np.ndarray:
        """Draw ``n`` generated spectra, ``(n, npix)`` float32, standardised (eq. 1)."""
        return sample_generator(self.generator, n, seed=seed, batch_size=batch_size)


def _find_layer(model: keras.Model, name: str) -> SpectrumScaler | None:
    for layer in model.layers:
        if layer.name == name and isinstance(layer, SpectrumScaler):
            return layer
    return None


def sample_generator(
    generator: keras.Model, n: int, seed: int | None = None, batch_size: int = 256
) -> np.ndarray:
    """Sample ``n`` spectra from a generator (e.g. a loaded checkpoint).

    Returns ``(n, npix)`` float32 rows standardised with eq. 1.
    """
    latent = int(generator.input_shape[-1])
    z = np.random.default_rng(seed).standard_normal((int(n), latent), dtype=np.float32)
    out = generator.predict(z, batch_size=batch_size, verbose=0)
    return standardise(np.asarray(out).reshape(int(n), -1))


def load_generator(path: str | Path) -> keras.Model:
    """Load a generator checkpoint written by :meth:`GANTrainer.fit`."""
    return keras.saving.load_model(path, compile=False)


def make_lcgan(npix: int = NPIX, *, alpha: float = 0.1, beta: float = 0.0,
               generator_lr: float = 1e-4, discriminator_lr: float = 1.5e-4,
               normalise: bool = True, **generator_kwargs: Any) -> GANTrainer:
    """LCGAN: locally connected generator, conv discriminator, TTUR (1e-4 / 1.5e-4).

    For reproducible weights call ``keras.utils.set_random_seed`` first.
    """
    return GANTrainer(
        build_lcgan_generator(npix, **generator_kwargs),
        build_discriminator(npix),
        generator_lr=generator_lr, discriminator_lr=discriminator_lr,
        alpha=alpha, beta=beta, kind="lcgan", normalise=normalise,
    )


def make_sgan(npix: int = NPIX, *, alpha: float = 0.1, beta: float = 0.0,
              learning_rate: float = 1e-4, normalise: bool = True,
              **generator_kwargs: Any) -> GANTrainer:
    """SGAN baseline: shared-weight Conv1D generator, same discriminator, one rate.

    Trained through the same :class:`GANTrainer`, so data, iterations and batch
    size can be matched exactly with :func:`make_lcgan`.
    """
    return GANTrainer(
        build_sgan_generator(npix, **generator_kwargs),
        build_discriminator(npix),
        generator_lr=learning_rate, discriminator_lr=learning_rate,
        alpha=alpha, beta=beta, kind="sgan", normalise=normalise,
    )
