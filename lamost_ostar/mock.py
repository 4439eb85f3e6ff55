"""Mock LAMOST low-resolution data release.

The real LAMOST release cannot be downloaded here and holds almost no O stars
that we could use, so every scan, benchmark and demo runs on a *mock release*
that looks like the real thing to a LAMOST user:

* files ``OUTDIR/<LMJD>/<PLANID>/spec-<LMJD>-<PLANID>_sp<SS>-<FFF>.fits.gz``
  grouped in plans of up to 16 spectrographs x 250 fibres, written in the DR7
  image layout (default; 5 x N float32, N = 3900-3909, COEFF0 = 3.5682,
  COEFF1 = 1e-4, rows flux/ivar/wavelength/andmask/ormask), the DR9+ ``COADD``
  table layout or the DR1 layout (row 2 = continuum-normalised flux), with the
  header keyword set and order of real files;
* spectra of every MK class O ... M made from the packaged *real* templates
  (:mod:`lamost_ostar.templates`): interpolation between neighbouring templates
  of the same class, radial velocity, interstellar reddening (O'Donnell 1994 /
  Cardelli et al. 1989, R_V = 3.1 or drawn per spectrum; added to the
  template's own E(B-V) -- STELIB templates are stored reddened), optional
  extra instrumental smoothing to a drawn resolving power, smooth
  flux-calibration distortions and a blue/red arm mismatch at the dichroic;
* template coverage: pixels where a template has no data (``valid`` False in
  the library, e.g. beyond a STELIB star's red end) get flux 0, ivar 0 and the
  mask bit :data:`MASK_NO_COVERAGE` in andmask/ormask, so
  :mod:`lamost_ostar.preprocess` masks and interpolates them like bad pixels;
* a noise model measured on real DR7 files (:class:`InstrumentModel`): the
  per-pixel effective throughput (blue end and dichroic region 5700-5900 A
  noisier, telluric bands), the sky-variance shape, the sky/source variance
  ratio as a function of S/N, S/N drawn from the real SNRG distribution of the
  shared manifest, Gaussian noise drawn from exactly the ivar written, bad-pixel
  patches (ivar 0, flagged in andmask/ormask) and the zero-flux red tail that
  real DR7 files have;
* an optional fraction of broken files (truncated gzip, non-FITS, empty, NaN
  flux) and a truth table ``OUTDIR/truth.csv``.

Everything is reproducible from one seed, independent of the number of worker
processes.

In-memory API for training data
-------------------------------
>>> import numpy as np
>>> from lamost_ostar.mock import simulate_spectra
>>> sim = simulate_spectra(64, "balanced", np.random.default_rng(1))  # doctest: +SKIP
>>> flux, ivar, andmask, truth = sim                # doctest: +SKIP
>>> flux.shape                                       # common grid (N, NPIX)  # doctest: +SKIP
(64, 3921)
>>> truth[0]["mk"], truth[0]["snr_g"]                # doctest: +SKIP

Augmented training draws (per-class E(B-V) ranges, R_V, resolution, S/N,
impostors of class ``"X"``):

>>> cfg = MockConfig(ebv_ranges={"O": (0, 2.5), "B": (0, 2.5)}, r_v_range=(2.8, 4.0),
...                  resolution_range=(1500, 2200), snr_range=(5, 80), min_coverage=0)
>>> sim = simulate_spectra(0, rng=1, mk=["O", "B", "X"], config=cfg)  # doctest: +SKIP

Writing a release
-----------------
>>> from lamost_ostar.mock import MockConfig, write_release
>>> write_release("out", MockConfig(n=1000, preset="survey", seed=1))  # doctest: +SKIP

or ``lamost-ostar mock OUTDIR --n 1000 --preset survey --seed 1``.
"""
from __future__ import annotations

import csv
import datetime as _dt
import functools
import math
import os
import warnings
import zlib
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from lamost_ostar.preprocess import DLOGLAM, LOGLAM0, NPIX

__all__ = [
    "CLASSES",
    "IMPOSTOR",
    "SIM_CLASSES",
    "MASK_NO_COVERAGE",
    "DEFAULT_MIN_COVERAGE",
    "PRESETS",
    "LAYOUTS",
    "BROKEN_KINDS",
    "BROKEN_EXPECTED_ERROR",
    "NATIVE_COEFF0",
    "NATIVE_COEFF1",
    "NATIVE_NPIX",
    "NATIVE_OFFSET",
    "BANDS",
    "TRUTH_COLUMNS",
    "InstrumentModel",
    "load_instrument",
    "derive_instrument",
    "MockConfig",
    "SimulatedSpectra",
    "resolve_fractions",
    "class_counts",
    "simulate_spectra",
    "side_stream",
    "designation",
    "extinction_odonnell",
    "fits_image_bytes",
    "fits_coadd_bytes",
    "release_plan",
    "write_release",
    "ReleaseSummary",
    "read_truth",
]

C_KMS = 299792.458

#: MK classes, hottest first.
CLASSES: tuple[str, ...] = ("O", "B", "A", "F", "G", "K", "M")
#: Class letter of the hot non-MK impostors (Wolf-Rayet, white dwarfs, hot
#: subdwarfs; :data:`lamost_ostar.templates.IMPOSTOR`).  Not in presets or
#: releases; ``simulate_spectra(mk=[...])`` accepts it.
IMPOSTOR: str = "X"
#: Every class the simulator can draw.
SIM_CLASSES: tuple[str, ...] = CLASSES + (IMPOSTOR,)
#: andmask/ormask bit set where the drawn template(s) have no data (value 32;
#: the bad-pixel patches use bit value 1).  Those pixels have ivar 0, flux 0.
MASK_NO_COVERAGE: int = 32
#: Default :attr:`MockConfig.min_coverage`: the picker prefers templates with
#: at least this fraction of valid grid pixels.
DEFAULT_MIN_COVERAGE: float = 0.85

#: Class-fraction presets.  ``survey`` mimics the real imbalance of a LAMOST
#: release (O stars ~1e-5 of stars, B a few per cent, then roughly LAMOST's
#: A/F/G/K/M mix); ``balanced`` has equal fractions (for training).
PRESETS: dict[str, dict[str, float]] = {
    "survey": {"O": 1e-5, "B": 0.03, "A": 0.08, "F": 0.28, "G": 0.33, "K": 0.21,
               "M": 0.07},
    "balanced": {k: 1.0 / 7.0 for k in CLASSES},
}

#: File layouts that can be written.
LAYOUTS: tuple[str, ...] = ("image", "coadd", "dr1")

#: Kinds of broken files and the :mod:`lamost_ostar.io` reason each produces.
BROKEN_KINDS: tuple[str, ...] = ("truncated", "not_fits", "empty", "nan")
BROKEN_EXPECTED_ERROR: dict[str, str] = {
    "truncated": "truncated", "not_fits": "not_fits", "empty": "empty",
    "nan": "non_finite"}

#: Native LAMOST grid: log10 wavelength of pixel 0, step, maximum length.
NATIVE_COEFF0: float = 3.5682
NATIVE_COEFF1: float = 1e-4
NATIVE_NPIX: int = 3909
#: Native pixel 0 is common-grid pixel ``NATIVE_OFFSET``.
NATIVE_OFFSET: int = int(round((NATIVE_COEFF0 - LOGLAM0) / DLOGLAM))

#: Wavelength windows [A] of the per-band S/N (median flux*sqrt(ivar)); they
#: reproduce the SNRU..SNRZ keywords of real DR7 files to a few per cent.
BANDS: dict[str, tuple[float, float]] = {
    "u": (3500.0, 4000.0), "g": (4000.0, 5500.0), "r": (5600.0, 6900.0),
    "i": (6900.0, 8400.0), "z": (8400.0, 9200.0)}

#: Columns of ``truth.csv`` (in order).
TRUTH_COLUMNS: tuple[str, ...] = (
    "path", "obsid", "designation", "ra", "dec", "lmjd", "planid", "spid", "fiberid",
    "layout", "mk", "subclass", "template1", "template2", "weight1", "teff", "logg",
    "feh", "rv", "ebv", "snr_u", "snr_g", "snr_r", "snr_i", "snr_z", "npix", "broken",
    "expected_error")

_INSTRUMENT_FILE = "lamost_instrument.npz"


def _native_loglam(n: int = NATIVE_NPIX) -> np.ndarray:
    return NATIVE_COEFF0 + NATIVE_COEFF1 * np.arange(n)


@functools.lru_cache(maxsize=32)
def _native_wave32(n: int) -> np.ndarray:
    """Read-only float32 wavelength row of an ``n``-pixel native file."""
    w = (10.0 ** _native_loglam(n)).astype(np.float32)
    w.setflags(write=False)
    return w


# ============================================================================ instrument
@dataclass
class InstrumentModel:
    """LAMOST noise/throughput model measured on real DR7 files.

    Noise model (flux units): ``var(lambda) = a * (F / T + rho' * S)`` where
    ``F`` is the noiseless flux, ``T`` the effective throughput (including the
    telluric bands, since LAMOST fluxes are telluric-corrected), ``S`` the
    sky-variance shape, ``rho'`` set by the sky/source variance ratio ``rho`` at
    the g band, and ``a`` fixed by the target SNRG.

    Attributes
    ----------
    throughput : numpy.ndarray
        float32 ``(NATIVE_NPIX,)``, median ``flux*ivar`` of bright real stars,
        normalised to 1 over the g band.
    sky : numpy.ndarray
        float32 ``(NATIVE_NPIX,)`` sky-variance shape (flux units), 1 over g.
    rho_coef : numpy.ndarray
        ``(slope, intercept, scatter)`` of ``ln rho = intercept + slope ln SNRG``.
    flux_coef : numpy.ndarray
        ``(slope, intercept, scatter)`` of ``log10 median_g(flux) =
        intercept + slope log10 SNRG``.
    snrg : numpy.ndarray
        Real SNRG values (stars of the shared manifest) to draw S/N from.
    n_files : int
        Number of real files the model was measured on.
    """

    throughput: np.ndarray
    sky: np.ndarray
    rho_coef: np.ndarray
    flux_coef: np.ndarray
    snrg: np.ndarray
    n_files: int = 0

    def save(self, path: str | os.PathLike) -> None:
        """Write the model to an ``.npz`` file."""
        np.savez_compressed(path, throughput=self.throughput.astype(np.float32),
                            sky=self.sky.astype(np.float32), rho_coef=self.rho_coef,
                            flux_coef=self.flux_coef, snrg=self.snrg.astype(np.float32),
                            n_files=self.n_files)


def load_instrument(path: str | os.PathLike | None = None) -> InstrumentModel:
    """Load the packaged (or a given) :class:`InstrumentModel`."""
    if path is None:
        path = resources.files("lamost_ostar") / "data" / _INSTRUMENT_FILE
    with np.load(str(path)) as d:
        return InstrumentModel(
            throughput=d["throughput"].astype(np.float64), sky=d["sky"].astype(np.float64),
            rho_coef=d["rho_coef"].astype(np.float64),
            flux_coef=d["flux_coef"].astype(np.float64),
            snrg=d["snrg"].astype(np.float64), n_files=int(d["n_files"]))


def _read_native(path: str) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """Flux and 1/ivar of a real DR2-DR8 image file on the native grid (NaN = no data)."""
    import fitsio
    try:
        data, hdr = fitsio.read(path, header=True)
    except Exception:  # noqa: BLE001 - any unreadable file is skipped
        return None
    if data.ndim != 2 or data.shape[0] < 5 or "SNRG" not in hdr:
        return None
    n = data.shape[1]
    i0 = int(round((float(hdr["COEFF0"]) - NATIVE_COEFF0) / NATIVE_COEFF1))
    idx = np.arange(n) + i0
    ok = (data[1] > 0) & (data[0] != 0) & np.isfinite(data[0]) & (idx >= 0) & (idx < NATIVE_NPIX)
    flux = np.full(NATIVE_NPIX, np.nan)
    var = np.full(NATIVE_NPIX, np.nan)
    flux[idx[ok]] = data[0][ok]
    var[idx[ok]] = 1.0 / data[1][ok]
    return flux, var, {k: hdr.get(k) for k in ("CLASS", "SNRG")}


