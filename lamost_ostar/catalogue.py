"""SQL candidate catalogue: scans, per-spectrum results and per-file errors.

The catalogue is a SQLAlchemy 2 database, a SQLite file by default (no server
needed) or PostgreSQL by URL.  It holds one result table per stage, built from
the stage's declared outputs (:class:`lamost_ostar.stage.OutputField`), so a
plugin someone else writes stores its results without any change here:

``scans``
    One provenance row per scan: start/end time, model version, code version,
    parameters (JSON), host, the stages it ran (JSON), file counts and status.
``results``
    The ``ostar`` stage's table.  One row per ``(path, model_version)``: the
    provenance columns (``path``, ``scan_id``, ``model_version``,
    ``stage_version``, ``code_version``, ``created``), the spectrum's header
    metadata (identifiers, position, S/N, pipeline class), and the stage's
    outputs: the calibrated class probabilities (one column per class ``p_o``
    ... ``p_x``, NULL where the model has no such class, plus the full ``probs``
    JSON), the predicted class, quality flags, the O-candidate decision and the
    He II evidence.  **Every** classified spectrum is stored, not only
    candidates, so a threshold is applied at query time and changing it needs
    no rescan.
``results_<stage>``
    Any other stage's table (e.g. ``results_heii_lines``): provenance, header
    metadata, and that stage's declared outputs.
``errors``
    One row per ``(stage, path, model_version)`` that could not be processed,
    with a short ``reason`` code and a one-line message.
``stages``
    The stages whose results the catalogue holds: table name, stage version and
    declared outputs (JSON), so queries need no plugin installed.

and a view ``candidates`` (results with ``p_o >= DEFAULT_P_O_THRESHOLD``) for
SQL users; :meth:`Catalogue.query` applies any threshold.

Writes are bulk and idempotent: :meth:`Catalogue.write` inserts one batch of
stage results (successes and errors) in one transaction with
``INSERT ... ON CONFLICT DO NOTHING`` on ``(path, model_version)``, so any
number of concurrent writers (Dask workers, two scans) never lose or duplicate
a row, and writing the same batch twice changes nothing.  The first row written
for a ``(path, model_version)`` wins.

Results take precedence over errors: when a file that has an error row is later
classified (a resume that retries errors, i.e. ``done_paths(...,
include_errors=False)``), the same transaction deletes its error row, and an
error is never kept for a file that already has a result, so for one model
version ``#results + #errors == #distinct files written``.  (On PostgreSQL, two
transactions that write a result and an error for the *same* file at the *same*
moment can both commit; only two overlapping scans that disagree on one file can
do that.)

Concurrency: SQLite runs in WAL mode with a busy timeout and every write
transaction starts with ``BEGIN IMMEDIATE``, so writers from many processes
queue instead of failing (keep the file on a local disk: WAL needs shared
memory).  PostgreSQL writers insert in sorted key order (no lock-order
deadlocks) and transient lock errors are retried.  A PostgreSQL schema other
than ``public`` is chosen in the URL: ``...?options=-csearch_path%3Dmyschema``.

Example
-------
>>> cat = Catalogue("candidates.sqlite")                       # doctest: +SKIP
>>> scan_id = cat.start_scan(model_version="v1", parameters={"paths": ["/data"]})  # doctest: +SKIP
>>> cat.write(scan_id, stage_results)                          # doctest: +SKIP
>>> cat.finish_scan(scan_id, {"files_seen": 10}, status="finished")  # doctest: +SKIP
>>> cat.query(min_p_o=0.9, cone=(83.8, -5.4, 2.0))             # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import math
import logging
import os
import re
import socket
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError

from lamost_ostar import stage as _stage

if TYPE_CHECKING:  # pragma: no cover
    from astropy.table import MaskedColumn, Table

# astropy.table (0.3 s to import) is imported by the query and export functions that
# return Tables, not at module import: a scan worker unpickling the catalogue sink
# only writes rows (reports/performance.md, worker start-up)

__all__ = [
    "CLASS_COLUMNS",
    "DEFAULT_P_O_THRESHOLD",
    "RESULT_COLUMNS",
    "SCAN_COUNT_COLUMNS",
    "DEFAULT_STAGE",
    "PROVENANCE_COLUMNS",
    "STAGE_RESULT_COLUMNS",
    "Catalogue",
    "CatalogueError",
    "parse_where",
    "stage_table_name",
    "CatalogueWriter",
    "WriteSummary",
    "angular_distance",
    "cone_bounds",
    "metadata",
    "normalise_url",
]

#: Default minimum p(O) for an O-star candidate (queries and the ``candidates`` view).
DEFAULT_P_O_THRESHOLD = 0.5

#: class label -> probability column in ``results`` (X: hot non-MK impostors)
CLASS_COLUMNS: dict[str, str] = {c: f"p_{c.lower()}" for c in _stage.OSTAR_CLASSES}

#: The ostar stage's declared outputs (``stage.OSTAR_OUTPUTS``): name -> OutputField.
_OSTAR_FIELDS = {o.name: o for o in _stage.OSTAR_OUTPUTS}
_KIND_OF = {"float": float, "int": int, "bool": bool, "str": str, "json": str}
#: The O-candidate decision and the He II evidence (``stage.StageResult``):
#: column -> kind (float, int or bool)
DECISION_COLUMNS: dict[str, type] = {n: _KIND_OF[_OSTAR_FIELDS[n].type]
                                     for n in ("posterior_o", "is_candidate", "heii_sigma", "o_score")}
EVIDENCE_COLUMNS: dict[str, type] = {
    name: _KIND_OF[_OSTAR_FIELDS[name].type] for name in _stage.EVIDENCE_FIELDS if name != "heii_sigma"}

#: The stage whose table is ``results`` (and whose errors old catalogues hold).
DEFAULT_STAGE = "ostar"
#: Provenance columns of every stage table besides ``path``/``scan_id``/``created``.
PROVENANCE_COLUMNS = _stage.PROVENANCE_COLUMNS

#: scan count columns, in order
SCAN_COUNT_COLUMNS = ("files_seen", "files_read", "files_classified", "files_failed", "files_skipped")

#: Result columns returned by :meth:`Catalogue.query`, in order.
RESULT_COLUMNS = (
    "path", "obsid", "designation", "ra", "dec", "predicted_class", "is_candidate", "p_o",
    "posterior_o", "heii_sigma", "o_score",
    "p_b", "p_a", "p_f", "p_g", "p_k", "p_m", "p_x",
    "snr_g", "snr_r", "snr_i", "lmjd", "planid", "spid", "fiberid",
    "pipeline_class", "pipeline_subclass", "data_release", "layout",
    "flags", *EVIDENCE_COLUMNS, "model_version", "scan_id", "id",
)

#: rows per IN (...) list (well below SQLite's and PostgreSQL's parameter limits)
_CHUNK = 500
#: attempts for a write transaction that hits a lock timeout or deadlock
_RETRIES = 6

_SORT_DESCENDING_BY_DEFAULT = ("p_", "snr_")

_DESCRIPTIONS = {
    "path": "spectrum file path as scanned",
    "obsid": "LAMOST OBSID",
    "designation": "LAMOST designation (Jhhmmss.ss+ddmmss.s)",
    "ra": "right ascension (J2000)",
    "dec": "declination (J2000)",
    "predicted_class": "class with the highest calibrated probability",
    "p_o": "calibrated probability of class O (training-balanced classes)",
    "posterior_o": "probability of class O at the survey prior (O ~ 2e-5)",
    "is_candidate": "the model's O-candidate decision (posterior and He II evidence)",
    "heii_sigma": "combined significance of He II 4200/4541/4686/5411 absorption",
    "o_score": "decision score: log10 survey-prior odds of O + weight x He II sigma",
    "heii_ew": "weighted mean EW of the He II lines [A]",
    "hei_sigma": "combined significance of He I absorption",
    "log_wprime": "log10 EW(He I 4471) / EW(He II 4541)",
    "n_heii_lines": "He II lines detected at >= 2 sigma",
    "heii_detected": "He II detected by the lines module's rule",
    "heii_4686_emission": "He II 4686 in emission",
    "metal_veto": "a cool-star metal line is too strong for an O star",
    "snr_g": "pipeline S/N in g", "snr_r": "pipeline S/N in r", "snr_i": "pipeline S/N in i",
    "lmjd": "local modified Julian day", "planid": "plan id", "spid": "spectrograph id",
    "fiberid": "fibre id", "pipeline_class": "LAMOST pipeline CLASS",
    "pipeline_subclass": "LAMOST pipeline SUBCLASS", "data_release": "DATA_V",
    "layout": "file layout (image, dr1, coadd)", "flags": "quality bit flags (stage.FLAG_*)",
    "model_version": "model version that produced the probabilities",
    "scan_id": "scan that wrote the row", "id": "row id in the catalogue",
    "dist": "angular distance from the cone centre",
}


class CatalogueError(ValueError):
    """A catalogue URL, database or argument problem, with a one-line message."""


# --------------------------------------------------------------------------- schema

_SQL_KIND = {float: sa.Float, int: sa.Integer, bool: sa.Boolean}
_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TS = sa.DateTime(timezone=True)
#: SQL type of each output type
_OUTPUT_SQL = {"float": sa.Float, "int": sa.BigInteger, "bool": sa.Boolean, "str": sa.Text,
               "json": lambda: _JSON}
#: The ``results`` (ostar) table's column types from before outputs were declared.
_RESULTS_TYPES = {"predicted_class": sa.String(8), "flags": sa.Integer(), "n_heii_lines": sa.Integer()}
_STAGE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def _astropy_table():
    """``astropy.table``, imported on first use."""
    import astropy.table

    return astropy.table


def stage_table_name(stage: str) -> str:
    """The table of a stage's results: ``results`` for ``ostar``, ``results_<stage>`` otherwise."""
    if not isinstance(stage, str) or not _STAGE_NAME_RE.match(stage):
        raise CatalogueError(f"stage name {stage!r} must be lower-case letters, digits and _ "
                             "(at most 32, starting with a letter)")
    return "results" if stage == DEFAULT_STAGE else f"results_{stage}"


def _ix(table: str, *cols: str) -> str:
    name = f"ix_{table}_{'_'.join(cols)}"
    return name if len(name) <= 60 else f"ix_{table[:40]}_{zlib.crc32(name.encode()):08x}"


def _metadata_columns() -> list[sa.Column]:
    """The shared header metadata columns (``stage.METADATA_FIELDS``), with their SQL types."""
    types = {"obsid": sa.BigInteger, "designation": sa.String(64), "ra": sa.Float(53),
             "dec": sa.Float(53), "snr_g": sa.Float, "snr_r": sa.Float, "snr_i": sa.Float,
             "lmjd": sa.Integer, "planid": sa.String(64), "spid": sa.Integer, "fiberid": sa.Integer,
             "pipeline_class": sa.String(32), "pipeline_subclass": sa.String(64),
             "data_release": sa.String(64), "layout": sa.String(16)}
    return [sa.Column(m.name, types[m.name]) for m in _stage.METADATA_FIELDS]


