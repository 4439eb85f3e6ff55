"""``lamost-ostar report``: a static HTML vetting report of the O-star candidates.

Examples
--------
::

    lamost-ostar report --db catalogue.sqlite --out report/            # top 500 candidates
    lamost-ostar report --db catalogue.sqlite --out report/ --limit 50 --include-non-candidates 20
    lamost-ostar report --db postgresql+psycopg://user@host/lamost --out report/ --overwrite
"""
from __future__ import annotations

import click

__all__ = ["report"]


@click.command("report")
@click.option("--db", required=True, envvar="LAMOST_OSTAR_DB", metavar="URL",
              help="Catalogue: a SQLite file path, sqlite:///... or postgresql+psycopg://... URL "
                   "(env LAMOST_OSTAR_DB).")
@click.option("--out", "out", required=True, type=click.Path(), metavar="DIR",
              help="Report folder to write (DIR/index.html is the summary page).")
@click.option("--limit", type=click.IntRange(min=0), default=500, show_default=True, metavar="N",
              help="At most N candidates (the model's decision, best posterior p(O) first).")
@click.option("--include-non-candidates", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="K", help="Also the K highest-p(O) spectra the decision rejected, for comparison.")
@click.option("--model", "model_version", default=None, metavar="VERSION",
              help="Only rows of this model version.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Processes that render the plots.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report at DIR.")
def report(db, out, limit, include_non_candidates, model_version, workers, overwrite):
    """Write a static HTML vetting report of the O-star candidates in a catalogue.

    One page per spectrum (the spectrum re-read from its file, He II / He I / Balmer
    lines marked, zoom panels on the He lines, class probabilities, He II evidence,
    S/N, position, pipeline class, file) and a summary page (p(O) histogram, sky
    positions, counts by pipeline class, a sortable and filterable table).  It opens
    from the disk in any browser: no server, no network.
    """
    from lamost_ostar.report import ReportError, build_report

    try:
        summary = build_report(db, out, limit=limit, include_non_candidates=include_non_candidates,
                               model_version=model_version, overwrite=overwrite, workers=workers)
    except ReportError as exc:
        raise click.ClickException(str(exc)) from None
    bad = len(summary.bad_files)
    more = " (more candidates in the catalogue: raise --limit)" if summary.more_candidates else ""
    click.echo(f"wrote a report of {summary.n_rows} spectra ({summary.n_candidates} candidates{more}, "
               f"{summary.n_non_candidates} non-candidates; {summary.n_plotted} plotted, {bad} file(s) "
               f"not re-readable) to {summary.out / 'index.html'} in {summary.seconds:.1f} s")
