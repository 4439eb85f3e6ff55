"""Read LAMOST low-resolution (LRS) spectra in every released file layout.

Three layouts exist and are told apart **from the file content**, never from the
data-release number:

``"image"`` (DR2-DR8, pipeline v2.7-v2.9)
    One image HDU of 5 rows x N pixels (N varies, 3751-3909 seen): flux, inverse
    variance, vacuum heliocentric wavelength [Angstrom], andmask, ormask.
``"dr1"`` (pipeline v2.6)
    The same 5 x N image, but row 2 holds the continuum-normalised flux instead of
    the wavelength; the wavelength comes from ``COEFF0``/``COEFF1``. The S/N keywords
    are ``SN_U`` ... ``SN_Z`` and there is no ``OBSID``. Recognised because row 2
    does not look like a wavelength array.
``"coadd"`` (DR9 and later)
    Empty primary HDU carrying the metadata header, and a one-row binary table
    ``COADD`` with the columns ``FLUX IVAR WAVELENGTH ANDMASK ORMASK``.

Plain and gzip-compressed files are read alike (gzip is recognised by its magic
bytes, whatever the file name). Medium-resolution files (``COADD_B``/``COADD_R``
tables) are refused with :class:`MediumResolutionError`.

Three engines give identical :class:`Spectrum` records (tested on all real files):

``"fitsio"``
    cfitsio opens (and gunzips) the file and reads the data; the ~20 header keywords
    needed are parsed from the raw header cards, which is several times faster than
    building fitsio's full header object. When cfitsio fails, the file is re-read
    once to classify the error, and decoded from memory if it is in fact readable
    (cfitsio cannot read multi-member gzip files, for example).
``"native"`` (the default, :data:`DEFAULT_ENGINE`; fastest, see ``scripts/bench_io.py``)
    The file is read once, gunzipped with zlib-ng (:data:`GUNZIP_LIBRARY`; stdlib
    :mod:`zlib` where the ``zlib-ng`` package is missing; both about 3x faster than
    cfitsio's own gzip reader) and decoded with numpy views over the bytes. It handles what
    LAMOST files use (unscaled images, fixed-width binary-table columns) and falls
    back to the fitsio engine for any other FITS feature. fitsio cannot open an
    in-memory buffer (its ``mem://`` files are for writing), hence this engine.
``"astropy"``
    The file is read once, gunzipped with :mod:`zlib` if needed and opened from
    memory with :mod:`astropy.io.fits` (slowest; a reference implementation).

Quality rules (applied identically by all engines)
--------------------------------------------------
* Negative inverse variances are set to 0.
* Non-finite pixels: a pixel whose flux or ivar is NaN/inf is masked (flux 0,
  ivar 0) and counted in :attr:`Spectrum.n_nonfinite`. If more than
  ``max_nonfinite_fraction`` (default 0.5) of the pixels are non-finite, or any
  wavelength is non-finite, :class:`NonFiniteError` is raised instead.
* If no pixel is left with ivar > 0, :class:`NoUsablePixelsError` is raised.
* Fewer than :data:`N_ROWS` image rows, a missing ``COADD`` column, or fewer than
  :data:`MIN_PIXELS` pixels raise :class:`LayoutError`.
* Wavelengths: when the stored wavelengths agree with ``10**(COEFF0 + COEFF1*i)``
  (relative 1e-6, i.e. float32 rounding) the exact float64 log-linear grid is
  returned and ``coeff0``/``coeff1`` are set; otherwise the stored values are
  returned (as float64) and ``coeff0``/``coeff1`` are None.

Additions to the design contract (``docs/DESIGN.md``)
----------------------------------------------------
* ``Spectrum.n_nonfinite`` (int, default 0) and the ``Spectrum.npix`` property;
  every metadata field of :class:`Spectrum` has a default (None / empty dict), so
  only the arrays, ``path`` and ``layout`` are required to build one.
* ``engine="native"``; keyword ``max_nonfinite_fraction`` of both read functions.
* Module constants :data:`ENGINES`, :data:`LAYOUTS`, :data:`REASONS`,
  :data:`IMAGE_ROWS`, :data:`COADD_COLUMNS`, :data:`COEFF0`, :data:`COEFF1`,
  :data:`N_ROWS`, :data:`MIN_PIXELS`, :data:`MAX_NONFINITE_FRACTION`,
  :data:`MAX_FILE_BYTES` (files larger than this raise :class:`LayoutError`).
* A missing file or an unreadable path raises the base :class:`ReadError` with
  reason ``"unreadable"``. Header bytes that are not printable ASCII (the FITS
  standard) raise :class:`CorruptFileError` (``"corrupt"``) in every engine.

Examples
--------
>>> from lamost_ostar.io import read_spectrum, read_spectra
>>> spec = read_spectrum("spec-55859-F5902_sp01-001.fits.gz")      # doctest: +SKIP
>>> batch = read_spectra(paths)                                      # doctest: +SKIP
>>> len(batch.spectra), [(e.path, e.reason) for e in batch.errors]   # doctest: +SKIP
"""

from __future__ import annotations

import functools
import io as _stdio
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import numpy as np

try:  # zlib-ng inflates the survey's .fits.gz files ~1.6x faster than stdlib zlib, same bytes
    from zlib_ng import zlib_ng as _inflate
except ImportError:  # pragma: no cover - the package is a dependency; zlib is the fallback
    _inflate = zlib

#: The library that gunzips files for the native and astropy engines (``"zlib-ng"`` or ``"zlib"``).
GUNZIP_LIBRARY = "zlib-ng" if _inflate is not zlib else "zlib"
_INFLATE_ERRORS = (zlib.error, _inflate.error)

