"""Custom Keras 3 layers: :class:`LocallyConnected1D`, :class:`ChannelAttention1D`,
:class:`SpectrumScaler`, :class:`ChannelAffine` and :class:`ScaledLogSoftmax`.

All are written with ``keras`` and ``keras.ops`` only, so they run under the
TensorFlow, JAX and PyTorch backends, and all are registered with
:func:`keras.saving.register_keras_serializable` (package ``lamost_ostar``) so a
``model.keras`` file that uses them loads with :func:`keras.saving.load_model`
once this module has been imported (``import lamost_ostar.models`` does that).
"""
from __future__ import annotations

from typing import Any

import keras
from keras import ops

__all__ = ["LocallyConnected1D", "ChannelAttention1D", "SpectrumScaler", "ChannelAffine",
           "ScaledLogSoftmax", "lc_output_length"]

_PACKAGE = "lamost_ostar"


def lc_output_length(length: int, kernel_size: int, strides: int, padding: str) -> int:
    """Number of output positions of a 1-D (locally connected) convolution.

    The paper's eq. 6, ``o = (n + 2p - f) / s + 1`` (floor division), with the
    padding ``p`` implied by ``padding``: 0 for ``"valid"``; for ``"same"`` the
    input is padded so that ``o = ceil(n / s)`` (Keras' convention).

    Parameters
    ----------
    length : int
        Input length ``n``.
    kernel_size : int
        Kernel length ``f``.
    strides : int
        Step ``s``.
    padding : {"valid", "same"}
        Padding mode.

    Returns
    -------
    int
        Output length ``o``.
    """
    if padding == "valid":
        return (length - kernel_size) // strides + 1
    if padding == "same":
        return -(-length // strides)
    raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")


def _same_padding(length: int, kernel_size: int, strides: int) -> tuple[int, int]:
    out = -(-length // strides)
    total = max((out - 1) * strides + kernel_size - length, 0)
    return total // 2, total - total // 2


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LocallyConnected1D(keras.layers.Layer):
    """1-D locally connected layer: a convolution whose weights are not shared.

    Every output position ``o`` has its own kernel ``W[o]`` of shape
    ``(kernel_size * channels_in, filters)`` (and its own bias), so different
    bands of a spectrum can learn different features (Huang et al. 2012; the
    paper's "locally connected convolution").  The output length follows the
    paper's eq. 6 (see :func:`lc_output_length`).

    Implementation: the ``kernel_size`` strided slices of the (padded,
    position-major) input are stacked into patches
    ``(o, batch, kernel_size * channels_in)`` and contracted with the kernel in
    ONE batched matmul (``einsum("bok,okf->bof")``) -- no Python loop over
    positions (the loop over the few kernel taps only builds the slices).

    Parameters
    ----------
    filters : int
        Number of output channels.
    kernel_size : int
        Kernel length.
    strides : int, optional
        Step between positions.
    padding : {"valid", "same"}, optional
        ``"same"`` pads the input (zeros, split as evenly as possible, extra on the
        right) so that the output length is ``ceil(n / strides)``.
    activation : str or callable, optional
        Activation applied to the output.
    use_bias : bool, optional
        Add a per-position, per-filter bias.
    kernel_initializer, bias_initializer, kernel_regularizer, bias_regularizer : optional
        As in :class:`keras.layers.Conv1D`.  A variance-scaling kernel initializer
        (Glorot, He, ...) is rescaled so that its fans are those of ONE position
        (``kernel_size * channels_in`` in, ``filters`` out), as for a Conv1D.
    **kwargs
        Passed to :class:`keras.layers.Layer`.

    Notes
    -----
    Input ``(batch, length, channels_in)``, output ``(batch, o, filters)``; the
    input length must be known when the layer is built.  Parameters:
    ``o * kernel_size * channels_in * filters (+ o * filters)``.
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int,
        strides: int = 1,
        padding: str = "valid",
        activation: Any = None,
        use_bias: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        bias_regularizer: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        if int(filters) < 1 or int(kernel_size) < 1 or int(strides) < 1:
            raise ValueError("filters, kernel_size and strides must be positive integers")
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.padding = padding
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.input_spec = keras.layers.InputSpec(ndim=3)

    # -- shapes -----------------------------------------------------------------
    def _pads(self, length: int) -> tuple[int, int]:
        if self.padding == "same":
            return _same_padding(length, self.kernel_size, self.strides)
        return 0, 0

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        length = input_shape[1]
        if length is None:
            raise ValueError("LocallyConnected1D needs a known input length")
        out = lc_output_length(length, self.kernel_size, self.strides, self.padding)
        return (input_shape[0], out, self.filters)

    def build(self, input_shape: tuple) -> None:
        length, channels = input_shape[1], input_shape[2]
        if length is None or channels is None:
            raise ValueError("LocallyConnected1D needs known input length and channels")
        self.input_length = int(length)
        self.output_length = lc_output_length(
            self.input_length, self.kernel_size, self.strides, self.padding
        )
        if self.output_length < 1:
            raise ValueError(
                f"input length {length} too short for kernel_size {self.kernel_size}"
            )
        fan = self.kernel_size * int(channels)
        init = self.kernel_initializer
        if isinstance(init, keras.initializers.VarianceScaling):
            # Keras' fan computation for a 3-D shape multiplies both fans by the
            # leading dimension (here the number of positions): undo that.
            init = keras.initializers.VarianceScaling(
                scale=init.scale * self.output_length,
                mode=init.mode,
                distribution=init.distribution,
                seed=init.seed,
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.output_length, fan, self.filters),
            initializer=init,
            regularizer=self.kernel_regularizer,
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.output_length, self.filters),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
            )
        else:
            self.bias = None
        self.input_spec = keras.layers.InputSpec(ndim=3, axes={1: length, 2: channels})

    # -- forward ----------------------------------------------------------------
    def _patches(self, x: Any) -> Any:
        """Position-major patches ``(o, batch, kernel_size * channels_in)``."""
        left, right = self._pads(self.input_length)
        if left or right:
            x = ops.pad(x, [[0, 0], [left, right], [0, 0]])
        x = ops.transpose(x, (1, 0, 2))  # (length, batch, channels_in)
        span = (self.output_length - 1) * self.strides + 1
        taps = [x[k : k + span : self.strides] for k in range(self.kernel_size)]
        # tap-major along the last axis, matching the kernel's layout
        return taps[0] if self.kernel_size == 1 else ops.concatenate(taps, axis=-1)

    def call(self, inputs: Any) -> Any:
        # one batched matmul over positions: (o, b, k*c) @ (o, k*c, f) -> (o, b, f),
        # i.e. einsum("bok,okf->bof") with the position axis leading (measured
        # faster than einsum's own transposes, scripts/bench_layers.py)
        out = ops.transpose(ops.matmul(self._patches(inputs), self.kernel), (1, 0, 2))
        if self.use_bias:
            out = out + self.bias
        return self.activation(out) if self.activation is not None else out

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            activation=keras.activations.serialize(self.activation),
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
            bias_regularizer=keras.regularizers.serialize(self.bias_regularizer),
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ChannelAttention1D(keras.layers.Layer):
    """The attention block of the paper's Figure 6 (after RAC-Net, Zou et al. 2020).

    Stages: (1) a convolution of the input (2) gives ``c`` channels ``y``;
    (3) global max- and average-pooling over length give two length-``c``
    vectors, (4) concatenated; (5) a dense layer (sigmoid) turns them into the
    attention weights ``w_att`` (length ``c``); (6) the weights are repeated over
    the length (broadcast, the RepeatVector stage); (7-8) output ``y * w_att``.

    Parameters
    ----------
    channels : int
        ``c``, the number of channels of the convolution and of the output.
    kernel_size : int, optional
        Kernel length of the stage-1 convolution.
    **kwargs
        Passed to :class:`keras.layers.Layer`.
    """

    def __init__(self, channels: int, kernel_size: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.kernel_size = int(kernel_size)
        self.conv = keras.layers.Conv1D(
            self.channels, self.kernel_size, padding="same", name="conv"
        )
        self.dense = keras.layers.Dense(self.channels, activation="sigmoid", name="dense")

    def build(self, input_shape: tuple) -> None:
        self.conv.build(input_shape)
        self.dense.build((input_shape[0], 2 * self.channels))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], input_shape[1], self.channels)

    def call(self, inputs: Any) -> Any:
        y = self.conv(inputs)                                   # stages 1-2
        w = ops.concatenate([ops.max(y, axis=1), ops.mean(y, axis=1)], axis=-1)  # 3-4
        w = self.dense(w)                                       # stage 5
        return y * ops.expand_dims(w, axis=1)                   # stages 6-8

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(channels=self.channels, kernel_size=self.kernel_size)
        return config



@keras.saving.register_keras_serializable(package=_PACKAGE)
class SpectrumScaler(keras.layers.Layer):
    """Fixed affine map of spectra with non-trainable statistics.

    ``inverse=False``: ``y = (x - offset) / scale``; ``inverse=True``:
    ``y = x * scale + offset``.  ``offset`` has the input's per-sample shape
    (e.g. a mean spectrum ``(npix, 1)``), ``scale`` is a scalar.  Starts as the
    identity; :meth:`set_statistics` sets both (they are saved with the model,
    so a saved generator carries its own de-normalisation).

    Parameters
    ----------
    inverse : bool
        Direction of the map.
    **kwargs
        Passed to :class:`keras.layers.Layer`.
    """

    def __init__(self, inverse: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inverse = bool(inverse)

    def build(self, input_shape: tuple) -> None:
        self.offset = self.add_weight(name="offset", shape=tuple(input_shape[1:]),
                                      initializer="zeros", trainable=False)
        self.scale = self.add_weight(name="scale", shape=(), initializer="ones",
                                     trainable=False)

    def set_statistics(self, offset: Any, scale: float) -> None:
        """Set ``offset`` (per-sample shape) and ``scale`` (> 0)."""
        if not scale > 0:
            raise ValueError("scale must be > 0")
        self.offset.assign(ops.reshape(ops.convert_to_tensor(offset, "float32"),
                                       self.offset.shape))
        self.scale.assign(float(scale))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def call(self, inputs: Any) -> Any:
        if self.inverse:
            return inputs * self.scale + self.offset
        return (inputs - self.offset) / self.scale

    def get_config(self) -> dict:
        config = super().get_config()
        config["inverse"] = self.inverse
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ChannelAffine(keras.layers.Layer):
    """Fixed per-channel affine map ``(x - offset) * scale`` of a ``(batch, length, C)`` input.

    Puts the input channels on comparable scales without learnt weights (the
    constants are part of the model's config, so a saved model carries them):
    the two-channel recogniser uses ``offset = (0, 1)``, ``scale = (sqrt(npix), 5)``
    for the standardised flux (unit L2 norm -> unit RMS) and the
    continuum-normalised flux (~1 in the continuum -> ~0, line depths of a few
    tenths -> order 1).

    Parameters
    ----------
    offset, scale : sequence of float
        One value per channel.
    """

    def __init__(self, offset, scale, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.offset = [float(v) for v in offset]
        self.scale = [float(v) for v in scale]
        if len(self.offset) != len(self.scale):
            raise ValueError("offset and scale need one value per channel")

    def build(self, input_shape) -> None:  # noqa: D102
        if input_shape[-1] != len(self.scale):
            raise ValueError(f"ChannelAffine has {len(self.scale)} channels, input has {input_shape[-1]}")
        self.built = True

    def call(self, x):  # noqa: D102
        offset = ops.convert_to_tensor(self.offset, dtype=x.dtype)
        scale = ops.convert_to_tensor(self.scale, dtype=x.dtype)
        return (x - offset) * scale

    def compute_output_shape(self, input_shape):  # noqa: D102
        return input_shape

    def get_config(self) -> dict:  # noqa: D102
        config = super().get_config()
        config.update(offset=list(self.offset), scale=list(self.scale))
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ScaledLogSoftmax(keras.layers.Layer):
    """Calibrated log probabilities ``log_softmax(z / temperature)`` of ``(batch, C)`` logits.

    An ensemble averages its members' outputs through this layer (each member
    with the temperature fitted on its own held-out logits), so the mean is
    that of calibrated log probabilities whatever the members' logit scales.

    Parameters
    ----------
    temperature : float
        Positive divisor of the logits.
    """

    def __init__(self, temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def call(self, z):  # noqa: D102
        z = z / self.temperature
        return z - ops.logsumexp(z, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape):  # noqa: D102
        return input_shape

    def get_config(self) -> dict:  # noqa: D102
        config = super().get_config()
        config["temperature"] = self.temperature
        return config
