#!/usr/bin/env python
"""One process: OStarStage.process throughput and per-step costs on a release's files.

Usage::

    OMP_NUM_THREADS=1 TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 \\
        python scripts/bench_stage.py /work/runs/mock10k [--files 2560] [--label new]

Reads the first ``--files`` + 256 files of the release (sorted walk), runs the
default-model stage on the first 256 (warm-up: model load, tracing), then times
``process`` on the next ``--files`` (wall and process CPU time per file).  Then,
on one 256-file batch, the steps the stage runs, each timed alone (best of 3):
reading (``io.read_spectra``, default engine), ``preprocess.prepare``, inference
(``predict_proba`` of the model input), ``lines.measure_lines``.  Run it with
``PYTHONPATH`` pointing at another checkout to compare code versions;
``--engine`` picks the inference engine; ``--mallopt`` applies the scan workers' malloc settings (:func:`lamost_ostar.scan.tune_malloc`).
"""
from __future__ import annotations

import argparse
import time


def _best(f, repeat: int = 3) -> float:
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release")
    ap.add_argument("--files", type=int, default=2560)
    ap.add_argument("--label", default="")
    ap.add_argument("--engine", default="auto", choices=["auto", "keras", "numpy"],
                    help="the stage's inference engine [auto: numpy on the CPU]")
    ap.add_argument("--mallopt", action="store_true",
                    help="apply the scan workers' malloc settings (scan.tune_malloc) first")
    args = ap.parse_args(argv)
    if args.mallopt:
        from lamost_ostar.scan import tune_malloc

        print("malloc tuned:", tune_malloc())
    t0 = time.perf_counter()
    import lamost_ostar
    from lamost_ostar import lines
    from lamost_ostar.io import read_spectra
    from lamost_ostar.preprocess import model_input, prepare
    from lamost_ostar.scan import walk_release
    from lamost_ostar.stage import OStarStage

    paths = sorted(walk_release(args.release))[:args.files + 256]
    stage = OStarStage(device="cpu", engine=args.engine)
    stage.process(paths[:256])
    t1 = time.perf_counter()
    t, c = time.perf_counter(), time.process_time()
    stage.process(paths[256:])
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    n = len(paths) - 256
    print(f"{args.label} ({lamost_ostar.__file__}, {stage.engine} engine): process {1e3 * wall / n:.3f} ms/file wall ({n / wall:.0f}/s), "
          f"{1e3 * cpu / n:.3f} ms/file CPU; start (imports, model load, warm-up) {t1 - t0:.2f} s")
    batch = paths[256:512]
    spectra = read_spectra(batch).spectra
    prep = prepare(spectra)
    x = model_input(prep, stage.channels)
    steps = {"read (default engine)": (lambda: read_spectra(batch), len(batch)),
             "prepare": (lambda: prepare(spectra), len(spectra)),
             "inference": (lambda: stage.predict_proba(x), len(spectra)),
             "lines": (lambda: lines.measure_lines(prep.flux, prep.ivar, prep.mask), len(spectra))}
    print("  " + ", ".join(f"{k} {1e3 * _best(f) / m:.3f} ms" for k, (f, m) in steps.items()) + " per spectrum")


if __name__ == "__main__":
    main()