def _build_stage_table(md: sa.MetaData, table_name: str, outputs: Sequence[Any]) -> sa.Table:
    """One stage's result table: provenance + shared metadata + the declared outputs."""
    legacy = table_name == "results"
    cols: list[Any] = [
        sa.Column("id", _BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        *_metadata_columns(),
    ]
    for o in outputs:
        if legacy and o.name == "flags":
            cols.append(sa.Column("flags", sa.Integer, nullable=False, server_default="0"))
        elif legacy and o.name in _RESULTS_TYPES:
            cols.append(sa.Column(o.name, _RESULTS_TYPES[o.name]))
        else:
            cols.append(sa.Column(o.name, _OUTPUT_SQL[o.type]()))
    cols += [
        sa.Column("scan_id", sa.Integer, sa.ForeignKey("scans.id", ondelete="SET NULL")),
        sa.Column("created", _TS, nullable=False),
        sa.Column("stage_version", sa.String(64)),
        sa.Column("code_version", sa.String(64)),
    ]
    if legacy:
        extra = [
            sa.UniqueConstraint("path", "model_version", name="uq_results_path_model"),
            sa.Index("ix_results_p_o", "p_o"),
            sa.Index("ix_results_predicted_class", "predicted_class", "p_o"),
            sa.Index("ix_results_dec_ra", "dec", "ra"),
            sa.Index("ix_results_snr_g", "snr_g"),
            sa.Index("ix_results_snr_r", "snr_r"),
            sa.Index("ix_results_snr_i", "snr_i"),
            sa.Index("ix_results_model_version", "model_version", "p_o"),
            sa.Index("ix_results_scan_id", "scan_id"),
            sa.Index("ix_results_obsid", "obsid"),
            sa.Index("ix_results_is_candidate", "is_candidate", "posterior_o"),
            sa.Index("ix_results_heii_sigma", "heii_sigma"),
            # path lookups use the (path, model_version) unique index
        ]
        extra += [sa.Index(_ix(table_name, o.name), o.name) for o in outputs
                  if o.index and o.name not in ("p_o", "heii_sigma")]
    else:
        extra = [
            sa.UniqueConstraint("path", "model_version", name=f"uq_{table_name}_path_model"[:60]),
            sa.Index(_ix(table_name, "dec", "ra"), "dec", "ra"),
            sa.Index(_ix(table_name, "model_version"), "model_version"),
            sa.Index(_ix(table_name, "scan_id"), "scan_id"),
            sa.Index(_ix(table_name, "obsid"), "obsid"),
            *[sa.Index(_ix(table_name, o.name), o.name) for o in outputs if o.index],
        ]
    return sa.Table(table_name, md, *cols, *extra)


def _build_metadata() -> sa.MetaData:
    md = sa.MetaData()
    sa.Table(
        "scans", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("started", _TS, nullable=False),
        sa.Column("finished", _TS),
        sa.Column("model_version", sa.String(128)),
        sa.Column("code_version", sa.String(64)),
        sa.Column("parameters", _JSON),
        sa.Column("host", sa.String(255)),
        *[sa.Column(c, sa.BigInteger, nullable=False, server_default="0") for c in SCAN_COUNT_COLUMNS],
        sa.Column("status", sa.String(32), nullable=False, server_default="running"),
        sa.Column("summary", _JSON),
        # the stages the scan ran: [{"name", "version", "model_version", "outputs"}, ...]
        sa.Column("stages", _JSON),
    )
    _build_stage_table(md, "results", _stage.OSTAR_OUTPUTS)
    sa.Table(
        "errors", md,
        sa.Column("id", _BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("scan_id", sa.Integer, sa.ForeignKey("scans.id", ondelete="SET NULL")),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("message", sa.Text),
        sa.Column("created", _TS, nullable=False),
        sa.Column("stage", sa.String(64), nullable=False, server_default=DEFAULT_STAGE),
        sa.UniqueConstraint("stage", "path", "model_version", name="uq_errors_stage_path_model"),
        sa.Index("ix_errors_scan_id", "scan_id"),
        sa.Index("ix_errors_reason", "reason"),
    )
    # the stages whose results the catalogue holds, with their declared outputs
    sa.Table(
        "stages", md,
        sa.Column("stage", sa.String(64), primary_key=True),
        sa.Column("table_name", sa.String(64), nullable=False),
        sa.Column("stage_version", sa.String(64)),
        sa.Column("outputs", _JSON),
        sa.Column("created", _TS, nullable=False),
        sa.Column("updated", _TS),
    )
    return md


#: The catalogue schema (tables ``scans``, ``results`` (the ostar stage's), ``errors``,
#: ``stages``; each other stage's table is made from its declaration when first written).
metadata = _build_metadata()
_SCANS = metadata.tables["scans"]
_RESULTS = metadata.tables["results"]
_ERRORS = metadata.tables["errors"]
_STAGES = metadata.tables["stages"]
_CORE_TABLES = ("scans", "results", "errors")

#: stage tables built from declarations: (table name, outputs) -> Table
_TABLE_CACHE: dict[tuple, sa.Table] = {}


def _stage_table(name: str, outputs: Sequence[Any]) -> sa.Table:
    """The Table object of stage ``name`` with ``outputs`` (``results`` for ostar)."""
    table_name = stage_table_name(name)
    if table_name == "results":
        return _RESULTS
    key = (table_name, tuple((o.name, o.type, o.index) for o in outputs))
    table = _TABLE_CACHE.get(key)
    if table is None:
        md = sa.MetaData()
        _SCANS.to_metadata(md)
        table = _build_stage_table(md, table_name, outputs)
        _TABLE_CACHE[key] = table
    return table


def _candidate_clause(threshold: float = None, t: sa.Table | None = None):
    """SQL condition "is an O candidate": the row's own decision, or for rows of
    model versions without one (``is_candidate`` NULL) ``p_o >= threshold``."""
    t = _RESULTS if t is None else t
    thr = DEFAULT_P_O_THRESHOLD if threshold is None else float(threshold)
    has = set(t.c.keys())
    if "is_candidate" in has and "p_o" in has:
        return sa.or_(t.c.is_candidate.is_(True),
                      sa.and_(t.c.is_candidate.is_(None), sa.func.coalesce(t.c.p_o, 0.0) >= thr))
    if "is_candidate" in has:
        return t.c.is_candidate.is_(True)
    return sa.func.coalesce(t.c.p_o, 0.0) >= thr


#: SQL of "is a candidate": the row's own decision, or for rows of model
#: versions without one (``is_candidate`` NULL) the old rule p(O) >= 0.5.
_CANDIDATE_SQL = (f"(is_candidate = TRUE OR (is_candidate IS NULL AND p_o >= {DEFAULT_P_O_THRESHOLD!r}))")
_VIEW_SQL = "CREATE {verb} VIEW {ifne}candidates AS SELECT * FROM results WHERE " + _CANDIDATE_SQL
_DDL_LOCK_KEY = zlib.crc32(b"lamost_ostar.catalogue.ddl")
_log = logging.getLogger("lamost_ostar.catalogue")


# --------------------------------------------------------------------------- URLs

def normalise_url(db: str | os.PathLike | URL) -> URL:
    """Turn a catalogue location into a SQLAlchemy URL.

    Parameters
    ----------
    db : str, path-like or URL
        A file path (a SQLite catalogue), a ``sqlite:///...`` URL or a
        PostgreSQL URL.  ``postgresql://`` and ``postgres://`` use psycopg 3
        (``postgresql+psycopg://``).  A PostgreSQL schema can be selected with
        ``?options=-csearch_path%3Dmyschema``.

    Returns
    -------
    sqlalchemy.engine.URL

    Raises
    ------
    CatalogueError
        If the string is not a usable database URL.
    """
    if isinstance(db, URL):
        url = db
    else:
        text = os.fspath(db).strip()
        if not text:
            raise CatalogueError("empty catalogue location")
        if "://" not in text:
            path = Path(text).expanduser()
            return URL.create("sqlite", database=str(path.resolve()))
        try:
            url = sa.make_url(text)
        except ArgumentError as exc:
            raise CatalogueError(f"cannot parse database URL {text!r}") from exc
    backend = url.get_backend_name()
    if backend == "postgres":
        url = url.set(drivername="postgresql+psycopg")
    elif url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise CatalogueError(
            f"unsupported database {url.drivername!r}: use a SQLite path or a postgresql+psycopg:// URL")
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise CatalogueError("a SQLite catalogue needs a file path (in-memory databases are per process)")
        url = url.set(database=str(Path(url.database).expanduser().resolve()))
    return url


def _safe_url(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


# --------------------------------------------------------------------------- records

@dataclass
class WriteSummary:
    """What one :meth:`Catalogue.write` call submitted.

    Attributes
    ----------
    results, errors : int
        Result and error rows submitted (after de-duplication within the batch);
        rows already present were left untouched (``ON CONFLICT DO NOTHING``).
    """

    results: int = 0
    errors: int = 0


#: a result's field, from a mapping or an object (the stage module's accessor)
_get = _stage._get


def _as_int(v: Any) -> int | None:
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _as_float(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _as_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    s = str(v).strip()
    return s or None


# --------------------------------------------------------------------------- geometry

def angular_distance(ra1: Any, dec1: Any, ra2: Any, dec2: Any) -> np.ndarray:
    """Great-circle distance in degrees (haversine, vectorised; inputs in degrees)."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(a, dtype=np.float64)) for a in (ra1, dec1, ra2, dec2))
    s = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(s, 0.0, 1.0))))


def cone_bounds(ra: float, dec: float, radius: float) -> tuple[float, float, list[tuple[float, float]] | None]:
    """Bounding box of a cone for an indexed SQL pre-selection.

    Parameters
    ----------
    ra, dec, radius : float
        Centre and radius in degrees.

    Returns
    -------
    dec_min, dec_max : float
    ra_ranges : list of (lo, hi) or None
        RA intervals within [0, 360] (two when the box wraps through RA 0),
        or None when the cone contains a pole and every RA qualifies.
    """
    ra, dec, radius = _check_cone(ra, dec, radius)
    pad = 1e-9
    dec_min, dec_max = max(dec - radius, -90.0), min(dec + radius, 90.0)
    if dec_max >= 90.0 - pad or dec_min <= -90.0 + pad or radius >= 90.0:
        return dec_min, dec_max, None
    # exact half-width in RA of a small circle: sin(dra) = sin(r) / cos(dec)
    ratio = math.sin(math.radians(radius)) / math.cos(math.radians(dec))
    if ratio >= 1.0:
        return dec_min, dec_max, None
    dra = math.degrees(math.asin(ratio)) + 1e-7
    lo, hi = ra - dra, ra + dra
    if lo < 0.0:
        return dec_min, dec_max, [(lo + 360.0, 360.0), (0.0, hi)]
    if hi > 360.0:
        return dec_min, dec_max, [(lo, 360.0), (0.0, hi - 360.0)]
    return dec_min, dec_max, [(lo, hi)]


def _check_cone(ra: Any, dec: Any, radius: Any) -> tuple[float, float, float]:
    try:
        ra, dec, radius = float(ra), float(dec), float(radius)
    except (TypeError, ValueError) as exc:
        raise CatalogueError("cone needs three numbers: RA DEC RADIUS (degrees)") from exc
    if not all(math.isfinite(v) for v in (ra, dec, radius)):
        raise CatalogueError("cone RA, Dec and radius must be finite")
    if not -90.0 <= dec <= 90.0:
        raise CatalogueError(f"cone Dec {dec:g} is outside [-90, 90] degrees")
    if not 0.0 < radius <= 180.0:
        raise CatalogueError(f"cone radius {radius:g} must be in (0, 180] degrees")
    return ra % 360.0, dec, radius


# --------------------------------------------------------------------------- catalogue

class Catalogue:
    """A candidate catalogue in a SQLite file or a PostgreSQL database.

    The object is cheap and picklable: it holds only the URL and creates its
    SQLAlchemy engine lazily in the process that first uses it (and again after
    a fork), so it can be shipped to Dask workers as the scan's sink.

    Parameters
    ----------
    db : str, path-like or URL
        SQLite file path, ``sqlite:///...`` or ``postgresql+psycopg://...`` URL.
    create : bool
        Create missing tables (and the SQLite file) on first use.  With
        ``create=False`` a missing file or missing tables raise
        :class:`CatalogueError` (used by read-only tools such as ``query``).
    busy_timeout : float
        Seconds a SQLite writer waits for the write lock (WAL mode).
    """

    #: Sink entry point name (group ``lamost_ostar.sinks``) and schema version.
    name = "sql"
    version = "sql-1"

    def __init__(self, db: str | os.PathLike | URL, *, create: bool = True, busy_timeout: float = 60.0):
        self.url: URL = normalise_url(db)
        self.create = bool(create)
        self.busy_timeout = float(busy_timeout)
        self._engine: Engine | None = None
        self._pid: int | None = None
        self._scan_models: dict[int, tuple[str | None, dict[str, str]]] = {}
        self._ready: set[tuple] = set()

    # ---- pickling / process handling
    def __getstate__(self) -> dict:
        return {"url": self.url.render_as_string(hide_password=False), "create": self.create,
                "busy_timeout": self.busy_timeout}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], create=state["create"], busy_timeout=state["busy_timeout"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_safe_url(self.url)!r})"

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.url.get_backend_name()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine of this process (created, and the schema checked, on first use)."""
        pid = os.getpid()
        if self._engine is not None and self._pid == pid:
            return self._engine
        if self._engine is not None:  # inherited through fork: never share connections
            self._engine.dispose(close=False)
        self._engine = self._make_engine()
        self._pid = pid
        try:
            self._ensure_schema(self._engine)
        except Exception:
            self._engine.dispose()
            self._engine = None
            raise
        return self._engine

    def close(self) -> None:
        """Dispose of this process's connections (the object stays usable)."""
        if self._engine is not None and self._pid == os.getpid():
            self._engine.dispose()
        self._engine = None

    def __enter__(self) -> "Catalogue":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _make_engine(self) -> Engine:
        if self.dialect == "sqlite":
            path = Path(self.url.database)
            if not self.create and not path.is_file():
                raise CatalogueError(f"no catalogue file at {path}")
            if self.create:
                path.parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(self.url, connect_args={"timeout": self.busy_timeout})
            timeout_ms = int(self.busy_timeout * 1000)

            @sa.event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn, _record):  # pragma: no cover - exercised via engine
                dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
                cur = dbapi_conn.cursor()
                cur.execute(f"PRAGMA busy_timeout={timeout_ms}")
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            @sa.event.listens_for(engine, "begin")
            def _on_begin(conn):  # pragma: no cover - exercised via engine
                # writers take the lock up front, so the busy timeout applies and
                # a deferred read->write upgrade can never fail with SQLITE_BUSY
                write = conn.get_execution_options().get("lamost_write", False)
                conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

            return engine
        try:
            return sa.create_engine(self.url, pool_pre_ping=True)
        except (NoSuchModuleError, ArgumentError, ImportError) as exc:
            raise CatalogueError(f"cannot use {_safe_url(self.url)}: {_first_line(exc)}") from exc

    def _ensure_schema(self, engine: Engine) -> None:
        try:
            with engine.connect() as conn:
                present = set(sa.inspect(conn).get_table_names())
        except OperationalError as exc:
            raise CatalogueError(f"cannot open {_safe_url(self.url)}: {_first_line(exc)}") from exc
        if set(_CORE_TABLES) <= present:
            self._migrate(engine)
            return
        if not self.create:
            raise CatalogueError(f"{_safe_url(self.url)} holds no lamost_ostar catalogue "
                                 f"(tables scans/results/errors missing)")
        with engine.connect().execution_options(lamost_write=True) as conn, conn.begin():
            self._ddl_lock(conn)  # serialise concurrent first-use DDL from many workers
            if self.dialect == "postgresql" and \
                    conn.execute(sa.text("SELECT current_schema()")).scalar() is None:
                # the URL's search_path names a schema that does not exist yet
                first = conn.execute(sa.text("SHOW search_path")).scalar().split(",")[0]
                first = first.strip().strip('"')
                if not first or first == "$user":
                    raise CatalogueError("no schema to create the catalogue in (check search_path)")
                conn.execute(sa.schema.CreateSchema(first, if_not_exists=True))
            metadata.create_all(conn, checkfirst=True)
            if self.dialect == "postgresql":
                conn.exec_driver_sql(_VIEW_SQL.format(verb="OR REPLACE", ifne=""))
            else:
                conn.exec_driver_sql(_VIEW_SQL.format(verb="", ifne="IF NOT EXISTS "))
            self._register_stage(conn, _stage.stage_spec(_stage.OStarStage), "results")

    def _migration_needed(self, conn) -> dict[str, Any]:
        """What an older catalogue lacks (nothing: an empty dict)."""
        insp = sa.inspect(conn)
        need: dict[str, Any] = {}
        tables = set(insp.get_table_names())
        missing = {}
        for name in _CORE_TABLES:
            have = {col["name"] for col in insp.get_columns(name)}
            cols = [c for c in metadata.tables[name].columns if c.name not in have]
            if cols:
                missing[name] = cols
        if missing:
            need["columns"] = missing
        uniques = [set(u["column_names"]) for u in insp.get_unique_constraints("errors")]
        if {"path", "model_version"} in uniques and {"stage", "path", "model_version"} not in uniques:
            need["errors_key"] = [u for u in insp.get_unique_constraints("errors")
                                  if set(u["column_names"]) == {"path", "model_version"}]
        if "stages" not in tables:
            need["stages_table"] = True
        return need

    def _migrate(self, engine: Engine) -> None:
        """Bring a catalogue written by an older version up to this schema, in place.

        One transaction (under the DDL lock on PostgreSQL), only when something is
        missing:

        * new columns are added as NULL-able columns with ``ALTER TABLE ... ADD
          COLUMN`` (results: the decision/evidence columns, ``stage_version``,
          ``code_version``; scans: ``stages``; errors: ``stage``, ``'ostar'``
          for the rows already there); existing rows keep NULL (written by
          models that did not produce those values);
        * the errors table's key becomes ``(stage, path, model_version)`` (SQLite:
          the table is rebuilt, rows and ids kept; PostgreSQL: the constraint is
          replaced);
        * the ``stages`` table is created, with the ostar stage's row;
        * rows that older versions wrote for a *plugin* stage (a scan whose
          parameters name a stage other than ``ostar``) leave ``results``: their
          error rows are relabelled with that stage, their result rows, which
          held only the header fields (the plugin's measurements had no
          column), are deleted, so that a scan with that stage measures those
          files again into the stage's own table.  A warning says how many.
        """
        with engine.connect() as conn:
            need = self._migration_needed(conn)
        if not need:
            return
        moved: dict[str, tuple[int, int]] = {}
        try:
            with engine.connect().execution_options(lamost_write=True) as conn, conn.begin():
                self._ddl_lock(conn)
                need = self._migration_needed(conn)     # another process may have done it
                if not need:
                    return
                insp = sa.inspect(conn)
                for name, cols in need.get("columns", {}).items():
                    have = {col["name"] for col in insp.get_columns(name)}
                    for col in cols:
                        if col.name in have:
                            continue
                        ddl = col.type.compile(dialect=conn.dialect)
                        if col.server_default is not None:
                            ddl += f" NOT NULL DEFAULT '{col.server_default.arg}'"
                        conn.exec_driver_sql(f'ALTER TABLE {name} ADD COLUMN "{col.name}" {ddl}')
                if "errors_key" in need:
                    self._rekey_errors(conn, need["errors_key"])
                if "stages_table" in need:
                    _STAGES.create(conn, checkfirst=True)
                if "errors_key" in need or "columns" in need:
                    moved = self._move_plugin_rows(conn)
                # the candidates view follows the new rule; indexes of the new columns
                conn.exec_driver_sql("DROP VIEW IF EXISTS candidates")
                conn.exec_driver_sql(_VIEW_SQL.format(verb="", ifne=""))
                for table in (_RESULTS, _ERRORS):
                    for index in table.indexes:
                        index.create(conn, checkfirst=True)
                self._register_stage(conn, _stage.stage_spec(_stage.OStarStage), "results")
        except (OperationalError, DBAPIError) as exc:
            added = ", ".join(c.name for cols in need.get("columns", {}).values() for c in cols)
            raise CatalogueError(f"{_safe_url(self.url)} was written by an older lamost_ostar "
                                 f"(lacks: {added or 'the stage tables'}); migrating it failed: "
                                 f"{_first_line(exc)}") from exc
        for name, (n_res, n_err) in moved.items():
            _log.warning("catalogue %s: %d result rows that an older version wrote for stage %r "
                         "without its measurements were removed from 'results' (scan with "
                         "--stage %s to measure them again); its %d error rows are kept as that "
                         "stage's", _safe_url(self.url), n_res, name, name, n_err)

    def _rekey_errors(self, conn, old_uniques: list[dict]) -> None:
        """Make ``(stage, path, model_version)`` the errors table's key."""
        if self.dialect == "postgresql":
            for u in old_uniques:
                if u.get("name"):
                    conn.exec_driver_sql(f'ALTER TABLE errors DROP CONSTRAINT "{u["name"]}"')
            conn.exec_driver_sql("ALTER TABLE errors ADD CONSTRAINT uq_errors_stage_path_model "
                                 "UNIQUE (stage, path, model_version)")
            return
        # SQLite cannot drop a table constraint: rebuild the table, keeping rows and ids
        conn.exec_driver_sql("ALTER TABLE errors RENAME TO errors_before_stages")
        for index in _ERRORS.indexes:
            conn.exec_driver_sql(f"DROP INDEX IF EXISTS {index.name}")
        _ERRORS.create(conn)
        cols = ", ".join(f'"{c.name}"' for c in _ERRORS.columns)
        conn.exec_driver_sql(f"INSERT INTO errors ({cols}) SELECT {cols} FROM errors_before_stages")
        conn.exec_driver_sql("DROP TABLE errors_before_stages")

    def _move_plugin_rows(self, conn) -> dict[str, tuple[int, int]]:
        """Rows of plugin stages that older versions wrote into ``results``/``errors`` (see _migrate)."""
        by_stage: dict[str, list[int]] = {}
        for sid, params in conn.execute(sa.select(_SCANS.c.id, _SCANS.c.parameters)).all():
            if isinstance(params, str):
                try:
                    params = json.loads(params)
                except ValueError:
                    params = None
            name = params.get("stage") if isinstance(params, Mapping) else None
            if isinstance(name, str) and name != DEFAULT_STAGE and ":" not in name \
                    and _STAGE_NAME_RE.match(name):
                by_stage.setdefault(name, []).append(int(sid))
        moved = {}
        for name, ids in by_stage.items():
            n_res = n_err = 0
            for chunk in _chunks(ids, _CHUNK):
                n_err += conn.execute(sa.update(_ERRORS).where(_ERRORS.c.scan_id.in_(chunk),
                                                               _ERRORS.c.stage == DEFAULT_STAGE)
                                      .values(stage=name)).rowcount or 0
                n_res += conn.execute(sa.delete(_RESULTS).where(_RESULTS.c.scan_id.in_(chunk))
                                      ).rowcount or 0
            if n_res or n_err:
                moved[name] = (n_res, n_err)
        return moved

    def _register_stage(self, conn, spec: "_stage.StageSpec", table_name: str) -> None:
        """Insert or update the stage's row in ``stages`` (outputs: the union of all versions')."""
        now = datetime.now(timezone.utc)
        row = conn.execute(sa.select(_STAGES.c.outputs, _STAGES.c.stage_version)
                           .where(_STAGES.c.stage == spec.name)).first()
        outputs = [o.to_dict() for o in spec.outputs]
        if row is None:
            ins = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
            conn.execute(ins(_STAGES).on_conflict_do_nothing(index_elements=["stage"]).values(
                stage=spec.name, table_name=table_name, stage_version=spec.version,
                outputs=outputs, created=now, updated=now))
            return
        old = list(row[0] or [])
        names = {o["name"] for o in old}
        merged = old + [o for o in outputs if o["name"] not in names]
        if merged != old or row[1] != spec.version:
            conn.execute(sa.update(_STAGES).where(_STAGES.c.stage == spec.name)
                         .values(outputs=merged, stage_version=spec.version, updated=now))

    def ensure_stage(self, stage: Any) -> sa.Table:
        """Create (or extend) the table of a stage from its declaration; return it.

        ``stage`` is a stage object, class or :class:`lamost_ostar.stage.StageSpec`.
        Cheap after the first call per process and declaration.  New outputs of a
        later stage version are added as columns; a column whose declared type
        changed keeps its first type (declare a new output name instead).
        """
        spec = _stage.stage_spec(stage)
        table = _stage_table(spec.name, spec.outputs)
        engine = self.engine
        key = (spec.name, spec.version, tuple(o.name for o in spec.outputs))
        if key in self._ready:
            return table
        with engine.connect() as conn:
            insp = sa.inspect(conn)
            ok = insp.has_table(table.name)
            if ok:
                have = {c["name"] for c in insp.get_columns(table.name)}
                ok = all(c.name in have for c in table.columns)
            if ok:
                row = conn.execute(sa.select(_STAGES.c.outputs, _STAGES.c.stage_version)
                                   .where(_STAGES.c.stage == spec.name)).first()
                ok = row is not None and row[1] == spec.version and \
                    set(spec.output_names) <= {o["name"] for o in (row[0] or [])}
        if not ok:
            def _do(conn):
                self._ddl_lock(conn)
                insp = sa.inspect(conn)
                if not insp.has_table(table.name):
                    table.create(conn, checkfirst=True)
                else:
                    have = {c["name"] for c in insp.get_columns(table.name)}
                    for col in table.columns:
                        if col.name not in have:
                            ddl = col.type.compile(dialect=conn.dialect)
                            conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{col.name}" {ddl}')
                    for index in table.indexes:
                        index.create(conn, checkfirst=True)
                self._register_stage(conn, spec, table.name)
            self._write_tx(_do)
        self._ready.add(key)
        return table

    def _ddl_lock(self, conn) -> None:
        """PostgreSQL: take the catalogue's DDL lock for this transaction (one process changes
        the schema at a time); SQLite needs none (its writers take the file's lock)."""
        if self.dialect == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_DDL_LOCK_KEY)))

    # ---- query indexes: deferred during a bulk scan, built at its end
    def defer_indexes(self, stages: Sequence[str]) -> list[str]:
        """Drop the query indexes of the stages' empty tables, for a bulk scan to build later.

        A table's *query* indexes are its secondary indexes (sky position,
        S/N, p(O), candidates, ...), not the ``(path, model_version)`` key
        that writes and the resume check use.  Keeping a dozen of them up to
        date row by row makes each written row several times dearer once the
        table holds millions of rows (``reports/performance.md``); building
        them once at the end of the scan is the bulk-loading practice.

        Parameters
        ----------
        stages : sequence of str
            Stage names (their tables must exist: :meth:`ensure_stage`).

        Returns
        -------
        list of str
            The stages whose query indexes are now absent: their table was
            empty and its indexes were dropped, or an earlier deferring scan
            did not build them.  A table that already holds rows and all its
            indexes is left as it is (an incremental scan).
        """
        deferred: list[str] = []

        def _do(conn):
            self._ddl_lock(conn)
            deferred.clear()  # a retried transaction starts again
            insp = sa.inspect(conn)
            for stage in stages:
                table = self._table_of(conn, stage)
                if table is None or not table.indexes:
                    continue
                missing = _absent_indexes(insp, table)
                empty = conn.execute(sa.select(table.c.path).limit(1)).first() is None
                if empty:
                    for index in table.indexes - set(missing):
                        index.drop(conn)
                if empty or missing:
                    deferred.append(stage)

        self._write_tx(_do)
        return deferred

    def build_indexes(self, stages: Sequence[str] | None = None) -> float:
        """Create every missing query index of the stages' tables (all stages: None).

        Idempotent; the counterpart of :meth:`defer_indexes`.  Returns the
        seconds it took.
        """
        t0 = time.perf_counter()
        names = list(stages) if stages is not None else self.stage_names()

        def _do(conn):
            self._ddl_lock(conn)
            insp = sa.inspect(conn)
            for stage in names:
                table = self._table_of(conn, stage)
                if table is None:
                    continue
                for index in _absent_indexes(insp, table):
                    index.create(conn)

        self._write_tx(_do)
        return time.perf_counter() - t0

    def missing_indexes(self, stage: str = DEFAULT_STAGE) -> list[str]:
        """Names of the query indexes a stage's table lacks (deferred by an unfinished scan), sorted."""
        with self.engine.connect() as conn:
            table = self._table_of(conn, stage)
            if table is None:
                return []
            return sorted(ix.name for ix in _absent_indexes(sa.inspect(conn), table))

    def _table_of(self, conn, stage: str) -> sa.Table | None:
        """The result table of a stage the catalogue holds (from ``stages``), or None."""
        if stage == DEFAULT_STAGE:
            return _RESULTS
        row = conn.execute(sa.select(_STAGES.c.outputs).where(_STAGES.c.stage == stage)).first()
        if row is None:
            return None
        outputs = tuple(_stage.OutputField.from_dict(o) for o in (row[0] or []))
        return _stage_table(stage, outputs)

    def stage_outputs(self, stage: str) -> list["_stage.OutputField"]:
        """The declared outputs of a stage this catalogue holds (union over its versions)."""
        with self.engine.connect() as conn:
            return [_stage.OutputField.from_dict(o) for o in self._outputs_of(conn, stage)]

    def stage_names(self) -> list[str]:
        """The stages whose results this catalogue holds (``ostar`` first)."""
        with self.engine.connect() as conn:
            names = list(conn.execute(sa.select(_STAGES.c.stage).order_by(_STAGES.c.stage)).scalars())
        return sorted(set(names) | {DEFAULT_STAGE}, key=lambda n: (n != DEFAULT_STAGE, n))

    def _write_tx(self, fn, *args: Any) -> Any:
        """Run ``fn(conn, *args)`` in one write transaction, retrying lock timeouts and deadlocks."""
        engine = self.engine
        delay = 0.05
        for attempt in range(_RETRIES):
            try:
                with engine.connect().execution_options(lamost_write=True) as conn, conn.begin():
                    return fn(conn, *args)
            except (OperationalError, DBAPIError) as exc:
                if attempt == _RETRIES - 1 or not _is_transient(exc):
                    raise
                time.sleep(delay * (1 + (os.getpid() % 7) / 7))
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- scans
    def start_scan(self, model_version: str | None = None, *, code_version: str | None = None,
                   parameters: Mapping[str, Any] | None = None, host: str | None = None,
                   started: datetime | None = None, stages: Sequence[Any] | None = None,
                   **extra: Any) -> int:
        """Insert a provenance row for a new scan and return its id.

        Parameters
        ----------
        model_version : str, optional
            Model version the scan classifies with (with several stages: the
            first stage's).
        stages : sequence, optional
            The stages the scan runs (stage objects, classes, StageSpecs or their
            ``to_dict()`` with the resolved ``model_version``); their tables are
            created (or extended) now, before any worker writes.  Stored in the
            scan's ``stages`` column.
        code_version : str, optional
            Defaults to ``lamost_ostar.__version__``.
        parameters : mapping, optional
            JSON-serialisable scan parameters (paths, batch size, device, ...).
        host : str, optional
            Defaults to this machine's host name.
        started : datetime, optional
            Defaults to now (UTC).
        **extra
            Further provenance, merged into ``parameters``.
        """
        if code_version is None:
            from lamost_ostar import __version__ as code_version
        specs = [_stage.stage_spec(st) for st in (stages or ())]
        for spec in specs:
            self.ensure_stage(spec)
        if model_version is None and specs:
            model_version = specs[0].model_version
        row = {
            "started": started or datetime.now(timezone.utc),
            "model_version": model_version,
            "code_version": code_version,
            "parameters": _jsonable({**dict(parameters or {}), **extra}),
            "host": host if host is not None else socket.gethostname(),
            "status": "running",
            "stages": [sp.to_dict() for sp in specs] or None,
        }

        def _do(conn):
            return int(conn.execute(sa.insert(_SCANS).values(**row).returning(_SCANS.c.id)).scalar_one())

        scan_id = self._write_tx(_do)
        self._scan_models[scan_id] = (model_version, {sp.name: sp.model_version for sp in specs
                                                      if sp.model_version})
        return scan_id

    def update_scan(self, scan_id: int, counts: Mapping[str, Any] | Any | None = None, *,
                    status: str | None = None, finished: datetime | None = None,
                    **more: Any) -> None:
        """Update a scan's counts, status and summary (e.g. progress during a long scan).

        Parameters
        ----------
        scan_id : int
        counts : mapping or object, optional
            Counts as a mapping (or a dataclass / object with attributes); more
            can be given as keywords.  Recognised names, with or without a
            ``files_`` or ``n_`` prefix: ``seen`` (alias ``files``), ``read``,
            ``classified``, ``failed`` (alias ``errors``), ``skipped``.  When
            ``read`` is not given it is ``classified + failed`` (files opened).
            Every other key (e.g. ``n_candidates``, ``errors_by_reason``) is kept
            in the scan's ``summary`` JSON.
        status : str, optional
            e.g. ``running``, ``finished``/``complete``, ``partial``, ``interrupted``.
        finished : datetime, optional
            End time.
        """
        merged: dict[str, Any] = {**_as_mapping(counts), **more}
        values, extra = _count_values(merged)
        if extra:
            values["summary"] = _jsonable(extra)
        if status is not None:
            values["status"] = str(status)
        if finished is not None:
            values["finished"] = finished
        if not values:
            return

        def _do(conn):
            res = conn.execute(sa.update(_SCANS).where(_SCANS.c.id == int(scan_id)).values(**values))
            if res.rowcount == 0:
                raise CatalogueError(f"no scan with id {scan_id}")

        self._write_tx(_do)

    def finish_scan(self, scan_id: int, counts: Mapping[str, Any] | Any | None = None,
                    status: str = "finished", **more: Any) -> None:
        """Record a scan's final counts, status and end time.

        Accepts ``finish_scan(id, {"files_seen": ...}, "finished")`` as well as
        keyword counts ``finish_scan(id, n_files=..., n_errors=..., status=...)``;
        see :meth:`update_scan` for the names.
        """
        self.update_scan(scan_id, counts, status=status, finished=datetime.now(timezone.utc), **more)

    def scans(self) -> Table:
        """All scans with their provenance and counts, as an astropy Table (newest last).

        ``result_rows``/``error_rows`` count the rows carrying the scan's id of its
        first stage (the one its count columns describe; ``ostar`` for scans of
        older versions); ``stages`` lists the stages it ran (JSON), and the
        other stages' counts are in ``summary``.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(_SCANS).order_by(_SCANS.c.id)).mappings().all()
            primary = {r["id"]: _primary_stage(r["stages"]) for r in rows}
            n_res: dict[int, int] = {}
            for name in set(primary.values()):
                t = self._table_of(conn, name)
                if t is None:
                    continue
                ids = [i for i, n in primary.items() if n == name]
                for sid, n in conn.execute(sa.select(t.c.scan_id, sa.func.count())
                                           .where(t.c.scan_id.in_(ids)).group_by(t.c.scan_id)).all():
                    n_res[sid] = int(n)
            n_err = {(sid, st): int(n) for sid, st, n in conn.execute(
                sa.select(_ERRORS.c.scan_id, _ERRORS.c.stage, sa.func.count())
                .group_by(_ERRORS.c.scan_id, _ERRORS.c.stage)).all()}
        cols = ["id", "status", "started", "finished", "model_version", "code_version", "host",
                *SCAN_COUNT_COLUMNS, "result_rows", "error_rows", "stages", "parameters", "summary"]
        data: dict[str, list] = {c: [] for c in cols}
        for r in rows:
            for c in cols:
                if c == "result_rows":
                    v = n_res.get(r["id"], 0)
                elif c == "error_rows":
                    v = n_err.get((r["id"], primary[r["id"]]), 0)
                elif c in ("started", "finished"):
                    v = _iso(r[c])
                elif c == "stages":
                    v = ",".join(_stage_names_of(r["stages"])) or None
                elif c in ("parameters", "summary"):
                    v = json.dumps(r[c], sort_keys=True) if r[c] is not None else None
                else:
                    v = r[c]
                data[c].append(v)
        kinds = {"id": int, "result_rows": int, "error_rows": int, **{c: int for c in SCAN_COUNT_COLUMNS}}
        return _astropy_table().Table([_column(c, data[c], kinds.get(c, str)) for c in cols])

    def _scan_model(self, conn, scan_id: int | None, stage: str = DEFAULT_STAGE) -> str | None:
        """The model version scan ``scan_id`` recorded for ``stage`` (None if unknown)."""
        if scan_id is None:
            return None
        if scan_id not in self._scan_models:
            row = conn.execute(sa.select(_SCANS.c.model_version, _SCANS.c.stages)
                               .where(_SCANS.c.id == scan_id)).first()
            if row is None:
                self._scan_models[scan_id] = (None, {})
            else:
                per = {d.get("name"): d.get("model_version") for d in (row[1] or [])
                       if isinstance(d, Mapping) and d.get("model_version")}
                self._scan_models[scan_id] = (row[0], per)
        mv, per = self._scan_models[scan_id]
        if stage in per:
            return per[stage]
        return mv if (stage == DEFAULT_STAGE or not per) else None

    # ---- writing
    def write(self, scan_id: int | None, results: Iterable[Any], *, stage: Any = None) -> WriteSummary:
        """Write one batch of one stage's results in a single transaction.

        Parameters
        ----------
        scan_id : int or None
            The scan writing the batch (from :meth:`start_scan`).
        results : iterable
            The stage's results (duck-typed; mappings work too).  ``ok``
            results go to the stage's table, the others to ``errors`` with the
            stage's name.  A result without ``model_version`` takes the stage's,
            else the scan's.
        stage : stage object, class, StageSpec or None
            Whose results these are: its declaration gives the columns (the
            table is created on first use).  None: the ostar stage
            (``results``).

        Returns
        -------
        WriteSummary
            Rows submitted.  Rows already present for the same
            ``(path, model_version)`` are kept unchanged (idempotent).
        """
        items = list(results)
        spec = _stage.stage_spec(_stage.OStarStage if stage is None else stage)
        table = self.ensure_stage(spec)
        if not items:
            return WriteSummary()
        now = datetime.now(timezone.utc)
        return self._write_tx(self._write_batch, scan_id, items, now, spec, table)

    def _write_batch(self, conn, scan_id, items, now, spec, table) -> WriteSummary:
        scan_id = _as_int(scan_id)
        default_mv = spec.model_version or self._scan_model(conn, scan_id, spec.name) or spec.version
        if spec.name == DEFAULT_STAGE and spec.model_version is None:
            default_mv = self._scan_model(conn, scan_id, spec.name) or ""
        keys = []
        for item in items:
            path = _as_str(_get(item, "path"))
            if path is None:
                raise CatalogueError("a stage result has no path")
            keys.append((path, _as_str(_get(item, "model_version")) or default_mv or ""))
        # the first result of each (path, model_version); a success in the batch beats an error
        res_at: dict[tuple[str, str], int] = {}
        err_at: dict[tuple[str, str], int] = {}
        for i, (item, key) in enumerate(zip(items, keys)):
            (res_at if _get(item, "ok", False) else err_at).setdefault(key, i)
        for key in res_at:
            err_at.pop(key, None)
        # consistent key order -> no lock-order deadlocks between PostgreSQL writers
        res_keys, err_keys = sorted(res_at), sorted(err_at)
        in_stage = _ERRORS.c.stage == spec.name
        if res_keys:
            n = len(res_keys)
            cols = {"path": [k[0] for k in res_keys], "model_version": [k[1] for k in res_keys],
                    **spec.value_columns([items[res_at[k]] for k in res_keys])}
            const = {"scan_id": scan_id, "created": now, "stage_version": spec.version,
                     "code_version": _code_version()}
            _insert_new(conn, table, cols, const, n, ("path", "model_version"))
            # results take precedence: drop earlier error rows of files now classified
            for mv, paths in _group_paths(res_keys):
                for chunk in _chunks(paths, _CHUNK):
                    conn.execute(sa.delete(_ERRORS).where(in_stage, _ERRORS.c.model_version == mv,
                                                          _ERRORS.c.path.in_(chunk)))
        if err_keys:
            errs = [items[err_at[k]] for k in err_keys]
            cols = {"path": [k[0] for k in err_keys], "model_version": [k[1] for k in err_keys],
                    "reason": [_as_str(_get(e, "error_reason")) or "unknown" for e in errs],
                    "message": [_as_str(_get(e, "error_message")) for e in errs]}
            const = {"scan_id": scan_id, "stage": spec.name, "created": now}
            _insert_new(conn, _ERRORS, cols, const, len(err_keys), ("stage", "path", "model_version"))
            # never keep an error for a file that already has a result
            r = table.alias("r")
            for mv, paths in _group_paths(err_keys):
                for chunk in _chunks(paths, _CHUNK):
                    has_result = sa.exists().where(r.c.path == _ERRORS.c.path,
                                                   r.c.model_version == _ERRORS.c.model_version)
                    conn.execute(sa.delete(_ERRORS).where(in_stage, _ERRORS.c.model_version == mv,
                                                          _ERRORS.c.path.in_(chunk), has_result))
        return WriteSummary(results=len(res_keys), errors=len(err_keys))

    # ---- resume
    def done_paths(self, paths: Iterable[str], model_version: str | None, *,
                   include_errors: bool = True, scan_id: int | None = None,
                   stage: str = DEFAULT_STAGE) -> set[str]:
        """Return the subset of ``paths`` already done by ``stage`` with ``model_version``.

        A path is done when it has a row in the stage's table (or, with
        ``include_errors``, an error row of the stage) for that model version
        (with ``scan_id``: a row written by that scan).  Queries are batched
        (``IN`` lists of at most 500 paths), so any number of paths may be passed.
        """
        mv = model_version or ""
        wanted = list(dict.fromkeys(os.fspath(p) for p in paths))
        done: set[str] = set()
        if not wanted:
            return done
        with self.engine.connect() as conn:
            table = self._table_of(conn, stage)
            tables = ([table] if table is not None else []) + ([_ERRORS] if include_errors else [])
            for chunk in _chunks(wanted, _CHUNK):
                for t in tables:
                    conds = [t.c.model_version == mv, t.c.path.in_(chunk)]
                    if t is _ERRORS:
                        conds.append(t.c.stage == stage)
                    if scan_id is not None:
                        conds.append(t.c.scan_id == int(scan_id))
                    done.update(conn.execute(sa.select(t.c.path).where(*conds)).scalars())
        return done

    def scan_counts(self, scan_id: int, threshold: float | None = None,
                    stage: str = DEFAULT_STAGE) -> dict[str, Any]:
        """What scan ``scan_id`` wrote for ``stage``, counted from its rows (the truth a
        scan row is closed with).

        Returns ``{"results": n, "errors": n, "errors_by_reason": {reason: n}}``,
        with ``threshold`` and a stage that decides O candidates ``"candidates"``
        (its results that are candidates: ``is_candidate``, or ``p_o >=
        threshold`` for rows without a decision), and ``"counts"``: for each of
        the stage's ``summary`` outputs, its True rows.
        """
        sid = int(scan_id)
        with self.engine.connect() as conn:
            table = self._table_of(conn, stage)
            n_res = 0 if table is None else int(conn.execute(
                sa.select(sa.func.count()).select_from(table).where(table.c.scan_id == sid)).scalar_one())
            by_reason = {str(r): int(n) for r, n in conn.execute(
                sa.select(_ERRORS.c.reason, sa.func.count())
                .where(_ERRORS.c.scan_id == sid, _ERRORS.c.stage == stage)
                .group_by(_ERRORS.c.reason)).all()}
            out: dict[str, Any] = {"results": n_res, "errors": sum(by_reason.values()),
                                   "errors_by_reason": by_reason}
            if table is None:
                return out
            cols = set(table.c.keys())
            if threshold is not None and ({"is_candidate", "p_o"} & cols):
                out["candidates"] = int(conn.execute(
                    sa.select(sa.func.count()).select_from(table)
                    .where(table.c.scan_id == sid, _candidate_clause(float(threshold), table))).scalar_one())
            summary = [o["name"] for o in self._outputs_of(conn, stage) if o.get("summary")
                       and o["name"] in cols and o["name"] != "is_candidate"]
            if summary:
                q = sa.select(*[sa.func.count().filter(table.c[n].is_(True)) for n in summary]
                              ).where(table.c.scan_id == sid)
                out["counts"] = dict(zip(summary, (int(v) for v in conn.execute(q).one())))
        return out

    def _outputs_of(self, conn, stage: str) -> list[dict]:
        row = conn.execute(sa.select(_STAGES.c.outputs).where(_STAGES.c.stage == stage)).first()
        if row is None:
            return [o.to_dict() for o in _stage.OSTAR_OUTPUTS] if stage == DEFAULT_STAGE else []
        return list(row[0] or [])

    # ---- reading
    def counts(self, model_version: str | None = None, stage: str = DEFAULT_STAGE) -> dict[str, int]:
        """Numbers of result rows and error rows of ``stage`` (optionally of one model version)."""
        with self.engine.connect() as conn:
            table = self._table_of(conn, stage)
            out = {}
            for name, t in (("results", table), ("errors", _ERRORS)):
                if t is None:
                    out[name] = 0
                    continue
                q = sa.select(sa.func.count()).select_from(t)
                if t is _ERRORS:
                    q = q.where(t.c.stage == stage)
                if model_version is not None:
                    q = q.where(t.c.model_version == model_version)
                out[name] = int(conn.execute(q).scalar_one())
        return out

    def model_versions(self, stage: str = DEFAULT_STAGE, *, scan_id: int | None = None) -> dict[str, int]:
        """Model version -> number of result rows, in the table of ``stage``."""
        with self.engine.connect() as conn:
            table = self._table_of(conn, stage)
            if table is None:
                return {}
            q = sa.select(table.c.model_version, sa.func.count()).group_by(table.c.model_version)
            if scan_id is not None:
                q = q.where(table.c.scan_id == int(scan_id))
            return {str(v): int(n) for v, n in conn.execute(q).all()}

    def stages(self) -> Table:
        """The stages this catalogue holds: table, stage version, model versions and row counts."""
        names = self.stage_names()
        with self.engine.connect() as conn:
            reg = {r["stage"]: r for r in conn.execute(sa.select(_STAGES)).mappings().all()}
            errs = dict(conn.execute(sa.select(_ERRORS.c.stage, sa.func.count())
                                     .group_by(_ERRORS.c.stage)).all())
        data: dict[str, list] = {c: [] for c in ("stage", "table", "stage_version", "model_versions",
                                                  "result_rows", "error_rows", "outputs")}
        for name in names:
            versions = self.model_versions(name)
            r = reg.get(name)
            data["stage"].append(name)
            data["table"].append(stage_table_name(name))
            data["stage_version"].append(r["stage_version"] if r is not None else None)
            data["model_versions"].append(", ".join(f"{v} ({n})" for v, n in sorted(versions.items()))
                                          or None)
            data["result_rows"].append(sum(versions.values()))
            data["error_rows"].append(int(errs.get(name, 0)))
            data["outputs"].append(len(r["outputs"] or []) if r is not None else 0)
        kinds = {"result_rows": int, "error_rows": int, "outputs": int}
        return _astropy_table().Table([_column(c, v, kinds.get(c, str)) for c, v in data.items()])

    def errors(self, *, scan_id: int | None = None, model_version: str | None = None,
               reason: str | None = None, limit: int | None = None,
               stage: str | None = None) -> Table:
        """Error rows (path, model_version, scan_id, reason, message, created, stage) as a Table.

        ``stage=None``: the errors of every stage.
        """
        q = sa.select(_ERRORS.c.path, _ERRORS.c.model_version, _ERRORS.c.scan_id,
                      _ERRORS.c.reason, _ERRORS.c.message, _ERRORS.c.created,
                      _ERRORS.c.stage).order_by(_ERRORS.c.id)
        if scan_id is not None:
            q = q.where(_ERRORS.c.scan_id == int(scan_id))
        if model_version is not None:
            q = q.where(_ERRORS.c.model_version == model_version)
        if reason is not None:
            q = q.where(_ERRORS.c.reason == reason)
        if stage is not None:
            q = q.where(_ERRORS.c.stage == stage)
        if limit is not None:
            q = q.limit(int(limit))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        names = ["path", "model_version", "scan_id", "reason", "message", "created", "stage"]
        data = {n: [(_iso(r[i]) if n == "created" else r[i]) for r in rows] for i, n in enumerate(names)}
        return _astropy_table().Table([_column(n, data[n], int if n == "scan_id" else str) for n in names])

    def query(self, *, min_p_o: float | None = None, predicted_class: str | Sequence[str] | None = None,
              cone: tuple[float, float, float] | None = None, snr_min: float | None = None,
              snr_max: float | None = None, snr_band: str = "g", scan_id: int | None = None,
              model_version: str | None = None, sort: str | None = "p_o",
              descending: bool | None = None, limit: int | None = None,
              all_rows: bool = False, candidates: bool | None = None,
              min_posterior: float | None = None, min_heii_sigma: float | None = None,
              join: Sequence[str] = (), where: Sequence[str] | str = ()) -> Table:
        """Select results of the ostar stage (table ``results``) as an astropy Table.

        Parameters
        ----------
        min_p_o : float, optional
            Minimum (balanced) p(O).
        candidates : bool, optional
            True: only the rows the model's decision made candidates
            (``is_candidate``; for rows of model versions without a decision,
            p(O) >= :data:`DEFAULT_P_O_THRESHOLD`); False: only the others.
            Default: True unless ``all_rows`` or another p(O)/posterior/He II
            selection is given.
        min_posterior : float, optional
            Minimum p(O) at the survey prior (``posterior_o``).
        min_heii_sigma : float, optional
            Minimum He II evidence (``heii_sigma``).
        predicted_class : str or sequence of str, optional
            Keep rows whose predicted class is one of these (case-insensitive).
        cone : (ra, dec, radius), optional
            Cone search in degrees: an indexed bounding box in SQL, then the exact
            great-circle distance in numpy.  Adds a ``dist`` column (deg).
        snr_min, snr_max : float, optional
            S/N range (inclusive) in band ``snr_band`` (``g``, ``r`` or ``i``).
        scan_id : int, optional
            Rows written by this scan.
        model_version : str, optional
            Rows of this model version.
        sort : str or None
            Column to sort by (any output column, or ``dist`` with a cone);
            descending by default for ``p_*`` and ``snr_*``, ascending otherwise.
            NULLs sort last; ties are ordered by row id in the same direction
            (``sort=None``: insertion order).
        descending : bool, optional
            Override the sort direction.
        limit : int, optional
            Maximum number of rows (applied after sorting and the cone cut).
        all_rows : bool
            Every result row, not only candidates.
        join : sequence of str, optional
            Other stages whose results are joined on the file path (left join),
            each ``NAME`` or ``NAME@MODEL_VERSION``; their outputs come as columns
            ``NAME.column``.  A stage holding rows of several model versions must
            be given one (:class:`CatalogueError` otherwise: no silent duplicates).
        where : str or sequence of str, optional
            Conditions, all of which must hold (see :func:`parse_where`), on this
            stage's columns or ``NAME.column`` of another stage (joined as needed),
            e.g. ``"heii_lines.heii_sigma > 3"``.

        Returns
        -------
        astropy.table.Table
            Columns :data:`RESULT_COLUMNS` (plus ``dist`` for a cone search, and the
            joined stages' columns).

        See Also
        --------
        iter_query : the same selection in chunks of bounded size.
        query_stage : another stage's results.
        """
        parts = list(self.iter_query(
            min_p_o=min_p_o, predicted_class=predicted_class, cone=cone, snr_min=snr_min,
            snr_max=snr_max, snr_band=snr_band, scan_id=scan_id, model_version=model_version,
            sort=sort, descending=descending, limit=limit, all_rows=all_rows, candidates=candidates,
            min_posterior=min_posterior, min_heii_sigma=min_heii_sigma, join=join, where=where))
        return parts[0] if len(parts) == 1 else _astropy_table().vstack(parts, metadata_conflicts="silent")

    def iter_query(self, *, min_p_o: float | None = None,
                   predicted_class: str | Sequence[str] | None = None,
                   cone: tuple[float, float, float] | None = None, snr_min: float | None = None,
                   snr_max: float | None = None, snr_band: str = "g", scan_id: int | None = None,
                   model_version: str | None = None, sort: str | None = "p_o",
                   descending: bool | None = None, limit: int | None = None,
                   all_rows: bool = False, candidates: bool | None = None,
                   min_posterior: float | None = None, min_heii_sigma: float | None = None,
                   chunk_rows: int = 10_000, join: Sequence[str] = (),
                   where: Sequence[str] | str = ()) -> Iterator[Table]:
        """:meth:`query` as a stream of Tables of at most ``chunk_rows`` rows.

        Memory stays bounded whatever the catalogue size (the rows are fetched
        with a server-side cursor where the database has one), except for
        ``sort="dist"``, which needs the whole cone.  Yields at least one
        (possibly empty) Table; all chunks have the same columns.
        """
        t = _RESULTS
        conds = []
        if candidates is None:
            candidates = None if (all_rows or min_p_o is not None or min_posterior is not None
                                  or min_heii_sigma is not None) else True
        if candidates is not None:
            rule = _candidate_clause()
            conds.append(rule if candidates else sa.not_(rule))
        for name, value, col, lo, hi in (("p(O)", min_p_o, t.c.p_o, 0.0, 1.0),
                                         ("posterior p(O)", min_posterior, t.c.posterior_o, 0.0, 1.0),
                                         ("He II sigma", min_heii_sigma, t.c.heii_sigma, -np.inf, np.inf)):
            if value is None:
                continue
            v = _as_float(value)
            if v is None or not lo <= v <= hi:
                raise CatalogueError(f"minimum {name} must be a number" + (" in [0, 1]" if hi == 1.0 else ""))
            conds.append(col >= v)
        if predicted_class is not None:
            classes = [predicted_class] if isinstance(predicted_class, str) else list(predicted_class)
            classes = [c.strip().upper() for c in classes if c and c.strip()]
            if classes:
                conds.append(t.c.predicted_class.in_(classes))
        meta = {"ORIGIN": "lamost_ostar catalogue"}
        if min_p_o is not None:
            meta["MIN_P_O"] = float(min_p_o)
        if candidates is not None:
            meta["CANDIDAT"] = bool(candidates)
        cols = [_OutCol(c, t.c[c], _RESULT_KINDS[c], _UNITS.get(c), _DESCRIPTIONS.get(c))
                for c in RESULT_COLUMNS]
        yield from self._select(DEFAULT_STAGE, t, cols, conds, meta, cone=cone, snr_min=snr_min,
                                snr_max=snr_max, snr_band=snr_band, scan_id=scan_id,
                                model_version=model_version, sort=sort, descending=descending,
                                limit=limit, chunk_rows=chunk_rows, join=join, where=where)

    def query_stage(self, stage: str, **kwargs: Any) -> Table:
        """Select the results of any stage as an astropy Table (see :meth:`iter_query_stage`)."""
        parts = list(self.iter_query_stage(stage, **kwargs))
        return parts[0] if len(parts) == 1 else _astropy_table().vstack(parts, metadata_conflicts="silent")

    def iter_query_stage(self, stage: str, *, cone: tuple[float, float, float] | None = None,
                         snr_min: float | None = None, snr_max: float | None = None,
                         snr_band: str = "g", scan_id: int | None = None,
                         model_version: str | None = None, sort: str | None = None,
                         descending: bool | None = None, limit: int | None = None,
                         join: Sequence[str] = (), where: Sequence[str] | str = (),
                         chunk_rows: int = 10_000) -> Iterator[Table]:
        """The results of ``stage`` (every row; select with ``where``), in chunks.

        Columns: :data:`STAGE_RESULT_COLUMNS` around the stage's declared outputs
        (with their units and descriptions), then the joined stages' columns;
        the other arguments are those of :meth:`iter_query`.  For ``ostar`` the
        columns are :data:`RESULT_COLUMNS`.
        """
        with self.engine.connect() as conn:
            table = self._table_of(conn, stage)
            outputs = self._outputs_of(conn, stage)
        if table is None:
            raise CatalogueError(f"no results of stage {stage!r} in this catalogue "
                                 f"(stages: {', '.join(self.stage_names())})")
        if stage == DEFAULT_STAGE:
            cols = [_OutCol(c, table.c[c], _RESULT_KINDS[c], _UNITS.get(c), _DESCRIPTIONS.get(c))
                    for c in RESULT_COLUMNS]
        else:
            cols = _stage_columns(table, outputs)
        meta = {"ORIGIN": "lamost_ostar catalogue", "STAGE": stage}
        yield from self._select(stage, table, cols, [], meta, cone=cone, snr_min=snr_min,
                                snr_max=snr_max, snr_band=snr_band, scan_id=scan_id,
                                model_version=model_version, sort=sort, descending=descending,
                                limit=limit, chunk_rows=chunk_rows, join=join, where=where)

    def _select(self, stage: str, t: sa.Table, cols: list["_OutCol"], conds: list, meta: dict, *,
                cone, snr_min, snr_max, snr_band, scan_id, model_version, sort, descending, limit,
                chunk_rows, join, where) -> Iterator[Table]:
        """The shared part of the queries: S/N, scan, model, cone, joins, where, sort, limit."""
        conds = list(conds)
        if snr_band not in ("g", "r", "i"):
            raise CatalogueError(f"S/N band must be g, r or i, not {snr_band!r}")
        snr_col = t.c[f"snr_{snr_band}"]
        if snr_min is not None:
            conds.append(snr_col >= float(snr_min))
        if snr_max is not None:
            conds.append(snr_col <= float(snr_max))
        if snr_min is not None and snr_max is not None and float(snr_min) > float(snr_max):
            raise CatalogueError(f"S/N range is empty: min {snr_min:g} > max {snr_max:g}")
        if scan_id is not None:
            conds.append(t.c.scan_id == int(scan_id))
        if model_version is not None:
            conds.append(t.c.model_version == str(model_version))
        centre = None
        if cone is not None:
            if len(cone) != 3:
                raise CatalogueError("cone needs three numbers: RA DEC RADIUS (degrees)")
            centre = _check_cone(*cone)
            dec_min, dec_max, ra_ranges = cone_bounds(*centre)
            conds.append(t.c.dec.between(dec_min, dec_max))
            if ra_ranges is not None:
                conds.append(sa.or_(*[t.c.ra.between(lo, hi) for lo, hi in ra_ranges]))
        if limit is not None:
            limit = int(limit)
            if limit < 0:
                raise CatalogueError("limit must be >= 0")
        chunk_rows = max(1, int(chunk_rows))

        # joins: the named stages, and those a where condition refers to
        wheres = [where] if isinstance(where, str) else list(where or ())
        wanted: dict[str, str | None] = {}
        for item in join or ():
            name, _, version = str(item).partition("@")
            name = name.strip()
            if name == stage:
                raise CatalogueError(f"cannot join stage {stage!r} with itself")
            wanted[name] = version.strip() or None
        for text in wheres:
            for ref in _where_stages(text):
                if ref != stage:
                    wanted.setdefault(ref, None)
        source = t
        resolvable: dict[str, tuple[Any, str]] = {}
        for c in cols:
            resolvable[c.name] = (c.expr, _TYPE_NAME.get(c.kind, "str"))
            resolvable[f"{stage}.{c.name}"] = resolvable[c.name]
        if wanted:
            with self.engine.connect() as conn:
                for name, version in wanted.items():
                    other = self._table_of(conn, name)
                    if other is None:
                        raise CatalogueError(f"no results of stage {name!r} in this catalogue "
                                             f"(stages: {', '.join(self.stage_names())})")
                    if version is None:
                        held = dict(conn.execute(sa.select(other.c.model_version, sa.func.count())
                                                 .group_by(other.c.model_version)).all())
                        if len(held) > 1:
                            listing = ", ".join(f"{v} ({n} rows)" for v, n in sorted(held.items()))
                            raise CatalogueError(
                                f"stage {name!r} holds results of {len(held)} model versions "
                                f"({listing}): join one of them as {name}@VERSION")
                    a = other.alias(f"j_{name}")
                    on = [a.c.path == t.c.path]
                    if version is not None:
                        on.append(a.c.model_version == version)
                    source = source.outerjoin(a, sa.and_(*on))
                    extra = [_OutCol(f"{name}.model_version", a.c.model_version, str, None,
                                     f"model version of the {name} result")]
                    for o in self._outputs_of(conn, name):
                        if o["name"] in a.c:
                            extra.append(_OutCol(f"{name}.{o['name']}", a.c[o["name"]],
                                                 _KIND_OF.get(o["type"], str), o.get("unit"),
                                                 o.get("description")))
                    for c in extra:
                        resolvable[c.name] = (c.expr, _TYPE_NAME.get(c.kind, "str"))
                    cols = cols + extra
        for text in wheres:
            conds.append(parse_where(text, resolvable))

        names = [c.name for c in cols]
        sortable = set(names) | ({"dist"} if cone is not None else set())
        if sort is not None and sort not in sortable:
            raise CatalogueError(f"cannot sort by {sort!r}; choose one of {', '.join(sorted(sortable))}")
        if descending is None:
            base = sort.rsplit(".", 1)[-1] if sort else ""
            descending = sort is not None and base.startswith(_SORT_DESCENDING_BY_DEFAULT)

        q = sa.select(*[c.expr.label(f"c{i}") for i, c in enumerate(cols)]).select_from(source).where(*conds)
        if sort is not None and sort != "dist":
            col = cols[names.index(sort)].expr
            # NULLs last in both directions; ties by id in the same direction, so an
            # index on the sort column delivers the order without a full sort
            q = q.order_by((col.desc() if descending else col.asc()).nulls_last(),
                           t.c.id.desc() if descending else t.c.id.asc())
        else:
            q = q.order_by(t.c.id)
        if limit is not None and cone is None:
            q = q.limit(limit)

        if sort == "dist":  # the exact distance is known only after the fetch: sort in numpy
            parts = list(self._fetch(q, centre, chunk_rows, meta, cols))
            table = parts[0] if len(parts) == 1 else _astropy_table().vstack(parts, metadata_conflicts="silent")
            order = np.argsort(np.asarray(table["dist"]), kind="stable")
            table = table[order[::-1] if descending else order]
            if limit is not None:
                table = table[:limit]
            for start in range(0, max(len(table), 1), chunk_rows):
                yield table[start:start + chunk_rows]
            return

        remaining = limit
        yielded = False
        for part in self._fetch(q, centre, chunk_rows, meta, cols):
            if remaining is not None:
                part = part[:remaining]
                remaining -= len(part)
            if len(part) or not yielded:
                yield part
                yielded = True
            if remaining == 0:
                break

    def _fetch(self, q, centre, chunk_rows: int, meta: dict, cols: list["_OutCol"]) -> Iterator[Table]:
        """Run ``q`` and yield Tables of at most ``chunk_rows`` rows (>= 1 Table, cone cut applied)."""
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=chunk_rows).execute(q)
            empty = True
            for rows in result.partitions(chunk_rows):
                table = _rows_table(rows, centre, meta, cols)
                if len(table) or empty:
                    empty = False
                    yield table
            if empty:
                yield _rows_table([], centre, meta, cols)

    def candidates(self, min_p_o: float | None = None, **kwargs: Any) -> Table:
        """O-star candidates: the model's decision (:meth:`query` with ``candidates=True``),
        or ``p_o >= min_p_o`` when ``min_p_o`` is given."""
        if min_p_o is not None:
            return self.query(min_p_o=min_p_o, **kwargs)
        return self.query(candidates=True, **kwargs)


#: The writer role of :class:`Catalogue` (the scan's sink): the same picklable class.
CatalogueWriter = Catalogue


# --------------------------------------------------------------------------- --where

_WHERE_TOKEN = re.compile(r"""
    \s*(?:
      (?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<str>'[^']*'|"[^"]*")
    | (?P<op><=|>=|!=|<>|==|=|<|>)
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)
    )""", re.VERBOSE)
_WHERE_OPS = {"<": "__lt__", "<=": "__le__", ">": "__gt__", ">=": "__ge__", "=": "__eq__",
              "==": "__eq__", "!=": "__ne__", "<>": "__ne__"}
_WHERE_HELP = ("COLUMN OP VALUE (OP one of < <= > >= = != ; VALUE a number, true, false or a "
               "quoted string) or COLUMN IS [NOT] NULL, joined by AND")


def _where_tokens(text: str) -> list[tuple[str, str]]:
    out = []
    pos = 0
    text = str(text)
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _WHERE_TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise CatalogueError(f"--where {text!r}: cannot read {text[pos:].strip()[:20]!r} "
                                 f"(write {_WHERE_HELP})")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _where_stages(text: str) -> set[str]:
    """Stage names a where expression refers to (``stage.column``)."""
    return {v.split(".", 1)[0] for k, v in _where_tokens(text) if k == "name" and "." in v}


def parse_where(text: str, columns: Mapping[str, tuple[Any, str]]):
    """A SQL condition from a small, safe expression language (no SQL is ever pasted).

    ``text`` is one or more comparisons joined by ``AND``::

        heii_lines.heii_sigma > 3 AND snr_g >= 10
        heii_lines.o_star_like = true
        predicted_class = 'O'
        posterior_o IS NOT NULL

    Column names are looked up in ``columns`` (name -> (SQL column, type name));
    values become bound parameters of the column's type.

    Raises
    ------
    CatalogueError
        Unknown column, bad syntax, or a value that does not fit the column.
    """
    toks = _where_tokens(text)
    if not toks:
        raise CatalogueError(f"--where {text!r} is empty (write {_WHERE_HELP})")
    clauses = []
    i = 0

    def bad(why: str) -> CatalogueError:
        return CatalogueError(f"--where {text!r}: {why} (write {_WHERE_HELP})")

    while True:
        if i >= len(toks) or toks[i][0] != "name" or toks[i][1].lower() in ("and", "is", "not", "null"):
            raise bad("a column name was expected")
        name = toks[i][1]
        if name not in columns:
            near = sorted(c for c in columns if "." in c) if "." in name else \
                sorted(c for c in columns if "." not in c)
            raise bad(f"unknown column {name!r} (columns: {', '.join(near[:60])})")
        col, kind = columns[name]
        i += 1
        if i < len(toks) and toks[i] == ("name", toks[i][1]) and toks[i][1].lower() == "is":
            negate = i + 1 < len(toks) and toks[i + 1][0] == "name" and toks[i + 1][1].lower() == "not"
            j = i + 2 if negate else i + 1
            if j >= len(toks) or toks[j][0] != "name" or toks[j][1].lower() != "null":
                raise bad("IS must be followed by NULL or NOT NULL")
            clauses.append(col.is_not(None) if negate else col.is_(None))
            i = j + 1
        else:
            if i >= len(toks) or toks[i][0] != "op":
                raise bad(f"an operator was expected after {name!r}")
            op = toks[i][1]
            i += 1
            if i >= len(toks):
                raise bad(f"a value was expected after {op!r}")
            vkind, raw = toks[i]
            i += 1
            if vkind == "num":
                if kind not in ("float", "int"):
                    raise bad(f"{name} is a {kind} column, not a number")
                value: Any = float(raw) if kind == "float" or any(ch in raw for ch in ".eE") else int(raw)
            elif vkind == "str":
                if kind != "str":
                    raise bad(f"{name} is a {kind} column, not a string")
                value = raw[1:-1]
            elif vkind == "name" and raw.lower() in ("true", "false"):
                if kind != "bool":
                    raise bad(f"{name} is a {kind} column, not true/false")
                value = raw.lower() == "true"
            else:
                raise bad(f"{raw!r} is not a value")
            if kind == "bool" and op not in ("=", "==", "!=", "<>"):
                raise bad(f"{name} is true/false: use = or !=")
            clauses.append(getattr(col, _WHERE_OPS[op])(value))
        if i >= len(toks):
            break
        if toks[i][0] == "name" and toks[i][1].lower() == "and":
            i += 1
            continue
        raise bad(f"AND was expected before {toks[i][1]!r} (OR is not supported: run two queries)")
    return sa.and_(*clauses)


# --------------------------------------------------------------------------- helpers

_RESULT_KINDS: dict[str, type] = {
    **{c: str for c in RESULT_COLUMNS},
    **{c: float for c in ("ra", "dec", "snr_g", "snr_r", "snr_i", *CLASS_COLUMNS.values())},
    **{c: int for c in ("obsid", "lmjd", "spid", "fiberid", "flags", "scan_id", "id")},
    **DECISION_COLUMNS, **EVIDENCE_COLUMNS,
}
_UNITS = {"ra": "deg", "dec": "deg"}


@dataclass
class _OutCol:
    """One column of a query's output: label, SQL expression, kind, unit, description."""

    name: str
    expr: Any
    kind: type
    unit: str | None = None
    description: str | None = None


