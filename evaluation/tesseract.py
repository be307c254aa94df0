"""Tesseract 5 (Debian ``tesseract-ocr`` + ``tesseract-ocr-kor``) as a baseline on the same pages.

Pages are read with Tesseract's own layout analysis (``--psm 3``) and its word boxes; crops are read
as single lines (``--psm 7``). Words are Tesseract's own segmentation, kept as it gives them. Many crops
are read ``BATCH`` to one tesseract process (``read_crops_tesseract``, its list-file input), with the
same texts as one process a crop (``read_crop_tesseract``) gives in 0.37 of its time on a 2-core host
(``bench/tesseract_batch.py``): starting tesseract and loading kor+eng cost about as much as reading a crop.
Tesseract runs with ``OMP_THREAD_LIMIT=1`` unless that is set already (``tesseract_env``): one thread
reads the same texts as its OpenMP threads in about 0.3 of their time, crops and pages alike, on a
2-core host (``bench/tesseract_threads.py``).

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
import tempfile
import warnings
from collections.abc import Iterable
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
THREAD_LIMIT = "1"  # OMP_THREAD_LIMIT tesseract runs with unless the user set one (bench/tesseract_threads.py)


def tesseract_env() -> dict[str, str]:
    """The environment tesseract runs in: this process's, with OMP_THREAD_LIMIT=1 unless it is set (its
    value wins). Tesseract 5's OpenMP threads cost more than they give on small images and a busy host."""
    return {"OMP_THREAD_LIMIT": THREAD_LIMIT, **os.environ}


def _run(image: bytes, psm: int, output: str, langs: str) -> str:
    """Tesseract's output for ``image``; '' (nothing read, with a warning) when it runs past
    TIMEOUT_S, as it can on a degenerate crop (a few pixels by thousands), rather than losing the run."""
    try:
        done = subprocess.run(["tesseract", "-", "-", "-l", langs, "--psm", str(psm), *([output] if output else [])],
                              input=image, capture_output=True, timeout=TIMEOUT_S, env=tesseract_env())
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


def _crop_png(grey: np.ndarray) -> bytes:
    """A crop as the PNG Tesseract reads."""
    ok, png = cv2.imencode(".png", grey)
    if not ok:
        raise ValueError("cannot encode crop")
    return png.tobytes()


def _line(text: str) -> str:
    """Tesseract's single-line output as one line: its words joined by single spaces."""
    return " ".join(text.split())


def read_crop_tesseract(grey: np.ndarray, langs: str = LANGS) -> str:
    """Text of one word or line crop (single-line mode); ``read_crops_tesseract`` reads many faster."""
    return _line(_run(_crop_png(grey), 7, "", langs))


BATCH = 128  # crops one tesseract process reads in read_crops_tesseract
BATCH_S_PER_CROP = 1.0  # a batch may run TIMEOUT_S plus this per crop (~0.1-0.2 s a crop is usual)
PAGE_SEPARATOR = "\f"  # before each page's text but the first in a list file's output (Tesseract's default, set here)


def read_crops_tesseract(greys: Iterable[np.ndarray], langs: str = LANGS, batch: int = BATCH) -> list[str]:
    """Texts of many crops, ``texts[i]`` of ``greys[i]``, each read as ``read_crop_tesseract`` reads it
    but ``batch`` crops to one tesseract process (its list-file input), which spares a process start
    and a model load per crop.

    A batch whose output does not split into one text per crop, whose process fails or that runs past
    its time (TIMEOUT_S plus BATCH_S_PER_CROP a crop) is read again crop by crop, with a warning: there a
    failure raises naming tesseract's error and a crop running past TIMEOUT_S reads as nothing, as in
    ``read_crop_tesseract``."""
    pngs = [_crop_png(grey) for grey in greys]
    size = max(1, batch)
    texts: list[str] = []
    for start in range(0, len(pngs), size):
        texts.extend(_read_batch(pngs[start:start + size], langs))
    return texts


def _read_batch(pngs: list[bytes], langs: str) -> list[str]:
    """One tesseract process reading ``pngs``, or each crop on its own when that goes wrong."""
    if len(pngs) == 1:
        return [_line(_run(pngs[0], 7, "", langs))]
    pages, why = _read_list(pngs, langs)
    if why:
        warnings.warn(f"tesseract {why} on a batch of {len(pngs)} crops; reading them one by one",
                      KocrWarning, stacklevel=3)
        return [_line(_run(png, 7, "", langs)) for png in pngs]
    return [_line(page) for page in pages]


def _read_list(pngs: list[bytes], langs: str) -> tuple[list[str], str]:
    """Each crop's raw text from one tesseract process given a list file naming the crops as PNG files (in
    a temporary folder under TMPDIR, removed after), and ''; or no texts and what went wrong."""
    limit = TIMEOUT_S + BATCH_S_PER_CROP * len(pngs)
    with tempfile.TemporaryDirectory(prefix="kocr-tesseract-") as folder:
        names = [f"{i:06d}.png" for i in range(len(pngs))]
        for name, png in zip(names, pngs):
            Path(folder, name).write_bytes(png)
        Path(folder, "crops.txt").write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
        try:
            done = subprocess.run(["tesseract", "crops.txt", "-", "-l", langs, "--psm", "7",
                                   "-c", f"page_separator={PAGE_SEPARATOR}"],
                                  cwd=folder, capture_output=True, timeout=limit, env=tesseract_env())
        except subprocess.TimeoutExpired:
            return [], f"ran past {limit:g} s"
    if done.returncode != 0:
        return [], f"failed ({' '.join(done.stderr.decode(errors='replace').split())[-300:]})"
    pages = done.stdout.decode("utf-8").split(PAGE_SEPARATOR)
    return (pages, "") if len(pages) == len(pngs) else ([], f"gave {len(pages)} pages")
