"""SQL candidate catalogue: scans, per-spectrum results and per-file errors.

The catalogue is a SQLAlchemy 2 database, a SQLite file by default (no server
needed) or PostgreSQL by URL.  It has three tables:

``scans``
    One provenance row per scan: start/end time, model version, code version,
    parameters (JSON), host, file counts and status.
``results``
    One row per ``(path, model_version)``: the spectrum's identifiers, position,
    S/N, pipeline class, the calibrated class probabilities (one column per
    class ``p_o`` ... ``p_m``, NULL where the model has no such class, plus the
    full ``probs`` JSON), the predicted class and quality flags.  **Every**
    classified spectrum is stored, not only candidates, so a threshold is applied
    at query time and changing it needs no rescan.
``errors``
    One row per ``(path, model_version)`` that could not be classified, with a
    short ``reason`` code and a one-line message.

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
import os
import socket
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from astropy.table import MaskedColumn, Table, vstack
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError

from lamost_ostar import stage as _stage

__all__ = [
    "CLASS_COLUMNS",
    "DEFAULT_P_O_THRESHOLD",
    "RESULT_COLUMNS",
    "SCAN_COUNT_COLUMNS",
    "Catalogue",
    "CatalogueError",
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
CLASS_COLUMNS: dict[str, str] = {c: f"p_{c.lower()}" for c in ("O", "B", "A", "F", "G", "K", "M", "X")}

#: The O-candidate decision and the He II evidence (``stage.StageResult``):
#: column -> kind (float, int or bool)
DECISION_COLUMNS: dict[str, type] = {"posterior_o": float, "is_candidate": bool, "heii_sigma": float,
                                     "o_score": float}
EVIDENCE_COLUMNS: dict[str, type] = {
    name: (bool if name in ("heii_detected", "heii_4686_emission", "metal_veto")
           else int if name == "n_heii_lines" else float)
    for name in _stage.EVIDENCE_FIELDS if name != "heii_sigma"}

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


def _candidate_clause(threshold: float = None):
    """SQL condition "is an O candidate": the row's own decision, or for rows of
    model versions without one (``is_candidate`` NULL) ``p_o >= threshold``."""
    t = _RESULTS
    thr = DEFAULT_P_O_THRESHOLD if threshold is None else float(threshold)
    return sa.or_(t.c.is_candidate.is_(True),
                  sa.and_(t.c.is_candidate.is_(None), sa.func.coalesce(t.c.p_o, 0.0) >= thr))


def _build_metadata() -> sa.MetaData:
    md = sa.MetaData()
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    json_t = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    ts = sa.DateTime(timezone=True)

    sa.Table(
        "scans", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("started", ts, nullable=False),
        sa.Column("finished", ts),
        sa.Column("model_version", sa.String(128)),
        sa.Column("code_version", sa.String(64)),
        sa.Column("parameters", json_t),
        sa.Column("host", sa.String(255)),
        *[sa.Column(c, sa.BigInteger, nullable=False, server_default="0") for c in SCAN_COUNT_COLUMNS],
        sa.Column("status", sa.String(32), nullable=False, server_default="running"),
        sa.Column("summary", json_t),
    )

    sa.Table(
        "results", md,
        sa.Column("id", big_id, primary_key=True, autoincrement=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("obsid", sa.BigInteger),
        sa.Column("designation", sa.String(64)),
        sa.Column("ra", sa.Float(53)),
        sa.Column("dec", sa.Float(53)),
        sa.Column("snr_g", sa.Float),
        sa.Column("snr_r", sa.Float),
        sa.Column("snr_i", sa.Float),
        sa.Column("lmjd", sa.Integer),
        sa.Column("planid", sa.String(64)),
        sa.Column("spid", sa.Integer),
        sa.Column("fiberid", sa.Integer),
        sa.Column("pipeline_class", sa.String(32)),
        sa.Column("pipeline_subclass", sa.String(64)),
        sa.Column("data_release", sa.String(64)),
        sa.Column("layout", sa.String(16)),
        *[sa.Column(col, sa.Float) for col in CLASS_COLUMNS.values()],
        sa.Column("probs", json_t),
        sa.Column("predicted_class", sa.String(8)),
        sa.Column("flags", sa.Integer, nullable=False, server_default="0"),
        *[sa.Column(col, _SQL_KIND[kind]) for col, kind in {**DECISION_COLUMNS, **EVIDENCE_COLUMNS}.items()],
        sa.Column("scan_id", sa.Integer, sa.ForeignKey("scans.id", ondelete="SET NULL")),
        sa.Column("created", ts, nullable=False),
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
    )

    sa.Table(
        "errors", md,
        sa.Column("id", big_id, primary_key=True, autoincrement=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("scan_id", sa.Integer, sa.ForeignKey("scans.id", ondelete="SET NULL")),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("message", sa.Text),
        sa.Column("created", ts, nullable=False),
        sa.UniqueConstraint("path", "model_version", name="uq_errors_path_model"),
        sa.Index("ix_errors_scan_id", "scan_id"),
        sa.Index("ix_errors_reason", "reason"),
    )
    return md


#: The catalogue schema (tables ``scans``, ``results``, ``errors``).
metadata = _build_metadata()
_SCANS = metadata.tables["scans"]
_RESULTS = metadata.tables["results"]
_ERRORS = metadata.tables["errors"]

#: SQL of "is a candidate": the row's own decision, or for rows of model
#: versions without one (``is_candidate`` NULL) the old rule p(O) >= 0.5.
_CANDIDATE_SQL = (f"(is_candidate = TRUE OR (is_candidate IS NULL AND p_o >= {DEFAULT_P_O_THRESHOLD!r}))")
_VIEW_SQL = "CREATE {verb} VIEW {ifne}candidates AS SELECT * FROM results WHERE " + _CANDIDATE_SQL
_DDL_LOCK_KEY = zlib.crc32(b"lamost_ostar.catalogue.ddl")


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


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


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

    def __init__(self, db: str | os.PathLike | URL, *, create: bool = True, busy_timeout: float = 60.0):
        self.url: URL = normalise_url(db)
        self.create = bool(create)
        self.busy_timeout = float(busy_timeout)
        self._engine: Engine | None = None
        self._pid: int | None = None
        self._scan_models: dict[int, str | None] = {}

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
        if {"scans", "results", "errors"} <= present:
            self._add_missing_columns(engine)
            return
        if not self.create:
            raise CatalogueError(f"{_safe_url(self.url)} holds no lamost_ostar catalogue "
                                 f"(tables scans/results/errors missing)")
        with engine.connect().execution_options(lamost_write=True) as conn, conn.begin():
            if self.dialect == "postgresql":
                # serialise concurrent first-use DDL from many workers
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_DDL_LOCK_KEY)))
                if conn.execute(sa.text("SELECT current_schema()")).scalar() is None:
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

    def _add_missing_columns(self, engine: Engine) -> None:
        """Migrate a catalogue written by an older version: add the columns it lacks.

        New result columns (e.g. the posterior, the candidate flag and the He II
        evidence) are added as NULL-able columns with ``ALTER TABLE ... ADD
        COLUMN``; the rows already there keep NULL in them (they were written by
        models that did not produce those values).  Nothing is dropped or
        rewritten.
        """
        with engine.connect() as conn:
            insp = sa.inspect(conn)
            missing = {name: [c for c in table.columns
                              if c.name not in {col["name"] for col in insp.get_columns(name)}]
                       for name, table in metadata.tables.items()}
        if not any(missing.values()):
            return
        try:
            with engine.connect().execution_options(lamost_write=True) as conn, conn.begin():
                if self.dialect == "postgresql":
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_DDL_LOCK_KEY)))
                insp = sa.inspect(conn)
                for name, cols in missing.items():
                    have = {col["name"] for col in insp.get_columns(name)}
                    for col in cols:
                        if col.name in have:
                            continue            # another process added it meanwhile
                        ddl = col.type.compile(dialect=conn.dialect)
                        conn.exec_driver_sql(f'ALTER TABLE {name} ADD COLUMN "{col.name}" {ddl}')
                # the candidates view follows the new rule; indexes of the new columns
                conn.exec_driver_sql("DROP VIEW IF EXISTS candidates")
                conn.exec_driver_sql(_VIEW_SQL.format(verb="", ifne=""))
                for index in _RESULTS.indexes:
                    index.create(conn, checkfirst=True)
        except (OperationalError, DBAPIError) as exc:
            added = ", ".join(c.name for cols in missing.values() for c in cols)
            raise CatalogueError(f"{_safe_url(self.url)} was written by an older lamost_ostar and "
                                 f"lacks columns ({added}); adding them failed: {_first_line(exc)}") from exc

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
                   started: datetime | None = None, **extra: Any) -> int:
        """Insert a provenance row for a new scan and return its id.

        Parameters
        ----------
        model_version : str, optional
            Model version the scan classifies with.
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
        row = {
            "started": started or datetime.now(timezone.utc),
            "model_version": model_version,
            "code_version": code_version,
            "parameters": _jsonable({**dict(parameters or {}), **extra}),
            "host": host if host is not None else socket.gethostname(),
            "status": "running",
        }

        def _do(conn):
            return int(conn.execute(sa.insert(_SCANS).values(**row).returning(_SCANS.c.id)).scalar_one())

        scan_id = self._write_tx(_do)
        self._scan_models[scan_id] = model_version
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
        """All scans with their provenance and counts, as an astropy Table (newest last)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(_SCANS).order_by(_SCANS.c.id)).mappings().all()
            n_res = dict(conn.execute(sa.select(_RESULTS.c.scan_id, sa.func.count())
                                      .group_by(_RESULTS.c.scan_id)).all())
            n_err = dict(conn.execute(sa.select(_ERRORS.c.scan_id, sa.func.count())
                                      .group_by(_ERRORS.c.scan_id)).all())
        cols = ["id", "status", "started", "finished", "model_version", "code_version", "host",
                *SCAN_COUNT_COLUMNS, "result_rows", "error_rows", "parameters", "summary"]
        data: dict[str, list] = {c: [] for c in cols}
        for r in rows:
            for c in cols:
                if c == "result_rows":
                    v = n_res.get(r["id"], 0)
                elif c == "error_rows":
                    v = n_err.get(r["id"], 0)
                elif c in ("started", "finished"):
                    v = _iso(r[c])
                elif c in ("parameters", "summary"):
                    v = json.dumps(r[c], sort_keys=True) if r[c] is not None else None
                else:
                    v = r[c]
                data[c].append(v)
        kinds = {"id": int, "result_rows": int, "error_rows": int, **{c: int for c in SCAN_COUNT_COLUMNS}}
        return Table([_column(c, data[c], kinds.get(c, str)) for c in cols])

    def _scan_model(self, conn, scan_id: int | None) -> str | None:
        if scan_id is None:
            return None
        if scan_id not in self._scan_models:
            self._scan_models[scan_id] = conn.execute(
                sa.select(_SCANS.c.model_version).where(_SCANS.c.id == scan_id)).scalar_one_or_none()
        return self._scan_models[scan_id]

    # ---- writing
    def write(self, scan_id: int | None, results: Iterable[Any]) -> WriteSummary:
        """Write one batch of stage results in a single transaction.

        Parameters
        ----------
        scan_id : int or None
            The scan writing the batch (from :meth:`start_scan`).
        results : iterable of StageResult
            Objects with the :class:`lamost_ostar.stage.StageResult` attributes
            (duck-typed; mappings work too).  ``ok`` results go to ``results``,
            the others to ``errors``.  A result without ``model_version`` takes
            the scan's model version.

        Returns
        -------
        WriteSummary
            Rows submitted.  Rows already present for the same
            ``(path, model_version)`` are kept unchanged (idempotent).
        """
        items = list(results)
        if not items:
            return WriteSummary()
        now = datetime.now(timezone.utc)
        return self._write_tx(self._write_batch, scan_id, items, now)

    def _write_batch(self, conn, scan_id, items, now) -> WriteSummary:
        scan_id = _as_int(scan_id)
        default_mv = self._scan_model(conn, scan_id)
        res_rows: dict[tuple[str, str], dict] = {}
        err_rows: dict[tuple[str, str], dict] = {}
        for item in items:
            path = _as_str(_get(item, "path"))
            if path is None:
                raise CatalogueError("a stage result has no path")
            mv = _as_str(_get(item, "model_version")) or default_mv or ""
            key = (path, mv)
            if _get(item, "ok", False):
                if key not in res_rows:
                    res_rows[key] = _result_row(item, path, mv, scan_id, now)
            elif key not in err_rows:
                err_rows[key] = {
                    "path": path, "model_version": mv, "scan_id": scan_id,
                    "reason": _as_str(_get(item, "error_reason")) or "unknown",
                    "message": _as_str(_get(item, "error_message")),
                    "created": now,
                }
        for key in res_rows:  # a success in the same batch beats an error
            err_rows.pop(key, None)

        # consistent key order -> no lock-order deadlocks between PostgreSQL writers
        res_list = [res_rows[k] for k in sorted(res_rows)]
        err_list = [err_rows[k] for k in sorted(err_rows)]
        ins = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        if res_list:
            conn.execute(ins(_RESULTS).on_conflict_do_nothing(index_elements=["path", "model_version"]),
                         res_list)
            # results take precedence: drop earlier error rows of files now classified
            for mv, paths in _group_paths(res_rows):
                for chunk in _chunks(paths, _CHUNK):
                    conn.execute(sa.delete(_ERRORS).where(_ERRORS.c.model_version == mv,
                                                          _ERRORS.c.path.in_(chunk)))
        if err_list:
            conn.execute(ins(_ERRORS).on_conflict_do_nothing(index_elements=["path", "model_version"]),
                         err_list)
            # never keep an error for a file that already has a result
            r = _RESULTS.alias("r")
            for mv, paths in _group_paths(err_rows):
                for chunk in _chunks(paths, _CHUNK):
                    has_result = sa.exists().where(r.c.path == _ERRORS.c.path,
                                                   r.c.model_version == _ERRORS.c.model_version)
                    conn.execute(sa.delete(_ERRORS).where(_ERRORS.c.model_version == mv,
                                                          _ERRORS.c.path.in_(chunk), has_result))
        return WriteSummary(results=len(res_list), errors=len(err_list))

    # ---- resume
    def done_paths(self, paths: Iterable[str], model_version: str | None, *,
                   include_errors: bool = True, scan_id: int | None = None) -> set[str]:
        """Return the subset of ``paths`` already done with ``model_version``.

        A path is done when it has a result row (or, with ``include_errors``, an
        error row) for that model version (with ``scan_id``: a row written by
        that scan).  Queries are batched (``IN`` lists of at most 500 paths), so
        any number of paths may be passed.
        """
        mv = model_version or ""
        wanted = list(dict.fromkeys(os.fspath(p) for p in paths))
        done: set[str] = set()
        if not wanted:
            return done
        tables = [_RESULTS, _ERRORS] if include_errors else [_RESULTS]
        with self.engine.connect() as conn:
            for chunk in _chunks(wanted, _CHUNK):
                for t in tables:
                    conds = [t.c.model_version == mv, t.c.path.in_(chunk)]
                    if scan_id is not None:
                        conds.append(t.c.scan_id == int(scan_id))
                    done.update(conn.execute(sa.select(t.c.path).where(*conds)).scalars())
        return done

    def scan_counts(self, scan_id: int, threshold: float | None = None) -> dict[str, Any]:
        """What scan ``scan_id`` wrote, counted from its rows (the truth a scan row is closed with).

        Returns ``{"results": n, "errors": n, "errors_by_reason": {reason: n}}``
        and, with ``threshold``, ``"candidates"`` (its results that are candidates:
        ``is_candidate``, or ``p_o >= threshold`` for rows without a decision).
        """
        sid = int(scan_id)
        with self.engine.connect() as conn:
            n_res = int(conn.execute(sa.select(sa.func.count()).select_from(_RESULTS)
                                     .where(_RESULTS.c.scan_id == sid)).scalar_one())
            by_reason = {str(r): int(n) for r, n in conn.execute(
                sa.select(_ERRORS.c.reason, sa.func.count()).where(_ERRORS.c.scan_id == sid)
                .group_by(_ERRORS.c.reason)).all()}
            out: dict[str, Any] = {"results": n_res, "errors": sum(by_reason.values()),
                                   "errors_by_reason": by_reason}
            if threshold is not None:
                out["candidates"] = int(conn.execute(
                    sa.select(sa.func.count()).select_from(_RESULTS)
                    .where(_RESULTS.c.scan_id == sid, _candidate_clause(float(threshold)))).scalar_one())
        return out

    # ---- reading
    def counts(self, model_version: str | None = None) -> dict[str, int]:
        """Numbers of result rows, error rows and distinct (path, model_version) pairs."""
        with self.engine.connect() as conn:
            out = {}
            for name, t in (("results", _RESULTS), ("errors", _ERRORS)):
                q = sa.select(sa.func.count()).select_from(t)
                if model_version is not None:
                    q = q.where(t.c.model_version == model_version)
                out[name] = int(conn.execute(q).scalar_one())
        return out

    def errors(self, *, scan_id: int | None = None, model_version: str | None = None,
               reason: str | None = None, limit: int | None = None) -> Table:
        """Error rows (path, model_version, scan_id, reason, message, created) as a Table."""
        q = sa.select(_ERRORS.c.path, _ERRORS.c.model_version, _ERRORS.c.scan_id,
                      _ERRORS.c.reason, _ERRORS.c.message, _ERRORS.c.created).order_by(_ERRORS.c.id)
        if scan_id is not None:
            q = q.where(_ERRORS.c.scan_id == int(scan_id))
        if model_version is not None:
            q = q.where(_ERRORS.c.model_version == model_version)
        if reason is not None:
            q = q.where(_ERRORS.c.reason == reason)
        if limit is not None:
            q = q.limit(int(limit))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        names = ["path", "model_version", "scan_id", "reason", "message", "created"]
        data = {n: [(_iso(r[i]) if n == "created" else r[i]) for r in rows] for i, n in enumerate(names)}
        return Table([_column(n, data[n], int if n == "scan_id" else str) for n in names])

    def query(self, *, min_p_o: float | None = None, predicted_class: str | Sequence[str] | None = None,
              cone: tuple[float, float, float] | None = None, snr_min: float | None = None,
              snr_max: float | None = None, snr_band: str = "g", scan_id: int | None = None,
              model_version: str | None = None, sort: str | None = "p_o",
              descending: bool | None = None, limit: int | None = None,
              all_rows: bool = False, candidates: bool | None = None,
              min_posterior: float | None = None, min_heii_sigma: float | None = None) -> Table:
        """Select results as an astropy Table.

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

        Returns
        -------
        astropy.table.Table
            Columns :data:`RESULT_COLUMNS` (plus ``dist`` for a cone search).

        See Also
        --------
        iter_query : the same selection in chunks of bounded size.
        """
        parts = list(self.iter_query(
            min_p_o=min_p_o, predicted_class=predicted_class, cone=cone, snr_min=snr_min,
            snr_max=snr_max, snr_band=snr_band, scan_id=scan_id, model_version=model_version,
            sort=sort, descending=descending, limit=limit, all_rows=all_rows, candidates=candidates,
            min_posterior=min_posterior, min_heii_sigma=min_heii_sigma))
        return parts[0] if len(parts) == 1 else vstack(parts, metadata_conflicts="silent")

    def iter_query(self, *, min_p_o: float | None = None,
                   predicted_class: str | Sequence[str] | None = None,
                   cone: tuple[float, float, float] | None = None, snr_min: float | None = None,
                   snr_max: float | None = None, snr_band: str = "g", scan_id: int | None = None,
                   model_version: str | None = None, sort: str | None = "p_o",
                   descending: bool | None = None, limit: int | None = None,
                   all_rows: bool = False, candidates: bool | None = None,
                   min_posterior: float | None = None, min_heii_sigma: float | None = None,
                   chunk_rows: int = 10_000) -> Iterator[Table]:
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

        sortable = set(RESULT_COLUMNS) | ({"dist"} if cone is not None else set())
        if sort is not None and sort not in sortable:
            raise CatalogueError(f"cannot sort by {sort!r}; choose one of {', '.join(sorted(sortable))}")
        if descending is None:
            descending = sort is not None and sort.startswith(_SORT_DESCENDING_BY_DEFAULT)

        q = sa.select(*[t.c[c] for c in RESULT_COLUMNS]).where(*conds)
        if sort is not None and sort != "dist":
            col = t.c[sort]
            # NULLs last in both directions; ties by id in the same direction, so an
            # index on the sort column delivers the order without a full sort
            q = q.order_by((col.desc() if descending else col.asc()).nulls_last(),
                           t.c.id.desc() if descending else t.c.id.asc())
        else:
            q = q.order_by(t.c.id)
        if limit is not None and cone is None:
            q = q.limit(limit)
        meta = {"ORIGIN": "lamost_ostar catalogue"}
        if min_p_o is not None:
            meta["MIN_P_O"] = float(min_p_o)
        if candidates is not None:
            meta["CANDIDAT"] = bool(candidates)

        if sort == "dist":  # the exact distance is known only after the fetch: sort in numpy
            parts = list(self._fetch(q, centre, chunk_rows, meta))
            table = parts[0] if len(parts) == 1 else vstack(parts, metadata_conflicts="silent")
            order = np.argsort(np.asarray(table["dist"]), kind="stable")
            table = table[order[::-1] if descending else order]
            if limit is not None:
                table = table[:limit]
            for start in range(0, max(len(table), 1), chunk_rows):
                yield table[start:start + chunk_rows]
            return

        remaining = limit
        yielded = False
        for part in self._fetch(q, centre, chunk_rows, meta):
            if remaining is not None:
                part = part[:remaining]
                remaining -= len(part)
            if len(part) or not yielded:
                yield part
                yielded = True
            if remaining == 0:
                break

    def _fetch(self, q, centre, chunk_rows: int, meta: dict) -> Iterator[Table]:
        """Run ``q`` and yield Tables of at most ``chunk_rows`` rows (>= 1 Table, cone cut applied)."""
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=chunk_rows).execute(q)
            empty = True
            for rows in result.partitions(chunk_rows):
                table = _rows_table(rows, centre, meta)
                if len(table) or empty:
                    empty = False
                    yield table
            if empty:
                yield _rows_table([], centre, meta)

    def candidates(self, min_p_o: float | None = None, **kwargs: Any) -> Table:
        """O-star candidates: the model's decision (:meth:`query` with ``candidates=True``),
        or ``p_o >= min_p_o`` when ``min_p_o`` is given."""
        if min_p_o is not None:
            return self.query(min_p_o=min_p_o, **kwargs)
        return self.query(candidates=True, **kwargs)


#: The writer role of :class:`Catalogue` (the scan's sink): the same picklable class.
CatalogueWriter = Catalogue


# --------------------------------------------------------------------------- helpers

_RESULT_KINDS: dict[str, type] = {
    **{c: str for c in RESULT_COLUMNS},
    **{c: float for c in ("ra", "dec", "snr_g", "snr_r", "snr_i", *CLASS_COLUMNS.values())},
    **{c: int for c in ("obsid", "lmjd", "spid", "fiberid", "flags", "scan_id", "id")},
    **DECISION_COLUMNS, **EVIDENCE_COLUMNS,
}
_UNITS = {"ra": "deg", "dec": "deg"}


def _rows_table(rows: Sequence, centre: tuple[float, float, float] | None, meta: dict) -> Table:
    """Result rows -> Table; with a cone centre, keep rows within the radius and add ``dist``."""
    data = {c: [r[i] for r in rows] for i, c in enumerate(RESULT_COLUMNS)}
    table = Table([_column(c, data[c], _RESULT_KINDS[c]) for c in RESULT_COLUMNS], meta=dict(meta))
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


def _result_row(item: Any, path: str, mv: str, scan_id: int | None, now: datetime) -> dict:
    probs_in = _get(item, "probs") or {}
    probs = {str(k): _as_float(v) for k, v in dict(probs_in).items()}
    row = {
        "path": path, "model_version": mv, "scan_id": scan_id, "created": now,
        "obsid": _as_int(_get(item, "obsid")),
        "designation": _as_str(_get(item, "designation")),
        "ra": _as_float(_get(item, "ra")), "dec": _as_float(_get(item, "dec")),
        "snr_g": _as_float(_get(item, "snr_g")), "snr_r": _as_float(_get(item, "snr_r")),
        "snr_i": _as_float(_get(item, "snr_i")),
        "lmjd": _as_int(_get(item, "lmjd")), "planid": _as_str(_get(item, "planid")),
        "spid": _as_int(_get(item, "spid")), "fiberid": _as_int(_get(item, "fiberid")),
        "pipeline_class": _as_str(_get(item, "pipeline_class")),
        "pipeline_subclass": _as_str(_get(item, "pipeline_subclass")),
        "data_release": _as_str(_get(item, "data_release")),
        "layout": _as_str(_get(item, "layout")),
        "probs": probs or None,
        "predicted_class": _as_str(_get(item, "predicted_class")),
        "flags": _as_int(_get(item, "flags")) or 0,
    }
    upper = {k.upper(): v for k, v in probs.items()}
    for cls, col in CLASS_COLUMNS.items():
        row[col] = upper.get(cls)
    p_o = _as_float(_get(item, "p_o"))
    row["p_o"] = p_o if p_o is not None else upper.get("O")
    row["posterior_o"] = _as_float(_get(item, "posterior_o"))
    cand = _get(item, "is_candidate")
    row["is_candidate"] = None if cand is None else bool(cand)
    row["heii_sigma"] = _as_float(_get(item, "heii_sigma"))
    row["o_score"] = _as_float(_get(item, "o_score"))
    evidence = _get(item, "evidence") or {}
    for col, kind in EVIDENCE_COLUMNS.items():
        v = evidence.get(col) if isinstance(evidence, Mapping) else None
        row[col] = (None if v is None else bool(v)) if kind is bool else \
            (_as_int(v) if kind is int else _as_float(v))
    return row


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


def _group_paths(rows: Mapping[tuple[str, str], Any]) -> Iterator[tuple[str, list[str]]]:
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
    col = MaskedColumn(arr, name=name, mask=mask)
    if name in _UNITS:
        col.unit = _UNITS[name]
    if name in _DESCRIPTIONS:
        col.description = _DESCRIPTIONS[name]
    return col
