#!/usr/bin/env python
"""Try two standard GAN remedies against the paper's LCGAN losses on our O data.

The paper's LCGAN (binary cross-entropy, one-sided label smoothing, TTUR
RMSprop) does not learn held-out-star-like O spectra from our 3-5 real O stars
(``reports/evaluation/report.md``: GAN-train near 0).  This script checks
whether two common remedies change that, with everything else the same
(generator, discriminator, data, batch 16, learning rates):

* ``instance-noise``: Gaussian noise of ``--sigma`` (unit-RMS scale) added to
  the real *and* generated spectra the discriminator sees (Sønderby et al.
  2016), so it cannot win on fine texture alone;
* ``moment-matching``: the generator's loss gains ``--weight`` x the squared
  difference of the per-pixel batch mean and standard deviation of real and
  generated spectra (in units of the training set's residual RMS) - a
  data-space cousin of feature matching (Salimans et al. 2016).

For each chosen run of the evaluation protocol (same data as
``lamost_ostar.evaluate``: held-out O unit ``run mod 4``) it prints GAN-test /
GAN-train (NuSVC) of 200 samples at four checkpoints.

Usage::

    python scripts/gan_variants.py --variant paper --iterations 800 --runs 1,2
    python scripts/gan_variants.py --variant instance-noise --sigma 0.3 --runs 1,2
    python scripts/gan_variants.py --variant moment-matching --weight 1 --runs 1,2
"""
from __future__ import annotations

import argparse
import time

import keras
import numpy as np
from keras import ops

from lamost_ostar.datasets import library_realisations, load_lamost
from lamost_ostar.evaluate import EvalConfig, make_run_data, svm_scores
from lamost_ostar.models import gan
from lamost_ostar.templates import load_templates


class VariantGAN(gan.GANModel):
    """:class:`~lamost_ostar.models.gan.GANModel` with instance noise and/or moment matching."""

    sigma = 0.0       # instance-noise standard deviation (unit-RMS scale)
    weight = 0.0      # moment-matching weight
    residual_rms = 1.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_seed = keras.random.SeedGenerator(0)

    def call(self, inputs, training=False):
        real, z = inputs
        fake = self.generator(z, training=training)
        if training and self.sigma > 0:
            real = real + keras.random.normal(ops.shape(real), stddev=self.sigma, seed=self.noise_seed)
            fake = fake + keras.random.normal(ops.shape(fake), stddev=self.sigma, seed=self.noise_seed)
        out = self.discriminate(real, fake, training)
        out.update(real=real, fake=fake)
        return out

    def _gan_losses(self, y_pred):
        d_loss, g_loss = super()._gan_losses(y_pred)
        if self.weight:
            r, f = y_pred["real"], y_pred["fake"]
            dm = ops.mean(r, axis=0) - ops.mean(f, axis=0)
            ds = ops.std(r, axis=0) - ops.std(f, axis=0)
            g_loss = g_loss + self.weight * (ops.mean(dm**2) + ops.mean(ds**2)) / self.residual_rms**2
        return d_loss, g_loss


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["paper", "instance-noise", "moment-matching"], default="paper")
    ap.add_argument("--sigma", type=float, default=0.3, help="instance-noise standard deviation")
    ap.add_argument("--weight", type=float, default=1.0, help="moment-matching weight")
    ap.add_argument("--iterations", type=int, default=800)
    ap.add_argument("--runs", default="1,2", help="comma-separated run indices (held-out O unit = run mod 4)")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)

    cfg = EvalConfig.from_profile("small")
    lib = load_templates()
    o_all = library_realisations(lib.select("O"), cfg.n_real_o, np.random.default_rng(cfg.seed))
    fgk = load_lamost(args.data_dir, classes=("F", "G", "K"))
    VariantGAN.sigma = args.sigma if args.variant == "instance-noise" else 0.0
    VariantGAN.weight = args.weight if args.variant == "moment-matching" else 0.0
    for r in (int(a) for a in args.runs.split(",")):
        rng = np.random.default_rng([cfg.seed, r])
        run = make_run_data(cfg, r, rng, o_all, fgk, lib)
        keras.utils.set_random_seed(r)
        trainer = gan.GANTrainer(gan.build_lcgan_generator(run.ds1.npix), gan.build_discriminator(run.ds1.npix),
                                 kind="lcgan", model_class=VariantGAN)
        real = trainer._prepare(run.ds1.x)[..., 0]
        VariantGAN.residual_rms = float(np.sqrt(np.mean((real - real.mean(axis=0)) ** 2)))

        def report(it, tr, _path, run=run, r=r):
            s = svm_scores(run, tr.sample(cfg.n_small, seed=it), cfg, np.random.default_rng(1))
            print(f"{args.variant} run {r} (held out {run.held_out_o}) it {it}: GAN-test {s['gan_test']:.3f} "
                  f"GAN-train {s['gan_train']:.3f} balanced {s['gan_train_balanced']:.3f} "
                  f"d_loss {tr.history.d_loss[-1]:.2f} g_loss {tr.history.g_loss[-1]:.2f}", flush=True)

        t0 = time.perf_counter()
        trainer.fit(run.ds1.x, iterations=args.iterations, batch_size=16,
                    checkpoint_every=max(1, args.iterations // 4), callback=report, progress=False)
        print(f"run {r}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
