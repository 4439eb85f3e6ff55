"""Tests for lamost_ostar.catalogue on a SQLite file and on a real PostgreSQL server.

The PostgreSQL tests use ``LAMOST_OSTAR_TEST_PG`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``) and skip with a reason
when no server answers.  Each test gets its own schema (dropped afterwards), so
concurrent test runs never collide.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import random
import uuid

import numpy as np
import pytest
import sqlalchemy as sa
from astropy.table import Table

from lamost_ostar import catalogue as catmod
from lamost_ostar.catalogue import (
    DEFAULT_P_O_THRESHOLD,
    Catalogue,
    CatalogueError,
    CatalogueWriter,
    angular_distance,
    cone_bounds,
    normalise_url,
)
from lamost_ostar.stage import StageResult

PG_URL = os.environ.get("LAMOST_OSTAR_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
CLASSES = ("O", "B", "A", "F", "G", "K", "M")


# --------------------------------------------------------------------------- fixtures

def _pg_admin_engine():
    """An engine on the test PostgreSQL server, or a skip reason."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None, "psycopg (PostgreSQL driver) is not installed"
    engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # any failure to answer means: no server for these tests
        engine.dispose()
        first = str(getattr(exc, "orig", exc)).strip().splitlines()
        return None, f"no PostgreSQL server answers at {PG_URL} ({first[0] if first else exc})"
    return engine, None


