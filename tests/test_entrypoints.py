"""Plugin points (lamost_ostar/entrypoints.py, ``lamost-ostar plugins``): every console script and
entry point of the package loads, a broken plugin is one warning, readers follow the protocol."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest
from click.testing import CliRunner

from lamost_ostar import entrypoints
from lamost_ostar.cli import COMMANDS, main
from lamost_ostar.io import LamostReader, ReadError, Spectrum, load_reader
from lamost_ostar.stage import read_items

DATA = Path(__file__).resolve().parent / "data"


def test_every_entry_point_and_console_script_of_the_package_loads():
    eps = list(distribution("lamost_ostar").entry_points)
    groups = {ep.group for ep in eps}
    assert {"console_scripts", *entrypoints.GROUPS} <= groups
    for ep in eps:
        obj = ep.load()
        assert obj is not None, ep
        if ep.group == "console_scripts":
            res = CliRunner().invoke(obj, ["--help"])
            assert res.exit_code == 0, (ep, res.output)
        elif ep.group != "console_scripts":
            assert isinstance(getattr(obj, "version", None), str), ep    # every plugin says its version
            assert getattr(obj, "name", ep.name) == ep.name, ep
    for name in COMMANDS:                     # every sub-command of the console script
        res = CliRunner().invoke(main, [name, "--help"])
        assert res.exit_code == 0, (name, res.output)
    names = {(ep.group, ep.name) for ep in eps}
    assert {("lamost_ostar.readers", "lamost"), ("lamost_ostar.stages", "ostar"),
            ("lamost_ostar.stages", "heii_lines"), ("lamost_ostar.sinks", "sql"),
            ("lamost_ostar.sinks", "parquet")} <= names


def test_no_generic_top_level_package_is_installed():
    """The plugins import as lamost_ostar_plugins; nothing called ``plugins`` is installed
    (the wheel's contents are checked in test_packaging)."""
    import subprocess
    import sys
    import tempfile

    # from a folder outside the clone (inside it, the plugins/ folder itself is on sys.path)
    code = ("import importlib.util as u; print(u.find_spec('plugins') is None, "
            "u.find_spec('lamost_ostar_plugins.heii_lines') is not None)")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True,
                             timeout=60)
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr


def test_core_never_imports_plugin_modules():
    """No module of lamost_ostar names lamost_ostar_plugins: the core finds plugins by entry point."""
    import re

    core = Path(__file__).resolve().parents[1] / "lamost_ostar"
    pattern = re.compile(r"^\s*(from|import)\s+lamost_ostar_plugins|import_module\(['\"]lamost_ostar_plugins",
                         re.M)
    offenders = [str(p) for p in core.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_plugins_command_lists_and_survives_a_broken_plugin(tmp_path):
    """A plugin whose module does not import: one warning line, the others are listed."""
    site = tmp_path / "site"
    dist = site / "broken_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lamost_ostar.stages]\nbroken = no_such_module_xyz:Stage\n")
    code = ("import sys; sys.path.insert(0, %r); from lamost_ostar.cli import main; "
            "main(['plugins'])" % str(site))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for group, name, version in (("lamost_ostar.readers", "lamost", "lamost-1"),
                                 ("lamost_ostar.stages", "ostar", "ostar-2"),
                                 ("lamost_ostar.stages", "heii_lines", "heii_lines-2"),
                                 ("lamost_ostar.sinks", "sql", "sql-1"),
                                 ("lamost_ostar.sinks", "parquet", "parquet-1")):
        line = next(ln for ln in out.splitlines() if f"  {name} " in ln and ln.startswith(group))
        assert version in line and "lamost_ostar 0.1.0" in line, line
    assert "broken" in out and "broken-plugin 0.1" in out and "BROKEN" in out
    warnings = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: plugin 'broken'")
    assert "ModuleNotFoundError" in warnings[0]


def test_lamost_reader_protocol_and_read_items_with_a_reader():
    reader = load_reader("lamost", engine="native", unused_option=1)
    assert isinstance(reader, LamostReader) and reader.name == "lamost" and reader.version
    sp = reader.read(DATA / "io_image_dr7.fits")
    assert isinstance(sp, Spectrum) and sp.layout == "image"
    with pytest.raises(ReadError) as err:
        reader.read(DATA / "io_truncated.fits")
    assert err.value.reason == "truncated"
    names = ["io_image_dr7.fits", "io_not_fits.fits", "io_coadd_dr9.fits.gz", "io_empty.fits"]
    items = [str(DATA / n) for n in names]
    by_reader = read_items(items, reader="lamost")
    by_engine = read_items(items)
    assert by_reader[1] == by_engine[1] == [0, 2]
    assert {k: v[1] for k, v in by_reader[2].items()} == {1: "not_fits", 3: "empty"} == \
        {k: v[1] for k, v in by_engine[2].items()}

    class Buggy:
        name, version = "buggy", "buggy-1"

        def read(self, path):
            raise ZeroDivisionError("oops")

    _, _, failed = read_items(items[:1], reader=Buggy())
    assert failed[0][1] == "read_failed" and "ZeroDivisionError: oops" in failed[0][2]
    with pytest.raises(LookupError, match="no reader named 'nope'"):
        load_reader("nope")
