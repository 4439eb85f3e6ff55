"""``lamost-ostar query``: select O-star candidates (or any results) from a catalogue.

Examples
--------
::

    lamost-ostar query --db catalogue.sqlite                       # the model's O candidates
    lamost-ostar query --db catalogue.sqlite --min-p-o 0.9 --cone 83.8 -5.4 2 -o orion.fits
    lamost-ostar query --db catalogue.sqlite --min-heii-sigma 3 --min-posterior 0.01
    lamost-ostar query --db catalogue.sqlite --not-candidates --min-p-o 0.99   # what the rule rejected
    lamost-ostar query --db postgresql+psycopg://user@host/db --all --scan 3 -o all.csv
    lamost-ostar query --db catalogue.sqlite --scans                 # scan provenance
    lamost-ostar query --db catalogue.sqlite --stages                # stages, versions, row counts
    lamost-ostar query --db catalogue.sqlite --with heii_lines --where "heii_lines.heii_sigma > 3"
    lamost-ostar query --db catalogue.sqlite --stage heii_lines --where "o_star_like = true"
"""
from __future__ import annotations

import io
import itertools
from pathlib import Path

import click

__all__ = ["query", "infer_format", "EXTENSIONS"]

#: file name ending -> output format
EXTENSIONS: dict[str, str] = {
    ".csv": "csv", ".fits": "fits", ".fit": "fits", ".fts": "fits", ".fits.gz": "fits",
    ".vot": "votable", ".votable": "votable", ".xml": "votable", ".ecsv": "ecsv",
    ".txt": "table", ".dat": "table",
}
#: output format -> astropy Table.write format
_ASTROPY_FORMAT = {"csv": "ascii.csv", "fits": "fits", "votable": "votable", "ecsv": "ascii.ecsv"}
#: columns shown on the terminal (files get every column)
_TERMINAL_COLUMNS = ("obsid", "designation", "ra", "dec", "predicted_class", "is_candidate", "p_o",
                     "posterior_o", "heii_sigma", "snr_g", "pipeline_class", "pipeline_subclass",
                     "model_version", "dist", "path")
_TERMINAL_SCAN_COLUMNS = ("id", "status", "started", "finished", "model_version", "code_version",
                          "host", "files_seen", "files_classified", "files_failed", "files_skipped",
                          "result_rows", "error_rows")
_FORMATS = {"p_o": "{:.4f}", "ra": "{:.5f}", "dec": "{:.5f}", "snr_g": "{:.1f}", "dist": "{:.4f}"}


def infer_format(path: str) -> str | None:
    """Output format implied by a file name's extension, or None."""
    name = path.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return EXTENSIONS[ext]
    return None


def _terminal_text(table, columns) -> str:
    shown = table[[c for c in columns if c in table.colnames]]
    for name, fmt in _FORMATS.items():
        if name in shown.colnames:
            shown[name].format = fmt
    return "\n".join(shown.pformat(max_lines=-1, max_width=-1))


def _stream_csv(chunks, output: str | None, overwrite: bool) -> int:
    """Write Tables as one CSV (header once) to ``output`` or stdout; return the row count."""
    if output is not None and Path(output).exists() and not overwrite:
        raise click.ClickException(f"{output} exists (use --overwrite to replace it)")
    chunks = iter(chunks)
    first = next(chunks)  # bad selections raise here, before any file is created
    n = 0
    sink = open(output, "w", newline="") if output is not None else None
    try:
        for k, table in enumerate(itertools.chain([first], chunks)):
            buf = io.StringIO()
            table.write(buf, format="ascii.csv")
            text = buf.getvalue()
            if k:  # header only once
                text = text.split("\n", 1)[1] if "\n" in text else ""
            if text and not text.endswith("\n"):
                text += "\n"
            if sink is not None:
                sink.write(text)
            else:
                click.echo(text, nl=False)
            n += len(table)
    finally:
        if sink is not None:
            sink.close()
    return n


