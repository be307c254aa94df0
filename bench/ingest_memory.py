"""Peak memory of `kocr prepare-aihub` at 1,000 and 10,000 pages: it must not grow with the input.

A few pages are generated once; the larger sources are made of many names for them (each page JSON
rewritten under a new name, its image a symbolic link), so making 10,000 pages costs seconds. Each
size runs ``prepare_pages`` in a fresh process while a sampler sums the resident memory of that
process and of every process under it (the cropping workers) every 0.1 s.

    .venv/bin/python bench/ingest_memory.py --sizes 1000 10000 --workers 2

Prints JSON: per size, pages, crops, seconds, peak RSS of the main process and of the whole tree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from training.data.pages import read_page, write_page
from training.data.synth_pages import generate_pages

RUN = """
import json, sys
from training.data.prepare import PrepareConfig, prepare_pages
if __name__ == "__main__":
    report = prepare_pages(sys.argv[1], sys.argv[2], PrepareConfig(workers=int(sys.argv[3])), progress=False)
    print(json.dumps({"pages": report["pages_used"], "crops": sum(report["crops"].values())}))
"""


def make_source(seed_pages: Path, out: Path, count: int) -> Path:
    """``count`` page names cycling over the generated pages: JSON copies, images as symbolic links."""
    seeds = sorted(seed_pages.glob("page_*.json"))
    out.mkdir(parents=True)
    for i in range(count):
        seed = seeds[i % len(seeds)]
        page = read_page(seed)
        page.image_name = f"doc_{i:06d}.jpg"
        write_page(page, out / f"doc_{i:06d}.json")
        os.symlink(seed.with_suffix(".jpg").resolve(), out / page.image_name)
    return out


def _tree_rss(root: int) -> tuple[int, int]:
    """(RSS of ``root``, RSS of ``root`` and all its descendants) in bytes, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry)] = int(stat[1])
            rss[int(entry)] = int(stat[21]) * page
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid and p not in tree]
        tree.update(children)
        frontier += children
    return rss.get(root, 0), sum(rss.get(p, 0) for p in tree)


def measure(src: Path, out: Path, workers: int) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(src), str(out), str(workers)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    peak = [0, 0]

    def sample() -> None:
        while proc.poll() is None:
            main, tree = _tree_rss(proc.pid)
            peak[0], peak[1] = max(peak[0], main), max(peak[1], tree)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, _ = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_main_mb": round(peak[0] / 2**20), "peak_rss_all_processes_mb": round(peak[1] / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed-pages", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        seeds = Path(tmp) / "seeds"
        generate_pages(seeds, count=args.seed_pages, seed=0, fonts=["NanumGothic.ttf", "NanumPen.ttf"],
                       progress=False)
        results = {}
        for size in args.sizes:
            src = make_source(seeds, Path(tmp) / f"src{size}", size)
            results[size] = measure(src, Path(tmp) / f"out{size}", args.workers)
        print(json.dumps({"workers": args.workers, "machine_cpus": os.cpu_count(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
