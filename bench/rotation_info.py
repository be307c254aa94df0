"""What ``easyocr.Reader.readtext(rotation_info=[90, 180, 270])`` does to upright text, per recogniser.

EasyOCR reads each box at 0, 90, 180 and 270 degrees and keeps the most confident reading. This reads
the upright real word crops of ``../shared/realdata`` (greengarnets_crops and paddleocr words, less the
vertical ``0_.jpg``, and the six labelled words of ``easyocr/korean.png``) through EasyOCR's own
``recognize``, and the two real pages through ``readtext`` (``width_ths=0.0``), and prints each turn's
reading and confidence and how many upright boxes took a turned reading. Then it reads each whole
page turned by 0/90/180/270 and prints the mean box confidence per turn: the page-level choice the
bundle README recommends instead. ``quantize=False``, so readings are the platform's.

    kocr export-easyocr --model ko_base --out /tmp/ko_bundle --name ko_ocr --with-detector
    python bench/rotation_info.py --bundle /tmp/ko_bundle
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kocr.easyocr_compat import import_easyocr, offline_model_dir  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "realdata"
TURNS = [0, 90, 180, 270]


def upright_crops(real: Path) -> list[tuple[str, str, np.ndarray]]:
    """(label, text, grey crop) of every upright real word crop."""
    import cv2

    crops = []
    for labels in (real / "greengarnets_crops" / "labels.tsv", real / "paddleocr" / "words.tsv"):
        for row in csv.DictReader(labels.open(encoding="utf-8"), delimiter="\t"):
            if row["image"] != "0_.jpg":  # vertical text
                crops.append((row["image"], row["text"],
                              cv2.imread(str(labels.parent / row["image"]), cv2.IMREAD_GRAYSCALE)))
    page = cv2.imread(str(real / "easyocr" / "korean.png"), cv2.IMREAD_GRAYSCALE)
    for word in json.loads((real / "easyocr" / "gt.json").read_text(encoding="utf-8"))["korean.png"]["words"]:
        xs, ys = [p[0] for p in word["points"]], [p[1] for p in word["points"]]
        crops.append((f"korean.png:{word['transcription']}", word["transcription"],
                       page[min(ys):max(ys), min(xs):max(xs)]))
    return crops


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="a kocr export-easyocr folder (with --with-detector)")
    parser.add_argument("--name", default="ko_ocr", help="its bundle name")
    parser.add_argument("--realdata", default=str(REAL))
    args = parser.parse_args(argv)
    easyocr = import_easyocr()
    import easyocr.easyocr as easyocr_module
    from PIL import Image

    turned: list = []  # every turn's results, as easyocr hands them to set_result_with_confidence
    choose = easyocr_module.set_result_with_confidence
    easyocr_module.set_result_with_confidence = lambda results: turned.append(results) or choose(results)
    bundle, real = Path(args.bundle), Path(args.realdata)
    common = {"gpu": False, "quantize": False, "download_enabled": False, "verbose": False}
    readers = {args.name: easyocr.Reader(["ko", "en"], recog_network=args.name,
                                         model_storage_directory=str(bundle / "model"),
                                         user_network_directory=str(bundle / "user_network"), **common),
               "english_g2": easyocr.Reader(["en"], recog_network="english_g2",
                                            model_storage_directory=offline_model_dir(), **common)}
    crops = upright_crops(real)
    pages = [real / "easyocr" / "korean.png", real / "paddleocr" / "korean_1.jpg"]
    for name, reader in readers.items():
        counts = {}
        turned.clear()
        for label, text, grey in crops:
            reader.recognize(grey, rotation_info=TURNS[1:])
        for (label, text, _), results in zip(crops, turned):
            readings = [(turn, results[i][0][1], round(float(results[i][0][2]), 3)) for i, turn in enumerate(TURNS)]
            chosen = max(readings, key=lambda r: r[2])[0]
            print(f"{name} {label} ({text}): took {chosen}; {readings}")
        chosen_turns = [max(range(4), key=lambda i: r[i][0][2]) for r in turned]
        counts["crops"] = f"{sum(t != 0 for t in chosen_turns)} of {len(crops)} upright crops read turned"
        for page in pages:
            turned.clear()
            reader.readtext(str(page), rotation_info=TURNS[1:], width_ths=0.0)
            results = turned[0]
            boxes = len(results[0])
            took = [max(range(4), key=lambda i: results[i][j][2]) for j in range(boxes)]
            counts[page.name] = f"{sum(t != 0 for t in took)} of {boxes} boxes read turned"
            means = {}
            with tempfile.TemporaryDirectory(prefix="kocr-turns-") as folder:
                for turn in TURNS:  # the whole page turned, counter-clockwise, read as the README's snippet reads it
                    path = Path(folder) / f"{page.stem}_{turn}.png"
                    Image.open(page).convert("RGB").rotate(turn, expand=True).save(path)
                    confidences = [c for _, _, c in reader.readtext(str(path), width_ths=0.0)]
                    means[turn] = round(float(np.mean(confidences)), 3) if confidences else 0.0
            counts[f"{page.name} page turned, mean box confidence"] = means
        print(name, json.dumps(counts, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
