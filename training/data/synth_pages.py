"""Synthetic Korean administrative-document pages with word boxes (the ``sample`` DVC stage).

Each page is an off-white, slightly noisy "scan" holding a document-like layout (a title,
form fields, paragraphs, numbered items, a dated footer) in one or two fonts; every word's
box is the exact box of its ink. Pages are written in the AI-Hub 공공행정문서 page JSON
format through ``training.data.pages`` so they feed the same pipeline as the real data.

Example:
    >>> paths = generate_pages("data/sample", count=2, seed=0, fonts=["NanumGothic.ttf"],
    ...                        progress=False)  # doctest: +SKIP
    >>> [p.name for p in paths]  # doctest: +SKIP
    ['page_00000.json', 'page_00001.json']

Command line::

    python -m training.data.synth_pages data/sample --count 200 --seed 0 \\
        --fonts NanumGothic.ttf NanumMyeongjo.ttf NanumPen.ttf
"""

from __future__ import annotations

import io
import os
import random
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from kocr.atomic import OutFolderError, PartialFolder, check_out_folder, sweep_stale, write_bytes
from kocr import KocrWarning
from training.charset import Charset
from training.data import degrade as degrade_mod
from training.data.contact_sheet import write_sheet
from training.data.fonts import DEFAULT_FONT_DIRS, FontFace, covers, find_fonts, load_font
from training.data.lexicon import (ADMIN_LABELS, TITLE_TERMS, is_hangul, load_lexicon,
                                   make_token, random_name, random_phone, sample_word)
from training.data.degrade import SynthConfigError
from training.data.pages import Page, Word, read_page, write_page
from training.data.set_key import generator_key

CATEGORIES = ("인.허가", "민원", "행정", "회계.예산", "보건.복지", "산업.경제", "교육", "환경")
REFERENCE_AREA = 1000 * 700  # the page area the 20-40 words per page are meant for
PAGE_NAME = re.compile(r"^page_(\d{5,})\.(jpg|json)$")
JPEG_QUALITY = 90
SHEET = "contact_sheet.png"
RGB = tuple[int, int, int]


@dataclass
class _Piece:
    """One rendered word: its ink mask and where the ink sits relative to the pen position."""

    text: str
    mask: Image.Image  # "L", cropped to the ink
    dy: int  # ink top relative to the baseline (negative above it)
    color: RGB
    x: int = 0  # ink left, relative to the line start


@dataclass
class _Style:
    face: FontFace
    size: int
    color: RGB

    @property
    def font(self):
        return load_font(self.face, self.size)


def _render(text: str, style: _Style, rng: random.Random) -> _Piece | None:
    """Rasterise ``text``; the mask is cropped to the ink so its box is the exact ink box."""
    font = style.font
    left, top, right, bottom = font.getbbox(text, anchor="ls")
    pad = 2 + style.size // 8
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, font=font, fill=255, anchor="ls")
    ink = canvas.getbbox()
    if ink is None:
        return None
    mask = canvas.crop(ink)
    density = rng.uniform(0.85, 1.0)  # ink strength varies a little from word to word
    if density < 0.999:
        mask = mask.point([int(v * density + 0.5) for v in range(256)])
    jitter = lambda c: max(0, min(255, c + rng.randint(-6, 6)))  # noqa: E731
    color = (jitter(style.color[0]), jitter(style.color[1]), jitter(style.color[2]))
    return _Piece(text, mask, top - pad + ink[1], color)


