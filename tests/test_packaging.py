"""Packaging: a wheel of the project builds without setuptools warnings and holds the data files."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_wheel_builds_cleanly_and_ships_the_data(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("lamost_ostar", "plugins"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", "dist"],
                          cwd=src, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 and ("No matching distribution" in log or "Could not find a version" in log):
        pytest.skip("pip cannot fetch the build requirements (setuptools, wheel) here")
    assert proc.returncode == 0, log[-3000:]
    # setuptools' "Package 'lamost_ostar.data' is absent from the `packages` configuration"
    assert "absent from the `packages` configuration" not in log, log[-3000:]
    (wheel,) = (src / "dist").glob("lamost_ostar-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"lamost_ostar/data/templates.npz", "lamost_ostar/data/lamost_instrument.npz",
                "lamost_ostar_plugins/heii_lines.py", "lamost_ostar_plugins/parquet.py",
                "lamost_ostar/cli/scan.py", "lamost_ostar/cli/plugins.py"}
    # no generic top-level package (it used to install one called "plugins")
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"lamost_ostar", "lamost_ostar_plugins"}, tops
    eps = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for line in ("heii_lines = lamost_ostar_plugins.heii_lines:HeIILineStage",
                 "lamost = lamost_ostar.io:LamostReader", "sql = lamost_ostar.catalogue:CatalogueWriter",
                 "parquet = lamost_ostar_plugins.parquet:ParquetSink"):
        assert line in eps, eps
    for version_dir in (REPO / "lamost_ostar" / "data" / "models").iterdir():
        if version_dir.is_dir():
            for f in ("model.keras", "card.json"):
                expected.add(f"lamost_ostar/data/models/{version_dir.name}/{f}")
    # setup.cfg lists the packages: every package folder of the tree must be in the wheel
    for init in list((REPO / "lamost_ostar").rglob("__init__.py")) + list((REPO / "plugins").rglob("__init__.py")):
        rel = init.relative_to(REPO).as_posix()
        expected.add(rel[len("plugins/"):] if rel.startswith("plugins/") else rel)
    assert expected <= names, sorted(expected - names)


def test_quick_start_output_folder_is_ignored_by_git():
    """The README's quick start writes demo/: it must not show in `git status`."""
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for rel in ("demo/catalogue.sqlite", "demo/release/55859/F5000/spec-55859-F5000_sp01-001.fits.gz",
                "demo/all.csv", "demo/cone.fits"):
        proc = subprocess.run([git, "check-ignore", "--no-index", "-q", rel], cwd=REPO)
        assert proc.returncode == 0, f"{rel} is not ignored by .gitignore"
