"""Tests for ``lamost-ostar query`` (lamost_ostar/cli/query.py) through click's CliRunner."""
from __future__ import annotations

import csv
import io
import os
import uuid

import pytest
import sqlalchemy as sa
from astropy.table import Table
from click.testing import CliRunner

from lamost_ostar.catalogue import Catalogue
from lamost_ostar.cli import main
from lamost_ostar.cli.query import infer_format

PG_URL = os.environ.get("LAMOST_OSTAR_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _result(i: int, *, ok: bool = True, model_version: str = "v1", ra: float = 10.0, dec: float = 20.0,
            p_o: float = 0.1, pred: str = "K") -> dict:
    """A StageResult-shaped record (the catalogue reads attributes or mapping keys)."""
    if not ok:
        return {"path": f"/rel/bad-{i}.fits", "ok": False, "error_reason": "truncated",
                "error_message": "file ends early", "model_version": model_version}
    return {"path": f"/rel/spec-{i:04d}.fits.gz", "ok": True, "obsid": 5000 + i,
            "designation": f"J{i:04d}", "ra": ra, "dec": dec, "snr_g": 5.0 + i, "snr_r": 6.0 + i,
            "lmjd": 57001, "planid": "HD000000N000000B01", "spid": 3, "fiberid": i + 1,
            "pipeline_class": "STAR", "pipeline_subclass": "O" if pred == "O" else "K5",
            "data_release": "LAMOST DR7", "layout": "image",
            "probs": {"O": p_o, "F": 0.0, "G": 0.0, "K": 1 - p_o}, "p_o": p_o,
            "predicted_class": pred, "flags": 0, "model_version": model_version}


def _fill(cat: Catalogue) -> int:
    sid = cat.start_scan("v1", parameters={"paths": ["/rel"]}, host="testhost")
    rows = [
        _result(1, ra=83.8, dec=-5.4, p_o=0.97, pred="O"),     # Orion
        _result(2, ra=83.9, dec=-5.5, p_o=0.62, pred="O"),     # Orion, 0.14 deg away
        _result(3, ra=84.5, dec=-5.4, p_o=0.55, pred="O"),     # 0.7 deg away
        _result(4, ra=200.0, dec=40.0, p_o=0.91, pred="O"),
        _result(5, ra=201.0, dec=41.0, p_o=0.20, pred="K"),
        _result(6, ra=10.0, dec=0.0, p_o=0.01, pred="K"),
        _result(7, ok=False),
    ]
    cat.write(sid, rows)
    cat.finish_scan(sid, {"files_seen": 7, "files_classified": 6, "files_failed": 1}, "finished")
    return sid


@pytest.fixture
def db(tmp_path) -> str:
    path = tmp_path / "cat.sqlite"
    with Catalogue(path) as cat:
        _fill(cat)
    return str(path)


def run(*args: str):
    return CliRunner().invoke(main, ["query", *args])


def _assert_one_line_error(res, fragment: str) -> None:
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and fragment in errors[0], res.output


def test_default_terminal_table(db):
    res = run("--db", db)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert "p_o" in lines[0] and "path" in lines[0] and "obsid" in lines[0]
    body = [ln for ln in lines[2:] if ln.strip() and not set(ln.strip()) <= {"-", " "}]
    assert len(body) == 4                                    # no decision in these rows: p_o >= 0.5
    assert "0.9700" in body[0] and "/rel/spec-0001.fits.gz" in body[0]   # sorted by p_o
    assert "4 rows (O candidates (the model's decision))" in res.stderr


