"""``lamost-ostar scan`` as a newcomer meets it (lamost_ostar/cli/scan.py).

Fail fast before any worker starts, say when a resumed scan has nothing left,
a clean terminal (no TensorFlow or Dask lines), worker logs in a log folder,
and a scans row that matches the rows the scan wrote however it is stopped
(Ctrl-C to the whole process group, SIGTERM).  The real scans run the CLI as a
subprocess on a small mock release with the packaged model.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lamost_ostar.cli import main

#: TensorFlow / Dask lines that must not reach the terminal
NOISE = ("oneDNN", "cudart", "absl", "I0000", "E0000", "W0000", "distributed.", "CancelledError",
         "Traceback", "cuInit")


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    from lamost_ostar.mock import MockConfig, write_release

    root = tmp_path_factory.mktemp("scan_cli") / "release"
    write_release(root, MockConfig(n=400, preset="balanced", seed=5, broken_rate=0.03), workers=1)
    return root


@pytest.fixture(scope="module")
def files(release) -> list[str]:
    from lamost_ostar.scan import iter_paths

    return list(iter_paths([release]))


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """Environment of a scan subprocess: no user models, logs in tmp_path/logs, quiet defaults."""
    e = dict(os.environ)
    e["LAMOST_OSTAR_MODELS"] = str(tmp_path / "no-user-models")
    e["LAMOST_OSTAR_LOG_DIR"] = str(tmp_path / "logs")
    for key in ("TF_CPP_MIN_LOG_LEVEL", "LAMOST_OSTAR_DB"):
        e.pop(key, None)
    return e


def _default_version() -> str:
    from lamost_ostar.models.registry import PACKAGED_MODELS_DIR, list_versions

    return list_versions(PACKAGED_MODELS_DIR)[-1]["version"]


# ------------------------------------------------------------------ fail fast
PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
from click.testing import CliRunner
from lamost_ostar.cli import main
res = CliRunner().invoke(main, sys.argv[1:])
print(json.dumps({"code": res.exit_code, "output": res.output, "seconds": time.perf_counter() - t0,
                  "imported": sorted(m for m in ("tensorflow", "keras", "distributed")
                                     if m in sys.modules)}))
"""


