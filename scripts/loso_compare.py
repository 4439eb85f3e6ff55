#!/usr/bin/env python
"""Headline figures of several leave-one-star-out runs side by side (one model kind).

Usage::

    python scripts/loso_compare.py reports/loso/run6/seed5 runs/mk_s5 [--model ens-cnn2dx-lr2]

For each run folder (its ``results.json``, after ``evaluate_loso.py --reanalyse``;
``applied_rule.json`` too where ``--apply-rule`` wrote one) prints a Markdown table
of the operating point, the nested rule and the applied rule (``applied_rule*.json``): star-averaged O
recall at S/N >= 10, B->O, B0-B1->O, X->O, false O per million non-O of the
survey mix and the real LAMOST candidates; then the O recall (S/N >= 10) of
every O unit under the nested and the applied rules, so that two runs of one seed (the same held-out realisations)
are compared star by star.  Reads only the stored tables: no out-of-fold data
needed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = (("o_recall_star_averaged_snr_ge_10", "O recall", "pct"), ("b_to_o", "B→O", "pct"),
        ("b0_b1_to_o", "B0–B1→O", "pct"), ("x_to_o", "X→O", "pct"),
        ("false_o_per_million", "false O / million", "num"))


def _fmt(v, kind: str) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f} %" if kind == "pct" else f"{v:.0f}"


def rows(run: Path, model: str) -> list[tuple[str, dict]]:
    """(rule label, table) pairs of one run."""
    res = json.loads((run / "results.json").read_text())
    tables = res["models"][model]["tables"]
    out = [("operating point", tables.get("operating_point")), ("nested", tables.get("nested"))]
    # applied_rule.json as --apply-rule writes it, applied_rule_<name>.json as reports/ keep it
    for applied in sorted(run.glob("applied_rule*.json")):
        a = json.loads(applied.read_text()).get(model)
        if a:
            out.append((f"rule of {a.get('rule_from')}", a.get("tables")))
    return [(label, t) for label, t in out if t]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--model", default="ens-cnn2dx-lr2")
    args = ap.parse_args(argv)
    print(f"model `{args.model}`\n")
    print("| run | rule | " + " | ".join(k[1] for k in KEYS) + " | real LAMOST |")
    print("|---|---|" + "---|" * (len(KEYS) + 1))
    per_star = {}
    for run in args.runs:
        for label, t in rows(run, args.model):
            cells = " | ".join(_fmt(t.get(k), kind) for k, _, kind in KEYS)
            print(f"| {run} | {label} | {cells} | {t.get('real_lamost_candidates')}/{t.get('real_lamost_n')} |")
            if label == "nested" or label.startswith("rule of"):
                per_star[f"{run} ({label})"] = t.get("o_recall_per_star") or {}
    stars = sorted({s for v in per_star.values() for s in v})
    if stars:
        print("\nO recall per O unit (S/N >= 10), nested and applied rules\n")
        print("| O unit | " + " | ".join(str(r) for r in per_star) + " |")
        print("|---|" + "---|" * len(per_star))
        for s in stars:
            cells = " | ".join(_fmt((v.get(s) or {}).get("snr_ge_10"), "pct") for v in per_star.values())
            print(f"| {s} | {cells} |")


if __name__ == "__main__":
    main()