def _stdout_is_terminal() -> bool:
    stream = click.get_binary_stream("stdout")
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _emit(table, fmt: str, output: str | None, overwrite: bool, terminal_columns) -> None:
    if output is None:
        if fmt == "table":
            click.echo(_terminal_text(table, terminal_columns))
        elif fmt in ("fits", "votable"):
            # astropy writes these as bytes: build them in memory, then send the bytes
            if fmt == "fits" and _stdout_is_terminal():
                raise click.UsageError("FITS is binary: use --output FILE, or redirect stdout "
                                       "(e.g. > out.fits)")
            buf = io.BytesIO()
            table.write(buf, format=_ASTROPY_FORMAT[fmt])
            out = click.get_binary_stream("stdout")
            out.write(buf.getvalue())
            out.flush()
        else:
            buf = io.StringIO()
            table.write(buf, format=_ASTROPY_FORMAT[fmt])
            click.echo(buf.getvalue().rstrip("\n"))
        return
    path = Path(output)
    if path.exists() and not overwrite:
        raise click.ClickException(f"{output} exists (use --overwrite to replace it)")
    if fmt == "table":
        path.write_text(_terminal_text(table, table.colnames) + "\n")
    else:
        table.write(path, format=_ASTROPY_FORMAT[fmt], overwrite=overwrite)


def _check_selection(cat, classes: list[str], scan_id: int | None, model_version: str | None,
                     stage: str = "ostar") -> None:
    """Refuse a selection that names a class, scan or model the catalogue cannot hold.

    An unknown class is an error; an unknown scan id or model version says
    which ones the catalogue holds (rather than quietly giving 0 rows).
    """
    import sqlalchemy as sa

    from lamost_ostar.catalogue import CLASS_COLUMNS, metadata

    results, errors, scans = (metadata.tables[t] for t in ("results", "errors", "scans"))
    with cat.engine.connect() as conn:
        if any(c not in CLASS_COLUMNS for c in classes):  # a plugin stage may store others
            stored = {c for c in conn.execute(sa.select(results.c.predicted_class).distinct()).scalars()
                      if c}
            known = list(CLASS_COLUMNS) + sorted(stored - set(CLASS_COLUMNS))
            unknown = [c for c in classes if c not in known]
            if unknown:
                err = click.ClickException(f"--class: unknown class {', '.join(map(repr, unknown))} "
                                           f"(classes: {', '.join(known)})")
                err.exit_code = 2
                raise err
        if scan_id is not None:
            ids = list(conn.execute(sa.select(scans.c.id).order_by(scans.c.id)).scalars())
            if scan_id not in ids:
                held = ", ".join(map(str, ids)) if ids else "none"
                raise click.ClickException(f"no scan {scan_id} in this catalogue (scans: {held}; "
                                           "see --scans)")
        if model_version is not None and stage != "ostar":
            versions = set(cat.model_versions(stage))
            if model_version not in versions:
                held = ", ".join(sorted(versions)) if versions else "none"
                raise click.ClickException(f"no model version {model_version!r} of stage {stage} in "
                                           f"this catalogue (model versions: {held})")
        elif model_version is not None:
            versions: set[str] = set()
            for t in (scans, results, errors):  # the scans table answers almost always
                versions.update(v for v in conn.execute(sa.select(t.c.model_version).distinct()).scalars()
                                if v)
                if model_version in versions:
                    break
            if model_version not in versions:
                held = ", ".join(sorted(versions)) if versions else "none"
                raise click.ClickException(f"no model version {model_version!r} in this catalogue "
                                           f"(model versions: {held})")


@click.command("query")
@click.option("--db", required=True, envvar="LAMOST_OSTAR_DB", metavar="URL",
              help="Catalogue: a SQLite file path, sqlite:///... or postgresql+psycopg://... URL "
                   "(env LAMOST_OSTAR_DB).")
