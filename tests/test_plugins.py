"""Tests for the example plugin stage ``plugins.heii_lines`` (He II / He I / H-beta EWs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lamost_ostar.io import Spectrum
from lamost_ostar.preprocess import DLOGLAM, LOGLAM0, NPIX, grid_wavelength
from lamost_ostar.stage import Stage, available_stages, load_stage
from plugins.heii_lines import HeIILineStage, LineResult, equivalent_widths

DATA = Path(__file__).resolve().parent / "data"


def _grid_spectrum(flux: np.ndarray, name: str) -> Spectrum:
    n = flux.size
    return Spectrum(flux=flux.astype(np.float32), ivar=np.full(n, 1e4, np.float32),
                    wavelength=grid_wavelength(), andmask=np.zeros(n, np.int32),
                    ormask=np.zeros(n, np.int32), path=name, layout="template",
                    coeff0=LOGLAM0, coeff1=DLOGLAM)


def test_registered_entry_point_and_protocol():
    assert available_stages()["heii_lines"] == "plugins.heii_lines:HeIILineStage"
    stage = load_stage("heii_lines", batch_size=3)
    assert isinstance(stage, HeIILineStage)
    assert isinstance(stage, Stage)
    assert stage.model_version == "heii_lines-1"


def test_equivalent_width_of_a_synthetic_gaussian_line():
    wave = grid_wavelength()
    sigma, depth = 2.0, 0.4
    flux = 1.0 - depth * np.exp(-0.5 * ((wave - 4687.02) / sigma) ** 2)
    ews = equivalent_widths(flux[None, :], np.full((1, NPIX), 1e6), np.zeros((1, NPIX), bool),
                            wave)
    expected = depth * sigma * np.sqrt(2 * np.pi)
    assert ews["heii_4686"][0][0] == pytest.approx(expected, rel=0.03)
    assert abs(ews["hei_4471"][0][0]) < 1e-6
    assert ews["heii_4686"][1][0] < 0.01


def test_fixture_files_in_order_with_errors():
    stage = HeIILineStage(batch_size=2)
    names = ["io_image_dr7.fits", "io_truncated.fits", "io_dr1_gzip.fits", "io_not_fits.fits",
             "io_coadd_dr9.fits.gz"]
    res = stage.process([str(DATA / n) for n in names])
    assert [Path(r.path).name for r in res] == names
    assert [r.ok for r in res] == [True, False, True, False, True]
    assert res[1].error_reason == "truncated" and res[3].error_reason == "not_fits"
    good = res[0]
    assert isinstance(good, LineResult)
    assert good.obsid == 677503031 and good.pipeline_subclass == "G3"
    assert np.isfinite(good.ew_hbeta) and good.ew_hbeta > 0  # a G star's H-beta absorption
    assert good.o_star_like is False


def test_real_lamost_spectra_are_not_o_star_like(shared_data):
    files = sorted((shared_data / "lamost").glob("*/*.fits*"))[::3]
    if not files:
        pytest.skip("no LAMOST files in shared data")
    res = HeIILineStage().process(files)
    ok = [r for r in res if r.ok]
    assert len(ok) >= 0.9 * len(files)
    # none of the real spectra is an O star (see shared/data/SOURCES.md)
    assert sum(r.o_star_like for r in ok) == 0


def test_real_o_star_templates_are_o_star_like():
    tpl = pytest.importorskip("lamost_ostar.templates")
    lib = tpl.load_templates()
    names = {"o5v", "o9v"}  # Pickles O5V, O9V (He II 4686 in absorption)
    idx = [i for i, n in enumerate(lib.name) if str(n) in names]
    assert len(idx) == 2
    res = HeIILineStage().process([_grid_spectrum(lib.flux[i], str(lib.name[i])) for i in idx])
    assert all(r.ok and r.o_star_like for r in res), [(r.path, r.ew_heii_4686) for r in res]
