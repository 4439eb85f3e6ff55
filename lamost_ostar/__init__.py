"""lamost_ostar: find O-type stars in LAMOST low-resolution spectra.

The pipeline, top to bottom: :mod:`lamost_ostar.io` (file -> Spectrum),
:mod:`lamost_ostar.preprocess` (-> fixed-grid arrays), :mod:`lamost_ostar.models`
(LCGAN, SGAN, recogniser, SVM metrics), :mod:`lamost_ostar.stage` (the plugin API),
:mod:`lamost_ostar.scan` (Dask over a release), :mod:`lamost_ostar.catalogue`
(SQL candidate catalogue) and :mod:`lamost_ostar.cli` (click commands).
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("lamost_ostar")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
