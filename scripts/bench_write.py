#!/usr/bin/env python
"""CPU and wall time per result row of ``Catalogue.write`` (what a scan worker spends writing).

Usage::

    python scripts/bench_write.py /work/runs/mock10k [--files 2048] [--db URL]

Classifies the first ``--files`` files of the release (sorted walk) with the
default stage, then writes the results in 256-row batches, as a scan worker
does, into a fresh SQLite file (or ``--db``: a PostgreSQL URL whose database
should be empty), the first batch untimed.  Prints the CPU and wall time per
row of the timed batches and of ``done_paths`` (the resume check), and the CPU
time per row of building a batch's columns (``StageSpec.value_columns``, best
of 5 passes).  Run it with
``PYTHONPATH`` pointing at another checkout to compare code versions.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def classified_batches(release: str, files: int) -> tuple:
    """``(stage, paths, batches)``: the default stage's results for the first ``files`` files of
    ``release`` (sorted walk), one list per 256 files, in the scan workers' malloc settings."""
    from lamost_ostar.scan import iter_paths, tune_malloc
    from lamost_ostar.stage import OStarStage, read_items

    tune_malloc()
    paths = list(iter_paths([release]))[:files]
    stage = OStarStage(device="cpu")
    batches = []
    for i in range(0, len(paths), 256):
        spectra, _slots, _failed = read_items(paths[i:i + 256])
        batches.append(list(stage.process(spectra)))
    return stage, paths, batches


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release")
    ap.add_argument("--files", type=int, default=2048)
    ap.add_argument("--db", default=None, help="catalogue URL [a fresh SQLite file]")
    args = ap.parse_args(argv)
    import lamost_ostar
    from lamost_ostar.catalogue import Catalogue
    from lamost_ostar.stage import stage_spec

    stage, paths, batches = classified_batches(args.release, args.files)
    with tempfile.TemporaryDirectory() as tmp:
        cat = Catalogue(args.db or os.path.join(tmp, "w.sqlite"))
        sid = cat.start_scan(stage.model_version)
        cat.write(sid, batches[0], stage=stage)
        n = sum(len(b) for b in batches[1:])
        # this thread's CPU: the process's would also count BLAS threads still spinning after the
        # classification (process_time ran above wall time here, reports/performance.md)
        c, w = time.thread_time(), time.perf_counter()
        for b in batches[1:]:
            cat.write(sid, b, stage=stage)
        cpu, wall = time.thread_time() - c, time.perf_counter() - w
        c = time.thread_time()
        for i in range(0, len(paths), 256):
            cat.done_paths(paths[i:i + 256], stage.model_version)
        done_cpu = time.thread_time() - c
        cat.close()
    # the columns of a batch alone (StageSpec.value_columns: metadata + the stage's outputs)
    spec = stage_spec(stage)
    oks = [[r for r in b if r.ok] for b in batches[1:]]
    best = float("inf")
    for _ in range(5):
        c = time.thread_time()
        for b in oks:
            spec.value_columns(b)
        best = min(best, time.thread_time() - c)
    n_ok = sum(len(b) for b in oks)
    print(f"{lamost_ostar.__file__}: write {n} rows in {len(batches) - 1} batches: "
          f"{1e3 * cpu / n:.3f} ms CPU, {1e3 * wall / n:.3f} ms wall per row; "
          f"done_paths {1e3 * done_cpu / len(paths):.3f} ms CPU per path; "
          f"of a write, value_columns {1e6 * best / max(n_ok, 1):.1f} us CPU per row (best of 5)")


if __name__ == "__main__":
    main()
