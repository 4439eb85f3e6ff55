"""Packaged library of real stellar template spectra on the common grid.

The library is built by ``scripts/build_templates.py`` from four real empirical
libraries (``../shared/data/libraries``, see ``SOURCES.md`` there):

* **MILES** v9.1 (Sanchez-Blazquez et al. 2006; 3540-7410 A in air, FWHM 2.5 A):
  every star with a usable MK type, converted to vacuum wavelengths, degraded
  to LAMOST resolution (R ~ 1800, Gaussian in log-lambda) and resampled onto
  :func:`lamost_ostar.preprocess.grid_wavelength`.  MILES stops at ~7412 A
  (vacuum), so each star is extended redward with the Pickles template nearest
  in spectral type and luminosity class, scaled by a smooth power law fitted
  over an overlap window; ``orig_max`` records where the original MILES data
  end (see :attr:`TemplateLibrary.original`; ``valid`` is True there).  The
  hot subdwarf HD149382 (listed as B5, Teff 36 000 K) is kept as an impostor
  (``kind="hot_subdwarf"``, ``mk="X"``).
* **Pickles** (1998) UVILIB (1150-10620 A, R ~ 500): all 108 solar-abundance
  spectra resampled onto the grid (their resolution is already coarser than
  LAMOST's, so they are not smoothed further).
* **STELIB** v3.2 (Le Borgne et al. 2003; 255 files, air wavelengths, FWHM
  ~3.4 A): converted to vacuum, smoothed only where sharper than R = 1800
  (above ~6100 A) and resampled.  STELIB fluxes are dereddened (header
  ``ISEXTINC`` = A_V); the builder reddens them again with E(B-V) = A_V / 3.1
  (O'Donnell 1994 law, R_V = 3.1) so the library holds the star as observed,
  and records that E(B-V) in ``ebv``.  Many STELIB spectra do not cover the
  whole grid (blue ends at 4440-4500 A, red ends at 4745-8100 A, interior
  gaps): those pixels are ``valid = False`` and hold flux 0 -- nothing is
  invented.  Names are ``stelib:<file stem>`` (``stelib:HD053929lp``).
* **MKCLASS** standards (Gray & Corbally; ``libnor36``, 3800-5600 A, FWHM
  ~3.6 A, air): the O and B (O4 ... B9) flux-normalised averaged standards,
  ``valid`` only inside 3800-5600 A (minus the kernel edges), names/stars
  ``mkclass:<type>`` (``mkclass:O9V``).  ``libnor36`` keeps a continuum
  slope (normalised to ~1 near 4500 A; the O9 V standard has F(4000)/F(5500)
  = 3.1, Pickles o9v 3.4), ``libr36`` is rectified (continuum = 1); both are
  available in full through :func:`load_mkclass`.  They are averages of MK
  standard stars, some of which are library stars too (e.g. HD036512, the
  old system's B0 V anchor, HD047839 O7V, HD030614 O9.5Ia are classical MK
  standards): their ``star`` ids do not say so.

Fluxes are normalised to a median of 1 over each template's valid pixels and
stored as float16 (relative precision 4.9e-4; loaded as float32).

Classes: ``mk`` is an MK letter of :data:`MK_LETTERS` or :data:`IMPOSTOR`
(``"X"``) for hot non-MK impostors (Wolf-Rayet stars, white dwarfs, the hot
subdwarf); cool subdwarfs keep their letter with ``kind="cool_subdwarf"``.
``star`` is the split unit: one value per physical star, shared by the two
STELIB observations of one star (``lp``/``ss`` files) and by a star present in
both MILES and STELIB.

Real O-type spectra: MILES HD057060 (O7Ia), HD057061 (O9Ib), HD209975 (O8Ib);
STELIB HD030614 (O9.5Iae), HD046223 (O5e; modern type O4V((f)), used for
subtype/lumclass), HD047129 (O8V+, Plaskett's star), HD047839 (O7Ve),
HD093250 (O6/O7; modern O4III, used), HD188209 (O9.5Ib), HD269698 (O5e, LMC),
HD036512 (upsilon Ori: STELIB B0V, the modern GOSSS type O9.7V used -- its He II
4541 absorption is as strong as the O9.5 stars'; see ``scripts/build_templates.py``);
Pickles o5v, o8iii, o9v; plus the MKCLASS O4-O9 standard averages.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, fields
from importlib import resources
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lamost_ostar.preprocess import DLOGLAM, LOGLAM0, NPIX, grid_wavelength

__all__ = [
    "MK_LETTERS",
    "IMPOSTOR",
    "KINDS",
    "SOURCES",
    "DEFAULT_PATH",
    "MKCLASS_PATH",
    "TemplateLibrary",
    "load_templates",
    "load_mkclass",
    "parse_spectral_type",
    "air_to_vacuum",
    "vacuum_to_air",
    "BALMER_VAC",
    "BE_DECREMENT",
]

#: MK letters in temperature order.
MK_LETTERS: tuple[str, ...] = ("O", "B", "A", "F", "G", "K", "M")

#: Class letter of the hot non-MK impostors (Wolf-Rayet, white dwarfs, hot
#: subdwarfs): not O, but hot and blue, with He II / broad lines.
IMPOSTOR: str = "X"

#: Template kinds.
KINDS: tuple[str, ...] = ("normal", "wr", "wd", "hot_subdwarf", "cool_subdwarf")

#: Source libraries.
SOURCES: tuple[str, ...] = ("miles", "pickles", "stelib", "mkclass")

#: Resolving power at 4500 A of a template on the grid, by source, used when a
#: file predates the per-template ``resolution`` field.
_DEFAULT_RESOLUTION = {"miles": 1800.0, "pickles": 500.0, "stelib": 1324.0, "mkclass": 1250.0}

#: Vacuum wavelengths [A] of H-alpha, H-beta, H-gamma, H-delta.
BALMER_VAC: tuple[float, ...] = (6564.61, 4862.68, 4341.68, 4102.89)
#: Emission equivalent widths of H-alpha..H-delta relative to H-alpha, roughly a
#: Be star's (Hbeta emission ~ 1/5 of Halpha; the blue lines only fill in).
BE_DECREMENT: tuple[float, ...] = (1.0, 0.2, 0.06, 0.03)

#: Name of the packaged data files inside ``lamost_ostar/data``.
_DATA_FILE = "templates.npz"
_MKCLASS_FILE = "mkclass.npz"


def _default_path(name: str = _DATA_FILE) -> Path:
    return Path(str(resources.files("lamost_ostar") / "data" / name))


#: Location of the packaged template file.
DEFAULT_PATH: Path = _default_path()
#: Location of the packaged MKCLASS standards (libnor36 and libr36 on the grid).
MKCLASS_PATH: Path = _default_path(_MKCLASS_FILE)


@dataclass
class TemplateLibrary:
    """Real stellar template spectra on the common log-lambda grid.

    Attributes
    ----------
    wave : numpy.ndarray
        float64 ``(NPIX,)`` vacuum wavelength grid [A].
    flux : numpy.ndarray
        float32 ``(T, NPIX)`` flux density (F_lambda), median 1 over the valid
        pixels of each template, 0 where ``valid`` is False.
    mk : numpy.ndarray
        str ``(T,)`` MK letter ``O B A F G K M``, or ``X`` (:data:`IMPOSTOR`).
    spt : numpy.ndarray
        str ``(T,)`` spectral type as given by the source (``O7Ia``, ``B9.5V``,
        ``WN``, ``DA:``).
    subtype : numpy.ndarray
        float32 ``(T,)`` numeric subtype (``7.0`` for O7), NaN if unknown (and
        for impostors).
    lumclass : numpy.ndarray
        str ``(T,)`` luminosity class (``Ia``, ``Iab``, ``Ib``, ``I``, ``II``,
        ``III``, ``IV``, ``V``, ``VI`` for subdwarfs), ``""`` if unknown.
    teff, logg, feh : numpy.ndarray
        float32 ``(T,)`` stellar parameters (NaN where unknown; Pickles
        spectra have no Teff/logg and [Fe/H] = 0, the library being solar).
    name : numpy.ndarray
        str ``(T,)`` unique template name: MILES star name, Pickles file stem,
        ``stelib:<file stem>``, ``mkclass:<type>``.
    source : numpy.ndarray
        str ``(T,)`` ``"miles"``, ``"pickles"``, ``"stelib"`` or ``"mkclass"``.
    orig_min, orig_max : numpy.ndarray
        float64 ``(T,)`` vacuum wavelength range [A] covered by the source's
        own data; outside it the flux is an extension (MILES) or invalid.
    extension : numpy.ndarray
        str ``(T,)`` name of the Pickles spectrum used to extend a MILES star
        (``""`` when not extended).
    valid : numpy.ndarray
        bool ``(T, NPIX)``: False where the smoothing kernel touched missing
        native data or lies beyond the source's range (flux 0 there).
    coverage : numpy.ndarray
        float32 ``(T,)`` fraction of valid grid pixels.
    star : numpy.ndarray
        str ``(T,)`` split unit, one per physical star (``HD030614``,
        ``HD053929`` for both STELIB files, the MILES name for MILES-only
        stars, the name for Pickles, ``mkclass:O9V``).
    kind : numpy.ndarray
        str ``(T,)`` one of :data:`KINDS`.
    ebv : numpy.ndarray
        float32 ``(T,)`` E(B-V) the builder applied to the template (STELIB
        A_V / 3.1; 0 for the others): the template is reddened by this much.
    resolution : numpy.ndarray
        float32 ``(T,)`` resolving power lambda / FWHM at 4500 A of the grid
        spectrum (MILES 1800, STELIB 1324, MKCLASS 1250, Pickles ~500).
    """

    wave: np.ndarray
    flux: np.ndarray
    mk: np.ndarray
    spt: np.ndarray
    subtype: np.ndarray
    lumclass: np.ndarray
    teff: np.ndarray
    logg: np.ndarray
    feh: np.ndarray
    name: np.ndarray
    source: np.ndarray
    orig_min: np.ndarray
    orig_max: np.ndarray
    extension: np.ndarray
    valid: np.ndarray | None = None
    coverage: np.ndarray | None = None
    star: np.ndarray | None = None
    kind: np.ndarray | None = None
    ebv: np.ndarray | None = None
    resolution: np.ndarray | None = None

    def __post_init__(self) -> None:
        t = int(self.flux.shape[0])
        if self.valid is None:
            self.valid = np.ones((t, self.flux.shape[1]), dtype=bool)
        self.valid = np.asarray(self.valid, dtype=bool)
        if self.coverage is None:
            self.coverage = self.valid.mean(axis=1).astype(np.float32)
        if self.star is None:
            self.star = np.asarray(self.name).astype(str)
        if self.kind is None:
            self.kind = np.full(t, "normal", dtype="<U13")
        if self.ebv is None:
            self.ebv = np.zeros(t, dtype=np.float32)
        if self.resolution is None:
            self.resolution = np.array([_DEFAULT_RESOLUTION.get(str(s), 1800.0)
                                        for s in self.source], dtype=np.float32).reshape(t)

    def __len__(self) -> int:
        return int(self.flux.shape[0])

    @property
    def original(self) -> np.ndarray:
        """bool ``(T, NPIX)``: True where the flux is the source's own (valid) data."""
        w = self.wave[None, :]
        return (w >= self.orig_min[:, None]) & (w <= self.orig_max[:, None]) & self.valid

    def counts(self) -> dict[str, int]:
        """Number of templates per class (``MK_LETTERS`` order, then ``X``)."""
        return {k: int(np.sum(self.mk == k)) for k in MK_LETTERS + (IMPOSTOR,)}

    def _take(self, index: np.ndarray) -> "TemplateLibrary":
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kwargs[f.name] = value if f.name == "wave" else value[index]
        return TemplateLibrary(**kwargs)

    def with_balmer_emission(self, halpha_ew: float, decrement: Sequence[float] = BE_DECREMENT,
                             fwhm_kms: float = 400.0) -> "TemplateLibrary":
        """A copy with Balmer emission lines added (a Be / Oe star's disc), for robustness probes.

        Each line is a Gaussian of equivalent width ``halpha_ew * decrement[i]``
        (emission, Angstrom, positive) on the template's local continuum (the
        median of 30-90 A either side of the line), centred on the vacuum
        wavelength of :data:`BALMER_VAC` and ``fwhm_kms`` wide; it is added on
        valid pixels only, before any reddening, velocity shift or smoothing the
        mock applies.  Vectorised over the templates.

        Parameters
        ----------
        halpha_ew : float
            Emission equivalent width of H-alpha [A]; 0 returns an unchanged copy.
        decrement : sequence of float
            Emission EW of H-alpha, H-beta, H-gamma, H-delta relative to H-alpha.
        fwhm_kms : float
            Line width (full width at half maximum) [km/s].

        Returns
        -------
        TemplateLibrary
        """
        out = self._take(np.arange(len(self)))
        if halpha_ew == 0:
            return out
        wave = np.asarray(self.wave, np.float64)
        flux = np.asarray(out.flux, np.float64).copy()
        ok = np.asarray(out.valid, bool)
        width = np.gradient(wave)   # pixel widths of the (log-linear) grid
        for lam0, rel in zip(BALMER_VAC, decrement):
            side = (np.abs(wave - lam0) >= 30.0) & (np.abs(wave - lam0) <= 90.0)
            with warnings.catch_warnings():   # templates with no valid pixel there (blue-only)
                warnings.simplefilter("ignore", RuntimeWarning)
                cont = np.nanmedian(np.where(ok[:, side], flux[:, side], np.nan), axis=1)
            cont = np.where(np.isfinite(cont) & (cont > 0), cont, 0.0)
            sigma = lam0 * fwhm_kms / 299792.458 / 2.3548
            # unit-area profile sampled on the grid
            prof = np.exp(-0.5 * ((wave - lam0) / sigma) ** 2)
            prof /= np.sum(prof * width)
            flux += np.where(ok, (halpha_ew * rel) * cont[:, None] * prof[None, :], 0.0)
        out.flux = flux.astype(np.asarray(self.flux).dtype)
        return out

    def select(self, mk: str | tuple[str, ...] | list[str] | None = None, *,
               source: str | tuple[str, ...] | list[str] | None = None,
               lumclass: str | tuple[str, ...] | None = None,
               name: str | None = None, original_only: bool = False,
               kind: str | tuple[str, ...] | list[str] | None = None,
               star: str | tuple[str, ...] | list[str] | None = None,
               min_coverage: float | None = None) -> "TemplateLibrary":
        """Return the subset of templates matching all given criteria.

        Parameters
        ----------
        mk : str or sequence of str, optional
            Class letter(s), e.g. ``"O"``, ``("O", "B")`` or ``"X"``.
        source : str or sequence of str, optional
            ``"miles"``, ``"pickles"``, ``"stelib"``, ``"mkclass"``.
        lumclass : str or sequence of str, optional
            Luminosity class(es); ``"I"`` also matches ``Ia``, ``Iab``, ``Ib``.
        name : str, optional
            Exact template name.
        original_only : bool
            Keep only templates whose own, valid data cover the whole grid.
        kind : str or sequence of str, optional
            Template kind(s) of :data:`KINDS`.
        star : str or sequence of str, optional
            Star id(s) (all templates of those stars).
        min_coverage : float, optional
            Keep templates with ``coverage >= min_coverage``.

        Returns
        -------
        TemplateLibrary
        """
        def _list(x):
            return [x] if isinstance(x, str) else list(x)

        keep = np.ones(len(self), dtype=bool)
        if mk is not None:
            keep &= np.isin(self.mk, _list(mk))
        if source is not None:
            keep &= np.isin(self.source, _list(source))
        if lumclass is not None:
            wanted = _list(lumclass)
            base = np.array([_lum_base(x) for x in self.lumclass])
            keep &= np.isin(self.lumclass, wanted) | np.isin(base, wanted)
        if name is not None:
            keep &= self.name == name
        if kind is not None:
            keep &= np.isin(self.kind, _list(kind))
        if star is not None:
            keep &= np.isin(self.star, _list(star))
        if min_coverage is not None:
            keep &= self.coverage >= float(min_coverage)
        if original_only:
            keep &= ((self.orig_min <= self.wave[0]) & (self.orig_max >= self.wave[-1])
                     & self.valid.all(axis=1))
        return self._take(np.flatnonzero(keep))

    def index(self, name: str) -> int:
        """Row index of the template called ``name`` (KeyError if absent)."""
        hits = np.flatnonzero(self.name == name)
        if hits.size == 0:
            raise KeyError(name)
        return int(hits[0])


