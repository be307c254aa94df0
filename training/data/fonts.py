"""Font discovery and glyph coverage for the synthetic page generator.

Example:
    >>> faces = find_fonts(["NanumGothic.ttf"])
    >>> covers(faces[0], "서울 1,250"), covers(faces[0], "\\U0001F600")
    (True, False)
"""

from __future__ import annotations

import fnmatch
import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kocr.atomic import atomic_path, temporary_name
from kocr import KocrWarning

FONT_EXTENSIONS = (".ttf", ".otf", ".ttc", ".otc")
DEFAULT_FONT_DIRS = ("/usr/share/fonts",)


@dataclass(frozen=True)
class FontFace:
    """One face of a font file; ``index`` selects the face inside a .ttc collection."""

    path: str
    index: int = 0
    name: str = ""

    def __str__(self) -> str:
        suffix = f"#{self.index}" if self.index else ""
        return f"{self.name or Path(self.path).stem} ({Path(self.path).name}{suffix})"


def korean_face_index(path: str | os.PathLike) -> int:
    """Face index to use for ``path``: the Korean face (1) of Noto Sans/Serif CJK collections."""
    name = Path(path).name.lower()
    if name.endswith((".ttc", ".otc")) and name.startswith(("notosanscjk", "notoserifcjk")):
        return 1
    return 0


def _font_files(font_dirs: Iterable[str | os.PathLike]) -> list[str]:
    """Every font file under ``font_dirs`` (recursive), sorted, each real file once. The hidden folders
    ``kocr.atomic`` writes in (``.NAME.TAG-PID.HEX.tmp``) are not entered: one a killed ``subset_font``
    left holds a second, maybe cut, copy of a font, which is no face of the folder."""
    found: list[str] = []
    seen: set[str] = set()
    for folder in font_dirs:
        for root, dirs, files in os.walk(folder, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not temporary_name(d))
            for fname in sorted(files):
                if not fname.lower().endswith(FONT_EXTENSIONS):
                    continue
                path = os.path.join(root, fname)
                real = os.path.realpath(path)
                if real in seen or not os.path.isfile(real):
                    continue
                seen.add(real)
                found.append(path)
    return found


def _face_name(path: str, index: int) -> str:
    try:
        from fontTools.ttLib import TTFont

        with TTFont(path, fontNumber=index, lazy=True) as font:
            name = font["name"].getDebugName(4) or font["name"].getDebugName(1)
        if name:
            return str(name)
    except Exception:  # a name table we cannot read still leaves a usable font
        pass
    return Path(path).stem


