#!/usr/bin/env python
"""Rebuild ``lamost_ostar/data/templates.npz`` (and ``mkclass.npz``) from the real libraries.

Usage::

    python scripts/build_templates.py [--libraries ../shared/data/libraries]
                                      [--out lamost_ostar/data/templates.npz]
                                      [--mkclass-out lamost_ostar/data/mkclass.npz]
                                      [--summary docs/template_library.md]
                                      [--resolution 1800] [--float32]

Steps (see :mod:`lamost_ostar.templates` for the result):

1. MILES v9.1: all stars of ``miles_spectral_types.csv`` with an MK letter,
   except files that are missing (m0970 lives in ``omit/``).  HD149382 (listed
   as B5, Teff 36 000 K, a hot subdwarf) is kept as an impostor (``mk="X"``,
   ``kind="hot_subdwarf"``); stars of luminosity class VI (``sd...``, ``F5VI``)
   are ``kind="cool_subdwarf"``.  Air -> vacuum (Ciddor 1996), then one sparse
   linear operator per library does Gaussian smoothing in log-lambda from the
   native FWHM (2.5 A) to R = 1800 *and* resampling onto the common grid
   (where a library is already coarser than R = 1800 it is only resampled with
   a half-pixel kernel).
2. Pickles UVILIB: the 108 solar spectra (R ~ 500, coarser than LAMOST, so only
   resampled; wavelengths taken as air, like MILES).
3. Each MILES star is extended beyond its red end with the Pickles spectrum
   nearest in type (letter + subtype) and luminosity class, multiplied by a
   power law ``a * lambda**b`` (slope fitted to the MILES/Pickles ratio over
   5000-7300 A, |b| <= 3; scale matched at 7000-7290 A) and cross-faded over
   the last 60 A of MILES.  MILES and Pickles pixels are all ``valid``.
4. STELIB v3.2 (255 files): wavelengths are in **air** (no header keyword
   says so; the MaNGA DAP reads them as air, and the Balmer-line cores of its
   A stars sit within 0.5 A of the air wavelengths, 1.2-1.8 A from the vacuum
   ones) -> vacuum.  FWHM 3.4 A (the DAP's value; a fit of the 117 stars also
   in MILES gives 3.1-3.4 A between 3900 and 6500 A).  The dereddened fluxes
   are reddened again with E(B-V) = ISEXTINC / 3.1 (O'Donnell 1994, R_V = 3.1,
   :func:`lamost_ostar.mock.extinction_odonnell`) on the native grid.  Zero or
   non-finite native pixels are missing data: the grid flux is a normalised
   convolution over the good native pixels, and a grid pixel is ``valid`` only
   if no missing native pixel lies within 3 sigma of the kernel (and the
   kernel is inside the native range); invalid pixels hold flux 0.  Modern
   types replace the class/subtype/luminosity class of HD046223 (O4V((f))),
   HD093250 (O4III) and HD036512 (O9.7V, STELIB's B0V: see ``MODERN_TYPES``)
   (``spt`` keeps the STELIB type).  WN/WC types are
   ``kind="wr"``, DA/DC ``kind="wd"`` (both ``mk="X"``), ``sd`` types
   ``kind="cool_subdwarf"``.
5. MKCLASS standards (``libnor36``, flux-normalised, 3800-5600 A air, FWHM
   3.6 A): the O and B ones (O4 ... B9) go into the library like STELIB
   (no reddening), type and luminosity class decoded from the file name
   ``tTTTlLLp00.rbn``.  All of ``libnor36`` and ``libr36`` (rectified) are also
   written, in their own normalisation, to ``mkclass.npz``
   (:func:`lamost_ostar.templates.load_mkclass`).
6. ``star`` (split unit): HD numbers normalised to ``HD`` + 6 digits (+ a
   component letter), shared by MILES and STELIB observations of one star and
   by the STELIB ``lp``/``ss`` pair; MILES HD048682 is STELIB's HD048682A (both
   G0V).  The cross-library duplicates are printed and listed in the summary.
7. Every spectrum is normalised to median 1 over its valid pixels (the few
   slightly negative noisy pixels at the blue end of cool stars are clipped
   to 0) and stored as float16 byte planes (relative precision 4.9e-4, far
   below any mock noise), ``valid`` as ``np.packbits`` bits; loaded back as
   float32 / bool; ``--float32`` stores float32 instead.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy import sparse

from lamost_ostar.preprocess import DLOGLAM, LOGLAM0, NPIX, grid_loglam, grid_wavelength
from lamost_ostar.templates import IMPOSTOR, MK_LETTERS, air_to_vacuum, parse_spectral_type

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LIBRARIES = REPO.parent / "shared" / "data" / "libraries"
DEFAULT_OUT = REPO / "lamost_ostar" / "data" / "templates.npz"
DEFAULT_MKCLASS_OUT = REPO / "lamost_ostar" / "data" / "mkclass.npz"

HOT_SUBDWARFS = {"HD149382"}        # MILES: labelled B5 but Teff 36 000 K
MILES_FWHM = 2.5                    # A (air, constant)
STELIB_FWHM = 3.4                   # A (air, constant)
MKCLASS_FWHM = 3.6                  # A (air, constant)
PICKLES_R = 500.0                   # resolving power of Pickles (ReadMe)
R_V_BUILD = 3.1                     # R_V of the STELIB re-reddening
WAVE_RES = 4500.0                   # A, where the per-template resolution is quoted
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
#: Modern types (SOURCES.md) used for subtype / luminosity class.
#: Value: (modern type, class letter, subtype, luminosity class).  HD036512
#: (upsilon Ori) is the B0 V anchor of the old MK system and O9.7 V in the modern
#: (Galactic O-Star Spectroscopic Survey, Sota et al. 2011) system; its STELIB
#: spectrum has He II 4541 absorption (box EW 0.28 A on the noise-free template)
#: as strong as the O9.5 stars HD030614 (0.20 A) and HD188209 (0.24 A), while
#: every B0.5-B1 template has <= 0.05 A: it is an O star here.
MODERN_TYPES = {"HD046223": ("O4V((f))", "O", 4.0, "V"), "HD093250": ("O4III", "O", 4.0, "III"),
                "HD036512": ("O9.7V", "O", 9.7, "V")}
#: MILES names whose STELIB counterpart carries a component letter.
STAR_ALIASES = {"HD048682": "HD048682A"}
#: MKCLASS (NutMaat encoding): type code of the integer subtypes; the code in
#: the file name is 10 x this, luminosity code 10 x (0 Ia, 1 Ib, 3 III, 5 V ...).
_MKCLASS_TYPE_CODES = (
    ("O", [(3, 0.0), (4, 1.0), (5, 2.0), (6, 3.0), (7, 4.0), (8, 5.0), (9, 6.0)]),
    ("B", [(0, 7.0), (1, 8.0), (2, 9.0), (3, 10.0), (4, 11.0), (5, 12.0), (6, 12.5),
           (7, 13.0), (8, 14.0), (9, 15.0)]),
    ("A", [(0, 16.0), (1, 17.0), (2, 18.0), (3, 19.0), (4, 19.5), (5, 20.0), (6, 20.5),
           (7, 21.0), (8, 21.7), (9, 22.5)]),
    ("F", [(0, 23.0), (1, 23.5), (2, 24.0), (3, 25.0), (4, 25.5), (5, 26.0), (6, 27.0),
           (7, 27.5), (8, 28.0), (9, 29.0)]),
    ("G", [(0, 30.0), (1, 30.5), (2, 31.0), (3, 31.3), (4, 31.7), (5, 32.0), (6, 32.3),
           (7, 32.7), (8, 33.0), (9, 33.5)]),
    ("K", [(0, 34.0), (1, 35.0), (2, 36.0), (3, 37.0), (4, 38.0), (5, 39.0), (6, 39.5),
           (7, 40.0), (8, 40.28), (9, 40.428)]),
    ("M", [(0, 40.714), (1, 41.5), (2, 42.5), (3, 43.5), (4, 44.5), (5, 45.5), (6, 46.5),
           (7, 47.5), (8, 48.5), (9, 49.5)]),
)
_MKCLASS_LUM = {0: "Ia", 5: "Iab", 10: "Ib", 15: "Ib-II", 20: "II", 25: "II-III", 30: "III",
                35: "III-IV", 40: "IV", 45: "IV-V", 50: "V"}
MKCLASS_MAX_CODE = 160              # O4 ... B9 (code < A0 = 16.0) go into templates.npz


def _kernel_sigma(lw_in: np.ndarray, loglam_out: np.ndarray, fwhm_in, resolution: float):
    """Gaussian sigma [dex] of the degrade kernel per output pixel, and the native step."""
    wave_out = 10.0 ** loglam_out
    step_in = np.gradient(lw_in)                                   # dex per native px
    sig_target = _FWHM_TO_SIGMA / (resolution * _LN10)              # dex
    sig_native = _FWHM_TO_SIGMA * np.broadcast_to(fwhm_in, wave_out.shape) / (wave_out * _LN10)
    sig_px = np.interp(loglam_out, lw_in, step_in)
    sigma = np.sqrt(np.maximum(sig_target ** 2 - sig_native ** 2, (0.5 * sig_px) ** 2))
    return sigma, sig_px, step_in


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
        Target resolving power R (FWHM = lambda / R).  Where the native
        resolution is already coarser, the kernel is half a native pixel.
    loglam_out : numpy.ndarray
        ``(m,)`` log10 output wavelengths.

    Returns
    -------
    matrix : scipy.sparse.csr_matrix
        ``(m, n)``; ``flux_out = matrix @ flux_in``.
    covered : numpy.ndarray
        bool ``(m,)``: the kernel (+-3 sigma) lies inside the native range.
    """
    lw_in = np.log10(wave_in)
    sigma, sig_px, step_in = _kernel_sigma(lw_in, loglam_out, fwhm_in, resolution)
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


