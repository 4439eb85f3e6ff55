"""Tests for lamost_ostar.preprocess (grid, resampling, masks, standardisation)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from lamost_ostar import preprocess as P
from lamost_ostar.io import Spectrum, read_spectra, read_spectrum

DATA = Path(__file__).resolve().parent / "data"
FIXTURES = ["io_image_dr7.fits", "io_image_dr6.fits.gz", "io_dr1_gzip.fits",
            "io_coadd_dr9.fits.gz"]


def make_spectrum(n=3909, coeff0=3.5682, func=None, ivar=None, andmask=None,
                  loglinear=True):
    """A synthetic LAMOST-like Spectrum with flux = func(log10 lambda)."""
    loglam = coeff0 + 1e-4 * np.arange(n)
    func = func or (lambda x: 1.0 + 3.0 * (x - 3.5))
    return Spectrum(
        flux=func(loglam).astype(np.float32),
        ivar=np.ones(n, np.float32) if ivar is None else ivar.astype(np.float32),
        wavelength=10.0 ** loglam,
        andmask=np.zeros(n, np.int32) if andmask is None else andmask.astype(np.int32),
        ormask=np.zeros(n, np.int32), path="synthetic", layout="image",
        coeff0=coeff0 if loglinear else None, coeff1=1e-4 if loglinear else None)


def test_grid_constants():
    w = P.grid_wavelength()
    assert w.shape == (P.NPIX,) and w.dtype == np.float64
    assert w[0] == pytest.approx(3690.0, abs=0.5)
    assert w[-1] == pytest.approx(9099.6, abs=1.0)
    assert np.allclose(np.diff(np.log10(w)), P.DLOGLAM)
    assert P.NPIX == 3921 and P.LOGLAM0 == 3.5670 and P.DLOGLAM == 1e-4


def test_linear_function_is_exact_and_edges_flagged():
    # linear in log-lambda -> linear interpolation is exact inside coverage
    spec = make_spectrum()
    flux, ivar, mask = P.resample([spec])
    loglam = P.grid_loglam()
    expected = 1.0 + 3.0 * (loglam - 3.5)
    inside = (loglam >= 3.5682 - 1e-9) & (loglam <= 3.5682 + 3908e-4 + 1e-9)
    assert np.array_equal(mask[0], ~inside)
    assert np.allclose(flux[0][inside], expected[inside], rtol=1e-6)
    # outside the coverage: held at the nearest good value
    assert np.allclose(flux[0][~inside & (loglam < 3.6)], spec.flux[0])
    assert np.all(ivar[0][mask[0]] == 0)
    assert np.allclose(ivar[0][~mask[0]], 1.0, atol=0.6)  # interpolation shrinks var


def test_smooth_function_interpolation_error():
    func = lambda x: np.sin(400.0 * x) + 2.0  # period ~ 157 pixels
    spec = make_spectrum(func=func)
    flux, _, mask = P.resample([spec])
    err = np.abs(flux[0] - func(P.grid_loglam()))[~mask[0]]
    # linear interpolation bound h^2/8 max|f''| with h = 1e-4
    assert err.max() <= (1e-4) ** 2 / 8 * 400.0 ** 2 + 1e-6


def test_non_loglinear_path_matches_coefficients():
    specs = [make_spectrum(n=3909), make_spectrum(n=3850, coeff0=3.5690,
                                                  func=lambda x: np.cos(50 * x) + 3)]
    a = P.resample(specs)
    b = P.resample([dataclasses.replace(s, coeff0=None, coeff1=None) for s in specs])
    assert np.allclose(a[0], b[0], atol=1e-6)
    assert np.mean(a[2] != b[2]) < 1e-3


def test_bad_pixels_interpolated_and_flagged():
    n = 3909
    ivar = np.ones(n)
    ivar[1000:1100] = 0.0                       # a gap
    andmask = np.zeros(n, int)
    andmask[2000:2010] = 4                       # flagged by the pipeline
    func = lambda x: 5.0 + 10.0 * (x - 3.6)
    spec = make_spectrum(func=func, ivar=ivar, andmask=andmask)
    spec.flux[1000:1100] = 1e6                   # garbage under the gap
    spec.flux[2000:2010] = -1e6
    spec.flux[3000] = np.nan                     # non-finite pixel with ivar > 0
    flux, ivar_out, mask = P.resample([spec])
    loglam = P.grid_loglam()
    gap = (loglam > 3.5682 + 1000e-4) & (loglam < 3.5682 + 1099e-4)
    amask = (loglam > 3.5682 + 2000e-4) & (loglam < 3.5682 + 2009e-4)
    nanpix = np.abs(loglam - (3.5682 + 3000e-4)) < 0.9e-4
    for region in (gap, amask, nanpix):
        assert region.any() and mask[0][region].all()
        assert np.all(ivar_out[0][region] == 0)
        # a linear function is recovered by interpolation across the gap
        assert np.allclose(flux[0][region], func(loglam[region]), rtol=1e-5)
    assert np.all(np.isfinite(flux))


def test_edges_held_at_nearest_good_value():
    n = 3909
    ivar = np.ones(n)
    ivar[:50] = 0.0
    ivar[-30:] = 0.0
    spec = make_spectrum(ivar=ivar)
    flux, _, mask = P.resample([spec])
    loglam = P.grid_loglam()
    blue = loglam < 3.5682 + 49e-4
    red = loglam > 3.5682 + (n - 30) * 1e-4
    assert mask[0][blue].all() and mask[0][red].all()
    assert np.allclose(flux[0][blue], spec.flux[50])
    assert np.allclose(flux[0][red], spec.flux[n - 31])


def test_standardise_unit_norm():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 100)).astype(np.float32)
    x[2] = 0.0
    y = P.standardise(x)
    assert y.dtype == np.float32
    norms = np.linalg.norm(y, axis=1)
    assert np.allclose(norms[[0, 1, 3, 4]], 1.0, atol=1e-6)
    assert norms[2] == 0.0
    assert np.allclose(P.standardise(np.arange(4.0)), np.arange(4.0) / np.sqrt(14.0))


def test_batch_equals_single_and_variable_lengths():
    rng = np.random.default_rng(1)
    specs = []
    for k, n in enumerate([3909, 3751, 3880, 3800]):
        ivar = (rng.random(n) > 0.05).astype(float)
        s = make_spectrum(n=n, coeff0=3.5682 + 1e-5 * k,
                          func=lambda x, k=k: 2.0 + np.sin(30 * x + k), ivar=ivar,
                          loglinear=(k != 3))
        s.flux += rng.normal(0, 0.01, n).astype(np.float32)
        specs.append(s)
    batch = P.prepare(specs)
    assert batch.x.shape == (4, P.NPIX) and batch.x.dtype == np.float32
    assert batch.mask.dtype == bool and batch.good_fraction.shape == (4,)
    for i, s in enumerate(specs):
        single = P.prepare([s])
        assert np.allclose(single.x[0], batch.x[i], atol=1e-7)
        assert np.array_equal(single.mask[0], batch.mask[i])
    assert np.allclose(np.linalg.norm(batch.x, axis=1), 1.0, atol=1e-5)
    assert np.allclose(batch.good_fraction, 1.0 - batch.mask.mean(axis=1))


def test_empty_batch():
    batch = P.prepare([])
    assert batch.x.shape == (0, P.NPIX) and len(batch) == 0


@pytest.mark.parametrize("name", FIXTURES)
def test_real_fixture(name):
    spec = read_spectrum(DATA / name)
    batch = P.prepare([spec])
    assert np.all(np.isfinite(batch.x))
    assert np.linalg.norm(batch.x[0]) == pytest.approx(1.0, abs=1e-5)
    assert batch.good_fraction[0] > 0.5
    # grid values at good pixels agree with direct interpolation of the native data
    flux, _, mask = P.resample([spec])
    good = spec.ivar > 0
    ref = np.interp(P.grid_loglam(), np.log10(spec.wavelength[good]), spec.flux[good])
    assert np.allclose(flux[0][~mask[0]], ref[~mask[0]], rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_real_shared_files(shared_data):
    paths = sorted((shared_data / "lamost").rglob("*.fits*"))[::6]
    if not paths:
        pytest.skip("no LAMOST files under shared data")
    batch_read = read_spectra(paths)
    batch = P.prepare(batch_read.spectra)
    assert len(batch) == len(batch_read.spectra) > 20
    assert np.all(np.isfinite(batch.x))
    assert np.allclose(np.linalg.norm(batch.x, axis=1), 1.0, atol=1e-5)
    # LAMOST starts at 10**3.5682 = 3700 A: the first grid pixels are outside coverage
    assert batch.mask[:, :10].all()
    assert np.median(batch.good_fraction) > 0.9


def test_chunking_does_not_change_result():
    specs = [make_spectrum(n=3800 + 7 * k, func=lambda x, k=k: 1.5 + np.cos(20 * x + k))
             for k in range(10)]
    a = P.prepare(specs, chunk=3)
    b = P.prepare(specs, chunk=100)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.mask, b.mask)


# --------------------------------------------------------------------------
# continuum normalisation (the reddening-proof channel)
# --------------------------------------------------------------------------
def _lined_spectra(n=4, seed=0):
    """Smooth continua with absorption lines (Gaussians) and noise on the grid."""
    rng = np.random.default_rng(seed)
    w = P.grid_wavelength()
    cont = (w / 5000.0) ** -2.5                      # a hot star's blue continuum
    lines = np.ones(P.NPIX)
    for centre, depth in ((4542.8, 0.08), (4687.0, 0.12), (4472.7, 0.06), (5412.0, 0.1)):
        lines -= depth * np.exp(-0.5 * ((w - centre) / 1.2) ** 2)
    flux = cont[None, :] * lines[None, :] * (1 + 0.01 * rng.standard_normal((n, P.NPIX)))
    return w, cont, lines, flux


def test_normalised_flux_is_one_in_the_continuum_and_keeps_lines():
    w, cont, lines, flux = _lined_spectra()
    mask = np.zeros(flux.shape, bool)
    xn, _ = P.normalise(flux, mask)
    assert xn.dtype == np.float32 and xn.shape == flux.shape
    free = (w > 5000) & (w < 5300)
    assert np.median(xn[:, free]) == pytest.approx(1.0, abs=0.02)
    line = np.argmin(np.abs(w - 4687.0))
    assert np.median(xn[:, line]) == pytest.approx(1 - 0.12, abs=0.03)


def test_normalised_flux_does_not_see_reddening():
    """Dividing by the pseudo-continuum removes a steep reddening curve."""
    from lamost_ostar.mock import extinction_odonnell

    w, cont, lines, flux = _lined_spectra(n=1, seed=3)
    mask = np.zeros(flux.shape, bool)
    red = flux * 10 ** (-0.4 * 2.0 * extinction_odonnell(w))[None, :]     # E(B-V) = 2
    a, _ = P.normalise(flux, mask)
    b, _ = P.normalise(red, mask)
    inner = (w > 3900) & (w < 9000)
    assert np.max(np.abs(a[0, inner] - b[0, inner])) < 0.03
    # while the standardised flux changes completely
    assert np.corrcoef(P.standardise(flux)[0], P.standardise(red)[0])[0, 1] < 0.5


def test_normalise_masked_pixels_and_ivar():
    w, cont, lines, flux = _lined_spectra(n=2)
    mask = np.zeros(flux.shape, bool)
    mask[0, 1000:1100] = True
    mask[1] = True                                   # nothing usable
    ivar = np.full(flux.shape, 4.0)
    xn, ivn = P.normalise(flux, mask, ivar)
    assert np.all(xn[0, 1000:1100] == 1.0) and np.all(ivn[0, 1000:1100] == 0.0)
    assert np.all(xn[1] == 1.0) and np.all(ivn[1] == 0.0)
    c = P.pseudo_continuum(flux, mask)
    np.testing.assert_allclose(ivn[0, :900], (4.0 * c[0, :900] ** 2), rtol=1e-5)
    assert np.all(np.isfinite(xn))


def test_normalise_is_per_spectrum():
    """A spectrum's normalised flux does not depend on the rest of its batch."""
    w, cont, lines, flux = _lined_spectra(n=5, seed=7)
    flux[2] *= 1e-16
    mask = np.zeros(flux.shape, bool)
    mask[3, :400] = True
    whole, _ = P.normalise(flux, mask)
    for i in range(5):
        one, _ = P.normalise(flux[i:i + 1], mask[i:i + 1])
        np.testing.assert_allclose(whole[i], one[0], rtol=1e-5, atol=1e-6)


