#!/usr/bin/env python
"""Run the paper's evaluation protocol and write ``reports/evaluation/report.md``.

Usage::

    nice -n 10 python scripts/evaluate_paper.py [--profile small] [--runs 4]
        [--gan-iterations 1000] [--out reports/evaluation] [--model-version V]
        [--survey-release DIR] [--no-survey]

Same as ``lamost-ostar evaluate`` with progress printed; see
:func:`lamost_ostar.evaluate.run_evaluation` for the protocol and the report
for the data behind every number.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lamost_ostar.evaluate import OVERRIDES, EvalConfig, render_from_results, run_evaluation

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="small", choices=["tiny", "small", "paper"])
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--gan-iterations", type=int, default=None)
    ap.add_argument("--checkpoint-every", type=int, default=None)
    ap.add_argument("--n-large", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--survey-n", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "evaluation")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--model-version", default=None)
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--survey-release", type=Path, default=None)
    ap.add_argument("--no-survey", action="store_true",
                    help="leave out the 7-class survey part (the GAN protocol only)")
    ap.add_argument("--rerender", action="store_true",
                    help="only rewrite report.md from the results.json already in --out")
    ap.add_argument("--survey-only", action="store_true",
                    help="only recompute the 7-class survey part of the report in --out")
    args = ap.parse_args(argv)
    if args.survey_only:
        from lamost_ostar.evaluate import update_survey

        path = update_survey(args.out, args.model_version, args.models_dir, args.data_dir,
                             args.survey_release, n=args.survey_n or 20000, seed=args.seed)
        print(f"report: {path}")
        return
    if args.rerender:
        print(f"report: {render_from_results(args.out)}")
        return
    cfg = EvalConfig.from_profile(args.profile, seed=args.seed).override(
        **{key: getattr(args, key) for key in OVERRIDES})
    if args.no_survey:
        cfg.survey = False
    path = run_evaluation(cfg, args.out, data_dir=args.data_dir, survey_release=args.survey_release,
                          model_version=args.model_version, models_dir=args.models_dir,
                          log=lambda *a: print(*a, flush=True))
    print(f"report: {path}")


if __name__ == "__main__":
    main()