class _PageBuilder:
    """Lays lines of words top to bottom; lines never share a row, words never touch."""

    def __init__(self, rng: random.Random, image: Image.Image, charset: Charset,
                 words: list[str], weights: list[float], budget: int) -> None:
        self.rng = rng
        self.image = image
        self.draw = ImageDraw.Draw(image)
        self.charset = charset
        self.words, self.weights = words, weights
        self.width, self.height = image.size
        self.left = round(self.width * rng.uniform(0.05, 0.10))
        self.right = self.width - round(self.width * rng.uniform(0.05, 0.10))
        self.y = round(self.height * rng.uniform(0.04, 0.09))  # top of the next line's ink
        self.bottom = self.height - round(self.height * rng.uniform(0.04, 0.08))
        self.remaining = budget
        self.full = False
        self.boxes: list[Word] = []

    # -- tokens -----------------------------------------------------------------------------

    def token(self) -> str:
        return make_token(self.rng, self.words, self.weights, self.charset)

    def word(self) -> str:
        return sample_word(self.rng, self.words, self.weights)

    def fits(self, text: str, style: _Style) -> bool:
        return bool(text) and not self.charset.missing(text) and covers(style.face, text)

    # -- lines ------------------------------------------------------------------------------

    def gap(self, style: _Style, lo: float = 0.3, hi: float = 0.55) -> int:
        return max(3, round(style.size * self.rng.uniform(lo, hi)))

    def fill(self, source: Callable[[], str], style: _Style, max_width: int, max_words: int,
             start: int = 0, pieces: list[_Piece] | None = None) -> list[_Piece]:
        """Append words from ``source`` from x=``start`` until ``max_words`` or the width is hit."""
        pieces = [] if pieces is None else pieces
        cursor = start
        for _ in range(max_words):
            for _attempt in range(8):
                text = source()
                if not self.fits(text, style):
                    continue
                piece = _render(text, style, self.rng)
                if piece is None:
                    continue
                if cursor + piece.mask.width > max_width:
                    if pieces:
                        return pieces  # line full: end it here
                    continue  # a first word too wide for the line: try a shorter one
                break
            else:
                return pieces
            piece.x = cursor
            pieces.append(piece)
            cursor += piece.mask.width + self.gap(style)
        return pieces

    def place(self, texts: Sequence[str], style: _Style, max_width: int, start: int = 0,
              pieces: list[_Piece] | None = None, gap: int | None = None) -> list[_Piece]:
        """Append the given words in order, skipping any the font or charset cannot show."""
        pieces = [] if pieces is None else pieces
        cursor = start if not pieces else max(start, pieces[-1].x + pieces[-1].mask.width
                                              + (gap or self.gap(style)))
        for text in texts:
            if not self.fits(text, style):
                continue
            piece = _render(text, style, self.rng)
            if piece is None:
                continue
            if cursor + piece.mask.width > max_width:
                break
            piece.x = cursor
            pieces.append(piece)
            cursor += piece.mask.width + (gap or self.gap(style))
        return pieces

    def emit(self, pieces: list[_Piece], align: str = "left", indent: int = 0) -> bool:
        """Draw a line at the current y; False (and the page marked full) when it does not fit."""
        if not pieces:
            return True
        if self.remaining <= 0:
            self.full = True
            return False
        pieces = pieces[:self.remaining]
        top = min(p.dy for p in pieces)
        baseline = self.y - top
        line_bottom = baseline + max(p.dy + p.mask.height for p in pieces)
        if line_bottom > self.bottom:
            self.full = True
            return False
        span = pieces[-1].x + pieces[-1].mask.width - pieces[0].x
        usable = self.right - self.left
        if align == "center":
            offset = self.left + (usable - span) // 2 - pieces[0].x
        elif align == "right":
            offset = self.right - span - pieces[0].x
        else:
            offset = self.left + indent
        # never let a word leave the page, whatever the caller's widths
        pieces = [p for p in pieces if offset + p.x >= 0 and
                  offset + p.x + p.mask.width <= self.width]
        for p in pieces:
            x0, y0 = offset + p.x, baseline + p.dy
            w, h = p.mask.size
            self.image.paste(p.color, (x0, y0, x0 + w, y0 + h), p.mask)
            self.boxes.append(Word((x0, y0, w, h), p.text))
        self.remaining -= len(pieces)
        self.y = line_bottom
        return True

    def space(self, amount: int, rule: bool = False) -> None:
        """Vertical gap before the next line, optionally with a horizontal rule inside it."""
        amount = max(2, amount)
        if rule and amount >= 6:
            shade = self.rng.randint(60, 140)
            ry = self.y + amount // 2
            self.draw.line([(self.left, ry), (self.right, ry)], fill=(shade, shade, shade),
                           width=self.rng.randint(1, 2))
        self.y += amount
        if self.y >= self.bottom:
            self.full = True

    @property
    def open(self) -> bool:
        return not self.full and self.remaining > 0


