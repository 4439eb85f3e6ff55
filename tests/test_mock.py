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
    # --interstellar: the same release (same truth) with the interstellar features in the files
    for d, extra in (("p", []), ("i", ["--interstellar"])):
        res = runner.invoke(main, ["mock", str(tmp_path / d), "--n", "4", "--seed", "3", "--quiet",
                                   "--preset", "O=1", *extra])
        assert res.exit_code == 0, res.output
    def drawn(path):        # the drawn truth (the S/N columns are measured on the written spectra)
        return [{k: v for k, v in r.items() if not k.startswith("snr_")} for r in read_truth(path)]
    assert drawn(tmp_path / "p" / "truth.csv") == drawn(tmp_path / "i" / "truth.csv")


# ---------------------------------------------------------------- templates: coverage, kinds, knobs
def _native_wave():
    return 10 ** mock._native_loglam()


def test_coverage_gaps_become_masked_pixels(lib):
    """Beyond a STELIB star's red end: flux 0, ivar 0, MASK_NO_COVERAGE; preprocess copes."""
    from lamost_ostar.preprocess import prepare_arrays
    sub = lib.select(name="stelib:HD030614")                 # data end at 7903 A (vacuum)
    red_end = float(sub.orig_max[0])
    sim = simulate_spectra(0, rng=3, grid="native", mk=["O"] * 12, templates=sub,
                           config=MockConfig(min_coverage=0, bad_patch_rate=0))
    w = _native_wave()
    for k, t in enumerate(sim.truth):
        assert t["template1"] == t["template2"] == "stelib:HD030614"
        dop = 1 + t["rv"] / mock.C_KMS
        inside = np.arange(w.size) < sim.npix[k]
        gap = (w > red_end * dop + 3) & inside
        assert gap.any()
        assert np.all(sim.ivar[k][gap] == 0) and np.all(sim.flux[k][gap] == 0)
        assert np.all(sim.andmask[k][gap] & mock.MASK_NO_COVERAGE)
        assert np.all(sim.ormask[k][gap] & mock.MASK_NO_COVERAGE)
        ok = (w > 4000) & (w < red_end * dop - 10)
        assert np.all(sim.ivar[k][ok] > 0) and not np.any(sim.andmask[k][ok])
    n = len(sim)
    batch = prepare_arrays(sim.flux, sim.ivar, sim.npix, andmask=sim.andmask,
                           coeff0=np.full(n, mock.NATIVE_COEFF0), coeff1=np.full(n, mock.NATIVE_COEFF1))
    assert np.isfinite(batch.x).all()
    # S/N keywords still measured on the valid g band
    assert all(t["snr_g"] > 0 for t in sim.truth)


def test_mixture_valid_only_where_both_templates_are(lib):
    # two STELIB O dwarfs: HD047839 has a data gap at 6450-6549 A (air), HD046223 has none
    a, b = "stelib:HD046223", "stelib:HD047839"
    sub = lib._take(np.array([lib.index(a), lib.index(b)]))
    w_grid = sub.wave
    gap_grid = (w_grid > 6470) & (w_grid < 6530)
    assert sub.valid[0][gap_grid].all() and not sub.valid[1][gap_grid].any()
    sim = simulate_spectra(0, rng=5, grid="native", mk=["O"] * 30, templates=sub,
                           config=MockConfig(min_coverage=0, bad_patch_rate=0))
    w = _native_wave()
    mixed = [k for k, t in enumerate(sim.truth) if t["template1"] != t["template2"]]
    assert mixed
    for k, t in enumerate(sim.truth):
        dop = 1 + t["rv"] / mock.C_KMS
        gap = (w > 6475 * dop) & (w < 6525 * dop)
        if k in mixed or t["template1"] == b:
            assert np.all(sim.ivar[k][gap] == 0) and np.all(sim.andmask[k][gap] & mock.MASK_NO_COVERAGE)
        else:                                        # HD046223 alone: data there
            assert np.all(sim.ivar[k][gap] > 0)


