"""Crops/s of `kocr prepare-aihub` (1 and N processes) against what users run today, on the same pages.

The reference is the users' two-step recipe, written here from its description: one process opens
each page with PIL, crops every box and saves it as a PNG into a folder with a gt.txt, then a
deep-text-recognition-benchmark-style ``create_lmdb_dataset`` reads those PNGs back (checking
each decodes) into one LMDB. Ours: ``prepare_pages`` with ``workers`` 1 and N, sharded LMDB.

    .venv/bin/python bench/ingest_vs_reference.py --pages 40 --width 1654 --height 2339

Prints JSON: crops, seconds and crops/s of each side, the ratios to the reference, the extrapolated
time for 4.5 million crops on a 16-core server (see ``extrapolate``), and ``parallel_headroom``: the
speed-up N processes get on a pure-CPU loop at the same moment (on a shared machine, the ceiling).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import lmdb
import numpy as np
from PIL import Image

from training.data.prepare import PrepareConfig, prepare_pages
from training.data.synth_pages import generate_pages

FONTS = ["NanumGothic.ttf", "NanumMyeongjo.ttf", "NanumPen.ttf"]
TARGET_CROPS = 4_500_000
SERVER_CORES = 16


def reference_crops(src: Path, work: Path) -> Path:
    """Step 1 of the users' recipe: PIL open, crop each box, save each crop as PNG; returns gt.txt."""
    crops = work / "crops"
    crops.mkdir(parents=True)
    lines = []
    for json_path in sorted(src.glob("*.json")):
        data = json.loads(json_path.read_text(encoding="utf-8"))
        image = Image.open(src / data["images"][0]["image.file.name"])
        for i, ann in enumerate(data["annotations"]):
            x, y, w, h = ann["annotation.bbox"]
            name = f"{json_path.stem}_{i:04d}.png"
            image.crop((max(0, x), max(0, y), x + w, y + h)).save(crops / name)
            lines.append(f"crops/{name}\t{ann['annotation.text']}")
    gt = work / "gt.txt"
    gt.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return gt


def _valid(image_bin: bytes) -> bool:
    image = cv2.imdecode(np.frombuffer(image_bin, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    return image is not None and image.shape[0] * image.shape[1] > 0


def create_lmdb_dataset(root: Path, gt_file: Path, out: Path) -> int:
    """Step 2, DTRB style: read every listed PNG back, check it decodes, write image/label keys in batches."""
    env = lmdb.open(str(out), map_size=1 << 36)
    cache: dict[bytes, bytes] = {}
    count = 1
    for line in gt_file.read_text(encoding="utf-8").splitlines():
        path, label = line.split("\t", 1)
        image_bin = (root / path).read_bytes()
        if not _valid(image_bin):
            continue
        cache[b"image-%09d" % count] = image_bin
        cache[b"label-%09d" % count] = label.encode()
        if count % 1000 == 0:
            with env.begin(write=True) as txn:
                for k, v in cache.items():
                    txn.put(k, v)
            cache = {}
        count += 1
    cache[b"num-samples"] = str(count - 1).encode()
    with env.begin(write=True) as txn:
        for k, v in cache.items():
            txn.put(k, v)
    env.close()
    return count - 1


def run_reference(src: Path, work: Path) -> tuple[int, float]:
    start = time.perf_counter()
    gt = reference_crops(src, work)
    crops = create_lmdb_dataset(work, gt, work / "lmdb")
    return crops, time.perf_counter() - start


def run_ours(src: Path, out: Path, workers: int) -> tuple[int, float, float]:
    """(crops, wall seconds, CPU seconds of the calling process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    report = prepare_pages(src, out, PrepareConfig(workers=workers, val_fraction=0.0, test_fraction=0.0),
                           progress=False)
    return sum(report["crops"].values()), time.perf_counter() - wall, time.process_time() - cpu


def _burn(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def parallel_headroom(workers: int, n: int = 10_000_000) -> float:
    """How much faster ``workers`` processes finish a pure-CPU loop than one process, right now: on a
    shared machine other users' load caps any parallel speed-up at this figure."""
    from concurrent.futures import ProcessPoolExecutor

    start = time.perf_counter()
    for _ in range(workers):
        _burn(n)
    serial = time.perf_counter() - start
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_burn, [1000] * workers))
        start = time.perf_counter()
        list(pool.map(_burn, [n] * workers))
    return round(serial / (time.perf_counter() - start), 2)


def extrapolate(one_rate: float, writer_cpu_per_crop: float, cores: int = SERVER_CORES) -> dict[str, float]:
    """Time for TARGET_CROPS on ``cores``: cores-1 cropping processes at the 1-process rate (which
    already includes writing, so conservative), capped by the one writer's CPU per crop."""
    rate = min((cores - 1) * one_rate, 1.0 / writer_cpu_per_crop if writer_cpu_per_crop > 0 else float("inf"))
    return {"cores": cores, "crops_per_s": round(rate), "minutes_for_4_5M": round(TARGET_CROPS / rate / 60, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", help="existing page folder (flat); default: generate pages")
    parser.add_argument("--pages", type=int, default=40)
    parser.add_argument("--width", type=int, default=1654)   # A4 at 200 dpi
    parser.add_argument("--height", type=int, default=2339)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", help="folder to keep generated pages in (reused when present)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(args.src or args.keep or Path(tmp) / "pages")
        if not args.src and not any(src.glob("*.json")):
            generate_pages(src, count=args.pages, seed=0, fonts=FONTS, width=args.width, height=args.height,
                           font_size=(24, 40), progress=False)
        if not any(src.glob("*.json")):
            parser.error(f"--src {src}: no page JSON there (a flat folder of page_*.json and their images)")
        for path in src.glob("*"):  # warm the page cache so neither side pays the first read
            if path.is_file():
                path.read_bytes()
        results: dict[str, dict[str, float]] = {}
        crops, reference_seconds = run_reference(src, Path(tmp) / "reference")
        results["reference"] = {"crops": crops, "seconds": round(reference_seconds, 2),
                                "crops_per_s": round(crops / reference_seconds)}
        cpu_per_crop = 0.0
        for workers in sorted({1, args.workers}):
            out = Path(tmp) / f"ours{workers}"
            crops, seconds, cpu = run_ours(src, out, workers)
            shutil.rmtree(out)
            results[f"kocr_{workers}p"] = {"crops": crops, "seconds": round(seconds, 2),
                                           "crops_per_s": round(crops / seconds),
                                           "ratio_to_reference": float(f"{reference_seconds / seconds:.3g}")}  # unrounded times, 3 digits
            if workers > 1:
                cpu_per_crop = cpu / crops
        one = results["kocr_1p"]["crops_per_s"]
        print(json.dumps({"pages": len(list(src.glob("*.json"))), "machine_cpus": os.cpu_count(),
                          "parallel_headroom": parallel_headroom(args.workers), "load_average": os.getloadavg(),
                          "results": results, "writer_cpu_ms_per_crop": round(cpu_per_crop * 1e3, 3),
                          "extrapolation": extrapolate(one, cpu_per_crop),
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024},
                         indent=1))


if __name__ == "__main__":
    main()
