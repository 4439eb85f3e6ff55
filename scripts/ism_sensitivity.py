#!/usr/bin/env python
"""Does the detector still find reddened O stars that show interstellar lines and bands?

Writes the same mock release twice -- identical stars, reddening, S/N, noise --
once as before (continuum reddening only) and once with the interstellar lines
and diffuse bands of the drawn E(B-V) (``MockConfig.interstellar``,
:mod:`lamost_ostar.interstellar`), scans both with ``lamost-ostar scan`` (the
model given, default: the packaged default) and compares the candidate
fraction by class and E(B-V) bin, S/N(g) >= 10.

This is a sensitivity test, not an accuracy figure: the packaged models were
trained on realisations of the same library stars the mock draws.  What it
measures is the change the interstellar features alone make.

``--lines N`` instead measures the He II / He I evidence (``loso.evidence``,
what the decision reads) on N O and N B realisations at E(B-V) 1.5-2.5 and
S/N 30-100, with and without the interstellar features (in memory, no model).

Usage::

    python scripts/ism_sensitivity.py /work/runs/ism --n 3000 --preset O=0.5,B=0.5 --seed 11
    python scripts/ism_sensitivity.py /work/runs/ism --lines 600 --seed 7
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np

EBV_BINS = ((0.0, 0.4), (0.4, 0.8), (0.8, 1.5), (1.5, 99.0))


def _write(out: str, args, interstellar: bool) -> str:
    from lamost_ostar.mock import MockConfig, write_release

    d = os.path.join(out, "ism" if interstellar else "plain")
    cfg = MockConfig(n=args.n, preset=args.preset, seed=args.seed,
                     ebv_ranges={"O": (0.0, 2.5), "B": (0.0, 2.5)}, r_v_range=(2.8, 4.0),
                     resolution_range=(1500.0, 2200.0), interstellar=interstellar)
    if not os.path.isdir(d) or not os.listdir(d):
        write_release(d, cfg, workers=args.workers, progress=False)
    return d


def _scan(release: str, db: str, model: str | None, workers: int) -> None:
    if os.path.exists(db):
        os.remove(db)
    cmd = ["lamost-ostar", "scan", release, "--db", db, "--workers", str(workers), "--no-progress"]
    if model:
        cmd += ["--model", model]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _rows(release: str, db: str) -> list[dict]:
    out = db + ".csv"
    subprocess.run(["lamost-ostar", "query", "--db", db, "--all", "-o", out, "--overwrite"], check=True,
                   stdout=subprocess.DEVNULL)
    with open(out, newline="") as fh:
        res = {os.path.relpath(r["path"], release): r for r in csv.DictReader(fh)}
    with open(os.path.join(release, "truth.csv"), newline="") as fh:
        truth = list(csv.DictReader(fh))
    rows = []
    for t in truth:
        r = res.get(t["path"])
        if r is None:
            continue
        rows.append({"mk": t["mk"], "subclass": t["subclass"], "ebv": float(t["ebv"]),
                     "snr_g": float(t["snr_g"]), "star": t.get("template1", ""),
                     "cand": r.get("is_candidate") in ("True", "true", "1"),
                     "p_o": float(r["p_o"]) if r.get("p_o") not in (None, "") else np.nan,
                     "cls": r.get("predicted_class", "")})
    return rows


def _table(rows: list[dict]) -> dict:
    out: dict = {}
    for mk in sorted({r["mk"] for r in rows}):
        sel = [r for r in rows if r["mk"] == mk and r["snr_g"] >= 10]
        t = {"n": len(sel), "candidate_fraction": float(np.mean([r["cand"] for r in sel])) if sel else None}
        for lo, hi in EBV_BINS:
            b = [r for r in sel if lo <= r["ebv"] < hi]
            t[f"{lo}-{hi}"] = {"n": len(b),
                               "candidate_fraction": float(np.mean([r["cand"] for r in b])) if b else None,
                               "median_p_o": float(np.nanmedian([r["p_o"] for r in b])) if b else None}
        if mk == "B":
            early = [r for r in sel if r["subclass"][:2] in ("B0", "B1")]
            t["b0_b1"] = {"n": len(early),
                          "candidate_fraction": float(np.mean([r["cand"] for r in early])) if early else None}
        out[mk] = t
    return out


def _lines(n: int, seed: int) -> dict:
    from lamost_ostar import loso
    from lamost_ostar.mock import NATIVE_COEFF0, NATIVE_COEFF1, MockConfig, simulate_spectra
    from lamost_ostar.preprocess import prepare_arrays

    kw = dict(ebv_ranges={"O": (1.5, 2.5), "B": (1.5, 2.5)}, r_v_range=(2.8, 4.0),
              resolution_range=(1500.0, 2200.0), snr_range=(30.0, 100.0))
    out: dict = {}
    for mk in ("O", "B"):
        ev = {}
        for ism in (False, True):
            sim = simulate_spectra(n, f"{mk}=1", seed, grid="native", config=MockConfig(interstellar=ism, **kw))
            k = len(sim)
            prep = prepare_arrays(sim.flux, sim.ivar, sim.npix, andmask=sim.andmask,
                                  coeff0=np.full(k, NATIVE_COEFF0), coeff1=np.full(k, NATIVE_COEFF1), continuum=True)
            ev[ism] = loso.evidence(prep)
        early = np.array([t["subclass"][:2] in ("B0", "B1") for t in sim.truth])
        t = {}
        for key in ("heii_sigma", "hei_sigma", "heii_ew", "log_wprime", "sdo_sigma"):
            t[key] = [float(np.nanmedian(ev[f][key].astype(float))) for f in (False, True)]
        for key in ("heii_detected", "metal_veto"):
            t[key] = [float(np.mean(ev[f][key].astype(bool))) for f in (False, True)]
        if mk == "B":
            t["heii_detected_b0_b1"] = [float(np.mean(ev[f]["heii_detected"].astype(bool)[early]))
                                        for f in (False, True)]
            t["n_b0_b1"] = int(early.sum())
        out[mk] = t
        for key, v in t.items():
            if isinstance(v, list):
                print(f"{mk} {key:22s} plain {v[0]:8.3f}   interstellar {v[1]:8.3f}"
                      + ("   (median)" if key in ("heii_sigma", "hei_sigma", "heii_ew", "log_wprime", "sdo_sigma")
                         else "   (fraction)"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--preset", default="O=0.5,B=0.5")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--model", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lines", type=int, default=0, help="measure the line evidence on N O and N B spectra instead")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.lines:
        rep = {"lines": args.lines, "seed": args.seed, "evidence": _lines(args.lines, args.seed)}
        path = os.path.join(args.out, "ism_lines.json")
        with open(path, "w") as fh:
            json.dump(rep, fh, indent=1)
        print(f"written {path}")
        return 0
    t0 = time.time()
    report = {"n": args.n, "preset": args.preset, "seed": args.seed, "model": args.model or "default"}
    for flag in (False, True):
        rel = _write(args.out, args, flag)
        db = os.path.join(args.out, ("ism" if flag else "plain") + ".sqlite")
        _scan(rel, db, args.model, args.workers)
        report["interstellar" if flag else "plain"] = _table(_rows(rel, db))
    report["seconds"] = round(time.time() - t0, 1)
    path = os.path.join(args.out, "ism_sensitivity.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)
    for mk in report["plain"]:
        a, b = report["plain"][mk], report["interstellar"][mk]
        print(f"{mk}: candidates {a['candidate_fraction']:.3f} -> {b['candidate_fraction']:.3f} "
              f"(n={a['n']}, S/N>=10)")
        for lo, hi in EBV_BINS:
            k = f"{lo}-{hi}"
            if a[k]["n"]:
                print(f"   E(B-V) {k:>8}: {a[k]['candidate_fraction']:.3f} -> {b[k]['candidate_fraction']:.3f}"
                      f"  median p(O) {a[k]['median_p_o']:.3f} -> {b[k]['median_p_o']:.3f}  (n={a[k]['n']})")
        if "b0_b1" in a:
            print(f"   B0-B1: {a['b0_b1']['candidate_fraction']:.3f} -> {b['b0_b1']['candidate_fraction']:.3f}"
                  f" (n={a['b0_b1']['n']})")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