@contextlib.contextmanager
def _pg_schema_url():
    """Yield a URL of a fresh PostgreSQL schema (dropped afterwards); skip if no server."""
    admin, reason = _pg_admin_engine()
    if admin is None:
        pytest.skip(reason)
    schema = f"lo_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty catalogue location: a SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield str(tmp_path / "catalogue.sqlite")
    else:
        with _pg_schema_url() as url:
            yield url


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL schema only."""
    with _pg_schema_url() as url:
        yield url


def make_result(i: int, *, ok: bool = True, model_version: str = "v1", classes=CLASSES,
                p_o: float | None = None, ra: float | None = None, dec: float | None = None,
                snr_g: float | None = None, prefix: str = "/data/spec") -> StageResult:
    """A StageResult for file number ``i`` (deterministic values)."""
    path = f"{prefix}-{i:06d}.fits.gz"
    if not ok:
        return StageResult(path=path, ok=False, error_reason="corrupt",
                           error_message=f"file {i} is truncated", model_version=model_version)
    p_o = (i % 10) / 10 if p_o is None else p_o
    rest = (1 - p_o) / (len(classes) - 1)
    probs = {c: (p_o if c == "O" else rest) for c in classes}
    pred = "O" if p_o >= max(probs.values()) else classes[-1]
    return StageResult(
        path=path, ok=True, obsid=100000 + i, designation=f"J{i:06d}",
        ra=(i * 7.3) % 360 if ra is None else ra, dec=((i * 3.1) % 170) - 85 if dec is None else dec,
        lmjd=57000 + i % 5, planid=f"plan{i % 3}", spid=i % 16 + 1, fiberid=i % 250 + 1,
        snr_g=float(i % 50) if snr_g is None else snr_g, snr_r=float(i % 40) + 1, snr_i=None,
        pipeline_class="STAR", pipeline_subclass="O" if pred == "O" else "K3",
        data_release="LAMOST DR7", layout="image", probs=probs, p_o=p_o, predicted_class=pred,
        flags=i % 4, model_version=model_version)


def _count(url: str, table: str) -> int:
    cat = Catalogue(url)
    with cat.engine.connect() as conn:
        n = conn.execute(sa.text(f"select count(*) from {table}")).scalar_one()
    cat.close()
    return int(n)


# --------------------------------------------------------------------------- URLs

def test_normalise_url_forms(tmp_path):
    url = normalise_url(tmp_path / "a.sqlite")
    assert url.drivername == "sqlite" and url.database == str((tmp_path / "a.sqlite").resolve())
    assert normalise_url(f"sqlite:///{tmp_path}/b.db").database == str(tmp_path / "b.db")
    assert normalise_url("postgresql://u@h:5432/d").drivername == "postgresql+psycopg"
    assert normalise_url("postgres://u@h/d").drivername == "postgresql+psycopg"
    assert normalise_url("postgresql+psycopg://u@h/d").drivername == "postgresql+psycopg"
    for bad in ("mysql://u@h/d", "sqlite://", "sqlite:///:memory:", "", "://nonsense"):
        with pytest.raises(CatalogueError):
            normalise_url(bad)


def test_read_only_open_does_not_create(tmp_path):
    missing = tmp_path / "missing.sqlite"
    with pytest.raises(CatalogueError, match="no catalogue file"):
        Catalogue(missing, create=False).engine
    assert not missing.exists()
    # an SQLite file without the tables is not a catalogue
    sa.create_engine(f"sqlite:///{tmp_path / 'other.sqlite'}").connect().close()
    with pytest.raises(CatalogueError, match="no lamost_ostar catalogue"):
        Catalogue(tmp_path / "other.sqlite", create=False).engine


def test_sqlite_uses_wal(tmp_path):
    cat = Catalogue(tmp_path / "c.sqlite")
    with cat.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_picklable_with_lazy_engine(tmp_path):
    cat = CatalogueWriter(tmp_path / "c.sqlite")
    sid = cat.start_scan("v1")
    assert cat._engine is not None
    clone = pickle.loads(pickle.dumps(cat))
    assert clone._engine is None and clone.url == cat.url
    clone.write(sid, [make_result(1)])
    assert clone._engine is not None
    assert len(cat.query(all_rows=True)) == 1


# --------------------------------------------------------------------------- writing

def test_write_idempotent_and_resume(db_url):
    cat = Catalogue(db_url)
    sid = cat.start_scan("v1", parameters={"paths": ["/data"], "batch_size": 64})
    batch = [make_result(i) for i in range(30)] + [make_result(i, ok=False) for i in range(30, 35)]
    summary = cat.write(sid, batch)
    assert (summary.results, summary.errors) == (30, 5)
    cat.write(sid, batch)                       # same batch again: nothing changes
    cat.write(sid, list(reversed(batch[:10])))  # partial overlap
    assert cat.counts() == {"results": 30, "errors": 5}

    paths = [r.path for r in batch] + [f"/new/{i}.fits" for i in range(3)]
    done = cat.done_paths(paths, "v1")
    assert done == {r.path for r in batch}
    assert cat.done_paths(paths, "v1", include_errors=False) == {r.path for r in batch if r.ok}
    assert cat.done_paths(paths, "v2") == set()
    assert cat.done_paths([], "v1") == set()

    # the same files under another model version are new rows
    cat.write(sid, [make_result(i, model_version="v2", classes=("O", "F", "G", "K")) for i in range(5)])
    assert cat.counts("v2") == {"results": 5, "errors": 0}
    assert cat.counts() == {"results": 35, "errors": 5}

    # stored values
    row = cat.query(all_rows=True, model_version="v1", sort="obsid", limit=1)[0]
    ref = batch[0]
    assert row["path"] == ref.path and row["obsid"] == ref.obsid and row["designation"] == ref.designation
    assert row["p_o"] == pytest.approx(ref.p_o) and row["predicted_class"] == ref.predicted_class
    assert row["snr_g"] == pytest.approx(ref.snr_g) and np.ma.is_masked(row["snr_i"])
    assert row["flags"] == ref.flags and row["scan_id"] == sid and row["layout"] == "image"
    four = cat.query(all_rows=True, model_version="v2")
    assert four["p_b"].mask.all() and four["p_m"].mask.all() and not four["p_f"].mask.any()
    cat.close()


def test_done_paths_many_chunks(db_url):
    cat = Catalogue(db_url)
    sid = cat.start_scan("v1")
    cat.write(sid, [make_result(i) for i in range(0, 1300, 2)])  # 650 rows
    paths = [make_result(i).path for i in range(1300)]
    assert cat.done_paths(paths, "v1") == set(paths[::2])
    cat.close()


def test_errors_and_results_precedence(db_url):
    cat = Catalogue(db_url)
    sid = cat.start_scan("v1")
    cat.write(sid, [make_result(1, ok=False), make_result(2, ok=False)])
    assert cat.counts() == {"results": 0, "errors": 2}
    # file 1 later succeeds (e.g. a rescan that retries errors): its error row goes
    sid2 = cat.start_scan("v1")
    cat.write(sid2, [make_result(1)])
    assert cat.counts() == {"results": 1, "errors": 1}
    assert list(cat.errors()["path"]) == [make_result(2).path]
    # an error for a file that already has a result is not kept
    cat.write(sid2, [make_result(1, ok=False)])
    assert cat.counts() == {"results": 1, "errors": 1}
    # within one batch: duplicates collapse and a success beats an error
    cat.write(sid2, [make_result(3), make_result(3), make_result(3, ok=False), make_result(4, ok=False),
                     make_result(4, ok=False)])
    assert cat.counts() == {"results": 2, "errors": 2}
    errs = cat.errors(reason="corrupt")
    assert sorted(errs["path"]) == [make_result(2).path, make_result(4).path]
    assert set(errs["message"]) == {"file 2 is truncated", "file 4 is truncated"}
    cat.close()


def test_result_without_model_version_takes_the_scans(db_url):
    cat = Catalogue(db_url)
    sid = cat.start_scan("vscan")
    r = make_result(7, model_version=None)
    e = StageResult(path="/x/broken.fits", ok=False, error_reason="not_fits", error_message="bad")
    cat.write(sid, [r, e])
    assert cat.done_paths([r.path, e.path], "vscan") == {r.path, e.path}


def test_scans_provenance_and_counts(db_url):
    cat = Catalogue(db_url)
    sid = cat.start_scan(model_version="v1", code_version="0.1.0",
                         parameters={"paths": ["/a", "/b"], "batch_size": 256}, host="node1")
    cat.write(sid, [make_result(i) for i in range(4)] + [make_result(9, ok=False)])
    cat.update_scan(sid, {"files_seen": 3})
    # the scan module's keyword style
    cat.finish_scan(sid, n_files=6, n_skipped=1, n_classified=4, n_errors=1, n_candidates=2,
                    errors_by_reason={"corrupt": 1}, status="complete")
    sid2 = cat.start_scan("v1")
    cat.finish_scan(sid2, {"files_seen": 0}, "interrupted")
    with pytest.raises(CatalogueError, match="no scan"):
        cat.finish_scan(999, {"seen": 1})
    t = cat.scans()
    assert list(t["id"]) == [sid, sid2]
    row = t[0]
    assert row["status"] == "complete" and row["model_version"] == "v1" and row["host"] == "node1"
    assert (row["files_seen"], row["files_read"], row["files_classified"], row["files_failed"],
            row["files_skipped"]) == (6, 5, 4, 1, 1)
    assert (row["result_rows"], row["error_rows"]) == (4, 1)
    assert '"batch_size": 256' in row["parameters"] and '"n_candidates": 2' in row["summary"]
    assert row["finished"] >= row["started"]
    assert t[1]["status"] == "interrupted"


def test_candidates_view(db_url):
    cat = Catalogue(db_url)
    sid = cat.start_scan("v1")
    cat.write(sid, [make_result(i) for i in range(20)])   # p_o = (i % 10) / 10
    expected = sum(1 for i in range(20) if (i % 10) / 10 >= DEFAULT_P_O_THRESHOLD)
    assert _count(db_url, "candidates") == expected == len(cat.query())


# --------------------------------------------------------------------------- concurrency

def _writer_proc(blob: bytes, scan_ids: list[int], lo: int, hi: int, seed: int, barrier) -> None:
    cat = pickle.loads(blob)            # as a Dask worker gets it
    rng = random.Random(seed)
    idx = list(range(lo, hi))
    batches = [idx[k:k + 15] for k in range(0, len(idx), 15)]
    rng.shuffle(batches)
    barrier.wait(timeout=60)
    for n, b in enumerate(batches):
        cat.write(scan_ids[n % len(scan_ids)], [make_result(i, ok=(i % 11 != 0)) for i in b])
    cat.close()


def test_concurrent_writers_no_loss_no_duplicates(db_url):
    cat = Catalogue(db_url)
    scans = [cat.start_scan("v1"), cat.start_scan("v1")]   # two scans writing at once
    cat.write(scans[0], [make_result(i, ok=(i % 11 != 0)) for i in range(0, 20)])  # parent engine exists
    ctx = mp.get_context("fork")
    ranges = [(0, 90), (45, 135), (90, 180), (10, 170)]
    barrier = ctx.Barrier(len(ranges))
    blob = pickle.dumps(cat)
    procs = [ctx.Process(target=_writer_proc, args=(blob, scans, lo, hi, k, barrier))
             for k, (lo, hi) in enumerate(ranges)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * len(procs)

    n_err = sum(1 for i in range(180) if i % 11 == 0)
    assert cat.counts() == {"results": 180 - n_err, "errors": n_err}
    with cat.engine.connect() as conn:
        for table in ("results", "errors"):
            dup = conn.execute(sa.text(f"select path from {table} group by path, model_version "
                                       "having count(*) > 1")).all()
            assert dup == []
    paths = [make_result(i).path for i in range(180)]
    assert cat.done_paths(paths, "v1") == set(paths)
    cat.close()


# --------------------------------------------------------------------------- queries

@pytest.fixture
def filled(db_url):
    cat = Catalogue(db_url)
    s1, s2 = cat.start_scan("v1"), cat.start_scan("v2")
    cat.write(s1, [make_result(i) for i in range(40)] + [make_result(99, ok=False)])
    cat.write(s2, [make_result(i, model_version="v2", p_o=0.95) for i in range(5)])
    yield cat, s1, s2
    cat.close()


def test_query_filters(filled):
    cat, s1, s2 = filled
    all_v1 = cat.query(all_rows=True, model_version="v1")
    assert len(all_v1) == 40 and len(cat.query(all_rows=True)) == 45
    p = np.asarray(all_v1["p_o"])

    cand = cat.query(model_version="v1")                 # default threshold 0.5
    assert len(cand) == int((p >= 0.5).sum()) and np.all(cand["p_o"] >= 0.5)
    assert list(cand["p_o"]) == sorted(cand["p_o"], reverse=True)   # p_o descending by default
    assert len(cat.query(min_p_o=0.85, model_version="v1")) == int((p >= 0.85).sum())
    assert len(cat.query(min_p_o=0.0, model_version="v1")) == 40
    assert len(cat.query(all_rows=True, min_p_o=0.7, model_version="v1")) == int((p >= 0.7).sum())

    o = cat.query(all_rows=True, predicted_class="o", model_version="v1")
    assert set(o["predicted_class"]) == {"O"} and len(o) == int((all_v1["predicted_class"] == "O").sum())
    assert len(cat.query(all_rows=True, predicted_class=["O", "M"], model_version="v1")) == 40

    snr = np.asarray(all_v1["snr_g"])
    t = cat.query(all_rows=True, snr_min=10, snr_max=20, model_version="v1")
    assert len(t) == int(((snr >= 10) & (snr <= 20)).sum())
    t = cat.query(all_rows=True, snr_min=15, snr_band="r", model_version="v1")
    assert np.all(t["snr_r"] >= 15)
    with pytest.raises(CatalogueError):
        cat.query(snr_min=5, snr_max=1)
    with pytest.raises(CatalogueError):
        cat.query(snr_band="z")

    assert set(cat.query(all_rows=True, scan_id=s2)["model_version"]) == {"v2"}
    assert len(cat.query(all_rows=True, scan_id=s1)) == 40
    assert len(cat.query(model_version="v2")) == 5

    t = cat.query(all_rows=True, sort="obsid", limit=7)
    assert len(t) == 7 and list(t["obsid"]) == sorted(t["obsid"])
    t = cat.query(all_rows=True, sort="ra", descending=True, model_version="v1")
    assert list(t["ra"]) == sorted(all_v1["ra"], reverse=True)
    assert len(cat.query(all_rows=True, limit=0)) == 0
    with pytest.raises(CatalogueError, match="cannot sort"):
        cat.query(sort="nonsense")
    with pytest.raises(CatalogueError):
        cat.query(min_p_o=1.5)
    assert len(cat.query(min_p_o=1.0)) == 0


def test_cone_bounds_edges():
    assert cone_bounds(10, 89.5, 1.0)[2] is None               # contains the pole
    lo, hi, ranges = cone_bounds(0.2, 0, 1.0)                 # wraps through RA 0
    assert (lo, hi) == (-1.0, 1.0) and len(ranges) == 2
    assert cone_bounds(359.9, 10, 0.5)[2][1][0] == 0.0
    with pytest.raises(CatalogueError):
        cone_bounds(0, 91, 1)
    with pytest.raises(CatalogueError):
        cone_bounds(0, 0, 0)
    assert angular_distance(0, 0, 180, 0) == pytest.approx(180)
    assert angular_distance(10, 89, 190, 89) == pytest.approx(2)


def test_cone_search_matches_brute_force(tmp_path):
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    rng = np.random.default_rng(42)
    n = 3000
    ra = rng.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    # crowd the awkward places: RA 0/360 seam and both poles
    ra[:300] = rng.uniform(-3, 3, 300) % 360
    dec[:300] = rng.uniform(-5, 5, 300)
    dec[300:450] = rng.uniform(84, 90, 150)
    dec[450:600] = rng.uniform(-90, -84, 150)
    cat = Catalogue(tmp_path / "cone.sqlite")
    sid = cat.start_scan("v1")
    cat.write(sid, [make_result(i, ra=ra[i], dec=dec[i], p_o=0.9) for i in range(n)])
    stars = SkyCoord(ra * u.deg, dec * u.deg)
    cones = [(0.5, 1.0, 3.0), (359.5, -2.0, 2.5), (45.0, 87.0, 5.0), (200.0, -88.0, 3.0),
             (120.0, 30.0, 10.0), (300.0, -60.0, 25.0), (10.0, 0.0, 120.0), (77.0, 86.0, 1.5)]
    for c_ra, c_dec, rad in cones:
        sep = stars.separation(SkyCoord(c_ra * u.deg, c_dec * u.deg)).deg
        expected = {make_result(i).path for i in np.flatnonzero(sep <= rad)}
        t = cat.query(cone=(c_ra, c_dec, rad), sort="dist", all_rows=True)
        assert set(t["path"]) == expected, (c_ra, c_dec, rad)
        assert np.all(np.diff(t["dist"]) >= 0) and np.all(t["dist"] <= rad)
        got = {p: d for p, d in zip(t["path"], t["dist"])}
        for i in np.flatnonzero(sep <= rad)[:20]:
            assert got[make_result(i).path] == pytest.approx(sep[i], abs=1e-8)
    assert len(cat.query(cone=(0.5, 1.0, 3.0), limit=3, all_rows=True)) == 3
    with pytest.raises(CatalogueError):
        cat.query(cone=(0, 95, 1))
    with pytest.raises(CatalogueError):
        cat.query(cone=(0, 0))


def test_postgresql_schema_created_from_search_path():
    admin, reason = _pg_admin_engine()
    if admin is None:
        pytest.skip(reason)
    schema = f"lo_new_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    try:
        url = f"{PG_URL}?options=-csearch_path%3D{schema}"
        with pytest.raises(CatalogueError, match="no lamost_ostar catalogue"):
            Catalogue(url, create=False).engine           # read-only: nothing is created
        cat = Catalogue(url)
        cat.write(cat.start_scan("v1"), [make_result(1)])
        cat.close()
        with admin.connect() as conn:
            n = conn.execute(sa.text(f'select count(*) from "{schema}".results')).scalar_one()
        assert n == 1
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def test_cone_search_postgresql(pg_url):
    cat = Catalogue(pg_url)
    sid = cat.start_scan("v1")
    pts = [(359.9, 0.0), (0.1, 0.1), (1.5, 0.0), (180.0, 89.9), (0.0, 89.8), (90.0, -30.0)]
    cat.write(sid, [make_result(i, ra=r, dec=d, p_o=0.9) for i, (r, d) in enumerate(pts)])
    assert set(cat.query(cone=(0.0, 0.0, 1.0))["obsid"]) == {100000, 100001}
    assert set(cat.query(cone=(90.0, 90.0, 0.25))["obsid"]) == {100003, 100004}


def test_export_round_trip(filled, tmp_path):
    cat, _, _ = filled
    t = cat.query(all_rows=True, sort="obsid")
    t4 = cat.query(all_rows=True, model_version="v2")
    for fmt, name in (("ascii.csv", "t.csv"), ("fits", "t.fits"), ("votable", "t.xml"),
                      ("ascii.ecsv", "t.ecsv")):
        t.write(tmp_path / name, format=fmt)
        back = Table.read(tmp_path / name, format=fmt)
        assert len(back) == len(t)
        for col in ("path", "obsid", "predicted_class", "p_o", "ra", "dec", "snr_g"):
            assert col in back.colnames
        assert [str(p) for p in back["path"]] == list(t["path"])
        assert list(back["obsid"]) == list(t["obsid"])
        np.testing.assert_allclose(back["p_o"], t["p_o"])
        assert np.ma.is_masked(back["snr_i"][0])
    empty = cat.query(min_p_o=1.0)
    for fmt, name in (("ascii.csv", "e.csv"), ("fits", "e.fits"), ("votable", "e.vot")):
        empty.write(tmp_path / name, format=fmt)
        assert len(Table.read(tmp_path / name, format=fmt)) == 0
    assert len(t4) == 5


def test_iter_query_chunks_match_query(filled):
    cat, _, _ = filled
    for kwargs in ({"all_rows": True}, {"all_rows": True, "sort": "obsid", "limit": 23},
                   {"min_p_o": 0.3, "sort": "p_o"}, {"all_rows": True, "cone": (180.0, 0.0, 100.0)},
                   {"all_rows": True, "cone": (180.0, 0.0, 100.0), "sort": "dist", "limit": 9},
                   {"min_p_o": 1.0}):
        whole = cat.query(**kwargs)
        parts = list(cat.iter_query(chunk_rows=7, **kwargs))
        assert len(parts) >= 1 and all(len(p) <= 7 for p in parts)
        assert [x for p in parts for x in p["id"]] == list(whole["id"]), kwargs
        assert all(p.colnames == whole.colnames for p in parts)


# --------------------------------------------------------------------------- the O-candidate decision

def _decided(path, p_o, cand, heii, posterior=None):
    evidence = {"heii_ew": 0.4, "heii_ew_err": 0.1, "heii_sigma": heii, "hei_sigma": 1.0,
                "log_wprime": -0.2, "n_heii_lines": 3, "heii_detected": bool(heii and heii > 4),
                "heii_4686_emission": False, "metal_veto": False,
                "ew_heii_4541": 0.45, "ew_heii_4541_err": 0.12}
    probs = {"O": p_o, "B": 1 - p_o, "A": 0.0, "F": 0.0, "G": 0.0, "K": 0.0, "M": 0.0, "X": 0.0}
    return StageResult(path=path, ok=True, probs=probs, p_o=p_o, predicted_class="O" if p_o > 0.5 else "B",
                       model_version="v2ch", posterior_o=posterior if posterior is not None else p_o / 100,
                       is_candidate=cand, heii_sigma=heii, evidence=evidence, ra=10.0, dec=1.0)


def test_decision_and_evidence_are_stored_and_selectable(db_url):
    cat = Catalogue(db_url)
    sid = cat.start_scan(model_version="v2ch")
    cat.write(sid, [_decided("a.fits", 0.999, True, 6.0, 0.9), _decided("b.fits", 0.99, False, 0.5),
                    _decided("c.fits", 0.2, False, 3.0), _decided("d.fits", 0.7, None, None)])
    default = cat.query()                                        # the decision (or p >= 0.5 without one)
    assert sorted(default["path"]) == ["a.fits", "d.fits"]
    assert bool(default["is_candidate"][list(default["path"]).index("a.fits")])
    assert sorted(cat.query(candidates=False)["path"]) == ["b.fits", "c.fits"]
    assert sorted(cat.query(min_p_o=0.9)["path"]) == ["a.fits", "b.fits"]        # p(O) alone
    assert list(cat.query(min_posterior=0.5)["path"]) == ["a.fits"]
    assert sorted(cat.query(min_heii_sigma=2.5)["path"]) == ["a.fits", "c.fits"]
    every = cat.query(all_rows=True)
    assert len(every) == 4
    row = every[list(every["path"]).index("a.fits")]
    assert row["heii_sigma"] == pytest.approx(6.0) and row["n_heii_lines"] == 3
    assert row["ew_heii_4541"] == pytest.approx(0.45) and row["p_x"] == pytest.approx(0.0)
    assert "is_candidate" in every.colnames and "posterior_o" in every.colnames
    with cat.engine.connect() as conn:                           # the SQL view agrees
        names = sorted(r[0] for r in conn.execute(sa.text("SELECT path FROM candidates")))
    assert names == ["a.fits", "d.fits"]
    with pytest.raises(CatalogueError):
        cat.query(min_posterior=2.0)
    cat.close()


def test_an_old_catalogue_gains_the_new_columns(tmp_path):
    """A catalogue written before the decision columns existed is migrated in place."""
    path = tmp_path / "old.sqlite"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:       # the results table of the previous release, one row
        conn.exec_driver_sql(
            "CREATE TABLE scans (id INTEGER PRIMARY KEY, started TIMESTAMP NOT NULL, finished TIMESTAMP, "
            "model_version VARCHAR(128), code_version VARCHAR(64), parameters JSON, host VARCHAR(255), "
            "files_seen BIGINT DEFAULT 0 NOT NULL, files_read BIGINT DEFAULT 0 NOT NULL, "
            "files_classified BIGINT DEFAULT 0 NOT NULL, files_failed BIGINT DEFAULT 0 NOT NULL, "
            "files_skipped BIGINT DEFAULT 0 NOT NULL, status VARCHAR(32) DEFAULT 'running' NOT NULL, summary JSON)")
        conn.exec_driver_sql(
            "CREATE TABLE results (id INTEGER PRIMARY KEY, path TEXT NOT NULL, model_version VARCHAR(128) NOT NULL, "
            "obsid BIGINT, designation VARCHAR(64), ra FLOAT, dec FLOAT, snr_g FLOAT, snr_r FLOAT, snr_i FLOAT, "
            "lmjd INTEGER, planid VARCHAR(64), spid INTEGER, fiberid INTEGER, pipeline_class VARCHAR(32), "
            "pipeline_subclass VARCHAR(64), data_release VARCHAR(64), layout VARCHAR(16), p_o FLOAT, p_b FLOAT, "
            "p_a FLOAT, p_f FLOAT, p_g FLOAT, p_k FLOAT, p_m FLOAT, probs JSON, predicted_class VARCHAR(8), "
            "flags INTEGER DEFAULT 0 NOT NULL, scan_id INTEGER, created TIMESTAMP NOT NULL, "
            "UNIQUE (path, model_version))")
        conn.exec_driver_sql(
            "CREATE TABLE errors (id INTEGER PRIMARY KEY, path TEXT NOT NULL, model_version VARCHAR(128) NOT NULL, "
            "scan_id INTEGER, reason VARCHAR(64) NOT NULL, message TEXT, created TIMESTAMP NOT NULL, "
            "UNIQUE (path, model_version))")
        conn.exec_driver_sql("CREATE VIEW candidates AS SELECT * FROM results WHERE p_o >= 0.5")
        conn.exec_driver_sql("INSERT INTO results (path, model_version, p_o, predicted_class, created) "
                             "VALUES ('old.fits', 'v1', 0.8, 'O', '2026-11-25 10:00:00')")
    engine.dispose()
    cat = Catalogue(str(path), create=False)
    table = cat.query(all_rows=True)
    assert list(table["path"]) == ["old.fits"] and table["is_candidate"].mask[0]     # NULL: no decision
    assert list(cat.query()["path"]) == ["old.fits"]                                 # old rule p >= 0.5
    cat.write(None, [_decided("new.fits", 0.999, True, 5.0)])
    assert sorted(cat.query()["path"]) == ["new.fits", "old.fits"]
    cat.close()
    Catalogue(str(path)).close()                                   # opening again changes nothing


def test_scan_counts_and_done_paths_of_one_scan(tmp_path):
    from lamost_ostar.catalogue import Catalogue

    cat = Catalogue(tmp_path / "c.sqlite")
    a, b = cat.start_scan("v"), cat.start_scan("v")
    cat.write(a, [{"path": "p1", "ok": True, "p_o": 0.9}, {"path": "p2", "ok": False,
                                                          "error_reason": "corrupt"}])
    cat.write(b, [{"path": "p3", "ok": True, "p_o": 0.2}, {"path": "p1", "ok": True, "p_o": 0.1},
                  {"path": "p4", "ok": False, "error_reason": "empty"},
                  {"path": "p5", "ok": False, "error_reason": "empty"}])
    assert cat.scan_counts(a, threshold=0.5) == {"results": 1, "errors": 1,
                                                 "errors_by_reason": {"corrupt": 1}, "candidates": 1}
    assert cat.scan_counts(b) == {"results": 1, "errors": 2, "errors_by_reason": {"empty": 2}}
    assert cat.done_paths(["p1", "p2", "p3", "p4"], "v", scan_id=b) == {"p3", "p4"}
    assert cat.done_paths(["p1", "p2", "p3"], "v") == {"p1", "p2", "p3"}
    cat.close()


# --------------------------------------------------------------------------- stages: one table each

from lamost_ostar.stage import OutputField, StageSpec  # noqa: E402

LINES = StageSpec(name="lines_test", version="lines_test-1", model_version="lines_test-1", outputs=(
    OutputField("ew_heii_4541", "float", "Angstrom", "He II 4541 EW"),
    OutputField("heii_sigma", "float", None, "He II significance", index=True),
    OutputField("heii_detected", "bool", None, "He II detected", summary=True),
    OutputField("n_lines", "int"), OutputField("note", "str"), OutputField("extra", "json")))


def _line(i: int, ok: bool = True, prefix: str = "/data/spec", **kw) -> dict:
    path = f"{prefix}-{i:06d}.fits.gz"
    if not ok:
        return {"path": path, "ok": False, "error_reason": "no_line_coverage", "error_message": "x"}
    return {"path": path, "ok": True, "obsid": 100000 + i, "ra": 10.0 + i, "dec": 1.0, "snr_g": 20.0,
            "ew_heii_4541": 0.1 * i, "heii_sigma": float(i), "heii_detected": i >= 4,
            "n_lines": i % 3, "note": f"n{i}", "extra": {"i": i}, **kw}


def test_a_plugin_stage_gets_its_own_table(db_url):
    cat = Catalogue(db_url)
    sid = cat.start_scan(stages=[StageSpec.from_dict(LINES.to_dict())])
    assert cat.stage_names() == ["ostar", "lines_test"]
    cat.write(sid, [_line(i) for i in range(6)] + [_line(9, ok=False)], stage=LINES)
    cat.write(sid, [make_result(i) for i in range(3)])                     # ostar, same files
    assert cat.counts(stage="lines_test") == {"results": 6, "errors": 1}
    assert cat.counts() == {"results": 3, "errors": 0}                    # nothing doubled
    assert len(cat.query(all_rows=True)) == 3
    t = cat.query_stage("lines_test", sort="heii_sigma", descending=True)
    assert list(t["heii_sigma"]) == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    assert t["ew_heii_4541"].unit == "Angstrom" and t["heii_sigma"].description == "He II significance"
    assert list(t["heii_detected"]) == [True, True, False, False, False, False]
    assert t["model_version"][0] == "lines_test-1" and t["stage_version"][0] == "lines_test-1"
    assert t["code_version"][0] and t["scan_id"][0] == sid
    assert t["extra"][0] == '{"i": 5}' and t["note"][0] == "n5" and t["n_lines"][0] == 2
    # resume is per stage; errors carry their stage
    paths = [_line(i)["path"] for i in range(10)]
    assert cat.done_paths(paths, "lines_test-1", stage="lines_test") == set(paths[:6]) | {paths[9]}
    assert cat.done_paths(paths, "v1") == set(paths[:3])
    assert list(cat.errors(stage="lines_test")["stage"]) == ["lines_test"]
    assert cat.scan_counts(sid, threshold=0.5, stage="lines_test") == {
        "results": 6, "errors": 1, "errors_by_reason": {"no_line_coverage": 1},
        "counts": {"heii_detected": 2}}
    assert "candidates" in cat.scan_counts(sid, threshold=0.5)
    st = cat.stages()
    assert list(st["stage"]) == ["ostar", "lines_test"] and list(st["result_rows"]) == [3, 6]
    assert st["table"][1] == "results_lines_test" and st["model_versions"][1] == "lines_test-1 (6)"
    # a result of this stage that later succeeds replaces its error; an error never shadows a result
    cat.write(sid, [_line(9)], stage=LINES)
    cat.write(sid, [_line(0, ok=False)], stage=LINES)
    assert cat.counts(stage="lines_test") == {"results": 7, "errors": 0}
    cat.close()


def test_query_indexes_are_deferred_on_empty_tables_and_built_once(db_url):
    cat = Catalogue(db_url)
    sid = cat.start_scan(stages=[StageSpec.from_dict(LINES.to_dict())])
    all_ostar = {ix.name for ix in catmod._RESULTS.indexes}
    assert cat.missing_indexes("ostar") == [] and all_ostar
    # empty tables: their query indexes go; the (path, model_version) key stays
    assert cat.defer_indexes(["ostar", "lines_test"]) == ["ostar", "lines_test"]
    assert set(cat.missing_indexes("ostar")) == all_ostar
    assert "ix_results_lines_test_heii_sigma" in cat.missing_indexes("lines_test")
    cat.write(sid, [make_result(i) for i in range(5)])
    cat.write(sid, [make_result(i) for i in range(5)])                    # still idempotent
    cat.write(sid, [_line(i) for i in range(4)], stage=LINES)
    assert cat.counts() == {"results": 5, "errors": 0}
    # a table that holds rows keeps whatever it has: still deferred, nothing dropped or built
    assert cat.defer_indexes(["ostar"]) == ["ostar"]
    assert cat.build_indexes(["ostar", "lines_test"]) >= 0
    assert cat.missing_indexes("ostar") == [] == cat.missing_indexes("lines_test")
    assert cat.build_indexes() >= 0                                         # idempotent, every stage
    # rows and every index: an incremental scan keeps them
    assert cat.defer_indexes(["ostar", "lines_test"]) == []
    assert cat.missing_indexes("ostar") == []
    t = cat.query(all_rows=True, sort="p_o", descending=True)
    assert len(t) == 5 and list(t["p_o"]) == sorted(t["p_o"], reverse=True)
    cat.close()


def test_joins_and_where(db_url):
    cat = Catalogue(db_url)
    sid = cat.start_scan("v1")
    cat.write(sid, [make_result(i, p_o=0.9 if i < 4 else 0.1) for i in range(8)])
    cat.write(sid, [_line(i) for i in range(0, 8, 2)], stage=LINES)        # every other file
    t = cat.query(all_rows=True, join=["lines_test"], sort="obsid")
    assert len(t) == 8 and "lines_test.heii_sigma" in t.colnames
    assert list(t["lines_test.heii_sigma"].mask) == [False, True] * 4
    t = cat.query(all_rows=True, where="lines_test.heii_sigma > 3", sort="obsid")   # joined for it
    assert list(t["obsid"]) == [100004, 100006]
    t = cat.query(where=["lines_test.heii_detected = true", "p_o >= 0.5"])
    assert len(t) == 0
    t = cat.query(all_rows=True, where="lines_test.heii_sigma >= 2 AND p_o < 0.5")
    assert sorted(t["obsid"]) == [100004, 100006]
    t = cat.query_stage("lines_test", join=["ostar"], where="ostar.p_o > 0.5", sort="id")
    assert list(t["obsid"]) == [100000, 100002] and "ostar.predicted_class" in t.colnames
    assert len(cat.query_stage("lines_test", where="note = 'n2'")) == 1
    assert len(cat.query_stage("lines_test", where="extra IS NOT NULL")) == 4
    assert len(cat.query_stage("lines_test", cone=(12.0, 1.0, 0.5))) == 1
    for bad, msg in (("heii_sigma > 1; DROP TABLE results", "cannot read"),
                     ("nosuch > 1", "unknown column"), ("lines_test.nosuch > 1", "unknown column"),
                     ("p_o > 'x'", "not a string"), ("p_o > 1 OR p_o < 0", "OR is not"),
                     ("p_o", "operator"), ("ostar.p_o > 1", None)):
        if msg is None:
            cat.query(all_rows=True, where=bad)                             # own stage's prefix
            continue
        with pytest.raises(CatalogueError, match=msg):
            cat.query(all_rows=True, where=bad)
    with pytest.raises(CatalogueError, match="no results of stage 'nope'"):
        cat.query(all_rows=True, join=["nope"])
    # two model versions of the joined stage: say which, never duplicate rows silently
    other = StageSpec(name="lines_test", version="lines_test-2", model_version="lines_test-2",
                      outputs=LINES.outputs)
    cat.write(sid, [_line(0)], stage=other)
    with pytest.raises(CatalogueError, match=r"lines_test-1 \(4 rows\), lines_test-2 \(1 rows\)"):
        cat.query(all_rows=True, join=["lines_test"])
    assert len(cat.query(all_rows=True, join=["lines_test@lines_test-2"])) == 8
    assert cat.model_versions("lines_test") == {"lines_test-1": 4, "lines_test-2": 1}
    with cat.engine.connect() as conn:   # the results table itself was never touched by the plugin
        assert conn.execute(sa.text("select count(*) from results")).scalar_one() == 8
    cat.close()


def test_a_new_stage_version_adds_its_new_outputs(tmp_path):
    cat = Catalogue(tmp_path / "c.sqlite")
    cat.write(None, [_line(1)], stage=LINES)
    v2 = StageSpec(name="lines_test", version="lines_test-2", model_version="lines_test-2",
                   outputs=LINES.outputs + (OutputField("ew_hbeta", "float", "Angstrom"),))
    cat.write(None, [_line(2, ew_hbeta=3.5)], stage=v2)
    t = cat.query_stage("lines_test", sort="id")
    assert list(t["ew_hbeta"].mask) == [True, False] and t["ew_hbeta"][1] == 3.5
    clone = Catalogue(tmp_path / "c.sqlite", create=False)                 # a fresh process view
    assert "ew_hbeta" in clone.query_stage("lines_test").colnames
    clone.close()
    cat.close()


def _old_schema(path) -> None:
    """A catalogue as the previous release wrote it: a plugin stage's rows mixed into results/errors."""
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE scans (id INTEGER PRIMARY KEY, started TIMESTAMP NOT NULL, finished TIMESTAMP, "
            "model_version VARCHAR(128), code_version VARCHAR(64), parameters JSON, host VARCHAR(255), "
            "files_seen BIGINT DEFAULT 0 NOT NULL, files_read BIGINT DEFAULT 0 NOT NULL, "
            "files_classified BIGINT DEFAULT 0 NOT NULL, files_failed BIGINT DEFAULT 0 NOT NULL, "
            "files_skipped BIGINT DEFAULT 0 NOT NULL, status VARCHAR(32) DEFAULT 'running' NOT NULL, summary JSON)")
        cols = ", ".join(f"{c} FLOAT" for c in ("p_o", "p_b", "p_a", "p_f", "p_g", "p_k", "p_m", "p_x"))
        conn.exec_driver_sql(
            "CREATE TABLE results (id INTEGER PRIMARY KEY, path TEXT NOT NULL, model_version VARCHAR(128) NOT NULL, "
            "obsid BIGINT, designation VARCHAR(64), ra FLOAT, dec FLOAT, snr_g FLOAT, snr_r FLOAT, snr_i FLOAT, "
            "lmjd INTEGER, planid VARCHAR(64), spid INTEGER, fiberid INTEGER, pipeline_class VARCHAR(32), "
            f"pipeline_subclass VARCHAR(64), data_release VARCHAR(64), layout VARCHAR(16), {cols}, probs JSON, "
            "predicted_class VARCHAR(8), flags INTEGER DEFAULT 0 NOT NULL, posterior_o FLOAT, is_candidate BOOLEAN, "
            "heii_sigma FLOAT, scan_id INTEGER REFERENCES scans (id) ON DELETE SET NULL, "
            "created TIMESTAMP NOT NULL, UNIQUE (path, model_version))")
        conn.exec_driver_sql("CREATE INDEX ix_results_scan_id ON results (scan_id)")
        conn.exec_driver_sql(
            "CREATE TABLE errors (id INTEGER PRIMARY KEY, path TEXT NOT NULL, model_version VARCHAR(128) NOT NULL, "
            "scan_id INTEGER, reason VARCHAR(64) NOT NULL, message TEXT, created TIMESTAMP NOT NULL, "
            "UNIQUE (path, model_version))")
        conn.exec_driver_sql("CREATE INDEX ix_errors_scan_id ON errors (scan_id)")
        conn.exec_driver_sql("CREATE INDEX ix_errors_reason ON errors (reason)")
        conn.exec_driver_sql("CREATE VIEW candidates AS SELECT * FROM results WHERE p_o >= 0.5")
        conn.exec_driver_sql("INSERT INTO scans (id, started, model_version, parameters) VALUES "
                             "(1, '2026-11-25 10:00:00', 'v1', '{\"stage\": \"ostar\"}'), "
                             "(2, '2026-11-25 11:00:00', 'lines_test-1', '{\"stage\": \"lines_test\"}')")
        for i, (mv, sid) in enumerate([("v1", 1), ("v1", 1), ("lines_test-1", 2), ("lines_test-1", 2)]):
            conn.exec_driver_sql(
                "INSERT INTO results (path, model_version, p_o, predicted_class, scan_id, created, obsid) "
                f"VALUES ('/d/{i % 2}.fits', '{mv}', 0.8, 'O', {sid}, '2026-11-25 10:00:00', {i})")
        conn.exec_driver_sql("INSERT INTO errors (path, model_version, scan_id, reason, created) VALUES "
                             "('/d/bad.fits', 'v1', 1, 'corrupt', '2026-11-25 10:00:00'), "
                             "('/d/bad.fits', 'lines_test-1', 2, 'corrupt', '2026-11-25 11:00:00')")
    engine.dispose()


