"""Validate :mod:`lamost_ostar.lines` and write ``reports/lines/validation.md`` + PNG.

Usage (from the repository root; needs ``../shared/data``)::

    nice -n 10 python scripts/validate_lines.py [--n 1000] [--seed 1] [--out reports/lines]
    nice -n 10 python scripts/validate_lines.py --speed      # timing only

Checks, all with the package's own code:

1. **Speed** of :func:`~lamost_ostar.lines.measure_lines` on batches of 256
   mock spectra on the common grid (best of repeated passes, process CPU time).
2. **Errors**: pull widths on synthetic spectra with Gaussian noise, and the
   scatter of the EWs of one template realised many times by
   :func:`lamost_ostar.mock.simulate_spectra` (the mock's own noise model,
   masks, radial velocities, reddening) against the median reported error.
3. **MKCLASS rectified standards** (``libraries/mkclass_standards/libr36``,
   averages of MK standards at ~3.6 A FWHM, air wavelengths converted to
   vacuum, resampled onto the grid): EWs of He II 4200/4541/4686/5411 and He I
   4026/4471/4922, Si III 4553 and log W' against spectral type O4-B5 for
   luminosity classes V, III, Ib/Ia.
4. **Real non-O spectra**: every readable file of ``lamost/`` (F/G/K/A/M, DR1-DR9
   layouts): ``heii_sigma`` distribution and false ``heii_detected`` rate, and
   the same for version 1 of the ``heii_lines`` plugin (re-implemented here,
   :func:`v1_heii_detected`, for the comparison).
5. **Mock spectra at S/N 5, 10, 20, 50** (``MockConfig(snr_range=...)``, narrow
   ranges around each value): He II detection rate of O stars (all packaged O
   templates, and each one alone), false rates for B0-B1 and later-B templates,
   and for the A-M templates (MILES stars), both with the matched-filter rule
   and with the box-EW estimator.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import time
import warnings
from pathlib import Path

import numpy as np

from lamost_ostar import lines as L
from lamost_ostar.preprocess import NPIX, grid_wavelength, resample, resample_arrays

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SNRS = (5, 10, 20, 50)
#: heii_sigma thresholds compared in the report
THRESHOLDS = (3.0, 3.5, 4.0, 5.0)
#: relative half-width of each S/N bin
SNR_HALF = 0.1
#: MKCLASS type codes (NutMaat encoding: 10 x code) and luminosity codes
MK_TYPES = {10: "O4", 20: "O5", 30: "O6", 40: "O7", 50: "O8", 60: "O9", 70: "B0",
            77: "B0.7", 80: "B1", 85: "B1.5", 90: "B2", 100: "B3", 120: "B5"}
MK_LUM = {0: "Ia", 10: "Ib", 30: "III", 50: "V"}
#: early-B templates (B0-B1.5) of the packaged library
EARLY_B = ("HD185859", "HD187879", "HD214080", "HD190603", "b0v", "b0i", "b1v", "b1i")
#: MILES "B8" star whose spectrum shows He II and no He I or Ca II K (see the report)
ODD_B = ("HD281679",)


# ----------------------------------------------------------------------------- helpers
def v1_heii_detected(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``heii_detected`` of version 1 of plugins/heii_lines.py (git 657086a), re-implemented.

    EW of He II 4686 over 4676-4698 A with a straight line through the *median*
    flux of the bands 4650-4668 and 4702-4720 A; detected when EW > 0.3 A and
    EW > 3 sigma.
    """
    wave = grid_wavelength()
    good = ~mask & np.isfinite(flux)
    il, ib, ir = (np.flatnonzero((wave >= a) & (wave <= b))
                  for a, b in ((4676.0, 4698.0), (4650.0, 4668.0), (4702.0, 4720.0)))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        cb = np.nanmedian(np.where(good[:, ib], flux[:, ib], np.nan), axis=1)
        cr = np.nanmedian(np.where(good[:, ir], flux[:, ir], np.nan), axis=1)
        wb, wr = wave[ib].mean(), wave[ir].mean()
        fc = cb[:, None] + (cr - cb)[:, None] / (wr - wb) * (wave[il][None, :] - wb)
        dl = np.gradient(wave)[il]
        g = good[:, il]
        ew = np.sum(np.where(g, 1.0 - flux[:, il] / fc, 0.0) * dl, axis=1)
        var = np.where(g & (ivar[:, il] > 0), 1.0 / ivar[:, il], 0.0)
        err = np.sqrt(np.sum(var * (dl / fc) ** 2, axis=1))
        frac = g.mean(axis=1)
        ew = np.where(frac > 0, ew / frac, np.nan)
        det = (ew > 0.3) & (ew > 3.0 * err) & (frac >= 0.5) & (cb > 0) & (cr > 0)
    return np.nan_to_num(det, nan=False).astype(bool)


def simulate(mk: str, n: int, snr: float | None, seed: int, templates):
    """Mock spectra through the same resampling as real files -> (flux, ivar, mask, truth)."""
    from lamost_ostar import mock

    cfg = mock.MockConfig(snr_range=None if snr is None else
                          (snr * (1 - SNR_HALF), snr * (1 + SNR_HALF)))
    sim = mock.simulate_spectra(n, mk=[mk] * n, rng=seed, grid="native", config=cfg,
                                templates=templates)
    f, i, m = resample_arrays(sim.flux, sim.ivar, sim.npix, andmask=sim.andmask,
                              coeff0=np.full(n, mock.NATIVE_COEFF0),
                              coeff1=np.full(n, mock.NATIVE_COEFF1))
    return f, i, m, sim.truth


