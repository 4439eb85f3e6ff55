#!/usr/bin/env python
"""Reading with zlib-ng against stdlib zlib: CPU per file of ``io.read_spectra`` (native engine).

Usage::

    python scripts/bench_gunzip.py /work/runs/mock10k [--files 3072] [--rounds 4]

Reads the first ``--files`` files of the release (sorted walk) in 256-file
batches, alternating the inflater of the native engine (``io._inflate``),
after one untimed pass; prints the CPU time (``time.thread_time``) per file of
each pass.
"""
from __future__ import annotations

import argparse
import time
import zlib


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release")
    ap.add_argument("--files", type=int, default=3072)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args(argv)
    import lamost_ostar.io as io
    from lamost_ostar.scan import iter_paths, tune_malloc

    tune_malloc()
    paths = list(iter_paths([args.release]))[:args.files]
    libs = {"zlib": zlib, io.GUNZIP_LIBRARY: io._inflate}

    def run(lib) -> float:
        io._inflate = lib
        c = time.thread_time()
        for i in range(0, len(paths), 256):
            io.read_spectra(paths[i:i + 256])
        return 1e3 * (time.thread_time() - c) / len(paths)

    run(libs[io.GUNZIP_LIBRARY])
    for _ in range(args.rounds):
        print(", ".join(f"{name} {run(lib):.3f} ms" for name, lib in libs.items()) + " CPU per file")


if __name__ == "__main__":
    main()
