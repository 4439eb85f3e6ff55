"""Tests for :mod:`lamost_ostar.stage` (the plugin API) on real fixture files.

The model is a tiny untrained Keras model of the right shape, saved through the
registry into a temporary models directory: the tests check the plumbing
(order, errors, probabilities, flags, devices, entry points), not the science.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from lamost_ostar.io import read_spectrum
from lamost_ostar.preprocess import NPIX
from lamost_ostar.stage import (
    FLAG_EDGE, FLAG_LOW_CONFIDENCE, FLAG_LOW_SNR, FLAG_MASKED, FLAG_NO_SNR, FLAG_NOT_STAR,
    OStarStage, Stage, StageResult, available_stages, decode_flags, load_stage,
    quality_flags, resolve_device,
)

DATA = Path(__file__).resolve().parent / "data"
CLASSES = ("O", "B", "A", "F", "G", "K", "M")
GOOD = ["io_image_dr7.fits", "io_image_dr6.fits.gz", "io_dr1_gzip.fits", "io_coadd_dr9.fits.gz"]
BAD = {"io_truncated.fits": "truncated", "io_not_fits.fits": "not_fits",
       "io_medres.fits": "medium_resolution", "io_zero_ivar.fits.gz": "no_usable_pixels"}


def save_tiny_model(models_dir: Path, seed: int = 0, **card) -> str:
    """A tiny (NPIX, 1) -> 7 logits Keras model saved as a registry version (``card``: more card keys)."""
    import keras

    from lamost_ostar.models.registry import save_model_version

    keras.utils.set_random_seed(seed)
    inp = keras.Input((NPIX, 1))
    h = keras.layers.Conv1D(4, 32, strides=16, activation="relu")(inp)
    h = keras.layers.GlobalAveragePooling1D()(h)
    out = keras.layers.Dense(len(CLASSES))(h)
    model = keras.Model(inp, out)
    return save_model_version(model, models_dir, {
        "classes": CLASSES, "temperature": 1.5, "prefix": "tiny",
        "training_data": "untrained test model (random weights)", **card})


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_tiny_model(root)
    return root


@pytest.fixture(scope="module")
def stage(models_dir) -> OStarStage:
    return OStarStage(models_dir=models_dir, device="cpu", batch_size=256)


def test_stage_result_contract_fields():
    names = [f.name for f in fields(StageResult)]
    assert names == ["path", "ok", "error_reason", "error_message", "obsid", "designation",
                     "ra", "dec", "lmjd", "planid", "spid", "fiberid", "snr_g", "snr_r",
                     "snr_i", "pipeline_class", "pipeline_subclass", "data_release", "layout",
                     "probs", "p_o", "predicted_class", "flags", "model_version",
                     "posterior_o", "is_candidate", "heii_sigma", "evidence", "o_score"]


def test_process_files_in_input_order_with_errors(stage):
    names = [GOOD[0], "io_truncated.fits", GOOD[1], "io_not_fits.fits", GOOD[2],
             "io_medres.fits", GOOD[3], "io_zero_ivar.fits.gz", GOOD[0]]
    res = stage.process([str(DATA / n) for n in names])
    assert [Path(r.path).name for r in res] == names
    for name, r in zip(names, res):
        assert r.model_version == stage.model_version
        if name in BAD:
            assert not r.ok and r.error_reason == BAD[name] and r.error_message
            assert r.probs is None and r.p_o is None and r.predicted_class is None
        else:
            assert r.ok and r.error_reason is None
            assert list(r.probs) == list(CLASSES)
            assert sum(r.probs.values()) == pytest.approx(1.0, abs=1e-5)
            assert r.p_o == r.probs["O"]
            assert r.predicted_class == max(r.probs, key=r.probs.get)
    dr7 = res[0]
    assert (dr7.obsid, dr7.pipeline_subclass, dr7.layout) == (677503031, "G3", "image")
    assert dr7.snr_g == pytest.approx(153.72) and dr7.data_release == "LAMOST DR7"
    assert res[-1].probs == pytest.approx(dr7.probs)  # a repeated path gets its own result


def test_spectrum_records_and_batch_size_give_the_same_probabilities(stage, models_dir):
    paths = [str(DATA / n) for n in GOOD]
    from_paths = stage.process(paths)
    from_records = stage.process([read_spectrum(p) for p in paths])
    small = OStarStage(model_version=stage.model_version, models_dir=models_dir,
                       device="cpu", batch_size=1).process(paths)
    for a, b, c in zip(from_paths, from_records, small):
        assert a.path == b.path == c.path
        np.testing.assert_allclose(list(a.probs.values()), list(b.probs.values()), atol=1e-6)
        np.testing.assert_allclose(list(a.probs.values()), list(c.probs.values()), atol=1e-5)
    assert stage.process([]) == []


def test_real_lamost_spectra(stage, shared_data):
    files = sorted((shared_data / "lamost").glob("*/*.fits*"))[::10]
    if not files:
        pytest.skip("no LAMOST files in shared data")
    res = stage.process(files)
    assert len(res) == len(files)
    ok = [r for r in res if r.ok]
    assert len(ok) >= len(files) - 1
    assert all(np.isfinite(r.p_o) and 0 <= r.p_o <= 1 for r in ok)
    # GALAXY/QSO/Unknown pipeline classes are flagged, stars are not
    for r in ok:
        assert bool(r.flags & FLAG_NOT_STAR) == (r.pipeline_class not in ("STAR", None))


def test_quality_flags_vectorised():
    mask = np.zeros((5, NPIX), bool)
    mask[2, : int(0.3 * NPIX)] = True          # 30 % masked, blue end missing
    mask[3, -150:] = True                      # red end missing
    flags = quality_flags(mask, 1 - mask.mean(axis=1), np.array([50, 5, 50, np.nan, 50]),
                          ["STAR", "STAR", "STAR", None, "GALAXY"],
                          max_prob=np.array([0.9, 0.9, 0.9, 0.9, 0.3]))
    assert flags[0] == 0
    assert flags[1] == FLAG_LOW_SNR
    assert flags[2] == FLAG_MASKED | FLAG_EDGE
    assert flags[3] == FLAG_NO_SNR | FLAG_EDGE
    assert flags[4] == FLAG_NOT_STAR | FLAG_LOW_CONFIDENCE
    assert decode_flags(int(flags[2])) == ["masked", "edge"]


def test_devices():
    assert resolve_device("cpu") == "cpu:0"
    assert resolve_device("auto") in ("cpu:0", "gpu:0")
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if resolve_device("auto") == "cpu:0":
        with pytest.raises(RuntimeError, match="sees no GPU"):
            resolve_device("gpu")


def test_entry_points(models_dir, stage):
    assert available_stages()["ostar"] == "lamost_ostar.stage:OStarStage"
    loaded = load_stage("ostar", models_dir=models_dir, device="cpu", batch_size=8)
    assert isinstance(loaded, OStarStage) and isinstance(loaded, Stage)
    assert loaded.model_version == stage.model_version
    direct = load_stage("lamost_ostar.stage:OStarStage", models_dir=models_dir, device="cpu")
    assert direct.model_version == stage.model_version
    with pytest.raises(LookupError, match="no stage named 'nope'"):
        load_stage("nope")


def test_unknown_model_version(models_dir):
    from lamost_ostar.models.registry import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        OStarStage(model_version="does-not-exist", models_dir=models_dir)


@pytest.mark.parametrize("engine", ["fitsio", "astropy"])
def test_read_engines_give_the_same_results(stage, models_dir, engine):
    # the stage reads with io.DEFAULT_ENGINE (native); the other engines give the same results
    paths = [str(DATA / n) for n in GOOD + sorted(BAD)]
    other = OStarStage(model_version=stage.model_version, models_dir=models_dir,
                       device="cpu", read_engine=engine).process(paths)
    for a, b in zip(stage.process(paths), other):
        assert (a.path, a.ok, a.error_reason, a.predicted_class) == \
            (b.path, b.ok, b.error_reason, b.predicted_class)
        if a.ok:
            np.testing.assert_allclose(list(a.probs.values()), list(b.probs.values()), atol=1e-6)
    assert stage.read_engine == "native"
    with pytest.raises(ValueError, match="read_engine"):
        OStarStage(models_dir=models_dir, read_engine="cfitsio2")


@pytest.mark.parametrize("which", ["tiny", "packaged default"])
def test_process_prepared_gives_the_results_of_process(which, stage):
    """A scan's shared preprocessing (``process_prepared``) changes no result."""
    from lamost_ostar.preprocess import prepare
    from lamost_ostar.stage import accepts_prepared

    st = stage if which == "tiny" else OStarStage(device="cpu", batch_size=2)
    spectra = [read_spectrum(str(DATA / n)) for n in GOOD]
    own = st.process(spectra)
    prep = prepare(spectra, continuum=True)
    shared = st.process_prepared(spectra, prep)
    assert accepts_prepared(st)
    assert [r.path for r in shared] == [r.path for r in own]
    for a, b in zip(own, shared):
        assert a.ok == b.ok and a.flags == b.flags and a.is_candidate == b.is_candidate
        np.testing.assert_allclose(list(a.probs.values()), list(b.probs.values()), atol=1e-6)
        assert (a.heii_sigma is None) == (b.heii_sigma is None)
        if a.heii_sigma is not None:
            assert a.heii_sigma == pytest.approx(b.heii_sigma, rel=1e-4, abs=1e-6)
    # a subset of the batch: the rows of the spectra a stage still needs
    rows = [3, 0]
    sub = st.process_prepared([spectra[i] for i in rows], prep.subset(rows))
    assert [r.path for r in sub] == [own[i].path for i in rows]
    np.testing.assert_allclose([r.p_o for r in sub], [own[i].p_o for i in rows], atol=1e-6)
    with pytest.raises(ValueError, match="prepared batch of 4"):
        st.process_prepared(spectra[:2], prep)