def read_mkclass(data: Path):
    """The libr36 rectified standards O4-B5 on the grid: (types, lums, flux, ivar, mask)."""
    rows = []
    for p in sorted((data / "libraries" / "mkclass_standards" / "libr36").glob("t*.rbn")):
        mt = re.match(r"t(\d+)l(\d+)p00", p.stem)
        t, lum = int(mt.group(1)), int(mt.group(2))
        if t not in MK_TYPES or lum not in MK_LUM:
            continue
        d = np.loadtxt(p)
        rows.append((t, lum, d[:, 0], d[:, 1]))
    n = len(rows)
    width = max(r[2].size for r in rows)
    flux = np.zeros((n, width))
    wave = np.ones((n, width))
    ivar = np.zeros((n, width))
    lens = np.array([r[2].size for r in rows])
    for k, (_, _, w, f) in enumerate(rows):
        wave[k, :w.size] = L.air_to_vacuum(w)        # MKCLASS wavelengths are in air
        flux[k, :w.size] = f
        ivar[k, :w.size] = np.where(f > 0, 1e4, 0.0)  # noise-free: nominal S/N 100 per pixel
    fg, ig, mg = resample_arrays(flux, ivar, lens, wavelength=wave)
    return [r[0] for r in rows], [r[1] for r in rows], fg, ig, mg


def pct(x, q):
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return [float(v) for v in np.percentile(x, q)] if x.size else [float("nan")] * len(q)


def fmt(v, nd=2):
    return "–" if v is None or not np.isfinite(v) else f"{v:.{nd}f}"


# ----------------------------------------------------------------------------- checks
def check_speed(n_batches: int = 8, repeat: int = 5, seed: int = 0) -> dict:
    """CPU time of measure_lines on batches of 256 mock spectra (common grid)."""
    from lamost_ostar.templates import load_templates

    lib = load_templates()
    rng = np.random.default_rng(seed)
    mk = rng.choice(list("OBAFGKM"), 256 * n_batches)
    from lamost_ostar import mock

    sim = mock.simulate_spectra(mk.size, mk=list(mk), rng=seed, grid="native", templates=lib)
    f, i, m = resample_arrays(sim.flux, sim.ivar, sim.npix, andmask=sim.andmask,
                              coeff0=np.full(mk.size, mock.NATIVE_COEFF0),
                              coeff1=np.full(mk.size, mock.NATIVE_COEFF1))
    batches = [(f[k:k + 256], i[k:k + 256], m[k:k + 256]) for k in range(0, mk.size, 256)]
    L.measure_lines(*batches[0])
    best = np.inf
    best_wall = np.inf
    for _ in range(repeat):
        t0, w0 = time.process_time(), time.perf_counter()
        for b in batches:
            L.measure_lines(*b)
        best = min(best, time.process_time() - t0)
        best_wall = min(best_wall, time.perf_counter() - w0)
    nspec = 256 * len(batches)
    return {"us_per_spectrum_cpu": best / nspec * 1e6,
            "us_per_spectrum_wall": best_wall / nspec * 1e6,
            "batch": 256, "n_batches": len(batches), "repeat": repeat}


def check_pulls(lib, seed: int) -> dict:
    """Pull widths: synthetic Gaussian noise, and template-realisation scatter on the mock."""
    wave = grid_wavelength()
    rng = np.random.default_rng(seed)
    truth = {"heii_4200": 0.45, "heii_4541": 0.6, "heii_4686": 0.7, "heii_5411": 0.8,
             "hei_4471": 0.5, "hei_4026": 0.5, "hei_4922": 0.2}
    cont = 1.0 + 0.3 * (wave - 5000.0) / 5000.0
    depth = sum(e / (2.0 * np.sqrt(2 * np.pi))
                * np.exp(-0.5 * ((wave - L._BY_NAME[n].vacuum) / 2.0) ** 2)
                for n, e in truth.items())
    f0 = cont * (1.0 - depth)
    out: dict = {"synthetic": {}, "mock": {}}
    err = f0 / 15.0
    flux = f0 + err * rng.standard_normal((4000, NPIX))
    m = L.measure_lines(flux, np.broadcast_to(1 / err ** 2, flux.shape).copy())
    for name in ("heii_4200", "heii_4541", "heii_4686", "heii_5411", "hei_4471", "hei_5876",
                 "caii_k", "mgi_b", "hbeta"):
        j = m.column(name)
        t = truth.get(name, 0.0)
        exact = L._BY_NAME[name].sigma == 2.0 or t == 0.0
        out["synthetic"][name] = {
            "box": float(np.std((m.ew[:, j] - t) / m.ew_err[:, j])),
            "mf": float(np.std((m.ew_mf[:, j] - (t if exact else np.mean(m.ew_mf[:, j])))
                               / m.ew_mf_err[:, j])),
            "box_bias": float(np.mean(m.ew[:, j]) - t),
            "err_box": float(np.median(m.ew_err[:, j])),
            "err_mf": float(np.median(m.ew_mf_err[:, j]))}
    out["synthetic"]["heii_sigma_null_sd"] = float(np.std(
        L.measure_lines(cont + (cont / 12.0) * rng.standard_normal((4000, NPIX)),
                        np.broadcast_to(144.0 / cont ** 2, (4000, NPIX)).copy()).heii_sigma))
    for k, name in enumerate(("HD057061", "o9v", "HD003360")):
        tpl = lib.select(name=name)
        f, i, mk_, _ = simulate(str(tpl.mk[0]), 2000, 20, seed + 100 + k, tpl)
        mm = L.measure_lines(f, i, mk_)
        row = {}
        for line in ("heii_4541", "heii_4686", "heii_5411", "hei_4471", "hbeta"):
            j = mm.column(line)
            for est, ew, er in (("box", mm.ew[:, j], mm.ew_err[:, j]),
                                ("mf", mm.ew_mf[:, j], mm.ew_mf_err[:, j])):
                ok = np.isfinite(ew) & np.isfinite(er)
                row[f"{line}_{est}"] = float(np.std((ew[ok] - np.median(ew[ok])) / er[ok]))
        out["mock"][name] = row
    return out


