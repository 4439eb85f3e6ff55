"""``lamost-ostar plugins``: what readers, stages and sinks are installed.

Examples
--------
::

    lamost-ostar plugins                  # group, name, version, origin distribution
    lamost-ostar plugins --group stages   # one group
"""
from __future__ import annotations

import click

__all__ = ["plugins"]

_GROUPS = {"readers": "lamost_ostar.readers", "stages": "lamost_ostar.stages",
           "sinks": "lamost_ostar.sinks"}


@click.command("plugins")
@click.option("--group", "groups", multiple=True, type=click.Choice(sorted(_GROUPS)),
              help="Only these groups (repeatable) [default: all three].")
def plugins(groups) -> None:
    """List the installed plugins: readers, stages and sinks (entry point groups).

    Each plugin is loaded to read its version; one that cannot be loaded (an
    import error) is listed with a one-line warning and the others still are.
    """
    from lamost_ostar.entrypoints import installed

    wanted = tuple(_GROUPS[g] for g in groups) or tuple(_GROUPS.values())
    infos = installed(wanted)
    rows = [("group", "name", "version", "distribution", "entry point")]
    for i in infos:
        dist = f"{i.distribution} {i.distribution_version}" if i.distribution else "?"
        rows.append((i.group, i.name, i.version or ("BROKEN" if i.error else "-"), dist, i.value))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    for i in infos:
        if i.error:
            click.echo(f"warning: plugin {i.name!r} ({i.group}, {i.value}) cannot be loaded: {i.error}",
                       err=True)
