"""Tests for the Parquet sink (plugins/lamost_ostar_plugins/parquet.py): layout, resume, idempotent parts,
and a real scan on a Dask LocalCluster into a Parquet dataset."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pyarrow.dataset as ds

from lamost_ostar.entrypoints import SINKS, load
from lamost_ostar.stage import OutputField, StageResult, StageSpec
from lamost_ostar_plugins.parquet import ParquetSink

DATA = Path(__file__).resolve().parent / "data"

LINES = StageSpec(name="lines_test", version="lines_test-1", model_version="lines_test-1", outputs=(
    OutputField("heii_sigma", "float"), OutputField("heii_detected", "bool", summary=True),
    OutputField("extra", "json")))


def _ostar(i, ok=True, mv="v1"):
    if not ok:
        return StageResult.failure(f"/d/{i}.fits", "corrupt", "bad", mv)
    return StageResult(f"/d/{i}.fits", True, obsid=i, ra=1.0, dec=2.0, probs={"O": 0.9, "B": 0.1},
                       p_o=0.9 if i % 2 else 0.1, predicted_class="O", model_version=mv,
                       is_candidate=bool(i % 2), evidence={"heii_ew": 0.3, "n_heii_lines": 2})


def test_registered_as_a_sink():
    assert load(SINKS, "parquet") is ParquetSink


def test_layout_resume_and_idempotent_parts(tmp_path):
    sink = ParquetSink(tmp_path / "out")
    sid = sink.start_scan(stages=[StageSpec.from_dict({**LINES.to_dict()})],
                          parameters={"sources": ["/d"]})
    assert sid == 1 and sink.start_scan("v1") == 2
    batch = [_ostar(i) for i in range(6)] + [_ostar(9, ok=False)]
    assert sink.write(sid, batch) == {"results": 6, "errors": 1}
    sink.write(sid, batch)                              # the same partition again: same file
    parts = sorted((tmp_path / "out" / "results" / "ostar" / "scan=1").glob("*"))
    assert len(parts) == 1 and parts[0].name.startswith("part-") and parts[0].suffix == ".parquet"
    sink.write(sid, [{"path": f"/d/{i}.fits", "ok": True, "heii_sigma": float(i),
                      "heii_detected": i > 5, "extra": {"i": i}} for i in range(4, 8)], stage=LINES)
    table = ds.dataset(tmp_path / "out" / "results" / "ostar", format="parquet",
                       partitioning="hive").to_table().to_pylist()
    assert len(table) == 6 and table[0]["scan"] == 1 and table[0]["model_version"] == "v1"
    row = next(r for r in table if r["path"] == "/d/1.fits")
    assert row["p_o"] == 0.9 and row["is_candidate"] is True and row["n_heii_lines"] == 2
    assert row["probs"] == '{"B": 0.1, "O": 0.9}' and row["code_version"]
    lines = sink.read("lines_test").to_pylist()
    assert [r["heii_sigma"] for r in lines] == [4.0, 5.0, 6.0, 7.0] and lines[0]["extra"] == '{"i": 4}'
    # resume, per stage, from a fresh copy (as a worker gets it)
    clone = pickle.loads(pickle.dumps(sink))
    paths = [f"/d/{i}.fits" for i in range(10)]
    assert clone.done_paths(paths, "v1") == set(paths[:6]) | {"/d/9.fits"}
    assert clone.done_paths(paths, "v1", include_errors=False) == set(paths[:6])
    assert clone.done_paths(paths, "lines_test-1", stage="lines_test") == set(paths[4:8])
    assert clone.done_paths(paths, "v2") == set()
    clone.write(2, [_ostar(7)])
    assert "/d/7.fits" in clone.done_paths(paths, "v1")     # its own writes are remembered
    assert clone.scan_counts(sid, threshold=0.5) == {"results": 6, "errors": 1,
                                                     "errors_by_reason": {"corrupt": 1}, "candidates": 3}
    assert clone.scan_counts(sid, stage="lines_test")["counts"] == {"heii_detected": 2}
    assert clone.done_paths(paths, "v1", scan_id=2) == {"/d/7.fits"}
    sink.finish_scan(sid, {"files_seen": 7, "files_classified": 6, "n_candidates": 3})
    (rec, _) = sink.scans()
    assert rec["status"] == "finished" and rec["files_seen"] == 7 and rec["summary"]["n_candidates"] == 3
    assert rec["stages"][0]["name"] == "lines_test" and sink.stages()["lines_test"]["version"] == "lines_test-1"
    assert not list((tmp_path / "out").rglob("*.tmp"))      # no temporary files left


def test_scan_into_parquet_and_resume(tmp_path):
    from lamost_ostar import scan as scanmod

    rel = tmp_path / "rel"
    for i, name in enumerate(["io_image_dr7.fits", "io_image_dr6.fits.gz", "io_coadd_dr9.fits.gz",
                              "io_truncated.fits", "io_not_fits.fits"]):
        (rel / f"p{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / name, rel / f"p{i % 2}" / name)
    sink = ParquetSink(tmp_path / "out")
    first = scanmod.run_scan([rel], sink, n_workers=1, memory_limit=None, stage="heii_lines",
                             partition_size=2, progress=False)
    assert (first.totals.n_classified, first.totals.n_errors) == (3, 2)
    t = sink.read("heii_lines")
    assert t.num_rows == 3 and "heii_sigma" in t.column_names and None not in t.column("heii_sigma").to_pylist()
    (rec,) = sink.scans()
    assert rec["status"] == "finished" and rec["files_classified"] == 3 and rec["files_failed"] == 2
    again = scanmod.run_scan([rel], sink, n_workers=1, memory_limit=None, stage="heii_lines",
                             progress=False)
    assert again.totals.n_skipped == 5 and sink.read("heii_lines").num_rows == 3
