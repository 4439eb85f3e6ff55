#!/usr/bin/env python
"""Train the packaged default 7-class model and register it in ``lamost_ostar/data/models/``.

Usage::

    nice -n 10 python scripts/train_default.py [--models-dir lamost_ostar/data/models]
        [--seed 0] [--epochs 30] [--gan-iterations 2000] [--gan-samples 150]
        [--n-train 300] [--n-eval 80]

Data: real LAMOST A/F/G/K/M spectra (``../shared/data/lamost``, star = DESIG)
and LAMOST-like realisations / mixtures of the packaged MILES + Pickles
templates (the six real O stars included), split by star 70/15/15 (see
:func:`lamost_ostar.datasets.build_seven_class_splits`).  The LCGAN is trained
on the training split's O spectra only.  A new version is always added; older
versions are never overwritten (delete them by hand if no longer wanted).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lamost_ostar.datasets import SplitPlan
from lamost_ostar.train import TrainConfig, train_default

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=REPO / "lamost_ostar" / "data" / "models")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--gan-iterations", type=int, default=2000)
    ap.add_argument("--gan-samples", type=int, default=150)
    ap.add_argument("--n-train", type=int, default=300, help="target spectra per class (train)")
    ap.add_argument("--n-eval", type=int, default=80, help="target spectra per class (validation, test)")
    args = ap.parse_args(argv)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                         gan_iterations=args.gan_iterations, gan_samples=args.gan_samples)
    plan = SplitPlan(n_per_class=(args.n_train, args.n_eval, args.n_eval))
    version, result = train_default(args.models_dir, config, plan=plan, data_dir=args.data_dir,
                                    verbose=2, progress=True)
    m = result.test_metrics
    print(f"version {version} in {args.models_dir}")
    print(f"T = {result.temperature:.3f}; test accuracy {m['accuracy']:.4f}; "
          f"O recall {m['o_recall']}; O precision {m['o_precision']}")
    print(json.dumps(result.timings, indent=1))


if __name__ == "__main__":
    main()
