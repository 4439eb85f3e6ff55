#!/usr/bin/env python
"""The same model files under every installed Keras backend: same probabilities?

Usage::

    python scripts/check_backends.py [--backends tensorflow,jax,torch] [--models V1,V2]
        [--n 2000] [--out reports/backends.json]

For each backend a fresh Python process (``KERAS_BACKEND=<name>``) loads every
packaged model version (or ``--models``), classifies the real LAMOST fixture
files of ``tests/data`` (read and prepared with this package, so every backend
sees the same input), times ``predict_proba`` on ``--n`` copies of them, and
runs the LCGAN generator (``LocallyConnected1D``) and the SGAN generator with
weights saved by the first backend.  The parent compares every backend's
probabilities with TensorFlow's (max |difference|) and prints a table; a
backend that is not installed is listed as such.  Runs on CPU (the device a
backend finds: set ``CUDA_VISIBLE_DEVICES`` for GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = ["io_image_dr7.fits", "io_image_dr6.fits.gz", "io_dr1_gzip.fits", "io_coadd_dr9.fits.gz",
            "io_nan_few.fits.gz"]


def child(args: argparse.Namespace) -> None:
    """Run in a process with KERAS_BACKEND set: write a JSON of outputs and timings."""
    import time

    import keras
    import numpy as np

    from lamost_ostar.io import read_spectrum
    from lamost_ostar.models import gan
    from lamost_ostar.models.registry import PACKAGED_MODELS_DIR, list_versions, load_model
    from lamost_ostar.preprocess import model_input, prepare

    out: dict = {"backend": keras.backend.backend(), "keras": keras.__version__, "models": {}}
    spectra = [read_spectrum(str(REPO / "tests" / "data" / n)) for n in FIXTURES]
    prep = prepare(spectra, continuum=True)
    versions = args.models.split(",") if args.models else \
        [v["version"] for v in list_versions(PACKAGED_MODELS_DIR)]
    for v in versions:
        bundle = load_model(v)
        x = model_input(prep, bundle.channels)
        probs = np.asarray(bundle.predict_proba(x))
        big = np.repeat(x, max(1, args.n // len(x)), axis=0)
        bundle.predict_proba(big[:256])                                   # warm-up / compile
        t0 = time.perf_counter()
        bundle.predict_proba(big)
        dt = time.perf_counter() - t0
        out["models"][v] = {"probs": probs.tolist(), "spectra_per_s": len(big) / dt, "n": len(big)}
    weights = Path(args.gan_weights)
    for name, make in (("lcgan", gan.build_lcgan_generator), ("sgan", gan.build_sgan_generator)):
        g = make(npix=256, latent_dim=32)
        path = weights / f"{name}.weights.h5"
        if path.exists():
            g.load_weights(path)
        else:
            g.save_weights(path)
        z = np.random.default_rng(0).normal(size=(4, 32)).astype("float32")
        out["models"][f"{name} generator (npix 256)"] = {
            "probs": keras.ops.convert_to_numpy(g(z, training=False)).reshape(4, -1).tolist()}
    Path(args.child_out).write_text(json.dumps(out))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="tensorflow,jax,torch")
    ap.add_argument("--models", default=None, help="comma-separated model versions (default: every packaged one)")
    ap.add_argument("--n", type=int, default=2000, help="spectra per timing")
    ap.add_argument("--out", type=Path, default=None, help="write the comparison as JSON")
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gan-weights", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_out:
        child(args)
        return
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.backends.split(","):
            env = dict(os.environ, KERAS_BACKEND=b, TF_CPP_MIN_LOG_LEVEL="3")
            target = Path(tmp) / f"{b}.json"
            cmd = [sys.executable, __file__, "--child-out", str(target), "--gan-weights", tmp, "--n", str(args.n)]
            if args.models:
                cmd += ["--models", args.models]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if run.returncode != 0 or not target.exists():
                last = (run.stderr.strip().splitlines() or ["?"])[-1]
                results[b] = {"error": last}
                continue
            results[b] = json.loads(target.read_text())
    import numpy as np

    ref = results.get("tensorflow", {}).get("models", {})
    rows = []
    for b, r in results.items():
        if "error" in r:
            rows.append(f"{b:<11} not run: {r['error']}")
            continue
        for m, v in r["models"].items():
            diff = (float(np.max(np.abs(np.asarray(v["probs"]) - np.asarray(ref[m]["probs"]))))
                    if m in ref else float("nan"))
            rate = f"{v['spectra_per_s']:>10.0f}" if "spectra_per_s" in v else f"{'-':>10}"
            rows.append(f"{b:<11} {m:<40} max|diff vs tensorflow| {diff:.2e}   spectra/s {rate}")
    print("\n".join(rows))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