def test_prepare_gives_two_channel_model_input():
    specs = [read_spectrum(str(DATA / f)) for f in FIXTURES]
    batch = P.prepare(specs)
    assert batch.xn is not None and batch.xn.shape == batch.x.shape
    two = P.model_input(batch, 2)
    assert two.shape == (len(specs), P.NPIX, 2) and two.dtype == np.float32
    np.testing.assert_array_equal(two[..., 0], batch.x)
    np.testing.assert_array_equal(two[..., 1], batch.xn)
    assert P.model_input(batch, 1).shape == (len(specs), P.NPIX, 1)
    assert P.prepare(specs, continuum=False).xn is None
    # a real F/G/K spectrum is ~1 in its continuum
    assert 0.9 < float(np.median(batch.xn)) < 1.05
    with pytest.raises(ValueError):
        P.model_input(batch, 3)


def _fill_bad_reference(values, good):
    """Row by row with numpy's interp: the behaviour _fill_bad must keep."""
    out = np.zeros(values.shape)
    x = np.arange(values.shape[1])
    for i in range(values.shape[0]):
        g = good[i]
        if g.any():
            out[i] = np.where(g, values[i], np.interp(x, x[g], values[i][g]))
    return out


def test_fill_bad_matches_row_by_row_interpolation():
    """Bad pixels between, before and after good ones, rows all bad or all good."""
    rng = np.random.default_rng(3)
    values = rng.normal(size=(9, 50))
    good = rng.random((9, 50)) > 0.4
    good[0] = False                      # no good pixel: zeros
    good[1] = True                       # nothing to fill
    good[2, :10] = False                 # leading run: first good value
    good[3, -7:] = False                 # trailing run: last good value
    good[4] = False
    good[4, 17] = True                   # one good pixel: the whole row takes it
    values[~good] = np.nan               # bad pixels are never read
    np.testing.assert_allclose(P._fill_bad(values, good), _fill_bad_reference(values, good),
                               rtol=1e-12, atol=1e-12)


def test_pad_stacks_equal_and_unequal_lengths():
    a = [np.arange(4.0), np.arange(4.0) + 10]
    np.testing.assert_array_equal(P._pad(a, np.array([4, 4]), 4, np.nan, np.float64),
                                  np.array([np.arange(4.0), np.arange(4.0) + 10]))
    b = [np.arange(2.0), np.arange(4.0), np.arange(3.0)]
    got = P._pad(b, np.array([2, 4, 3]), 4, -1.0, np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [[0, 1, -1, -1], [0, 1, 2, 3], [0, 1, 2, -1]])
