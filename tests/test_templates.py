"""Tests for the packaged template library (lamost_ostar.templates) and its builder."""
from __future__ import annotations

import numpy as np
import pytest

from lamost_ostar.preprocess import NPIX, grid_wavelength
from lamost_ostar.templates import (DEFAULT_PATH, IMPOSTOR, KINDS, MK_LETTERS, MKCLASS_PATH,
                                    TemplateLibrary, air_to_vacuum, load_mkclass, load_templates,
                                    parse_spectral_type, vacuum_to_air)


O_STARS = {  # name: (spectral type, luminosity class, source)
    "HD057060": ("O7Ia", "Ia", "miles"),
    "HD057061": ("O9Ib", "Ib", "miles"),
    "HD209975": ("O8Ib", "Ib", "miles"),
    "o5v": ("O5V", "V", "pickles"),
    "o8iii": ("O8III", "III", "pickles"),
    "o9v": ("O9V", "V", "pickles"),
}
STELIB_O = {  # star: (type as given, subtype, luminosity class used, E(B-V) = A_V / 3.1)
    "HD030614": ("O9.5Iae", 9.5, "Ia", 0.79 / 3.1),
    "HD046223": ("O5e", 4.0, "V", 2.1 / 3.1),        # modern type O4V((f))
    "HD047129": ("O8V+...", 8.0, "V", 1.13 / 3.1),
    "HD047839": ("O7Ve", 7.0, "V", 0.26 / 3.1),
    "HD093250": ("O6/O7", 4.0, "III", 1.58 / 3.1),   # modern type O4III
    "HD188209": ("O9.5Ib", 9.5, "Ib", 0.7 / 3.1),
    "HD269698": ("O5e", 5.0, "", 0.0),
    "HD036512": ("B0V", 9.7, "V", 0.4 / 3.1),             # modern type O9.7V (upsilon Ori, GOSSS)
}


@pytest.fixture(scope="module")
def lib():
    return load_templates()


def test_packaged_file_small():
    assert DEFAULT_PATH.is_file()
    assert DEFAULT_PATH.stat().st_size < 8e6
    assert MKCLASS_PATH.is_file() and MKCLASS_PATH.stat().st_size < 2e6


def test_shapes_and_values(lib):
    t = len(lib)
    assert lib.flux.shape == (t, NPIX) and lib.flux.dtype == np.float32
    assert lib.valid.shape == (t, NPIX) and lib.valid.dtype == bool
    assert np.array_equal(lib.wave, grid_wavelength())
    assert np.all(np.isfinite(lib.flux)) and lib.flux.min() >= 0.0
    med = np.array([np.median(f[v]) for f, v in zip(lib.flux, lib.valid)])
    assert np.allclose(med, 1.0, atol=2e-3)                 # median 1 over the valid pixels
    for name in ("mk", "spt", "subtype", "lumclass", "teff", "logg", "feh", "name",
                 "source", "orig_min", "orig_max", "extension", "coverage", "star", "kind",
                 "ebv", "resolution"):
        assert getattr(lib, name).shape == (t,)
    assert set(lib.source) == {"miles", "pickles", "stelib", "mkclass"}
    assert set(lib.mk) <= set(MK_LETTERS) | {IMPOSTOR}
    assert set(lib.kind) == set(KINDS)
    assert len(set(lib.name)) == t                          # names unique per template
    assert np.allclose(lib.coverage, lib.valid.mean(axis=1))


