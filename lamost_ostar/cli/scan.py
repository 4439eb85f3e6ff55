"""``lamost-ostar scan``: classify every spectrum of a release into a catalogue.

Examples
--------
::

    lamost-ostar scan release/ --db catalogue.sqlite
    lamost-ostar scan release/ --db postgresql+psycopg://postgres@127.0.0.1:5432/test
    lamost-ostar scan @files.txt --scheduler tcp://10.0.0.1:8786 --device gpu
    lamost-ostar scan release/ --dry-run            # count the files only
    lamost-ostar scan release/ --stage ostar --stage heii_lines    # two stages, one read per file
    lamost-ostar scan release/ --sink parquet --out results/       # a Parquet dataset
    lamost-ostar scan sdss/ --reader sdss --stage heii_lines       # another survey's reader

A scan killed at any point and started again skips the files already done with
the same model version, per stage, so every file ends up in each stage's table
exactly once.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import click

__all__ = ["scan"]


class _OneLineErrors(click.Command):
    """A command whose usage errors print one line (no usage block)."""

    def make_context(self, info_name, args, parent=None, **extra):  # noqa: D102
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.Exit:
            raise
        except click.UsageError as exc:
            err = click.ClickException(f"{exc.format_message()} "
                                       f"(see 'lamost-ostar {info_name} --help')")
            err.exit_code = 2
            raise err from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@click.command("scan", cls=_OneLineErrors)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--db", default="lamost_ostar.sqlite", show_default=True, envvar="LAMOST_OSTAR_DB",
              metavar="URL", help="Catalogue: SQLite file, sqlite:///... or "
                                  "postgresql+psycopg://... URL (env LAMOST_OSTAR_DB).")
@click.option("--model", "model_version", default=None, metavar="VERSION",
              help="Model version [default: newest user version, else the packaged one].")
@click.option("--models-dir", default=None, envvar="LAMOST_OSTAR_MODELS",
              type=click.Path(file_okay=False), help="User model versions directory "
              "(env LAMOST_OSTAR_MODELS, default ~/.lamost_ostar/models).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Address of an existing Dask scheduler [default: a new local cluster].")
@click.option("--workers", "n_workers", type=click.IntRange(min=1), default=None,
              help="Local cluster worker processes [default: CPU cores / threads per worker].")
@click.option("--threads-per-worker", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--partition-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Files per Dask task.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Spectra per inference batch.")
@click.option("--read-engine", type=click.Choice(["native", "fitsio", "astropy"]),
              default="native", show_default=True,
              help="FITS reader (native: zlib + numpy, about 2x faster than cfitsio on .fits.gz, same "
                   "records, any FITS feature it does not decode goes to fitsio; fitsio: cfitsio).")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto",
              show_default=True, help="Inference device (auto: GPU if the Keras backend sees one).")
@click.option("--engine", type=click.Choice(["auto", "keras", "numpy"]), default="auto",
              show_default=True,
              help="Inference engine (numpy: the same model evaluated with numpy on the CPU, no "
                   "TensorFlow in the workers; keras: CPU or GPU; auto: numpy on a worker with no "
                   "GPU device, keras where one may be, or $LAMOST_OSTAR_ENGINE).")
@click.option("--class-veto/--no-class-veto", default=True, show_default=True,
              help="A spectrum the LAMOST pipeline calls GALAXY or QSO is never an O candidate "
                   "(flag 256 class_veto when the rule alone said O); --no-class-veto: the rule alone.")
@click.option("--min-snr-g", type=click.FloatRange(min=0.0), default=None, metavar="S/N",
              help="No spectrum with S/N(g) below this is an O candidate (flag 512 snr_floor when the "
                   "rule alone said O) [default: 3]; 0: no floor.")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="p(O) of an O candidate (summary only; every result is stored).")
@click.option("--stage", "stage_names", multiple=True, metavar="NAME",
              help="Stage entry point name (group lamost_ostar.stages); repeat it to run several "
                   "stages on one read of each file [default: ostar].")
@click.option("--reader", "reader_name", default="lamost", show_default=True, metavar="NAME",
              help="Reader entry point name (group lamost_ostar.readers).")
@click.option("--sink", "sink_name", default="sql", show_default=True, metavar="NAME",
              help="Where the results go: a sink entry point name (group lamost_ostar.sinks): "
                   "sql (the catalogue, --db) or parquet (a folder, --out).")
@click.option("--out", "out", default=None, metavar="TARGET",
              help="The sink's target: a folder for parquet (for sql, overrides --db).")
@click.option("--max-in-flight", type=click.IntRange(min=1), default=None,
              help="Partitions in flight at once [default: 2 per worker thread].")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar [default: on when stderr is a terminal].")
@click.option("--defer-indexes/--no-defer-indexes", default=True, show_default=True,
              help="Write into an empty catalogue table without its query indexes and build them "
                   "once at the end (several times faster writes once it holds millions of rows).")
@click.option("--dry-run", is_flag=True,
              help="Count the files (new, done, failed before) and partitions; classify nothing.")
def scan(paths, db, model_version, models_dir, scheduler, n_workers, threads_per_worker,
         partition_size, batch_size, read_engine, class_veto, min_snr_g, device, engine, threshold,
         stage_names, reader_name, sink_name, out, max_in_flight, progress, defer_indexes,
         dry_run) -> None:
    """Classify every spectrum under PATH... and store the results in a catalogue.

    PATH is a release directory (walked for *.fits and *.fits.gz), a single file,
    or @LIST (a text file with one path per line, relative to the list's folder).
    Every file gets a result row or an error row per stage; files already done
    with the same model version are skipped (per stage), so an interrupted scan
    resumes.  Several --stage options run the stages on one read of each file,
    each into its own table.
    """
    stop = _SignalToInterrupt()
    try:
        with stop:
            _scan(stop, paths, db, model_version, models_dir, scheduler, n_workers,
                  threads_per_worker, partition_size, batch_size, read_engine, device, threshold,
                  list(stage_names) or ["ostar"], max_in_flight, progress, dry_run,
                  reader_name=reader_name, sink_name=sink_name, out=out, class_veto=class_veto,
                  min_snr_g=min_snr_g, engine=engine, defer_indexes=defer_indexes)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before the scan began: no scan row written
        click.echo("interrupted during start-up (nothing scanned): run the same command again",
                   err=True)
        sys.exit(stop.exit_code)


def _scan(stop, paths, db, model_version, models_dir, scheduler, n_workers, threads_per_worker,
          partition_size, batch_size, read_engine, device, threshold, stage_names, max_in_flight,
          progress, dry_run, *, reader_name="lamost", sink_name="sql", out=None,
          class_veto=True, min_snr_g=None, engine="auto", defer_indexes=True) -> None:
    # TensorFlow, should anything import it in this process (e.g. to unpickle a
    # worker's error), keeps its C++ start-up chatter off the terminal
    for key, value in _CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    for p in paths:
        target = p[1:] if p.startswith("@") else p
        if not os.path.exists(target):
            raise click.ClickException(f"no such file or directory: {target}")
    if scheduler and n_workers is not None:
        raise click.ClickException("--workers applies to a local cluster, not with --scheduler")
    local = not scheduler
    if models_dir is None:  # the registry expects the CLI to pass the user directory
        models_dir = os.environ.get("LAMOST_OSTAR_MODELS") or os.path.join(
            os.path.expanduser("~"), ".lamost_ostar", "models")

    # -- checks that need no worker (and no TensorFlow): well under a second
    if len(set(stage_names)) != len(stage_names):
        raise click.ClickException(f"--stage given twice: {', '.join(stage_names)}")
    for name in stage_names:
        _check_stage(name)
    _check_plugin("lamost_ostar.readers", "reader", reader_name)
    _check_plugin("lamost_ostar.sinks", "sink", sink_name)
    if model_version is not None and "ostar" not in stage_names:
        raise click.ClickException("--model is the ostar stage's model version: add --stage ostar")
    versions = {name: _check_model(name, model_version if name == "ostar" else None, models_dir, local)
                for name in stage_names}
    target = out if out is not None else (db if sink_name == "sql" else None)
    if target is None:
        raise click.ClickException(f"--sink {sink_name} needs --out (e.g. a folder)")
    if engine == "numpy" and device == "gpu":
        raise click.ClickException("--engine numpy runs on the CPU: use --engine keras or auto with --device gpu")
    if local and device == "gpu":
        why = _no_gpu_reason()
        if why:
            raise click.ClickException(f"--device gpu: {why} (use --device cpu or auto)")

    if dry_run:
        from lamost_ostar import scan as scanmod

        _dry_run(scanmod, paths, target, versions, partition_size, sink_name)
        return

    sink = _open_sink(sink_name, target)
    from lamost_ostar import scan as scanmod  # imports Dask: after the checks

    if all(v is not None for v in versions.values()):  # a resumed scan with nothing left starts no worker
        lefts = {}
        for name, version in versions.items():
            try:
                lefts[name] = scanmod.survey_paths(paths, sink, version, stop_at_new=True,
                                                   stage=_table_stage(name))
            except OSError as exc:
                raise click.ClickException(_one_line(exc)) from None
            if lefts[name]["new"]:
                break
        if not any(left["new"] for left in lefts.values()):
            left = next(iter(lefts.values()))
            what = "file" if left["files"] == 1 else "files"
            if len(versions) == 1:
                (name, version), = versions.items()
                whose = f"model {version}" if name == "ostar" else f"stage {name} {version}"
                click.echo(f"nothing to do: all {left['files']:,d} {what} already have a row for "
                           f"{whose} in {target} ({left['done']:,d} results, {left['failed']:,d} "
                           "errors); no scan started")
            else:
                each = "; ".join(f"{n} {versions[n]}: {lf['done']:,d} results, {lf['failed']:,d} errors"
                                 for n, lf in lefts.items())
                click.echo(f"nothing to do: all {left['files']:,d} {what} already have a row for every "
                           f"stage in {target} ({each}); no scan started")
            _finish_indexes(sink, [_table_stage(n) for n in versions])
            return
    if progress is None:
        progress = sys.stderr.isatty()
    worker_log = new_worker_log() if local else None
    try:
        with _CStderrTo(worker_log):
            summary = scanmod.run_scan(
                paths, sink, scheduler=scheduler, n_workers=n_workers,
                threads_per_worker=threads_per_worker,
                stage=stage_names[0] if len(stage_names) == 1 else stage_names,
                model_version=({n: v for n, v in versions.items()} if len(stage_names) > 1 else
                               (versions[stage_names[0]] if versions[stage_names[0]] is not None
                                else model_version)),
                reader=reader_name,
                models_dir=models_dir, device=device, engine=engine,
                batch_size=batch_size, read_engine=read_engine, class_veto=class_veto,
                min_snr_g=min_snr_g, partition_size=partition_size, threshold=threshold,
                max_in_flight=max_in_flight, progress=progress,
                worker_log=worker_log, defer_indexes=defer_indexes,
            )
    except (click.ClickException, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        raise click.ClickException(_one_line(exc)) from None
    click.echo(summary.format())
    if worker_log is not None and os.path.exists(worker_log):
        click.echo(f"  worker log          {worker_log}")
    if summary.interrupted:
        click.echo("interrupted: run the same command again to resume", err=True)
        sys.exit(stop.exit_code)
    if summary.n_failed_partitions:
        sys.exit(1)


#: Environment of the client process (a value already set wins).
_CLIENT_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3"}
#: Worker log files kept in the log folder (older ones are removed).
KEEP_WORKER_LOGS = 10
ENV_LOG_DIR = "LAMOST_OSTAR_LOG_DIR"


def log_dir() -> str:
    """Folder of the local workers' log files.

    ``$LAMOST_OSTAR_LOG_DIR``, else ``$XDG_CACHE_HOME/lamost_ostar/logs``
    (``~/.cache/lamost_ostar/logs``).
    """
    env = os.environ.get(ENV_LOG_DIR)
    if env:
        return os.path.expanduser(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "lamost_ostar", "logs")


def new_worker_log(keep: int = KEEP_WORKER_LOGS) -> str | None:
    """Path of a new worker log in :func:`log_dir`; only the ``keep`` newest logs are kept."""
    import glob
    import time

    folder = log_dir()
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return None
    old = sorted(glob.glob(os.path.join(folder, "scan-*.log")), key=_mtime)
    for path in old[:max(0, len(old) - (keep - 1))]:
        try:
            os.remove(path)
        except OSError:
            pass
    return os.path.join(folder, f"scan-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


class _CStderrTo:
    """While active, C-level writes to file descriptor 2 go to ``path``; Python's stderr stays.

    TensorFlow prints its start-up lines (oneDNN, cudart stub) before its own
    logging is set up, so no environment variable silences them; they are
    written straight to descriptor 2.  Python's ``sys.stderr`` (progress bar,
    messages) keeps the terminal through a duplicate of the original
    descriptor; local workers started meanwhile inherit the file.  A no-op
    when ``path`` is None or stderr is not the process's descriptor 2 (e.g.
    under click's CliRunner).
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._saved_fd: int | None = None
        self._saved_stream: Any = None

    def __enter__(self) -> "_CStderrTo":
        if self.path is None:
            return self
        try:
            if sys.stderr.fileno() != 2:
                return self
        except (AttributeError, ValueError, OSError):
            return self
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:
            return self
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        self._saved_stream = sys.stderr
        os.dup2(fd, 2)
        os.close(fd)
        sys.stderr = open(self._saved_fd, "w", buffering=1, closefd=False,
                          encoding=getattr(self._saved_stream, "encoding", None) or "utf-8",
                          errors="backslashreplace")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._saved_fd is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        sys.stderr = self._saved_stream
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        self._saved_fd = None