@pytest.mark.parametrize("args, extra_env, fragment", [
    (["--model", "nosuch"], {}, "no model version 'nosuch'"),
    (["--device", "gpu"], {"CUDA_VISIBLE_DEVICES": "-1"}, "--device gpu"),
    (["--stage", "nope"], {}, "no stage named 'nope'"),
    (["--stage", "ostar", "--stage", "nope"], {}, "no stage named 'nope'"),
    (["--reader", "nope"], {}, "no reader named 'nope'"),
    (["--sink", "nope"], {}, "no sink named 'nope'"),
    (["--sink", "parquet"], {}, "--sink parquet needs --out"),
    (["--db", "mysql://u@h/x"], {}, "unsupported database"),
    (["--db", "postgresql+psycopg://nobody@127.0.0.1:1/none"], {}, "cannot open"),
], ids=["model", "gpu", "stage", "stages", "reader", "sink", "sink-target", "db-url", "db-server"])
def test_bad_arguments_fail_before_any_worker(release, tmp_path, env, args, extra_env, fragment):
    """One line, no worker, no TensorFlow or Dask import, in well under the ~20 s a cluster takes."""
    db = ["--db", str(tmp_path / "c.sqlite")] if "--db" not in args else []
    proc = subprocess.run([sys.executable, "-c", PROBE, "scan", str(release), *db, *args],
                          capture_output=True, text=True, env={**env, **extra_env}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = [ln for ln in got["output"].splitlines() if ln.strip()]
    assert got["code"] != 0 and len(lines) == 1 and lines[0].startswith("Error:"), got
    assert fragment in lines[0], got
    assert got["imported"] == [], got  # nothing heavy was imported: no cluster, no model
    # speed is measured and reported, not asserted (0.1-0.7 s on a quiet machine, 6 s seen at load 7):
    # failing fast means no cluster and no TensorFlow/Keras/Dask import, checked above
    if args[0] == "--model":
        assert _default_version() in lines[0]  # says which versions exist
    assert not (tmp_path / "logs").exists()


def test_gpu_check_is_cheap_and_honours_cuda_visible_devices(monkeypatch):
    from lamost_ostar.cli import scan as cli_scan

    for value in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert "CUDA_VISIBLE_DEVICES" in cli_scan._no_gpu_reason()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr("glob.glob", lambda pattern: ["/dev/nvidia0"] if "nvidia" in pattern else [])
    assert cli_scan._no_gpu_reason() is None


# ------------------------------------------------------------------ resume and dry run
def _fill(db: Path, version: str, done: list[str], failed: list[str]) -> None:
    from lamost_ostar.catalogue import Catalogue
    from lamost_ostar.stage import StageResult

    with Catalogue(db) as cat:
        sid = cat.start_scan(version)
        cat.write(sid, [StageResult(p, True, p_o=0.1, predicted_class="K", probs={"O": 0.1, "K": 0.9},
                                    model_version=version) for p in done]
                  + [StageResult.failure(p, "corrupt", "bad", version) for p in failed])
        cat.finish_scan(sid, {"files_seen": len(done) + len(failed)})


def test_dry_run_says_new_done_and_failed(release, files, tmp_path, monkeypatch):
    monkeypatch.setenv("LAMOST_OSTAR_MODELS", str(tmp_path / "none"))
    db = tmp_path / "cat.sqlite"
    res = CliRunner().invoke(main, ["scan", str(release), "--db", str(db), "--dry-run",
                                    "--partition-size", "100"])
    assert res.exit_code == 0, res.output
    assert f"{len(files)} files: {len(files)} new, 0 done, 0 failed before" in res.output
    assert not db.exists()  # a dry run writes nothing
    _fill(db, _default_version(), files[:150], files[-10:])
    res = CliRunner().invoke(main, ["scan", str(release), "--db", str(db), "--dry-run",
                                    "--partition-size", "100"])
    assert res.exit_code == 0, res.output
    new = len(files) - 160
    assert f"{len(files)} files: {new} new, 150 done, 10 failed before" in res.output
    assert f"{-(-new // 100)} partitions of <= 100" in res.output
    # another model version (the plugin stage's own) has nothing done
    from lamost_ostar_plugins.heii_lines import VERSION

    res = CliRunner().invoke(main, ["scan", str(release), "--db", str(db), "--dry-run", "--stage",
                                    "heii_lines"])
    assert f"{len(files)} new, 0 done" in res.output and f"stage heii_lines {VERSION}" in res.output
    # two stages: each is counted on its own (the ostar rows do not make heii_lines done)
    res = CliRunner().invoke(main, ["scan", str(release), "--db", str(db), "--dry-run", "--stage",
                                    "ostar", "--stage", "heii_lines", "--partition-size", "100"])
    lines = res.output.splitlines()
    assert lines[0].startswith(f"{len(files)} files: {new} new, 150 done") and "model" in lines[0]
    assert lines[1].startswith(f"{len(files)} files: {len(files)} new, 0 done")
    assert f"{-(-len(files) // 100)} partitions of <= 100" in lines[2]


def test_resumed_scan_with_nothing_left_starts_no_worker(release, files, tmp_path, monkeypatch):
    from lamost_ostar import scan as scanmod
    from lamost_ostar.catalogue import Catalogue

    monkeypatch.setenv("LAMOST_OSTAR_MODELS", str(tmp_path / "none"))
    monkeypatch.setenv("LAMOST_OSTAR_LOG_DIR", str(tmp_path / "logs"))

    def no_cluster(*args, **kwargs):
        raise AssertionError("run_scan called: workers would start")

    monkeypatch.setattr(scanmod, "run_scan", no_cluster)
    db = tmp_path / "cat.sqlite"
    _fill(db, _default_version(), files[:-4], files[-4:])
    res = CliRunner().invoke(main, ["scan", str(release), "--db", str(db)])
    assert res.exit_code == 0, res.output          # run_scan (workers) was never called: see no_cluster
    assert res.output.startswith(f"nothing to do: all {len(files)} files already have a row")
    assert f"({len(files) - 4} results, 4 errors)" in res.output
    with Catalogue(db) as cat:
        assert len(cat.scans()) == 1  # no new scan row
    assert not (tmp_path / "logs").exists()


def test_worker_logs_keep_only_the_last_few(tmp_path, monkeypatch):
    from lamost_ostar.cli import scan as cli_scan

    logs = tmp_path / "logs"
    monkeypatch.setenv("LAMOST_OSTAR_LOG_DIR", str(logs))
    logs.mkdir()
    for i in range(6):
        (logs / f"scan-2026010{i}-000000-1.log").write_text("x")
        os.utime(logs / f"scan-2026010{i}-000000-1.log", (1000 + i, 1000 + i))
    path = cli_scan.new_worker_log(keep=3)
    assert Path(path).parent == logs and Path(path).name.startswith("scan-")
    assert sorted(p.name for p in logs.iterdir()) == ["scan-20260104-000000-1.log",
                                                       "scan-20260105-000000-1.log"]
    monkeypatch.delenv("LAMOST_OSTAR_LOG_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cli_scan.log_dir() == str(tmp_path / "cache" / "lamost_ostar" / "logs")


def test_header_says_1_worker():
    from lamost_ostar.scan import PartitionSummary, ScanSummary

    def head(n):
        return ScanSummary(scan_id=1, model_version="v", threshold=0.5, totals=PartitionSummary(),
                           elapsed_s=1.0, n_workers=n).format().splitlines()[0]

    assert head(1).endswith("1 worker)") and head(2).endswith("2 workers)")


# ------------------------------------------------------------------ real scans, stopped and resumed
def _start(release: Path, db: Path, env: dict, *extra: str) -> subprocess.Popen:
    """The scan CLI in its own process group, with Ctrl-C working as in a terminal."""
    cmd = [sys.executable, "-c", "from lamost_ostar.cli import main; main()", "scan", str(release),
           "--db", str(db), "--workers", "1", "--partition-size", "16", "--batch-size", "16",
           "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _has_worker_process(pid: int) -> bool:
    """Whether process ``pid`` has a child started by multiprocessing (a local Dask worker)."""
    import psutil  # a dependency of distributed

    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return False
    for child in children:
        try:
            if any("spawn_main" in part for part in child.cmdline()):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return False


def _count(db: Path, sql: str) -> int:
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            return int(conn.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"scan ended (rc {proc.returncode}) before the interrupt:\n{out}\n{err}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("timed out waiting for the scan")
        time.sleep(0.1)


def _finish(proc: subprocess.Popen, timeout: float = 240.0) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"scan did not end:\n{out}\n{err}")
    return proc.returncode, out, err


def _scan_rows(db: Path) -> list[dict]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute("SELECT * FROM scans ORDER BY id")]
        for r in rows:
            r["result_rows"] = conn.execute("SELECT count(*) FROM results WHERE scan_id = ?",
                                            (r["id"],)).fetchone()[0]
            r["error_rows"] = conn.execute("SELECT count(*) FROM errors WHERE scan_id = ?",
                                           (r["id"],)).fetchone()[0]
    return rows


def _assert_truthful(row: dict) -> None:
    """A scans row counts exactly the rows carrying its id."""
    assert row["files_classified"] == row["result_rows"], row
    assert row["files_failed"] == row["error_rows"], row
    assert row["files_read"] == row["result_rows"] + row["error_rows"], row
    assert row["files_seen"] == row["files_read"] + row["files_skipped"], row


def _assert_each_file_once(db: Path, files: list[str]) -> None:
    with sqlite3.connect(db) as conn:
        res = [p for (p,) in conn.execute("SELECT path FROM results")]
        err = [p for (p,) in conn.execute("SELECT path FROM errors")]
    assert len(res) == len(set(res)) and len(err) == len(set(err))
    assert not set(res) & set(err)
    assert set(res) | set(err) == set(files)


def test_ctrl_c_mid_scan_then_resume(release, files, tmp_path, env):
    """Ctrl-C to the process group mid-scan: exit 130, one clean line, a truthful scans row;
    the resumed scan finishes the rest with a clean terminal; a third run has nothing to do.
    The workers run Keras (TensorFlow's start-up chatter must go to the worker log)."""
    env = {**env, "LAMOST_OSTAR_ENGINE": "keras"}
    db = tmp_path / "cat.sqlite"
    proc = _start(release, db, env)
    _wait_for(lambda: _count(db, "SELECT count(*) FROM results") >= 16, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    rc, out, err = _finish(proc)
    assert rc == 130, (out, err)
    assert err.strip().splitlines() == ["interrupted: run the same command again to resume"], err
    assert "[INTERRUPTED]" in out and not any(n in out + err for n in NOISE), (out, err)
    (first,) = _scan_rows(db)
    assert first["status"] == "interrupted"
    _assert_truthful(first)
    assert 0 < first["files_read"] < len(files)
    assert "NOT BUILT" in out                       # the query indexes are left to the next scan
    from lamost_ostar.catalogue import Catalogue

    with Catalogue(db) as cat:
        assert cat.missing_indexes("ostar")

    proc = _start(release, db, env)  # resume
    rc, out, err = _finish(proc)
    assert rc == 0, (out, err)
    assert not any(n in out + err for n in NOISE), (out, err)
    assert "1 worker)" in out.splitlines()[0]
    first, second = _scan_rows(db)
    assert second["status"] == "finished"
    for row in (first, second):
        _assert_truthful(row)
    assert second["files_seen"] == len(files)
    assert second["files_skipped"] == first["files_read"]
    _assert_each_file_once(db, files)
    assert "query indexes" in out and "NOT BUILT" not in out  # the resumed scan built them
    with Catalogue(db) as cat:
        assert cat.missing_indexes("ostar") == []
    # TensorFlow's start-up lines went to the worker log in the log folder, not /tmp or the terminal
    logs = sorted((tmp_path / "logs").glob("scan-*.log"), key=lambda p: p.stat().st_mtime)
    assert len(logs) == 2 and f"worker log          {logs[-1]}" in out
    assert "cudart" in logs[-1].read_text() or "oneDNN" in logs[-1].read_text()

    proc = _start(release, db, env)
    rc, out, err = _finish(proc)
    assert rc == 0 and out.startswith("nothing to do"), (out, err)
    assert len(_scan_rows(db)) == 2                 # no new scan row: nothing was started


def test_sigterm_mid_scan_and_ctrl_c_during_start_up(release, files, tmp_path, env):
    db = tmp_path / "cat.sqlite"
    proc = _start(release, db, env)
    _wait_for(lambda: _count(db, "SELECT count(*) FROM results") >= 16, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    rc, out, err = _finish(proc)
    assert rc == 128 + signal.SIGTERM, (out, err)
    assert err.strip().splitlines() == ["interrupted: run the same command again to resume"], err
    (row,) = _scan_rows(db)
    assert row["status"] == "interrupted"
    _assert_truthful(row)

    # Ctrl-C while the cluster starts: as soon as the nanny has spawned the worker process, which
    # then still imports, registers and loads the model before any scan row exists (a fixed delay
    # after the start missed that window on a fast machine)
    db2 = tmp_path / "cat2.sqlite"
    proc = _start(release, db2, env)
    _wait_for(lambda: _has_worker_process(proc.pid), proc)
    os.killpg(proc.pid, signal.SIGINT)
    rc, out, err = _finish(proc)
    assert rc == 130, (out, err)
    assert err.strip().splitlines() == [
        "interrupted during start-up (nothing scanned): run the same command again"], err
    assert not any(n in out + err for n in NOISE), (out, err)
    assert _scan_rows(db2) == []


# ------------------------------------------------------------------ stages and sinks from the command line
def test_plugin_stage_then_two_stages_then_parquet(tmp_path, monkeypatch):
    """The issue's story: a plugin stage keeps its results (its own table, a summary of what it
    measured), a second stage in the same catalogue does not double ``query --all``, several stages
    run in one pass, and the Parquet sink writes a dataset."""
    import csv
    import io

    from lamost_ostar.mock import MockConfig, write_release

    rel = tmp_path / "rel"
    write_release(rel, MockConfig(n=24, preset="balanced", seed=11, broken_rate=0.1), workers=1)
    monkeypatch.setenv("LAMOST_OSTAR_MODELS", str(tmp_path / "none"))
    monkeypatch.setenv("LAMOST_OSTAR_LOG_DIR", str(tmp_path / "logs"))
    db = str(tmp_path / "cat.sqlite")
    common = ["--workers", "1", "--no-progress", "--partition-size", "8", "--batch-size", "8"]
    runner = CliRunner()
    res = runner.invoke(main, ["scan", str(rel), "--db", db, "--stage", "heii_lines", *common])
    assert res.exit_code == 0, res.output
    assert "O candidates" not in res.output and "heii_detected" in res.output and "measured" in res.output
    assert "query indexes" in res.output                      # an empty table: built at the end
    q = runner.invoke(main, ["query", "--db", db, "--stage", "heii_lines", "--format", "csv"])
    lines = list(csv.DictReader(io.StringIO(q.stdout)))
    assert lines and all(r["heii_sigma"] != "" and r["o_star_like"] in ("True", "False") for r in lines)
    n_heii = len(lines)

    res = runner.invoke(main, ["scan", str(rel), "--db", db, "--stage", "ostar", "--stage", "heii_lines",
                               "--no-defer-indexes", *common])
    assert res.exit_code == 0, res.output
    assert "O candidates" in res.output and "heii_lines" in res.output
    assert "query indexes" not in res.output                  # written with its indexes, as told
    every = runner.invoke(main, ["query", "--db", db, "--all", "--format", "csv"])
    ostar_rows = list(csv.DictReader(io.StringIO(every.stdout)))
    assert ostar_rows and len({r["path"] for r in ostar_rows}) == len(ostar_rows)   # one row per file
    joined = runner.invoke(main, ["query", "--db", db, "--all", "--with", "heii_lines", "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(joined.stdout)))
    assert len(rows) == len(ostar_rows) and sum(r["heii_lines.heii_sigma"] != "" for r in rows) == n_heii
    # a deferring scan killed before its end leaves the query indexes out: query says so, and a
    # scan with nothing left to do builds them
    from lamost_ostar.catalogue import Catalogue

    with Catalogue(db) as cat:
        with cat.engine.begin() as conn:
            for ix in ("ix_results_p_o", "ix_results_is_candidate"):
                conn.exec_driver_sql(f"DROP INDEX {ix}")
        assert cat.missing_indexes("ostar") == ["ix_results_is_candidate", "ix_results_p_o"]
    slow = runner.invoke(main, ["query", "--db", db, "--all", "--format", "csv"])
    assert slow.exit_code == 0 and "query indexes are not built yet" in slow.stderr
    again = runner.invoke(main, ["scan", str(rel), "--db", db, "--stage", "ostar", "--stage", "heii_lines",
                                 *common])
    assert again.exit_code == 0 and again.output.startswith("nothing to do"), again.output
    assert "query indexes of ostar built in" in again.output
    with Catalogue(db) as cat:
        assert cat.missing_indexes("ostar") == []
    fast = runner.invoke(main, ["query", "--db", db, "--all", "--format", "csv"])
    assert fast.exit_code == 0 and "not built" not in fast.stderr

    out = tmp_path / "pq"
    res = runner.invoke(main, ["scan", str(rel), "--sink", "parquet", "--out", str(out), "--stage",
                               "heii_lines", *common])
    assert res.exit_code == 0, res.output
    import pyarrow.dataset as ds

    table = ds.dataset(out / "results" / "heii_lines", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == n_heii and set(table.column("scan").to_pylist()) == {1}
    dry = runner.invoke(main, ["scan", str(rel), "--sink", "parquet", "--out", str(out), "--stage",
                               "heii_lines", "--dry-run"])
    assert f"{n_heii} done" in dry.output, dry.output


def test_engine_numpy_with_device_gpu_is_one_line(tmp_path):
    from click.testing import CliRunner

    from lamost_ostar.cli import main

    data = Path(__file__).resolve().parent / "data"
    res = CliRunner().invoke(main, ["scan", str(data), "--db", str(tmp_path / "c.sqlite"),
                                    "--engine", "numpy", "--device", "gpu"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "--engine numpy runs on the CPU" in res.output