def test_counts_per_class_source_and_kind(lib):
    def n(mk, source):
        return int(np.sum((lib.mk == mk) & (lib.source == source)))

    assert (n("O", "miles"), n("O", "stelib"), n("O", "pickles"), n("O", "mkclass")) == (3, 8, 3, 18)
    # STELIB: 7 O stars + HD036512 (B0V there, O9.7V in the modern system) of its 29 "B" stars
    assert (n("B", "miles"), n("B", "stelib"), n("B", "pickles"), n("B", "mkclass")) == (55, 28, 19, 36)
    assert lib.counts()["X"] == 9 and n("X", "stelib") == 8 and n("X", "miles") == 1
    assert all(lib.counts()[k] >= 20 for k in "BAFGKM")
    assert np.sum(lib.source == "pickles") == 108
    assert np.sum(lib.source == "stelib") == 255
    assert np.sum(lib.source == "miles") == 941
    assert np.sum(lib.source == "mkclass") == 54             # O4 ... B9 of libnor36
    # stars, not files: 11 real O stars in MILES + STELIB, 77 B stars (5 shared, 1 lp/ss pair)
    ob = lib.select(source=("miles", "stelib"))
    assert len(set(ob.star[ob.mk == "O"])) == 11
    assert len(set(ob.star[ob.mk == "B"])) == 55 + 27 - 5
    kinds = {k: int(np.sum(lib.kind == k)) for k in KINDS}
    assert kinds == {"normal": 1335, "wr": 6, "wd": 2, "hot_subdwarf": 1, "cool_subdwarf": 14}
    assert set(lib.mk[np.isin(lib.kind, ["wr", "wd", "hot_subdwarf"])]) == {IMPOSTOR}
    assert set(lib.mk[lib.kind == "cool_subdwarf"]) <= {"A", "F", "G"}


def test_o_stars_present_and_labelled(lib):
    o = lib.select(mk="O", source=("miles", "pickles"))
    assert set(o.name) == set(O_STARS)
    for name, (spt, lum, source) in O_STARS.items():
        i = lib.index(name)
        assert (lib.mk[i], lib.spt[i], lib.lumclass[i], lib.source[i]) == ("O", spt, lum, source)
    assert lib.teff[lib.index("HD057060")] == pytest.approx(35950)
    # O stars are blue: flux falls steeply from 4000 A to 8000 A
    w = lib.wave
    blue = o.flux[:, (w > 4000) & (w < 4200)].mean(axis=1)
    red = o.flux[:, (w > 8000) & (w < 8200)].mean(axis=1)
    assert np.all(blue > 4 * red)


def test_stelib_o_stars(lib):
    st = lib.select(mk="O", source="stelib")
    assert sorted(st.star) == sorted(STELIB_O)
    for star, (spt, sub, lum, ebv) in STELIB_O.items():
        i = lib.index(f"stelib:{star}")
        assert lib.star[i] == star and lib.kind[i] == "normal"
        assert (lib.spt[i], lib.lumclass[i]) == (spt, lum)
        assert float(lib.subtype[i]) == pytest.approx(sub, abs=1e-6)
        assert lib.ebv[i] == pytest.approx(ebv, abs=1e-6)
        assert lib.resolution[i] == pytest.approx(4500 / 3.4, rel=1e-4)
    # all real O stars: MILES 3 + STELIB 8 (with HD036512, O9.7 V) + Pickles 3 = 14 templates
    assert len(lib.select(mk="O", source=("miles", "stelib", "pickles"))) == 14
    assert "stelib:HD036512" not in set(lib.select(mk="B").name)


def test_impostors(lib):
    x = lib.select(mk=IMPOSTOR)
    assert lib.kind[lib.index("HD149382")] == "hot_subdwarf"
    assert set(x.kind) == {"wr", "wd", "hot_subdwarf"}
    assert {str(s)[:2] for s in x.spt[x.kind == "wr"]} == {"WN", "WC"}
    assert set(x.name[x.kind == "wd"]) == {"stelib:Feige110", "stelib:LTT4364"}
    assert np.all(np.isnan(x.subtype))
    assert "HD149382" not in set(lib.select(mk="B").name)
    assert np.all(lib.teff[lib.mk == "B"][np.isfinite(lib.teff[lib.mk == "B"])] < 35000)


