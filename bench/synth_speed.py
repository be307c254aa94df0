"""Word images per second of `kocr synth-lines` (render, degrade, encode, LMDB write) by worker count.

Uses the ``synth_lines:`` section of params.yaml with ``--count`` and each ``--workers`` value; fonts
and the lexicon are loaded once in this process before timing; the render workers (forkserver) load
their own, about a second, so the figure is the generation rate including the process pool's start. Also checks that every worker count
wrote the same set (sha256 of data.mdb).

    .venv/bin/python bench/synth_speed.py --count 5000 --workers 1 2

Prints one JSON object: images/s, seconds and CPU seconds (this process and its workers) per worker
count, the data.mdb digests, the machine's CPU count and load averages (the machine may be shared:
on a busy machine images per CPU second times the free cores is the better estimate).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import psutil

from kocr.params import load_params
from training.data.synth_lines import LinesConfig, _context, generate_lines


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its workers. The render workers are the forkserver's
    children (training.data.workers.start_pool), reaped by it, so RUSAGE_CHILDREN never sees them: their
    time is the forkserver's children time, read with its own while it runs."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    for child in psutil.Process().children():  # the forkserver and the resource tracker
        try:
            times = child.cpu_times()
        except psutil.Error:  # ended meanwhile
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--degrade", help="override synth_lines.degrade (off | mild | strong)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    params = load_params(required=False).get("synth_lines", {})
    report: dict = {"count": args.count, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0],
                    "degrade": args.degrade or params.get("degrade", "mild"), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            config = LinesConfig.from_params(params, count=args.count, seed=args.seed, workers=workers,
                                             contact_sheet=0, degrade=args.degrade)
            _context(config)  # fonts' glyph tables and the lexicon, outside the timing
            out = Path(tmp) / f"w{workers}"
            cpu0 = _cpu_seconds()
            start = time.perf_counter()
            generate_lines(out, config, progress=False)
            seconds = time.perf_counter() - start
            cpu = _cpu_seconds() - cpu0
            digest = hashlib.sha256((out / "data.mdb").read_bytes()).hexdigest()
            report["runs"][str(workers)] = {"seconds": round(seconds, 2),
                                            "images_per_s": round(args.count / seconds, 1),
                                            "cpu_seconds": round(cpu, 2),
                                            "images_per_cpu_s": round(args.count / cpu, 1),
                                            "data_mdb_sha256": digest[:16]}
    report["identical_across_workers"] = len({r["data_mdb_sha256"] for r in report["runs"].values()}) == 1
    report["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=1))
    if not report["identical_across_workers"]:  # the check the docs promise: one seed, one set
        raise SystemExit("synth_speed: the worker counts wrote different sets (data.mdb sha256 above)")


if __name__ == "__main__":
    main()
