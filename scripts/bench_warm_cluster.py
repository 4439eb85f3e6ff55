#!/usr/bin/env python
"""Probes of a 2-worker scan on one warm local cluster: threads, GC, pinning, partition size.

Usage::

    python scripts/bench_warm_cluster.py /work/runs/mock10k --probe NAME [--rounds 3] [--workers 2]

One local cluster (:func:`lamost_ostar.scan.make_client`, as ``lamost-ostar
scan`` starts it) runs every scan of the probe, each into a fresh SQLite file,
so no scan pays the cluster's start-up (how busy each worker is: Dask's task
stream, ``scripts/scan_task_stream.py``).  Probes:

``threads``
    CPU seconds of every thread of each worker during each scan
    (``/proc/self/task``, Linux): the task thread against the event loop.
``gc``
    Python's garbage collector in the workers during a scan: collections and
    seconds per generation (``gc.callbacks``); with ``--freeze``, after
    ``gc.freeze()`` in each worker.
``pin``
    Scans alternating between free workers and each worker's threads pinned to
    one core (``sched_setaffinity``).
``psize``
    Scans alternating between partition sizes (``--sizes``, default 256,1024,128).

Every probe prints the scan's steady rate and worker CPU per file
(``ScanSummary``).  Compare within one run: the machine drifts.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def _scan(client, release: str, **kw):
    from lamost_ostar.catalogue import Catalogue
    from lamost_ostar.scan import run_scan

    with tempfile.TemporaryDirectory() as tmp:
        sink = Catalogue(os.path.join(tmp, "probe.sqlite"))
        s = run_scan([release], sink, client=client, progress=False, **kw)
        sink.close()
    return s


def _line(s) -> str:
    return (f"steady {s.steady_rate:7.1f}/s  first results {s.first_result_s:.2f} s  worker CPU "
            f"{s.counts()['partition_cpu_ms_per_file']:.3f} ms/file")


def _threads() -> dict[str, float]:
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[names.get(int(tid), tid)] = (int(f[11]) + int(f[12])) / tick
    return out


def _gc_install(freeze: bool) -> int:
    import builtins
    import gc

    st = builtins.__dict__.setdefault("_lamost_ostar_gc", {"s": [0.0] * 3, "n": [0] * 3, "t0": 0.0})

    def cb(phase, info):
        if phase == "start":
            st["t0"] = time.perf_counter()
        else:
            g = info["generation"]
            st["s"][g] += time.perf_counter() - st["t0"]
            st["n"][g] += 1

    gc.callbacks.append(cb)
    if freeze:
        gc.freeze()
    return len(gc.get_objects())


def _gc_read() -> dict:
    import builtins
    import gc

    st = builtins._lamost_ostar_gc
    return {"collections": list(st["n"]), "seconds": [round(x, 4) for x in st["s"]],
            "tracked_objects": len(gc.get_objects()), "frozen": gc.get_freeze_count()}


def _pin(core: int | None) -> None:
    cores = set(range(os.cpu_count() or 1)) if core is None else {core}
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release")
    ap.add_argument("--probe", required=True, choices=["threads", "gc", "pin", "psize"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--freeze", action="store_true", help="gc probe: gc.freeze() in each worker first")
    ap.add_argument("--sizes", default="256,1024,128", help="psize probe: partition sizes")
    args = ap.parse_args(argv)

    from lamost_ostar.scan import make_client

    client, cluster = make_client(n_workers=args.workers)
    try:
        if args.probe == "threads":
            for _ in range(args.rounds):
                before = client.run(_threads)
                s = _scan(client, args.release)
                after = client.run(_threads)
                print(_line(s))
                for w in sorted(after):
                    print(f"  {w}: " + ", ".join(f"{k} {v - before[w].get(k, 0.0):.2f} s"
                                                 for k, v in sorted(after[w].items())))
        elif args.probe == "gc":
            print("objects tracked per worker at install:", client.run(_gc_install, args.freeze))
            s = _scan(client, args.release)
            print(_line(s))
            for w, v in sorted(client.run(_gc_read).items()):
                print(f"  {w}: {v}")
        elif args.probe == "pin":
            workers = sorted(client.nthreads())
            for _ in range(args.rounds):
                for mode in ("free", "pinned"):
                    for i, w in enumerate(workers):
                        client.run(_pin, None if mode == "free" else i % (os.cpu_count() or 1),
                                   workers=[w])
                    print(f"{mode:7s}", _line(_scan(client, args.release)), flush=True)
        elif args.probe == "psize":
            sizes = [int(x) for x in args.sizes.split(",")]
            for _ in range(args.rounds):
                for size in sizes:
                    print(f"partition {size:5d}", _line(_scan(client, args.release, partition_size=size)),
                          flush=True)
    finally:
        client.close()
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
