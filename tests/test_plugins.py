"""Tests for the plugin stage ``lamost_ostar_plugins.heii_lines`` (He II / He I / Balmer EWs, He II evidence)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from lamost_ostar.io import Spectrum
from lamost_ostar.lines import LINE_NAMES
from lamost_ostar.preprocess import DLOGLAM, LOGLAM0, NPIX, grid_wavelength
from lamost_ostar.stage import Stage, available_stages, load_stage
from lamost_ostar_plugins.heii_lines import VERSION, HeIILineStage, LineResult, equivalent_widths

DATA = Path(__file__).resolve().parent / "data"


def _grid_spectrum(flux: np.ndarray, name: str, ivar: float = 1e4) -> Spectrum:
    n = flux.size
    return Spectrum(flux=flux.astype(np.float32), ivar=np.full(n, ivar, np.float32),
                    wavelength=grid_wavelength(), andmask=np.zeros(n, np.int32),
                    ormask=np.zeros(n, np.int32), path=name, layout="template",
                    coeff0=LOGLAM0, coeff1=DLOGLAM)


def _mock_spectra(mk: str, n: int, seed: int, snr_range=None, templates=None) -> list[Spectrum]:
    """Mock LAMOST spectra on the native grid, as Spectrum records (like files)."""
    from lamost_ostar import mock

    cfg = mock.MockConfig(snr_range=snr_range)
    sim = mock.simulate_spectra(n, mk=[mk] * n, rng=seed, grid="native", config=cfg,
                                templates=templates)
    out = []
    for i in range(n):
        k = int(sim.npix[i])
        out.append(Spectrum(flux=sim.flux[i, :k], ivar=sim.ivar[i, :k],
                            wavelength=sim.wavelength[:k], andmask=sim.andmask[i, :k],
                            ormask=sim.ormask[i, :k], path=f"mock-{mk}-{i}", layout="image",
                            coeff0=mock.NATIVE_COEFF0, coeff1=mock.NATIVE_COEFF1,
                            snr={"g": sim.truth[i]["snr_g"]}))
    return out


def test_registered_entry_point_and_protocol():
    assert available_stages()["heii_lines"] == "lamost_ostar_plugins.heii_lines:HeIILineStage"
    stage = load_stage("heii_lines", batch_size=3, read_engine="native")
    assert isinstance(stage, HeIILineStage)
    assert isinstance(stage, Stage)
    assert stage.model_version == VERSION == "heii_lines-2"
    with pytest.raises(ValueError):
        HeIILineStage(batch_size=0)


def test_result_fields_cover_every_line():
    names = {f.name for f in dataclasses.fields(LineResult)}
    for line in LINE_NAMES:
        assert f"ew_{line}" in names and f"ew_{line}_err" in names
    # the version-1 fields are still there
    for old in ("ew_hei_4471", "ew_hei_4471_err", "ew_heii_4686", "ew_heii_4686_err",
                "ew_hbeta", "ew_hbeta_err", "heii_hei_ratio", "heii_detected",
                "blue_red_ratio", "o_star_like", "flags", "model_version"):
        assert old in names
    for new in ("heii_sigma", "hei_sigma", "log_wprime", "metal_veto", "heii_consistent"):
        assert new in names


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
             "io_coadd_dr9.fits.gz", "io_image_dr6.fits.gz", "io_medres.fits"]
    res = stage.process([str(DATA / n) for n in names])
    assert [Path(r.path).name for r in res] == names
    assert [r.ok for r in res] == [True, False, True, False, True, True, False]
    assert res[1].error_reason == "truncated" and res[3].error_reason == "not_fits"
    assert res[6].error_reason == "medium_resolution"
    assert all(r.model_version == VERSION for r in res)
    good = res[0]
    assert isinstance(good, LineResult)
    assert good.obsid == 677503031 and good.pipeline_subclass == "G3"
    assert np.isfinite(good.ew_hbeta) and good.ew_hbeta > 0  # a G star's H-beta absorption
    # ... and its metal lines (LAMOST zeroes ivar in the Ca II K core of such stars)
    assert good.ew_caii_k is None
    assert good.ew_mgi_b > 1.5 and good.ew_cai_4227 > 0.5 and good.metal_veto is True
    assert good.heii_detected is False and good.o_star_like is False
    assert isinstance(good.heii_sigma, float) and isinstance(good.flags, int)
    for r in res:
        if r.ok:
            assert r.ew_hbeta_err > 0 and r.ew_heii_4541_err > 0


def test_spectrum_without_coverage_is_an_error_not_an_exception():
    flux = np.ones(NPIX)
    s = _grid_spectrum(flux, "blank")
    s.ivar[:] = 0.0
    s.ivar[-50:] = 1.0                       # only the far red is usable
    res = HeIILineStage().process([s, _grid_spectrum(flux, "flat")])
    assert res[0].ok is False and res[0].error_reason == "no_line_coverage"
    assert res[1].ok is True and abs(res[1].ew_heii_4541) < 1e-6
    assert res[1].heii_detected is False


def test_real_lamost_spectra_are_not_o_star_like(shared_data):
    files = sorted((shared_data / "lamost").glob("*/*.fits*"))
    if not files:
        pytest.skip("no LAMOST files in shared data")
    res = HeIILineStage().process(files)
    ok = [r for r in res if r.ok]
    assert len(ok) >= 0.9 * len(files)
    # none of the real spectra is an O star (see shared/data/SOURCES.md)
    assert sum(r.heii_detected for r in ok) == 0
    assert sum(r.o_star_like for r in ok) == 0
    assert np.median([r.heii_sigma for r in ok]) < 0.5


def test_real_o_star_templates_are_o_star_like():
    tpl = pytest.importorskip("lamost_ostar.templates")
    lib = tpl.load_templates()
    names = ["o5v", "o9v", "HD057060", "HD057061", "HD209975"]
    res = HeIILineStage().process([_grid_spectrum(lib.flux[lib.index(n)], n) for n in names])
    assert all(r.ok and r.heii_detected and r.o_star_like for r in res), \
        [(r.path, r.heii_sigma, r.heii_consistent) for r in res]
    # HD 57060 (O7 Iaf): He II 4686 in emission, left out of the He II evidence
    of = res[names.index("HD057060")]
    assert of.heii_4686_emission is True and of.ew_heii_4686 < -0.5
    assert all(r.ew_heii_4541 > 0.25 for r in res)
    # early/late B and A templates: no He II
    later = ["HD187879", "HD214080", "HD190603", "b1i", "HD003360", "HD135485", "HD209459"]
    res_b = HeIILineStage().process([_grid_spectrum(lib.flux[lib.index(n)], n) for n in later])
    assert not any(r.heii_detected for r in res_b), [(r.path, r.heii_sigma) for r in res_b]


def test_mock_m_stars_have_no_false_heii():
    """Version 1 flagged He II in 14 % of mock M stars (TiO bands); version 2 in none."""
    spectra = _mock_spectra("M", 400, seed=3)
    res = HeIILineStage(batch_size=128).process(spectra)
    ok = [r for r in res if r.ok]
    assert len(ok) >= 390
    assert sum(r.heii_detected for r in ok) == 0
    assert sum(r.metal_veto for r in ok) > 100       # Ca I 4227 / Mg b / Ca II K
    hi = _mock_spectra("M", 200, seed=4, snr_range=(40.0, 80.0))
    res_hi = HeIILineStage().process(hi)
    assert sum(bool(r.heii_detected) for r in res_hi) == 0


def test_mock_o_stars_at_high_snr_are_detected():
    spectra = _mock_spectra("O", 200, seed=5, snr_range=(40.0, 60.0))
    res = HeIILineStage().process(spectra)
    det = np.mean([bool(r.ok and r.heii_detected) for r in res])
    assert det > 0.9
    assert np.median([r.heii_sigma for r in res if r.ok]) > 6


def test_process_prepared_gives_the_results_of_process():
    """The lines measured on a scan's shared preprocessing are the stage's own."""
    from lamost_ostar.io import read_spectrum
    from lamost_ostar.preprocess import prepare

    names = ["io_image_dr7.fits", "io_dr1_gzip.fits", "io_coadd_dr9.fits.gz", "io_image_dr6.fits.gz"]
    spectra = [read_spectrum(str(DATA / n)) for n in names]
    stage = HeIILineStage()
    own = stage.process(spectra)
    shared = stage.process_prepared(spectra, prepare(spectra, continuum=True))
    assert [r.path for r in shared] == [r.path for r in own]
    for a, b in zip(own, shared):
        assert a.ok == b.ok and a.flags == b.flags and a.heii_detected == b.heii_detected
        for f in ("ew_hbeta", "ew_heii_4686", "heii_sigma", "blue_red_ratio"):
            va, vb = getattr(a, f), getattr(b, f)
            assert (va is None) == (vb is None), f
            if va is not None:
                assert vb == pytest.approx(va, rel=1e-4, abs=1e-6), f