@click.option("--min-p-o", type=float, default=None, metavar="P",
              help="Minimum (balanced) p(O).  Without any of --min-p-o/--min-posterior/"
                   "--min-heii-sigma/--all the rows are the model's O candidates (is_candidate).")
@click.option("--min-posterior", type=float, default=None, metavar="P",
              help="Minimum p(O) at the survey prior (posterior_o).")
@click.option("--min-heii-sigma", type=float, default=None, metavar="Z",
              help="Minimum He II absorption significance (heii_sigma).")
@click.option("--candidates/--not-candidates", "candidates", default=None,
              help="Only the model's O candidates / only the other rows (default: candidates unless "
                   "another p(O), posterior or He II selection or --all is given).")
@click.option("--class", "classes", multiple=True, metavar="CLASS",
              help="Predicted class(es) to keep, e.g. O or O,B (repeatable).")
@click.option("--cone", nargs=3, type=float, default=None, metavar="RA DEC RADIUS",
              help="Cone search, all in degrees; adds a 'dist' column.")
@click.option("--snr-min", type=float, default=None, help="Minimum S/N (band --snr-band).")
@click.option("--snr-max", type=float, default=None, help="Maximum S/N (band --snr-band).")
@click.option("--snr-band", type=click.Choice(["g", "r", "i"]), default="g", show_default=True,
              help="Band of the S/N range.")
@click.option("--scan", "scan_id", type=int, default=None, metavar="ID", help="Rows of this scan.")
@click.option("--model", "model_version", default=None, metavar="VERSION",
              help="Rows of this model version.")
@click.option("--sort", default=None, metavar="COLUMN",
              help="Sort column, also NAME.column of a joined stage (p_*/snr_* descending, others "
                   "ascending by default) [default: p_o for ostar, else row order].")
@click.option("--ascending/--descending", "ascending", default=None,
              help="Override the sort direction.")
@click.option("--limit", type=click.IntRange(min=0), default=None, metavar="N", help="At most N rows.")
@click.option("--all", "all_rows", is_flag=True, help="Every result row, not only candidates.")
@click.option("--output", "-o", default=None, metavar="FILE",
              help="Write to FILE (format from the extension: .csv .fits .vot/.xml .ecsv .txt).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "fits", "votable", "ecsv"]),
              default=None, help="Output format [default: from --output, else a terminal table].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--scans", "list_scans", is_flag=True,
              help="List the scans (provenance and counts) instead of results.")
@click.option("--errors", "list_errors", is_flag=True,
              help="List the error rows (unreadable files and reasons) instead of results.")
@click.option("--stage", "stage", default="ostar", show_default=True, metavar="NAME",
              help="Query this stage's results (e.g. heii_lines; see --stages).  Only ostar has "
                   "O candidates: other stages give every row, selected with --where.")
@click.option("--with", "joins", multiple=True, metavar="NAME[@VERSION]",
              help="Join another stage's results on the file (columns NAME.column); repeatable.")
@click.option("--where", "wheres", multiple=True, metavar="EXPR",
              help="Keep rows where EXPR holds, e.g. \"heii_lines.heii_sigma > 3\" or "
                   "\"snr_g >= 10 AND predicted_class = 'O'\" (COLUMN OP VALUE, OP one of "
                   "< <= > >= = !=, or COLUMN IS [NOT] NULL; joined by AND; repeatable).  A "
                   "NAME.column of another stage joins it.")
@click.option("--all-versions", is_flag=True,
              help="Return rows of every model version when the stage holds several (a file "
                   "then has a row per version) [default: refuse and list the versions].")
@click.option("--stages", "list_stages", is_flag=True,
              help="List the stages the catalogue holds, with their model versions and row counts.")