_TYPE_NAME = {float: "float", int: "int", bool: "bool", str: "str"}

#: Columns of a plugin stage's query output, before and after its declared outputs.
STAGE_RESULT_COLUMNS = (("path", "obsid", "designation", "ra", "dec"),
                        ("snr_g", "snr_r", "snr_i", "lmjd", "planid", "spid", "fiberid",
                         "pipeline_class", "pipeline_subclass", "data_release", "layout",
                         "model_version", "stage_version", "code_version", "scan_id", "id"))
_META_KINDS = {m.name: _KIND_OF[m.type] for m in _stage.METADATA_FIELDS}
_META_DESC = {m.name: m.description for m in _stage.METADATA_FIELDS}


def _stage_columns(table: sa.Table, outputs: Sequence[Mapping[str, Any]]) -> list[_OutCol]:
    head, tail = STAGE_RESULT_COLUMNS
    kinds = {**_META_KINDS, "path": str, "model_version": str, "stage_version": str,
             "code_version": str, "scan_id": int, "id": int}
    cols = [_OutCol(c, table.c[c], kinds[c], _UNITS.get(c), _DESCRIPTIONS.get(c) or _META_DESC.get(c))
            for c in head]
    for o in outputs:
        if o["name"] in table.c:
            cols.append(_OutCol(o["name"], table.c[o["name"]], _KIND_OF.get(o["type"], str),
                                o.get("unit"), o.get("description")))
    cols += [_OutCol(c, table.c[c], kinds[c], _UNITS.get(c),
                     _DESCRIPTIONS.get(c) or _META_DESC.get(c)) for c in tail]
    return cols


