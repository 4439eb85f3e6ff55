"""Scan a LAMOST data release with a stage on a Dask cluster.

The scan walks release directories (or reads file lists) lazily, cuts the
stream of paths into partitions of ``partition_size`` files and submits them
to a Dask cluster with a bounded number of partitions in flight, so memory
does not grow with the number of files.  On the worker, each partition is:

1. filtered through ``sink.done_paths(paths, model_version)`` (resume: files
   already done with the same model version are skipped),
2. processed by the stage (read -> preprocess -> batched inference), and
3. written in bulk with ``sink.write(scan_id, results)``.

The stage and the sink live once per worker in a :class:`ScanWorkerPlugin`, so
the model is loaded once per worker process, not once per partition.

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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

__all__ = [
    "FITS_SUFFIXES",
    "ResultSink",
    "PartitionSummary",
    "ScanSummary",
    "ScanWorkerPlugin",
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
    """What the scan needs from a result store (e.g. ``catalogue.CatalogueWriter``).

    The object must be picklable: it is shipped once to every worker.
    """

    def start_scan(self, model_version: str | None = None, *, code_version: str | None = None,
                   parameters: dict[str, Any] | None = None) -> Any:
        """Record a new scan (provenance row) and return its id."""

    def done_paths(self, paths: Sequence[str], model_version: str) -> set[str]:
        """Subset of ``paths`` already stored for ``model_version``."""

    def write(self, scan_id: Any, results: Sequence[Any]) -> Any:
        """Store stage results (one transaction, idempotent)."""

    def finish_scan(self, scan_id: Any, counts: dict[str, int] | None = None,
                    status: str = "finished") -> Any:
        """Close the scan's provenance row with its counts, status and end time.

        Counts keys: ``files_seen, files_read, files_classified, files_failed,
        files_skipped``.  A sink may also offer ``update_scan(scan_id, counts)``,
        which the scan then calls every few seconds (progress of a long scan,
        counts survive a killed scan).
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
                 stop_at_new: bool = False, chunk: int = 2000) -> dict[str, int]:
    """What a scan of ``sources`` with ``model_version`` would find, asked in the client.

    Returns ``{"files", "new", "done", "failed"}``: files with no row for that
    model version (``new``), with a result row (``done``) and with an error row
    (``failed``; a resumed scan skips these too).  With ``stop_at_new`` the walk
    stops at the first chunk holding a new file (the "is anything left?" check
    a resumed scan makes before it starts any worker).
    """
    counts = {"files": 0, "new": 0, "done": 0, "failed": 0}
    for part in iter_partitions(iter_paths(sources), chunk):
        done_any = sink.done_paths(part, model_version)
        done_ok = sink.done_paths(part, model_version, include_errors=False) if done_any else set()
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


class ScanWorkerPlugin(_WorkerPlugin):
    """Holds one stage and one sink per Dask worker.

    The stage is built lazily (first task), with :func:`lamost_ostar.stage.load_stage`,
    so the model is loaded once per worker process and never in the client.

    Parameters
    ----------
    stage_name : str
        Entry point name in group ``lamost_ostar.stages`` (or ``"module:attr"``).
    stage_kwargs : dict
        Keyword arguments for the stage constructor.
    sink : ResultSink
        Result store, pickled once to each worker.
    name : str, optional
        Plugin name (unique per scan by default).
    """

    idempotent = False

    def __init__(self, stage_name: str, stage_kwargs: dict[str, Any], sink: Any,
                 name: str | None = None) -> None:
        self.stage_name = stage_name
        self.stage_kwargs = dict(stage_kwargs)
        self.sink = sink
        self.name = name or f"lamost_ostar-scan-{uuid.uuid4().hex[:12]}"
        self._stage = None
        self._lock: threading.Lock | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_stage"] = None
        state["_lock"] = None
        return state

    def setup(self, worker: Any) -> None:  # noqa: D102
        self._lock = threading.Lock()

    def teardown(self, worker: Any) -> None:  # noqa: D102
        self._stage = None

    def get_stage(self, model_version: str | None = None) -> Any:
        """The worker's stage, built on first use (thread-safe).

        With ``model_version``, a stage of another version is replaced by one
        of that version (the scan pins the version resolved by the first stage
        built, so the model is normally loaded once per worker).
        """
        if self._lock is None:
            self._lock = threading.Lock()
        with self._lock:
            stage = self._stage
            if stage is None or (model_version is not None
                                 and getattr(stage, "model_version", None) != model_version):
                from lamost_ostar.stage import load_stage

                kwargs = dict(self.stage_kwargs)
                if model_version is not None:
                    kwargs["model_version"] = model_version
                self._stage = None
                self._stage = load_stage(self.stage_name, **kwargs)
            return self._stage