def test_stars_shared_across_files_and_libraries(lib):
    # the two STELIB observations of HD053929
    pair = lib.select(star="HD053929")
    assert sorted(pair.name) == ["stelib:HD053929lp", "stelib:HD053929ss"]
    # stars in both MILES and STELIB share the star id
    for star in ("HD164353", "HD149121", "HD175640", "HD176437", "HD338529", "HD084937"):
        assert sorted(lib.select(star=star).source) == ["miles", "stelib"], star
    assert lib.star[lib.index("HD048682")] == lib.star[lib.index("stelib:HD048682A")]
    # MILES cluster names are normalised ("HD 020902         Cl" -> HD020902)
    cl = [i for i, n in enumerate(lib.name) if str(n).startswith("HD 0")]
    assert cl and all(re_hd(lib.star[i]) for i in cl)
    # MILES names keep their old form
    assert "HD057060" in set(lib.name) and "o5v" in set(lib.name)
    # mkclass ids
    assert lib.star[lib.index("mkclass:O9V")] == "mkclass:O9V"


def re_hd(star: str) -> bool:
    import re
    return re.fullmatch(r"HD\d{6}[A-C]?", str(star)) is not None


def test_valid_masks_and_no_invented_flux(lib):
    w = lib.wave
    i = lib.index("stelib:HD030614")                        # STELIB data end at 7903 A (vacuum)
    assert lib.orig_max[i] == pytest.approx(7903, abs=3)
    assert not lib.valid[i][w > lib.orig_max[i]].any()
    assert lib.valid[i][(w > 4000) & (w < 7800)].all()
    assert 0.8 < lib.coverage[i] < 0.86
    j = lib.index("stelib:HD113848")                        # 4441-6455 A only
    assert not lib.valid[j][w < 4400].any() and not lib.valid[j][w > 6500].any()
    k = lib.index("stelib:HD091316")                        # interior gap 4750-7846 A (air)
    assert not lib.valid[k][(w > 4760) & (w < 7840)].any()
    assert lib.valid[k][(w > 4000) & (w < 4700)].all() and lib.valid[k][(w > 7900) & (w < 9000)].all()
    # nothing is invented: flux 0 wherever a template is not valid
    assert np.all(lib.flux[~lib.valid] == 0)
    # MILES keeps its Pickles red extension, valid, and Pickles covers everything
    assert lib.valid[lib.source == "miles"].all() and lib.valid[lib.source == "pickles"].all()
    # MKCLASS: only 3800-5600 A (air) minus the kernel edges
    m = lib.select(source="mkclass")
    assert not m.valid[:, (w < 3800) | (w > 5603)].any()
    assert m.valid[:, (w > 3850) & (w < 5550)].all()


def test_original_coverage(lib):
    cov = lib.original
    assert cov.shape == lib.flux.shape
    miles = lib.source == "miles"
    assert np.all(lib.extension[miles] != "") and np.all(lib.extension[~miles] == "")
    assert np.all(cov[lib.source == "pickles"])            # Pickles cover the whole grid
    assert np.all((lib.orig_max[miles] > 7200) & (lib.orig_max[miles] < 7420))
    assert np.all(cov[miles][:, 0]) and not np.any(cov[miles][:, -1])
    assert np.array_equal(cov & ~lib.valid, np.zeros_like(cov))
    full = lib.select(original_only=True)
    assert set(full.source) == {"pickles", "stelib"} and np.sum(full.source == "pickles") == 108
    assert full.valid.all()


def test_select(lib):
    ob = lib.select(mk=("O", "B"), source="miles")
    assert set(ob.mk) == {"O", "B"} and set(ob.source) == {"miles"}
    giants = lib.select(mk="O", lumclass="I", source="miles")
    assert set(giants.name) == {"HD057060", "HD057061", "HD209975"}
    assert len(lib.select(name="o5v")) == 1
    with pytest.raises(KeyError):
        lib.index("no such star")
    full = lib.select(min_coverage=0.85)
    assert np.all(full.coverage >= 0.85) and "mkclass" not in set(full.source)
    assert set(lib.select(kind=("wr", "wd")).kind) == {"wr", "wd"}
    assert len(lib.select(star=["HD053929", "HD057060"])) == 3


