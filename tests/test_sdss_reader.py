"""The SDSS/BOSS reader plugin (``lamost_ostar_plugins.sdss``) on two real SDSS spectra.

Fixtures (``tests/data/SOURCES.md``): the first four HDUs (the SDSS "lite"
layout) of two DR18 ``spec`` files shipped in the ``ppxf`` wheel, one plain,
one gzip-compressed.
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest

from lamost_ostar import io as lio
from lamost_ostar.preprocess import DLOGLAM, LOGLAM0, NPIX, grid_wavelength, prepare, resample
from lamost_ostar_plugins.sdss import LAYOUT, SDSSReader, sdss_designation

DATA = Path(__file__).resolve().parent / "data"
A0_STAR = DATA / "sdss_spec-0945-52652-0470.fits"          # SDSS class STAR, subclass A0
GALAXY = DATA / "sdss_spec-2488-54149-0001.fits.gz"        # SDSS class GALAXY, BROADLINE

EXPECTED = {
    A0_STAR: dict(obsid=1064104649075746816, designation="SDSS J100052.07+553707.8", ra=150.21698,
                  dec=55.618834, lmjd=52652, planid="0945", spid=2, fiberid=470,
                  pipeline_class="STAR", pipeline_subclass="A0", npix=3848, coeff0=3.5793,
                  snr_g=50.634678, first_wave=3795.771, last_wave=9204.496),
    GALAXY: dict(obsid=2801239312711051264, designation="SDSS J110640.46+200508.0", ra=166.66859,
                 dec=20.085556, lmjd=54149, planid="2488", spid=1, fiberid=1,
                 pipeline_class="GALAXY", pipeline_subclass="BROADLINE", npix=3815, coeff0=3.5828,
                 snr_g=43.642155, first_wave=3826.485, last_wave=9208.736),
}


@pytest.fixture(scope="module")
def reader() -> SDSSReader:
    return SDSSReader()


@pytest.fixture(scope="module")
def spectra(reader) -> list[lio.Spectrum]:
    return [reader.read(A0_STAR), reader.read(GALAXY)]


def test_protocol_attributes_and_entry_point():
    assert SDSSReader.name == "sdss" and SDSSReader.version == "sdss-1"
    assert callable(SDSSReader().read)
    eps = [ep for ep in entry_points(group="lamost_ostar.readers") if ep.name == "sdss"]
    if not eps:
        pytest.skip("the package is installed without the lamost_ostar.readers entry points "
                    "(reinstall with pip install -e .)")
    assert eps[0].value == "lamost_ostar_plugins.sdss:SDSSReader"
    assert eps[0].load() is SDSSReader


@pytest.mark.parametrize("path", [A0_STAR, GALAXY], ids=["plain_star", "gzip_galaxy"])
def test_real_files_metadata(reader, path):
    s = reader.read(path)
    exp = EXPECTED[path]
    assert s.layout == LAYOUT == "sdss"
    assert s.path == os.fspath(path)
    for key in ("obsid", "designation", "lmjd", "planid", "spid", "fiberid", "pipeline_class",
                "pipeline_subclass"):
        assert getattr(s, key) == exp[key], key
    assert s.ra == pytest.approx(exp["ra"]) and s.dec == pytest.approx(exp["dec"])
    assert set(s.snr) == {"u", "g", "r", "i", "z"}
    assert s.snr["g"] == pytest.approx(exp["snr_g"], rel=1e-6)
    assert s.data_release == "SDSS"
    assert s.pipeline_version == "idlspec2d v5_3_12 run2d 26"
    # arrays: dtypes of the Spectrum contract, native byte order, writeable
    assert s.npix == exp["npix"]
    assert s.flux.dtype == np.float32 and s.ivar.dtype == np.float32
    assert s.wavelength.dtype == np.float64
    assert s.andmask.dtype == np.int32 and s.ormask.dtype == np.int32
    assert s.flux.dtype.isnative and s.flux.flags.writeable
    assert np.all(s.ivar >= 0) and np.any(s.ivar > 0)
    assert s.n_nonfinite == 0
    # vacuum wavelengths 10**loglam on SDSS's log-linear grid, step 1e-4 dex like LAMOST's
    assert s.coeff1 == DLOGLAM
    assert s.coeff0 == pytest.approx(exp["coeff0"], abs=1e-12)
    assert s.wavelength[0] == pytest.approx(exp["first_wave"], abs=1e-3)
    assert s.wavelength[-1] == pytest.approx(exp["last_wave"], abs=1e-3)
    np.testing.assert_allclose(np.log10(s.wavelength), s.coeff0 + s.coeff1 * np.arange(s.npix),
                               atol=1e-12)
    import fitsio

    loglam = fitsio.read(os.fspath(path), ext="COADD", columns=["loglam"])["loglam"]
    np.testing.assert_allclose(s.wavelength, 10.0 ** loglam.astype(np.float64), rtol=3e-6)
    # SDSS pixels are whole grid pixels: coeff0 - LOGLAM0 is an integer number of steps
    offset = (s.coeff0 - LOGLAM0) / DLOGLAM
    assert abs(offset - round(offset)) < 1e-6


def test_designation_is_truncated_like_lamost():
    assert sdss_designation(150.21698, 55.618834) == "SDSS J100052.07+553707.8"
    assert sdss_designation(0.0, -0.5) == "SDSS J000000.00-003000.0"
    assert sdss_designation(359.9999999, -89.99999) == "SDSS J235959.99-895959.9"


def test_prepare_masks_outside_coverage_and_lines_run(spectra):
    wave = grid_wavelength()
    batch = prepare(spectra)
    assert batch.x.shape == (2, NPIX) and np.all(np.isfinite(batch.x))
    assert batch.xn is not None and np.all(np.isfinite(batch.xn))
    for k, s in enumerate(spectra):
        mask = batch.mask[k]
        good = np.flatnonzero(~mask)
        # grid pixels blue-ward of the SDSS coverage are masked; the red end (9100 A) is covered
        assert np.all(mask[wave < s.wavelength[0] - 0.01])
        assert wave[good[0]] >= s.wavelength[0] - 0.01
        assert good[-1] == NPIX - 1
        # inside the coverage only the pixels SDSS itself flags are masked
        inside = (wave >= s.wavelength[0]) & (wave <= s.wavelength[-1])
        assert mask[inside].sum() <= np.count_nonzero((s.andmask != 0) | (s.ivar <= 0))
        n_blue = int(np.count_nonzero(wave < s.wavelength[0] - 0.01))
        assert batch.good_fraction[k] == pytest.approx(1 - mask.mean())
        assert n_blue > 100  # SDSS-I/II starts at ~3800 A: the stage flags the blue edge
    # the fast log-linear path gives the same grid values as the wavelength-array path
    slow = [lio.Spectrum(**{**vars(s), "coeff0": None, "coeff1": None}) for s in spectra]
    f1, _, m1 = resample(spectra)
    f2, _, m2 = resample(slow)
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_allclose(f1, f2, rtol=1e-6, atol=1e-9)

    from lamost_ostar.lines import LINE_NAMES, measure_lines

    meas = measure_lines(batch.flux, batch.ivar, batch.mask)
    assert len(meas) == 2
    ew, err = meas.ew_of("hbeta")
    assert np.all(np.isfinite(ew)) and np.all(err > 0)
    assert np.all(np.isfinite(np.asarray(meas.heii_sigma)))
    assert "heii_4541" in LINE_NAMES


def _copy(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_bad_files_give_typed_errors(reader, tmp_path):
    raw = A0_STAR.read_bytes()
    gz = GALAXY.read_bytes()
    cases = {
        _copy(tmp_path, "truncated_data.fits", raw[:100_000]): (lio.CorruptFileError, "truncated"),
        _copy(tmp_path, "truncated_header.fits", raw[:5000]): (lio.CorruptFileError, "truncated"),
        _copy(tmp_path, "truncated_meta.fits", raw[:150_000]): (lio.CorruptFileError, "truncated"),
        _copy(tmp_path, "truncated.fits.gz", gz[:40_000]): (lio.CorruptFileError, "truncated"),
        _copy(tmp_path, "corrupt.fits.gz", gz[:20] + b"\x00" * 200 + gz[220:]):
            (lio.CorruptFileError, None),
        _copy(tmp_path, "empty.fits", b""): (lio.EmptyFileError, "empty"),
        _copy(tmp_path, "text.fits", b"this is not a FITS file\n" * 10): (lio.NotFitsError, "not_fits"),
        _copy(tmp_path, "gzip_text.fits.gz", gzip.compress(b"hello" * 100)): (lio.NotFitsError, "not_fits"),
        DATA / "io_not_fits.fits": (lio.NotFitsError, "not_fits"),
        DATA / "io_truncated.fits": (lio.CorruptFileError, "truncated"),
        # LAMOST files are not SDSS spec files
        DATA / "io_image_dr7.fits": (lio.LayoutError, "bad_layout"),
        DATA / "io_image_dr6.fits.gz": (lio.LayoutError, "bad_layout"),
        DATA / "io_coadd_dr9.fits.gz": (lio.LayoutError, "bad_layout"),
        DATA / "io_medres.fits": (lio.LayoutError, "bad_layout"),
        tmp_path / "missing.fits": (lio.ReadError, "unreadable"),
        tmp_path: (lio.NotFitsError, "not_fits"),
    }
    for path, (cls, reason) in cases.items():
        with pytest.raises(lio.ReadError) as info:
            reader.read(path)
        err = info.value
        assert isinstance(err, cls), (path.name, type(err).__name__, str(err))
        if reason is not None:
            assert err.reason == reason, (path.name, err.reason, str(err))
        assert err.reason in lio.REASONS
        assert "\n" not in str(err) and str(err).startswith(os.fspath(path))
    with pytest.raises(lio.LayoutError, match="LAMOST DR9"):
        reader.read(DATA / "io_coadd_dr9.fits.gz")


def test_bad_pixels_and_no_usable_pixels(reader, tmp_path):
    """NaN flux is masked and counted, all-zero ivar is refused (rules of lamost_ostar.io)."""
    import fitsio

    def variant(name, edit):
        out = tmp_path / name
        shutil.copy(A0_STAR, out)
        with fitsio.FITS(os.fspath(out), "rw") as f:
            data = f["COADD"].read()
            edit(data)
            f["COADD"].write(data, firstrow=0)
        return out

    nan_few = variant("nan_few.fits", lambda d: d["flux"].__setitem__(slice(100, 110), np.nan))
    s = reader.read(nan_few)
    assert s.n_nonfinite == 10 and np.all(s.ivar[100:110] == 0) and np.all(s.flux[100:110] == 0)
    nan_most = variant("nan_most.fits", lambda d: d["ivar"].__setitem__(slice(0, 3000), np.inf))
    with pytest.raises(lio.NonFiniteError):
        reader.read(nan_most)
    zero = variant("zero_ivar.fits", lambda d: d["ivar"].__setitem__(slice(None), -1.0))
    with pytest.raises(lio.NoUsablePixelsError):
        reader.read(zero)
    bad_wave = variant("bad_loglam.fits", lambda d: d["loglam"].__setitem__(slice(None), 2.0))
    with pytest.raises(lio.LayoutError):
        reader.read(bad_wave)


def test_stage_classifies_sdss_records(spectra, tmp_path):
    """OStarStage takes the SDSS Spectrum records as they are (stage.read_items passes them on)."""
    from lamost_ostar.stage import FLAG_EDGE, FLAG_NOT_STAR, OStarStage, read_items

    got, slots, failed = read_items(spectra)
    assert got == spectra and slots == [0, 1] and not failed
    stage = OStarStage(models_dir=tmp_path / "no_user_models", device="cpu")  # the packaged model
    results = stage.process(spectra)
    assert [r.path for r in results] == [s.path for s in spectra]
    for r, s in zip(results, spectra):
        assert r.ok, (r.error_reason, r.error_message)
        assert r.layout == "sdss" and r.designation == s.designation and r.obsid == s.obsid
        assert r.snr_g == pytest.approx(s.snr["g"])
        assert sum(r.probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert r.predicted_class in r.probs and 0.0 <= r.p_o <= 1.0
        assert r.flags & FLAG_EDGE  # SDSS-I/II does not reach 3690 A
        assert r.evidence is not None and r.heii_sigma is not None
    assert not results[0].flags & FLAG_NOT_STAR       # SDSS CLASS STAR
    assert results[1].flags & FLAG_NOT_STAR           # SDSS CLASS GALAXY


def test_scan_with_reader_sdss_end_to_end(tmp_path):
    """``lamost-ostar scan --reader sdss`` (the scan's --reader option comes with the readers
    entry-point group; this test skips until that option exists)."""
    exe = shutil.which("lamost-ostar", path=os.path.dirname(sys.executable)) or shutil.which("lamost-ostar")
    if exe is None:
        pytest.skip("lamost-ostar console script not installed")
    help_text = subprocess.run([exe, "scan", "--help"], capture_output=True, text=True, timeout=120).stdout
    if "--reader" not in help_text:
        pytest.skip("lamost-ostar scan has no --reader option yet (the readers entry-point group "
                    "and scan --reader are added in a parallel change)")
    release = tmp_path / "sdss"
    release.mkdir()
    shutil.copy(A0_STAR, release / A0_STAR.name)
    shutil.copy(GALAXY, release / GALAXY.name)
    (release / "broken.fits").write_bytes(A0_STAR.read_bytes()[:50_000])
    db = tmp_path / "cat.sqlite"
    env = {**os.environ, "LAMOST_OSTAR_MODELS": str(tmp_path / "no_user_models"),
           "LAMOST_OSTAR_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run([exe, "scan", str(release), "--reader", "sdss", "--db", str(db),
                           "--workers", "1", "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    from lamost_ostar.catalogue import Catalogue

    with Catalogue(db, create=False) as cat:
        rows = cat.query(all_rows=True, sort="path")
        errors = cat.errors()
    assert len(rows) == 2 and set(rows["layout"]) == {"sdss"}
    assert set(rows["designation"]) == {EXPECTED[A0_STAR]["designation"], EXPECTED[GALAXY]["designation"]}
    assert len(errors) == 1 and errors["reason"][0] == "truncated"
