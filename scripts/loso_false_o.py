#!/usr/bin/env python
"""Which non-O stars a leave-one-star-out run calls O (operating point and nested rule), per star.

Usage::

    python scripts/loso_false_o.py runs/loso6_s4 [--model ens-cnn2dx-lr2] [--top 10]

Reads ``results.json`` and ``oof_<model>.npz`` of a run folder (after
``evaluate_loso.py --reanalyse``) and prints a Markdown table: star, class,
subclass, test set (``survey``: the survey-preset mock; ``b`` / ``x``: the
fold's B stars / impostors over the full E(B-V) and S/N ranges), fold, number
of spectra, and how many the nested rule and the operating point call O.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lamost_ostar import loso


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--model", default="ens-cnn2dx-lr2")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args(argv)
    rows = loso.false_o_by_star(args.run, args.model)
    print(f"{args.run} ({args.model}): non-O stars called O\n")
    print("| star | class | subclass | set | fold | spectra | nested | operating point |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows[:args.top]:
        print(f"| {r['star']} | {r['label']} | {r['subclass']} | {r['set']} | {r['fold']} | {r['n']} | "
              f"{r['nested']} | {r['operating_point']} |")


if __name__ == "__main__":
    main()
