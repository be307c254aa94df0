"""Pictures people look at: a page with ground truth (left) and a model's reading (right); a crop and its readings.

Example:
    >>> draw_comparison("p.jpg", gt_page, pred_page, "candidate F1 0.31", "worst.png")  # doctest: +SKIP
    >>> draw_crop_readings("c.jpg", "서울", {"english_g2": ("Seoul", 1.0)}, "crop.png")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from evaluation.metrics import PageScore, in_image, score_page
from kocr.atomic import named_disk_errors
from kocr import KocrWarning
from training.data.fonts import DEFAULT_FONT_DIRS, FontFace, covers, find_fonts, load_font
from training.data.pages import Page, clip_box, unscored

GT_COLOUR, PRED_COLOUR = (0, 150, 60), (210, 30, 30)
EXACT, WRONG, UNMATCHED = (0, 150, 60), (235, 130, 0), (210, 30, 30)  # a reading: right, misread, no word
FOUND, MISSED, NOT_SCORED = (0, 110, 200), (210, 30, 30), (140, 140, 140)  # a ground-truth word (grey: also a reading on one)
PANEL_WIDTH = 1600  # a wider page is drawn at this width: labels stay legible, the PNG small
LABEL_SIZE = (11, 28)  # label font size in pixels, from about half the median word height
HEADING_SIZE = 20
MAX_CROP_WIDTH = 1200
FONT_DIRS: tuple[str, ...] = DEFAULT_FONT_DIRS  # where the labels' face is looked for
PREFERRED_FACES = ("NanumGothic.ttf", "NotoSansCJK-Regular.ttc")
HANGUL_PROBE = "가한글읽기"


@functools.lru_cache(maxsize=4)
def _hangul_face(font_dirs: tuple[str, ...]) -> FontFace | None:
    """The face labels are drawn in: a preferred one, else the first installed face (``fonts.find_fonts``'
    search, Noto CJK's Korean face chosen) that draws Hangul; None, with one warning, when none does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a preferred face not installed is no news
        try:
            faces = find_fonts([*PREFERRED_FACES, "*"], font_dirs)
        except ValueError:
            faces = []
    for face in faces:
        try:
            if covers(face, HANGUL_PROBE):
                return face
        except Exception:  # a font file fontTools cannot read is skipped, not fatal
            continue
    warnings.warn(f"no font under {list(font_dirs)} draws Hangul: picture labels show Korean as boxes "
                  "(install fonts-nanum or fonts-noto-cjk)", KocrWarning, stacklevel=3)
    return None


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    face = _hangul_face(tuple(FONT_DIRS))
    if face is not None:
        try:
            return load_font(face, size)
        except OSError:  # a face fontTools reads but FreeType does not
            pass
    return ImageFont.load_default(size)


def _upright(image_path: str | os.PathLike) -> Image.Image:
    """The image as the models read it (``reader.mended_pixels``: an EXIF turn applied, 16-bit samples
    scaled to 8 bits, a transparent image laid over white), in RGB: the page the boxes belong to."""
    from evaluation.reader import mended_pixels

    mended = mended_pixels(Path(image_path))
    if mended is not None:
        return Image.fromarray(mended[0])
    with Image.open(image_path) as stored:
        return stored.convert("RGB")


Colour = tuple[int, int, int]
Box = tuple[float, float, float, float]


def _label_size(boxes: list[Box]) -> int:
    """Label font size: 0.55 of the median drawn word height, within ``LABEL_SIZE``."""
    heights = sorted(y1 - y0 for _, y0, _, y1 in boxes)
    median = heights[len(heights) // 2] if heights else 0
    return int(min(LABEL_SIZE[1], max(LABEL_SIZE[0], round(0.55 * median))))


def _panel(image: Image.Image, page: Page, colours: list[Colour], heading: str, heading_colour: Colour,
           legend: list[tuple[str, Colour]]) -> Image.Image:
    """The page with ``page``'s words boxed in ``colours`` (one per word) and labelled with their text,
    under a heading and a legend. A page wider than ``PANEL_WIDTH`` is scaled down to it first.

    Each box is clamped to the image as scoring clamps it (``clip_box``); one with nothing inside
    (a negative size, a NaN or infinite corner, off the page) is not drawn, as it is not scored.
    A label sits just above its box on a half-clear band, so the text line above still shows.
    """
    scale = min(1.0, PANEL_WIDTH / image.width)
    panel = image.convert("RGB")
    if scale < 1:
        panel = panel.resize((PANEL_WIDTH, max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    else:
        panel = panel.copy()
    drawn: list[tuple[Box, str, Colour]] = []
    for word, colour in zip(page.words, colours):
        clipped = clip_box(word.bbox, image.width, image.height)
        if clipped is not None:
            box = tuple(v * scale for v in clipped)
            drawn.append((box, word.text, colour))  # type: ignore[arg-type]
    size = _label_size([box for box, _, _ in drawn])
    font = _font(size)
    draw = ImageDraw.Draw(panel)
    for (x0, y0, x1, y1), _, colour in drawn:
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=colour, width=2 if scale == 1 else 1)
    bands = Image.new("RGBA", panel.size, (0, 0, 0, 0))
    ink = Image.new("RGBA", panel.size, (0, 0, 0, 0))
    band_draw, ink_draw = ImageDraw.Draw(bands), ImageDraw.Draw(ink)
    for (x0, y0, _, y1), text, colour in drawn:
        ty = y0 - size - 1 if y0 - size - 1 >= 0 else y1 + 1
        left, top, right, bottom = ink_draw.textbbox((x0, ty), text, font=font)
        band_draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(255, 255, 255, 170))
        ink_draw.text((x0, ty), text, fill=colour + (255,), font=font)
    panel = Image.alpha_composite(Image.alpha_composite(panel.convert("RGBA"), bands), ink).convert("RGB")
    heading_font, legend_font = _font(HEADING_SIZE), _font(HEADING_SIZE - 4)
    header = Image.new("RGB", (panel.width, HEADING_SIZE * 2 + HEADING_SIZE + 8), (245, 245, 245))
    hd = ImageDraw.Draw(header)
    hd.text((8, 6), heading, fill=heading_colour, font=heading_font)
    x, y = 8, HEADING_SIZE + 16
    for name, colour in legend:
        hd.rectangle((x, y + 2, x + 12, y + 14), outline=colour, width=2)
        hd.text((x + 18, y), name, fill=colour, font=legend_font)
        x += 18 + int(hd.textlength(name, font=legend_font)) + 20
    out = Image.new("RGB", (panel.width, panel.height + header.height), (255, 255, 255))
    out.paste(header, (0, 0))
    out.paste(panel, (0, header.height))
    return out


def draw_comparison(image_path: str | os.PathLike, gt: Page, pred: Page, title: str,
                    out: str | os.PathLike, score: PageScore | None = None) -> Path:
    """Write a PNG with the ground truth and the prediction side by side; returns its path.

    Colours follow ``score`` (``score_page(gt, pred)`` when not given): a reading matched to a word it
    reads exactly is green, one that misreads it orange, one matched to no word red, one matched to
    a word not scored (``###``: ``PageScore.ignored_pairs``) grey, as it counts nowhere; a ground-truth
    word some reading matched is blue, one none did (missed) red, one not scored grey.
    """
    if score is None:
        score = score_page(gt, pred)
    matched = {j: (i, value) for i, j, value in score.pairs}
    found = {i for i, _, _ in score.pairs}
    sizes = in_image(gt.words, gt.width, gt.height)
    gt_colours = [NOT_SCORED if unscored(w.text) or sized is None else FOUND if i in found else MISSED
                  for i, (w, sized) in enumerate(zip(gt.words, sizes))]
    ignored = {j for _, j in score.ignored_pairs}
    pred_colours = [NOT_SCORED if j in ignored else UNMATCHED if j not in matched
                    else EXACT if matched[j][1] >= 1.0 else WRONG for j in range(len(pred.words))]
    image = _upright(image_path)  # as the boxes were read
    left = _panel(image, gt, gt_colours, f"ground truth ({len(gt.words)} words)", GT_COLOUR,
                  [("found", FOUND), ("missed", MISSED), ("not scored", NOT_SCORED)])
    right = _panel(image, pred, pred_colours, title, PRED_COLOUR,
                   [("exact", EXACT), ("misread", WRONG), ("no word matched", UNMATCHED),
                    ("not scored", NOT_SCORED)])
    canvas = Image.new("RGB", (left.width + right.width + 10, max(left.height, right.height)), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 10, 0))
    return _save(canvas, out)


def _save(canvas: Image.Image, out: str | os.PathLike) -> Path:
    """Write ``canvas`` as the PNG ``out``; a disk that fills names ``out`` (Pillow's error names no
    file: ``kocr evaluate`` said it ran out of room "writing its output")."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with named_disk_errors(out):
        canvas.save(out)
    return out


def draw_crop_readings(image_path: str | os.PathLike, gt: str, readings: dict[str, tuple[str, float]],
                       out: str | os.PathLike, height: int = 96,
                       box: tuple[int, int, int, int] | None = None) -> Path:
    """Write a PNG of one crop (scaled to ``height``, or lower to fit ``MAX_CROP_WIDTH``, as it is) above its ground truth and each model's reading.

    ``readings`` maps a model label to (text, CER); exact readings are drawn green, others red.
    ``box`` (x0, y0, x1, y1) draws that region of the image instead of the whole image.
    """
    size = 22
    font = _font(size)
    image = _upright(image_path)  # as the boxes were cut
    crop = image.crop(box) if box is not None else image
    scale = min(height / crop.height, MAX_CROP_WIDTH / crop.width)  # a long line is drawn lower, never squashed
    crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))))
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
    return _save(canvas, out)