def _lum_base(lumclass: str) -> str:
    return "I" if lumclass in ("Ia", "Iab", "Ib", "Ia0", "I") else lumclass


_STRING_FIELDS = ("mk", "spt", "lumclass", "name", "source", "extension", "star", "kind")
_FLOAT64_FIELDS = ("orig_min", "orig_max")


def load_templates(path: str | Path | None = None) -> TemplateLibrary:
    """Load the template library.

    Parameters
    ----------
    path : str or Path, optional
        An ``.npz`` file written by ``scripts/build_templates.py``; default:
        the file packaged in ``lamost_ostar/data/templates.npz``.  Files from
        before the STELIB/MKCLASS rebuild (no ``valid``, ``star``, ``kind``,
        ``ebv``, ``resolution``) load with defaults: all pixels valid, star =
        name, kind ``normal``, E(B-V) 0, resolution by source.

    Returns
    -------
    TemplateLibrary
        Fluxes as float32 ``(T, NPIX)`` on :func:`~lamost_ostar.preprocess.grid_wavelength`.
    """
    path = DEFAULT_PATH if path is None else Path(path)
    return _load_library(path)


def _load_library(path: Path) -> TemplateLibrary:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return _load_from_dict(arrays, str(path))


def load_mkclass(kind: str = "rectified", path: str | Path | None = None) -> TemplateLibrary:
    """The MKCLASS standard spectra (Gray & Corbally) on the common grid.

    Parameters
    ----------
    kind : {"rectified", "normalised"}
        ``"rectified"``: ``libr36`` (continuum divided out, continuum = 1;
        O4 ... G0, all luminosity classes), for line measurements;
        ``"normalised"``: ``libnor36`` (flux-normalised: the continuum slope is
        kept, normalised to ~1 near 4500 A; O4 ... M9).
    path : str or Path, optional
        Default: the packaged ``lamost_ostar/data/mkclass.npz``.

    Returns
    -------
    TemplateLibrary
        ``source="mkclass"``, fluxes in the libraries' own normalisation (not
        re-normalised to median 1), ``valid`` only inside 3800-5600 A (air)
        minus the resampling-kernel edges and any zero-padded ends, flux 0
        elsewhere.  ``name``/``star`` ``mkclass:<type>`` (``mkclass:O9V``);
        ``spt``, ``mk``, ``subtype``, ``lumclass`` decoded from the file names
        ``tTTTlLLp00.rbn``.  These are averages of MK standard stars (some of
        which are also MILES/STELIB stars).
    """
    if kind in ("normalized",):
        kind = "normalised"
    if kind not in ("rectified", "normalised"):
        raise ValueError(f"kind must be 'rectified' or 'normalised', got {kind!r}")
    path = MKCLASS_PATH if path is None else Path(path)
    prefix = {"rectified": "r36_", "normalised": "nor36_"}[kind]
    with np.load(path, allow_pickle=False) as data:
        sub = {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}
        sub["loglam0"], sub["dloglam"] = data["loglam0"], data["dloglam"]
    return _load_from_dict(sub, f"{path}[{kind}]")


