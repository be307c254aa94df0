"""Pictures people look at: a page with ground truth (left) and a model's reading (right); a crop and its readings.

Example:
    >>> draw_comparison("p.jpg", gt_page, pred_page, "candidate F1 0.31", "worst.png")  # doctest: +SKIP
    >>> draw_crop_readings("c.jpg", "서울", {"english_g2": ("Seoul", 1.0)}, "crop.png")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from training.data.pages import Page, clip_box

GT_COLOUR, PRED_COLOUR = (0, 150, 60), (210, 30, 30)


@functools.lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        from training.data.fonts import find_fonts, load_font

        return load_font(find_fonts(["NanumGothic.ttf", "NotoSansCJK-Regular.ttc"])[0], size)
    except (ValueError, OSError):  # no Korean font installed: labels still drawn, Hangul as boxes
        return ImageFont.load_default(size)


def _upright(image_path: str | os.PathLike) -> Image.Image:
    """The image as the models read it (``reader.mended_pixels``: an EXIF turn applied, 16-bit samples
    scaled to 8 bits, text drawn only in alpha laid over white), in RGB: the page the boxes belong to."""
    from evaluation.reader import mended_pixels

    mended = mended_pixels(Path(image_path))
    if mended is not None:
        return Image.fromarray(mended[0])
    with Image.open(image_path) as stored:
        return stored.convert("RGB")


def _panel(image: Image.Image, page: Page, colour: tuple[int, int, int], heading: str) -> Image.Image:
    """The page with ``page``'s words boxed and labelled under a heading. Each box is clamped to the
    image as scoring clamps it (``clip_box``); one with nothing inside (a negative size, a NaN or
    infinite corner, off the page) is not drawn, as it is not scored."""
    panel = image.convert("RGB").copy()
    draw = ImageDraw.Draw(panel)
    size = max(12, panel.height // 45)
    font = _font(size)
    for word in page.words:
        clipped = clip_box(word.bbox, panel.width, panel.height)
        if clipped is None:
            continue
        x0, y0, x1, y1 = clipped
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        label = word.text if word.score is None else f"{word.text} ({word.score:.2f})"
        ty = y0 - size - 2 if y0 - size - 2 >= 0 else y1 + 2
        box = draw.textbbox((x0, ty), label, font=font)
        draw.rectangle(box, fill=(255, 255, 255))
        draw.text((x0, ty), label, fill=colour, font=font)
    header = Image.new("RGB", (panel.width, size * 2), (245, 245, 245))
    ImageDraw.Draw(header).text((8, size // 2), heading, fill=colour, font=font)
    out = Image.new("RGB", (panel.width, panel.height + header.height), (255, 255, 255))
    out.paste(header, (0, 0))
    out.paste(panel, (0, header.height))
    return out


def draw_comparison(image_path: str | os.PathLike, gt: Page, pred: Page, title: str,
                    out: str | os.PathLike) -> Path:
    """Write a PNG with the ground truth and the prediction side by side; returns its path."""
    image = _upright(image_path)  # as the boxes were read
    left = _panel(image, gt, GT_COLOUR, f"ground truth ({len(gt.words)} words)")
    right = _panel(image, pred, PRED_COLOUR, title)
    canvas = Image.new("RGB", (left.width + right.width + 10, max(left.height, right.height)), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 10, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def draw_crop_readings(image_path: str | os.PathLike, gt: str, readings: dict[str, tuple[str, float]],
                       out: str | os.PathLike, height: int = 96,
                       box: tuple[int, int, int, int] | None = None) -> Path:
    """Write a PNG of one crop (scaled to ``height``) above its ground truth and each model's reading.

    ``readings`` maps a model label to (text, CER); exact readings are drawn green, others red.
    ``box`` (x0, y0, x1, y1) draws that region of the image instead of the whole image.
    """
    size = 22
    font = _font(size)
    image = _upright(image_path)  # as the boxes were cut
    crop = image.crop(box) if box is not None else image
    crop = crop.resize((max(1, min(1200, round(crop.width * height / crop.height))), height))
    lines = [(f"ground truth: {gt}", GT_COLOUR)]
    lines += [(f"{label}: {text}  (CER {value:.2f})", GT_COLOUR if value == 0 else PRED_COLOUR)
              for label, (text, value) in readings.items()]
    probe = ImageDraw.Draw(crop)
    width = max([crop.width] + [probe.textbbox((0, 0), text, font=font)[2] for text, _ in lines]) + 20
    canvas = Image.new("RGB", (width, crop.height + 20 + len(lines) * (size + 8)), (255, 255, 255))
    canvas.paste(crop, (10, 10))
    draw = ImageDraw.Draw(canvas)
    for row, (text, colour) in enumerate(lines):
        draw.text((10, crop.height + 16 + row * (size + 8)), text, fill=colour, font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