def query(db, min_p_o, min_posterior, min_heii_sigma, candidates, classes, cone, snr_min, snr_max, snr_band,
          scan_id, model_version, sort, ascending, limit, all_rows, output, fmt, overwrite, list_scans,
          list_errors, stage, joins, wheres, all_versions, list_stages):
    """Select O-star candidates (or every result with --all) from a catalogue.

    Prints a table on the terminal, or writes CSV, FITS, VOTable or ECSV files
    that open in TOPCAT, pandas and astropy.  --stage, --with and --where reach
    the other stages' results (one table per stage).
    """
    import sqlalchemy.exc

    from lamost_ostar.catalogue import Catalogue, CatalogueError

    if fmt is None:
        if output is None:
            fmt = "table"
        else:
            fmt = infer_format(output)
            if fmt is None:
                raise click.UsageError(f"cannot tell the format of {output!r} from its extension; "
                                       "use --format csv|fits|votable|ecsv|table")
    for value, hint in ((min_p_o, "'--min-p-o'"), (min_posterior, "'--min-posterior'")):
        if value is not None and not 0.0 <= value <= 1.0:
            raise click.BadParameter(f"{value:g} is not in [0, 1]", param_hint=hint)
    if cone is not None:
        ra, dec, radius = cone
        if not -90.0 <= dec <= 90.0:
            raise click.BadParameter(f"Dec {dec:g} is outside [-90, 90]", param_hint="'--cone'")
        if not 0.0 < radius <= 180.0:
            raise click.BadParameter(f"radius {radius:g} must be in (0, 180] degrees",
                                     param_hint="'--cone'")
    class_list = [c.strip().upper() for item in classes for c in item.split(",") if c.strip()]
    if stage != "ostar":
        used = [name for name, v in (("--min-p-o", min_p_o), ("--min-posterior", min_posterior),
                                     ("--min-heii-sigma", min_heii_sigma), ("--class", class_list or None),
                                     ("--candidates/--not-candidates", candidates)) if v is not None]
        if used:
            raise click.UsageError(f"{', '.join(used)} select the ostar stage's results; for stage "
                                   f"{stage} use --where (e.g. --where \"heii_sigma > 3\")")
    if sort is None:
        sort = "p_o" if stage == "ostar" else None

    n_rows = None
    cat = None
    try:
        cat = Catalogue(db, create=False)
        if stage not in cat.stage_names() and not (list_scans or list_errors or list_stages):
            raise click.ClickException(f"no results of stage {stage!r} in this catalogue "
                                       f"(stages: {', '.join(cat.stage_names())}; see --stages)")
        _check_selection(cat, class_list, scan_id, model_version, stage)
        if list_stages:
            table = cat.stages()
            cols = [c for c in table.colnames if c != "outputs"]
        elif list_scans:
            table, cols = cat.scans(), _TERMINAL_SCAN_COLUMNS
        elif list_errors:
            table = cat.errors(scan_id=scan_id, model_version=model_version, limit=limit,
                               stage=None if stage == "ostar" else stage)
            cols = table.colnames
        else:
            if model_version is None and scan_id is None and not all_versions:
                _refuse_ambiguous(cat, stage)
            common = dict(cone=cone, snr_min=snr_min, snr_max=snr_max, snr_band=snr_band,
                          scan_id=scan_id, model_version=model_version, sort=sort,
                          descending=None if ascending is None else not ascending, limit=limit,
                          join=list(joins), where=list(wheres))
            cols = _terminal_columns(cat, stage, joins, wheres)
            if cat.missing_indexes(stage):
                click.echo(f"note: the {stage} table's query indexes are not built yet (a scan writing "
                           "into it defers them to its end, or one that did not finish; `lamost-ostar "
                           "scan` of the same files builds them): this query reads the whole table",
                           err=True)
        if not (list_stages or list_scans or list_errors) and stage != "ostar":
            if fmt == "csv":
                n_rows = _stream_csv(cat.iter_query_stage(stage, **common), output, overwrite)
            else:
                table = cat.query_stage(stage, **common)
        elif list_stages or list_scans or list_errors:
            pass
        else:
            selection = dict(min_p_o=min_p_o, predicted_class=class_list or None,
                             all_rows=all_rows, candidates=candidates,
                             min_posterior=min_posterior, min_heii_sigma=min_heii_sigma, **common)
            if fmt == "csv":  # streamed: memory stays bounded for any catalogue size
                n_rows = _stream_csv(cat.iter_query(**selection), output, overwrite)
            else:
                table = cat.query(**selection)
        if n_rows is None:
            n_rows = len(table)
            _emit(table, fmt, output, overwrite, cols)
    except CatalogueError as exc:
        raise click.ClickException(str(exc)) from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        lines = str(orig).strip().splitlines()
        raise click.ClickException(f"database error: {lines[0] if lines else type(orig).__name__}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        if cat is not None:
            cat.close()
    if output is not None:
        what = "scans" if list_scans else ("errors" if list_errors else
                                           ("stages" if list_stages else "rows"))
        click.echo(f"wrote {n_rows} {what} to {output} ({fmt})", err=True)
    elif fmt == "table" and not (list_scans or list_errors or list_stages):
        scope = (_scope(all_rows, candidates, min_p_o, min_posterior, min_heii_sigma) if stage == "ostar"
                 else f"stage {stage}: every result")
        if wheres:
            scope += ", where " + " AND ".join(wheres)
        click.echo(f"{n_rows} rows ({scope})", err=True)


def _refuse_ambiguous(cat, stage: str) -> None:
    """Refuse a selection over rows of several model versions of one stage (a file would
    come once per version): say which versions the catalogue holds."""
    held = cat.model_versions(stage)
    if len(held) > 1:
        listing = ", ".join(f"{v} ({n:,d} rows)" for v, n in sorted(held.items()))
        err = click.ClickException(
            f"stage {stage} holds results of {len(held)} model versions: {listing}; choose one with "
            "--model VERSION (or --scan ID), or pass --all-versions for every row")
        err.exit_code = 2
        raise err


def _terminal_columns(cat, stage: str, joins, wheres) -> list[str]:
    """Columns shown on the terminal: the stage's usual ones, then the joined stages' key outputs
    and every column a --where names."""
    from lamost_ostar.catalogue import _where_stages

    if stage == "ostar":
        cols = list(_TERMINAL_COLUMNS)
    else:
        outs = cat.stage_outputs(stage)
        key = [o.name for o in outs if o.index or o.summary] or [o.name for o in outs[:6]]
        cols = ["obsid", "designation", "ra", "dec", *key, "snr_g", "model_version", "dist", "path"]
    others = [j.partition("@")[0] for j in joins]
    for text in wheres:
        others += sorted(_where_stages(text))
    for other in dict.fromkeys(o for o in others if o != stage):
        try:
            outs = cat.stage_outputs(other)
        except Exception:  # noqa: BLE001 - the query itself reports an unknown stage
            continue
        key = [o.name for o in outs if o.index or o.summary] or [o.name for o in outs[:4]]
        cols[-2:-2] = [f"{other}.{k}" for k in key]
    import re

    for text in wheres:
        for name in re.findall(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?", text):
            if name not in cols and name.lower() not in ("and", "is", "not", "null", "true", "false"):
                cols.insert(len(cols) - 2, name)
    return cols


def _scope(all_rows, candidates, min_p_o, min_posterior, min_heii_sigma) -> str:
    """Words for what a result selection holds."""
    cuts = [f"{name} >= {v:g}" for name, v in (("p_o", min_p_o), ("posterior_o", min_posterior),
                                                ("heii_sigma", min_heii_sigma)) if v is not None]
    if candidates is None and not (all_rows or cuts):
        candidates = True
    head = {True: ["O candidates (the model's decision)"], False: ["not candidates"], None: []}[candidates]
    parts = head + cuts
    return ", ".join(parts) if parts else "all results"
