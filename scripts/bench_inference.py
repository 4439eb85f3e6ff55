#!/usr/bin/env python
"""The two inference engines side by side: start-up, memory, spectra/s, agreement.

For one model version (default: the packaged default) and each engine
(``numpy``: :mod:`lamost_ostar.models.numpy_runtime`; ``keras``: the Keras
backend, TensorFlow by default), in a fresh interpreter per engine, as a scan
worker starts:

- **start-up**: seconds to import the stage module and build
  ``OStarStage(engine=...)`` (the model loaded), and the process's resident
  memory (VmRSS) after it and after inference;
- **inference**: ms per spectrum of ``stage.predict_proba`` on batches of
  ``--batch-size`` model inputs, after one warm-up batch, over ``--repeats``
  batches (median and best), with ``--threads`` BLAS / TensorFlow intra-op
  threads (1 = what each of two scan workers gets on a 2-core machine) and,
  with ``--mallopt``, the scan workers' malloc settings;
- **agreement**: the largest difference of p(O) between the engines on the
  same inputs.

The inputs are the prepared model inputs of real files when ``--files`` is
given (a release directory or file list, first ``--n`` files), else spectra-like
random input.  Engines run one after the other, alternating ``--rounds`` times,
so that both see the same machine load.

Example::

    python scripts/bench_inference.py --files /work/runs/mock10k --n 1024 --rounds 3 --json inf.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, os, sys, time
if ARGS["mallopt"]:
    from lamost_ostar.scan import tune_malloc
    tune_malloc()
t0 = time.perf_counter()
import numpy as np
from lamost_ostar.stage import OStarStage
stage = OStarStage(model_version=ARGS["model"], engine=ARGS["engine"], device="cpu",
                   batch_size=ARGS["batch_size"])
t_ready = time.perf_counter() - t0

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

rss_ready = rss_mb()
x = np.load(ARGS["inputs"])
b = ARGS["batch_size"]
t = time.perf_counter(); p_first = stage.predict_proba(x[:b]); t_first = time.perf_counter() - t
times = []
for r in range(ARGS["repeats"]):
    i = (r * b) % max(1, len(x) - b + 1)
    t = time.perf_counter(); stage.predict_proba(x[i:i + b]); times.append((time.perf_counter() - t) / b * 1e3)
probs = stage.predict_proba(x)
np.save(ARGS["out"], probs[:, stage._o_index])
print(json.dumps({"engine": stage.engine, "startup_s": t_ready, "first_batch_s": t_first,
                  "rss_mb_ready": rss_ready, "rss_mb_after": rss_mb(),
                  "ms_per_spectrum_median": float(np.median(times)),
                  "ms_per_spectrum_best": float(np.min(times)),
                  "keras_imported": "keras" in sys.modules,
                  "tensorflow_imported": "tensorflow" in sys.modules}))
"""


def _inputs(args: argparse.Namespace, path: str) -> str:
    import numpy as np

    from lamost_ostar.models.registry import load_model

    card = load_model(args.model, engine="numpy").card
    npix, channels = int(card["npix"]), int(card.get("input_shape", [0, 1])[-1])
    if args.files:
        from lamost_ostar.io import read_spectra
        from lamost_ostar.preprocess import model_input, prepare
        from lamost_ostar.scan import iter_paths

        paths = []
        for p in iter_paths([args.files]):
            paths.append(p)
            if len(paths) >= args.n:
                break
        spectra = read_spectra(paths).spectra
        x = model_input(prepare(spectra, continuum=channels == 2), channels=channels)
        what = f"{len(x)} prepared spectra of the first {len(paths)} files of {args.files}"
    else:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(args.n, npix, channels)).astype(np.float32)
        x[..., 0] /= np.linalg.norm(x[..., 0], axis=1, keepdims=True)
        if channels == 2:
            x[..., 1] = 1 + 0.05 * x[..., 1]
        what = f"{args.n} random spectra-like inputs"
    np.save(path, np.asarray(x, np.float32))
    return what


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model version [the packaged default]")
    ap.add_argument("--files", default=None, help="release directory or @list for real inputs")
    ap.add_argument("--n", type=int, default=1024, help="inputs (files read when --files)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=8, help="timed batches per engine and round")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two engines")
    ap.add_argument("--threads", type=int, default=1,
                    help="OpenBLAS / TensorFlow intra-op threads of each engine's process")
    ap.add_argument("--engines", default="numpy,keras")
    ap.add_argument("--mallopt", action="store_true",
                    help="apply the scan workers' malloc settings (scan.tune_malloc) in each engine's process")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import numpy as np

    engines = [e for e in args.engines.split(",") if e]
    report: dict = {"model": args.model, "threads": args.threads, "batch_size": args.batch_size,
                    "mallopt": args.mallopt,
                    "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = os.path.join(tmp, "x.npy")
        report["inputs"] = _inputs(args, inputs)
        print(f"inputs: {report['inputs']}; {args.threads} thread(s) per engine; "
              f"load average {os.getloadavg()}")
        env = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
               "TF_NUM_INTRAOP_THREADS": str(args.threads), "TF_NUM_INTEROP_THREADS": "1",
               "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
        p_o: dict[str, np.ndarray] = {}
        for rnd in range(args.rounds):
            for engine in engines:
                out = os.path.join(tmp, f"p_{engine}.npy")
                child_args = {"model": args.model, "engine": engine, "batch_size": args.batch_size,
                              "mallopt": args.mallopt,
                              "repeats": args.repeats, "inputs": inputs, "out": out}
                code = f"ARGS = {child_args!r}\n" + _CHILD
                res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
                if res.returncode != 0:
                    print(res.stderr[-3000:], file=sys.stderr)
                    return 1
                row = json.loads(res.stdout.strip().splitlines()[-1])
                row["round"] = rnd
                report["runs"].append(row)
                p_o[engine] = np.load(out)
                print(f"round {rnd} {engine:>5}: start-up {row['startup_s']:.2f} s, RSS {row['rss_mb_ready']:.0f} -> "
                      f"{row['rss_mb_after']:.0f} MB, first batch {row['first_batch_s']:.2f} s, "
                      f"{row['ms_per_spectrum_median']:.3f} ms/spectrum (best {row['ms_per_spectrum_best']:.3f})"
                      f"{'  [Keras imported]' if row['keras_imported'] else ''}")
        if len(p_o) == 2:
            a, b = p_o.values()
            report["max_abs_diff_p_o"] = float(np.max(np.abs(a - b)))
            print(f"largest |p(O) difference| between the engines: {report['max_abs_diff_p_o']:.2e}")
    report["load_avg_end"] = os.getloadavg()
    print(f"load average at the end {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