def _worker_plugin(plugin_name: str) -> ScanWorkerPlugin:
    from distributed import get_worker

    worker = get_worker()
    try:
        return worker.plugins[plugin_name]
    except KeyError:  # pragma: no cover - registration always precedes tasks
        raise RuntimeError(f"worker {worker.address} has no plugin {plugin_name!r}") from None


def stage_info(plugin_name: str) -> dict[str, Any]:
    """Worker task: build the stage and report its model version and device."""
    import sys

    stage = _worker_plugin(plugin_name).get_stage()
    keras = sys.modules.get("keras")  # only if the stage uses Keras
    return {
        "model_version": getattr(stage, "model_version", None),
        "device": getattr(stage, "device_name", None),
        "keras_backend": keras.backend.backend() if keras is not None else None,
    }


def _is_candidate(result: Any, threshold: float) -> bool:
    """A result's O-candidate verdict: its ``is_candidate``, else ``p_o >= threshold``."""
    verdict = getattr(result, "is_candidate", None)
    if verdict is not None:
        return bool(verdict)
    p = getattr(result, "p_o", None)
    return p is not None and p >= threshold


@dataclass
class PartitionSummary:
    """Counts for one partition (or, summed, for a whole scan)."""

    n_files: int = 0
    n_skipped: int = 0
    n_classified: int = 0
    n_errors: int = 0
    n_candidates: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def from_results(cls, n_files: int, n_skipped: int, results: Sequence[Any],
                     threshold: float, seconds: float = 0.0) -> "PartitionSummary":
        """Summarise stage results (objects with ``ok``, ``error_reason``; ``p_o`` optional)."""
        ok = [r for r in results if r.ok]
        reasons = Counter(getattr(r, "error_reason", None) or "unknown"
                          for r in results if not r.ok)
        cands = sum(1 for r in ok if _is_candidate(r, threshold))
        return cls(n_files=n_files, n_skipped=n_skipped, n_classified=len(ok),
                   n_errors=len(results) - len(ok), n_candidates=cands,
                   errors_by_reason=dict(reasons), seconds=seconds)

    def add(self, other: "PartitionSummary") -> None:
        """Accumulate ``other`` into this summary."""
        self.n_files += other.n_files
        self.n_skipped += other.n_skipped
        self.n_classified += other.n_classified
        self.n_errors += other.n_errors
        self.n_candidates += other.n_candidates
        self.seconds += other.seconds
        for k, v in other.errors_by_reason.items():
            self.errors_by_reason[k] = self.errors_by_reason.get(k, 0) + v


def process_partition(paths: list[str], plugin_name: str, scan_id: Any,
                      model_version: str | None, threshold: float) -> PartitionSummary:
    """Worker task: skip done files, run the stage, write the results in bulk.

    Parameters
    ----------
    paths : list of str
        Files of this partition.
    plugin_name : str
        Name of the :class:`ScanWorkerPlugin` registered for this scan.
    scan_id
        Id returned by ``sink.start_scan``.
    model_version : str or None
        Resolved model version (used for the resume check).
    threshold : float
        p(O) threshold, only for the candidate count.

    Returns
    -------
    PartitionSummary
    """
    t0 = time.perf_counter()
    plugin = _worker_plugin(plugin_name)
    stage = plugin.get_stage(model_version)
    sink = plugin.sink
    done = sink.done_paths(paths, model_version) if model_version is not None else set()
    todo = [p for p in paths if p not in done]
    results = stage.process(todo) if todo else []
    if results:
        sink.write(scan_id, results)
    return PartitionSummary.from_results(len(paths), len(paths) - len(todo), results,
                                         threshold, time.perf_counter() - t0)


