"""Tesseract's crop reading: many crops to one process against one process a crop, on the same crops.

Reads the first ``--limit`` crops of a labels file (as ``kocr evaluate-crops`` loads them) with
``read_crops_tesseract`` (``--batch`` crops to one tesseract process, its list-file input) and with
``read_crop_tesseract`` (one process a crop, as every crop was read before), in this one process,
and checks that both give the same text for every crop.

    KOCR_PARAMS=recipes/ko-base/params.yaml kocr synth-lines --section synth_lines_heldout --count 300 --out /tmp/heldout
    python -m kocr.recipe export-crops /tmp/heldout --out /tmp/heldout_crops
    .venv/bin/python bench/tesseract_batch.py --labels /tmp/heldout_crops/labels.tsv --limit 300

Prints one JSON object: seconds, crops/s and the tesseract processes' CPU seconds of each way, ``ratio``
(batched seconds / per-crop seconds, from the unrounded times: below 1 is faster) and ``cpu_ratio`` (the
same of CPU seconds: on a shared, busy machine the steadier figure), the crops whose texts differ, the
machine's CPU count and load averages. Exit 1 when a text differs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.score_crops import load_crop, read_labels  # noqa: E402
from evaluation.tesseract import BATCH, read_crop_tesseract, read_crops_tesseract, tesseract_available  # noqa: E402


def _tesseract_cpu_seconds() -> float:
    """User + system CPU time of this process's finished children (the tesseract processes)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="a labels TSV or box JSON, as kocr evaluate-crops takes")
    parser.add_argument("--limit", type=int, default=300, help="read the first N crops")
    parser.add_argument("--batch", type=int, default=BATCH, help="crops to one tesseract process")
    args = parser.parse_args(argv)
    if not tesseract_available():
        raise SystemExit("tesseract_batch: tesseract with kor+eng is not installed")
    crops = read_labels(args.labels)[:args.limit]
    greys = [load_crop(crop, args.labels) for crop in crops]
    if not greys:
        raise SystemExit(f"tesseract_batch: {args.labels}: no crops to read")
    load_start = os.getloadavg()[0]
    start, cpu = time.perf_counter(), _tesseract_cpu_seconds()
    batched = read_crops_tesseract(greys, batch=args.batch)
    batched_s, batched_cpu = time.perf_counter() - start, _tesseract_cpu_seconds() - cpu
    start, cpu = time.perf_counter(), _tesseract_cpu_seconds()
    alone = [read_crop_tesseract(grey) for grey in greys]
    per_crop_s, per_crop_cpu = time.perf_counter() - start, _tesseract_cpu_seconds() - cpu
    differ = [{"crop": crop.where(args.labels), "per_crop": a, "batched": b}
              for crop, a, b in zip(crops, alone, batched) if a != b]
    report = {"crops": len(greys), "batch": args.batch, "cpus": os.cpu_count(),
              "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0],
              "batched": {"seconds": round(batched_s, 2), "crops_per_s": round(len(greys) / batched_s, 2),
                          "tesseract_cpu_seconds": round(batched_cpu, 2)},
              "per_crop": {"seconds": round(per_crop_s, 2), "crops_per_s": round(len(greys) / per_crop_s, 2),
                           "tesseract_cpu_seconds": round(per_crop_cpu, 2)},
              "ratio": round(batched_s / per_crop_s, 3),
              "cpu_ratio": round(batched_cpu / per_crop_cpu, 3),
              "same_text": len(greys) - len(differ), "differ": differ}
    print(json.dumps(report, ensure_ascii=False, indent=1))
    if differ:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
