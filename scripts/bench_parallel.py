#!/usr/bin/env python
"""Parallel efficiency of the scan: 2 workers against one process, in one interleaved series.

Usage::

    python scripts/bench_parallel.py /work/runs/mock10k [--rounds 3] [--engine auto] [--json out.json]
        [--runs one,scan1,scan2,pair,part,partpair]

Each round runs, one after the other and each in a fresh interpreter, on every
file of the release (sorted walk, the scan's order):

``one``
    One process, one thread (``OMP/OPENBLAS_NUM_THREADS=1``, the scan workers'
    malloc settings): :class:`lamost_ostar.stage.OStarStage` reads and
    classifies the files in 256-file chunks, as a scan worker's partition does,
    and writes nothing.  This is issue #11's "one process".
``scan1`` / ``scan2``
    ``run_scan`` with 1 and 2 local Dask workers into a fresh SQLite file (the
    ``lamost-ostar scan`` path, progress off).
``pair``
    Two ``one`` processes at once: what the machine's cores give when nothing
    is shared (the ceiling of ``scan2``).
``part`` / ``partpair``
    The scan worker's own task, :func:`lamost_ostar.scan.process_partition`
    (resume check, read, stages, one bulk write per 256-file partition), run
    without Dask in one process on every file / in two processes at once on
    half the files each (every other partition), both writing one SQLite file
    as a scan's two workers do; one thread each, as ``one``.  ``one`` ->
    ``part`` is the cost of the worker's bookkeeping and writes;
    ``partpair`` -> ``scan2`` the cost of Dask.

Rates are files per second (results + error rows), ``steady`` after start-up
(imports, cluster, model load), ``processing`` after start-up and up to the last
partition's results (a scan's end, query indexes built and rows counted once, left
out: the same window as ``one``'s) and ``overall`` from the interpreter's start.
Printed per round, with the ratios ``scan2 / one``, ``scan2 / scan1`` and
``pair / one``, and the CPU time per file of all the processes of each run
(``getrusage``: the process and its finished children, i.e. a local cluster's
client, scheduler and workers) and of the thread that reads and classifies
(``time.thread_time``; for ``pair`` the mean of its two processes: the cost of
a file when both cores are busy); ``--json`` keeps every figure.  Run it on a quiet machine: it
measures the machine as much as the code.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

T0 = time.perf_counter()
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
              "TF_CPP_MIN_LOG_LEVEL": "2"}


def _child_one(release: str, engine: str) -> dict:
    from lamost_ostar.scan import iter_paths, tune_malloc

    tune_malloc()
    from lamost_ostar.stage import OStarStage, read_items

    paths = list(iter_paths([release]))
    stage = OStarStage(device="cpu", engine=engine)
    t_work, cpu0 = time.perf_counter(), time.thread_time()
    n = 0
    for i in range(0, len(paths), 256):
        spectra, _slots, failed = read_items(paths[i:i + 256])
        n += len(stage.process(spectra)) + len(failed)
    return _loop_figures(n, t_work, cpu0, stage.engine)


def _loop_figures(n: int, t_work: float, cpu0: float, engine: str | None) -> dict:
    """A child's figures for ``n`` files classified since ``t_work`` (thread CPU since ``cpu0``)."""
    t_end = time.perf_counter()
    return {"files": n, "startup_s": t_work - T0, "overall": n / (t_end - T0),
            "steady": n / (t_end - t_work), "processing": n / (t_end - t_work), "engine": engine,
            "partition_cpu_ms_per_file": 1e3 * (time.thread_time() - cpu0) / max(n, 1), **_cpu(n)}


def _child_part(release: str, engine: str, db: str, scan_id: int, half: int) -> dict:
    """``process_partition`` on the release's files (``half`` 0/1: every other partition; -1: all)."""
    from lamost_ostar import scan
    from lamost_ostar.catalogue import Catalogue

    scan.tune_malloc()
    paths = list(scan.iter_paths([release]))
    parts = list(scan.iter_partitions(paths, 256))
    if half >= 0:
        parts = parts[half::2]
    sink = Catalogue(db)
    plugin = scan.ScanWorkerPlugin("ostar", {"device": "cpu", "engine": engine,
                                             "batch_size": 256}, sink)
    plugin.setup(None)
    scan._worker_plugin = lambda name: plugin  # the task finds its plugin here, not on a Dask worker
    info = scan.stage_info(plugin.name)
    mv = info["stages"][0]["model_version"]
    t_work, cpu0 = time.perf_counter(), time.thread_time()
    n = 0
    for chunk in parts:
        got = scan.process_partition(chunk, plugin.name, scan_id, {"ostar": mv}, 0.5)
        n += sum(s.n_classified + s.n_errors for s in got.values())
    figures = _loop_figures(n, t_work, cpu0, info.get("engine"))
    sink.close()
    return figures


def _new_scan_db(tmp: str) -> tuple[str, int]:
    """A fresh SQLite catalogue with one scan row: its path and the scan's id."""
    from lamost_ostar.catalogue import Catalogue

    db = os.path.join(tmp, "part.sqlite")
    cat = Catalogue(db)
    scan_id = cat.start_scan(model_version=None, code_version="bench", parameters={})
    cat.close()
    return db, scan_id


