#!/usr/bin/env python
"""Rebuild ``lamost_ostar/data/templates.npz`` from the real MILES and Pickles libraries.

Usage::

    python scripts/build_templates.py [--libraries ../shared/data/libraries]
                                      [--out lamost_ostar/data/templates.npz]
                                      [--resolution 1800] [--float16]

Steps (see :mod:`lamost_ostar.templates` for the result):

1. MILES v9.1: all stars of ``miles_spectral_types.csv`` with an MK letter,
   except HD149382 (hot subdwarf labelled B5) and files that are missing
   (m0970 lives in ``omit/``).  Air -> vacuum (Ciddor 1996), then one sparse
   linear operator per library does Gaussian smoothing in log-lambda from the
   native FWHM (2.5 A) to R = 1800 *and* resampling onto the common grid
   (where MILES is already coarser than R = 1800, below ~4500 A, it is only
   resampled with a half-pixel kernel).
2. Pickles UVILIB: the 108 solar spectra (R ~ 500, coarser than LAMOST, so only
   resampled; wavelengths taken as air, like MILES).
3. Each MILES star is extended beyond its red end with the Pickles spectrum
   nearest in type (letter + subtype) and luminosity class, multiplied by a
   power law ``a * lambda**b`` (slope fitted to the MILES/Pickles ratio over
   5000-7300 A, |b| <= 3; scale matched at 7000-7290 A) and cross-faded over
   the last 60 A of MILES.
4. Every spectrum is normalised to median 1 (the few slightly negative noisy
   pixels at the blue end of cool stars are clipped to 0) and stored as float16 byte planes
   (relative precision 4.9e-4, far below any mock noise; 4.4 MB instead of
   14 MB), loaded back as float32; ``--float32`` stores float32 instead.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy import sparse

from lamost_ostar.preprocess import DLOGLAM, LOGLAM0, NPIX, grid_loglam, grid_wavelength
from lamost_ostar.templates import MK_LETTERS, air_to_vacuum, parse_spectral_type

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LIBRARIES = REPO.parent / "shared" / "data" / "libraries"
DEFAULT_OUT = REPO / "lamost_ostar" / "data" / "templates.npz"

EXCLUDE = {"HD149382"}              # hot subdwarf labelled B5 (Teff 36 000 K)
MILES_FWHM = 2.5                    # A (air, constant)
SLOPE_WINDOW = (5000.0, 7300.0)     # A vacuum, window for the power-law slope
MATCH_WINDOW = (7000.0, 7290.0)     # A vacuum, window for the scale at the join
MAX_SLOPE = 3.0                     # |b| limit of the ratio power law lambda**b
LUM_WEIGHT = 0.7                    # luminosity-class step vs one subtype step
FADE = 60.0                         # A, cross-fade width below the MILES red end
EDGE_SIGMAS = 3.0                   # kernel half-width (in sigma) for edge coverage
_LN10 = np.log(10.0)
_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
_LUM_NUM = {"Ia0": 1.0, "Ia": 1.0, "Iab": 1.0, "Ib": 1.0, "I": 1.0, "II": 2.0,
            "III": 3.0, "IV": 4.0, "V": 5.0, "VI": 5.0}


def degrade_matrix(wave_in: np.ndarray, fwhm_in: np.ndarray | float, resolution: float,
                   loglam_out: np.ndarray) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Sparse operator: native spectrum -> Gaussian-smoothed, resampled spectrum.

    Parameters
    ----------
    wave_in : numpy.ndarray
        ``(n,)`` increasing vacuum wavelengths of the native pixels [A].
    fwhm_in : float or numpy.ndarray
        Native resolution FWHM [A] (scalar or per output pixel).
    resolution : float
        Target resolving power R (FWHM = lambda / R).
    loglam_out : numpy.ndarray
        ``(m,)`` log10 output wavelengths.

    Returns
    -------
    matrix : scipy.sparse.csr_matrix
        ``(m, n)``; ``flux_out = matrix @ flux_in``.
    covered : numpy.ndarray
        bool ``(m,)``: the kernel lies inside the native coverage.
    """
    lw_in = np.log10(wave_in)
    wave_out = 10.0 ** loglam_out
    step_in = np.gradient(lw_in)                                   # dex per native px
    sig_target = _FWHM_TO_SIGMA / (resolution * _LN10)              # dex
    sig_native = _FWHM_TO_SIGMA * np.broadcast_to(fwhm_in, wave_out.shape) / (wave_out * _LN10)
    sig_px = np.interp(loglam_out, lw_in, step_in)
    sigma = np.sqrt(np.maximum(sig_target ** 2 - sig_native ** 2, (0.5 * sig_px) ** 2))
    half = int(np.ceil(4.0 * np.max(sigma / sig_px))) + 1
    centre = np.searchsorted(lw_in, loglam_out)
    offsets = np.arange(-half, half + 1)
    cols = centre[:, None] + offsets[None, :]
    valid = (cols >= 0) & (cols < lw_in.size)
    colc = np.clip(cols, 0, lw_in.size - 1)
    d = (lw_in[colc] - loglam_out[:, None]) / sigma[:, None]
    w = np.where(valid, np.exp(-0.5 * d * d) * step_in[colc], 0.0)
    wsum = w.sum(axis=1, keepdims=True)
    w = np.where(wsum > 0, w / np.where(wsum > 0, wsum, 1.0), 0.0)
    rows = np.broadcast_to(np.arange(loglam_out.size)[:, None], cols.shape)
    keep = valid & (w > 0)
    matrix = sparse.csr_matrix((w[keep], (rows[keep], cols[keep])),
                               shape=(loglam_out.size, lw_in.size))
    covered = ((loglam_out - EDGE_SIGMAS * sigma >= lw_in[0])
               & (loglam_out + EDGE_SIGMAS * sigma <= lw_in[-1]))
    return matrix, covered