def grid_validity(wave_in: np.ndarray, good_in: np.ndarray, fwhm_in: np.ndarray | float,
                  resolution: float, loglam_out: np.ndarray) -> np.ndarray:
    """bool ``(m,)``: no missing native pixel within +-3 sigma of each output kernel.

    Also False where the kernel leaves the native range (as ``covered`` of
    :func:`degrade_matrix`).  The +-3 sigma window always includes the two
    native pixels around the output wavelength (sigma >= half a native pixel).
    """
    lw_in = np.log10(wave_in)
    sigma, _, _ = _kernel_sigma(lw_in, loglam_out, fwhm_in, resolution)
    lo = loglam_out - EDGE_SIGMAS * sigma
    hi = loglam_out + EDGE_SIGMAS * sigma
    missing = np.concatenate([[0], np.cumsum(~np.asarray(good_in, dtype=bool))])
    a = np.searchsorted(lw_in, lo, side="left")
    b = np.searchsorted(lw_in, hi, side="right")
    n_missing = missing[b] - missing[a]
    inside = (lo >= lw_in[0]) & (hi <= lw_in[-1])
    return inside & (n_missing == 0)


def degrade_masked(wave_in: np.ndarray, flux_in: np.ndarray, good_in: np.ndarray,
                   fwhm_in: np.ndarray | float, resolution: float,
                   loglam_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Degrade + resample a spectrum with missing native pixels; never invent flux.

    Normalised convolution ``(M @ (f g)) / (M @ g)`` with ``g`` the good-pixel
    indicator, so the missing pixels carry no weight; the result is kept only
    where :func:`grid_validity` is True and is 0 elsewhere.

    Returns
    -------
    flux : numpy.ndarray
        ``(m,)`` float64.
    valid : numpy.ndarray
        bool ``(m,)``.
    """
    good = np.asarray(good_in, dtype=bool) & np.isfinite(flux_in)
    op, _ = degrade_matrix(wave_in, fwhm_in, resolution, loglam_out)
    g = good.astype(np.float64)
    num = op @ np.where(good, flux_in, 0.0)
    den = op @ g
    valid = grid_validity(wave_in, good, fwhm_in, resolution, loglam_out) & (den > 0)
    flux = np.where(valid, num / np.where(den > 0, den, 1.0), 0.0)
    return flux, valid


def star_id(name: str) -> str:
    """Canonical star id: ``HD`` + 6 digits (+ component letter) for HD stars.

    ``"HD 57060"``, ``"HD057060"``, ``"HD 020902         Cl"`` (a MILES cluster
    star), ``"HD053929lp"`` / ``"HD053929ss"`` (two STELIB observations) all map
    to ``HD`` + 6 digits; other names are returned stripped.
    """
    s = " ".join(name.split())
    m = re.match(r"^HD\s*(\d+)([A-C]?)(?:lp|ss)?(?:\s+Cl)?$", s)
    if not m:
        return s
    sid = f"HD{int(m.group(1)):06d}{m.group(2)}"
    return STAR_ALIASES.get(sid, sid)


def _kind_and_class(spt: str, letter: str, lum: str, name: str) -> tuple[str, str]:
    """(kind, class letter) of a template from its type."""
    s = spt.strip()
    if name in HOT_SUBDWARFS:
        return "hot_subdwarf", IMPOSTOR
    if re.match(r"^W[NCRO]", s):
        return "wr", IMPOSTOR
    if re.match(r"^D[ABCOQZ]", s):
        return "wd", IMPOSTOR
    if lum == "VI":
        return "cool_subdwarf", letter
    return "normal", letter


def read_miles(folder: Path) -> dict:
    """Read the MILES stars with a usable type (HD149382 kept as an impostor)."""
    rows = list(csv.DictReader(open(folder / "miles_spectral_types.csv")))
    meta, fluxes, wave_air = [], [], None
    for r in rows:
        if not r["mk_class"]:
            continue
        name = r["name"].strip()
        path = folder / r["file"]
        if not path.is_file():
            print(f"  skip {name}: {r['file']} missing", file=sys.stderr)
            continue
        with fits.open(path) as hdul:
            hdr = hdul[0].header
            flux = np.asarray(hdul[0].data, dtype=np.float64)
            w = hdr["CRVAL1"] + hdr["CDELT1"] * (np.arange(flux.size) + 1 - hdr["CRPIX1"])
        if wave_air is None:
            wave_air = w
        elif w.size != wave_air.size or not np.allclose(w, wave_air):
            print(f"  skip {name}: different sampling", file=sys.stderr)
            continue
        if not np.all(np.isfinite(flux)) or np.median(flux) <= 0:
            print(f"  skip {name}: non-finite or non-positive flux", file=sys.stderr)
            continue
        letter, sub, lum = parse_spectral_type(r["spt"], r["mk_class"])
        kind, mk = _kind_and_class(r["spt"], r["mk_class"], lum, name)
        m = dict(mk=mk, spt=_clean_spt(r["spt"], r["mk_class"]), subtype=sub, lumclass=lum,
                 teff=_num(r["teff"]), logg=_num(r["logg"]), feh=_num(r["feh"]),
                 name=name, source="miles", star=star_id(name), kind=kind, ebv=0.0)
        if mk == IMPOSTOR:
            # no MK type: extend the red end with a hot (O9 V) Pickles continuum
            m.update(subtype=float("nan"), lumclass="", type_mk="O", type_sub=9.0)
        meta.append(m)
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
    """Numeric spectral type (O0 = 0 ... M9 = 69) and luminosity class (1-5).

    Impostors (no MK type) use ``type_mk`` / ``type_sub`` (a hot continuum).
    """
    mk = meta.get("type_mk", meta["mk"])
    sub = meta.get("type_sub", meta["subtype"])
    code = 10.0 * MK_LETTERS.index(mk) + (5.0 if np.isnan(sub) else sub)
    lum = _LUM_NUM.get(meta["lumclass"])
    if lum is None:                      # unknown: infer from log g where available
        g = meta["logg"]
        lum = 5.0 if np.isnan(g) or g >= 3.8 else (4.0 if g >= 3.2 else (3.0 if g >= 1.5 else 1.0))
    return code, lum


def _header_num(hdr, key: str) -> float:
    value = hdr.get(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def read_stelib(folder: Path) -> list[dict]:
    """Read the STELIB v3.2 files (one dict per file: air wavelengths, flux, meta).

    ``good`` marks the native pixels with data (non-zero, finite flux).  The
    flux is returned as in the file (dereddened); ``meta["ebv"]`` is the
    E(B-V) = ISEXTINC / 3.1 to re-apply.
    """
    rows = list(csv.DictReader(open(folder / "stelib_spectral_types.csv")))
    out = []
    for r in rows:
        path = folder / r["file"]
        if not path.is_file():
            print(f"  skip {r['file']}: missing", file=sys.stderr)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # non-standard APNUM1 cards
            with fits.open(path) as hdul:
                hdr = hdul[0].header
                flux = np.asarray(hdul[0].data, dtype=np.float64)
        w = hdr["CRVAL1"] + hdr["CDELT1"] * (np.arange(flux.size) + 1 - hdr["CRPIX1"])
        av = _header_num(hdr, "ISEXTINC")
        av = 0.0 if not np.isfinite(av) else av
        history = " ".join(str(h) for h in hdr.get("HISTORY", []))
        if av > 0 and "extinction applied" not in history:
            raise RuntimeError(f"{path}: ISEXTINC > 0 but no dereddening HISTORY")
        if abs(av - float(r["isextinc_av"])) > 1e-6:
            raise RuntimeError(f"{path}: ISEXTINC differs from the CSV")
        stem = path.stem[len("STELIB_v3.2_"):]
        spt = r["spectype"].strip()
        letter, sub, lum = parse_spectral_type(spt)
        sid = star_id(stem)
        if sid in MODERN_TYPES:
            _, letter, sub, lum = MODERN_TYPES[sid]
        kind, mk = _kind_and_class(spt, letter, lum, stem)
        if mk == IMPOSTOR:
            sub, lum = float("nan"), ""
        if not mk:
            raise RuntimeError(f"{path}: no class for type {spt!r}")
        good = np.isfinite(flux) & (flux != 0)
        out.append(dict(wave_air=w, flux=flux, good=good, meta=dict(
            mk=mk, spt=spt, subtype=float(sub), lumclass=lum, teff=_header_num(hdr, "TEFF"),
            logg=_header_num(hdr, "LOG_G"), feh=_header_num(hdr, "FE_H"),
            name=f"stelib:{stem}", source="stelib", star=sid, kind=kind,
            ebv=av / R_V_BUILD, av=av)))
    return out


def mkclass_type(stem: str) -> tuple[str, float, str, str]:
    """Decode an MKCLASS file stem ``tTTTlLLp00`` -> (letter, subtype, lumclass, spt).

    >>> mkclass_type("t060l50p00")
    ('O', 9.0, 'V', 'O9V')
    >>> mkclass_type("t010l00p00")[3]
    'O4Ia'
    """
    m = re.match(r"^t(\d{3})l(\d{2})p00$", stem)
    if not m:
        raise ValueError(f"unexpected MKCLASS name {stem}")
    code = int(m.group(1)) / 10.0
    codes, nums = [], []
    for i, (_, table) in enumerate(_MKCLASS_TYPE_CODES):
        for sub, c in table:
            codes.append(c)
            nums.append(10.0 * i + sub)
    num = round(float(np.interp(code, codes, nums)), 1)
    letter = MK_LETTERS[int(num // 10)]
    sub = round(num - 10.0 * (num // 10), 1)
    lum = _MKCLASS_LUM[int(m.group(2))]
    return letter, sub, lum, f"{letter}{sub:g}{lum}"


def read_mkclass(folder: Path) -> list[dict]:
    """Read one MKCLASS library folder (``libnor36`` or ``libr36``): 2-column ASCII."""
    out = []
    for path in sorted(folder.glob("t*.rbn")):
        data = np.loadtxt(path)
        letter, sub, lum, spt = mkclass_type(path.stem)
        _, _, lum_short = parse_spectral_type(spt)
        flux = data[:, 1].astype(np.float64)
        out.append(dict(wave_air=data[:, 0], flux=flux, good=np.isfinite(flux) & (flux != 0),
                        code=int(path.stem[1:4]), meta=dict(
                            mk=letter, spt=spt, subtype=sub, lumclass=lum_short,
                            teff=float("nan"), logg=float("nan"), feh=float("nan"),
                            name=f"mkclass:{spt}", source="mkclass", star=f"mkclass:{spt}",
                            kind="normal", ebv=0.0, file=path.name)))
    names = [d["meta"]["name"] for d in out]
    if len(set(names)) != len(names):
        raise RuntimeError(f"{folder}: MKCLASS names not unique")
    return out


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


def _redden(wave_vac: np.ndarray, flux: np.ndarray, ebv: float) -> np.ndarray:
    """Apply E(B-V) with the O'Donnell (1994) law, R_V = 3.1 (A(lambda)/E(B-V))."""
    from lamost_ostar.mock import extinction_odonnell
    if ebv <= 0:
        return flux
    return flux * 10.0 ** (-0.4 * ebv * extinction_odonnell(wave_vac, R_V_BUILD))


def _grid_masked(items: list[dict], fwhm_air: float, resolution: float, loglam: np.ndarray,
                 redden: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grid fluxes, valid masks and original (vacuum) ranges of masked-source spectra."""
    flux, valid, lo, hi = [], [], [], []
    for it in items:
        wv = air_to_vacuum(it["wave_air"])
        fwhm_vac = fwhm_air * np.interp(10.0 ** loglam, wv,
                                        np.gradient(wv) / np.gradient(it["wave_air"]))
        f = it["flux"]
        if redden:
            f = _redden(wv, f, it["meta"]["ebv"])
        g, v = degrade_masked(wv, f, it["good"], fwhm_vac, resolution, loglam)
        flux.append(g)
        valid.append(v)
        idx = np.flatnonzero(it["good"])
        lo.append(wv[idx[0]])
        hi.append(wv[idx[-1]])
    return np.array(flux), np.array(valid), np.array(lo), np.array(hi)


def build(libraries: Path, resolution: float = 1800.0) -> dict:
    """Build all template arrays; returns the dict written to ``templates.npz``."""
    loglam = grid_loglam()
    wave = grid_wavelength()
    print("reading MILES ...", file=sys.stderr)
    mi = read_miles(libraries / "miles")
    print("reading Pickles ...", file=sys.stderr)
    pk = read_pickles(libraries / "pickles")
    print("reading STELIB ...", file=sys.stderr)
    st = read_stelib(libraries / "stelib")
    print("reading MKCLASS libnor36 ...", file=sys.stderr)
    mkc = [d for d in read_mkclass(libraries / "mkclass_standards" / "libnor36")
           if d["code"] < MKCLASS_MAX_CODE]

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

    st_flux, st_valid, st_lo, st_hi = _grid_masked(st, STELIB_FWHM, resolution, loglam, True)
    mc_flux, mc_valid, mc_lo, mc_hi = _grid_masked(mkc, MKCLASS_FWHM, resolution, loglam, False)

    n_m, n_p, n_s, n_c = len(mi["meta"]), len(pk["meta"]), len(st), len(mkc)
    for m in pk["meta"]:
        m.update(star=m["name"], kind="normal", ebv=0.0)
    res = {"miles": min(WAVE_RES / MILES_FWHM, resolution), "pickles": PICKLES_R,
           "stelib": min(WAVE_RES / STELIB_FWHM, resolution),
           "mkclass": min(WAVE_RES / MKCLASS_FWHM, resolution)}
    meta = mi["meta"] + pk["meta"] + [d["meta"] for d in st] + [d["meta"] for d in mkc]
    flux = np.vstack([miles_ext, pickles_grid, st_flux, mc_flux])
    valid = np.vstack([np.ones((n_m + n_p, NPIX), bool), st_valid, mc_valid])
    if not valid.any(axis=1).all():
        raise RuntimeError("a template has no valid pixel")
    med = np.array([np.median(f[v]) for f, v in zip(flux, valid)])
    flux = np.where(valid, flux / med[:, None], 0.0)
    # a few noisy blue-end pixels of cool stars (e.g. MILES HD006497, Pickles
    # m9iii/m10iii) go slightly negative; a template flux cannot
    n_neg = int(np.sum(flux < 0))
    if n_neg:
        print(f"  clipped {n_neg} negative pixels in "
              f"{int(np.sum((flux < 0).any(axis=1)))} templates to 0", file=sys.stderr)
    flux = np.maximum(flux, 0.0)
    orig_min = np.concatenate([np.full(n_m, wave[0]), np.full(n_p, pk_vac[0]), st_lo, mc_lo])
    orig_max = np.concatenate([np.full(n_m, red_end - FADE), np.full(n_p, pk_vac[-1]), st_hi, mc_hi])
    extension = np.array([pk["meta"][j]["name"] for j in nearest] + [""] * (n_p + n_s + n_c))

    out = {k: np.array([m[k] for m in meta])
           for k in ("mk", "spt", "lumclass", "name", "source", "star", "kind")}
    for k in ("subtype", "teff", "logg", "feh", "ebv"):
        out[k] = np.array([m[k] for m in meta], dtype=np.float32)
    out["resolution"] = np.array([res[m["source"]] for m in meta], dtype=np.float32)
    out.update(flux=flux.astype(np.float32), valid=valid, coverage=valid.mean(axis=1).astype(np.float32),
               orig_min=orig_min, orig_max=orig_max, extension=extension,
               loglam0=np.float64(LOGLAM0), dloglam=np.float64(DLOGLAM),
               target_resolution=np.float64(resolution))
    if len(set(out["name"])) != len(out["name"]):
        raise RuntimeError("template names are not unique")
    if not np.all(np.isfinite(out["flux"])):
        raise RuntimeError("non-finite template flux")
    if out["flux"].shape[1] != NPIX:
        raise RuntimeError("wrong grid size")
    out["duplicates"] = np.array(cross_library_duplicates(out), dtype=str)
    return out


def cross_library_duplicates(out: dict) -> list[str]:
    """Stars with templates from more than one library (MILES/STELIB), as text lines."""
    lines = []
    real = np.isin(out["source"], ["miles", "stelib"])
    for sid in sorted(set(out["star"][real])):
        idx = np.flatnonzero((out["star"] == sid) & real)
        if len(set(out["source"][idx])) > 1:
            lines.append(f"{sid}: " + ", ".join(f"{out['name'][i]} ({out['spt'][i]})" for i in idx))
    return lines


def build_mkclass(libraries: Path, resolution: float = 1800.0) -> dict:
    """All of libnor36 (``nor36_*``) and libr36 (``r36_*``) on the grid, own normalisation."""
    loglam = grid_loglam()
    out = {"loglam0": np.float64(LOGLAM0), "dloglam": np.float64(DLOGLAM)}
    for folder, prefix in (("libnor36", "nor36_"), ("libr36", "r36_")):
        items = read_mkclass(libraries / "mkclass_standards" / folder)
        flux, valid, lo, hi = _grid_masked(items, MKCLASS_FWHM, resolution, loglam, False)
        meta = [d["meta"] for d in items]
        block = {k: np.array([m[k] for m in meta])
                 for k in ("mk", "spt", "lumclass", "name", "star", "kind")}
        for k in ("subtype", "teff", "logg", "feh", "ebv"):
            block[k] = np.array([m[k] for m in meta], dtype=np.float32)
        n = len(items)
        block.update(source=np.full(n, "mkclass"), extension=np.full(n, ""),
                     orig_min=lo, orig_max=hi, coverage=valid.mean(axis=1).astype(np.float32),
                     resolution=np.full(n, min(WAVE_RES / MKCLASS_FWHM, resolution), np.float32),
                     flux16=encode_float16(flux), valid_bits=np.packbits(valid, axis=-1))
        out.update({prefix + k: v for k, v in block.items()})
    return out


def summary_markdown(out: dict) -> str:
    """Counts per class x source x kind, the O and B stars, the duplicates."""
    lines = ["# Template library (`lamost_ostar/data/templates.npz`)", "",
             "Written by `scripts/build_templates.py`; see `lamost_ostar/templates.py`.", "",
             f"{len(out['mk'])} templates, {len(set(out['star']))} distinct stars/ids.", "",
             "## Templates per class x source (x kind)", "",
             "| class | " + " | ".join(["miles", "stelib", "pickles", "mkclass"]) + " | total | stars |",
             "|---|---|---|---|---|---|---|"]
    for k in MK_LETTERS + (IMPOSTOR,):
        sel = out["mk"] == k
        cells = [str(int(np.sum(sel & (out["source"] == s)))) for s in ("miles", "stelib", "pickles", "mkclass")]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {int(sel.sum())} | {len(set(out['star'][sel]))} |")
    lines += ["", "| kind | templates | classes |", "|---|---|---|"]
    for kind in sorted(set(out["kind"])):
        sel = out["kind"] == kind
        cls = ", ".join(f"{c} {int(np.sum(sel & (out['mk'] == c)))}" for c in MK_LETTERS + (IMPOSTOR,)
                        if np.any(sel & (out["mk"] == c)))
        lines.append(f"| {kind} | {int(sel.sum())} | {cls} |")
    for cls in ("O", "B", IMPOSTOR):
        lines += ["", f"## Class {cls}: templates (star id, type, source, coverage, E(B-V) applied)", ""]
        idx = np.flatnonzero(out["mk"] == cls)
        idx = idx[np.lexsort((out["name"][idx], out["subtype"][idx], out["source"][idx]))]
        for i in idx:
            lines.append(f"- `{out['name'][i]}` star `{out['star'][i]}` {out['spt'][i]} "
                         f"({out['source'][i]}, {out['kind'][i]}, subtype {out['subtype'][i]:g} "
                         f"{out['lumclass'][i]}, coverage {out['coverage'][i]:.2f}, "
                         f"E(B-V) {out['ebv'][i]:.2f})")
    lines += ["", f"## Cross-library duplicates (MILES and STELIB, {len(out['duplicates'])} stars)", ""]
    lines += [f"- {d}" for d in out["duplicates"]]
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--mkclass-out", type=Path, default=DEFAULT_MKCLASS_OUT)
    parser.add_argument("--summary", type=Path, default=REPO / "docs" / "template_library.md",
                        help="markdown summary (counts, O/B stars, duplicates); '' to skip")
    parser.add_argument("--resolution", type=float, default=1800.0)
    parser.add_argument("--float32", action="store_true",
                        help="store the fluxes as float32 (about 3x larger)")
    args = parser.parse_args(argv)
    for sub in ("miles", "pickles", "stelib", "mkclass_standards"):
        if not (args.libraries / sub).is_dir():
            parser.error(f"no {sub}/ under {args.libraries}")
    out = build(args.libraries, args.resolution)
    print(f"cross-library duplicates (MILES and STELIB): {len(out['duplicates'])} stars")
    for d in out["duplicates"]:
        print(f"  {d}")
    if args.summary and str(args.summary):
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(summary_markdown(out))
    save = dict(out)
    save["valid_bits"] = np.packbits(save.pop("valid"), axis=-1)
    if not args.float32:
        save["flux16"] = encode_float16(save.pop("flux"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **save)
    counts = {k: int(np.sum(out["mk"] == k)) for k in MK_LETTERS + (IMPOSTOR,)}
    size = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({len(out['mk'])} templates, {size:.2f} MB): {counts}")
    mk = build_mkclass(args.libraries, args.resolution)
    np.savez_compressed(args.mkclass_out, **mk)
    print(f"wrote {args.mkclass_out} ({len(mk['nor36_name'])} libnor36 + {len(mk['r36_name'])} "
          f"libr36 spectra, {args.mkclass_out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