def _field_value(rng: random.Random, label: str, builder: _PageBuilder) -> list[str]:
    """Plausible value tokens for a form label (a name for 성명, a phone for 연락처, ...)."""
    if label in ("성명", "신청인", "담당자", "대표자"):
        return [random_name(rng)]
    if label in ("연락처", "전화번호"):
        return [random_phone(rng)]
    if label in ("일시", "발급일", "시행일", "생년월일", "기간"):
        y, m, d = rng.randint(1960 if label == "생년월일" else 1990, 2024), rng.randint(1, 12), \
            rng.randint(1, 28)
        if rng.random() < 0.5:
            return [f"{y}.{m:02d}.{d:02d}"]
        return [f"{y}년", f"{m}월", f"{d}일"]
    if label in ("금액", "합계", "단가"):
        return [f"{rng.randint(1, 9999) * 1000:,}" + ("원" if rng.random() < 0.7 else "")]
    if label == "수량":
        return [f"{rng.randint(1, 500)}{rng.choice(('', '개', '건', '매', '부'))}"]
    if label == "면적":
        return [f"{rng.randint(10, 9999)}.{rng.randint(0, 99):02d}"]
    if label == "주민등록번호":
        return [f"{rng.randint(600101, 991231)}-{rng.randint(1, 4)}******"]
    return [builder.token() for _ in range(rng.randint(1, 4))]


def _styles(rng: random.Random, faces: Sequence[FontFace], font_size: tuple[int, int]):
    """Body, alternate (second face: form fill-ins, some paragraphs) and title styles."""
    size = rng.randint(*font_size)
    g = rng.randint(5, 70)
    body_color = (g + rng.randint(0, 8), g + rng.randint(0, 8), g + rng.randint(0, 16))
    body = _Style(rng.choice(faces), size, body_color)
    alt = body
    if len(faces) > 1 and rng.random() < 0.5:
        other = rng.choice([f for f in faces if f != body.face])
        if rng.random() < 0.35:  # pen ink
            color: RGB = (rng.randint(15, 50), rng.randint(25, 60), rng.randint(85, 140))
        else:
            g2 = rng.randint(5, 80)
            color = (g2, g2 + rng.randint(0, 8), g2 + rng.randint(0, 10))
        alt = _Style(other, max(6, round(size * rng.uniform(0.9, 1.15))), color)
    title_face = body.face if rng.random() < 0.7 else alt.face
    title = _Style(title_face, round(size * rng.uniform(1.3, 1.7)), body_color)
    return body, alt, title


def _background(nrng: np.random.Generator, rng: random.Random, width: int, height: int) -> np.ndarray:
    """Off-white paper: a tinted base, slow uneven shading and fine grain (float32 HxWx3)."""
    r = rng.randint(232, 252)
    g = r - rng.randint(0, 5)
    base = np.array([r, g, g - rng.randint(0, 10)], np.float32)  # white to faintly yellowed
    shading = cv2.resize(nrng.standard_normal((3, 4), dtype=np.float32), (width, height),
                         interpolation=cv2.INTER_CUBIC) * rng.uniform(1.0, 5.0)
    grain = nrng.standard_normal((height, width), dtype=np.float32) * rng.uniform(1.5, 4.0)
    return base + (shading + grain)[..., None]


