#!/usr/bin/env python
"""The numpy engine's Conv1D, per layer of a model: im2col copy against one product per tap.

Usage::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python scripts/bench_conv.py [--model VERSION] [--batch 32]

Records the shapes of every ``conv1d`` call of the model's numpy graph on one
batch, then times, for each shape with random inputs, ``im2col`` (the whole
batch copied to ``(n * out, k * c_in)`` columns and one matrix product: the
implementation before 3deceb2, kept here as the reference) against
:func:`lamost_ostar.models.numpy_runtime.conv1d` (which keeps im2col below 8
input channels and otherwise runs one batched product per tap on the strided
view).  Both are checked to agree; times are the mean of 5 calls, the second
of two alternations.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np

from lamost_ostar.models import numpy_runtime as nr
from lamost_ostar.models.registry import load_model


def im2col_conv1d(x, kernel, bias, stride, padding):
    """The reference: every layer as one im2col copy and one matrix product."""
    n, length, c_in = x.shape
    k = kernel.shape[0]
    if padding == "same":
        out, left, right = nr._same_pads(length, k, stride)
        if left or right:
            x = np.pad(x, ((0, 0), (left, right), (0, 0)))
    else:
        out = (length - k) // stride + 1
    span = (out - 1) * stride + 1
    if c_in < 8:
        win = np.lib.stride_tricks.sliding_window_view(x, k, axis=1)[:, ::stride][:, :out]
        y = win.reshape(n * out, c_in * k) @ kernel.transpose(1, 0, 2).reshape(c_in * k, -1)
    else:
        cols = np.empty((n, out, k, c_in), dtype=np.float32)
        for j in range(k):
            cols[:, :, j, :] = x[:, j:j + span:stride, :]
        y = cols.reshape(n * out, k * c_in) @ kernel.reshape(k * c_in, -1)
    y = y.reshape(n, out, -1)
    if bias is not None:
        nr._per_channel(y, bias, np.add)
    return y


def layer_shapes(graph, batch: int) -> Counter:
    """``(x shape, kernel shape, stride, padding)`` of every conv1d call on one batch."""
    calls = []
    real = nr.conv1d

    def record(x, kernel, bias, stride, padding):
        calls.append((x.shape, kernel.shape, stride, padding))
        return real(x, kernel, bias, stride, padding)

    x = np.random.default_rng(0).normal(size=(batch, graph.input_shape[1], graph.input_shape[2])).astype(np.float32)
    nr.conv1d = record
    try:
        graph(x)
    finally:
        nr.conv1d = real
    return Counter(calls)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model version [the packaged default]")
    ap.add_argument("--models-dir", default=None)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    graph = load_model(args.model, args.models_dir, engine="numpy").model
    rng = np.random.default_rng(1)
    total = {"im2col": 0.0, "conv1d": 0.0}
    for (xs, ks, stride, padding), count in layer_shapes(graph, args.batch).items():
        x = rng.normal(size=xs).astype(np.float32)
        kernel = rng.normal(size=ks).astype(np.float32)
        bias = rng.normal(size=ks[-1]).astype(np.float32)
        ref, got = im2col_conv1d(x, kernel, bias, stride, padding), nr.conv1d(x, kernel, bias, stride, padding)
        np.testing.assert_allclose(got, ref, atol=1e-3 * float(np.abs(ref).max()))
        t = {}
        for name, fn in (("im2col", im2col_conv1d), ("conv1d", nr.conv1d)) * 2:
            t0 = time.perf_counter()
            for _ in range(5):
                fn(x, kernel, bias, stride, padding)
            t[name] = (time.perf_counter() - t0) / 5 * count
        for name in total:
            total[name] += t[name]
        print(f"x {xs} kernel {ks} stride {stride} {padding}: im2col {t['im2col'] * 1e3:.2f} ms, "
              f"conv1d {t['conv1d'] * 1e3:.2f} ms ({t['conv1d'] / t['im2col'] - 1:+.0%})")
    print(f"all conv layers, batch {args.batch}: im2col {total['im2col'] * 1e3:.1f} ms, "
          f"conv1d {total['conv1d'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
