"""Tests for lamost_ostar.datasets: splits by star, library realisations, labelled releases."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from lamost_ostar import datasets as ds
from lamost_ostar.preprocess import NPIX


def _toy(n_stars_per_class=(("O", 4), ("F", 10), ("G", 7)), per_star=3, npix=8):
    labels, stars = [], []
    for c, k in n_stars_per_class:
        for s in range(k):
            labels += [c] * per_star
            stars += [f"{c}{s}"] * per_star
    x = np.random.default_rng(0).random((len(labels), npix)).astype(np.float32)
    return ds.LabelledSpectra(x, labels, stars, ["toy"] * len(labels))


def test_split_by_star_disjoint_and_stratified():
    data = _toy()
    parts = ds.split_by_star(data, [0.7, 0.15, 0.15], np.random.default_rng(1))
    ds.assert_disjoint_stars(*parts)
    assert sum(len(p) for p in parts) == len(data)
    for p in parts:  # every split gets at least one star of each class (when there are enough)
        assert set(p.labels) == {"O", "F", "G"}
    # all realisations of a star travel together
    for p in parts:
        for s in np.unique(p.star):
            assert (p.star == s).sum() == 3


def test_split_by_star_few_stars_serves_train_first():
    data = _toy((("O", 1), ("F", 2)))
    tr, va, te = ds.split_by_star(data, [0.7, 0.15, 0.15], np.random.default_rng(0))
    assert set(tr.labels) == {"O", "F"}
    assert "O" not in va.labels and "O" not in te.labels
    ds.assert_disjoint_stars(tr, va, te)


def test_assert_disjoint_detects_shared_star():
    data = _toy()
    with pytest.raises(AssertionError, match="is in split"):
        ds.assert_disjoint_stars(data.subset([0]), data.subset([1]))


def test_resample_count_and_per_class():
    data = _toy()
    rng = np.random.default_rng(0)
    up = ds.resample_count(data.only(["O"]), 30, rng)
    assert len(up) == 30 and set(up.labels) == {"O"}
    down = ds.resample_count(data, 5, rng)
    assert len(down) == 5
    pc = ds.per_class(data, 4, ["F", "G"], rng)
    assert pc.counts() == {"F": 4, "G": 4}


def test_labels_to_indices_and_errors():
    data = _toy()
    assert set(data.y(ds.CLASSES_7)) == {0, 3, 4}
    with pytest.raises(ValueError, match="not one of"):
        data.y(("F", "G"))


@pytest.mark.parametrize("label,mk", [("O", "O"), ("O7V", "O"), ("dM1", "M"), ("gM0", "M"),
                                       ("sdM2", "M"), ("b", "B"), ("", None), ("QSO", None)])
def test_parse_mk(label, mk):
    assert ds.parse_mk(label) == mk


def test_library_o_stars_grouped_and_realised():
    from lamost_ostar.templates import load_templates

    full = load_templates()
    lib = full.select("O", source=("miles", "pickles"))
    ids = ds.library_star_ids(lib)
    assert sorted(set(ids)) == ["HD057060+HD209975+o8iii", "HD057061", "o5v", "o9v"]
    # the STELIB O stars (and the MKCLASS O standards) are split units of their own
    all_o = ds.library_star_ids(full.select("O"))
    assert {"HD030614", "HD046223", "HD269698", "mkclass:O9V"} <= set(all_o)
    # two observations of one star (STELIB lp/ss) and MILES + STELIB duplicates share an id
    b = full.select(star=["HD053929", "HD164353"])
    assert len(set(ds.library_star_ids(b))) == 2 and len(b) == 4
    real = ds.library_realisations(lib, 2, np.random.default_rng(0))
    assert real.x.shape == (12, NPIX)
    assert np.isfinite(real.x).all()
    np.testing.assert_allclose(np.linalg.norm(real.x, axis=1), 1, rtol=1e-4)
    # two realisations of one star differ (noise, RV, reddening)
    assert not np.allclose(real.x[0], real.x[1])


def test_split_library_and_mixtures_stay_in_split():
    from lamost_ostar.templates import load_templates

    lib = load_templates().select(["O", "B"])
    parts = ds.split_library(lib, [0.5, 0.25, 0.25], np.random.default_rng(3))
    id_sets = [set(ds.library_star_ids(p)) for p in parts]
    assert not (id_sets[0] & id_sets[1]) and not (id_sets[0] & id_sets[2]) and not (id_sets[1] & id_sets[2])
    mix = ds.mock_mixtures(parts[0], {"O": 4, "B": 4}, np.random.default_rng(0))
    assert mix.counts() == {"O": 4, "B": 4}
    assert set(mix.star) <= id_sets[0]


def test_seven_class_splits_disjoint_without_lamost():
    plan = ds.SplitPlan(n_per_class=(3, 2, 2))
    splits = ds.build_seven_class_splits(plan, np.random.default_rng(0), lamost=ds.LabelledSpectra.empty(NPIX))
    ds.assert_disjoint_stars(*splits.values())
    for name, part in splits.items():
        assert set(part.labels) == set(ds.CLASSES_7), name
    # the replay recovers the same held-out library stars
    test_lib = ds.replay_split_library(plan, 0, data_dir="/nonexistent")[2]
    assert set(ds.library_star_ids(test_lib)) >= set(splits["test"].star)


def test_load_lamost_real(shared_data):
    data = ds.load_lamost(shared_data)
    assert len(data) > 250 and set(data.labels) == {"A", "F", "G", "K", "M"}
    assert len(np.unique(data.star)) == len(data)  # one spectrum per DESIG in the shared set
    tr, va, te = ds.split_by_star(data, [0.7, 0.15, 0.15], np.random.default_rng(0))
    ds.assert_disjoint_stars(tr, va, te)


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    from lamost_ostar import mock

    out = tmp_path_factory.mktemp("release")
    mock.write_release(out, mock.MockConfig(n=14, preset="balanced", seed=5))
    return out


def test_load_labelled_release_by_path_and_obsid(tiny_release, tmp_path):
    rel = ds.load_labelled_release(tiny_release / "truth.csv", tiny_release)
    assert len(rel.data) == 14 and rel.data.x.shape[1] == NPIX
    assert set(rel.data.labels) == set(ds.CLASSES_7)
    rows = list(csv.DictReader(open(tiny_release / "truth.csv")))
    lab = tmp_path / "labels.csv"
    with open(lab, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["obsid", "class"])
        for r in rows[:5]:
            w.writerow([r["obsid"], r["subclass"]])
        w.writerow(["123", "QSO"])
    rel2 = ds.load_labelled_release(lab, tiny_release)
    assert len(rel2.data) == 5
    assert list(rel2.data.labels) == [r["mk"] for r in rows[:5]]
    assert len(rel2.skipped) == 1


def test_load_labelled_release_bad_csv(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,foo\nx.fits,1\n")
    with pytest.raises(ValueError, match="no class column"):
        ds.load_labelled_release(bad, tmp_path)


def test_blue_only_share_of_every_class_and_the_rest_unchanged():
    """mkclass_fraction adds the same number of blue-only spectra to every class (MKCLASS standards;
    X, which has none, its own templates cut to their band), masked beyond the band, and leaves
    every other spectrum exactly as a build without them."""
    from lamost_ostar.preprocess import grid_wavelength
    from lamost_ostar.templates import load_templates

    lib = load_templates()
    base = ds.DetectorRecipe(n_per_class=16)
    plain = ds.build_detector_training(lib, base, np.random.default_rng(4))
    blue = ds.build_detector_training(lib, ds.DetectorRecipe(n_per_class=16, mkclass_fraction=0.5),
                                      np.random.default_rng(4), extra_rng=np.random.default_rng(5))
    extra = np.isin(blue.source, ["mkclass", "blue_cut"])
    assert np.array_equal(blue.x[~extra], plain.x) and np.array_equal(blue.labels[~extra], plain.labels)
    counts = {c: int(np.sum(blue.labels[extra] == c)) for c in ds.CLASSES_8}
    assert counts == {c: 8 for c in ds.CLASSES_8}
    assert set(blue.labels[blue.source == "blue_cut"]) == {"X"}
    assert all(s.startswith("mkclass:") for s in blue.star[blue.source == "mkclass"])
    lo, hi = ds.mkclass_band(ds.mkclass_training_standards())
    assert 3790 < lo < 3850 and 5550 < hi < 5620
    wave = grid_wavelength()
    red = wave > hi + 20
    assert np.all(blue.normalised[extra][:, red] == 1.0)          # masked as missing: nothing invented
    assert not np.all(blue.normalised[~extra][:, red] == 1.0)


def test_emission_share_replaces_part_of_the_o_and_b_realisations_and_keeps_the_balance():
    """emission_fraction swaps that share of the O and B single-star realisations for ones with
    Balmer emission (source "emission"); every class keeps its count, the blue-only share is drawn
    as without it, and the default draws nothing of it."""
    from lamost_ostar.preprocess import grid_wavelength
    from lamost_ostar.templates import load_templates

    lib = load_templates()
    kw = dict(n_per_class=24, mkclass_fraction=0.5)
    plain = ds.build_detector_training(lib, ds.DetectorRecipe(**kw), np.random.default_rng(4),
                                       extra_rng=np.random.default_rng(5))
    em = ds.build_detector_training(lib, ds.DetectorRecipe(**kw, emission_fraction=0.5, emission_levels=2),
                                    np.random.default_rng(4), extra_rng=np.random.default_rng(5))
    assert "emission" not in set(plain.source)
    for c in ds.CLASSES_8:
        assert np.sum(em.labels == c) == np.sum(plain.labels == c)
    is_em = em.source == "emission"
    assert set(em.labels[is_em]) == {"O", "B"} and is_em.sum() > 0
    blue = np.isin(plain.source, ["mkclass", "blue_cut"])
    assert np.array_equal(em.x[np.isin(em.source, ["mkclass", "blue_cut"])], plain.x[blue])
    # H-alpha stands above its surroundings in the normalised flux of the emission spectra
    wave = grid_wavelength()
    line = np.abs(wave - 6564.6) < 8
    ok = np.all(em.normalised[is_em][:, line] != 1.0, axis=1)     # not masked there
    peak = em.normalised[is_em][ok][:, line].max(axis=1)
    assert np.median(peak) > 1.05


def test_interstellar_recipe_adds_the_features_and_draws_everything_else_the_same():
    """DetectorRecipe.interstellar: the same stars, labels and E(B-V); the spectra differ only
    where the interstellar features are (Na D here), in proportion to the reddening."""
    from lamost_ostar.preprocess import grid_wavelength
    from lamost_ostar.templates import load_templates

    lib = load_templates()
    kw = dict(n_per_class=16, classes=("O", "B", "F"), mix_fraction=0.0)
    plain = ds.build_detector_training(lib, ds.DetectorRecipe(**kw), np.random.default_rng(4))
    ism = ds.build_detector_training(lib, ds.DetectorRecipe(**kw, interstellar=True), np.random.default_rng(4))
    assert np.array_equal(plain.labels, ism.labels) and np.array_equal(plain.star, ism.star)
    assert np.array_equal(plain.meta["ebv"], ism.meta["ebv"])
    wave = grid_wavelength()
    nad = (wave > 5888) & (wave < 5900)
    drop = (plain.normalised[:, nad] - ism.normalised[:, nad]).mean(axis=1)
    red = (plain.meta["ebv"] > 1.0) & np.all(plain.normalised[:, nad] != 1.0, axis=1)
    assert red.sum() >= 5 and np.all(drop[red] > 0.03)
    far = (wave > 4000) & (wave < 4200)
    assert np.abs(plain.normalised[:, far] - ism.normalised[:, far]).mean() < 0.01


def test_mkclass_neighbours_leave_with_a_held_out_star():
    from lamost_ostar.templates import load_templates

    lib = load_templates()
    std = ds.mkclass_training_standards()

    def near(name):
        return set(std.name[ds.mkclass_neighbours(std, lib._take(np.array([lib.index(name)])))])

    # lambda Lep (B0.5 IV): the B0-B1 giants and dwarfs, not the supergiants
    assert near("stelib:HD034816") == {"mkclass:B0III", "mkclass:B0V", "mkclass:B0.7III", "mkclass:B1III",
                                       "mkclass:B1V"}
    assert near("stelib:HD036512") == {"mkclass:B0V"}            # O9.7 V: 0.3 subtypes from B0
    assert near("stelib:HD030614") == {"mkclass:O9Ia", "mkclass:O9Ib", "mkclass:B0Ia", "mkclass:B0Ib"}
    assert "mkclass:O5Ia" in near("stelib:HD269698")             # unknown luminosity class: every class
    wd = lib.select("X")
    assert not ds.mkclass_neighbours(std, wd).any()              # no MK type, no neighbour
