"""The README stays true: its worked plugin example runs as written, and its flag table is the code's."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


def _example_module() -> types.ModuleType:
    text = (REPO / "README.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if b.startswith("# my_plugin/stage.py")]
    mod = types.ModuleType("readme_blue_plugin")
    sys.modules[mod.__name__] = mod
    exec(compile(code, "README.md", "exec"), mod.__dict__)
    return mod


def test_the_worked_plugin_example_runs(tmp_path):
    from lamost_ostar.catalogue import Catalogue
    from lamost_ostar.cli import main
    from lamost_ostar.io import read_spectrum
    from lamost_ostar.stage import Stage, StageResult, stage_spec

    mod = _example_module()
    stage = mod.BlueStage()
    assert isinstance(stage, Stage) and stage_spec(stage).output_names == ("blue_red", "is_blue")
    items = [str(DATA / "io_image_dr7.fits"), str(DATA / "io_truncated.fits"),
             read_spectrum(DATA / "io_coadd_dr9.fits.gz")]
    res = stage.process(items)
    assert [r.ok for r in res] == [True, False, True] and res[1].error_reason == "truncated"
    assert isinstance(res[0].blue_red, float) and res[0].is_blue == (res[0].blue_red > 1)
    db = tmp_path / "cat.sqlite"
    with Catalogue(db) as cat:
        cat.write(None, res, stage=stage)
        cat.write(None, [StageResult(r.path, True, p_o=0.2, model_version="m1") for r in res if r.ok])
    out = CliRunner().invoke(main, ["query", "--db", str(db), "--all", "--with", "blue", "--where",
                                    "blue.blue_red > 0", "--format", "csv"])
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines()[0].endswith("blue.model_version,blue.blue_red,blue.is_blue")
    assert len(out.stdout.splitlines()) == 3


def test_flag_table_matches_the_code():
    from lamost_ostar.stage import FLAG_NAMES

    text = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| `(\w+)` \|", text, re.M))
    assert {int(k): v for k, v in rows.items()} == FLAG_NAMES