def find_fonts(patterns: Sequence[str] | str,
               font_dirs: Sequence[str | os.PathLike] = DEFAULT_FONT_DIRS) -> list[FontFace]:
    """Font faces whose file name matches any of ``patterns`` (fnmatch, case-insensitive).

    A pattern holding ``/`` is matched against the whole path instead. Faces come in pattern
    order, files sorted within a pattern, each file once. For Noto Sans/Serif CJK collections
    the Korean face (index 1) is used. A pattern matching nothing only warns; raises
    ValueError naming the patterns and the folders searched when nothing matches at all.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    dirs = [str(d) for d in font_dirs]
    files = _font_files(dirs)
    faces: list[FontFace] = []
    taken: set[str] = set()
    unmatched: list[str] = []
    for pattern in patterns:
        pat = str(pattern).lower()
        hits = [f for f in files
                if fnmatch.fnmatchcase((f if "/" in pat else os.path.basename(f)).lower(), pat)]
        if not hits:
            unmatched.append(str(pattern))
        for path in hits:
            if path in taken:
                continue
            taken.add(path)
            index = korean_face_index(path)
            faces.append(FontFace(path, index, _face_name(path, index)))
    if not faces:
        raise ValueError(f"no font file matches {list(map(str, patterns))} in {dirs} "
                         f"(searched {len(files)} font files)")
    if unmatched:
        warnings.warn(f"font patterns {unmatched} match no file in {dirs}", KocrWarning, stacklevel=2)
    return faces


BACKSLASH = 0x5C
TILDE = 0x7E


@functools.lru_cache(maxsize=None)
def _codepoints(path: str, index: int) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    with TTFont(path, fontNumber=index, lazy=True) as font:
        cmap = font.getBestCmap() or {}
    cps = frozenset(cmap)
    return cps - {cp for cp, draws in _SHAPE_CHECKS.items() if cp in cps and not draws(path, index)}


def _ink(path: str, index: int, text: str, size: int) -> np.ndarray:
    """The pixels ``text`` inks in the face at ``size`` px (a bool mask, dark on nothing)."""
    font = load_font(FontFace(path, index), size)
    image = Image.new("L", (size * 5 // 2, size * 5 // 2), 0)
    ImageDraw.Draw(image).text((size // 2, size // 4), text, font=font, fill=255)
    return np.asarray(image) > 127


def _draws_backslash(path: str, index: int) -> bool:
    """False for the faces that draw U+005C as another sign: Korean faces keep the KS X 1003
    won sign there (Nanum, most BM faces: ₩), some a slash (BM HANNA), Japanese ones a yen sign.

    A backslash's ink runs from top left to bottom right, so its x and y (y down) correlate
    strongly; ₩ and ¥ are symmetric (about 0) and a slash runs the other way (about -0.9).
    Every installed face with a true backslash, obliques included, measures 0.66 or more.
    """
    ys, xs = np.nonzero(_ink(path, index, "\\", 64))
    if len(xs) < 8 or xs.std() == 0 or ys.std() == 0:
        return False
    return float(np.corrcoef(xs, ys)[0, 1]) > 0.4


def _draws_tilde(path: str, index: int) -> bool:
    """False for the faces that draw U+007E as a straight dash (Baekmuk Dotum), a label ``~`` over
    which would teach the model to read a dash as a tilde.

    A tilde's stroke waves, so its ink is taller than the stroke is thick (the median inked run of
    a column); a flat dash's is not. At 128 px every installed face with a true tilde measures 1.5
    or more, bold and oblique ones included; Baekmuk Dotum's dash 1.0.
    """
    ink = _ink(path, index, "~", 128)
    rows, columns = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
    if len(columns) < 4:
        return False
    thickness = float(np.median(ink[:, columns].sum(axis=0)))
    return (rows[-1] - rows[0] + 1) >= 1.25 * thickness


# code points a face may map to a glyph of another sign, each with its check that the glyph is the sign
_SHAPE_CHECKS = {BACKSLASH: _draws_backslash, TILDE: _draws_tilde}


def codepoints(face: FontFace) -> frozenset[int]:
    """Code points the face draws as themselves (cached per face): those its cmap maps to a
    glyph, less a backslash the face draws as ₩, ¥ or / (``_draws_backslash``) and a tilde it
    draws as a dash (``_draws_tilde``)."""
    return _codepoints(face.path, face.index)


def covers(face: FontFace, text: str) -> bool:
    """True when every non-space character of ``text`` has a glyph in ``face`` (no tofu) that
    draws that character (not a backslash drawn as ₩ nor a tilde drawn as a dash: ``codepoints``)."""
    cps = codepoints(face)
    return all(ch.isspace() or ord(ch) in cps for ch in text)


@functools.lru_cache(maxsize=512)
def load_font(face: FontFace, size: int) -> ImageFont.FreeTypeFont:
    """The face at ``size`` pixels (cached), with Pillow's basic layout for portable output."""
    return ImageFont.truetype(face.path, int(size), index=face.index,
                              layout_engine=ImageFont.Layout.BASIC)


def subset_font(src: str | os.PathLike, dst: str | os.PathLike, text: str) -> None:
    """Write to ``dst`` a copy of the font file ``src`` that holds only the glyphs ``text`` needs.

    Every face of a .ttc/.otc collection is kept, in its place, so face indexes still hold.
    Layout tables, hinting and names are kept, and bounding boxes and side bearings are not
    recomputed, so FreeType draws each of those glyphs pixel for pixel as from ``src``
    (recomputed bounds move a glyph whose stored side bearing differs from its outline's).
    Hangul faces shrink ~10x for the 1,008 characters of korean_g2. The file is written whole or
    not at all (``kocr.atomic.atomic_path``): a full disk or a file-size limit raises an ``OSError``
    naming ``dst`` and leaves ``dst`` as it was.
    """
    import logging

    from fontTools import subset
    from fontTools.ttLib import TTCollection, TTFont

    options = subset.Options(layout_features=["*"], name_IDs=["*"], name_languages=["*"],
                             notdef_outline=True, glyph_names=True, recalc_bounds=False,
                             hinting_tables=["*"], drop_tables=[], passthrough_tables=True)
    logging.getLogger("fontTools").setLevel(logging.ERROR)  # "FFTM NOT subset" etc.: tables it passes through

    def cut(font: TTFont) -> TTFont:
        subsetter = subset.Subsetter(options)
        subsetter.populate(text=text)
        subsetter.subset(font)
        return font

    with atomic_path(dst) as tmp:  # a full disk or a size limit (ulimit -f) leaves no cut font at dst
        if Path(src).suffix.lower() in (".ttc", ".otc"):
            collection = TTCollection(str(src), recalcBBoxes=False)
            collection.fonts = [cut(font) for font in collection.fonts]
            collection.save(str(tmp))
        else:
            cut(TTFont(str(src), recalcBBoxes=False)).save(str(tmp))
