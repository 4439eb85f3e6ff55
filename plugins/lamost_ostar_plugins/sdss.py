"""Read SDSS / BOSS ``spec-PLATE-MJD-FIBER.fits`` spectra as :class:`lamost_ostar.io.Spectrum` records.

A second survey's reader for the pipeline: the records it returns go through
:mod:`lamost_ostar.preprocess`, :mod:`lamost_ostar.lines` and
:class:`lamost_ostar.stage.OStarStage` exactly like LAMOST ones (a stage's
``process`` accepts Spectrum records as well as paths).

Reader protocol (entry-point group ``lamost_ostar.readers``)
------------------------------------------------------------
A reader is a class with the attributes ``name`` (the entry-point name,
``"sdss"``) and ``version`` (``"sdss-1"``; changes when the records it returns
would change), and a method ``read(path) -> Spectrum`` that raises only
:class:`lamost_ostar.io.ReadError` subclasses, with a one-line message and a
reason code, for a bad file -- never another exception.

File layout (SDSS DR8+ ``spec`` and ``spec-lite`` files, SDSS-I/II, BOSS, eBOSS)
---------------------------------------------------------------------------------
HDU 0
    Header only: ``PLUG_RA``/``PLUG_DEC``, ``MJD``, ``PLATEID``, ``FIBERID``,
    ``SPEC_ID``, ``VERS2D``/``VERSCOMB``, ``RUN2D``, ``VACUUM = T``.
HDU 1 ``COADD``
    Binary table, one row per pixel: ``flux`` (1e-17 erg/s/cm^2/A), ``loglam``
    (log10 vacuum wavelength, log-linear with a 1e-4 dex step, LAMOST's own
    step), ``ivar``, ``and_mask``, ``or_mask`` (``wdisp``, ``sky``, ``model``
    are not used).
HDU 2 ``SPECOBJ`` (SDSS-I/II) or ``SPALL`` (BOSS/eBOSS/SDSS-V)
    One row of pipeline results: ``PLUG_RA``, ``PLUG_DEC``, ``CLASS``,
    ``SUBCLASS``, ``SN_MEDIAN`` (median S/N per pixel in u, g, r, i, z),
    ``SPECOBJID``, ``PLATE``, ``MJD``, ``FIBERID``, ``SPECTROGRAPHID``,
    ``RUN2D``, ``RUN1D``.  When absent, the primary header's keywords are used.
HDU 3+
    ``SPZLINE`` and the individual exposures (full ``spec`` files): not read.

Fields of the record
--------------------
``flux``/``ivar`` (float32; the absolute flux scale does not matter, the
pipeline standardises every spectrum), ``wavelength = 10**loglam`` (float64,
vacuum), ``andmask``/``ormask`` (int32), ``layout = "sdss"``; ``coeff0`` =
``loglam[0]`` and ``coeff1`` = the step (1e-4 dex) when the stored ``loglam``
is that log-linear grid to float32 precision (then
:func:`lamost_ostar.preprocess.resample` takes its fast log-linear path; an
SDSS pixel grid is aligned with the common grid, both being multiples of 1e-4
dex), else None.  ``obsid`` = ``SPECOBJID`` (None if absent or not a 63-bit
integer), ``designation`` = ``"SDSS Jhhmmss.ss+ddmmss.s"`` from the plug
position (truncated, the IAU convention LAMOST also follows), ``ra``/``dec`` =
``PLUG_RA``/``PLUG_DEC``, ``lmjd`` = ``MJD`` (SDSS's MJD of the plate's
observation), ``planid`` = the plate number (4 digits), ``spid`` =
``SPECTROGRAPHID``, ``fiberid`` = ``FIBERID``, ``pipeline_class`` /
``pipeline_subclass`` = SDSS ``CLASS`` (``STAR``, ``GALAXY``, ``QSO``) /
``SUBCLASS``, ``snr`` = ``SN_MEDIAN`` per band, ``data_release`` = ``"SDSS"``
followed by the release when the file names one (a ``RELEASE`` column or
keyword; SDSS-I/II and BOSS spec files do not) or the reader's
``data_release`` argument, ``pipeline_version`` = ``"idlspec2d <VERS2D> run2d
<RUN2D>"``.

SDSS covers 3800-9200 A (SDSS-I/II) or 3600-10400 A (BOSS); the common grid is
3690-9100 A, so :func:`lamost_ostar.preprocess.prepare` masks the grid pixels
outside the coverage (for SDSS-I/II the blue end 3690-3800 A, ~120 pixels,
which :class:`lamost_ostar.stage.OStarStage` flags ``edge``).

Quality rules (the same as :mod:`lamost_ostar.io`)
--------------------------------------------------
Negative ``ivar`` -> 0; a pixel with non-finite flux or ivar is masked (flux 0,
ivar 0, counted in ``n_nonfinite``), more than ``max_nonfinite_fraction`` of
them -> :class:`~lamost_ostar.io.NonFiniteError`; no pixel with ivar > 0 ->
:class:`~lamost_ostar.io.NoUsablePixelsError`; fewer than
:data:`lamost_ostar.io.MIN_PIXELS` pixels, no ``COADD`` table with ``loglam``
(a LAMOST file, for example), non-increasing or non-optical ``loglam`` ->
:class:`~lamost_ostar.io.LayoutError`; an empty file ->
:class:`~lamost_ostar.io.EmptyFileError`; not FITS (or gzip of something else)
-> :class:`~lamost_ostar.io.NotFitsError`; truncated or corrupt FITS or gzip
-> :class:`~lamost_ostar.io.CorruptFileError`; a missing or unreadable file ->
the base :class:`~lamost_ostar.io.ReadError` (reason ``"unreadable"``).

Examples
--------
>>> from lamost_ostar_plugins.sdss import SDSSReader
>>> spec = SDSSReader().read("spec-0945-52652-0470.fits")          # doctest: +SKIP
>>> spec.designation, spec.pipeline_class, spec.snr["g"]            # doctest: +SKIP
"""
from __future__ import annotations