__all__ = [
    "Spectrum",
    "ReadError",
    "NotFitsError",
    "CorruptFileError",
    "EmptyFileError",
    "MediumResolutionError",
    "LayoutError",
    "NoUsablePixelsError",
    "NonFiniteError",
    "FileError",
    "BatchRead",
    "read_spectrum",
    "read_spectra",
    "read_file_bytes",
    "ENGINES",
    "DEFAULT_ENGINE",
    "LAYOUTS",
    "REASONS",
    "IMAGE_ROWS",
    "COADD_COLUMNS",
    "COEFF0",
    "COEFF1",
    "N_ROWS",
    "MIN_PIXELS",
    "MAX_NONFINITE_FRACTION",
    "MAX_FILE_BYTES",
    "Reader",
    "LamostReader",
    "READER_GROUP",
    "available_readers",
    "load_reader",
]

#: Engines accepted by :func:`read_spectrum` / :func:`read_spectra`.
ENGINES = ("fitsio", "astropy", "native")
#: The engine every reading function, the reader plugin ``lamost``, the stages and the scan use
#: unless told otherwise: ``native`` (identical records, about twice as fast as cfitsio's gzip
#: open; it hands any FITS feature it does not decode to fitsio).
DEFAULT_ENGINE = "native"
#: Layout names stored in :attr:`Spectrum.layout`.
LAYOUTS = ("image", "dr1", "coadd")
#: Row meaning of the DR2-DR8 5 x N image (DR1 has ``"subcontinuum"`` in row 2).
IMAGE_ROWS = ("flux", "ivar", "wavelength", "andmask", "ormask")
#: Columns of the DR9+ ``COADD`` binary table that the reader needs.
COADD_COLUMNS = ("FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK")
#: LAMOST LRS log10 wavelength of pixel 0 and log10 step (header COEFF0/COEFF1).
COEFF0 = 3.5682
COEFF1 = 1e-4
#: Number of rows of the image layouts.
N_ROWS = 5
#: Fewest pixels accepted for a low-resolution spectrum (real files: 3751-3909).
MIN_PIXELS = 1000
#: Default largest fraction of non-finite pixels that is masked rather than refused.
MAX_NONFINITE_FRACTION = 0.5
#: Largest file (or decompressed gzip content) accepted by the in-memory engines;
#: LAMOST LRS files are ~0.1 MB, MRS files ~1-2 MB.
MAX_FILE_BYTES = 256 * 2**20
#: Relative tolerance for "stored wavelengths equal the COEFF0/COEFF1 grid".
_WAVE_RTOL = 1e-6

_GZIP_MAGIC = b"\x1f\x8b"
_FITS_MAGIC = b"SIMPLE  ="

# header keyword -> kind; the only keywords the reader needs
_WANTED = {
    "OBSID": "int", "DESIG": "str", "RA": "float", "DEC": "float", "LMJD": "int",
    "PLANID": "str", "SPID": "int", "FIBERID": "int", "CLASS": "str",
    "SUBCLASS": "str", "DATA_V": "str", "VERSPIPE": "str", "COEFF0": "float",
    "COEFF1": "float",
    "SNRU": "float", "SNRG": "float", "SNRR": "float", "SNRI": "float", "SNRZ": "float",
    "SN_U": "float", "SN_G": "float", "SN_R": "float", "SN_I": "float", "SN_Z": "float",
}
_BANDS = ("u", "g", "r", "i", "z")
# the wanted keywords as 8-byte, blank-padded FITS keyword fields
_WANTED_B = frozenset(k.encode().ljust(8) for k in _WANTED)


# --------------------------------------------------------------------------- records
@dataclass
class Spectrum:
    """One LAMOST low-resolution spectrum and its metadata.

    Attributes
    ----------
    flux, ivar : numpy.ndarray
        float32 (n,); ``ivar`` is 0 where a pixel is unusable (including pixels
        masked because they were non-finite).
    wavelength : numpy.ndarray
        float64 (n,), vacuum heliocentric wavelength in Angstrom.
    andmask, ormask : numpy.ndarray
        int32 (n,) pipeline bit masks.
    path : str
        Source file.
    layout : str
        ``"image"`` (DR2-DR8), ``"dr1"`` or ``"coadd"`` (DR9+), see :data:`LAYOUTS`.
    obsid, designation, ra, dec, lmjd, planid, spid, fiberid
        Header OBSID (None for DR1), DESIG, RA, DEC [deg], LMJD, PLANID, SPID, FIBERID.
    pipeline_class, pipeline_subclass : str or None
        Header CLASS / SUBCLASS.
    snr : dict
        S/N per band, keys among ``"u","g","r","i","z"`` (SNRU.. or SN_U.. keywords).
    data_release, pipeline_version : str or None
        Header DATA_V (e.g. ``"LAMOST DR7"``) and VERSPIPE.
    coeff0, coeff1 : float or None
        log10 wavelength of pixel 0 and log10 step; None if the wavelengths are not
        the log-linear grid of the header coefficients.
    n_nonfinite : int
        Number of pixels whose flux or ivar was NaN/inf and that were masked
        (ivar and flux set to 0). Added field (default 0).
    """

    flux: np.ndarray
    ivar: np.ndarray
    wavelength: np.ndarray
    andmask: np.ndarray
    ormask: np.ndarray
    path: str
    layout: str
    obsid: int | None = None
    designation: str | None = None
    ra: float | None = None
    dec: float | None = None
    lmjd: int | None = None
    planid: str | None = None
    spid: int | None = None
    fiberid: int | None = None
    pipeline_class: str | None = None
    pipeline_subclass: str | None = None
    snr: dict[str, float] = field(default_factory=dict)
    data_release: str | None = None
    pipeline_version: str | None = None
    coeff0: float | None = None
    coeff1: float | None = None
    n_nonfinite: int = 0

    @property
    def npix(self) -> int:
        """Number of pixels."""
        return int(self.flux.shape[0])


