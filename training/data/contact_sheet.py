"""Contact sheets: a grid of generated samples with their labels printed under them.

A quick look at a synthetic set (``<out>/contact_sheet.png``) shows at once whether fonts,
backgrounds and degradations look right and whether the labels match the pictures.

Example:
    >>> from PIL import Image
    >>> from training.data.fonts import find_fonts
    >>> tiles = [(Image.new("L", (120, 40), 255), "서울")]
    >>> make_sheet(tiles, find_fonts(["NanumGothic.ttf"])).mode  # doctest: +SKIP
    'RGB'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from kocr.atomic import atomic_path
from training.data.fonts import FontFace, covers, load_font

BORDER = (200, 200, 200)
CAPTION = (20, 20, 20)


def _caption_font(text: str, faces: Sequence[FontFace], size: int):
    for face in faces:
        if covers(face, text):
            return load_font(face, size), text
    face = faces[0]  # no face draws every character: show the ones it cannot as '?'
    return load_font(face, size), "".join(c if covers(face, c) else "?" for c in text)


def _fit(text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis until it fits ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def make_sheet(tiles: Sequence[tuple[Image.Image, str]], caption_faces: Sequence[FontFace],
               columns: int = 4, tile_size: tuple[int, int] = (256, 64),
               caption_size: int = 16) -> Image.Image:
    """Grid of ``tiles`` (image, caption), each fitted into ``tile_size`` with its caption below."""
    if not caption_faces:
        raise ValueError("contact sheet needs at least one font for the captions")
    tw, th = tile_size
    pad = 6
    cell_w, cell_h = tw + 2 * pad, th + caption_size + 3 * pad
    columns = max(1, min(columns, len(tiles) or 1))
    rows = max(1, -(-len(tiles) // columns))
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for n, (image, caption) in enumerate(tiles):
        cx, cy = (n % columns) * cell_w + pad, (n // columns) * cell_h + pad
        scale = min(tw / image.width, th / image.height)
        thumb = image.convert("RGB").resize((max(1, round(image.width * scale)),
                                             max(1, round(image.height * scale))),
                                            Image.Resampling.LANCZOS)
        sheet.paste(thumb, (cx, cy))
        draw.rectangle([cx - 1, cy - 1, cx + thumb.width, cy + thumb.height], outline=BORDER)
        font, text = _caption_font(caption, caption_faces, caption_size)
        draw.text((cx, cy + th + pad), _fit(text, font, tw), font=font, fill=CAPTION)
    return sheet


def write_sheet(tiles: Sequence[tuple[Image.Image, str]], path: str | os.PathLike,
                caption_faces: Sequence[FontFace], **kwargs) -> Path:
    """``make_sheet`` saved as PNG at ``path`` (through a temp file); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        make_sheet(tiles, caption_faces, **kwargs).save(tmp, format="PNG")
    return path
