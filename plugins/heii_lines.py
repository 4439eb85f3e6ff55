"""He II / He I / H-beta equivalent widths: an independent O-star vetting stage.

O stars are the only normal stars hot enough to show He II absorption:
He II 4686 A is strong in O stars, fades through O9.5-B0 and is absent in
cooler stars, while He I 4471 A peaks in early B stars.  This stage measures
the equivalent widths (EW, positive for absorption, in Angstrom) of

* He II 4686 (vacuum 4687.02 A),
* He I 4471 (vacuum 4472.73 A),
* H-beta (vacuum 4862.68 A)

on the common log-lambda grid of :mod:`lamost_ostar.preprocess`, with a linear
pseudo-continuum through the median flux of two side bands, vectorised over the
batch.  It needs no model, so it vets the CNN's O candidates independently:
``heii_detected`` means He II absorption with EW above ``HEII_MIN_EW`` and
``HEII_MIN_SIGMA`` standard deviations (Of emission is not caught), and ``o_star_like`` adds a hot (blue) continuum, which removes
M dwarfs whose TiO bands mimic He II absorption.

It follows the stage protocol of :mod:`lamost_ostar.stage` (``process(items)``
returns one result per item, in input order, never raising for a bad file) and
is registered as the entry point ``heii_lines`` in the group
``lamost_ostar.stages``::

    from lamost_ostar.stage import load_stage
    stage = load_stage("heii_lines")
    results = stage.process(paths)
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lamost_ostar.io import Spectrum
from lamost_ostar.preprocess import grid_wavelength, resample
from lamost_ostar.stage import SpectrumResult, read_items, spectrum_metadata

__all__ = ["LINES", "HEII_MIN_EW", "HEII_MIN_SIGMA", "BLUE_BAND", "RED_BAND",
           "MIN_BLUE_RED_RATIO", "LineResult", "HeIILineStage",
           "equivalent_widths"]

#: name -> (line window, blue continuum band, red continuum band), vacuum Angstrom.
LINES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "hei_4471": ((4462.0, 4484.0), (4440.0, 4455.0), (4492.0, 4508.0)),
    "heii_4686": ((4676.0, 4698.0), (4650.0, 4668.0), (4702.0, 4720.0)),
    "hbeta": ((4832.0, 4894.0), (4780.0, 4810.0), (4910.0, 4940.0)),
}
#: Minimum He II 4686 absorption EW [A] for ``heii_detected``.  Emission (Of
#: supergiants such as HD 57060, O7Ia: EW about -1.7 A) is not counted: with the
#: median pseudo-continuum, metal lines in the side bands of F-G stars give
#: apparent "emission" of -0.3 to -0.8 A.
HEII_MIN_EW = 0.3
#: Minimum He II 4686 EW significance for ``heii_detected``.
HEII_MIN_SIGMA = 3.0
#: Blue and red continuum bands [A] of the flux ratio ``blue_red_ratio``.
BLUE_BAND = (4000.0, 4200.0)
RED_BAND = (6000.0, 6200.0)
#: Minimum ``blue_red_ratio`` (F_lambda) for ``o_star_like``: an unreddened O star
#: has ~5, one with E(B-V) = 1 still ~1.6; M dwarfs, whose TiO bands mimic He II
#: absorption, are far below 1.
MIN_BLUE_RED_RATIO = 1.0
#: Version string of this stage's measurements (stored as ``model_version``).
VERSION = "heii_lines-1"


@dataclass
class LineResult(SpectrumResult):
    """Line measurements for one input (same common fields as StageResult).

    EWs are in Angstrom, positive for absorption; ``*_err`` are 1-sigma errors
    from the inverse variance.  ``heii_hei_ratio`` is EW(He II 4686) /
    EW(He I 4471) (None when He I is not in absorption).  ``blue_red_ratio`` is
    the median F_lambda in :data:`BLUE_BAND` over that in :data:`RED_BAND`;
    ``o_star_like`` = ``heii_detected`` and ``blue_red_ratio >=``
    :data:`MIN_BLUE_RED_RATIO` (a hot continuum).
    """

    ew_hei_4471: float | None = None
    ew_hei_4471_err: float | None = None
    ew_heii_4686: float | None = None
    ew_heii_4686_err: float | None = None
    ew_hbeta: float | None = None
    ew_hbeta_err: float | None = None
    heii_hei_ratio: float | None = None
    heii_detected: bool | None = None
    blue_red_ratio: float | None = None
    o_star_like: bool | None = None
    flags: int = 0
    model_version: str | None = VERSION


def _band_index(wave: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.flatnonzero((wave >= lo) & (wave <= hi))


def equivalent_widths(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray,
                      wave: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Equivalent widths of :data:`LINES` for a batch on a common grid.

    Parameters
    ----------
    flux, ivar : numpy.ndarray
        ``(N, M)`` flux and inverse variance (0 = no information).
    mask : numpy.ndarray
        bool ``(N, M)``, True for interpolated/missing pixels.
    wave : numpy.ndarray
        ``(M,)`` wavelengths [A].

    Returns
    -------
    dict
        line name -> (EW, EW error), each ``(N,)``; NaN where the line window
        or a continuum band has no good pixel.
    """
    flux = np.asarray(flux, dtype=np.float64)
    good = ~np.asarray(mask, dtype=bool) & np.isfinite(flux)
    dlam = np.gradient(wave)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (line, blue, red) in LINES.items():
        il, ib, ir = (_band_index(wave, *band) for band in (line, blue, red))
        cont = []
        for idx in (ib, ir):
            f = np.where(good[:, idx], flux[:, idx], np.nan)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                cont.append(np.nanmedian(f, axis=1) if idx.size else np.full(len(flux), np.nan))
        wb, wr = wave[ib].mean(), wave[ir].mean()
        slope = (cont[1] - cont[0]) / (wr - wb)
        fc = cont[0][:, None] + slope[:, None] * (wave[il][None, :] - wb)
        f = flux[:, il]
        g = good[:, il]
        with np.errstate(all="ignore"):
            depth = np.where(g, 1.0 - f / fc, 0.0)
            ew = np.sum(depth * dlam[il], axis=1)
            var = np.where(g & (ivar[:, il] > 0), 1.0 / ivar[:, il], 0.0)
            err = np.sqrt(np.sum(var * (dlam[il] / fc) ** 2, axis=1))
            # scale up for the masked pixels (their EW contribution is missing)
            frac = g.mean(axis=1)
            ew = np.where(frac > 0, ew / frac, np.nan)
        bad = ~(np.isfinite(ew) & np.isfinite(err) & (cont[0] > 0) & (cont[1] > 0)
                & (frac >= 0.5))
        out[name] = (np.where(bad, np.nan, ew), np.where(bad, np.nan, err))
    return out


