"""Tests for :mod:`lamost_ostar.scan` and ``lamost-ostar scan``.

The scans run on a real ``LocalCluster`` (one worker process) into a real SQLite
catalogue, on copies of the committed fixture files (good and bad).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lamost_ostar import scan as scanmod
from lamost_ostar.cli import main
from lamost_ostar_plugins.heii_lines import VERSION as heii_version

DATA = Path(__file__).resolve().parent / "data"
GOOD = ["io_image_dr7.fits", "io_image_dr6.fits.gz", "io_dr1_gzip.fits", "io_coadd_dr9.fits.gz",
        "io_nan_few.fits.gz"]
BAD = {"io_truncated.fits": "truncated", "io_not_fits.fits": "not_fits",
       "io_medres.fits": "medium_resolution", "io_empty.fits": "empty"}


# ---------------------------------------------------------------- path sources
def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_walk_release_is_sorted_recursive_and_filtered(tmp_path):
    for rel in ["b/2/spec-2.fits.gz", "b/10/spec-1.fits", "a/spec-0.FITS", "a/notes.txt",
                ".hidden/spec-x.fits", "a/.spec-y.fits", "c.fits", "d/empty/"]:
        if rel.endswith("/"):
            (tmp_path / rel).mkdir(parents=True)
        else:
            _touch(tmp_path / rel)
    got = [Path(p).relative_to(tmp_path).as_posix() for p in scanmod.walk_release(tmp_path)]
    assert got == ["a/spec-0.FITS", "b/10/spec-1.fits", "b/2/spec-2.fits.gz", "c.fits"]
    assert all(Path(p).is_absolute() for p in scanmod.walk_release(tmp_path))


def test_iter_paths_file_lists_single_files_and_missing(tmp_path):
    f1 = _touch(tmp_path / "x" / "one.fits")
    single = _touch(tmp_path / "odd_name.dat")
    lst = tmp_path / "x" / "list.txt"
    lst.write_text("# comment\n\none.fits\n" + str(single) + "\n")
    assert list(scanmod.iter_paths([f"@{lst}", single])) == [str(f1), str(single), str(single)]
    with pytest.raises(FileNotFoundError):
        list(scanmod.iter_paths([tmp_path / "nope"]))


def test_walk_is_lazy(tmp_path):
    for i in range(3):
        _touch(tmp_path / f"d{i}" / "s.fits")
    gen = scanmod.walk_release(tmp_path)
    first = next(gen)
    (tmp_path / "d2" / "s.fits").unlink()  # not listed yet: the walk has not reached d2
    assert Path(first).parent.name == "d0"
    assert [Path(p).parent.name for p in gen] == ["d1"]


def test_iter_partitions():
    parts = list(scanmod.iter_partitions(iter(range(7)), 3))
    assert parts == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError):
        list(scanmod.iter_partitions([], 0))


def test_partition_summary_and_format():
    from lamost_ostar.stage import StageResult

    results = [StageResult("a", True, p_o=0.9), StageResult("b", True, p_o=0.1),
               StageResult.failure("c", "corrupt", "bad")]
    part = scanmod.PartitionSummary.from_results(5, 2, results, threshold=0.5)
    assert (part.n_classified, part.n_errors, part.n_candidates) == (2, 1, 1)
    total = scanmod.PartitionSummary()
    total.add(part)
    total.add(part)
    assert total.errors_by_reason == {"corrupt": 2} and total.n_files == 10
    summary = scanmod.ScanSummary(scan_id=1, model_version="v", threshold=0.5, totals=total,
                                  elapsed_s=2.0)
    text = summary.format()
    assert "corrupt" in text and "O candidates" in text and len(text.splitlines()) < 20
    assert summary.counts()["files_skipped"] == 4


# ---------------------------------------------------------------- scans on a real cluster
@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("release")
    for i, name in enumerate(GOOD + list(BAD)):
        dest = root / f"5600{i % 3}" / f"plan{i % 2}" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / name, dest)
    return root


@pytest.fixture(scope="module")
def client():
    c, cluster = scanmod.make_client(n_workers=1, threads_per_worker=1, memory_limit=None)
    yield c
    c.close()
    cluster.close()


def test_local_workers_run_without_dask_profiler(client):
    """Dask's 10 ms statistical profiler is off in the local workers (it costs CPU, nobody reads it)."""
    import dask

    flags = client.run(lambda: dask.config.get("distributed.worker.profile.enabled"))
    assert flags and not any(flags.values())
    assert dask.config.get("distributed.worker.profile.enabled")   # the caller's config is untouched


