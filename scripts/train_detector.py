#!/usr/bin/env python
"""Train the packaged default O-star detector and register it in ``lamost_ostar/data/models/``.

Usage::

    nice -n 10 python scripts/train_detector.py --loso reports/loso/results.json
        [--models-dir lamost_ostar/data/models] [--epochs 30] [--seed 0] [--model-kind cnn2]
        [--calibration-from runs/pooled/results.json] [--clean-check runs/s9/applied_rule.json ...]

The two-channel recogniser is trained on LAMOST-like realisations of every
real template star plus the real LAMOST files (the recipe of the LOSO run);
its temperature and O-candidate rule are those the leave-one-star-out run
chose on held-out stars (:func:`lamost_ostar.train.train_detector`).
With ``--calibration-from`` the rule of ``--loso`` is applied unchanged to a
model of another recipe: the recipe and the temperatures come from that run's
``results.json`` (LOSO runs of the new recipe).  ``--clean-check`` adds the
figures of runs of other seeds scored with the rule (``evaluate_loso.py
--apply-rule``) to the card.  A new
version is always added; older versions are kept.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lamost_ostar.train import train_detector

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loso", type=Path, default=REPO / "reports" / "loso" / "results.json")
    ap.add_argument("--models-dir", type=Path, default=REPO / "lamost_ostar" / "data" / "models")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-kind", default="cnn2")
    ap.add_argument("--calibration-from", type=Path, default=None,
                    help="results.json of LOSO runs of the training recipe (recipe, temperatures, tables); "
                         "default: --loso")
    ap.add_argument("--clean-check", type=Path, action="append", default=[],
                    help="an applied_rule.json of another seed scored with the rule (repeatable)")
    args = ap.parse_args(argv)
    version, card = train_detector(args.models_dir, args.loso, epochs=args.epochs, seed=args.seed,
                                   data_dir=args.data_dir, model_kind=args.model_kind, verbose=2,
                                   calibration_results=args.calibration_from, clean_checks=args.clean_check)
    print(f"version {version} in {args.models_dir}")
    print("decision:", json.dumps(card["decision"], indent=1))
    print("timings:", json.dumps(card["metrics"]["timings"]))


if __name__ == "__main__":
    main()
