"""Tests for :mod:`lamost_ostar.io` (fixtures in tests/data/io_*, real files in shared)."""

from __future__ import annotations

import csv
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from lamost_ostar import io
from lamost_ostar.io import (
    BatchRead, CorruptFileError, EmptyFileError, FileError, LayoutError,
    MediumResolutionError, NoUsablePixelsError, NonFiniteError, NotFitsError, ReadError,
    Spectrum, read_spectra, read_spectrum,
)

DATA = Path(__file__).resolve().parent / "data"
ENGINES = ("fitsio", "astropy", "native")

GOOD = {
    # fixture: (layout, obsid, class, subclass, snr_g, ra, dec, data_release, npix)
    "io_image_dr7.fits": ("image", 677503031, "STAR", "G3", 153.72, 24.376852, 25.427147,
                          "LAMOST DR7", 3909),
    "io_image_dr6.fits.gz": ("image", 359910161, "STAR", "F5", 87.63, 292.05872,
                             43.925228, "LAMOST DR6", 3909),
    "io_dr1_gzip.fits": ("dr1", None, "STAR", "F9", 71.41, 99.316263, 27.23237, None,
                         3904),
    "io_coadd_dr9.fits.gz": ("coadd", 101013, "STAR", "A2", 5.56, 332.321523, -2.122024,
                             "LAMOST DR9", 3908),
}

BAD = {
    "io_empty.fits": (EmptyFileError, "empty"),
    "io_not_fits.fits": (NotFitsError, "not_fits"),
    "io_gzip_not_fits.fits.gz": (NotFitsError, "not_fits"),
    "io_truncated.fits.gz": (CorruptFileError, "truncated"),
    "io_truncated.fits": (CorruptFileError, "truncated"),
    "io_medres.fits": (MediumResolutionError, "medium_resolution"),
    "io_short_rows.fits.gz": (LayoutError, "bad_layout"),
    "io_zero_ivar.fits.gz": (NoUsablePixelsError, "no_usable_pixels"),
    "io_nan_most.fits.gz": (NonFiniteError, "non_finite"),
}


def _assert_same(a: Spectrum, b: Spectrum) -> None:
    for f in fields(Spectrum):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype, f.name
            np.testing.assert_array_equal(va, vb, err_msg=f"{a.path}: {f.name}")
        else:
            assert va == vb, (a.path, f.name, va, vb)


# ------------------------------------------------------------------ committed fixtures
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_fixture(name, engine):
    layout, obsid, cls, sub, snrg, ra, dec, dr, npix = GOOD[name]
    s = read_spectrum(DATA / name, engine=engine)
    assert s.layout == layout
    assert s.obsid == obsid
    assert (s.pipeline_class, s.pipeline_subclass) == (cls, sub)
    assert s.snr["g"] == pytest.approx(snrg)
    assert set(s.snr) == {"u", "g", "r", "i", "z"}
    assert s.ra == pytest.approx(ra) and s.dec == pytest.approx(dec)
    assert s.data_release == dr
    assert s.designation.startswith("LAMOST J")
    assert s.path == str(DATA / name)
    assert s.npix == npix
    for arr, dt in ((s.flux, np.float32), (s.ivar, np.float32), (s.wavelength, np.float64),
                    (s.andmask, np.int32), (s.ormask, np.int32)):
        assert arr.dtype == dt and arr.shape == (npix,)
        assert arr.dtype.isnative
    assert np.all(np.isfinite(s.flux)) and np.all(s.ivar >= 0) and np.any(s.ivar > 0)
    # LAMOST log-linear grid: 10**(3.5682 + 1e-4 i), exact float64
    assert (s.coeff0, s.coeff1) == (3.5682, 1e-4)
    np.testing.assert_array_equal(s.wavelength, 10.0 ** (3.5682 + 1e-4 * np.arange(npix)))
    assert 3690 < s.wavelength[0] < 3710 and s.n_nonfinite == 0


