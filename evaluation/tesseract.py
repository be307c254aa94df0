"""Tesseract 5 (Debian ``tesseract-ocr`` + ``tesseract-ocr-kor``) as a baseline on the same pages.

Pages are read with Tesseract's own layout analysis (``--psm 3``) and its word boxes; crops are read
as single lines (``--psm 7``). Words are Tesseract's own segmentation, kept as it gives them.

Example:
    >>> if tesseract_available():                                   # doctest: +SKIP
    ...     page = read_page_tesseract("scan.jpg")
"""

from __future__ import annotations

import csv
import functools
import io
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import cv2
import numpy as np

from kocr import KocrWarning
from training.data.pages import Page, Word

LANGS = "kor+eng"


@functools.lru_cache(maxsize=1)
def tesseract_available(langs: str = LANGS) -> bool:
    """True when the ``tesseract`` binary and every language in ``langs`` are installed."""
    if shutil.which("tesseract") is None:
        return False
    listed = subprocess.run(["tesseract", "--list-langs"], capture_output=True, text=True).stdout.split()
    return all(lang in listed for lang in langs.split("+"))


TIMEOUT_S = 120


def _run(image: bytes, psm: int, output: str, langs: str) -> str:
    """Tesseract's output for ``image``; '' (nothing read, with a warning) when it runs past
    TIMEOUT_S, as it can on a degenerate crop (a few pixels by thousands), rather than losing the run."""
    try:
        done = subprocess.run(["tesseract", "-", "-", "-l", langs, "--psm", str(psm), *([output] if output else [])],
                              input=image, capture_output=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        warnings.warn(f"tesseract ran past {TIMEOUT_S} s on one image (--psm {psm}); counted as reading nothing",
                      KocrWarning, stacklevel=3)
        return ""
    if done.returncode != 0:
        raise RuntimeError(f"tesseract failed: {done.stderr.decode(errors='replace').strip()[:300]}")
    return done.stdout.decode("utf-8")


def read_page_tesseract(path: str | os.PathLike, langs: str = LANGS) -> Page:
    """Words and boxes Tesseract finds on a page image, as a prediction page.

    The page as the recognisers see it (``reader.load_image``): an ordinary image goes to Tesseract
    as its file's bytes; one that image loading mends (an EXIF orientation, which Tesseract does not
    apply, 16-bit samples, text drawn in alpha) goes as the mended pixels, so both read it upright."""
    from evaluation.reader import mended_pixels

    data = Path(path).read_bytes()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    mended = mended_pixels(Path(path))
    if mended is not None:
        image = mended[1]
        ok, png = cv2.imencode(".png", cv2.cvtColor(mended[0], cv2.COLOR_RGB2BGR))
        if not ok:
            raise ValueError(f"{path}: cannot encode the upright page for tesseract")
        data = png.tobytes()
    rows = csv.DictReader(io.StringIO(_run(data, 3, "tsv", langs)), delimiter="\t", quoting=csv.QUOTE_NONE)
    words = [Word((float(r["left"]), float(r["top"]), float(r["width"]), float(r["height"])), r["text"].strip(),
                  max(0.0, float(r["conf"])) / 100.0)
             for r in rows if r["level"] == "5" and (r.get("text") or "").strip()]
    return Page(Path(path).name, image.shape[1], image.shape[0], words)


def read_crop_tesseract(grey: np.ndarray, langs: str = LANGS) -> str:
    """Text of one word or line crop (single-line mode)."""
    ok, png = cv2.imencode(".png", grey)
    if not ok:
        raise ValueError("cannot encode crop")
    return " ".join(_run(png.tobytes(), 7, "", langs).split())