def test_filters_via_cli(db):
    def csv_rows(*args):
        res = run("--db", db, "--format", "csv", *args)
        assert res.exit_code == 0, res.output
        return list(csv.DictReader(io.StringIO(res.stdout)))

    assert len(csv_rows()) == 4
    assert len(csv_rows("--all")) == 6
    assert len(csv_rows("--min-p-o", "0.9")) == 2
    assert {r["predicted_class"] for r in csv_rows("--all", "--class", "k")} == {"K"}
    assert len(csv_rows("--all", "--class", "O,K")) == 6
    orion = csv_rows("--cone", "83.8", "-5.4", "0.5", "--sort", "dist")
    assert [r["obsid"] for r in orion] == ["5001", "5002"] and float(orion[0]["dist"]) == 0.0
    assert len(csv_rows("--cone", "83.8", "-5.4", "1")) == 3
    assert [r["obsid"] for r in csv_rows("--all", "--snr-min", "8", "--snr-max", "10")] == \
        ["5004", "5003", "5005"]  # p_o 0.91, 0.55, 0.20: sorted by p_o descending
    assert [r["obsid"] for r in csv_rows("--all", "--sort", "obsid", "--limit", "2")] == ["5001", "5002"]
    assert [r["obsid"] for r in csv_rows("--sort", "p_o", "--ascending", "--limit", "1")] == ["5003"]
    assert len(csv_rows("--scan", "1")) == 4
    assert len(csv_rows("--model", "v1", "--all")) == 6


@pytest.mark.parametrize("name, fmt", [("out.csv", "ascii.csv"), ("out.fits", "fits"),
                                       ("out.vot", "votable"), ("out.xml", "votable"),
                                       ("out.ecsv", "ascii.ecsv")])
