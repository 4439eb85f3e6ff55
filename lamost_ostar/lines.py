"""He II / He I / Balmer / metal line strengths on the common grid, with honest errors.

What makes a spectrum O-type is **He II absorption** (4200, 4541, 4686, 5411 A)
with He I (4026, 4144, 4388, 4471, 4922, 5876 A) weak or comparable, on a hot
star's Balmer lines.  This module measures those lines on batches of spectra
resampled by :func:`lamost_ostar.preprocess.resample` (``flux, ivar, mask``,
``N x NPIX``, vacuum wavelengths) and combines the He II lines into one piece of
evidence, ``heii_sigma``, that the O-candidate decision can use and store.

It works on arrays only (no file access) and imports only
:mod:`lamost_ostar.preprocess` (for the grid).  Everything is vectorised over the
batch *and* the lines: each line's pixels are padded into one
``(line, pixel, spectrum)`` block, so a batch costs a fixed number of array
operations (about 30 us per spectrum on the 2-core development machine,
``scripts/validate_lines.py --speed``).

Two estimators per line
-----------------------
Both use a **local linear continuum**, so they are independent of the flux
scale: they work unchanged on calibrated flux (any units) and on
continuum-normalised flux (~1 in the continuum).

``ew`` / ``ew_err`` (box equivalent width, the reported EW)
    A weighted (ivar) straight-line fit through the good pixels of the two side
    bands gives the continuum ``C``; ``EW = sum (1 - F/C) dlambda`` over the
    line window (positive for absorption, Angstrom).  The error propagates the
    pixel variances through the sum **and** the fitted continuum's covariance
    (the bands and the window are disjoint, so the two terms add).  The box EW
    is unbiased for any line profile that the window contains.
``ew_mf`` / ``ew_mf_err`` (matched filter)
    A weighted linear least-squares fit over the window and both bands of a
    straight line plus a Gaussian of fixed centre and fixed width ``sigma``
    (plus Gaussians of fixed width for the blended neighbours listed in
    ``Line.blends``, whose amplitudes are nuisance parameters); ``EW_mf =
    amplitude * sigma * sqrt(2 pi) / continuum``, its error from the fit's
    covariance matrix by the delta method.  It weights the pixels by the
    expected profile, so its noise is ~30-40 % lower than the box EW's at the
    same S/N (the box sums ~12 pixels of noise, most of them in the line
    wings), but it under-estimates lines much broader than ``sigma`` (e.g.
    Pickles spectra at R ~ 500: by ~40 %) and is then not an EW to quote.
    Both estimators are unbiased (mean 0) on a spectrum without the line,
    which is what a detection statistic needs; the matched filter is the one
    :func:`he_evidence` combines.

``chi2`` is the reduced chi-square of the matched-filter fit.  Where the simple
model (line + Gaussian) does not describe the region -- the dense metal lines
and molecular bands of cool stars, a mis-masked cosmic ray -- it is >> 1 and
the significances used for the evidence are computed with the errors scaled
by ``max(1, sqrt(chi2))`` (``ew_err`` itself is the pure noise propagation).

Line list (:data:`LINES`)
-------------------------
Windows and bands are chosen for R ~ 1800 (FWHM ~ 2.5 A at 4500 A, pixel
~1.05 A) and quoted in **air** (as in the literature); :class:`Line` converts
them to vacuum (the grid's wavelengths).  Windows are ~ +-6 A (about +-3
sigma of an O star's He line at LAMOST resolution); Balmer windows are +-14 A
(core EWs: the wings of B/A stars extend further).  Radial velocities are not
removed (LAMOST spectra are heliocentric, not at rest): for a sigma = 2 A line
shifted by 100 km/s the box EW loses 2 % and the matched filter 16 % (33 % at
150 km/s), which only matters for runaway O stars.  See each entry's ``note`` for the
neighbours it avoids.

Combined evidence (:func:`he_evidence`)
---------------------------------------
``heii_sigma``
    Significance of the inverse-variance weighted mean EW of the He II lines
    4200, 4541, 4686, 5411 (matched-filter estimator, chi2-scaled errors plus
    a 0.04 A systematic floor per line, :data:`EW_SYSTEMATIC`), so
    ``heii_sigma ~ N(0, 1)`` on a spectrum without He II.  He II 4686 is left
    out when it is in significant **emission** (``z < -3``: Of stars such as
    HD 57060, O7 Iaf; flagged ``heii_4686_emission``).
``hei_sigma``
    The same for He I 4144, 4388, 4471, 4922, 5876 (4026 is left out: it is a
    He I + He II 4025.6 blend in O stars).
``log_wprime``
    Conti & Alschuler (1971) / Mathys (1988) ``log W' = log10(EW(He I
    4471) / EW(He II 4541))`` from the box EWs (~0 at O7, < 0 earlier, > 0
    later), NaN unless both are positive at >= 1 sigma.
``heii_detected``
    ``heii_sigma >= 4`` (:data:`HEII_SIGMA_MIN`), at least two He II lines at
    >= 1 sigma, the He II lines consistent with one EW (:data:`HEII_SCATTER`),
    no He II absorption line at <= -2.5 sigma, and no cool-star
    metal line (Ca II K, Ca I 4227, Mg b) above its threshold
    (:data:`METAL_VETO`).

Examples
--------
>>> from lamost_ostar.preprocess import resample
>>> from lamost_ostar.lines import measure_lines
>>> flux, ivar, mask = resample(spectra)                      # doctest: +SKIP
>>> m = measure_lines(flux, ivar, mask)                       # doctest: +SKIP
>>> m.ew_of("heii_4541"), m.heii_sigma, m.heii_detected       # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from lamost_ostar.preprocess import NPIX, grid_wavelength

__all__ = [
    "Line",
    "sdo_index",
    "balmer_index",
    "sdo_sigma",
    "SDO_O_EDGE",
    "LINES",
    "LINE_NAMES",
    "HEII_LINES",
    "HEI_LINES",
    "HEII_SIGMA_MIN",
    "HEII_MIN_LINES",
    "HEII_LINE_SIGMA",
    "HEII_CONTRA_SIGMA",
    "HEII_CONTRA_LINES",
    "HEII_SCATTER",
    "HEII_EMISSION_SIGMA",
    "EW_SYSTEMATIC",
    "METAL_VETO",
    "METAL_VETO_SIGMA",
    "EVIDENCE_FIELDS",
    "LineMeasurements",
    "HeEvidence",
    "air_to_vacuum",
    "measure_lines",
    "he_evidence",
]


def air_to_vacuum(wave_air: np.ndarray | float) -> np.ndarray:
    """Convert air wavelengths [A] to vacuum (Ciddor 1996; as SDSS/astropy).

    Parameters
    ----------
    wave_air : array_like
        Air wavelengths in Angstrom (valid above ~2000 A).

    Returns
    -------
    numpy.ndarray
        Vacuum wavelengths in Angstrom (float64).
    """
    wave_air = np.asarray(wave_air, dtype=np.float64)
    sigma2 = (1e4 / wave_air) ** 2
    fact = 1.0 + 5.792105e-2 / (238.0185 - sigma2) + 1.67917e-3 / (57.362 - sigma2)
    return wave_air * fact


@dataclass(frozen=True)
class Line:
    """One spectral line: rest wavelength, window, side bands, filter width.

    Attributes
    ----------
    name : str
        Identifier, e.g. ``"heii_4541"``.
    label : str
        Human label, e.g. ``"He II 4541"``.
    air : float
        Rest wavelength in air [A] (NIST).
    window : tuple of float
        Air wavelength range [A] of the EW sum.
    blue, red : tuple of float
        Air wavelength ranges [A] of the continuum side bands.
    sigma : float
        Width [A] (Gaussian sigma) of the matched filter.
    blends : tuple of str
        Names of neighbouring lines fitted together with this one in the
        matched filter (their windows join the fit region).
    note : str
        Why the window and bands are where they are.
    """

    name: str
    label: str
    air: float
    window: tuple[float, float]
    blue: tuple[float, float]
    red: tuple[float, float]
    sigma: float
    blends: tuple[str, ...] = ()
    note: str = ""

    @property
    def vacuum(self) -> float:
        """Vacuum rest wavelength [A]."""
        return float(air_to_vacuum(self.air))

    def vac(self, band: tuple[float, float]) -> tuple[float, float]:
        """An air range converted to vacuum."""
        lo, hi = air_to_vacuum(np.asarray(band, dtype=np.float64))
        return float(lo), float(hi)


_HE = 2.0    # matched-filter sigma of He lines [A]: MILES O stars at R~1800 measure 1.5-2.3
_MET = 1.5   # narrow metal lines (Si III, Mg II)
_BALMER = 4.0

#: The measured lines (air wavelengths; converted to vacuum on use).
LINES: tuple[Line, ...] = (
    Line("heii_4200", "He II 4200", 4199.83, (4194.0, 4206.0), (4174.0, 4186.0),
         (4215.0, 4228.0), _HE,
         note="N III 4195/4200 (weak except Of) falls in the window. Blue band between "
              "He I 4169 and C III 4187 / O II 4185-90; red band after Si IV 4212 "
              "(late-O supergiants). H-delta is 98 A away: its wings in B stars are a "
              "smooth slope that the linear continuum follows."),
    Line("heii_4541", "He II 4541", 4541.59, (4535.5, 4547.5), (4520.0, 4530.0),
         (4579.0, 4588.0), _HE, blends=("siiii_4553",),
         note="Window stops 5 A short of Si III 4552.6 (B0-B2), which the matched filter "
              "fits jointly; blue band after N III 4510-4518 (Of), red band after the "
              "Si III 4567.8/4574.8 lines and before O II 4591 (early B)."),
    Line("heii_4686", "He II 4686", 4685.71, (4679.0, 4692.5), (4656.0, 4672.0),
         (4697.0, 4708.0), _HE,
         note="Blue band after N III 4634-4642 and C III / O II 4647-4651 (Of emission, "
              "early-B absorption; O II 4661.6 is weak); red band before He I 4713.1. "
              "In emission in Of stars."),
    Line("heii_5411", "He II 5411", 5411.52, (5404.0, 5419.0), (5380.0, 5396.0),
         (5425.0, 5440.0), _HE * 1.1,
         note="The strongest He II line in LAMOST's range that is free of neighbours in "
              "hot stars; in the blue arm's high-S/N part (useful for reddened O stars). "
              "Pixel 1.25 A, hence the slightly wider window."),
    Line("hei_4026", "He I 4026", 4026.19, (4020.0, 4032.0), (3993.0, 4004.0),
         (4036.0, 4048.0), _HE,
         note="Blended with He II 4025.6 in O stars (hence not in hei_sigma). Blue band "
              "between the H-epsilon / Ca II H wing and He I 4009.3, red band over "
              "N II 4041 (weak)."),
    Line("hei_4144", "He I 4144", 4143.76, (4138.5, 4149.0), (4126.0, 4134.0),
         (4154.5, 4164.5), _HE,
         note="Blue band after He I 4120.8 / Si IV 4116 and the core of H-delta; red "
              "band after O II 4153 and before He I 4169."),
    Line("hei_4388", "He I 4388", 4387.93, (4382.0, 4394.0), (4366.0, 4377.0),
         (4398.0, 4410.0), _HE,
         note="Blue band on the H-gamma red wing (linear there), red band before "
              "O II 4415/4417."),
    Line("hei_4471", "He I 4471", 4471.48, (4466.0, 4477.0), (4448.0, 4460.0),
         (4486.0, 4498.0), _HE, blends=("mgii_4481",),
         note="Window (with the forbidden 4470 component) stops 4 A short of Mg II "
              "4481, fitted jointly in the matched filter; blue band after He I 4437.5, "
              "red band after Mg II."),
    Line("hei_4922", "He I 4922", 4921.93, (4916.0, 4928.0), (4897.0, 4909.0),
         (4934.0, 4946.0), _HE,
         note="Blue band on the H-beta red wing (linear there), red band after Fe II "
              "4923.9 (A-F stars, in the window) and before He I 5016 is far."),
    Line("hei_5876", "He I 5876", 5875.62, (5868.5, 5882.5), (5845.0, 5862.0),
         (5902.0, 5915.0), _HE * 1.2,
         note="Window stops 7 A short of Na D2 5890 (stellar + interstellar); red band "
              "beyond Na D1 5896. The strongest He I line of late O stars."),
    Line("siiii_4553", "Si III 4553", 4552.62, (4549.0, 4557.0), (4520.0, 4530.0),
         (4579.0, 4588.0), _MET, blends=("heii_4541",),
         note="Early-B marker next to He II 4541 (fitted jointly); shares its bands."),
    Line("mgii_4481", "Mg II 4481", 4481.13, (4477.0, 4485.5), (4448.0, 4460.0),
         (4486.0, 4498.0), _MET, blends=("hei_4471",),
         note="Late-B / A marker next to He I 4471 (fitted jointly); shares its bands."),
    Line("caii_k", "Ca II K", 3933.66, (3926.0, 3942.0), (3908.0, 3920.0),
         (3946.0, 3956.0), _MET * 1.3,
         note="Cool-star veto: > 3 A in F-M stars, interstellar only (< 1 A) in O stars. "
              "Red band before Ca II H / H-epsilon 3968-3970. The wings of cool stars "
              "extend beyond the window (EW under-estimated there)."),
    Line("cai_4227", "Ca I 4227", 4226.73, (4221.5, 4232.0), (4208.0, 4217.0),
         (4236.0, 4246.0), _MET,
         note="Cool-star veto (a resonance line: ~1-3 A in G-M stars, absent in hot "
              "stars), in a part of the spectrum with more S/N than Ca II K."),
    Line("mgi_b", "Mg I b", 5172.68, (5163.0, 5188.0), (5140.0, 5155.0),
         (5192.0, 5205.0), 6.0,
         note="Cool-star veto: the 5167/5173/5184 triplet in one window (3-10 A in G-M "
              "stars, < 0.5 A in B stars); the matched filter here is a broad bump and "
              "only the box EW is meaningful."),
    Line("hdelta", "H-delta", 4101.74, (4088.0, 4116.0), (4058.0, 4072.0),
         (4126.0, 4134.0), _BALMER,
         note="Core EW (+-14 A); red band between He I 4120.8 and He I 4143.8."),
    Line("hgamma", "H-gamma", 4340.47, (4326.0, 4355.0), (4305.0, 4316.0),
         (4362.0, 4374.0), _BALMER,
         note="Core EW (+-14 A); red band before He I 4387.9."),
    Line("hbeta", "H-beta", 4861.33, (4846.0, 4877.0), (4820.0, 4836.0),
         (4884.0, 4897.0), _BALMER,
         note="Core EW (+-15 A); red band before He I 4921.9's window."),
)

#: Names of :data:`LINES` in order (the columns of ``LineMeasurements.ew``).
LINE_NAMES: tuple[str, ...] = tuple(l.name for l in LINES)
#: He II lines combined into ``heii_sigma``.
HEII_LINES: tuple[str, ...] = ("heii_4200", "heii_4541", "heii_4686", "heii_5411")
#: He I lines combined into ``hei_sigma`` (4026 left out: He I + He II blend).
HEI_LINES: tuple[str, ...] = ("hei_4144", "hei_4388", "hei_4471", "hei_4922", "hei_5876")

# --- the heii_detected rule (see reports/lines/validation.md for the numbers behind it)
#: ``heii_detected`` needs ``heii_sigma >= HEII_SIGMA_MIN``.  ``heii_sigma`` is
#: ~N(0, 1) on spectra without He II (pull tests), so 4 is a 3e-5 one-sided
#: Gaussian tail.  With the conditions below, 4 is the lowest of the thresholds
#: tried (3, 3.5, 4, 5) that gave no false detection in every test set (mock A-M
#: stars from MILES templates at S/N 5-50, mock B2-B9, real LAMOST files);
#: 3.5 gave 3 of 20 000 mock A-M spectra in one set and 1 of 4 000 B2-B9 in
#: another (reports/lines/validation.md) ...
HEII_SIGMA_MIN: float = 4.0
#: ... at least ``HEII_MIN_LINES`` He II lines individually at ``>= HEII_LINE_SIGMA``
#: (one line hit by a cosmic ray or an unmasked bad column cannot make a detection) ...
HEII_MIN_LINES: int = 2
HEII_LINE_SIGMA: float = 1.0
#: ... no He II absorption line (4200, 4541, 5411; not 4686, which may be in
#: emission) at ``<= -HEII_CONTRA_SIGMA``: an O star never has them in emission,
#: cool stars' metal lines and TiO bands in the side bands often make them negative ...
HEII_CONTRA_SIGMA: float = 2.5
HEII_CONTRA_LINES: tuple[str, ...] = ("heii_4200", "heii_4541", "heii_5411")
#: ... and the He II lines consistent with one common EW: each line is compared
#: with the weighted mean of the *other* lines (leave-one-out, so that one strong
#: feature cannot set the scale it is tested against), with an intrinsic
#: scatter of ``HEII_SCATTER`` x that mean added to the errors (O-star He II EWs
#: differ by up to ~50 % from line to line, MKCLASS O6-O9); the sum of the
#: squared deviations must stay below the 99.9 % point of chi-square with one
#: degree of freedom per line.  One strong feature in one window (a cosmic ray,
#: a cool star's blend) is not He II.
HEII_SCATTER: float = 0.5
_CHI2_999 = (np.inf, 10.83, 13.82, 16.27, 18.47, 20.52)   # 99.9 % points, 0-5 dof
#: ... and no cool-star metal line stronger than its threshold [A] at more than
#: ``METAL_VETO_SIGMA`` (box EWs).  Hot stars: Ca II K <= 0.8 A (interstellar,
#: MKCLASS O4-B5), Ca I 4227 and Mg b ~0 (|EW| < 0.3 A); F-M stars: Ca II K 4-10 A,
#: Ca I 4227 0.2-6 A, Mg b 0-6 A (MKCLASS F0-G0, mock M stars; Mg b is weak in F-G
#: supergiants).  Three lines because LAMOST files (DR1 and DR7 seen) often have
#: ivar = 0 in the Ca II K core of cool stars, and M stars have little flux there.
METAL_VETO: dict[str, float] = {"caii_k": 2.5, "cai_4227": 0.5, "mgi_b": 1.5}
METAL_VETO_SIGMA: float = 3.0
#: Systematic EW error [A] added in quadrature to every line's error before the
#: lines are combined (continuum placement and weak blends that the noise does
#: not describe): the median of the per-line rms matched-filter "He II" EWs of
#: noise-free stars without He II (MKCLASS B1-B5 standards: 0.018, 0.052, 0.042,
#: 0.025 A for He II 4200, 4541, 4686, 5411; raw STELIB B1-B5: 0.080, 0.062,
#: 0.043, 0.029 A).  Negligible at LAMOST's usual S/N (a line's noise is ~0.27 A
#: at S/N 10); it stops weak systematics from growing into a detection at S/N >~ 50.
EW_SYSTEMATIC: float = 0.04
#: He II 4686 counts as emission (Of) below this significance; it is then left
#: out of ``heii_sigma`` and flagged.
HEII_EMISSION_SIGMA: float = -3.0

#: Minimum fraction of good pixels in each side band and in the window.
MIN_BAND_GOOD: float = 0.5
MIN_WINDOW_GOOD: float = 0.75
# continuum abscissa scale [A] (conditioning of the fits)
_XSCALE = 20.0


# --------------------------------------------------------------------------- setup
@dataclass
class _Plan:
    """Pixel indices and design matrices of all lines on one grid, padded to a block.

    The pixels a line uses are gathered from the grid columns ``cols``; every
    line's pixel lists are padded to a common length (``P`` fit pixels, ``B``
    band pixels, ``W`` window pixels) with the index ``len(cols)``, an extra
    all-zero pixel (weight 0), and its matched-filter design to ``K`` columns
    (unused columns get a unit diagonal), so that one set of array operations
    measures every line of every spectrum.  Arrays are laid out
    ``(line, pixel, spectrum)`` so that the sums over pixels are matrix products.
    """

    cols: np.ndarray        # (C,) grid pixels used by any line
    fit_idx: np.ndarray     # (L, P) fit pixels, into cols (+ padding index C)
    designT: np.ndarray     # (L, K, P): 1, x, -gauss(line), -gauss(blends), 0
    outerT: np.ndarray      # (L, K*K, P) outer products of the design rows
    diag_pad: np.ndarray    # (L, K, K) unit diagonal on the unused columns
    k_used: np.ndarray      # (L,) number of used design columns
    band_idx: np.ndarray    # (L, B) side-band pixels (blue, then red)
    band_sel: np.ndarray    # (L, 2, B) float, 1 for blue (row 0) / red (row 1) pixels
    band_pow: np.ndarray    # (L, 3, B) 1, x, x**2 with x = (lambda - lambda0) / _XSCALE
    n_band: np.ndarray      # (L, 2) pixels in the blue / red band
    win_idx: np.ndarray     # (L, W) window pixels
    xw: np.ndarray          # (L, W, 1) x of the window pixels
    dlw: np.ndarray         # (L, 1, W) pixel widths [A] (0 for padding)
    dlw_x: np.ndarray       # (L, 1, W) dlw * x
    dlw2: np.ndarray        # (L, 1, W) dlw ** 2
    win_design: np.ndarray  # (L, W, K) design rows of the window pixels
    n_win: np.ndarray       # (L,)
    area: np.ndarray        # (L,) sigma * sqrt(2 pi) of each line's own Gaussian
    measurable: np.ndarray  # (L,) bool, window and both bands on the grid


_PLAN_CACHE: dict[tuple, _Plan] = {}
_BY_NAME = {l.name: l for l in LINES}


def _indices(wave: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    return np.flatnonzero((wave >= band[0]) & (wave <= band[1]))


def _gauss(wave: np.ndarray, line: Line) -> np.ndarray:
    return np.exp(-0.5 * ((wave - line.vacuum) / line.sigma) ** 2)


def _plan(wave: np.ndarray, lines: Sequence[Line]) -> _Plan:
    """The (cached) :class:`_Plan` of ``lines`` on the grid ``wave``."""
    key = (wave.size, float(wave[0]), float(wave[-1]), tuple(lines))
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        return hit
    dl = np.gradient(wave)
    by_name = {**_BY_NAME, **{l.name: l for l in lines}}
    per = []
    for line in lines:
        iw = _indices(wave, line.vac(line.window))
        ibl = _indices(wave, line.vac(line.blue))
        ibr = _indices(wave, line.vac(line.red))
        comps = [line] + [by_name[b] for b in line.blends]
        ifit = np.unique(np.concatenate([iw, ibl, ibr] + [_indices(wave, c.vac(c.window))
                                                          for c in comps[1:]]))
        per.append((line, comps, iw, ibl, ibr, ifit))
    cols = np.unique(np.concatenate([p[5] for p in per])).astype(np.int64)
    pad = cols.size
    nl = len(per)
    big_k = 2 + max(len(p[1]) for p in per)
    pmax = max(max(p[5].size for p in per), 1)
    bmax = max(max(p[3].size + p[4].size for p in per), 1)
    wmax = max(max(p[2].size for p in per), 1)
    fit_idx = np.full((nl, pmax), pad, np.int64)
    designT = np.zeros((nl, big_k, pmax))
    diag = np.zeros((nl, big_k, big_k))
    k_used = np.zeros(nl, np.int64)
    band_idx = np.full((nl, bmax), pad, np.int64)
    band_sel = np.zeros((nl, 2, bmax))
    band_pow = np.zeros((nl, 3, bmax))
    n_band = np.zeros((nl, 2), np.int64)
    win_idx = np.full((nl, wmax), pad, np.int64)
    xw = np.zeros((nl, wmax, 1))
    dlw = np.zeros((nl, 1, wmax))
    win_design = np.zeros((nl, wmax, big_k))
    for j, (line, comps, iw, ibl, ibr, ifit) in enumerate(per):
        x0 = line.vacuum
        rows = [np.ones(ifit.size), (wave[ifit] - x0) / _XSCALE] + [
            -_gauss(wave[ifit], c) for c in comps]
        k_used[j] = len(rows)
        designT[j, :len(rows), :ifit.size] = np.stack(rows)
        for q in range(len(rows), big_k):
            diag[j, q, q] = 1.0
        fit_idx[j, :ifit.size] = np.searchsorted(cols, ifit)
        ib = np.concatenate([ibl, ibr])
        band_idx[j, :ib.size] = np.searchsorted(cols, ib)
        band_sel[j, 0, :ibl.size] = 1.0
        band_sel[j, 1, ibl.size:ib.size] = 1.0
        xb = (wave[ib] - x0) / _XSCALE
        band_pow[j, :, :ib.size] = np.stack([np.ones_like(xb), xb, xb * xb])
        n_band[j] = (ibl.size, ibr.size)
        win_idx[j, :iw.size] = np.searchsorted(cols, iw)
        xw[j, :iw.size, 0] = (wave[iw] - x0) / _XSCALE
        dlw[j, 0, :iw.size] = dl[iw]
        win_design[j, :iw.size, :] = designT[j][:, np.searchsorted(ifit, iw)].T
    outerT = (designT[:, :, None, :] * designT[:, None, :, :]).reshape(nl, big_k * big_k, pmax)
    plan = _Plan(
        cols=cols, fit_idx=fit_idx, designT=designT, outerT=outerT, diag_pad=diag,
        k_used=k_used, band_idx=band_idx, band_sel=band_sel, band_pow=band_pow,
        n_band=n_band, win_idx=win_idx, xw=xw, dlw=dlw, dlw_x=dlw * xw.transpose(0, 2, 1),
        dlw2=dlw * dlw, win_design=win_design, n_win=np.array([p[2].size for p in per]),
        area=np.array([l.sigma * np.sqrt(2.0 * np.pi) for l in lines]),
        measurable=np.array([p[2].size > 0 and p[3].size >= 2 and p[4].size >= 2
                             for p in per]),
    )
    _PLAN_CACHE[key] = plan
    return plan


# --------------------------------------------------------------------------- results
#: The per-spectrum evidence fields of :class:`LineMeasurements` / :class:`HeEvidence`.
EVIDENCE_FIELDS: tuple[str, ...] = (
    "heii_ew", "heii_ew_err", "heii_sigma", "hei_ew", "hei_ew_err", "hei_sigma",
    "log_wprime", "log_wprime_err", "n_heii_lines", "heii_chi2", "heii_consistent",
    "heii_contradicted", "heii_4686_emission", "metal_veto", "heii_detected", "sdo_index",
    "sdo_sigma")


@dataclass
class LineMeasurements:
    """Line strengths of a batch (``N`` spectra, ``L`` lines) and the He evidence.

    Attributes
    ----------
    names : tuple of str
        Line names (:data:`LINE_NAMES` by default), the columns of the arrays.
    wavelength : numpy.ndarray
        ``(L,)`` vacuum rest wavelengths [A].
    ew, ew_err : numpy.ndarray
        ``(N, L)`` box equivalent width [A] (positive = absorption) and its
        1-sigma error (pixel noise + fitted continuum); NaN where the window
        or a side band lacks good pixels or the continuum is not positive.
    ew_mf, ew_mf_err : numpy.ndarray
        ``(N, L)`` matched-filter EW [A] and its 1-sigma error.
    chi2 : numpy.ndarray
        ``(N, L)`` reduced chi-square of the matched-filter fit.
    continuum : numpy.ndarray
        ``(N, L)`` fitted continuum at the line centre (input flux units).
    cont_snr : numpy.ndarray
        ``(N, L)`` continuum S/N per pixel in the side bands.
    heii_ew, heii_ew_err, heii_sigma, hei_ew, hei_ew_err, hei_sigma, log_wprime,
    log_wprime_err, n_heii_lines, heii_chi2, heii_consistent, heii_contradicted,
    heii_4686_emission, metal_veto, heii_detected, sdo_index, sdo_sigma
        The combined evidence, see :class:`HeEvidence`.
    """

    names: tuple[str, ...]
    wavelength: np.ndarray
    ew: np.ndarray
    ew_err: np.ndarray
    ew_mf: np.ndarray
    ew_mf_err: np.ndarray
    chi2: np.ndarray
    continuum: np.ndarray
    cont_snr: np.ndarray
    heii_ew: np.ndarray = field(default_factory=lambda: np.zeros(0))
    heii_ew_err: np.ndarray = field(default_factory=lambda: np.zeros(0))
    heii_sigma: np.ndarray = field(default_factory=lambda: np.zeros(0))
    hei_ew: np.ndarray = field(default_factory=lambda: np.zeros(0))
    hei_ew_err: np.ndarray = field(default_factory=lambda: np.zeros(0))
    hei_sigma: np.ndarray = field(default_factory=lambda: np.zeros(0))
    log_wprime: np.ndarray = field(default_factory=lambda: np.zeros(0))
    log_wprime_err: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_heii_lines: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    heii_chi2: np.ndarray = field(default_factory=lambda: np.zeros(0))
    heii_consistent: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    heii_contradicted: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    heii_4686_emission: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    metal_veto: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    heii_detected: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    sdo_index: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sdo_sigma: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return int(self.ew.shape[0])

    def column(self, name: str) -> int:
        """Column index of line ``name`` (KeyError if not measured)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(name) from None

    def ew_of(self, name: str, estimator: str = "box") -> tuple[np.ndarray, np.ndarray]:
        """``(N,)`` EW and error of one line (``estimator`` ``"box"`` or ``"mf"``)."""
        j = self.column(name)
        if estimator == "box":
            return self.ew[:, j], self.ew_err[:, j]
        if estimator == "mf":
            return self.ew_mf[:, j], self.ew_mf_err[:, j]
        raise ValueError(f"estimator must be 'box' or 'mf', got {estimator!r}")

    def significance(self, estimator: str = "mf") -> np.ndarray:
        """``(N, L)`` EW / error with the error scaled by ``max(1, sqrt(chi2))``."""
        ew = self.ew_mf if estimator == "mf" else self.ew
        err = self.ew_mf_err if estimator == "mf" else self.ew_err
        with np.errstate(invalid="ignore", divide="ignore"):
            return ew / (err * np.sqrt(np.maximum(self.chi2, 1.0)))

    def row(self, i: int) -> dict[str, Any]:
        """Plain-Python record of spectrum ``i``: ``ew_<name>``, ``ew_<name>_err``,
        ``ew_mf_<name>``, ``ew_mf_<name>_err`` and the evidence (None for NaN)."""
        def opt(v: Any) -> Any:
            if isinstance(v, (bool, np.bool_)):
                return bool(v)
            if isinstance(v, (int, np.integer)):
                return int(v)
            v = float(v)
            return v if np.isfinite(v) else None
        out: dict[str, Any] = {}
        for j, n in enumerate(self.names):
            out[f"ew_{n}"] = opt(self.ew[i, j])
            out[f"ew_{n}_err"] = opt(self.ew_err[i, j])
            out[f"ew_mf_{n}"] = opt(self.ew_mf[i, j])
            out[f"ew_mf_{n}_err"] = opt(self.ew_mf_err[i, j])
        for key in EVIDENCE_FIELDS:
            arr = getattr(self, key)
            out[key] = opt(arr[i]) if len(arr) > i else None
        return out


