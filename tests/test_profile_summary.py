"""Tests for ``scripts/profile_summary.py`` (py-spy collapsed stacks of a scan)."""
from __future__ import annotations

def test_steps_from_class_qualified_frames(tmp_path, load_script):
    """py-spy names methods ``Class.method (file:line)``; every step is found, each sample once per step."""
    base = ("process 1:\"python\";_run_task (distributed/worker.py:2785);"
            "process_partition (lamost_ostar/scan.py:580);OStarStage.process (lamost_ostar/stage.py:987)")
    lines = [
        f"{base};read_items (lamost_ostar/stage.py:710);FITS.__init__ (fitsio/fitslib.py:649) 30",
        f"{base};OStarStage._classify (lamost_ostar/stage.py:1062);prepare (lamost_ostar/preprocess.py:420) 20",
        f"{base};OStarStage._classify (lamost_ostar/stage.py:1062);OStarStage.predict_proba "
        "(lamost_ostar/stage.py:1002);trace_function (tensorflow/x.py:178) 10",
        f"{base};OStarStage._classify (lamost_ostar/stage.py:1090);__init__ (<string>:2) 5",
        "process 1:\"python\";main (lamost_ostar/cli/scan.py:10) 99",   # the client: not a worker sample
    ]
    path = tmp_path / "scan.folded"
    path.write_text("\n".join(lines) + "\n")
    mod = load_script("profile_summary")
    total, steps, own = mod.summarise(mod.load(path), top=3)
    share = dict(steps)
    assert total == 65
    assert share["read files (io: fitsio + header + checks)"] == 30
    assert share["  of which fitsio / cfitsio"] == 30
    assert share["stage: preprocess (resample, standardise, continuum)"] == 20
    assert share["stage: model inference (Keras predict_proba)"] == 10
    assert share["  of which compiling (tf.function tracing)"] == 10
    # only samples whose deepest project frame is _classify itself count as building records
    assert share["stage: result records (per spectrum)"] == 5
    assert own[0] == ("FITS.__init__ (fitsio/fitslib.py:649)", 30)
