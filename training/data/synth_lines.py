"""Synthetic Korean word and short-line images written straight into an LMDB recognition set.

The trdg-style generator of ``kocr synth-lines``: text from the administrative-document token mix
of ``training.data.lexicon`` (or a user's text file), one to a few words per image, rendered in
print and handwriting faces chosen by file-name pattern. A string is only ever drawn in a face
that has a glyph for each of its characters (no tofu boxes). Then trdg's knobs: skew, sine /
cosine / random warp, margins, background (white, Gaussian noise, quasicrystal, pictures),
output height; and the scan degradations of ``training.data.degrade``. For signs and form
crops, off unless asked: letter spacing, coloured grounds as seen in grey, light-on-dark
(``invert``), table rules beside the text, a hand's unevenness, strokes bent as another hand
draws them (``stroke_warp``), heavier strokes (``embolden``) and scanner streaks.

Sample ``i`` depends only on (``seed``, ``i``) and the config, so the set is byte-identical
whatever the number of worker processes. Beside the LMDB (standard layout, NFC labels) the output
folder holds ``manifest.tsv`` (index, font, background, label) and ``contact_sheet.png``.

Example:
    >>> config = LinesConfig.from_params({"count": 100, "seed": 1, "fonts": ["NanumGothic.ttf"]})
    >>> summary = generate_lines("data/synth_lines", config, progress=False)  # doctest: +SKIP
    >>> summary["count"]  # doctest: +SKIP
    100
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import re
import sys
import unicodedata
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from training.charset import Charset, not_utf8, text_lines
from training.data import degrade
from training.data.backgrounds import KINDS, image_files, make_background
from training.data.contact_sheet import write_sheet
from kocr.atomic import check_out_folder
from kocr.params import ParamsError, typed
from kocr import KocrWarning
from training.data.degrade import SynthConfigError
from training.data.fonts import DEFAULT_FONT_DIRS, FontFace, covers, find_fonts, load_font
from training.data.lexicon import draw_token, is_hangul, load_lexicon
from training.data.lmdb_store import LMDB_FILES, LmdbWriter
from training.data.set_key import generator_key
from training.data.workers import end_pool, ordered_map, start_pool

DISTORTIONS = ("none", "sine", "cosine", "random")
FORMATS = ("png", "jpg")
DEFAULT_FONTS = ("NanumGothic.ttf", "NanumMyeongjo.ttf", "NanumBarunGothic.ttf", "UnDotum.ttf",
                 "UnBatang.ttf", "NanumPen.ttf", "NanumBrush.ttf", "UnPilgi.ttf")
SHARES = ("invert", "letter_spacing", "colour", "rules", "char_jitter", "streak", "arc", "edge_clutter",
          "edge_clip", "stroke_warp", "embolden", "latin_words")  # knobs that are a share of images (latin_words: of words)
TOKEN_TRIES = 12  # draws per word before giving up on that word in the chosen face


def _typed(key: str, value: Any, kind: type, optional: bool = False) -> Any:
    """``kocr.params.typed`` raising SynthConfigError (the same one line, naming ``key``)."""
    try:
        return typed(key, value, kind, optional)
    except ParamsError as exc:
        raise SynthConfigError(exc.detail) from None


def _pair(value: Any, name: str, kind: type = float) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value, value)
    try:
        lo, hi = (kind(v) for v in value)
    except (TypeError, ValueError, OverflowError):  # int(inf) overflows
        raise SynthConfigError(f"{name}: expected [lo, hi], got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN passes every range check below and in check()
        raise SynthConfigError(f"{name}: expected [lo, hi] of finite numbers, got {value!r}")
    if lo > hi:
        raise SynthConfigError(f"{name}: lo {lo} is above hi {hi}")
    return lo, hi


def _weights(value: Any, name: str, known: Sequence[str]) -> dict[str, float]:
    if isinstance(value, str):
        value = {value: 1.0}
    if not isinstance(value, Mapping):
        raise SynthConfigError(f"{name}: expected a mapping kind -> weight, got {value!r}")
    unknown = set(value) - set(known)
    if unknown:
        raise SynthConfigError(f"{name}: unknown kinds {sorted(unknown)}; known: {', '.join(known)}")
    weights = {k: _typed(f"{name}.{k}", v, float) for k, v in value.items()}
    # NaN passes both comparisons, and a NaN or inf weight (or a sum that overflows) stopped a render worker
    # with random.choices' "Total of weights must be finite"
    if (not all(math.isfinite(v) and v >= 0 for v in weights.values())
            or not 0 < sum(weights.values()) < math.inf):
        raise SynthConfigError(f"{name}: weights must be finite, >= 0 and not all 0, got {weights}")
    return weights


@dataclass(frozen=True)
class LinesConfig:
    """Every knob of ``kocr synth-lines`` (the ``synth_lines:`` section of params.yaml).

    Sizes in pixels are at the rendering size (``font_size``) unless said otherwise; the image
    is scaled to ``height`` at the end. ``margins`` are maxima (top, left, bottom, right), each
    drawn from 0 to the value. ``skew`` is in degrees: uniform in [-skew, skew] when
    ``random_skew``, else always ``skew``. ``backgrounds`` and ``distortion`` map a kind to its
    weight. ``text_file`` (one string per line) replaces the lexicon mix.
    """

    count: int = 1000
    seed: int = 0
    fonts: tuple[str, ...] = DEFAULT_FONTS
    font_dirs: tuple[str, ...] = DEFAULT_FONT_DIRS
    charset_name: str = "korean_g2"
    text_file: str | None = None
    lexicon_top_n: int = 30000
    latin_words: float = 0.0  # share of lexicon words drawn in Latin script: romanised words, measures, sign words
    words_per_line: tuple[int, int] = (1, 3)
    max_chars: int = 25
    font_size: tuple[int, int] = (36, 56)
    height: int = 64
    skew: float = 2.0
    random_skew: bool = True
    margins: tuple[int, int, int, int] = (6, 8, 6, 8)
    backgrounds: Mapping[str, float] = field(default_factory=lambda: {
        "white": 0.35, "noise": 0.45, "quasicrystal": 0.2})
    background_images: str | None = None
    distortion: Mapping[str, float] = field(default_factory=lambda: {
        "none": 0.8, "sine": 0.08, "cosine": 0.07, "random": 0.05})
    distortion_amplitude: tuple[float, float] = (1.0, 4.0)
    distortion_period: tuple[float, float] = (2.0, 6.0)  # multiples of the font size
    ink: tuple[float, float] = (0.0, 80.0)  # grey level of the text
    invert: float = 0.0  # share of images negated at the end: light text on a dark ground (signs)
    letter_spacing: float = 0.0  # share of images drawn letter-spaced (signs, headings); labels keep no spaces
    letter_spacing_em: tuple[float, float] = (0.15, 0.7)  # extra space after each character, in font sizes
    colour: float = 0.0  # share of images drawn as a coloured sign looks in grey: ground and text at random levels
    colour_contrast: tuple[float, float] = (60.0, 200.0)  # grey-level gap between ground and text there
    rules: float = 0.0  # share of images with table rules / box edges beside the text (crops of form cells)
    char_jitter: float = 0.0  # share of images whose characters each sit, size and lean a little differently (a hand's unevenness)
    char_jitter_amount: tuple[float, float] = (0.03, 0.1)  # its strength: baseline shift s.d. in font sizes (see glyph_jitter)
    stroke_warp: float = 0.0  # share of images whose strokes are bent by a smooth random field (another hand's shapes)
    stroke_warp_amount: tuple[float, float] = (0.03, 0.08)  # the field's largest shift, in font sizes (see bend_strokes)
    embolden: float = 0.0  # share of images whose strokes are thickened: a heavier weight of the same face (signs, bold print)
    embolden_amount: tuple[float, float] = (0.015, 0.045)  # how far each stroke's edge moves out, in font sizes
    streak: float = 0.0  # share of images crossed by a light band that wipes the strokes under it (scanner streak, fold)
    streak_width: tuple[float, float] = (0.04, 0.12)  # the band's width as a share of the image height
    arc: float = 0.0  # share of images whose line is bent along a circular arc, each glyph turned with it (round signs)
    arc_degrees: tuple[float, float] = (15.0, 60.0)  # the angle the whole line spans on its circle
    edge_clutter: float = 0.0  # share of images with a cut-off piece of a neighbouring glyph at the left or right edge
    edge_clutter_share: tuple[float, float] = (0.15, 0.45)  # how much of that glyph's width shows
    edge_clip: float = 0.0  # share of images whose text is cut at the top or bottom edge, as a tight detector box cuts it
    edge_clip_share: tuple[float, float] = (0.03, 0.12)  # how much of the text's height is cut off there
    degrade: degrade.DegradeConfig = field(default_factory=lambda: degrade.DegradeConfig.preset("mild"))
    image_format: str = "png"
    workers: int = 2
    contact_sheet: int = 48  # samples shown in contact_sheet.png (0: none)

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None, origin: Mapping[str, str] | None = None,
                    **overrides: Any) -> "LinesConfig":
        """Build from the ``synth_lines:`` mapping; ``overrides`` (not None) win. Checks every value.

        Errors name ``synth_lines.KEY``, or ``SECTION.KEY`` where ``origin`` says the key came from
        another section (``kocr synth-lines --section``)."""
        origin = origin or {}
        raw = dict(params or {})
        raw.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in fields(cls)}
        for where in sorted({origin.get(k, "synth_lines") for k in raw}):
            unknown = sorted(k for k in set(raw) - names if origin.get(k, "synth_lines") == where)
            if unknown:
                raise SynthConfigError(f"{where}: unknown keys {unknown}; known: {', '.join(sorted(names))}")

        def at(key: str) -> str:
            return f"{origin.get(key, 'synth_lines')}.{key}"

        kw: dict[str, Any] = {}
        for key, value in raw.items():
            if key in ("fonts", "font_dirs"):
                if not (isinstance(value, str) and value or isinstance(value, (list, tuple))
                        and all(isinstance(v, str) and v for v in value)):
                    raise SynthConfigError(f"{at(key)} {value!r}: expected a file-name pattern or a list of them")
                value = (value,) if isinstance(value, str) else tuple(value)
            elif key in ("words_per_line", "font_size"):
                value = _pair(value, at(key), int)
            elif key in ("distortion_amplitude", "distortion_period", "ink", "letter_spacing_em",
                         "colour_contrast", "char_jitter_amount", "stroke_warp_amount", "embolden_amount", "streak_width",
                         "arc_degrees",
                         "edge_clutter_share", "edge_clip_share"):
                value = _pair(value, at(key))
            elif key == "margins":
                value = (value,) * 4 if isinstance(value, (int, float)) else value
                value = tuple(value) if isinstance(value, (list, tuple)) else ()
                if len(value) != 4 or any(_typed(at(key), v, int) < 0 for v in value):
                    raise SynthConfigError(f"{at(key)}: expected 4 values >= 0 "
                                           f"(top, left, bottom, right), got {raw[key]!r}")
                value = tuple(int(v) for v in value)
            elif key == "backgrounds":
                value = _weights(value, at(key), KINDS)
            elif key == "distortion":
                value = _weights(value, at(key), DISTORTIONS)
            elif key == "degrade":
                value = degrade.DegradeConfig.from_params(value, at(key))
            elif key in ("count", "seed", "lexicon_top_n", "max_chars", "height", "workers",
                         "contact_sheet"):
                value = _typed(at(key), value, int)
            elif key == "skew" or key in SHARES:
                value = _typed(at(key), value, float)
            elif key == "random_skew":
                value = _typed(at(key), value, bool)
            elif key in ("charset_name", "image_format"):
                value = _typed(at(key), value, str)
            elif key in ("text_file", "background_images"):
                value = _typed(at(key), value, str, optional=True)
            kw[key] = value
        config = cls(**kw)
        config.check(at)
        return config

    def check(self, at: Callable[[str], str] = lambda key: f"synth_lines.{key}") -> None:
        """Raise SynthConfigError naming the first setting that cannot work (``at(key)``: its full key)."""
        if self.count < 1:  # an empty set: train refuses it, and prepare's crops would be none
            raise SynthConfigError(f"{at('count')} must be >= 1, got {self.count}")
        if self.words_per_line[0] < 1:
            raise SynthConfigError(f"{at('words_per_line')} must start at 1 or more, got {self.words_per_line}")
        if self.font_size[0] < 8:
            raise SynthConfigError(f"{at('font_size')} must be 8 or more, got {self.font_size}")
        if self.height < 0 or 0 < self.height < 8:
            raise SynthConfigError(f"{at('height')} must be 0 (keep) or >= 8, got {self.height}")
        if self.max_chars < 1:
            raise SynthConfigError(f"{at('max_chars')} must be >= 1, got {self.max_chars}")
        if not 0 <= abs(self.skew) < 45:
            raise SynthConfigError(f"{at('skew')} must be below 45 degrees, got {self.skew}")
        if self.image_format not in FORMATS:
            raise SynthConfigError(f"{at('image_format')} must be one of {FORMATS}, got {self.image_format!r}")
        if not 0 <= self.ink[0] <= self.ink[1] <= 255:
            raise SynthConfigError(f"{at('ink')} must be grey levels in [0, 255], got {self.ink}")
        for name in SHARES:
            if not 0 <= getattr(self, name) <= 1:
                raise SynthConfigError(f"{at(name)} is a share of images in [0, 1], "
                                       f"got {getattr(self, name)}")
        if self.letter_spacing_em[0] < 0:
            raise SynthConfigError(f"{at('letter_spacing_em')} must be >= 0, got {self.letter_spacing_em}")
        if not 0 <= self.char_jitter_amount[0] <= self.char_jitter_amount[1] <= 0.3:
            raise SynthConfigError(f"{at('char_jitter_amount')} must be font-size fractions in [0, 0.3], "
                                   f"got {self.char_jitter_amount}")
        if not 0 < self.stroke_warp_amount[0] <= self.stroke_warp_amount[1] <= 0.25:
            raise SynthConfigError(f"{at('stroke_warp_amount')} must be font-size fractions in (0, 0.25], "
                                   f"got {self.stroke_warp_amount}")
        if not 0 < self.embolden_amount[0] <= self.embolden_amount[1] <= 0.1:
            raise SynthConfigError(f"{at('embolden_amount')} must be font-size fractions in (0, 0.1], "
                                   f"got {self.embolden_amount}")
        if not 0 < self.streak_width[0] <= self.streak_width[1] <= 0.5:
            raise SynthConfigError(f"{at('streak_width')} must be shares of the height in (0, 0.5], "
                                   f"got {self.streak_width}")
        if not 0 < self.arc_degrees[0] <= self.arc_degrees[1] <= 180:
            raise SynthConfigError(f"{at('arc_degrees')} must be angles in (0, 180], got {self.arc_degrees}")
        if not 0 < self.edge_clutter_share[0] <= self.edge_clutter_share[1] < 1:
            raise SynthConfigError(f"{at('edge_clutter_share')} must be shares of a glyph's width in (0, 1), "
                                   f"got {self.edge_clutter_share}")
        if not 0 < self.edge_clip_share[0] <= self.edge_clip_share[1] <= 0.3:
            raise SynthConfigError(f"{at('edge_clip_share')} must be shares of the text's height in (0, 0.3], "
                                   f"got {self.edge_clip_share}")
        if not 0 < self.colour_contrast[0] <= self.colour_contrast[1] <= 255:
            raise SynthConfigError(f"{at('colour_contrast')} must be grey-level gaps in (0, 255], "
                                   f"got {self.colour_contrast}")
        if self.distortion_period[0] <= 0:
            raise SynthConfigError(f"{at('distortion_period')} must be > 0, got {self.distortion_period}")
        if self.distortion_amplitude[0] < 0:
            raise SynthConfigError(f"{at('distortion_amplitude')} must be >= 0 pixels, got {self.distortion_amplitude}")
        if self.lexicon_top_n < 1:
            raise SynthConfigError(f"{at('lexicon_top_n')} must be >= 1 (words of wordfreq's list), "
                                   f"got {self.lexicon_top_n}")
        if self.workers < 0 or self.contact_sheet < 0:
            raise SynthConfigError(f"{at('workers' if self.workers < 0 else 'contact_sheet')} must be >= 0, "
                                   f"got {min(self.workers, self.contact_sheet)}")
        if self.backgrounds.get("image", 0) > 0 and not self.background_images:
            raise SynthConfigError(f"{at('backgrounds')} gives 'image' a weight but "
                                   f"{at('background_images')} names no folder")
        if self.background_images and not Path(self.background_images).is_dir():
            raise SynthConfigError(f"{at('background_images')} {self.background_images!r}: no such folder")

    def as_params(self) -> dict[str, Any]:
        """Flat, loggable view (MLflow params)."""
        out = asdict(self)
        out["degrade"] = self.degrade.as_params()
        return out


@dataclass
class Sample:
    """One generated image: encoded bytes, NFC label, and how it was made."""

    image: bytes
    label: str
    font: str
    background: str


# -- the per-process context -----------------------------------------------------------------

@dataclass
class _Context:
    config: LinesConfig
    charset: Charset
    faces: list[FontFace]
    words: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    bg_files: tuple[str, ...] = ()

    @classmethod
    def build(cls, config: LinesConfig) -> "_Context":
        charset = Charset.from_spec(config.charset_name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warned once in the parent already
            faces = find_fonts(list(config.fonts), config.font_dirs)
        ctx = cls(config, charset, faces)
        if config.text_file:
            ctx.texts = load_texts(config.text_file, charset, config.max_chars)
        else:
            try:
                ctx.words, ctx.weights = load_lexicon(charset, top_n=config.lexicon_top_n)
            except ValueError as exc:  # no word of the list fits the charset
                raise SynthConfigError(f"synth_lines.lexicon_top_n: {exc}") from None
        if config.background_images and config.backgrounds.get("image", 0) > 0:
            ctx.bg_files = _background_files(config)
        return ctx


def _background_files(config: LinesConfig) -> tuple[str, ...]:
    """The pictures under ``background_images``; SynthConfigError naming the key when there are none."""
    try:
        return image_files(config.background_images)
    except ValueError as exc:
        raise SynthConfigError(f"synth_lines.background_images: {exc}") from None


def load_texts(path: str | os.PathLike, charset: Charset, max_chars: int | None = None) -> list[str]:
    """Strings of a UTF-8 text file, one per line, NFC, outer spaces stripped, inner runs of space
    collapsed; lines holding a character outside ``charset`` or longer than ``max_chars`` (never
    drawn: a label may not pass it) are dropped, with a warning."""
    path = Path(path)
    if not path.is_file():
        raise SynthConfigError(f"{path}: synth_lines.text_file does not exist")
    try:
        text_all = path.read_bytes().decode("utf-8-sig")  # a byte-order mark is no character
    except UnicodeDecodeError as exc:
        raise SynthConfigError(f"{path}: synth_lines.text_file is {not_utf8(exc)}") from None
    # lines end at LF, CR LF or CR only: other breaks (U+2028, …) are a space within the line, with a warning
    lines = text_lines(text_all, path)
    texts, outside, too_long = [], 0, 0
    for line in lines:
        text = " ".join(unicodedata.normalize("NFC", line).split())
        if not text:
            continue
        if charset.missing(text):
            outside += 1
        elif max_chars is not None and len(text) > max_chars:
            too_long += 1
        else:
            texts.append(text)
    why = [f"{outside} lines hold characters outside charset {charset.name!r}"] if outside else []
    why += [f"{too_long} lines are longer than synth_lines.max_chars ({max_chars})"] if too_long else []
    if not texts:
        raise SynthConfigError(f"{path}: no line of synth_lines.text_file can be drawn: "
                               + ("; ".join(why) or "the file holds no text"))
    if why:
        warnings.warn(f"{path}: {'; '.join(why)}; skipped", KocrWarning, stacklevel=2)
    return texts


_CTX: _Context | None = None


def _context(config: LinesConfig) -> _Context:
    global _CTX
    if _CTX is None or _CTX.config != config:
        _CTX = _Context.build(config)
    return _CTX


# -- rendering -------------------------------------------------------------------------------

def sample_rngs(seed: int, index: int) -> tuple[random.Random, np.random.Generator]:
    """Independent generators for sample ``index`` of a set made with ``seed``."""
    seq = np.random.SeedSequence([seed % 2**64, index])
    state = seq.generate_state(2, np.uint64)
    return random.Random(int(state[0]) << 64 | int(state[1])), np.random.default_rng(seq)


def _token(rng: random.Random, ctx: _Context) -> str:
    if ctx.texts:
        return ctx.texts[rng.randrange(len(ctx.texts))]
    return draw_token(rng, ctx.words, ctx.weights, ctx.charset, ctx.config.latin_words)


def _pick(rng: random.Random, weights: Mapping[str, float], order: Sequence[str]) -> str:
    """A kind drawn by weight, the kinds taken in ``order`` so that equal mappings written in
    another key order (equal settings, one resume key) draw the same sample."""
    kinds = [k for k in order if k in weights]
    return rng.choices(kinds, weights=[weights[k] for k in kinds])[0]


def line_text(rng: random.Random, ctx: _Context, face: FontFace) -> str:
    """Words joined by single spaces, each drawable in ``face`` and in the charset; '' if none."""
    config = ctx.config
    tokens: list[str] = []
    for _ in range(rng.randint(*config.words_per_line)):
        for _attempt in range(TOKEN_TRIES):
            token = _token(rng, ctx)
            if token and covers(face, token) and not ctx.charset.missing(token):
                break
        else:
            continue
        if len(" ".join(tokens + [token])) > config.max_chars:
            if tokens:
                break
            continue
        tokens.append(token)
    return " ".join(tokens)


def _advance(font: ImageFont.FreeTypeFont, ch: str, tracking: float) -> float:
    """Pen advance after ``ch`` with ``tracking`` px of letter spacing: three times that after a
    space, so letter-spaced words stay further apart than their letters."""
    return font.getlength(ch) + tracking * (3 if ch == " " else 1)


Jitter = tuple[float, float, float]  # one character's (baseline shift in font sizes, scale, degrees)


def glyph_jitter(rng: random.Random, n: int, amount: tuple[float, float]) -> list[Jitter]:
    """Per-character unevenness of a hand for ``n`` characters: at strength ``a`` drawn from
    ``amount``, each character's baseline moves by N(0, a) font sizes, its size by a factor
    in 1 ± 1.5a and its lean by N(0, 40a) degrees."""
    a = rng.uniform(*amount)
    return [(rng.gauss(0.0, a), 1.0 + rng.uniform(-1.5 * a, 1.5 * a), rng.gauss(0.0, 40.0 * a))
            for _ in range(n)]


def _jittered_mask(text: str, face: FontFace, size: int, tracking: float,
                   jitter: Sequence[Jitter]) -> Image.Image:
    """``text`` drawn one character at a time, each moved, scaled and turned about its centre."""
    canvas = np.zeros((3 * size, int(sum(load_font(face, size).getlength(ch) for ch in text) * 1.5
                                      + len(text) * tracking * 3 + 3 * size)), np.uint8)
    x, baseline = float(size), 2.0 * size
    for ch, (shift, scale, degrees) in zip(text, jitter):
        font = load_font(face, max(8, round(size * scale)))
        left, top, right, bottom = font.getbbox(ch, anchor="ls")
        if ch != " " and right > left and bottom > top:
            glyph = Image.new("L", (right - left + 2, bottom - top + 2), 0)
            ImageDraw.Draw(glyph).text((1 - left, 1 - top), ch, font=font, fill=255, anchor="ls")
            turned = np.asarray(glyph.rotate(degrees, resample=Image.Resampling.BILINEAR, expand=True))
            cx = x + (left + right) / 2  # the glyph's centre where it would sit unmoved
            cy = baseline + shift * size + (top + bottom) / 2
            y0, x0 = round(cy - turned.shape[0] / 2), round(cx - turned.shape[1] / 2)
            ys = slice(max(y0, 0), min(y0 + turned.shape[0], canvas.shape[0]))
            xs = slice(max(x0, 0), min(x0 + turned.shape[1], canvas.shape[1]))
            piece = turned[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
            canvas[ys, xs] = np.maximum(canvas[ys, xs], piece)
        x += _advance(font, ch, tracking)
    return Image.fromarray(canvas, "L")


def _ink_mask(text: str, face: FontFace, size: int, tracking: float = 0.0,
              jitter: Sequence[Jitter] | None = None) -> np.ndarray | None:
    """White-on-black float32 coverage of ``text``, cropped to its ink; None when nothing is drawn.

    ``tracking`` (pixels) is extra space after every character, three times that after a space so
    words stay further apart than letters. ``jitter`` (one entry per character, glyph_jitter)
    draws each character on its own, moved, scaled and turned.
    """
    font = load_font(face, size)
    left, top, right, bottom = font.getbbox(text, anchor="ls")
    if jitter:
        canvas = _jittered_mask(text, face, size, tracking, jitter)
    elif tracking <= 0:
        canvas = Image.new("L", (right - left + 4, bottom - top + 4), 0)
        ImageDraw.Draw(canvas).text((2 - left, 2 - top), text, font=font, fill=255, anchor="ls")
    else:
        advances = [_advance(font, ch, tracking) for ch in text]
        width = int(math.ceil(sum(advances) + right - font.getlength(text))) + size + 4
        canvas = Image.new("L", (width, bottom - top + 4), 0)
        draw, x = ImageDraw.Draw(canvas), 2.0 - min(left, 0)
        for ch, advance in zip(text, advances):
            draw.text((x, 2 - top), ch, font=font, fill=255, anchor="ls")
            x += advance
    box = canvas.getbbox()
    if box is None:
        return None
    return np.asarray(canvas.crop(box), dtype=np.float32)


def embolden(mask: np.ndarray, radius: float) -> np.ndarray:
    """``mask`` (white-on-black coverage) with every stroke's edge moved out by ``radius`` px: the
    same letters in a heavier weight, as sign faces and bold print draw them. The canvas grows by
    the radius on every side so no ink is cut; counters narrow and may close, as in a heavy face.
    A radius below half a pixel returns ``mask`` itself."""
    r = int(round(radius))
    if r < 1:
        return mask
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(np.pad(mask, r), disc)


def bend_strokes(mask: np.ndarray, rng: np.random.Generator, shift: float, cell: float) -> np.ndarray:
    """``mask`` with its strokes bent by a smooth random displacement field, as another hand draws
    the same letters: each pixel is moved by up to ``shift`` px, the field varying over about
    ``cell`` px (a jamo's size), so strokes curve, lengthen or shorten and their joins move while
    the letters stay where they were. The canvas grows by ``shift`` on every side (no ink lost)."""
    if shift <= 0:
        return mask
    pad = int(math.ceil(shift)) + 1
    mask = np.pad(mask, pad)
    h, w = mask.shape
    grid = (max(2, int(math.ceil(h / cell)) + 1), max(2, int(math.ceil(w / cell)) + 1))
    field = [cv2.resize(rng.uniform(-shift, shift, grid).astype(np.float32), (w, h),
                        interpolation=cv2.INTER_CUBIC) for _ in range(2)]
    field = [np.clip(f, -shift, shift) for f in field]  # cubic overshoot stays inside the padding
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(mask, xs + field[0], ys + field[1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def add_rules(mask: np.ndarray, rng: random.Random, size: int) -> np.ndarray:
    """``mask`` with one or two straight rules drawn beside the text, as the cell borders and box
    edges a detector's crop of a form keeps: each on a random side, a gap away, full or partial."""
    thick = max(1, round(size * rng.uniform(0.03, 0.09)))
    for side in rng.sample(("top", "bottom", "left", "right"), rng.choice((1, 1, 2))):
        gap = rng.randint(0, max(1, size // 4))
        horizontal = side in ("top", "bottom")
        pad = [(0, 0), (0, 0)]
        pad[0 if horizontal else 1] = (gap + thick, 0) if side in ("top", "left") else (0, gap + thick)
        mask = np.pad(mask, pad)
        length = mask.shape[1 if horizontal else 0]
        start = 0 if rng.random() < 0.5 else rng.randint(0, length // 2)
        stop = length if rng.random() < 0.5 else rng.randint(start + max(1, length // 3), length)
        level = np.float32(rng.uniform(150, 255))
        rows = slice(0, thick) if side in ("top", "left") else slice(-thick, None)
        if horizontal:
            mask[rows, start:stop] = np.maximum(mask[rows, start:stop], level)
        else:
            mask[start:stop, rows] = np.maximum(mask[start:stop, rows], level)
    return mask


def add_streak(image: np.ndarray, paper: np.ndarray, rng: random.Random,
               width: tuple[float, float]) -> np.ndarray:
    """``image`` crossed end to end by a light band, as a dirty scanner glass or a fold leaves: the
    strokes under it fade 70-100% of the way to the ``paper`` behind them (lifted a little), less
    at the band's soft edges. The band is ``width`` (a share of the height) wide, its centre in the
    middle half of the height, where it cuts the strokes a reader needs."""
    h = image.shape[0]
    half = max(0.5, h * rng.uniform(*width) / 2)
    centre = h * rng.uniform(0.25, 0.75)
    rows = np.arange(h, dtype=np.float32)[:, None] + 0.5
    edge = max(0.5, half * 0.3)
    weight = np.clip((half - np.abs(rows - centre)) / edge + 0.5, 0.0, 1.0)
    weight *= np.float32(rng.uniform(0.7, 1.0))
    light = np.minimum(paper + np.float32(rng.uniform(0.0, 30.0)), 255.0)
    return image * (1.0 - weight) + light * weight


def colour_levels(rng: random.Random, contrast: tuple[float, float]) -> tuple[float, float]:
    """(ground, text) grey levels of a coloured sign as the grey reader sees it: the ground
    anywhere in [0, 255], the text ``contrast`` levels lighter or darker, whichever fits (both
    when both do)."""
    gap = rng.uniform(*contrast)
    ground = rng.uniform(0.0, 255.0)
    options = [t for t in (ground - gap, ground + gap) if 0 <= t <= 255]
    if not options:  # the gap is wider than the ground allows on either side: use the wider side
        return ground, (0.0 if ground >= 127.5 else 255.0)
    return ground, rng.choice(options)


def _crop_ink(mask: np.ndarray) -> np.ndarray:
    x, y, w, h = cv2.boundingRect((mask > 4).astype(np.uint8))
    return mask[y:y + h, x:x + w] if w and h else mask


def warp(mask: np.ndarray, kind: str, amplitude: float, period: float,
         rng: np.random.Generator) -> np.ndarray:
    """trdg's distortion: columns shifted up/down by a sine, a cosine or a smooth random curve."""
    if kind == "none" or amplitude <= 0:
        return mask
    pad = int(math.ceil(amplitude)) + 1
    mask = np.pad(mask, ((pad, pad), (0, 0)))
    h, w = mask.shape
    x = np.arange(w, dtype=np.float32)
    if kind == "sine":
        offset = amplitude * np.sin(2 * np.pi * x / period)
    elif kind == "cosine":
        offset = amplitude * np.cos(2 * np.pi * x / period)
    else:
        knots = max(2, int(w / (period / 2)) + 2)
        values = rng.uniform(-amplitude, amplitude, knots)
        offset = np.interp(x, np.linspace(0, w - 1, knots), values)
    map_x = np.broadcast_to(x, (h, w)).astype(np.float32)
    map_y = (np.arange(h, dtype=np.float32)[:, None] + offset[None, :].astype(np.float32))
    return cv2.remap(mask, map_x, map_y.astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def bend(mask: np.ndarray, degrees: float) -> np.ndarray:
    """``mask`` bent along a circular arc that spans ``degrees``, as text set round a seal or a
    round sign: positive arches up (the circle's centre below the text), negative sags. Each
    glyph turns with the arc's tangent; the middle row keeps its length. The angle is capped so
    the inner edge's radius stays at least half the text's height (short words bend less)."""
    if abs(degrees) < 0.5:
        return mask
    sag = degrees < 0
    if sag:
        mask = mask[::-1]
    h, w = mask.shape
    theta = min(math.radians(abs(degrees)), w / h)
    r_mid = w / theta
    r_out, r_in = r_mid + h / 2, r_mid - h / 2
    half = theta / 2
    width = int(math.ceil(2 * r_out * math.sin(min(half, math.pi / 2)))) + 4
    height = int(math.ceil(r_out - r_in * math.cos(half))) + 4
    cx, cy = width / 2, r_out + 2
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32) + 0.5 - cx,
                         cy - np.arange(height, dtype=np.float32) - 0.5)
    map_x = (np.arctan2(xs, ys) * r_mid + w / 2 - 0.5).astype(np.float32)
    map_y = (r_out - np.hypot(xs, ys) - 0.5).astype(np.float32)
    out = cv2.remap(np.ascontiguousarray(mask), map_x, map_y, cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return np.ascontiguousarray(out[::-1]) if sag else out


def add_edge_piece(mask: np.ndarray, glyph: np.ndarray, rng: random.Random,
                   share: tuple[float, float], size: int) -> np.ndarray:
    """``mask`` with a cut-off piece of another glyph flush against its left or right edge, as a
    detector's loose crop keeps of the neighbouring word or sign: ``share`` of ``glyph``'s width
    shows (the side facing the text), a small gap from ``mask``'s edge, at about the text's
    height. The canvas grows to hold it; the text is not touched."""
    left = rng.random() < 0.5
    keep = max(1, round(glyph.shape[1] * rng.uniform(*share)))
    piece = glyph[:, -keep:] if left else glyph[:, :keep]
    gap = rng.randint(1, max(2, size // 4))
    h, ph = mask.shape[0], piece.shape[0]
    top = round((h - ph) / 2 + rng.uniform(-0.2, 0.2) * h)
    grow_top, grow_bottom = max(0, -top), max(0, top + ph - h)
    side = (gap + keep, 0) if left else (0, gap + keep)
    out = np.pad(mask, ((grow_top, grow_bottom), side))
    rows = slice(top + grow_top, top + grow_top + ph)
    cols = slice(0, keep) if left else slice(out.shape[1] - keep, None)
    out[rows, cols] = np.maximum(out[rows, cols], piece)
    return out


def _safe_cut(mask: np.ndarray, side: str) -> int:
    """The most rows ``clip_edge`` may cut off ``side`` of ``mask`` so that every connected piece of
    ink (8-connected, coverage above 64) keeps at least half its rows; the mask's height when it
    has no such ink."""
    h = mask.shape[0]
    count, _labels, stats, _centroids = cv2.connectedComponentsWithStats((mask > 64).astype(np.uint8), connectivity=8)
    if count <= 1:
        return h
    tops = stats[1:, cv2.CC_STAT_TOP].astype(np.int64)
    bottoms = tops + stats[1:, cv2.CC_STAT_HEIGHT]  # exclusive
    if side == "top":  # rows [cut, h) stay: a piece keeps bottom - max(top, cut) >= its height / 2
        return int(((tops + bottoms) // 2).min())
    return int((h - (tops + bottoms + 1) // 2).min())  # rows [0, h - cut) stay


def clip_edge(mask: np.ndarray, rng: random.Random, share: tuple[float, float]) -> tuple[np.ndarray, str]:
    """``mask`` (cropped to its ink) with ``share`` of its height cut off at the top or the bottom,
    as a tight detector box cuts the strokes that reach furthest (a final consonant's foot, an
    ascender); returns the cut mask and the side cut, ``"top"`` or ``"bottom"``.

    The cut never takes more than half the height of any connected piece of ink (coverage above a
    quarter): a period, comma or hyphen that sits lowest or highest on the line (the end of a tilted
    line, a date's dots below Hangul) would otherwise be wiped out whole while its label keeps it.
    Where that limit binds, the cut is smaller than drawn (none at all when it is under a row)."""
    side = "top" if rng.random() < 0.5 else "bottom"
    cut = min(mask.shape[0] - 1, max(1, round(mask.shape[0] * rng.uniform(*share))))  # keep a row at least
    cut = min(cut, _safe_cut(mask, side))
    if cut < 1:
        return mask, side
    return (mask[cut:], side) if side == "top" else (mask[:-cut], side)


def rotate(mask: np.ndarray, degrees: float) -> np.ndarray:
    """``mask`` turned by ``degrees`` (counter-clockwise), the canvas grown to keep every pixel."""
    if abs(degrees) < 0.05:
        return mask
    h, w = mask.shape
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    nw, nh = int(math.ceil(w * cos + h * sin)), int(math.ceil(w * sin + h * cos))
    matrix[0, 2] += nw / 2 - w / 2
    matrix[1, 2] += nh / 2 - h / 2
    return cv2.warpAffine(mask, matrix, (nw, nh), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _encode(image: np.ndarray, fmt: str) -> bytes:
    pixels = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1] if fmt == "png" else [cv2.IMWRITE_JPEG_QUALITY, 95]
    ok, buf = cv2.imencode("." + fmt, pixels, params)
    if not ok:
        raise ValueError(f"cannot encode a {pixels.shape} image as {fmt}")
    return buf.tobytes()


def render_sample(index: int, ctx: _Context) -> Sample:
    """Sample ``index`` of the set: text, font, geometry, background and degradations."""
    config = ctx.config
    rng, nrng = sample_rngs(config.seed, index)
    faces = ctx.faces
    for _attempt in range(4 * len(faces) + 8):
        face = faces[rng.randrange(len(faces))]
        text = line_text(rng, ctx, face)
        if not text:
            continue
        size = rng.randint(*config.font_size)
        tracking = 0.0
        if config.letter_spacing and rng.random() < config.letter_spacing:  # drawn only when asked
            tracking = size * rng.uniform(*config.letter_spacing_em)
        jitter = None
        if config.char_jitter and rng.random() < config.char_jitter:  # drawn only when asked
            jitter = glyph_jitter(rng, len(text), config.char_jitter_amount)
        mask = _ink_mask(text, face, size, tracking, jitter)
        if mask is not None:
            break
    else:
        source = config.text_file or "the lexicon"
        raise SynthConfigError(f"no string from {source} can be drawn in fonts "
                               f"{[str(f) for f in faces]} (glyph coverage, charset {ctx.charset.name} "
                               f"or max_chars {config.max_chars})")
    if config.embolden and rng.random() < config.embolden:  # drawn only when asked
        mask = embolden(mask, size * rng.uniform(*config.embolden_amount))
    if config.stroke_warp and rng.random() < config.stroke_warp:  # drawn only when asked
        mask = bend_strokes(mask, nrng, size * rng.uniform(*config.stroke_warp_amount), size / 3)

    under = config.degrade.effect("underline")
    if rng.random() < under.p:  # drawn with the text so skew and warp bend it too
        h, w = mask.shape
        mask = np.pad(mask, ((0, max(3, round(h * 0.35))), (0, 0)))
        mask = degrade.underline(mask, nrng, rng.uniform(*under.span), (0, 0, w, h), ink=255.0)

    kind = _pick(rng, config.distortion, DISTORTIONS)
    amplitude = rng.uniform(*config.distortion_amplitude)
    period = size * rng.uniform(*config.distortion_period)
    mask = warp(mask, kind, amplitude, period, nrng)
    if config.arc and rng.random() < config.arc:  # drawn only when asked
        mask = bend(mask, rng.choice((-1.0, 1.0)) * rng.uniform(*config.arc_degrees))
    angle = rng.uniform(-config.skew, config.skew) if config.random_skew else config.skew
    mask = _crop_ink(rotate(mask, angle))
    clipped = None
    if config.edge_clip and rng.random() < config.edge_clip:  # drawn only when asked
        mask, clipped = clip_edge(mask, rng, config.edge_clip_share)

    top, left, bottom, right = (rng.randint(0, m) for m in config.margins)
    top, bottom = (0 if clipped == "top" else top), (0 if clipped == "bottom" else bottom)  # the cut is the edge
    mask = np.pad(mask, ((top, bottom), (left, right)))
    if config.edge_clutter and rng.random() < config.edge_clutter:  # drawn only when asked
        neighbour = [ch for ch in _token(rng, ctx) if not ch.isspace() and covers(face, ch)]
        glyph = _ink_mask(rng.choice(neighbour), face, size) if neighbour else None
        if glyph is not None:
            mask = add_edge_piece(mask, glyph, rng, config.edge_clutter_share, size)
    if config.rules and rng.random() < config.rules:
        mask = add_rules(mask, rng, size)
    h, w = mask.shape
    background = _pick(rng, config.backgrounds, KINDS)
    paper = make_background(background, h, w, nrng, ctx.bg_files)
    alpha = mask * np.float32(rng.uniform(0.85, 1.0) / 255.0)
    ink = rng.uniform(*config.ink)
    if config.colour and rng.random() < config.colour:
        ground, ink = colour_levels(rng, config.colour_contrast)
        paper = np.minimum(paper * np.float32(ground / max(float(paper.mean()), 1.0)), 255.0)  # texture kept, level moved
    image = paper * (1.0 - alpha) + np.float32(ink) * alpha
    if config.streak and rng.random() < config.streak:  # drawn only when asked
        image = add_streak(image, paper, rng, config.streak_width)

    if config.height and h != config.height:
        nw = max(1, round(w * config.height / h))
        interp = cv2.INTER_AREA if h > config.height else cv2.INTER_CUBIC
        image = cv2.resize(image, (nw, config.height), interpolation=interp)
    image = degrade.apply(image, nrng, config.degrade)  # underline there is skipped: no boxes
    if config.invert and rng.random() < config.invert:  # drawn only when asked: other sets stay as they were
        image = 255.0 - image
    label = unicodedata.normalize("NFC", text)
    return Sample(_encode(image, config.image_format), label, Path(face.path).name, background)


def _render_in_worker(index: int) -> Sample:
    assert _CTX is not None, "worker started without _init_worker"
    return render_sample(index, _CTX)


def _init_worker(config: LinesConfig) -> None:
    _context(config)


def iter_samples(config: LinesConfig, start: int = 0, stop: int | None = None,
                 workers: int | None = None) -> Iterator[Sample]:
    """Samples ``start``..``stop - 1`` in order, rendered by ``workers`` processes (<= 1: here)."""
    stop = config.count if stop is None else stop
    workers = config.workers if workers is None else workers
    indices = range(start, stop)
    if workers <= 1 or len(indices) < 2:
        ctx = _context(config)
        for i in indices:
            yield render_sample(i, ctx)
        return
    _context(config)  # here first: a setting that cannot work is refused once, before any worker starts
    chunk = max(1, min(64, len(indices) // (workers * 4)))
    # workers that leave Ctrl-C and SIGTERM to the command, which ends them on its way out. Was: a
    # multiprocessing.Pool whose worker, killed by a SIGTERM to the group (GNU timeout) while it sent its
    # images back, held the result queue's lock for ever, and the command hung in Pool.terminate
    pool = start_pool(workers, _init_worker, (config,), preload=[__name__])
    try:
        yield from ordered_map(_render_in_worker, indices, pool, chunk=chunk, window=4 * workers)
    finally:
        end_pool(pool)


def check_sources(config: LinesConfig, origin: Mapping[str, str] | None = None) -> None:
    """The charset, the font patterns and the background pictures checked (SynthConfigError naming the key),
    quietly: before ``kocr synth-lines`` starts its run, so a refusal leaves no FAILED run in MLflow (a folder
    with no picture, or a JPEG cut short in it, was found only inside the run); ``generate_lines`` warns about
    weak faces itself. ``origin`` (as for :meth:`LinesConfig.from_params`) makes the error name the section a
    key came from: ``synth_lines_heldout.fonts`` for the held-out faces of ``--section synth_lines_heldout``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _usable(config)
        if config.background_images and config.backgrounds.get("image", 0) > 0:
            _background_files(config)
    except SynthConfigError as exc:
        if not origin:
            raise
        named = re.sub(r"\bsynth_lines\.(\w+)", lambda m: f"{origin.get(m[1], 'synth_lines')}.{m[1]}", str(exc))
        raise SynthConfigError(named) from None


def _usable(config: LinesConfig, fonts_key: str = "synth_lines.fonts") -> list[FontFace]:
    """Faces of the patterns, warning about those with little Hangul (used only where they cover) and
    about patterns that match no file, the warning naming ``fonts_key`` (``p.yaml: synth_lines_heldout.fonts``)."""
    try:
        charset = Charset.from_spec(config.charset_name)
    except ValueError as exc:  # neither built in nor a file
        raise SynthConfigError(f"synth_lines.charset_name: {exc}") from None
    try:
        with warnings.catch_warnings(record=True) as unmatched:
            warnings.simplefilter("always")
            faces = find_fonts(list(config.fonts), config.font_dirs)
    except ValueError as exc:  # no font file matching the patterns
        raise SynthConfigError(f"synth_lines.fonts: {exc}") from None
    for caught in unmatched:  # a face not installed: the set is drawn without it, which the user must hear of
        warnings.warn(f"{fonts_key}: {caught.message}; the set is drawn without them (its manifest.tsv lists "
                      "the faces drawn)", caught.category, stacklevel=3)
    hangul = [c for c in charset.chars if is_hangul(c)]
    weak = [str(f) for f in faces if hangul and sum(covers(f, c) for c in hangul) < 0.9 * len(hangul)]
    if weak:
        warnings.warn(f"fonts with little Hangul for {charset.name} draw only the strings they cover: "
                      f"{weak}", KocrWarning, stacklevel=3)
    return faces


def resume_key(config: LinesConfig, faces: Sequence[FontFace]) -> str:
    """What sample ``i`` depends on besides ``i``: the knobs (not ``count``, ``workers`` or
    ``contact_sheet``), the code that draws it, the charset, the font files, the text file, the
    background images, and the versions of the libraries that draw and encode it (wordfreq, Pillow
    and its FreeType, OpenCV, NumPy): ``set_key.generator_key``. A killed run resumes only under the
    same key."""
    knobs = {k: v for k, v in config.as_params().items() if k not in ("count", "workers", "contact_sheet")}
    files = [Path(face.path) for face in faces] + ([Path(config.text_file)] if config.text_file else [])
    if config.background_images and config.backgrounds.get("image", 0) > 0:
        files += [Path(f) for f in _background_files(config)]
    return generator_key(knobs, config.charset_name, files)


MANIFEST_HEADER = "index\tfont\tbackground\tlabel\n"


def _kept_manifest(path: Path, committed: int) -> list[str]:
    """The whole rows of a killed run's ``manifest.tsv`` for samples 1..n in order (n <= ``committed``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    if not text.startswith(MANIFEST_HEADER):
        return []
    rows = []
    for line in text[len(MANIFEST_HEADER):].split("\n")[:-1][:committed]:  # the last piece is unfinished
        if line.split("\t", 1)[0] != str(len(rows) + 1) or line.count("\t") != 3:
            break
        rows.append(line + "\n")
    return rows


SET_FILES = LMDB_FILES | {"manifest.tsv", "contact_sheet.png"}  # what a set here holds


def check_out(out: Path) -> None:
    """Refuse an ``out`` that publishing the set would destroy: a file, or a folder holding anything but
    an LMDB set's files (a folder of the user's, ``.``), which ``PartialFolder.publish`` would delete whole.
    A killed writer's hidden ``.NAME.TAG-PID.HEX.tmp`` is no user's file (``check_out_folder`` passes over
    it): a contact sheet killed mid-write leaves one in ``DIR.partial``, which a run resumed in another
    container (another PID namespace, which keeps it for a week) publishes with the set."""
    check_out_folder(out, SET_FILES.__contains__, "an LMDB set of synth-lines does not", "a set")


def generate_lines(out_dir: str | os.PathLike, config: LinesConfig,
                   progress: bool = True, fonts_key: str = "synth_lines.fonts") -> dict[str, Any]:
    """Write ``config.count`` images into the LMDB set ``out_dir`` (replaced when it exists).

    An ``out_dir`` that is a file, or a folder holding anything but an LMDB set's files (``data.mdb``,
    ``lock.mdb``, ``manifest.tsv``, ``contact_sheet.png``), is refused before anything is drawn, never
    replaced.

    Also writes ``manifest.tsv`` (LMDB index, font file, background kind, label) and, unless
    ``config.contact_sheet`` is 0, ``contact_sheet.png`` into the set's folder. Returns a summary:
    count, fonts and backgrounds used (counts), the contact sheet path, and ``resumed``: how many
    samples a killed run of the same ``resume_key`` had written to ``DIR.partial`` and were kept
    (sample ``i`` depends only on the key and ``i``, so the set is byte-identical to one written
    without the kill). A font pattern that matches no file is warned of under ``fonts_key`` (the params
    file and the key the fonts came from).
    """
    config.check()
    out = Path(out_dir)
    check_out(out)
    faces = _usable(config, fonts_key)
    fonts_used: Counter[str] = Counter()
    backgrounds_used: Counter[str] = Counter()
    tiles: list[tuple[Image.Image, str]] = []

    def tally(font: str, background: str, sample: Callable[[], tuple[bytes, str]]) -> None:
        """Count the sample's font and background; read its image only while the contact sheet wants one."""
        fonts_used[font] += 1
        backgrounds_used[background] += 1
        if len(tiles) < config.contact_sheet:
            image, label = sample()
            grey = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_GRAYSCALE)
            tiles.append((Image.fromarray(grey, "L"), label))

    with LmdbWriter(out, resume_key=resume_key(config, faces)) as writer:
        kept = _kept_manifest(writer.partial / "manifest.tsv", min(writer.count, config.count))
        writer.truncate(len(kept))  # rows the kill lost from the manifest's buffer are drawn again
        if writer.count:
            print(f"synth-lines: resuming {writer.partial} after sample {writer.count} of {config.count}",
                  file=sys.stderr)
        for row in kept:
            index, font, background, _ = row.rstrip("\n").split("\t")
            tally(font, background, functools.partial(writer.sample, int(index)))
        manifest = (writer.partial / "manifest.tsv").open("w", encoding="utf-8", newline="\n")
        # closed on every way out (an exception, Ctrl-C, SIGTERM's exit): that ends its render workers
        with manifest, contextlib.closing(iter_samples(config, start=writer.count)) as samples:
            manifest.write(MANIFEST_HEADER + "".join(kept))
            for sample in tqdm(samples, total=config.count, initial=writer.count, desc="synthetic lines",
                               unit="img", disable=not progress, smoothing=0.05):
                index = writer.count + 1
                manifest.write(f"{index}\t{sample.font}\t{sample.background}\t{sample.label}\n")
                if index % writer.commit_every == 0:
                    manifest.flush()  # before the LMDB commits it: a kill leaves rows for every committed sample
                writer.add(sample.image, sample.label)
                tally(sample.font, sample.background, lambda drawn=sample: (drawn.image, drawn.label))
        sheet = None
        if tiles:
            print_faces = [f for f in faces if not any(k in Path(f.path).name.lower()
                                                       for k in ("pen", "brush", "pilgi", "gungseo"))]
            sheet = write_sheet(tiles, writer.partial / "contact_sheet.png", print_faces or faces,
                                columns=4, tile_size=(256, 64))
    return {"count": config.count, "out": str(out), "resumed": len(kept),
            "contact_sheet": str(out / sheet.name) if sheet else None,
            "fonts": dict(sorted(fonts_used.items())),
            "backgrounds": dict(sorted(backgrounds_used.items()))}