def render_page(rng: random.Random, nrng: np.random.Generator, faces: Sequence[FontFace],
                words: list[str], weights: list[float], charset: Charset, width: int, height: int,
                font_size: tuple[int, int]) -> tuple[Image.Image, list[Word]]:
    """One synthetic page image and its words (boxes are exact, disjoint ink boxes)."""
    paper = np.clip(_background(nrng, rng, width, height), 0, 255).astype(np.uint8)
    image = Image.fromarray(paper, "RGB")
    scale = width * height / REFERENCE_AREA
    budget = max(3, round(rng.randint(20, 40) * scale))
    page = _PageBuilder(rng, image, charset, words, weights, budget)
    body, alt, title = _styles(rng, faces, font_size)
    usable = page.right - page.left
    size = body.size

    if rng.random() < 0.85:  # title
        texts = [rng.choice(TITLE_TERMS)]
        if rng.random() < 0.7:
            texts.insert(0, page.word())
        if rng.random() < 0.2:
            texts.insert(0, f"{rng.randint(1990, 2024)}년")
        align = "center" if rng.random() < 0.75 else "left"
        page.emit(page.place(texts, title, usable, gap=page.gap(title, 0.3, 0.6)), align)
        page.space(round(size * rng.uniform(0.6, 1.4)), rule=rng.random() < 0.4)

    while page.open:
        kind = rng.random()
        leading = rng.uniform(0.35, 1.0)
        if kind < 0.35:  # form fields: label, then values at a column (maybe handwritten)
            column = round(usable * rng.uniform(0.18, 0.32))
            colon = rng.random() < 0.5
            for _ in range(rng.randint(2, 5)):
                label = rng.choice(ADMIN_LABELS)
                line = page.place([label + (":" if colon else "")], body, usable)
                if not line:
                    continue
                start = max(column, line[-1].x + line[-1].mask.width + page.gap(body, 0.6, 1.2))
                values = _field_value(rng, label, page)
                line = page.place(values, alt, usable, start=start, pieces=line,
                                  gap=page.gap(alt))
                if not page.emit(line):
                    break
                page.space(round(size * leading * rng.uniform(0.9, 1.1)))
        elif kind < 0.80:  # paragraph: indented first line, full lines, a shorter last line
            style = alt if rng.random() < 0.3 else body
            lines = rng.randint(1, 4)
            for n in range(lines):
                indent = round(size * rng.uniform(0.5, 2.0)) if n == 0 and rng.random() < 0.5 else 0
                width_limit = usable - indent
                if n == lines - 1:
                    width_limit = round(width_limit * rng.uniform(0.3, 1.0))
                line = page.fill(page.token, style, width_limit, 12)
                if not page.emit(line, indent=indent):
                    break
                page.space(round(size * leading * rng.uniform(0.9, 1.1)))
        else:  # numbered items
            form = rng.choice(("{}.", "({})", "{})", "hangul"))
            indent = round(size * rng.uniform(0, 1.0))
            for n in range(1, rng.randint(2, 4) + 1):
                marker = "가나다라마바사"[n - 1] + "." if form == "hangul" else form.format(n)
                line = page.place([marker], body, usable)
                limit = round((usable - indent) * rng.uniform(0.4, 1.0))
                line = page.fill(page.token, body, limit, rng.randint(1, 6),
                                 start=line[-1].x + line[-1].mask.width + page.gap(body)
                                 if line else 0, pieces=line)
                if not page.emit(line, indent=indent):
                    break
                page.space(round(size * leading * rng.uniform(0.9, 1.1)))
        page.space(round(size * rng.uniform(0.3, 1.2)), rule=rng.random() < 0.15)
        if page.remaining <= 4 and rng.random() < 0.6:
            break

    if not page.full and rng.random() < 0.6:  # footer: date and signer, flushed right/center
        page.space(round(size * rng.uniform(0.2, 1.0)))
        if rng.random() < 0.5:
            date_line = page.place([f"{rng.randint(1995, 2024)}.{rng.randint(1, 12):02d}."
                                    f"{rng.randint(1, 28):02d}."], body, usable)
        else:
            date_line = page.place([f"{rng.randint(1995, 2024)}년", f"{rng.randint(1, 12)}월",
                                    f"{rng.randint(1, 28)}일"], body, usable)
        align = "center" if rng.random() < 0.5 else "right"
        page.remaining = max(page.remaining, len(date_line))
        if page.emit(date_line, align):
            page.space(round(size * rng.uniform(0.4, 1.0)))
            signer = page.place([rng.choice(("담당자", "신청인", "작성자", "대표자")) + ":"],
                                body, usable)
            signer = page.place([random_name(rng)], alt, usable, pieces=signer)
            page.remaining = max(page.remaining, len(signer))
            page.emit(signer, align)

    pixels = np.asarray(image, dtype=np.float32)
    if rng.random() < 0.3:
        pixels = cv2.GaussianBlur(pixels, (0, 0), rng.uniform(0.3, 0.6))
    pixels = pixels + nrng.standard_normal((height, width, 1), dtype=np.float32) * 1.5
    out = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
    return out, page.boxes