def test_lean_keras_import_skips_matplotlib_and_sklearn_and_still_classifies():
    """LAMOST_OSTAR_LEAN_KERAS=1 (the scan's local workers): Keras without its optional
    plotting / scikit-learn imports; the stage classifies, and both packages import later."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from lamost_ostar.stage import OStarStage\n"
        f"r = OStarStage().process([{str(DATA / GOOD[0])!r}])\n"
        "assert r[0].ok and r[0].p_o is not None, r[0]\n"
        "print('skipped', 'sklearn' not in sys.modules and 'matplotlib' not in sys.modules)\n"
        "import sklearn, matplotlib\n"
        "print('importable', sklearn.__name__, matplotlib.__name__)\n")
    env = {**os.environ, "LAMOST_OSTAR_LEAN_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "skipped True" in out.stdout and "importable sklearn matplotlib" in out.stdout


@pytest.mark.parametrize("class_veto", [True, False])
def test_pipeline_class_veto_on_a_real_lamost_galaxy(models_dir, class_veto):
    """A real DR7 galaxy (pipeline CLASS GALAXY) is never a candidate unless the veto is off.

    The rule is made to accept everything, so that only the veto can say no; the
    stars keep their verdict either way.
    """
    from lamost_ostar.models.decision import Decision
    from lamost_ostar.stage import FLAG_CLASS_VETO

    st = OStarStage(models_dir=models_dir, device="cpu", class_veto=class_veto)
    st.decision = Decision.balanced(CLASSES, min_posterior=0.0)   # every spectrum passes the rule
    res = st.process([str(DATA / "io_galaxy_dr7.fits.gz"), str(DATA / "io_image_dr7.fits")])
    galaxy, star = res
    assert galaxy.ok and galaxy.pipeline_class == "GALAXY" and galaxy.flags & FLAG_NOT_STAR
    assert star.ok and star.is_candidate and not star.flags & FLAG_CLASS_VETO
    if class_veto:
        assert galaxy.is_candidate is False and galaxy.flags & FLAG_CLASS_VETO
        assert "class_veto" in decode_flags(galaxy.flags)
    else:
        assert galaxy.is_candidate is True and not galaxy.flags & FLAG_CLASS_VETO
    # the rule says no: no veto flag (the flag marks candidates the veto removed)
    st.decision = Decision.balanced(CLASSES, min_posterior=1.1)
    (again,) = st.process([str(DATA / "io_galaxy_dr7.fits.gz")])
    assert again.is_candidate is False and not again.flags & FLAG_CLASS_VETO


def test_evidence_records_convert_column_by_column_like_value_by_value():
    """The evidence dicts: Python bool/int/float, None for NaN, the same values as a per-value
    conversion, on the real fixtures (some lines unmeasurable: NaN) and on an empty batch."""
    from lamost_ostar import lines
    from lamost_ostar.preprocess import prepare
    from lamost_ostar.stage import EVIDENCE_COMBINED, EVIDENCE_FIELDS, evidence_records

    spectra = [read_spectrum(str(DATA / n)) for n in GOOD + ["io_nan_few.fits.gz", "io_galaxy_dr7.fits.gz"]]
    prep = prepare(spectra, continuum=True)
    m = lines.measure_lines(prep.flux, prep.ivar, prep.mask)
    got = evidence_records(m)
    assert len(got) == len(spectra)
    saw_none = False
    for i, rec in enumerate(got):
        assert list(rec) == list(EVIDENCE_FIELDS)
        for key, v in rec.items():
            if key in EVIDENCE_COMBINED:
                ref = np.asarray(getattr(m, key))[i]
            else:
                ew, err = m.ew_of(key[3:-4] if key.endswith("_err") else key[3:])
                ref = (err if key.endswith("_err") else ew)[i]
            if isinstance(ref, (bool, np.bool_)):
                assert v is bool(ref)
            elif isinstance(ref, (int, np.integer)):
                assert type(v) is int and v == int(ref)
            elif np.isfinite(ref):
                assert type(v) is float and v == float(ref)
            else:
                assert v is None
                saw_none = True
    assert saw_none
    assert evidence_records(lines.measure_lines(prep.flux[:0], prep.ivar[:0], prep.mask[:0])) == []


def test_snr_floor_keeps_noise_spectra_from_being_candidates(models_dir):
    """A real spectrum given S/N(g) 2 is not a candidate (flag snr_floor) under the default floor;
    with min_snr_g=0 it is; unknown S/N passes; the flag marks only what the rule had kept."""
    import dataclasses

    from lamost_ostar.models.decision import Decision
    from lamost_ostar.stage import FLAG_SNR_FLOOR

    sp = read_spectrum(str(DATA / "io_image_dr7.fits"))
    faint = dataclasses.replace(sp, snr={**(sp.snr or {}), "g": 2.0}, path="faint")
    unknown = dataclasses.replace(sp, snr={}, path="unknown")
    st = OStarStage(models_dir=models_dir, device="cpu")
    assert st.min_snr_g == 3.0
    st.decision = Decision.balanced(CLASSES, min_posterior=0.0)   # every spectrum passes the rule
    r_faint, r_bright, r_unknown = st.process([faint, sp, unknown])
    assert r_faint.is_candidate is False and r_faint.flags & FLAG_SNR_FLOOR and "snr_floor" in decode_flags(r_faint.flags)
    assert r_bright.is_candidate is True and not r_bright.flags & FLAG_SNR_FLOOR
    assert r_unknown.is_candidate is True and r_unknown.flags & FLAG_NO_SNR
    off = OStarStage(models_dir=models_dir, device="cpu", min_snr_g=0)
    off.decision = st.decision
    (again,) = off.process([faint])
    assert off.min_snr_g is None and again.is_candidate is True and not again.flags & FLAG_SNR_FLOOR


# -- inference engine (numpy runtime or Keras): the policy and the agreement
def test_resolve_engine_policy(monkeypatch, tmp_path):
    from lamost_ostar import stage as stagemod
    from lamost_ostar.stage import ENGINE_ENV, resolve_engine

    monkeypatch.delenv(ENGINE_ENV, raising=False)
    assert resolve_engine("cpu") == "numpy"
    assert resolve_engine("gpu") == "keras"
    assert resolve_engine("cpu", "keras") == "keras"
    monkeypatch.setattr(stagemod, "GPU_DEVICE_FILES", (str(tmp_path / "nvidia[0-9]*"),))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert resolve_engine("auto") == "numpy"
    (tmp_path / "nvidia0").touch()
    assert resolve_engine("auto") == "keras"  # Keras then decides whether it can use the GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # every GPU hidden
    assert resolve_engine("auto") == "numpy"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv(ENGINE_ENV, "numpy")
    assert resolve_engine("auto") == "numpy"
    monkeypatch.setenv(ENGINE_ENV, "tpu")
    with pytest.raises(ValueError, match=ENGINE_ENV):
        resolve_engine("auto")
    monkeypatch.delenv(ENGINE_ENV)
    with pytest.raises(ValueError, match="CPU only"):
        resolve_engine("gpu", "numpy")
    with pytest.raises(ValueError, match="engine must be one of"):
        resolve_engine("cpu", "onnx")


def test_numpy_and_keras_engines_give_the_same_results(models_dir):
    files = [str(DATA / f) for f in GOOD + list(BAD)]
    by_numpy = OStarStage(models_dir=models_dir, device="cpu", engine="numpy").process(files)
    by_keras = OStarStage(models_dir=models_dir, device="cpu", engine="keras").process(files)
    assert [r.ok for r in by_numpy] == [r.ok for r in by_keras]
    for a, b in zip(by_numpy, by_keras):
        assert a.error_reason == b.error_reason and a.flags == b.flags
        assert a.predicted_class == b.predicted_class and a.is_candidate == b.is_candidate
        if a.ok:
            np.testing.assert_allclose(a.p_o, b.p_o, rtol=1e-4, atol=1e-6)


def test_engine_falls_back_to_keras_for_a_model_numpy_cannot_run(tmp_path, caplog):
    import keras

    from lamost_ostar.models.registry import save_model_version

    inp = keras.Input((NPIX, 1))
    h = keras.layers.Conv1D(2, 8, strides=64, dilation_rate=1)(inp)
    h = keras.layers.LSTM(3)(h)  # no numpy evaluation
    save_model_version(keras.Model(inp, keras.layers.Dense(len(CLASSES))(h)), tmp_path,
                       {"classes": CLASSES, "prefix": "lstm"})
    st = OStarStage(models_dir=tmp_path, device="cpu")
    assert st.engine == "keras" and "using Keras" in caplog.text
    from lamost_ostar.models.numpy_runtime import UnsupportedModelError

    with pytest.raises(UnsupportedModelError):
        OStarStage(models_dir=tmp_path, device="cpu", engine="numpy")


def test_value_columns_give_the_values_of_metadata_and_output_values(stage):
    """``StageSpec.value_columns`` (what the catalogue writes a batch with) holds, column by
    column, exactly what ``metadata_values`` + ``output_values`` give result by result: on real
    results, on mappings, with numpy scalars, NaN, inf, None, strings with blanks and nested JSON."""
    from lamost_ostar.stage import OutputField, StageSpec, stage_spec

    real = [r for r in stage.process([str(DATA / n) for n in GOOD]) if r.ok]
    odd = dict(vars(real[0]))
    odd.update(path="odd.fits", ra=np.float32(12.5), snr_g=float("nan"), snr_r=float("inf"),
               obsid=np.int64(7), planid="  ", p_o=np.float64(0.25), flags=np.int32(3),
               probs={"O": np.float32(0.25), "B": float("nan")}, is_candidate=np.bool_(True))
    for spec, results in ((stage_spec(stage), real + [odd]),
                          (StageSpec(name="plain", version="plain-1", outputs=(
                              OutputField("a", "float"), OutputField("n", "int"),
                              OutputField("s", "str"), OutputField("j", "json"),
                              OutputField("b", "bool"))),
                           [{"a": 1.5, "n": 2, "s": " x ", "j": {"k": [1, (2, 3)]}, "b": 0},
                            {"a": np.nan, "n": np.int16(4), "s": b"y", "j": {"q": 1.0}, "b": None},
                            {"a": "3.5", "n": 2.0, "s": None, "j": None, "b": True, "ra": -1.0},
                            {}])):
        cols = spec.value_columns(results)
        for i, r in enumerate(results):
            row = {**spec.metadata_values(r), **spec.output_values(r)}
            assert list(row) == list(cols)
            for name, v in row.items():
                w = cols[name][i]
                assert type(w) is type(v) and (w == v or (v != v and w != w)), (name, v, w)
    empty = stage_spec(stage).value_columns([])
    assert empty and all(v == [] for v in empty.values())