def _rows_table(rows: Sequence, centre: tuple[float, float, float] | None, meta: dict,
                cols: Sequence[_OutCol]) -> Table:
    """Result rows -> Table; with a cone centre, keep rows within the radius and add ``dist``."""
    data = {c.name: [r[i] for r in rows] for i, c in enumerate(cols)}
    out = []
    for c in cols:
        values = data[c.name]
        if c.kind is str:
            values = [v if v is None or isinstance(v, str) else json.dumps(v, sort_keys=True)
                      for v in values]
        col = _column(c.name, values, c.kind)
        if c.unit:
            col.unit = c.unit
        if c.description:
            col.description = c.description
        out.append(col)
    table = _astropy_table().Table(out, meta=dict(meta))
    if centre is not None:
        c_ra, c_dec, c_rad = centre
        ra = np.array([np.nan if v is None else v for v in data["ra"]], dtype=np.float64)
        dec = np.array([np.nan if v is None else v for v in data["dec"]], dtype=np.float64)
        dist = angular_distance(c_ra, c_dec, ra, dec)
        keep = np.isfinite(dist) & (dist <= c_rad)
        table = table[keep]
        table["dist"] = dist[keep]
        table["dist"].unit = "deg"
        table["dist"].description = _DESCRIPTIONS["dist"]
    return table


