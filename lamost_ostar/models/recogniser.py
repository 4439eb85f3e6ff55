"""The O-star recogniser: a small residual + channel-attention 1-D CNN (after RAC-Net).

Architecture (:func:`build_recogniser`)
---------------------------------------
input ``(batch, npix, 1)`` standardised flux (eq. 1), or ``(batch, npix, 2)``:
   standardised flux + continuum-normalised flux (``preprocess.model_input``,
   the reddening-proof two-channel model)
-> ``Rescaling(sqrt(npix))`` (unit-RMS pixels, so the contract's input scale and
   the usual initialisations agree); for two channels :class:`ChannelAffine`
   does that to channel 0 and maps channel 1 to ``(xn - 1) * 5``
-> stem: Conv1D(width, 7, stride 2) + BatchNorm + ReLU + MaxPool(2)  (length / 4:
   the early down-sampling keeps an epoch of a few thousand spectra cheap on CPU)
-> ``depth`` residual-attention blocks, block ``i`` with ``width * 2**i`` channels:
   branch = Conv1D(k, stride 2) + BN + ReLU -> :class:`ChannelAttention1D` (the
   paper's Figure 6: conv -> c channels -> global max & average pool -> concatenate
   -> dense -> repeat over length -> multiply) -> BN; shortcut = 1x1 Conv1D
   stride 2 + BN; output ReLU(branch + shortcut)
-> GlobalAveragePooling1D -> Dropout -> Dense(n_classes): **logits**.

Training (:func:`train_recogniser`): Adam, learning rate 1e-4, sparse categorical
cross-entropy on logits, early stopping when the validation (the paper's "test")
loss has not dropped for ``patience`` = 5 epochs, best weights restored.

Class orders are :data:`CLASSES_7` (scanner model) and :data:`CLASSES_4` (the
paper's O/F/G/K); labels are integer indices into them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from .layers import ChannelAffine, ChannelAttention1D, ScaledLogSoftmax

from ..preprocess import NPIX

__all__ = [
    "CLASSES_7",
    "CLASSES_4",
    "build_recogniser",
    "train_recogniser",
    "predict_logits",
    "as_model_input",
    "ensemble_model",
]

#: the 7-class scanner model's class order
CLASSES_7: tuple[str, ...] = ("O", "B", "A", "F", "G", "K", "M")
#: the paper's 4-class order
CLASSES_4: tuple[str, ...] = ("O", "F", "G", "K")


def as_model_input(x: np.ndarray, npix: int | None = None, channels: int | None = None) -> np.ndarray:
    """``(N, npix)`` or ``(N, npix, C)`` -> float32 ``(N, npix, C)``, checked.

    A 2-d array is one channel (the standardised flux).  ``channels`` (the
    model's) is checked when given.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 2):
        raise ValueError(f"expected (N, npix) or (N, npix, C) spectra with C = 1 or 2, got shape {x.shape}")
    if npix is not None and x.shape[1] != npix:
        raise ValueError(f"expected spectra of {npix} pixels, got {x.shape[1]}")
    if channels is not None and x.shape[-1] != channels:
        raise ValueError(f"the model takes {channels} input channel(s), got {x.shape[-1]}")
    return x


def _residual_attention_block(h: Any, filters: int, kernel_size: int, stride: int,
                              name: str, bn_momentum: float) -> Any:
    branch = keras.layers.Conv1D(filters, kernel_size, strides=stride, padding="same",
                                 use_bias=False, name=f"{name}_conv")(h)
    branch = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn1")(branch)
    branch = keras.layers.ReLU()(branch)
    branch = ChannelAttention1D(filters, kernel_size, name=f"{name}_attention")(branch)
    branch = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn2")(branch)
    shortcut = h
    if stride != 1 or h.shape[-1] != filters:
        shortcut = keras.layers.Conv1D(filters, 1, strides=stride, padding="same",
                                       use_bias=False, name=f"{name}_proj")(h)
        shortcut = keras.layers.BatchNormalization(momentum=bn_momentum,
                                                       name=f"{name}_bn_proj")(shortcut)
    return keras.layers.ReLU()(keras.layers.Add()([branch, shortcut]))


def build_recogniser(
    n_classes: int = len(CLASSES_7),
    npix: int = NPIX,
    width: int = 16,
    depth: int = 3,
    kernel_size: int = 5,
    dropout: float = 0.3,
    bn_momentum: float = 0.9,
    name: str = "recogniser",
    channels: int = 1,
    head: str = "gap",
    wide: tuple[np.ndarray, np.ndarray] | None = None,
    wide_l2: float = 0.0,
    head_l2: float = 1e-4,
) -> keras.Model:
    """Build the residual + attention recogniser (not compiled).

    Parameters
    ----------
    n_classes : int
        Number of output logits (7 for :data:`CLASSES_7`, 4 for :data:`CLASSES_4`).
    npix : int
        Input length.
    width : int
        Channels of the stem; block ``i`` has ``width * 2**i``.
    depth : int
        Number of residual-attention blocks (each halves the length).
    kernel_size : int
        Kernel length in the blocks.
    dropout : float
        Dropout before the classification layer.
    bn_momentum : float
        BatchNormalization momentum; 0.9 (not Keras' 0.99) so the inference
        statistics settle within the few hundred steps a small training set gives.
    name : str
        Model name.
    channels : {1, 2}
        Input channels: 1 = the paper's standardised flux; 2 = standardised
        flux + continuum-normalised flux (:func:`lamost_ostar.preprocess.model_input`).
    head : {"gap", "dense"}
        ``gap``: global average pooling (position-free, the paper's style);
        ``dense``: a 1x1 squeeze to 8 channels, flatten and a 64-unit dense
        layer, so the classifier knows *where* along the spectrum a feature
        sits (He II 4541 is not He I 4471).
    wide : (mean, variance), optional
        Per-pixel ``(npix, channels)`` mean and variance of the training
        input.  When given, a linear path is added to the network
        ("wide and deep"): the input standardised pixel by pixel with these
        (a fixed :class:`keras.layers.Normalization`), flattened and mapped by
        one dense layer to logits that are added to the convolutional logits.
        That path is the logistic regression baseline (``lr2``) inside the
        network, trained jointly with it (LOSO kind ``cnn2dw``; in run 15 it
        did worse than both the CNN and ``lr2``: ``reports/loso/run15``).
    wide_l2 : float
        L2 weight of the linear path's kernel (per-sample loss units:
        ``1 / (2 C N)`` reproduces scikit-learn's ``C`` on ``N`` spectra).
    head_l2 : float
        L2 weight of the dense head's hidden layer (``head="dense"``).

    Returns
    -------
    keras.Model
        ``(batch, npix, channels) -> (batch, n_classes)`` logits.
    """
    if n_classes < 2:
        raise ValueError("n_classes must be >= 2")
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels}")
    inp = keras.Input((npix, channels), name="flux")
    if channels == 1:
        h = keras.layers.Rescaling(math.sqrt(npix), name="unit_rms")(inp)
    else:
        h = ChannelAffine((0.0, 1.0), (math.sqrt(npix), 5.0), name="unit_rms")(inp)
    h = keras.layers.Conv1D(width, 7, strides=2, padding="same", use_bias=False,
                            name="stem_conv")(h)
    h = keras.layers.BatchNormalization(momentum=bn_momentum, name="stem_bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.MaxPooling1D(2, padding="same", name="stem_pool")(h)
    for i in range(depth):
        h = _residual_attention_block(h, width * 2**i, kernel_size, 2, name=f"block{i}",
                                      bn_momentum=bn_momentum)
    if head == "gap":
        h = keras.layers.GlobalAveragePooling1D()(h)
        h = keras.layers.Dropout(dropout)(h)
    elif head == "dense":
        # position-aware head: where a feature sits (which line) matters in a spectrum
        h = keras.layers.Conv1D(8, 1, name="head_squeeze")(h)
        h = keras.layers.Flatten(name="head_flatten")(h)
        h = keras.layers.Dropout(dropout)(h)
        h = keras.layers.Dense(64, activation="relu", name="head_dense",
                               kernel_regularizer=keras.regularizers.L2(head_l2))(h)
        h = keras.layers.Dropout(dropout)(h)
    else:
        raise ValueError(f"head must be 'gap' or 'dense', got {head!r}")
    out = keras.layers.Dense(n_classes, name="logits")(h)
    if wide is not None:
        mean, var = (np.asarray(a, np.float32).reshape(npix, channels) for a in wide)
        w = keras.layers.Normalization(axis=(1, 2), mean=mean, variance=np.maximum(var, 1e-12),
                                       name="wide_standardise")(inp)
        w = keras.layers.Flatten(name="wide_flatten")(w)
        w = keras.layers.Dense(n_classes, name="wide_logits",
                               kernel_regularizer=keras.regularizers.L2(wide_l2) if wide_l2 else None)(w)
        out = keras.layers.Add(name="wide_and_deep")([out, w])
    return keras.Model(inp, out, name=name)


#: A fit of at most this many optimizer steps runs eagerly (:func:`train_recogniser`): on
#: 2 CPU cores compiling the training and validation steps of the two-channel network
#: costs about 5 s, and a step costs about 0.1 s compiled against 0.3-0.45 s eagerly
#: (batches of 16-64), so the two break even near 20 steps.
EAGER_MAX_STEPS: int = 12


def train_recogniser(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    epochs: int = 100,
    batch_size: int = 64,
    patience: int = 5,
    learning_rate: float = 1e-4,
    n_classes: int | None = None,
    model: keras.Model | None = None,
    class_weight: dict[int, float] | None = None,
    build_kwargs: dict[str, Any] | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 0,
    ema_momentum: float | None = None,
    sample_weight: np.ndarray | None = None,
    run_eagerly: bool | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Train a recogniser with Adam and early stopping on the validation loss.

    Parameters
    ----------
    x_train, x_val : ndarray, (N, npix) or (N, npix, C)
        Standardised spectra (C = 1), or the two-channel input (C = 2).
    y_train, y_val : ndarray of int
        Class indices (into :data:`CLASSES_7` or :data:`CLASSES_4`).
        ``y_train`` may instead be soft labels ``(N, n_classes)`` (rows of
        class probabilities, e.g. for mixtures of two classes); the loss is
        then the categorical cross-entropy, on validation too.
    epochs : int
        Maximum number of epochs.
    batch_size : int
        Mini-batch size.
    patience : int
        Stop when ``val_loss`` has not improved for this many epochs (paper: 5);
        the weights of the best epoch are restored.
    learning_rate : float
        Adam learning rate (paper: 1e-4).
    n_classes : int, optional
        Defaults to ``max(label) + 1`` over both sets.
    model : keras.Model, optional
        A model to (continue to) train; built with :func:`build_recogniser`
        (``npix`` from the data, plus ``build_kwargs``) when absent.
    class_weight : dict, optional
        Passed to :meth:`keras.Model.fit`.
    build_kwargs : dict, optional
        Extra arguments for :func:`build_recogniser`.
    callbacks : sequence of keras.callbacks.Callback
        Extra callbacks (progress, timing, ...), after the early stopping.
    verbose : int
        Keras verbosity.
    ema_momentum : float, optional
        Keep an exponential moving average of the weights (Polyak averaging,
        the optimizer's ``use_ema``) with this momentum per step; validation,
        early stopping and the returned model use the averaged weights, and the
        BatchNormalization statistics are measured again on ``x_train`` for
        them (:func:`reestimate_batchnorm`).  None: plain weights.
    sample_weight : ndarray, optional
        (N,) loss weight of each training spectrum (validation is unweighted).
    run_eagerly : bool, optional
        Run the training and validation steps op by op instead of compiling
        them.  None: eagerly when the whole fit is at most
        :data:`EAGER_MAX_STEPS` optimizer steps (``ceil(N / batch_size) *
        epochs``), where compiling the steps costs more than it saves.

    Returns
    -------
    model : keras.Model
        The trained model (outputs logits), best validation epoch's weights.
    history : dict
        Per-epoch ``loss``, ``accuracy``, ``val_loss``, ``val_accuracy`` (and
        ``best_epoch``, 0-based, as a one-element list).
    """
    x_train = as_model_input(x_train)
    x_val = as_model_input(x_val, x_train.shape[1], x_train.shape[-1])
    soft = np.ndim(y_train) == 2
    y_train = np.asarray(y_train, dtype=np.float32) if soft else np.asarray(y_train, dtype=np.int64).ravel()
    y_val = np.asarray(y_val, dtype=np.int64).ravel()
    if len(x_train) != len(y_train) or len(x_val) != len(y_val):
        raise ValueError("x and y lengths differ")
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=np.float32).ravel()
        if len(sample_weight) != len(x_train):
            raise ValueError("sample_weight must have one value per training spectrum")
    if len(x_val) == 0:
        raise ValueError("validation set is empty (early stopping needs it)")
    if n_classes is None:
        n_classes = y_train.shape[1] if soft else int(max(y_train.max(), y_val.max())) + 1
    if soft:
        if y_train.shape[1] != n_classes:
            raise ValueError(f"soft labels have {y_train.shape[1]} columns, not n_classes={n_classes}")
        y_val = np.eye(n_classes, dtype=np.float32)[y_val]      # the same loss on validation
    if model is None:
        model = build_recogniser(n_classes, npix=x_train.shape[1], channels=x_train.shape[-1],
                                 **(build_kwargs or {}))
    ema = ema_momentum is not None
    if run_eagerly is None:
        run_eagerly = -(-len(x_train) // max(int(batch_size), 1)) * int(epochs) <= EAGER_MAX_STEPS
    model.compile(
        run_eagerly=bool(run_eagerly),
        optimizer=(keras.optimizers.Adam(learning_rate, use_ema=True, ema_momentum=float(ema_momentum))
                   if ema else keras.optimizers.Adam(learning_rate)),
        loss=(keras.losses.CategoricalCrossentropy(from_logits=True) if soft
              else keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy") if soft
                 else keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                         restore_best_weights=True)
    # with EMA: the averaged weights are in the model at every epoch's end (swap_on_epoch), so
    # the early stopping that follows records and restores them
    first = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if ema else []
    hist = model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=epochs,
                     batch_size=batch_size, callbacks=[*first, stop, *callbacks], class_weight=class_weight,
                     sample_weight=sample_weight, shuffle=True, verbose=verbose)
    if ema:
        reestimate_batchnorm(model, x_train, batch_size=max(int(batch_size), 128))
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    history["best_epoch"] = [int(np.argmin(history["val_loss"]))]
    return model, history


def reestimate_batchnorm(model: keras.Model, x: np.ndarray, batch_size: int = 128,
                         seed: int = 0) -> int:
    """Measure the BatchNormalization moving statistics again for the model's present weights.

    Averaged weights (:func:`train_recogniser` with ``ema_momentum``) were never
    the weights the statistics were gathered with; forward passes in training
    mode over shuffled ``x`` replace them (each layer's momentum decays the old
    values: with 0.9, 40 batches leave 1.5 % of them).  The trainable weights
    do not change.  Returns the number of batches run (0 when the model has no
    BatchNormalization layer).
    """
    if not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers):
        return 0
    x = as_model_input(x, int(model.input_shape[1]), int(model.input_shape[-1]))
    order = np.random.default_rng(seed).permutation(len(x))
    bs = int(batch_size)
    starts = range(0, max(len(x) - bs, 0) + 1, bs)      # whole batches (one short one if x is short)
    for start in starts:
        model(x[order[start:start + bs]], training=True)
    return len(starts)


#: Smallest padded batch of :func:`predict_logits`.
MIN_PADDED_BATCH: int = 16


def padded_size(n: int, batch_size: int) -> int:
    """Rows a batch of ``n`` is padded to: the next power of two >= ``n`` (at least
    :data:`MIN_PADDED_BATCH`), capped at ``batch_size``."""
    return max(n, min(int(batch_size), max(MIN_PADDED_BATCH, 1 << (n - 1).bit_length())))


def predict_logits(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits ``(N, n_classes)`` float32 for model input ``(N, npix[, C])``.

    Batches of ``batch_size`` go through ``model.predict_on_batch`` (the
    backend's compiled inference step, without the per-call data pipeline of
    ``model.predict``); a short batch is zero-padded to the next power of two
    (:func:`padded_size`), so a scan whose batches have many different sizes
    (broken files, partition ends) compiles the step a few times, not once per
    size.  The rows are independent (inference mode), so padding does not change
    the logits of the real rows.
    """
    x = as_model_input(x, int(model.input_shape[1]), int(model.input_shape[-1]))
    n_out = int(model.output_shape[-1])
    if len(x) == 0:
        return np.zeros((0, n_out), np.float32)
    batch_size = max(1, int(batch_size))
    out = np.empty((len(x), n_out), np.float32)
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        nb = len(xb)
        k = padded_size(nb, batch_size)
        if k > nb:
            xb = np.concatenate([xb, np.zeros((k - nb,) + xb.shape[1:], xb.dtype)])
        logits = model.predict_on_batch(xb)   # numpy on every backend (Keras 3)
        if not isinstance(logits, np.ndarray):
            logits = keras.ops.convert_to_numpy(logits)
        out[start:start + nb] = logits[:nb]
    return out


def classes_for(n_classes: int) -> Sequence[str]:
    """The class tuple for a model with ``n_classes`` outputs (7 or 4)."""
    if n_classes == len(CLASSES_7):
        return CLASSES_7
    if n_classes == len(CLASSES_4):
        return CLASSES_4
    raise ValueError(f"no standard class list with {n_classes} classes")


def linear_model_from_sklearn(coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, scale: np.ndarray,
                              npix: int = NPIX, channels: int = 2, name: str = "logistic") -> keras.Model:
    """A Keras model computing a fitted logistic regression's logits (the LR baseline as a model version).

    ``logits = ((flatten(x) - mean) / scale) @ coef.T + intercept`` is folded
    into one ``Dense`` layer (``kernel = coef.T / scale``, ``bias = intercept -
    coef @ (mean / scale)``), so it is saved, loaded and served exactly like the
    CNN (any Keras backend, batched, on CPU or GPU).

    Parameters
    ----------
    coef, intercept : numpy.ndarray
        ``(C, npix * channels)`` and ``(C,)`` from ``LogisticRegression``.
    mean, scale : numpy.ndarray
        ``(npix * channels,)`` feature standardisation (``StandardScaler``).
    """
    coef = np.asarray(coef, np.float64)
    scale = np.where(np.asarray(scale, np.float64) > 0, scale, 1.0)
    kernel = (coef / scale[None, :]).T
    bias = np.asarray(intercept, np.float64) - coef @ (np.asarray(mean, np.float64) / scale)
    inp = keras.Input((npix, channels), name="flux")
    h = keras.layers.Flatten(name="flatten")(inp)
    dense = keras.layers.Dense(coef.shape[0], name="logits")
    out = dense(h)
    model = keras.Model(inp, out, name=name)
    dense.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return model


def ensemble_model(members: Sequence[keras.Model], temperatures: Sequence[float],
                   name: str = "ensemble") -> keras.Model:
    """One model whose logits are the mean of its members' calibrated log probabilities.

    ``logits = mean_i log_softmax(z_i / T_i)`` (the log of the geometric mean
    of the members' calibrated probabilities, up to a constant per spectrum),
    so it is served, saved and loaded like any recogniser.

    Parameters
    ----------
    members : sequence of keras.Model
        Models with the same input shape and number of classes (e.g. the CNN
        and the logistic regression on both channels).
    temperatures : sequence of float
        Each member's calibration temperature (fitted on held-out logits).
    """
    if len(members) < 2 or len(members) != len(temperatures):
        raise ValueError("an ensemble needs two or more members, each with a temperature")
    shapes = {tuple(m.input_shape[1:]) for m in members}
    if len(shapes) != 1:
        raise ValueError(f"the members take different inputs: {sorted(shapes)}")
    inp = keras.Input(shapes.pop(), name="flux")
    outs = [ScaledLogSoftmax(float(t), name=f"calibrated_{i}")(m(inp))
            for i, (m, t) in enumerate(zip(members, temperatures))]
    return keras.Model(inp, keras.layers.Average(name="logits")(outs), name=name)
