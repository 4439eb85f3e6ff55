#!/usr/bin/env python
"""Where a scan's start-up goes: local cluster, Keras import, model load, first inference.

Usage::

    python scripts/startup_breakdown.py [--workers 2] [--repeat 2]

Starts the scan's local cluster (:func:`lamost_ostar.scan.make_client`, so the
workers get the scan's environment: lean Keras import, TensorFlow threads), and
in every worker at once times: ``stage.import_keras()``, building
:class:`~lamost_ostar.stage.OStarStage` (default model), the first
``predict_proba`` of a 256-spectrum batch (traces the inference step) and a
second one.  Prints seconds per step and worker.
"""
from __future__ import annotations

import argparse
import time


def _in_worker() -> dict:
    import os

    import numpy as np

    t0 = time.perf_counter()
    from lamost_ostar.stage import import_keras

    import_keras()
    t1 = time.perf_counter()
    from lamost_ostar.stage import OStarStage

    stage = OStarStage(device="cpu")
    t2 = time.perf_counter()
    x = np.zeros((256, 3921, stage.channels), np.float32)
    stage.predict_proba(x)
    t3 = time.perf_counter()
    stage.predict_proba(x)
    t4 = time.perf_counter()
    return {"lean": os.environ.get("LAMOST_OSTAR_LEAN_KERAS"), "import_keras_s": round(t1 - t0, 2),
            "model_load_s": round(t2 - t1, 2), "first_predict_s": round(t3 - t2, 2),
            "second_predict_s": round(t4 - t3, 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        from lamost_ostar.scan import make_client

        t1 = time.perf_counter()
        client, cluster = make_client(n_workers=args.workers)
        t2 = time.perf_counter()
        per_worker = client.run(_in_worker)
        t3 = time.perf_counter()
        print(f"import lamost_ostar.scan {t1 - t0:.2f} s, local cluster {t2 - t1:.2f} s, "
              f"workers' steps (in parallel) {t3 - t2:.2f} s")
        for addr, d in per_worker.items():
            print(f"  {addr}: {d}")
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
