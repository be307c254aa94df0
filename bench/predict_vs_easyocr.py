"""Pages/s of `kocr predict` (PageReader) against `easyocr.Reader.readtext` on the same bundle and pages.

Both run in this one process, alternating page by page, on the same threads, so machine noise hits
both alike; the result is a ratio, with the outputs compared box by box and text by text.

    .venv/bin/python bench/predict_vs_easyocr.py --model models/candidate/model.pt --pages data/sample --limit 10

Prints JSON: pages, seconds of each side, the speed ratio, and how many pages read identically
(against EasyOCR unquantized, and against its default int8 quantization). Both sides read with the
project's detector settings (params.yaml ``detector:``, the word boxes ``kocr predict`` reads), or
with ``--settings easyocr`` with EasyOCR's defaults (``width_ths`` 0.5: line boxes).
Pages: the .jpg/.png files of --pages. On a machine shared with other jobs, use --threads 1 or start
with OMP_WAIT_POLICY=PASSIVE: spinning OpenMP barriers on busy cores swamp both sides.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from evaluation.reader import DetectorSettings, PageReader
from kocr.easyocr_compat import import_easyocr
from kocr.params import load_params
from training.checkpoint import load_recognizer
from training.export_easyocr import export_easyocr


def _reading(result) -> list[tuple[tuple[float, ...], str]]:
    return [(tuple(float(v) for point in quad for v in point), text) for quad, text, _ in result]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/candidate/model.pt")
    parser.add_argument("--pages", default="data/sample")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--settings", choices=("project", "easyocr"), default="project",
                        help="detector settings of both sides: params.yaml's detector: or EasyOCR's defaults")
    args = parser.parse_args()
    settings = (DetectorSettings.from_params(load_params(required=False).get("detector"))
                if args.settings == "project" else DetectorSettings())
    torch.set_num_threads(args.threads)
    if not Path(args.pages).is_dir():
        parser.error(f"--pages {args.pages}: no such folder")
    images = sorted(p for p in Path(args.pages).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[: args.limit]
    if not images:
        parser.error(f"--pages {args.pages}: no .jpg/.jpeg/.png image there")
    loaded = load_recognizer(args.model)
    easyocr = import_easyocr()
    with tempfile.TemporaryDirectory() as tmp:
        export_easyocr(loaded, tmp, "kocr_bench", with_detector=True)  # "bench" imports this folder
        common = dict(gpu=False, model_storage_directory=f"{tmp}/model", user_network_directory=f"{tmp}/user_network",
                      recog_network="kocr_bench", download_enabled=False, verbose=False)
        readers = {"float": easyocr.Reader(["ko", "en"], quantize=False, **common),
                   "int8": easyocr.Reader(["ko", "en"], quantize=True, **common)}
        ours = PageReader(loaded, settings)
        kwargs = settings.readtext_kwargs()
        seconds = {"kocr": 0.0, "float": 0.0, "int8": 0.0}
        identical = {"float": 0, "int8": 0}
        ours.read(images[0])  # warm-up outside the clock, both sides
        for reader in readers.values():
            reader.readtext(str(images[0]), **kwargs)
        for image in images:
            start = time.perf_counter()
            page = ours.read(image)
            seconds["kocr"] += time.perf_counter() - start
            mine = [(tuple(float(v) for v in (w.bbox[0], w.bbox[1], w.bbox[0] + w.bbox[2], w.bbox[1] + w.bbox[3])),
                     w.text) for w in page.words]
            for name, reader in readers.items():
                start = time.perf_counter()
                result = reader.readtext(str(image), **kwargs)
                seconds[name] += time.perf_counter() - start
                theirs = [((min(q[0::2]), min(q[1::2]), max(q[0::2]), max(q[1::2])), t) for q, t in _reading(result)]
                identical[name] += theirs == mine
    print(json.dumps({
        "pages": len(images), "threads": args.threads, "settings": settings.changed(), "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "speedup_vs_easyocr_float": round(seconds["float"] / seconds["kocr"], 3),
        "speedup_vs_easyocr_int8": round(seconds["int8"] / seconds["kocr"], 3),
        "identical_pages": identical,
    }, indent=1))


if __name__ == "__main__":
    main()