def _load_from_dict(d: dict, label: str) -> TemplateLibrary:
    """A :class:`TemplateLibrary` from the arrays of a file written by the builder."""
    flux = _decode_flux(d)
    if not (np.isclose(float(d["loglam0"]), LOGLAM0) and np.isclose(float(d["dloglam"]), DLOGLAM)
            and flux.shape[-1] == NPIX):
        raise ValueError(f"{label}: template grid does not match the preprocess grid")
    kwargs = dict(wave=grid_wavelength(), flux=flux)
    for f in fields(TemplateLibrary):
        if f.name in ("wave", "flux"):
            continue
        if f.name == "valid":
            if "valid_bits" in d:
                kwargs["valid"] = np.unpackbits(d["valid_bits"], axis=-1, count=NPIX).astype(bool)
            continue
        if f.name not in d:
            continue
        arr = np.asarray(d[f.name])
        if arr.ndim == 0:
            continue                    # old files: "resolution" was the build's scalar target
        if f.name in _STRING_FIELDS:
            arr = arr.astype(str)
        elif f.name in _FLOAT64_FIELDS:
            arr = arr.astype(np.float64)
        else:
            arr = arr.astype(np.float32)
        kwargs[f.name] = arr
    return TemplateLibrary(**kwargs)


def _decode_flux(data) -> np.ndarray:
    """Flux block from the file as float32.

    The packaged file stores float16 as two byte planes ``flux16`` (uint8
    ``(2, T, NPIX)``, little-endian low byte first), which compress much better
    than interleaved bytes; a plain ``flux`` array is accepted too.
    """
    if "flux16" in data:
        planes = np.asarray(data["flux16"], dtype=np.uint8)
        interleaved = np.ascontiguousarray(np.moveaxis(planes, 0, -1))
        return interleaved.view("<f2")[..., 0].astype(np.float32)
    return np.asarray(data["flux"], dtype=np.float32)


