"""Tests for lamost_ostar.evaluate: metrics, the paper's protocol on tiny data, the report."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lamost_ostar import evaluate as ev
from lamost_ostar.preprocess import NPIX


def test_confusion_and_metrics():
    y = np.array([0, 0, 1, 2, 2, 2])
    p = np.eye(3)[[0, 1, 1, 2, 2, 0]] * 0.9 + 0.1 / 3
    m = ev.classification_metrics(y, p, ["O", "B", "A"])
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["o_recall"] == pytest.approx(0.5)
    assert m["o_precision"] == pytest.approx(0.5)
    assert m["precision"]["B"] == pytest.approx(0.5)
    assert 0 <= m["ece"] <= 1


def test_evaluation_command_names_overrides():
    cfg = ev.EvalConfig.from_profile("small")
    assert ev.evaluation_command(cfg) == ("python scripts/evaluate_paper.py --profile small --seed 0 "
                                          "--out runs/evaluation")
    assert cfg.override(runs=10, gan_iterations=2000, epochs=None) is cfg and cfg.epochs == 15
    with pytest.raises(ValueError, match="cannot be overridden"):
        cfg.override(seed=3)
    assert ev.evaluation_command(cfg) == ("python scripts/evaluate_paper.py --profile small --runs 10 "
                                          "--gan-iterations 2000 --seed 0 --out runs/evaluation")
    assert ev.evaluation_command(cfg, out="/tmp/x").endswith("--out /tmp/x")
    cfg.survey = False
    assert "--gan-iterations 2000 --no-survey --seed 0" in ev.evaluation_command(cfg)


def test_reproduce_command_does_not_overwrite_the_committed_report():
    """The command quoted in a report writes elsewhere than reports/evaluation (and git ignores it)."""
    import shlex
    import subprocess
    from pathlib import Path

    args = shlex.split(ev.evaluation_command(ev.EvalConfig.from_profile("small")))
    out = args[args.index("--out") + 1]
    repo = Path(__file__).resolve().parents[1]
    assert (repo / out).resolve() != (repo / "reports" / "evaluation").resolve()
    if (repo / ".git").exists():
        assert subprocess.run(["git", "check-ignore", "--no-index", "-q", f"{out}/report.md"],
                              cwd=repo).returncode == 0


def test_profiles():
    assert ev.EvalConfig.from_profile("paper").runs == 10
    with pytest.raises(ValueError, match="unknown profile"):
        ev.EvalConfig.from_profile("huge")


def test_tiny_protocol_writes_report(tmp_path):
    cfg = ev.EvalConfig.from_profile("tiny")
    cfg.gan_iterations = 1
    cfg.survey = False
    said: list[str] = []
    path = ev.run_evaluation(cfg, tmp_path, data_dir=tmp_path / "no-shared-data",
                             log=lambda *a: said.append(" ".join(map(str, a))))
    text = path.read_text()
    # without the shared data: a warning, and the report says what was used instead
    assert any(line.startswith("WARNING: no shared LAMOST data") for line in said), said
    assert "shared LAMOST DR1/DR7" not in text
    assert "Real F/G/K: **none**" in text and "no-shared-data" in text
    assert "--out runs/evaluation" in text
    for heading in ("## Data (paper's Table 1", "## GAN-train / GAN-test", "## Recogniser accuracy",
                    "## CPU timings", "## The 7-class model"):
        assert heading in text
    assert "91.5 %" in text and "95.5 %" in text  # the paper's Table 2 next to ours
    for png in ("real_vs_generated.png", "real_vs_generated_helium.png", "accuracy_vs_iteration.png",
                "confusion_4class.png"):
        assert (tmp_path / png).stat().st_size > 1000
    res = json.loads((tmp_path / "results.json").read_text())
    run = res["runs"][0]
    assert run["ds2_stars"] == [run["held_out_o"]]
    # never report on a star a model saw: DS2's O unit is not in DS1
    from lamost_ostar.datasets import library_star_ids
    from lamost_ostar.templates import load_templates
    # the real O stars (the blue-only MKCLASS averages are not part of the protocol)
    n_o_units = len(set(library_star_ids(load_templates().select("O", source=["miles", "stelib", "pickles"]))))
    assert run["held_out_o"] not in run["ds1_stars"] and len(run["ds1_stars"]) == n_o_units - 1
    for kind in ("lcgan", "sgan"):
        ck = run["checkpoints"][kind]["1"]
        for key in ("gan_train", "gan_test", "acc_real_o"):
            assert 0.0 <= ck[key] <= 1.0
    # the GAN-train ceiling: real DS1 spectra scored in place of generated ones
    assert 0.0 <= run["oracle"]["gan_train"] <= 1.0
    assert "reference: real DS1 spectra" in text
    assert res["data"]["fgk_real"]["n_spectra"] == 0
    # the report names the O stars and split units it used (from the data, not a fixed text)
    assert len(res["data"]["o_units"]) == n_o_units
    assert f"the {len(res['data']['o_stars'])} real O stars of the template library" in text
    assert f"{n_o_units} O units" in text and "HD030614" in text
    # finished runs are kept while a long evaluation is still going
    assert json.loads((tmp_path / "results.partial.json").read_text())["runs"][0]["run"] == 0


def test_survey_evaluation_structure(tmp_path):
    import keras

    from lamost_ostar.models import registry

    inp = keras.Input((NPIX, 1))
    out = keras.layers.Dense(7)(keras.layers.GlobalAveragePooling1D()(inp))
    v = registry.save_model_version(keras.Model(inp, out), tmp_path, {"classes": list("OBAFGKM")})
    res = ev.survey_evaluation(v, tmp_path, data_dir=tmp_path / "none", n=40, n_enriched=2)
    ss = res["survey_sample"]
    assert ss["n"] == 40 and ss["n_non_o"] + ss["n_o"] == 40
    assert 0 <= ss["false_o_per_million_non_o"] <= 1e6
    assert "formula" in res["derived"]
    assert res["enriched"]["metrics"]["support"]["O"] == 2
