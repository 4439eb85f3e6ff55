"""Labelled spectra and the data sets of the paper (Table 1), split by star.

Every spectrum carries the identifier of the *star* it comes from (the LAMOST
``DESIG`` for real LAMOST files, the template name for library stars and mock
spectra drawn from a template).  All splits in this module are made over stars,
never over files or realisations, so that no star is ever in two splits
(:func:`assert_disjoint_stars` checks it).

Sources of labelled spectra
---------------------------
* :func:`load_lamost` -- the real LAMOST files listed in a ``manifest.csv``
  (the MK letter of the LAMOST pipeline; A, F, G, K, M -- there is no O or B
  spectrum among them).
* :func:`library_spectra` -- LAMOST-like realisations of the packaged template
  library (real MILES and Pickles spectra at LAMOST resolution), with
  reddening, radial velocity and noise drawn like the mock release.  The six
  real O stars (MILES HD057060, HD057061, HD209975; Pickles o5v, o8iii, o9v)
  are the only real O-type spectra we have.
* :func:`load_labelled_release` -- any release with a labels CSV (path or
  obsid + MK class), used by ``lamost-ostar retrain``.

The paper's data sets 1-5 are rebuilt by :func:`build_paper_datasets` with the
counts scaled down (see :class:`PaperScale`).
"""
from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CLASSES_7: tuple[str, ...] = ("O", "B", "A", "F", "G", "K", "M")
CLASSES_4: tuple[str, ...] = ("O", "F", "G", "K")

#: The real O-type stars of the template library (name in the packaged library).
REAL_O_STARS: tuple[str, ...] = ("HD057060", "HD057061", "HD209975", "o5v", "o8iii", "o9v")


def default_data_dir() -> Path:
    """Return the shared real-data directory, found relative to the repository.

    ``<repo>/../shared/data`` (the layout of the development machine).  The
    path may not exist; callers check.
    """
    return Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------
# the record
# --------------------------------------------------------------------------
@dataclass
class LabelledSpectra:
    """A batch of standardised spectra with MK labels and star identifiers.

    Attributes
    ----------
    x : numpy.ndarray
        float32 (N, NPIX) standardised flux (``x / ||x||_2``).
    labels : numpy.ndarray
        (N,) MK letter of each spectrum.
    star : numpy.ndarray
        (N,) identifier of the star the spectrum comes from; splits are made
        over these.
    source : numpy.ndarray
        (N,) where the spectrum comes from: ``"lamost"``, ``"library"``,
        ``"mock"``, ``"lcgan"``, ``"sgan"``, ``"release"``.
    """

    x: np.ndarray
    labels: np.ndarray
    star: np.ndarray
    source: np.ndarray

    def __post_init__(self) -> None:
        self.x = np.asarray(self.x, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype="<U2")
        self.star = np.asarray(self.star, dtype=object).astype(str)
        self.source = np.asarray(self.source, dtype=object).astype(str)
        n = len(self.x)
        if not (len(self.labels) == len(self.star) == len(self.source) == n):
            raise ValueError("x, labels, star and source must have the same length")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def npix(self) -> int:
        """Number of pixels per spectrum."""
        return int(self.x.shape[1]) if self.x.ndim == 2 else 0

    def subset(self, index: np.ndarray | Sequence[int]) -> "LabelledSpectra":
        """Return the spectra at ``index`` (integer or boolean index)."""
        index = np.asarray(index)
        return LabelledSpectra(self.x[index], self.labels[index], self.star[index], self.source[index])

    def only(self, classes: Iterable[str]) -> "LabelledSpectra":
        """Return only the spectra whose label is in ``classes``."""
        return self.subset(np.isin(self.labels, list(classes)))

    def counts(self) -> dict[str, int]:
        """Number of spectra per label (sorted in MK order)."""
        u, c = np.unique(self.labels, return_counts=True)
        order = {k: i for i, k in enumerate(CLASSES_7)}
        return {str(k): int(v) for k, v in sorted(zip(u, c), key=lambda t: order.get(t[0], 99))}

    def star_counts(self) -> dict[str, int]:
        """Number of distinct stars per label."""
        out = {}
        for k in self.counts():
            out[k] = int(len(np.unique(self.star[self.labels == k])))
        return out

    def describe(self) -> str:
        """One-line description: spectra (stars) per class and sources."""
        sc = self.star_counts()
        parts = [f"{k}:{n} ({sc[k]} stars)" for k, n in self.counts().items()]
        src = ", ".join(f"{s}={int((self.source == s).sum())}" for s in np.unique(self.source))
        return f"{len(self)} spectra [{'; '.join(parts)}] sources: {src}"

    def y(self, classes: Sequence[str]) -> np.ndarray:
        """Integer class index of each spectrum in ``classes`` (ValueError if absent)."""
        lut = {c: i for i, c in enumerate(classes)}
        try:
            return np.array([lut[c] for c in self.labels], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"label {exc.args[0]!r} is not one of {tuple(classes)}") from None

    @staticmethod
    def empty(npix: int) -> "LabelledSpectra":
        """An empty batch with ``npix`` pixels."""
        return LabelledSpectra(np.zeros((0, npix), np.float32), [], [], [])

    @staticmethod
    def concat(parts: Sequence["LabelledSpectra"]) -> "LabelledSpectra":
        """Concatenate batches (all must have the same number of pixels)."""
        parts = [p for p in parts if p is not None]
        nonempty = [p for p in parts if len(p)]
        if not nonempty:
            return parts[0] if parts else LabelledSpectra.empty(0)
        return LabelledSpectra(
            np.concatenate([p.x for p in nonempty]),
            np.concatenate([p.labels for p in nonempty]),
            np.concatenate([p.star for p in nonempty]),
            np.concatenate([p.source for p in nonempty]),
        )


