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
import re
from collections.abc import Iterable, Mapping, Sequence
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
    xn : numpy.ndarray or None
        float32 (N, NPIX) continuum-normalised flux (the second model channel,
        :func:`lamost_ostar.preprocess.normalise`); computed from ``x`` on
        first use when not given (:attr:`normalised`).
    meta : dict
        Optional per-spectrum arrays (each (N,)) describing how a spectrum was
        made, e.g. ``ebv``, ``snr_g``, ``subtype``, ``lumclass``, ``kind``;
        kept through :meth:`subset` and :meth:`concat` (keys missing in a part
        are filled with NaN / ``""``).
    """

    x: np.ndarray
    labels: np.ndarray
    star: np.ndarray
    source: np.ndarray
    xn: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.x = np.asarray(self.x, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype="<U2")
        self.star = np.asarray(self.star, dtype=object).astype(str)
        self.source = np.asarray(self.source, dtype=object).astype(str)
        n = len(self.x)
        if not (len(self.labels) == len(self.star) == len(self.source) == n):
            raise ValueError("x, labels, star and source must have the same length")
        if self.xn is not None:
            self.xn = np.asarray(self.xn, dtype=np.float32)
            if self.xn.shape != self.x.shape:
                raise ValueError("xn must have the shape of x")
        self.meta = {k: np.asarray(v) for k, v in (self.meta or {}).items()}
        for k, v in self.meta.items():
            if len(v) != n:
                raise ValueError(f"meta[{k!r}] has {len(v)} values for {n} spectra")

    @property
    def normalised(self) -> np.ndarray:
        """The continuum-normalised flux (computed from ``x``, unmasked, if not given)."""
        if self.xn is None:
            from .preprocess import normalise

            self.xn = normalise(self.x, np.zeros(self.x.shape, bool))[0] if len(self) else \
                np.zeros_like(self.x)
        return self.xn

    def inputs(self, channels: int = 2) -> np.ndarray:
        """Model input ``(N, NPIX, channels)``: ``x`` (and ``xn`` for 2 channels)."""
        if channels == 1:
            return self.x[..., None]
        if channels != 2:
            raise ValueError(f"channels must be 1 or 2, got {channels}")
        return np.stack([self.x, self.normalised], axis=-1)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def npix(self) -> int:
        """Number of pixels per spectrum."""
        return int(self.x.shape[1]) if self.x.ndim == 2 else 0

    def subset(self, index: np.ndarray | Sequence[int]) -> "LabelledSpectra":
        """Return the spectra at ``index`` (integer or boolean index)."""
        index = np.asarray(index)
        return LabelledSpectra(self.x[index], self.labels[index], self.star[index], self.source[index],
                               xn=None if self.xn is None else self.xn[index],
                               meta={k: v[index] for k, v in self.meta.items()})

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
        xn = None
        if any(p.xn is not None for p in nonempty):
            xn = np.concatenate([p.normalised for p in nonempty])
        keys = sorted({k for p in nonempty for k in p.meta})
        meta = {}
        for k in keys:
            kind = next(p.meta[k].dtype.kind for p in nonempty if k in p.meta)
            fill = "" if kind in "USO" else np.nan
            meta[k] = np.concatenate([p.meta[k] if k in p.meta else np.full(len(p), fill, dtype=object)
                                      for p in nonempty])
            if kind not in "USO":
                meta[k] = meta[k].astype(np.float64)
            else:
                meta[k] = meta[k].astype(str)
        return LabelledSpectra(
            np.concatenate([p.x for p in nonempty]),
            np.concatenate([p.labels for p in nonempty]),
            np.concatenate([p.star for p in nonempty]),
            np.concatenate([p.source for p in nonempty]),
            xn=xn, meta=meta,
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


#: Label of real LAMOST spectra that are not stars of an MK class (galaxies, QSOs,
#: "Unknown"): never a training class, but every one must stay a non-candidate.
OTHER_LABEL = "N"


def load_lamost(
    data_dir: str | Path | None = None,
    classes: Sequence[str] = CLASSES_7,
    include_other: bool = False,
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
    include_other : bool
        Also return the readable non-star / unclassified files, labelled
        :data:`OTHER_LABEL` (for false-candidate checks, never for training).
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
            if mk is None and include_other:
                mk = OTHER_LABEL
            elif mk is None or mk not in classes:
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
    snr_g = np.array([np.nan if (s.snr or {}).get("g") is None else s.snr["g"] for s in spectra])
    return LabelledSpectra(
        prep.x,
        [labels[i] for i in keep],
        [stars[i] for i in keep],
        ["lamost"] * len(keep),
        xn=prep.xn,
        meta={"snr_g": snr_g, "path": np.array([paths[i] for i in keep])},
    )


# --------------------------------------------------------------------------
# template library stars made LAMOST-like (through the mock simulator)
# --------------------------------------------------------------------------
def library_star_ids(lib) -> np.ndarray:
    """Split unit ("star") of each template of a :class:`~lamost_ostar.templates.TemplateLibrary`.

    Normally the template name.  For the O class, MILES stars whose red end
    (beyond MILES' 7410 A) was filled from a Pickles O star are grouped with
    that Pickles star (``HD057060+HD209975+o8iii``), so that no O spectrum in a
    test split shares any pixel with an O star of another split.  For the other
    classes the Pickles extension templates are not stars of the data set
    (the mock simulator uses MILES stars only where a class has >= 5 of them).
    """
    names = np.asarray(lib.star).astype(str)  # split unit: one id per physical star (templates.py)
    ids = names.astype(object)
    is_o = np.asarray(lib.mk) == "O"
    parent = {n: n for n in names[is_o]}

    def find(a: str) -> str:
        while parent[a] != a:
            a = parent[a]
        return a

    for n, ext in zip(names[is_o], np.asarray(lib.extension).astype(str)[is_o]):
        if ext in parent:
            ra, rb = find(n), find(ext)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, list[str]] = {}
    for n in names[is_o]:
        groups.setdefault(find(n), []).append(n)
    for members in groups.values():
        gid = "+".join(sorted(members))
        ids[np.isin(names, members)] = gid
    return ids.astype(str)


def _prepare_simulated(sim):
    """:class:`~lamost_ostar.preprocess.PreparedBatch` of a native-grid :class:`SimulatedSpectra`.

    The same resampling, masking, standardisation and continuum normalisation
    as a real file gets in :func:`lamost_ostar.preprocess.prepare`.
    """
    from . import mock, preprocess

    n = len(sim)
    if n == 0:
        z = np.zeros((0, preprocess.NPIX), np.float32)
        return preprocess.PreparedBatch(x=z, mask=z.astype(bool), good_fraction=np.zeros(0, np.float32),
                                        ivar=z, norm=np.zeros(0), xn=z)
    return preprocess.prepare_arrays(
        sim.flux, sim.ivar, np.asarray(sim.npix), andmask=sim.andmask,
        coeff0=np.full(n, mock.NATIVE_COEFF0), coeff1=np.full(n, mock.NATIVE_COEFF1),
    )


#: truth-record keys kept as :attr:`LabelledSpectra.meta` of simulated spectra
_SIM_META = ("ebv", "ebv_total", "r_v", "resolution", "rv", "snr_g", "kind", "subclass")


def _simulated(sim, labels, star, source: str) -> LabelledSpectra:
    """LabelledSpectra of a native-grid simulation (both channels, truth as meta)."""
    prep = _prepare_simulated(sim)
    meta = {}
    for k in _SIM_META:
        if sim.truth and k in sim.truth[0]:
            meta[k] = np.array([t[k] for t in sim.truth])
    return LabelledSpectra(prep.x, labels, star, [source] * len(prep.x), xn=prep.xn, meta=meta)


def library_realisations(
    lib,
    n_per_star: int | Sequence[int],
    rng: np.random.Generator,
    mock_config=None,
) -> LabelledSpectra:
    """Independent LAMOST-like realisations of every template of ``lib``, one star at a time.

    Each realisation is the template itself (no interpolation with another
    star) seen through the mock simulator of :mod:`lamost_ostar.mock`: radial
    velocity, interstellar reddening (per-class E(B-V)), flux-calibration
    distortion, S/N drawn from the real LAMOST SNRG distribution with noise
    from the real instrument model (ivar consistent), bad pixels; then read onto
    the common grid and standardised exactly like a real file.

    Parameters
    ----------
    lib : TemplateLibrary
        Templates to realise (e.g. ``load_templates().select("O")``).
    n_per_star : int or sequence of int
        Realisations per template.
    rng : numpy.random.Generator
        Source of randomness.
    mock_config : MockConfig, optional
        Physics knobs of the simulator.

    Returns
    -------
    LabelledSpectra
        ``source="library"``, star from :func:`library_star_ids`.
    """
    from . import mock

    counts = np.broadcast_to(np.asarray(n_per_star, dtype=int), (len(lib),))
    ids = library_star_ids(lib)
    parts = []
    for i in range(len(lib)):
        if counts[i] <= 0:
            continue
        sub = lib._take(np.array([i]))
        sim = mock.simulate_spectra(0, rng=rng, grid="native", mk=[str(lib.mk[i])] * int(counts[i]),
                                    templates=sub, config=mock_config)
        k = len(sim)
        parts.append(_simulated(sim, [str(lib.mk[i])] * k, [ids[i]] * k, "library"))
    if not parts:
        from .preprocess import NPIX
        return LabelledSpectra.empty(NPIX)
    return LabelledSpectra.concat(parts)


def mock_mixtures(
    lib,
    n_per_class: dict[str, int],
    rng: np.random.Generator,
    mock_config=None,
) -> LabelledSpectra:
    """Mock spectra interpolated between neighbouring templates of ``lib`` (the mock release's recipe).

    Only templates of ``lib`` are used, so drawing from a split's templates
    keeps the result inside that split.  The star of a mixture is the
    dominant template's split unit (:func:`library_star_ids`).
    """
    from . import mock

    mk = [c for c, k in n_per_class.items() for _ in range(int(k)) if np.any(lib.mk == c)]
    if not mk:
        from .preprocess import NPIX
        return LabelledSpectra.empty(NPIX)
    sim = mock.simulate_spectra(0, rng=rng, grid="native", mk=mk, templates=lib, config=mock_config)
    ids = dict(zip(np.asarray(lib.name).astype(str), library_star_ids(lib)))
    star = [ids[t["template1"] if t["weight1"] >= 0.5 else t["template2"]] for t in sim.truth]
    return _simulated(sim, [t["mk"] for t in sim.truth], star, "mock")


def split_library(lib, fractions: Sequence[float], rng: np.random.Generator,
                  min_stars: int = 1) -> list:
    """Split a template library by star (:func:`library_star_ids`), stratified by class."""
    ids = library_star_ids(lib)
    proxy = LabelledSpectra(np.zeros((len(lib), 1), np.float32), np.asarray(lib.mk).astype(str), ids,
                            ["library"] * len(lib))
    proxy_idx = np.arange(len(lib))
    parts = split_by_star(proxy, fractions, rng, min_stars=min_stars)
    out = []
    for p in parts:
        keep = np.isin(ids, np.unique(p.star))
        out.append(lib._take(proxy_idx[keep]))
    return out


# --------------------------------------------------------------------------
# the 7-class training / validation / test splits
# --------------------------------------------------------------------------
@dataclass
class SplitPlan:
    """How many spectra of each class each split should hold.

    Attributes
    ----------
    fractions : tuple of float
        Fractions of the *stars* in train / validation / test.
    n_per_class : tuple of int
        Target spectra per class in train / validation / test: the real
        LAMOST spectra of the split's stars first, then LAMOST-like
        realisations of the split's library stars (``pure_fraction`` of the
        rest) and mock mixtures of neighbouring library stars of the split.
    pure_fraction : float
        Share of the library part drawn as single-star realisations (the rest
        are mixtures).  Validation and test use single-star realisations only.
    classes : tuple of str
        Classes to build.
    """

    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    n_per_class: tuple[int, int, int] = (300, 80, 80)
    pure_fraction: float = 0.5
    classes: tuple[str, ...] = CLASSES_7


SPLIT_NAMES: tuple[str, str, str] = ("train", "validation", "test")


def build_seven_class_splits(
    plan: SplitPlan,
    rng: np.random.Generator,
    data_dir: str | Path | None = None,
    lib=None,
    lamost: LabelledSpectra | None = None,
    mock_config=None,
) -> dict[str, LabelledSpectra]:
    """Train / validation / test splits of real and mock spectra, made by star.

    Real LAMOST spectra (A, F, G, K, M; star = DESIG) and the template library
    (O ... M; star = :func:`library_star_ids`) are each split by star with
    ``plan.fractions``, stratified by class; every spectrum of a split is then
    drawn from that split's stars only.  O stars: the six real O stars of
    MILES and Pickles form four split units, so train/validation/test get
    2/1/1 of them.

    Returns
    -------
    dict
        ``{"train": ..., "validation": ..., "test": ...}``; no star is in two.
    """
    from .templates import load_templates

    lib = lib if lib is not None else load_templates()
    lib = lib.select(list(plan.classes))
    if lamost is None:
        try:
            lamost = load_lamost(data_dir, classes=plan.classes)
        except FileNotFoundError:
            lamost = None
    real_parts = (split_by_star(lamost, plan.fractions, rng) if lamost is not None and len(lamost)
                  else [None, None, None])
    lib_parts = split_library(lib, plan.fractions, rng)
    out: dict[str, LabelledSpectra] = {}
    for k, name in enumerate(SPLIT_NAMES):
        real = real_parts[k]
        sublib = lib_parts[k]
        target = plan.n_per_class[k]
        pure_share = plan.pure_fraction if name == "train" else 1.0
        pieces = [real] if real is not None else []
        n_pure: dict[str, int] = {}
        n_mix: dict[str, int] = {}
        for c in plan.classes:
            have = int((real.labels == c).sum()) if real is not None else 0
            rest = max(0, target - have)
            n_pure[c] = int(round(rest * pure_share))
            n_mix[c] = rest - n_pure[c]
        # single-star realisations: spread each class's count over its stars
        per_star = np.zeros(len(sublib), dtype=int)
        for c in plan.classes:
            idx = np.flatnonzero(sublib.mk == c)
            if idx.size == 0 or n_pure[c] == 0:
                continue
            order = rng.permutation(idx)
            per_star[order] += n_pure[c] // idx.size
            per_star[order[: n_pure[c] % idx.size]] += 1
        pieces.append(library_realisations(sublib, per_star, rng, mock_config))
        if any(n_mix.values()):
            pieces.append(mock_mixtures(sublib, n_mix, rng, mock_config))
        out[name] = LabelledSpectra.concat(pieces)
    assert_disjoint_stars(*out.values())
    return out


# --------------------------------------------------------------------------
# a labelled release (for ``retrain``)
# --------------------------------------------------------------------------
def parse_mk(label: str) -> str | None:
    """MK letter of a class label: ``"O"``, ``"O7V"``, ``"dM1"``, ``"gM0"`` ... (None if none)."""
    s = str(label).strip()
    for prefix in ("sd", "d", "g"):
        if s.startswith(prefix) and len(s) > len(prefix) and s[len(prefix)] in CLASSES_7:
            s = s[len(prefix):]
            break
    return s[0].upper() if s and s[0].upper() in CLASSES_7 else None


@dataclass
class LabelledRelease:
    """Spectra of a release read through a labels CSV."""

    data: LabelledSpectra
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path or obsid, reason)


def load_labelled_release(labels_csv: str | Path, release_dir: str | Path) -> LabelledRelease:
    """Read the spectra named in a labels CSV from a release directory.

    The CSV needs a class column (``mk``, ``class``, ``label`` or ``subclass``:
    an MK letter or a type such as ``O7V``/``dM1``) and either a ``path``
    column (relative to ``release_dir``, or absolute) or an ``obsid`` column
    (the release's files are then read to find each OBSID).  The star of a
    spectrum is the CSV's ``designation`` (or ``desig``/``star``) column, else
    the file's DESIG, else its OBSID, else its path.  A mock release's
    ``truth.csv`` is such a CSV.  Rows without a usable class, files that
    cannot be read and broken files are skipped (listed in ``skipped``).
    """
    from . import io, preprocess

    labels_csv, release_dir = Path(labels_csv), Path(release_dir)
    with open(labels_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = {c.lower(): c for c in (reader.fieldnames or [])}
        rows = list(reader)
    label_col = next((cols[c] for c in ("mk", "class", "label", "subclass") if c in cols), None)
    if label_col is None:
        raise ValueError(f"{labels_csv}: no class column (need one of mk, class, label, subclass)")
    path_col = cols.get("path")
    obsid_col = cols.get("obsid")
    if path_col is None and obsid_col is None:
        raise ValueError(f"{labels_csv}: need a 'path' or an 'obsid' column")
    star_col = next((cols[c] for c in ("designation", "desig", "star") if c in cols), None)
    skipped: list[tuple[str, str]] = []
    wanted: list[tuple[str, str, str | None]] = []     # (key, mk, star)
    for r in rows:
        mk = parse_mk(r.get(label_col, ""))
        key = (r.get(path_col) if path_col else None) or (r.get(obsid_col) if obsid_col else None) or ""
        if not key:
            skipped.append(("?", "no path or obsid"))
            continue
        if mk is None:
            skipped.append((key, f"class {r.get(label_col)!r} is not O/B/A/F/G/K/M"))
            continue
        if "broken" in cols and r.get(cols["broken"]):
            skipped.append((key, f"broken file ({r.get(cols['broken'])})"))
            continue
        wanted.append((key, mk, (r.get(star_col) or None) if star_col else None))
    if path_col is not None:
        paths = [str(p if (p := Path(k)).is_absolute() else release_dir / p) for k, _, _ in wanted]
        batch = io.read_spectra(paths)
        by_key = {s.path: s for s in batch.spectra}
        keys = paths
    else:
        files = sorted(str(p) for p in release_dir.rglob("*.fits*"))
        batch = io.read_spectra(files)
        by_key = {str(s.obsid): s for s in batch.spectra if s.obsid is not None}
        keys = [k for k, _, _ in wanted]
    errors = {e.path: e.reason for e in batch.errors}
    spectra, labels, stars, used = [], [], [], []
    for key, (_, mk, star) in zip(keys, wanted):
        s = by_key.get(key)
        if s is None:
            skipped.append((key, errors.get(key, "not found in the release")))
            continue
        spectra.append(s)
        labels.append(mk)
        stars.append(star or s.designation or (str(s.obsid) if s.obsid is not None else s.path))
        used.append(s.path)
    if not spectra:
        return LabelledRelease(LabelledSpectra.empty(preprocess.NPIX), [], skipped)
    prep = preprocess.prepare(spectra)
    from .lines import measure_lines

    m = measure_lines(prep.flux, prep.ivar, prep.mask)
    meta = {"snr_g": np.array([np.nan if (s.snr or {}).get("g") is None else s.snr["g"] for s in spectra]),
            "heii_sigma": np.asarray(m.heii_sigma, float), "sdo_index": np.asarray(m.sdo_index, float),
            "sdo_sigma": np.asarray(m.sdo_sigma, float), "path": np.array(used)}
    return LabelledRelease(LabelledSpectra(prep.x, labels, stars, ["release"] * len(prep.x), xn=prep.xn,
                                           meta=meta), used, skipped)


def replay_split_library(plan: SplitPlan, seed: int, data_dir: str | Path | None = None, lib=None) -> list:
    """The template-library split that :func:`build_seven_class_splits` made with ``default_rng(seed)``.

    Replays the same random draws (the LAMOST split first, then the library
    split), so a model's held-out (test) stars can be recovered from its card's
    ``split_plan`` and seed.
    """
    from .templates import load_templates

    lib = (lib if lib is not None else load_templates()).select(list(plan.classes))
    rng = np.random.default_rng(seed)
    try:
        lamost = load_lamost(data_dir, classes=plan.classes)
    except FileNotFoundError:
        lamost = None
    if lamost is not None and len(lamost):
        split_by_star(lamost, plan.fractions, rng)
    return split_library(lib, plan.fractions, rng)


# --------------------------------------------------------------------------
# the O-star detector's training and test sets (issue: held-out stars)
# --------------------------------------------------------------------------
#: Classes of the detector: the MK letters plus ``X``, hot non-MK impostors
#: (white dwarfs, hot subdwarfs, Wolf-Rayet stars) that survey O-star searches
#: must reject.
CLASSES_8: tuple[str, ...] = ("O", "B", "A", "F", "G", "K", "M", "X")


@dataclass
class DetectorRecipe:
    """How the detector's LAMOST-like training spectra are drawn from template stars.

    Every class gets ``n_per_class`` spectra: single-star realisations spread
    evenly over the class's stars, plus ``mix_fraction`` of mixtures of
    neighbouring templates of the same class (new, plausible stars between
    the real ones; not for ``X``).  The degradations span what real O/B stars
    and their impostors show in LAMOST:

    * E(B-V) uniform per class (``ebv_ranges``; added to a STELIB star's own
      reddening): O and B 0-2.5 (Galactic-plane O stars), A and F reddened
      too (the hard negatives a reddening-blind model confuses with reddened
      O/B stars), cooler stars less;
    * R_V uniform in ``r_v_range``; resolving power in ``resolution_range``
      (where the template is sharper); radial velocity as the mock release;
    * S/N from the real LAMOST SNRG distribution within ``snr_range``;
    * smooth flux-calibration distortion (``calib_sigma``);
    * with probability ``coverage_cut`` the red end beyond a random 7600-8600 A,
      and with half that the blue end below a random 3800-4500 A, are masked
      (as missing) for every class, so that the partial coverage of some
      library stars carries no class information; mixtures prefer templates
      covering at least ``min_coverage`` of the grid (as the mock release).

    Real LAMOST spectra of the training stars are added as they are
    (``lamost_repeat`` times each).  ``early_b_fraction`` of the B class's
    single-star realisations go to B0-B2 stars (the O stars' closest
    impostors, a minority of the B stars).

    ``mkclass_fraction`` adds, to every class, ``mkclass_fraction *
    n_per_class`` *blue-only* spectra: realisations of the MKCLASS averaged
    MK standards (O4-O9, B0-B9, A-M in every luminosity class; 3800-5600 A,
    the rest of the grid masked as missing, never invented) -- 18 O and 10
    B0-B1 standards where the libraries hold 14 O stars and few early B
    dwarfs.  A class without standards (``X``) gets as many realisations of
    its own templates cut to the same band, so that a blue-only spectrum says
    nothing about its class.  0 (the default, and the recipe of every model
    before 2026-12-06): no blue-only spectra.

    ``emission_fraction`` of the O and B single-star realisations are
    replaced by realisations of the same class's templates with Be / Oe-like
    Balmer emission (:meth:`~lamost_ostar.templates.TemplateLibrary.with_balmer_emission`,
    H-alpha equivalent width log-uniform in ``emission_ew_range``, one level
    per group of ``emission_levels``), so that a disc's emission says nothing
    about the class; their source is ``"emission"``.  0 (the default, and
    every model so far): none.

    ``interstellar``: every realisation also shows the interstellar lines and
    diffuse bands of its drawn E(B-V) (``MockConfig.interstellar``,
    :mod:`lamost_ostar.interstellar`); their draws come from a separate
    stream, so everything else is drawn as without them.  False (the
    default, and every model so far): continuum reddening only.
    """

    classes: tuple[str, ...] = CLASSES_8
    n_per_class: int = 600
    mix_fraction: float = 0.35
    ebv_ranges: dict = field(default_factory=lambda: {
        "O": (0.0, 2.5), "B": (0.0, 2.5), "A": (0.0, 1.5), "F": (0.0, 1.0),
        "G": (0.0, 0.6), "K": (0.0, 0.6), "M": (0.0, 0.5), "X": (0.0, 1.0)})
    r_v_range: tuple[float, float] = (2.8, 4.0)
    resolution_range: tuple[float, float] = (1500.0, 2200.0)
    snr_range: tuple[float, float] = (2.0, 150.0)
    calib_sigma: float = 0.08
    coverage_cut: float = 0.25
    lamost_repeat: int = 1
    early_b_fraction: float = 0.5
    min_coverage: float = 0.85
    mkclass_fraction: float = 0.0
    emission_fraction: float = 0.0
    emission_ew_range: tuple[float, float] = (3.0, 50.0)
    emission_levels: int = 8
    interstellar: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "DetectorRecipe":
        """The recipe a run or a card stored as JSON (lists back to tuples)."""
        rd = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(d).items()}
        rd["ebv_ranges"] = {k: tuple(v) for k, v in rd["ebv_ranges"].items()}
        return cls(**rd)

    def mock_config(self, **overrides):
        """The :class:`lamost_ostar.mock.MockConfig` of these degradations."""
        from .mock import MockConfig

        kw = dict(ebv_ranges=dict(self.ebv_ranges), r_v_range=tuple(self.r_v_range),
                  resolution_range=tuple(self.resolution_range), snr_range=tuple(self.snr_range),
                  calib_sigma=self.calib_sigma, min_coverage=self.min_coverage,
                  interstellar=self.interstellar)
        kw.update(overrides)
        return MockConfig(**kw)


def _cut_coverage(sim, probability: float, rng: np.random.Generator) -> None:
    """Mask a random red end (and sometimes blue end) of native-grid spectra in place."""
    n = len(sim)
    if n == 0 or probability <= 0:
        return
    wave = sim.wavelength
    red = rng.random(n) < probability
    blue = rng.random(n) < probability / 2
    red_at = rng.uniform(7600.0, 8600.0, n)
    blue_at = rng.uniform(3800.0, 4500.0, n)
    cut = (red[:, None] & (wave[None, :] > red_at[:, None])) | (blue[:, None] & (wave[None, :] < blue_at[:, None]))
    sim.ivar[cut] = 0.0
    sim.flux[cut] = 0.0
    sim.andmask[cut] |= 1


def _cut_to_band(sim, band: tuple[float, float]) -> None:
    """Mask everything outside ``band`` (vacuum A) of native-grid spectra in place (as missing)."""
    if len(sim) == 0:
        return
    out = (sim.wavelength < band[0]) | (sim.wavelength > band[1])
    sim.ivar[:, out] = 0.0
    sim.flux[:, out] = 0.0
    sim.andmask[:, out] |= 1


def _simulate_lib(lib, mk: list[str], rng: np.random.Generator, config, coverage_cut: float,
                  star_of_template: dict[str, str], source: str, measure=None,
                  band: tuple[float, float] | None = None) -> LabelledSpectra:
    """Simulate spectra of class letters ``mk`` from ``lib`` and label them by star.

    ``band``: keep only that wavelength range (vacuum A), the rest masked as missing.
    """
    from . import mock

    if not mk:
        from .preprocess import NPIX
        return LabelledSpectra.empty(NPIX)
    sim = mock.simulate_spectra(0, rng=rng, grid="native", mk=mk, templates=lib, config=config)
    _cut_coverage(sim, coverage_cut, rng)
    if band is not None:
        _cut_to_band(sim, band)
    star = [star_of_template[t["template1"] if t["weight1"] >= 0.5 else t["template2"]] for t in sim.truth]
    prep = _prepare_simulated(sim)
    meta = {k: np.array([t[k] for t in sim.truth]) for k in _SIM_META if sim.truth and k in sim.truth[0]}
    meta["template"] = np.array([t["template1"] if t["weight1"] >= 0.5 else t["template2"] for t in sim.truth])
    if measure is not None:
        meta.update(measure(prep))
    return LabelledSpectra(prep.x, [t["mk"] for t in sim.truth], star, [source] * len(prep.x),
                           xn=prep.xn, meta=meta)


def realise_templates(lib, per_template: np.ndarray, rng: np.random.Generator, config,
                      coverage_cut: float = 0.0, measure=None, source: str = "library",
                      chunk: int = 2048, band: tuple[float, float] | None = None) -> LabelledSpectra:
    """``per_template[i]`` single-template realisations of each template of ``lib``.

    Vectorised over all templates at once (chunks of ``chunk`` spectra): the
    mock simulator is given a library of the template alone by drawing both
    templates of its "mixture" from the same one (weight 1).  ``band``: only
    that wavelength range is kept (the rest masked as missing).
    """
    ids = dict(zip(np.asarray(lib.name).astype(str), library_star_ids(lib)))
    per = np.asarray(per_template, dtype=int)
    parts = []
    for i in np.flatnonzero(per > 0):
        sub = lib._take(np.array([i]))
        for start in range(0, int(per[i]), chunk):
            k = min(chunk, int(per[i]) - start)
            parts.append(_simulate_lib(sub, [str(lib.mk[i])] * k, rng, config, coverage_cut, ids, source,
                                       measure, band))
    if not parts:
        from .preprocess import NPIX
        return LabelledSpectra.empty(NPIX)
    return LabelledSpectra.concat(parts)


def spread(lib, n_per_class: Mapping[str, int], rng: np.random.Generator) -> np.ndarray:
    """Per-template counts giving each class its total, spread evenly over the class's *stars*.

    Templates of one star (two observations, or the same star in two
    libraries) share the star's count.
    """
    ids = library_star_ids(lib)
    per = np.zeros(len(lib), dtype=int)
    for c, total in n_per_class.items():
        idx = np.flatnonzero(np.asarray(lib.mk) == c)
        if idx.size == 0 or total <= 0:
            continue
        stars = rng.permutation(np.unique(ids[idx]))
        counts = np.full(len(stars), total // len(stars))
        counts[: total % len(stars)] += 1
        for s, m in zip(stars, counts):
            members = idx[ids[idx] == s]
            share = np.full(len(members), m // len(members))
            share[: m % len(members)] += 1
            per[members] += share
    return per


def build_detector_training(lib, recipe: DetectorRecipe, rng: np.random.Generator,
                            lamost: LabelledSpectra | None = None, measure=None, *, mkclass=None,
                            extra_rng: np.random.Generator | None = None) -> LabelledSpectra:
    """The detector's training set from the template stars of ``lib`` (and real LAMOST spectra).

    Parameters
    ----------
    lib : TemplateLibrary
        The training stars only (a split's templates; MKCLASS averages in it
        are not used: they come through ``mkclass``).
    recipe : DetectorRecipe
        Counts and degradations.
    rng : numpy.random.Generator
        Source of randomness.
    lamost : LabelledSpectra, optional
        Real LAMOST spectra of the training stars, added as they are.
    measure : callable, optional
        ``measure(prepared_batch) -> dict of (N,) arrays`` stored in ``meta``
        (e.g. the He II evidence).
    mkclass : TemplateLibrary, optional
        The MKCLASS standards of the blue-only share (``recipe.mkclass_fraction``
        > 0; source ``"mkclass"``); default: :func:`mkclass_training_standards`.
        A leave-one-star-out fold passes the standards left after
        :func:`mkclass_neighbours` of its held-out stars.
    extra_rng : numpy.random.Generator, optional
        Randomness of the blue-only share (default: a generator seeded from
        ``rng``).  A separate stream leaves everything else drawn from
        ``rng`` -- the rest of this set and what the caller draws after it --
        exactly as without the blue-only share.

    Returns
    -------
    LabelledSpectra
        Both channels; ``meta`` holds the truth of each realisation.  The
        blue-only spectra have source ``"mkclass"`` (standards) or
        ``"blue_cut"`` (a class's own templates cut to the band).
    """
    lib = _usable_for_training(lib, recipe.classes)
    cfg = recipe.mock_config()
    n_real = {c: 0 for c in recipe.classes}
    if lamost is not None and len(lamost):
        for c in recipe.classes:
            n_real[c] = int(np.sum(lamost.labels == c)) * recipe.lamost_repeat
    pure, mixed = {}, {}
    for c in recipe.classes:
        if not np.any(np.asarray(lib.mk) == c):
            continue
        rest = max(0, recipe.n_per_class - n_real[c])
        m = 0 if c == "X" else int(round(rest * recipe.mix_fraction))
        mixed[c], pure[c] = m, rest - m
    n_emission = {c: int(round(recipe.emission_fraction * pure[c])) for c in ("O", "B") if c in pure}
    n_emission = {c: k for c, k in n_emission.items() if k > 0}
    for c, k in n_emission.items():
        pure[c] -= k
    per = _class_spread(lib, pure, recipe.early_b_fraction, rng)
    parts = [realise_templates(lib, per, rng, cfg, recipe.coverage_cut, measure)]
    ids = dict(zip(np.asarray(lib.name).astype(str), library_star_ids(lib)))
    mk = [c for c, k in mixed.items() for _ in range(k)]
    if mk:
        parts.append(_simulate_lib(lib.select([c for c in mixed if mixed[c]]), list(rng.permutation(mk)),
                                   rng, cfg, recipe.coverage_cut, ids, "mock", measure))
    if lamost is not None and len(lamost):
        real = lamost.only(recipe.classes)
        parts.extend([real] * recipe.lamost_repeat)
    n_blue = int(round(recipe.mkclass_fraction * recipe.n_per_class))
    if n_blue > 0:
        if extra_rng is None:
            extra_rng = np.random.default_rng(int(rng.integers(2**63)))
        standards = mkclass_training_standards(recipe.classes) if mkclass is None else mkclass
        parts.extend(_blue_only_share(lib, standards, recipe, n_blue, extra_rng, cfg, measure))
    if n_emission:
        # after the blue-only share, from the same separate stream: that share is drawn as without it
        if extra_rng is None:
            extra_rng = np.random.default_rng(int(rng.integers(2**63)))
        parts.extend(_emission_share(lib, n_emission, recipe, extra_rng, cfg, measure))
    return LabelledSpectra.concat(parts)


def _emission_share(lib, n_per_class: Mapping[str, int], recipe: DetectorRecipe, rng: np.random.Generator,
                    config, measure) -> list[LabelledSpectra]:
    """Realisations of the O / B templates with Balmer emission, ``recipe.emission_levels`` levels per class."""
    lo, hi = (float(v) for v in recipe.emission_ew_range)
    parts = []
    for c, n in n_per_class.items():
        sub = lib.select(c)
        groups = np.bincount(rng.integers(0, max(1, recipe.emission_levels), n),
                             minlength=max(1, recipe.emission_levels))
        for k in groups[groups > 0]:
            level = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            per = _class_spread(sub, {c: int(k)}, recipe.early_b_fraction, rng)
            parts.append(realise_templates(sub.with_balmer_emission(level), per, rng, config,
                                           recipe.coverage_cut, measure, source="emission"))
    return parts


def _class_spread(lib, n_per_class: Mapping[str, int], early_b_fraction: float,
                  rng: np.random.Generator) -> np.ndarray:
    """:func:`spread`, with ``early_b_fraction`` of the B class's count on its B0-B2 templates."""
    per = spread(lib, {c: n for c, n in n_per_class.items() if c != "B"}, rng)
    n_b = int(n_per_class.get("B", 0))
    if n_b:
        early = np.asarray(lib.mk) == "B"
        early &= np.nan_to_num(np.asarray(lib.subtype, dtype=float), nan=9.0) < 2.5
        late = (np.asarray(lib.mk) == "B") & ~early
        n_early = int(round(n_b * early_b_fraction)) if (early.any() and late.any()) else \
            (n_b if early.any() else 0)
        per += _spread_subset(lib, early, {"B": n_early}, rng)
        per += _spread_subset(lib, late, {"B": n_b - n_early}, rng)
    return per


def _blue_only_share(lib, standards, recipe: DetectorRecipe, n: int, rng: np.random.Generator, config,
                     measure) -> list[LabelledSpectra]:
    """``n`` blue-only spectra of every class: MKCLASS standards, or the class's own templates cut to their band."""
    from_std = {c: n for c in recipe.classes if np.any(np.asarray(standards.mk) == c)}
    cut = {c: n for c in recipe.classes if c not in from_std and np.any(np.asarray(lib.mk) == c)}
    parts = []
    if from_std:
        per = _class_spread(standards, from_std, recipe.early_b_fraction, rng)
        parts.append(realise_templates(standards, per, rng, config, 0.0, measure, source="mkclass"))
    if cut:
        per = _class_spread(lib, cut, recipe.early_b_fraction, rng)
        parts.append(realise_templates(lib, per, rng, config, 0.0, measure, source="blue_cut",
                                       band=mkclass_band(standards)))
    return parts


#: Luminosity classes on one scale (Ia = 0 ... V = 5, VI = 6); composite classes
#: (``Ib-II``, ``IV/V``) take the mean of their parts.
_LUM_SCALE: dict[str, float] = {"Ia": 0.0, "Iab": 0.5, "I": 0.5, "Ib": 1.0, "II": 2.0, "III": 3.0,
                                "IV": 4.0, "V": 5.0, "VI": 6.0}


def _lum_number(lumclass: str) -> float:
    parts = [_LUM_SCALE[p] for p in re.split(r"[-/]", str(lumclass).strip()) if p in _LUM_SCALE]
    return float(np.mean(parts)) if parts else np.nan


def _type_number(mk: np.ndarray, subtype: np.ndarray) -> np.ndarray:
    """Spectral type as one number (O9.7 = 9.7, B0 = 10, B0.5 = 10.5, ...); NaN for X or no subtype."""
    from .templates import MK_LETTERS

    letter = np.array([MK_LETTERS.index(m) if m in MK_LETTERS else -1 for m in np.asarray(mk).astype(str)])
    out = 10.0 * letter + np.asarray(subtype, dtype=float)
    return np.where(letter >= 0, out, np.nan)


def mkclass_training_standards(classes: Sequence[str] = CLASSES_8):
    """The MKCLASS averaged standards (flux-normalised ``libnor36``) of ``classes`` that training may use."""
    from .templates import load_mkclass

    std = load_mkclass("normalised")
    return std._take(np.flatnonzero(np.isin(np.asarray(std.mk), list(classes))))


def mkclass_band(standards) -> tuple[float, float]:
    """The wavelength range (vacuum A) the MKCLASS standards cover on the grid (median over standards)."""
    wave = np.asarray(standards.wave)
    valid = np.asarray(standards.valid)[np.asarray(standards.valid).any(axis=1)]
    if not len(valid):
        return (3800.0, 5600.0)
    lo = wave[np.argmax(valid, axis=1)]
    hi = wave[valid.shape[1] - 1 - np.argmax(valid[:, ::-1], axis=1)]
    return float(np.median(lo)), float(np.median(hi))


def mkclass_neighbours(standards, held, max_type: float = 0.5, max_lum: float = 1.0) -> np.ndarray:
    """MKCLASS standards that could average a held-out star: which to leave out of a fold's training.

    The standards are averages of MK standard stars whose names are not given,
    and some library stars are classical standards (HD036512, HD047839, ...).
    A standard is left out with every held-out template whose spectral type is
    within ``max_type`` subtypes (O9.7 and B0 are 0.3 apart) and whose
    luminosity class is within ``max_lum`` classes (Ia = 0 ... V = 5) or
    unknown.

    Returns
    -------
    numpy.ndarray
        bool ``(len(standards),)``: True = a neighbour of a held-out star.
    """
    t_std = _type_number(standards.mk, standards.subtype)
    l_std = np.array([_lum_number(x) for x in standards.lumclass])
    t_held = _type_number(held.mk, held.subtype)
    l_held = np.array([_lum_number(x) for x in held.lumclass])
    ok = np.isfinite(t_held)
    if not ok.any() or len(standards) == 0:
        return np.zeros(len(standards), bool)
    dt = np.abs(t_std[:, None] - t_held[None, ok])
    dl = np.abs(l_std[:, None] - l_held[None, ok])
    near = (dt <= max_type + 1e-9) & (~np.isfinite(dl) | (dl <= max_lum + 1e-9))
    return near.any(axis=1)


#: Library stars left out of every training and test set because their label is
#: wrong: HD338529 is typed B5 in MILES and STELIB but has Teff 6165 K and
#: [Fe/H] -2.25 (a metal-poor F star); HD281679, typed B8 in MILES, shows He II
#: 4541/4686/5411 absorption beside late-B/A features (composite or
#: misidentified; reports/lines/validation.md).
MISLABELLED: tuple[str, ...] = ("HD338529", "HD281679")


def _spread_subset(lib, sel: np.ndarray, n_per_class: Mapping[str, int], rng: np.random.Generator) -> np.ndarray:
    """:func:`spread` over the templates ``sel`` of ``lib`` only (zeros elsewhere)."""
    per = np.zeros(len(lib), dtype=int)
    if sel.any():
        per[sel] = spread(lib._take(np.flatnonzero(sel)), n_per_class, rng)
    return per


#: Minimum grid coverage of a template the detector trains and is tested on
#: (26 STELIB spectra observed over ~4440-6520 A only fall below it; every
#: real O star is above it).
MIN_TEMPLATE_COVERAGE: float = 0.6


def _usable_for_training(lib, classes: Sequence[str]):
    """Templates a detector trains and is tested on: the given classes, no blue-only
    MKCLASS averages, no :data:`MISLABELLED` star, coverage >= :data:`MIN_TEMPLATE_COVERAGE`."""
    keep = np.isin(np.asarray(lib.mk), list(classes))
    keep &= np.asarray(lib.source) != "mkclass"
    keep &= ~np.isin(np.asarray(lib.star), MISLABELLED)
    keep &= np.asarray(lib.coverage) >= MIN_TEMPLATE_COVERAGE
    return lib._take(np.flatnonzero(keep))


def add_noise(x: np.ndarray, snr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Standardised spectra ``x`` (N, NPIX) with noise at per-spectrum S/N ``snr`` added.

    The noise is Gaussian with a per-pixel sigma ``sqrt(|x| * median|x|) / snr``
    (photon-like: S/N ``snr`` at the median flux level, higher where the flux is
    higher); the result is standardised again (eq. 1).  Used to put noise on
    generated (GAN) spectra *after* generation.
    """
    x = np.asarray(x, dtype=np.float64)
    snr = np.maximum(np.asarray(snr, dtype=np.float64).reshape(-1, 1), 0.5)
    level = np.median(np.abs(x), axis=1, keepdims=True)
    y = x + rng.standard_normal(x.shape) * np.sqrt(np.abs(x) * level) / snr
    return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)