def test_local_cluster_monitors_are_quiet(client):
    """The local cluster's monitors run at scan.QUIET_MONITORS, in the workers and in the nannies."""
    import dask

    for key, value in scanmod.QUIET_MONITORS.items():
        got = client.run(lambda k=key: dask.config.get(k))
        assert got and set(got.values()) == {value}, key
    nanny = next(iter(client.cluster.workers.values()))
    assert nanny.memory_manager.memory_monitor_interval == 1.0
    assert dask.config.get("distributed.admin.tick.interval") != "1s"   # the caller's config is untouched


def test_local_workers_keep_glibc_malloc_adaptive(client):
    """Dask's MALLOC_TRIM_THRESHOLD_=65536 (it made the stage 44 % slower) is not set in local workers."""
    import os

    if "MALLOC_TRIM_THRESHOLD_" in os.environ:
        pytest.skip("MALLOC_TRIM_THRESHOLD_ is exported in this shell; workers inherit it on purpose")
    trim = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    assert trim and set(trim.values()) == {None}


def _malloc_arenas() -> int:
    """Number of glibc malloc arenas of this process (``malloc_info``'s heaps)."""
    import ctypes
    import os
    import tempfile

    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    bytearray(2**20)  # this thread allocates: it takes an arena if it has none
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "malloc.xml")
        fp = libc.fopen(path.encode(), b"w")
        libc.malloc_info(0, ctypes.c_void_p(fp))
        libc.fclose(ctypes.c_void_p(fp))
        with open(path) as fh:
            return fh.read().count("<heap nr=")


def test_local_workers_run_tasks_in_one_malloc_arena(client):
    """A local worker's task thread allocates from the main arena (scan.ARENA_ENV): a thread arena's
    heaps are unmapped after every batch and faulted in again (reports/performance.md)."""
    import os
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc malloc only")
    if os.environ.get("MALLOC_ARENA_MAX", "1") != "1" or os.environ.get(scanmod.MALLOPT_ENV) == "0":
        pytest.skip("this shell sets the workers' malloc arenas itself")
    env = client.run(lambda: os.environ.get("MALLOC_ARENA_MAX"))
    assert env and set(env.values()) == {"1"}
    assert client.submit(_malloc_arenas, pure=False).result() == 1   # in the worker's task thread


def test_local_workers_import_keras_lean(client):
    """The local workers import Keras without matplotlib / scikit-learn (stage.import_keras)."""
    import os

    flags = client.run(lambda: os.environ.get("LAMOST_OSTAR_LEAN_KERAS"))
    assert flags and set(flags.values()) == {"1"}