# --------------------------------------------------------------------------
# splitting by star
# --------------------------------------------------------------------------
def split_by_star(
    data: LabelledSpectra,
    fractions: Sequence[float],
    rng: np.random.Generator,
    min_stars: int = 1,
) -> list[LabelledSpectra]:
    """Split ``data`` into parts of about ``fractions`` of the stars, per class.

    The split is stratified by class and made over *stars*: all spectra of a
    star go to the same part.  For each class the stars are shuffled and dealt
    out so that each part gets about its fraction of the stars; while a class
    has enough stars each part gets at least ``min_stars`` of them (earlier
    parts are served first when it has too few).

    Parameters
    ----------
    data : LabelledSpectra
        Spectra to split.
    fractions : sequence of float
        Fraction of stars in each part (normalised to sum 1).
    rng : numpy.random.Generator
        Source of randomness.
    min_stars : int
        Minimum number of stars per class in each part when possible.

    Returns
    -------
    list of LabelledSpectra
        One per fraction; no star is in two of them.
    """
    f = np.asarray(fractions, dtype=float)
    if f.ndim != 1 or len(f) < 1 or np.any(f < 0) or f.sum() <= 0:
        raise ValueError("fractions must be non-negative and sum to > 0")
    f = f / f.sum()
    part_of = np.full(len(data), -1, dtype=np.int64)
    for label in np.unique(data.labels):
        in_class = data.labels == label
        stars = np.unique(data.star[in_class])
        rng.shuffle(stars)
        n = len(stars)
        want = np.floor(f * n).astype(int)
        # guarantee minimum stars per part where possible, serving early parts first
        for i in range(len(f)):
            if f[i] > 0 and want[i] < min_stars and want.sum() < n:
                want[i] = min(min_stars, n - want.sum() + want[i])
        while want.sum() < n:  # hand out the remainder by largest shortfall
            want[int(np.argmax(f * n - want))] += 1
        while want.sum() > n:
            want[int(np.argmax(want - f * n))] -= 1
        bounds = np.concatenate([[0], np.cumsum(want)])
        lut = {}
        for i in range(len(f)):
            for s in stars[bounds[i]:bounds[i + 1]]:
                lut[s] = i
        idx = np.flatnonzero(in_class)
        part_of[idx] = [lut[s] for s in data.star[idx]]
    return [data.subset(part_of == i) for i in range(len(f))]


