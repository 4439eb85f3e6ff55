#!/usr/bin/env python
"""What the SQLite catalogue costs a scan: the same scan into SQLite and into a sink that stores nothing.

Usage::

    python scripts/bench_sink.py /work/runs/mock10k [--rounds 3] [--workers 2] [--kinds sqlite,null]

Each round runs ``run_scan`` once per kind, each in a fresh interpreter:
``sqlite``, a fresh SQLite catalogue (its query indexes deferred and built at
the end, the scan's default); ``sqlite-kept``, the same with
``defer_indexes=False`` (every index kept up to date row by row);
``null``, :class:`NullSink` (no resume check, no writes).  Prints the steady
and overall rates and the workers' CPU per file read
(``partition_cpu_ms_per_file``) of each.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

T0 = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))


#: what each round scans into, in the order given by ``--kinds``
KINDS = ("sqlite", "sqlite-kept", "null")


class NullSink:
    """A result sink that stores nothing (the scan's sink protocol, every method a no-op)."""

    def start_scan(self, model_version=None, **kw):  # noqa: D102
        return 1

    def done_paths(self, paths, model_version, **kw):  # noqa: D102
        return set()

    def write(self, scan_id, results, *, stage=None):  # noqa: D102
        return None

    def finish_scan(self, scan_id, counts=None, **kw):  # noqa: D102
        return None


def _child(release: str, kind: str, workers: int) -> None:
    from bench_sink import NullSink as Null  # by module name: the workers unpickle bench_sink.NullSink

    from lamost_ostar.catalogue import Catalogue
    from lamost_ostar.scan import run_scan

    with tempfile.TemporaryDirectory() as tmp:
        sink = Null() if kind == "null" else Catalogue(os.path.join(tmp, "bench.sqlite"))
        s = run_scan([release], sink, n_workers=workers, device="cpu", progress=False,
                     worker_log=os.path.join(tmp, "workers.log"), defer_indexes=kind != "sqlite-kept")
    build = "" if s.index_build_s is None else f" (indexes built in {s.index_build_s:.2f} s)"
    print(f"{kind:11s}: steady {s.steady_rate:7.1f} files/s, overall "
          f"{s.totals.n_files / (time.perf_counter() - T0):7.1f} files/s, worker CPU "
          f"{s.counts()['partition_cpu_ms_per_file']:.3f} ms per file{build}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kinds", default="sqlite,null", help="sqlite, sqlite-kept, null, in this order")
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.release, args.child, args.workers)
        return
    kinds = args.kinds.split(",")
    if set(kinds) - set(KINDS):
        ap.error(f"--kinds: one or more of {', '.join(KINDS)} (got {args.kinds!r})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)}
    for _ in range(args.rounds):
        for kind in kinds:
            subprocess.run([sys.executable, os.path.abspath(__file__), args.release, "--child", kind,
                            "--workers", str(args.workers)], env=env, check=True,
                           stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