def check_mkclass(data: Path) -> dict:
    types, lums, f, i, m = read_mkclass(data)
    meas = L.measure_lines(f, i, m)
    cols = ("heii_4200", "heii_4541", "heii_4686", "heii_5411", "hei_4026", "hei_4471",
            "hei_4922", "siiii_4553")
    rows = []
    for k, (t, lum) in enumerate(zip(types, lums)):
        rows.append({"type": MK_TYPES[t], "code": t, "lum": MK_LUM[lum],
                     **{c: float(meas.ew[k, meas.column(c)]) for c in cols},
                     "log_wprime": float(meas.log_wprime[k]),
                     "heii_ew": float(meas.heii_ew[k]),
                     "heii_detected": bool(meas.heii_detected[k])})
    return {"rows": rows, "cols": cols}


#: STELIB stars of SOURCES.md: O stars (modern types in brackets there) and early-B
#: impostors, plus B2-B5 stars without He II
STELIB_MODERN = {"HD046223": "O4V((f))", "HD093250": "O4III", "HD047129": "O8V+ (binary)",
                 "HR2422": "O8V+ (binary)", "HD188209": "O9.5Ib", "HR7589": "O9.5Ib"}


def check_stelib(data: Path) -> dict:
    """Raw STELIB O/B spectra (air, dereddened; EWs do not care), noise-free at S/N 100."""
    from astropy.io import fits

    root = data / "libraries" / "stelib"
    with open(root / "stelib_spectral_types.csv") as fh:
        rows = [r for r in csv.DictReader(fh)
                if r["spectype"].startswith(("O", "B0", "B1", "B2", "B3", "B5"))]
    fl, wv = [], []
    for r in rows:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = np.asarray(fits.getdata(root / r["file"]), dtype=np.float64)
        fl.append(d)
        wv.append(L.air_to_vacuum(float(r["crval1"]) + float(r["cdelt1"]) * np.arange(d.size)))
    lens = np.array([d.size for d in fl])
    n, width = len(fl), int(lens.max())
    flux = np.zeros((n, width))
    wave = np.ones((n, width))
    ivar = np.zeros((n, width))
    for k, (d, w) in enumerate(zip(fl, wv)):
        flux[k, :d.size] = d
        wave[k, :d.size] = w
        ivar[k, :d.size] = np.where(d > 0, (100.0 / np.where(d > 0, d, 1.0)) ** 2, 0.0)
    f, i, m = resample_arrays(flux, ivar, lens, wavelength=wave)
    meas = L.measure_lines(f, i, m)
    cols = ("heii_4200", "heii_4541", "heii_4686", "heii_5411", "hei_4471", "siiii_4553")
    out = []
    for k, r in enumerate(rows):
        out.append({"object": r["object"], "spectype": r["spectype"],
                    "modern": STELIB_MODERN.get(r["object"], ""),
                    **{c: float(meas.ew[k, meas.column(c)]) for c in cols},
                    "log_wprime": float(meas.log_wprime[k]),
                    "heii_sigma": float(meas.heii_sigma[k]),
                    "heii_detected": bool(meas.heii_detected[k])})
    return {"rows": out, "cols": cols}


def check_real(data: Path) -> dict:
    from lamost_ostar.io import read_spectra

    files = sorted((data / "lamost").glob("*/*.fits*"))
    man = {}
    with open(data / "lamost" / "manifest.csv") as fh:
        for r in csv.DictReader(fh):
            man[r["file"]] = r
    batch = read_spectra(files)
    flux, ivar, mask = resample(batch.spectra)
    m = L.measure_lines(flux, ivar, mask)
    v1 = v1_heii_detected(flux, ivar, mask)
    rel = [str(Path(s.path).relative_to(data / "lamost")) for s in batch.spectra]
    letter = np.array([(man.get(r, {}).get("mk") or "?") for r in rel])
    per = {}
    for k in sorted(set(letter)):
        sel = letter == k
        per[k] = {"n": int(sel.sum()), "detected": int(m.heii_detected[sel].sum()),
                  "v1": int(v1[sel].sum()),
                  "heii_sigma_p50": pct(m.heii_sigma[sel], [50])[0],
                  "heii_sigma_max": float(np.nanmax(m.heii_sigma[sel]))
                  if np.isfinite(m.heii_sigma[sel]).any() else float("nan"),
                  "metal_veto": int(m.metal_veto[sel].sum())}
    top = np.argsort(-np.nan_to_num(m.heii_sigma, nan=-99))[:5]
    return {"n_files": len(files), "n_read": len(batch.spectra),
            "errors": [(e.path.split("/")[-1], e.reason) for e in batch.errors],
            "n_measured": int(np.isfinite(m.heii_sigma).sum()),
            "detected": int(m.heii_detected.sum()), "v1_detected": int(v1.sum()),
            "heii_sigma_pct": pct(m.heii_sigma, [1, 5, 50, 95, 99, 100]),
            "n_sigma_ge3": int(np.sum(m.heii_sigma >= 3)),
            "n_sigma_ge4": int(np.sum(m.heii_sigma >= 4)),
            "caii_k_nan": int(np.isnan(m.ew[:, m.column("caii_k")]).sum()),
            "per_letter": per,
            "top": [{"file": rel[k], "mk": str(letter[k]),
                     "snr_g": (batch.spectra[k].snr or {}).get("g"),
                     "heii_sigma": float(m.heii_sigma[k]),
                     "z": [float(v) for v in m.significance()[k, :4]],
                     "consistent": bool(m.heii_consistent[k]),
                     "contradicted": bool(m.heii_contradicted[k]),
                     "metal_veto": bool(m.metal_veto[k])} for k in top],
            "heii_sigma": [float(v) for v in m.heii_sigma]}