@pytest.mark.parametrize("name", sorted(GOOD) + ["io_nan_few.fits.gz"])
def test_engines_identical_on_fixtures(name):
    ref = read_spectrum(DATA / name, "fitsio")
    for engine in ENGINES[1:]:
        _assert_same(ref, read_spectrum(DATA / name, engine))


def test_native_falls_back_to_fitsio_for_scaled_image(tmp_path):
    import fitsio

    data = fitsio.read(str(DATA / "io_image_dr7.fits"))
    hdr = fitsio.read_header(str(DATA / "io_image_dr7.fits"))
    img = np.clip(data, 0, 60000).astype(np.uint16)   # written with BZERO = 32768
    img[1] = 1
    out = tmp_path / "uint16.fits"
    fitsio.write(str(out), img, header=hdr, clobber=True)
    assert fitsio.read_header(str(out))["BZERO"] == 32768
    ref = read_spectrum(out, "fitsio")
    _assert_same(ref, read_spectrum(out, "native"))
    _assert_same(ref, read_spectrum(out, "astropy"))


def test_dr1_flux_is_row0_not_normalised():
    s = read_spectrum(DATA / "io_dr1_gzip.fits")
    # DR1 row 2 is the continuum-normalised flux (~1); row 0 is the calibrated flux
    assert np.median(s.flux[s.ivar > 0]) > 10
    assert s.pipeline_version == "v2.6.4" and s.lmjd == 55862 and s.planid == "B6212"
    assert (s.spid, s.fiberid) == (6, 3)


def test_image_stored_wavelength_matches_grid():
    import fitsio

    raw = fitsio.read(str(DATA / "io_image_dr7.fits"))
    s = read_spectrum(DATA / "io_image_dr7.fits")
    np.testing.assert_allclose(s.wavelength, raw[2], rtol=1e-6)
    np.testing.assert_array_equal(s.flux, raw[0])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_fixture(name, engine):
    cls, reason = BAD[name]
    with pytest.raises(cls) as exc:
        read_spectrum(DATA / name, engine=engine)
    err = exc.value
    assert isinstance(err, ReadError)
    assert err.reason == reason
    assert err.path == str(DATA / name)
    assert "\n" not in str(err) and "\n" not in err.message and err.message


@pytest.mark.parametrize("engine", ENGINES)
def test_few_nonfinite_pixels_are_masked(engine):
    s = read_spectrum(DATA / "io_nan_few.fits.gz", engine=engine)
    assert s.n_nonfinite == 23
    assert np.all(np.isfinite(s.flux)) and np.all(np.isfinite(s.ivar))
    assert np.all(s.ivar[100:120] == 0) and np.all(s.ivar[2000:2003] == 0)
    assert np.all(s.flux[100:120] == 0)
    with pytest.raises(NonFiniteError):
        read_spectrum(DATA / "io_nan_few.fits.gz", engine=engine,
                      max_nonfinite_fraction=0.001)


def test_read_spectra_never_stops(tmp_path):
    paths = [DATA / "io_image_dr7.fits", DATA / "io_truncated.fits.gz",
             tmp_path / "missing.fits", tmp_path, DATA / "io_coadd_dr9.fits.gz",
             None, DATA / "io_empty.fits"]
    for engine in ENGINES:
        batch = read_spectra(paths, engine=engine)
        assert isinstance(batch, BatchRead)
        assert [s.layout for s in batch.spectra] == ["image", "coadd"]
        assert all(isinstance(e, FileError) for e in batch.errors)
        reasons = [e.reason for e in batch.errors]
        # missing file and a non-path object are "unreadable"; a directory is not FITS
        assert reasons == ["truncated", "unreadable", "not_fits", "unreadable", "empty"]
        assert all(e.message and "\n" not in e.message for e in batch.errors)
        assert set(reasons) <= set(io.REASONS)