def derive_instrument(paths: Iterable[str | os.PathLike],
                      snrg_sample: Sequence[float]) -> InstrumentModel:
    """Measure an :class:`InstrumentModel` on real DR2-DR8 image-layout files.

    Parameters
    ----------
    paths : iterable of path
        Real LAMOST image-layout files with SNRG keywords (stars only are used).
    snrg_sample : sequence of float
        Real SNRG values to draw S/N from (e.g. the shared manifest's stars).

    Notes
    -----
    * ``throughput``: for source-dominated spectra ``flux*ivar`` equals the
      effective throughput; median over stars with SNRG > 60, each normalised
      over the g band, then a 5-pixel median filter.
    * ``sky``, ``rho``: every star is fitted (non-negative least squares) as
      ``var = a F/T + b S``; ``S`` is updated as the median over stars with
      SNRG < 40 of ``(var - a F/T) / b`` (5 iterations), then smoothed and
      floored at the flat-sky level ``(T_g / T)^2``.
    """
    from scipy.ndimage import median_filter
    from scipy.optimize import nnls

    loglam = _native_loglam()
    wave = 10.0 ** loglam
    F, V, snr = [], [], []
    for p in paths:
        got = _read_native(str(p))
        if got is None or got[2]["CLASS"] != "STAR":
            continue
        F.append(got[0])
        V.append(got[1])
        snr.append(float(got[2]["SNRG"]))
    if len(F) < 5:
        raise ValueError(f"need at least 5 real star files, got {len(F)}")
    F, V, snr = np.array(F), np.array(V), np.array(snr)
    gb = (wave >= BANDS["g"][0]) & (wave < BANDS["g"][1])
    fi = F / V
    norm = np.nanmedian(fi[:, gb], axis=1)
    bright = snr > 60 if np.sum(snr > 60) >= 5 else snr >= np.sort(snr)[-5]
    t = np.nanmedian(fi[bright] / norm[bright, None], axis=0)
    t = np.where(np.isfinite(t), t, np.nanmin(t))
    t = median_filter(t, 5)
    t = np.maximum(t, 1e-3)
    t /= np.median(t[gb])
    floor = (1.0 / t) ** 2
    s = floor.copy()
    a = np.zeros(len(F))
    b = np.zeros(len(F))
    for _ in range(5):
        for k in range(len(F)):
            m = np.isfinite(F[k]) & np.isfinite(V[k]) & (F[k] > 0)
            x = np.stack([F[k][m] / t[m], s[m]], axis=1)
            w = 1.0 / V[k][m]
            coef, _ = nnls(x * w[:, None], V[k][m] * w)
            a[k], b[k] = coef
        faint = (b > 0) & (snr < 40)
        r = (V[faint] - a[faint, None] * F[faint] / t) / b[faint, None]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN columns
            s_new = np.nanmedian(r, axis=0)
        s_new = np.where(np.isfinite(s_new), s_new, floor)
        s = np.maximum(median_filter(s_new, 3), floor)
        s /= np.median(s[gb])
    fg = np.nanmedian(F[:, gb] / t[gb], axis=1)
    rho = b * np.median(s[gb]) / np.maximum(a * fg, 1e-30)
    ok = rho > 1e-4
    slope, icpt = np.polyfit(np.log(snr[ok]), np.log(rho[ok]), 1)
    scatter = float(np.std(np.log(rho[ok]) - (icpt + slope * np.log(snr[ok]))))
    fmed = np.nanmedian(F[:, gb], axis=1)
    okf = fmed > 0
    fs, fi0 = np.polyfit(np.log10(snr[okf]), np.log10(fmed[okf]), 1)
    fsc = float(np.std(np.log10(fmed[okf]) - (fi0 + fs * np.log10(snr[okf]))))
    return InstrumentModel(throughput=t, sky=s,
                           rho_coef=np.array([slope, icpt, scatter]),
                           flux_coef=np.array([fs, fi0, fsc]),
                           snrg=np.asarray(snrg_sample, dtype=np.float64), n_files=len(F))


# ============================================================================ physics
def extinction_odonnell(wave: np.ndarray, r_v: float = 3.1) -> np.ndarray:
    """A(lambda) / E(B-V) of the O'Donnell (1994) optical / Cardelli et al. (1989) law.

    Parameters
    ----------
    wave : numpy.ndarray
        Wavelength [A], valid 1000 A < wave < 33000 A (optical and IR branches).
    r_v : float
        Total-to-selective extinction ratio.
    """
    a, b = _extinction_ab(wave)
    return r_v * a + b


def _extinction_ab(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a(x), b(x)`` of ``A(lambda)/E(B-V) = R_V a + b`` (O'Donnell 1994 / CCM 1989)."""
    x = 1e4 / np.asarray(wave, dtype=np.float64)
    a = np.empty_like(x)
    b = np.empty_like(x)
    ir = x < 1.1
    a[ir] = 0.574 * x[ir] ** 1.61
    b[ir] = -0.527 * x[ir] ** 1.61
    op = ~ir
    y = x[op] - 1.82
    a[op] = np.polyval([-0.505, 1.647, -0.827, -1.718, 1.137, 0.701, -0.609, 0.104, 1.0], y)
    b[op] = np.polyval([3.347, -10.805, 5.491, 11.102, -7.985, -3.989, 2.908, 1.952, 0.0], y)
    return a, b


def designation(ra: np.ndarray | float, dec: np.ndarray | float) -> list[str]:
    """LAMOST designations ``"LAMOST Jhhmmss.ss+ddmmss.s"`` (truncated, as LAMOST does)."""
    ra = np.atleast_1d(np.asarray(ra, dtype=np.float64))
    dec = np.atleast_1d(np.asarray(dec, dtype=np.float64))
    out = []
    for r, d in zip(ra, dec):
        h = (r % 360.0) / 15.0
        hh = int(h)
        mm = int((h - hh) * 60.0)
        ss = math.floor(((h - hh) * 3600.0 - mm * 60.0) * 100.0 + 1e-6) / 100.0
        sign = "-" if d < 0 else "+"
        ad = abs(d)
        dd = int(ad)
        dm = int((ad - dd) * 60.0)
        ds = math.floor(((ad - dd) * 3600.0 - dm * 60.0) * 10.0 + 1e-6) / 10.0
        out.append(f"LAMOST J{hh:02d}{mm:02d}{ss:05.2f}{sign}{dd:02d}{dm:02d}{ds:04.1f}")
    return out


def resolve_fractions(spec: str | Mapping[str, float]) -> dict[str, float]:
    """Normalised class fractions from a preset name, a mapping or ``"O=0.1,B=0.2"``.

    Classes not named get 0.  Raises ``ValueError`` with a one-line message.
    """
    if isinstance(spec, str):
        if spec in PRESETS:
            frac = dict(PRESETS[spec])
        else:
            frac = {}
            for part in spec.split(","):
                if "=" not in part:
                    raise ValueError(f"unknown preset or bad fractions {spec!r} "
                                     f"(use {'/'.join(PRESETS)} or 'O=0.1,B=0.2,...')")
                k, v = part.split("=", 1)
                try:
                    frac[k.strip().upper()] = float(v)
                except ValueError:
                    raise ValueError(f"bad fraction {part!r}") from None
    else:
        frac = {str(k).upper(): float(v) for k, v in spec.items()}
    bad = [k for k in frac if k not in CLASSES]
    if bad:
        raise ValueError(f"unknown MK class(es) {', '.join(bad)} (use {' '.join(CLASSES)})")
    if any((not np.isfinite(v)) or v < 0 for v in frac.values()):
        raise ValueError("class fractions must be finite and >= 0")
    total = sum(frac.values())
    if total <= 0:
        raise ValueError("class fractions sum to 0")
    return {k: frac.get(k, 0.0) / total for k in CLASSES}


def class_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Exact class counts for ``n`` stars (largest-remainder rounding)."""
    p = np.array([fractions.get(k, 0.0) for k in CLASSES], dtype=np.float64)
    p = p / p.sum()
    raw = p * n
    cnt = np.floor(raw).astype(int)
    rest = n - cnt.sum()
    if rest:
        order = np.argsort(-(raw - cnt), kind="stable")
        cnt[order[:rest]] += 1
    return {k: int(c) for k, c in zip(CLASSES, cnt)}


# E(B-V) distributions per class: (kind, p1, p2); gamma(shape, scale) or
# exponential(mean).  O and B stars are young disc stars, often heavily reddened.
_EBV = {"O": ("gamma", 2.0, 0.5), "B": ("gamma", 1.5, 0.35), "A": ("exp", 0.12, 0),
        "F": ("exp", 0.05, 0), "G": ("exp", 0.05, 0), "K": ("exp", 0.05, 0),
        "M": ("exp", 0.04, 0), "X": ("gamma", 1.5, 0.35)}
# radial velocity (mean, sigma) [km/s]
_RV = {"O": (0.0, 25.0), "B": (0.0, 25.0), "A": (-5.0, 30.0), "F": (-10.0, 40.0),
       "G": (-10.0, 45.0), "K": (-10.0, 50.0), "M": (-10.0, 45.0), "X": (0.0, 30.0)}
# typical g-r colour (unreddened) for the MAG keywords
_GR = {"O": -0.45, "B": -0.3, "A": 0.0, "F": 0.3, "G": 0.45, "K": 0.8, "M": 1.4, "X": -0.4}


#: Values of :attr:`MockConfig.template_source`.
TEMPLATE_SOURCES: tuple[str, ...] = ("auto", "miles", "stelib", "pickles", "mkclass", "all")


@dataclass
class MockConfig:
    """Everything that defines a mock release (or an in-memory batch).

    Attributes
    ----------
    n : int
        Number of spectra (files).
    preset : str or mapping
        Class fractions: ``"survey"``, ``"balanced"``, ``"O=0.1,B=0.2,..."`` or a dict.
    layout : {"image", "coadd", "dr1"}
        File layout (DR7 image, DR9+ ``COADD`` table, DR1).
    seed : int
        Master seed; the release is identical for any number of workers.
    broken_rate : float
        Fraction of files written broken (kinds in ``BROKEN_KINDS``).
    snr_range : tuple of float, optional
        Keep drawn SNRG within ``[lo, hi]`` (redraws from the real distribution).
    ebv_scale : float
        Multiplies every E(B-V) drawn from the class distributions (not the
        ``ebv_ranges`` draws).
    ebv_ranges : mapping of str to (float, float), optional
        Per-class uniform E(B-V) draws, e.g. ``{"O": (0, 2.5), "B": (0, 2.5),
        "A": (0, 1.5), "F": (0, 1.0)}`` (keys from ``O B A F G K M X``):
        spectra of a listed class draw E(B-V) ~ U(lo, hi) instead of the class
        distribution (no ``ebv_scale``, no clipping); other classes keep the
        default distribution.  Every drawn E(B-V) is *added* to the template's
        own (STELIB templates are stored reddened by their A_V / 3.1); truth
        ``ebv`` is the drawn value, ``ebv_total`` the sum.
    r_v_range : (float, float), optional
        Draw R_V ~ U(lo, hi) per spectrum for the drawn reddening (default:
        R_V = 3.1 for all); truth ``r_v``.
    resolution_range : (float, float), optional
        Draw a target resolving power R ~ U(lo, hi) per spectrum and smooth the
        template mixture with a Gaussian in log-lambda of sigma^2 =
        (1/R)^2 - (1/R_tpl)^2 (FWHM units), R_tpl the template's resolution at
        4500 A (``TemplateLibrary.resolution``; the coarser of a pair); no
        smoothing where the template is already coarser.  Truth
        ``resolution`` = min(R, R_tpl) (= R_tpl without this knob).
    interstellar : bool
        Add the interstellar lines and diffuse bands of the drawn E(B-V)
        (:mod:`lamost_ostar.interstellar`), at the spectrum's resolution, on
        top of the template's own.  Its random draws come from
        :func:`side_stream` of the batch's generator, so every other draw (and
        so the rest of the release) is the same with and without it.
    min_coverage : float
        The picker prefers templates whose ``coverage`` (fraction of valid grid
        pixels) is at least this (default 0.85, meant for releases; pass 0 for
        training draws that may use partial STELIB spectra).
    rv_scale : float
        Multiplies every drawn radial velocity.
    calib_sigma : float
        Size of the smooth flux-calibration distortion (Legendre coefficients ~
        N(0, calib_sigma / k)).
    bad_patch_rate : float
        Mean number of bad-pixel patches per spectrum (Poisson).
    template_source : {"auto", "miles", "stelib", "pickles", "mkclass", "all"}
        Which real templates to use, per class, among those with
        ``coverage >= min_coverage``.  ``auto``: never the blue-only MKCLASS
        averages; the LAMOST-like-resolution libraries (MILES + STELIB) for
        classes that have at least 5 such stars, else also Pickles.  A named
        source: only that library.  ``all``: every library, MKCLASS included.
        If nothing qualifies for a requested class (e.g. a one-template
        library), the class's templates with enough coverage are used, then
        all of them.  Class ``X`` (impostors) is drawn only when asked for
        through ``simulate_spectra(mk=[...])``.
    compresslevel : int
        gzip level of the written files (1 = fastest).
    batch_size : int
        Spectra simulated per vectorised batch (and per worker task).
    data_release : str
        ``DATA_V`` keyword; default by layout.
    pipeline_version : str
        ``VERSPIPE`` keyword; default by layout.
    """

    n: int = 1000
    preset: str | Mapping[str, float] = "survey"
    layout: str = "image"
    seed: int = 1
    broken_rate: float = 0.0
    snr_range: tuple[float, float] | None = None
    ebv_scale: float = 1.0
    rv_scale: float = 1.0
    calib_sigma: float = 0.06
    bad_patch_rate: float = 0.6
    template_source: str = "auto"
    ebv_ranges: Mapping[str, tuple[float, float]] | None = None
    r_v_range: tuple[float, float] | None = None
    resolution_range: tuple[float, float] | None = None
    interstellar: bool = False
    min_coverage: float = DEFAULT_MIN_COVERAGE
    compresslevel: int = 1
    batch_size: int = 256
    data_release: str | None = None
    pipeline_version: str | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` (one line) for an invalid configuration."""
        if int(self.n) < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r} (use {', '.join(LAYOUTS)})")
        if not 0.0 <= float(self.broken_rate) <= 1.0:
            raise ValueError(f"broken rate must be within [0, 1], got {self.broken_rate}")
        if self.snr_range is not None:
            lo, hi = self.snr_range
            if not (0 < lo < hi):
                raise ValueError(f"bad S/N range {self.snr_range} (need 0 < lo < hi)")
        if not 0 <= int(self.compresslevel) <= 9:
            raise ValueError("compresslevel must be within 0..9")
        if int(self.batch_size) < 1:
            raise ValueError("batch size must be >= 1")
        if self.template_source not in TEMPLATE_SOURCES:
            raise ValueError(f"unknown template source {self.template_source!r}")
        if self.ebv_ranges is not None:
            for k, rng_ in self.ebv_ranges.items():
                if str(k).upper() not in SIM_CLASSES:
                    raise ValueError(f"unknown class {k!r} in ebv_ranges")
                lo, hi = rng_
                if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo <= hi):
                    raise ValueError(f"bad E(B-V) range {rng_} for {k} (need 0 <= lo <= hi)")
        if self.r_v_range is not None:
            lo, hi = self.r_v_range
            if not (0 < lo <= hi):
                raise ValueError(f"bad R_V range {self.r_v_range} (need 0 < lo <= hi)")
        if self.resolution_range is not None:
            lo, hi = self.resolution_range
            if not (0 < lo <= hi):
                raise ValueError(f"bad resolution range {self.resolution_range} (need 0 < lo <= hi)")
        if not 0.0 <= float(self.min_coverage) <= 1.0:
            raise ValueError(f"min_coverage must be within [0, 1], got {self.min_coverage}")
        resolve_fractions(self.preset)


