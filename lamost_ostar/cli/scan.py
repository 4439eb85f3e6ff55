"""``lamost-ostar scan``: classify every spectrum of a release into a catalogue.

Examples
--------
::

    lamost-ostar scan release/ --db catalogue.sqlite
    lamost-ostar scan release/ --db postgresql+psycopg://postgres@127.0.0.1:5432/test
    lamost-ostar scan @files.txt --scheduler tcp://10.0.0.1:8786 --device gpu
    lamost-ostar scan release/ --dry-run            # count the files only

A scan killed at any point and started again skips the files already done with
the same model version, so every file ends up in the catalogue exactly once.
"""
from __future__ import annotations

import os
import sys
import tempfile
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
@click.option("--read-engine", type=click.Choice(["fitsio", "native", "astropy"]),
              default="fitsio", show_default=True,
              help="FITS reader (native: zlib + numpy, about 2x faster on .fits.gz; same records).")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto",
              show_default=True, help="Inference device (auto: GPU if the Keras backend sees one).")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="p(O) of an O candidate (summary only; every result is stored).")
@click.option("--stage", "stage_name", default="ostar", show_default=True,
              help="Stage entry point name (group lamost_ostar.stages).")
@click.option("--max-in-flight", type=click.IntRange(min=1), default=None,
              help="Partitions in flight at once [default: 2 per worker thread].")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar [default: on when stderr is a terminal].")
@click.option("--dry-run", is_flag=True, help="Count files and partitions; classify nothing.")
def scan(paths, db, model_version, models_dir, scheduler, n_workers, threads_per_worker,
         partition_size, batch_size, read_engine, device, threshold, stage_name, max_in_flight, progress,
         dry_run) -> None:
    """Classify every spectrum under PATH... and store the results in a catalogue.

    PATH is a release directory (walked for *.fits and *.fits.gz), a single file,
    or @LIST (a text file with one path per line, relative to the list's folder).
    Every file gets a result row or an error row; files already done with the
    same model version are skipped, so an interrupted scan resumes.
    """
    from lamost_ostar import scan as scanmod

    for p in paths:
        target = p[1:] if p.startswith("@") else p
        if not os.path.exists(target):
            raise click.ClickException(f"no such file or directory: {target}")
    if scheduler and n_workers is not None:
        raise click.ClickException("--workers applies to a local cluster, not with --scheduler")

    if dry_run:
        n = 0
        try:
            for n, _ in enumerate(scanmod.iter_paths(paths), start=1):
                pass
        except OSError as exc:
            raise click.ClickException(_one_line(exc)) from None
        parts = -(-n // partition_size)
        click.echo(f"{n:,d} files in {parts:,d} partitions of <= {partition_size} "
                   f"(dry run: nothing classified, nothing written to {db})")
        return

    if ":" not in stage_name:
        from lamost_ostar.stage import available_stages

        if stage_name not in available_stages():
            known = ", ".join(sorted(available_stages())) or "none"
            raise click.ClickException(f"no stage named {stage_name!r} (registered: {known})")
    if models_dir is None:  # the registry expects the CLI to pass the user directory
        models_dir = os.environ.get("LAMOST_OSTAR_MODELS") or os.path.join(
            os.path.expanduser("~"), ".lamost_ostar", "models")
    sink = _open_catalogue(db)
    if progress is None:
        progress = sys.stderr.isatty()
    worker_log = os.path.join(tempfile.gettempdir(), f"lamost_ostar-scan-workers-{os.getpid()}.log")
    try:
        summary = scanmod.run_scan(
            paths, sink, scheduler=scheduler, n_workers=n_workers,
            threads_per_worker=threads_per_worker, stage=stage_name,
            model_version=model_version, models_dir=models_dir, device=device,
            batch_size=batch_size, read_engine=read_engine, partition_size=partition_size, threshold=threshold,
            max_in_flight=max_in_flight, progress=progress,
            worker_log=None if scheduler else worker_log,
        )
    except click.ClickException:
        raise
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; run the same command again to resume") from None
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        raise click.ClickException(_one_line(exc)) from None
    click.echo(summary.format())
    if not scheduler and os.path.exists(worker_log):
        click.echo(f"  worker log          {worker_log}")
    if summary.interrupted:
        click.echo("interrupted: run the same command again to resume", err=True)
        sys.exit(130)
    if summary.n_failed_partitions:
        sys.exit(1)


def _open_catalogue(db: str) -> Any:
    """The catalogue sink, checked now (bad URL or server -> one-line error)."""
    from lamost_ostar.catalogue import CatalogueWriter

    try:
        sink = CatalogueWriter(db)
        sink.engine  # connect and create the schema now  # noqa: B018
    except Exception as exc:  # noqa: BLE001
        raise click.ClickException(f"cannot open catalogue {db}: {_one_line(exc)}") from None
    return sink