def test_unknown_engine():
    with pytest.raises(ValueError, match="unknown engine"):
        read_spectrum(DATA / "io_image_dr7.fits", engine="nope")
    with pytest.raises(ValueError, match="unknown engine"):
        read_spectra([DATA / "io_image_dr7.fits"], engine="nope")


def test_card_value_parser():
    p = io._parse_card_value
    assert p("'LAMOST DR7'         / Data release") == "LAMOST DR7"
    assert p("'it''s'  / x") == "it's"
    assert p("''") == ""
    assert p("               -28762 / id") == -28762
    assert p("            64.065186 / ra") == 64.065186
    assert p("                1E-05 / z") == 1e-05
    assert p("                    T / b") is True
    assert p("                      / empty") is None


# ------------------------------------------------------------------ real shared files
def _manifest(shared_data: Path) -> list[dict[str, str]]:
    root = shared_data / "lamost"
    if not (root / "manifest.csv").is_file():
        pytest.skip(f"{root / 'manifest.csv'} not found")
    with open(root / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def shared_batches(shared_data):
    rows = _manifest(shared_data)
    paths = [str(shared_data / "lamost" / r["file"]) for r in rows]
    return rows, {e: read_spectra(paths, engine=e) for e in ENGINES}


def test_all_shared_files_read(shared_batches):
    rows, batches = shared_batches
    assert len(rows) == 296
    for engine, batch in batches.items():
        assert len(batch.spectra) == 295, engine
        assert [(Path(e.path).name, e.reason) for e in batch.errors] == [
            ("med-58408-TD230151N343645T01_sp01-015.fits", "medium_resolution")]
        layouts = [s.layout for s in batch.spectra]
        assert {k: layouts.count(k) for k in set(layouts)} == {
            "dr1": 179, "image": 115, "coadd": 1}


def test_shared_metadata_matches_manifest(shared_batches):
    rows, batches = shared_batches
    by_path = {s.path: s for s in batches["fitsio"].spectra}
    root = Path(batches["fitsio"].spectra[0].path).parents[1]
    checked = 0
    for r in rows:
        s = by_path.get(str(root / r["file"]))
        if s is None:
            assert r["format"].startswith("MRS")
            continue
        assert s.obsid == (int(r["obsid"]) if r["obsid"] else None), r["file"]
        assert (s.pipeline_class or "") == r["cls"], r["file"]
        assert (s.pipeline_subclass or "") == r["subclass"], r["file"]
        assert s.snr["g"] == pytest.approx(float(r["snrg"])), r["file"]
        assert s.ra == pytest.approx(float(r["ra"]), abs=1e-9), r["file"]
        assert s.dec == pytest.approx(float(r["dec"]), abs=1e-9), r["file"]
        assert s.designation == r["desig"], r["file"]
        assert (s.data_release or "") == r["data_v"], r["file"]
        assert (s.pipeline_version or "") == r["verspipe"], r["file"]
        assert s.npix == int(r["format"].rstrip(")").split(",")[-1]) if "(" in r["format"] \
            else s.npix == 3908
        checked += 1
    assert checked == 295


def test_shared_engines_identical(shared_batches):
    _, batches = shared_batches
    a = batches["fitsio"]
    for engine in ENGINES[1:]:
        b = batches[engine]
        assert [s.path for s in a.spectra] == [s.path for s in b.spectra]
        for sa, sb in zip(a.spectra, b.spectra):
            _assert_same(sa, sb)


def test_shared_real_medium_resolution(shared_data):
    path = shared_data / "lamost" / "laspec" / "med-58408-TD230151N343645T01_sp01-015.fits"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    for engine in ENGINES:
        with pytest.raises(MediumResolutionError, match="COADD_B/COADD_R"):
            read_spectrum(path, engine=engine)


# ------------------------------------------------------------------ edge cases built on the fly
def _image_variant(tmp_path: Path, name: str, edit) -> Path:
    """Write a copy of the real DR7 fixture with ``edit(data)`` applied."""
    import fitsio

    data = fitsio.read(str(DATA / "io_image_dr7.fits"))
    hdr = fitsio.read_header(str(DATA / "io_image_dr7.fits"))
    data = edit(data.copy())
    out = tmp_path / name
    fitsio.write(str(out), data, header=hdr, clobber=True)
    return out


def _set(data, idx, value):
    data[idx] = value
    return data


@pytest.mark.parametrize("engine", ENGINES)
def test_edge_cases(tmp_path, engine):
    # truncated inside the header, and exactly at a header-block boundary
    for nbytes in (1000, 2880):
        p = tmp_path / f"head{nbytes}.fits"
        p.write_bytes((DATA / "io_image_dr7.fits").read_bytes()[:nbytes])
        with pytest.raises(CorruptFileError) as exc:
            read_spectrum(p, engine)
        assert exc.value.reason == "truncated", exc.value
    # 1-D primary image: unknown layout
    p = _image_variant(tmp_path, "oned.fits", lambda d: d[0])
    with pytest.raises(LayoutError, match="2-D image"):
        read_spectrum(p, engine)
    # too few pixels
    p = _image_variant(tmp_path, "short.fits", lambda d: d[:, :500])
    with pytest.raises(LayoutError, match="short spectrum"):
        read_spectrum(p, engine)
    # NaN wavelengths in an image-layout file: refused, not mistaken for DR1
    p = _image_variant(tmp_path, "nanwave.fits", lambda d: _set(d, (2, slice(10, 20)), np.nan))
    with pytest.raises(NonFiniteError, match="wavelength"):
        read_spectrum(p, engine)
    # negative ivar clipped to 0
    p = _image_variant(tmp_path, "negivar.fits", lambda d: _set(d, (1, slice(0, 50)), -1.0))
    s = read_spectrum(p, engine)
    assert np.all(s.ivar[:50] == 0) and np.all(s.ivar >= 0)
    # wavelengths off the COEFF0/COEFF1 grid: stored values kept, coefficients None
    p = _image_variant(tmp_path, "offgrid.fits", lambda d: _set(d, 2, d[2] * np.float32(1.001)))
    s = read_spectrum(p, engine)
    assert s.coeff0 is None and s.coeff1 is None and s.layout == "image"
    np.testing.assert_allclose(s.wavelength, 1.001 * 10.0 ** (3.5682 + 1e-4 * np.arange(3909)),
                               rtol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_coadd_missing_column(tmp_path, engine):
    import fitsio

    src = DATA / "io_coadd_dr9.fits.gz"
    hdr = fitsio.read_header(str(src), 0)
    table = fitsio.read(str(src), "COADD", columns=["FLUX", "WAVELENGTH", "ANDMASK", "ORMASK"])
    out = tmp_path / "noivar.fits"
    with fitsio.FITS(str(out), "rw", clobber=True) as f:
        f.write(None, header=hdr)
        f.write(table, extname="COADD")
    with pytest.raises(LayoutError, match="IVAR"):
        read_spectrum(out, engine)


def test_multimember_gzip_reads_in_every_engine(tmp_path):
    """cfitsio cannot read multi-member gzip; the fitsio engine falls back to memory."""
    import gzip

    raw = (DATA / "io_image_dr7.fits").read_bytes()
    out = tmp_path / "two_members.fits.gz"
    out.write_bytes(gzip.compress(raw[:50000]) + gzip.compress(raw[50000:]))
    ref = read_spectrum(DATA / "io_image_dr7.fits", "native")
    for engine in ENGINES:
        s = read_spectrum(out, engine)
        np.testing.assert_array_equal(s.flux, ref.flux)
        assert s.obsid == ref.obsid


# ------------------------------------------------------------------ hand-made garbage
def _garbage_files(tmp_path: Path) -> dict[Path, str]:
    """Bad files of the kind a Python exception text used to leak from -> expected reason."""
    import gzip

    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, 6000, dtype=np.uint8).tobytes()
    noise = b"\xf0" + noise[1:]  # the byte of the reported UnicodeDecodeError
    good = (DATA / "io_image_dr7.fits").read_bytes()
    header_garbage = bytearray(good)
    header_garbage[80 * 6:80 * 6 + 300] = noise[:300]  # cards 7-10 overwritten
    out = {
        "random.fits.gz": (noise, "not_fits"),
        "random.fits": (noise, "not_fits"),
        "gzip_random.fits.gz": (gzip.compress(noise), "not_fits"),
        "gzip_truncated.fits.gz": (gzip.compress(good[:len(good) // 2]), "truncated"),
        "gzip_header_cut.fits.gz": (gzip.compress(good[:1000]), "truncated"),
        "header_garbage.fits": (bytes(header_garbage), "corrupt"),
        "header_garbage.fits.gz": (gzip.compress(bytes(header_garbage)), "corrupt"),
        "simple_then_random.fits": (good[:80] + noise, "truncated"),
    }
    files = {}
    for name, (data, reason) in out.items():
        (tmp_path / name).write_bytes(data)
        files[tmp_path / name] = reason
    return files


@pytest.mark.parametrize("engine", ENGINES)
def test_garbage_files_get_a_reason_not_an_exception_text(tmp_path, engine):
    files = _garbage_files(tmp_path)
    batch = read_spectra(list(files), engine=engine)
    assert batch.spectra == []
    got = {Path(e.path): e for e in batch.errors}
    assert set(got) == set(files)
    for path, reason in files.items():
        err = got[path]
        assert err.reason == reason, (path.name, err.reason, err.message)
        for leak in ("Error:", "codec", "utf-8", "Traceback", "Exception"):
            assert leak not in err.message, (path.name, err.message)
        with pytest.raises(ReadError) as exc:  # the single-file reader agrees
            read_spectrum(path, engine=engine)
        assert exc.value.reason == reason


def test_an_unforeseen_failure_is_classified_from_the_bytes(tmp_path, monkeypatch):
    """Whatever an engine raises, read_spectra names the file's state, not the exception."""
    def boom(path, _max):
        raise TypeError("something deep inside a library")

    monkeypatch.setitem(io._ENGINE_FUNCS, io.DEFAULT_ENGINE, boom)
    (tmp_path / "r.fits.gz").write_bytes(b"\x00\xf0 not fits at all")
    batch = read_spectra([DATA / "io_image_dr7.fits", tmp_path / "r.fits.gz",
                          DATA / "io_empty.fits", tmp_path / "missing.fits"])
    assert [e.reason for e in batch.errors] == ["corrupt", "not_fits", "empty", "unreadable"]
    assert "TypeError" not in batch.errors[0].message


def test_gunzip_library_gives_the_bytes_of_stdlib_gzip_and_typed_errors(tmp_path):
    """The native engine's inflater (zlib-ng, a dependency) gives gzip's bytes, joins a
    two-member stream, and a truncated or corrupt stream is a typed error."""
    import gzip

    assert io.GUNZIP_LIBRARY == "zlib-ng"
    for name in ("io_coadd_dr9.fits.gz", "io_image_dr6.fits.gz", "io_galaxy_dr7.fits.gz"):
        raw = (DATA / name).read_bytes()
        assert io._gunzip(raw, name) == gzip.decompress(raw)
    two = gzip.compress(b"A" * 5000) + gzip.compress(b"B" * 7000)
    assert io._gunzip(two, "two") == b"A" * 5000 + b"B" * 7000
    raw = (DATA / "io_image_dr6.fits.gz").read_bytes()
    with pytest.raises(CorruptFileError, match="truncated"):
        io._gunzip(raw[: len(raw) // 2], "half")
    with pytest.raises(CorruptFileError, match="corrupt"):
        io._gunzip(raw[:10] + bytes(200) + raw[210:], "damaged")