# ============================================================================ simulation
@dataclass
class SimulatedSpectra:
    """A batch of mock spectra in memory.

    Unpacks as ``flux, ivar, andmask, truth = sim``.

    Attributes
    ----------
    flux, ivar : numpy.ndarray
        float32 ``(N, P)``; on the common grid ``P = NPIX`` (pixels outside a
        spectrum's native coverage have flux 0 and ivar 0), on the native grid
        ``P = NATIVE_NPIX`` (pixels at or beyond ``npix[i]`` are unused).
    andmask, ormask : numpy.ndarray
        int32 ``(N, P)``.
    wavelength : numpy.ndarray
        float64 ``(P,)`` vacuum wavelength [A] of the chosen grid.
    npix : numpy.ndarray
        int ``(N,)`` native length of each spectrum (3900-3909).
    grid : str
        ``"common"`` or ``"native"``.
    truth : list of dict
        One record per spectrum (keys as :data:`TRUTH_COLUMNS`, without the
        file-level ones that only :func:`write_release` fills).
    """

    flux: np.ndarray
    ivar: np.ndarray
    andmask: np.ndarray
    ormask: np.ndarray
    wavelength: np.ndarray
    npix: np.ndarray
    grid: str
    truth: list[dict[str, Any]]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.flux, self.ivar, self.andmask, self.truth))

    def __len__(self) -> int:
        return int(self.flux.shape[0])


#: Counts of pipeline SUBCLASS digits per MK letter among the real stars of the
#: shared manifest (``../shared/data/lamost/manifest.csv``, DR1 + DR7; M includes
#: dM/gM).  Templates are drawn so that the subtype mix of a class follows these
#: (Gaussian-smoothed, sigma 0.7 subtypes); O and B (none in the data) are uniform.
_LAMOST_SUBTYPE_COUNTS: dict[str, dict[int, float]] = {
    "A": {0: 1, 1: 2, 2: 6, 3: 3, 4: 9, 5: 6, 6: 5, 7: 8, 9: 4},
    "F": {0: 4, 2: 3, 5: 29, 6: 1, 7: 2, 9: 19},
    "G": {0: 9, 2: 11, 3: 8, 4: 2, 5: 30, 6: 2, 7: 3, 8: 6, 9: 3},
    "K": {0: 3, 1: 10, 2: 1, 3: 13, 5: 27, 7: 20},
    "M": {0: 16, 1: 9, 2: 4, 3: 1, 4: 2},
}
#: Fraction of dwarfs/subgiants (luminosity class IV-V, or logg >= 3.5) per class.
_DWARF_FRACTION: dict[str, float] = {"O": 0.5, "B": 0.6, "A": 0.6, "F": 0.9, "G": 0.85,
                                     "K": 0.7, "M": 0.9}


def _is_dwarf(lumclass: np.ndarray, logg: np.ndarray) -> np.ndarray:
    lum = np.asarray(lumclass).astype(str)
    known = lum != ""
    dwarf = np.isin(lum, ["IV", "V", "VI", "IV-V"])
    return np.where(known, dwarf, np.nan_to_num(np.asarray(logg, dtype=float), nan=4.0) >= 3.5)


_SOURCE_CODE = {"miles": 0, "pickles": 1, "stelib": 2, "mkclass": 3}
#: Kinds that must not be mixed with each other (impostors); the others share group 0.
_KIND_GROUP = {"wr": 1, "wd": 2, "hot_subdwarf": 3}