_CODE_VERSION: str | None = None


def _code_version() -> str:
    """This process's ``lamost_ostar.code_version()`` (computed once: it runs git)."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        import lamost_ostar

        _CODE_VERSION = lamost_ostar.code_version()
    return _CODE_VERSION


def _stage_names_of(stages: Any) -> list[str]:
    if isinstance(stages, str):
        try:
            stages = json.loads(stages)
        except ValueError:
            return []
    return [d["name"] for d in (stages or []) if isinstance(d, Mapping) and d.get("name")]


def _primary_stage(stages: Any) -> str:
    """The stage a scans row's count columns describe: its first, else ostar (older scans)."""
    names = _stage_names_of(stages)
    return names[0] if names else DEFAULT_STAGE


_COUNT_ALIASES = {"seen": "files_seen", "files": "files_seen", "read": "files_read",
                  "classified": "files_classified", "failed": "files_failed",
                  "errors": "files_failed", "skipped": "files_skipped"}


def _as_mapping(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return {k: getattr(obj, k) for k in dir(obj)
            if not k.startswith("_") and not callable(getattr(obj, k))}


def _count_values(counts: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, Any]]:
    """Split counts into scan count columns and extra summary items."""
    out: dict[str, int] = {}
    extra: dict[str, Any] = {}
    for key, value in counts.items():
        base = key
        for prefix in ("files_", "n_"):
            if base.startswith(prefix):
                base = base[len(prefix):]
        col = _COUNT_ALIASES.get(base) or _COUNT_ALIASES.get(key)
        if col is not None and value is not None and col not in out:
            out[col] = int(value)
        else:
            extra[key] = value
    if "files_read" not in out and "files_classified" in out and "files_failed" in out:
        out["files_read"] = out["files_classified"] + out["files_failed"]
    return out, extra


