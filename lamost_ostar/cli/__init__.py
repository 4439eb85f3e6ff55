"""Command line interface: ``lamost-ostar``.

Each command lives in its own module and is imported only when it is run, so
``lamost-ostar --help`` stays fast and one command's heavy imports (TensorFlow,
Dask) never slow down another.
"""
from __future__ import annotations

import importlib

import click

#: command name -> "module:attribute" (relative to this package)
COMMANDS: dict[str, str] = {
    "mock": "mock:mock",
    "scan": "scan:scan",
    "query": "query:query",
    "models": "models:models",
    "retrain": "models:retrain",
    "evaluate": "models:evaluate",
    "plugins": "plugins:plugins",
    "report": "report:report",
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        module = importlib.import_module(f"{__name__}.{module_name}")
        return getattr(module, attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="lamost_ostar")
def main() -> None:
    """Find O-type stars in LAMOST low-resolution spectra."""


__all__ = ["main", "COMMANDS"]