def test_auto_picker_excludes_mkclass_and_impostors(lib):
    p = mock._TemplatePicker(lib, "auto", 0.85)
    for k in mock.CLASSES:
        src = set(lib.source[p.order[k]])
        assert "mkclass" not in src and src <= {"miles", "stelib"}, k
        assert set(lib.mk[p.order[k]]) == {k}
        assert np.all(lib.coverage[p.order[k]] >= 0.85)
    # O: 3 MILES + the STELIB O stars (HD036512, O9.7V, among them) with >= 85 % coverage, no Pickles
    assert sorted(set(lib.source[p.order["O"]])) == ["miles", "stelib"]
    assert len(p.order["O"]) >= 8
    p0 = mock._TemplatePicker(lib, "auto", 0.0)
    assert len(p0.order["O"]) == 11 and "stelib:HD036512" in set(lib.name[p0.order["O"]]) and "stelib:HD030614" in set(lib.name[p0.order["O"]])
    pall = mock._TemplatePicker(lib, "all", 0.0)
    assert "mkclass" in set(lib.source[pall.order["O"]])
    # a library holding only an MKCLASS spectrum for a class is used (asked for)
    one = lib.select(name="mkclass:O9V")
    sim = simulate_spectra(0, rng=1, mk=["O"], templates=one)
    assert sim.truth[0]["template1"] == "mkclass:O9V"
    # impostors only when asked for; a release never draws them
    sim = simulate_spectra(70, "balanced", 2, templates=lib)
    assert {t["mk"] for t in sim.truth} == set(mock.CLASSES)
    assert all(t["kind"] not in ("wr", "wd", "hot_subdwarf") for t in sim.truth)


def test_impostor_draws(lib):
    sim = simulate_spectra(0, rng=4, mk=["X"] * 20 + ["O"] * 5, templates=lib,
                           config=MockConfig(min_coverage=0))
    xs = [t for t in sim.truth if t["mk"] == "X"]
    assert len(xs) == 20
    assert {t["kind"] for t in xs} <= {"wr", "wd", "hot_subdwarf"} and len({t["kind"] for t in xs}) >= 2
    for t in xs:
        i = lib.index(t["template1"])
        assert lib.mk[i] == "X" and lib.kind[lib.index(t["template2"])] == lib.kind[i]
        assert t["subclass"] in ("WN", "WC", "DA", "DC", "sdOB")
    assert np.isfinite(sim.flux).all()
    with pytest.raises(ValueError, match="no X templates"):
        simulate_spectra(0, rng=1, mk=["X"], templates=lib.select(mk="O"))
    with pytest.raises(ValueError):
        simulate_spectra(0, rng=1, mk=["Y"], templates=lib)


def test_truth_records_new_fields(lib):
    sim = simulate_spectra(14, "balanced", 6, templates=lib)
    for t in sim.truth:
        for key in ("r_v", "resolution", "kind", "star", "ebv_total", "ebv_template"):
            assert key in t
        i = lib.index(t["template1"])
        assert t["r_v"] == 3.1
        assert t["ebv_total"] == pytest.approx(t["ebv"] + t["ebv_template"], abs=2e-4)
        assert t["resolution"] <= float(lib.resolution[i]) + 0.1
    # a STELIB star keeps its own reddening: the drawn E(B-V) adds to it
    sub = lib.select(name="stelib:HD046223")
    sim = simulate_spectra(0, rng=1, mk=["O"] * 5, templates=sub, config=MockConfig(min_coverage=0))
    for t in sim.truth:
        assert t["ebv_template"] == pytest.approx(2.1 / 3.1, abs=1e-3)
        assert t["ebv_total"] == pytest.approx(t["ebv"] + 2.1 / 3.1, abs=2e-4)
        assert t["star"] == "HD046223" and t["kind"] == "normal"


