"""AI-Hub 공공행정문서 OCR page JSON: one reader and writer for labels and predictions.

The schema (PLATFORM.md) is one JSON per page image::

    {"images": [{"image.file.name": "p.jpg", "image.width": W, "image.height": H,
                 "image.category": "인.허가", ...}],
     "annotations": [{"id": 1, "annotation.type": "rectangle", "annotation.text": "김해시",
                      "annotation.ttype": "textType1", "annotation.bbox": [x, y, w, h]}]}

Predictions use the same schema plus an optional ``annotation.score``.

Example:
    >>> page = Page("p.jpg", 100, 50, words=[Word((10, 5, 30, 20), "서울")])
    >>> Page.from_dict(page.to_dict()).words[0].text
    '서울'
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from kocr.atomic import write_json

BBox = tuple[float, float, float, float]  # x, y, w, h in pixels, top-left origin


class PageError(ValueError):
    """A page JSON that cannot be used; ``reason`` is a short machine-readable code."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {reason}: {detail}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail


@dataclass
class Word:
    """One annotated (or predicted) word: an axis-aligned box and its text."""

    bbox: BBox
    text: str
    score: float | None = None
    number: int = field(default=0, compare=False, repr=False)  # 1-based place among the file's annotations

    @property
    def corners(self) -> tuple[float, float, float, float]:
        """The box as (x0, y0, x1, y1)."""
        x, y, w, h = self.bbox
        return x, y, x + w, y + h