def _insert_new(conn, table: sa.Table, cols: Mapping[str, list[Any]], const: Mapping[str, Any],
                n: int, conflict: Sequence[str]) -> None:
    """``INSERT ... ON CONFLICT (conflict) DO NOTHING`` of ``n`` rows given column by column.

    The statement is compiled once per (table, dialect, columns) and kept in
    the table's ``info``; each column's SQL type converts its values
    (``bind_processor``: JSON to text, timestamps for SQLite), a constant
    column once; the rows go to the driver's ``executemany`` as they are.
    The same SQL and values as ``conn.execute(insert(table)
    .on_conflict_do_nothing(...), rows)``, without SQLAlchemy building the
    parameters row by row.
    """
    dialect = conn.dialect
    names = tuple(cols) + tuple(const)
    key = (dialect.name, dialect.driver, names, tuple(conflict))
    cache = table.info.setdefault("lamost_ostar_inserts", {})
    hit = cache.get(key)
    if hit is None:
        ins = postgresql.insert if dialect.name == "postgresql" else sqlite.insert
        compiled = ins(table).on_conflict_do_nothing(index_elements=list(conflict)).compile(
            dialect=dialect, column_keys=list(names))
        order = tuple(compiled.positiontup) if dialect.positional else tuple(compiled.params)
        if set(order) != set(names):  # pragma: no cover - bind names other than the column keys
            raise CatalogueError(f"cannot bind the columns of {table.name!r} by name")
        procs = [table.c[c].type.dialect_impl(dialect).bind_processor(dialect) for c in order]
        hit = cache[key] = (str(compiled), order, procs)
    sql, order, procs = hit
    columns = []
    for name, proc in zip(order, procs):
        if name in const:
            v = const[name]
            columns.append([proc(v) if proc is not None else v] * n)
        else:
            values = cols[name]
            columns.append([proc(v) for v in values] if proc is not None else values)
    if dialect.positional:
        params: list[Any] = list(zip(*columns))
    else:
        params = [dict(zip(order, row)) for row in zip(*columns)]
    conn.exec_driver_sql(sql, params)