def _together(res: list[dict]) -> dict:
    """Processes run at once: summed rates, each one's steady rate, their mean thread CPU per file."""
    return {"files": sum(r["files"] for r in res), "steady": sum(r["steady"] for r in res),
            "processing": sum(r["processing"] for r in res), "overall": sum(r["overall"] for r in res),
            "each_steady": [r["steady"] for r in res],
            "partition_cpu_ms_per_file": sum(r["partition_cpu_ms_per_file"] for r in res) / len(res)}


def _cpu(n: int) -> dict:
    """CPU seconds of this process and of its finished children (a local cluster's workers)."""
    import resource

    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    cpu_self, cpu_kids = me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime
    return {"cpu_s": cpu_self + cpu_kids, "cpu_client_s": cpu_self, "cpu_workers_s": cpu_kids,
            "cpu_ms_per_file": 1e3 * (cpu_self + cpu_kids) / max(n, 1)}


def _child_scan(release: str, engine: str, workers: int) -> dict:
    from lamost_ostar.catalogue import Catalogue
    from lamost_ostar.scan import run_scan

    with tempfile.TemporaryDirectory() as tmp:
        sink = Catalogue(os.path.join(tmp, "bench.sqlite"))
        s = run_scan([release], sink, n_workers=workers, device="cpu", engine=engine,
                     progress=False, worker_log=os.path.join(tmp, "workers.log"))
        t_end = time.perf_counter()
        sink.close()
    n = s.totals.n_classified + s.totals.n_errors
    return {"files": n, "startup_s": s.startup_s, "first_result_s": s.first_result_s,
            "overall": n / (t_end - T0), "steady": s.steady_rate, "engine": s.engine,
            "processing": s.processing_rate, "end_s": s.elapsed_s - (s.last_result_s or s.elapsed_s),
            "worker_peak_rss_mb": s.counts()["worker_peak_rss_mb"], "wall_s": t_end - T0,
            "partition_cpu_ms_per_file": s.counts()["partition_cpu_ms_per_file"], **_cpu(n)}


def _spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args],
                            stdout=subprocess.PIPE, env={**os.environ, **(env or {})}, text=True)


def _result(p: subprocess.Popen) -> dict:
    out, _ = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"a benchmark process failed (exit {p.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine", default="auto", choices=["auto", "keras", "numpy"])
    ap.add_argument("--json", default=None, help="write every figure to this file")
    ap.add_argument("--runs", default="one,scan1,scan2,pair",
                    help="which runs each round makes, in order: one, scan1, scan2, pair, part, partpair "
                         "[one,scan1,scan2,pair]")
    ap.add_argument("--child", choices=["one", "scan", "part"], help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--db", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scan-id", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--half", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "one":
        print(json.dumps(_child_one(args.release, args.engine)))
        return 0
    if args.child == "scan":
        print(json.dumps(_child_scan(args.release, args.engine, args.workers)))
        return 0
    if args.child == "part":
        print(json.dumps(_child_part(args.release, args.engine, args.db, args.scan_id, args.half)))
        return 0

    common = [args.release, "--engine", args.engine]
    rounds = []
    for r in range(args.rounds):
        got: dict[str, dict] = {}
        for run in args.runs.split(","):
            if run == "one":
                got["one"] = _result(_spawn([*common, "--child", "one"], ONE_THREAD))
            elif run in ("scan1", "scan2"):
                got[run] = _result(_spawn([*common, "--child", "scan", "--workers", run[-1]]))
            elif run == "pair":
                pair = [_spawn([*common, "--child", "one"], ONE_THREAD) for _ in range(2)]
                got["pair"] = _together([_result(p) for p in pair])
            elif run in ("part", "partpair"):
                with tempfile.TemporaryDirectory() as tmp:
                    db, scan_id = _new_scan_db(tmp)
                    halves = [-1] if run == "part" else [0, 1]
                    procs = [_spawn([*common, "--child", "part", "--db", db, "--scan-id", str(scan_id),
                                     "--half", str(h)], ONE_THREAD) for h in halves]
                    got[run] = _together([_result(p) for p in procs])
            else:
                raise SystemExit(f"unknown run {run!r} (one, scan1, scan2, pair, part, partpair)")
        ratios = {f"{x}/{y} {k}": got[x][k] / got[y][k]
                  for x, y in (("scan2", "one"), ("scan2", "scan1"), ("pair", "one"), ("scan2", "pair"),
                               ("part", "one"), ("partpair", "pair"), ("scan2", "partpair"))
                  if x in got and y in got for k in ("steady", "processing", "overall")}
        rounds.append({"round": r + 1, **got, "ratios": ratios})
        print(f"round {r + 1}: " + ", ".join(f"{k} {v['steady']:.0f}/{v['processing']:.0f}/{v['overall']:.0f}"
                                             for k, v in got.items()) + " files/s (steady/processing/overall)")
        print("  " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()), flush=True)
        print("  CPU ms per file, reading and classifying (the worker thread): " + ", ".join(
            f"{k} {v['partition_cpu_ms_per_file']:.3f}" for k, v in got.items()), flush=True)
        if "scan2" in got:
            print(f"  scan2 CPU, all processes, start-up included: "
                  f"{got['scan2']['cpu_ms_per_file']:.3f} ms per file; client "
                  f"{got['scan2']['cpu_client_s']:.1f} s, workers {got['scan2']['cpu_workers_s']:.1f} s; "
                  f"end of the scan (indexes, counts) {got['scan2']['end_s']:.2f} s",
                  flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"release": args.release, "engine": args.engine, "cpus": os.cpu_count(),
                       "load_before": os.getloadavg()[0], "rounds": rounds}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