@dataclass
class HeEvidence:
    """Combined He II / He I evidence of a batch (all ``(N,)``).

    Attributes
    ----------
    heii_ew, heii_ew_err : numpy.ndarray
        Inverse-variance weighted mean EW [A] of the usable He II lines
        (:data:`HEII_LINES`; 4686 left out when in emission) and its error
        (chi2-scaled errors).
    heii_sigma : numpy.ndarray
        ``heii_ew / heii_ew_err`` (NaN if no He II line was measurable).
    hei_ew, hei_ew_err, hei_sigma : numpy.ndarray
        The same for :data:`HEI_LINES`.
    log_wprime, log_wprime_err : numpy.ndarray
        ``log10(EW(He I 4471) / EW(He II 4541))`` (box EWs) and its error;
        NaN unless both EWs are >= 1 sigma positive.
    n_heii_lines : numpy.ndarray
        int, number of He II lines with significance ``>= HEII_LINE_SIGMA``.
    heii_chi2 : numpy.ndarray
        Leave-one-out chi-square of the He II lines (each against the mean of
        the others; errors plus an intrinsic scatter of ``HEII_SCATTER`` x that
        mean); NaN with fewer than two lines.
    heii_consistent : numpy.ndarray
        bool, ``heii_chi2`` below the 99.9 % point of chi-square with one degree
        of freedom per line.
    heii_contradicted : numpy.ndarray
        bool, a line of :data:`HEII_CONTRA_LINES` at ``<= -HEII_CONTRA_SIGMA``.
    heii_4686_emission : numpy.ndarray
        bool, He II 4686 significance ``< HEII_EMISSION_SIGMA`` (left out of
        ``heii_sigma``; Of stars, but also many cool stars).
    metal_veto : numpy.ndarray
        bool, a line of :data:`METAL_VETO` above its threshold at more than
        ``METAL_VETO_SIGMA``.
    heii_detected : numpy.ndarray
        bool, ``heii_sigma >= sigma_min`` and ``n_heii_lines >= HEII_MIN_LINES``
        and ``heii_consistent`` and not ``heii_contradicted`` and not ``metal_veto``.
    sdo_index : numpy.ndarray
        Hot-subdwarf index [A]: the mean box EW of H-delta and H-gamma plus twice
        the box EW of He II 4686 (:func:`sdo_index`).  He-rich hot subdwarfs
        (sdO/sdOB, log g ~ 5-6) have both broad Balmer lines and strong He II
        4686 -- the classic impostors of an O-star search; O stars have one or
        the other.  NaN where either part is not measurable.
    sdo_sigma : numpy.ndarray
        How many sigma the hot-subdwarf index lies above the O-star edge
        :data:`SDO_O_EDGE` (:func:`sdo_sigma`): a high-S/N sdO is many sigma
        above it, a noisy O star is within its errors.  NaN where the index is.
    """

    heii_ew: np.ndarray
    heii_ew_err: np.ndarray
    heii_sigma: np.ndarray
    hei_ew: np.ndarray
    hei_ew_err: np.ndarray
    hei_sigma: np.ndarray
    log_wprime: np.ndarray
    log_wprime_err: np.ndarray
    n_heii_lines: np.ndarray
    heii_chi2: np.ndarray
    heii_consistent: np.ndarray
    heii_contradicted: np.ndarray
    heii_4686_emission: np.ndarray
    metal_veto: np.ndarray
    heii_detected: np.ndarray
    sdo_index: np.ndarray
    sdo_sigma: np.ndarray