def test_export_files_by_extension(db, tmp_path, name, fmt):
    out = tmp_path / name
    res = run("--db", db, "--all", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert f"wrote 6 rows to {out}" in res.stderr
    t = Table.read(out, format=fmt)
    assert len(t) == 6
    for col in ("path", "obsid", "predicted_class", "p_o", "ra", "dec", "model_version"):
        assert col in t.colnames
    assert str(t["path"][0]) == "/rel/spec-0001.fits.gz" and t["p_o"][0] == pytest.approx(0.97)
    # existing file: refuse unless --overwrite
    again = run("--db", db, "-o", str(out))
    _assert_one_line_error(again, "exists")
    assert run("--db", db, "-o", str(out), "--overwrite").exit_code == 0
    assert len(Table.read(out, format=fmt)) == 4


def test_explicit_format_and_text_file(db, tmp_path):
    out = tmp_path / "cands.anything"
    res = run("--db", db, "-o", str(out), "--format", "votable")
    assert res.exit_code == 0, res.output
    assert len(Table.read(out, format="votable")) == 4
    txt = tmp_path / "cands.txt"
    assert run("--db", db, "-o", str(txt)).exit_code == 0
    assert "/rel/spec-0001.fits.gz" in txt.read_text()
    _assert_one_line_error(run("--db", db, "-o", str(tmp_path / "x.unknown")), "format")


@pytest.mark.parametrize("fmt, reader", [("table", None), ("csv", "ascii.csv"), ("fits", "fits"),
                                         ("votable", "votable"), ("ecsv", "ascii.ecsv")])
@pytest.mark.parametrize("what", [(), ("--scans",), ("--errors",)])
def test_every_format_to_stdout_and_to_a_file(db, tmp_path, fmt, reader, what):
    """Every --format works without -o (stdout) and with -o, for results, scans and errors."""
    n = {(): 3, ("--scans",): 1, ("--errors",): 1}[what]
    res = run("--db", db, *what, "--format", fmt, "--limit", "3")
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    out = tmp_path / f"out.{fmt}"
    res2 = run("--db", db, *what, "--format", fmt, "--limit", "3", "-o", str(out))
    assert res2.exit_code == 0, res2.output
    if reader is None:
        marker = {(): "/rel/spec-0001", ("--scans",): "testhost", ("--errors",): "/rel/bad-7"}[what]
        assert marker in res.stdout and marker in out.read_text()
        return
    from_stdout = tmp_path / f"stdout.{fmt}"
    from_stdout.write_bytes(res.stdout_bytes)
    assert len(Table.read(from_stdout, format=reader)) == len(Table.read(out, format=reader)) == n


def test_fits_to_a_terminal_is_refused(db, monkeypatch):
    from lamost_ostar.cli import query as q

    monkeypatch.setattr(q, "_stdout_is_terminal", lambda: True)
    _assert_one_line_error(run("--db", db, "--format", "fits"), "--output")


def test_unknown_class_model_or_scan_is_said(db):
    """No silent 0 rows: an unknown class is an error, an unknown model/scan lists those held."""
    res = run("--db", db, "--class", "Z")
    _assert_one_line_error(res, "unknown class 'Z'")
    assert res.exit_code == 2 and "O, B, A, F, G, K, M" in res.output
    _assert_one_line_error(run("--db", db, "--class", "O,Q"), "'Q'")
    assert run("--db", db, "--class", "o,k", "--all").exit_code == 0
    for args in (("--model", "nosuch"), ("--model", "nosuch", "--errors")):
        res = run("--db", db, *args)
        _assert_one_line_error(res, "no model version 'nosuch'")
        assert "v1" in res.output
    for args in (("--scan", "99"), ("--scan", "99", "--errors")):
        res = run("--db", db, *args)
        _assert_one_line_error(res, "no scan 99")
        assert "scans: 1" in res.output
    # a known scan or model with no candidate is still an ordinary, empty answer
    res = run("--db", db, "--scan", "1", "--min-p-o", "0.999", "--format", "csv")
    assert res.exit_code == 0 and len(res.stdout.strip().splitlines()) == 1


def test_scans_and_errors_listing(db):
    res = run("--db", db, "--scans")
    assert res.exit_code == 0, res.output
    assert "finished" in res.stdout and "testhost" in res.stdout and "files_classified" in res.stdout
    res = run("--db", db, "--scans", "--format", "csv")
    (row,) = list(csv.DictReader(io.StringIO(res.stdout)))
    assert (row["files_seen"], row["files_failed"], row["result_rows"], row["error_rows"]) == ("7", "1", "6", "1")
    assert '"/rel"' in row["parameters"]
    res = run("--db", db, "--errors")
    assert res.exit_code == 0 and "truncated" in res.stdout and "/rel/bad-7.fits" in res.stdout


def test_bad_arguments_one_line(db, tmp_path):
    _assert_one_line_error(run("--db", str(tmp_path / "nope.sqlite")), "no catalogue file")
    assert not (tmp_path / "nope.sqlite").exists()
    _assert_one_line_error(run("--db", "mysql://u@h/x"), "unsupported database")
    _assert_one_line_error(run("--db", "sqlite:///:memory:"), "file path")
    _assert_one_line_error(run("--db", "postgresql+psycopg://nobody@127.0.0.1:1/none"), "cannot open")
    _assert_one_line_error(run("--db", db, "--cone", "10", "95", "1"), "Dec 95")
    _assert_one_line_error(run("--db", db, "--cone", "10", "5", "-1"), "radius")
    _assert_one_line_error(run("--db", db, "--cone", "10", "abc", "1"), "--cone")
    _assert_one_line_error(run("--db", db, "--cone", "10", "5"), "--cone")
    _assert_one_line_error(run("--db", db, "--min-p-o", "2"), "--min-p-o")
    _assert_one_line_error(run("--db", db, "--sort", "colour"), "cannot sort")
    _assert_one_line_error(run("--db", db, "--sort", "colour", "-o", str(tmp_path / "s.csv")), "cannot sort")
    assert not (tmp_path / "s.csv").exists()
    _assert_one_line_error(run("--db", db, "--snr-min", "9", "--snr-max", "1"), "S/N range")
    _assert_one_line_error(run("--db", db, "--limit", "-3"), "--limit")
    res = CliRunner().invoke(main, ["query"], env={"LAMOST_OSTAR_DB": None})
    _assert_one_line_error(res, "--db")
    notcat = tmp_path / "plain.sqlite"
    sa.create_engine(f"sqlite:///{notcat}").connect().close()
    _assert_one_line_error(run("--db", str(notcat)), "no lamost_ostar catalogue")


def test_db_from_environment(db):
    res = CliRunner().invoke(main, ["query", "--all", "--format", "csv"], env={"LAMOST_OSTAR_DB": db})
    assert res.exit_code == 0 and len(res.stdout.strip().splitlines()) == 7


def test_infer_format():
    assert infer_format("a.CSV") == "csv" and infer_format("b.fits.gz") == "fits"
    assert infer_format("c.vot") == "votable" and infer_format("d.parquet") is None


def test_query_postgresql():
    engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        engine.connect().close()
    except Exception as exc:
        engine.dispose()
        pytest.skip(f"no PostgreSQL server answers at {PG_URL} ({str(exc).splitlines()[0]})")
    schema = f"lo_cli_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = f"{PG_URL}?options=-csearch_path%3D{schema}"
        with Catalogue(url) as cat:
            _fill(cat)
        res = run("--db", url, "--cone", "83.8", "-5.4", "0.5", "--format", "csv")
        assert res.exit_code == 0, res.output
        rows = list(csv.DictReader(io.StringIO(res.stdout)))
        assert [r["obsid"] for r in rows] == ["5001", "5002"]
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def test_streamed_csv_in_chunks_reads_back(db, tmp_path):
    from lamost_ostar.cli.query import _stream_csv

    cat = Catalogue(db, create=False)
    out = tmp_path / "stream.csv"
    n = _stream_csv(cat.iter_query(all_rows=True, sort="obsid", chunk_rows=4), str(out), False)
    whole = cat.query(all_rows=True, sort="obsid")
    back = Table.read(out, format="ascii.csv")
    assert n == len(back) == len(whole) == 6
    assert list(back["obsid"]) == list(whole["obsid"]) and back.colnames == whole.colnames
    assert out.read_text().count("path,obsid") == 1
    cat.close()


def test_decision_columns_select_and_export(tmp_path):
    """--candidates/--not-candidates, --min-posterior, --min-heii-sigma; is_candidate in --all output."""
    import csv as _csv

    from lamost_ostar.catalogue import Catalogue
    from lamost_ostar.stage import StageResult

    path = str(tmp_path / "d.sqlite")
    cat = Catalogue(path)
    rows = []
    for i, (p, cand, post, heii) in enumerate([(0.999, True, 0.7, 6.0), (0.99, False, 0.01, 0.3),
                                               (0.1, False, 1e-6, 2.9)]):
        rows.append(StageResult(path=f"f{i}.fits", ok=True, probs={"O": p, "B": 1 - p}, p_o=p,
                                predicted_class="O", model_version="v", is_candidate=cand,
                                posterior_o=post, heii_sigma=heii, evidence={"heii_sigma": heii}))
    cat.write(cat.start_scan(model_version="v"), rows)
    cat.close()
    res = run("--db", path)
    assert res.exit_code == 0 and "1 rows (O candidates" in res.stderr and "f0.fits" in res.stdout
    res = run("--db", path, "--not-candidates", "--format", "csv")
    assert sorted(r["path"] for r in _csv.DictReader(res.stdout.splitlines())) == ["f1.fits", "f2.fits"]
    res = run("--db", path, "--min-heii-sigma", "2.5", "--format", "csv")
    assert sorted(r["path"] for r in _csv.DictReader(res.stdout.splitlines())) == ["f0.fits", "f2.fits"]
    res = run("--db", path, "--min-posterior", "0.005", "--candidates", "--format", "csv")
    assert [r["path"] for r in _csv.DictReader(res.stdout.splitlines())] == ["f0.fits"]
    out = tmp_path / "all.csv"
    assert run("--db", path, "--all", "-o", str(out)).exit_code == 0
    got = {r["path"]: r for r in _csv.DictReader(out.open())}
    assert got["f0.fits"]["is_candidate"] == "True" and got["f1.fits"]["is_candidate"] == "False"
    assert float(got["f2.fits"]["heii_sigma"]) == 2.9 and "posterior_o" in got["f0.fits"]
    _assert_one_line_error(run("--db", path, "--min-posterior", "3"), "--min-posterior")


# ------------------------------------------------------------------ stages: --stage, --with, --where

def _with_lines(db: str) -> None:
    """Add a plugin stage's results (every other file) and a second ostar model version."""
    from lamost_ostar.stage import OutputField, StageSpec

    spec = StageSpec(name="lines_x", version="lines_x-1", model_version="lines_x-1", outputs=(
        OutputField("heii_sigma", "float", None, "He II significance", index=True),
        OutputField("o_star_like", "bool", summary=True), OutputField("ew_hbeta", "float", "Angstrom")))
    with Catalogue(db) as cat:
        cat.write(cat.start_scan(stages=[spec]),
                  [{"path": f"/rel/spec-{i:04d}.fits.gz", "ok": True, "obsid": 5000 + i,
                    "heii_sigma": float(i), "o_star_like": i == 1, "ew_hbeta": 2.0}
                   for i in (1, 3, 5)] + [{"path": "/rel/bad-7.fits", "ok": False,
                                           "error_reason": "no_line_coverage"}], stage=spec)


def test_stage_with_and_where(db):
    _with_lines(db)

    def csv_rows(*args):
        res = run("--db", db, "--format", "csv", *args)
        assert res.exit_code == 0, res.output
        return list(csv.DictReader(io.StringIO(res.stdout)))

    assert len(csv_rows("--all")) == 6                                  # ostar rows only: no doubling
    rows = csv_rows("--all", "--with", "lines_x", "--sort", "obsid")
    assert [r["lines_x.heii_sigma"] for r in rows] == ["1.0", "", "3.0", "", "5.0", ""]
    rows = csv_rows("--all", "--where", "lines_x.heii_sigma > 2", "--sort", "obsid")
    assert [r["obsid"] for r in rows] == ["5003", "5005"]
    rows = csv_rows("--where", "lines_x.heii_sigma >= 1")               # candidates (p_o >= 0.5) too
    assert sorted(r["obsid"] for r in rows) == ["5001", "5003"]
    rows = csv_rows("--stage", "lines_x", "--where", "o_star_like = true")
    assert [r["obsid"] for r in rows] == ["5001"] and "ew_hbeta" in rows[0] and "p_o" not in rows[0]
    rows = csv_rows("--stage", "lines_x", "--with", "ostar", "--where", "ostar.p_o > 0.9")
    assert [r["obsid"] for r in rows] == ["5001"]
    res = run("--db", db, "--stage", "lines_x")                           # terminal: key outputs shown
    assert res.exit_code == 0 and "heii_sigma" in res.stdout and "o_star_like" in res.stdout
    assert "3 rows (stage lines_x: every result)" in res.stderr
    res = run("--db", db, "--stages")
    assert res.exit_code == 0 and "lines_x-1 (3)" in res.stdout and "results_lines_x" in res.stdout
    res = run("--db", db, "--errors", "--stage", "lines_x", "--format", "csv")
    assert [r["reason"] for r in csv.DictReader(io.StringIO(res.stdout))] == ["no_line_coverage"]
    _assert_one_line_error(run("--db", db, "--stage", "nope"), "no results of stage 'nope'")
    _assert_one_line_error(run("--db", db, "--stage", "lines_x", "--min-p-o", "0.5"), "--where")
    _assert_one_line_error(run("--db", db, "--where", "lines_x.heii_sigma > 1; drop table results"),
                           "cannot read")
    _assert_one_line_error(run("--db", db, "--where", "nosuch = 1"), "unknown column 'nosuch'")
    assert len(csv_rows("--all")) == 6                                   # still there


def test_two_model_versions_are_named_not_duplicated(db):
    with Catalogue(db) as cat:
        cat.write(cat.start_scan("v2"), [_result(1, model_version="v2", p_o=0.99, pred="O")])
    res = run("--db", db, "--all")
    _assert_one_line_error(res, "stage ostar holds results of 2 model versions: v1 (6 rows), v2 (1 rows)")
    assert res.exit_code == 2 and "--model" in res.output
    assert run("--db", db, "--all", "--model", "v2", "--format", "csv").stdout.count("\n") == 2
    assert run("--db", db, "--all", "--scan", "1", "--format", "csv").stdout.count("\n") == 7
    assert run("--db", db, "--all", "--all-versions", "--format", "csv").stdout.count("\n") == 8
