"""Tests for the packaged template library (lamost_ostar.templates) and its builder."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lamost_ostar.preprocess import NPIX, grid_wavelength
from lamost_ostar.templates import (DEFAULT_PATH, MK_LETTERS, air_to_vacuum, load_templates,
                                    parse_spectral_type, vacuum_to_air)

REPO = Path(__file__).resolve().parents[1]

O_STARS = {  # name: (spectral type, luminosity class, source)
    "HD057060": ("O7Ia", "Ia", "miles"),
    "HD057061": ("O9Ib", "Ib", "miles"),
    "HD209975": ("O8Ib", "Ib", "miles"),
    "o5v": ("O5V", "V", "pickles"),
    "o8iii": ("O8III", "III", "pickles"),
    "o9v": ("O9V", "V", "pickles"),
}


@pytest.fixture(scope="module")
def lib():
    return load_templates()


def _build_module():
    spec = importlib.util.spec_from_file_location("build_templates",
                                                  REPO / "scripts" / "build_templates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packaged_file_small():
    assert DEFAULT_PATH.is_file()
    assert DEFAULT_PATH.stat().st_size < 8e6


def test_shapes_and_values(lib):
    t = len(lib)
    assert lib.flux.shape == (t, NPIX) and lib.flux.dtype == np.float32
    assert np.array_equal(lib.wave, grid_wavelength())
    assert np.all(np.isfinite(lib.flux)) and lib.flux.min() >= 0.0
    assert np.allclose(np.median(lib.flux, axis=1), 1.0, atol=2e-3)
    for name in ("mk", "spt", "subtype", "lumclass", "teff", "logg", "feh", "name",
                 "source", "orig_min", "orig_max", "extension"):
        assert getattr(lib, name).shape == (t,)
    assert set(lib.source) == {"miles", "pickles"}
    assert set(lib.mk) <= set(MK_LETTERS)


def test_counts_per_class(lib):
    counts = lib.counts()
    assert counts["O"] == 6
    assert all(counts[k] >= 20 for k in "BAFGKM")
    assert np.sum(lib.source == "pickles") == 108
    assert np.sum(lib.source == "miles") > 900


def test_o_stars_present_and_labelled(lib):
    o = lib.select(mk="O")
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


def test_excluded_star_absent(lib):
    assert "HD149382" not in set(lib.name)
    assert np.all(lib.teff[lib.mk == "B"][np.isfinite(lib.teff[lib.mk == "B"])] < 35000)


def test_original_coverage(lib):
    cov = lib.original
    assert cov.shape == lib.flux.shape
    miles = lib.source == "miles"
    assert np.all(lib.extension[miles] != "") and np.all(lib.extension[~miles] == "")
    assert np.all(cov[~miles])                           # Pickles cover the whole grid
    assert np.all((lib.orig_max[miles] > 7200) & (lib.orig_max[miles] < 7420))
    assert np.all(cov[miles][:, 0]) and not np.any(cov[miles][:, -1])
    assert len(lib.select(original_only=True)) == 108


def test_select(lib):
    ob = lib.select(mk=("O", "B"), source="miles")
    assert set(ob.mk) == {"O", "B"} and set(ob.source) == {"miles"}
    giants = lib.select(mk="O", lumclass="I")
    assert set(giants.name) == {"HD057060", "HD057061", "HD209975"}
    assert len(lib.select(name="o5v")) == 1
    with pytest.raises(KeyError):
        lib.index("no such star")


def test_vacuum_wavelengths(lib):
    assert air_to_vacuum(6562.80) == pytest.approx(6564.61, abs=0.02)
    w = np.linspace(3600, 9200, 50)
    assert np.allclose(vacuum_to_air(air_to_vacuum(w)), w, atol=1e-6)
    # the H-alpha core of MILES A dwarfs sits at its vacuum wavelength
    a = lib.select(mk="A", source="miles", lumclass="V")
    window = (lib.wave > 6540) & (lib.wave < 6590)
    centres = lib.wave[window][np.argmin(a.flux[:, window], axis=1)]
    assert np.median(centres) == pytest.approx(6564.61, abs=1.6)   # one pixel is 1.5 A


@pytest.mark.parametrize("spt, mk, expected", [
    ("07Ia", "O", ("O", 7.0, "Ia")),
    ("08 Ib", "O", ("O", 8.0, "Ib")),
    ("B9.5III", "B", ("B", 9.5, "III")),
    ("B7 III-IV", "B", ("B", 7.0, "III")),
    ("KIIvw", "K", ("K", np.nan, "II")),
    ("F7Vwe", "F", ("F", 7.0, "V")),
    ("sd:F", "F", ("F", np.nan, "VI")),
    ("M0.5IIIb", "M", ("M", 0.5, "III")),
])
def test_parse_spectral_type(spt, mk, expected):
    letter, sub, lum = parse_spectral_type(spt, mk)
    assert letter == expected[0] and lum == expected[2]
    assert (np.isnan(sub) and np.isnan(expected[1])) or sub == expected[1]


def test_degrade_matrix_resolution():
    """The builder's kernel turns a 2.5 A (FWHM) line into a lambda/1800 line."""
    build = _build_module()
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


def test_pickles_names():
    build = _build_module()
    assert build._pickles_type("o5v") == ("O", "O5V", 5.0, "V")
    assert build._pickles_type("b57v")[2] == 6.0
    assert build._pickles_type("m2p5v")[2] == 2.5
    assert build._pickles_type("m10iii")[2] == 10.0
    assert build._pickles_type("k01ii")[1:] == ("K0-1II", 0.5, "II")


def test_pickles_reader_on_shared(shared_data, tmp_path):
    """The fixed-width reader copes with the overflowing last line of m10iii.dat."""
    build = _build_module()
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