def balmer_index(ew_hdelta: np.ndarray, ew_hgamma: np.ndarray) -> np.ndarray:
    """Balmer index: the mean box EW of H-delta and H-gamma [A] (those measured; NaN if neither).

    On the noise-free templates (``lamost_ostar.data/templates.npz``): O stars
    1.0 (the O4 Ia standard) ... 3.3 (O9 V), B stars 1.1 (5th percentile) ... 4.5
    (median); the featureless DC white dwarf LTT 4364 0.03.  Vectorised; the
    Balmer term of :func:`sdo_index`.
    """
    bal = np.column_stack([np.asarray(ew_hdelta, float), np.asarray(ew_hgamma, float)])
    n = np.sum(np.isfinite(bal), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.nansum(bal, axis=1) / np.maximum(n, 1), np.nan)


def sdo_index(ew_hdelta: np.ndarray, ew_hgamma: np.ndarray, ew_heii_4686: np.ndarray) -> np.ndarray:
    """Hot-subdwarf index ``mean(EW H-delta, EW H-gamma) + 2 EW(He II 4686)`` [A] (box EWs).

    On the noise-free templates (``lamost_ostar.data/templates.npz``): O stars
    -4.4 ... 4.6 (median 2.4; the highest the O7-O9.7 dwarfs, the lowest the
    Of stars with 4686 in emission), the He-rich sdOB Feige 110 6.5 and the
    sdB HD 149382 5.4; B stars have strong Balmer lines but no He II 4686
    (B0-B1: 1.3-4.2), and B stars are not what this index is for.  The Balmer
    term is :func:`balmer_index`; the index is NaN without He II 4686.
    Vectorised; :func:`sdo_sigma` measures it against its errors for the
    O-candidate decision's hot-subdwarf veto
    (:class:`lamost_ostar.models.decision.Decision`, ``max_sdo_sigma``).
    """
    return balmer_index(ew_hdelta, ew_hgamma) + 2.0 * np.asarray(ew_heii_4686, float)