def read_miles(folder: Path) -> dict:
    """Read the MILES stars with a usable type (HD149382 excluded)."""
    rows = list(csv.DictReader(open(folder / "miles_spectral_types.csv")))
    meta, fluxes, wave_air = [], [], None
    for r in rows:
        if not r["mk_class"] or r["name"].strip() in EXCLUDE:
            continue
        path = folder / r["file"]
        if not path.is_file():
            print(f"  skip {r['name']}: {r['file']} missing", file=sys.stderr)
            continue
        with fits.open(path) as hdul:
            hdr = hdul[0].header
            flux = np.asarray(hdul[0].data, dtype=np.float64)
            w = hdr["CRVAL1"] + hdr["CDELT1"] * (np.arange(flux.size) + 1 - hdr["CRPIX1"])
        if wave_air is None:
            wave_air = w
        elif w.size != wave_air.size or not np.allclose(w, wave_air):
            print(f"  skip {r['name']}: different sampling", file=sys.stderr)
            continue
        if not np.all(np.isfinite(flux)) or np.median(flux) <= 0:
            print(f"  skip {r['name']}: non-finite or non-positive flux", file=sys.stderr)
            continue
        letter, sub, lum = parse_spectral_type(r["spt"], r["mk_class"])
        meta.append(dict(mk=r["mk_class"], spt=_clean_spt(r["spt"], r["mk_class"]),
                         subtype=sub, lumclass=lum, teff=_num(r["teff"]),
                         logg=_num(r["logg"]), feh=_num(r["feh"]),
                         name=r["name"].strip(), source="miles"))
        fluxes.append(flux)
    return dict(wave_air=wave_air, flux=np.array(fluxes), meta=meta)


def _clean_spt(spt: str, mk: str) -> str:
    """Spectral type string with the O-star '0' typo fixed (07Ia -> O7Ia)."""
    s = spt.strip()
    if mk == "O" and s.startswith("0"):
        s = "O" + s[1:]
    return s.replace(" ", "")


