"""Tests for the mock LAMOST release (:mod:`lamost_ostar.mock`, ``lamost-ostar mock``)."""
from __future__ import annotations

import hashlib
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lamost_ostar import mock
from lamost_ostar.io import read_spectra, read_spectrum
from lamost_ostar.mock import (BANDS, CLASSES, MockConfig, class_counts, designation,
                               extinction_odonnell, read_truth, resolve_fractions,
                               simulate_spectra, write_release)
from lamost_ostar.preprocess import NPIX

NAME_RE = re.compile(r"^(\d{5})/([A-Z0-9]+)/spec-(\d{5})-([A-Z0-9]+)_sp(\d{2})-(\d{3})\.fits\.gz$")


@pytest.fixture(scope="module")
def lib():
    from lamost_ostar.templates import load_templates
    return load_templates()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny DR7-layout release with many broken files (shared by several tests)."""
    out = tmp_path_factory.mktemp("rel")
    cfg = MockConfig(n=48, preset="balanced", seed=5, broken_rate=0.25, batch_size=16)
    summary = write_release(out, cfg)
    return out, cfg, summary, read_truth(out / "truth.csv")


# ---------------------------------------------------------------- small pieces
def test_designation_matches_real_lamost():
    # RA/Dec -> DESIG pairs copied from real LAMOST headers (DR7, DR9, DR1)
    assert designation(332.368745, -1.955771) == ["LAMOST J220928.49-015720.7"]
    assert designation(332.321523, -2.122024) == ["LAMOST J220917.16-020719.2"]
    assert designation(99.316263, 27.23237) == ["LAMOST J063715.90+271356.5"]


def test_fractions_and_counts():
    s = resolve_fractions("survey")
    assert set(s) == set(CLASSES) and abs(sum(s.values()) - 1) < 1e-12
    assert s["O"] == pytest.approx(1e-5, rel=0.01) and 0.01 < s["B"] < 0.1
    b = resolve_fractions("balanced")
    assert all(v == pytest.approx(1 / 7) for v in b.values())
    f = resolve_fractions("O=1,B=3")
    assert f["O"] == 0.25 and f["B"] == 0.75 and f["M"] == 0
    c = class_counts(1000, resolve_fractions("survey"))
    assert sum(c.values()) == 1000 and c["O"] == 0 and c["B"] == 30 and c["G"] == 330
    assert class_counts(7, b) == {k: 1 for k in CLASSES}
    for bad in ("foo", "X=1", "O=-1", "O=0"):
        with pytest.raises(ValueError):
            resolve_fractions(bad)


def test_extinction_law():
    av = extinction_odonnell(np.array([5494.5]))[0]
    assert av == pytest.approx(3.1, abs=0.01)              # A_V / E(B-V) = R_V
    ab = extinction_odonnell(np.array([4405.0]))[0]
    assert ab - av == pytest.approx(1.0, abs=0.05)         # E(B-V) / E(B-V)
    a = extinction_odonnell(np.linspace(3690, 9100, 50))
    assert np.all(np.diff(a) < 0)                          # bluer = more extinction


# ---------------------------------------------------------------- in-memory API
def test_simulate_spectra_common_and_native(lib):
    sim = simulate_spectra(35, "balanced", np.random.default_rng(0), templates=lib)
    flux, ivar, andmask, truth = sim
    assert flux.shape == ivar.shape == andmask.shape == (35, NPIX)
    assert flux.dtype == np.float32 and andmask.dtype == np.int32
    assert np.isfinite(flux).all() and (ivar >= 0).all()
    assert Counter(t["mk"] for t in truth) == {k: 5 for k in CLASSES}
    off = mock.NATIVE_OFFSET
    assert (ivar[:, :off] == 0).all()                      # before 10**3.5682 A: no data
    assert np.all(ivar[andmask != 0] == 0)                 # bad pixels flagged, ivar 0
    nat = simulate_spectra(0, "balanced", 1, grid="native", mk=["O", "B", "M"], templates=lib)
    assert nat.flux.shape == (3, mock.NATIVE_NPIX) and [t["mk"] for t in nat.truth] == ["O", "B", "M"]
    assert all(3900 <= n <= 3909 for n in nat.npix)
    for t in truth:
        assert t["template1"] in set(lib.name) and 0 <= t["weight1"] <= 1
        assert t["subclass"].lstrip("dg").startswith(t["mk"])


def test_native_spectra_go_through_preprocess(lib):
    from lamost_ostar.preprocess import prepare_arrays
    sim = simulate_spectra(8, "balanced", np.random.default_rng(1), grid="native", templates=lib)
    n = len(sim)
    batch = prepare_arrays(sim.flux, sim.ivar, sim.npix, andmask=sim.andmask,
                           coeff0=np.full(n, mock.NATIVE_COEFF0), coeff1=np.full(n, mock.NATIVE_COEFF1))
    assert batch.x.shape == (8, NPIX) and np.isfinite(batch.x).all()
    assert np.allclose(np.linalg.norm(batch.x, axis=1), 1.0, atol=1e-4)


def test_noise_is_consistent_with_ivar(lib):
    # at low S/N the pixel-to-pixel differences are noise: |df| / sqrt(s1^2+s2^2) ~ |N(0,1)|
    sim = simulate_spectra(40, "F=1,G=1,K=1", np.random.default_rng(2), templates=lib, grid="native",
                           config=MockConfig(snr_range=(2.0, 4.0), bad_patch_rate=0))
    f, iv = sim.flux.astype(float), sim.ivar.astype(float)
    w = 10 ** mock._native_loglam()
    sel = (w > 4500) & (w < 8800)
    d = np.diff(f[:, sel], axis=1)
    s = np.sqrt(1 / iv[:, sel][:, :-1] + 1 / iv[:, sel][:, 1:])
    ok = np.isfinite(s) & (f[:, sel][:, 1:] != 0) & (f[:, sel][:, :-1] != 0)
    assert np.median(np.abs(d[ok] / s[ok])) == pytest.approx(0.674, abs=0.05)


def test_snr_and_blue_end_noisier(lib):
    sim = simulate_spectra(60, "G=1", np.random.default_rng(3), templates=lib, grid="native",
                           config=MockConfig(snr_range=(20.0, 40.0)))
    snr_g = np.array([t["snr_g"] for t in sim.truth])
    assert np.all((snr_g > 15) & (snr_g < 50))
    w = 10 ** mock._native_loglam()
    sn = sim.flux * np.sqrt(sim.ivar)
    blue = np.median(sn[:, (w > 3750) & (w < 3900)])
    green = np.median(sn[:, (w > 5000) & (w < 5500)])
    dich = np.median(sn[:, (w > 5850) & (w < 5950)])
    red = np.median(sn[:, (w > 6400) & (w < 6600)])
    assert blue < 0.3 * green and dich < red


def test_reproducible_in_memory(lib):
    a = simulate_spectra(10, "survey", 42, templates=lib)
    b = simulate_spectra(10, "survey", 42, templates=lib)
    c = simulate_spectra(10, "survey", 43, templates=lib)
    assert np.array_equal(a.flux, b.flux) and repr(a.truth) == repr(b.truth)
    assert not np.array_equal(a.flux, c.flux)


# ---------------------------------------------------------------- written release
def test_release_layout_naming_and_truth(release):
    out, cfg, summary, rows = release
    assert summary.n_files == len(rows) == 48
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.fits.gz"))
    assert files == sorted(r["path"] for r in rows)
    assert len({r["obsid"] for r in rows}) == 48
    for r in rows:
        m = NAME_RE.match(r["path"])
        assert m, r["path"]
        assert m.group(1) == m.group(3) == r["lmjd"] and m.group(2) == m.group(4) == r["planid"]
        assert int(m.group(5)) == int(r["spid"]) and 1 <= int(r["spid"]) <= 16
        assert int(m.group(6)) == int(r["fiberid"]) and 1 <= int(r["fiberid"]) <= 250
    assert Counter(r["mk"] for r in rows) == Counter(class_counts(48, resolve_fractions("balanced")))
    assert sum(bool(r["broken"]) for r in rows) == summary.n_broken == 12


def test_release_reads_back_with_io(release):
    out, cfg, summary, rows = release
    batch = read_spectra([out / r["path"] for r in rows])
    errors = {Path(e.path).relative_to(out).as_posix(): e.reason for e in batch.errors}
    for r in rows:
        assert errors.get(r["path"], "") == r["expected_error"], r
    by_path = {Path(s.path).relative_to(out).as_posix(): s for s in batch.spectra}
    assert len(by_path) == 48 - summary.n_broken
    for r in rows:
        s = by_path.get(r["path"])
        if s is None:
            continue
        assert s.layout == "image" and s.data_release == "LAMOST DR7"
        assert s.obsid == int(r["obsid"]) and s.designation == r["designation"]
        assert s.designation == designation(s.ra, s.dec)[0]
        assert (s.lmjd, s.planid, s.spid, s.fiberid) == (int(r["lmjd"]), r["planid"],
                                                         int(r["spid"]), int(r["fiberid"]))
        assert s.pipeline_class == "STAR" and s.pipeline_subclass == r["subclass"]
        assert 3900 <= s.flux.size <= 3909 and s.coeff0 == pytest.approx(3.5682)
        assert s.snr["g"] == pytest.approx(float(r["snr_g"]))
        lo, hi = BANDS["g"]
        m = (s.wavelength >= lo) & (s.wavelength < hi) & (s.ivar > 0) & (s.flux != 0)
        assert np.median(s.flux[m] * np.sqrt(s.ivar[m])) == pytest.approx(s.snr["g"], abs=0.006)


@pytest.mark.parametrize("layout", ["coadd", "dr1"])
def test_other_layouts(tmp_path, layout):
    write_release(tmp_path, MockConfig(n=6, layout=layout, seed=2, preset="O=1,B=1"))
    rows = read_truth(tmp_path / "truth.csv")
    for r in rows:
        s = read_spectrum(tmp_path / r["path"])
        assert s.layout == layout and s.designation == r["designation"]
        assert s.snr["g"] == pytest.approx(float(r["snr_g"]))
        if layout == "dr1":
            assert s.obsid is None and s.data_release is None and s.pipeline_version == "v2.6.4"
        else:
            assert s.obsid == int(r["obsid"]) and s.data_release == "LAMOST DR9"
        a = read_spectrum(tmp_path / r["path"], engine="astropy")
        assert np.array_equal(a.flux, s.flux)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_reproducible_from_seed_any_workers(tmp_path):
    cfg = MockConfig(n=20, seed=9, broken_rate=0.1, batch_size=6)
    write_release(tmp_path / "a", cfg, workers=1)
    write_release(tmp_path / "b", cfg, workers=2)
    write_release(tmp_path / "c", MockConfig(n=20, seed=10, broken_rate=0.1, batch_size=6))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_broken_kinds_give_the_right_io_errors(tmp_path):
    write_release(tmp_path, MockConfig(n=24, seed=4, broken_rate=1.0, batch_size=8))
    rows = read_truth(tmp_path / "truth.csv")
    assert {r["broken"] for r in rows} == set(mock.BROKEN_KINDS)
    from lamost_ostar.io import ReadError
    for r in rows:
        with pytest.raises(ReadError) as ei:
            read_spectrum(tmp_path / r["path"])
        assert ei.value.reason == r["expected_error"] == mock.BROKEN_EXPECTED_ERROR[r["broken"]]


def test_astropy_opens_mock_files_without_warnings(release):
    from astropy.io import fits
    out, _, _, rows = release
    r = next(r for r in rows if not r["broken"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fits.open(out / r["path"]) as h:
            h.verify("exception")
            assert h[0].data.shape[0] == 5 and h[0].header["EXTNAME"] == "Flux"


def test_header_keywords_in_real_order(release, shared_data):
    import fitsio
    out, _, _, rows = release
    r = next(r for r in rows if not r["broken"])
    real = fitsio.read_header(str(shared_data / "lamost" / "lamost_sbc" / "obsid_101008.fits"))
    fake = fitsio.read_header(str(out / r["path"]))
    assert [c["name"] for c in fake.records()] == [c["name"] for c in real.records()]


# ---------------------------------------------------------------- CLI
def test_cli(tmp_path):
    from click.testing import CliRunner

    from lamost_ostar.cli import main
    runner = CliRunner()
    res = runner.invoke(main, ["mock", str(tmp_path / "r"), "--n", "5", "--seed", "3",
                               "--quiet", "--preset", "balanced", "--broken-rate", "0.2"])
    assert res.exit_code == 0, res.output
    assert "wrote 5 files (1 broken" in res.output
    assert len(read_truth(tmp_path / "r" / "truth.csv")) == 5
    for args in (["--preset", "nope"], ["--broken-rate", "1.5"], ["--layout", "dr5"],
                 ["--n", "-1"], ["--workers", "0"], ["--snr-range", "9"]):
        res = runner.invoke(main, ["mock", str(tmp_path / "x"), *args])
        assert res.exit_code == 2 and res.exception is None or isinstance(res.exception, SystemExit)
        assert "Traceback" not in res.output
        assert res.output.strip().splitlines()[-1].startswith("Error:")
    res = runner.invoke(main, ["mock", str(tmp_path / "r"), "--n", "2"])
    assert res.exit_code == 2 and "not empty" in res.output
