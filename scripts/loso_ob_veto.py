#!/usr/bin/env python
"""Try an O/B He I 4471 / He II 4541 veto on a LOSO run's out-of-fold data (reports/loso/run6).

Usage::

    python scripts/loso_ob_veto.py runs/loso7_s5 [--ratio 3] [--edge 0.36] [--model ens-cnn2dx-lr2]

``ob_sigma = (EW(He I 4471) - ratio * EW(He II 4541) - edge) / error`` from the
box EWs and errors stored in the out-of-fold data (``edge`` = the highest
value of the noise-free O templates at ``ratio`` 3: HD 30614, O9.5 Iae).  The
hot-subdwarf veto's index (``sdo_sigma``) is replaced by the larger of the two
significances, so one threshold -- the 99th percentile of the held-out O
spectra, as for the sdO veto -- vetoes either kind, and :func:`loso.analyse`
re-chooses the operating point and the nested rules with it.  Prints, without
and with the veto, the operating point's and the nested rule's figures, and
which fraction of HD 34816's (lambda Lep, B0.5 IV) survey realisations the veto
drops per S/N bin.  Nothing is written.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lamost_ostar import loso


def ob_sigma(d, ratio: float, edge: float) -> np.ndarray:
    e71, e41 = d["ew_hei_4471"].astype(float), d["ew_heii_4541"].astype(float)
    s71, s41 = d["ew_hei_4471_err"].astype(float), d["ew_heii_4541_err"].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (e71 - ratio * e41 - edge) / np.sqrt(s71 ** 2 + ratio ** 2 * s41 ** 2)
    return np.where(np.isfinite(z), z, np.nan)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--ratio", type=float, default=3.0)
    ap.add_argument("--edge", type=float, default=0.36)
    ap.add_argument("--model", default="ens-cnn2dx-lr2")
    args = ap.parse_args(argv)
    original = loso._line_indices

    def with_ob(d):
        out = original(d)
        out["sigma"] = np.fmax(out["sigma"], ob_sigma(d, args.ratio, args.edge))
        return out

    for tag in ("without", "with"):
        loso._line_indices = with_ob if tag == "with" else original
        res = loso.analyse(args.run, [args.model], loso.CLASSES_8)
        for rule in ("operating_point", "nested"):
            t = res["models"][args.model]["tables"][rule]
            print(f"{tag} O/B veto, {rule}: O recall {100 * t['o_recall_star_averaged_snr_ge_10']:.1f} %, "
                  f"B->O {100 * t['b_to_o']:.2f} %, X->O {100 * t['x_to_o']:.1f} %, "
                  f"false O per million {t['false_o_per_million']:.0f}, real LAMOST {t['real_lamost_candidates']}")
    loso._line_indices = original
    d = loso.load_oof(args.run / f"oof_{loso._safe(args.model)}.npz")
    ob = ob_sigma(d, args.ratio, args.edge)
    sets, star, snr = d["set"].astype(str), d["star"].astype(str), d["snr_g"].astype(float)
    thr = float(np.nanpercentile(ob[sets == "o"], 99))
    lep = (star == "HD034816") & (sets == "survey")
    print(f"O spectra: 99th percentile of ob_sigma {thr:.2f}")
    for lo, hi in loso.SNR_BINS:
        s = lep & (snr >= lo) & (snr < hi)
        if s.any():
            print(f"  lambda Lep, S/N {lo:g}-{hi:g}: {int(s.sum())} spectra, vetoed {100 * np.mean(ob[s] > thr):.0f} %")


if __name__ == "__main__":
    main()