def test_an_old_catalogue_with_a_plugins_rows_is_migrated(tmp_path, caplog):
    path = tmp_path / "old.sqlite"
    _old_schema(path)
    with caplog.at_level("WARNING", logger="lamost_ostar.catalogue"):
        cat = Catalogue(str(path), create=False)
        table = cat.query(all_rows=True)
    # the ostar rows stay; the plugin's header-only rows are gone (they had no measurement)
    assert sorted(table["obsid"]) == [0, 1] and set(table["model_version"]) == {"v1"}
    assert "2 result rows" in caplog.text and "lines_test" in caplog.text
    errs = cat.errors()
    assert sorted(zip(errs["stage"], errs["model_version"])) == [("lines_test", "lines_test-1"),
                                                                 ("ostar", "v1")]
    # resume per stage: for the plugin, only its failed file counts as done
    files = ["/d/0.fits", "/d/1.fits", "/d/bad.fits"]
    assert cat.done_paths(files, "v1") == set(files)
    assert cat.done_paths(files, "lines_test-1", stage="lines_test") == {"/d/bad.fits"}
    cat.write(None, [_line(0, prefix="/d/x")], stage=LINES)   # the plugin's table now
    cat.write(None, [{"path": "/d/bad.fits", "ok": False, "error_reason": "corrupt",
                      "model_version": "v1"}])               # the old key (path, model_version) is gone:
    cat.write(None, [{"path": "/d/bad.fits", "ok": False, "error_reason": "corrupt",
                      "model_version": "lines_test-1"}], stage=LINES)
    assert len(cat.errors()) == 2                              # ... and nothing was doubled
    with cat.engine.connect() as conn:
        uniques = [set(u["column_names"]) for u in sa.inspect(conn).get_unique_constraints("errors")]
        assert uniques == [{"stage", "path", "model_version"}]
        idx = {i["name"] for i in sa.inspect(conn).get_indexes("errors")}
        assert {"ix_errors_scan_id", "ix_errors_reason"} <= idx
    cat.close()
    caplog.clear()
    with caplog.at_level("WARNING", logger="lamost_ostar.catalogue"):
        Catalogue(str(path)).close()                           # opening again changes nothing
        assert len(Catalogue(str(path)).query(all_rows=True)) == 2
    assert "removed" not in caplog.text


