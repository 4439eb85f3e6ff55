"""The plugins shipped with lamost_ostar, registered through entry points like any other.

* ``heii_lines`` (group ``lamost_ostar.stages``): He II / He I / Balmer line
  strengths, :mod:`lamost_ostar_plugins.heii_lines`;
* ``parquet`` (group ``lamost_ostar.sinks``): results as a partitioned Parquet
  dataset, :mod:`lamost_ostar_plugins.parquet`;
* ``sdss`` (group ``lamost_ostar.readers``): SDSS/BOSS ``spec-PLATE-MJD-FIBER.fits``
  spectra, :mod:`lamost_ostar_plugins.sdss`.

The core (:mod:`lamost_ostar`) never imports this package: it finds these by
their entry points (see :mod:`lamost_ostar.entrypoints`).
"""