def _usable_faces(faces: list[FontFace], charset: Charset) -> list[FontFace]:
    """Faces that draw at least 90% of the charset's Hangul (others would redraw forever)."""
    hangul = "".join(c for c in charset.chars if is_hangul(c))
    keep = [f for f in faces
            if not hangul or sum(covers(f, c) for c in hangul) >= 0.9 * len(hangul)]
    dropped = [str(f) for f in faces if f not in keep]
    if dropped:
        warnings.warn(f"fonts without enough Hangul for {charset.name} skipped: {dropped}",
                      KocrWarning, stacklevel=3)
    if not keep:
        raise ValueError(f"none of the fonts {[str(f) for f in faces]} covers the Hangul of "
                         f"charset {charset.name!r}")
    return keep


def _page_seed(seed: int, i: int) -> int:
    """``seed * 100003 + i``, folded to 64 bits (random.Random would equate -s and s)."""
    return (seed * 100003 + i) % 2**64


def _remove_stale(out_dir: Path, count: int) -> None:
    """Drop numbered pages at index >= count and what a killed run's writes left behind."""
    sweep_stale(out_dir)  # once here: the page writes below do not sweep the folder each time
    for path in out_dir.iterdir():
        if path.name.startswith("page_") and path.name.endswith(".tmp"):  # older versions' temp names
            path.unlink(missing_ok=True)
            continue
        match = PAGE_NAME.match(path.name)
        if match and int(match.group(1)) >= count:
            path.unlink(missing_ok=True)


def _written_here(name: str) -> bool:
    """A name ``generate_pages`` writes (a page, the contact sheet, a write's temporary file)."""
    return bool(PAGE_NAME.match(name)) or name == SHEET or (name.startswith(("page_", ".")) and name.endswith(".tmp"))


def pages_key(seed: int, width: int, height: int, charset_name: str, font_size: tuple[int, int],
              wear: degrade_mod.DegradeConfig, faces: Sequence[FontFace]) -> str:
    """What page ``i`` depends on besides ``i`` (``set_key.generator_key``; not ``count`` or
    ``contact_sheet``). A killed run is continued only under the same key."""
    knobs = {"seed": seed, "width": width, "height": height, "font_size": list(font_size),
             "degrade": wear.as_params(), "fonts": [str(face) for face in faces]}
    return generator_key(knobs, charset_name, [face.path for face in faces])


