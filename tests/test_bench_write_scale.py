"""Smoke test of ``scripts/bench_write_scale.py``: both modes write every row and end with every index."""
from __future__ import annotations

import shutil
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_write_scale.py"
DATA = Path(__file__).resolve().parent / "data"


def test_both_modes_write_every_row_and_end_with_every_index(tmp_path, capsys, monkeypatch, load_script):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))         # it imports its sibling bench_write
    mod = load_script("bench_write_scale")
    rel = tmp_path / "rel"
    rel.mkdir()
    for name in ("io_image_dr7.fits", "io_coadd_dr9.fits.gz", "io_image_dr6.fits.gz"):
        shutil.copy(DATA / name, rel / name)
    mod.main([str(rel), "--rows", "700", "--every", "300"])
    out = capsys.readouterr().out
    assert "3 classified results from 3 files" in out
    for mode in ("kept", "deferred"):
        (line,) = [ln for ln in out.splitlines() if ln.startswith(f"{mode:8s}:")]
        assert "700 rows written" in line and line.endswith("missing indexes after: none")
    assert out.count("rows ") >= 6                     # 300, 600, 700 in each mode