def test_ebv_ranges_per_class(lib):
    mk = ["O"] * 40 + ["B"] * 40 + ["G"] * 40
    base = simulate_spectra(0, rng=8, mk=mk, templates=lib)
    cfg = MockConfig(ebv_ranges={"O": (1.0, 2.5), "B": (0.0, 0.2)})
    aug = simulate_spectra(0, rng=8, mk=mk, templates=lib, config=cfg)
    e = np.array([t["ebv"] for t in aug.truth])
    assert np.all((e[:40] >= 1.0) & (e[:40] <= 2.5)) and np.ptp(e[:40]) > 0.8
    assert np.all((e[40:80] >= 0) & (e[40:80] <= 0.2))
    # the templates are drawn before E(B-V); classes without a range keep their
    # default (exponential) distribution
    assert [t["template1"] for t in aug.truth] == [t["template1"] for t in base.truth]
    assert all(0 <= t["ebv"] < 1.0 for t in aug.truth[80:])
    with pytest.raises(ValueError):
        MockConfig(ebv_ranges={"Q": (0, 1)}).validate()
    with pytest.raises(ValueError):
        MockConfig(ebv_ranges={"O": (1, 0)}).validate()


def test_extinction_linear_in_r_v():
    w = np.linspace(3700, 9100, 30)
    a, b = mock._extinction_ab(w)
    for r_v in (2.5, 3.1, 4.0, 5.5):
        assert np.allclose(r_v * a + b, extinction_odonnell(w, r_v))


def test_r_v_range_drawn_recorded_and_applied(lib):
    sub = lib.select(name="HD057060")
    kw = dict(rng=2, grid="native", mk=["O"] * 6, templates=sub)
    common = dict(ebv_ranges={"O": (1.5, 1.5)}, snr_range=(300, 400), calib_sigma=0.0,
                  bad_patch_rate=0)
    lo = simulate_spectra(0, **kw, config=MockConfig(r_v_range=(2.5, 2.5), **common))
    hi = simulate_spectra(0, **kw, config=MockConfig(r_v_range=(5.0, 5.0), **common))
    assert {t["r_v"] for t in lo.truth} == {2.5} and {t["r_v"] for t in hi.truth} == {5.0}
    w = _native_wave()
    ratio = hi.flux / np.where(lo.flux > 0, lo.flux, np.nan)
    blue = np.nanmedian(ratio[:, (w > 3900) & (w < 4200)], axis=1)
    red = np.nanmedian(ratio[:, (w > 7500) & (w < 8500)], axis=1)
    assert np.all(blue < 0.8 * red)        # larger R_V: more grey extinction, relatively redder
    u = simulate_spectra(0, rng=3, mk=["G"] * 50, templates=lib,
                         config=MockConfig(r_v_range=(2.8, 4.0)))
    rv = np.array([t["r_v"] for t in u.truth])
    assert np.all((rv >= 2.8) & (rv <= 4.0)) and np.ptp(rv) > 0.5