def test_scan_workers_tune_malloc(client):
    """Every scan worker applies MALLOPT_SETTINGS when the scan's plugin is set up (glibc)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("no glibc: tune_malloc is a no-op here")
    plugin = scanmod.ScanWorkerPlugin("heii_lines", {}, sink=None)
    client.register_plugin(plugin, name=plugin.name)
    name = plugin.name
    flags = client.run(lambda dask_worker: dask_worker.plugins[name].malloc_tuned)
    assert flags and all(flags.values())
    client.unregister_worker_plugin(name)


def _catalogue(tmp_path):
    from lamost_ostar.catalogue import Catalogue

    return Catalogue(f"sqlite:///{tmp_path / 'cat.sqlite'}")


def _rows(cat, table):
    import sqlalchemy as sa

    with cat.engine.connect() as conn:
        return conn.execute(sa.text(f"select path, model_version from {table}")).all()


def test_scan_resume_is_idempotent(tmp_path, release, client):
    cat = _catalogue(tmp_path)
    first = scanmod.run_scan([release], cat, client=client, stage="heii_lines",
                             partition_size=3, batch_size=2, progress=False)
    n = len(GOOD) + len(BAD)
    assert first.totals.n_files == n and first.totals.n_skipped == 0
    assert first.totals.n_errors == len(BAD)
    assert first.totals.errors_by_reason == {r: 1 for r in BAD.values()}
    assert first.model_version == heii_version

    # a second run skips everything; nothing is duplicated
    second = scanmod.run_scan([release], cat, client=client, stage="heii_lines",
                              partition_size=4, progress=False)
    assert second.totals.n_skipped == n and second.totals.n_classified == 0
    res, err = _rows(cat, "results_heii_lines"), _rows(cat, "errors")
    assert len(res) == len(GOOD) and len(err) == len(BAD)
    assert len(set(res) | set(err)) == n
    assert _rows(cat, "results") == []          # the plugin's rows are in its own table only
    t = cat.query_stage("heii_lines")
    assert len(t) == len(GOOD) and not t["heii_sigma"].mask.any() and "o_star_like" in t.colnames
    assert "O candidates" not in first.format() and "heii_detected" in first.format()
    scans = cat.scans()
    assert list(scans["status"]) == ["finished", "finished"]
    assert list(scans["files_seen"]) == [n, n] and list(scans["files_skipped"]) == [0, n]


def test_scan_rejects_bad_arguments(tmp_path, release):
    with pytest.raises(FileNotFoundError):
        scanmod.run_scan([tmp_path / "missing"], None, progress=False)
    with pytest.raises(ValueError):
        scanmod.run_scan([release], None, partition_size=0, progress=False)


def test_cli_scan_dry_run_and_errors(tmp_path, release):
    runner = CliRunner()
    out = runner.invoke(main, ["scan", str(release), "--dry-run", "--partition-size", "4"])
    assert out.exit_code == 0, out.output
    assert "9 files: 9 new, 0 done, 0 failed before" in out.output
    assert "3 partitions of <= 4" in out.output
    for args in (["scan", str(tmp_path / "missing")],
                 ["scan", str(release), "--device", "tpu"],
                 ["scan", str(release), "--partition-size", "0"],
                 ["scan", str(release), "--stage", "nope"],
                 ["scan", str(release), "--db", "mysql+nodriver://x/y"]):
        res = runner.invoke(main, args)
        assert res.exit_code != 0, args
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:"), (args, res.output)


def test_ostar_scan_with_a_model_version_and_resume(tmp_path, release, client):
    from test_stage import save_tiny_model

    models = tmp_path / "models"
    version = save_tiny_model(models)
    cat = _catalogue(tmp_path)
    first = scanmod.run_scan([release], cat, client=client, models_dir=models,
                             device="cpu", partition_size=4, batch_size=3, progress=False)
    n = len(GOOD) + len(BAD)
    assert first.model_version == version
    assert (first.totals.n_classified, first.totals.n_errors) == (len(GOOD), len(BAD))
    assert first.startup_s <= first.first_result_s <= first.elapsed_s
    assert first.counts()["first_result_s"] == pytest.approx(first.first_result_s, abs=1e-3)
    assert first.first_result_s <= first.last_result_s <= first.elapsed_s
    assert first.counts()["last_result_s"] == pytest.approx(first.last_result_s, abs=1e-3)
    assert first.processing_rate >= first.steady_rate > 0   # the scan's end left out
    assert "first results at" in first.format()
    again = scanmod.run_scan([release], cat, client=client, model_version=version,
                             models_dir=models, device="cpu", progress=False)
    assert again.totals.n_skipped == n
    res, err = _rows(cat, "results"), _rows(cat, "errors")
    assert len(res) == len(GOOD) and len(err) == len(BAD)
    assert {mv for _, mv in res + err} == {version}
    scans = cat.scans()
    assert list(scans["model_version"]) == [version, version]
    assert all(json.loads(p)["class_veto"] is True and json.loads(p)["min_snr_g"] == 3.0
               for p in scans["parameters"])
    # device cpu, engine auto: the numpy engine, recorded as asked and as used
    assert all((json.loads(p)["engine"], json.loads(p)["engine_used"]) == ("auto", "numpy")
               for p in scans["parameters"])
    assert first.engine == "numpy" and "numpy engine on cpu:0" in first.format()
    # the workers' peak memory, in the summary and the scan row
    assert 20 < first.counts()["worker_peak_rss_mb"] < 4000 and "worker memory" in first.format()
    assert all(json.loads(sm)["worker_peak_rss_mb"] > 20 for sm in scans["summary"])
    # the workers' CPU per file read (the partition's thread), in the summary and the scan row
    assert 0 < first.counts()["partition_cpu_ms_per_file"] < 1000 and "worker CPU" in first.format()
    assert json.loads(scans["summary"][0])["partition_cpu_ms_per_file"] > 0


def test_scan_with_the_keras_engine_gives_the_same_results(tmp_path, client):
    from test_stage import save_tiny_model

    models = tmp_path / "models"
    version = save_tiny_model(models)
    release = tmp_path / "rel"
    release.mkdir()
    for name in GOOD:
        (release / name).write_bytes((DATA / name).read_bytes())
    got = {}
    for engine in ("numpy", "keras"):
        (tmp_path / engine).mkdir()
        cat = _catalogue(tmp_path / engine)
        summary = scanmod.run_scan([release], cat, client=client, model_version=version,
                                   models_dir=models, device="cpu", engine=engine, progress=False)
        assert summary.engine == engine
        assert json.loads(cat.scans()["parameters"][0])["engine_used"] == engine
        with cat.engine.connect() as conn:
            import sqlalchemy as sa

            got[engine] = dict(conn.execute(sa.text("select path, p_o from results")).all())
    assert got["numpy"].keys() == got["keras"].keys() and len(got["numpy"]) == len(GOOD)
    for path, p in got["numpy"].items():
        assert p == pytest.approx(got["keras"][path], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("class_veto", [True, False])
def test_scan_vetoes_a_real_lamost_galaxy_unless_told_not_to(tmp_path, client, class_veto):
    """The pipeline-class veto through the whole scan: a model whose rule accepts everything; the
    real DR7 galaxy is a candidate only with ``class_veto=False``; the scan records the setting."""
    import sqlalchemy as sa

    from lamost_ostar.models.decision import Decision
    from lamost_ostar.stage import FLAG_CLASS_VETO
    from test_stage import CLASSES, save_tiny_model

    models = tmp_path / "models"
    version = save_tiny_model(models, prefix="acceptall",
                              decision=Decision.balanced(CLASSES, min_posterior=0.0).to_dict())
    rel = tmp_path / "rel"
    rel.mkdir()
    for name in ("io_galaxy_dr7.fits.gz", "io_image_dr7.fits"):
        (rel / name).write_bytes((DATA / name).read_bytes())
    cat = _catalogue(tmp_path)
    scanmod.run_scan([rel], cat, client=client, models_dir=models, model_version=version, device="cpu",
                     class_veto=class_veto, min_snr_g=None if class_veto else 0, progress=False)
    with cat.engine.connect() as conn:
        rows = {Path(p).name: (bool(c), int(f)) for p, c, f in conn.execute(
            sa.text("select path, is_candidate, flags from results")).all()}
    assert rows["io_image_dr7.fits"][0] is True
    galaxy_candidate, galaxy_flags = rows["io_galaxy_dr7.fits.gz"]
    assert galaxy_candidate is (not class_veto)
    assert bool(galaxy_flags & FLAG_CLASS_VETO) is class_veto
    params = json.loads(cat.scans()["parameters"][0])
    assert params["class_veto"] is class_veto and params["min_snr_g"] == (3.0 if class_veto else None)


class CrashReader:
    """A reader plugin that dies on files named ``*crash*`` (like a segfault in a C library)."""

    name = "crash"
    version = "crash-reader-1"

    def read(self, path):
        import os

        import numpy as np

        from lamost_ostar.io import Spectrum

        if "crash" in str(path):
            os._exit(1)
        n = 10
        return Spectrum(flux=np.ones(n, np.float32), ivar=np.ones(n, np.float32),
                        wavelength=np.linspace(4000, 5000, n), andmask=np.zeros(n, np.int32),
                        ormask=np.zeros(n, np.int32), path=str(path), layout="test")


class CrashStage:
    """A stage without declared name/outputs (an older plugin): a result for every spectrum."""

    model_version = "crash-1"

    def __init__(self, **kwargs):
        pass

    def process(self, items):
        from lamost_ostar.stage import StageResult

        return [StageResult(str(getattr(p, "path", p)), True, p_o=0.0) for p in items]


def test_a_file_that_kills_workers_is_isolated(tmp_path):
    import dask

    for i in range(6):
        _touch(tmp_path / "rel" / f"s{i}.fits")
    _touch(tmp_path / "rel" / "s3_crash.fits")
    cat = _catalogue(tmp_path)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        summary = scanmod.run_scan([tmp_path / "rel"], cat, n_workers=1, memory_limit=None,
                                   stage="test_scan:CrashStage", reader="test_scan:CrashReader",
                                   partition_size=4, progress=False)
    assert summary.totals.n_files == 7 and summary.n_failed_partitions == 0
    assert summary.totals.errors_by_reason == {"worker_crash": 1}
    err = _rows(cat, "errors")
    assert [Path(p).name for p, _ in err] == ["s3_crash.fits"]
    assert len(_rows(cat, "results_crashstage")) == 6   # a stage without a name: its class name


def test_only_a_settled_partition_is_counted(client):
    """A partition whose result was lost with its worker (CI, 2026-12-07: finished, then its
    worker died before the client took the summary) is ``lost``/``pending`` again when
    ``as_completed`` yields it: the scan waits for it instead of counting it as failed."""
    from distributed import Event

    done = client.submit(int, "1", pure=False)
    bad = client.submit(int, "x", pure=False)
    gate = Event(f"gate-{id(done)}", client=client)
    waiting = client.submit(lambda name: Event(name).wait(60), gate.name, pure=False)
    done.result()
    with pytest.raises(ValueError):
        bad.result()
    assert scanmod._settled(done) and scanmod._settled(bad)
    assert waiting.status == "pending" and not scanmod._settled(waiting)
    waiting._state.lose()  # what the client does with a result lost with its worker
    assert not scanmod._settled(waiting)
    gate.set()
    assert waiting.result() is True and scanmod._settled(waiting)


def test_final_counts_are_the_rows_the_scan_wrote(tmp_path):
    """The scans row is closed with what the catalogue holds for the scan: a partition that
    ran twice (its worker killed after the write) or one cut off by an interrupt still counts."""
    from lamost_ostar.stage import StageResult

    cat = _catalogue(tmp_path)
    earlier = cat.start_scan("v")
    cat.write(earlier, [StageResult("/r/old", True, p_o=0.9, model_version="v")])
    sid = cat.start_scan("v")
    cat.write(sid, [StageResult(f"/r/{i}", True, p_o=0.6 if i < 2 else 0.1, model_version="v")
                    for i in range(6)] + [StageResult.failure("/r/bad", "corrupt", "x", "v")])
    # what the finished partitions reported: a rerun saw /r/4, /r/5 as done ("skipped")
    acked = scanmod.PartitionSummary(n_files=8, n_skipped=3, n_classified=4, n_errors=1,
                                     n_candidates=2, errors_by_reason={"corrupt": 1})
    # /r/cut and /r/6 were in a partition cancelled by an interrupt; only /r/6 was written
    cat.write(sid, [StageResult("/r/6", True, p_o=0.1, model_version="v")])
    got = scanmod._final_totals(cat, sid, "v", acked, ["/r/cut", "/r/6"], threshold=0.5)
    assert (got.n_classified, got.n_errors, got.n_candidates) == (7, 1, 2)
    assert got.errors_by_reason == {"corrupt": 1}
    assert got.n_files == 9 and got.n_skipped == 1  # /r/old was done before this scan
    # a sink that cannot count keeps what the partitions reported
    assert scanmod._final_totals(object(), sid, "v", acked, [], 0.5) is acked


def test_local_cluster_does_not_warn_when_port_8787_is_taken():
    """The scan's local cluster needs no fixed port: port 8787 in use elsewhere prints nothing."""
    import socket
    import warnings

    holder = socket.socket()
    try:
        holder.bind(("", 8787))
        holder.listen()
    except OSError:  # already taken by someone else: just as good
        pass
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c, cluster = scanmod.make_client(n_workers=1, memory_limit=None)
            c.close()
            cluster.close()
        assert not [w for w in caught if "8787" in str(w.message)], [str(w.message) for w in caught]
    finally:
        holder.close()