def page_settings(count: int, fonts: list[str], width: int = 1000, height: int = 700,
                  charset_name: str = "korean_g2", font_size: tuple[int, int] = (22, 40), font_dirs: Sequence[str | os.PathLike] = DEFAULT_FONT_DIRS,
                  degrade: degrade_mod.DegradeConfig | str | dict | None = None,
                  ) -> tuple[tuple[int, int], degrade_mod.DegradeConfig, Charset, list[FontFace]]:
    """``generate_pages``' settings checked (``sample:`` of params.yaml): the font-size range, the wear,
    the charset and the usable faces; SynthConfigError naming ``sample.KEY`` when one cannot work."""
    if count < 1:  # an empty folder: prepare-aihub finds no page in it
        raise SynthConfigError(f"sample.count must be >= 1, got {count}")
    lo, hi = int(font_size[0]), int(font_size[1])
    if not 6 <= lo <= hi:
        raise SynthConfigError(f"sample.font_size must be (lo, hi) with 6 <= lo <= hi, got {font_size}")
    if width < 8 * hi or height < 4 * hi:
        raise SynthConfigError(f"sample.width x height {width}x{height} is too small for font size {hi} "
                               f"(need at least {8 * hi}x{4 * hi})")
    wear = (degrade if isinstance(degrade, degrade_mod.DegradeConfig)
            else degrade_mod.DegradeConfig.from_params(degrade, "sample.degrade"))
    try:
        charset = Charset.from_spec(charset_name)
    except ValueError as exc:
        raise SynthConfigError(f"sample.charset_name: {exc}") from None
    try:
        faces = _usable_faces(find_fonts(fonts, font_dirs), charset)
    except ValueError as exc:  # no file matches the patterns, or none covers the charset's Hangul
        raise SynthConfigError(f"sample.fonts: {exc}") from None
    return (lo, hi), wear, charset, faces


def check_out(out: Path) -> None:
    """Refuse an ``out`` that publishing the pages would destroy: a symbolic link, a file, or a folder
    holding anything but pages and the contact sheet (a folder of the user's, ``.``). ``kocr synth-pages``
    calls it before its MLflow run starts, as ``synth-lines`` checks its set, so a refused folder leaves
    no FAILED run."""
    if out.is_symlink():  # publishing replaces the folder: it would have to delete the link
        raise OutFolderError(f"--out {out}: a symbolic link (to {os.readlink(out)}); give the folder itself, "
                               "or a new path")
    check_out_folder(out, _written_here, "synth-pages does not write", "a folder of pages")