class _SignalToInterrupt:
    """While active, SIGTERM stops the scan like Ctrl-C; remembers the exit code (128 + signal)."""

    def __init__(self) -> None:
        import signal

        self.exit_code = 128 + signal.SIGINT
        self._old: Any = None

    def _handler(self, signum, _frame):
        self.exit_code = 128 + signum
        raise KeyboardInterrupt

    def __enter__(self) -> "_SignalToInterrupt":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _check_stage(stage_name: str) -> None:
    """The stage is registered (entry points only: nothing is imported)."""
    if ":" in stage_name:
        return
    from importlib.metadata import entry_points

    known = sorted(ep.name for ep in entry_points(group="lamost_ostar.stages"))
    if stage_name not in known:
        raise click.ClickException(f"no stage named {stage_name!r} (registered: {', '.join(known) or 'none'})")


def _check_model(stage_name: str, model_version: str | None, models_dir: str, local: bool) -> str | None:
    """The model version the scan will use, checked from the registry's cards (no Keras import).

    For the ``ostar`` stage on a local cluster: ``--model`` must exist, and
    without it the default version (newest user version, else the newest
    packaged one) is pinned.  On a remote cluster (``--scheduler``) the workers
    resolve the version (their disks may hold other versions), so only an
    explicit ``--model`` is returned.  Other stages: their class's
    ``model_version`` when it is a fixed string.
    """
    if stage_name != "ostar":
        return model_version if model_version is not None else _stage_class_version(stage_name)
    if not local:
        return model_version
    from lamost_ostar.cli.models import default_version, find_version, version_names

    if model_version is not None:
        if find_version(model_version, models_dir) is None:
            held = ", ".join(version_names(models_dir)) or "none"
            raise click.ClickException(f"no model version {model_version!r} in {models_dir} or the "
                                       f"packaged models (available: {held})")
        return model_version
    default = default_version(models_dir)
    if default is None:
        raise click.ClickException(f"no model version found in {models_dir} or the packaged models: "
                                   "train one (lamost-ostar retrain) or pass --models-dir")
    return str(default[1].get("version", default[2].name))