class CountingReader:
    """The LAMOST reader, noting each file it reads in ``<release>/../reads.log``."""

    name = "counting"
    version = "counting-1"

    def __init__(self, engine="fitsio"):
        from lamost_ostar.io import LamostReader

        self._inner = LamostReader(engine)

    def read(self, path):
        log = Path(path).parents[3] / "reads.log"
        with open(log, "a") as fh:
            fh.write(f"{path}\n")
        return self._inner.read(path)


def test_two_stages_one_read_each_and_resume_per_stage(tmp_path, release, client):
    from test_stage import save_tiny_model

    rel = tmp_path / "data" / "release"
    shutil.copytree(release, rel)
    models = tmp_path / "models"
    version = save_tiny_model(models)
    cat = _catalogue(tmp_path)
    n = len(GOOD) + len(BAD)
    first = scanmod.run_scan([rel], cat, client=client, stage=["ostar", "heii_lines"],
                             reader="test_scan:CountingReader", models_dir=models, device="cpu",
                             partition_size=4, batch_size=3, progress=False)
    reads = (tmp_path / "data" / "reads.log").read_text().split()
    assert len(reads) == n and len(set(reads)) == n                  # each file read once
    assert set(first.stage_totals) == {"ostar", "heii_lines"} and first.model_version == version
    for name in ("ostar", "heii_lines"):
        t = first.stage_totals[name]
        assert (t.n_files, t.n_skipped, t.n_errors) == (n, 0, len(BAD))
    text = first.format()
    assert "ostar" in text and "heii_lines" in text and text.count("O candidates") == 1
    # both tables were empty: written without their query indexes, which were built at the end
    assert sorted(first.indexes_deferred) == ["heii_lines", "ostar"] and first.index_build_s >= 0
    assert "query indexes" in text and first.counts()["indexes_deferred"] == first.indexes_deferred
    assert cat.missing_indexes("ostar") == [] == cat.missing_indexes("heii_lines")
    assert len(_rows(cat, "results")) == len(GOOD) == len(_rows(cat, "results_heii_lines"))
    (row,) = cat.scans()
    assert row["stages"] == "ostar,heii_lines" and row["result_rows"] == len(GOOD)
    assert '"heii_lines"' in row["summary"] and row["files_classified"] == len(GOOD)

    # two files lose their heii_lines rows: the next scan measures those two for heii_lines only
    gone = sorted(p for p, _ in _rows(cat, "results_heii_lines"))[:2]
    import sqlalchemy as sa

    with cat.engine.begin() as conn:
        conn.execute(sa.text("delete from results_heii_lines where path in (:a, :b)"),
                     {"a": gone[0], "b": gone[1]})
    (tmp_path / "data" / "reads.log").unlink()
    again = scanmod.run_scan([rel], cat, client=client, stage=["ostar", "heii_lines"],
                             reader="test_scan:CountingReader", models_dir=models, device="cpu",
                             model_version={"ostar": version}, progress=False)
    assert sorted((tmp_path / "data" / "reads.log").read_text().split()) == gone
    assert again.indexes_deferred == [] and "query indexes" not in again.format()  # tables hold rows
    assert again.stage_totals["ostar"].n_skipped == n
    assert again.stage_totals["heii_lines"].n_classified == 2
    assert len(_rows(cat, "results_heii_lines")) == len(GOOD) and len(_rows(cat, "results")) == len(GOOD)
    joined = cat.query(all_rows=True, join=["heii_lines"])
    assert len(joined) == len(GOOD) and not joined["heii_lines.heii_sigma"].mask.any()