# --------------------------------------------------------------------------
# spectral types

_LUM_RE = re.compile(r"(Iab|Ia0|Ia|Ib|III|II|IV|VI|V|I)")
_TYPE_RE = re.compile(r"([OBAFGKM])\s*([0-9](?:\.[0-9]+)?)?")
#: Non-MK types: Wolf-Rayet (WN, WC, WR...) and white dwarfs (DA, DB, DC, DO, DQ, DZ).
_NON_MK_RE = re.compile(r"^(W[NCRO]|D[ABCOQZ])")


def parse_spectral_type(spt: str, mk: str | None = None) -> tuple[str, float, str]:
    """Split an MK spectral type string into letter, subtype and luminosity class.

    Parameters
    ----------
    spt : str
        e.g. ``"B9.5III"``, ``"08 Ib"`` (a zero typed for the letter O),
        ``"B7 III-IV"``, ``"sd:F"``, ``"K3V"``, ``"O9.5Iae"``, ``"O6/O7"``
        (first type), ``"O8V+..."``, ``"B0e"``, ``"O5e"`` (no class).
        Wolf-Rayet (``WN``, ``WC``) and white-dwarf (``DA``, ``DC``) types are
        not MK types: they give ``("", nan, "")``.
    mk : str, optional
        MK letter known from elsewhere (used when ``spt`` has none, and to read
        a leading digit ``0`` as the letter ``O`` for O stars).

    Returns
    -------
    letter : str
        MK letter or ``""``.
    subtype : float
        Numeric subtype, NaN if absent.
    lumclass : str
        First luminosity class found (``"VI"`` for ``sd`` subdwarfs), or ``""``.
    """
    s = (spt or "").strip()
    if _NON_MK_RE.match(s):
        return "", float("nan"), ""
    if mk == "O" and re.match(r"^0[0-9]", s):
        s = "O" + s[1:]
    lum = ""
    if s.lower().startswith("sd"):
        lum = "VI"
        s = s[2:].lstrip(":")
    m = _TYPE_RE.search(s)
    letter = m.group(1) if m else (mk or "")
    subtype = float(m.group(2)) if (m and m.group(2)) else float("nan")
    if not lum:
        rest = s[m.end():] if m else s
        lm = _LUM_RE.search(rest)
        lum = lm.group(1) if lm else ""
    return letter, subtype, lum


def air_to_vacuum(wave_air: np.ndarray) -> np.ndarray:
    """Convert air wavelengths [A] to vacuum (Ciddor 1996, as used by SDSS/astropy).

    Parameters
    ----------
    wave_air : numpy.ndarray
        Air wavelengths in Angstrom (valid above ~2000 A).

    Returns
    -------
    numpy.ndarray
        Vacuum wavelengths in Angstrom.
    """
    wave_air = np.asarray(wave_air, dtype=np.float64)
    sigma2 = (1e4 / wave_air) ** 2
    fact = 1.0 + 5.792105e-2 / (238.0185 - sigma2) + 1.67917e-3 / (57.362 - sigma2)
    return wave_air * fact


def vacuum_to_air(wave_vac: np.ndarray) -> np.ndarray:
    """Invert :func:`air_to_vacuum` (fixed-point iteration, < 1e-8 A error)."""
    wave_vac = np.asarray(wave_vac, dtype=np.float64)
    air = wave_vac / 1.00029
    for _ in range(4):
        air = air * wave_vac / air_to_vacuum(air)
    return air
