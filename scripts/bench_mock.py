#!/usr/bin/env python
"""Benchmark the mock LAMOST release writer (files/s).

Measures, on this machine:

1. the writer's parts for one batch: simulation (vectorised N x NPIX), FITS
   bytes + gzip (our own header/byte writer, as used by ``write_release``) vs
   fitsio writing the same image + header to ``.fits.gz`` (cfitsio gzip), and
   the gzip level;
2. ``write_release`` end to end with 1 and with ``--workers`` processes.

Usage::

    python scripts/bench_mock.py --n 2000 --workers 2 [--out /tmp/bench_mock]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _bench_parts(n: int) -> None:
    import fitsio

    from lamost_ostar import mock
    from lamost_ostar.templates import load_templates

    cfg = mock.MockConfig(n=n, seed=1)
    lib = load_templates()
    picker = mock._TemplatePicker(lib, cfg.template_source)
    inst = mock.load_instrument()
    plan = mock.release_plan(cfg)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    arrays, truth = mock._simulate_native(n, plan.mk, rng, picker, inst, cfg)
    t_sim = time.perf_counter() - t0
    print(f"simulate {n} spectra (vectorised): {t_sim:.2f} s = {n / t_sim:.0f} spectra/s")

    # header cards as write_release builds them
    metas = []
    for k in range(n):
        tr = truth[k]
        metas.append({
            "lmjd": int(plan.lmjd[k]), "planid": str(plan.planid[k]), "spid": int(plan.spid[k]),
            "fiberid": int(plan.fiberid[k]), "obsid": int(plan.obsid[k]), "ra": float(plan.ra[k]),
            "dec": float(plan.dec[k]), "spra": 0.0, "spdec": 0.0,
            "desig": mock.designation(plan.ra[k], plan.dec[k])[0], "t_off": 0.0,
            "exptime": 5400.0, "rv": tr["rv"], "z_noise": 0.0, "z_err": 1e-5,
            "snr": {b: tr[f"snr_{b}"] for b in "ugriz"}, "mags": [17.0, 16.0, 15.5, 15.3, 15.2],
            "subclass": tr["subclass"], "mk": tr["mk"], "date": "2021-09-17T01:28:29",
            "cell": "A0101", "x": 1.0, "y": 2.0, "objname": "1", "tsource": "MOCK",
            "seeing": 3.0, "moonpha": 1.0, "helio_rv": 1.0, "scamean": 3.3})
    t0 = time.perf_counter()
    cards = [mock._header_cards("image", m, cfg) for m in metas]
    t_hdr = time.perf_counter() - t0
    print(f"header cards: {1e3 * t_hdr / n:.3f} ms/file")
    tmp = Path(tempfile.mkdtemp(prefix="bench_mock_"))
    try:
        for level in (1, 6):
            t0 = time.perf_counter()
            for k in range(n):
                raw = mock._file_bytes("image", arrays["flux"][k], arrays["ivar"][k],
                                       arrays["andmask"][k], arrays["ormask"][k],
                                       int(arrays["npix"][k]), cards[k], None)
                data = mock._gz(raw, level)
                with open(tmp / f"own{level}_{k}.fits.gz", "wb") as fh:
                    fh.write(data)
            dt = time.perf_counter() - t0
            size = np.mean([os.path.getsize(tmp / f"own{level}_{k}.fits.gz") for k in range(n)])
            print(f"own FITS bytes + zlib level {level}: {1e3 * dt / n:.2f} ms/file, "
                  f"{size / 1e3:.1f} kB/file")
        # fitsio: same data, header from the same cards (key, value, comment)
        recs = []
        for k in range(min(n, 300)):
            hdr = fitsio.FITSHDR()
            for c in cards[k]:
                key = c[:8].strip()
                if key == "COMMENT":
                    hdr.add_record({"name": "COMMENT", "value": c[8:].strip()})
                elif key:
                    rec = fitsio.FITSRecord(c)
                    hdr.add_record(rec)
            recs.append(hdr)
        m = len(recs)
        t0 = time.perf_counter()
        for k in range(m):
            npx = int(arrays["npix"][k])
            img = np.stack([arrays["flux"][k][:npx], arrays["ivar"][k][:npx],
                            mock._native_wave32(npx), arrays["andmask"][k][:npx].astype(np.float32),
                            arrays["ormask"][k][:npx].astype(np.float32)])
            fitsio.write(str(tmp / f"fitsio_{k}.fits.gz"), img, header=recs[k], clobber=True)
        dt = time.perf_counter() - t0
        size = np.mean([os.path.getsize(tmp / f"fitsio_{k}.fits.gz") for k in range(m)])
        print(f"fitsio.write to .fits.gz (cfitsio gzip, {m} files): {1e3 * dt / m:.2f} ms/file, "
              f"{size / 1e3:.1f} kB/file")
        # check both readable and equal
        a = fitsio.read(str(tmp / "fitsio_0.fits.gz"))
        b = fitsio.read(str(tmp / "own1_0.fits.gz"))
        print(f"fitsio- and own-written file 0 equal data: {np.array_equal(a, b)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bench_release(n: int, workers: int, out: Path, layout: str) -> float:
    from lamost_ostar.mock import MockConfig, write_release

    if out.exists():
        shutil.rmtree(out)
    t0 = os.times()
    s = write_release(out, MockConfig(n=n, seed=1, preset="survey", broken_rate=0.01,
                                      layout=layout), workers=workers)
    t1 = os.times()
    cpu = (t1.user - t0.user) + (t1.system - t0.system) + (t1.children_user - t0.children_user) \
        + (t1.children_system - t0.children_system)
    print(f"write_release n={n} layout={layout} workers={workers}: wall {s.seconds:.1f} s, "
          f"{s.files_per_second:.0f} files/s, {s.bytes_written / n / 1e3:.1f} kB/file "
          f"-> 100,000 files in {100000 / s.files_per_second / 60:.1f} min (wall); "
          f"CPU {1e3 * cpu / n:.2f} ms/file (user+sys, incl. workers) -> "
          f"{workers / (cpu / n):.0f} files/s if {workers} core(s) were free")
    return s.files_per_second


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--layout", default="image")
    p.add_argument("--out", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--skip-parts", action="store_true")
    args = p.parse_args()
    print(f"CPU cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} "
          "(other jobs share the cores: wall-clock rates depend on it)")
    if not args.skip_parts:
        _bench_parts(min(args.n, 1000))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_mock_rel_"))
    try:
        _bench_release(args.n, 1, out / "w1", args.layout)
        if args.workers > 1:
            _bench_release(args.n, args.workers, out / f"w{args.workers}", args.layout)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
