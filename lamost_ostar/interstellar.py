"""Interstellar absorption lines and bands for mock spectra.

Reddening a template (``mock.extinction_odonnell``) changes its continuum, but a
real star seen through E(B-V) = 1-2 of dust also shows the lines of the gas
and the diffuse interstellar bands (DIBs) on that sight line: the broad
4428 A band next to He I 4471 and H-gamma, 5780/5797/6284 A, interstellar
Na I D and Ca II H & K, K I 7699.  Their strength grows with the column, so a
library O star re-reddened to E(B-V) = 2 without them is a star no survey
observes.  :func:`transmission` adds them, on top of whatever a template
already shows from its own sight line.

The table (:data:`FEATURES`) is a typical Galactic sight line, rounded: DIB
equivalent width per magnitude of E(B-V) and width from the DIB literature
(e.g. Herbig 1995, ARA&A 33, 19; Friedman et al. 2011, ApJ 727, 33; the broad
4428 A band ~20 A wide and ~2 A per magnitude), the atomic lines saturated
(equivalent width ~ sqrt(E(B-V)), several clouds on a long sight line).  Real
sight lines scatter by tens of per cent around such relations; each spectrum
draws one common factor for the bands and one for the atomic lines
(log-normal, :data:`SCATTER`), and an interstellar radial velocity.  These are
augmentation physics for tests of robustness, not a fit to any sight line.

Profiles are Gaussian in wavelength and added linearly in absorption, so the
profile seen at resolving power R is computed directly (intrinsic and
instrumental widths in quadrature): no convolution is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lamost_ostar.templates import air_to_vacuum

__all__ = ["Feature", "FEATURES", "SCATTER", "equivalent_widths", "transmission"]

_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
_C_KMS = 299792.458


@dataclass(frozen=True)
class Feature:
    """One interstellar feature.

    Attributes
    ----------
    name : str
        Label (air wavelength).
    wave_air : float
        Centre, air wavelength [A].
    fwhm : float
        Intrinsic full width at half maximum [A] (before the instrument).
    ew : float
        Equivalent width [A] at E(B-V) = 1.
    kind : {"dib", "atomic"}
        ``dib``: equivalent width proportional to E(B-V); ``atomic``: to
        ``sqrt(E(B-V))`` (saturated lines, several clouds).
    """

    name: str
    wave_air: float
    fwhm: float
    ew: float
    kind: str = "dib"


#: The features added by :func:`transmission` (typical Galactic sight line, rounded).
FEATURES: tuple[Feature, ...] = (
    Feature("Ca II K", 3933.66, 0.3, 0.35, "atomic"),
    Feature("Ca II H", 3968.47, 0.3, 0.22, "atomic"),
    Feature("DIB 4428", 4428.2, 20.0, 2.0),
    Feature("DIB 4502", 4501.8, 3.0, 0.12),
    Feature("DIB 4727", 4726.8, 3.0, 0.12),
    Feature("DIB 4882", 4882.0, 17.0, 0.5),
    Feature("DIB 5450", 5450.0, 12.0, 0.3),
    Feature("DIB 5488", 5487.7, 5.0, 0.12),
    Feature("DIB 5705", 5705.1, 2.5, 0.12),
    Feature("DIB 5780", 5780.5, 2.1, 0.5),
    Feature("DIB 5797", 5797.1, 0.9, 0.15),
    Feature("Na I D2", 5889.95, 0.3, 0.7, "atomic"),
    Feature("Na I D1", 5895.92, 0.3, 0.6, "atomic"),
    Feature("DIB 6177", 6177.0, 25.0, 0.6),
    Feature("DIB 6196", 6196.0, 0.4, 0.05),
    Feature("DIB 6204", 6203.6, 4.0, 0.2),
    Feature("DIB 6270", 6269.8, 1.2, 0.08),
    Feature("DIB 6284", 6283.8, 4.0, 1.0),
    Feature("DIB 6614", 6613.6, 1.1, 0.22),
    Feature("DIB 7224", 7224.0, 1.2, 0.25),
    Feature("K I 7665", 7664.9, 0.3, 0.15, "atomic"),
    Feature("K I 7699", 7699.0, 0.3, 0.12, "atomic"),
    Feature("DIB 8621", 8620.8, 4.0, 0.2),
)

#: log-normal sigma of the per-spectrum strength factors (bands, atomic lines)
SCATTER: dict[str, float] = {"dib": 0.25, "atomic": 0.3}
#: interstellar radial velocity sigma [km/s]
RV_SIGMA: float = 15.0


def equivalent_widths(ebv: np.ndarray, factor: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Equivalent width [A] of each of :data:`FEATURES` for each E(B-V).

    Parameters
    ----------
    ebv : numpy.ndarray
        ``(N,)`` colour excess of the interstellar matter to add (>= 0).
    factor : dict, optional
        ``{"dib": (N,), "atomic": (N,)}`` multiplicative strength factors
        (default 1).

    Returns
    -------
    numpy.ndarray
        ``(N, len(FEATURES))``.
    """
    e = np.clip(np.asarray(ebv, dtype=np.float64), 0.0, None)
    out = np.empty((e.size, len(FEATURES)))
    for j, ft in enumerate(FEATURES):
        scale = e if ft.kind == "dib" else np.sqrt(e)
        f = 1.0 if factor is None else factor[ft.kind]
        out[:, j] = ft.ew * scale * f
    return out


