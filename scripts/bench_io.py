"""Measure the reader's speed (ms/file) on the real shared LAMOST files.

Usage (from the repository root; needs ``../shared/data/lamost``)::

    nice -n 10 python scripts/bench_io.py [--repeat 5] [--cpu] [--extra MOCKDIR]

Every method reads all files listed in ``manifest.csv`` (296 real files: 179 DR1,
115 DR2-DR8 image, 1 DR9 COADD, 1 medium-resolution file that is refused; 12 of
them gzip-compressed); each
pass is timed (wall clock, or process CPU time with ``--cpu``, which is robust on
a busy shared machine), and the best of ``--repeat`` passes is reported (warm cache),
separately for the plain and the gzip-compressed files, and on gzip copies of all
files (written to a temporary folder) so the gzip figure rests on 296 files. Methods:

``io fitsio`` / ``io native`` / ``io astropy``
    :func:`lamost_ostar.io.read_spectra` with each engine (full records, all checks).
``floor: read+gunzip``
    Only ``open().read()`` plus :mod:`zlib` decompression: the I/O + inflate floor.
``fitsio bare``
    ``fitsio.FITS(path)``, full header object and data of the last HDU, no checks.
``astropy bare (path)``
    ``astropy.io.fits.open(path)`` (astropy's own gzip handling), header + data.
``astropy bare (zlib+BytesIO)``
    File read once, gunzipped with zlib, opened from memory: the astropy engine's way.
"""

from __future__ import annotations

import argparse
import csv
import gc
import gzip
import io
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Callable

import fitsio
import numpy as np
from astropy.io import fits as afits

from lamost_ostar.io import read_spectra

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "lamost"


def _gunzip_if_needed(data: bytes) -> bytes:
    return zlib.decompress(data, 16 + zlib.MAX_WBITS) if data[:2] == b"\x1f\x8b" else data


def _floor(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            _gunzip_if_needed(fh.read())


def _fitsio_bare(paths: list[str]) -> None:
    for p in paths:
        with fitsio.FITS(p) as f:
            f[0].read_header()
            f[len(f) - 1].read()


def _astropy_path(paths: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in paths:
            with afits.open(p, memmap=False) as h:
                dict(h[0].header)
                h[len(h) - 1].data


def _astropy_bytes(paths: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in paths:
            with open(p, "rb") as fh:
                raw = _gunzip_if_needed(fh.read())
            with afits.open(io.BytesIO(raw), memmap=False) as h:
                dict(h[0].header)
                h[len(h) - 1].data


def _io(engine: str) -> Callable[[list[str]], None]:
    def run(paths: list[str]) -> None:
        batch = read_spectra(paths, engine=engine)
        assert len(batch.spectra) + len(batch.errors) == len(paths)
    return run


def _best_ms_per_file(func: Callable[[list[str]], None], paths: list[str],
                      repeat: int, clock: Callable[[], float]) -> float:
    if not paths:
        return float("nan")
    best = np.inf
    for _ in range(repeat):
        gc.collect()
        t0 = clock()
        func(paths)
        best = min(best, clock() - t0)
    return 1e3 * best / len(paths)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                    help="folder holding manifest.csv (default: ../shared/data/lamost)")
    ap.add_argument("--repeat", type=int, default=5, help="passes per method (best kept)")
    ap.add_argument("--extra", type=Path, default=None,
                    help="also time every *.fits* file under this folder (e.g. a mock "
                         "release from `lamost-ostar mock`), as one more column")
    ap.add_argument("--cpu", action="store_true",
                    help="time with process CPU time instead of wall time (robust on a "
                         "machine shared with other jobs; excludes I/O waits)")
    args = ap.parse_args(argv)

    with open(args.root / "manifest.csv", newline="") as fh:
        paths = [str(args.root / r["file"]) for r in csv.DictReader(fh)]
    gz = []
    plain = []
    for p in paths:
        with open(p, "rb") as fh:
            (gz if fh.read(2) == b"\x1f\x8b" else plain).append(p)
    _floor(paths)  # warm the page cache

    # gzip copies of every plain file, so that the gzip column covers all 296 files
    tmp = tempfile.TemporaryDirectory(prefix="bench_io_")
    gz_all = list(gz)
    for i, p in enumerate(plain):
        dest = Path(tmp.name) / f"{i:04d}_{Path(p).name}.gz"
        dest.write_bytes(gzip.compress(Path(p).read_bytes(), compresslevel=6, mtime=0))
        gz_all.append(str(dest))
    _floor(gz_all)

    methods = {
        "io fitsio (default)": _io("fitsio"),
        "io native": _io("native"),
        "io astropy": _io("astropy"),
        "floor: read+gunzip": _floor,
        "fitsio bare": _fitsio_bare,
        "astropy bare (path)": _astropy_path,
        "astropy bare (zlib+BytesIO)": _astropy_bytes,
    }
    print(f"{len(paths)} files under {args.root}: {len(plain)} plain, {len(gz)} gzip; "
          f"best of {args.repeat} passes, warm cache")
    print(f"gz-all: the {len(gz)} gzip files + gzip copies (level 6) of the {len(plain)} "
          f"plain ones = {len(gz_all)} files")
    sets = [paths, plain, gz, gz_all]
    head = f"{'method':30s} {'all':>8s} {'plain':>8s} {'gzip':>8s} {'gz-all':>8s}"
    if args.extra is not None:
        extra = sorted(str(p) for p in args.extra.rglob("*.fits*"))
        _floor(extra)
        print(f"extra: {len(extra)} files under {args.extra}")
        sets.append(extra)
        head += f" {'extra':>8s}"
    clock = time.process_time if args.cpu else time.perf_counter
    print(head + ("   CPU ms/file (process_time)" if args.cpu else "   wall ms/file"))
    for name, func in methods.items():
        row = [_best_ms_per_file(func, s, args.repeat, clock) for s in sets]
        print(f"{name:30s} " + " ".join(f"{v:8.3f}" for v in row), flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