#: The O-star edge of the hot-subdwarf index [A]: the highest :func:`sdo_index`
#: of the noise-free O-star templates (the O8 V MK standard, 4.61 measured on
#: its flux; the real O stars of MILES, STELIB and Pickles reach 4.4, HD 36512).
#: Set on O stars alone.
SDO_O_EDGE: float = 4.6


def sdo_sigma(ew_hdelta: np.ndarray, ew_hgamma: np.ndarray, ew_heii_4686: np.ndarray,
              err_hdelta: np.ndarray, err_hgamma: np.ndarray, err_heii_4686: np.ndarray,
              edge: float = SDO_O_EDGE) -> np.ndarray:
    """How many sigma the hot-subdwarf index lies above the O-star edge: ``(sdo_index - edge) / error``.

    The error is propagated from the box-EW errors (``mean`` of the Balmer
    lines measured, ``2 x`` He II 4686; independent).  The raw index does not
    know the S/N: with the veto threshold at the 99th percentile of O spectra
    of every S/N, the noisy O spectra set it (6.5-6.9 A in LOSO runs 4 and 5)
    and a high-S/N He-rich sdOB at 6.5 A passes; in sigma a noisy O star is
    within its errors and a high-S/N subdwarf is far beyond them.  NaN where
    the index or its error is not finite, or the error is not positive.
    """
    eb = np.column_stack([np.asarray(ew_hdelta, float), np.asarray(ew_hgamma, float)])
    vb = np.column_stack([np.asarray(err_hdelta, float) ** 2, np.asarray(err_hgamma, float) ** 2])
    ok = np.isfinite(eb) & np.isfinite(vb)          # a Balmer line counts with its error only
    n = np.sum(ok, axis=1)
    var = np.where(n > 0, np.sum(np.where(ok, vb, 0.0), axis=1) / np.maximum(n, 1) ** 2, np.nan)
    var = var + 4.0 * np.asarray(err_heii_4686, float) ** 2
    index = sdo_index(*np.where(ok, eb, np.nan).T, ew_heii_4686)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (index - edge) / np.sqrt(var)
    return np.where(np.isfinite(z) & (var > 0), z, np.nan)


