#!/usr/bin/env python
"""Throughput of the scan on a (mock) release: read-only limit, naive loop, scanner.

Measures, on the same files and the same machine:

(a) the read-only limit: fitsio reading every file's data (primary image, or
    the COADD table), nothing else (no header parsing), in ``--workers``
    processes; and (a') the project's reader :func:`lamost_ostar.io.read_spectra`
    (fitsio engine), which also parses the header and checks the layout, and
    (a'') the same with the native engine (the scan's default);
(b) a naive baseline: astropy open + per-file preprocess + per-file
    ``predict`` in a Python loop, one process, on ``--naive-subset`` files,
    extrapolated to the whole release (reported as such);
(c) the scanner end to end (:func:`lamost_ostar.scan.run_scan`: lazy walk,
    Dask local cluster of ``--workers`` processes, ``--read-engine`` read, vectorised
    preprocessing, batched inference, bulk writes) into a fresh SQLite file and
    into a fresh PostgreSQL database (created and dropped by this script).

Prints spectra/s for each and (c)/(a), and writes a JSON report.

Example::

    nice -n 10 python scripts/bench_scan.py /tmp/mock20k --models-dir /tmp/models \\
        --pg-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres --json bench.json
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _read_raw(paths: list[str]) -> int:
    """fitsio only: read every file's spectrum data; returns bytes read.

    The header is not parsed (fitsio's ``read_header`` costs more than the data:
    ~130 vs ~440 files/s measured here), so this is an upper limit.
    """
    import fitsio

    n = 0
    for p in paths:
        try:
            with fitsio.FITS(p) as f:
                data = f[0].read()
                if data is None:  # DR9+ layout: empty primary, COADD table in HDU 1
                    data = f[1].read()
                n += 0 if data is None else data.nbytes
        except Exception:  # noqa: BLE001 - broken files count as read attempts
            pass
    return n


def _read_project(paths: list[str], engine: str = "fitsio") -> int:
    from lamost_ostar.io import read_spectra

    return len(read_spectra(paths, engine=engine).spectra)


def _chunks(seq: list[str], n: int) -> list[list[str]]:
    k = max(1, len(seq) // (n * 8))
    return [seq[i:i + k] for i in range(0, len(seq), k)]


def bench_read(paths: list[str], workers: int, func) -> float:
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        list(pool.imap_unordered(func, _chunks(paths, workers)))
    return time.perf_counter() - t0


def bench_naive(paths: list[str], model_version: str | None, models_dir: str | None) -> float:
    """astropy open + per-file preprocess + per-file predict, one process."""
    import numpy as np

    from lamost_ostar.io import read_spectrum
    from lamost_ostar.models.registry import load_model
    from lamost_ostar.preprocess import prepare

    bundle = load_model(model_version, models_dir)
    bundle.predict_proba(np.zeros((1, bundle.npix, 1), np.float32))  # build/trace once
    t0 = time.perf_counter()
    for p in paths:
        try:
            s = read_spectrum(p, engine="astropy")
        except Exception:  # noqa: BLE001
            continue
        x = prepare([s]).x
        bundle.predict_proba(x[..., None])
    return time.perf_counter() - t0


def bench_scan(release: str, db: str, workers: int, model_version, models_dir, partition_size,
               batch_size, read_engine: str = "native", device: str = "cpu", engine: str = "auto") -> dict:
    from lamost_ostar.catalogue import Catalogue
    from lamost_ostar.scan import run_scan

    sink = Catalogue(db)
    t0 = time.perf_counter()
    s = run_scan([release], sink, n_workers=workers, model_version=model_version,
                 models_dir=models_dir, device=device, engine=engine, partition_size=partition_size,
                 batch_size=batch_size, read_engine=read_engine, progress=False,
                 worker_log=os.path.join(tempfile.gettempdir(), "bench_scan_workers.log"))
    wall = time.perf_counter() - t0
    counts = sink.counts()
    sink.close()
    n = s.totals.n_classified + s.totals.n_errors
    return {"db": db.split("@")[-1], "wall_s": wall, "startup_s": s.startup_s,
            "first_result_s": s.first_result_s,
            "files": s.totals.n_files, "classified": s.totals.n_classified,
            "errors": s.totals.n_errors, "rows": counts, "model_version": s.model_version,
            "engine": s.engine, "worker_peak_rss_mb": s.counts()["worker_peak_rss_mb"],
            "spectra_per_s": n / wall, "steady_spectra_per_s": s.steady_rate}


def _pg_create(admin_url: str) -> tuple[str, str]:
    import sqlalchemy as sa

    name = f"lamost_bench_{os.getpid()}"
    eng = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    eng.dispose()
    url = sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    return url, name


def _pg_drop(admin_url: str, name: str) -> None:
    import sqlalchemy as sa

    eng = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    eng.dispose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--model", default=None)
    ap.add_argument("--models-dir", default=None)
    ap.add_argument("--naive-subset", type=int, default=300)
    ap.add_argument("--partition-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--pg-url", default=None,
                    help="PostgreSQL URL of a database to connect to for CREATE DATABASE "
                         "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres)")
    ap.add_argument("--skip", default="", help="comma list of steps to skip: a,b,sqlite,pg")
    ap.add_argument("--read-engine", default="native", choices=["native", "fitsio", "astropy"],
                    help="reader used by the scanner in (c) [native: the scan's default]")
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"],
                    help="inference device of the scan (c) [cpu: the figures in reports/ are CPU]")
    ap.add_argument("--engine", default="auto", choices=["auto", "keras", "numpy"],
                    help="inference engine of the scan (c) [auto: the scan's default, numpy on a CPU]")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    from lamost_ostar.scan import iter_paths

    paths = list(iter_paths([args.release]))
    n = len(paths)
    report: dict = {"release": args.release, "files": n, "workers": args.workers, "device": args.device,
                    "engine": args.engine,
                    "read_engine": args.read_engine,
                    "cpu_count": os.cpu_count(), "machine": platform.platform(),
                    "load_avg_start": os.getloadavg()}
    print(f"{n} files, {args.workers} worker processes, load average {os.getloadavg()}")

    if "a" not in skip:
        t = bench_read(paths, args.workers, _read_raw)
        report["a_fitsio_raw"] = {"wall_s": t, "spectra_per_s": n / t}
        print(f"(a)  fitsio read-only (data):       {n / t:8.1f} spectra/s  ({t:.1f} s)")
        t = bench_read(paths, args.workers, _read_project)
        report["a_read_spectra"] = {"wall_s": t, "spectra_per_s": n / t}
        print(f"(a') io.read_spectra (fitsio):      {n / t:8.1f} spectra/s  ({t:.1f} s)")
        t = bench_read(paths, args.workers, functools.partial(_read_project, engine="native"))
        report["a_read_spectra_native"] = {"wall_s": t, "spectra_per_s": n / t}
        print(f"(a'') io.read_spectra (native):     {n / t:8.1f} spectra/s  ({t:.1f} s)")
    if "b" not in skip:
        step = max(1, n // args.naive_subset)
        subset = paths[::step][:args.naive_subset]
        t = bench_naive(subset, args.model, args.models_dir)
        rate = len(subset) / t
        report["b_naive"] = {"subset": len(subset), "wall_s": t, "spectra_per_s": rate,
                             "extrapolated_s": n / rate, "processes": 1}
        print(f"(b)  naive loop (1 process, {len(subset)} files): {rate:8.1f} spectra/s "
              f"-> {n / rate:.0f} s for {n} files (extrapolated)")
    if "sqlite" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            r = bench_scan(args.release, f"sqlite:///{tmp}/bench.sqlite", args.workers,
                           args.model, args.models_dir, args.partition_size, args.batch_size,
                           args.read_engine, args.device, args.engine)
        report["c_sqlite"] = r
        print(f"(c)  scan -> SQLite ({r['engine']}):        {r['spectra_per_s']:8.1f} spectra/s  "
              f"({r['wall_s']:.1f} s; {r['steady_spectra_per_s']:.1f}/s after "
              f"{r['startup_s']:.1f} s start-up, first results at {r['first_result_s'] or float('nan'):.1f} s; "
              f"worker peak RSS {r['worker_peak_rss_mb']:.0f} MB)")
    if "pg" not in skip and args.pg_url:
        url, name = _pg_create(args.pg_url)
        try:
            r = bench_scan(args.release, url, args.workers, args.model, args.models_dir,
                           args.partition_size, args.batch_size, args.read_engine, args.device,
                           args.engine)
        finally:
            _pg_drop(args.pg_url, name)
        report["c_postgresql"] = r
        print(f"(c)  scan -> PostgreSQL:            {r['spectra_per_s']:8.1f} spectra/s  "
              f"({r['wall_s']:.1f} s; {r['steady_spectra_per_s']:.1f}/s after "
              f"{r['startup_s']:.1f} s start-up, first results at {r['first_result_s'] or float('nan'):.1f} s)")
    if "a_fitsio_raw" in report:
        a = report["a_fitsio_raw"]["spectra_per_s"]
        for key in ("c_sqlite", "c_postgresql"):
            if key in report:
                c = report[key]
                report[f"ratio_{key}_over_a"] = c["spectra_per_s"] / a
                report[f"ratio_{key}_steady_over_a"] = c["steady_spectra_per_s"] / a
                print(f"(c)/(a) {key[2:]:<10}: {c['spectra_per_s'] / a:6.1%} "
                      f"(steady: {c['steady_spectra_per_s'] / a:6.1%})")
    report["load_avg_end"] = os.getloadavg()
    print(f"load average at the end {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