def assert_disjoint_stars(*parts: LabelledSpectra) -> None:
    """Raise ``AssertionError`` if any star appears in two of ``parts``."""
    seen: dict[str, int] = {}
    for i, p in enumerate(parts):
        for s in np.unique(p.star):
            if s in seen and seen[s] != i:
                raise AssertionError(f"star {s!r} is in split {seen[s]} and split {i}")
            seen[s] = i


def resample_count(data: LabelledSpectra, n: int, rng: np.random.Generator) -> LabelledSpectra:
    """Return exactly ``n`` spectra of ``data``: all of them, duplicated or subsampled.

    Up-sampling duplicates whole spectra (the paper's Data set 3 "up-sampled
    (duplicated)"); each spectrum is used ``n // len`` or ``n // len + 1`` times.
    """
    m = len(data)
    if m == 0:
        if n:
            raise ValueError("cannot resample an empty set")
        return data
    if n <= m:
        return data.subset(np.sort(rng.choice(m, size=n, replace=False)))
    idx = np.concatenate([np.tile(np.arange(m), n // m), rng.choice(m, size=n % m, replace=False)])
    return data.subset(idx)


def per_class(data: LabelledSpectra, n: int, classes: Sequence[str], rng: np.random.Generator) -> LabelledSpectra:
    """``n`` spectra of each of ``classes`` (duplicating when a class has fewer)."""
    return LabelledSpectra.concat([resample_count(data.only([c]), n, rng) for c in classes])


# --------------------------------------------------------------------------
# real LAMOST spectra
# --------------------------------------------------------------------------
def _mk_from_manifest(row: dict[str, str]) -> str | None:
    if row.get("cls", "").strip().upper() != "STAR":
        return None
    mk = row.get("mk", "").strip().upper()
    if not mk:
        sub = row.get("subclass", "").strip()
        # "dM0", "gM0", "sdM1": letter after the luminosity prefix
        for ch in sub:
            if ch.upper() in CLASSES_7 and ch.isupper():
                mk = ch
                break
    return mk if mk in CLASSES_7 else None


def load_lamost(
    data_dir: str | Path | None = None,
    classes: Sequence[str] = CLASSES_7,
) -> LabelledSpectra:
    """Read the real LAMOST spectra of a shared ``manifest.csv``.

    Only rows with CLASS ``STAR`` and an MK letter in ``classes`` are used
    (the letter from the manifest's ``mk`` column, or from SUBCLASS such as
    ``dM1``).  Files that cannot be read (e.g. medium-resolution) are skipped.
    The star identifier is the designation ``DESIG``.

    Parameters
    ----------
    data_dir : path, optional
        The shared data directory (holding ``lamost/manifest.csv``) or the
        ``lamost`` directory itself. Default: :func:`default_data_dir`.
    classes : sequence of str
        MK letters to keep.
    """
    from . import io, preprocess

    base = Path(data_dir) if data_dir is not None else default_data_dir()
    lam = base / "lamost" if (base / "lamost" / "manifest.csv").exists() else base
    manifest = lam / "manifest.csv"
    if not manifest.exists():
        raise FileNotFoundError(f"no LAMOST manifest at {manifest}")
    paths, labels, stars = [], [], []
    with open(manifest, newline="") as fh:
        for row in csv.DictReader(fh):
            mk = _mk_from_manifest(row)
            if mk is None or mk not in classes:
                continue
            paths.append(str(lam / row["file"]))
            labels.append(mk)
            stars.append(row.get("desig") or row["file"])
    batch = io.read_spectra(paths)
    by_path = {s.path: s for s in batch.spectra}
    keep = [i for i, p in enumerate(paths) if p in by_path]
    spectra = [by_path[paths[i]] for i in keep]
    if not spectra:
        return LabelledSpectra.empty(preprocess.NPIX)
    prep = preprocess.prepare(spectra)
    return LabelledSpectra(
        prep.x,
        [labels[i] for i in keep],
        [stars[i] for i in keep],
        ["lamost"] * len(keep),
    )