def _absent_indexes(insp, table: sa.Table) -> list[sa.Index]:
    """The declared query indexes of ``table`` that the database lacks (``insp``: an inspector)."""
    have = {ix["name"] for ix in insp.get_indexes(table.name)}
    return [ix for ix in table.indexes if ix.name not in have]


def _group_paths(rows: Iterable[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = {}
    for path, mv in rows:
        groups.setdefault(mv, []).append(path)
    yield from groups.items()


def _chunks(seq: Sequence, n: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _is_transient(exc: BaseException) -> bool:
    """Lock timeouts (SQLite), deadlocks and serialisation failures (PostgreSQL)."""
    orig = getattr(exc, "orig", exc)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code in ("40P01", "40001", "55P03"):
        return True
    text = str(orig).lower()
    return "database is locked" in text or "database table is locked" in text or "busy" in text


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON with a permissive default (paths, numpy scalars -> str/float)."""
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, (set, frozenset, tuple)):
            return list(o)
        return str(o)
    return json.loads(json.dumps(obj, default=default))


def _iso(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=timezone.utc)
        return v.isoformat(timespec="seconds")
    return str(v)


def _column(name: str, values: list, kind: type) -> MaskedColumn:
    """A (masked where NULL) astropy column with a stable dtype, even when empty."""
    mask = np.array([v is None for v in values], dtype=bool)
    if kind is bool:
        arr = np.array([bool(v) if v is not None else False for v in values], dtype=bool)
    elif kind is float:
        arr = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    elif kind is int:
        arr = np.array([0 if v is None else v for v in values], dtype=np.int64)
    else:
        strs = ["" if v is None else str(v) for v in values]
        width = max([1, *(len(s) for s in strs)])
        arr = np.array(strs, dtype=f"U{width}")
    col = _astropy_table().MaskedColumn(arr, name=name, mask=mask)
    if name in _UNITS:
        col.unit = _UNITS[name]
    if name in _DESCRIPTIONS:
        col.description = _DESCRIPTIONS[name]
    return col
