"""Scan a LAMOST data release with a stage on a Dask cluster.

The scan walks release directories (or reads file lists) lazily, cuts the
stream of paths into partitions of ``partition_size`` files and submits them
to a Dask cluster with a bounded number of partitions in flight, so memory
does not grow with the number of files.  On the worker, each partition is:

1. filtered, per stage, through ``sink.done_paths(paths, model_version,
   stage=name)`` (resume: files already done by that stage with the same model
   version are skipped),
2. read once with the scan's reader (entry point group ``lamost_ostar.readers``,
   ``lamost`` by default), in chunks of ``batch_size``,
3. processed by every stage that still needs each file (the stages get the same
   :class:`lamost_ostar.io.Spectrum` records; when two or more stages take a
   prepared batch -- ``process_prepared`` -- the chunk is also preprocessed once
   and each gets its rows; then batched inference),
4. written in bulk, one ``sink.write(scan_id, results, stage=spec)`` per stage.

The stages, the reader and the sink live once per worker in a
:class:`ScanWorkerPlugin`, so a model is loaded once per worker process, not
once per partition.

This module never imports :mod:`lamost_ostar.catalogue`: the *sink* is passed
in and only needs the methods of :class:`ResultSink`.  Nor does it import
TensorFlow/Keras in the client process: the stage is built on the workers.

Examples
--------
>>> from lamost_ostar.catalogue import CatalogueWriter    # doctest: +SKIP
>>> from lamost_ostar.scan import run_scan                # doctest: +SKIP
>>> summary = run_scan(["release/"], CatalogueWriter("sqlite:///cat.sqlite"))  # doctest: +SKIP
>>> print(summary.format())                               # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lamost_ostar.io import DEFAULT_ENGINE
from lamost_ostar.models.decision import snr_floor_in_force

__all__ = [
    "FITS_SUFFIXES",
    "ResultSink",
    "PartitionSummary",
    "ScanSummary",
    "ScanWorkerPlugin",
    "MALLOPT_SETTINGS",
    "tune_malloc",
    "FileCounter",
    "iter_paths",
    "walk_release",
    "read_file_list",
    "iter_partitions",
    "count_paths",
    "survey_paths",
    "process_partition",
    "run_scan",
    "make_client",
]

#: File name endings picked up when walking a release directory.
FITS_SUFFIXES: tuple[str, ...] = (".fits", ".fits.gz", ".fit", ".fit.gz")


class ResultSink(Protocol):
    """What the scan needs from a result store (a *sink*; entry point group ``lamost_ostar.sinks``).

    A sink is built as ``Sink(target)`` (a URL, a file or a folder: ``--db`` or
    ``--out`` of ``lamost-ostar scan``) and must be picklable: it is shipped once
    to every worker.  ``stage`` arguments name a stage (its table); ``write``
    gets the stage's :class:`lamost_ostar.stage.StageSpec` (name, version,
    model version, declared ``outputs`` and ``output_values``), from which the
    sink builds the stage's columns.  ``catalogue.CatalogueWriter`` (``sql``) and
    ``lamost_ostar_plugins.parquet.ParquetSink`` (``parquet``) implement it.
    """

    def start_scan(self, model_version: str | None = None, *, code_version: str | None = None,
                   parameters: dict[str, Any] | None = None,
                   stages: Sequence[Mapping[str, Any]] | None = None) -> Any:
        """Record a new scan (provenance) and return its id.

        ``stages``: the declarations (``StageSpec.to_dict()`` with the resolved
        ``model_version``) of the stages the scan runs, first stage first.
        """

    def done_paths(self, paths: Sequence[str], model_version: str | None, *,
                   include_errors: bool = True, scan_id: Any = None,
                   stage: str = "ostar") -> set[str]:
        """Subset of ``paths`` already stored by ``stage`` for ``model_version`` (a result
        row, or with ``include_errors`` an error row; with ``scan_id``: written by that scan)."""

    def write(self, scan_id: Any, results: Sequence[Any], *, stage: Any = None) -> Any:
        """Store one stage's results in bulk (idempotent); ``stage=None`` is the ostar stage."""

    def finish_scan(self, scan_id: Any, counts: dict[str, int] | None = None,
                    status: str = "finished") -> Any:
        """Close the scan's provenance row with its counts, status and end time.

        Counts keys: ``files_seen, files_read, files_classified, files_failed,
        files_skipped`` (of the first stage; with several stages their own under
        ``stages``).  A sink may also offer ``update_scan(scan_id, counts)``,
        which the scan then calls every few seconds (progress of a long scan,
        counts survive a killed scan), and ``scan_counts(scan_id, threshold,
        stage)`` (``{"results", "errors", "errors_by_reason"[, "candidates",
        "counts"]}`` of the rows carrying the scan's id), which makes the final
        counts those of the rows written.
        """


# --------------------------------------------------------------------------
# Lazy path sources
# --------------------------------------------------------------------------
def _is_fits_name(name: str) -> bool:
    return name.lower().endswith(FITS_SUFFIXES) and not name.startswith(".")


def walk_release(root: str | os.PathLike) -> Iterator[str]:
    """Yield the FITS files under ``root`` lazily, depth first.

    Entries of each directory are sorted by name, so the order is
    deterministic; only one directory listing is held in memory per level.
    Hidden entries (``.*``) are skipped and directory symlinks are not
    followed (no loops).

    Parameters
    ----------
    root : str or path-like
        Release directory.

    Yields
    ------
    str
        Absolute path of each ``*.fits``/``*.fits.gz`` file.
    """
    root = os.path.abspath(os.fspath(root))
    stack: list[Iterator[tuple[str, bool]]] = [iter(_sorted_entries(root))]
    while stack:
        try:
            path, is_dir = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        if is_dir:
            stack.append(iter(_sorted_entries(path)))
        else:
            yield path


def _sorted_entries(directory: str) -> list[tuple[str, bool]]:
    """Sorted (path, is_dir) of one directory's visible FITS files and subdirs."""
    out: list[tuple[str, str, bool]] = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        out.append((entry.name, entry.path, True))
                    elif _is_fits_name(entry.name) and entry.is_file():
                        out.append((entry.name, entry.path, False))
                except OSError:
                    continue
    except (PermissionError, FileNotFoundError, NotADirectoryError):
        return []
    out.sort()
    return [(p, d) for _, p, d in out]