class _TemplatePicker:
    """Per-class template indices in neighbour order (subtype, then Teff).

    The first template of a pair is drawn with weights that make the class's
    subtype and dwarf/giant mix follow :data:`_LAMOST_SUBTYPE_COUNTS` and
    :data:`_DWARF_FRACTION` (not the library's own density), each star counted
    once however many templates it has (MILES + STELIB, the STELIB ``lp``/``ss``
    pair); the second is a neighbour (1-2 places away in subtype/Teff order,
    same source library, same impostor kind, same dwarf/giant group).  When
    the library has coverage gaps, a pair whose common valid pixels are fewer
    than 90 % of the first template's is not mixed (second = first).

    Parameters
    ----------
    lib : TemplateLibrary
    source : str
        One of :data:`TEMPLATE_SOURCES` (see :attr:`MockConfig.template_source`).
    min_coverage : float
        Preferred minimum ``coverage`` of the drawn templates.
    """

    def __init__(self, lib, source: str, min_coverage: float = DEFAULT_MIN_COVERAGE):
        self.lib = lib
        t = len(lib)
        valid = getattr(lib, "valid", None)
        valid = np.ones(lib.flux.shape, dtype=bool) if valid is None else np.asarray(valid, bool)
        self.valid = valid
        self.all_valid = bool(valid.all())
        coverage = np.asarray(getattr(lib, "coverage", None) if getattr(lib, "coverage", None)
                              is not None else valid.mean(axis=1), dtype=np.float64)
        star = np.asarray(getattr(lib, "star", None) if getattr(lib, "star", None) is not None
                          else lib.name).astype(str)
        kind = np.asarray(getattr(lib, "kind", None) if getattr(lib, "kind", None) is not None
                          else np.full(t, "normal")).astype(str)
        res = getattr(lib, "resolution", None)
        self.resolution = (np.full(t, 1800.0) if res is None else np.asarray(res, np.float64))
        ebv = getattr(lib, "ebv", None)
        self.ebv = np.zeros(t) if ebv is None else np.asarray(ebv, np.float64)
        self.star, self.kind = star, kind
        norm_band = (lib.wave >= 4000) & (lib.wave < 5500)
        flux = np.asarray(lib.flux, dtype=np.float64)
        flux = np.where(np.isfinite(flux), flux, 0.0)
        if self.all_valid:
            med = np.median(flux[:, norm_band], axis=1)
        else:
            band_ok = valid & norm_band[None, :]
            use = np.where(band_ok.any(axis=1)[:, None], band_ok, valid)
            med = _row_nanmedian(np.where(use, flux, np.nan))
            med = np.where(np.isfinite(med), med, 1.0)
        med = np.where(med > 0, med, 1.0)
        self.flux = (flux / med[:, None]).astype(np.float32)
        self.order: dict[str, np.ndarray] = {}
        self.group: dict[str, np.ndarray] = {}
        self.weight: dict[str, np.ndarray] = {}
        for k in SIM_CLASSES:
            idx = self._eligible(k, source, float(min_coverage), coverage)
            if idx.size == 0:
                continue
            sub = np.nan_to_num(lib.subtype[idx].astype(np.float64), nan=5.0)
            teff = np.nan_to_num(lib.teff[idx].astype(np.float64), nan=0.0)
            # group by source so that neighbours share resolution, and keep the
            # impostor kinds apart
            src = np.array([_SOURCE_CODE.get(str(x), 4) for x in lib.source[idx]])
            kg = np.array([_KIND_GROUP.get(str(x), 0) for x in kind[idx]])
            dw = _is_dwarf(lib.lumclass[idx], lib.logg[idx])
            srt = np.lexsort((-teff, sub, dw, kg, src))
            self.order[k] = idx[srt]
            self.group[k] = ((src * 8 + kg) * 2 + dw.astype(int))[srt]
            # draw weights: subtype prior x dwarf/giant prior / cell occupancy / star multiplicity
            digit = np.clip(np.floor(sub[srt]), 0, 9).astype(int)
            dwarf = dw[srt]
            counts = _LAMOST_SUBTYPE_COUNTS.get(k)
            if counts is None:
                pd = np.ones(10)
            else:
                d = np.arange(10)[:, None]
                ks = np.array(list(counts))[None, :]
                pd = (np.exp(-0.5 * ((d - ks) / 0.7) ** 2) * np.array(list(counts.values()))).sum(1)
            fd = _DWARF_FRACTION.get(k, 0.5)
            pl = np.where(dwarf, fd, 1.0 - fd)
            cell = digit * 2 + dwarf.astype(int)
            occ = np.bincount(cell, minlength=20)[cell]
            wts = pd[digit] * pl / occ
            _, inv, mult = np.unique(star[idx[srt]], return_inverse=True, return_counts=True)
            if mult.max() > 1:
                wts = wts / mult[inv]
            self.weight[k] = wts / wts.sum()

    def _eligible(self, k: str, source: str, min_coverage: float,
                  coverage: np.ndarray) -> np.ndarray:
        lib = self.lib
        idx_all = np.flatnonzero(lib.mk == k)
        if idx_all.size == 0:
            return idx_all
        cov_ok = idx_all[coverage[idx_all] >= min_coverage]
        srcs = np.asarray(lib.source).astype(str)
        if source == "auto":
            elig = cov_ok[srcs[cov_ok] != "mkclass"]
            like = elig[np.isin(srcs[elig], ["miles", "stelib"])]
            idx = like if np.unique(self.star[like]).size >= 5 else elig
        elif source == "all":
            idx = cov_ok
        else:
            idx = cov_ok[srcs[cov_ok] == source]
        if idx.size == 0:
            idx = cov_ok if cov_ok.size else idx_all
        return idx

    def pick(self, mk: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = mk.size
        i1 = np.zeros(n, dtype=np.int64)
        i2 = np.zeros(n, dtype=np.int64)
        for k in SIM_CLASSES:
            rows = np.flatnonzero(mk == k)
            if rows.size == 0:
                continue
            if k not in self.order:
                raise ValueError(f"template library has no {k} templates")
            o = self.order[k]
            grp = self.group[k]
            r = rng.choice(o.size, rows.size, p=self.weight[k])
            step = rng.choice(np.array([-2, -1, 1, 2]), rows.size)
            # neighbour in the same source (same resolution); reflect at the edges
            r2 = r + step
            bad = (r2 < 0) | (r2 >= o.size)
            bad[~bad] = grp[r2[~bad]] != grp[r[~bad]]
            r2[bad] = r[bad] - step[bad]
            bad = (r2 < 0) | (r2 >= o.size)
            bad[~bad] = grp[r2[~bad]] != grp[r[~bad]]
            r2[bad] = r[bad]
            i1[rows] = o[r]
            i2[rows] = o[r2]
        w = rng.uniform(0.0, 1.0, n)
        if not self.all_valid and n:
            v1 = self.valid[i1]
            overlap = np.sum(v1 & self.valid[i2], axis=1)
            lonely = overlap < 0.9 * np.sum(v1, axis=1)
            i2[lonely] = i1[lonely]
        return i1, i2, w


def _subclass(lib, i: int) -> str:
    """Pipeline-style SUBCLASS of template ``i`` (``"O"``, ``"B6"``, ``"G5"``, ``"dM2"``).

    Impostors (``X``): ``"WN"``/``"WC"`` (Wolf-Rayet), ``"DA"``/``"DC"`` (white
    dwarfs), ``"sdOB"`` (hot subdwarf).
    """
    mk = str(lib.mk[i])
    if mk == IMPOSTOR:
        kind = str(lib.kind[i]) if getattr(lib, "kind", None) is not None else ""
        if kind == "hot_subdwarf":
            return "sdOB"
        return str(lib.spt[i])[:2] or "X"
    st = float(lib.subtype[i])
    d = 5 if not np.isfinite(st) else int(min(9, max(0, math.floor(st))))
    if mk == "O":
        return "O"
    if mk == "M":
        lum = str(lib.lumclass[i])
        logg = float(lib.logg[i])
        giant = lum in ("I", "Ia", "Iab", "Ib", "II", "III") or (np.isfinite(logg) and logg < 3.5)
        return ("gM" if giant else "dM") + str(d)
    return f"{mk}{d}"


def _draw_snr(inst: InstrumentModel, n: int, rng: np.random.Generator,
              snr_range: tuple[float, float] | None) -> np.ndarray:
    """SNRG drawn from the real SNRG values (log-space kernel of width 0.15)."""
    base = inst.snrg[inst.snrg > 0]
    out = base[rng.integers(0, base.size, n)] * np.exp(rng.normal(0.0, 0.15, n))
    if snr_range is not None:
        lo, hi = snr_range
        inside = base[(base >= lo) & (base <= hi)]
        bad = (out < lo) | (out > hi)
        if inside.size == 0:
            out[bad] = np.exp(rng.uniform(np.log(lo), np.log(hi), int(bad.sum())))
        else:
            for _ in range(20):
                if not bad.any():
                    break
                m = int(bad.sum())
                out[bad] = inside[rng.integers(0, inside.size, m)] * np.exp(rng.normal(0, 0.15, m))
                bad = (out < lo) | (out > hi)
            out[bad] = np.clip(out[bad], lo, hi)
    return np.maximum(out, 0.3)


def _draw_ebv(mk: np.ndarray, rng: np.random.Generator,
              ranges: Mapping[str, tuple[float, float]] | None = None,
              scale: float = 1.0) -> np.ndarray:
    """Drawn E(B-V): class distributions (clipped at 4, times ``scale``) or U(ranges[k])."""
    ranges = {str(k).upper(): v for k, v in (ranges or {}).items()}
    ebv = np.zeros(mk.size)
    ranged = np.zeros(mk.size, dtype=bool)
    for k, (kind, p1, p2) in _EBV.items():
        rows = mk == k
        m = int(rows.sum())
        if not m:
            continue
        if k in ranges:
            lo, hi = ranges[k]
            ebv[rows] = rng.uniform(float(lo), float(hi), m)
            ranged |= rows
        else:
            ebv[rows] = rng.gamma(p1, p2, m) if kind == "gamma" else rng.exponential(p1, m)
    out = np.minimum(ebv, 4.0) * scale
    if ranged.any():
        out[ranged] = ebv[ranged]
    return out


def _row_nanmedian(x: np.ndarray) -> np.ndarray:
    """Median of each row ignoring NaN (vectorised; NaN for an all-NaN row)."""
    xs = np.sort(x, axis=1)                       # NaN sort to the end
    cnt = np.sum(~np.isnan(x), axis=1)
    lo = np.maximum((cnt - 1) // 2, 0)
    hi = np.maximum(cnt // 2, 0)
    hi = np.minimum(hi, x.shape[1] - 1)
    r = np.arange(x.shape[0])
    med = 0.5 * (xs[r, lo] + xs[r, hi])
    return np.where(cnt > 0, med, np.nan)


def _band_medians(flux: np.ndarray, ivar: np.ndarray, npix: np.ndarray) -> dict[str, np.ndarray]:
    """Per-band median flux*sqrt(ivar) over usable pixels (vectorised)."""
    wave = 10.0 ** _native_loglam(flux.shape[1])
    col = np.arange(flux.shape[1])
    sn = flux * np.sqrt(np.maximum(ivar, 0))
    valid = (ivar > 0) & (col[None, :] < npix[:, None]) & (flux != 0)
    out = {}
    for b, (lo, hi) in BANDS.items():
        sel = (wave >= lo) & (wave < hi)
        x = np.where(valid[:, sel], sn[:, sel], np.nan)
        med = _row_nanmedian(x)
        out[b] = np.where(np.isfinite(med), med, -9999.0)
    return out


def _masked_median(x: np.ndarray, ok: np.ndarray | None) -> np.ndarray:
    """Row medians of ``x`` over ``ok`` pixels (plain ``np.median`` for full rows)."""
    out = np.median(x, axis=1)
    if ok is None:
        return out
    part = ~ok.all(axis=1)
    if part.any():
        out[part] = _row_nanmedian(np.where(ok[part], x[part], np.nan))
    return out


def _band_median(x: np.ndarray, ok: np.ndarray | None, band: np.ndarray) -> np.ndarray:
    """Row medians over the valid pixels of ``band``; over all valid pixels if none is."""
    out = _masked_median(x[:, band], None if ok is None else ok[:, band])
    if ok is not None:
        none = ~ok[:, band].any(axis=1)
        if none.any():
            out[none] = _row_nanmedian(np.where(ok[none], x[none], np.nan))
    return out


_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _smooth_to_resolution(flux: np.ndarray, valid: np.ndarray | None, r_tpl: np.ndarray,
                          r_target: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Gaussian smoothing in log-lambda from ``r_tpl`` to ``r_target`` (per row, vectorised).

    sigma^2 = ((1/R_target)^2 - (1/R_tpl)^2) / (2 sqrt(2 ln 2))^2 in ln-lambda
    units, 0 where the template is already coarser.  One FFT over all rows
    with a per-row Gaussian transfer function; with invalid pixels the
    convolution is normalised by the smoothed valid mask (no flux leaks from
    invalid pixels) and the valid mask shrinks to where more than 99.9 % of
    the kernel weight is valid.
    """
    var = np.maximum(1.0 / r_target ** 2 - 1.0 / r_tpl ** 2, 0.0)
    sig_px = np.sqrt(var) / _FWHM_PER_SIGMA / (math.log(10.0) * DLOGLAM)
    rows = np.flatnonzero(sig_px > 1e-3)
    if rows.size == 0:
        return flux, valid
    sig = sig_px[rows]
    pad = int(math.ceil(6.0 * float(sig.max()))) + 2
    length = flux.shape[1] + 2 * pad
    nfft = 1 << int(math.ceil(math.log2(length)))
    k = np.fft.rfftfreq(nfft)
    transfer = np.exp(-2.0 * (math.pi * k[None, :] * sig[:, None]) ** 2)
    f = flux[rows].astype(np.float64)
    if valid is None:
        fp = np.pad(f, ((0, 0), (pad, pad)), mode="edge")
        sm = np.fft.irfft(np.fft.rfft(fp, nfft, axis=1) * transfer, nfft, axis=1)
        out = flux.copy()
        out[rows] = sm[:, pad:pad + flux.shape[1]].astype(flux.dtype)
        return out, None
    v = valid[rows].astype(np.float64)
    fp = np.pad(f * v, ((0, 0), (pad, pad)), mode="edge")
    vp = np.pad(v, ((0, 0), (pad, pad)), mode="edge")
    num = np.fft.irfft(np.fft.rfft(fp, nfft, axis=1) * transfer, nfft, axis=1)[:, pad:pad + flux.shape[1]]
    den = np.fft.irfft(np.fft.rfft(vp, nfft, axis=1) * transfer, nfft, axis=1)[:, pad:pad + flux.shape[1]]
    ok = (den > 0.999) & valid[rows]
    out = flux.copy()
    out[rows] = np.where(ok, num / np.where(ok, den, 1.0), 0.0).astype(flux.dtype)
    vout = valid.copy()
    vout[rows] = ok
    return out, vout


def side_stream(rng: np.random.Generator) -> np.random.Generator:
    """A generator seeded from ``rng``'s current state, without drawing from ``rng``.

    Optional physics (``MockConfig.interstellar``) draws from it, so that
    switching it on changes no other draw, and the same state of ``rng`` gives
    the same side draws whatever happened to other generators before (unlike
    ``Generator.spawn``, whose children depend on how many were spawned).
    """
    import hashlib

    digest = hashlib.blake2b(repr(rng.bit_generator.state).encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _simulate_native(n: int, mk: np.ndarray, rng: np.random.Generator, picker: _TemplatePicker,
                     inst: InstrumentModel, cfg: MockConfig) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Core vectorised simulation on the native LAMOST grid (N x NATIVE_NPIX)."""
    lib = picker.lib
    P = NATIVE_NPIX
    loglam = _native_loglam()
    wave = 10.0 ** loglam
    i1, i2, w = picker.pick(mk, rng)
    ci = np.zeros(n, dtype=np.int64)
    for j, k in enumerate(SIM_CLASSES):
        ci[mk == k] = j
    mu = np.array([_RV[k][0] for k in SIM_CLASSES])[ci]
    sd = np.array([_RV[k][1] for k in SIM_CLASSES])[ci]
    rv = (mu + sd * rng.standard_normal(n)) * cfg.rv_scale
    rv = np.clip(rv, -450.0, 450.0)
    ebv = _draw_ebv(mk, rng, cfg.ebv_ranges, cfg.ebv_scale)
    # optional draws consume random numbers only when switched on, so that the
    # default configuration reproduces earlier releases
    r_v = np.full(n, 3.1) if cfg.r_v_range is None else rng.uniform(*map(float, cfg.r_v_range), n)
    r_target = (None if cfg.resolution_range is None
                else rng.uniform(*map(float, cfg.resolution_range), n))
    snr_target = _draw_snr(inst, n, rng, cfg.snr_range)
    npix = rng.integers(3900, P + 1, n)

    # --- template mix (valid where both templates are), optional extra smoothing
    t1 = picker.flux[i1]
    t2 = picker.flux[i2]
    mix = w[:, None].astype(np.float32) * t1 + (1.0 - w[:, None]).astype(np.float32) * t2
    vmix = None if picker.all_valid else (picker.valid[i1] & picker.valid[i2])
    r_tpl = np.minimum(picker.resolution[i1], picker.resolution[i2])
    if r_target is not None:
        mix, vmix = _smooth_to_resolution(mix, vmix, r_tpl, r_target)
        r_eff = np.minimum(r_target, r_tpl)
    else:
        r_eff = r_tpl
    ebv_tpl = w * picker.ebv[i1] + (1.0 - w) * picker.ebv[i2]

    # --- radial-velocity shift (linear interpolation in log-lambda)
    shift = np.log10(1.0 + rv / C_KMS) / DLOGLAM                     # pixels
    pos = NATIVE_OFFSET + np.arange(P)[None, :] - shift[:, None]     # (N, P) in template px
    pos = np.clip(pos, 0.0, NPIX - 1.000001)
    j0 = np.floor(pos).astype(np.int64)
    fr = (pos - j0).astype(np.float32)
    j1 = np.minimum(j0 + 1, NPIX - 1)
    a0 = np.take_along_axis(mix, j0, axis=1)
    a1 = np.take_along_axis(mix, j1, axis=1)
    f = (a0 * (1.0 - fr) + a1 * fr).astype(np.float64)
    f = np.maximum(f, 0.0)
    if vmix is not None:
        vnat = np.take_along_axis(vmix, j0, axis=1) & np.take_along_axis(vmix, j1, axis=1)
        if vnat.all():
            vnat = None
    else:
        vnat = None

    # --- interstellar lines and bands of the added reddening (own random stream)
    if cfg.interstellar:
        from lamost_ostar.interstellar import transmission
        f *= transmission(wave, ebv, r_eff, side_stream(rng))

    # --- reddening (added to the template's own), flux-calibration distortion, dichroic
    if cfg.r_v_range is None:
        alam = extinction_odonnell(wave)
        f *= 10.0 ** (-0.4 * ebv[:, None] * alam[None, :])
    else:
        a_x, b_x = _extinction_ab(wave)
        f *= 10.0 ** (-0.4 * ebv[:, None] * (r_v[:, None] * a_x[None, :] + b_x[None, :]))
    x = np.linspace(-1.0, 1.0, P)
    leg = np.polynomial.legendre.legvander(x, 3)[:, 1:]               # (P, 3)
    coef = rng.standard_normal((n, 3)) * (cfg.calib_sigma / np.arange(1, 4))[None, :]
    dich = rng.normal(0.0, 0.03, n)
    step = 1.0 / (1.0 + np.exp(-(wave - 5800.0) / 25.0))
    f *= np.exp(coef @ leg.T) * (1.0 + dich[:, None] * step[None, :])

    # --- absolute flux level from the real flux-vs-S/N relation
    gsel = (wave >= BANDS["g"][0]) & (wave < BANDS["g"][1])
    fs, fi0, fsc = inst.flux_coef
    level = 10.0 ** (fi0 + fs * np.log10(snr_target) + rng.normal(0.0, fsc, n))
    gmed = _band_median(f, vnat, gsel)
    f *= (level / np.maximum(gmed, 1e-30))[:, None]

    # --- noise: var = a (F/T + rho' S)
    T = inst.throughput[None, :]
    S = inst.sky[None, :]
    rs, ri, rsc = inst.rho_coef
    rho = np.exp(ri + rs * np.log(snr_target) + rng.normal(0.0, rsc, n))
    rho = np.clip(rho, 1e-3, 50.0)
    src = f / T
    rho_p = rho * _band_median(src, vnat, gsel) / np.median(inst.sky[gsel])
    shape = src + rho_p[:, None] * S                                  # var / a
    with np.errstate(divide="ignore", invalid="ignore"):
        m = _band_median(f / np.sqrt(shape), vnat, gsel)
    a = (m / snr_target) ** 2
    sigma = np.sqrt(a[:, None] * shape)
    flux = f + sigma * rng.standard_normal((n, P))
    ivar = 1.0 / np.maximum(sigma, 1e-30) ** 2

    # --- bad-pixel patches (cosmic rays / bad columns): ivar 0, andmask + ormask
    andmask = np.zeros((n, P), dtype=np.int32)
    ormask = np.zeros((n, P), dtype=np.int32)
    npatch = rng.poisson(cfg.bad_patch_rate, n)
    rows = np.repeat(np.arange(n), npatch)
    if rows.size:
        start = rng.integers(0, P - 10, rows.size)
        length = rng.integers(1, 9, rows.size)
        off = np.arange(8)
        cols = start[:, None] + off[None, :]
        keep = off[None, :] < length[:, None]
        rr = np.broadcast_to(rows[:, None], cols.shape)[keep]
        cc = cols[keep]
        ivar[rr, cc] = 0.0
        andmask[rr, cc] = 1
        ormask[rr, cc] = 1
        flux[rr, cc] += 5.0 * sigma[rr, cc] * rng.standard_normal(rr.size)
    # --- the zero-flux red tail of real DR7 files (ivar kept, as LAMOST writes it)
    tail = rng.integers(5, 31, n)
    col = np.arange(P)
    tail_mask = (col[None, :] >= (npix - tail)[:, None]) & (col[None, :] < npix[:, None])
    flux[tail_mask] = 0.0
    beyond = col[None, :] >= npix[:, None]
    flux[beyond] = 0.0
    ivar[beyond] = 0.0
    # --- no template data: flux 0, ivar 0, flagged (preprocess masks and interpolates)
    if vnat is not None:
        nodata = ~vnat & ~beyond
        flux[nodata] = 0.0
        ivar[nodata] = 0.0
        andmask[nodata] |= MASK_NO_COVERAGE
        ormask[nodata] |= MASK_NO_COVERAGE

    flux = flux.astype(np.float32)
    ivar = ivar.astype(np.float32)
    snr = _band_medians(flux, ivar, npix)

    kind = picker.kind
    star = picker.star
    truth = []
    for k in range(n):
        a_, b_ = int(i1[k]), int(i2[k])
        wk = float(w[k])
        dom = a_ if wk >= 0.5 else b_

        def _mixp(arr):
            v1, v2 = float(arr[a_]), float(arr[b_])
            if not (np.isfinite(v1) and np.isfinite(v2)):
                return float("nan")
            return wk * v1 + (1 - wk) * v2

        truth.append({
            "mk": str(mk[k]), "subclass": _subclass(lib, dom),
            "template1": str(lib.name[a_]), "template2": str(lib.name[b_]),
            "weight1": round(wk, 4), "teff": round(_mixp(lib.teff), 1),
            "logg": round(_mixp(lib.logg), 3), "feh": round(_mixp(lib.feh), 3),
            "rv": round(float(rv[k]), 2), "ebv": round(float(ebv[k]), 4),
            "snr_u": round(float(snr["u"][k]), 2), "snr_g": round(float(snr["g"][k]), 2),
            "snr_r": round(float(snr["r"][k]), 2), "snr_i": round(float(snr["i"][k]), 2),
            "snr_z": round(float(snr["z"][k]), 2), "npix": int(npix[k]),
            "r_v": round(float(r_v[k]), 3), "resolution": round(float(r_eff[k]), 1),
            "kind": str(kind[dom]), "star": str(star[dom]),
            "ebv_template": round(float(ebv_tpl[k]), 4),
            "ebv_total": round(float(ebv[k] + ebv_tpl[k]), 4),
        })
    arrays = {"flux": flux, "ivar": ivar, "andmask": andmask, "ormask": ormask,
              "npix": npix, "rv": rv, "snr_target": snr_target}
    return arrays, truth


def _to_common(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = arrays["flux"].shape[0]
    out = {}
    for key, dt in (("flux", np.float32), ("ivar", np.float32), ("andmask", np.int32),
                    ("ormask", np.int32)):
        a = np.zeros((n, NPIX), dtype=dt)
        a[:, NATIVE_OFFSET:NATIVE_OFFSET + NATIVE_NPIX] = arrays[key][:, :NPIX - NATIVE_OFFSET]
        out[key] = a
    return out


def simulate_spectra(n: int, fractions: str | Mapping[str, float] = "balanced",
                     rng: np.random.Generator | int | None = None, *, grid: str = "common",
                     mk: Sequence[str] | None = None, templates=None,
                     instrument: InstrumentModel | None = None,
                     config: MockConfig | None = None) -> SimulatedSpectra:
    """Draw mock LAMOST spectra in memory (no files), e.g. as training data.

    Parameters
    ----------
    n : int
        Number of spectra.
    fractions : str or mapping
        ``"survey"``, ``"balanced"``, ``"O=0.5,B=0.5"`` or ``{"O": 1, ...}``;
        class counts are exact (largest-remainder rounding) and shuffled.
    rng : numpy.random.Generator or int, optional
        Random generator (or seed).
    grid : {"common", "native"}
        ``"common"``: :mod:`lamost_ostar.preprocess` grid, ``(N, NPIX)``, with
        pixels the native spectrum does not cover at flux 0 / ivar 0;
        ``"native"``: LAMOST's own grid, ``(N, NATIVE_NPIX)`` from
        ``10**NATIVE_COEFF0``, each row valid up to ``npix[i]``.
    mk : sequence of str, optional
        Explicit class letter per spectrum (overrides ``fractions``; ``n``
        ignored): ``O B A F G K M``, or ``X`` (hot impostors: Wolf-Rayet, white
        dwarfs, hot subdwarf) when the library has such templates.
    templates : TemplateLibrary, optional
        Default: :func:`lamost_ostar.templates.load_templates`.
    instrument : InstrumentModel, optional
        Default: the packaged model measured on real DR7 files.
    config : MockConfig, optional
        Physics knobs (``snr_range``, ``ebv_scale``, ``ebv_ranges``,
        ``r_v_range``, ``resolution_range``, ``rv_scale``, ``calib_sigma``,
        ``bad_patch_rate``, ``template_source``, ``min_coverage``).

    Returns
    -------
    SimulatedSpectra
        ``flux, ivar, andmask, truth = result``; also ``.ormask``,
        ``.wavelength``, ``.npix``.  ``truth[i]`` holds ``mk``, ``subclass``,
        ``template1``, ``template2``, ``weight1``, ``teff``, ``logg``, ``feh``,
        ``rv`` [km/s], ``ebv`` (drawn), ``ebv_template`` (the template's own,
        weighted over the pair), ``ebv_total`` (their sum), ``r_v``,
        ``resolution`` (effective R at 4500 A), ``kind`` and ``star`` (of the
        dominant template), ``snr_u`` ... ``snr_z`` (measured on the mock),
        ``npix``.

    Examples
    --------
    Model inputs prepared exactly like real files (native grid -> the same
    resampling, masking and eq. 1 standardisation as :func:`lamost_ostar.preprocess.prepare`):

    >>> import numpy as np
    >>> from lamost_ostar.preprocess import prepare_arrays
    >>> sim = simulate_spectra(100, "balanced", np.random.default_rng(1), grid="native")
    >>> n = len(sim)
    >>> batch = prepare_arrays(sim.flux, sim.ivar, sim.npix, andmask=sim.andmask,
    ...                        coeff0=np.full(n, NATIVE_COEFF0), coeff1=np.full(n, NATIVE_COEFF1))
    >>> batch.x.shape, [t["mk"] for t in sim.truth][:3]    # doctest: +SKIP
    ((100, 3921), ['G', 'O', 'K'])
    """
    if grid not in ("common", "native"):
        raise ValueError(f"grid must be 'common' or 'native', got {grid!r}")
    cfg = config if config is not None else MockConfig()
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    if mk is None:
        counts = class_counts(int(n), resolve_fractions(fractions))
        mk_arr = np.repeat(np.array(CLASSES), [counts[k] for k in CLASSES])
        mk_arr = mk_arr[rng.permutation(mk_arr.size)]
    else:
        mk_arr = np.asarray([str(m).upper() for m in mk])
        bad = set(mk_arr.tolist()) - set(SIM_CLASSES)
        if bad:
            raise ValueError(f"unknown MK class(es) {sorted(bad)}")
    if templates is None:
        from lamost_ostar.templates import load_templates
        templates = load_templates()
    picker = _TemplatePicker(templates, cfg.template_source, cfg.min_coverage)
    inst = instrument if instrument is not None else load_instrument()
    arrays, truth = _simulate_native(mk_arr.size, mk_arr, rng, picker, inst, cfg)
    if grid == "common":
        c = _to_common(arrays)
        wave = 10.0 ** (LOGLAM0 + DLOGLAM * np.arange(NPIX))
    else:
        c = arrays
        wave = 10.0 ** _native_loglam()
    return SimulatedSpectra(flux=c["flux"], ivar=c["ivar"], andmask=c["andmask"],
                            ormask=c["ormask"], wavelength=wave, npix=arrays["npix"],
                            grid=grid, truth=truth)


# ============================================================================ FITS bytes
def _fmt_value(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return f"{'T' if v else 'F':>20}"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):>20d}"
    if isinstance(v, (float, np.floating)):
        s = repr(float(v)).upper()
        if "." not in s and "E" not in s:
            s += ".0"
        if "E" in s:
            mant, ex = s.split("E")
            if "." not in mant:
                mant += ".0"
            s = f"{mant}E{ex}"
        return f"{s:>20}"
    s = str(v).replace("'", "''")
    return f"'{s:<8}'".ljust(20)


@functools.lru_cache(maxsize=16384, typed=True)
def _card(key: str, value: Any = None, comment: str | None = None) -> str:
    if key == "COMMENT":
        return f"COMMENT {value or ''}"[:80].ljust(80)
    if key == "":
        return " " * 80
    c = f"{key:<8}= {_fmt_value(value)} /"
    if comment:
        c += " " + comment
    return c[:80].ljust(80)


def _header_bytes(cards: Sequence[str]) -> bytes:
    body = "".join(cards) + "END".ljust(80)
    pad = (-len(body)) % 2880
    return (body + " " * pad).encode("ascii")


def _pad_data(raw: bytes) -> bytes:
    return raw + b"\0" * ((-len(raw)) % 2880)


def fits_image_bytes(data: np.ndarray, cards: Sequence[str], *, first_comment: str =
                     "Primary Header created by MWRFITS v1.11b", blank: bool = True) -> bytes:
    """A FITS file (bytes) with one float32 image ``data`` (rows x N) and ``cards``."""
    rows, ncol = data.shape
    head = [
        _card("SIMPLE", True, first_comment), _card("BITPIX", -32, ""),
        _card("NAXIS", 2, "Number of array dimensions"), _card("NAXIS1", ncol, ""),
        _card("NAXIS2", rows, ""), _card("EXTEND", True, ""),
    ]
    if blank:
        head.append(_card(""))
    return _header_bytes(head + list(cards)) + _pad_data(
        np.ascontiguousarray(data, dtype=">f4").tobytes())


def fits_coadd_bytes(columns: Mapping[str, np.ndarray], cards: Sequence[str]) -> bytes:
    """DR9+ file: header-only primary HDU + one-row binary table ``COADD``."""
    n = len(next(iter(columns.values())))
    prim = [
        _card("SIMPLE", True, "Primary Header created by MWRFITS v1.11b"),
        _card("BITPIX", 16, ""), _card("NAXIS", 0, "Number of array dimensions"),
        # real DR9 files keep the image's NAXIS1/NAXIS2 cards in the empty primary
        _card("NAXIS1", n, ""), _card("NAXIS2", 5, ""),
        _card("EXTEND", True, ""), _card(""),
    ] + list(cards)
    names = list(columns)
    tab = [
        _card("XTENSION", "BINTABLE", "Binary table written by MWRFITS v1.11b"),
        _card("BITPIX", 8, "Required value"), _card("NAXIS", 2, "Required value"),
        _card("NAXIS1", 4 * n * len(names), "Number of bytes per row"),
        _card("NAXIS2", 1, "Number of rows"),
        _card("PCOUNT", 0, "Normally 0 (no varying arrays)"),
        _card("GCOUNT", 1, "Required value"),
        _card("TFIELDS", len(names), "Number of columns in table"),
        _card("COMMENT", ""), _card("COMMENT", " *** End of mandatory fields ***"),
        _card("COMMENT", ""), _card("EXTNAME", "COADD", "The extension name"),
        _card("COMMENT", ""), _card("COMMENT", " *** Column names ***"), _card("COMMENT", ""),
    ]
    tab += [_card(f"TTYPE{i + 1}", nm, "") for i, nm in enumerate(names)]
    tab += [_card("COMMENT", ""), _card("COMMENT", " *** Column formats ***"), _card("COMMENT", "")]
    tab += [_card(f"TFORM{i + 1}", f"{n}E", "") for i in range(len(names))]
    row = b"".join(np.ascontiguousarray(columns[k], dtype=">f4").tobytes() for k in names)
    return _header_bytes(prim) + _header_bytes(tab) + _pad_data(row)


# ============================================================================ release plan
_PLAN_SUFFIX = ("B01", "B02", "M01", "V01", "F01", "B03")


@dataclass
class _Plan:
    """Per-spectrum file-level metadata of a whole release (vectorised arrays)."""

    mk: np.ndarray
    lmjd: np.ndarray
    planid: np.ndarray
    spid: np.ndarray
    fiberid: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    spra: np.ndarray
    spdec: np.ndarray
    obsid: np.ndarray
    broken: np.ndarray          # "" or a BROKEN_KINDS entry
    plan_index: np.ndarray
    seeing: np.ndarray
    moonpha: np.ndarray
    helio_rv: np.ndarray


def _plan_name(ra: float, dec: float, k: int, style: int) -> str:
    if style == 0:   # pilot-survey style, e.g. F5902 / B6212
        return f"{'FBMV'[k % 4]}{5000 + (k * 37) % 4999:04d}"
    h = ra / 15.0
    hh, mm = int(h), int((h - int(h)) * 60)
    ss = int(((h - hh) * 60 - mm) * 60)
    sgn = "N" if dec >= 0 else "S"
    ad = abs(dec)
    dd, dm = int(ad), int((ad - int(ad)) * 60)
    ds = int(((ad - dd) * 60 - dm) * 60)
    return f"HD{hh:02d}{mm:02d}{ss:02d}{sgn}{dd:02d}{dm:02d}{ds:02d}{_PLAN_SUFFIX[k % len(_PLAN_SUFFIX)]}"


def release_plan(cfg: MockConfig) -> _Plan:
    """Assign every spectrum a class, night, plan, spectrograph, fibre, position, OBSID.

    Plans hold up to 16 spectrographs x 250 fibres (1000-3600 spectra each);
    one to three plans per night.  Deterministic in ``cfg.seed``.
    """
    n = int(cfg.n)
    rng = np.random.default_rng([int(cfg.seed), 0])
    counts = class_counts(n, resolve_fractions(cfg.preset))
    mk = np.repeat(np.array(CLASSES), [counts[k] for k in CLASSES])
    mk = mk[rng.permutation(n)]
    lmjd = np.empty(n, dtype=np.int64)
    planid = np.empty(n, dtype=object)
    spid = np.empty(n, dtype=np.int64)
    fiberid = np.empty(n, dtype=np.int64)
    ra = np.empty(n)
    dec = np.empty(n)
    spra = np.empty(n)
    spdec = np.empty(n)
    plan_index = np.empty(n, dtype=np.int64)
    seeing = np.empty(n)
    moon = np.empty(n)
    helio = np.empty(n)
    pos, k, night = 0, 0, 55859
    used: set[tuple[int, str]] = set()
    while pos < n:
        if k and rng.random() < 0.55:
            night += int(rng.integers(1, 4))
        size = int(min(n - pos, rng.integers(1000, 3601)))
        cra = float(rng.uniform(0.0, 360.0))
        cdec = float(np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-10)), np.sin(np.radians(65))))))
        name = _plan_name(cra, cdec, k, 0 if night < 56200 else 1)
        while (night, name) in used:
            name = name + "X"
        used.add((night, name))
        # spread over 16 spectrographs x 250 fibres, sorted like a real plan
        slots = np.sort(rng.choice(16 * 250, size=size, replace=False))
        sp = slots // 250 + 1
        fib = slots % 250 + 1
        # each spectrograph covers a patch of the 5 deg field
        ang = np.radians(22.5 * (sp - 1) + rng.uniform(-8, 8))
        rad = np.where(sp <= 4, 0.6, np.where(sp <= 10, 1.4, 2.1))
        sra_c = cra + rad * np.cos(ang) / max(np.cos(np.radians(cdec)), 0.2)
        sdec_c = cdec + rad * np.sin(ang)
        r = 0.45 * np.sqrt(rng.uniform(0, 1, size))
        th = rng.uniform(0, 2 * np.pi, size)
        sl = slice(pos, pos + size)
        dec[sl] = np.clip(sdec_c + r * np.sin(th), -89.9, 89.9)
        ra[sl] = (sra_c + r * np.cos(th) / np.maximum(np.cos(np.radians(dec[sl])), 0.2)) % 360.0
        spra[sl] = sra_c % 360.0
        spdec[sl] = sdec_c
        lmjd[sl] = night
        planid[sl] = name
        spid[sl] = sp
        fiberid[sl] = fib
        plan_index[sl] = k
        seeing[sl] = round(float(rng.uniform(2.0, 4.5)), 1)
        moon[sl] = round(float(rng.uniform(0, 29.5)), 2)
        helio[sl] = float(rng.uniform(-30, 30))
        pos += size
        k += 1
    ra, dec = np.round(ra, 6), np.round(dec, 6)   # as written in the headers
    # unique 9-digit OBSIDs, increasing through the release with random gaps
    obsid = (700_000_000 + np.arange(n, dtype=np.int64) * 7
             + rng.integers(0, 7, n)).astype(np.int64)
    broken = np.full(n, "", dtype=object)
    nb = int(round(float(cfg.broken_rate) * n))
    if nb:
        which = rng.choice(n, nb, replace=False)
        broken[which] = rng.choice(np.array(BROKEN_KINDS), nb)
    return _Plan(mk=mk, lmjd=lmjd, planid=planid, spid=spid, fiberid=fiberid, ra=ra, dec=dec,
                 spra=spra, spdec=spdec, obsid=obsid, broken=broken, plan_index=plan_index,
                 seeing=seeing, moonpha=moon, helio_rv=helio)


