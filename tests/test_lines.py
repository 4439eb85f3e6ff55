"""Tests for lamost_ostar.lines (He II / He I / Balmer / metal line EWs and the He evidence)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lamost_ostar import lines as L
from lamost_ostar.preprocess import NPIX, grid_wavelength, resample_arrays

WAVE = grid_wavelength()


def _spectrum(ews: dict[str, float], *, sigma: float = 2.0, scale: float = 1.0,
              slope: float = 0.3) -> np.ndarray:
    """Noise-free flux: a sloped continuum times Gaussian lines of the given EWs [A]."""
    cont = scale * (1.0 + slope * (WAVE - 5000.0) / 5000.0)
    depth = np.zeros(NPIX)
    for name, ew in ews.items():
        c = L._BY_NAME[name].vacuum
        depth += ew / (sigma * np.sqrt(2 * np.pi)) * np.exp(-0.5 * ((WAVE - c) / sigma) ** 2)
    return cont * (1.0 - depth)


def _noisy(f0: np.ndarray, n: int, snr: float, rng: np.random.Generator):
    err = np.abs(f0) / snr
    flux = f0[None, :] + err[None, :] * rng.standard_normal((n, NPIX))
    ivar = np.broadcast_to(1.0 / err ** 2, (n, NPIX)).copy()
    return flux, ivar, np.zeros((n, NPIX), bool)


O_STAR = {"heii_4200": 0.45, "heii_4541": 0.6, "heii_4686": 0.7, "heii_5411": 0.8,
          "hei_4471": 0.5, "hei_4026": 0.5, "hei_4922": 0.2, "hgamma": 2.2, "hbeta": 2.2}


def test_line_table_is_consistent():
    assert len(set(L.LINE_NAMES)) == len(L.LINES)
    for line in L.LINES:
        lo, hi = line.window
        assert lo < line.air < hi, line.name
        assert line.blue[1] < lo and line.red[0] > hi, line.name     # bands outside the window
        assert line.sigma > 0 and line.note
        for b in line.blends:
            assert b in L.LINE_NAMES
        assert re.fullmatch(r"[a-z0-9_]+", line.name)
    for name in L.HEII_LINES + L.HEI_LINES + tuple(L.METAL_VETO) + L.HEII_CONTRA_LINES:
        assert name in L.LINE_NAMES


def test_vacuum_wavelengths_match_the_templates_conversion():
    tpl = pytest.importorskip("lamost_ostar.templates")
    air = np.array([l.air for l in L.LINES])
    np.testing.assert_allclose(L.air_to_vacuum(air), tpl.air_to_vacuum(air), rtol=0, atol=1e-9)
    assert L._BY_NAME["heii_4686"].vacuum == pytest.approx(4687.02, abs=0.02)
    assert L._BY_NAME["hbeta"].vacuum == pytest.approx(4862.68, abs=0.02)


def test_noise_free_gaussian_lines_are_recovered():
    f = _spectrum(O_STAR)
    m = L.measure_lines(f, np.full(NPIX, 1e8), np.zeros(NPIX, bool))
    assert len(m) == 1 and m.ew.shape == (1, len(L.LINES))
    for name in ("heii_4200", "heii_4541", "heii_4686", "hei_4471", "hei_4026"):
        ew, err = m.ew_of(name)
        ewm, _ = m.ew_of(name, "mf")
        assert ew[0] == pytest.approx(O_STAR[name], rel=0.03), name        # box: the whole line
        assert ewm[0] == pytest.approx(O_STAR[name], rel=0.03), name       # mf: sigma matches
        assert err[0] < 1e-3
    for name in ("siiii_4553", "mgii_4481", "caii_k", "cai_4227", "mgi_b"):
        assert abs(m.ew_of(name)[0][0]) < 0.01, name
    # the broad 5411 filter (sigma 2.2) on a sigma-2 line, the box EW is exact
    assert m.ew_of("heii_5411")[0][0] == pytest.approx(0.8, rel=0.03)


def test_radial_velocity_tolerance():
    """Lines shifted by 100 km/s: box EW within 3 %, matched filter loses < 20 %."""
    f = np.ones(NPIX)
    for name in ("heii_4541", "heii_4686", "hei_4471"):
        c = L._BY_NAME[name].vacuum * (1 + 100.0 / 299792.458)
        f -= 0.6 / (2.0 * np.sqrt(2 * np.pi)) * np.exp(-0.5 * ((WAVE - c) / 2.0) ** 2)
    m = L.measure_lines(f, np.full(NPIX, 1e6))
    for name in ("heii_4541", "heii_4686", "hei_4471"):
        assert m.ew_of(name)[0][0] == pytest.approx(0.6, rel=0.03)
        assert 0.8 * 0.6 < m.ew_of(name, "mf")[0][0] < 0.6


def test_scale_free_and_continuum_normalised_input():
    f = _spectrum(O_STAR)
    rng = np.random.default_rng(3)
    flux, ivar, mask = _noisy(f, 20, 30.0, rng)
    ref = L.measure_lines(flux, ivar, mask)
    # any flux unit: flux x 1e-17, ivar x 1e34
    cgs = L.measure_lines(flux * 1e-17, ivar * 1e34, mask)
    np.testing.assert_allclose(cgs.ew, ref.ew, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(cgs.ew_mf_err, ref.ew_mf_err, rtol=1e-8)
    np.testing.assert_allclose(cgs.heii_sigma, ref.heii_sigma, rtol=1e-8)
    # continuum-normalised: divided by the (smooth) continuum, ~1 outside lines
    cont = 1.0 + 0.3 * (WAVE - 5000.0) / 5000.0
    norm = L.measure_lines(flux / cont, ivar * cont ** 2, mask)
    assert np.nanmax(np.abs(norm.ew - ref.ew)) < 0.02
    assert np.nanmedian(norm.continuum[:, 1]) == pytest.approx(1.0, abs=0.01)


def test_errors_are_honest_pull_width_one():
    """EW errors (pixel noise + fitted continuum) match the scatter of noise realisations."""
    rng = np.random.default_rng(7)
    f = _spectrum(O_STAR)
    flux, ivar, mask = _noisy(f, 3000, 15.0, rng)
    m = L.measure_lines(flux, ivar, mask)
    for j, name in enumerate(m.names):
        truth = O_STAR.get(name, 0.0)
        for est, ew, err in (("box", m.ew[:, j], m.ew_err[:, j]),
                             ("mf", m.ew_mf[:, j], m.ew_mf_err[:, j])):
            # the matched filter is unbiased where its width is the line's (2 A here)
            exact = est == "box" or L._BY_NAME[name].sigma == 2.0 or truth == 0.0
            pull = (ew - (truth if exact else np.mean(ew))) / err
            assert np.isfinite(pull).all(), (name, est)
            assert 0.92 < np.std(pull) < 1.08, (name, est, np.std(pull))
            assert abs(np.mean(pull)) < 0.1, (name, est, np.mean(pull))
    # the matched filter is the more precise estimator
    j = m.column("heii_4541")
    assert np.median(m.ew_mf_err[:, j]) < 0.8 * np.median(m.ew_err[:, j])


def test_heii_sigma_is_standard_normal_without_helium():
    rng = np.random.default_rng(11)
    flux, ivar, mask = _noisy(_spectrum({"hgamma": 3.0, "hbeta": 3.0}), 3000, 12.0, rng)
    m = L.measure_lines(flux, ivar, mask)
    assert abs(np.mean(m.heii_sigma)) < 0.08
    assert 0.9 < np.std(m.heii_sigma) < 1.05
    assert abs(np.mean(m.hei_sigma)) < 0.08
    assert m.heii_detected.mean() < 1e-3


def test_heii_detection_rule_and_vetoes():
    rng = np.random.default_rng(5)
    flux, ivar, mask = _noisy(_spectrum(O_STAR), 200, 40.0, rng)
    m = L.measure_lines(flux, ivar, mask)
    assert m.heii_detected.mean() > 0.95
    assert np.all(m.n_heii_lines[m.heii_detected] >= L.HEII_MIN_LINES)
    assert np.nanmedian(m.log_wprime) == pytest.approx(np.log10(0.5 / 0.6), abs=0.1)
    # the same star with a cool star's Ca II K and Ca I 4227: vetoed
    cool = _spectrum({**O_STAR, "caii_k": 6.0, "cai_4227": 1.5}, sigma=2.0)
    flux, ivar, mask = _noisy(cool, 200, 40.0, rng)
    mc = L.measure_lines(flux, ivar, mask)
    assert mc.metal_veto.all() and not mc.heii_detected.any()
    # one strong feature in a single He II window is not a detection
    one = _spectrum({"heii_5411": 3.0})
    flux, ivar, mask = _noisy(one, 200, 40.0, rng)
    m1 = L.measure_lines(flux, ivar, mask)
    assert np.median(m1.heii_sigma) > L.HEII_SIGMA_MIN and not m1.heii_detected.any()
    # He II 4541 in emission contradicts
    neg = _spectrum({**O_STAR, "heii_4541": -0.8})
    flux, ivar, mask = _noisy(neg, 200, 40.0, rng)
    mn = L.measure_lines(flux, ivar, mask)
    assert mn.heii_contradicted.mean() > 0.95 and mn.heii_detected.mean() < 0.05


def test_of_star_4686_emission_is_left_out():
    rng = np.random.default_rng(2)
    of = _spectrum({**O_STAR, "heii_4686": -1.5})
    flux, ivar, mask = _noisy(of, 100, 40.0, rng)
    m = L.measure_lines(flux, ivar, mask)
    assert m.heii_4686_emission.all()
    assert m.heii_detected.mean() > 0.9          # 4200, 4541, 5411 still absorb
    assert np.median(m.heii_ew) == pytest.approx(np.mean([0.45, 0.6, 0.8]), abs=0.1)


def test_masked_pixels_and_missing_coverage():
    f = _spectrum(O_STAR)
    ivar = np.full((3, NPIX), 1e6)
    mask = np.zeros((3, NPIX), bool)
    flux = np.tile(f, (3, 1))
    j = L.LINE_NAMES.index("heii_4541")
    win = np.flatnonzero((WAVE > L._BY_NAME["heii_4541"].vacuum - 1)
                         & (WAVE < L._BY_NAME["heii_4541"].vacuum + 1))
    mask[1, win] = True                                   # 2 pixels of the line core
    flux[1, win] = 123.0                                  # garbage under the mask
    lo, hi = L._BY_NAME["heii_4541"].vac(L._BY_NAME["heii_4541"].red)
    ivar[2, (WAVE >= lo) & (WAVE <= hi)] = 0.0            # red band lost
    m = L.measure_lines(flux, ivar, mask)
    assert m.ew[1, j] == pytest.approx(m.ew[0, j], rel=0.05)   # filled from the profile fit
    assert np.isnan(m.ew[2, j]) and np.isnan(m.ew_mf[2, j])
    assert np.isfinite(m.ew[2, L.LINE_NAMES.index("heii_4686")])
    # a spectrum with nothing usable: all NaN, not an exception
    m0 = L.measure_lines(np.zeros((1, NPIX)), np.zeros((1, NPIX)))
    assert np.isnan(m0.ew).all() and np.isnan(m0.heii_sigma).all() and not m0.heii_detected[0]
    # NaN / inf pixels are ignored
    bad = flux[:1].copy()
    bad[0, ::50] = np.nan
    assert np.isfinite(L.measure_lines(bad, ivar[:1]).ew[0, j])


def test_input_validation_and_shapes():
    f = _spectrum(O_STAR)
    m = L.measure_lines(f, np.full(NPIX, 1e6))
    assert m.ew.shape == (1, len(L.LINES)) and m.heii_sigma.shape == (1,)
    with pytest.raises(ValueError):
        L.measure_lines(np.ones((2, NPIX)), np.ones((2, NPIX - 1)))
    with pytest.raises(ValueError):
        L.measure_lines(np.ones((2, 100)), np.ones((2, 100)))        # not the grid, no wave
    with pytest.raises(ValueError):
        L.measure_lines(f, np.ones(NPIX), estimator="xx")
    with pytest.raises(KeyError):
        m.column("nope")
    # another grid, passed explicitly; a subset of lines
    wave = np.arange(4400.0, 4800.0, 0.8)
    c = L._BY_NAME["heii_4541"].vacuum
    ff = 1.0 - 0.12 * np.exp(-0.5 * ((wave - c) / 2.0) ** 2)
    sub = [l for l in L.LINES if l.name in ("heii_4541", "siiii_4553", "hei_4471", "mgii_4481")]
    ms = L.measure_lines(ff, np.full(wave.size, 1e6), wave=wave, lines=sub)
    assert ms.names == tuple(l.name for l in sub)
    assert ms.ew_of("heii_4541")[0][0] == pytest.approx(0.12 * 2.0 * np.sqrt(2 * np.pi), rel=0.03)
    row = ms.row(0)
    assert row["ew_heii_4541"] > 0 and row["heii_detected"] is False
    ev_box = L.he_evidence(m, "box")
    assert np.isfinite(ev_box.heii_sigma).all()


def test_vectorised_batch_equals_one_by_one():
    rng = np.random.default_rng(9)
    flux, ivar, mask = _noisy(_spectrum(O_STAR), 7, 20.0, rng)
    mask[3, 1000:1010] = True
    m = L.measure_lines(flux, ivar, mask)
    for i in range(7):
        mi = L.measure_lines(flux[i], ivar[i], mask[i])
        np.testing.assert_allclose(mi.ew[0], m.ew[i], rtol=1e-10, equal_nan=True)
        np.testing.assert_allclose(mi.ew_mf_err[0], m.ew_mf_err[i], rtol=1e-10, equal_nan=True)
        assert mi.heii_detected[0] == m.heii_detected[i]


def _mkclass(shared_data):
    root = shared_data / "libraries" / "mkclass_standards" / "libr36"
    files = {p.stem: p for p in root.glob("t*.rbn")}
    if not files:
        pytest.skip("no MKCLASS standards in shared data")
    return files


def test_mkclass_standards_follow_the_spectral_sequence(shared_data):
    files = _mkclass(shared_data)
    # dwarfs O5? (not in libr36) O6 V, O7 V, O9 V, B0 V, B1 V, B2 V  (t<10 x code>l50)
    codes = {"O6": 30, "O7": 40, "O9": 60, "B0": 70, "B1": 80, "B2": 90}
    rows = []
    for sp, code in codes.items():
        d = np.loadtxt(files[f"t{code:03d}l50p00"])
        rows.append(d)
    width = max(r.shape[0] for r in rows)
    flux = np.zeros((len(rows), width))
    wave = np.ones((len(rows), width))
    ivar = np.zeros((len(rows), width))
    lens = np.array([r.shape[0] for r in rows])
    for i, r in enumerate(rows):
        wave[i, :lens[i]] = L.air_to_vacuum(r[:, 0])
        flux[i, :lens[i]] = r[:, 1]
        ivar[i, :lens[i]] = np.where(r[:, 1] > 0, 1e4, 0.0)
    fg, ig, mg = resample_arrays(flux, ivar, lens, wavelength=wave)
    m = L.measure_lines(fg, ig, mg)
    he2 = m.ew_of("heii_4541")[0]
    he1 = m.ew_of("hei_4471")[0]
    assert he2[0] > 0.5 and he2[1] > 0.4                      # O6 V, O7 V
    assert he2[0] > he2[2] > he2[3] > he2[4]                    # fading through O9-B1
    assert abs(he2[4]) < 0.1 and abs(he2[5]) < 0.1              # gone at B1, B2
    assert he1[0] < he1[2] < he1[5]                             # He I rises to B2
    assert m.log_wprime[1] == pytest.approx(0.0, abs=0.15)      # O7: EW(4471) = EW(4541)
    assert m.log_wprime[0] < 0 < m.log_wprime[2]
    assert m.heii_detected[:3].all() and not m.heii_detected[4:].any()


def test_real_lamost_spectra_have_no_heii(shared_data):
    from lamost_ostar.io import read_spectra
    from lamost_ostar.preprocess import resample

    files = sorted((shared_data / "lamost").glob("*/*.fits*"))
    if not files:
        pytest.skip("no LAMOST files in shared data")
    batch = read_spectra(files)
    flux, ivar, mask = resample(batch.spectra)
    m = L.measure_lines(flux, ivar, mask)
    assert len(m) >= 0.9 * len(files)
    assert not m.heii_detected.any()        # none of them is an O star (SOURCES.md)
    assert np.nanmedian(m.heii_sigma) < 0.5


def test_sdo_index_separates_the_he_rich_subdwarf_from_o_stars():
    """mean EW(H-delta, H-gamma) + 2 EW(He II 4686): Feige 110 above every O template (noise-free)."""
    from lamost_ostar.templates import load_templates

    assert L.sdo_index(np.array([4.0, np.nan, np.nan]), np.array([3.0, 2.0, np.nan]),
                           np.array([1.0, 0.5, 0.5])).tolist()[:2] == [5.5, 3.0]
    assert np.isnan(L.sdo_index(np.array([np.nan]), np.array([np.nan]), np.array([1.0]))[0])
    lib = load_templates()
    sel = np.flatnonzero(np.isin(lib.mk, ["O"]) | (lib.name == "stelib:Feige110"))
    valid = np.asarray(lib.valid)[sel]
    m = L.measure_lines(np.asarray(lib.flux)[sel].astype(float), np.where(valid, 1e4, 0.0), ~valid)
    assert "sdo_index" in L.EVIDENCE_FIELDS and len(m.sdo_index) == len(sel)
    feige = m.sdo_index[lib.name[sel] == "stelib:Feige110"][0]
    o = m.sdo_index[lib.mk[sel] == "O"]
    assert feige > 6.0 and np.nanmax(o) < 5.0


def test_sdo_sigma_puts_a_high_snr_subdwarf_far_above_the_o_star_edge():
    """(sdo_index - SDO_O_EDGE) / error: the noise-free O templates at or below the edge, Feige 110
    above it; the error propagated from the box-EW errors scales the same index by the S/N."""
    from lamost_ostar.templates import load_templates

    assert L.balmer_index(np.array([4.0, np.nan, np.nan]), np.array([3.0, 2.0, np.nan]))[:2].tolist() == [3.5, 2.0]
    assert np.isnan(L.balmer_index(np.array([np.nan]), np.array([np.nan]))[0])
    one = np.array([1.0])
    # index 3.5 + 2 x 1.55 = 6.6: 2 A above the edge; error sqrt((0.1 + 0.1) / 4 + 4 x 0.05) = 0.5
    z = L.sdo_sigma(4.0 * one, 3.0 * one, 1.55 * one, np.sqrt(0.1) * one, np.sqrt(0.1) * one,
                    np.sqrt(0.05) * one)
    assert z[0] == pytest.approx((6.6 - L.SDO_O_EDGE) / 0.5)
    assert np.isnan(L.sdo_sigma(one, one, one, 0 * one, 0 * one, 0 * one)[0])
    lib = load_templates()
    sel = np.flatnonzero(np.isin(lib.mk, ["O"]) | (lib.name == "stelib:Feige110"))
    valid = np.asarray(lib.valid)[sel]
    m = L.measure_lines(np.asarray(lib.flux)[sel].astype(float), np.where(valid, 1e4, 0.0), ~valid)
    assert "sdo_sigma" in L.EVIDENCE_FIELDS and len(m.sdo_sigma) == len(sel)
    assert np.nanmax(m.sdo_index[lib.mk[sel] == "O"]) <= L.SDO_O_EDGE + 0.05
    assert np.nanmax(m.sdo_sigma[lib.mk[sel] == "O"]) <= 0.5
    assert m.sdo_sigma[lib.name[sel] == "stelib:Feige110"][0] > 3
