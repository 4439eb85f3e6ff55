"""Time ``lamost-ostar report`` for N spectra on a mock release scanned with the packaged model.

Builds (once, reused when present) the mock release and its catalogue exactly as the
README's quick start does::

    lamost-ostar mock DIR/release --n 3000 --preset balanced --seed 1
    lamost-ostar scan DIR/release --db DIR/cat.sqlite

then writes the report of the top ``--n`` spectra: all the model's candidates and, when
there are fewer than ``--n``, the highest-p(O) non-candidates to make up ``--n``
(``--include-non-candidates``), and prints the wall time, the CPU time of this process
and of the rendering processes, the per-phase timings and the machine's load average
(the development machine's 2 cores are shared with other jobs: the load says how much
of them the run had).

Usage::

    python scripts/bench_report.py --dir /tmp/bench_report --n 500 --workers 2 [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _cli(*args: str) -> None:
    exe = Path(sys.executable).with_name("lamost-ostar")
    cmd = [str(exe) if exe.exists() else "lamost-ostar", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/bench_report", help="working folder (release, catalogue, report)")
    ap.add_argument("--n", type=int, default=500, help="spectra in the report")
    ap.add_argument("--mock-n", type=int, default=3000, help="spectra in the mock release")
    ap.add_argument("--workers", type=int, default=2, help="rendering processes")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs (the report is replaced each time)")
    args = ap.parse_args()

    work = Path(args.dir)
    release, db = work / "release", work / "cat.sqlite"
    if not (release / "truth.csv").is_file():
        _cli("mock", str(release), "--n", str(args.mock_n), "--preset", "balanced", "--seed", "1",
             "--quiet", "--overwrite")
    if not db.is_file():
        _cli("scan", str(release), "--db", str(db), "--no-progress")

    from lamost_ostar.catalogue import Catalogue
    from lamost_ostar.report import build_report

    with Catalogue(db, create=False) as cat:
        n_cand = len(cat.query(candidates=True, limit=args.n))
    extra = max(0, args.n - n_cand)
    print(f"catalogue {db}: {n_cand} candidates in the top {args.n}; adding {extra} non-candidates "
          f"(--include-non-candidates {extra}) to reach {args.n}", flush=True)
    for run in range(args.repeat):
        load0 = os.getloadavg()
        r0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        summary = build_report(db, work / "report", limit=args.n, include_non_candidates=extra,
                               overwrite=True, workers=args.workers)
        wall = time.perf_counter() - t0
        r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        load1 = os.getloadavg()
        cpu_self = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        cpu_children = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
        result = dict(run=run + 1, spectra=summary.n_rows, candidates=summary.n_candidates,
                      non_candidates=summary.n_non_candidates, plotted=summary.n_plotted,
                      bad_files=len(summary.bad_files), workers=args.workers, wall_s=round(wall, 2),
                      cpu_main_s=round(cpu_self, 2), cpu_renderers_s=round(cpu_children, 2),
                      load_before=[round(x, 2) for x in load0], load_after=[round(x, 2) for x in load1],
                      cores=os.cpu_count(),
                      phases_s={k: round(v, 2) for k, v in summary.timings.items()})
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