# --------------------------------------------------------------------------- measuring
def measure_lines(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray | None = None, *,
                  wave: np.ndarray | None = None, lines: Sequence[Line] | None = None,
                  estimator: str = "mf") -> LineMeasurements:
    """Measure line EWs (box and matched filter) and the He evidence of a batch.

    Parameters
    ----------
    flux : numpy.ndarray
        ``(N, M)`` (or ``(M,)``) flux on the grid ``wave``, any scale:
        calibrated flux or continuum-normalised flux.
    ivar : numpy.ndarray
        Same shape, inverse variance of ``flux`` (0 = no information).
    mask : numpy.ndarray, optional
        bool, True for interpolated/missing pixels (as returned by
        :func:`lamost_ostar.preprocess.resample`); such pixels are not used.
    wave : numpy.ndarray, optional
        ``(M,)`` vacuum wavelengths [A]; default the common grid
        (:func:`lamost_ostar.preprocess.grid_wavelength`).
    lines : sequence of Line, optional
        Default :data:`LINES`.  The combined evidence needs the lines it
        combines; missing ones are treated as not measured.
    estimator : {"mf", "box"}
        Per-line estimator that :func:`he_evidence` combines.

    Returns
    -------
    LineMeasurements

    Notes
    -----
    The errors assume independent pixels, which holds on the common grid for
    LAMOST files and the mock (same 1e-4 dex step, offset by a whole number of
    pixels, so :func:`~lamost_ostar.preprocess.resample` copies pixels).  For a
    spectrum interpolated from another sampling the neighbouring pixels are
    correlated and the errors are somewhat under-estimated.
    """
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    if flux.ndim == 1:
        flux, ivar = flux[None, :], ivar[None, :]
        mask = None if mask is None else np.asarray(mask)[None, :]
    if flux.shape != ivar.shape:
        raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} differ in shape")
    if mask is not None and np.shape(mask) != flux.shape:
        raise ValueError(f"mask {np.shape(mask)} and flux {flux.shape} differ in shape")
    if wave is None:
        if flux.shape[1] != NPIX:
            raise ValueError(f"flux has {flux.shape[1]} pixels, the common grid {NPIX}; "
                             "pass wave= for another grid")
        wave = grid_wavelength()
    wave = np.asarray(wave, dtype=np.float64)
    if wave.shape != (flux.shape[1],):
        raise ValueError(f"wave has shape {wave.shape}, flux {flux.shape}")
    if estimator not in ("mf", "box"):
        raise ValueError(f"estimator must be 'box' or 'mf', got {estimator!r}")
    lines = tuple(LINES if lines is None else lines)
    if not lines:
        raise ValueError("no lines to measure")
    plan = _plan(wave, lines)
    with np.errstate(all="ignore"):
        res = _measure(plan, flux[:, plan.cols], ivar[:, plan.cols],
                       None if mask is None else np.asarray(mask, dtype=bool)[:, plan.cols])
    m = LineMeasurements(names=tuple(l.name for l in lines),
                         wavelength=np.array([l.vacuum for l in lines]), **res)
    ev = he_evidence(m, estimator=estimator)
    for key, value in vars(ev).items():
        setattr(m, key, value)
    return m