def test_an_old_postgresql_catalogue_is_rekeyed(pg_url):
    """The errors key (path, model_version) becomes (stage, path, model_version) on PostgreSQL too."""
    cat = Catalogue(pg_url)
    cat.write(cat.start_scan("v1"), [make_result(1, ok=False)])
    with cat.engine.begin() as conn:   # undo to the previous release's errors table
        conn.exec_driver_sql("ALTER TABLE errors DROP CONSTRAINT uq_errors_stage_path_model")
        conn.exec_driver_sql("ALTER TABLE errors DROP COLUMN stage")
        conn.exec_driver_sql("ALTER TABLE errors ADD CONSTRAINT uq_errors_path_model UNIQUE (path, model_version)")
        conn.exec_driver_sql("DROP TABLE stages")
    cat.close()
    cat = Catalogue(pg_url)
    assert list(cat.errors()["stage"]) == ["ostar"]
    cat.write(None, [{"path": make_result(1).path, "ok": False, "error_reason": "corrupt",
                      "model_version": "v1"}], stage=StageSpec(name="other", version="o-1",
                                                                model_version="v1"))
    assert sorted(cat.errors()["stage"]) == ["ostar", "other"]
    assert cat.stage_names() == ["ostar", "other"]
    cat.close()


def test_query_signatures_keep_their_arguments():
    """Other code (the HTML report) calls query/iter_query: the old keywords stay, in order."""
    import inspect

    old = ["min_p_o", "predicted_class", "cone", "snr_min", "snr_max", "snr_band", "scan_id",
           "model_version", "sort", "descending", "limit", "all_rows", "candidates", "min_posterior",
           "min_heii_sigma"]
    for fn, extra in ((Catalogue.query, []), (Catalogue.iter_query, ["chunk_rows"])):
        params = list(inspect.signature(fn).parameters)[1:]
        assert params[:len(old) + len(extra)] == old + extra, params
        assert inspect.signature(fn).parameters["sort"].default == "p_o"