def _stage_class_version(stage_name: str) -> str | None:
    from importlib.metadata import entry_points

    try:
        if ":" in stage_name:
            import importlib

            module, _, attr = stage_name.partition(":")
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        else:
            (ep,) = [e for e in entry_points(group="lamost_ostar.stages") if e.name == stage_name]
            obj = ep.load()
    except Exception:  # noqa: BLE001 - the workers will report it
        return None
    version = getattr(obj, "model_version", None)
    return version if isinstance(version, str) else None


def _no_gpu_reason() -> str | None:
    """Why this machine has no GPU for the workers, or None if it may have one (cheap checks only).

    ``CUDA_VISIBLE_DEVICES`` set to nothing or -1 hides every GPU; otherwise a
    GPU is taken to be present when the kernel lists an NVIDIA or ROCm device
    (:func:`lamost_ostar.stage.gpu_device_present`: ``/proc/driver/nvidia/gpus/*``,
    ``/dev/nvidia0``..., ``/dev/nvidiactl``, ``/dev/kfd``) or ``nvidia-smi -L`` lists
    one.  TensorFlow is not imported: the worker still checks that the Keras backend
    sees the GPU.
    """
    import shutil
    import subprocess

    from lamost_ostar.stage import gpu_device_present

    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU"
    if gpu_device_present():
        return None
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and "GPU" in out.stdout:
                return None
        except (OSError, subprocess.SubprocessError):
            pass
    return "no GPU on this machine (no NVIDIA or ROCm device found)"