@dataclass
class Page:
    """One page image and its words."""

    image_name: str
    width: int
    height: int
    words: list[Word] = field(default_factory=list)
    category: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # other image.* keys, kept verbatim

    def to_dict(self) -> dict[str, Any]:
        """The page as AI-Hub page JSON."""
        image = {"image.file.name": self.image_name, "image.width": self.width,
                 "image.height": self.height, "image.category": self.category, **self.extra}
        annotations = []
        for i, word in enumerate(self.words, start=1):
            ann: dict[str, Any] = {"id": i, "annotation.type": "rectangle",
                                   "annotation.text": word.text, "annotation.ttype": "textType1",
                                   "annotation.bbox": [_num(v) for v in word.bbox]}
            if word.score is not None:
                ann["annotation.score"] = round(float(word.score), 6)
            annotations.append(ann)
        return {"images": [image], "annotations": annotations}

    @classmethod
    def from_dict(cls, data: Any, path: str | os.PathLike = "<page>",
                  bad: list[tuple[int, str]] | None = None) -> "Page":
        """Parse page JSON already loaded; raises PageError naming ``path`` and the problem.

        Reads the 공공행정문서 schema (``images``/``annotations``) and the newer AI-Hub OCR schema
        (``Images``/``bbox`` or ``Bbox`` with four x and four y values, made axis-aligned, or two: the
        rectangle two opposite corners span, or a polygon's points: its bounding box; one point is a bad annotation). With
        ``bad`` given, an unusable annotation is skipped and recorded there as (1-based index, detail)
        instead of rejecting the whole page.
        """
        if not isinstance(data, dict):
            raise PageError(path, "bad_schema", f"top level is {_kind(data)}, not an object")
        if "images" not in data and "Images" in data:
            return cls._from_ocr_schema(data, path, bad)
        if "images" not in data:
            raise PageError(path, "bad_schema", "no 'images' list (공공행정문서 schema) nor 'Images' object "
                                                "(AI-Hub OCR schema)")
        images = data["images"]
        if not isinstance(images, list):
            raise PageError(path, "bad_schema", f"'images' is {_kind(images)}, not a list")
        if not images:
            raise PageError(path, "bad_schema", "'images' is an empty list")
        if not isinstance(images[0], dict):
            raise PageError(path, "bad_schema", f"'images' entry 1 is {_kind(images[0])}, not an object")
        image = images[0]
        if "image.file.name" not in image:
            raise PageError(path, "bad_schema", "image entry lacks 'image.file.name'")
        name = str(image["image.file.name"])
        width, height = _pixels(image, "image.width", path), _pixels(image, "image.height", path)
        extra = {k: v for k, v in image.items()
                 if k not in ("image.file.name", "image.width", "image.height", "image.category")}
        annotations = data.get("annotations", [])
        if not isinstance(annotations, list):
            raise PageError(path, "bad_schema", f"'annotations' is {_kind(annotations)}, not a list")
        def word(ann: Any) -> Word:
            values = _floats(ann["annotation.bbox"])
            if values is None:
                raise ValueError(f"annotation bbox {_shown(ann['annotation.bbox'])} is not a list of 4 numbers")
            bbox = tuple(values)
            text = _text(ann.get("annotation.text", ""), "annotation.text")
            if len(bbox) != 4:
                raise ValueError(f"annotation bbox {bbox} has not 4 values")
            score = ann.get("annotation.score")
            if score is not None:
                number = _floats([score])
                if number is None:
                    raise ValueError(f"annotation.score {_shown(score)} is not a number")
                score = number[0]
            return Word(bbox, text, score)  # type: ignore[arg-type]

        words = _parse_words(annotations, word, lambda ann: f"annotation {ann!r:.80} lacks a valid bbox", path, bad)
        # NFC and stripped as every label is: "인.허가" written decomposed (NFD) is the same category
        category = nfc(str(image.get("image.category", "")))
        return cls(name, width, height, words, category, extra)

    @classmethod
    def _from_ocr_schema(cls, data: dict, path: str | os.PathLike,
                         bad: list[tuple[int, str]] | None) -> "Page":
        image = data["Images"]
        if not isinstance(image, dict):
            raise PageError(path, "bad_schema", f"'Images' is {_kind(image)}, not an object")
        if "identifier" not in image:
            raise PageError(path, "bad_schema", "'Images' lacks 'identifier'")
        ident, kind = str(image["identifier"]), str(image.get("type", "jpg")).lstrip(".")
        width, height = _pixels(image, "width", path, "'Images'"), _pixels(image, "height", path, "'Images'")
        key = "bbox" if "bbox" in data else "Bbox"
        boxes = data.get(key, [])
        if not isinstance(boxes, list):
            raise PageError(path, "bad_schema", f"{key!r} is {_kind(boxes)}, not a list")
        def word(box: Any) -> Word:
            xs, ys = _floats(box["x"]), _floats(box["y"])
            if xs is None or ys is None:
                raise ValueError(f"bbox x {_shown(box['x'], 30)} and y {_shown(box['y'], 30)} are not lists of numbers")
            if not xs or len(xs) != len(ys):
                raise ValueError(f"bbox x {xs} and y {ys} do not pair up")
            if len(xs) < 2:  # one point spans no box (it was read as a zero-area one)
                raise ValueError(f"bbox x {xs} and y {ys} give 1 point, not a box (4 corners, 2 opposite ones or a polygon)")
            text = _text(box.get("data", ""), "data")
            x0, y0 = min(xs), min(ys)
            return Word((x0, y0, max(xs) - x0, max(ys) - y0), text)

        words = _parse_words(boxes, word, lambda box: f"bbox {box!r:.80} lacks x or y", path, bad)
        extra = {k: v for k, v in image.items() if k not in ("identifier", "type", "width", "height")}
        return cls(f"{ident}.{kind}", width, height, words, "", extra)


def _parse_words(items: list, parse: Callable[[Any], Word], describe: Callable[[Any], str],
                 path: str | os.PathLike, bad: list[tuple[int, str]] | None) -> list[Word]:
    """``parse`` each annotation; a broken one raises PageError, or with ``bad`` is listed (1-based) and skipped.

    A ValueError's own message is the detail; other errors (a missing key, a wrong type) are
    described by ``describe(item)``.
    """
    words = []
    for index, item in enumerate(items, start=1):
        try:
            words.append(parse(item))
            words[-1].number = index
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            detail = str(exc) if isinstance(exc, ValueError) else describe(item)
            if bad is None:
                raise PageError(path, "bad_schema", detail) from exc
            bad.append((index, detail))
    return words


