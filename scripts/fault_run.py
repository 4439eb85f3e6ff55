#!/usr/bin/env python
"""Fault run: kill a scan twice at random moments, resume, check the catalogue.

1. ``lamost-ostar scan RELEASE --db DB`` is started as a subprocess (its own
   process group) and, at a random moment, the scan process is sent SIGKILL
   (the scan process only, as a crash or ``kill -9`` would).  The moment is
   drawn as a random number of catalogue rows (uniform between 10 % and 90 % of
   the files not yet done), so every kill lands mid-scan, at any point of a
   partition's life (reading, inference, or inside a write).  This happens
   ``--kills`` times; after each kill the script waits until the orphaned Dask
   worker processes have exited by themselves (they watch their parent), and
   records how many there were.
2. The scan is run once more, to the end.
3. Checks: every file on disk has exactly one row (a result or an error) for
   the model version, there are no duplicate (path, model_version) rows, no file
   has both a result and an error, and the files the mock broke on purpose
   (``truth.csv``) are exactly the files with error rows.

Example::

    lamost-ostar mock /tmp/fault --n 3000 --broken-rate 0.01
    nice -n 10 python scripts/fault_run.py /tmp/fault --models-dir /tmp/models \\
        --db /tmp/fault.sqlite --json fault.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path


def _children_alive(pids: list[int]) -> list[int]:
    import psutil

    return [p for p in pids if psutil.pid_exists(p)
            and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def _rows_written(db: str) -> int:
    import sqlalchemy as sa

    from lamost_ostar.catalogue import Catalogue

    try:
        cat = Catalogue(db)
        with cat.engine.connect() as c:
            n = sum(c.execute(sa.text(f"select count(*) from {t}")).scalar_one()
                    for t in ("results", "errors"))
        cat.close()
        return int(n)
    except Exception:  # noqa: BLE001 - not created yet / locked: try again
        return -1


def run_and_kill(cmd: list[str], db: str, kill_at_rows: int, log, timeout: float = 1800) -> dict:
    """Start the scan and SIGKILL it once ``kill_at_rows`` rows are in the catalogue."""
    import psutil

    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    rows = 0
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        rows = _rows_written(db)
        if rows >= kill_at_rows:
            break
        time.sleep(0.2)
    if proc.poll() is not None:
        return {"killed": False, "rc": proc.returncode, "after_s": time.monotonic() - t0}
    kids = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t_kill = time.monotonic()
    alive = _children_alive(kids)
    while alive and time.monotonic() - t_kill < 120:
        time.sleep(0.5)
        alive = _children_alive(kids)
    return {"killed": True, "after_s": round(t_kill - t0, 1), "rows_seen_before_kill": rows,
            "rows_after_kill": _rows_written(db), "worker_processes": len(kids),
            "orphans_exited_after_s": round(time.monotonic() - t_kill, 1),
            "orphans_left": alive}


def check(db: str, release: str) -> dict:
    import sqlalchemy as sa

    from lamost_ostar.catalogue import Catalogue
    from lamost_ostar.scan import iter_paths

    on_disk = set(iter_paths([release]))
    cat = Catalogue(db)
    with cat.engine.connect() as c:
        res = c.execute(sa.text("select path, model_version from results")).all()
        err = c.execute(sa.text("select path, model_version, reason from errors")).all()
    versions = {mv for _, mv in res} | {mv for _, mv, _ in err}
    res_paths = [p for p, _ in res]
    err_paths = [p for p, _, _ in err]
    out = {
        "files_on_disk": len(on_disk),
        "model_versions": sorted(versions),
        "result_rows": len(res), "error_rows": len(err),
        "distinct_paths_with_rows": len(set(res_paths) | set(err_paths)),
        "duplicate_result_rows": len(res) - len(set(res)),
        "duplicate_error_rows": len(err) - len({(p, mv) for p, mv, _ in err}),
        "paths_with_result_and_error": len(set(res_paths) & set(err_paths)),
        "files_without_row": len(on_disk - set(res_paths) - set(err_paths)),
        "rows_not_on_disk": len((set(res_paths) | set(err_paths)) - on_disk),
        "error_reasons": {},
    }
    reason_of = {}
    for p, _, reason in err:
        out["error_reasons"][reason] = out["error_reasons"].get(reason, 0) + 1
        reason_of[p] = reason
    truth = Path(release) / "truth.csv"
    if truth.is_file():
        with truth.open() as fh:
            rows = list(csv.DictReader(fh))
        key = "broken" if rows and "broken" in rows[0] else None
        if key is not None:
            broken = {os.path.normpath(os.path.join(release, r["path"])) for r in rows
                      if r[key]}
            broken = {os.path.abspath(p) for p in broken}
            out["broken_in_truth"] = len(broken)
            out["broken_without_error_row"] = len(broken - set(err_paths))
            out["error_rows_not_broken_in_truth"] = len(set(err_paths) - broken)
            if "expected_error" in rows[0]:
                expected = {os.path.abspath(os.path.join(release, r["path"])): r["expected_error"]
                            for r in rows if r["expected_error"]}
                out["error_reason_mismatches"] = sum(1 for p, e in expected.items()
                                                     if reason_of.get(p) != e)
    scans = cat.scans()
    out["scans"] = [{"id": int(r["id"]), "status": str(r["status"]),
                     "files_seen": int(r["files_seen"]),
                     "files_skipped": int(r["files_skipped"]),
                     "result_rows": int(r["result_rows"]), "error_rows": int(r["error_rows"])}
                    for r in scans]
    cat.close()
    out["ok"] = (out["distinct_paths_with_rows"] == out["files_on_disk"]
                 and out["result_rows"] + out["error_rows"] == out["files_on_disk"]
                 and out["duplicate_result_rows"] == 0 and out["duplicate_error_rows"] == 0
                 and out["paths_with_result_and_error"] == 0 and len(versions) == 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release")
    ap.add_argument("--db", required=True, help="catalogue (must not exist yet)")
    ap.add_argument("--models-dir", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--partition-size", type=int, default=64)
    ap.add_argument("--log", default="fault_run.log")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    db_path = args.db.replace("sqlite:///", "")
    if "://" not in args.db and os.path.exists(db_path):
        ap.error(f"{args.db} exists; the fault run needs a fresh catalogue")
    rng = random.Random(args.seed)
    cmd = [sys.executable, "-c", "from lamost_ostar.cli import main; main()", "scan", args.release, "--db", args.db,
           "--partition-size", str(args.partition_size), "--no-progress"]
    if args.models_dir:
        cmd += ["--models-dir", args.models_dir]
    if args.model:
        cmd += ["--model", args.model]
    report: dict = {"release": args.release, "db": args.db, "command": cmd, "kills": []}
    with open(args.log, "ab") as log:
        from lamost_ostar.scan import count_paths

        n_files = count_paths([args.release])
        for i in range(args.kills):
            done = max(0, _rows_written(args.db))
            target = done + int(rng.uniform(0.1, 0.9) * (n_files - done))
            r = run_and_kill(cmd, args.db, target, log)
            r["kill_target_rows"] = target
            report["kills"].append(r)
            print(f"run {i + 1}: SIGKILL after {r['after_s']:.1f} s at "
                  f"{r['rows_seen_before_kill']} rows (target {target})" if r["killed"]
                  else f"run {i + 1}: finished before the kill ({r['after_s']:.1f} s)")
            print(f"  rows so far: {json.dumps(check(args.db, args.release)['scans'][-1:])}")
        t0 = time.monotonic()
        rc = subprocess.call(cmd, stdout=log, stderr=log)
        report["final_run"] = {"rc": rc, "wall_s": time.monotonic() - t0}
        print(f"final run: exit {rc} in {time.monotonic() - t0:.1f} s")
    result = check(args.db, args.release)
    report["check"] = result
    print(json.dumps({k: v for k, v in result.items() if k != "scans"}, indent=1))
    for s in result["scans"]:
        print(f"  scan {s}")
    print("OK" if result["ok"] else "FAILED")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