def _spd_inverse(a: np.ndarray) -> np.ndarray:
    """Inverse of a stack of small symmetric positive-definite matrices (Cholesky).

    ``a`` is ``(..., K, K)``; the loops run over the ``K (K + 1) / 2`` entries
    only, each step vectorised over the stack (several times faster than
    :func:`numpy.linalg.inv` for K = 3-4).  A matrix that is not positive
    definite gives NaN (never an exception).
    """
    k = a.shape[-1]
    low = [[None] * k for _ in range(k)]
    for j in range(k):
        d = a[..., j, j] - sum(low[j][m] ** 2 for m in range(j))
        low[j][j] = np.sqrt(np.where(d > 0, d, np.nan))
        for i in range(j + 1, k):
            low[i][j] = (a[..., i, j] - sum(low[i][m] * low[j][m] for m in range(j))) / low[j][j]
    inv = [[None] * k for _ in range(k)]          # inverse of the Cholesky factor
    for i in range(k):
        inv[i][i] = 1.0 / low[i][i]
        for j in range(i):
            inv[i][j] = -sum(low[i][m] * inv[m][j] for m in range(j, i)) * inv[i][i]
    out = np.empty(a.shape)
    for i in range(k):
        for j in range(i + 1):
            v = sum(inv[m][i] * inv[m][j] for m in range(i, k))
            out[..., i, j] = v
            out[..., j, i] = v
    return out


