#!/usr/bin/env python
"""Speed of :class:`lamost_ostar.models.layers.LocallyConnected1D` vs ``Conv1D``.

Same input shape, filters, kernel, stride and padding; each layer wrapped in a
one-layer model.  "forward" = ``predict_on_batch`` (compiled graph),
"fwd+bwd" = ``train_on_batch`` with SGD and an MSE loss (forward, backward and
the weight update).  Median of ``--repeats`` timed calls after two warm-ups.

With ``--models`` it also times, on random standardised spectra of the full
length (npix = 3921): one LCGAN and one SGAN training iteration (batch
``--gan-batch``), and one recogniser epoch over ``--n-spectra`` spectra (batch
64, 7 classes), and prints the parameter counts.

Usage::

    nice -n 10 python scripts/bench_layers.py [--batch 32] [--repeats 20] [--models]
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


def bench_models(args: argparse.Namespace) -> None:
    """Time GAN iterations and a recogniser epoch at full size."""
    from lamost_ostar.models import gan as G
    from lamost_ostar.models.recogniser import build_recogniser, train_recogniser

    npix = G.NPIX
    rng = np.random.default_rng(0)

    def spectra(n):
        x = 1 + 0.1 * rng.standard_normal((n, npix)).astype("float32")
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    print(f"\nfull-size models, npix {npix}")
    real = spectra(150)
    for make in (G.make_lcgan, G.make_sgan):
        keras.utils.set_random_seed(0)
        gan = make(npix)
        gan.fit(real, 3, args.gan_batch, progress=False)          # build + trace
        t0 = time.perf_counter()
        gan.fit(real, args.gan_iterations, args.gan_batch, progress=False)
        dt = (time.perf_counter() - t0) / args.gan_iterations
        print(f"{gan.kind}: generator {gan.generator.count_params():,} params, "
              f"discriminator {gan.discriminator.count_params():,} params; "
              f"{dt * 1e3:.0f} ms/iteration (batch {args.gan_batch}, "
              f"{args.gan_iterations} iterations) -> 2,000 iterations ~ {2000 * dt / 60:.1f} min")
    for n_classes in (7, 4):
        print(f"recogniser ({n_classes} classes): "
              f"{build_recogniser(n_classes, npix).count_params():,} params")
    x, y = spectra(args.n_spectra), rng.integers(0, 7, args.n_spectra)
    xv, yv = spectra(256), rng.integers(0, 7, 256)

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.last = time.perf_counter() - self.t0

    keras.utils.set_random_seed(0)
    timer = EpochTimer()
    model, _ = train_recogniser(x, y, xv, yv, epochs=2, batch_size=64, n_classes=7,
                                patience=10, callbacks=[timer])
    dt = timer.last  # the second epoch: no tracing
    print(f"recogniser epoch: {dt:.1f} s for {args.n_spectra} spectra (+256 validation), "
          f"batch 64 -> {args.n_spectra / dt:.0f} spectra/s")
    t0 = time.perf_counter()
    model.predict(x, batch_size=256, verbose=0)
    dt = time.perf_counter() - t0
    print(f"recogniser inference: {args.n_spectra / dt:.0f} spectra/s (batch 256)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", action="store_true",
                        help="also time full-size GAN iterations and a recogniser epoch")
    parser.add_argument("--gan-batch", type=int, default=32)
    parser.add_argument("--gan-iterations", type=int, default=20)
    parser.add_argument("--n-spectra", type=int, default=4000)
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
    if args.models:
        bench_models(args)


if __name__ == "__main__":
    main()