import math
import os
import zlib
from typing import Any

import numpy as np

from lamost_ostar.io import (MAX_FILE_BYTES, MAX_NONFINITE_FRACTION, MIN_PIXELS, CorruptFileError,
                             EmptyFileError, LayoutError, NoUsablePixelsError, NonFiniteError,
                             NotFitsError, ReadError, Spectrum, read_file_bytes)

__all__ = ["SDSSReader", "LAYOUT", "META_HDUS", "LOGLAM_STEP", "sdss_designation"]

#: ``Spectrum.layout`` of the records this reader returns.
LAYOUT = "sdss"
#: Names of the one-row pipeline-results HDU, in the order they are looked for.
META_HDUS = ("SPALL", "SPECOBJ")
#: The SDSS log10 wavelength step (LAMOST's too).
LOGLAM_STEP = 1e-4
#: Largest ``|loglam - (coeff0 + coeff1 * i)|`` [dex] for the stored loglam to count as the
#: log-linear grid: loglam is float32 (a ulp is 2.4e-7 dex at 3.6-4.0, 4.8e-7 above 4).
_LOGLAM_TOL = 1e-6
_BANDS = ("u", "g", "r", "i", "z")
_GZIP_MAGIC = b"\x1f\x8b"
_FITS_MAGIC = b"SIMPLE  ="
_COADD_NEEDED = ("FLUX", "LOGLAM", "IVAR")
_COADD_MASKS = ("AND_MASK", "OR_MASK")
_META_WANTED = ("PLUG_RA", "PLUG_DEC", "RACAT", "DECCAT", "CLASS", "SUBCLASS", "SN_MEDIAN",
                "SPECOBJID", "PLATE", "MJD", "FIBERID", "SPECTROGRAPHID", "RUN2D", "RUN1D",
                "RELEASE")


def sdss_designation(ra: float, dec: float) -> str:
    """IAU-style SDSS designation ``"SDSS Jhhmmss.ss+ddmmss.s"`` (truncated, not rounded)."""
    h = (float(ra) % 360.0) / 15.0
    hh = int(h)
    mm = int((h - hh) * 60.0)
    ss = math.floor(((h - hh) * 3600.0 - mm * 60.0) * 100.0 + 1e-6) / 100.0
    sign = "-" if dec < 0 else "+"
    ad = abs(float(dec))
    dd = int(ad)
    dm = int((ad - dd) * 60.0)
    ds = math.floor(((ad - dd) * 3600.0 - dm * 60.0) * 10.0 + 1e-6) / 10.0
    return f"SDSS J{hh:02d}{mm:02d}{ss:05.2f}{sign}{dd:02d}{dm:02d}{ds:04.1f}"