def _measure(plan: _Plan, flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray | None
             ) -> dict[str, np.ndarray]:
    """Both estimators of every line for the whole batch (``flux`` on ``plan.cols``).

    Works in the layout ``(line, pixel, spectrum)``; returns ``(N, L)`` arrays.
    """
    n = flux.shape[0]
    nl, k = plan.designT.shape[0], plan.designT.shape[1]
    # (C + 1, N): the pixels in use plus one all-zero padding pixel
    ft = np.zeros((plan.cols.size + 1, n))
    it = np.zeros((plan.cols.size + 1, n))
    ft[:-1] = flux.T
    it[:-1] = ivar.T
    good = np.isfinite(ft) & np.isfinite(it) & (it > 0)
    if mask is not None:
        good[:-1] &= ~mask.T
    w = np.where(good, it, 0.0)
    f = np.where(good, ft, 0.0)

    # ---- coverage: both side bands and the window well sampled
    nb = np.matmul(plan.band_sel, good[plan.band_idx].astype(np.float64))   # (L, 2, N)
    gw = good[plan.win_idx]                                                  # (L, W, N)
    need = np.maximum(MIN_BAND_GOOD * plan.n_band, 2)[:, :, None]
    ok = (np.all(nb >= need, axis=1) & (gw.sum(axis=1) >= (MIN_WINDOW_GOOD * plan.n_win)[:, None])
          & plan.measurable[:, None])                                         # (L, N)

    # ---- matched filter: one small weighted least-squares system per line and spectrum
    wf = w[plan.fit_idx]                                                     # (L, P, N)
    ff = f[plan.fit_idx]
    wff = wf * ff
    a = np.matmul(plan.outerT, wf).transpose(0, 2, 1).reshape(nl, n, k, k) + plan.diag_pad[:, None]
    bvec = np.matmul(plan.designT, wff).transpose(0, 2, 1)                 # (L, N, K)
    chi2_0 = np.sum(wff * ff, axis=1)                          # sum w f^2
    dof = np.maximum(np.sum(wf > 0, axis=1) - plan.k_used[:, None], 1)
    a[~ok] = np.eye(k)
    bvec[~ok] = 0.0
    cov = _spd_inverse(a)
    theta = np.einsum("lnij,lnj->lni", cov, bvec)                          # (L, N, K)
    # at the least-squares solution chi2 = sum w f^2 - b . theta
    chi2 = np.maximum(chi2_0 - np.sum(bvec * theta, axis=2), 0.0) / dof
    c0m, amp = theta[..., 0], theta[..., 2]
    area = plan.area[:, None]
    ew_mf = area * amp / c0m
    r = amp / c0m
    ew_mf_err = np.sqrt((area / c0m) ** 2 * (cov[..., 2, 2] - 2.0 * r * cov[..., 0, 2]
                                             + r * r * cov[..., 0, 0]))

    # ---- box EW: weighted straight line through the two side bands
    wb = w[plan.band_idx]                                                    # (L, B, N)
    sums = np.matmul(plan.band_pow, wb)                                      # (L, 3, N)
    tsum = np.matmul(plan.band_pow[:, :2], wb * f[plan.band_idx])           # (L, 2, N)
    s0, s1, s2 = sums[:, 0], sums[:, 1], sums[:, 2]
    t0, t1 = tsum[:, 0], tsum[:, 1]
    det = s0 * s2 - s1 * s1
    c0 = (s2 * t0 - s1 * t1) / det
    c1 = (s0 * t1 - s1 * t0) / det
    v00, v01, v11 = s2 / det, -s1 / det, s0 / det
    icw = 1.0 / (c0[:, None, :] + c1[:, None, :] * plan.xw)                 # (L, W, N)
    # masked window pixels take the matched-filter model's value (no noise of their own)
    model_w = np.matmul(plan.win_design, theta.transpose(0, 2, 1))          # (L, W, N)
    fw = np.where(gw, f[plan.win_idx], model_w)
    rw = fw * icw
    ew = plan.dlw.sum(axis=2) - np.matmul(plan.dlw, rw)[:, 0]
    q = rw * icw
    g0 = np.matmul(plan.dlw, q)[:, 0]
    g1 = np.matmul(plan.dlw_x, q)[:, 0]
    iw_ = it[plan.win_idx]
    var_w = np.where(gw, 1.0 / np.where(gw, iw_, 1.0), 0.0)
    var_pix = np.matmul(plan.dlw2, var_w * icw * icw)[:, 0]
    ew_err = np.sqrt(var_pix + g0 * g0 * v00 + 2.0 * g0 * g1 * v01 + g1 * g1 * v11)
    cont_snr = c0 * np.sqrt(s0 / np.maximum(nb.sum(axis=1), 1.0))

    out = {"ew": ew, "ew_err": ew_err, "ew_mf": ew_mf, "ew_mf_err": ew_mf_err,
           "chi2": chi2, "continuum": c0, "cont_snr": cont_snr}
    ok &= (c0 > 0) & (c0m > 0)
    for v in out.values():
        ok &= np.isfinite(v)
    return {key: np.where(ok, v, np.nan).T for key, v in out.items()}