def test_resolution_range_smooths_and_is_recorded(lib):
    sub = lib.select(name="HD057060")                       # MILES, R = 1800 at 4500 A
    kw = dict(rng=4, grid="native", mk=["O"] * 4, templates=sub)
    sharp = simulate_spectra(0, **kw, config=MockConfig(snr_range=(400, 500), bad_patch_rate=0))
    blur = simulate_spectra(0, **kw, config=MockConfig(snr_range=(400, 500), bad_patch_rate=0,
                                                       resolution_range=(400, 400)))
    assert {t["resolution"] for t in sharp.truth} == {1800.0}
    assert {t["resolution"] for t in blur.truth} == {400.0}
    w = _native_wave()
    line = (w > 4855) & (w < 4870)                          # H-beta core
    side = ((w > 4820) & (w < 4835)) | ((w > 4890) & (w < 4905))

    def depth(s):
        f = s.flux.astype(float)
        return 1 - f[:, line].min(axis=1) / np.median(f[:, side], axis=1)

    assert np.all(depth(blur) < depth(sharp) - 0.02)
    # a template coarser than the drawn R is not smoothed; truth says its own R
    pk = lib.select(name="o9v")
    s = simulate_spectra(0, rng=1, mk=["O"] * 5, templates=pk,
                         config=MockConfig(resolution_range=(1500, 2200)))
    assert {t["resolution"] for t in s.truth} == {500.0}
    r = simulate_spectra(0, rng=1, mk=["G"] * 40, templates=lib,
                         config=MockConfig(resolution_range=(1500, 2200)))
    res = np.array([t["resolution"] for t in r.truth])
    assert np.all((res >= 1324 - 1) & (res <= 1800 + 1e-3)) and np.ptp(res) > 100


def test_smoothing_kernel_width_and_passthrough():
    n = mock.NPIX
    flux = np.ones((3, n), np.float32)
    flux[:, 2000] = 100.0
    valid = np.ones((3, n), bool)
    valid[:, 2600:2700] = False
    out, v = mock._smooth_to_resolution(flux, valid, np.array([1800.0, 1800.0, 500.0]),
                                        np.array([600.0, 2000.0, 1000.0]))
    # rows already coarser than the target are untouched
    assert np.array_equal(out[1:], flux[1:]) and np.array_equal(v[1:], valid[1:])
    prof = out[0, 1900:2100] - 1.0
    above = np.flatnonzero(prof >= prof.max() / 2)
    fwhm_px = above[-1] - above[0] + 1
    expect = np.sqrt(1 / 600 ** 2 - 1 / 1800 ** 2) / (np.log(10) * 1e-4)
    assert fwhm_px == pytest.approx(expect, abs=1.5)
    assert prof.sum() == pytest.approx(99.0, rel=1e-3)       # flux conserved
    # the invalid block grows by the kernel and leaks no flux
    assert not v[0, 2595:2705].any() and v[0, 2500:2585].all()
    assert np.all(out[0][~v[0]] == 0)


def test_augmented_draws_reproducible(lib):
    cfg = MockConfig(ebv_ranges={"O": (0, 2.5), "B": (0, 2.5), "A": (0, 1.5), "F": (0, 1.0)},
                     r_v_range=(2.8, 4.0), resolution_range=(1500, 2200), snr_range=(5, 80),
                     min_coverage=0)
    mk = list("OBAFGKMX") * 3
    a = simulate_spectra(0, rng=11, mk=mk, templates=lib, config=cfg)
    b = simulate_spectra(0, rng=11, mk=mk, templates=lib, config=cfg)
    c = simulate_spectra(0, rng=12, mk=mk, templates=lib, config=cfg)
    assert np.array_equal(a.flux, b.flux) and repr(a.truth) == repr(b.truth)
    assert not np.array_equal(a.flux, c.flux)
    assert np.isfinite(a.flux).all()


def test_release_prefers_full_coverage_templates(release, lib):
    _, cfg, _, rows = release
    assert cfg.min_coverage == mock.DEFAULT_MIN_COVERAGE == 0.85
    for r in rows:
        for name in (r["template1"], r["template2"]):
            i = lib.index(name)
            assert lib.coverage[i] >= 0.85 and lib.source[i] != "mkclass" and lib.mk[i] != "X"


def test_config_validation_of_new_knobs():
    for bad in (dict(r_v_range=(0, 3)), dict(r_v_range=(4, 3)), dict(resolution_range=(0, 10)),
                dict(min_coverage=1.5), dict(template_source="nope")):
        with pytest.raises(ValueError):
            MockConfig(**bad).validate()
    MockConfig(template_source="stelib", r_v_range=(3.1, 3.1), resolution_range=(1800, 1800)).validate()
