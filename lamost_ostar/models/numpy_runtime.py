"""CPU inference of a saved recogniser with numpy alone: the same ``model.keras``, no Keras import.

A scan worker that imports Keras imports TensorFlow: 2.6-2.9 s per fresh worker
on a 2-core machine and 820-860 MB of resident memory per worker, for a forward
pass of a few small convolutions.  :class:`NumpyGraph` reads the saved file itself (``config.json``
for the graph, ``model.weights.h5`` through h5py for the weights) and evaluates
it with vectorised numpy (each convolution is an im2col copy and one matrix
product over a chunk of :attr:`NumpyGraph.chunk` spectra), in float32 like the
Keras model.

It knows the layers this package's recognisers are built from
(:data:`SUPPORTED_LAYERS`: the CNN, the logistic-regression model, their
ensemble, the paper's one-channel model).  Any other layer, or weights it cannot
match, raise :class:`UnsupportedModelError` when the graph is built, never at
inference, so the caller can fall back to Keras (:class:`lamost_ostar.stage.OStarStage`
does with ``engine="auto"``; :func:`lamost_ostar.stage.resolve_engine` is the policy).  The tests compare it with
Keras on every packaged model version.

Keras' weight file names the weights of a model's layers by class
(``conv1d``, ``conv1d_1``, ... in the order of the model's layer list;
``saving_lib._save_container_state``); this module follows that rule and checks
every weight's shape against the layer's configuration.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["NumpyGraph", "UnsupportedModelError", "SUPPORTED_LAYERS", "load_graph"]


class UnsupportedModelError(ValueError):
    """The saved model uses a layer or an option this runtime does not evaluate."""


def _snake(name: str) -> str:
    # keras.src.utils.naming.to_snake_case
    s = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    s = re.sub(r"([a-z])([A-Z])", r"\1_\2", s).lower()
    return s if s[0] != "_" else "private" + s


def _unique(base: str, used: dict[str, int]) -> str:
    # keras.src.saving.saving_lib._get_unique_name
    if base in used:
        used[base] += 1
        return f"{base}_{used[base]}"
    used[base] = 0
    return base


# --------------------------------------------------------------------------
# array operations, (batch, length, channels) float32
# --------------------------------------------------------------------------
def _per_channel(y: np.ndarray, vec: np.ndarray, op: Any) -> np.ndarray:
    """``op(y, vec, out=y)`` for a per-channel ``vec`` of a ``(..., length, C)`` array, in place.

    numpy broadcasts a length-C vector with an inner loop of C elements, slow for
    C = 2-64; the vector tiled over the length makes the inner loop ``length * C``.
    """
    if y.ndim < 2 or not y.flags.c_contiguous:
        return op(y, vec, out=y)
    flat = y.reshape(-1, y.shape[-2] * y.shape[-1])
    op(flat, np.tile(vec, y.shape[-2]), out=flat)
    return y


def _max_over_length(y: np.ndarray) -> np.ndarray:
    """``y.max(axis=1)`` of ``(n, length, c)`` by halving: long contiguous inner loops
    (numpy's reduction over a middle axis runs its inner loop over ``c`` only: 6x slower)."""
    while y.shape[1] > 1:
        m = y.shape[1] // 2
        half = np.maximum(y[:, :m], y[:, m:2 * m])
        if y.shape[1] % 2:
            np.maximum(half[:, 0], y[:, -1], out=half[:, 0])
        y = half
    return y[:, 0]


def _mean_over_length(y: np.ndarray) -> np.ndarray:
    """``y.mean(axis=1)`` of ``(n, length, c)`` as a batched product with a row of ones (BLAS)."""
    ones = np.ones((1, y.shape[1]), dtype=y.dtype)
    return (ones @ y)[:, 0] / np.float32(y.shape[1])


def _same_pads(length: int, kernel: int, stride: int) -> tuple[int, int, int]:
    out = -(-length // stride)
    total = max((out - 1) * stride + kernel - length, 0)
    return out, total // 2, total - total // 2


def conv1d(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None, stride: int,
           padding: str) -> np.ndarray:
    """Keras ``Conv1D`` (channels last, dilation 1): an im2col copy and one matrix product."""
    n, length, c_in = x.shape
    k = kernel.shape[0]
    if padding == "same":
        out, left, right = _same_pads(length, k, stride)
        if left or right:
            x = np.pad(x, ((0, 0), (left, right), (0, 0)))
    elif padding == "valid":
        out = (length - k) // stride + 1
    else:
        raise UnsupportedModelError(f"Conv1D padding {padding!r}")
    span = (out - 1) * stride + 1
    if c_in < 8:
        # few input channels: im2col (numpy's own copy of the sliding-window view,
        # columns ordered channel, tap) and one (n * out, c_in * k) @ (c_in * k, c_out)
        # matrix product for the whole batch
        win = np.lib.stride_tricks.sliding_window_view(x, k, axis=1)[:, ::stride][:, :out]
        y = (win.reshape(n * out, c_in * k) @ kernel.transpose(1, 0, 2).reshape(c_in * k, -1)).reshape(n, out, -1)
    else:
        # many: one batched product per tap on the strided view itself, no im2col copy
        # (each (out, c_in) slice is BLAS-ready: unit stride over channels); faster per
        # layer than the copy at c_in 16-64 (scripts/bench_conv.py)
        y = np.matmul(x[:, 0:span:stride, :], kernel[0])
        if k > 1:
            tap = np.empty_like(y)
            for j in range(1, k):
                np.matmul(x[:, j:j + span:stride, :], kernel[j], out=tap)
                y += tap
    if bias is not None:
        _per_channel(y, bias, np.add)
    return y


def max_pool1d(x: np.ndarray, pool: int, stride: int, padding: str) -> np.ndarray:
    """Keras ``MaxPooling1D`` (channels last)."""
    n, length, c = x.shape
    if pool == stride == 2 and (padding == "same" or length % 2 == 0):
        # the common 2/2 pooling: one pass over two strided views, no padded copy
        # ("same" pads an odd length with one -inf on the right: the last window is x[-1])
        m = length // 2
        y = np.empty((n, -(-length // 2) if padding == "same" else m, c), dtype=x.dtype)
        np.maximum(x[:, 0:2 * m:2], x[:, 1:2 * m:2], out=y[:, :m])
        if y.shape[1] > m:
            y[:, m] = x[:, -1]
        return y
    if padding == "same":
        out, left, right = _same_pads(length, pool, stride)
        if left or right:
            x = np.pad(x, ((0, 0), (left, right), (0, 0)), constant_values=-np.inf)
    elif padding == "valid":
        out = (length - pool) // stride + 1
    else:
        raise UnsupportedModelError(f"MaxPooling1D padding {padding!r}")
    if pool == stride and x.shape[1] >= out * pool:
        return x[:, : out * pool].reshape(n, out, pool, c).max(axis=2)
    win = np.lib.stride_tricks.sliding_window_view(x, pool, axis=1)[:, ::stride][:, :out]
    return win.max(axis=-1)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    """Logistic function without overflow warnings (float32 in, float32 out)."""
    e = np.exp(-np.abs(v))
    return np.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(v.dtype, copy=False)


_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda v: v,
    "relu": lambda v: np.maximum(v, 0, out=v),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
}


def _activation(cfg: Mapping[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    name = cfg.get("activation", "linear") or "linear"
    if isinstance(name, Mapping):  # serialised function
        name = name.get("config", name.get("class_name"))
    if name not in _ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r}")
    return _ACTIVATIONS[name]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


# --------------------------------------------------------------------------
# layers: config + weights -> a function of its inputs
# --------------------------------------------------------------------------
Op = Callable[[list[np.ndarray]], np.ndarray]


def _weights(group: Any, n: int, shapes: Sequence[tuple[int, ...]] | None, what: str) -> list[np.ndarray]:
    try:
        vs = group["vars"]
        arrays = [np.asarray(vs[str(i)], dtype=np.float32) for i in range(n)]
    except (KeyError, TypeError) as exc:
        raise UnsupportedModelError(f"{what}: weights not found in the weight file ({exc})") from None
    if len(vs) != n:
        raise UnsupportedModelError(f"{what}: {len(vs)} weights, expected {n}")
    if shapes is not None:
        for a, s in zip(arrays, shapes):
            if a.shape != tuple(s):
                raise UnsupportedModelError(f"{what}: weight of shape {a.shape}, expected {tuple(s)}")
    return arrays


def _in_shape(layer: Mapping[str, Any]) -> list[int | None]:
    bc = layer.get("build_config") or {}
    shape = bc.get("input_shape")
    if shape is None:
        raise UnsupportedModelError(f"layer {layer['config'].get('name')!r} has no build shape")
    return list(shape)


def _conv_op(cfg: Mapping[str, Any], group: Any, c_in: int, what: str) -> Op:
    if cfg.get("data_format", "channels_last") != "channels_last" or \
            tuple(cfg.get("dilation_rate", (1,))) != (1,) or int(cfg.get("groups", 1)) != 1:
        raise UnsupportedModelError(f"{what}: only channels-last, undilated, ungrouped Conv1D")
    k = int(cfg["kernel_size"][0])
    stride = int(cfg["strides"][0])
    filters = int(cfg["filters"])
    use_bias = bool(cfg.get("use_bias", True))
    shapes = [(k, c_in, filters)] + ([(filters,)] if use_bias else [])
    w = _weights(group, len(shapes), shapes, what)
    return _Conv(w[0], w[1] if use_bias else None, stride, str(cfg.get("padding", "valid")),
                 _activation(cfg), str(cfg.get("activation", "linear")))


@dataclass
class _Conv:
    """A Conv1D node (a class, so that a following BatchNormalization can be folded into it)."""

    kernel: np.ndarray
    bias: np.ndarray | None
    stride: int
    padding: str
    act: Callable[[np.ndarray], np.ndarray]
    act_name: str

    def __call__(self, xs: list[np.ndarray]) -> np.ndarray:
        return self.act(conv1d(xs[0], self.kernel, self.bias, self.stride, self.padding))

    def fold(self, bn: "_Affine") -> None:
        """Absorb ``bn(conv(x))`` (linear activation only): ``kernel * mul``, ``bias * mul + add``."""
        self.kernel = (self.kernel * bn.mul).astype(np.float32)
        self.bias = (bn.add if self.bias is None else self.bias * bn.mul + bn.add).astype(np.float32)


@dataclass
class _Affine:
    """A BatchNormalization node at inference: ``x * mul + add`` per channel."""

    mul: np.ndarray
    add: np.ndarray
    inplace: bool = False

    def __call__(self, xs: list[np.ndarray]) -> np.ndarray:
        y = xs[0] if self.inplace else xs[0].copy()
        _per_channel(y, self.mul, np.multiply)
        return _per_channel(y, self.add, np.add)


@dataclass
class _View:
    """A node whose output shares its input's memory (identity at inference, reshape):
    never overwritten in place, since its input may have other readers."""

    fn: Callable[[np.ndarray], np.ndarray]

    def __call__(self, xs: list[np.ndarray]) -> np.ndarray:
        return self.fn(xs[0])


@dataclass
class _Add:
    """An Add node; in place in its first input when nothing else reads that input."""

    inplace: bool = False

    def __call__(self, xs: list[np.ndarray]) -> np.ndarray:
        y = xs[0] if self.inplace else xs[0].copy()
        for other in xs[1:]:
            y += other
        return y


@dataclass
class _ReLU:
    inplace: bool = False

    def __call__(self, xs: list[np.ndarray]) -> np.ndarray:
        return np.maximum(xs[0], 0, out=xs[0] if self.inplace else None)


def _dense_op(cfg: Mapping[str, Any], group: Any, d_in: int, what: str) -> Op:
    units = int(cfg["units"])
    use_bias = bool(cfg.get("use_bias", True))
    shapes = [(d_in, units)] + ([(units,)] if use_bias else [])
    w = _weights(group, len(shapes), shapes, what)
    kernel, bias = w[0], (w[1] if use_bias else None)
    act = _activation(cfg)

    def op(xs: list[np.ndarray]) -> np.ndarray:
        y = xs[0] @ kernel
        if bias is not None:
            y += bias
        return act(y)
    return op


def _normalization_op(cfg: Mapping[str, Any], shape: Sequence[int | None], what: str) -> Op:
    """A :class:`keras.layers.Normalization` built with fixed ``mean`` and ``variance``.

    Keras computes ``(x - mean) / max(sqrt(variance), epsilon)``, the
    constants broadcast along the kept ``axis`` (adapted statistics, kept as
    weights, and ``invert`` are not supported).
    """
    if cfg.get("invert") or cfg.get("mean") is None or cfg.get("variance") is None:
        raise UnsupportedModelError(f"{what}: only a fixed mean and variance (not adapted, not inverted)")
    ndim = len(shape)
    axes = cfg.get("axis", -1)
    axes = [axes] if isinstance(axes, int) else list(axes or [])
    axes = {a % ndim for a in axes}
    bshape = [1] + [int(shape[d]) if d in axes else 1 for d in range(1, ndim)]

    def kept(v: Any) -> np.ndarray:           # a scalar or the kept axes' shape -> broadcastable
        return np.asarray(v, np.float32).reshape(bshape if np.size(v) > 1 else [1] * ndim)
    mean, var = kept(cfg["mean"]), kept(cfg["variance"])
    inv = (1.0 / np.maximum(np.sqrt(var), np.float32(1e-7))).astype(np.float32)

    def normalise(xs: list[np.ndarray]) -> np.ndarray:
        y = np.subtract(xs[0], mean, dtype=np.float32)
        y *= inv
        return y
    return normalise


def _layer_op(layer: Mapping[str, Any], group: Any) -> Op:
    """The numpy function of one saved layer (``group``: its weights, or None)."""
    cls = layer["class_name"]
    cfg = layer["config"]
    what = f"{cls} {cfg.get('name')!r}"
    if cls in ("Dropout", "SpatialDropout1D", "GaussianNoise", "GaussianDropout", "ActivityRegularization"):
        return _View(lambda x: x)
    if cls == "Conv1D":
        return _conv_op(cfg, group, int(_in_shape(layer)[-1]), what)
    if cls == "Dense":
        shape = _in_shape(layer)
        if len(shape) != 2:
            raise UnsupportedModelError(f"{what}: Dense on a {len(shape)}-d input")
        return _dense_op(cfg, group, int(shape[-1]), what)
    if cls == "BatchNormalization":
        if int(cfg.get("axis", -1)) not in (-1, len(_in_shape(layer)) - 1):
            raise UnsupportedModelError(f"{what}: only the last axis")
        c = int(_in_shape(layer)[-1])
        center, scale = bool(cfg.get("center", True)), bool(cfg.get("scale", True))
        n = int(scale) + int(center) + 2
        w = _weights(group, n, [(c,)] * n, what)
        gamma = w.pop(0) if scale else np.ones(c, np.float32)
        beta = w.pop(0) if center else np.zeros(c, np.float32)
        mean, var = w
        mul = (gamma / np.sqrt(var + np.float32(cfg.get("epsilon", 1e-3)))).astype(np.float32)
        add = (beta - mean * mul).astype(np.float32)
        return _Affine(mul, add)
    if cls == "ReLU":
        if cfg.get("max_value") is not None or float(cfg.get("negative_slope", 0.0)) != 0.0 \
                or float(cfg.get("threshold", 0.0)) != 0.0:
            raise UnsupportedModelError(f"{what}: only the plain ReLU")
        return _ReLU()
    if cls == "Activation":
        act = _activation(cfg)
        return lambda xs: act(xs[0].copy())
    if cls == "MaxPooling1D":
        if cfg.get("data_format", "channels_last") != "channels_last":
            raise UnsupportedModelError(f"{what}: only channels-last")
        pool = int(cfg["pool_size"][0])
        stride = int((cfg.get("strides") or cfg["pool_size"])[0])
        padding = str(cfg.get("padding", "valid"))
        return lambda xs: max_pool1d(xs[0], pool, stride, padding)
    if cls == "GlobalAveragePooling1D":
        if cfg.get("data_format", "channels_last") != "channels_last" or cfg.get("keepdims"):
            raise UnsupportedModelError(f"{what}: only channels-last without keepdims")
        return lambda xs: xs[0].mean(axis=1)
    if cls == "Flatten":
        return _View(lambda x: x.reshape(x.shape[0], -1))
    if cls == "Add":
        return _Add()
    if cls == "Average":
        return lambda xs: sum(xs[1:], xs[0].copy()) / np.float32(len(xs))
    if cls == "Rescaling":
        scale, offset = cfg.get("scale", 1.0), cfg.get("offset", 0.0)
        if not all(isinstance(v, (int, float)) for v in (scale, offset)):
            raise UnsupportedModelError(f"{what}: only scalar scale and offset")
        s, o = np.float32(scale), np.float32(offset)

        def rescale(xs: list[np.ndarray]) -> np.ndarray:
            y = np.multiply(xs[0], s)
            y += o
            return y
        return rescale
    if cls == "ChannelAffine":
        off = np.asarray(cfg["offset"], np.float32)
        sc = np.asarray(cfg["scale"], np.float32)

        def affine(xs: list[np.ndarray]) -> np.ndarray:
            y = np.array(xs[0], dtype=np.float32, order="C")  # a copy: the input is the caller's
            _per_channel(y, off, np.subtract)
            return _per_channel(y, sc, np.multiply)
        return affine
    if cls == "Normalization":
        return _normalization_op(cfg, _in_shape(layer), what)
    if cls == "ScaledLogSoftmax":
        t = np.float32(cfg["temperature"])
        return lambda xs: _log_softmax(xs[0] / t)
    if cls == "ChannelAttention1D":
        c = int(cfg["channels"])
        k = int(cfg.get("kernel_size", 3))
        c_in = int(_in_shape(layer)[-1])
        try:
            conv_g, dense_g = group["conv"], group["dense"]
        except (KeyError, TypeError):
            raise UnsupportedModelError(f"{what}: weights not found in the weight file") from None
        kern, kb = _weights(conv_g, 2, [(k, c_in, c), (c,)], what + " conv")
        dk, db = _weights(dense_g, 2, [(2 * c, c), (c,)], what + " dense")

        def attention(xs: list[np.ndarray]) -> np.ndarray:
            y = conv1d(xs[0], kern, kb, 1, "same")
            w = np.concatenate([_max_over_length(y), _mean_over_length(y)], axis=-1) @ dk + db
            flat = y.reshape(len(y), -1)  # y * w[:, None, :] with a long inner loop
            np.multiply(flat, np.tile(_sigmoid(w), (1, y.shape[1])), out=flat)
            return y
        return attention
    raise UnsupportedModelError(f"layer class {cls!r} (layer {cfg.get('name')!r})")


# --------------------------------------------------------------------------
# the graph
# --------------------------------------------------------------------------
#: Layer classes :class:`NumpyGraph` evaluates (plus nested ``Functional`` models and inputs).
SUPPORTED_LAYERS = ("Conv1D", "Dense", "BatchNormalization", "ReLU", "Activation", "MaxPooling1D",
                    "GlobalAveragePooling1D", "Flatten", "Add", "Average", "Rescaling", "Dropout",
                    "Normalization", "ChannelAffine", "ScaledLogSoftmax", "ChannelAttention1D")


def _history(arg: Any) -> tuple[str, int, int]:
    if not (isinstance(arg, Mapping) and arg.get("class_name") == "__keras_tensor__"):
        raise UnsupportedModelError(f"a layer input that is not a tensor: {str(arg)[:80]}")
    name, node, index = arg["config"]["keras_history"]
    return str(name), int(node), int(index)


def _tensor_refs(value: Any) -> list[tuple[str, int, int]]:
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in _tensor_refs(v)]
    return [_history(value)]


@dataclass
class _Node:
    name: str
    op: Op
    inputs: list[tuple[str, int, int]]


@dataclass
class _Functional:
    """One (possibly nested) functional model: its nodes in topological order."""

    name: str
    inputs: list[str]
    outputs: list[tuple[str, int, int]]
    nodes: list[_Node] = field(default_factory=list)

    def __call__(self, xs: list[np.ndarray]) -> np.ndarray:
        if len(xs) != len(self.inputs):
            raise ValueError(f"model {self.name!r} takes {len(self.inputs)} input(s), got {len(xs)}")
        values: dict[tuple[str, int, int], np.ndarray] = {(n, 0, 0): x for n, x in zip(self.inputs, xs)}
        for node in self.nodes:
            values[(node.name, 0, 0)] = node.op([values[r] for r in node.inputs])
        return values[self.outputs[0]]


def _build_functional(cfg: Mapping[str, Any], group: Any) -> _Functional:
    conf = cfg["config"]
    layers = conf["layers"]
    used: dict[str, int] = {}
    ins = conf.get("input_layers") or []
    if ins and not isinstance(ins[0], (list, tuple)):  # one input: [name, node, index]
        ins = [ins]
    in_names = [str(r[0]) for r in ins]
    outs = conf.get("output_layers") or []
    if outs and not isinstance(outs[0], (list, tuple)):
        outs = [outs]
    if len(outs) != 1:  # refused when built, never at inference
        raise UnsupportedModelError(f"model {conf.get('name')!r} has {len(outs)} outputs (one is supported)")
    graph = _Functional(name=str(conf.get("name")), inputs=in_names,
                        outputs=[(str(o[0]), int(o[1]), int(o[2])) for o in outs])
    for layer in layers:
        cls = layer["class_name"]
        name = str(layer["config"]["name"])
        sub = None
        key = _unique(_snake(cls), used)  # counted whether or not the layer has weights
        if cls == "InputLayer":
            continue
        if group is not None and "layers" in group and key in group["layers"]:
            sub = group["layers"][key]
        nodes = layer.get("inbound_nodes") or []
        if len(nodes) != 1:
            raise UnsupportedModelError(f"layer {name!r} is called {len(nodes)} times (shared layers)")
        node = nodes[0]
        if node.get("kwargs") and any(v is not None for k, v in node["kwargs"].items()
                                      if k not in ("mask", "training")):
            raise UnsupportedModelError(f"layer {name!r} is called with keyword arguments")
        refs = _tensor_refs(node["args"][0] if len(node["args"]) == 1 else node["args"])
        if any(r[1] != 0 or r[2] != 0 for r in refs):
            raise UnsupportedModelError(f"layer {name!r}: multi-node or multi-output inputs")
        if cls in ("Functional", "Model"):
            op: Op = _build_functional(layer, sub)
        else:
            op = _layer_op(layer, sub)
        graph.nodes.append(_Node(name=name, op=op, inputs=refs))
    _optimise(graph)
    return graph


def _optimise(graph: _Functional) -> None:
    """Fold BatchNormalization into the Conv1D before it; let BN and ReLU work in place.

    Only where it cannot change a result: a node's output is overwritten or
    absorbed only when that node feeds nothing else (and is not a model output).
    """
    def users() -> dict[tuple[str, int, int], int]:
        count: dict[tuple[str, int, int], int] = {}
        for node in graph.nodes:
            for r in node.inputs:
                count[r] = count.get(r, 0) + 1
        for r in graph.outputs:
            count[r] = count.get(r, 0) + 2  # never overwrite or drop a model output
        return count

    by_name = {node.name: node for node in graph.nodes}
    count = users()
    renamed: dict[tuple[str, int, int], tuple[str, int, int]] = {}
    kept = []
    for node in graph.nodes:
        node.inputs = [renamed.get(r, r) for r in node.inputs]
        src = by_name.get(node.inputs[0][0]) if len(node.inputs) == 1 else None
        if isinstance(node.op, _Affine) and src is not None and isinstance(src.op, _Conv) \
                and src.op.act_name == "linear" and count.get(node.inputs[0], 0) == 1 \
                and (node.name, 0, 0) not in graph.outputs:
            src.op.fold(node.op)
            renamed[(node.name, 0, 0)] = node.inputs[0]
            continue
        kept.append(node)
    graph.nodes = kept
    count = users()
    produced = {(node.name, 0, 0) for node in graph.nodes if not isinstance(node.op, _View)}
    for node in graph.nodes:
        if isinstance(node.op, (_Affine, _ReLU, _Add)) and node.inputs[0] in produced \
                and count.get(node.inputs[0], 0) == 1:
            node.op.inplace = True


class NumpyGraph:
    """A saved Keras recogniser evaluated with numpy (float32, CPU).

    Parameters
    ----------
    config : dict
        The saved model's ``config.json``.
    weights : h5py.File or group
        Its ``model.weights.h5``.

    Attributes
    ----------
    input_shape : tuple
        ``(None, npix, channels)``, like ``keras.Model.input_shape``.
    """

    def __init__(self, config: Mapping[str, Any], weights: Any) -> None:
        if config.get("class_name") not in ("Functional", "Model"):
            raise UnsupportedModelError(f"model class {config.get('class_name')!r} (only functional models)")
        self._graph = _build_functional(config, weights)
        first = next((lay for lay in config["config"]["layers"] if lay["class_name"] == "InputLayer"), None)
        shape = (first or {}).get("config", {}).get("batch_shape") or (first or {}).get("config", {}).get(
            "batch_input_shape")
        if shape is None:
            raise UnsupportedModelError("no input shape in the model's configuration")
        self.input_shape: tuple[int | None, ...] = tuple(shape)
        self.name = self._graph.name

    @classmethod
    def from_keras_file(cls, path: str | Path) -> "NumpyGraph":
        """Read a Keras 3 ``.keras`` file (zip of ``config.json`` and ``model.weights.h5``)."""
        import h5py

        try:
            with zipfile.ZipFile(path) as z:
                config = json.loads(z.read("config.json"))
                blob = z.read("model.weights.h5")
        except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            raise UnsupportedModelError(f"{path}: not a readable Keras 3 model file ({exc})") from None
        with h5py.File(io.BytesIO(blob), "r") as h5:
            return cls(config, h5)

    #: Spectra evaluated together: the intermediate arrays of 32 spectra stay in the
    #: CPU caches and under glibc's mmap threshold (no page faults per call); 32 gave
    #: 0.56 ms per spectrum against 0.86 with 256 on the 2-core dev machine (one thread,
    #: the default model, reports/performance.md).
    chunk = 32

    def __call__(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits ``(N, C)`` float32 of model input ``(N, npix, channels)``, in chunks of
        ``min(batch_size, chunk)`` spectra."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 3 or tuple(x.shape[1:]) != tuple(self.input_shape[1:]):
            raise ValueError(f"expected input (N, {', '.join(map(str, self.input_shape[1:]))}), "
                             f"got {x.shape}")
        if len(x) == 0:
            out = self._graph([np.zeros((1, *x.shape[1:]), np.float32)])
            return np.zeros((0, *out.shape[1:]), np.float32)
        step = max(1, min(int(batch_size), self.chunk))
        parts = [self._graph([x[i:i + step]]) for i in range(0, len(x), step)]
        return np.concatenate(parts).astype(np.float32, copy=False)


def load_graph(path: str | Path) -> NumpyGraph:
    """:meth:`NumpyGraph.from_keras_file` (the registry's entry point)."""
    return NumpyGraph.from_keras_file(path)
