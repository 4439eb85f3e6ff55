#!/usr/bin/env python
"""Alternating 2-worker scans under environment variants: rate, CPU, page faults of the workers.

Usage::

    python scripts/bench_scan_env.py /work/runs/mock10k [--rounds 4] [--workers 2]
        [--variant NAME=VAR=VALUE[,VAR=VALUE...]] ... [--json out.json] [-- scan options]

Each round runs ``lamost-ostar scan RELEASE --db TMP --workers N --no-progress``
once per variant (default: ``default`` and ``arena1=MALLOC_ARENA_MAX=1``), one
after the other, into a fresh SQLite file, with the variant's variables added
to the environment (a local cluster's workers inherit it).  While a scan runs
its process tree is sampled every 0.2 s from ``/proc`` (Linux only): the last
sample of each worker process gives its user and system CPU time and its minor
page faults (a worker that starts and ends between two samples is missed: the
count of worker processes sampled is printed).  Printed per scan: the scan's own steady rate and worker CPU per
file (its summary), the workers' user and system seconds and minor faults per
file read.  Compare within a round: the machine drifts between rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

TICK = os.sysconf("SC_CLK_TCK")


def _tree(root: int) -> list[int]:
    """``root`` and its descendants, from every process's parent in ``/proc/<pid>/stat``
    (the kernel's ``children`` lists are not reliable for running processes)."""
    parent: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parent.setdefault(ppid, []).append(int(entry))
    seen, todo = [], [root]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += parent.get(p, [])
    return seen


def _proc(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().decode(errors="replace")
    except (OSError, IndexError):
        return None
    return {"worker": "spawn_main" in cmd, "minflt": int(f[7]),
            "utime": int(f[11]) / TICK, "stime": int(f[12]) / TICK}


def _scan(release: str, workers: int, env: dict[str, str], extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["lamost-ostar", "scan", release, "--db", os.path.join(tmp, "s.sqlite"),
               "--workers", str(workers), "--no-progress", *extra]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, **env})
        last: dict[int, dict] = {}
        while p.poll() is None:
            for pid in _tree(p.pid):
                s = _proc(pid)
                if s is not None:  # a worker stays one: before its exec and as a zombie it has
                    # no spawn_main command line
                    last[pid] = {**s, "worker": s["worker"] or last.get(pid, {}).get("worker", False)}
            time.sleep(0.2)
        out = p.stdout.read()
    if p.returncode != 0:
        raise SystemExit(f"scan failed (exit {p.returncode}):\n{out}")
    steady = re.search(r"\(([\d.]+)/s after start-up", out)
    cpu = re.search(r"worker CPU\s+([\d.]+) ms per file", out)
    seen = re.search(r"files seen\s+([\d,]+)", out)
    n = int(seen.group(1).replace(",", "")) if seen else 0
    w = [s for s in last.values() if s["worker"]]
    return {"steady": float(steady.group(1)) if steady else None,
            "worker_cpu_ms_per_file": float(cpu.group(1)) if cpu else None,
            "workers_user_s": sum(s["utime"] for s in w), "workers_sys_s": sum(s["stime"] for s in w),
            "workers_minflt_per_file": sum(s["minflt"] for s in w) / max(n, 1), "files": n,
            "worker_processes": len(w)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--variant", action="append", default=None,
                    help="NAME or NAME=VAR=VALUE[,VAR=VALUE...] (repeatable)")
    ap.add_argument("--json", default=None)
    ap.add_argument("extra", nargs="*", help="more `lamost-ostar scan` options (after --)")
    args = ap.parse_args(argv)
    variants: dict[str, dict[str, str]] = {}
    for v in args.variant or ["default", "arena1=MALLOC_ARENA_MAX=1"]:
        name, _, assigns = v.partition("=")
        variants[name] = dict(a.split("=", 1) for a in assigns.split(",") if a)
    rows = []
    for r in range(args.rounds):
        for name, env in variants.items():
            got = _scan(args.release, args.workers, env, args.extra)
            rows.append({"round": r + 1, "variant": name, "env": env, **got})
            print(f"round {r + 1} {name:10s} steady {got['steady']:7.1f}/s  worker CPU "
                  f"{got['worker_cpu_ms_per_file']:.3f} ms/file  workers user {got['workers_user_s']:.2f} s "
                  f"sys {got['workers_sys_s']:.2f} s  minor faults {got['workers_minflt_per_file']:.1f}/file"
                  f"  ({got['worker_processes']} worker processes sampled)",
                  flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"release": args.release, "workers": args.workers, "extra": args.extra,
                       "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