# --------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------
@dataclass
class ScanSummary:
    """What a scan did, for the terminal and for the provenance row."""

    scan_id: Any
    model_version: str | None
    threshold: float
    totals: PartitionSummary
    elapsed_s: float
    startup_s: float = 0.0
    n_failed_partitions: int = 0
    n_unwritten_files: int = 0
    device: str | None = None
    keras_backend: str | None = None
    n_workers: int = 0
    interrupted: bool = False

    @property
    def rate(self) -> float:
        """Files handled (classified + errors + skipped) per second of wall time."""
        return self.totals.n_files / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def processed_rate(self) -> float:
        """Files read and classified or failed (not skipped) per second of wall time."""
        n = self.totals.n_classified + self.totals.n_errors
        return n / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def steady_rate(self) -> float:
        """Files read and classified or failed per second after start-up
        (cluster start, first model load)."""
        n = self.totals.n_classified + self.totals.n_errors
        dt = self.elapsed_s - self.startup_s
        return n / dt if dt > 0 else 0.0

    def counts(self) -> dict[str, Any]:
        """Counts and summary for the provenance row (``sink.finish_scan``)."""
        return {**_scan_counts(self.totals), "n_candidates": self.totals.n_candidates,
                "threshold": self.threshold,
                "errors_by_reason": dict(self.totals.errors_by_reason),
                "elapsed_s": round(self.elapsed_s, 3),
                "spectra_per_s": round(self.processed_rate, 3),
                "startup_s": round(self.startup_s, 3),
                "failed_partitions": self.n_failed_partitions,
                "unwritten_files": self.n_unwritten_files}

    def format(self) -> str:
        """One-screen, human-readable summary."""
        t = self.totals
        lines = [
            f"scan {self.scan_id}: model {self.model_version} "
            f"({self.keras_backend or 'no Keras'} on {self.device or '?'}, {self.n_workers} "
            f"worker{'' if self.n_workers == 1 else 's'})"
            + ("  [INTERRUPTED]" if self.interrupted else ""),
            f"  files seen          {t.n_files:>10,d}",
            f"  skipped (done)      {t.n_skipped:>10,d}",
            f"  classified          {t.n_classified:>10,d}",
            f"  errors              {t.n_errors:>10,d}",
        ]
        for reason, n in sorted(t.errors_by_reason.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {reason:<18}{n:>10,d}")
        lines += [
            f"  O candidates        {t.n_candidates:>10,d}   (the model's decision; p(O) >= "
            f"{self.threshold:g} for models without one)",
            f"  elapsed             {self.elapsed_s:>10.1f} s   "
            f"(start-up: cluster + model load {self.startup_s:.1f} s)",
            f"  rate                {self.processed_rate:>10.1f} spectra/s read+classified"
            f"  ({self.steady_rate:.1f}/s after start-up; "
            f"{self.rate:.1f} files/s incl. skipped)",
        ]
        if self.n_failed_partitions:
            lines.append(f"  FAILED partitions   {self.n_failed_partitions:>10,d}   "
                         f"({self.n_unwritten_files:,d} files not stored; "
                         "run the scan again to resume)")
        return "\n".join(lines)


def _scan_counts(t: PartitionSummary) -> dict[str, int]:
    return {"files_seen": t.n_files, "files_read": t.n_files - t.n_skipped,
            "files_classified": t.n_classified, "files_failed": t.n_errors,
            "files_skipped": t.n_skipped}


#: Environment of local workers (set before TensorFlow is imported there; a value
#: already in the environment wins): TensorFlow logs no INFO/WARNING lines and
#: Python prints no warnings.  TensorFlow's earliest lines (oneDNN, cudart stub)
#: are printed before its logging is set up, whatever the environment: the
#: workers' stderr goes to the worker log (``worker_log``) for that.
WORKER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}


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
    ``cpu_count / n_workers`` TensorFlow intra-op threads (no over-subscription).

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

    threads = str(max(1, cores // n_workers))
    cluster = LocalCluster(
        n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
        dashboard_address=None, silence_logs=logging.ERROR, memory_limit=memory_limit,
        # no dashboard; the scheduler's HTTP routes (health, metrics) on a free port, so a
        # port 8787 in use elsewhere gives no "Port 8787 is already in use" warning
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        env={**WORKER_ENV, **{k: os.environ[k] for k in WORKER_ENV if k in os.environ},
             "TF_NUM_INTRAOP_THREADS": threads, "TF_NUM_INTEROP_THREADS": "1"},
    )
    client = Client(cluster)
    if worker_log:
        client.register_plugin(_WorkerStderrToFile(os.path.abspath(worker_log)))
    return client, cluster


def _failure_results(paths: Sequence[str], reason: str, message: str,
                     model_version: str | None) -> list[Any]:
    from lamost_ostar.stage import StageResult

    return [StageResult.failure(p, reason, message, model_version) for p in paths]


def run_scan(
    sources: Sequence[str | os.PathLike],
    sink: Any,
    *,
    client: Any = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    stage: str = "ostar",
    model_version: str | None = None,
    models_dir: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 256,
    read_engine: str = "fitsio",
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
    stage : str
        Stage entry point name (group ``lamost_ostar.stages``).
    model_version, models_dir, device, batch_size, read_engine
        Passed to the stage (``read_engine`` only when not the default fitsio); ``model_version=None`` is resolved once on a
        worker and pinned for the whole scan.
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
        stage_kwargs = {"model_version": model_version, "device": device,
                        "batch_size": batch_size}
        if models_dir is not None:
            stage_kwargs["models_dir"] = os.fspath(models_dir)
        if read_engine != "fitsio":
            stage_kwargs["read_engine"] = read_engine
        plugin = ScanWorkerPlugin(stage, stage_kwargs, sink)
        client.register_plugin(plugin, name=plugin.name)

        # Resolve the model version once (builds the stage on one worker) and pin it.
        info = client.submit(stage_info, plugin.name, pure=False).result()
        resolved = info["model_version"]

        parameters = {
            "sources": sources, "stage": stage, "device": device,
            "batch_size": batch_size, "read_engine": read_engine,
            "partition_size": partition_size,
            "threshold": threshold, "scheduler": scheduler or "local",
            "n_workers": n_workers_seen, "threads_per_worker": threads_per_worker,
            "keras_backend": info.get("keras_backend"), "device_used": info.get("device"),
            **(extra_provenance or {}),
        }
        with _interrupts_deferred() as held:  # a scan row is either not there or gets closed
            scan_id = sink.start_scan(model_version=resolved,
                                      code_version=lamost_ostar.code_version(),
                                      parameters=parameters)

        totals = PartitionSummary()
        n_failed = 0
        n_unwritten = 0
        failed_paths: list[str] = []
        pending: dict[Any, list[str]] = {}
        interrupted = False
        t_work = time.perf_counter()
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
                fut = client.submit(process_partition, paths, plugin.name, scan_id, resolved,
                                    threshold, pure=False, retries=1,
                                    key=f"lamost_ostar-part-{scan_id}-{next(index)}")
                pending[fut] = paths
                ac.add(fut)

            for paths in itertools.islice(partitions, max_in_flight):
                submit(paths)
            update = getattr(sink, "update_scan", None)
            last_update = time.monotonic()
            for fut in ac:
                paths = pending[fut]
                if fut.status == "finished":
                    part = fut.result()
                else:
                    part, n_bad = _handle_failed(fut, paths, sink, scan_id, resolved,
                                                 threshold, submit)
                    n_failed += n_bad
                    if n_bad:
                        n_unwritten += len(paths)
                        failed_paths.extend(paths)
                totals.add(part)
                del pending[fut]  # only once counted: an interrupt here loses nothing
                fut.release()
                del fut
                if pbar is not None:
                    if counter is not None and counter.finished and pbar.total is None:
                        pbar.total = counter.count
                    pbar.update(part.n_files)
                    pbar.set_postfix(ok=totals.n_classified, err=totals.n_errors,
                                     skip=totals.n_skipped, refresh=False)
                for nxt in itertools.islice(partitions, 1):
                    submit(nxt)
                if update is not None and time.monotonic() - last_update > update_every_s:
                    update(scan_id, _scan_counts(totals))
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
        with _interrupts_deferred():
            unacked = [p for paths in pending.values() for p in paths] + failed_paths
            totals = _final_totals(sink, scan_id, resolved, totals, unacked, threshold)
            summary = ScanSummary(
                scan_id=scan_id, model_version=resolved, threshold=threshold, totals=totals,
                elapsed_s=time.perf_counter() - t_start, startup_s=t_work - t_start,
                n_failed_partitions=n_failed,
                n_unwritten_files=n_unwritten,
                device=info.get("device"), keras_backend=info.get("keras_backend"),
                n_workers=n_workers_seen, interrupted=interrupted,
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


def _drain(pending: dict[Any, list[str]], totals: PartitionSummary, grace_s: float) -> None:
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
                totals.add(fut.result())
                del pending[fut]
    except KeyboardInterrupt:
        return
    except Exception:  # noqa: BLE001 - the grace period ran out (TimeoutError) or a task failed
        return


def _final_totals(sink: Any, scan_id: Any, model_version: str | None, acked: PartitionSummary,
                  unacked_paths: Sequence[str], threshold: float) -> PartitionSummary:
    """The scan's final counts, from the rows carrying its id when the sink can count them.

    ``acked`` holds what the finished partitions reported; ``unacked_paths``
    are the files of partitions whose end the scan did not see (cancelled on an
    interrupt, or failed), which may still have been written.
    """
    counter = getattr(sink, "scan_counts", None)
    if counter is None:
        return acked
    try:
        rows = counter(scan_id, threshold=threshold)
        extra = 0
        if unacked_paths:
            try:
                extra = len(sink.done_paths(list(unacked_paths), model_version, scan_id=scan_id))
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
        seconds=acked.seconds)


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


def _handle_failed(fut: Any, paths: list[str], sink: Any, scan_id: Any,
                   model_version: str | None, threshold: float, submit: Any) -> tuple[PartitionSummary, int]:
    """A partition task failed.

    When workers died running it (``KilledWorker``: e.g. a segfault in a C
    reader on one malformed file), a multi-file partition is split in two and
    resubmitted, so the culprit is isolated; a single file that still kills
    workers gets an error row ``worker_crash`` so that every file is accounted
    for.  Any other failure (database down, model error) is systemic: the
    partition's files are left unwritten (a later run of the scan resumes
    them) and counted as a failed partition.
    """
    from distributed.scheduler import KilledWorker

    try:
        exc = fut.exception()
    except Exception as err:  # pragma: no cover - e.g. cancelled
        exc = err
    if not isinstance(exc, KilledWorker):
        return PartitionSummary(), 1
    if len(paths) > 1:
        mid = len(paths) // 2
        submit(paths[:mid])
        submit(paths[mid:])
        return PartitionSummary(), 0
    message = f"worker died {type(exc).__name__}: {exc}".splitlines()[0][:500]
    results = _failure_results(paths, "worker_crash", message, model_version)
    sink.write(scan_id, results)
    return PartitionSummary.from_results(len(paths), 0, results, threshold), 0