def test_bulk_write_stores_what_a_sqlalchemy_insert_stores(db_url):
    """``write`` inserts column by column through the driver; every stored value (JSON, NaN,
    numpy scalars, booleans, timestamps) equals what SQLAlchemy's own insert of the same rows
    stores, on SQLite and PostgreSQL."""
    from datetime import datetime, timezone

    from lamost_ostar.catalogue import _code_version
    from lamost_ostar.stage import OStarStage, stage_spec

    results = [make_result(i) for i in range(40)] + [make_result(40, ok=False)]
    results[3].snr_g, results[4].ra, results[5].obsid = float("nan"), np.float32(1.5), np.int64(9)
    results[6].probs = {"O": np.float32(0.5), "B": float("nan"), "A": None}
    results[7].is_candidate, results[7].posterior_o = np.bool_(True), 0.75
    results[8].evidence = {"ew_heii_4541": 0.4, "n_heii_lines": 2, "heii_detected": True}
    cat = Catalogue(db_url)
    sid = cat.start_scan(model_version="v1")
    assert cat.write(sid, results).results == 40
    spec = stage_spec(OStarStage)
    table = cat.ensure_stage(spec)
    now = datetime.now(timezone.utc)
    ref = [{"path": r.path, "model_version": "ref", "scan_id": sid, "created": now,
            "stage_version": spec.version, "code_version": _code_version(),
            **spec.metadata_values(r), **spec.output_values(r)} for r in results if r.ok]
    with cat.engine.begin() as conn:
        conn.execute(sa.insert(table), ref)
    with cat.engine.connect() as conn:
        got = {mv: {row.path: row._asdict() for row in conn.execute(
            sa.select(table).where(table.c.model_version == mv))} for mv in ("v1", "ref")}
        err = conn.execute(sa.text("select path, reason, message, stage from errors")).all()
    assert len(got["v1"]) == len(got["ref"]) == 40
    for path, a in got["v1"].items():
        b = got["ref"][path]
        for name in a:
            if name in ("id", "model_version", "created"):
                continue
            assert a[name] == b[name] or (a[name] != a[name] and b[name] != b[name]), (path, name)
        assert isinstance(a["created"], datetime)
    assert got["v1"][results[6].path]["probs"]["O"] == 0.5
    assert got["v1"][results[8].path]["n_heii_lines"] == 2
    assert [tuple(e) for e in err] == [(results[40].path, "corrupt", "file 40 is truncated", "ostar")]
    cat.close()
