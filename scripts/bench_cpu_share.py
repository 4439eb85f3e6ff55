#!/usr/bin/env python
"""Where the two cores go during a scan: CPU of every process and thread, sampled from /proc.

Usage::

    python scripts/bench_cpu_share.py /work/runs/mock10k [--workers 2] [--interval 0.5]
        [--json out.json] [-- extra lamost-ostar scan options]

Runs ``lamost-ostar scan RELEASE --db TMP --workers N --no-progress`` and, every
``--interval`` seconds, reads the CPU time (user + system) of each thread of
the scan's process tree from ``/proc/<pid>/task/<tid>/stat`` (Linux only).
Processes are named by role: ``client`` (the ``lamost-ostar`` process; a
local cluster's scheduler and nannies run in it), ``worker`` (the processes the
nannies spawn) and ``tracker`` (multiprocessing's resource tracker); threads by
their kernel name (``comm``).

The **steady window** runs from the first sample at which every worker process
has a thread other than its main thread (the task thread, not the event loop
that also imports and unpickles at start-up) over half a core, to the last one
at which any worker still does.
Printed: the cores used in that window by each role and by its busiest
threads, the window's share of the machine (cores in use / ``os.cpu_count()``),
and the whole run's totals.  What the scan's workers do not get of the two
cores is here: another process, another thread, or idle.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench_scan_env import _proc, _tree  # a process's CPU and the scan's process tree (/proc)

TICK = os.sysconf("SC_CLK_TCK")
TOTAL = "__process__"  # a snapshot's key for the whole process's CPU


def _role(pid: int, root: int) -> str:
    if pid == root:
        return "client"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    if "resource_tracker" in cmd:
        return "tracker"
    if "spawn_main" in cmd:  # a local cluster's nannies (in the client) spawn the workers
        return "worker"
    return "other"


def _threads(pid: int) -> dict[str, float]:
    """CPU seconds per thread (``comm/tid``) of one process."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        out[f"{comm}/{tid}"] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def _process_cpu(pid: int) -> float:
    """CPU seconds of a whole process, its finished threads included."""
    p = _proc(pid)
    return 0.0 if p is None else p["utime"] + p["stime"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--timeline", action="store_true",
                    help="also print the cores used by each role in every sampling interval")
    ap.add_argument("extra", nargs="*", help="more `lamost-ostar scan` options (after --)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["lamost-ostar", "scan", args.release, "--db", os.path.join(tmp, "s.sqlite"),
               "--workers", str(args.workers), "--no-progress", *args.extra]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        samples = []  # (t, {pid: (role, {thread: cpu})})
        roles: dict[int, str] = {}
        while proc.poll() is None:
            snap = {}
            for pid in _tree(proc.pid):
                if roles.get(pid, "other") in ("other", "gone"):  # until its exec has named it
                    roles[pid] = _role(pid, proc.pid)
                th = _threads(pid)
                th[TOTAL] = _process_cpu(pid)
                snap[pid] = (roles[pid], th)
            samples.append((time.perf_counter() - t0, snap))
            time.sleep(args.interval)
        out = proc.stdout.read()
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(out)
        raise SystemExit(f"the scan failed (exit {proc.returncode})")

    def role_cpu(snap: dict, role: str) -> dict[int, float]:
        return {pid: th[TOTAL] for pid, (r, th) in snap.items() if r == role}

    def task_rate(pid: int, a: dict, b: dict, dt: float) -> float:
        """The busiest non-main thread of a worker between two samples (cores)."""
        before, after = a.get(pid, ("", {}))[1], b[pid][1]
        return max([(cpu - before.get(name, 0.0)) / dt for name, cpu in after.items()
                    if name != TOTAL and not name.endswith(f"/{pid}")] or [0.0])

    # steady window: every worker's task thread over half a core between consecutive samples
    # (not its process: at start-up the main thread imports and unpickles while no task runs)
    busy = []
    for (ta, a), (tb, b) in zip(samples, samples[1:]):
        rates = [task_rate(p, a, b, tb - ta) for p in role_cpu(b, "worker")]
        busy.append((ta, tb, len(rates) == args.workers and min(rates) > 0.5,
                     bool(rates) and max(rates) > 0.5))
    starts = [i for i, (_, _, every, _) in enumerate(busy) if every]
    if not starts:
        print(out)
        raise SystemExit("no sample with every worker busy: the scan was too short for the interval")
    i0 = starts[0]
    i1 = max(i for i, (*_, anyb) in enumerate(busy) if anyb) + 1
    (ta, a), (tb, b) = samples[i0], samples[i1]
    span = tb - ta

    per_thread: dict[tuple[str, str], float] = {}
    per_role: dict[str, float] = {}
    for pid, (role, th) in b.items():
        before = a.get(pid, (role, {}))[1]
        for name, cpu in th.items():
            d = cpu - before.get(name, 0.0)
            if name == TOTAL:
                per_role[role] = per_role.get(role, 0.0) + d
            else:
                per_thread[(f"{role}:{pid}", name)] = d
    used = sum(per_role.values())
    ncpu = os.cpu_count() or 1
    print(out.strip().splitlines()[-1] if out.strip() else "")
    print(f"steady window {ta:.1f}-{tb:.1f} s of {wall:.1f} s ({span:.1f} s): cores in use "
          f"{used / span:.2f} of {ncpu} ({100 * used / span / ncpu:.1f} %)")
    for role, cpu in sorted(per_role.items(), key=lambda kv: -kv[1]):
        print(f"  {role:8s} {cpu / span:5.2f} cores")
    print("  busiest threads (cores):")
    for (who, name), cpu in sorted(per_thread.items(), key=lambda kv: -kv[1])[:14]:
        if cpu / span >= 0.002:
            print(f"    {who:16s} {name:18s} {cpu / span:6.3f}")
    last: dict[int, float] = {}  # each process's last sample (the workers exit before the client)
    for _, snap in samples:
        for pid, (_, th) in snap.items():
            last[pid] = th[TOTAL]
    total = {r: sum(c for pid, c in last.items() if roles[pid] == r) for r in set(roles.values())}
    if args.timeline:
        print("  timeline (s: cores by role):")
        for (t0s, a0), (t1s, b1) in zip(samples, samples[1:]):
            line = []
            for r in ("client", "worker"):
                ca, cb = role_cpu(a0, r), role_cpu(b1, r)
                line.append(f"{r} " + "+".join(f"{(cb[p] - ca.get(p, 0.0)) / (t1s - t0s):.2f}"
                                              for p in sorted(cb)))
            print(f"    {t0s:5.2f}-{t1s:5.2f}  " + "  ".join(line))
    print("  whole run, CPU s: " + ", ".join(f"{r} {v:.1f}" for r, v in sorted(total.items())))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"release": args.release, "workers": args.workers, "wall_s": wall,
                       "window": [ta, tb], "cores_by_role": {r: c / span for r, c in per_role.items()},
                       "cores_by_thread": {f"{w} {n}": c / span for (w, n), c in per_thread.items()},
                       "cpu_s_whole_run": total, "scan_output": out}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