class ReadError(Exception):
    """A file could not be turned into a :class:`Spectrum`.

    Parameters
    ----------
    path : str
        The file.
    message : str
        One-line human-readable explanation (newlines are collapsed).
    reason : str, optional
        Short machine-readable code; defaults to the subclass's ``reason``.

    Notes
    -----
    ``str(err)`` is ``"<path>: <message>"`` on one line.
    """

    reason: str = "unreadable"

    def __init__(self, path: str | os.PathLike, message: str, reason: str | None = None):
        self.path = os.fspath(path)
        self.message = _one_line(message)
        if reason is not None:
            self.reason = reason
        super().__init__(f"{self.path}: {self.message}")


class NotFitsError(ReadError):
    """The file (or the gzip member) is not FITS."""

    reason = "not_fits"


class CorruptFileError(ReadError):
    """Truncated (reason ``"truncated"``) or otherwise corrupt (``"corrupt"``) file."""

    reason = "corrupt"


class EmptyFileError(ReadError):
    """The file (or its decompressed content) has zero bytes."""

    reason = "empty"


class MediumResolutionError(ReadError):
    """A LAMOST medium-resolution (MRS, ``COADD_B``/``COADD_R``) file."""

    reason = "medium_resolution"


class LayoutError(ReadError):
    """Missing or short rows/columns, or an unknown layout."""

    reason = "bad_layout"


class NoUsablePixelsError(ReadError):
    """No pixel with a positive inverse variance."""

    reason = "no_usable_pixels"


class NonFiniteError(ReadError):
    """Too many non-finite flux/ivar values, or non-finite wavelengths."""

    reason = "non_finite"


#: All reason codes that :class:`FileError` can carry.
REASONS = ("not_fits", "corrupt", "truncated", "empty", "medium_resolution",
           "bad_layout", "no_usable_pixels", "non_finite", "unreadable")


@dataclass
class FileError:
    """A file that :func:`read_spectra` could not read.

    Attributes
    ----------
    path : str
    reason : str
        One of :data:`REASONS` (``"unreadable"`` only when the file cannot be read
        from disk; a failure no rule names is classified from the file's bytes).
    message : str
        One line.
    """

    path: str
    reason: str
    message: str


@dataclass
class BatchRead:
    """Result of :func:`read_spectra`: the spectra read and the files that failed."""

    spectra: list[Spectrum]
    errors: list[FileError]


# --------------------------------------------------------------------------- helpers
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parse_card_value(text: str) -> Any:
    """Parse the value field (columns 11-80) of a FITS header card."""
    s = text.lstrip()
    if s[:1] == "'":
        j = s.find("'", 1)
        while 0 <= j < len(s) - 1 and s[j + 1] == "'":  # '' is an escaped quote
            j = s.find("'", j + 2)
        body = s[1:j] if j >= 0 else s[1:]
        return body.replace("''", "'").rstrip()
    v = s.partition("/")[0].strip()
    if not v:
        return None
    if v == "T":
        return True
    if v == "F":
        return False
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v.replace("D", "E").replace("d", "e"))
    except ValueError:
        return v


