#!/usr/bin/env python
"""Balmer emission (Be / Oe discs) on a LOSO run's held-out O and B stars, under a fixed rule.

Usage::

    python scripts/loso_emission.py runs/mk_s17 --rule reports/loso/run8/pooled78/results.json \
        --members cnn2dx,lr2 --levels 0,5,15,40 --out reports/loso/emission/seed17

The run must be merged and analysed (``evaluate_loso.py --reanalyse --ensemble cnn2dx,lr2``) and made
with its fold models saved (the default).  Each fold's held-out O and B stars are realised again, as
the run's test sets are, with H-alpha emission of each ``--levels`` equivalent width (A; H-beta,
H-gamma, H-delta at 0.2, 0.06, 0.03 of it) added to the template, the same random draws at every
level; they are scored by that fold's saved models and the rule's operating points are applied
unchanged (see :mod:`lamost_ostar.robustness`).  Writes ``results.json`` and ``report.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lamost_ostar import loso, robustness


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished, analysed LOSO run folder with models/")
    ap.add_argument("--rule", type=Path, required=True, help="results.json holding the operating points")
    ap.add_argument("--members", default="cnn2dx,lr2", help="saved fold models (the ensemble's members)")
    ap.add_argument("--levels", default="0,5,15,40", help="H-alpha emission equivalent widths [A]")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    members = args.members.split(",")
    wanted = set(members) | {"ens-" + "-".join(members)}
    rules = {m: r["operating_point"] for m, r in json.loads(args.rule.read_text())["models"].items()
             if m in wanted}
    t0 = time.perf_counter()
    res = robustness.emission_probe(args.run, rules, members, [float(v) for v in args.levels.split(",")],
                                    log=lambda m: print(m, flush=True))
    res["rule_from"] = str(args.rule)
    res["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1, default=loso._json_default))
    (args.out / "report.md").write_text(robustness.render_emission(res, str(args.rule)))
    print(f"report: {args.out / 'report.md'} ({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