def _finish_indexes(sink, stages: list[str]) -> None:
    """Build the query indexes that a scan deferred and did not build (it was killed)."""
    missing = getattr(sink, "missing_indexes", None)
    lacking = [s for s in stages if missing is not None and missing(s)]
    if lacking:
        seconds = sink.build_indexes(lacking)
        click.echo(f"query indexes of {', '.join(lacking)} built in {seconds:.1f} s (a scan that "
                   "deferred them did not finish)")


def _table_stage(stage_ref: str) -> str:
    """The table name a stage writes: its declared ``name``, else its entry point name (or,
    for a ``module:Class`` reference, the class name in lower case)."""
    if stage_ref == "ostar":
        return stage_ref
    try:
        from lamost_ostar.entrypoints import STAGES, load

        name = getattr(load(STAGES, stage_ref), "name", None)
        if isinstance(name, str):
            return name
        if ":" not in stage_ref:
            return stage_ref
    except Exception:  # noqa: BLE001 - the workers will report it
        pass
    from lamost_ostar.scan import _fallback_name

    return _fallback_name(stage_ref)


def _dry_run(scanmod: Any, paths, target: str, versions: dict[str, str | None], partition_size: int,
             sink_name: str = "sql") -> None:
    """Count the files and, with known model versions and an existing sink, what is done."""
    sink = None
    try:
        if any(v is not None for v in versions.values()):
            sink = _existing_sink(sink_name, target)
        counts = {}
        n_files = None
        for name, version in versions.items():
            if sink is not None and version is not None:
                counts[name] = scanmod.survey_paths(paths, sink, version, stage=_table_stage(name))
            else:
                if n_files is None:
                    n_files = sum(1 for _ in scanmod.iter_paths(paths))
                counts[name] = {"files": n_files, "new": n_files, "done": 0, "failed": 0}
    except OSError as exc:
        raise click.ClickException(_one_line(exc)) from None
    finally:
        close = getattr(sink, "close", None)
        if close is not None:
            close()
    new = 0
    for name, c in counts.items():
        version = versions[name]
        if version is None:
            where = ("model version resolved by the workers: pass --model to count the files done"
                     if name == "ostar" else f"stage {name} (version resolved by the workers)")
        else:
            where = f"model {version}" if name == "ostar" else f"stage {name} {version}"
        click.echo(f"{c['files']:,d} files: {c['new']:,d} new, {c['done']:,d} done, {c['failed']:,d} "
                   f"failed before (error row; not retried) for {where}")
        new = max(new, c["new"])
    parts = -(-new // partition_size)
    click.echo(f"{parts:,d} partitions of <= {partition_size} to classify "
               f"(dry run: nothing classified, nothing written to {target})")


def _existing_sink(sink_name: str, target: str) -> Any:
    """The sink at ``target`` when it already holds something, else None (every file is new)."""
    if sink_name == "sql":
        from lamost_ostar.catalogue import Catalogue, CatalogueError

        try:
            cat = Catalogue(target, create=False)
            cat.engine  # noqa: B018 - an absent file or schema: every file is new
            return cat
        except CatalogueError:
            return None
        except Exception as exc:  # noqa: BLE001
            raise click.ClickException(f"cannot open catalogue {target}: {_one_line(exc)}") from None
    if "://" not in target and not os.path.exists(target):
        return None
    return _open_sink(sink_name, target)


def _check_plugin(group: str, kind: str, name: str) -> None:
    """A reader or sink is registered (entry points only: nothing is imported)."""
    if ":" in name:
        return
    from lamost_ostar.entrypoints import names

    known = names(group)
    if name not in known:
        raise click.ClickException(f"no {kind} named {name!r} (registered: {', '.join(known) or 'none'})")


def _open_sink(sink_name: str, target: str) -> Any:
    """The sink, checked now (bad URL, server or folder -> one-line error)."""
    if sink_name == "sql":
        return _open_catalogue(target)
    from lamost_ostar.entrypoints import SINKS, load

    try:
        sink = load(SINKS, sink_name)(target)
    except Exception as exc:  # noqa: BLE001
        raise click.ClickException(f"cannot open sink {sink_name} at {target}: {_one_line(exc)}") from None
    return sink


def _open_catalogue(db: str) -> Any:
    """The catalogue sink, checked now (bad URL or server -> one-line error)."""
    from lamost_ostar.catalogue import CatalogueWriter

    from lamost_ostar.catalogue import CatalogueError

    try:
        sink = CatalogueWriter(db)
        sink.engine  # connect and create the schema now  # noqa: B018
    except CatalogueError as exc:
        raise click.ClickException(f"cannot open catalogue {db}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # noqa: BLE001
        raise click.ClickException(f"cannot open catalogue {db}: {_one_line(exc)}") from None
    return sink