def _parse_cards(raw: bytes, offset: int, wanted: frozenset[bytes] | None, path: str
                 ) -> tuple[dict[str, Any], int]:
    """Parse one FITS header starting at byte ``offset`` of ``raw``.

    Much faster than building a full header object: the 8-byte keyword field of
    every 80-byte card is viewed as one numpy array, the wanted cards are picked
    with a set lookup (``wanted=None``: all cards), and only their values parsed.

    Returns
    -------
    values : dict
        keyword -> parsed value (first occurrence wins).
    data_offset : int
        Byte offset of the data that follow the header (2880-byte aligned).
    """
    total = (len(raw) - offset) // 80
    limit = min(total, 36 * 8)  # look for END in the first 8 blocks first
    while True:
        keys = np.ndarray(shape=(limit,), dtype="S8", buffer=raw, offset=offset,
                          strides=(80,))
        ends = np.flatnonzero(keys == b"END     ")
        if ends.size or limit == total:
            break
        limit = total
    if not ends.size:
        raise CorruptFileError(path, f"header at byte {offset} has no END card "
                               "(truncated file)", "truncated")
    end = int(ends[0])
    text = np.frombuffer(raw, dtype=np.uint8, count=80 * end, offset=offset)
    bad = (text < 32) | (text > 126)
    if bad.any():  # FITS headers are printable ASCII: garbage, not a header
        card = int(np.argmax(bad)) // 80 + 1
        raise CorruptFileError(path, f"corrupt FITS header at byte {offset}: card {card} holds "
                               "bytes that are not printable ASCII", "corrupt")
    out: dict[str, Any] = {}
    for i, k in enumerate(keys[:end].tolist()):
        if wanted is not None and k not in wanted:   # a set lookup: faster than np.isin here
            continue
        pos = offset + 80 * i
        if raw[pos + 8:pos + 10] == b"= ":
            key = k.rstrip().decode("ascii", "replace")
            if key not in out:
                out[key] = _parse_card_value(raw[pos + 10:pos + 80].decode("ascii",
                                                                            "replace"))
    return out, offset + -(-(80 * (end + 1)) // 2880) * 2880


def _parse_primary_cards(raw: bytes, path: str) -> dict[str, Any]:
    """Values of the wanted keywords of the primary header in the raw file bytes."""
    return _parse_cards(raw, 0, _WANTED_B, path)[0]


def _as_int(v: Any) -> int | None:
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    try:
        f = float(str(v).strip())
    except ValueError:
        return None
    return int(f) if np.isfinite(f) and f == int(f) else None


def _as_float(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _as_str(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _gunzip(data: bytes, path: str) -> bytes:
    """Decompress a (possibly multi-member) gzip stream, with typed errors.

    Bytes after the last member that do not start a new member are ignored.
    """
    parts = []
    budget = MAX_FILE_BYTES
    while True:
        d = _inflate.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = d.decompress(data, budget)
        except _INFLATE_ERRORS as exc:
            raise CorruptFileError(path, f"corrupt gzip stream ({exc})",
                                   "corrupt") from None
        if d.unconsumed_tail:
            raise LayoutError(path, f"gzip content larger than {MAX_FILE_BYTES} bytes; "
                              "not a LAMOST spectrum")
        parts.append(out)
        if not d.eof:
            got = sum(len(p) for p in parts)
            raise CorruptFileError(path, f"truncated gzip stream (ends after "
                                   f"{len(data)} compressed bytes, {got} decompressed)",
                                   "truncated")
        budget -= len(out)
        data = d.unused_data
        if data[:2] != _GZIP_MAGIC:
            return parts[0] if len(parts) == 1 else b"".join(parts)


def read_file_bytes(path: str, max_bytes: int = MAX_FILE_BYTES, what: str = "a LAMOST spectrum") -> bytes:
    """The raw bytes of a spectrum file, with typed errors (for readers of any survey).

    Raises
    ------
    NotFitsError
        ``path`` is a directory.
    ReadError
        Missing or unreadable (reason ``unreadable``).
    LayoutError
        Larger than ``max_bytes`` (not ``what``).
    EmptyFileError
        0 bytes.
    """
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise LayoutError(path, f"file of {size} bytes is too large for {what} (> {max_bytes})")
            data = fh.read()
    except IsADirectoryError:
        raise NotFitsError(path, "is a directory, not a FITS file") from None
    except FileNotFoundError:
        raise ReadError(path, "file not found", "unreadable") from None
    except OSError as exc:
        raise ReadError(path, f"cannot read file ({exc.strerror or exc})",
                        "unreadable") from None
    if not data:
        raise EmptyFileError(path, "empty file (0 bytes)")
    return data


def _read_bytes(path: str) -> bytes:
    """The file's FITS bytes (gunzipped if gzip), with typed errors for bad files."""
    data = read_file_bytes(path)
    if data[:2] == _GZIP_MAGIC:
        data = _gunzip(data, path)
        if not data:
            raise EmptyFileError(path, "gzip file decompresses to 0 bytes")
        if data[:9] != _FITS_MAGIC:
            raise NotFitsError(path, "gzip content is not a FITS file "
                               "(no SIMPLE card at the start)")
    elif data[:9] != _FITS_MAGIC:
        raise NotFitsError(path, "not a FITS file (no SIMPLE card at the start)")
    return data


def _sounds_truncated(message: str) -> bool:
    """Whether a library's error message says the file ends early."""
    low = message.lower()
    return any(k in low for k in ("end of file", "past end", "truncat", "end card"))


def _describe(exc: BaseException) -> str:
    """A library failure in words (not a Python exception text) for an error message."""
    if isinstance(exc, UnicodeDecodeError):
        return "the FITS library met bytes that are not ASCII text"
    text = str(exc).strip()
    return _one_line(text.splitlines()[0] if text else type(exc).__name__)


def _diagnose(path: str, raw: bytes, exc: BaseException) -> ReadError:
    """Turn a low-level library failure on a FITS byte string into a typed error."""
    msg = _describe(exc)
    # a plain FITS file whose declared data run past its end is truncated
    if len(raw) % 2880:
        return CorruptFileError(path, f"truncated FITS file ({len(raw)} bytes, not a "
                                f"multiple of 2880): {msg}", "truncated")
    if _sounds_truncated(msg):
        return CorruptFileError(path, f"truncated FITS file: {msg}", "truncated")
    return CorruptFileError(path, f"corrupt FITS file: {msg}", "corrupt")


# --------------------------------------------------------------------------- sources
class _Source(Protocol):
    """What the layout logic needs from an opened file (one per engine)."""

    hdu_names: list[str]
    header: dict[str, Any]

    def primary_dims(self) -> tuple[int, ...]: ...
    def read_primary(self) -> np.ndarray: ...
    def coadd_columns(self) -> list[str]: ...
    def read_coadd(self) -> dict[str, np.ndarray]: ...


class _FitsioSource:
    """File opened with fitsio; header keywords parsed from the raw header cards."""

    def __init__(self, fits: Any, path: str):
        self._f = fits
        self.hdu_names = [h.get_extname().strip().upper() for h in fits]
        self.header = _parse_primary_cards(fits.read_raw(), path)

    def primary_dims(self) -> tuple[int, ...]:
        hdu = self._f[0]
        if hdu.get_exttype() != "IMAGE_HDU":
            return ()
        return tuple(int(d) for d in hdu.get_dims())

    def read_primary(self) -> np.ndarray:
        return self._f[0].read()

    def _coadd(self) -> Any:
        return self._f[self.hdu_names.index("COADD")]

    def coadd_columns(self) -> list[str]:
        return [c.upper() for c in self._coadd().get_colnames()]

    def read_coadd(self) -> dict[str, np.ndarray]:
        hdu = self._coadd()
        names = {c.upper(): c for c in hdu.get_colnames()}
        nrows = hdu.get_nrows()
        if nrows < 1:
            return {}
        rec = hdu.read(columns=[names[c] for c in COADD_COLUMNS], rows=[0])
        return {c: np.ravel(rec[names[c]][0]) for c in COADD_COLUMNS}


class _AstropySource:
    """File bytes opened with astropy.io.fits; header values from astropy's Header."""

    def __init__(self, hdul: Any, nbytes: int, path: str):
        self._h = hdul
        self._n = nbytes
        self._path = path
        self.hdu_names = [h.name.strip().upper() for h in hdul]
        hdr = hdul[0].header
        self.header = {k: hdr[k] for k in _WANTED if k in hdr}
        for k, v in list(self.header.items()):
            if not isinstance(v, (str, bool, int, float)):
                self.header[k] = None  # astropy "Undefined" value

    def _check_complete(self, index: int) -> None:
        info = self._h.fileinfo(index)
        need = info["datLoc"] + self._h[index].size
        if need > self._n:
            raise CorruptFileError(self._path, f"truncated FITS file: HDU {index} needs "
                                   f"{need} bytes, file has {self._n}", "truncated")

    def primary_dims(self) -> tuple[int, ...]:
        hdr = self._h[0].header
        naxis = int(hdr.get("NAXIS", 0))
        return tuple(int(hdr.get(f"NAXIS{i}", 0)) for i in range(naxis, 0, -1))

    def read_primary(self) -> np.ndarray:
        self._check_complete(0)
        return self._h[0].data

    def _index(self) -> int:
        return self.hdu_names.index("COADD")

    def coadd_columns(self) -> list[str]:
        return [c.upper() for c in self._h[self._index()].columns.names]

    def read_coadd(self) -> dict[str, np.ndarray]:
        i = self._index()
        self._check_complete(i)
        data = self._h[i].data
        if data is None or len(data) < 1:
            return {}
        names = {c.upper(): c for c in data.columns.names}
        return {c: np.ravel(data[names[c]][0]) for c in COADD_COLUMNS}


class _Unsupported(Exception):
    """The native decoder met a FITS feature it does not handle (-> fitsio)."""


_BITPIX_DTYPE = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
_TFORM_DTYPE = {"B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8",
                "A": "S1", "L": "S1"}
_TFORM_RE = re.compile(r"^\s*(\d*)([A-Z])")
_STRUCT_KEYS = frozenset(k.encode().ljust(8) for k in (
    "SIMPLE", "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "NAXIS4",
    "PCOUNT", "GCOUNT", "EXTNAME", "BSCALE", "BZERO", "BLANK"))


class _NativeSource:
    """Minimal FITS decoder over the in-memory bytes (numpy views, no copies).

    Handles exactly what LAMOST LRS files use: unscaled images and binary tables
    with fixed-width numeric columns. Anything else raises ``_Unsupported`` and the
    caller falls back to fitsio.
    """

    def __init__(self, raw: bytes, path: str):
        self._raw = raw
        self._path = path
        self._hdus: list[tuple[dict[str, Any], int, int]] = []  # header, data off, size
        offset = 0
        n = len(raw)
        while offset < n:
            if offset and raw[offset:offset + 8] != b"XTENSION":
                break  # trailing padding or junk after the last HDU
            wanted = (_WANTED_B | _STRUCT_KEYS) if offset == 0 else None
            hdr, data_off = _parse_cards(raw, offset, wanted, path)
            naxis = int(hdr.get("NAXIS", 0) or 0)
            count = 1
            for i in range(1, naxis + 1):
                count *= int(hdr.get(f"NAXIS{i}", 0) or 0)
            if naxis == 0:
                count = 0
            bitpix = int(hdr.get("BITPIX", 8))
            size = abs(bitpix) // 8 * int(hdr.get("GCOUNT", 1) or 1) * (
                int(hdr.get("PCOUNT", 0) or 0) + count)
            self._hdus.append((hdr, data_off, size))
            offset = data_off + -(-size // 2880) * 2880
        self.hdu_names = [str(h.get("EXTNAME") or "").strip().upper() for h, _, _ in
                          self._hdus]
        self.header = self._hdus[0][0]

    def _data_bytes(self, index: int) -> tuple[dict[str, Any], int, int]:
        hdr, off, size = self._hdus[index]
        if off + size > len(self._raw):
            raise CorruptFileError(self._path, f"truncated FITS file: HDU {index} needs "
                                   f"{off + size} bytes, file has {len(self._raw)}",
                                   "truncated")
        return hdr, off, size

    def primary_dims(self) -> tuple[int, ...]:
        hdr = self._hdus[0][0]
        naxis = int(hdr.get("NAXIS", 0) or 0)
        return tuple(int(hdr.get(f"NAXIS{i}", 0)) for i in range(naxis, 0, -1))

    def read_primary(self) -> np.ndarray:
        hdr, off, _ = self._data_bytes(0)
        if hdr.get("BSCALE", 1) != 1 or hdr.get("BZERO", 0) != 0:
            raise _Unsupported("scaled image")
        dtype = _BITPIX_DTYPE.get(int(hdr.get("BITPIX", 0)))
        if dtype is None:
            raise _Unsupported("BITPIX")
        shape = self.primary_dims()
        return np.frombuffer(self._raw, dtype=dtype, count=int(np.prod(shape)),
                             offset=off).reshape(shape)

    def _coadd(self) -> int:
        return self.hdu_names.index("COADD")

    def _columns(self, hdr: dict[str, Any]) -> list[tuple[str, str, int]]:
        cols = []
        for i in range(1, int(hdr.get("TFIELDS", 0) or 0) + 1):
            name = str(hdr.get(f"TTYPE{i}", f"COL{i}")).strip()
            m = _TFORM_RE.match(str(hdr.get(f"TFORM{i}", "")))
            if m is None or m.group(2) not in _TFORM_DTYPE:
                raise _Unsupported(f"TFORM{i}")
            if f"TSCAL{i}" in hdr or f"TZERO{i}" in hdr:
                raise _Unsupported("scaled column")
            cols.append((name, _TFORM_DTYPE[m.group(2)], int(m.group(1) or 1)))
        return cols

    def coadd_columns(self) -> list[str]:
        return [c[0].upper() for c in self._columns(self._hdus[self._coadd()][0])]

    def read_coadd(self) -> dict[str, np.ndarray]:
        i = self._coadd()
        hdr, off, _ = self._data_bytes(i)
        if hdr.get("XTENSION", "").strip() != "BINTABLE":
            raise _Unsupported("COADD is not a binary table")
        nrows = int(hdr.get("NAXIS2", 0) or 0)
        if nrows < 1:
            return {}
        names, formats, offsets, pos = [], [], [], 0
        for name, dt, rep in self._columns(hdr):
            names.append(name.upper())
            formats.append((dt, (rep,)) if rep != 1 else dt)
            offsets.append(pos)
            pos += np.dtype(dt).itemsize * rep
        if pos != int(hdr.get("NAXIS1", -1)):
            raise _Unsupported("row width")
        row = np.frombuffer(self._raw, dtype=np.dtype({"names": names, "formats": formats,
                                                       "offsets": offsets,
                                                       "itemsize": pos}),
                            count=1, offset=off)[0]
        return {c: np.ravel(row[c]) for c in COADD_COLUMNS}


# --------------------------------------------------------------------------- assembly
def _looks_like_wavelength(row: np.ndarray) -> bool:
    """True if a row is an increasing optical wavelength array in Angstrom.

    Non-finite values are ignored here (so that an image-layout file with a few
    NaN wavelengths is still recognised, and then refused by the wavelength check)
    as long as at least half of the row is finite.
    """
    first, last = float(row[0]), float(row[-1])
    if np.isfinite(first) and np.isfinite(last) and not 2500.0 < first < last < 12000.0:
        return False  # quick rejection (e.g. DR1's continuum-normalised row)
    finite = np.isfinite(row)
    good = row if finite.all() else row[finite]
    if good.size < 2 or good.size < row.size // 2:
        return False
    return bool(2500.0 < good[0] < good[-1] < 12000.0 and np.all(np.diff(good) > 0))


@functools.lru_cache(maxsize=64)
def _cached_grid(c0: float, c1: float, n: int) -> np.ndarray:
    grid = 10.0 ** (c0 + c1 * np.arange(n, dtype=np.float64))
    grid.flags.writeable = False
    return grid


def _loglin_grid(c0: float, c1: float, n: int) -> np.ndarray:
    """``10**(c0 + c1*i)``, i = 0..n-1, float64 (a fresh, writeable copy)."""
    return _cached_grid(c0, c1, n).copy()


def _wavelength(stored: np.ndarray, hdr: dict[str, Any], path: str
                ) -> tuple[np.ndarray, float | None, float | None]:
    if not np.all(np.isfinite(stored)):
        raise NonFiniteError(path, "non-finite wavelength values")
    c0, c1 = _as_float(hdr.get("COEFF0")), _as_float(hdr.get("COEFF1"))
    if c0 is not None and c1 is not None and c1 > 0:
        grid = _cached_grid(c0, c1, stored.size)
        if np.max(np.abs(stored / grid - 1.0)) <= _WAVE_RTOL:
            return grid.copy(), c0, c1
    return stored.astype(np.float64), None, None


def _build(path: str, src: _Source, max_nonfinite_fraction: float) -> Spectrum:
    names = src.hdu_names
    hdr = src.header
    if any(n.startswith("COADD_") for n in names):
        raise MediumResolutionError(
            path, "medium-resolution (MRS) file with "
            + "/".join(n for n in names if n.startswith("COADD_"))
            + " tables; not a low-resolution spectrum")
    if "COADD" in names:
        layout = "coadd"
        missing = [c for c in COADD_COLUMNS if c not in src.coadd_columns()]
        if missing:
            raise LayoutError(path, f"COADD table lacks column(s) {', '.join(missing)}")
        cols = src.read_coadd()
        if not cols:
            raise LayoutError(path, "COADD table has no rows")
        n = min(c.size for c in cols.values())
        if n != max(c.size for c in cols.values()):
            raise LayoutError(path, "COADD columns have different lengths")
        flux, ivar, wave, andm, orm = (cols[c] for c in COADD_COLUMNS)
    else:
        dims = src.primary_dims()
        if len(dims) != 2:
            raise LayoutError(path, f"unknown layout: no COADD table and primary HDU is "
                              f"not a 2-D image (dims {dims}); HDUs {names}")
        if dims[0] < N_ROWS:
            raise LayoutError(path, f"image has {dims[0]} rows, {N_ROWS} needed "
                              f"({', '.join(IMAGE_ROWS)})")
        data = src.read_primary()
        flux, ivar, row2, andm, orm = data[0], data[1], data[2], data[3], data[4]
        n = data.shape[1]
        if _looks_like_wavelength(row2):
            layout, wave = "image", row2
        else:
            c0, c1 = _as_float(hdr.get("COEFF0")), _as_float(hdr.get("COEFF1"))
            if c0 is None or c1 is None:
                raise LayoutError(path, "image row 2 is not a wavelength array and "
                                  "COEFF0/COEFF1 are missing")
            layout, wave = "dr1", None
    if n < MIN_PIXELS:
        raise LayoutError(path, f"short spectrum: {n} pixels (< {MIN_PIXELS})")

    if wave is None:
        c0, c1 = float(hdr["COEFF0"]), float(hdr["COEFF1"])
        wavelength = _loglin_grid(c0, c1, n)
    else:
        wavelength, c0, c1 = _wavelength(np.asarray(wave), hdr, path)

    flux = np.asarray(flux, dtype=np.float32)   # native byte order copies
    ivar = np.asarray(ivar, dtype=np.float32)
    if flux.base is not None or not flux.flags.writeable:
        flux = flux.copy()
    if ivar.base is not None or not ivar.flags.writeable:
        ivar = ivar.copy()
    bad = ~(np.isfinite(flux) & np.isfinite(ivar))
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        if n_bad > max_nonfinite_fraction * n:
            raise NonFiniteError(path, f"{n_bad} of {n} pixels have non-finite flux or "
                                 f"ivar (> {max_nonfinite_fraction:.0%})")
        flux[bad] = 0.0
        ivar[bad] = 0.0
    np.maximum(ivar, 0.0, out=ivar)
    if not np.any(ivar > 0):
        raise NoUsablePixelsError(path, f"no usable pixels (ivar <= 0 in all {n})")

    def _mask(m: np.ndarray) -> np.ndarray:
        m = np.asarray(m)
        if m.dtype.kind == "f" and not np.isfinite(m).all():
            m = np.where(np.isfinite(m), m, 0.0)
        return m.astype(np.int32)

    snr = {}
    for b in _BANDS:
        v = _as_float(hdr.get("SNR" + b.upper()))
        if v is None:
            v = _as_float(hdr.get("SN_" + b.upper()))
        if v is not None:
            snr[b] = v
    return Spectrum(
        flux=flux, ivar=ivar, wavelength=wavelength,
        andmask=_mask(andm), ormask=_mask(orm), path=path, layout=layout,
        obsid=_as_int(hdr.get("OBSID")), designation=_as_str(hdr.get("DESIG")),
        ra=_as_float(hdr.get("RA")), dec=_as_float(hdr.get("DEC")),
        lmjd=_as_int(hdr.get("LMJD")), planid=_as_str(hdr.get("PLANID")),
        spid=_as_int(hdr.get("SPID")), fiberid=_as_int(hdr.get("FIBERID")),
        pipeline_class=_as_str(hdr.get("CLASS")),
        pipeline_subclass=_as_str(hdr.get("SUBCLASS")), snr=snr,
        data_release=_as_str(hdr.get("DATA_V")),
        pipeline_version=_as_str(hdr.get("VERSPIPE")),
        coeff0=c0, coeff1=c1, n_nonfinite=n_bad,
    )


# --------------------------------------------------------------------------- engines
def _read_fitsio(path: str, max_nonfinite_fraction: float) -> Spectrum:
    import fitsio

    try:
        fits = fitsio.FITS(path)
    except Exception as exc:  # noqa: BLE001 - OSError, or e.g. UnicodeDecodeError on garbage
        return _after_fitsio_failure(path, exc, max_nonfinite_fraction)
    try:
        try:
            src = _FitsioSource(fits, path)
            return _build(path, src, max_nonfinite_fraction)
        except ReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - cfitsio errors while reading data
            failure = exc
    finally:
        fits.close()
    return _after_fitsio_failure(path, failure, max_nonfinite_fraction)


def _after_fitsio_failure(path: str, exc: BaseException,
                          max_nonfinite_fraction: float) -> Spectrum:
    """Error path of the fitsio engine.

    Re-reads the file to tell empty, non-FITS, bad-gzip and truncated files apart,
    and retries with the in-memory decoder, which also reads what cfitsio cannot
    (e.g. multi-member gzip files), so that all engines accept the same files.
    """
    raw = _read_bytes(path)
    try:
        return _build(path, _NativeSource(raw, path), max_nonfinite_fraction)
    except ReadError:
        raise
    except Exception:  # noqa: BLE001 - _Unsupported or a decoding failure: classify
        raise _diagnose(path, raw, exc) from None


def _read_astropy(path: str, max_nonfinite_fraction: float) -> Spectrum:
    import warnings

    from astropy.io import fits as afits

    raw = _read_bytes(path)
    _parse_primary_cards(raw, path)  # same header checks as the other engines
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with afits.open(_stdio.BytesIO(raw), memmap=False, lazy_load_hdus=False
                            ) as hdul:
                src = _AstropySource(hdul, len(raw), path)
                return _build(path, src, max_nonfinite_fraction)
    except ReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, VerifyError, ...
        raise _diagnose(path, raw, exc) from None


def _read_native(path: str, max_nonfinite_fraction: float) -> Spectrum:
    raw = _read_bytes(path)
    try:
        return _build(path, _NativeSource(raw, path), max_nonfinite_fraction)
    except _Unsupported:
        return _read_fitsio(path, max_nonfinite_fraction)
    except ReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a corrupt file
        raise _diagnose(path, raw, exc) from None


def _unexpected(path: str, exc: BaseException) -> ReadError:
    """The typed error for a failure no engine classified (a reason, not a Python exception).

    The file's bytes decide: not readable -> ``unreadable``; empty, not FITS or a
    bad gzip stream -> those reasons; otherwise the FITS content is corrupt.
    """
    try:
        raw = _read_bytes(path)
    except ReadError as err:
        return err
    except Exception:  # noqa: BLE001 - e.g. a path that is not a string
        return ReadError(path, f"cannot read file ({_describe(exc)})", "unreadable")
    return _diagnose(path, raw, exc)


_ENGINE_FUNCS = {"fitsio": _read_fitsio, "astropy": _read_astropy, "native": _read_native}


def read_spectrum(path: str | os.PathLike, engine: str = DEFAULT_ENGINE, *,
                  max_nonfinite_fraction: float = MAX_NONFINITE_FRACTION) -> Spectrum:
    """Read one LAMOST low-resolution spectrum.

    Parameters
    ----------
    path : str or os.PathLike
        A LAMOST LRS FITS file, plain or gzip-compressed (any file name).
    engine : {"native", "fitsio", "astropy"}
        Decoder (default :data:`DEFAULT_ENGINE`, ``native``); all give identical
        records (see the module docstring).
    max_nonfinite_fraction : float
        Largest fraction of pixels with non-finite flux/ivar that is masked
        (counted in :attr:`Spectrum.n_nonfinite`) rather than refused.

    Returns
    -------
    Spectrum

    Raises
    ------
    ReadError
        One of its subclasses, with a one-line ``message`` and a ``reason`` code.
    ValueError
        For an unknown ``engine``.
    """
    try:
        func = _ENGINE_FUNCS[engine]
    except KeyError:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}") from None
    return func(os.fspath(path), max_nonfinite_fraction)


def read_spectra(paths: Iterable[str | os.PathLike], engine: str = DEFAULT_ENGINE, *,
                 max_nonfinite_fraction: float = MAX_NONFINITE_FRACTION) -> BatchRead:
    """Read many files; a bad file never stops the batch.

    Parameters
    ----------
    paths : iterable of str or os.PathLike
    engine : {"fitsio", "native", "astropy"}
    max_nonfinite_fraction : float
        See :func:`read_spectrum`.

    Returns
    -------
    BatchRead
        ``spectra`` in input order (of the files that were read) and ``errors``
        (one :class:`FileError` per failed file; an unexpected failure is
        classified from the file's bytes: ``not_fits``, ``empty``, ``truncated``
        or ``corrupt``, never a Python exception text).
    """
    func = _ENGINE_FUNCS.get(engine)
    if func is None:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    spectra: list[Spectrum] = []
    errors: list[FileError] = []
    for p in paths:
        path = str(p)
        try:
            path = os.fspath(p)
            spectra.append(func(path, max_nonfinite_fraction))
        except ReadError as err:
            errors.append(FileError(err.path, err.reason, err.message))
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop a batch
            err = _unexpected(path, exc)
            errors.append(FileError(err.path, err.reason, err.message))
    return BatchRead(spectra, errors)


# --------------------------------------------------------------------------- readers (plugin point)
#: Entry point group of readers (this module's :class:`LamostReader` is ``lamost``).
READER_GROUP = "lamost_ostar.readers"


class Reader(Protocol):
    """What a reader plugin is (entry point group ``lamost_ostar.readers``).

    A class with a ``name`` (its entry point name), a ``version`` (stored with
    every scan) and ``read(path) -> Spectrum``, which raises a :class:`ReadError`
    subclass (``reason`` code, one-line ``message``) for a file it cannot read.
    Its constructor takes keyword arguments only, all optional (the scan passes
    ``engine=`` where the reader's signature accepts it).  The spectrum's
    wavelengths are vacuum Angstrom; ``path`` is the file as given.
    """

    name: str
    version: str

    def read(self, path: str) -> Spectrum:
        """One spectrum, or a ReadError subclass."""


class LamostReader:
    """The LAMOST LRS reader (entry point ``lamost``): :func:`read_spectrum` as a reader plugin.

    Parameters
    ----------
    engine : {"native", "fitsio", "astropy"}
        Decoder (default :data:`DEFAULT_ENGINE`), see the module docstring.
    max_nonfinite_fraction : float
        See :func:`read_spectrum`.
    """

    name = "lamost"
    version = "lamost-1"

    def __init__(self, engine: str = DEFAULT_ENGINE, *,
                 max_nonfinite_fraction: float = MAX_NONFINITE_FRACTION) -> None:
        if engine not in _ENGINE_FUNCS:
            raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
        self.engine = engine
        self.max_nonfinite_fraction = float(max_nonfinite_fraction)
        self._func = _ENGINE_FUNCS[engine]

    def __repr__(self) -> str:
        return f"LamostReader(engine={self.engine!r})"

    def read(self, path: str | os.PathLike) -> Spectrum:
        """Read one file; any failure is a :class:`ReadError` (as :func:`read_spectra` reports it)."""
        path = os.fspath(path)
        try:
            return self._func(path, self.max_nonfinite_fraction)
        except ReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified from the file's bytes
            raise _unexpected(path, exc) from None


def available_readers() -> dict[str, str]:
    """Registered readers: entry point name -> ``"module:attr"`` (nothing imported)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=READER_GROUP)}


def load_reader(name: str = "lamost", **kwargs: Any) -> Any:
    """Build the reader registered as ``name`` (or a ``"module:attr"`` reference).

    Keyword arguments the reader's constructor does not accept are dropped
    (``engine`` means something only to some readers).
    """
    from lamost_ostar.entrypoints import READERS, load

    factory = load(READERS, name)
    return factory(**_accepted_kwargs(factory, kwargs))


def _accepted_kwargs(factory: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``factory``'s signature accepts (all with ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return dict(kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(kwargs)
    names = {p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in kwargs.items() if k in names}