def read_file_list(list_path: str | os.PathLike) -> Iterator[str]:
    """Yield the paths listed in a text file, one per line, lazily.

    Blank lines and lines starting with ``#`` are ignored.  Relative paths are
    taken relative to the directory of the list file.
    """
    list_path = os.path.abspath(os.fspath(list_path))
    base = os.path.dirname(list_path)
    with open(list_path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            yield os.path.normpath(os.path.join(base, os.path.expanduser(line)))


def iter_paths(sources: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Yield every file path named by ``sources``, lazily and in order.

    Parameters
    ----------
    sources : iterable of str or path-like
        Each one is a release directory (walked with :func:`walk_release`), a
        single file (yielded whatever its name, so a bad file is accounted
        for), or ``@list.txt`` (a file list, see :func:`read_file_list`).

    Raises
    ------
    FileNotFoundError
        When a source does not exist (checked when it is reached).
    """
    for source in sources:
        source = os.fspath(source)
        if source.startswith("@"):
            yield from read_file_list(source[1:])
        elif os.path.isdir(source):
            yield from walk_release(source)
        elif os.path.exists(source):
            yield os.path.abspath(source)
        else:
            raise FileNotFoundError(f"no such file or directory: {source}")


def iter_partitions(paths: Iterable[str], size: int) -> Iterator[list[str]]:
    """Cut an iterable of paths into lists of at most ``size`` items, lazily."""
    if size < 1:
        raise ValueError(f"partition size must be >= 1, got {size}")
    it = iter(paths)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


def count_paths(sources: Iterable[str | os.PathLike]) -> int:
    """Number of files named by ``sources`` (walks them once, lazily)."""
    return sum(1 for _ in iter_paths(sources))


def survey_paths(sources: Iterable[str | os.PathLike], sink: Any, model_version: str | None, *,
                 stop_at_new: bool = False, chunk: int = 2000, stage: str = "ostar") -> dict[str, int]:
    """What a scan of ``sources`` with ``stage`` at ``model_version`` would find, asked in the client.

    Returns ``{"files", "new", "done", "failed"}``: files with no row for that
    model version (``new``), with a result row (``done``) and with an error row
    (``failed``; a resumed scan skips these too).  With ``stop_at_new`` the walk
    stops at the first chunk holding a new file (the "is anything left?" check
    a resumed scan makes before it starts any worker).
    """
    counts = {"files": 0, "new": 0, "done": 0, "failed": 0}
    for part in iter_partitions(iter_paths(sources), chunk):
        done_any = sink.done_paths(part, model_version, stage=stage)
        done_ok = sink.done_paths(part, model_version, include_errors=False,
                                  stage=stage) if done_any else set()
        counts["files"] += len(part)
        counts["done"] += sum(1 for p in part if p in done_ok)
        counts["failed"] += sum(1 for p in part if p in done_any and p not in done_ok)
        counts["new"] += sum(1 for p in part if p not in done_any)
        if stop_at_new and counts["new"]:
            break
    return counts


class FileCounter(threading.Thread):
    """Background thread counting the files of a scan (for the progress total).

    Attributes
    ----------
    count : int
        Files counted so far.
    finished : bool
        True once every source has been walked.
    """

    def __init__(self, sources: Sequence[str | os.PathLike]) -> None:
        super().__init__(name="lamost_ostar-file-counter", daemon=True)
        self._sources = list(sources)
        self._stop_event = threading.Event()
        self.count = 0
        self.finished = False

    def run(self) -> None:  # noqa: D102
        try:
            for _ in iter_paths(self._sources):
                if self._stop_event.is_set():
                    return
                self.count += 1
            self.finished = True
        except OSError:
            return

    def stop(self) -> None:
        """Ask the thread to stop early."""
        self._stop_event.set()


# --------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------
from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin

#: Environment switch of :func:`tune_malloc` (``0`` leaves the worker's malloc alone).
MALLOPT_ENV = "LAMOST_OSTAR_MALLOPT"
#: glibc ``mallopt`` settings of a scan worker: blocks up to 32 MiB (the largest mmap threshold
#: glibc takes) come from the heap, and the heap is trimmed only above 128 MiB free.  A batch's
#: temporaries are 1-8 MiB arrays allocated and freed hundreds of times a second; with Dask's
#: ``MALLOC_TRIM_THRESHOLD_=65536`` (nanny default) each was mmapped, page-faulted and unmapped
#: again.  Scan steady state on a 2-worker ``dask worker`` cluster: 740-750 -> 967-1006 files/s
#: (reports/performance.md).  See also :data:`ARENA_ENV`.
MALLOPT_SETTINGS: dict[str, int] = {"M_MMAP_THRESHOLD": 32 * 2**20, "M_TRIM_THRESHOLD": 128 * 2**20}
#: Environment of a local cluster's worker processes, set before they start (glibc reads it
#: once, at its first allocation): one malloc arena.  A Dask task runs in a pool thread, which
#: glibc otherwise gives an arena of its own, made of 64 MiB heaps that are unmapped as soon as
#: a batch frees them (whatever the trim threshold) and faulted in again by the next batch:
#: 18-120 minor page faults per file against 7.6; one arena gave 2-worker scans 6-22 % more
#: files/s in 7 of 8 alternating pairs (``scripts/bench_scan_env.py``, reports/performance.md).
#: ``mallopt(M_ARENA_MAX)`` from :func:`tune_malloc` would come too late: glibc fixes the arena
#: limit when a process's first thread takes an arena, and a worker's event-loop threads do that
#: at start-up.  Workers started with ``dask worker`` need it in their own environment (README).
ARENA_ENV: dict[str, str] = {"MALLOC_ARENA_MAX": "1"}

#: Dask settings of a local cluster (:func:`make_client`) that slow down its monitors.  A local
#: cluster's scheduler and nannies live in the client process and share its event loop; at Dask's
#: defaults (system monitor every 500 ms with disk counters, each nanny's memory check every
#: 100 ms, the admin tick every 20 ms) that loop took 0.070-0.078 of the machine's 2 cores during a
#: scan, and 0.034-0.040 with these (``scripts/bench_cpu_share.py``, reports/performance.md).  The
#: local cluster has no dashboard, so the system monitor's history has no reader; a nanny still
#: checks its worker's memory every second.
QUIET_MONITORS: dict[str, Any] = {
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.admin.system-monitor.disk": False,
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.tick.interval": "1s",
}
_MALLOPT_PARAM = {"M_TRIM_THRESHOLD": -1, "M_MMAP_THRESHOLD": -3}


def tune_malloc() -> bool:
    """Apply :data:`MALLOPT_SETTINGS` to this process (glibc only); True if applied.

    Called once per scan worker (:class:`ScanWorkerPlugin` setup), on local and
    remote clusters alike; a no-op returning False without glibc or with
    ``LAMOST_OSTAR_MALLOPT=0``.
    """
    import ctypes

    if os.environ.get(MALLOPT_ENV, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(_MALLOPT_PARAM[k], v) == 1 for k, v in MALLOPT_SETTINGS.items())


class ScanWorkerPlugin(_WorkerPlugin):
    """Holds the stages, the reader and the sink of a scan, once per Dask worker.

    The stages are built lazily (first task), with :func:`lamost_ostar.stage.load_stage`,
    so a model is loaded once per worker process and never in the client.

    Parameters
    ----------
    stage_name : str or sequence of str
        Entry point name(s) in group ``lamost_ostar.stages`` (or ``"module:attr"``).
    stage_kwargs : dict
        Keyword arguments for the stage constructors (each stage gets those its
        signature accepts).
    sink : ResultSink
        Result store, pickled once to each worker.
    name : str, optional
        Plugin name (unique per scan by default).
    reader : str
        Reader entry point name (group ``lamost_ostar.readers``) or ``"module:attr"``.
    reader_kwargs : dict, optional
        Keyword arguments for the reader (those its signature accepts).
    """

    idempotent = False

    def __init__(self, stage_name: str | Sequence[str], stage_kwargs: dict[str, Any], sink: Any,
                 name: str | None = None, reader: str = "lamost",
                 reader_kwargs: dict[str, Any] | None = None) -> None:
        self.stage_names = [stage_name] if isinstance(stage_name, str) else list(stage_name)
        self.stage_name = self.stage_names[0]
        self.stage_kwargs = dict(stage_kwargs)
        self.sink = sink
        self.reader_name = reader
        self.reader_kwargs = dict(reader_kwargs or {})
        self.name = name or f"lamost_ostar-scan-{uuid.uuid4().hex[:12]}"
        self._stages: dict[str, Any] = {}
        self._specs: dict[str, Any] = {}
        self._reader = None
        self._lock: threading.Lock | None = None
        self.malloc_tuned = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_stages"] = {}
        state["_specs"] = {}
        state["_reader"] = None
        state["_lock"] = None
        return state

    def setup(self, worker: Any) -> None:  # noqa: D102
        self._lock = threading.Lock()
        self.malloc_tuned = tune_malloc()

    def teardown(self, worker: Any) -> None:  # noqa: D102
        self._stages = {}
        self._specs = {}

    def get_stage(self, model_version: str | None = None, stage_name: str | None = None) -> Any:
        """A stage of the worker, built on first use (thread-safe).

        With ``model_version``, a stage of another version is replaced by one
        of that version (the scan pins the version resolved by the first stage
        built, so the model is normally loaded once per worker).
        """
        name = stage_name or self.stage_name
        if self._lock is None:
            self._lock = threading.Lock()
        with self._lock:
            stage = self._stages.get(name)
            if stage is None or (model_version is not None
                                 and getattr(stage, "model_version", None) != model_version):
                from lamost_ostar.entrypoints import STAGES, load
                from lamost_ostar.io import _accepted_kwargs
                from lamost_ostar.stage import stage_spec

                kwargs = dict(self.stage_kwargs)
                if model_version is not None:
                    kwargs["model_version"] = model_version
                self._stages.pop(name, None)
                factory = load(STAGES, name)
                stage = factory(**_accepted_kwargs(factory, kwargs))
                if model_version is not None and getattr(stage, "model_version", None) != model_version:
                    raise RuntimeError(f"stage {name!r} on this worker gives model version "
                                       f"{getattr(stage, 'model_version', None)!r}, the scan uses "
                                       f"{model_version!r}")
                self._stages[name] = stage
                self._specs[name] = stage_spec(stage, name=_fallback_name(name))
            return stage

    def get_spec(self, stage_name: str) -> Any:
        """The :class:`~lamost_ostar.stage.StageSpec` of a stage already built."""
        return self._specs[stage_name]

    def get_reader(self) -> Any:
        """The worker's reader, built on first use."""
        if self._reader is None:
            from lamost_ostar.io import load_reader

            self._reader = load_reader(self.reader_name, **self.reader_kwargs)
        return self._reader


def _fallback_name(stage_ref: str) -> str:
    """The table name of a stage that declares no ``name``: its entry point name, or for a
    ``module:Class`` reference the class name in lower case."""
    import re

    base = stage_ref.rsplit(":", 1)[-1].rsplit(".", 1)[-1].lower() if ":" in stage_ref else stage_ref
    base = re.sub(r"[^a-z0-9_]", "_", base).lstrip("_0123456789") or "stage"
    return base[:32]


def _worker_plugin(plugin_name: str) -> ScanWorkerPlugin:
    from distributed import get_worker

    worker = get_worker()
    try:
        return worker.plugins[plugin_name]
    except KeyError:  # pragma: no cover - registration always precedes tasks
        raise RuntimeError(f"worker {worker.address} has no plugin {plugin_name!r}") from None


def stage_info(plugin_name: str) -> dict[str, Any]:
    """Worker task: build the stages (and the reader); report their declarations, model versions
    and the device."""
    import sys

    plugin = _worker_plugin(plugin_name)
    stages = []
    device = engine = None
    for name in plugin.stage_names:
        stage = plugin.get_stage(stage_name=name)
        device = device or getattr(stage, "device_name", None)
        engine = engine or getattr(stage, "engine", None)
        spec = plugin.get_spec(name)
        stages.append({**spec.to_dict(), "entry_point": name,
                       "model_version": getattr(stage, "model_version", None) or spec.version})
    reader = plugin.get_reader()
    keras = sys.modules.get("keras")  # only if a stage uses Keras
    return {
        "model_version": stages[0]["model_version"],
        "stages": stages,
        "reader": {"name": getattr(reader, "name", plugin.reader_name),
                   "version": getattr(reader, "version", None)},
        "device": device,
        "engine": engine,
        "keras_backend": keras.backend.backend() if keras is not None else None,
    }


def _is_candidate(result: Any, threshold: float) -> bool:
    """A result's O-candidate verdict: its ``is_candidate``, else ``p_o >= threshold``."""
    verdict = getattr(result, "is_candidate", None) if not isinstance(result, dict) else \
        result.get("is_candidate")
    if verdict is not None:
        return bool(verdict)
    p = getattr(result, "p_o", None) if not isinstance(result, dict) else result.get("p_o")
    return p is not None and p >= threshold


def _ok(result: Any) -> bool:
    return bool(result.get("ok") if isinstance(result, dict) else result.ok)


def _reason(result: Any) -> str:
    r = result.get("error_reason") if isinstance(result, dict) else getattr(result, "error_reason", None)
    return r or "unknown"


@dataclass
class PartitionSummary:
    """Counts of one stage for one partition (or, summed, for a whole scan).

    ``n_candidates`` counts O candidates for a stage that decides them
    (``is_candidate`` / ``p_o``); ``counts`` the True results of the stage's
    ``summary`` outputs (e.g. ``heii_detected``).
    """

    n_files: int = 0
    n_skipped: int = 0
    n_classified: int = 0
    n_errors: int = 0
    n_candidates: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    #: Peak resident memory (MiB) of the worker process that ran the partition, when it
    #: ended (summed summaries keep the largest: the most any worker used).
    peak_rss_mb: float = 0.0
    #: CPU seconds of the worker thread that ran the partition (``time.thread_time``:
    #: reading, the stages, the writes; summed over partitions).
    cpu_seconds: float = 0.0

    @classmethod
    def from_results(cls, n_files: int, n_skipped: int, results: Sequence[Any],
                     threshold: float, seconds: float = 0.0,
                     summary_fields: Sequence[str] = ()) -> "PartitionSummary":
        """Summarise stage results (objects with ``ok``, ``error_reason``; ``p_o`` optional)."""
        ok = [r for r in results if _ok(r)]
        reasons = Counter(_reason(r) for r in results if not _ok(r))
        cands = sum(1 for r in ok if _is_candidate(r, threshold))
        counts = {f: sum(1 for r in ok if (r.get(f) if isinstance(r, dict) else getattr(r, f, None)))
                  for f in summary_fields}
        return cls(n_files=n_files, n_skipped=n_skipped, n_classified=len(ok),
                   n_errors=len(results) - len(ok), n_candidates=cands,
                   errors_by_reason=dict(reasons), seconds=seconds, counts=counts)

    def add(self, other: "PartitionSummary") -> None:
        """Accumulate ``other`` into this summary."""
        self.n_files += other.n_files
        self.n_skipped += other.n_skipped
        self.n_classified += other.n_classified
        self.n_errors += other.n_errors
        self.n_candidates += other.n_candidates
        self.seconds += other.seconds
        self.cpu_seconds += other.cpu_seconds
        self.peak_rss_mb = max(self.peak_rss_mb, other.peak_rss_mb)
        for k, v in other.errors_by_reason.items():
            self.errors_by_reason[k] = self.errors_by_reason.get(k, 0) + v
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v


def _summary_fields(spec: Any) -> tuple[str, ...]:
    return tuple(o.name for o in spec.outputs if o.summary and o.name != "is_candidate")


def process_partition(paths: list[str], plugin_name: str, scan_id: Any,
                      model_version: str | Mapping[str, str | None] | None,
                      threshold: float) -> dict[str, PartitionSummary]:
    """Worker task: per stage, skip its done files; read the others once; run each stage; write.

    Parameters
    ----------
    paths : list of str
        Files of this partition.
    plugin_name : str
        Name of the :class:`ScanWorkerPlugin` registered for this scan.
    scan_id
        Id returned by ``sink.start_scan``.
    model_version : str, mapping or None
        Resolved model version of each stage (``{stage: version}``; a string
        for a scan of one stage), used for the resume check.
    threshold : float
        p(O) threshold, only for the candidate count.

    Returns
    -------
    dict
        Stage name (the stage's table name) -> :class:`PartitionSummary`.

    Notes
    -----
    Each file is read once, with the scan's reader, whatever the number of
    stages; the stages get :class:`lamost_ostar.io.Spectrum` records, in
    chunks of ``batch_size``.  When two or more stages define
    ``process_prepared`` (:func:`lamost_ostar.stage.accepts_prepared`), each
    chunk is also preprocessed once (``prepare(..., continuum=True)``) and
    every such stage gets its rows of that batch.  A stage's results are
    written in one bulk ``sink.write`` per partition.
    """
    from lamost_ostar.stage import accepts_prepared, read_items

    t0, cpu0 = time.perf_counter(), time.thread_time()
    plugin = _worker_plugin(plugin_name)
    if not isinstance(model_version, Mapping):
        model_version = {plugin.stage_names[0]: model_version} if len(plugin.stage_names) == 1 \
            else {n: None for n in plugin.stage_names}
    sink = plugin.sink
    stages = []
    for ref in plugin.stage_names:
        mv = model_version.get(ref)
        stage = plugin.get_stage(mv, stage_name=ref)
        spec = plugin.get_spec(ref)
        mv = mv if mv is not None else getattr(stage, "model_version", None)
        done = sink.done_paths(paths, mv, stage=spec.name) if mv is not None else set()
        stages.append((stage, spec, mv, {p for p in paths if p not in done}))
    todo = [p for p in paths if any(p in t for *_, t in stages)]
    results: list[list[Any]] = [[] for _ in stages]
    batch = max(1, int(plugin.stage_kwargs.get("batch_size", 256)))
    reader = plugin.get_reader()
    # several stages that take a prepared batch share one preprocessing per chunk
    share = sum(accepts_prepared(st) for st, *_ in stages) >= 2
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        spectra, slots, failed = read_items(chunk, reader=reader)
        by_path = {chunk[i]: sp for i, sp in zip(slots, spectra)}
        row_of = {chunk[i]: r for r, i in enumerate(slots)}
        fails = {chunk[i]: (reason, msg) for i, (_, reason, msg) in failed.items()}
        prep = _prepare_shared(spectra) if share and spectra else None
        for k, (stage, spec, mv, wanted) in enumerate(stages):
            mine = [p for p in chunk if p in wanted]
            if not mine:
                continue
            readable = [by_path[p] for p in mine if p in by_path]
            got_list = _run_stage(stage, readable, prep, [row_of[p] for p in mine if p in by_path]) \
                if readable else []
            if len(got_list) != len(readable):
                raise RuntimeError(f"stage {spec.name!r} returned {len(got_list)} results for "
                                   f"{len(readable)} spectra (one per item, in order, is the protocol)")
            got = iter(got_list)
            for p in mine:
                if p in by_path:
                    results[k].append(next(got))
                else:
                    reason, msg = fails.get(p, ("unreadable", "no result from the reader"))
                    results[k].append({"path": p, "ok": False, "error_reason": reason,
                                       "error_message": msg, "model_version": mv})
    out: dict[str, PartitionSummary] = {}
    for k, (stage, spec, mv, wanted) in enumerate(stages):
        if results[k]:
            sink.write(scan_id, results[k], stage=spec)
        out[spec.name] = PartitionSummary.from_results(
            len(paths), len(paths) - len(wanted), results[k], threshold,
            time.perf_counter() - t0, _summary_fields(spec))
        out[spec.name].peak_rss_mb = peak_rss_mb()
        out[spec.name].cpu_seconds = time.thread_time() - cpu0
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (``getrusage``; 0.0 where unavailable)."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):  # pragma: no cover - not POSIX
        return 0.0
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _prepare_shared(spectra: list[Any]) -> Any:
    """``prepare(spectra, continuum=True)`` for the stages to share, or None if it fails.

    A chunk that cannot be prepared as a whole (one odd spectrum) goes to each
    stage's own ``process``, which isolates the spectrum that fails.
    """
    from lamost_ostar.preprocess import prepare

    try:
        return prepare(spectra, continuum=True)
    except Exception:  # noqa: BLE001 - the stages' own path reports the bad spectrum
        return None


def _run_stage(stage: Any, spectra: list[Any], prep: Any, rows: list[int]) -> list[Any]:
    """A stage's results for ``spectra``: from the shared ``prep`` rows when it takes them."""
    from lamost_ostar.stage import accepts_prepared

    if prep is not None and accepts_prepared(stage):
        try:
            return list(stage.process_prepared(spectra, prep.subset(rows)))
        except Exception as exc:  # noqa: BLE001 - fall back to the stage's own preprocessing
            import logging

            logging.getLogger(__name__).warning(
                "stage %r: process_prepared failed (%s: %s); using its own preprocessing",
                getattr(stage, "name", type(stage).__name__), type(exc).__name__, exc)
    return list(stage.process(spectra))


# --------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------
@dataclass
class ScanSummary:
    """What a scan did, for the terminal and for the provenance row.

    ``totals`` are the counts of the first stage (all of them for a scan of one
    stage); ``stage_totals`` those of every stage, keyed by stage name, and
    ``stages`` their declarations (``StageSpec.to_dict()`` with the model
    version).
    """

    scan_id: Any
    model_version: str | None
    threshold: float
    totals: PartitionSummary
    elapsed_s: float
    startup_s: float = 0.0
    #: Seconds from the start of the scan to its first stored results (first partition done).
    first_result_s: float | None = None
    #: Seconds from the start of the scan to its last partition's results; what follows is the
    #: scan's end (query indexes built, final counts, the scan row closed).
    last_result_s: float | None = None
    n_failed_partitions: int = 0
    n_unwritten_files: int = 0
    device: str | None = None
    keras_backend: str | None = None
    #: Inference engine used by the stages (``"numpy"`` or ``"keras"``; None: a stage without one).
    engine: str | None = None
    n_workers: int = 0
    interrupted: bool = False
    stages: list[dict[str, Any]] = field(default_factory=list)
    stage_totals: dict[str, PartitionSummary] = field(default_factory=dict)
    reader: str | None = None
    #: Stages whose query indexes the scan deferred (empty tables at its start).
    indexes_deferred: list[str] = field(default_factory=list)
    #: Seconds spent building those indexes at the end (None: not built, e.g. interrupted).
    index_build_s: float | None = None

    @property
    def rate(self) -> float:
        """Files handled (classified + errors + skipped) per second of wall time."""
        return self.totals.n_files / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def processed_rate(self) -> float:
        """Files read and classified or failed (not skipped) per second of wall time."""
        n = self._n_read()
        return n / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def steady_rate(self) -> float:
        """Files read and classified or failed per second after start-up
        (cluster start, first model load)."""
        n = self._n_read()
        dt = self.elapsed_s - self.startup_s
        return n / dt if dt > 0 else 0.0

    @property
    def processing_rate(self) -> float:
        """Files read and classified or failed per second while the partitions ran: from the end
        of start-up to the last partition's results (neither start-up nor the scan's end)."""
        if self.last_result_s is None:
            return 0.0
        dt = self.last_result_s - self.startup_s
        return self._n_read() / dt if dt > 0 else 0.0

    def _n_read(self) -> int:
        """Files read (by at least one stage: the most any stage read)."""
        all_totals = list(self.stage_totals.values()) or [self.totals]
        return max(t.n_classified + t.n_errors for t in all_totals)

    def _stage_list(self) -> list[tuple[dict[str, Any], PartitionSummary]]:
        if not self.stages:
            return [({"name": "ostar", "model_version": self.model_version,
                      "outputs": [{"name": "is_candidate"}]}, self.totals)]
        return [(d, self.stage_totals.get(d["name"], PartitionSummary())) for d in self.stages]

    def counts(self) -> dict[str, Any]:
        """Counts and summary for the provenance row (``sink.finish_scan``): the first
        stage's in the count columns, every stage's under ``stages``."""
        out = {**_scan_counts(self.totals), "threshold": self.threshold,
               "errors_by_reason": dict(self.totals.errors_by_reason),
               "elapsed_s": round(self.elapsed_s, 3),
               "spectra_per_s": round(self.processed_rate, 3),
               "startup_s": round(self.startup_s, 3),
               "first_result_s": None if self.first_result_s is None else round(self.first_result_s, 3),
               "last_result_s": None if self.last_result_s is None else round(self.last_result_s, 3),
               "failed_partitions": self.n_failed_partitions,
               "unwritten_files": self.n_unwritten_files,
               "worker_peak_rss_mb": round(self._peak_rss_mb(), 1),
               "partition_cpu_ms_per_file": round(self._cpu_ms_per_file(), 4)}
        if self.indexes_deferred:
            out["indexes_deferred"] = list(self.indexes_deferred)
            out["index_build_s"] = None if self.index_build_s is None else round(self.index_build_s, 3)
        first = self._stage_list()[0][0]
        if _decides_candidates(first):
            out["n_candidates"] = self.totals.n_candidates
        if self.totals.counts:
            out["counts"] = dict(self.totals.counts)
        if len(self.stages) > 1:
            out["stages"] = {d["name"]: {**_scan_counts(t), "errors_by_reason": dict(t.errors_by_reason),
                                         **({"n_candidates": t.n_candidates} if _decides_candidates(d)
                                            else {}), **({"counts": dict(t.counts)} if t.counts else {})}
                             for d, t in self._stage_list()}
        return out

    def _cpu_ms_per_file(self) -> float:
        """Workers' CPU in partitions per file read (ms; 0.0 when nothing was read)."""
        n = self._n_read()
        return 1e3 * self.totals.cpu_seconds / n if n else 0.0

    def _peak_rss_mb(self) -> float:
        return max([t.peak_rss_mb for t in self.stage_totals.values()] + [self.totals.peak_rss_mb])

    def _runs_on(self) -> str:
        if self.engine == "numpy":
            return "numpy engine"
        return self.keras_backend or "no Keras"

    def format(self) -> str:
        """One-screen, human-readable summary: what each stage produced."""
        t = self.totals
        listed = self._stage_list()
        one = len(listed) == 1
        workers = f"{self.n_workers} worker{'' if self.n_workers == 1 else 's'}"
        if one:
            what = listed[0][0]
            head = (f"model {what.get('model_version')}" if what["name"] == "ostar"
                    else f"stage {what['name']} {what.get('model_version') or what.get('version')}")
        else:
            head = "stages " + ", ".join(f"{d['name']} ({d.get('model_version') or d.get('version')})"
                                         for d, _ in listed)
        lines = [
            f"scan {self.scan_id}: {head} "
            f"({self._runs_on()} on {self.device or '?'}, {workers})"
            + ("  [INTERRUPTED]" if self.interrupted else ""),
            f"  files seen          {t.n_files:>10,d}",
        ]
        for d, st in listed:
            indent = "  " if one else "    "
            if not one:
                lines.append(f"  {d['name']}")
            done_word = "classified" if _decides_candidates(d) else "measured"
            w = 22 - len(indent)
            lines += [f"{indent}{'skipped (done)':<{w}}{st.n_skipped:>10,d}",
                      f"{indent}{done_word:<{w}}{st.n_classified:>10,d}",
                      f"{indent}{'errors':<{w}}{st.n_errors:>10,d}"]
            for reason, n in sorted(st.errors_by_reason.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"{indent}  {reason:<{w - 2}}{n:>10,d}")
            if _decides_candidates(d):
                lines.append(f"{indent}{'O candidates':<{w}}{st.n_candidates:>10,d}   "
                             f"(the model's decision; p(O) >= {self.threshold:g} for models "
                             "without one)")
            for name, n in st.counts.items():
                lines.append(f"{indent}{name:<{w}}{n:>10,d}")
        lines += [
            f"  elapsed             {self.elapsed_s:>10.1f} s   "
            f"(start-up: cluster + model load {self.startup_s:.1f} s"
            + ("" if self.first_result_s is None else f"; first results at {self.first_result_s:.1f} s")
            + ")",
            f"  rate                {self.processed_rate:>10.1f} spectra/s read+"
            + ("classified" if one and _decides_candidates(listed[0][0]) else "processed")
            + f"  ({self.steady_rate:.1f}/s after start-up; {self.rate:.1f} files/s incl. skipped)",
        ]
        if self._peak_rss_mb() > 0:
            lines.append(f"  worker memory       {self._peak_rss_mb():>10,.0f} MB  (peak resident, "
                         "largest worker)")
        if self._cpu_ms_per_file() > 0:
            lines.append(f"  worker CPU          {self._cpu_ms_per_file():>10,.3f} ms per file read "
                         "(read, stages, writes)")
        if self.indexes_deferred:
            lines.append("  query indexes       " + (
                f"{self.index_build_s:>10.1f} s   (built at the end: the scan wrote into empty tables "
                "without them)" if self.index_build_s is not None else
                "  NOT BUILT   (the next scan into this catalogue builds them; queries are slower "
                "until then)"))
        if self.n_failed_partitions:
            lines.append(f"  FAILED partitions   {self.n_failed_partitions:>10,d}   "
                         f"({self.n_unwritten_files:,d} files not stored; "
                         "run the scan again to resume)")
        return "\n".join(lines)


def _decides_candidates(stage: Mapping[str, Any]) -> bool:
    """Whether a stage (its declaration) makes an O-candidate decision (is_candidate or p_o)."""
    names = {o["name"] if isinstance(o, Mapping) else getattr(o, "name", None)
             for o in stage.get("outputs") or ()}
    return bool({"is_candidate", "p_o"} & names)


def _scan_counts(t: PartitionSummary) -> dict[str, int]:
    return {"files_seen": t.n_files, "files_read": t.n_files - t.n_skipped,
            "files_classified": t.n_classified, "files_failed": t.n_errors,
            "files_skipped": t.n_skipped}


#: Environment of local workers (set before TensorFlow is imported there; a value
#: already in the environment wins): TensorFlow logs no INFO/WARNING lines and
#: Python prints no warnings; Keras is imported lean (:func:`lamost_ostar.stage.import_keras`:
#: without matplotlib and scikit-learn, which inference does not use).  TensorFlow's earliest lines (oneDNN, cudart stub)
#: are printed before its logging is set up, whatever the environment: the
#: workers' stderr goes to the worker log (``worker_log``) for that.
WORKER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore", "LAMOST_OSTAR_LEAN_KERAS": "1"}


class _WorkerStderrToFile(_WorkerPlugin):
    """Send a local worker's C-level stderr (TensorFlow/absl start-up chatter) to a file.

    Only used for local clusters that the scan starts itself, so the progress
    bar stays readable; the file keeps everything for debugging.
    """

    name = "lamost_ostar-worker-stderr"
    idempotent = True

    def __init__(self, path: str) -> None:
        self.path = path

    def setup(self, worker: Any) -> None:  # noqa: D102
        import sys

        sys.stderr.flush()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)


def make_client(scheduler: str | None = None, n_workers: int | None = None,
                threads_per_worker: int = 1, memory_limit: str | float | None = "auto",
                worker_log: str | None = None):
    """A Dask client: on ``scheduler`` if given, else on a new local cluster.

    The local cluster uses processes (the GIL does not serialise reading and
    inference), ``n_workers`` defaults to ``os.cpu_count() // threads_per_worker``,
    has no dashboard (no port clash on shared machines), and gives each worker
    ``cpu_count / n_workers`` TensorFlow intra-op and OpenBLAS threads (no over-subscription).

    Parameters
    ----------
    worker_log : str, optional
        File that receives the local workers' stderr (TensorFlow start-up
        messages, worker errors) instead of the terminal.

    Returns
    -------
    (client, cluster)
        ``cluster`` is None for an existing scheduler; close both when done.
    """
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler, timeout="30s"), None
    if threads_per_worker < 1:
        raise ValueError("threads_per_worker must be >= 1")
    cores = os.cpu_count() or 1
    if n_workers is None:
        n_workers = max(1, cores // threads_per_worker)
    if n_workers < 1:
        raise ValueError("n_workers must be >= 1")
    import logging

    import dask

    threads = str(max(1, cores // n_workers))
    # one malloc arena (ARENA_ENV) unless turned off with the other malloc settings, or the
    # user's own value, which the workers inherit
    arena = {} if os.environ.get(MALLOPT_ENV, "1") == "0" else {
        f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in ARENA_ENV.items()
        if k not in os.environ}
    # Dask's own statistical profiler samples every worker thread every 10 ms and reads
    # source lines for each frame: a few % of a 2-core machine (seen in a py-spy profile of
    # a scan, reports/performance.md). The nannies hand this config to the worker processes.
    # Dask also starts workers with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's
    # adaptive mmap threshold: every large numpy temporary of the preprocessing is then
    # mmapped, page-faulted and unmapped again, and the stage ran 44 % slower (355 vs 247 ms
    # per 256 spectra, reports/performance.md). None unsets it (a value the user exported
    # still reaches the workers through the inherited environment).
    with dask.config.set({"distributed.worker.profile.enabled": False,
                          "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                          **QUIET_MONITORS, **arena}):
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
            dashboard_address=None, silence_logs=logging.ERROR, memory_limit=memory_limit,
            # no dashboard; the scheduler's HTTP routes (health, metrics) on a free port, so a
            # port 8787 in use elsewhere gives no "Port 8787 is already in use" warning
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
            env={**WORKER_ENV, **{k: os.environ[k] for k in WORKER_ENV if k in os.environ},
                 "TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": "1",
                 # the numpy engine's matrix products (Dask's nanny default is 1 thread)
                 "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads},
        )
    client = Client(cluster)
    if worker_log:
        client.register_plugin(_WorkerStderrToFile(os.path.abspath(worker_log)))
    return client, cluster


def _failure_results(paths: Sequence[str], reason: str, message: str,
                     model_version: str | None) -> list[Any]:
    return [{"path": p, "ok": False, "error_reason": reason, "error_message": message,
             "model_version": model_version} for p in paths]


def run_scan(
    sources: Sequence[str | os.PathLike],
    sink: Any,
    *,
    client: Any = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    stage: str | Sequence[str] = "ostar",
    model_version: str | Mapping[str, str | None] | None = None,
    models_dir: str | os.PathLike | None = None,
    device: str = "auto",
    engine: str = "auto",
    batch_size: int = 256,
    read_engine: str = DEFAULT_ENGINE,
    class_veto: bool = True,
    min_snr_g: float | None = None,
    partition_size: int = 256,
    threshold: float = 0.5,
    max_in_flight: int | None = None,
    progress: bool = True,
    count_total: bool = True,
    extra_provenance: dict[str, Any] | None = None,
    update_every_s: float = 10.0,
    worker_log: str | None = None,
    memory_limit: str | float | None = "auto",
    interrupt_grace_s: float = 30.0,
    reader: str = "lamost",
    defer_indexes: bool = True,
) -> ScanSummary:
    """Scan files with a stage on Dask and store every result through ``sink``.

    Parameters
    ----------
    sources : sequence of str or path-like
        Release directories, single files, or ``@list.txt`` file lists.
    sink : ResultSink
        Where results go (e.g. ``catalogue.CatalogueWriter``); picklable.
    client : distributed.Client, optional
        Use this client (not closed here).  Otherwise one is made with
        :func:`make_client` from ``scheduler``, ``n_workers`` and
        ``threads_per_worker`` and closed at the end.
    stage : str or sequence of str
        Stage entry point name(s) (group ``lamost_ostar.stages``).  With several,
        each file is read once and every stage processes the same records;
        each stage writes its own table and resumes on its own (a file done for
        one stage but not another is processed for the other only).
    model_version : str or mapping, optional
        A model version passed to every stage that accepts ``model_version``,
        or ``{stage: version}``.  None is resolved once on a worker (per stage)
        and pinned for the whole scan.
    models_dir, device, batch_size, read_engine
        Passed to the stages that accept them (``read_engine`` only when not the
        default :data:`lamost_ostar.io.DEFAULT_ENGINE`; it is also the LAMOST reader's ``engine``).
    engine : {"auto", "keras", "numpy"}
        Inference engine of the stages that accept ``engine`` (``ostar``;
        :func:`lamost_ostar.stage.resolve_engine`, decided on each worker: numpy on a
        CPU-only worker, Keras where a GPU may be).  Requested and used engines are
        recorded in the scan's parameters.
    class_veto : bool
        False: the stages that accept ``class_veto`` (``ostar``) keep candidates the LAMOST
        pipeline calls GALAXY or QSO (:data:`lamost_ostar.stage.VETO_CLASSES`); recorded in the
        scan's parameters.
    min_snr_g : float, optional
        The candidate S/N floor of the stages that accept ``min_snr_g`` (``ostar``); None: the
        stage's default (:data:`lamost_ostar.models.decision.MIN_SNR_G`, 3); 0: none.  The
        value in force is recorded in the scan's parameters.
    reader : str
        Reader entry point name (group ``lamost_ostar.readers``; ``lamost``) or
        ``"module:attr"``; the scan reads every file with it.
    partition_size : int
        Files per Dask task.
    threshold : float
        p(O) threshold for the candidate count in the summary.
    max_in_flight : int, optional
        Partitions submitted but not finished (default: 2 per worker thread);
        bounds memory whatever the number of files.
    progress : bool
        Show a tqdm progress bar (rate, ETA once the file count is known).
    count_total : bool
        Count the files in a background thread for the progress total.
    extra_provenance : dict, optional
        Added to the parameters recorded in the scan row.
    worker_log : str, optional
        For a local cluster started here: file receiving the workers' stderr.
    memory_limit : str, float or None
        Per-worker memory limit of a local cluster started here.
    update_every_s : float
        How often the scan row's counts are updated during the scan (when the
        sink has ``update_scan``).
    interrupt_grace_s : float
        On an interrupt (``KeyboardInterrupt``: Ctrl-C, or SIGTERM turned into
        one by the caller) with a cluster not started here: seconds to wait for
        the partitions in flight to finish, so their writes are counted.  A
        local cluster started here is closed at once instead (its workers stop,
        so nothing is written after the count).
    defer_indexes : bool
        When the sink can (``defer_indexes``/``build_indexes``, as
        :class:`~lamost_ostar.catalogue.Catalogue`): write into a stage table
        that is empty at the start without its query indexes and build them once
        when the scan ends.  An interrupted scan (or one interrupted while it
        builds them) leaves them to the next scan, which builds them even with
        nothing left to classify.  A table that holds rows keeps its indexes.
        False: always write with them.

    Returns
    -------
    ScanSummary

    Notes
    -----
    The scan row is closed with counts taken from the catalogue when the sink
    offers ``scan_counts(scan_id, threshold)`` (as :class:`~lamost_ostar.catalogue.Catalogue`
    does): ``files_classified``/``files_failed`` are the result/error rows
    carrying the scan's id, so they match what the scan wrote whatever stopped
    it (an interrupt, a killed worker whose partition ran twice).
    ``files_seen`` counts the files of the partitions the scan saw finish plus
    the files of unfinished ones that it wrote; ``files_skipped`` is
    ``files_seen - files_read`` (files done before this scan).
    """
    from distributed import as_completed

    import lamost_ostar

    if partition_size < 1:
        raise ValueError(f"partition size must be >= 1, got {partition_size}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be auto, cpu or gpu, got {device!r}")
    sources = [os.fspath(s) for s in sources]
    for s in sources:
        p = s[1:] if s.startswith("@") else s
        if not os.path.exists(p):
            raise FileNotFoundError(f"no such file or directory: {p}")

    t_start = time.perf_counter()
    own_client = client is None
    cluster = None
    plugin = None
    counter = None
    pbar = None
    closed = False
    logs = _LogsToFile(worker_log) if own_client and not scheduler and worker_log else None
    try:
        if logs is not None:
            logs.start()
        if own_client:
            # a Ctrl-C that lands inside the cluster's constructor leaves a half-built
            # cluster that only an atexit hook (with a traceback) can close: hold it
            with _interrupts_deferred() as held_start:
                try:
                    client, cluster = make_client(scheduler, n_workers, threads_per_worker,
                                                  memory_limit=memory_limit, worker_log=worker_log)
                except Exception:
                    if held_start:  # e.g. the workers died of the same Ctrl-C
                        raise KeyboardInterrupt from None
                    raise
            if held_start:
                raise KeyboardInterrupt
        nthreads = sum(client.nthreads().values()) or 1
        n_workers_seen = len(client.nthreads())
        if max_in_flight is None:
            max_in_flight = 2 * nthreads
        stage_refs = [stage] if isinstance(stage, str) else list(stage)
        if not stage_refs or len(set(stage_refs)) != len(stage_refs):
            raise ValueError(f"stages must be given once each, got {stage_refs}")
        per_stage = dict(model_version) if isinstance(model_version, Mapping) else None
        stage_kwargs = {"model_version": None if per_stage is not None else model_version,
                        "device": device, "batch_size": batch_size}
        if models_dir is not None:
            stage_kwargs["models_dir"] = os.fspath(models_dir)
        if read_engine != DEFAULT_ENGINE:
            stage_kwargs["read_engine"] = read_engine
        if engine != "auto":
            stage_kwargs["engine"] = engine
        if not class_veto:
            stage_kwargs["class_veto"] = False
        if min_snr_g is not None:
            stage_kwargs["min_snr_g"] = float(min_snr_g)
        plugin = ScanWorkerPlugin(stage_refs, stage_kwargs, sink, reader=reader,
                                  reader_kwargs={"engine": read_engine})
        client.register_plugin(plugin, name=plugin.name)

        # Build the stages (pinned versions first) on every worker at once, so that no worker
        # sits idle while another loads the model; the first answer resolves the versions.
        pins = {ref: v for ref, v in (per_stage or {}).items() if v is not None}
        warm_up = _warm_up_workers(client, plugin.name, pins)
        info = _first_result(warm_up)
        stage_defs = info["stages"]
        names = [d["name"] for d in stage_defs]
        if len(set(names)) != len(names):
            raise ValueError(f"two stages write the same table: {names}")
        resolved_all = {d["entry_point"]: d["model_version"] for d in stage_defs}
        resolved = stage_defs[0]["model_version"]
        by_name = {d["name"]: d for d in stage_defs}

        parameters = {
            "sources": sources, "stage": stage_refs[0] if len(stage_refs) == 1 else stage_refs,
            "reader": info.get("reader"), "device": device, "engine": engine,
            "engine_used": info.get("engine"),
            "batch_size": batch_size, "read_engine": read_engine, "class_veto": bool(class_veto),
            "min_snr_g": snr_floor_in_force(min_snr_g),
            "partition_size": partition_size,
            "threshold": threshold, "scheduler": scheduler or "local",
            "n_workers": n_workers_seen, "threads_per_worker": threads_per_worker,
            "keras_backend": info.get("keras_backend"), "device_used": info.get("device"),
            **(extra_provenance or {}),
        }
        with _interrupts_deferred() as held:  # a scan row is either not there or gets closed
            scan_id = sink.start_scan(model_version=resolved,
                                      code_version=lamost_ostar.code_version(),
                                      parameters=parameters,
                                      stages=[{k: v for k, v in d.items() if k != "entry_point"}
                                              for d in stage_defs])

        defer = getattr(sink, "defer_indexes", None) if defer_indexes else None
        deferred = list(defer(names)) if defer is not None else []
        index_build_s = None

        totals = {d["name"]: PartitionSummary() for d in stage_defs}
        n_failed = 0
        n_unwritten = 0
        failed_paths: list[str] = []
        pending: dict[Any, list[str]] = {}
        interrupted = False
        t_work = time.perf_counter()
        t_first = t_last = None
        try:
            if held:  # interrupted while the scan row was being written
                raise KeyboardInterrupt
            if count_total:
                counter = FileCounter(sources)
                counter.start()
            if progress:
                from tqdm.auto import tqdm

                pbar = tqdm(total=None, unit="file", desc="scan", dynamic_ncols=True,
                            smoothing=0.05)
            partitions = iter_partitions(iter_paths(sources), partition_size)
            ac = as_completed()
            index = itertools.count()

            def submit(paths: list[str]) -> None:
                fut = client.submit(process_partition, paths, plugin.name, scan_id, resolved_all,
                                    threshold, pure=False, retries=1,
                                    key=f"lamost_ostar-part-{scan_id}-{next(index)}")
                pending[fut] = paths
                ac.add(fut)

            for paths in itertools.islice(partitions, max_in_flight):
                submit(paths)
            update = getattr(sink, "update_scan", None)
            last_update = time.monotonic()
            for fut in ac:
                if not _settled(fut):
                    ac.add(fut)  # finished, then lost with its worker: it runs again
                    continue
                if t_first is None:
                    t_first = time.perf_counter()
                paths = pending[fut]
                if fut.status == "finished":
                    part = fut.result()
                else:
                    part, n_bad = _handle_failed(fut, paths, sink, scan_id, stage_defs,
                                                 threshold, submit)
                    n_failed += n_bad
                    if n_bad:
                        n_unwritten += len(paths)
                        failed_paths.extend(paths)
                _add_parts(totals, part)
                del pending[fut]  # only once counted: an interrupt here loses nothing
                fut.release()
                del fut
                t_last = time.perf_counter()
                if pbar is not None:
                    if counter is not None and counter.finished and pbar.total is None:
                        pbar.total = counter.count
                    first = totals[names[0]]
                    pbar.update(max([p.n_files for p in part.values()] or [0]))
                    pbar.set_postfix(ok=first.n_classified, err=first.n_errors,
                                     skip=first.n_skipped, refresh=False)
                for nxt in itertools.islice(partitions, 1):
                    submit(nxt)
                if update is not None and time.monotonic() - last_update > update_every_s:
                    update(scan_id, _progress_counts(totals, names))
                    last_update = time.monotonic()
        except KeyboardInterrupt:
            interrupted = True
        if pbar is not None:
            pbar.close()
            pbar = None
        if interrupted:
            if own_client and cluster is not None:
                # stop the local workers first: nothing is written after the count below
                with _interrupts_deferred():
                    _close_quietly(client, cluster)
                closed = True
            else:
                _drain(pending, totals, interrupt_grace_s)
                client.cancel(list(pending))
        if deferred and not interrupted:  # an interrupted scan closes its row first; the next one builds
            index_build_s, interrupted = _build_indexes(sink, deferred)
        with _interrupts_deferred():
            unacked = [p for paths in pending.values() for p in paths] + failed_paths
            totals = {name: _final_totals(sink, scan_id, by_name[name]["model_version"], t, unacked,
                                          threshold, stage=name)
                      for name, t in totals.items()}
            summary = ScanSummary(
                scan_id=scan_id, model_version=resolved, threshold=threshold,
                totals=totals[names[0]], stages=stage_defs, stage_totals=totals,
                reader=(info.get("reader") or {}).get("name"),
                elapsed_s=time.perf_counter() - t_start, startup_s=t_work - t_start,
                first_result_s=None if t_first is None else t_first - t_start,
                last_result_s=None if t_last is None else t_last - t_start,
                n_failed_partitions=n_failed,
                n_unwritten_files=n_unwritten,
                device=info.get("device"), keras_backend=info.get("keras_backend"),
                engine=info.get("engine"), n_workers=n_workers_seen, interrupted=interrupted,
                indexes_deferred=deferred, index_build_s=index_build_s,
            )
            sink.finish_scan(scan_id, summary.counts(),
                             status="interrupted" if interrupted
                             else ("failed" if n_failed else "finished"))
        return summary
    finally:
        if pbar is not None:
            pbar.close()
        if counter is not None:
            counter.stop()
        if plugin is not None and not own_client:
            try:
                client.unregister_worker_plugin(plugin.name)
            except Exception:  # pragma: no cover - best effort cleanup
                pass
        if own_client and client is not None and not closed:
            with _interrupts_deferred():
                _close_quietly(client, cluster)
        if logs is not None:
            logs.stop()


def _build_indexes(sink: Any, stages: Sequence[str]) -> tuple[float | None, bool]:
    """Build the deferred query indexes: (their seconds or None if not built, interrupted)."""
    import logging

    try:
        return float(sink.build_indexes(stages)), False
    except KeyboardInterrupt:
        return None, True
    except Exception as exc:  # noqa: BLE001 - the results are stored; only the indexes are missing
        logging.getLogger(__name__).warning(
            "building the catalogue's query indexes failed (%s: %s); the next scan builds them",
            type(exc).__name__, exc)
        return None, False


def _close_quietly(client: Any, cluster: Any) -> None:
    """Close a client and the local cluster started for it (errors of dying workers ignored)."""
    for obj in (client, cluster):
        if obj is None:
            continue
        try:
            obj.close()
        except Exception:  # noqa: BLE001 - workers killed by the interrupt may not answer
            pass
    if cluster is not None:  # closed as well as it can be: no second try (and traceback) at exit
        instances = getattr(type(cluster), "_instances", None)
        if instances is not None and hasattr(instances, "discard"):
            instances.discard(cluster)


def _drain(pending: dict[Any, list[str]], totals: dict[str, PartitionSummary], grace_s: float) -> None:
    """After an interrupt: count the partitions in flight that finish within ``grace_s``.

    A second interrupt stops the wait.  Partitions that finish are removed from
    ``pending``; those left are the caller's to cancel.
    """
    from distributed import as_completed

    if not pending or grace_s <= 0:
        return
    try:
        for fut in as_completed(list(pending), timeout=grace_s):
            if fut.status == "finished":
                _add_parts(totals, fut.result())
                del pending[fut]
    except KeyboardInterrupt:
        return
    except Exception:  # noqa: BLE001 - the grace period ran out (TimeoutError) or a task failed
        return


def _add_parts(totals: dict[str, PartitionSummary], part: Mapping[str, PartitionSummary]) -> None:
    """Accumulate one partition's per-stage counts."""
    for name, p in part.items():
        totals.setdefault(name, PartitionSummary()).add(p)


def _progress_counts(totals: dict[str, PartitionSummary], names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(_scan_counts(totals[names[0]]))
    if len(names) > 1:
        out["stages"] = {n: _scan_counts(totals[n]) for n in names}
    return out


def _pin_stage(plugin_name: str, stage_ref: str, model_version: str) -> str:
    """Worker task: build a stage with a given model version (so that stage_info reports it)."""
    stage = _worker_plugin(plugin_name).get_stage(model_version, stage_name=stage_ref)
    return getattr(stage, "model_version", None)


def _warm_stage_info(plugin_name: str, pins: Mapping[str, str]) -> dict[str, Any]:
    """Worker task: build the stages (``pins``: stage -> model version first), then :func:`stage_info`."""
    for ref, version in pins.items():
        _pin_stage(plugin_name, ref, version)
    return stage_info(plugin_name)


def _warm_up_workers(client: Any, plugin_name: str, pins: Mapping[str, str]) -> list[Any]:
    """One :func:`_warm_stage_info` task per worker now connected (each model loads in parallel).

    The futures must be kept until the scan ends (a released future cancels its task).
    """
    workers = list(client.nthreads())
    futures = [client.submit(_warm_stage_info, plugin_name, dict(pins), pure=False,
                             workers=[w], allow_other_workers=False) for w in workers]
    return futures or [client.submit(_warm_stage_info, plugin_name, dict(pins), pure=False)]


def _first_result(futures: Sequence[Any]) -> Any:
    """The result of whichever future finishes first (its exception if it failed)."""
    from distributed import as_completed

    return next(iter(as_completed(futures))).result()


def _final_totals(sink: Any, scan_id: Any, model_version: str | None, acked: PartitionSummary,
                  unacked_paths: Sequence[str], threshold: float,
                  stage: str = "ostar") -> PartitionSummary:
    """The scan's final counts, from the rows carrying its id when the sink can count them.

    ``acked`` holds what the finished partitions reported; ``unacked_paths``
    are the files of partitions whose end the scan did not see (cancelled on an
    interrupt, or failed), which may still have been written.
    """
    counter = getattr(sink, "scan_counts", None)
    if counter is None:
        return acked
    try:
        rows = counter(scan_id, threshold=threshold, stage=stage)
        extra = 0
        if unacked_paths:
            try:
                extra = len(sink.done_paths(list(unacked_paths), model_version, scan_id=scan_id,
                                            stage=stage))
            except TypeError:  # a sink without the scan_id filter
                extra = 0
    except Exception:  # noqa: BLE001 - the store cannot answer: keep what the partitions said
        return acked
    read = int(rows["results"]) + int(rows["errors"])
    seen = max(acked.n_files + extra, read)
    return PartitionSummary(
        n_files=seen, n_skipped=seen - read, n_classified=int(rows["results"]),
        n_errors=int(rows["errors"]),
        n_candidates=int(rows.get("candidates", acked.n_candidates)),
        errors_by_reason=dict(rows.get("errors_by_reason", acked.errors_by_reason)),
        seconds=acked.seconds, counts=dict(rows.get("counts", acked.counts)),
        peak_rss_mb=acked.peak_rss_mb, cpu_seconds=acked.cpu_seconds)


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold SIGINT/SIGTERM for the duration of the block (main thread only).

    Used where being stopped half-way would leave a scan row open: the signal
    is noted and the block runs to its end.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    got: list[int] = []

    def _note(signum, _frame):
        got.append(signum)

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, _note)
        except (ValueError, OSError):  # pragma: no cover
            pass
    try:
        yield got
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class _LogsToFile:
    """Send this process's Dask/Tornado/asyncio log records to ``path`` instead of stderr.

    A local cluster's nannies live in the client process; when the workers are
    stopped by Ctrl-C they log errors (``distributed.nanny - ERROR ...
    CancelledError``) that belong in the worker log, not on the terminal.
    """

    PREFIXES = ("distributed", "tornado", "bokeh", "asyncio")

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._swapped: list[tuple[Any, list[Any], bool]] = []
        self._handler = None

    def start(self) -> None:
        import logging

        self._handler = logging.FileHandler(self.path, delay=True)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        import distributed  # noqa: F401 - configures its loggers on import

        names = ["asyncio"] + [n for n in logging.root.manager.loggerDict
                               if n.startswith(self.PREFIXES[:-1])]
        for name in names:
            logger = logging.getLogger(name)
            if name != "asyncio" and not logger.handlers:
                continue
            self._swapped.append((logger, list(logger.handlers), logger.propagate))
            for h in list(logger.handlers):
                logger.removeHandler(h)
            logger.addHandler(self._handler)
            logger.propagate = False

    def stop(self) -> None:
        for logger, handlers, propagate in self._swapped:
            logger.removeHandler(self._handler)
            for h in handlers:
                logger.addHandler(h)
            logger.propagate = propagate
        self._swapped = []
        if self._handler is not None:
            self._handler.close()
            self._handler = None


def _settled(fut: Any) -> bool:
    """Whether a partition's future, as :class:`distributed.as_completed` yields it, has an outcome.

    A partition can finish on a worker that dies before the client has taken its
    summary: the scheduler loses the result and runs the partition again (its
    files are skipped as done), and the future is set back to ``lost`` or
    ``pending``.  Such a future is waited for again, neither counted nor failed.
    """
    return fut.status in ("finished", "error", "cancelled")


def _handle_failed(fut: Any, paths: list[str], sink: Any, scan_id: Any,
                   stages: Sequence[Mapping[str, Any]], threshold: float,
                   submit: Any) -> tuple[dict[str, PartitionSummary], int]:
    """A partition task failed.

    When workers died running it (``KilledWorker``: e.g. a segfault in a C
    reader on one malformed file), a multi-file partition is split in two and
    resubmitted, so the culprit is isolated; a single file that still kills
    workers gets an error row ``worker_crash`` for every stage (a stage that
    already has a result for it keeps the result) so that every file is
    accounted for.  Any other failure (database down, model error) is
    systemic: the partition's files are left unwritten (a later run of the
    scan resumes them) and counted as a failed partition.
    """
    from distributed.scheduler import KilledWorker

    from lamost_ostar.stage import StageSpec

    try:
        exc = fut.exception()
    except Exception as err:  # pragma: no cover - e.g. cancelled
        exc = err
    if not isinstance(exc, KilledWorker):
        return {}, 1
    if len(paths) > 1:
        mid = len(paths) // 2
        submit(paths[:mid])
        submit(paths[mid:])
        return {}, 0
    message = f"worker died {type(exc).__name__}: {exc}".splitlines()[0][:500]
    out = {}
    for d in stages:
        spec = StageSpec.from_dict({k: v for k, v in d.items() if k != "entry_point"})
        results = _failure_results(paths, "worker_crash", message, d.get("model_version"))
        sink.write(scan_id, results, stage=spec)
        out[spec.name] = PartitionSummary.from_results(len(paths), 0, results, threshold)
    return out, 0
