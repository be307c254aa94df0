"""Tesseract's OpenMP threads: its default against ``OMP_THREAD_LIMIT=1``, on the same crops and pages.

Reads crops (the first ``--limit`` of each ``--labels`` file, as ``kocr evaluate-crops`` loads them) with
``read_crops_tesseract`` (``--batch`` crops to one tesseract process) and page images (``--pages``:
files, or folders whose ``*.jpg``/``*.png`` are taken) with ``read_page_tesseract`` (``--psm 3``), each
way in this one process, the two ways alternating batch by batch and page by page (``--repeat`` rounds,
the first arm swapping each round) so that a shared machine's load falls on both alike, and checks
that both ways read the same texts (and the same word boxes on pages).

The tesseract child's environment is set here for both arms, whatever this process has: every
``OMP_*`` variable is taken out (``tests/conftest.py``, for one, sets ``OMP_NUM_THREADS=1``) and the
``limit`` arm alone gets ``OMP_THREAD_LIMIT=1``, so ``default`` is Tesseract's own threading.

    KOCR_PARAMS=recipes/ko-base/params.yaml kocr synth-lines --section synth_lines_heldout --count 128 --out /tmp/heldout
    python -m kocr.recipe export-crops /tmp/heldout --out /tmp/heldout_crops
    kocr synth-pages --out /tmp/pages --count 6
    .venv/bin/python bench/tesseract_threads.py --repeat 3 --labels /tmp/heldout_crops/labels.tsv \\
        ../shared/realdata/greengarnets_crops/labels.tsv ../shared/realdata/paddleocr/words.tsv \\
        --pages /tmp/pages ../shared/realdata/easyocr/korean.png ../shared/realdata/paddleocr/korean_1.jpg

Prints one JSON object: per mode (``crops``, ``pages``) and arm the wall seconds and the tesseract
processes' user and system CPU seconds, ``ratio`` (limit seconds / default seconds, from the unrounded
times: below 1 is faster with one thread) and ``cpu_ratio`` (the same of CPU seconds), the items read
differently, the machine's CPU count and load averages. Exit 1 when a reading differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.score_crops import load_crop, read_labels  # noqa: E402
from evaluation.tesseract import BATCH, read_crops_tesseract, read_page_tesseract, tesseract_available  # noqa: E402

ARMS = ("default", "limit")


def arm_env(arm: str) -> dict[str, str]:
    """The tesseract child's whole environment in ``arm``: this one without OMP_*, plus the limit in 'limit'."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    return {**env, "OMP_THREAD_LIMIT": "1"} if arm == "limit" else env


@contextlib.contextmanager
def tesseract_env(env: dict[str, str]) -> Iterator[None]:
    """Every ``tesseract`` subprocess started inside runs with ``env``, whatever env its caller passes."""
    real = subprocess.run

    def run(cmd, *args, **kwargs):
        if cmd and cmd[0] == "tesseract":
            kwargs["env"] = env
        return real(cmd, *args, **kwargs)

    subprocess.run = run
    try:
        yield
    finally:
        subprocess.run = real


def _children() -> tuple[float, float]:
    """User and system CPU seconds of this process's finished children (the tesseract processes)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime, kids.ru_stime


def compare(items: list, read: Callable, repeat: int) -> tuple[dict, list]:
    """Each item read in both arms ``repeat`` times, alternating; per-arm seconds and the first round's readings."""
    totals = {arm: [0.0, 0.0, 0.0] for arm in ARMS}
    readings: dict[str, list] = {arm: [] for arm in ARMS}
    for round_ in range(repeat):
        for item in items:
            for arm in (ARMS if round_ % 2 == 0 else ARMS[::-1]):
                user, system = _children()
                start = time.perf_counter()
                with tesseract_env(arm_env(arm)):
                    got = read(item)
                seconds = time.perf_counter() - start
                user2, system2 = _children()
                for i, add in enumerate((seconds, user2 - user, system2 - system)):
                    totals[arm][i] += add
                if round_ == 0:
                    readings[arm].append(got)
    report = {arm: {"seconds": round(s, 2), "user_cpu_seconds": round(u, 2), "sys_cpu_seconds": round(y, 2)}
              for arm, (s, u, y) in totals.items()}
    report["ratio"] = round(totals["limit"][0] / totals["default"][0], 3)
    report["cpu_ratio"] = round(sum(totals["limit"][1:]) / sum(totals["default"][1:]), 3)
    return report, [(i, a, b) for i, (a, b) in enumerate(zip(readings["default"], readings["limit"])) if a != b]


def page_files(paths: list[str]) -> list[Path]:
    """The page images named: files as given, folders' ``*.jpg`` and ``*.png`` (contact sheets left out)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                            and p.stem != "contact_sheet")
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"tesseract_threads: {path}: no such file or folder")
    return files


def _page_reading(path: Path) -> list:
    page = read_page_tesseract(path)
    return [(word.text, *word.bbox, word.score) for word in page.words]


def _page_difference(page: Path, default: list, limit: list) -> dict:
    """Where a page's two readings part: their word counts and the first word (text, box, confidence) apart."""
    at = next((i for i, (a, b) in enumerate(zip(default, limit)) if a != b), min(len(default), len(limit)))
    return {"page": str(page), "words": [len(default), len(limit)], "first_apart": at,
            "default": default[at] if at < len(default) else None, "limit": limit[at] if at < len(limit) else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", nargs="*", default=[],
                        help="labels TSVs or box JSONs, as kocr evaluate-crops takes")
    parser.add_argument("--limit", type=int, default=BATCH, help="read the first N crops of each labels file")
    parser.add_argument("--batch", type=int, default=BATCH, help="crops to one tesseract process")
    parser.add_argument("--pages", nargs="*", default=[], help="page images, or folders of them")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of both arms")
    args = parser.parse_args(argv)
    if not tesseract_available():
        raise SystemExit("tesseract_threads: tesseract with kor+eng is not installed")
    greys, names = [], []
    for labels in args.labels:
        crops = read_labels(labels)[:args.limit]
        greys += [load_crop(crop, labels) for crop in crops]
        names += [crop.where(labels) for crop in crops]
    batches = [greys[i:i + args.batch] for i in range(0, len(greys), args.batch)]
    pages = page_files(args.pages)
    if not batches and not pages:
        raise SystemExit("tesseract_threads: no crops (--labels) and no pages (--pages) to read")
    report: dict = {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0], "repeat": args.repeat,
                    "omp_vars_removed": sorted(k for k in os.environ if k.startswith("OMP_"))}
    differ: list[dict] = []
    if batches:
        report["crops"], diffs = compare(batches, lambda batch: read_crops_tesseract(batch, batch=args.batch),
                                         args.repeat)
        report["crops"].update(count=len(greys), batch=args.batch)
        for i, default, limit in diffs:
            differ += [{"crop": names[i * args.batch + j], "default": a, "limit": b}
                       for j, (a, b) in enumerate(zip(default, limit)) if a != b]
    if pages:
        report["pages"], diffs = compare(pages, _page_reading, args.repeat)
        report["pages"]["count"] = len(pages)
        differ += [_page_difference(pages[i], a, b) for i, a, b in diffs]
    report["load_avg_end"] = os.getloadavg()[0]
    report["differ"] = differ
    print(json.dumps(report, ensure_ascii=False, indent=1))
    if differ:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