def _relpath(lmjd: int, planid: str, spid: int, fiberid: int) -> str:
    return f"{lmjd}/{planid}/spec-{lmjd}-{planid}_sp{spid:02d}-{fiberid:03d}.fits.gz"


# ============================================================================ headers
_MJD0 = _dt.datetime(1858, 11, 17)


def _iso(mjd: float, frac: bool = True) -> str:
    t = _MJD0 + _dt.timedelta(days=float(mjd))
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{t.microsecond // 100000:d}" if frac else "")


def _mags(snr_g: float, mk: str, ebv: float, rng: np.random.Generator) -> list[float]:
    g = 17.6 - 3.3 * math.log10(max(snr_g, 0.3) / 10.0) + rng.normal(0, 0.25)
    gr = _GR[mk] + 1.04 * ebv
    u = g + (1.2 if mk in "FGK" else (2.3 if mk == "M" else 0.6)) + 1.9 * ebv
    r = g - gr
    i = r - 0.45 * gr - 0.02
    z = i - 0.3 * gr - 0.01
    return [round(float(m), 2) for m in (u, g, r, i, z)]



def _exposure_cards(C, meta: dict, lmjm: int, bestexp_comment: str) -> list:
    """The exposure-summary cards (NEXP ... SCAMEAN); DR1 writes them in another place."""
    return [C("NEXP", 3, "Number of valid exposures"),
            C("NEXP_B", 3, "Number of valid blue exposures"),
            C("NEXP_R", 3, "Number of valid red exposures"),
            C("EXPT_B", meta["exptime"], "[s] Blue exposure duration time"),
            C("EXPT_R", meta["exptime"], "[s] Red exposure duration time"),
            C("EXPTIME", meta["exptime"], "[s] Minimum of exposure time for all cameras"),
            C("BESTEXP", lmjm, bestexp_comment),
            C("SCAMEAN", meta["scamean"], "[ADU] Mean level of scatter light")]

def _header_cards(layout: str, meta: dict[str, Any], cfg: MockConfig) -> list[str]:
    """Primary-header cards after the structural ones, in the order of real files."""
    C = _card
    lmjd = int(meta["lmjd"])
    mjd = lmjd - 1
    obs_mid = mjd + 0.5 + meta["t_off"]
    fname = f"spec-{lmjd}-{meta['planid']}_sp{meta['spid']:02d}-{meta['fiberid']:03d}.fits"
    dr = cfg.data_release or {"image": "LAMOST DR7", "coadd": "LAMOST DR9", "dr1": None}[layout]
    vp = cfg.pipeline_version or {"image": "v2.9.8", "coadd": "v2.9.8", "dr1": "v2.6.4"}[layout]
    beg = _iso(mjd + 0.8 + meta["t_off"], True)
    end = _iso(mjd + 0.8 + meta["t_off"] + meta["exptime"] / 86400.0 * 1.25, True)
    lmjm = int(lmjd * 1440 + 1000 + meta["t_off"] * 1440)
    lmjmlist = "-".join(str(lmjm + 40 * j) for j in range(3))
    z = meta["rv"] / C_KMS
    snr = meta["snr"]
    mags = meta["mags"]
    c: list[str] = [C("COMMENT", "--------FILE INFORMATION"), C("FILENAME", fname, "")]
    if layout != "dr1":
        c.append(C("OBSID", int(meta["obsid"]), "Unique number ID of this spectrum"))
    c.append(C("AUTHOR", "LAMOST Pipeline", "Who compiled the information"))
    if layout == "image":
        c += [C("DATA_V", dr, "Data release version"),
              C("EXTEN0", "Flux, Inverse, Wavelength, Andmask, Ormask", ""),
              C("N_EXTEN", 1, "The extension number"),
              C("EXTNAME", "Flux", "The extension name")]
    elif layout == "coadd":
        c += [C("DATA_V", dr, "Data release version"),
              C("N_EXTEN", 2, "The amount of extension"),
              C("NORM", 0, "1 if there exists a normalized spectrum")]
    else:
        c += [C("N_EXTEN", 1, "The extension number"),
              C("EXTEN0", "Flux Inverse Subcontinuum Andmask Ormask", "")]
    c += [C("ORIGIN", "NAOC-LAMOST", "Organization responsible for creating this file"),
          C("DATE", meta["date"], "Time when this HDU is created (UTC)"),
          C("COMMENT", "--------TELESCOPE PARAMETERS"),
          C("TELESCOP", "LAMOST", "GuoShouJing Telescope"),
          C("LONGITUD", 117.58, "[deg] Longitude of site"),
          C("LATITUDE", 40.39, "[deg] Latitude of site"),
          C("FOCUS", 19964, "[mm] Telescope focus"),
          C("CAMPRO", "NEWCAM", "Camera program name"),
          C("CAMVER", "v2.0", "Camera program version"),
          C("COMMENT", "--------OBSERVATION PARAMETERS"),
          C("DATE-OBS", _iso(obs_mid, layout != "image"), "The observation median UTC"),
          C("DATE-BEG", beg, "The observation start local time"),
          C("DATE-END", end, "The observation end local time"),
          C("LMJD", lmjd, "Local Modified Julian Day"),
          C("MJD", mjd, "Modified Julian Day"),
          C("LMJMLIST", lmjmlist, "Local Modified Julian Minute list"),
          C("PLANID", meta["planid"], "Plan ID in use"),
          C("RA", round(meta["ra"], 6), "[deg] Right ascension of object"),
          C("DEC", round(meta["dec"], 6), "[deg] Declination of object")]
    if layout != "dr1":
        c += [C("RA_OBS", round(meta["ra"], 6), "[deg] Right ascension during observing"),
              C("DEC_OBS", round(meta["dec"], 6), "[deg] Declination during observing"),
              C("OFFSET", False, "Whether there's a offset during observing"),
              C("OFFSET_V", 0.0, "Offset value in arcsecond")]
    c += [C("DESIG", meta["desig"], "Designation of LAMOST target"),
          C("FIBERID", int(meta["fiberid"]), "Fiber ID of Object"),
          C("CELL_ID", meta["cell"], "Fiber Unit ID on the focal plane")]
    xs, ys = f"{meta['x']:.10f}", f"{meta['y']:.10f}"
    if layout == "dr1":
        c += [C("X_VALUE", float(xs), "[mm] X coordinate of object on the focal plane"),
              C("Y_VALUE", float(ys), "[mm] Y coordinate of object on the focal plane")]
    else:
        c += [C("X_VALUE", xs, "[mm] X coordinate of object on the focal plane"),
              C("Y_VALUE", ys, "[mm] Y coordinate of object on the focal plane")]
    c += [C("OBJNAME", meta["objname"], "Name of object")]
    if layout == "dr1":
        c += [C("OBJTYPE", "star", "Object type from input catalog"),
              C("OBJSOURC", "PILOT", "Name of input catalog"),
              C("T_INFO", "NULL", "Target information"), C("T_FROM", "NULL", "Target catalog"),
              C("FIBERTYP", "Obj", "Type of fiber"),
              C("MAGTYPE", "ugrizjh", "Magnitude type of object")]
    else:
        c += [C("OBJTYPE", "Star", "Object type from input catalog"),
              C("TSOURCE", meta["tsource"], "Name of input catalog"),
              C("TCOMMENT", ".", "Target information"), C("TFROM", "-", "Target catalog")]
        if layout == "image":
            c += [C("FIBERTYP", "Obj", "Fiber type of object"),
                  C("FIBERMAS", 0, "Bitmask of warning values, 0 means all is well"),
                  C("MAGTYPE", "ugriz", "Magnitude type of object")]
        else:
            c += [C("FIB_TYPE", "Obj", "Fiber type of object"),
                  C("FIB_MASK", 0, "Bitmask of warning values, 0 means good")]
    if layout == "coadd":
        gri = mags[1:]
        for b, v in zip(("G", "R", "I", "Z", "Y"), [gri[0] - 0.1, gri[1], gri[2], gri[3],
                                                    gri[3] - 0.05]):
            c.append(C(f"MAG_PS_{b}", round(v, 2), "[mag] Magnitude of object"))
    else:
        for j, v in enumerate(mags + [99.0, 99.0]):
            c.append(C(f"MAG{j + 1}", v, f"[mag] Mag{j + 1} of object"))
    c += [C("OBS_TYPE", "OBJ", "The type of target (OBJ, FLAT, ARC or BIAS)"),
          C("OBSCOMM", "Science", "Science or Test"),
          C("RADECSYS", "FK5", "Equatorial coordinate system"),
          C("EQUINOX", 2000.0, "Equinox in years")]
    if layout != "dr1":
        c += [C("LAMPLIST", "lamphgcdne.dat", "Arc lamp emission line list"),
              C("SKYLIST", "skylines.dat", "Sky emission line list"),
              *_exposure_cards(C, meta, lmjm, "LMJM of the best exposure")]
    c += [C("COMMENT", "--------SPECTROGRAPH PARAMETERS"),
          C("SPID", int(meta["spid"]), "Spectrograph ID"),
          C("SPRA", round(meta["spra"], 7), "[deg] Average RA of this spectrograph"),
          C("SPDEC", round(meta["spdec"], 7), "[deg] Average DEC of this spectrograph"),
          C("SLIT_MOD", "x2/3", "Slit mode, x1, x2/3 or x1/2"),
          C("COMMENT", "--------WEATHER CONDITION"),
          C("TEMPCCDB", -118.4, "[deg] The temperature of blue CCD"),
          C("TEMPCCDR", -117.7, "[deg] The temperature of red CCD"),
          C("SEEING", meta["seeing"], "[arcsec] Seeing during exposure"),
          C("MOONPHA", meta["moonpha"], "[day] Moon phase for a 29.53 days period"),
          C("TEMP_AIR", 2.9, "[deg] Temperature outside dome")]
    if layout != "dr1":
        c.append(C("TEMP_FP", 10.1, "[degree celsius] Temprature of the focalplane"))
    c += [C("DEWPOINT", -12.8, "[deg]"), C("DUST", "", "Reservation"),
          C("HUMIDITY", 0.3, ""), C("WINDD", 18.8, "[deg] Wind direction"),
          C("WINDS", 4.4, "[m/s] Wind speed"), C("SKYLEVEL", "", "Reservation"),
          C("COMMENT", "--------DATA REDUCTION PARAMETERS")]
    if layout == "dr1":
        c += [C("LAMPLIST", "lamphgcdne.dat", "Arc lamp emission line list"),
              C("SKYLIST", "skylines.dat", "Sky emission line list")]
        t0 = _MJD0 + _dt.timedelta(days=mjd + 0.8 + meta["t_off"])
        for j in range(6):
            arm, e = "br"[j // 3], j % 3
            stamp = (t0 + _dt.timedelta(seconds=e * meta["exptime"] / 3 * 1.1)).strftime("%Y%m%d%H%M%S")
            c.append(C(f"EXPID{j + 1:02d}", f"{int(meta['spid']):02d}{arm}-{stamp}-{e}-{lmjm + 28 * e}",
                       f"ID string for exposure {j + 1}"))
        c += _exposure_cards(C, meta, lmjm, "MJM of the best exposure")
    c += [C("EXTRACT", "aperture", "Extraction method"),
          C("SFLATTEN", True, "Super flat has been applied"),
          C("PCASKYSB", True, "PCA sky-subtraction has been applied"),
          C("NSKIES", 19, "Sky fiber number"), C("SKYCHI2", 2.0, "Mean chi^2 of sky-subtraction"),
          C("SCHI2MIN", 1.5, "Minimum chi^2 of sky-subtraction"),
          C("SCHI2MAX", 2.5, "Maximum chi^2 of sky-subtraction"),
          C("NSTD", 4, "Number of (good) standard stars"),
          C("FSTAR", "223-25-206-149", "FiberID of flux standard stars"),
          C("FCBY", "auto", "Standard stars origin (auto, manual or catalog)"),
          C("HELIO", True, "Heliocentric correction"),
          C("HELIO_RV", round(meta["helio_rv"], 5), "[km/s] Heliocentric correction"),
          C("VACUUM", True, "Wavelengths are in vacuum"),
          C("NWORDER", 2, "Number of linear-log10 coefficients"),
          C("WFITTYPE", "LOG-LINEAR", "Linear-log10 dispersion"),
          C("COEFF0", NATIVE_COEFF0, "Central wavelength (log10) of first pixel"),
          C("COEFF1", NATIVE_COEFF1, "Log10 dispersion per pixel"),
          C("WAT0_001", "system=linear", ""),
          C("WAT1_001", "wtype=linear label=Wavelength units=Angstroms", ""),
          C("CRVAL1", NATIVE_COEFF0, "Central wavelength (log10) of first pixel"),
          C("CD1_1", NATIVE_COEFF1, "Log10 dispersion per pixel"),
          C("CRPIX1", 1, "Starting pixel (1-indexed)"), C("CTYPE1", "LINEAR", ""),
          C("DC-FLAG", 1, "Log-linear flag"),
          C("COMMENT", "--------SPECTRA ANALYSIS RESULTS"),
          C("VERSPIPE", vp, "Version of Pipeline"),
          C("CLASS", "STAR", "Class of object"),
          C("SUBCLASS", meta["subclass"], "Subclass of object"),
          C("Z", float(f"{z + meta['z_noise']:.4g}"), "Redshift of object"),
          C("Z_ERR", float(f"{meta['z_err']:.4g}"), "Redshift error of object")]
    if layout != "dr1":
        c.append(C("ZFLAG", "LASP" if meta["mk"] in "AFGK" else "PIPELINE",
                   "Which method computes the redshift"))
    key = "SN_" if layout == "dr1" else "SNR"
    for b in "ugriz":
        c.append(C(f"{key}{b.upper()}", float(snr[b]), f"SNR of {b} filter"))
    return c


# ============================================================================ writing
def _continuum(flux: np.ndarray, ivar: np.ndarray, npix: np.ndarray) -> np.ndarray:
    """Crude vectorised pseudo-continuum (90th percentile in 50-pixel bins, interpolated)."""
    n, P = flux.shape
    nb = P // 50
    x = np.where((ivar[:, :nb * 50] > 0) & (flux[:, :nb * 50] != 0), flux[:, :nb * 50], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        q = np.nanpercentile(x.reshape(n, nb, 50), 90, axis=2)
    centres = np.arange(nb) * 50 + 24.5
    out = np.empty_like(flux)
    cols = np.arange(P)
    for i in range(n):  # interpolation per row (cheap, 80 knots); only for DR1 files
        ok = np.isfinite(q[i]) & (q[i] > 0)
        out[i] = np.interp(cols, centres[ok], q[i][ok]) if ok.sum() >= 2 else 1.0
    return np.maximum(out, 1e-20)


_HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
              b"<body><h1>Not Found</h1><p>The requested spectrum is not available.</p>"
              b"</body></html>\n")


def _file_bytes(layout: str, flux: np.ndarray, ivar: np.ndarray, andmask: np.ndarray,
                ormask: np.ndarray, n: int, cards: list[str], cont: np.ndarray | None) -> bytes:
    wave = _native_wave32(n)
    if layout == "image":
        data = np.stack([flux[:n], ivar[:n], wave, andmask[:n].astype(np.float32),
                         ormask[:n].astype(np.float32)])
        return fits_image_bytes(data, cards)
    if layout == "dr1":
        norm = np.where(ivar[:n] > 0, flux[:n] / cont[:n], 1.0).astype(np.float32)
        data = np.stack([flux[:n], ivar[:n], norm, andmask[:n].astype(np.float32),
                         ormask[:n].astype(np.float32)])
        return fits_image_bytes(data, cards, first_comment="Primary Header created by MWRFITS v1.8",
                                blank=False)
    cols = {"FLUX": flux[:n], "IVAR": ivar[:n], "WAVELENGTH": wave,
            "ANDMASK": andmask[:n].astype(np.float32), "ORMASK": ormask[:n].astype(np.float32),
            "NORMALIZATION": np.full(n, -9999.0, dtype=np.float32)}
    return fits_coadd_bytes(cols, cards)


def _gz(raw: bytes, level: int) -> bytes:
    co = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: gzip container, mtime 0
    return co.compress(raw) + co.flush()


def _broken_bytes(kind: str, good_gz: bytes, rng: np.random.Generator, level: int) -> bytes:
    if kind == "empty":
        return b""
    if kind == "not_fits":
        return _gz(_HTML_PAGE, level) if rng.random() < 0.5 else _HTML_PAGE
    if kind == "truncated":
        cut = int(len(good_gz) * rng.uniform(0.2, 0.9))
        return good_gz[:max(cut, 20)]
    raise ValueError(kind)


# worker state (set once per process by _init_worker; never shared across processes)
_WORKER: dict[str, Any] = {}


def _init_worker(cfg: MockConfig, outdir: str, templates_path: str | None,
                 instrument_path: str | None) -> None:
    from lamost_ostar.templates import load_templates
    lib = load_templates(templates_path)
    _WORKER.clear()
    _WORKER.update(cfg=cfg, outdir=outdir,
                   picker=_TemplatePicker(lib, cfg.template_source, cfg.min_coverage),
                   inst=load_instrument(instrument_path), plan=release_plan(cfg))


def _process_chunk(task: tuple[int, int, int]) -> list[dict[str, Any]]:
    """Simulate and write spectra ``[start, stop)``; return their truth rows."""
    chunk_id, start, stop = task
    w = _WORKER
    cfg: MockConfig = w["cfg"]
    plan: _Plan = w["plan"]
    outdir = w["outdir"]
    rng = np.random.default_rng([int(cfg.seed), 1, chunk_id])
    sl = slice(start, stop)
    n = stop - start
    arrays, truth = _simulate_native(n, plan.mk[sl], rng, w["picker"], w["inst"], cfg)
    flux, ivar = arrays["flux"], arrays["ivar"]
    andm, orm, npix = arrays["andmask"], arrays["ormask"], arrays["npix"]
    broken = plan.broken[sl]
    nan_rows = np.flatnonzero(broken == "nan")
    if nan_rows.size:
        flux[nan_rows] = np.nan
    cont = _continuum(flux, ivar, npix) if cfg.layout == "dr1" else None
    desig = designation(plan.ra[sl], plan.dec[sl])
    t_off = rng.uniform(-0.1, 0.15, n)
    z_noise = rng.normal(0, 5.0, n) / C_KMS
    z_err = (3.0 + 300.0 / np.maximum(arrays["snr_target"], 1.0)) / C_KMS * rng.uniform(0.5, 1.5, n)
    xs = rng.uniform(-900, 900, n)
    ys = rng.uniform(-900, 900, n)
    exptime = float(rng.choice([1800.0, 2700.0, 3600.0, 5400.0]))
    rows = []
    for k in range(n):
        g = start + k
        tr = truth[k]
        lmjd, planid = int(plan.lmjd[g]), str(plan.planid[g])
        spid, fib = int(plan.spid[g]), int(plan.fiberid[g])
        rel = _relpath(lmjd, planid, spid, fib)
        meta = {
            "lmjd": lmjd, "planid": planid, "spid": spid, "fiberid": fib,
            "obsid": int(plan.obsid[g]), "ra": float(plan.ra[g]), "dec": float(plan.dec[g]),
            "spra": float(plan.spra[g]), "spdec": float(plan.spdec[g]), "desig": desig[k],
            "t_off": float(t_off[k]), "exptime": exptime, "rv": tr["rv"],
            "z_noise": float(z_noise[k]), "z_err": float(z_err[k]),
            "snr": {b: tr[f"snr_{b}"] for b in "ugriz"},
            "mags": _mags(tr["snr_g"], tr["mk"], tr["ebv_total"], rng),
            "subclass": tr["subclass"], "mk": tr["mk"],
            "date": _iso(59474.0 + (int(plan.plan_index[g]) % 50) * 0.01 + fib * 1e-5, False),
            "cell": f"{'ABCDEFGHIJKLMNOP'[spid - 1]}{(fib - 1) % 25 + 1:02d}{(fib - 1) // 25 + 1:02d}",
            "x": float(xs[k]), "y": float(ys[k]),
            "objname": str(1237670000000000000 + int(plan.obsid[g]) * 13),
            "tsource": "LAMOST_MOCK", "seeing": float(plan.seeing[g]),
            "moonpha": float(plan.moonpha[g]), "helio_rv": float(plan.helio_rv[g]),
            "scamean": 3.3,
        }
        cards = _header_cards(cfg.layout, meta, cfg)
        n_k = int(npix[k])
        raw = _file_bytes(cfg.layout, flux[k], ivar[k], andm[k], orm[k], n_k, cards,
                          None if cont is None else cont[k])
        data = _gz(raw, int(cfg.compresslevel))
        kind = str(broken[k])
        if kind and kind != "nan":
            data = _broken_bytes(kind, data, rng, int(cfg.compresslevel))
        path = os.path.join(outdir, rel)
        try:
            fh = open(path, "wb")
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fh = open(path, "wb")
        with fh:
            fh.write(data)
        row = {"path": rel, "obsid": "" if cfg.layout == "dr1" else meta["obsid"],
               "designation": desig[k], "ra": round(meta["ra"], 6), "dec": round(meta["dec"], 6),
               "lmjd": lmjd, "planid": planid, "spid": spid, "fiberid": fib,
               "layout": cfg.layout}
        row.update(tr)
        row["broken"] = kind
        row["expected_error"] = BROKEN_EXPECTED_ERROR.get(kind, "")
        rows.append(row)
    return rows


@dataclass
class ReleaseSummary:
    """What :func:`write_release` did."""

    outdir: str
    n_files: int
    n_broken: int
    class_counts: dict[str, int]
    seconds: float
    files_per_second: float
    bytes_written: int
    truth_path: str


def write_release(outdir: str | os.PathLike, cfg: MockConfig, *, workers: int = 1,
                  progress: bool | Callable[[int], None] = False,
                  templates_path: str | os.PathLike | None = None,
                  instrument_path: str | os.PathLike | None = None) -> ReleaseSummary:
    """Write a mock LAMOST release and its ``truth.csv`` under ``outdir``.

    Parameters
    ----------
    outdir : path
        Output folder (created).
    cfg : MockConfig
        Release definition; identical output for identical ``cfg`` whatever
        ``workers`` is.
    workers : int
        Worker processes (1 = in this process).
    progress : bool or callable
        ``True`` shows a tqdm bar (rate and ETA); a callable receives the
        number of files finished after each batch.
    templates_path, instrument_path : path, optional
        Non-default template library / instrument model.

    Returns
    -------
    ReleaseSummary
    """
    import time

    cfg.validate()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    outdir = str(outdir)
    os.makedirs(outdir, exist_ok=True)
    t0 = time.perf_counter()
    n = int(cfg.n)
    bs = int(cfg.batch_size)
    tasks = [(i, s, min(s + bs, n)) for i, s in enumerate(range(0, n, bs))]
    tp = None if templates_path is None else str(templates_path)
    ip = None if instrument_path is None else str(instrument_path)
    bar = None
    if progress is True:
        from tqdm import tqdm
        bar = tqdm(total=n, unit="file", desc="mock", smoothing=0.1)
    truth_path = os.path.join(outdir, "truth.csv")
    tmp_truth = truth_path + ".part"
    n_broken = 0
    counts = {k: 0 for k in CLASSES}

    def _consume(results: Iterable[list[dict]]) -> None:
        nonlocal n_broken
        with open(tmp_truth, "w", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=list(TRUTH_COLUMNS), extrasaction="ignore")
            wr.writeheader()
            for rows in results:
                wr.writerows(rows)
                for r in rows:
                    counts[r["mk"]] += 1
                    n_broken += bool(r["broken"])
                if bar is not None:
                    bar.update(len(rows))
                elif callable(progress):
                    progress(len(rows))

    try:
        if workers == 1 or len(tasks) <= 1:
            _init_worker(cfg, outdir, tp, ip)
            try:
                _consume(_process_chunk(t) for t in tasks)
            finally:
                _WORKER.clear()
        else:
            import multiprocessing as mp
            ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
            with ctx.Pool(workers, initializer=_init_worker, initargs=(cfg, outdir, tp, ip)) as pool:
                _consume(pool.imap(_process_chunk, tasks, chunksize=1))
    finally:
        if bar is not None:
            bar.close()
    os.replace(tmp_truth, truth_path)
    dt = time.perf_counter() - t0
    size = 0
    for root, _, files in os.walk(outdir):
        for f in files:
            if f.endswith(".fits.gz"):
                size += os.path.getsize(os.path.join(root, f))
    return ReleaseSummary(outdir=outdir, n_files=n, n_broken=n_broken, class_counts=counts,
                          seconds=dt, files_per_second=n / dt if dt > 0 else float("inf"),
                          bytes_written=size, truth_path=truth_path)


def read_truth(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a ``truth.csv`` (strings, as written)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
