"""Does the exported bundle read, inside the real ``easyocr.Reader``, what the platform read?

Every ground-truth word crop of the given pages is read three ways: by the platform's recogniser,
by ``easyocr.Reader`` with the bundle unquantized, and with EasyOCR's default CPU int8 quantization.
The report gives the agreement of each and the crops that differ.

Example:
    >>> report = easyocr_parity("models/easyocr", "ko_ocr", pages)        # doctest: +SKIP
    >>> report["float_agreement"], report["int8_agreement"]                # doctest: +SKIP
    (1.0, 0.95)
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from evaluation.evaluate import EvalPage, gt_boxes
from evaluation.reader import Recognition, load_image
from kocr.easyocr_compat import import_easyocr
from training.checkpoint import LoadedRecognizer

MAX_DIFFERENCES = 50


def _bundle_reader(bundle: Path, name: str, quantize: bool):
    easyocr = import_easyocr()
    return easyocr.Reader(["ko", "en"], gpu=False, model_storage_directory=str(bundle / "model"),
                          user_network_directory=str(bundle / "user_network"), recog_network=name,
                          detector=False, download_enabled=False, quantize=quantize, verbose=False)


def easyocr_parity(bundle: str | os.PathLike, name: str, loaded: LoadedRecognizer, pages: list[EvalPage],
                   margin: float = 0.1) -> dict[str, Any]:
    """Agreement between the platform and ``easyocr.Reader`` (float and int8) on every word crop."""
    bundle = Path(bundle)
    readers = {q: _bundle_reader(bundle, name, q) for q in (False, True)}
    ours = Recognition(loaded)
    same = {False: 0, True: 0}
    differences: list[dict[str, str]] = []
    n = 0
    warnings.filterwarnings("ignore", message=".*pin_memory.*")  # easyocr asks for it on CPU too
    for item in pages:
        _, grey = load_image(item.image)
        boxes, _ = gt_boxes(item.page, grey.shape, margin)
        for box in boxes:
            mine = ours.read_boxes(grey, [box], [])[0][1]
            n += 1
            for quantize, reader in readers.items():
                theirs = reader.recognize(grey, horizontal_list=[box], free_list=[], detail=0)[0]
                same[quantize] += theirs == mine
                if theirs != mine and len(differences) < MAX_DIFFERENCES:
                    differences.append({"page": item.name, "box": str(box), "platform": mine,
                                        "easyocr": theirs, "quantized": str(quantize)})
    return {"crops": n, "float_agreement": same[False] / n if n else None,  # None: nothing was checked
            "int8_agreement": same[True] / n if n else None,
            "float_differences": n - same[False], "int8_differences": n - same[True],
            "differences": differences}

