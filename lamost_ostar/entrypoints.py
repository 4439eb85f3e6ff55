"""The three plugin points of :mod:`lamost_ostar`, found by entry point only.

==========================  ===================================================
group                       what a plugin of the group is
==========================  ===================================================
``lamost_ostar.readers``    a class with ``name``, ``version`` and
                            ``read(path) -> lamost_ostar.io.Spectrum`` raising
                            :class:`lamost_ostar.io.ReadError` subclasses for
                            bad files (this package: ``lamost``)
``lamost_ostar.stages``     a stage: ``name``, ``version``, ``outputs``,
                            ``model_version``, ``process(items)`` (see
                            :mod:`lamost_ostar.stage`; this package: ``ostar``,
                            ``heii_lines``)
``lamost_ostar.sinks``      a result store, built as ``Sink(target)`` (see
                            :class:`lamost_ostar.scan.ResultSink`; this
                            package: ``sql``, ``parquet``)
==========================  ===================================================

The core never imports a plugin module by name: it lists the groups with
:func:`importlib.metadata.entry_points` and loads the one it is asked for.
Listing a group imports nothing, so a broken plugin (an import error) only
fails when it is loaded, and :func:`installed` reports it as one line without
stopping the others.

This module imports nothing from the package: every other module may use it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

__all__ = ["READERS", "STAGES", "SINKS", "GROUPS", "PluginInfo", "names", "find", "load",
           "load_object", "installed"]

#: Entry point group of readers (file format -> Spectrum records).
READERS = "lamost_ostar.readers"
#: Entry point group of stages (batch of spectra -> results).
STAGES = "lamost_ostar.stages"
#: Entry point group of sinks (results -> somewhere).
SINKS = "lamost_ostar.sinks"
#: The plugin groups, in pipeline order.
GROUPS: tuple[str, ...] = (READERS, STAGES, SINKS)

_KIND = {READERS: "reader", STAGES: "stage", SINKS: "sink"}


def _eps(group: str) -> list[EntryPoint]:
    return sorted(entry_points(group=group), key=lambda ep: ep.name)


def names(group: str) -> list[str]:
    """Names registered in ``group`` (nothing is imported)."""
    return [ep.name for ep in _eps(group)]


def find(group: str, name: str) -> EntryPoint:
    """The entry point ``name`` of ``group``.

    Raises
    ------
    LookupError
        No such name; the message lists the registered ones.
    """
    for ep in _eps(group):
        if ep.name == name:
            return ep
    known = ", ".join(names(group)) or "none"
    raise LookupError(f"no {_KIND.get(group, 'plugin')} named {name!r} in entry point group "
                      f"{group!r} (registered: {known})")


def load_object(ref: str) -> Any:
    """The object named by ``"package.module:attribute"`` (a plugin under development)."""
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        if part:
            obj = getattr(obj, part)
    return obj


def load(group: str, name: str) -> Any:
    """Load the class (or factory) registered as ``name`` in ``group``.

    ``name`` may also be a ``"package.module:attribute"`` reference, for a plugin
    that is not installed yet.
    """
    if ":" in name:
        return load_object(name)
    return find(group, name).load()


@dataclass
class PluginInfo:
    """One installed plugin, as ``lamost-ostar plugins`` lists it."""

    group: str
    name: str
    value: str
    version: str | None
    distribution: str | None
    distribution_version: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the plugin could be loaded."""
        return self.error is None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def installed(groups: tuple[str, ...] = GROUPS) -> list[PluginInfo]:
    """Every plugin of ``groups``, loaded to read its ``version``.

    A plugin that cannot be loaded (import error, missing attribute) is listed
    with ``error`` set to one line; the others are loaded regardless.
    """
    out: list[PluginInfo] = []
    for group in groups:
        for ep in _eps(group):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(group=group, name=ep.name, value=ep.value, version=None,
                              distribution=getattr(dist, "name", None) if dist else None,
                              distribution_version=getattr(dist, "version", None) if dist else None)
            try:
                obj = ep.load()
                version = getattr(obj, "version", None)
                info.version = version if isinstance(version, str) else None
            except Exception as exc:  # noqa: BLE001 - one broken plugin must not hide the others
                info.error = _one_line(exc)
            out.append(info)
    return out
