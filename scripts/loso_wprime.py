#!/usr/bin/env python
"""log W' (He I 4471 / He II 4541) of the spectra a fixed rule calls O, and of the O spectra it misses.

Usage::

    python scripts/loso_wprime.py runs/mk_s14 --rule reports/loso/run8/pooled78/results.json
        [--model ens-cnn2dx-lr2] [--stars b0v,o9v,HD036512] [--min-snr 10]

Applies the rule's operating point (as ``evaluate_loso.py --apply-rule`` does,
the scan's class veto in force) to an analysed run's out-of-fold data and prints
the 10th, 50th and 90th percentiles of the measured ``log_wprime``
(:mod:`lamost_ostar.lines`: log10 EW(He I 4471) / EW(He II 4541); undefined,
and left out, where either line is not measured in absorption) for: every
non-O spectrum called O; every O spectrum called O at S/N(g) >= ``--min-snr``;
and, per star of ``--stars``, its spectra called O and (O stars) those missed.
Whether the classic spectral-type criterion could separate the false O of a
held-out B0 dwarf from the late-O stars the rule finds.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lamost_ostar import loso


def _line(name: str, x: np.ndarray) -> str:
    fin = x[np.isfinite(x)]
    q = " / ".join(f"{v:.2f}" for v in np.percentile(fin, [10, 50, 90])) if fin.size else "-"
    return f"| {name} | {x.size} | {fin.size} | {q} |"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--rule", type=Path, required=True, help="results.json holding the operating point")
    ap.add_argument("--model", default="ens-cnn2dx-lr2")
    ap.add_argument("--stars", default="b0v,o9v,HD036512,HD057060+HD209975+o8iii")
    ap.add_argument("--min-snr", type=float, default=10.0)
    args = ap.parse_args(argv)

    op = json.loads(args.rule.read_text())["models"][args.model]["operating_point"]
    _, d, classes, probs, heii = loso._analysed_run(args.run, args.model)
    cand = loso.rule_candidates(op, classes, probs, heii, d)
    lw = d["log_wprime"].astype(float)
    label, star = d["label"].astype(str), d["star"].astype(str)
    bright = d["snr_g"].astype(float) >= args.min_snr
    is_o = label == "O"
    print(f"{args.run} ({args.model}, rule {args.rule}): log W' of ...")
    print("| spectra | n | log W' measured | p10 / p50 / p90 |")
    print("|---|---|---|---|")
    print(_line("non-O called O", lw[cand & ~is_o]))
    print(_line(f"O called O, S/N >= {args.min_snr:g}", lw[cand & is_o & bright]))
    for st in args.stars.split(","):
        mine = star == st
        if not mine.any():
            continue
        if is_o[mine].any():
            print(_line(f"{st}: found, S/N >= {args.min_snr:g}", lw[cand & mine & bright]))
            print(_line(f"{st}: missed, S/N >= {args.min_snr:g}", lw[~cand & mine & is_o & bright]))
        else:
            print(_line(f"{st}: called O", lw[cand & mine]))


if __name__ == "__main__":
    main()
