#!/usr/bin/env python
"""Leave-one-star-out evaluation of the O-star detector: ``reports/loso/report.md``.

Usage::

    nice -n 10 python scripts/evaluate_loso.py --out reports/loso [--profile full]
        [--models cnn2,cnn1,lr2,lr1] [--folds 0,1,...] [--seed 0]
    python scripts/evaluate_loso.py --out reports/loso --reanalyse    # tables/report from the saved OOF data
    python scripts/evaluate_loso.py --out runs/loso --reanalyse --merge runs/loso_a,runs/loso_b \
        --ensemble cnn2d,lr2                                          # parallel halves + an ensemble
    python scripts/evaluate_loso.py --out runs/loso_pooled --reanalyse --pool runs/loso_s0,runs/loso_s1

Same as ``lamost-ostar evaluate --protocol loso`` with progress printed.  Every
real O star of the template library is held out in turn (see
:mod:`lamost_ostar.loso` for the protocol and the report for the data behind
every number).  ``--reanalyse`` recomputes the temperature, operating points,
tables and report from the ``oof_<model>.npz`` files already in ``--out``
(e.g. after adding a model kind run separately into the same folder).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from lamost_ostar import loso
from lamost_ostar.models.decision import snr_floor_in_force

REPO = Path(__file__).resolve().parents[1]


def _apply_rule(rules_file: Path, out: Path, class_veto: bool = True, min_snr_g: float | None = None,
                interstellar: bool = False) -> None:
    """Every model in both runs: the other run's operating point on ``out``'s out-of-fold data."""
    rules = json.loads(rules_file.read_text())["models"]
    mine = json.loads((out / "results.json").read_text())["models"]
    applied = {}
    for m in sorted(set(rules) & set(mine)):
        t = loso.apply_rule(out, m, rules[m]["operating_point"], class_veto=class_veto, min_snr_g=min_snr_g,
                            interstellar=interstellar)
        applied[m] = {"rule_from": str(rules_file), "operating_point": rules[m]["operating_point"],
                      "class_veto": class_veto, "min_snr_g": snr_floor_in_force(min_snr_g),
                      "interstellar": interstellar, "tables": t}
        pct = loso._pct
        print(f"{m}: O recall (star-averaged, S/N >= 10) {pct(t['o_recall_star_averaged_snr_ge_10'])}, "
              f"B->O {pct(t['b_to_o'])} (B0-B1 {pct(t['b0_b1_to_o'])}), X->O {pct(t['x_to_o'])}, "
              f"false O per million {loso._num(t['false_o_per_million'])}, "
              f"real LAMOST {t['real_lamost_candidates']}/{t['real_lamost_n']}")
    name = "applied_rule_interstellar.json" if interstellar else "applied_rule.json"
    (out / name).write_text(json.dumps(applied, indent=1, default=loso._json_default))


def build_parser() -> argparse.ArgumentParser:
    """The script's options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "loso")
    ap.add_argument("--profile", default="full", choices=["tiny", "quick", "full"])
    ap.add_argument("--models", default=None, help="comma-separated model kinds")
    ap.add_argument("--folds", default=None, help="comma-separated fold numbers")
    ap.add_argument("--gan-iterations", type=int, default=None)
    ap.add_argument("--n-per-class", type=int, default=None,
                    help="training realisations per class (DetectorRecipe.n_per_class; default: the "
                         "profile's, 600 for full); the blue-only share of --mkclass-fraction scales with it")
    ap.add_argument("--mkclass-fraction", type=float, default=None,
                    help="blue-only MKCLASS standards added to every class, as a fraction of n_per_class "
                         "(DetectorRecipe.mkclass_fraction; default 0: none); each fold leaves out the "
                         "standards near its held-out stars (datasets.mkclass_neighbours)")
    ap.add_argument("--emission-fraction", type=float, default=None,
                    help="share of the O and B training realisations given Be/Oe-like Balmer emission "
                         "(DetectorRecipe.emission_fraction; default 0: none)")
    ap.add_argument("--interstellar-training", action="store_true",
                    help="train on realisations with the interstellar lines and diffuse bands of their E(B-V) "
                         "(DetectorRecipe.interstellar; default: continuum reddening only)")
    ap.add_argument("--interstellar-tests", action="store_true",
                    help="also test on o_ism / b_ism: the O and B test realisations again, same draws, with the "
                         "interstellar lines and diffuse bands of their E(B-V) (LosoConfig.interstellar_tests)")
    ap.add_argument("--interstellar", action="store_true",
                    help="with --apply-rule: the O and B rows are the interstellar twins (o_ism, b_ism); "
                         "writes applied_rule_interstellar.json")
    ap.add_argument("--add-interstellar-twins", action="store_true",
                    help="score the interstellar twins a finished run lacks (o_ism, b_ism, survey_ism) with its "
                         "saved fold models, on its own data drawn again (loso.add_interstellar_twins); "
                         "run it on each part before --merge")
    ap.add_argument("--replace-twins", action="store_true",
                    help="with --add-interstellar-twins: draw the twins the run has again too")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--reanalyse", action="store_true")
    ap.add_argument("--add-lamost-others", action="store_true",
                    help="with --reanalyse: first score the real non-star LAMOST files with the run's saved "
                         "fold models (runs made before the protocol included them)")
    ap.add_argument("--merge", default=None,
                    help="with --reanalyse: comma-separated run folders of disjoint folds (run in parallel) "
                         "merged into --out first")
    ap.add_argument("--pool", default=None,
                    help="with --reanalyse: comma-separated complete runs of different seeds (merged, with "
                         "their ensembles) pooled into --out first: the operating point on twice the data")
    ap.add_argument("--ensemble", action="append", default=[],
                    help="with --reanalyse: comma-separated model kinds whose calibrated log probabilities "
                         "are averaged into a model 'ens-A-B' (repeatable)")
    ap.add_argument("--apply-rule", type=Path, default=None,
                    help="a results.json of another run (e.g. the pooled run a shipped model's rule comes "
                         "from): apply its operating point, unchanged, to --out's out-of-fold data (a clean "
                         "check on a run made after the rule was chosen; --out must be analysed first); "
                         "writes applied_rule.json in --out")
    ap.add_argument("--max-false-per-million", type=float, default=100.0,
                    help="with --reanalyse: the false-O budget of the operating point (per million non-O "
                         "of the survey mix; default 100, the issue's target)")
    ap.add_argument("--no-class-veto", dest="class_veto", action="store_false",
                    help="with --reanalyse / --apply-rule: let real LAMOST files the pipeline calls GALAXY or "
                         "QSO be candidates (the scan's --no-class-veto; default: vetoed, as the scan does)")
    ap.add_argument("--min-snr-g", type=float, default=None,
                    help="with --reanalyse / --apply-rule: the stage's S/N floor (no candidate below it; "
                         "default: the scan's, 3; 0: none)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.add_interstellar_twins:
        models = sorted(p.stem[4:].replace("_", "+") for p in args.out.glob("oof_*.npz")
                        if not p.stem.startswith("oof_ens-"))
        n = loso.add_interstellar_twins(args.out, models, args.data_dir, log=lambda m: print(m, flush=True),
                                        replace=args.replace_twins)
        print(f"{n} twin spectra added per model ({', '.join(models)})")
        return
    if args.apply_rule is not None:
        return _apply_rule(args.apply_rule, args.out, args.class_veto, args.min_snr_g, args.interstellar)
    if args.reanalyse:
        if args.merge:
            loso.merge_runs(args.merge.split(","), args.out)
        if args.pool:
            loso.pool_runs(args.pool.split(","), args.out)
        for members in args.ensemble:
            loso.ensemble_oof(args.out, members.split(","))
        prev = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").exists() else {}
        models = sorted(p.stem[4:].replace("_", "+") for p in args.out.glob("oof_*.npz"))
        if args.add_lamost_others:
            loso.add_lamost_others(args.out, models, args.data_dir)
        res = loso.analyse(args.out, models, loso.CLASSES_8, max_false_per_million=args.max_false_per_million,
                           class_veto=args.class_veto, min_snr_g=args.min_snr_g)
        res["max_false_per_million"] = args.max_false_per_million
        for key in ("config", "o_units", "folds", "total_seconds", "real_lamost_files", "environments"):
            if key in prev:
                res[key] = prev[key]
        folds_file = args.out / "folds.json"
        if folds_file.exists():
            f = json.loads(folds_file.read_text())
            if "folds" not in res:
                res.update(config=f["config"], o_units=f["o_units"], folds=f["folds"])
            # who ran the folds: the folds' own record, merged or pooled
            res["environments"] = f.get("environments", res.get("environments", []))
        if args.pool:
            res["per_run"] = loso.per_run_summary(args.pool.split(","))
        (args.out / "results.json").write_text(json.dumps(res, indent=1, default=loso._json_default))
        (args.out / "report.md").write_text(loso.render_report(res))
        print(f"report: {args.out / 'report.md'}")
        return
    cfg = config_from_args(args)
    path = loso.run_loso(cfg, args.out, data_dir=args.data_dir, log=lambda m: print(m, flush=True))
    print(f"report: {path}")


def config_from_args(args: argparse.Namespace) -> "loso.LosoConfig":
    """The run's :class:`lamost_ostar.loso.LosoConfig`: the profile's, with the options given."""
    cfg = loso.LosoConfig.from_profile(args.profile, seed=args.seed)
    if args.models:
        cfg.models = tuple(args.models.split(","))
    if args.folds:
        cfg.folds = tuple(int(k) for k in args.folds.split(","))
    if args.gan_iterations is not None:
        cfg.gan_iterations = args.gan_iterations
    recipe = {"n_per_class": args.n_per_class, "mkclass_fraction": args.mkclass_fraction,
              "emission_fraction": args.emission_fraction, "interstellar": args.interstellar_training or None}
    cfg.recipe = dataclasses.replace(cfg.recipe, **{k: v for k, v in recipe.items() if v is not None})
    cfg.interstellar_tests = args.interstellar_tests
    return cfg


if __name__ == "__main__":
    main()