def check_mock(lib, n: int, seed: int) -> dict:
    """Detection / false rates on the mock at S/N 5, 10, 20, 50."""
    sets = {
        "O (all 6 templates)": ("O", lib.select(mk="O"), n),
        "B0-B1.5": ("B", lib._take(np.flatnonzero(np.isin(lib.name, EARLY_B))), n),
        "B2-B9": ("B", lib._take(np.flatnonzero((lib.mk == "B") & ~np.isin(lib.name, EARLY_B)
                                                & ~np.isin(lib.name, ODD_B))), n),
        "HD281679 ('B8')": ("B", lib.select(name=ODD_B[0]), n // 4),
    }
    for k in "AFGKM":
        sets[k] = (k, lib.select(mk=k), n)
    # single templates: the O stars, and the B0-B1 stars where He II fades
    for name in ("HD057060", "HD057061", "HD209975", "o5v", "o8iii", "o9v", "b0v", "b0i",
                 "HD185859", "b1v"):
        sets[f"{name} ({lib.spt[lib.index(name)]})"] = (str(lib.mk[lib.index(name)]),
                                                         lib.select(name=name), n // 4)
    out: dict = {}
    s = seed
    hist: dict = {}
    for key, (mk, tpl, nn) in sets.items():
        row = {}
        for snr in SNRS:
            s += 1
            f, i, m, truth = simulate(mk, nn, snr, s, tpl)
            meas = L.measure_lines(f, i, m)
            box = L.he_evidence(meas, "box")
            v1 = v1_heii_detected(f, i, m)
            scan = {str(t): int(L.he_evidence(meas, sigma_min=t).heii_detected.sum())
                    for t in THRESHOLDS}
            row[snr] = {"n": nn, "det": float(meas.heii_detected.mean()), "scan": scan,
                        "n_det": int(meas.heii_detected.sum()),
                        "det_box": float(box.heii_detected.mean()),
                        "v1": float(v1.mean()),
                        "sig_p50": pct(meas.heii_sigma, [50])[0],
                        "sig_box_p50": pct(box.heii_sigma, [50])[0],
                        "frac_ge2": float(np.mean(meas.heii_sigma >= 2)),
                        "frac_ge3": float(np.mean(meas.heii_sigma >= 3)),
                        "snr_g_p50": pct([t["snr_g"] for t in truth], [50])[0]}
            if key in ("O (all 6 templates)", "M", "B2-B9", "B0-B1.5", "G"):
                hist.setdefault(key, {})[snr] = [float(v) for v in meas.heii_sigma]
        out[key] = row
        print(f"  {key:24s} " + " ".join(f"{snr}:{row[snr]['det']:.3f}" for snr in SNRS),
              flush=True)
    out["_hist"] = hist
    return out


# ----------------------------------------------------------------------------- report
def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (minor tick formatter)

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0, 0]
    rows = res["mkclass"]["rows"]
    order = list(MK_TYPES.values())
    for lum, ls in (("V", "-"), ("III", "--"), ("Ib", ":")):
        sel = sorted([r for r in rows if r["lum"] == lum], key=lambda r: r["code"])
        x = [order.index(r["type"]) for r in sel]
        for line, c in (("heii_4541", "C0"), ("heii_4686", "C1"), ("heii_4200", "C2"),
                        ("hei_4471", "C3"), ("hei_4922", "C4"), ("hei_4026", "C5")):
            ax.plot(x, [r[line] for r in sel], ls, color=c,
                    label=L._BY_NAME[line].label if lum == "V" else None)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(range(len(order)), order, rotation=45)
    ax.set_ylabel("EW [A]")
    ax.set_title("MKCLASS standards: V (solid), III (dashed), Ib (dotted)")
    ax.legend(fontsize=7, ncol=2)

    ax = axes[0, 1]
    for lum, mkr in (("V", "o"), ("III", "s"), ("Ib", "^"), ("Ia", "v")):
        sel = [r for r in rows if r["lum"] == lum and np.isfinite(r["log_wprime"])]
        ax.plot([order.index(r["type"]) for r in sel], [r["log_wprime"] for r in sel], mkr,
                label=lum)
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(order.index("O7"), color="k", lw=0.5, ls=":")   # O7: log W' = 0 by definition
    ax.set_xticks(range(len(order)), order, rotation=45)
    ax.set_ylabel("log W' = log EW(4471)/EW(4541)")
    ax.legend(fontsize=7)
    ax.set_title("He I / He II ratio vs type")

    ax = axes[1, 0]
    mk = res["mock"]
    for key, c in (("O (all 6 templates)", "C0"), ("B0-B1.5", "C1"), ("B2-B9", "C2"),
                   ("M", "C3"), ("G", "C4")):
        ax.plot(SNRS, [mk[key][s]["det"] for s in SNRS], "o-", color=c, label=key)
        ax.plot(SNRS, [mk[key][s]["v1"] for s in SNRS], "x:", color=c)
    ax.set_xscale("log")
    ax.set_xticks(SNRS, [str(s) for s in SNRS])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("S/N (g band, per pixel)")
    ax.set_ylabel("heii_detected fraction")
    ax.set_title("mock: v2 (solid) vs v1 plugin (dotted, crosses)")
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    bins = np.linspace(-6, 16, 45)
    ax.hist(np.clip(res["real"]["heii_sigma"], -6, 16), bins, histtype="step", color="k",
            density=True, label=f"real LAMOST A-M ({res['real']['n_measured']})")
    h = mk["_hist"]
    for snr, c in ((10, "C0"), (20, "C1"), (50, "C2")):
        ax.hist(np.clip(h["O (all 6 templates)"][snr], -6, 16), bins, histtype="step",
                color=c, density=True, label=f"mock O, S/N {snr}")
    ax.hist(np.clip(h["M"][20], -6, 16), bins, histtype="step", color="C3", ls="--",
            density=True, label="mock M, S/N 20")
    ax.axvline(L.HEII_SIGMA_MIN, color="k", ls=":")
    ax.set_xlabel("heii_sigma")
    ax.legend(fontsize=7)
    ax.set_title("combined He II significance")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def plot_odd_template(lib, path: Path) -> None:
    """HD281679 (MILES 'B8') against an O9 V and a real B9 III template, He II regions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = lib.wave
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.2))
    for ax, line in zip(axes, ("hei_4471", "heii_4541", "heii_4686", "heii_5411", "caii_k")):
        c = L._BY_NAME[line].vacuum
        sel = (w > c - 30) & (w < c + 30)
        for name, col in (("HD281679", "k"), ("o9v", "r"), ("HD175640", "b")):
            f = lib.flux[lib.index(name)][sel]
            ax.plot(w[sel], f / np.median(f), col,
                    label=f"{name} ({lib.spt[lib.index(name)]})")
        for other in ("hei_4471", "heii_4541", "heii_4686", "heii_5411", "caii_k"):
            v = L._BY_NAME[other].vacuum
            if w[sel][0] < v < w[sel][-1]:
                ax.axvline(v, ls=":", color="g")
        ax.set_title(L._BY_NAME[line].label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def write_report(res: dict, out: Path, argv: str) -> None:
    sp, mkc, real, mk, pulls = (res.get("speed"), res["mkclass"], res["real"], res["mock"],
                                res["pulls"])
    lines = []
    w = lines.append
    w("# Line measurements (`lamost_ostar.lines`): validation\n")
    w(f"Generated by `{argv}` (all numbers below come from that run; "
      "`results.json` holds them).\n")
    w("## Method in one paragraph\n")
    w("Each line has a window and two side bands (air wavelengths in `lamost_ostar.lines.LINES`, "
      "converted to vacuum). The **box EW** sums 1 - F/C over the window, C being a weighted "
      "straight line through the side bands' good pixels; its error propagates the pixel "
      "variances and the continuum fit's covariance. The **matched filter** fits a straight "
      "line plus a fixed-centre, fixed-width Gaussian (sigma 2 A for He lines) by weighted "
      "linear least squares over window + bands. `heii_sigma` is the significance of the "
      "inverse-variance weighted mean matched-filter EW of He II 4200, 4541, 4686 (left out "
      "when in emission), 5411, errors scaled by sqrt(chi2) where the fit is poor and a "
      f"{L.EW_SYSTEMATIC:g} A systematic floor added in quadrature. "
      f"`heii_detected` = heii_sigma >= {L.HEII_SIGMA_MIN:g}, >= {L.HEII_MIN_LINES} He II "
      f"lines at >= {L.HEII_LINE_SIGMA:g} sigma, lines consistent with one EW (leave-one-out "
      f"chi2, {L.HEII_SCATTER:.0%} intrinsic scatter, 99.9 %), no He II 4200/4541/5411 at "
      f"<= -{L.HEII_CONTRA_SIGMA:g} sigma, and no cool-star metal line above "
      + ", ".join(f"{L._BY_NAME[k].label} {v:g} A" for k, v in L.METAL_VETO.items())
      + f" at > {L.METAL_VETO_SIGMA:g} sigma.\n")

    if sp:
        w("## Speed\n")
        w(f"`measure_lines` on {sp['n_batches']} batches of {sp['batch']} mock spectra "
          f"(18 lines, both estimators, evidence): **{sp['us_per_spectrum_cpu']:.1f} us per "
          f"spectrum** (process CPU time, best of {sp['repeat']}; wall clock "
          f"{sp['us_per_spectrum_wall']:.1f} us) on the shared 2-core development machine "
          "(timings vary by ~20 % with the other users' load).\n")

    w("## Errors (pull tests)\n")
    w("Synthetic spectra (sloped continuum, Gaussian lines of sigma 2 A, Gaussian noise at "
      "S/N 15 per pixel, 4 000 realisations): standard deviation of (EW - truth) / error.\n")
    w("| line | box pull sd | mf pull sd | box bias [A] | median box err [A] | "
      "median mf err [A] |")
    w("|---|---|---|---|---|---|")
    for name, r in pulls["synthetic"].items():
        if isinstance(r, dict):
            w(f"| {L._BY_NAME[name].label} | {r['box']:.3f} | {r['mf']:.3f} | "
              f"{r['box_bias']:+.3f} | {r['err_box']:.3f} | {r['err_mf']:.3f} |")
    w(f"\n`heii_sigma` on spectra without lines (4 000, S/N 12): sd "
      f"{pulls['synthetic']['heii_sigma_null_sd']:.3f} (the chi2 scaling max(1, sqrt(chi2)) makes "
      "it slightly below 1).\n")
    w("Mock spectra (`simulate_spectra`, one template, 2 000 realisations at S/N 18-22, with "
      "the mock's noise model, bad-pixel patches, radial velocities and reddening): sd of "
      "(EW - median EW) / error. Radial velocities (sd 25 km/s) add a little real EW scatter, "
      "so values slightly above 1 are expected.\n")
    keys = list(next(iter(pulls["mock"].values())).keys())
    w("| template | " + " | ".join(k.replace("_", " ") for k in keys) + " |")
    w("|---|" + "---|" * len(keys))
    for name, r in pulls["mock"].items():
        w(f"| {name} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")

    w("\n## MKCLASS rectified standards (libr36), O4-B5\n")
    w("Box EWs [A] on the grid (noise-free averages of MK standards at ~3.6 A FWHM; "
      "`heii_detected` evaluated at a nominal S/N of 100 per pixel).\n")
    cols = mkc["cols"]
    w("| type | LC | " + " | ".join(L._BY_NAME[c].label for c in cols) +
      " | log W' | He II det. |")
    w("|---|---|" + "---|" * (len(cols) + 2))
    lum_order = {"V": 0, "III": 1, "Ib": 2, "Ia": 3}
    for r in sorted(mkc["rows"], key=lambda r: (lum_order[r["lum"]], r["code"])):
        w(f"| {r['type']} | {r['lum']} | " + " | ".join(fmt(r[c]) for c in cols) +
          f" | {fmt(r['log_wprime'])} | {'yes' if r['heii_detected'] else 'no'} |")
    rows = mkc["rows"]

    def get(t, lum, c):
        for r in rows:
            if r["type"] == t and r["lum"] == lum:
                return r[c]
        return float("nan")
    w("\nLiterature comparison (qualitative). Conti & Alschuler (1971), extended by Mathys "
      "(1988), type O stars by log W' = log EW(4471)/EW(4541): O7 is where the two lines are "
      "equal (log W' = 0), earlier types have log W' < 0, later ones > 0, rising steeply "
      "through O9-O9.7 as He II 4541 disappears. Measured here: "
      f"O7 V {fmt(get('O7','V','log_wprime'))}, O7 III {fmt(get('O7','III','log_wprime'))}, "
      f"O7 Ib {fmt(get('O7','Ib','log_wprime'))}; O8 V {fmt(get('O8','V','log_wprime'))}, "
      f"O9 V {fmt(get('O9','V','log_wprime'))}, B0 V {fmt(get('B0','V','log_wprime'))}; "
      f"O6 V {fmt(get('O6','V','log_wprime'))}, O5 Ia {fmt(get('O5','Ia','log_wprime'))}, "
      f"O4 Ia {fmt(get('O4','Ia','log_wprime'))}. He II 4541 falls from "
      f"{fmt(get('O6','V','heii_4541'))} A (O6 V) to {fmt(get('B0','V','heii_4541'))} A (B0 V) "
      f"and {fmt(get('B1','V','heii_4541'))} A (B1 V); He I 4471 rises from "
      f"{fmt(get('O6','V','hei_4471'))} A (O6 V) to {fmt(get('B2','V','hei_4471'))} A (B2 V). "
      "He II 4686 is in emission in the O4-O8 supergiants (the Of phenomenon) and weaker in "
      "giants than in dwarfs (its luminosity sensitivity); Si III 4553 appears at O9-B0 and "
      "peaks in the early-B supergiants, as expected. B0 standards still show weak He II "
      "(4541 ~0.1-0.2 A), which is real: B0 is the last type with He II, so He II "
      "detections at high S/N include B0 stars by nature; log W' (> 0.7 for these B0 "
      "standards, <= 0.52 for O9) is the quantity that separates them. libr36 has no O4/O5 "
      "dwarfs or giants (O4 and O5 only as Ia).\n")

    st = res["stelib"]
    w("## STELIB O and B stars (independent check, raw files)\n")
    w("The raw STELIB v3.2 spectra (not the packaged templates; air wavelengths converted to "
      "vacuum, FWHM ~3 A, dereddened, which does not change EWs), noise-free with a nominal "
      "S/N of 100 per pixel. Box EWs [A]; types as in the files (modern types from "
      "SOURCES.md in brackets).\n")
    w("| star | type | " + " | ".join(L._BY_NAME[c].label for c in st["cols"]) +
      " | log W' | heii_sigma | He II det. |")
    w("|---|---|" + "---|" * (len(st["cols"]) + 3))
    for r in st["rows"]:
        t = r["spectype"] + (f" [{r['modern']}]" if r["modern"] else "")
        w(f"| {r['object']} | {t} | " + " | ".join(fmt(r[c]) for c in st["cols"]) +
          f" | {fmt(r['log_wprime'])} | {fmt(r['heii_sigma'], 1)} | "
          f"{'yes' if r['heii_detected'] else 'no'} |")
    n_o = sum(r["spectype"].startswith("O") for r in st["rows"])
    n_od = sum(r["spectype"].startswith("O") and r["heii_detected"] for r in st["rows"])
    b_det = [f"{r['object']} ({r['spectype']})" for r in st["rows"]
             if r["spectype"].startswith("B") and r["heii_detected"]]
    w(f"\n{n_od} of {n_o} STELIB O stars detected; B stars detected: "
      f"{', '.join(b_det) or 'none'} (B0 and B0.5 stars have weak He II 4686).\n")
    w("## Real LAMOST spectra (no O star among them)\n")
    w(f"{real['n_files']} files, {real['n_read']} read "
      f"({', '.join(f'{a}: {b}' for a, b in real['errors']) or 'no errors'}), "
      f"{real['n_measured']} with a usable He II measurement. "
      f"**heii_detected: {real['detected']} of {real['n_measured']}** "
      f"(version 1 of the plugin: {real['v1_detected']}). heii_sigma percentiles 1/5/50/95/99/max: "
      + " / ".join(f"{v:.2f}" for v in real["heii_sigma_pct"]) +
      f"; {real['n_sigma_ge3']} spectra at >= 3 and {real['n_sigma_ge4']} at >= 4 before the "
      f"consistency and metal-line conditions. Ca II K is not measurable in "
      f"{real['caii_k_nan']} spectra: LAMOST writes ivar = 0 in the cores of the deepest lines "
      "of cool stars (Ca II H and K, often Ca I 4227, Na D), and most DR1 blue ends have ivar = 0, "
      "hence the Mg b and Ca I 4227 vetoes.\n")
    w("| MK (pipeline) | n | heii_detected | v1 detected | median heii_sigma | max heii_sigma | "
      "metal veto |")
    w("|---|---|---|---|---|---|---|")
    for k, r in real["per_letter"].items():
        w(f"| {k} | {r['n']} | {r['detected']} | {r['v1']} | {fmt(r['heii_sigma_p50'])} | "
          f"{fmt(r['heii_sigma_max'])} | {r['metal_veto']} |")
    w("\nHighest heii_sigma among the real spectra (why each is not a detection):\n")
    for t in real["top"]:
        w(f"- `{t['file']}` ({t['mk']}, S/N g {t['snr_g']}): heii_sigma {t['heii_sigma']:.2f}, "
          f"z(4200, 4541, 4686, 5411) = {', '.join(fmt(v, 1) for v in t['z'])}; consistent "
          f"{t['consistent']}, contradicted {t['contradicted']}, metal veto {t['metal_veto']}")

    w("\n## Mock spectra at LAMOST S/N\n")
    w(f"`simulate_spectra(..., grid='native')` -> `resample_arrays` (as real files), S/N drawn "
      f"within +-{SNR_HALF:.0%} of 5, 10, 20, 50 (g-band median per pixel); "
      "templates: the packaged library (MILES O7 Ia, O9 Ib, O8 Ib; Pickles O5 V, O8 III, O9 V; "
      "MILES B and A-M stars; Pickles B0-B1 for the early-B set). Each cell: fraction with "
      "`heii_detected` (v2, matched filter) / the same rule on box EWs / version 1 of the plugin; "
      "then the median heii_sigma.\n")
    w("| set | n/S/N | " + " | ".join(f"S/N {s}" for s in SNRS) + " |")
    w("|---|---|" + "---|" * len(SNRS))
    for key, row in mk.items():
        if key.startswith("_"):
            continue
        w(f"| {key} | {row[SNRS[0]]['n']} | " + " | ".join(
            f"{row[s]['det']:.3f} / {row[s]['det_box']:.3f} / {row[s]['v1']:.3f}; "
            f"{fmt(row[s]['sig_p50'], 1)}" for s in SNRS) + " |")
    o = mk["O (all 6 templates)"]
    w("\nChoice of the threshold: detections with `heii_sigma >= t` (other conditions "
      "unchanged), summed over the four S/N values for the non-O sets, per S/N for the O set.\n")
    w("| t | mock A-M (false) | B2-B9 (false) | B0-B1.5 | " +
      " | ".join(f"O at S/N {s_}" for s_ in SNRS) + " |")
    w("|---|---|---|---|" + "---|" * len(SNRS))
    for t in THRESHOLDS:
        cool_t = sum(mk[k][s_]["scan"][str(t)] for k in "AFGKM" for s_ in SNRS)
        cool_nt = sum(mk[k][s_]["n"] for k in "AFGKM" for s_ in SNRS)
        b2 = sum(mk["B2-B9"][s_]["scan"][str(t)] for s_ in SNRS)
        b0 = sum(mk["B0-B1.5"][s_]["scan"][str(t)] for s_ in SNRS)
        nb = sum(mk["B2-B9"][s_]["n"] for s_ in SNRS)
        w(f"| {t:g} | {cool_t}/{cool_nt} | {b2}/{nb} | {b0}/{nb} | " + " | ".join(
            f"{o[s_]['scan'][str(t)] / o[s_]['n']:.1%}" for s_ in SNRS) + " |")
    w("\nWhat the evidence achieves below the detection threshold: fraction with "
      "heii_sigma >= 2 / >= 3 (a soft prior for the CNN decision, not a detection).\n")
    w("| set | " + " | ".join(f"S/N {s}" for s in SNRS) + " |")
    w("|---|" + "---|" * len(SNRS))
    for key in ("O (all 6 templates)", "B0-B1.5", "B2-B9", "A", "F", "G", "K", "M"):
        w(f"| {key} | " + " | ".join(f"{mk[key][s]['frac_ge2']:.3f} / {mk[key][s]['frac_ge3']:.3f}"
                                     for s in SNRS) + " |")
    cool_n = sum(mk[k][s]["n"] for k in "AFGKM" for s in SNRS)
    cool_det = sum(mk[k][s]["n_det"] for k in "AFGKM" for s in SNRS)
    w(f"\nFalse `heii_detected` on the mock A-M stars: **{cool_det} of {cool_n}** "
      f"(all S/N together). Version 1 on mock M stars: "
      + ", ".join(f"{mk['M'][s]['v1']:.1%} at S/N {s}" for s in SNRS) + ".\n")
    w(f"O stars: {o[10]['det']:.1%} detected at S/N 10, {o[20]['det']:.1%} at S/N 20, "
      f"{o[50]['det']:.1%} at S/N 50 (median heii_sigma {fmt(o[10]['sig_p50'], 1)}, "
      f"{fmt(o[20]['sig_p50'], 1)}, {fmt(o[50]['sig_p50'], 1)}). The matched filter is the "
      f"better estimator: the same rule on box EWs detects {o[20]['det_box']:.1%} at S/N 20.\n")
    odd = mk["HD281679 ('B8')"]
    b0v = mk["b0v (B0V)"]
    late = [k for k in mk if k.startswith(("HD057061", "HD209975", "o8iii", "o9v"))]
    w("## Findings\n")
    w(f"1. **No false He II on non-O stars.** Real LAMOST: {real['detected']} of "
      f"{real['n_measured']} (version 1: {real['v1_detected']}, of which "
      f"{real['per_letter'].get('M', {}).get('v1', 0)} M stars). Mock A-M (MILES templates, "
      f"S/N 5-50): {cool_det} of {cool_n}; version 1 flagged "
      f"{mk['M'][20]['v1']:.0%} of the mock M stars at S/N 20. Later-B templates: "
      + ", ".join(f"{mk['B2-B9'][s]['n_det']}/{mk['B2-B9'][s]['n']}" for s in SNRS)
      + " at S/N " + "/".join(str(s) for s in SNRS) + f". Zero in {cool_n} is a 95 % upper "
      f"limit of {3 / cool_n:.1e} per spectrum: over the ~10^7 LAMOST spectra that still "
      f"allows up to ~{3 / cool_n * 1e7:.0f} false detections, more than LAMOST's few hundred "
      "O stars, so `heii_detected` alone does not make a clean survey sample; it is evidence "
      "to combine with the CNN's p(O).")
    w(f"2. **O stars:** detection {o[5]['det']:.1%} / {o[10]['det']:.1%} / {o[20]['det']:.1%} / "
      f"{o[50]['det']:.1%} at S/N 5 / 10 / 20 / 50. **At S/N 10 He II is not detectable** "
      "with a clean false rate: the He II lines of late O stars are 0.2-0.6 A, the "
      "matched-filter error of one line is ~0.25-0.3 A at S/N 10, so the four lines together "
      f"reach a median heii_sigma of only {fmt(o[10]['sig_p50'], 1)} (late-O templates alone: "
      + ", ".join(f"{k.split(' ')[0]} {fmt(mk[k][10]['sig_p50'], 1)}" for k in late)
      + "). What the combined evidence still gives at S/N 10 is a soft ranking: "
      f"{o[10]['frac_ge2']:.0%} of the O stars have heii_sigma >= 2 against "
      + ", ".join(f"{k} {mk[k][10]['frac_ge2']:.1%}" for k in ("B0-B1.5", "B2-B9", "A", "F",
                                                               "G", "K", "M"))
      + "; at S/N 20 it is " + f"{o[20]['frac_ge2']:.0%}" + " of the O stars. It should "
      "enter the O-candidate decision as a likelihood factor, with `heii_detected` as the "
      "confirmation above S/N ~20.")
    w(f"3. **B0-B1:** B0 dwarfs do have weak He II (MKCLASS B0 V-III standards; Pickles B0 V: "
      f"{b0v[50]['det']:.0%} detected at S/N 50, {b0v[20]['det']:.0%} at S/N 20); the Pickles "
      f"B0 I, MILES B0.5 Ia and Pickles B1 V are detected in "
      f"{mk['b0i (B0I)'][50]['det']:.1%}, {mk['HD185859 (B0.5Iae)'][50]['det']:.1%} and "
      f"{mk['b1v (B1V)'][50]['det']:.1%} of the cases at S/N 50 (the noise-free HD185859 "
      "template has a He II 4686 matched-filter EW of 0.14 A). These are not false detections of noise but the O/B boundary; "
      "`log_wprime` (> 0.7 at B0 in the MKCLASS standards) and `hei_sigma` carry the "
      "distinction when the S/N allows it. Early-B set overall: "
      + ", ".join(f"{mk['B0-B1.5'][s]['det']:.1%}" for s in SNRS) + " at S/N "
      + "/".join(str(s) for s in SNRS) + ".")
    w(f"4. **HD281679**, listed as B8 in MILES (Teff 8542 K, log g 2.5, [Fe/H] -1.4), is "
      f"detected ({odd[50]['det']:.0%} at S/N 50, {odd[20]['det']:.0%} at S/N 20). Its "
      "spectrum (`hd281679.png`, noise-free template) has narrow absorption at He II 4686 "
      "(~6 % deep), 5411 and 4541, next to a late-B/A star's strong Mg II 4481, narrow Ca II K "
      "and strong Balmer lines (box EW of H-gamma 7.8 A) with almost no He I 4471. A B8 star "
      "has no He II; the spectrum looks composite (a hot companion) or misidentified, which "
      "these data cannot decide. It is therefore kept out of the later-B false rate and "
      "reported on its own row (SOURCES.md already excludes another MILES 'B' star, the hot "
      "subdwarf HD149382). Hot subdwarfs and hot companions are real He II sources: telling "
      "them from O stars needs more than He II (Balmer widths / gravity, the CNN).")
    miles_o = [k for k in mk if k.startswith(("HD057060", "HD057061", "HD209975"))]
    pick_o = [k for k in mk if k.startswith(("o5v", "o8iii", "o9v"))]
    w("5. **Estimator:** the matched filter gives ~35 % smaller errors than the box EW on "
      "lines of the filter's width (pull table above); over all six O templates the two "
      f"estimators detect {o[20]['det']:.0%} (matched filter) and {o[20]['det_box']:.0%} (box) "
      "at S/N 20 at the same false rate, but that average hides opposite results: the gain is "
      "large on the MILES O stars, whose lines have LAMOST's resolution ("
      + ", ".join(f"{k.split(' ')[0]} {mk[k][20]['det']:.0%} vs {mk[k][20]['det_box']:.0%}"
                  for k in miles_o)
      + " at S/N 20), while on the Pickles O spectra, whose lines are 2-3x broader (R ~ 500), "
      "the box EW does better ("
      + ", ".join(f"{k.split(' ')[0]} {mk[k][20]['det']:.0%} vs {mk[k][20]['det_box']:.0%}"
                  for k in pick_o)
      + "): the filter is matched to LAMOST's resolution, which real LAMOST O stars have. "
      "The matched filter is biased low on such broad lines, so the box EW is the EW to "
      "quote and the matched filter the detection statistic.")
    (out / "validation.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "lines")
    ap.add_argument("--n", type=int, default=1000, help="mock spectra per set and S/N")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--speed", action="store_true", help="only the timing")
    args = ap.parse_args()
    if args.speed:
        print(json.dumps(check_speed(), indent=1))
        return
    from lamost_ostar.templates import load_templates

    lib = load_templates()
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    t0 = time.time()
    print("speed ...", flush=True)
    res["speed"] = check_speed()
    print("pulls ...", flush=True)
    res["pulls"] = check_pulls(lib, args.seed)
    print("mkclass ...", flush=True)
    res["mkclass"] = check_mkclass(args.data)
    print("stelib ...", flush=True)
    res["stelib"] = check_stelib(args.data)
    print("real ...", flush=True)
    res["real"] = check_real(args.data)
    print("mock ...", flush=True)
    res["mock"] = check_mock(lib, args.n, args.seed)
    res["elapsed_s"] = time.time() - t0
    plot(res, args.out / "validation.png")
    plot_odd_template(lib, args.out / "hd281679.png")
    argv = "python scripts/validate_lines.py" + (f" --n {args.n}" if args.n != 1000 else "") \
        + (f" --seed {args.seed}" if args.seed != 1 else "")
    write_report(res, args.out, argv)
    slim = {k: v for k, v in res.items()}
    slim["mock"] = {k: v for k, v in res["mock"].items() if not k.startswith("_")}
    slim["real"] = {k: v for k, v in res["real"].items() if k != "heii_sigma"}
    (args.out / "results.json").write_text(json.dumps(slim, indent=1, default=str))
    print(f"done in {res['elapsed_s']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