class PreparedProbe:
    """The He II line stage under another name, noting how each batch reached it."""

    name = "heii_probe"
    version = "heii-probe-1"
    model_version = "heii-probe-1"

    def __init__(self, **kwargs):
        from lamost_ostar_plugins.heii_lines import OUTPUTS, HeIILineStage

        self.outputs = OUTPUTS
        self._inner = HeIILineStage(**kwargs)

    def _note(self, how, items):
        log = Path(getattr(items[0], "path", items[0])).parents[3] / "stage.log"
        with open(log, "a") as fh:
            fh.write(f"{how} {len(items)}\n")

    def process(self, items):
        self._note("own", items)
        return self._inner.process(items)

    def process_prepared(self, spectra, prep):
        self._note("prepared", spectra)
        return self._inner.process_prepared(spectra, prep)


def test_two_stages_share_one_preprocessing_and_agree_with_one_stage_scans(tmp_path, release, client):
    import numpy as np

    from test_stage import save_tiny_model

    rel = tmp_path / "data" / "release"
    shutil.copytree(release, rel)
    models = tmp_path / "models"
    save_tiny_model(models)
    both = _catalogue(tmp_path)
    scanmod.run_scan([rel], both, client=client, stage=["ostar", "test_scan:PreparedProbe"],
                     models_dir=models, device="cpu", partition_size=4, batch_size=3, progress=False)
    log = (tmp_path / "data" / "stage.log").read_text().split("\n")
    notes = [line.split() for line in log if line]
    assert {how for how, _ in notes} == {"prepared"}                  # never its own preprocessing
    assert sum(int(n) for _, n in notes) == len(GOOD)
    from lamost_ostar.catalogue import Catalogue

    alone = Catalogue(f"sqlite:///{tmp_path / 'alone.sqlite'}")
    scanmod.run_scan([rel], alone, client=client, stage="ostar", models_dir=models, device="cpu",
                     partition_size=4, batch_size=3, progress=False)
    scanmod.run_scan([rel], alone, client=client, stage="test_scan:PreparedProbe", partition_size=4,
                     batch_size=3, progress=False)
    later = [line.split() for line in (tmp_path / "data" / "stage.log").read_text().split("\n") if line]
    later = later[len(notes):]                                       # a scan of one stage: its own path
    assert {how for how, _ in later} == {"own"} and sum(int(n) for _, n in later) == len(GOOD)
    a, b = both.query(all_rows=True), alone.query(all_rows=True)
    order = np.argsort(a["path"]), np.argsort(b["path"])
    assert list(a["path"][order[0]]) == list(b["path"][order[1]])
    np.testing.assert_allclose(a["p_o"][order[0]], b["p_o"][order[1]], atol=1e-6)
    qa, qb = both.query_stage("heii_probe"), alone.query_stage("heii_probe")
    oa, ob = np.argsort(qa["path"]), np.argsort(qb["path"])
    np.testing.assert_allclose(np.asarray(qa["heii_sigma"][oa], float), np.asarray(qb["heii_sigma"][ob], float),
                               rtol=1e-4, atol=1e-6)