def test_stelib_reddening_reapplied(lib, shared_data):
    """The library holds STELIB stars as observed: the file's dereddened flux, reddened by A_V."""
    from astropy.io import fits

    from lamost_ostar.mock import extinction_odonnell
    path = shared_data / "libraries" / "stelib" / "STELIB_v3.2_HD046223.fits"
    if not path.is_file():
        pytest.skip("no STELIB library under shared data")
    with fits.open(path) as h:
        hdr, f = h[0].header, h[0].data.astype(float)
    assert hdr["ISEXTINC"] == pytest.approx(2.1)
    wv = air_to_vacuum(hdr["CRVAL1"] + hdr["CDELT1"] * (np.arange(f.size) + 1 - hdr["CRPIX1"]))

    def ratio(w, x):
        return x[(w > 4000) & (w < 4200)].mean() / x[(w > 7000) & (w < 7200)].mean()

    i = lib.index("stelib:HD046223")
    file_ratio, lib_ratio = ratio(wv, f), ratio(lib.wave, lib.flux[i])
    alam = extinction_odonnell(np.array([4100.0, 7100.0]))
    expected = file_ratio * 10 ** (-0.4 * lib.ebv[i] * (alam[0] - alam[1]))
    assert lib_ratio < 0.4 * file_ratio                    # much redder than the dereddened file
    assert lib_ratio == pytest.approx(expected, rel=0.02)


def test_mkclass_standards():
    rect = load_mkclass("rectified")
    norm = load_mkclass("normalised")
    assert len(rect) == 112 and len(norm) == 174
    assert set(rect.source) == {"mkclass"}
    i = norm.index("mkclass:O9V")
    assert (norm.mk[i], norm.subtype[i], norm.lumclass[i]) == ("O", 9.0, "V")
    assert norm.index("mkclass:O4Ia") == 0
    w = rect.wave
    for lib_ in (rect, norm):
        assert np.all(lib_.flux[~lib_.valid] == 0)
        assert not lib_.valid[:, (w < 3800) | (w > 5603)].any()
    # rectified: continuum = 1 (the upper envelope of an O9 V sits at ~1);
    # flux-normalised keeps a continuum slope, ~1 near 4500 A
    j = rect.index("mkclass:O9V")
    assert np.percentile(rect.flux[j][rect.valid[j]], 90) == pytest.approx(1.0, abs=0.03)
    sl = norm.flux[i][(w > 3990) & (w < 4030)].max() / norm.flux[i][(w > 5480) & (w < 5520)].max()
    assert 2.5 < sl < 4.0
    assert norm.flux[i][(w > 4480) & (w < 4520)].max() == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ValueError):
        load_mkclass("other")


def test_mkclass_in_library_matches_packaged_standards(lib):
    norm = load_mkclass("normalised")
    for name in ("mkclass:O9V", "mkclass:B0V", "mkclass:B9V"):
        a, b = lib.index(name), norm.index(name)
        assert np.array_equal(lib.valid[a], norm.valid[b])
        r = lib.flux[a][lib.valid[a]] / norm.flux[b][norm.valid[b]]
        assert np.allclose(r, np.median(r), rtol=2e-3)    # same spectrum, other normalisation


def test_old_format_file_loads_with_defaults(tmp_path, lib):
    """Files from before the STELIB rebuild (no valid/star/kind/ebv) still load."""
    sub = lib._take(np.arange(5))
    path = tmp_path / "old.npz"
    arrays = {f: getattr(sub, f) for f in ("mk", "spt", "subtype", "lumclass", "teff", "logg",
                                           "feh", "name", "source", "orig_min", "orig_max",
                                           "extension")}
    np.savez(path, flux=sub.flux, loglam0=3.5670, dloglam=1e-4, resolution=1800.0, **arrays)
    old = load_templates(path)
    assert old.valid.all() and np.all(old.coverage == 1) and np.array_equal(old.star, old.name)
    assert set(old.kind) == {"normal"} and np.all(old.ebv == 0)
    assert np.all(old.resolution == 1800)
    assert isinstance(old, TemplateLibrary) and np.array_equal(old.flux, sub.flux)


