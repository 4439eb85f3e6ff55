#!/usr/bin/env python
"""Measure preprocessing throughput (spectra/s) on the real shared LAMOST files.

Usage::

    python scripts/bench_preprocess.py [--data ../shared/data/lamost] [--repeat 5]
                                       [--batch-sizes 32,256,1024]

All low-resolution files under ``--data`` are read once with
:func:`lamost_ostar.io.read_spectra` (not timed); then
:func:`lamost_ostar.preprocess.prepare` is timed on batches of the given sizes
(batches larger than the number of files repeat the real spectra cyclically).
The best of ``--repeat`` runs is reported, with the median in brackets.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from lamost_ostar.io import read_spectra
from lamost_ostar.preprocess import prepare

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "lamost"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch-sizes", default="32,256,1024")
    args = parser.parse_args(argv)
    paths = sorted(p for p in args.data.rglob("*.fits*") if p.is_file())
    if not paths:
        parser.error(f"no FITS files under {args.data}")
    batch = read_spectra(paths)
    spectra = batch.spectra
    print(f"{len(paths)} files, {len(spectra)} spectra read, {len(batch.errors)} skipped "
          f"({', '.join(sorted({e.reason for e in batch.errors}))})")
    for size in (int(s) for s in args.batch_sizes.split(",")):
        items = [spectra[i % len(spectra)] for i in range(size)]
        prepare(items[:8])                                  # warm-up
        rates = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = prepare(items)
            rates.append(size / (time.perf_counter() - t0))
        print(f"batch {size:5d}: {max(rates):8.0f} spectra/s (median {np.median(rates):.0f}); "
              f"median good fraction {np.median(out.good_fraction):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