# --------------------------------------------------------------------------- helpers
def _scalar(v: Any) -> Any:
    """A plain Python value of a header value or a table cell (strings stripped, '' -> None)."""
    if v is None:
        return None
    if isinstance(v, np.ndarray):
        if v.size != 1:
            return v
        v = v.reshape(-1)[0]
    if isinstance(v, bytes):
        v = v.decode("ascii", "replace")
    if isinstance(v, (str, np.str_)):
        s = str(v).strip()
        return s or None
    if isinstance(v, np.generic):
        return v.item()
    return v


def _as_float(v: Any) -> float | None:
    v = _scalar(v)
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _as_int(v: Any) -> int | None:
    v = _scalar(v)
    if v is None or isinstance(v, bool):
        return None
    try:
        i = int(str(v).strip()) if isinstance(v, str) else int(v)
    except (TypeError, ValueError, OverflowError):
        f = _as_float(v)
        if f is None or f != int(f):
            return None
        i = int(f)
    return i


def _as_str(v: Any) -> str | None:
    v = _scalar(v)
    if v is None or isinstance(v, np.ndarray):
        return None
    s = str(v).strip()
    return s or None


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return _one_line(text.splitlines()[0]) if text else type(exc).__name__


def _check_bytes(path: str) -> bool:
    """Typed errors for files that are not readable FITS; returns whether the file is gzip.

    The file (~0.2-2 MB) is read once: empty, not FITS, corrupt or truncated
    gzip and plain FITS files whose length is not a whole number of 2880-byte
    blocks are told apart here, before cfitsio opens it.
    """
    data = read_file_bytes(path, MAX_FILE_BYTES, "an SDSS spectrum")
    gz = data[:2] == _GZIP_MAGIC
    if gz:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            data = d.decompress(data, MAX_FILE_BYTES)
        except zlib.error as exc:
            raise CorruptFileError(path, f"corrupt gzip stream ({exc})", "corrupt") from None
        if d.unconsumed_tail:
            raise LayoutError(path, f"gzip content larger than {MAX_FILE_BYTES} bytes; "
                              "not an SDSS spectrum")
        if not d.eof:
            raise CorruptFileError(path, f"truncated gzip stream ({len(data)} bytes "
                                   "decompressed before it ends)", "truncated")
        if not data:
            raise EmptyFileError(path, "gzip file decompresses to 0 bytes")
    if data[:9] != _FITS_MAGIC:
        raise NotFitsError(path, ("gzip content is not" if gz else "not") +
                           " a FITS file (no SIMPLE card at the start)")
    if len(data) % 2880:
        raise CorruptFileError(path, f"truncated FITS file ({len(data)} bytes, not a multiple "
                               "of 2880)", "truncated")
    return gz


def _loglinear(loglam: np.ndarray) -> tuple[float, float] | None:
    """``(coeff0, coeff1)`` if ``loglam`` is ``coeff0 + coeff1 * i`` to float32 precision.

    SDSS grids are multiples of 1e-4 dex: a start within the tolerance of one
    is snapped to it (so that the grid lines up with the common grid exactly).
    """
    n = loglam.size
    c0 = float(loglam[0])
    c1 = (float(loglam[-1]) - c0) / (n - 1)
    if abs(c1 - LOGLAM_STEP) <= _LOGLAM_TOL / n:
        c1 = LOGLAM_STEP
        snapped = round(c0 / LOGLAM_STEP) * LOGLAM_STEP
        if abs(snapped - c0) <= _LOGLAM_TOL:
            c0 = float(np.round(snapped, 6))
    grid = c0 + c1 * np.arange(n, dtype=np.float64)
    if np.max(np.abs(loglam - grid)) <= _LOGLAM_TOL:
        return c0, c1
    return None