def _num(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return float("nan")
    return float("nan") if value in (9999.0, 99999.0, -9999.0) else value


def _pickles_type(stem: str) -> tuple[str, str, float, str]:
    """('O', 'O5V', 5.0, 'V') from a Pickles file stem such as 'o5v', 'b57v', 'm2p5v'."""
    import re
    m = re.match(r"^([obafgkm])(\d+(?:p\d)?)(i|ii|iii|iv|v)$", stem)
    if not m:
        raise ValueError(f"unexpected Pickles name {stem}")
    letter, digits, lum = m.group(1).upper(), m.group(2), m.group(3).upper()
    if "p" in digits:
        sub = float(digits.replace("p", "."))
        label = digits.replace("p", ".")
    elif len(digits) == 2 and int(digits[1]) > int(digits[0]):
        sub = (int(digits[0]) + int(digits[1])) / 2.0
        label = f"{digits[0]}-{digits[1]}"
    else:
        sub = float(digits)
        label = digits
    return letter, f"{letter}{label}{lum}", sub, lum


def read_pickles(folder: Path) -> dict:
    """Read the Pickles UVILIB solar spectra (fixed-width columns, see ReadMe)."""
    meta, fluxes, wave = [], [], None
    for path in sorted(folder.glob("*.dat")):
        lines = path.read_text().splitlines()
        # bytes 1-7 lambda, 9-17 flux (a few large values overflow into byte 8)
        w = np.array([float(x[0:7]) for x in lines if x.strip()])
        f = np.array([float(x[7:17]) for x in lines if x.strip()])
        if wave is None:
            wave = w
        elif not np.allclose(w, wave):
            raise ValueError(f"{path}: different wavelength sampling")
        letter, spt, sub, lum = _pickles_type(path.stem)
        meta.append(dict(mk=letter, spt=spt, subtype=sub, lumclass=lum,
                         teff=float("nan"), logg=float("nan"), feh=0.0,
                         name=path.stem, source="pickles"))
        fluxes.append(f)
    return dict(wave_air=wave, flux=np.array(fluxes), meta=meta)


def _type_code(meta: dict) -> tuple[float, float]:
    """Numeric spectral type (O0 = 0 ... M9 = 69) and luminosity class (1-5)."""
    sub = meta["subtype"]
    code = 10.0 * MK_LETTERS.index(meta["mk"]) + (5.0 if np.isnan(sub) else sub)
    lum = _LUM_NUM.get(meta["lumclass"])
    if lum is None:                      # unknown: infer from log g where available
        g = meta["logg"]
        lum = 5.0 if np.isnan(g) or g >= 3.8 else (4.0 if g >= 3.2 else (3.0 if g >= 1.5 else 1.0))
    return code, lum


def nearest_pickles(miles_meta: list[dict], pickles_meta: list[dict]) -> np.ndarray:
    """Index of the Pickles spectrum nearest in type and luminosity class."""
    pc = np.array([_type_code(m) for m in pickles_meta])
    mc = np.array([_type_code(m) for m in miles_meta])
    dist = np.abs(mc[:, None, 0] - pc[None, :, 0]) + LUM_WEIGHT * np.abs(mc[:, None, 1] - pc[None, :, 1])
    return np.argmin(dist, axis=1)


def extend_red(miles: np.ndarray, pickles: np.ndarray, wave: np.ndarray,
               red_end: float) -> np.ndarray:
    """Continue MILES spectra beyond ``red_end`` with power-law-scaled Pickles spectra.

    The slope ``b`` of ``ratio = a * lambda**b`` (MILES / Pickles, absorbing
    differences in reddening and flux calibration) is a least-squares fit over
    the long window ``SLOPE_WINDOW``, clipped to ``|b| <= MAX_SLOPE``; the scale
    ``a`` makes the median ratio over ``MATCH_WINDOW`` (just below the MILES red
    end) exact, so the join is continuous.

    Parameters
    ----------
    miles, pickles : numpy.ndarray
        ``(T, NPIX)`` grid spectra (MILES values beyond ``red_end`` are ignored).
    wave : numpy.ndarray
        ``(NPIX,)`` grid wavelengths.
    red_end : float
        Last wavelength with original MILES data [A].
    """
    x_all = np.log(wave / 7000.0)
    logratio = np.log(np.clip(miles, 1e-30, None) / np.clip(pickles, 1e-30, None))
    win = (wave >= SLOPE_WINDOW[0]) & (wave <= SLOPE_WINDOW[1])
    x = x_all[win]
    r = logratio[:, win]
    xm = x.mean()
    b = ((x - xm) * (r - r.mean(axis=1, keepdims=True))).sum(axis=1) / ((x - xm) ** 2).sum()
    b = np.clip(b, -MAX_SLOPE, MAX_SLOPE)
    match = (wave >= MATCH_WINDOW[0]) & (wave <= MATCH_WINDOW[1])
    a = np.median(logratio[:, match] - b[:, None] * x_all[match][None, :], axis=1)
    scaled = pickles * np.exp(a[:, None] + b[:, None] * x_all[None, :])
    fade = np.clip((red_end - wave) / FADE, 0.0, 1.0)[None, :]   # 1 = MILES, 0 = Pickles
    return fade * miles + (1.0 - fade) * scaled


def build(libraries: Path, resolution: float = 1800.0) -> dict:
    """Build all template arrays; returns the dict written to the ``.npz``."""
    loglam = grid_loglam()
    wave = grid_wavelength()
    print("reading MILES ...", file=sys.stderr)
    mi = read_miles(libraries / "miles")
    print("reading Pickles ...", file=sys.stderr)
    pk = read_pickles(libraries / "pickles")

    mi_vac = air_to_vacuum(mi["wave_air"])
    fwhm_vac = MILES_FWHM * np.interp(wave, mi_vac, np.gradient(mi_vac) / np.gradient(mi["wave_air"]))
    op_m, cov_m = degrade_matrix(mi_vac, fwhm_vac, resolution, loglam)
    pk_vac = air_to_vacuum(pk["wave_air"])
    op_p, cov_p = degrade_matrix(pk_vac, 1e4, resolution, loglam)   # already coarser
    if not cov_p.all():
        raise RuntimeError("Pickles spectra do not cover the grid")
    miles_grid = (op_m @ mi["flux"].T).T
    pickles_grid = (op_p @ pk["flux"].T).T

    red_end = float(wave[cov_m][-1])
    blue_start = float(wave[cov_m][0])
    nearest = nearest_pickles(mi["meta"], pk["meta"])
    miles_ext = extend_red(miles_grid, pickles_grid[nearest], wave, red_end)
    # MILES covers the blue end of the grid (3540 A < 3690 A)
    if blue_start > wave[0]:
        raise RuntimeError(f"MILES does not cover the blue grid edge ({blue_start:.1f} A)")

    flux = np.vstack([miles_ext, pickles_grid])
    flux = flux / np.median(flux, axis=1, keepdims=True)
    # a few noisy blue-end pixels of cool stars (e.g. MILES HD006497, Pickles
    # m9iii/m10iii) go slightly negative; a template flux cannot
    n_neg = int(np.sum(flux < 0))
    if n_neg:
        print(f"  clipped {n_neg} negative pixels in "
              f"{int(np.sum((flux < 0).any(axis=1)))} templates to 0", file=sys.stderr)
    flux = np.maximum(flux, 0.0)
    meta = mi["meta"] + pk["meta"]
    n_m, n_p = len(mi["meta"]), len(pk["meta"])
    orig_min = np.concatenate([np.full(n_m, wave[0]), np.full(n_p, pk_vac[0])])
    orig_max = np.concatenate([np.full(n_m, red_end - FADE), np.full(n_p, pk_vac[-1])])
    extension = np.array([pk["meta"][j]["name"] for j in nearest] + [""] * n_p)

    out = {k: np.array([m[k] for m in meta]) for k in ("mk", "spt", "lumclass", "name", "source")}
    for k in ("subtype", "teff", "logg", "feh"):
        out[k] = np.array([m[k] for m in meta], dtype=np.float32)
    out.update(flux=flux.astype(np.float32), orig_min=orig_min, orig_max=orig_max,
               extension=extension, loglam0=np.float64(LOGLAM0), dloglam=np.float64(DLOGLAM),
               resolution=np.float64(resolution))
    if not np.all(np.isfinite(out["flux"])):
        raise RuntimeError("non-finite template flux")
    if out["flux"].shape[1] != NPIX:
        raise RuntimeError("wrong grid size")
    return out


def encode_float16(flux: np.ndarray) -> np.ndarray:
    """float16 flux as two byte planes ``(2, T, NPIX)`` uint8 (compresses ~1.5x better).

    Decoded by :func:`lamost_ostar.templates._decode_flux`.
    """
    f16 = np.ascontiguousarray(flux, dtype="<f2")
    planes = f16.view(np.uint8).reshape(flux.shape + (2,))
    return np.ascontiguousarray(np.moveaxis(planes, -1, 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libraries", type=Path, default=DEFAULT_LIBRARIES)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--resolution", type=float, default=1800.0)
    parser.add_argument("--float32", action="store_true",
                        help="store the fluxes as float32 (about 14 MB instead of 4.4 MB)")
    args = parser.parse_args(argv)
    if not (args.libraries / "miles").is_dir() or not (args.libraries / "pickles").is_dir():
        parser.error(f"no miles/ and pickles/ under {args.libraries}")
    out = build(args.libraries, args.resolution)
    if not args.float32:
        out["flux16"] = encode_float16(out.pop("flux"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    counts = {k: int(np.sum(out["mk"] == k)) for k in MK_LETTERS}
    size = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({len(out['mk'])} templates, {size:.2f} MB): {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