def transmission(wave: np.ndarray, ebv: np.ndarray, resolution: np.ndarray,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Interstellar transmission of N sight lines on a common wavelength grid.

    Parameters
    ----------
    wave : numpy.ndarray
        ``(P,)`` vacuum wavelength [A], increasing.
    ebv : numpy.ndarray
        ``(N,)`` E(B-V) of the interstellar matter to add.
    resolution : numpy.ndarray
        ``(N,)`` resolving power of each spectrum (the instrument's profile is
        added to each feature's width).
    rng : numpy.random.Generator, optional
        Draws the strength scatter and the interstellar velocity; ``None``:
        the mean relations at rest.

    Returns
    -------
    numpy.ndarray
        float64 ``(N, P)`` in [0, 1], 1 away from the features.
    """
    wave = np.asarray(wave, dtype=np.float64)
    ebv = np.asarray(ebv, dtype=np.float64).ravel()
    res = np.broadcast_to(np.asarray(resolution, dtype=np.float64), ebv.shape)
    n = ebv.size
    if rng is None:
        factor = None
        vel = np.zeros(n)
    else:
        factor = {k: np.exp(rng.normal(0.0, s, n)) for k, s in SCATTER.items()}
        vel = rng.normal(0.0, RV_SIGMA, n)
    ew = equivalent_widths(ebv, factor)
    absorb = np.zeros((n, wave.size))
    for j, ft in enumerate(FEATURES):
        centre0 = float(air_to_vacuum(np.array([ft.wave_air]))[0])
        centre = centre0 * (1.0 + vel / _C_KMS)                              # (N,)
        sigma = np.sqrt((ft.fwhm / _FWHM_PER_SIGMA) ** 2
                        + (centre0 / (_FWHM_PER_SIGMA * np.maximum(res, 1.0))) ** 2)
        half = 6.0 * float(sigma.max()) + 5.0
        lo, hi = np.searchsorted(wave, [centre0 - half, centre0 + half])
        if hi <= lo:
            continue
        w = wave[lo:hi]
        z = (w[None, :] - centre[:, None]) / sigma[:, None]
        depth = ew[:, j] / (sigma * np.sqrt(2.0 * np.pi))
        absorb[:, lo:hi] += depth[:, None] * np.exp(-0.5 * z * z)
    return np.clip(1.0 - absorb, 0.0, 1.0)