def test_every_worker_builds_its_stages_at_once(tmp_path):
    """The scan's warm-up builds the stages on every worker in parallel (no worker waits idle
    while another loads the model), and the first answer describes the stages."""
    c, cluster = scanmod.make_client(n_workers=2, threads_per_worker=1, memory_limit=None)
    try:
        plugin = scanmod.ScanWorkerPlugin("heii_lines", {}, _catalogue(tmp_path))
        c.register_plugin(plugin, name=plugin.name)
        futures = scanmod._warm_up_workers(c, plugin.name, {})
        assert len(futures) == 2
        info = scanmod._first_result(futures)
        assert info["stages"][0]["entry_point"] == "heii_lines"
        c.gather(futures)
        built = c.run(lambda dask_worker, name=plugin.name: sorted(dask_worker.plugins[name]._stages))
        assert sorted(built.values()) == [["heii_lines"], ["heii_lines"]]
    finally:
        c.close()
        cluster.close()


def test_scan_client_never_imports_a_deep_learning_backend(tmp_path, release):
    """The scanning process (client + in-process scheduler) classifies a release without
    importing Keras or TensorFlow: only the workers load the model."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from lamost_ostar.catalogue import Catalogue\n"
        "from lamost_ostar.scan import run_scan\n"
        f"s = run_scan([{str(release)!r}], Catalogue({('sqlite:///' + str(tmp_path / 'c.sqlite'))!r}), "
        "n_workers=1, progress=False, memory_limit=None)\n"
        "assert s.totals.n_classified > 0, s.format()\n"
        "print('backend imported', any(m in sys.modules for m in ('keras', 'tensorflow', 'jax', 'torch')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "backend imported False" in out.stdout


def test_tune_malloc_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(scanmod.MALLOPT_ENV, "0")
    assert scanmod.tune_malloc() is False
