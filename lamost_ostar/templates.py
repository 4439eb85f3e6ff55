"""Packaged library of real stellar template spectra (O ... M) on the common grid.

The library is built by ``scripts/build_templates.py`` from two real empirical
libraries (``../shared/data/libraries``):

* **MILES** v9.1 (Sanchez-Blazquez et al. 2006; 3540-7410 A in air, FWHM 2.5 A):
  every star with a usable MK type except the hot subdwarf HD149382, converted
  to vacuum wavelengths, degraded to LAMOST resolution (R ~ 1800, Gaussian in
  log-lambda) and resampled onto :func:`lamost_ostar.preprocess.grid_wavelength`.
  MILES stops at ~7412 A (vacuum), so each star is extended redward with the
  Pickles template nearest in spectral type and luminosity class, scaled by a
  smooth power law fitted over an overlap window; ``orig_max`` records where
  the original MILES data end (see :attr:`TemplateLibrary.original`).
* **Pickles** (1998) UVILIB (1150-10620 A, R ~ 500): all 108 solar-abundance
  spectra resampled onto the grid (their resolution is already coarser than
  LAMOST's, so they are not smoothed further).

Fluxes are normalised to a median of 1 over the grid and stored as float16
(relative precision 4.9e-4; loaded as float32).  The six real O-type
spectra are MILES HD057060 (O7Ia), HD057061 (O9Ib), HD209975 (O8Ib) and
Pickles o5v, o8iii, o9v.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import numpy as np

from lamost_ostar.preprocess import DLOGLAM, LOGLAM0, NPIX, grid_wavelength

__all__ = [
    "MK_LETTERS",
    "DEFAULT_PATH",
    "TemplateLibrary",
    "load_templates",
    "parse_spectral_type",
    "air_to_vacuum",
    "vacuum_to_air",
]

#: MK letters in temperature order.
MK_LETTERS: tuple[str, ...] = ("O", "B", "A", "F", "G", "K", "M")

#: Name of the packaged data file inside ``lamost_ostar/data``.
_DATA_FILE = "templates.npz"


def _default_path() -> Path:
    return Path(str(resources.files("lamost_ostar") / "data" / _DATA_FILE))


#: Location of the packaged template file.
DEFAULT_PATH: Path = _default_path()


@dataclass
class TemplateLibrary:
    """Real stellar template spectra on the common log-lambda grid.

    Attributes
    ----------
    wave : numpy.ndarray
        float64 ``(NPIX,)`` vacuum wavelength grid [A].
    flux : numpy.ndarray
        float32 ``(T, NPIX)`` flux density (F_lambda), median 1 per template.
    mk : numpy.ndarray
        str ``(T,)`` MK letter, one of ``O B A F G K M``.
    spt : numpy.ndarray
        str ``(T,)`` spectral type as given by the source (``O7Ia``, ``B9.5V``).
    subtype : numpy.ndarray
        float32 ``(T,)`` numeric subtype (``7.0`` for O7), NaN if unknown.
    lumclass : numpy.ndarray
        str ``(T,)`` luminosity class (``Ia``, ``Iab``, ``Ib``, ``I``, ``II``,
        ``III``, ``IV``, ``V``, ``VI`` for subdwarfs), ``""`` if unknown.
    teff, logg, feh : numpy.ndarray
        float32 ``(T,)`` stellar parameters (NaN where unknown; Pickles
        spectra have no Teff/logg and [Fe/H] = 0, the library being solar).
    name : numpy.ndarray
        str ``(T,)`` star name (MILES) or file stem (Pickles).
    source : numpy.ndarray
        str ``(T,)`` ``"miles"`` or ``"pickles"``.
    orig_min, orig_max : numpy.ndarray
        float64 ``(T,)`` vacuum wavelength range [A] covered by the source's
        own data; outside it the flux is an extension.
    extension : numpy.ndarray
        str ``(T,)`` name of the Pickles spectrum used to extend a MILES star
        (``""`` when not extended).
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

    def __len__(self) -> int:
        return int(self.flux.shape[0])

    @property
    def original(self) -> np.ndarray:
        """bool ``(T, NPIX)``: True where the flux is the source's own data."""
        w = self.wave[None, :]
        return (w >= self.orig_min[:, None]) & (w <= self.orig_max[:, None])

    def counts(self) -> dict[str, int]:
        """Number of templates per MK letter (in ``MK_LETTERS`` order)."""
        return {k: int(np.sum(self.mk == k)) for k in MK_LETTERS}

    def _take(self, index: np.ndarray) -> "TemplateLibrary":
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kwargs[f.name] = value if f.name == "wave" else value[index]
        return TemplateLibrary(**kwargs)

    def select(self, mk: str | tuple[str, ...] | list[str] | None = None, *,
               source: str | None = None, lumclass: str | tuple[str, ...] | None = None,
               name: str | None = None, original_only: bool = False) -> "TemplateLibrary":
        """Return the subset of templates matching all given criteria.

        Parameters
        ----------
        mk : str or sequence of str, optional
            MK letter(s), e.g. ``"O"`` or ``("O", "B")``.
        source : {"miles", "pickles"}, optional
        lumclass : str or sequence of str, optional
            Luminosity class(es); ``"I"`` also matches ``Ia``, ``Iab``, ``Ib``.
        name : str, optional
            Exact template name.
        original_only : bool
            Keep only templates whose own data cover the whole grid.

        Returns
        -------
        TemplateLibrary
        """
        keep = np.ones(len(self), dtype=bool)
        if mk is not None:
            keep &= np.isin(self.mk, [mk] if isinstance(mk, str) else list(mk))
        if source is not None:
            keep &= self.source == source
        if lumclass is not None:
            wanted = [lumclass] if isinstance(lumclass, str) else list(lumclass)
            base = np.array([_lum_base(x) for x in self.lumclass])
            keep &= np.isin(self.lumclass, wanted) | np.isin(base, wanted)
        if name is not None:
            keep &= self.name == name
        if original_only:
            keep &= (self.orig_min <= self.wave[0]) & (self.orig_max >= self.wave[-1])
        return self._take(np.flatnonzero(keep))

    def index(self, name: str) -> int:
        """Row index of the template called ``name`` (KeyError if absent)."""
        hits = np.flatnonzero(self.name == name)
        if hits.size == 0:
            raise KeyError(name)
        return int(hits[0])