# --------------------------------------------------------------------------- evidence
def _combine(ew: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-variance weighted mean over the last axis, ignoring NaN."""
    use = np.isfinite(ew) & np.isfinite(err) & (err > 0)
    wt = np.where(use, 1.0 / np.where(use, err, 1.0) ** 2, 0.0)
    sw = wt.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(sw > 0, np.sum(wt * np.where(use, ew, 0.0), axis=-1) / sw, np.nan)
        sig = np.where(sw > 0, 1.0 / np.sqrt(sw), np.nan)
    return mean, sig


def he_evidence(m: LineMeasurements, estimator: str = "mf", *,
                sigma_min: float = HEII_SIGMA_MIN,
                systematic: float = EW_SYSTEMATIC) -> HeEvidence:
    """Combine the He II and He I lines of ``m`` into the O-star evidence.

    Parameters
    ----------
    m : LineMeasurements
        Per-line measurements (the evidence fields of ``m`` are not read).
    estimator : {"mf", "box"}
        Which per-line EWs to combine: ``"mf"`` (matched filter, the default:
        ~35 % smaller errors than the box EW for lines of LAMOST's resolution;
        on the mock's MILES O stars at S/N 20 it detects ~60 % against the
        box's ~16 % at the same false rate, see ``reports/lines/validation.md``)
        or ``"box"`` (better for lines much broader than the filter).
    sigma_min : float
        ``heii_sigma`` threshold of ``heii_detected``.
    systematic : float
        EW error floor [A] added in quadrature to each line (:data:`EW_SYSTEMATIC`).

    Returns
    -------
    HeEvidence
    """
    if estimator not in ("mf", "box"):
        raise ValueError(f"estimator must be 'box' or 'mf', got {estimator!r}")
    n = len(m)
    with np.errstate(invalid="ignore", divide="ignore"):
        z_all = m.significance(estimator)
        ew_all = m.ew_mf if estimator == "mf" else m.ew
        err_all = ew_all / z_all
    err_all = np.where(np.isfinite(err_all) & (err_all > 0), err_all,
                       (m.ew_mf_err if estimator == "mf" else m.ew_err)
                       * np.sqrt(np.maximum(np.nan_to_num(m.chi2, nan=1.0), 1.0)))
    err_all = np.sqrt(err_all ** 2 + systematic ** 2)

    def cols(names: Iterable[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        use = [x for x in names if x in m.names]
        idx = [m.names.index(x) for x in use]
        return ew_all[:, idx], err_all[:, idx], use

    e2, s2, n2 = cols(HEII_LINES)
    with np.errstate(invalid="ignore", divide="ignore"):
        z2 = e2 / s2
    emission = np.zeros(n, dtype=bool)
    if "heii_4686" in n2:
        j = n2.index("heii_4686")
        emission = np.nan_to_num(z2[:, j], nan=0.0) < HEII_EMISSION_SIGMA
        e2 = e2.copy()
        e2[emission, j] = np.nan
        z2 = z2.copy()
        z2[emission, j] = np.nan
    heii_ew, heii_err = _combine(e2, s2)
    used = np.isfinite(e2) & np.isfinite(s2) & (s2 > 0)
    k_used = used.sum(axis=1)
    # leave-one-out consistency: each line against the weighted mean of the others
    wt = np.where(used, 1.0 / np.where(used, s2, 1.0) ** 2, 0.0)
    ew0 = np.where(used, e2, 0.0)
    sw_o = wt.sum(axis=1, keepdims=True) - wt
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_o = (np.sum(wt * ew0, axis=1, keepdims=True) - wt * ew0) / sw_o
        scat = HEII_SCATTER * np.maximum(mean_o, 0.0)
        dev = np.where(used & (sw_o > 0),
                       (e2 - mean_o) ** 2 / (s2 ** 2 + 1.0 / sw_o + scat ** 2), 0.0)
    heii_chi2 = np.where(k_used > 1, dev.sum(axis=1), np.nan)
    limit = np.asarray(_CHI2_999)[np.clip(k_used, 0, len(_CHI2_999) - 1)]
    consistent = np.nan_to_num(heii_chi2, nan=np.inf) <= limit
    e1, s1, _ = cols(HEI_LINES)
    hei_ew, hei_err = _combine(e1, s1)
    with np.errstate(invalid="ignore", divide="ignore"):
        heii_sigma = heii_ew / heii_err
        hei_sigma = hei_ew / hei_err
    n_lines = np.sum(np.nan_to_num(z2, nan=-np.inf) >= HEII_LINE_SIGMA, axis=1)
    contra_idx = [n2.index(x) for x in HEII_CONTRA_LINES if x in n2]
    contradicted = np.any(np.nan_to_num(z2[:, contra_idx], nan=0.0) <= -HEII_CONTRA_SIGMA,
                          axis=1) if contra_idx else np.zeros(n, dtype=bool)

    # Conti & Alschuler log W' from the (unbiased) box EWs
    lw = np.full(n, np.nan)
    lw_err = np.full(n, np.nan)
    if "hei_4471" in m.names and "heii_4541" in m.names:
        a, ae = m.ew_of("hei_4471", "box")
        b, be = m.ew_of("heii_4541", "box")
        with np.errstate(invalid="ignore", divide="ignore"):
            okr = (a >= ae) & (b >= be) & (a > 0) & (b > 0)
            lw = np.where(okr, np.log10(a / b), np.nan)
            lw_err = np.where(okr, np.sqrt((ae / a) ** 2 + (be / b) ** 2) / np.log(10), np.nan)

    veto = np.zeros(n, dtype=bool)
    for name, thr in METAL_VETO.items():
        if name in m.names:
            k_ew, k_err = m.ew_of(name, "box")
            with np.errstate(invalid="ignore"):
                veto |= np.nan_to_num((k_ew > thr) & (k_ew > METAL_VETO_SIGMA * k_err),
                                      nan=False).astype(bool)
    detected = ((np.nan_to_num(heii_sigma, nan=-np.inf) >= sigma_min)
                & (n_lines >= HEII_MIN_LINES) & consistent & ~contradicted & ~veto)
    return HeEvidence(heii_ew=heii_ew, heii_ew_err=heii_err, heii_sigma=heii_sigma,
                      hei_ew=hei_ew, hei_ew_err=hei_err, hei_sigma=hei_sigma,
                      log_wprime=lw, log_wprime_err=lw_err, n_heii_lines=n_lines,
                      heii_chi2=heii_chi2, heii_consistent=consistent,
                      heii_contradicted=contradicted, heii_4686_emission=emission,
                      metal_veto=veto, heii_detected=detected, sdo_index=_sdo_of(m),
                      sdo_sigma=sdo_sigma(*(_box(m, n) for n in ("hdelta", "hgamma", "heii_4686")),
                                          *(_box(m, n, err=True) for n in ("hdelta", "hgamma", "heii_4686"))))


def _box(m: LineMeasurements, name: str, err: bool = False) -> np.ndarray:
    """Box EW (or its error) of line ``name`` (NaN column when the line was not measured)."""
    return m.ew_of(name, "box")[int(err)] if name in m.names else np.full(len(m), np.nan)


def _sdo_of(m: LineMeasurements) -> np.ndarray:
    """:func:`sdo_index` of a measurement (NaN where a line was not measured)."""
    return sdo_index(_box(m, "hdelta"), _box(m, "hgamma"), _box(m, "heii_4686"))
