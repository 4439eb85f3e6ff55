"""He II / He I / Balmer line strengths: an independent O-star vetting stage.

O stars are the only normal stars hot enough to show He II absorption
(4200, 4541, 4686, 5411 A), with He I (4471, 4922, ...) weak or comparable.
This stage runs :func:`lamost_ostar.lines.measure_lines` on the common grid of
:mod:`lamost_ostar.preprocess` and stores, for every spectrum, the equivalent
widths (box EW with a local linear continuum from two side bands, positive for
absorption, Angstrom) of all lines of :data:`lamost_ostar.lines.LINES` with
their 1-sigma errors, and the combined He II evidence:

* ``heii_sigma``: significance of the weighted mean He II EW (matched filter,
  N(0, 1) on a spectrum without He II),
* ``hei_sigma``, ``log_wprime`` (Conti & Alschuler's log EW(4471)/EW(4541)),
* ``heii_detected``: He II detected in a hot star, the rule of
  :mod:`lamost_ostar.lines` (``heii_sigma >= 4``, lines consistent, none
  contradicting, no cool-star metal lines),
* ``o_star_like``: ``heii_detected`` and a hot (blue) continuum.

It needs no model, so it vets the CNN's O candidates independently.  Version 1
(one line, median side-band continuum) flagged He II in 14 % of mock M stars;
version 2 flags none of 4 000 mock M stars nor any real LAMOST spectrum
(``reports/lines/validation.md``).

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

from lamost_ostar.io import DEFAULT_ENGINE, Spectrum
from lamost_ostar.lines import LINE_NAMES, measure_lines
from lamost_ostar.preprocess import PreparedBatch, grid_wavelength, resample
from lamost_ostar.stage import (SpectrumResult, outputs_from_dataclass, quality_flags, read_items,
                                spectrum_metadata)

__all__ = ["BLUE_BAND", "RED_BAND", "MIN_BLUE_RED_RATIO", "VERSION", "LineResult", "OUTPUTS",
           "HeIILineStage", "equivalent_widths"]

#: Blue and red continuum bands [A] of the flux ratio ``blue_red_ratio``.
BLUE_BAND = (4000.0, 4200.0)
RED_BAND = (6000.0, 6200.0)
#: Minimum ``blue_red_ratio`` (F_lambda) for ``o_star_like``: an unreddened O star
#: has ~5, one with E(B-V) = 1 still ~1.6; M dwarfs are far below 1.
MIN_BLUE_RED_RATIO = 1.0
#: Version string of this stage's measurements (stored as ``model_version``).
VERSION = "heii_lines-2"


@dataclass
class LineResult(SpectrumResult):
    """Line measurements for one input (same common fields as StageResult).

    EWs are box equivalent widths in Angstrom, positive for absorption;
    ``*_err`` are their 1-sigma errors (pixel noise and fitted continuum), None
    where the line window or a side band has too few good pixels.  The line
    names are :data:`lamost_ostar.lines.LINE_NAMES`; see
    :data:`lamost_ostar.lines.LINES` for the windows and bands.

    ``heii_ew``, ``heii_ew_err``, ``heii_sigma``, ``hei_ew``, ``hei_ew_err``,
    ``hei_sigma``, ``log_wprime``, ``log_wprime_err``, ``n_heii_lines``,
    ``heii_chi2``, ``heii_consistent``, ``heii_contradicted``,
    ``heii_4686_emission``, ``metal_veto`` and ``heii_detected`` are the
    combined evidence of :class:`lamost_ostar.lines.HeEvidence` (matched-filter
    estimator).  ``heii_hei_ratio`` is EW(He II 4686) / EW(He I 4471) (None
    when He I is not in absorption).  ``blue_red_ratio`` is the median F_lambda
    in :data:`BLUE_BAND` over that in :data:`RED_BAND`; ``o_star_like`` =
    ``heii_detected`` and ``blue_red_ratio >=`` :data:`MIN_BLUE_RED_RATIO`.
    ``flags`` are the quality bits of :func:`lamost_ostar.stage.quality_flags`
    (low S/N, masked, edge, not a star).
    """

    ew_heii_4200: float | None = None
    ew_heii_4200_err: float | None = None
    ew_heii_4541: float | None = None
    ew_heii_4541_err: float | None = None
    ew_heii_4686: float | None = None
    ew_heii_4686_err: float | None = None
    ew_heii_5411: float | None = None
    ew_heii_5411_err: float | None = None
    ew_hei_4026: float | None = None
    ew_hei_4026_err: float | None = None
    ew_hei_4144: float | None = None
    ew_hei_4144_err: float | None = None
    ew_hei_4388: float | None = None
    ew_hei_4388_err: float | None = None
    ew_hei_4471: float | None = None
    ew_hei_4471_err: float | None = None
    ew_hei_4922: float | None = None
    ew_hei_4922_err: float | None = None
    ew_hei_5876: float | None = None
    ew_hei_5876_err: float | None = None
    ew_siiii_4553: float | None = None
    ew_siiii_4553_err: float | None = None
    ew_mgii_4481: float | None = None
    ew_mgii_4481_err: float | None = None
    ew_caii_k: float | None = None
    ew_caii_k_err: float | None = None
    ew_cai_4227: float | None = None
    ew_cai_4227_err: float | None = None
    ew_mgi_b: float | None = None
    ew_mgi_b_err: float | None = None
    ew_hdelta: float | None = None
    ew_hdelta_err: float | None = None
    ew_hgamma: float | None = None
    ew_hgamma_err: float | None = None
    ew_hbeta: float | None = None
    ew_hbeta_err: float | None = None
    heii_ew: float | None = None
    heii_ew_err: float | None = None
    heii_sigma: float | None = None
    hei_ew: float | None = None
    hei_ew_err: float | None = None
    hei_sigma: float | None = None
    log_wprime: float | None = None
    log_wprime_err: float | None = None
    n_heii_lines: int | None = None
    heii_chi2: float | None = None
    heii_consistent: bool | None = None
    heii_contradicted: bool | None = None
    heii_4686_emission: bool | None = None
    metal_veto: bool | None = None
    heii_hei_ratio: float | None = None
    heii_detected: bool | None = None
    blue_red_ratio: float | None = None
    o_star_like: bool | None = None
    flags: int = 0
    model_version: str | None = VERSION


_EW_FIELDS = {f"ew_{n}{s}" for n in LINE_NAMES for s in ("", "_err")} | {
    "heii_ew", "heii_ew_err", "hei_ew", "hei_ew_err"}
#: What this stage writes (its table's columns besides the shared ones).
OUTPUTS = outputs_from_dataclass(
    LineResult, units={n: "Angstrom" for n in _EW_FIELDS},
    descriptions={
        **{f"ew_{n}": f"box EW of {n} (positive for absorption)" for n in LINE_NAMES},
        **{f"ew_{n}_err": f"1-sigma error of ew_{n}" for n in LINE_NAMES},
        "heii_ew": "weighted mean He II EW (matched filter)", "heii_ew_err": "error of heii_ew",
        "heii_sigma": "significance of the weighted mean He II EW (N(0,1) without He II)",
        "hei_ew": "weighted mean He I EW", "hei_ew_err": "error of hei_ew",
        "hei_sigma": "significance of the weighted mean He I EW",
        "log_wprime": "log10 EW(He I 4471) / EW(He II 4541)", "log_wprime_err": "error of log_wprime",
        "n_heii_lines": "He II lines detected at >= 2 sigma", "heii_chi2": "chi2 of the He II lines' EWs",
        "heii_consistent": "He II lines consistent with one another",
        "heii_contradicted": "a He II line contradicts the others",
        "heii_4686_emission": "He II 4686 in emission",
        "metal_veto": "a cool-star metal line is too strong for an O star",
        "heii_hei_ratio": "EW(He II 4686) / EW(He I 4471)",
        "heii_detected": "He II detected (lines module rule)",
        "blue_red_ratio": "median F_lambda 4000-4200 A over 6000-6200 A",
        "o_star_like": "heii_detected and a hot continuum",
        "flags": "quality bit flags (stage.FLAG_*)"},
    index=("heii_sigma",), summary=("heii_detected", "o_star_like"))

#: LineResult fields filled from :meth:`lamost_ostar.lines.LineMeasurements.row`.
_ROW_FIELDS = tuple(f"ew_{n}{s}" for n in LINE_NAMES for s in ("", "_err")) + (
    "heii_ew", "heii_ew_err", "heii_sigma", "hei_ew", "hei_ew_err", "hei_sigma",
    "log_wprime", "log_wprime_err", "n_heii_lines", "heii_chi2", "heii_consistent",
    "heii_contradicted", "heii_4686_emission", "metal_veto", "heii_detected")


def equivalent_widths(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray,
                      wave: np.ndarray | None = None
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Box EWs of every line of :data:`lamost_ostar.lines.LINES` for a batch.

    A thin wrapper of :func:`lamost_ostar.lines.measure_lines` kept from
    version 1 of this plugin.

    Parameters
    ----------
    flux, ivar : numpy.ndarray
        ``(N, M)`` flux and inverse variance (0 = no information).
    mask : numpy.ndarray
        bool ``(N, M)``, True for interpolated/missing pixels.
    wave : numpy.ndarray, optional
        ``(M,)`` vacuum wavelengths [A] (default the common grid).

    Returns
    -------
    dict
        line name -> (EW, EW error), each ``(N,)``; NaN where not measurable.
    """
    m = measure_lines(flux, ivar, mask, wave=wave)
    return {n: (m.ew[:, j], m.ew_err[:, j]) for j, n in enumerate(m.names)}