def _lum_base(lumclass: str) -> str:
    return "I" if lumclass in ("Ia", "Iab", "Ib", "Ia0", "I") else lumclass


_STRING_FIELDS = ("mk", "spt", "lumclass", "name", "source", "extension")


def load_templates(path: str | Path | None = None) -> TemplateLibrary:
    """Load the template library.

    Parameters
    ----------
    path : str or Path, optional
        An ``.npz`` file written by ``scripts/build_templates.py``; default:
        the file packaged in ``lamost_ostar/data/templates.npz``.

    Returns
    -------
    TemplateLibrary
        Fluxes as float32 ``(T, NPIX)`` on :func:`~lamost_ostar.preprocess.grid_wavelength`.
    """
    path = DEFAULT_PATH if path is None else Path(path)
    with np.load(path, allow_pickle=False) as data:
        loglam0 = float(data["loglam0"])
        dloglam = float(data["dloglam"])
        if not (np.isclose(loglam0, LOGLAM0) and np.isclose(dloglam, DLOGLAM)
                and data["flux16" if "flux16" in data.files else "flux"].shape[-1] == NPIX):
            raise ValueError(f"{path}: template grid does not match the preprocess grid")
        flux = _decode_flux(data)
        kwargs = dict(wave=grid_wavelength(), flux=flux)
        for f in fields(TemplateLibrary):
            if f.name in ("wave", "flux"):
                continue
            arr = data[f.name]
            if f.name in _STRING_FIELDS:
                arr = arr.astype(str)
            elif f.name in ("orig_min", "orig_max"):
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
    if "flux16" in data.files:
        planes = np.asarray(data["flux16"], dtype=np.uint8)
        interleaved = np.ascontiguousarray(np.moveaxis(planes, 0, -1))
        return interleaved.view("<f2")[..., 0].astype(np.float32)
    return np.asarray(data["flux"], dtype=np.float32)


# --------------------------------------------------------------------------
# spectral types

_LUM_RE = re.compile(r"(Iab|Ia0|Ia|Ib|III|II|IV|VI|V|I)")
_TYPE_RE = re.compile(r"([OBAFGKM])\s*([0-9](?:\.[0-9]+)?)?")


def parse_spectral_type(spt: str, mk: str | None = None) -> tuple[str, float, str]:
    """Split an MK spectral type string into letter, subtype and luminosity class.

    Parameters
    ----------
    spt : str
        e.g. ``"B9.5III"``, ``"08 Ib"`` (a zero typed for the letter O),
        ``"B7 III-IV"``, ``"sd:F"``, ``"K3V"``.
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
