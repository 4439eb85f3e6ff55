#!/usr/bin/env python
"""The same read + classify loop in different process environments: where a scan worker's extra CPU comes from.

Usage::

    python scripts/bench_worker_env.py /work/runs/mock10k [--rounds 3] [--modes main,thread,arena1,dask]

Each mode runs the loop a scan worker runs (``read_items`` + ``OStarStage.process`` in
256-file chunks, no writes) in two processes at once, one half of the first
10,000 files each (sorted walk), one BLAS thread, the scan workers' malloc
settings (:func:`lamost_ostar.scan.tune_malloc`):

``main``
    in each process's main thread;
``thread``
    in a second thread of each process (as a Dask executor thread runs a task);
``arena1``
    in a second thread, after ``mallopt(M_ARENA_MAX, 1)`` (the thread uses the
    main malloc arena);
``dask``
    as a task on each worker of a 2-worker local Dask cluster
    (:func:`lamost_ostar.scan.make_client`), outside the scan's code.

Prints, per round and mode, the two processes' summed rate, their mean CPU
time per file of the loop's thread (``time.thread_time``) and the minor page
faults of the first process during the loop.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def loop(release: str, lo: int, hi: int, arena1: bool = False) -> dict:
    """Read and classify files ``lo:hi`` of the release; CPU per file, rate, minor faults."""
    import resource

    from lamost_ostar.scan import iter_paths, tune_malloc

    tune_malloc()
    if arena1:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX
    from lamost_ostar.stage import OStarStage, read_items

    paths = list(iter_paths([release]))[lo:hi]
    stage = OStarStage(device="cpu")
    flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c, w = time.thread_time(), time.perf_counter()
    for i in range(0, len(paths), 256):
        spectra, _slots, _failed = read_items(paths[i:i + 256])
        stage.process(spectra)
    return {"cpu_ms": 1e3 * (time.thread_time() - c) / len(paths),
            "rate": len(paths) / (time.perf_counter() - w),
            "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt}


def _child(release: str, mode: str, lo: int, hi: int) -> None:
    out: dict = {}
    if mode == "main":
        out = loop(release, lo, hi)
    else:
        t = threading.Thread(target=lambda: out.update(loop(release, lo, hi, mode == "arena1")))
        t.start()
        t.join()
    print(json.dumps(out))


def _dask(release: str, n: int) -> list[dict]:
    from bench_worker_env import loop as task  # by module name: the workers import it

    from lamost_ostar.scan import make_client

    client, cluster = make_client(n_workers=2)
    try:
        workers = list(client.scheduler_info()["workers"])
        futs = [client.submit(task, release, k * n // 2, (k + 1) * n // 2, workers=[w], pure=False)
                for k, w in enumerate(workers)]
        return client.gather(futs)
    finally:
        client.close()
        cluster.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release")
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="main,thread,arena1,dask")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--range", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        lo, hi = (int(x) for x in args.range.split(":"))
        if args.child == "dask":
            print(json.dumps(_dask(args.release, args.files)))
        else:
            _child(args.release, args.child, lo, hi)
        return
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    me = [sys.executable, os.path.abspath(__file__), args.release, "--files", str(args.files)]
    half = args.files // 2
    for r in range(args.rounds):
        for mode in args.modes.split(","):
            if mode == "dask":
                p = subprocess.run([*me, "--child", "dask", "--range", "0:0"], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True)
                res = json.loads(p.stdout.strip().splitlines()[-1])
            else:
                ps = [subprocess.Popen([*me, "--child", mode, "--range", f"{k * half}:{(k + 1) * half}"],
                                       env=env, text=True, stdout=subprocess.PIPE)
                      for k in range(2)]
                res = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ps]
            print(f"round {r + 1} {mode:7s}: {sum(x['rate'] for x in res):6.0f} files/s, "
                  f"{sum(x['cpu_ms'] for x in res) / 2:.3f} ms CPU per file, "
                  f"minor faults {res[0]['faults']:,d}", flush=True)


if __name__ == "__main__":
    main()
