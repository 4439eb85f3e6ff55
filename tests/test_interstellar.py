"""Tests for lamost_ostar.interstellar (interstellar lines and bands of mock spectra)."""
from __future__ import annotations

import numpy as np
import pytest

from lamost_ostar import interstellar
from lamost_ostar.mock import MockConfig, simulate_spectra
from lamost_ostar.templates import air_to_vacuum


WAVE = np.arange(3700.0, 9100.0, 0.25)


def _ew(t: np.ndarray, centre_air: float, half: float) -> np.ndarray:
    c = float(air_to_vacuum(np.array([centre_air]))[0])
    s = (WAVE > c - half) & (WAVE < c + half)
    return np.sum(1.0 - t[:, s], axis=1) * 0.25


def test_no_reddening_no_features_and_values_within_0_1():
    t = interstellar.transmission(WAVE, np.array([0.0, 1.0, 2.5]), np.array([1800.0, 1800.0, 1500.0]),
                                  np.random.default_rng(0))
    assert t.shape == (3, WAVE.size)
    assert np.all(t[0] == 1.0)
    assert np.all((t >= 0.0) & (t <= 1.0))
    # away from every feature the continuum is untouched
    assert np.all(t[:, (WAVE > 4000) & (WAVE < 4200)] == 1.0)


@pytest.mark.parametrize("name,centre,half", [("DIB 4428", 4428.2, 60.0), ("DIB 5780", 5780.5, 8.0),
                                               ("Ca II K", 3933.66, 8.0)])
def test_equivalent_width_follows_the_table_at_any_resolution(name, centre, half):
    ft = next(f for f in interstellar.FEATURES if f.name == name)
    ebv = np.array([0.5, 1.0, 2.0])
    for r in (1500.0, 2200.0):
        ew = _ew(interstellar.transmission(WAVE, ebv, np.full(3, r)), centre, half)
        expect = ft.ew * (ebv if ft.kind == "dib" else np.sqrt(ebv))
        np.testing.assert_allclose(ew, expect, rtol=0.03)
    # the instrument spreads a narrow line: shallower at lower resolution, same area
    lo = interstellar.transmission(WAVE, np.array([1.0]), np.array([1500.0]))
    hi = interstellar.transmission(WAVE, np.array([1.0]), np.array([2200.0]))
    c = float(air_to_vacuum(np.array([centre]))[0])
    k = np.argmin(np.abs(WAVE - c))
    assert lo[0, k] > hi[0, k]


def test_scatter_draws_differ_per_spectrum_around_the_mean():
    n = 400
    t = interstellar.transmission(WAVE, np.ones(n), np.full(n, 1800.0), np.random.default_rng(1))
    ew = _ew(t, 5780.5, 8.0)
    assert ew.std() > 0.05
    assert 0.45 < np.median(ew) < 0.55


def test_mock_interstellar_changes_only_the_features_and_consumes_no_other_draw():
    kw = dict(ebv_ranges={"O": (1.5, 2.0)}, resolution_range=(1800.0, 1800.0), snr_range=(300.0, 600.0))
    a = simulate_spectra(6, "O=1", 4, config=MockConfig(**kw))
    b = simulate_spectra(6, "O=1", 4, config=MockConfig(interstellar=True, **kw))
    assert [t["star"] for t in a.truth] == [t["star"] for t in b.truth]
    assert [t["ebv"] for t in a.truth] == [t["ebv"] for t in b.truth]
    w = a.wavelength
    ok = (a.flux > 0) & (b.flux > 0)
    ratio = np.where(ok, b.flux / np.where(ok, a.flux, 1.0), np.nan)
    nad = (w > 5885) & (w < 5902)
    far = (w > 4000) & (w < 4200)
    assert np.nanmin(ratio[:, nad], axis=1).max() < 0.93       # Na D in every spectrum
    assert np.nanmax(np.abs(ratio[:, far] - 1.0)) < 0.02       # the continuum (noise level shifts ~1 %)


def test_sensitivity_script_scans_both_releases_of_the_same_stars(tmp_path, capsys, load_script):
    """scripts/ism_sensitivity.py end to end: two real mock releases, two real scans, one table."""
    import json

    mod = load_script("ism_sensitivity")
    assert mod.main([str(tmp_path), "--n", "24", "--preset", "O=0.5,B=0.5", "--seed", "2",
                     "--workers", "1"]) == 0
    rep = json.loads((tmp_path / "ism_sensitivity.json").read_text())
    for key in ("plain", "interstellar"):
        assert set(rep[key]) == {"O", "B"}
    # the same stars and S/N in both releases, so the same counts per bin
    assert rep["plain"]["O"]["n"] == rep["interstellar"]["O"]["n"]
    assert "candidates" in capsys.readouterr().out


def test_sensitivity_script_line_evidence_mode(tmp_path, load_script):
    import json

    mod = load_script("ism_sensitivity", "ism_sensitivity_lines")
    assert mod.main([str(tmp_path), "--lines", "12", "--seed", "3"]) == 0
    ev = json.loads((tmp_path / "ism_lines.json").read_text())["evidence"]
    assert len(ev["O"]["heii_sigma"]) == 2 and "heii_detected_b0_b1" in ev["B"]
