"""Pixels as the models should see them: the images EasyOCR's own reading gets wrong, mended.

EasyOCR reads a file with OpenCV, which ignores EXIF orientation, gives 16-bit and float samples
to CRAFT unscaled, and drops alpha (the colour stored under a transparent pixel is then read, usually
black: a page cut out of its paper, or one whose text lives only in its alpha channel, reads as
black on black); its colour reader hands CRAFT a CMYK image's C, M and Y channels as R, G and B (a
print-shop scan's black ink, all in K, then reads as a black page) and cannot read a 1-bit
(bilevel) scan at all. ``prepare`` (training crops) and ``evaluation.reader`` (what models are scored
on) both go through :func:`mend`, so the platform trains on the pixels it evaluates.
"""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

TRANSPARENT_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
CONVERTED_MODES = {"CMYK": "RGB", "1": "L"}  # EasyOCR's reader gets these wrong: read as PIL converts them
_LARGE: list[set[str]] = []  # the pages noted by the open large_pages() blocks, innermost last


QUARTER_TURNS = frozenset({5, 6, 7, 8})  # EXIF orientations that turn an image a quarter (width and height swap)


def boxes_on_stored_pixels(label_size: tuple[float, float], stored_size: tuple[int, int], orientation: int) -> str:
    """Why a label whose ``image.width``/``image.height`` are ``label_size`` has its boxes on its image as
    stored (``stored_size``: width, height), not as its EXIF ``orientation`` turns it upright, else "".

    Boxes are taken to be on the upright image (what viewers, browsers and evaluation show). A label
    that gives the stored size of an image EXIF turns a quarter (a phone photo; the annotation tool read
    the pixels as stored, as OpenCV does) has its boxes on the sideways pixels: cut from the upright
    image they hold other pixels than their words.

    >>> boxes_on_stored_pixels((60, 120), (60, 120), 6)[:50]
    'image.width/height 60x120 are the image as stored,'
    >>> boxes_on_stored_pixels((120, 60), (60, 120), 6), boxes_on_stored_pixels((60, 120), (60, 120), 1)
    ('', '')
    """
    width, height = stored_size
    if orientation not in QUARTER_TURNS or tuple(label_size) != (width, height) or width == height:
        return ""
    return (f"image.width/height {width}x{height} are the image as stored, which its EXIF orientation "
            f"{orientation} turns a quarter to {height}x{width}, so the boxes are on the sideways pixels; "
            "clear the image's orientation tag (exiftool -n -Orientation=1) to crop the pixels as stored")


def note_pixels(name: str, pixels: int) -> None:
    """Count page ``name`` (``pixels`` = width x height) for the innermost ``large_pages`` block when it
    is past PIL's ``Image.MAX_IMAGE_PIXELS``; a no-op outside one, or with the limit off (None)."""
    limit = Image.MAX_IMAGE_PIXELS
    if _LARGE and limit and pixels > limit:
        _LARGE[-1].add(name)


@contextmanager
def large_pages(stage: str) -> Iterator[set[str]]:
    """Within: PIL's DecompressionBombWarning, one per page past ``Image.MAX_IMAGE_PIXELS`` (89.5 MP:
    a 600 dpi scan of a large sheet), is not printed; the pages ``note_pixels`` saw are counted and,
    at the end, said in one line on stderr. Past twice the limit PIL refuses a page
    (DecompressionBombError), which each stage reports on its own.

    >>> with large_pages("kocr evaluate") as seen:
    ...     note_pixels("a.jpg", 10**9); note_pixels("a.jpg", 10**9); note_pixels("b.jpg", 10)
    >>> sorted(seen)
    ['a.jpg']
    """
    seen: set[str] = set()
    _LARGE.append(seen)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield seen
    finally:
        _LARGE.remove(seen)
        if seen:
            limit = Image.MAX_IMAGE_PIXELS
            print(f"{stage}: {len(seen)} page image{'s' * (len(seen) != 1)} past Pillow's decompression-bomb "
                  f"limit ({limit:,} pixels) read as usual; its warning for each is left out (past "
                  f"{2 * limit:,} pixels a page is refused as too large)", file=sys.stderr)


def _see_through(image: Image.Image) -> bool:
    """Some pixel is not fully opaque (an alpha channel, or a palette or colour key marked transparent):
    what shows there is what is behind the image, white in viewers, browsers and Tesseract (Leptonica
    blends alpha with white), not the colour stored under it, which editors and PNG optimisers clear to
    black (a page cut out of its paper, dark ink on (0, 0, 0, 0), read as black on black)."""
    if image.mode not in TRANSPARENT_MODES and "transparency" not in image.info:
        return False
    alpha = image if image.mode in ("RGBA", "LA") else image.convert("RGBA")
    return alpha.getchannel("A").getextrema()[0] < 255


def mend(image: Image.Image) -> Image.Image | None:
    """``image`` upright, in 8 bits and laid over white where EasyOCR would read it wrongly; None where
    it reads it as it is.

    An image with transparent pixels is laid over white, as a person sees it: EasyOCR drops alpha and
    reads the colours stored under it (black, in the usual cleared pixel).

    CMYK is converted to RGB and 1-bit to grey, as Pillow converts them.
    16-bit samples scale from 0-65535 and float ones from 0-1 (0-255 when they run past 1), not by
    the image's own range: a faint scan stays faint, as it was captured.

    >>> mend(Image.new("L", (4, 2))) is None
    True
    >>> deep = Image.fromarray(np.full((2, 4), 32768, np.int32)).convert("I")
    >>> int(np.asarray(mend(deep)).max())  # half of 16-bit full scale
    128
    """
    # EasyOCR reads it wrongly when: an EXIF turn, deep samples, transparent pixels, grey with alpha
    # (EasyOCR's reader hands CRAFT its two channels, and CRAFT fails on them), CMYK (its C, M, Y
    # channels taken for R, G, B) or 1-bit (a bool array OpenCV cannot convert: the page is refused)
    deep, clear = image.mode.startswith(("I", "F")), _see_through(image)
    converted = CONVERTED_MODES.get(image.mode)
    if not (deep or clear or converted or image.mode in ("LA", "La") or image.getexif().get(0x0112, 1) != 1):
        return None
    upright = ImageOps.exif_transpose(image)
    if converted:
        upright = upright.convert(converted)
    if deep:
        samples = np.asarray(upright, dtype=np.float64)
        peak = samples.max(initial=0.0)
        top = 65535.0 if peak > 255 else 1.0 if image.mode == "F" and peak <= 1.0 else 255.0
        upright = Image.fromarray(np.clip(samples * 255.0 / top, 0, 255).round().astype(np.uint8))
    if clear:
        rgba = upright.convert("RGBA")
        upright = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    elif upright.mode in ("LA", "La"):  # opaque: its grey
        upright = upright.convert("L")
    return upright