def _opt(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def _band_index(wave: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.flatnonzero((wave >= lo) & (wave <= hi))


class HeIILineStage:
    """Measure He II, He I, Balmer and metal-line EWs and the He II evidence.

    The constructor accepts the keyword arguments of
    :class:`lamost_ostar.stage.OStarStage` so that a scan can load either by
    name; ``model_version``, ``models_dir`` and ``device`` are ignored (no model).

    Parameters
    ----------
    batch_size : int
        Spectra read and measured together.
    read_engine : str
        Reader engine of :func:`lamost_ostar.io.read_spectra`.
    """

    name = "heii_lines"
    version = VERSION
    model_version = VERSION
    outputs = OUTPUTS

    def __init__(self, model_version: str | None = None,
                 models_dir: str | os.PathLike | None = None, device: str = "auto",
                 batch_size: int = 256, read_engine: str = DEFAULT_ENGINE) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.read_engine = read_engine
        self.device_name = "cpu"
        self._wave = grid_wavelength()

    def process(self, items: Sequence[str | os.PathLike | Spectrum]) -> list[LineResult]:
        """Measure a batch of files and/or spectra: one result per item, in order."""
        items = list(items)
        out: list[LineResult] = []
        for start in range(0, len(items), self.batch_size):
            out.extend(self._batch(items[start:start + self.batch_size]))
        return out

    def process_prepared(self, spectra: Sequence[Spectrum], prep: PreparedBatch) -> list[LineResult]:
        """Measure spectra already prepared by the caller (a scan's shared preprocessing).

        ``prep`` is ``preprocess.prepare(spectra)`` (rows in the order of
        ``spectra``); the lines are measured on its resampled flux and inverse
        variance, the same arrays :meth:`process` resamples itself.
        """
        spectra = list(spectra)
        if len(prep) != len(spectra):
            raise ValueError(f"{len(spectra)} spectra but a prepared batch of {len(prep)}")
        if prep.ivar is None:
            raise ValueError("the prepared batch has no inverse variance")
        try:
            return self._measure(spectra, (prep.flux, prep.ivar, prep.mask))
        except Exception:  # noqa: BLE001 - fall back to the isolating path
            return self._measure_safely(spectra)

    def _batch(self, items: list[Any]) -> list[LineResult]:
        results: list[LineResult | None] = [None] * len(items)
        spectra, slots, failed = read_items(items, self.read_engine)
        for i, (path, reason, message) in failed.items():
            results[i] = LineResult.failure(path, reason, message)
        if spectra:
            for i, res in zip(slots, self._measure_safely(spectra)):
                results[i] = res
        return results  # type: ignore[return-value]

    def _measure_safely(self, spectra: list[Spectrum]) -> list[LineResult]:
        try:
            return self._measure(spectra)
        except Exception as exc:  # noqa: BLE001 - isolate the spectrum that fails
            if len(spectra) == 1:
                return [LineResult.failure(spectra[0].path, "measure_failed",
                                           f"{type(exc).__name__}: {exc}",
                                           spectrum=spectra[0])]
            return [r for s in spectra for r in self._measure_safely([s])]

    def _measure(self, spectra: list[Spectrum],
                 arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> list[LineResult]:
        flux, ivar, mask = resample(spectra) if arrays is None else arrays
        m = measure_lines(flux, ivar, mask)
        good = ~mask & np.isfinite(flux)
        bands = []
        for lo, hi in (BLUE_BAND, RED_BAND):
            idx = _band_index(self._wave, lo, hi)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                bands.append(np.nanmedian(np.where(good[:, idx], flux[:, idx], np.nan), axis=1))
        e2, _ = m.ew_of("heii_4686")
        e1, _ = m.ew_of("hei_4471")
        with np.errstate(all="ignore"):
            ratio = np.where(e1 > 0, e2 / e1, np.nan)
            blue_red = np.where(bands[1] > 0, bands[0] / bands[1], np.nan)
        hot = np.isfinite(blue_red) & (blue_red >= MIN_BLUE_RED_RATIO)
        snr_g = np.array([np.nan if (s.snr or {}).get("g") is None else s.snr["g"]
                          for s in spectra], dtype=np.float64)
        good_fraction = 1.0 - mask.mean(axis=1)
        flags = quality_flags(mask, good_fraction, snr_g, [s.pipeline_class for s in spectra])
        out: list[LineResult] = []
        for k, s in enumerate(spectra):
            common = spectrum_metadata(s)
            if not np.isfinite(m.heii_sigma[k]):
                out.append(LineResult(path=s.path, ok=False, error_reason="no_line_coverage",
                                      error_message="no He II line window with its continuum "
                                                    "bands is usable", **common))
                continue
            row = m.row(k)
            values = {key: row[key] for key in _ROW_FIELDS}
            detected = bool(values["heii_detected"])
            out.append(LineResult(path=s.path, ok=True, **common, **values,
                                  heii_hei_ratio=_opt(ratio[k]),
                                  blue_red_ratio=_opt(blue_red[k]),
                                  o_star_like=bool(detected and hot[k]),
                                  flags=int(flags[k])))
        return out
