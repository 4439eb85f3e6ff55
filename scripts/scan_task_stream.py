#!/usr/bin/env python
"""How busy each Dask worker is during a scan: Dask's task stream around ``run_scan``.

Usage::

    python scripts/scan_task_stream.py RELEASE [--workers 2] [--stage ostar]

Scans ``RELEASE`` into a temporary SQLite catalogue on a local cluster and prints, per
worker, the number of tasks, the seconds spent computing them, when its first task started
(relative to the first task of the scan), the idle gaps between its tasks and the median
task time (a partition of ``--partition-size`` files).  A worker whose first task starts late,
or with large gaps, is waiting for work.
"""
from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stage", default="ostar")
    ap.add_argument("--partition-size", type=int, default=256)
    args = ap.parse_args(argv)

    from distributed import get_task_stream

    from lamost_ostar import scan
    from lamost_ostar.catalogue import Catalogue

    client, cluster = scan.make_client(n_workers=args.workers, memory_limit=None)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cat = Catalogue(f"sqlite:///{tmp}/stream.sqlite")
            t0 = time.perf_counter()
            with get_task_stream(client) as stream:
                scan.run_scan([args.release], cat, client=client, stage=args.stage,
                              partition_size=args.partition_size, progress=False)
            wall = time.perf_counter() - t0
    finally:
        client.close()
        cluster.close()
    by_worker: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for rec in stream.data:
        spans = {s["action"]: (s["start"], s["stop"]) for s in rec["startstops"]}
        if "compute" in spans:
            by_worker[rec["worker"]].append((*spans["compute"], rec["key"].split("-")[0]))
    if not by_worker:
        raise SystemExit("no task ran")
    first = min(start for tasks in by_worker.values() for start, _, _ in tasks)
    for worker, tasks in sorted(by_worker.items()):
        tasks.sort()
        busy = sum(stop - start for start, stop, _ in tasks)
        gaps = [tasks[i + 1][0] - tasks[i][1] for i in range(len(tasks) - 1)] or [0.0]
        times = sorted(stop - start for start, stop, _ in tasks)
        kinds = collections.Counter(kind for *_, kind in tasks)
        print(f"{worker}: {len(tasks)} tasks {dict(kinds)}, busy {busy:.1f} s, first start "
              f"+{tasks[0][0] - first:.1f} s, last end +{tasks[-1][1] - first:.1f} s, idle gaps "
              f"{sum(gaps):.2f} s (max {max(gaps):.2f} s), median task {times[len(times) // 2]:.2f} s")
    print(f"scan wall time {wall:.1f} s (cluster start-up not included)")


if __name__ == "__main__":
    main()
