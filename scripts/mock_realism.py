#!/usr/bin/env python
"""Is the mock LAMOST release realistic?  Real vs mock F, G, K spectra.

Two sub-commands:

``derive``   measure the instrument/noise model on the real DR7 image-layout
             files of ``../shared/data/lamost`` and write
             ``lamost_ostar/data/lamost_instrument.npz`` (used by
             :mod:`lamost_ostar.mock`).

``compare``  for each of F, G, K draw real shared LAMOST spectra and mock
             spectra of the same class with S/N matched to the real ones, then

             * plot real vs mock side by side at similar S/N (PNG),
             * plot the median normalised flux shape and the median per-pixel
               S/N shape (flux*sqrt(ivar) / SNRG),
             * print a markdown table of per-band S/N (median flux*sqrt(ivar)),
               the median flux shape (band flux ratios) and line depths of Hbeta,
               Mg b, Na D and the Ca II triplet, real vs mock,

             and write the PNGs and ``table.md`` into ``--out``.

Usage::

    python scripts/mock_realism.py derive
    python scripts/mock_realism.py compare --out reports/mock_realism --n-mock 300
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
LAMOST = SHARED / "lamost"

# line windows (vacuum A): (feature lo, hi), (blue continuum lo, hi), (red continuum lo, hi)
LINES = {
    "Hbeta": ((4857.0, 4868.0), (4830.0, 4845.0), (4880.0, 4895.0)),
    "Mg b": ((5160.0, 5195.0), (5135.0, 5155.0), (5200.0, 5220.0)),
    "Na D": ((5889.0, 5900.0), (5865.0, 5880.0), (5910.0, 5925.0)),
    "Ca II 8542": ((8538.0, 8550.0), (8515.0, 8530.0), (8555.0, 8570.0)),
    "Ca II 8662": ((8658.0, 8670.0), (8640.0, 8652.0), (8675.0, 8690.0)),
}
SHAPE_BANDS = {"blue 4000-4500": (4000.0, 4500.0), "green 5000-5500": (5000.0, 5500.0),
               "red 6500-7000": (6500.0, 7000.0), "nir 8000-8500": (8000.0, 8500.0)}


def _manifest() -> list[dict[str, str]]:
    with open(LAMOST / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def cmd_derive(args: argparse.Namespace) -> int:
    from lamost_ostar.mock import derive_instrument

    rows = _manifest()
    snrg = [float(r["snrg"]) for r in rows if r["cls"] == "STAR" and r["snrg"]
            and float(r["snrg"]) > 0]
    paths = [LAMOST / r["file"] for r in rows
             if r["format"].startswith("LRS primary image") and r["verspipe"] >= "v2.7"]
    inst = derive_instrument(paths, snrg)
    out = Path(args.output)
    inst.save(out)
    print(f"instrument model from {inst.n_files} real DR2-DR8 star files, "
          f"{len(snrg)} SNRG values -> {out}")
    print(f"ln rho = {inst.rho_coef[1]:.3f} + {inst.rho_coef[0]:.3f} ln SNRG "
          f"(scatter {inst.rho_coef[2]:.2f});  log10 F_g = {inst.flux_coef[1]:.3f} + "
          f"{inst.flux_coef[0]:.3f} log10 SNRG (scatter {inst.flux_coef[2]:.2f})")
    return 0


# ---------------------------------------------------------------------------- measures
def _band_snr(wave, flux, ivar, lo, hi):
    m = (wave >= lo) & (wave < hi) & (ivar > 0) & (flux != 0)
    return float(np.median(flux[m] * np.sqrt(ivar[m]))) if m.sum() > 10 else np.nan


def _median_in(wave, flux, ivar, lo, hi):
    m = (wave >= lo) & (wave < hi) & (ivar > 0) & (flux != 0)
    return float(np.median(flux[m])) if m.sum() > 3 else np.nan


def _line_depth(wave, flux, ivar, spec):
    (a, b), (c1, c2), (d1, d2) = spec
    f = _median_in(wave, flux, ivar, a, b)
    cb = _median_in(wave, flux, ivar, c1, c2)
    cr = _median_in(wave, flux, ivar, d1, d2)
    return 1.0 - f / (0.5 * (cb + cr))


def _measures(wave, flux, ivar, snrg):
    out = {}
    from lamost_ostar.mock import BANDS
    for b, (lo, hi) in BANDS.items():
        out[f"S/N {b}"] = _band_snr(wave, flux, ivar, lo, hi)
    ref = _median_in(wave, flux, ivar, 5000.0, 5500.0)
    for name, (lo, hi) in SHAPE_BANDS.items():
        if name.startswith("green"):
            continue
        out[f"F({name.split()[0]})/F(green)"] = _median_in(wave, flux, ivar, lo, hi) / ref
    for name, spec in LINES.items():
        out[f"depth {name}"] = _line_depth(wave, flux, ivar, spec)
    return out


def _load_real(mk: str, which: str = "dr2-8"):
    """Real image-layout star spectra of class ``mk`` (pipeline letter).

    ``which``: ``"dr2-8"`` (pipeline v2.7+, what the noise model was measured on
    and what the default DR7 layout mimics) or ``"all"`` (also DR1, v2.6.4).
    """
    from lamost_ostar.io import read_spectrum

    out = []
    for r in _manifest():
        if r["mk"] != mk or r["cls"] != "STAR" or not r["format"].startswith("LRS primary"):
            continue
        if which == "dr2-8" and r["verspipe"] < "v2.7":
            continue
        try:
            s = read_spectrum(LAMOST / r["file"])
        except Exception:  # noqa: BLE001
            continue
        out.append((s, float(r["snrg"]), r["file"]))
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lamost_ostar.mock import MockConfig, simulate_spectra

    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    table_rows = []
    fig_ex, axes_ex = plt.subplots(3, 1, figsize=(13, 10), sharex=True)
    fig_sh, axes_sh = plt.subplots(3, 2, figsize=(14, 10), sharex=True)
    grid = None
    for ci, mk in enumerate(("F", "G", "K")):
        real = _load_real(mk, args.real)
        real_snr = np.array([x[1] for x in real])
        # mock with S/N matched to the real set: each mock draws a real S/N window
        target = real_snr[rng.integers(0, real_snr.size, args.n_mock)]
        # bucket the targets to use the snr_range option (vectorised batches)
        edges = np.quantile(real_snr, np.linspace(0, 1, 6))
        edges[0] *= 0.999
        edges[-1] *= 1.001
        flux_l, ivar_l, truth_l = [], [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = int(np.sum((target > lo) & (target <= hi)))
            if m == 0:
                continue
            sim = simulate_spectra(m, None, rng, grid="native", mk=[mk] * m,
                                   config=MockConfig(snr_range=(lo, hi)))
            flux_l.append(sim.flux)
            ivar_l.append(sim.ivar)
            truth_l += sim.truth
            grid = sim.wavelength
        mflux = np.concatenate(flux_l)
        mivar = np.concatenate(ivar_l)
        # statistics
        real_meas = [_measures(s.wavelength, s.flux, s.ivar, sn) for s, sn, _ in real]
        mock_meas = [_measures(grid, mflux[i], mivar[i], float(truth_l[i]["snr_g"]))
                     for i in range(mflux.shape[0])]
        keys = list(real_meas[0])
        for k in keys:
            rv = np.array([m[k] for m in real_meas], dtype=float)
            mv = np.array([m[k] for m in mock_meas], dtype=float)
            rq = np.nanpercentile(rv, [25, 50, 75])
            mq = np.nanpercentile(mv, [25, 50, 75])
            table_rows.append((mk, k, rq, mq, len(real), mflux.shape[0]))
        # normalised median shapes on the native grid
        def _shape(wave_list, flux_list, ivar_list):
            out = []
            for w, f, iv in zip(wave_list, flux_list, ivar_list):
                fi = np.interp(grid, w, np.where(iv > 0, f, np.nan), left=np.nan, right=np.nan)
                fi /= np.nanmedian(fi[(grid > 5000) & (grid < 5500)])
                out.append(fi)
            return np.nanmedian(np.array(out), axis=0)

        def _snshape(wave_list, flux_list, ivar_list, snrs):
            out = []
            for w, f, iv, sn in zip(wave_list, flux_list, ivar_list, snrs):
                s = np.where(iv > 0, f * np.sqrt(np.maximum(iv, 0)), np.nan) / sn
                out.append(np.interp(grid, w, s, left=np.nan, right=np.nan))
            return np.nanmedian(np.array(out), axis=0)

        rw = [s.wavelength for s, _, _ in real]
        rf = [s.flux for s, _, _ in real]
        ri = [s.ivar for s, _, _ in real]
        r_snrg = [max(s.snr.get("g", sn), 0.1) for s, sn, _ in real]
        m_snrg = [max(float(t["snr_g"]), 0.1) for t in truth_l]
        ax = axes_sh[ci, 0]
        ax.plot(grid, _shape(rw, rf, ri), "k", lw=0.7, label=f"real (n={len(real)})")
        ax.plot(grid, _shape([grid] * len(mflux), mflux, mivar), "r", lw=0.7, alpha=0.8,
                label=f"mock (n={len(mflux)})")
        ax.set_ylabel(f"{mk}: median F / F(5000-5500)")
        ax.set_ylim(0, 2.5)
        ax.legend(fontsize=8)
        ax = axes_sh[ci, 1]
        ax.plot(grid, _snshape(rw, rf, ri, r_snrg), "k", lw=0.7, label="real")
        ax.plot(grid, _snshape([grid] * len(mflux), mflux, mivar, m_snrg), "r", lw=0.7,
                alpha=0.8, label="mock")
        ax.set_ylabel(f"{mk}: median (flux*sqrt(ivar))/SNRG")
        ax.set_ylim(0, 4)
        ax.legend(fontsize=8)
        # one real and one mock example at similar S/N (closest to the real median S/N)
        ir = int(np.argmin(np.abs(real_snr - np.median(real_snr))))
        s_real, sn_real, fname = real[ir]
        im = int(np.argmin(np.abs(np.array(m_snrg) - s_real.snr.get("g", sn_real))))
        ax = axes_ex[ci]
        ok = (s_real.ivar > 0) & (s_real.flux != 0)
        ax.plot(s_real.wavelength[ok], s_real.flux[ok] / np.median(s_real.flux[ok]), "k", lw=0.5,
                label=f"real {s_real.pipeline_subclass} SNRG={s_real.snr.get('g', sn_real):.1f} "
                      f"({Path(fname).name})")
        okm = (mivar[im] > 0) & (mflux[im] != 0)
        ax.plot(grid[okm], mflux[im][okm] / np.median(mflux[im][okm]) + 1.0, "r", lw=0.5,
                label=f"mock {truth_l[im]['subclass']} SNRG={m_snrg[im]:.1f} "
                      f"E(B-V)={truth_l[im]['ebv']:.2f} ({truth_l[im]['template1']})")
        ax.set_ylabel("normalised flux (+offset)")
        ax.legend(fontsize=8, loc="upper right")
        ax.set_ylim(-0.2, 3.6)
    axes_ex[-1].set_xlabel("vacuum wavelength [A]")
    fig_ex.suptitle("Real LAMOST (black) vs mock (red) F, G, K spectra at similar S/N")
    fig_ex.tight_layout()
    fig_ex.savefig(outdir / "real_vs_mock_examples.png", dpi=90)
    for ax in axes_sh[-1]:
        ax.set_xlabel("vacuum wavelength [A]")
    fig_sh.suptitle("Median flux shape and per-pixel S/N shape: real (black) vs mock (red)")
    fig_sh.tight_layout()
    fig_sh.savefig(outdir / "real_vs_mock_shapes.png", dpi=90)

    lines = ["| class | statistic | real median [IQR] | mock median [IQR] |",
             "|---|---|---|---|"]
    for mk, k, rq, mq, nr, nm in table_rows:
        lines.append(f"| {mk} | {k} | {rq[1]:.3g} [{rq[0]:.3g}, {rq[2]:.3g}] | "
                     f"{mq[1]:.3g} [{mq[0]:.3g}, {mq[2]:.3g}] |")
    counts = {mk: (nr, nm) for mk, _, _, _, nr, nm in table_rows}
    which = {"dr2-8": "DR2-DR8 (pipeline v2.7+)", "all": "DR1-DR8"}[args.real]
    head = (f"Real: shared LAMOST files ({which} image layouts) with pipeline class F/G/K; "
            "mock: `simulate_spectra` of the same class, S/N drawn to match the real SNRG "
            f"distribution of that class (seed {args.seed}). Counts real/mock: "
            + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in counts.items()) + ".\n"
            "S/N x = median flux*sqrt(ivar) in the band window; F(x)/F(green) = median flux "
            "ratio to 5000-5500 A; depth = 1 - F(line)/mean(F(side bands)).\n\n")
    text = head + "\n".join(lines) + "\n"
    (outdir / "table.md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("derive", help="measure the instrument model on real DR7 files")
    d.add_argument("--output", default=str(REPO / "lamost_ostar" / "data" / "lamost_instrument.npz"))
    c = sub.add_parser("compare", help="real vs mock figures and statistics")
    c.add_argument("--out", default=str(REPO / "reports" / "mock_realism"))
    c.add_argument("--n-mock", type=int, default=300)
    c.add_argument("--seed", type=int, default=7)
    c.add_argument("--real", choices=["dr2-8", "all"], default="dr2-8",
                   help="which real files to compare with (default: DR2-DR8, the noise "
                        "model's source; 'all' adds the DR1 files)")
    args = p.parse_args(argv)
    if not LAMOST.is_dir():
        print(f"shared LAMOST data not found at {LAMOST}", file=sys.stderr)
        return 2
    return cmd_derive(args) if args.cmd == "derive" else cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