def _text(value: Any, key: str) -> str:
    """A label as the file gives it: a string, a number written as one (a page number), or none."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{key} {json.dumps(value, ensure_ascii=False)[:40]} is not a string")
    text = str(value)
    surrogate = lone_surrogate(text)
    if surrogate:
        raise ValueError(f"{key} {text!r:.40} holds an unpaired surrogate {surrogate!r} (a broken "
                         "\\uXXXX escape): not text, and no UTF-8 label can carry it")
    return text


def lone_surrogate(text: str) -> str:
    r"""The first unpaired UTF-16 surrogate in ``text`` (``json`` turns an escape such as
    ``"\ud800"`` without its pair into one), else ``""``; such a string cannot be written as UTF-8.

    >>> lone_surrogate(json.loads('"\\ud55c\\ud800"')), lone_surrogate(json.loads('"\\ud83d\\ude00"'))
    ('\ud800', '')
    """
    return next((c for c in text if "\ud800" <= c <= "\udfff"), "")


def _floats(values: Any) -> list[float] | None:
    """A list of numbers (or numbers written as text, ``"12.5"``) as floats; None for anything else:
    not a list, or holding ``true``, null, a list (a point ``[x, y]``), a word, or an integer too large
    for a float (``float()`` would raise OverflowError, which took the whole page down).

    >>> _floats([1, "2.5", 3.0]), _floats([True, 2]), _floats([[1, 2]]), _floats("1234"), _floats([10**400])
    ([1.0, 2.5, 3.0], None, None, None, None)
    """
    if not isinstance(values, list):
        return None
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return None
        try:
            out.append(float(value))
        except (ValueError, OverflowError):
            return None
    return out


def _json_int(digits: str) -> int | float:
    """A JSON integer as ``json`` reads it; one of more digits than Python converts (4,300: ``int()``
    raised ValueError out of ``json.loads``, so the whole page was lost, reported as unreadable) as the
    float it is, infinite, which no coordinate or page side takes: its word or page is named as for
    ``1e999``.

    >>> _json_int("-12"), _json_int("9" * 5000)
    (-12, inf)
    """
    try:
        return int(digits)
    except ValueError:
        return float(digits)


def _shown(value: Any, limit: int = 40) -> str:
    """A value as the file writes it, cut to ``limit`` characters (a 400-digit number is not quoted whole)."""
    try:
        return json.dumps(value, ensure_ascii=False)[:limit]
    except ValueError:  # an int of more digits than Python writes
        return f"{type(value).__name__}"


def _kind(value: Any) -> str:
    """What a JSON value is, in words, for a message: ``'images' is an object, not a list``.

    >>> _kind({}), _kind([]), _kind(None), _kind(True), _kind(3.5), _kind("a")
    ('an object', 'a list', 'null', 'true/false', 'a number', 'a string')
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return "an object" if isinstance(value, dict) else "a list" if isinstance(value, list) else "a string"


def _pixels(entry: dict, key: str, path: str | os.PathLike, where: str = "image entry") -> int:
    """A page side in pixels as files write it (``1000``, ``1000.0`` or ``"1000"``); anything else is named."""
    if key not in entry:
        raise PageError(path, "bad_schema", f"{where} lacks {key!r}")
    value = entry[key]
    number: float | int = math.nan
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, (float, str)):
        try:
            number = int(value) if isinstance(value, str) and value.strip().isdigit() else float(value)
        except (ValueError, OverflowError):
            pass
    whole = isinstance(number, int) or number.is_integer()  # NaN and infinity are not
    if not (whole and 0 < number < 2**31):
        raise PageError(path, "bad_schema", f"{where} {key} {json.dumps(value, ensure_ascii=False)[:40]} "
                                            "is not a positive whole number of pixels")
    return int(number)