def test_vacuum_wavelengths(lib):
    assert air_to_vacuum(6562.80) == pytest.approx(6564.61, abs=0.02)
    w = np.linspace(3600, 9200, 50)
    assert np.allclose(vacuum_to_air(air_to_vacuum(w)), w, atol=1e-6)
    # the H-alpha core of MILES and STELIB A dwarfs sits at its vacuum wavelength
    window = (lib.wave > 6540) & (lib.wave < 6590)
    for source in ("miles", "stelib"):
        a = lib.select(mk="A", source=source, lumclass="V")
        a = a._take(np.flatnonzero(a.valid[:, window].all(axis=1)))
        assert len(a) >= 5
        centres = lib.wave[window][np.argmin(a.flux[:, window], axis=1)]
        assert np.median(centres) == pytest.approx(6564.61, abs=1.6)   # one pixel is 1.5 A
    # MKCLASS (air) H-beta core at vacuum 4862.68 A in the rectified A0 V standard
    rect = load_mkclass("rectified")
    j = rect.index("mkclass:A0V")
    win = (rect.wave > 4845) & (rect.wave < 4880)
    assert rect.wave[win][np.argmin(rect.flux[j][win])] == pytest.approx(4862.68, abs=1.2)


@pytest.mark.parametrize("spt, mk, expected", [
    ("07Ia", "O", ("O", 7.0, "Ia")),
    ("08 Ib", "O", ("O", 8.0, "Ib")),
    ("B9.5III", "B", ("B", 9.5, "III")),
    ("B7 III-IV", "B", ("B", 7.0, "III")),
    ("KIIvw", "K", ("K", np.nan, "II")),
    ("F7Vwe", "F", ("F", 7.0, "V")),
    ("sd:F", "F", ("F", np.nan, "VI")),
    ("M0.5IIIb", "M", ("M", 0.5, "III")),
    ("O9.5Iae", None, ("O", 9.5, "Ia")),
    ("O6/O7", None, ("O", 6.0, "")),
    ("O8V+...", None, ("O", 8.0, "V")),
    ("B0e", None, ("B", 0.0, "")),
    ("O5e", None, ("O", 5.0, "")),
    ("M1Ia-ab", None, ("M", 1.0, "Ia")),
    ("sdF5", None, ("F", 5.0, "VI")),
    ("WN", None, ("", np.nan, "")),
    ("WNs...", None, ("", np.nan, "")),
    ("DA:", None, ("", np.nan, "")),
    ("DC:", None, ("", np.nan, "")),
])
def test_parse_spectral_type(spt, mk, expected):
    letter, sub, lum = parse_spectral_type(spt, mk)
    assert letter == expected[0] and lum == expected[2]
    assert (np.isnan(sub) and np.isnan(expected[1])) or sub == expected[1]


def test_degrade_matrix_resolution(load_script):
    """The builder's kernel turns a 2.5 A (FWHM) line into a lambda/1800 line."""
    build = load_script("build_templates")
    wave_in = np.arange(5000.0, 7000.0, 0.9)
    fwhm_in, centre = 2.5, 6000.0
    line = np.exp(-0.5 * ((wave_in - centre) / (fwhm_in / 2.3548)) ** 2)
    loglam = np.log10(centre) + 1e-5 * np.arange(-300, 301)   # fine output grid
    matrix, covered = build.degrade_matrix(wave_in, fwhm_in, 1800.0, loglam)
    out = matrix @ line
    w = 10 ** loglam
    above = w[out >= out.max() / 2]
    assert above.max() - above.min() == pytest.approx(centre / 1800.0, rel=0.05)
    assert covered.all()
    assert np.allclose(matrix.sum(axis=1), 1.0)


def test_masked_degrade_never_invents_flux(load_script):
    """A native gap: grid pixels whose kernel touches it are invalid; the rest are unbiased."""
    build = load_script("build_templates")
    wave_in = np.arange(4000.0, 6000.0, 1.0)
    flux = 1.0 + 0.1 * np.sin(wave_in / 37.0)
    good = np.ones(wave_in.size, bool)
    good[(wave_in > 5000) & (wave_in < 5010)] = False
    flux_bad = np.where(good, flux, 0.0)
    loglam = np.log10(4100.0) + 1e-4 * np.arange(1500)
    out, valid = build.degrade_masked(wave_in, flux_bad, good, 3.4, 1800.0, loglam)
    ref, _ = build.degrade_masked(wave_in, flux, np.ones_like(good), 3.4, 1800.0, loglam)
    w = 10 ** loglam
    assert not valid[(w > 5000.5) & (w < 5009.5)].any()
    assert not valid[w > 5999].any()                      # beyond the native range
    assert valid[(w > 4200) & (w < 4990)].all() and valid[(w > 5020) & (w < 5900)].all()
    assert np.all(out[~valid] == 0)
    assert np.allclose(out[valid], ref[valid], rtol=1e-3)


