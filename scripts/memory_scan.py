#!/usr/bin/env python
"""Peak memory of a scan (scan process with its in-process scheduler + all workers).

Runs ``lamost-ostar scan`` as a subprocess into a fresh SQLite catalogue and
samples, every ``--interval`` seconds, the resident set size (RSS) of the scan
process and of every descendant (Dask nannies and workers).  Reports the peak of
the sum, the peak of the scan process, the peak of the largest worker, and the
summed RSS at 25/50/75/100 % of the run (flat = memory does not grow with the
files done).  Run it on releases of different sizes and compare.

Summed RSS counts shared pages (libraries) once per process, so it overstates
the real footprint; it is compared between runs, not taken as absolute.

Example::

    nice -n 10 python scripts/memory_scan.py /tmp/mock10k --models-dir /tmp/models
    nice -n 10 python scripts/memory_scan.py /tmp/mock100k --stage heii_lines
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sample_tree(root_pid: int) -> tuple[int, int, int, int]:
    """(summed RSS, scan process RSS, largest descendant RSS, n processes), bytes."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0, 0, 0
    rss = []
    for p in procs:
        try:
            rss.append(p.memory_info().rss)
        except psutil.NoSuchProcess:
            rss.append(0)
    return sum(rss), rss[0], max(rss[1:], default=0), len(procs)


def measure(release: str, extra: list[str], interval: float, log_path: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "mem.sqlite")
        cmd = [sys.executable, "-c", "from lamost_ostar.cli import main; main()", "scan",
               release, "--db", db, "--no-progress", *extra]
        samples: list[tuple[float, int, int, int, int]] = []
        t0 = time.monotonic()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=log)
            while proc.poll() is None:
                samples.append((time.monotonic() - t0, *sample_tree(proc.pid)))
                time.sleep(interval)
        wall = time.monotonic() - t0
        from lamost_ostar.catalogue import Catalogue

        cat = Catalogue(db)
        counts = cat.counts()
        cat.close()
    if proc.returncode != 0:
        raise SystemExit(f"scan failed (exit {proc.returncode}); see {log_path}")
    # samples: (t, summed RSS, scan process RSS, largest descendant RSS, n processes)
    total = [s[1] for s in samples]
    mib = 1 / 2**20
    quart = {}
    for q in (25, 50, 75, 100):
        t_q = wall * q / 100
        window = [s[1] for s in samples if t_q - wall * 0.25 < s[0] <= t_q] or [0]
        quart[f"{q}%"] = round(max(window) * mib, 1)
    return {
        "release": release, "command": cmd[3:], "wall_s": round(wall, 1),
        "rows": counts, "samples": len(samples),
        "peak_total_rss_mib": round(max(total, default=0) * mib, 1),
        "peak_scan_process_rss_mib": round(max((s[2] for s in samples), default=0) * mib, 1),
        "peak_largest_worker_rss_mib": round(max((s[3] for s in samples), default=0) * mib, 1),
        "max_processes": max((s[4] for s in samples), default=0),
        "total_rss_mib_by_quarter_of_run": quart,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("releases", nargs="+", help="release directories (or @lists), one run each")
    ap.add_argument("--models-dir", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--stage", default="ostar")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--partition-size", type=int, default=256)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--log", default="memory_scan.log")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    extra = ["--stage", args.stage, "--partition-size", str(args.partition_size)]
    if args.models_dir:
        extra += ["--models-dir", args.models_dir]
    if args.model:
        extra += ["--model", args.model]
    if args.workers:
        extra += ["--workers", str(args.workers)]
    out = []
    for release in args.releases:
        r = measure(release, extra, args.interval, args.log)
        out.append(r)
        print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
