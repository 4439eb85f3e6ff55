"""Tests for ``lamost-ostar models list|show``, ``retrain`` and ``evaluate`` (CLI layer)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lamost_ostar.cli import main
from lamost_ostar.preprocess import NPIX


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def _assert_one_line_error(res, fragment: str) -> None:
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and fragment in errors[0], res.output


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    import keras

    from lamost_ostar.models import registry

    root = tmp_path_factory.mktemp("models")
    inp = keras.Input((NPIX, 1))
    out = keras.layers.Dense(7)(keras.layers.GlobalAveragePooling1D()(inp))
    model = keras.Model(inp, out)
    confusion = [[3 if i == j else (1 if j == (i + 1) % 7 else 0) for j in range(7)] for i in range(7)]
    card = {"classes": list("OBAFGKM"), "temperature": 1.5,
            "metrics": {"test": {"n": 28, "accuracy": 0.5, "o_recall": 0.25, "o_precision": 0.75,
                                 "classes": list("OBAFGKM"), "confusion": confusion},
                        "history": {"accuracy": [0.1, 0.2]}},
            "training_data": {"augmentation": "none", "description": "tiny test model"}}
    v1 = registry.save_model_version(model, root, card)
    v2 = registry.save_model_version(model, root, dict(card, temperature=2.0))
    (root / "incomplete").mkdir()  # a save in progress: ignored
    return root, [v1, v2]


def test_models_list_shows_every_version(models_dir):
    root, versions = models_dir
    res = run("models", "list", "--models-dir", str(root))
    assert res.exit_code == 0, res.output
    for v in versions:
        assert v in res.output
    assert "incomplete" not in res.output
    assert "user" in res.output
    assert "0.750" in res.output  # O precision column
    res = run("models", "list", "--models-dir", str(root), "--json")
    cards = json.loads(res.output)
    assert {c["version"] for c in cards if c["origin"] == "user"} == set(versions)


def test_models_list_marks_the_default(models_dir, tmp_path):
    root, versions = models_dir
    res = run("models", "list", "--models-dir", str(root))
    marked = [ln for ln in res.output.splitlines() if ln.startswith("*") and "default" not in ln]
    assert len(marked) == 1 and versions[1] in marked[0], res.output  # newest user version
    assert "default" in res.output.splitlines()[-1]
    cards = json.loads(run("models", "list", "--models-dir", str(root), "--json").output)
    assert [c["version"] for c in cards if c["default"]] == [versions[1]]
    # without user versions the newest packaged version is the default
    from lamost_ostar.models.registry import PACKAGED_MODELS_DIR, list_versions

    newest = list_versions(PACKAGED_MODELS_DIR)[-1]["version"]
    res = run("models", "list", "--models-dir", str(tmp_path / "none"))
    marked = [ln for ln in res.output.splitlines() if ln.startswith("* ")]
    assert len(marked) == 2 and newest in marked[0], res.output


def test_models_show(models_dir):
    root, versions = models_dir
    res = run("models", "show", versions[0], "--models-dir", str(root), "--json")
    assert res.exit_code == 0, res.output
    card = json.loads(res.output)
    assert card["version"] == versions[0] and card["temperature"] == 1.5 and card["default"] is False
    res = run("models", "show", "--models-dir", str(root), "--json")  # default: newest user version
    assert json.loads(res.output)["version"] == versions[1]


def test_models_show_is_readable(models_dir):
    root, versions = models_dir
    res = run("models", "show", "--models-dir", str(root))
    assert res.exit_code == 0, res.output
    text = res.output
    assert not text.lstrip().startswith("{")
    assert f"model {versions[1]}  (user, default for scan)" in text.splitlines()[0]
    assert "tiny test model" in text and "2.000" in text  # its temperature
    # a metrics table (not the training history) and the confusion matrix with its labels
    (row,) = [ln for ln in text.splitlines() if ln.strip().startswith("test ")]
    assert row.split()[1:5] == ["28", "0.500", "0.250", "0.750"]
    assert "history" not in text
    assert "confusion matrix (test" in text
    (o_row,) = [ln for ln in text.splitlines() if ln.split()[:1] == ["O"] and ln.split()[1].isdigit()]
    assert o_row.split()[:8] == ["O", "3", "1", "0", "0", "0", "0", "0"]
    header = [ln for ln in text.splitlines() if ln.split()[:7] == list("OBAFGKM")]
    assert header, text
    res = run("models", "show", versions[0], "--models-dir", str(root))
    assert f"model {versions[0]}  (user)" in res.output.splitlines()[0]


def test_models_show_unknown_version(models_dir):
    root, _ = models_dir
    _assert_one_line_error(run("models", "show", "nope", "--models-dir", str(root)), "no model version")


def test_retrain_bad_arguments(tmp_path):
    _assert_one_line_error(run("retrain", "--release", str(tmp_path)), "--labels")
    _assert_one_line_error(run("retrain", "--labels", str(tmp_path / "x.csv"), "--release", str(tmp_path)),
                           "x.csv")
    lab = tmp_path / "l.csv"
    lab.write_text("path,foo\na.fits,1\n")
    _assert_one_line_error(run("retrain", "--labels", str(lab), "--release", str(tmp_path),
                               "--models-dir", str(tmp_path / "m")), "no class column")
    lab.write_text("path,mk\na.fits,O\n")
    _assert_one_line_error(run("retrain", "--labels", str(lab), "--release", str(tmp_path),
                               "--models-dir", str(tmp_path / "m"), "--epochs", "0"), "--epochs")
    _assert_one_line_error(run("retrain", "--labels", str(lab), "--release", str(tmp_path),
                               "--models-dir", str(tmp_path / "m"), "--quiet"), "no usable labelled spectra")
    _assert_one_line_error(run("retrain", "--labels", str(lab), "--release", str(tmp_path),
                               "--model-kind", "ens-cnn2-svm"), "unknown --model-kind")


def test_evaluate_bad_arguments(tmp_path):
    _assert_one_line_error(run("evaluate", "--profile", "huge"), "--profile")
    _assert_one_line_error(run("evaluate", "--runs", "0"), "--runs")
    _assert_one_line_error(run("evaluate", "--checkpoint-every", "0"), "--checkpoint-every")
    _assert_one_line_error(run("evaluate", "--data-dir", str(tmp_path / "none")), "--data-dir")
    _assert_one_line_error(run("evaluate", "--protocol", "loso", "--profile", "small"), "profile")
    _assert_one_line_error(run("evaluate", "--protocol", "loso", "--models", "cnn9"), "cnn9")
    _assert_one_line_error(run("evaluate", "--protocol", "loso", "--folds", "a,b"), "--folds")
    _assert_one_line_error(run("evaluate", "--protocol", "nope"), "--protocol")


def test_evaluate_loso_tiny_writes_report(tmp_path):
    res = run("evaluate", "--protocol", "loso", "--profile", "tiny", "--models", "lr2",
              "--out", str(tmp_path / "loso"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "loso" / "report.md").is_file() and (tmp_path / "loso" / "oof_lr2.npz").is_file()


def test_models_list_figures_are_the_clean_checks_mean_where_a_card_has_them():
    """A rule applied to another recipe lists its clean checks' mean, not the calibration run's own point."""
    from lamost_ostar.cli.models import loso_figures

    op = {"o_recall_star_averaged_snr_ge_10": 0.93, "false_o_per_million": 99.0}
    card = {"metrics": {"loso": {"tables": {"operating_point": op}}}}
    assert loso_figures(card) == (0.93, 99.0)
    card["metrics"]["loso"]["clean_checks"] = {
        "a.json": {"o_recall_star_averaged_snr_ge_10": 0.92, "false_o_per_million": 120.0},
        "b.json": {"o_recall_star_averaged_snr_ge_10": 0.96, "false_o_per_million": 30.0}}
    rec, fpm = loso_figures(card)
    assert rec == pytest.approx(0.94) and fpm == pytest.approx(75.0)
    assert loso_figures({"metrics": {"test": {"accuracy": 0.6}}}) == (None, None)
