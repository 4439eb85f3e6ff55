#!/usr/bin/env python
"""Summarise a py-spy profile (collapsed stacks) of a scan: where the worker's time goes.

Usage::

    py-spy record --format raw -r 200 --subprocesses -o runs/scan.folded -- \\
        lamost-ostar scan runs/mock10k --db runs/prof.sqlite --workers 2
    python scripts/profile_summary.py runs/scan.folded [--top 25] [--md]

Prints, over the samples of the scan's worker processes (stacks that pass
through :func:`lamost_ostar.scan.process_partition`), the share of samples
spent *inside* each pipeline step (inclusive: reading, preprocessing, the
model, the line measurements, building result records, the sink's write) and
the functions with the most samples of their own (self time).  ``--md`` prints
Markdown tables for ``reports/performance.md``.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

#: optional class prefix of a py-spy frame ("OStarStage.predict_proba (stage.py:1002)")
_M = r"(?:\w+\.)?"

#: pipeline steps: (label, regex on a frame "function (file:line)"[, "own"]); a step is counted
#: in a stack when any of its frames matches, or, with "own", when its deepest lamost_ostar
#: frame does (time in that function's own lines and in non-project code it calls: numpy,
#: a dataclass __init__)
STEPS: tuple[tuple[str, ...], ...] = (
    ("start-up in the worker (imports, model load)", rf"^{_M}(get_stage|load_model) \("),
    ("read files (io: fitsio + header + checks)", rf"^{_M}read_items \(.*stage\.py"),
    ("  of which fitsio / cfitsio", r"fitsio/fitslib\.py|fitsio/hdu/"),
    ("stage: preprocess (resample, standardise, continuum)", rf"^{_M}(prepare|_finish|resample) \(.*preprocess\.py"),
    ("  of which the continuum channel", rf"^{_M}normalise \(.*preprocess\.py"),
    ("stage: model inference (Keras predict_proba)", rf"^{_M}predict_proba \(.*(stage|registry)\.py"),
    ("  of which compiling (tf.function tracing)", r"^trace_function \(|^_maybe_define_function \("),
    ("stage: He II / line measurements", rf"^{_M}measure_lines \(.*lines\.py"),
    ("stage: decision", rf"^{_M}apply \(.*decision\.py"),
    ("stage: result records (per spectrum)",
     rf"^{_M}(_classify|evidence_records|spectrum_metadata|failure) \(.*stage\.py", "own"),
    ("sink: write results (SQLAlchemy)", rf"^{_M}write \(.*(catalogue|parquet)\.py"),
    ("sink: resume check (done_paths)", rf"^{_M}done_paths \("),
)


def load(path: Path) -> Counter:
    """Collapsed stacks ``frame;frame;... count`` -> Counter of stack tuples."""
    stacks: Counter = Counter()
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, n = line.rpartition(" ")
        try:
            stacks[tuple(stack.split(";"))] += int(n)
        except ValueError:
            continue
    return stacks


def _deepest_own(stack: tuple[str, ...]) -> str:
    """The deepest frame of ``stack`` in the project's own code (``lamost_ostar/``)."""
    for frame in reversed(stack):
        if "lamost_ostar/" in frame:
            return frame
    return ""


def summarise(stacks: Counter, top: int = 25) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(worker samples, [(step, samples)], [(function, self samples)])."""
    worker = Counter({s: n for s, n in stacks.items() if any("process_partition" in f for f in s)})
    total = sum(worker.values())
    steps = []
    for label, pattern, *where in STEPS:
        rx = re.compile(pattern)
        if where == ["own"]:
            n_step = sum(n for s, n in worker.items() if rx.search(_deepest_own(s)))
        else:
            n_step = sum(n for s, n in worker.items() if any(rx.search(f) for f in s))
        steps.append((label, n_step))
    own: Counter = Counter()
    for s, n in worker.items():
        own[re.sub(r"\s+\(", " (", s[-1])] += n
    return total, steps, own.most_common(top)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--md", action="store_true")
    args = ap.parse_args(argv)
    stacks = load(args.profile)
    total, steps, own = summarise(stacks, args.top)
    all_samples = sum(stacks.values())
    if not total:
        raise SystemExit("no worker samples (no stack passes through process_partition)")
    if args.md:
        print(f"{total} worker samples of {all_samples} in all.\n")
        print("| step (inclusive) | share of worker samples |\n|---|---|")
        for label, n in steps:
            print(f"| {label.strip()} | {100 * n / total:.1f} % |")
        print("\n| function (self time) | share |\n|---|---|")
        for f, n in own:
            print(f"| `{f}` | {100 * n / total:.1f} % |")
        return
    print(f"worker samples: {total} of {all_samples}")
    for label, n in steps:
        print(f"  {label:<58} {100 * n / total:5.1f} %")
    print("self time:")
    for f, n in own:
        print(f"  {100 * n / total:5.1f} %  {f}")


if __name__ == "__main__":
    main()
