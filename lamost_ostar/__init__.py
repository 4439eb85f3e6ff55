"""lamost_ostar: find O-type stars in LAMOST low-resolution spectra.

The pipeline, top to bottom: :mod:`lamost_ostar.entrypoints` (the plugin groups: readers,
stages, sinks), :mod:`lamost_ostar.io` (file -> Spectrum; the reader ``lamost``),
:mod:`lamost_ostar.preprocess` (-> fixed-grid arrays), :mod:`lamost_ostar.models`
(LCGAN, SGAN, recogniser, SVM metrics), :mod:`lamost_ostar.stage` (the plugin API),
:mod:`lamost_ostar.scan` (Dask over a release), :mod:`lamost_ostar.catalogue`
(SQL candidate catalogue, one table per stage; the sink ``sql``) and
:mod:`lamost_ostar.cli` (click commands).  The plugins shipped with the package
live in ``lamost_ostar_plugins`` and are found by entry point only.
"""
import subprocess
from importlib.metadata import PackageNotFoundError, version as _version
from pathlib import Path

try:
    __version__ = _version("lamost_ostar")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"



def code_version() -> str:
    """The package version plus ``git describe`` of the source tree, if it is a checkout.

    Recorded with every model version and every scan as provenance.
    """
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5,
        )
        desc = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        desc = ""
    return f"{__version__}+git.{desc}" if desc else str(__version__)


__all__ = ["__version__", "code_version"]