def test_builder_names_and_types(load_script):
    build = load_script("build_templates")
    assert build.star_id("HD 57060") == "HD057060"
    assert build.star_id("HD057060") == "HD057060"
    assert build.star_id("HD 020902         Cl") == "HD020902"
    assert build.star_id("HD053929lp") == build.star_id("HD053929ss") == "HD053929"
    assert build.star_id("HD048682") == "HD048682A" and build.star_id("HD048682B") == "HD048682B"
    assert build.star_id("BD+002058A") == "BD+002058A"
    assert build.mkclass_type("t010l00p00") == ("O", 4.0, "Ia", "O4Ia")
    assert build.mkclass_type("t060l50p00") == ("O", 9.0, "V", "O9V")
    assert build.mkclass_type("t070l30p00")[3] == "B0III"
    assert build.mkclass_type("t150l10p00")[3] == "B9Ib"
    assert build.mkclass_type("t160l50p00")[3] == "A0V"
    assert build.mkclass_type("t300l50p00")[3] == "G0V"


def test_pickles_names(load_script):
    build = load_script("build_templates")
    assert build._pickles_type("o5v") == ("O", "O5V", 5.0, "V")
    assert build._pickles_type("b57v")[2] == 6.0
    assert build._pickles_type("m2p5v")[2] == 2.5
    assert build._pickles_type("m10iii")[2] == 10.0
    assert build._pickles_type("k01ii")[1:] == ("K0-1II", 0.5, "II")


def test_pickles_reader_on_shared(shared_data, tmp_path, load_script):
    """The fixed-width reader copes with the overflowing last line of m10iii.dat."""
    build = load_script("build_templates")
    src = shared_data / "libraries" / "pickles"
    if not src.is_dir():
        pytest.skip("no Pickles library under shared data")
    for stem in ("o5v", "m10iii"):
        (tmp_path / f"{stem}.dat").write_text((src / f"{stem}.dat").read_text())
    out = build.read_pickles(tmp_path)
    assert out["flux"].shape == (2, 1895)
    names = [m["name"] for m in out["meta"]]
    assert out["flux"][names.index("m10iii"), -1] == pytest.approx(117.747047)
    assert out["wave_air"][[0, -1]].tolist() == [1150.0, 10620.0]


def test_balmer_emission_adds_the_requested_equivalent_widths_on_valid_pixels_only(lib):
    from lamost_ostar.templates import BALMER_VAC, BE_DECREMENT

    hot = lib.select(("O", "B"))
    e = hot.with_balmer_emission(20.0)
    assert len(e) == len(hot) and e.flux.dtype == hot.flux.dtype
    assert np.array_equal(hot.with_balmer_emission(0.0).flux, hot.flux)
    w = np.asarray(hot.wave, float)
    dw = np.gradient(w)
    added = e.flux.astype(float) - hot.flux.astype(float)
    assert np.all(added[~hot.valid] == 0) and np.all(added >= 0)
    for lam0, rel in zip(BALMER_VAC[:2], BE_DECREMENT[:2]):
        near = np.abs(w - lam0) < 40
        side = (np.abs(w - lam0) >= 30) & (np.abs(w - lam0) <= 90)
        whole = hot.valid[:, near].all(axis=1) & hot.valid[:, side].all(axis=1)
        cont = np.median(hot.flux[whole][:, side], axis=1)
        ew = (added[whole][:, near] * dw[near]).sum(axis=1) / cont
        np.testing.assert_allclose(ew, 20.0 * rel, rtol=0.02)
    # the original library is untouched
    assert not np.shares_memory(e.flux, hot.flux)