def _opt(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


class HeIILineStage:
    """Measure He II 4686, He I 4471 and H-beta equivalent widths.

    The constructor accepts the keyword arguments of
    :class:`lamost_ostar.stage.OStarStage` so that a scan can load either by
    name; ``model_version``, ``models_dir`` and ``device`` are ignored (no model).

    Parameters
    ----------
    batch_size : int
        Spectra read and measured together.
    """

    model_version = VERSION

    def __init__(self, model_version: str | None = None,
                 models_dir: str | os.PathLike | None = None, device: str = "auto",
                 batch_size: int = 256) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.device_name = "cpu"
        self._wave = grid_wavelength()

    def process(self, items: Sequence[str | os.PathLike | Spectrum]) -> list[LineResult]:
        """Measure a batch of files and/or spectra: one result per item, in order."""
        items = list(items)
        out: list[LineResult] = []
        for start in range(0, len(items), self.batch_size):
            out.extend(self._batch(items[start:start + self.batch_size]))
        return out

    def _batch(self, items: list[Any]) -> list[LineResult]:
        results: list[LineResult | None] = [None] * len(items)
        spectra, slots, failed = read_items(items)
        for i, (path, reason, message) in failed.items():
            results[i] = LineResult.failure(path, reason, message)
        if spectra:
            for i, res in zip(slots, self._measure(spectra)):
                results[i] = res
        return results  # type: ignore[return-value]

    def _measure(self, spectra: list[Spectrum]) -> list[LineResult]:
        flux, ivar, mask = resample(spectra)
        ews = equivalent_widths(flux, ivar, mask, self._wave)
        e2, s2 = ews["heii_4686"]
        e1, _ = ews["hei_4471"]
        good = ~mask & np.isfinite(flux)
        bands = []
        for lo, hi in (BLUE_BAND, RED_BAND):
            idx = _band_index(self._wave, lo, hi)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                bands.append(np.nanmedian(np.where(good[:, idx], flux[:, idx], np.nan), axis=1))
        with np.errstate(all="ignore"):
            detected = (e2 > HEII_MIN_EW) & (e2 > HEII_MIN_SIGMA * s2)
            ratio = np.where(e1 > 0, e2 / e1, np.nan)
            blue_red = np.where(bands[1] > 0, bands[0] / bands[1], np.nan)
        hot = np.isfinite(blue_red) & (blue_red >= MIN_BLUE_RED_RATIO)
        out: list[LineResult] = []
        for k, s in enumerate(spectra):
            common = spectrum_metadata(s)
            if not np.isfinite(e2[k]):
                out.append(LineResult(path=s.path, ok=False, error_reason="no_line_coverage",
                                      error_message="He II 4686 window or continuum not usable",
                                      **common))
                continue
            values = {}
            for name in LINES:
                ew, err = ews[name]
                values[f"ew_{name}"] = _opt(ew[k])
                values[f"ew_{name}_err"] = _opt(err[k])
            out.append(LineResult(path=s.path, ok=True, **common, **values,
                                  heii_hei_ratio=_opt(ratio[k]),
                                  heii_detected=bool(detected[k]),
                                  blue_red_ratio=_opt(blue_red[k]),
                                  o_star_like=bool(detected[k] and hot[k])))
        return out
