#!/usr/bin/env python
"""What a write costs as the catalogue grows: query indexes kept row by row, or deferred and built once.

Usage::

    python scripts/bench_write_scale.py /work/runs/mock10k [--rows 1000000] [--files 2048]
        [--modes kept,deferred] [--db URL] [--every 100000]

Classifies the first ``--files`` files of the release (sorted walk) once with
the default stage, then writes ``--rows`` result rows into a fresh, empty
catalogue in 256-row batches, as scan workers do (``Catalogue.write``), the
classified results repeated under new paths (``<path>#<k>``).  Mode ``kept``
writes with the table's query indexes in place (``--no-defer-indexes``);
``deferred`` drops them first (``Catalogue.defer_indexes``, what a scan into
an empty table does) and builds them at the end (``Catalogue.build_indexes``).
Prints, per mode, the wall and CPU time per row of every ``--every`` rows (so
the growth with the table's size shows), the index build, and the total.
``--db``: a PostgreSQL URL of an empty database to use instead of a SQLite
file in a temporary folder (its tables are dropped before each mode).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time


def _renamed(result, suffix: str):
    if isinstance(result, dict):
        return {**result, "path": result["path"] + suffix}
    return dataclasses.replace(result, path=result.path + suffix)


def _run_mode(mode: str, url: str, base: list, rows: int, every: int, stage) -> None:
    from lamost_ostar.catalogue import Catalogue

    cat = Catalogue(url)
    sid = cat.start_scan(stage.model_version, stages=[stage])
    if mode == "deferred":
        cat.defer_indexes(["ostar"])
    t_all, c_all = time.perf_counter(), time.process_time()
    t_seg, c_seg, n_seg = t_all, c_all, 0
    written, k = 0, 0
    while written < rows:
        k += 1
        for i in range(0, len(base), 256):
            batch = [_renamed(r, f"#{k}") for r in base[i:i + 256]][:rows - written]
            if not batch:
                break
            cat.write(sid, batch, stage=stage)
            written += len(batch)
            n_seg += len(batch)
            if n_seg >= every or written >= rows:
                t, c = time.perf_counter(), time.process_time()
                print(f"  {mode:8s} rows {written - n_seg:>9,d}-{written:<9,d} "
                      f"{1e3 * (t - t_seg) / n_seg:.4f} ms wall, {1e3 * (c - c_seg) / n_seg:.4f} ms CPU "
                      "per row", flush=True)
                t_seg, c_seg, n_seg = t, c, 0
            if written >= rows:
                break
    t_write = time.perf_counter() - t_all
    build = cat.build_indexes(["ostar"]) if mode == "deferred" else 0.0
    total = time.perf_counter() - t_all
    cpu = time.process_time() - c_all
    missing = cat.missing_indexes("ostar")
    cat.close()
    print(f"{mode:8s}: {rows:,d} rows written in {t_write:.1f} s, indexes built in {build:.1f} s, "
          f"total {total:.1f} s ({1e3 * total / rows:.4f} ms per row, {1e3 * cpu / rows:.4f} ms CPU "
          f"in this process); missing indexes after: {missing or 'none'}", flush=True)


def _drop_all(url: str) -> None:
    import sqlalchemy as sa

    eng = sa.create_engine(url)
    with eng.begin() as conn:
        conn.exec_driver_sql("DROP VIEW IF EXISTS candidates")
        for t in ("results", "errors", "stages", "scans"):
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {t} CASCADE")
    eng.dispose()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=2048)
    ap.add_argument("--every", type=int, default=100_000)
    ap.add_argument("--modes", default="kept,deferred")
    ap.add_argument("--db", default=None, help="PostgreSQL URL of an empty database [a SQLite file]")
    args = ap.parse_args(argv)
    from bench_write import classified_batches  # a sibling script (scripts/ is on sys.path)

    stage, paths, batches = classified_batches(args.release, args.files)
    base = [r for b in batches for r in b if getattr(r, "ok", True)]
    print(f"{len(base)} classified results from {len(paths)} files; {args.rows:,d} rows per mode",
          flush=True)
    for mode in args.modes.split(","):
        if args.db:
            _drop_all(args.db)
            _run_mode(mode, args.db, base, args.rows, args.every, stage)
            continue
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            _run_mode(mode, os.path.join(tmp, "w.sqlite"), base, args.rows, args.every, stage)


if __name__ == "__main__":
    main()