def _num(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(float(value), 2)


def as_written(bbox: tuple[float, ...]) -> tuple[float, ...]:
    """``bbox`` as :func:`write_page` stores it (2 decimals), so a page scored in memory scores the same
    as the file written for it, read back (``kocr score``)."""
    return tuple(float(_num(v)) for v in bbox)


def read_page(path: str | os.PathLike) -> Page:
    """Read one page JSON file; raises PageError for unreadable or malformed files."""
    return parse_page(Path(path).read_bytes(), path)


def parse_page(raw: bytes, path: str | os.PathLike = "<page>",
               bad: list[tuple[int, str]] | None = None) -> Page:
    """Parse page JSON bytes (UTF-8, UTF-8 with BOM or CP949); ``bad`` as in ``Page.from_dict``."""
    text = decode_json_text(raw)
    if text is None:
        raise PageError(path, "bad_encoding", "neither UTF-8 nor CP949")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PageError(path, "malformed_json", str(exc)) from exc
    except ValueError:  # an integer of more digits than Python converts
        data = json.loads(text, parse_int=_json_int)
    return Page.from_dict(data, path, bad)


def decode_json_text(raw: bytes) -> str | None:
    """Label JSON bytes as text: UTF-8 (a byte-order mark dropped), else CP949 (EUC-KR), which Korean
    Windows tools write; None when they are neither.

    >>> decode_json_text('{"t": "서울"}'.encode("cp949")) == decode_json_text('\\ufeff{"t": "서울"}'.encode())
    True
    """
    for encoding in ("utf-8-sig", "cp949"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return None


def write_page(page: Page, path: str | os.PathLike, sweep: bool = True) -> None:
    """Write ``page`` as UTF-8 page JSON (Hangul kept readable), atomically (``kocr.atomic``)."""
    write_json(path, page.to_dict(), sweep=sweep)


def iter_page_files(root: str | os.PathLike) -> Iterator[Path]:
    """Every ``*.json`` under ``root`` in a stable order (stray files are the caller's concern)."""
    yield from sorted(p for p in Path(root).rglob("*.json") if p.is_file())


def nfc(text: str) -> str:
    """NFC-normalise and strip outer whitespace, as every label and metric does."""
    return unicodedata.normalize("NFC", text).strip()


DONT_CARE = "###"  # ICDAR's mark for an illegible word: such a box is neither trained on nor scored


def unscored(text: str) -> bool:
    """Whether a ground-truth word is a don't-care region: empty after ``nfc``, or ``DONT_CARE``.

    >>> unscored(" ### "), unscored(""), unscored("서울")
    (True, True, False)
    """
    return nfc(text) in ("", DONT_CARE)


def on_image(page: Page, width: int, height: int) -> Page:
    """``page`` with the size of the image read (``width`` x ``height`` pixels), which scoring clamps
    its boxes to; ``page`` itself when its label already says that size. A label whose
    ``image.width``/``image.height`` differ from its image is kept by ``prepare`` with its boxes clipped
    to the real image (``image_size_differs_from_json``); clamped to the label's size instead, a word
    past it was ignored, its reading counted as a false positive, and a word across it matched on the
    cut parts only. The one rule of ``evaluate``, ``PageSetScorer`` and ``kocr score``.

    >>> on_image(Page("p.png", 100, 50), 200, 50).width
    200
    """
    return page if (page.width, page.height) == (width, height) else replace(page, width=width, height=height)


def clip_box(bbox: BBox, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Clamp an (x, y, w, h) box to the image; returns integer (x0, y0, x1, y1) or None if empty
    (or not a box at all: a NaN or infinite number, which JSON readers accept)."""
    if not all(math.isfinite(v) for v in bbox):
        return None
    x, y, w, h = bbox
    x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
    x1, y1 = min(width, int(round(x + w))), min(height, int(round(y + h)))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return x0, y0, x1, y1


def crop_box(bbox: BBox, margin: float, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The crop EasyOCR would take for a word box: ``int(margin x its shorter side)`` added on each
    side, as ``easyocr.utils.group_text_box`` widens the boxes its detector finds (a vertical sign
    word is widened by its width, not its height), clipped; None when the box itself has no area
    inside the image (a margin never turns a box beside the image into a sliver of its edge).

    >>> crop_box((10, 10, 100, 25), 0.1, 640, 480), crop_box((10, 10, 30, 200), 0.1, 640, 480)
    ((8, 8, 112, 37), (7, 7, 43, 213))
    >>> crop_box((641, 10, 30, 20), 0.1, 640, 480) is None
    True
    """
    x, y, w, h = bbox
    if clip_box(bbox, width, height) is None:  # no area inside the image (or none at all)
        return None
    m = int(margin * min(w, h))
    return clip_box((x - m, y - m, w + 2 * m, h + 2 * m), width, height)