# --------------------------------------------------------------------------- the reader
class SDSSReader:
    """Reader of SDSS/BOSS ``spec-PLATE-MJD-FIBER.fits`` files (entry point ``sdss``).

    Parameters
    ----------
    max_nonfinite_fraction : float
        Largest fraction of pixels with non-finite flux/ivar that is masked
        rather than refused (as :func:`lamost_ostar.io.read_spectrum`).
    data_release : str, optional
        ``Spectrum.data_release`` of every record (e.g. ``"SDSS DR18"``); by
        default ``"SDSS"`` plus the release the file names, if any.

    Attributes
    ----------
    name : str
        ``"sdss"``, the entry-point name in the group ``lamost_ostar.readers``.
    version : str
        ``"sdss-1"``.
    """

    name = "sdss"
    version = "sdss-1"

    def __init__(self, *, max_nonfinite_fraction: float = MAX_NONFINITE_FRACTION,
                 data_release: str | None = None) -> None:
        self.max_nonfinite_fraction = float(max_nonfinite_fraction)
        self.data_release = data_release

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r})"

    def read(self, path: str | os.PathLike) -> Spectrum:
        """Read one SDSS spectrum.

        Parameters
        ----------
        path : str or os.PathLike
            An SDSS ``spec``/``spec-lite`` FITS file, plain or gzip-compressed.

        Returns
        -------
        lamost_ostar.io.Spectrum
            ``layout = "sdss"``; see the module docstring for the fields.

        Raises
        ------
        lamost_ostar.io.ReadError
            One of its subclasses for a bad file (never another exception).
        """
        try:
            path = os.fspath(path)
        except TypeError:
            raise ReadError(str(path), f"not a file path ({type(path).__name__})",
                            "unreadable") from None
        try:
            gz = _check_bytes(path)
            return self._read(path, gz)
        except ReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - cfitsio or numpy failure on a bad file
            msg = _first_line(exc)
            low = msg.lower()
            if any(k in low for k in ("end of file", "past end", "truncat", "end keyword")):
                raise CorruptFileError(path, f"truncated FITS file: {msg}", "truncated") from None
            raise CorruptFileError(path, f"corrupt FITS file: {msg}", "corrupt") from None

    # -- internals
    def _read(self, path: str, gz: bool) -> Spectrum:
        import fitsio

        with fitsio.FITS(path) as fits:
            names = [h.get_extname().strip().upper() for h in fits]
            if any(n.startswith("COADD_") for n in names):
                raise LayoutError(path, "not an SDSS spec file: COADD_B/COADD_R tables "
                                  "(a LAMOST medium-resolution file)")
            if "COADD" not in names:
                raise LayoutError(path, "not an SDSS spec file: no COADD table (HDUs "
                                  f"{', '.join(n or '(primary)' for n in names)}); a LAMOST "
                                  "DR1-DR8 image file is read by the LAMOST reader")
            coadd = fits[names.index("COADD")]
            if coadd.get_exttype() != "BINARY_TBL":
                raise LayoutError(path, "not an SDSS spec file: COADD is not a binary table")
            cols = {c.upper(): c for c in coadd.get_colnames()}
            missing = [c.lower() for c in _COADD_NEEDED if c not in cols]
            if missing:
                hint = (" (a LAMOST DR9+ file: FLUX/WAVELENGTH columns; use the LAMOST reader)"
                        if "WAVELENGTH" in cols else "")
                raise LayoutError(path, "not an SDSS spec file: COADD table lacks column(s) "
                                  f"{', '.join(missing)}{hint}")
            n = coadd.get_nrows()
            if n < MIN_PIXELS:
                raise LayoutError(path, f"short spectrum: {n} pixels (< {MIN_PIXELS})")
            wanted = [cols[c] for c in _COADD_NEEDED + _COADD_MASKS if c in cols]
            data = coadd.read(columns=wanted)
            header = fits[0].read_header()
            meta = {}
            for hdu_name in META_HDUS:
                if hdu_name in names:
                    hdu = fits[names.index(hdu_name)]
                    if hdu.get_exttype() == "BINARY_TBL" and hdu.get_nrows() >= 1:
                        mcols = {c.upper(): c for c in hdu.get_colnames()}
                        take = [mcols[c] for c in _META_WANTED if c in mcols]
                        if take:
                            row = hdu.read(columns=take, rows=[0])
                            meta = {c.upper(): row[c][0] for c in take}
                    break

        def col(name: str) -> np.ndarray:
            return np.ravel(data[cols[name]])

        loglam = col("LOGLAM").astype(np.float64)
        if not np.all(np.isfinite(loglam)):
            raise NonFiniteError(path, "non-finite loglam values")
        if not (3.3 < loglam[0] < loglam[-1] < 4.2) or np.any(np.diff(loglam) <= 0):
            raise LayoutError(path, f"loglam {loglam[0]:.4f}..{loglam[-1]:.4f} is not an increasing "
                              "optical log10 wavelength [A]")
        grid = _loglinear(loglam)
        if grid is not None:
            c0, c1 = grid
            wavelength = 10.0 ** (c0 + c1 * np.arange(n, dtype=np.float64))
        else:
            c0 = c1 = None
            wavelength = 10.0 ** loglam

        flux = np.array(col("FLUX"), dtype=np.float32)   # native byte order copies
        ivar = np.array(col("IVAR"), dtype=np.float32)
        bad = ~(np.isfinite(flux) & np.isfinite(ivar))
        n_bad = int(np.count_nonzero(bad))
        if n_bad:
            if n_bad > self.max_nonfinite_fraction * n:
                raise NonFiniteError(path, f"{n_bad} of {n} pixels have non-finite flux or ivar "
                                     f"(> {self.max_nonfinite_fraction:.0%})")
            flux[bad] = 0.0
            ivar[bad] = 0.0
        np.maximum(ivar, 0.0, out=ivar)
        if not np.any(ivar > 0):
            raise NoUsablePixelsError(path, f"no usable pixels (ivar <= 0 in all {n})")

        def mask(name: str) -> np.ndarray:
            if name not in cols:
                return np.zeros(n, np.int32)
            return col(name).astype(np.int32)

        def pick(*keys: str) -> Any:
            """First present value among table columns (meta) then header keywords."""
            for k in keys:
                v = _scalar(meta.get(k))
                if v is not None:
                    return v
            for k in keys:
                v = _scalar(header.get(k)) if k in header else None
                if v is not None:
                    return v
            return None

        ra = _as_float(pick("PLUG_RA", "RACAT"))
        dec = _as_float(pick("PLUG_DEC", "DECCAT"))
        if ra is not None and dec is not None and not (-90.0 <= dec <= 90.0):
            ra = dec = None
        specobjid = _as_int(pick("SPECOBJID", "SPEC_ID"))
        if specobjid is not None and not 0 < specobjid < 2 ** 63:
            specobjid = None
        plate = _as_int(pick("PLATE", "PLATEID"))
        snr: dict[str, float] = {}
        sn = meta.get("SN_MEDIAN")
        if sn is not None:
            sn = np.ravel(np.asarray(sn, dtype=np.float64))
            if sn.size == len(_BANDS):
                snr = {b: float(v) for b, v in zip(_BANDS, sn) if np.isfinite(v)}
        release = self.data_release
        if release is None:
            rel = _as_str(pick("RELEASE"))
            release = "SDSS" if rel is None else (rel if rel.upper().startswith("SDSS")
                                                  else f"SDSS {rel.upper()}")
        vers = _as_str(pick("VERS2D", "VERSCOMB"))
        run2d, run1d = _as_str(pick("RUN2D")), _as_str(pick("RUN1D"))
        parts = ([f"idlspec2d {vers}"] if vers else []) + ([f"run2d {run2d}"] if run2d else []) \
            + ([f"run1d {run1d}"] if run1d else [])
        return Spectrum(
            flux=flux, ivar=ivar, wavelength=wavelength, andmask=mask("AND_MASK"),
            ormask=mask("OR_MASK"), path=path, layout=LAYOUT,
            obsid=specobjid,
            designation=None if ra is None or dec is None else sdss_designation(ra, dec),
            ra=ra, dec=dec, lmjd=_as_int(pick("MJD")),
            planid=None if plate is None else f"{plate:04d}",
            spid=_as_int(pick("SPECTROGRAPHID")), fiberid=_as_int(pick("FIBERID")),
            pipeline_class=_as_str(pick("CLASS")), pipeline_subclass=_as_str(pick("SUBCLASS")),
            snr=snr, data_release=release,
            pipeline_version=" ".join(parts) or None,
            coeff0=c0, coeff1=c1, n_nonfinite=n_bad,
        )
