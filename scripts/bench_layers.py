#!/usr/bin/env python
"""Speed of :class:`lamost_ostar.models.layers.LocallyConnected1D` vs ``Conv1D``.

Same input shape, filters, kernel, stride and padding; each layer wrapped in a
one-layer model.  "forward" = ``predict_on_batch`` (compiled graph),
"fwd+bwd" = ``train_on_batch`` with SGD and an MSE loss (forward, backward and
the weight update).  Median of ``--repeats`` timed calls after two warm-ups.

Usage::

    nice -n 10 python scripts/bench_layers.py [--batch 32] [--repeats 20]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from lamost_ostar.models.layers import LocallyConnected1D  # noqa: E402

#: (length, channels_in, filters, kernel_size, strides, padding): the LCGAN
#: generator's stages at npix = 3921, plus a strided case
CASES = [
    (981, 1, 16, 3, 1, "same"),
    (1962, 16, 8, 3, 1, "same"),
    (3924, 8, 8, 3, 1, "same"),
    (3924, 8, 1, 3, 1, "same"),
    (3921, 8, 16, 7, 2, "valid"),
]


def _model(layer_cls, length, cin, filters, k, s, padding):
    inp = keras.Input((length, cin))
    out = layer_cls(filters, k, strides=s, padding=padding)(inp)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    return model


def _median_time(fn, repeats):
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, batch {args.batch}")
    header = (f"{'length':>6} {'cin':>4} {'f':>3} {'k':>2} {'s':>2} {'pad':>5} | "
              f"{'LC params':>9} {'conv params':>11} | {'LC fwd ms':>9} {'conv fwd ms':>11} "
              f"{'ratio':>6} | {'LC f+b ms':>9} {'conv f+b ms':>11} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for length, cin, f, k, s, pad in CASES:
        x = rng.standard_normal((args.batch, length, cin)).astype("float32")
        row = {}
        for name, cls in (("lc", LocallyConnected1D), ("conv", keras.layers.Conv1D)):
            model = _model(cls, length, cin, f, k, s, pad)
            y = np.zeros((args.batch, *model.output_shape[1:]), "float32")
            row[name] = (
                model.count_params(),
                1e3 * _median_time(lambda m=model: m.predict_on_batch(x), args.repeats),
                1e3 * _median_time(lambda m=model, yy=y: m.train_on_batch(x, yy), args.repeats),
            )
        (lp, lf, lb), (cp, cf, cb) = row["lc"], row["conv"]
        print(f"{length:>6} {cin:>4} {f:>3} {k:>2} {s:>2} {pad:>5} | {lp:>9} {cp:>11} | "
              f"{lf:>9.2f} {cf:>11.2f} {lf / cf:>6.2f} | {lb:>9.2f} {cb:>11.2f} {lb / cb:>6.2f}")


if __name__ == "__main__":
    main()
