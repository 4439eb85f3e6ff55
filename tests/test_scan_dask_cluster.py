"""A scan on a real Dask cluster: ``dask scheduler`` and two ``dask worker`` processes (the CLI
programs, as on separate machines), one worker killed mid-scan.

Every file must end with exactly one result or error row, and the scan's row
must count exactly the rows it wrote.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKERS = 2


def _dask_program() -> str:
    exe = Path(sys.executable).with_name("dask")
    found = str(exe) if exe.exists() else shutil.which("dask")
    if not found:
        pytest.skip("the `dask` command line program is not installed")
    return found


def _stop(proc: subprocess.Popen) -> None:
    """End a process group: SIGTERM, then SIGKILL after 5 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)


def _wait(predicate, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{what}: a process ended early (rc {p.returncode})")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s: {what}")
        time.sleep(0.2)


@pytest.fixture
def dask_cluster(tmp_path):
    """(scheduler address, worker processes); every process is stopped at the end, even on failure."""
    dask = _dask_program()
    procs: list[subprocess.Popen] = []
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore",
               TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    try:
        log = tmp_path / "scheduler.log"
        with open(log, "w") as fh:  # port 0: the scheduler picks a free port and logs it
            procs.append(subprocess.Popen(
                [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"],
                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        address: list[str] = []

        def scheduler_up() -> bool:
            m = re.search(r"Scheduler at:\s+(tcp://127\.0\.0\.1:\d+)", log.read_text())
            if m:
                address.append(m.group(1))
            return bool(m)

        _wait(scheduler_up, 60, "scheduler start", procs)
        workers = []
        for i in range(WORKERS):
            with open(tmp_path / f"worker{i}.log", "w") as fh:
                workers.append(subprocess.Popen(
                    [dask, "worker", address[0], "--nthreads", "1", "--nworkers", "1",
                     "--name", f"w{i}", "--no-dashboard", "--memory-limit", "0",
                     "--death-timeout", "60"],
                    stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        procs += workers
        from distributed import Client

        with Client(address[0], timeout="60s") as client:
            client.wait_for_workers(WORKERS, timeout=90)
        yield address[0], workers
    finally:
        for p in reversed(procs):
            _stop(p)


def _count(db: Path, sql: str) -> int:
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            return int(conn.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def test_scan_on_a_dask_cluster_survives_a_killed_worker(tmp_path, dask_cluster):
    from lamost_ostar.mock import MockConfig, write_release
    from lamost_ostar.models.registry import PACKAGED_MODELS_DIR, list_versions
    from lamost_ostar.scan import iter_paths

    address, workers = dask_cluster
    release = tmp_path / "release"
    write_release(release, MockConfig(n=240, preset="balanced", seed=11, broken_rate=0.03), workers=1)
    files = set(iter_paths([release]))
    version = list_versions(PACKAGED_MODELS_DIR)[-1]["version"]
    db = tmp_path / "cat.sqlite"
    env = dict(os.environ, LAMOST_OSTAR_MODELS=str(tmp_path / "no-user-models"))
    scan = subprocess.Popen(
        [sys.executable, "-c", "from lamost_ostar.cli import main; main()", "scan", str(release),
         "--db", str(db), "--scheduler", address, "--model", version, "--device", "cpu",
         "--partition-size", "8", "--batch-size", "8", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        # kill one worker (its nanny and process, like a machine lost) once results arrive
        _wait(lambda: _count(db, "SELECT count(*) FROM results") >= 8, 120, "first results", [scan])
        os.killpg(workers[0].pid, signal.SIGKILL)
        out, err = scan.communicate(timeout=180)
    finally:
        _stop(scan)
    assert scan.returncode == 0, (out, err)
    assert "2 workers)" in out.splitlines()[0], out
    assert workers[0].poll() is not None  # the scan finished without that worker
    assert "Remove worker" in (tmp_path / "scheduler.log").read_text()
    with sqlite3.connect(db) as conn:
        res = [p for (p,) in conn.execute("SELECT path FROM results")]
        err_rows = [p for (p,) in conn.execute("SELECT path FROM errors")]
        (row,) = conn.execute("SELECT id, status, files_seen, files_read, files_classified, "
                              "files_failed, files_skipped FROM scans").fetchall()
    # every file exactly once, as a result or an error
    assert len(res) == len(set(res)) and len(err_rows) == len(set(err_rows))
    assert not set(res) & set(err_rows)
    assert set(res) | set(err_rows) == files
    # the scans row is what the scan wrote
    sid, status, seen, read, classified, failed, skipped = row
    assert status == "finished"
    assert (classified, failed, read) == (len(res), len(err_rows), len(files))
    assert seen == len(files) and skipped == 0