def generate_pages(out_dir: str | os.PathLike, count: int, seed: int, fonts: list[str],
                   width: int = 1000, height: int = 700, charset_name: str = "korean_g2",
                   font_size: tuple[int, int] = (22, 40), progress: bool = True,
                   font_dirs: Sequence[str | os.PathLike] = DEFAULT_FONT_DIRS,
                   degrade: degrade_mod.DegradeConfig | str | dict | None = None,
                   contact_sheet: int = 0) -> list[Path]:
    """Write ``count`` synthetic pages ``page_{i:05d}.jpg/.json`` into ``out_dir``.

    ``fonts`` are file-name patterns for ``find_fonts``. Page ``i`` depends only on
    (``seed``, ``i``) and the other arguments, so reruns are byte-identical. Returns the JSON paths.

    The pages are written into ``out_dir.partial`` beside the folder (``kocr.atomic.PartialFolder``,
    as ``synth_lines`` writes its set), which replaces ``out_dir`` whole when every page is there:
    a killed run leaves the earlier set as it was, never pages of two runs in one folder. The same
    command run again keeps the pages a killed run of the same ``pages_key`` wrote there (each image
    is written before its JSON, both whole or not at all, so a page whose JSON is there is whole)
    and draws the rest; a run of other settings
    starts ``out_dir.partial`` over. An ``out_dir`` holding anything but pages and the contact sheet
    (a folder of the user's, ``.``) is refused before anything is written, never replaced.

    ``degrade`` (a ``DegradeConfig``, a preset name or a params mapping; None: off) adds scan
    wear from ``training.data.degrade`` with its own generator, so pages without it stay
    byte-identical to earlier runs. ``contact_sheet`` > 0 writes ``contact_sheet.png`` with that
    many page thumbnails, word boxes outlined, into ``out_dir``.
    """
    (lo, hi), wear, charset, faces = page_settings(count, fonts, width, height, charset_name, font_size,
                                                   font_dirs, degrade)
    words, weights = load_lexicon(charset)
    out = Path(out_dir)
    check_out(out)
    key = pages_key(seed, width, height, charset.name, (lo, hi), wear, faces)
    folder = PartialFolder(out, keyed=True)  # a second synth-pages on the same folder stops, named
    try:
        if not folder.started_with(key):
            folder.restart(key)
        stage = folder.partial
        _remove_stale(stage, count)
        kept = sum(1 for i in range(count) if (stage / f"page_{i:05d}.json").is_file())
        if kept:
            print(f"synth-pages: resuming {stage}: {kept} of {count} pages kept from a killed run",
                  file=sys.stderr)
        paths: list[Path] = []
        for i in tqdm(range(count), desc="synthetic pages", unit="page", disable=not progress):
            name = f"page_{i:05d}"
            image_path, json_path = stage / f"{name}.jpg", stage / f"{name}.json"
            paths.append(json_path)
            if json_path.is_file():  # written whole, after its image, by a killed run of this key
                continue
            page_seed = _page_seed(seed, i)
            rng = random.Random(page_seed)
            nrng = np.random.default_rng(page_seed)
            image, page_words = render_page(rng, nrng, faces, words, weights, charset, width,
                                            height, (lo, hi))
            if wear.enabled:
                image = degrade_page(image, page_words, wear, page_seed)
            page = Page(image_path.name, width, height, page_words, category=rng.choice(CATEGORIES),
                        extra={"image.make.code": f"{rng.randint(1000, 6999)}000",
                               "image.make.year": str(rng.randint(1995, 2023))})
            # encoded in memory, then written by Python, which raises on a short write: Pillow's JPEG
            # encoder writes to a file's descriptor itself and ignores one, so a file-size limit
            # (ulimit -f) or a disk that filled mid-write left a cut image under its name, beside a whole JSON
            encoded = io.BytesIO()
            image.save(encoded, format="JPEG", quality=JPEG_QUALITY)
            write_bytes(image_path, encoded.getvalue(), sweep=False)
            write_page(page, json_path, sweep=False)
        sheet = stage / SHEET
        if contact_sheet > 0 and paths:
            write_page_sheet(paths[:contact_sheet], sheet, faces)
        else:
            sheet.unlink(missing_ok=True)
        folder.publish()
    finally:
        folder.unlock()  # after a failure the partial pages stay, under their key, for the next run
    return [out / path.name for path in paths]


def degrade_page(image: Image.Image, words: Sequence[Word], config: degrade_mod.DegradeConfig,
                 page_seed: int) -> Image.Image:
    """``image`` with scan wear; highlighter, scribbles and underlines land on the words' boxes."""
    rng = np.random.default_rng(np.random.SeedSequence([page_seed, 0xDE9]))
    boxes = [(int(x), int(y), int(x + w), int(y + h)) for (x, y, w, h) in (wd.bbox for wd in words)]
    pixels = degrade_mod.apply(np.asarray(image, dtype=np.float32), rng, config, boxes or None)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


def write_page_sheet(json_paths: Sequence[Path], path: Path, faces: Sequence[FontFace],
                     thumb_width: int = 360) -> Path:
    """Thumbnails of the pages with their word boxes outlined, captioned with name and word count."""
    tiles = []
    for json_path in json_paths:
        page = read_page(json_path)
        with Image.open(json_path.parent / page.image_name) as img:
            thumb = img.convert("RGB")
        draw = ImageDraw.Draw(thumb)
        for word in page.words:
            x, y, w, h = word.bbox
            draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(220, 30, 30), width=2)
        tiles.append((thumb, f"{page.image_name}: {len(page.words)} words"))
    ratio = max(t.height / t.width for t, _ in tiles)
    return write_sheet(tiles, path, faces, columns=3,
                       tile_size=(thumb_width, round(thumb_width * ratio)), caption_size=14)

