"""A Parquet sink: every stage's results as a partitioned Parquet dataset.

For people who load results with pandas, Dask, Spark or DuckDB rather than
SQL.  Registered as ``parquet`` in the entry point group ``lamost_ostar.sinks``;
``lamost-ostar scan release/ --sink parquet --out DIR`` writes::

    DIR/
      scans/<id>.json                          one file per scan: provenance and counts
      stages/<stage>.json                      each stage's declaration (name, version, outputs)
      results/<stage>/scan=<id>/part-<key>.parquet   one file per Dask partition and stage
      errors/<stage>/scan=<id>/part-<key>.parquet    files the stage could not process

Each stage has its own columns: the provenance columns (``path``,
``scan_id``, ``model_version``, ``stage_version``, ``code_version``,
``created``), the shared header metadata of :class:`lamost_ostar.stage.SpectrumResult`
and the stage's declared outputs (``json`` outputs as JSON text).  A part file
is written to a hidden temporary name (``.part-...``, which dataset readers skip)
and renamed when complete, so a reader never sees half a file; its name is a
hash of the stage, scan and files it holds, so a partition that Dask runs again
replaces its file instead of duplicating rows.  Load a stage with, e.g.::

    import pyarrow.dataset as ds
    table = ds.dataset("DIR/results/ostar", format="parquet", partitioning="hive").to_table()
    df = pandas.read_parquet("DIR/results/heii_lines")          # scan = the hive partition

Resume: :meth:`ParquetSink.done_paths` reads the ``path`` and
``model_version`` columns of a stage's files once per process (workers get a
fresh copy of the sink for every scan) and remembers what the process wrote
since, so a rerun skips the files already done, per stage.  The dataset is
append-only: unlike the SQL catalogue, a file whose error row is followed by
a result (only when errors are retried by hand) keeps both; two scans writing
the same folder at the same time may store a file twice.  Use the SQL
catalogue for concurrent writers.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lamost_ostar.stage import METADATA_FIELDS, OStarStage, StageSpec, stage_spec

__all__ = ["ParquetSink"]

_ARROW_TYPES = {"float": "float64", "int": "int64", "bool": "bool_", "str": "string", "json": "string"}
_SCAN_COUNTS = ("files_seen", "files_read", "files_classified", "files_failed", "files_skipped")


_CODE_VERSION: list[str] = []


def _code_version() -> str:
    """``lamost_ostar.code_version()`` of this process (computed once: it runs git)."""
    if not _CODE_VERSION:
        import lamost_ostar

        _CODE_VERSION.append(lamost_ostar.code_version())
    return _CODE_VERSION[0]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ParquetSink:
    """Results of every stage as Parquet files under ``target`` (a folder; created).

    Parameters
    ----------
    target : str or path-like
        Dataset folder (``--out`` of ``lamost-ostar scan``).
    compression : str
        Parquet compression codec.
    """

    name = "parquet"
    version = "parquet-1"

    def __init__(self, target: str | os.PathLike, *, compression: str = "zstd") -> None:
        text = os.fspath(target)
        if "://" in text:
            raise ValueError(f"the parquet sink writes to a folder, not {text!r}")
        self.root = Path(text).expanduser().resolve()
        self.compression = compression
        self._done: dict[tuple[str, str, bool], set[str]] = {}
        self._declared: set[tuple] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {"root": str(self.root), "compression": self.compression}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], compression=state["compression"])

    def __repr__(self) -> str:
        return f"ParquetSink({str(self.root)!r})"

    # ------------------------------------------------------------------ layout
    def _dir(self, kind: str, stage: str, scan_id: Any | None = None) -> Path:
        d = self.root / kind / stage
        return d if scan_id is None else d / f"scan={int(scan_id)}"

    def _scan_file(self, scan_id: Any) -> Path:
        return self.root / "scans" / f"{int(scan_id)}.json"

    # ------------------------------------------------------------------ scans
    def start_scan(self, model_version: str | None = None, *, code_version: str | None = None,
                   parameters: Mapping[str, Any] | None = None,
                   stages: Sequence[Any] | None = None, host: str | None = None,
                   **extra: Any) -> int:
        """Write ``scans/<id>.json`` for a new scan (ids 1, 2, ...) and the stages' declarations."""
        specs = [stage_spec(s) for s in (stages or ())]
        for spec in specs:
            self._declare(spec)
        folder = self.root / "scans"
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "started": _now().isoformat(timespec="seconds"), "finished": None,
            "model_version": model_version or (specs[0].model_version if specs else None),
            "code_version": code_version,
            "parameters": json.loads(json.dumps({**dict(parameters or {}), **extra}, default=str)),
            "host": host or socket.gethostname(), "status": "running",
            "stages": [s.to_dict() for s in specs] or None,
            **{c: 0 for c in _SCAN_COUNTS}, "summary": None,
        }
        while True:
            ids = [int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit()]
            scan_id = max(ids, default=0) + 1
            try:
                fd = os.open(folder / f"{scan_id}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:  # another scan took this id: next one
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"id": scan_id, **record}, fh, indent=1)
            return scan_id

    def _scan(self, scan_id: Any) -> dict[str, Any]:
        try:
            return json.loads(self._scan_file(scan_id).read_text())
        except FileNotFoundError:
            raise ValueError(f"no scan with id {scan_id} in {self.root}") from None

    def update_scan(self, scan_id: Any, counts: Mapping[str, Any] | None = None, *,
                    status: str | None = None, finished: datetime | None = None) -> None:
        """Update a scan's counts (known count names as fields, the rest in ``summary``)."""
        rec = self._scan(scan_id)
        summary = dict(rec.get("summary") or {})
        for key, value in dict(counts or {}).items():
            if key in _SCAN_COUNTS:
                rec[key] = int(value)
            else:
                summary[key] = value
        rec["summary"] = json.loads(json.dumps(summary, default=str)) or None
        if status is not None:
            rec["status"] = status
        if finished is not None:
            rec["finished"] = finished.isoformat(timespec="seconds")
        _atomic_write_bytes(self._scan_file(scan_id), json.dumps(rec, indent=1).encode())

    def finish_scan(self, scan_id: Any, counts: Mapping[str, Any] | None = None,
                    status: str = "finished") -> None:
        """Close a scan's record with its counts, status and end time."""
        self.update_scan(scan_id, counts, status=status, finished=_now())

    def scans(self) -> list[dict[str, Any]]:
        """Every scan record, oldest first."""
        folder = self.root / "scans"
        if not folder.is_dir():
            return []
        files = sorted((p for p in folder.glob("*.json") if p.stem.isdigit()), key=lambda p: int(p.stem))
        return [json.loads(p.read_text()) for p in files]

    # ------------------------------------------------------------------ declarations
    def _declare(self, spec: StageSpec) -> None:
        key = (spec.name, spec.version, spec.output_names)
        if key in self._declared:
            return
        folder = self.root / "stages"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{spec.name}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        outputs = list(old.get("outputs") or [])
        names = {o["name"] for o in outputs}
        outputs += [o.to_dict() for o in spec.outputs if o.name not in names]
        rec = {"name": spec.name, "version": spec.version, "outputs": outputs}
        if rec != old:
            _atomic_write_bytes(path, json.dumps(rec, indent=1).encode())
        self._declared.add(key)

    def stages(self) -> dict[str, dict[str, Any]]:
        """Stage name -> its stored declaration."""
        folder = self.root / "stages"
        return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} \
            if folder.is_dir() else {}

    # ------------------------------------------------------------------ writing
    def _schema(self, spec: StageSpec):
        import pyarrow as pa

        fields = [pa.field("path", pa.string(), nullable=False), pa.field("scan_id", pa.int64()),
                  pa.field("model_version", pa.string(), nullable=False),
                  pa.field("stage_version", pa.string()), pa.field("code_version", pa.string()),
                  pa.field("created", pa.timestamp("us", tz="UTC"))]
        meta_fields = [pa.field(m.name, getattr(pa, _ARROW_TYPES[m.type])()) for m in METADATA_FIELDS]
        outs = [pa.field(o.name, getattr(pa, _ARROW_TYPES[o.type])(),
                         metadata={k: v for k, v in (("unit", o.unit), ("description", o.description),
                                                      ("type", o.type)) if v})
                for o in spec.outputs]
        return pa.schema(fields + meta_fields + outs, metadata={
            "lamost_ostar.stage": json.dumps(spec.to_dict())})

    def _error_schema(self):
        import pyarrow as pa

        return pa.schema([pa.field("path", pa.string(), nullable=False), pa.field("scan_id", pa.int64()),
                          pa.field("model_version", pa.string(), nullable=False),
                          pa.field("stage", pa.string()), pa.field("reason", pa.string()),
                          pa.field("message", pa.string()), pa.field("code_version", pa.string()),
                          pa.field("created", pa.timestamp("us", tz="UTC"))])

    def write(self, scan_id: Any, results: Iterable[Any], *, stage: Any = None) -> dict[str, int]:
        """Write one stage's results as (at most) one results and one errors file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        spec = stage_spec(OStarStage if stage is None else stage)
        self._declare(spec)
        items = list(results)
        if not items:
            return {"results": 0, "errors": 0}
        scan_mv = None
        if scan_id is not None and (spec.model_version is None):
            try:
                rec = self._scan(scan_id)
                per = {d.get("name"): d.get("model_version") for d in rec.get("stages") or []}
                scan_mv = per.get(spec.name) or (rec.get("model_version") if not per else None)
            except ValueError:
                scan_mv = None
        default_mv = spec.model_version or scan_mv or spec.version
        now = _now()
        code = _code_version()
        res: dict[tuple[str, str], dict] = {}
        err: dict[tuple[str, str], dict] = {}
        for item in items:
            get = item.get if isinstance(item, Mapping) else (lambda k, d=None: getattr(item, k, d))
            path = get("path")
            if not path:
                raise ValueError("a stage result has no path")
            path = os.fspath(path)
            mv = get("model_version") or default_mv
            key = (path, mv)
            if get("ok", False):
                if key not in res:
                    row = {"path": path, "scan_id": None if scan_id is None else int(scan_id),
                           "model_version": mv, "stage_version": spec.version, "code_version": code,
                           "created": now, **spec.metadata_values(item)}
                    for name, value in spec.output_values(item).items():
                        row[name] = json.dumps(value, sort_keys=True) if (
                            value is not None and not isinstance(value, (str, int, float, bool))) else value
                    res[key] = row
            elif key not in err:
                err[key] = {"path": path, "scan_id": None if scan_id is None else int(scan_id),
                            "model_version": mv, "stage": spec.name,
                            "reason": get("error_reason") or "unknown",
                            "message": get("error_message"), "code_version": code, "created": now}
        for key in res:  # a success in the same batch beats an error
            err.pop(key, None)
        sid = "none" if scan_id is None else int(scan_id)
        for kind, rows, schema in (("results", res, self._schema(spec)), ("errors", err, self._error_schema())):
            if not rows:
                continue
            keys = sorted(rows)
            digest = hashlib.sha1(json.dumps([spec.name, sid, keys]).encode()).hexdigest()[:20]
            folder = self.root / kind / spec.name / f"scan={sid}"
            folder.mkdir(parents=True, exist_ok=True)
            table = pa.Table.from_pylist([rows[k] for k in keys], schema=schema)
            final = folder / f"part-{digest}.parquet"
            tmp = folder / f".part-{digest}.{uuid.uuid4().hex[:8]}.tmp"
            pq.write_table(table, tmp, compression=self.compression)
            os.replace(tmp, final)
            for (path, mv) in keys:  # remembered for this process's resume checks
                for inc in ((True, False) if kind == "results" else (True,)):
                    cached = self._done.get((spec.name, mv, inc))
                    if cached is not None:
                        cached.add(path)
        return {"results": len(res), "errors": len(err)}

    # ------------------------------------------------------------------ reading
    def _paths_in(self, kind: str, stage: str, model_version: str,
                  scan_id: Any | None = None) -> set[str]:
        import pyarrow.dataset as ds

        folder = self._dir(kind, stage, scan_id)
        if not folder.is_dir():
            return set()
        files = [str(p) for p in folder.rglob("part-*.parquet")]
        if not files:
            return set()
        table = ds.dataset(files, format="parquet").to_table(
            columns=["path"], filter=ds.field("model_version") == model_version)
        return set(table.column("path").to_pylist())

    def done_paths(self, paths: Iterable[str], model_version: str | None, *,
                   include_errors: bool = True, scan_id: Any = None,
                   stage: str = "ostar") -> set[str]:
        """The subset of ``paths`` with a row of ``stage`` for ``model_version`` (see the module
        docstring for how it is cached)."""
        mv = model_version or ""
        wanted = [os.fspath(p) for p in paths]
        if not wanted:
            return set()
        if scan_id is not None:  # exact, from that scan's files (the scan's final count)
            done = self._paths_in("results", stage, mv, scan_id)
            if include_errors:
                done |= self._paths_in("errors", stage, mv, scan_id)
            return {p for p in wanted if p in done}
        key = (stage, mv, include_errors)
        done = self._done.get(key)
        if done is None:
            done = self._paths_in("results", stage, mv)
            if include_errors:
                done |= self._paths_in("errors", stage, mv)
            self._done[key] = done
        return {p for p in wanted if p in done}

    def read(self, stage: str = "ostar", *, errors: bool = False, scan_id: Any = None):
        """A stage's results (or errors) as one pyarrow Table (``scan_id`` from the partition)."""
        import pyarrow as pa
        import pyarrow.dataset as ds

        folder = self._dir("errors" if errors else "results", stage)
        if scan_id is not None:
            folder = folder / f"scan={int(scan_id)}"
        files = sorted(str(p) for p in folder.rglob("part-*.parquet")) if folder.is_dir() else []
        if not files:
            return pa.table({})
        tables = [ds.dataset(f, format="parquet").to_table() for f in files]
        return pa.concat_tables(tables, promote_options="default")

    def scan_counts(self, scan_id: Any, threshold: float | None = None,
                    stage: str = "ostar") -> dict[str, Any]:
        """Rows that scan ``scan_id`` wrote for ``stage`` (``results``, ``errors``,
        ``errors_by_reason``, and ``candidates``/``counts`` as the SQL sink gives them)."""
        res = self.read(stage, scan_id=scan_id)
        errs = self.read(stage, errors=True, scan_id=scan_id)
        reasons = Counter(errs.column("reason").to_pylist()) if errs.num_rows else Counter()
        out: dict[str, Any] = {"results": res.num_rows, "errors": errs.num_rows,
                               "errors_by_reason": {str(k): int(v) for k, v in reasons.items()}}
        names = set(res.column_names)
        if threshold is not None and res.num_rows and ({"is_candidate", "p_o"} & names):
            cand = res.column("is_candidate").to_pylist() if "is_candidate" in names else [None] * res.num_rows
            p_o = res.column("p_o").to_pylist() if "p_o" in names else [None] * res.num_rows
            out["candidates"] = sum(1 for c, p in zip(cand, p_o)
                                    if c is True or (c is None and (p or 0.0) >= threshold))
        decl = self.stages().get(stage, {})
        summary = [o["name"] for o in decl.get("outputs", []) if o.get("summary")
                   and o["name"] != "is_candidate"]
        if summary:
            out["counts"] = {n: (sum(1 for v in res.column(n).to_pylist() if v) if n in names else 0)
                             for n in summary}
        return out
