"""Score recognisers on real labelled word crops: ``kocr evaluate-crops``.

The labels file is a TSV with a header line naming at least the columns ``image`` and ``text``
(further columns, e.g. ``note``, are ignored); each row is one crop, its image path relative to
the labels file. Fields are text split at tabs; a ``"`` is part of the text, except in a field that
only a CSV writer makes (``tsv_field``): ``"민원 ""서류"" 접수"`` (a spreadsheet's or pandas' quoting of
``민원 "서류" 접수``) reads as ``민원 "서류" 접수``, and in a file whose header is quoted (``"image"<TAB>"text"``,
a quote-all export) every quoted field is unquoted; ``"허가"`` in an unquoted file stays ``"허가"``, a
label printed with its quotes. The labels files this module and ``kocr.recipe export-crops`` write
(``tsv_row``) read back exactly. A ``.json`` labels file holds word boxes on whole images instead
(``read_box_labels``): each box is cut out, widened as EasyOCR widens the boxes its detector finds,
and scored as a crop, so labelled photos and scans are scored without a detector. Every crop is read whole, exactly as ``easyocr.Reader.recognize(crop)`` reads an
image without boxes (the image as one box, EasyOCR's resizing, contrast retry and greedy decoding),
so a model's score here is the score it gets inside EasyOCR (``quantize=False``). Tesseract reads
the same crops in single-line mode (``--psm 7``), many to one tesseract process.

Scores per model (``evaluation.metrics.recognition_scores``): ``n``, ``cer`` (micro: Σ edit
distance / Σ ground-truth length), ``word_accuracy`` (exact match after NFC), ``norm_ed``. With
several models, ``CropReport.paired`` compares each with the first crop by crop: words fixed,
words broken and a two-sided sign test (``evaluation.metrics.paired_words``).

Example:
    >>> crops = read_labels("crops/labels.tsv")                                  # doctest: +SKIP
    >>> report = score_crops(crops, {"english_g2": "english_g2", "tesseract": "tesseract"})  # doctest: +SKIP
    >>> report.metrics["english_g2"]["cer"]                                      # doctest: +SKIP
"""

from __future__ import annotations

import codecs
import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
from tqdm import tqdm

from evaluation.metrics import cer, paired_words, recognition_scores
from kocr.atomic import staged_files
from training.charset import not_utf8
from training.data.pages import (
    DONT_CARE,
    PageError,
    crop_box,
    decode_json_text,
    lone_surrogate,
    nfc,
    parse_page,
)
from training.data.sources import IMAGE_SUFFIXES, AmbiguousName, find_file

TESSERACT = "tesseract"
BATCH = 128  # crops handed at once to an engine that reads many (Tesseract: evaluation.tesseract.BATCH)


class ScoreInputError(ValueError):
    """A labels file, ground-truth text or image that cannot be scored; the message names it."""


@dataclass
class Crop:
    """One labelled crop: its image, its NFC ground truth and where it was listed (a TSV's line
    number, or for a box the word's 1-based index on its image); ``box`` (x0, y0, x1, y1) when the
    crop is a region of ``image``; ``font`` from a TSV's ``font`` column (generated sets name it)."""

    image: Path
    text: str
    line: int
    box: tuple[int, int, int, int] | None = None
    font: str = ""

    def source(self, folder: str | os.PathLike) -> str:
        """The image path relative to ``folder`` (an absolute one as it is), with ``#x0,y0,x1,y1`` when the
        crop is a box on it: how ``readings.tsv`` in ``folder`` names it, so that the file can be given
        back as ``--labels``, whose image paths are relative to the file, from any working folder."""
        image = self.image
        if not image.is_absolute():  # relative to the working folder; the folders' links resolved, as the OS reads ..
            image = Path(os.path.relpath(Path(os.path.realpath(image.parent), image.name), os.path.realpath(folder)))
        return str(image) if self.box is None else f"{image}#{','.join(map(str, self.box))}"

    def where(self, labels: str | os.PathLike = "") -> str:
        """Where the crop was listed, for messages: ``labels:line`` or ``labels: image word k``."""
        if self.box is None:
            return f"{labels}:{self.line}" if labels else str(self.image)
        return f"{f'{labels}: ' if labels else ''}{self.image.name} word {self.line}"


def tsv_field(value: str, quoted_file: bool = False) -> str:
    """One field of a labels TSV as its text: CSV quoting undone where only a CSV writer puts it.

    ``value`` is the field with its outer whitespace stripped, as ``read_labels`` passes it. A field
    wrapped in ``"`` whose inner quotes all come doubled is CSV-quoted when it holds a doubled
    quote (``"민원 ""서류"" 접수"`` -> ``민원 "서류" 접수``: spreadsheets, pandas and Python's csv quote a field
    holding a ``"`` so, and nothing else writes ``""`` inside quotes), when its inner text begins or
    ends with whitespace (``tsv_row`` quotes such a field, which the reader's strip would cut; no label
    is printed as ``" 허가"``) or when ``quoted_file`` (the header itself is quoted: a quote-all
    export). Any other ``"`` is text: ``"허가"`` in a plain file is a label printed with its quotes (a
    CSV writer quoting minimally leaves ``허가`` bare), as the platform's own files have written such labels.

    Example:
        >>> tsv_field('"민원 ""서류"" 접수"'), tsv_field('"허가"'), tsv_field('"허가"', quoted_file=True)
        ('민원 "서류" 접수', '"허가"', '허가')
        >>> tsv_field('" b.png"')
        ' b.png'
    """
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        if '"' not in inner.replace('""', "") and (quoted_file or '""' in inner or inner != inner.strip()):
            return inner.replace('""', '"')
    return value


def tsv_row(fields: list[str], where: str) -> str:
    """``fields`` as one line of the platform's TSV (tab-joined, newline-ended), each read back
    exactly by ``read_labels`` (which strips a field's outer whitespace, then applies ``tsv_field``):
    a field that would not come back so, one that ``tsv_field`` would take for CSV quoting (``"a""b"``)
    or one with outer whitespace (a file `` b.png``; ``"a""b" `` read as ``a"b`` without its quotes), is
    written CSV-quoted, every other field as it is.

    Raises ValueError naming ``where`` when a field holds a tab or a line break, which no plain TSV
    row can carry.
    """
    for value in fields:
        if any(c in value for c in "\t\n\r"):
            raise ValueError(f"{where}: field {value!r:.60} holds a tab or line break; a TSV row cannot carry it")
    return "\t".join(value if tsv_field(value.strip()) == value else '"' + value.replace('"', '""') + '"'
                     for value in fields) + "\n"


def read_labels(path: str | os.PathLike, margin: float = 0.1,
                skipped: list[tuple[str, str]] | None = None) -> list[Crop]:
    """Rows of a labels TSV (header with ``image`` and ``text``), image paths resolved and checked;
    a ``.json`` file is read as word boxes on whole images (``read_box_labels`` with ``margin``).

    Image names are matched as ``prepare`` matches them (``training.data.sources.find_file``): the
    exact path, else the file whose name differs only in NFC/NFD or case, ``\\`` separating folders.

    A row whose text is ``###`` (``DONT_CARE``, ICDAR's and AI-Hub's mark for an illegible word) is
    left out, as a box labelled so is: it is neither scored nor trained.

    Fields are read by ``tsv_field``: CSV quoting only where a CSV writer put it.

    With ``skipped`` (a list), a row whose image is missing, ambiguous (two files fit its name only
    by NFC/NFD or case) or unreadable, or whose box is unusable, is appended to it as (reason, where)
    and left out instead of stopping the read; a ``###`` row or box is appended as ``dont_care``.
    :func:`iter_labels` gives the same crops one at a time."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return read_box_labels(path, margin, skipped)
    return list(_tsv_crops(path, skipped))


def iter_labels(path: str | os.PathLike, margin: float = 0.1, skipped: Any = None) -> Iterator[Crop]:
    """:func:`read_labels` one crop at a time, for a labels TSV of millions of rows (``import-crops``):
    the file is read a line at a time, twice: first whole without yielding (so a bad line anywhere
    stops the read with the error ``read_labels`` raises, before any crop is used), then for the crops.
    ``skipped`` needs only ``append`` and a length (a tally, not a list of every row)."""
    path = Path(path)
    if path.suffix.lower() == ".json":  # one JSON document: parsed whole either way
        yield from read_box_labels(path, margin, skipped)
        return
    for _ in _tsv_crops(path, None if skipped is None else _Tally()):
        pass
    yield from _tsv_crops(path, skipped)


class _Tally:
    """A ``skipped`` list that only counts what is appended to it."""

    def __init__(self) -> None:
        self.count = 0

    def append(self, entry: tuple[str, str]) -> None:
        self.count += 1

    def __len__(self) -> int:
        return self.count


def _tsv_crops(path: Path, skipped: Any) -> Iterator[Crop]:
    """The crops of a labels TSV in row order (``read_labels``), read a line at a time."""
    lines = _tsv_lines(path)
    first = next(lines, None)
    if first is None:
        raise ScoreInputError(f"{path}: empty; expected a header line 'image<TAB>text'")
    quoted = any(len(name) >= 2 and name[0] == name[-1] == '"' for name in first.split("\t"))
    header = [tsv_field(name, quoted) for name in first.split("\t")]  # "image"<TAB>"text": a quote-all export
    if "image" not in header or "text" not in header:
        raise ScoreInputError(f"{path}:1: header {first!r:.80} lacks the columns 'image' and 'text' "
                              "(tab-separated)")
    col_image, col_text = header.index("image"), header.index("text")
    col_font = header.index("font") if "font" in header else None
    crops, dont_care = 0, 0
    listings: dict[Path, dict[str, list[str]]] = {}  # each folder listed once, not once per row (find_file)
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) <= max(col_image, col_text) or any(f.strip() for f in fields[len(header):]):
            raise ScoreInputError(f"{path}:{number}: {len(fields)} tab-separated field(s), expected "
                                  f"{len(header)} as in the header (a tab inside the text?): {line!r:.80}")
        fields = [tsv_field(value.strip(), quoted) for value in fields]
        image, text = fields[col_image], nfc(fields[col_text])
        if not image or not text:
            raise ScoreInputError(f"{path}:{number}: empty {'image path' if not image else 'text'}")
        if text == DONT_CARE:
            dont_care += 1
            if skipped is not None:
                skipped.append(("dont_care", f"{path}:{number}"))
            continue
        try:  # matched as prepare matches names: NFC or NFD, any case, \\ as a folder separator
            image_path = find_file(path.parent, image, listings) or path.parent / image
        except AmbiguousName as exc:
            if skipped is None:
                raise ScoreInputError(f"{path}:{number}: {exc}") from None
            skipped.append(("image_ambiguous", f"{path}:{number}: {exc}"))
            continue
        if not image_path.is_file():
            problem = f"{path}:{number}: image {image_path} {'is a folder' if image_path.is_dir() else 'not found'}"
            if skipped is None:
                raise ScoreInputError(problem)
            skipped.append(("image_missing", problem))
            continue
        crops += 1
        yield Crop(image_path, text, number, font=fields[col_font] if col_font is not None else "")
    if not crops and not skipped:
        raise ScoreInputError(f"{path}: no rows after the header"
                              + (f" but {dont_care} marked {DONT_CARE} (not scored)" if dont_care else ""))


def _tsv_lines(path: Path) -> Iterator[str]:
    """The lines of a labels TSV without their ends, one at a time. Rows end at CR LF, LF or CR only
    (``str.splitlines`` would also cut a text at U+2028, U+0085, …). The whole file is checked to be
    UTF-8 text first (``_check_text``), so a bad byte anywhere is named before any line is used."""
    _check_text(path)
    with path.open(encoding="utf-8-sig", newline="") as fh:  # newline="": CR LF, LF and CR, kept on the line
        try:
            for line in fh:
                yield line[:-2] if line.endswith("\r\n") else line[:-1] if line.endswith(("\n", "\r")) else line
        except UnicodeDecodeError:  # rewritten since the check
            _refuse_text(path, _labels_bytes(path))


def _check_text(path: Path, chunk: int = 1 << 16) -> None:
    """ScoreInputError unless the labels file is UTF-8 text without NUL, read 64 KiB at a time;
    the message is the one the whole file's bytes give (``_refuse_text``)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    try:
        with path.open("rb") as fh:
            while block := fh.read(chunk):
                if b"\0" in block:
                    break
                decoder.decode(block)
            else:
                decoder.decode(b"", final=True)
                return
    except FileNotFoundError:
        raise ScoreInputError(f"{path}: labels file not found") from None
    except IsADirectoryError:
        raise ScoreInputError(f"{path}: a folder, expected a labels file (.tsv or .json)") from None
    except UnicodeDecodeError:
        pass
    _refuse_text(path, _labels_bytes(path))


def _refuse_text(path: Path, raw: bytes) -> None:
    """ScoreInputError naming the first bad byte of ``raw`` (not UTF-8) or its first NUL."""
    try:
        raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ScoreInputError(f"{path}: {not_utf8(exc)}") from None
    if b"\0" in raw:  # valid UTF-8, but no text file holds NUL: UTF-16 without a BOM decodes so
        raise ScoreInputError(f"{path}: not UTF-8 text ({nul_note(raw)})")


def nul_note(raw: bytes) -> str:
    """Why bytes that decode as UTF-8 are still no text: the first NUL, as UTF-16 saved without a
    byte-order mark gives (Windows' "Unicode" without BOM; every ASCII character then has a NUL)."""
    where = raw.find(b"\0")
    return f"NUL character at byte {where}; UTF-16 saved without a byte-order mark? save it as UTF-8"


def _labels_bytes(path: Path) -> bytes:
    """The labels file's bytes; ScoreInputError when it is missing or a folder."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ScoreInputError(f"{path}: labels file not found") from None
    except IsADirectoryError:
        raise ScoreInputError(f"{path}: a folder, expected a labels file (.tsv or .json)") from None


def read_box_labels(path: str | os.PathLike, margin: float = 0.1,
                    skipped: list[tuple[str, str]] | None = None) -> list[Crop]:
    """Word boxes on whole images, each a crop, in file order.

    ``path`` is one page JSON in the platform's AI-Hub schemas (``training.data.pages``; its image lies
    beside the file and is found as ``prepare`` pairs a page with its image: the file it names, matched
    as ``read_labels`` matches names, else the one image of the JSON's stem, ``X.png`` for an ``X.json``
    naming ``X.jpg``) or an image-keyed file as ICDAR-style tools write it::

        {"sign.png": {"words": [{"points": [[x, y], [x, y], [x, y], [x, y]], "transcription": "서울"}]}}

    with image names relative to the file (``../shared/realdata/easyocr/gt.json``). Each box is made
    axis-aligned, widened by ``margin`` x its height on every side (EasyOCR's ``add_margin`` on the
    boxes its detector finds) and clipped to the image. Words with empty text or ``###`` are skipped
    (with ``skipped``, a ``###`` word is appended to it as ``dont_care``, as ``read_labels`` lists a row).
    A missing, ambiguous or unreadable image, a box wholly outside its image or a malformed entry raises
    ``ScoreInputError`` naming the file, the image and the word; with ``skipped`` (a list), an
    image or box of the first kinds is appended to it as (reason, where: ``image_missing``,
    ``image_ambiguous``, ``image_unreadable``, ``bad_box``; ``boxes_before_exif_turn``, a page JSON
    giving the stored size of an image its EXIF orientation turns a quarter, as ``prepare`` leaves it
    out) and left out instead.
    """

    from training.data.pixels import boxes_on_stored_pixels

    def problem(reason: str, where: str) -> None:
        if skipped is None:
            raise ScoreInputError(where)
        skipped.append((reason, where))

    path = Path(path)
    raw = _labels_bytes(path)
    text = decode_json_text(raw)  # as prepare reads page JSON: UTF-8 (BOM or not), else CP949
    if text is None:
        raise ScoreInputError(f"{path}: neither UTF-8 nor CP949 (EUC-KR) text; save it as UTF-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScoreInputError(f"{path}: not JSON ({exc})") from None
    if isinstance(data, dict) and ("images" in data or "Images" in data):
        try:
            page = parse_page(raw, path)
        except PageError as exc:
            raise ScoreInputError(str(exc)) from None
        images = {page.image_name: [(word.bbox, _one_line(word.text, path, page.image_name, word.number), word.number)
                                    for word in page.words]}
        label_size: tuple[float, float] | None = (page.width, page.height)
        stem = path.stem  # prepare pairs a page with an image of its stem when the one it names is not there
    else:
        images, stem, label_size = _image_keyed_boxes(data, path), None, None
    crops = []
    listings: dict[Path, dict[str, list[str]]] = {}  # each folder listed once, not once per image (find_file)
    for name, words in images.items():
        try:  # matched as prepare pairs a page with its image: NFC or NFD, any case, \\ as a separator
            image = find_file(path.parent, name, listings) if name else None
            if image is None and stem is not None:
                image = _image_of_stem(path, name, stem, listings)
        except AmbiguousName as exc:
            problem("image_ambiguous", f"{path}: {exc}")
            continue
        if image is None:
            problem("image_missing", f"{path}: image {path.parent / name} not found")
            continue
        try:
            size, orientation = _image_size(image, path)
        except ScoreInputError as exc:
            problem("image_unreadable", str(exc))
            continue
        sideways = label_size and boxes_on_stored_pixels(label_size, (size[1], size[0]), orientation)
        if sideways:  # as prepare leaves the page out: its boxes cut from the upright image hold other pixels
            problem("boxes_before_exif_turn", f"{path}: {name}: {sideways}")
            continue
        for bbox, text, index in words:
            text = nfc(text)
            if text == DONT_CARE and skipped is not None:
                skipped.append(("dont_care", f"{path}: {name} word {index}"))
            if not text or text == DONT_CARE:
                continue
            if not all(math.isfinite(v) for v in bbox):
                problem("bad_box", f"{path}: {name} word {index} ({text!r}): box {list(bbox)} is not finite")
                continue
            box = crop_box(bbox, margin, *size)
            if box is None:
                where = "has no area" if bbox[2] <= 0 or bbox[3] <= 0 else f"lies outside the {size[0]}x{size[1]} image"
                problem("bad_box", f"{path}: {name} word {index} ({text!r}): box {[round(v, 1) for v in bbox]} "
                        + where)
                continue
            crops.append(Crop(image, text, index, box))
    if not crops and not skipped:
        raise ScoreInputError(f"{path}: no labelled word boxes")
    return crops


def _image_of_stem(path: Path, name: str, stem: str, listings: dict[Path, dict[str, list[str]]]) -> Path | None:
    """The one image beside page JSON ``path`` whose stem is ``stem`` (any image suffix, matched by
    ``find_file``), as ``prepare`` pairs a page whose named image ``name`` is not there; None when there
    is none, AmbiguousName naming them when there are several (``X.png`` and ``X.tif``)."""
    fits = list(dict.fromkeys(found for suffix in IMAGE_SUFFIXES
                              if (found := find_file(path.parent, stem + suffix, listings)) is not None))
    if len(fits) > 1:
        raise AmbiguousName(f"{' and '.join(map(str, fits))}: {path.name} names {name or 'no image'}, which is not "
                            "there, and several images have its stem; keep one, or name it in the JSON")
    return fits[0] if fits else None


def _image_keyed_boxes(data: Any, path: Path) -> dict[str, list[tuple[tuple[float, float, float, float], str, int]]]:
    """``{image: {"words": [{"points", "transcription"}]}}`` as image -> [((x, y, w, h), text, word number)]."""
    if not isinstance(data, dict) or not data:
        raise ScoreInputError(f"{path}: expected page JSON (\"images\"/\"annotations\") or an object mapping "
                              "image names to {\"words\": [{\"points\", \"transcription\"}]}")
    images = {}
    for name, entry in data.items():
        words = entry.get("words") if isinstance(entry, dict) else None
        if not isinstance(words, list):
            raise ScoreInputError(f"{path}: {name}: no \"words\" list")
        boxes = []
        for index, word in enumerate(words, start=1):
            try:
                xs, ys = zip(*((float(x), float(y)) for x, y in word["points"]))
                text = word["transcription"]
                if not isinstance(text, str):
                    raise TypeError(text)
            except (KeyError, TypeError, ValueError):
                raise ScoreInputError(f"{path}: {name} word {index}: expected \"points\" [[x, y], ...] and a "
                                      f"\"transcription\" string, got {json.dumps(word, ensure_ascii=False):.80}") from None
            boxes.append(((min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)), _one_line(text, path, name, index),
                          index))
        images[str(name)] = boxes
    return images


def _one_line(text: str, path: Path, name: str, index: int) -> str:
    """``text`` with its outer whitespace stripped, as every label is (``pages.nfc``), when what is
    left holds no tab or line break, else ScoreInputError naming the word: one word's label, it could
    not be one row of readings.tsv (or of an exported labels TSV) either. A final line break or tab
    (``"서울\\n"``, as text pasted from an editor ends) is outer whitespace, which ``prepare`` and
    ``evaluate`` strip from the same page JSON: it is no reason to refuse the file."""
    text = text.strip()
    if any(c in text for c in "\t\n\r"):
        raise ScoreInputError(f"{path}: {name} word {index}: transcription {text!r:.60} holds a tab "
                              "or line break; one word box takes one line of text")
    surrogate = lone_surrogate(text)
    if surrogate:
        raise ScoreInputError(f"{path}: {name} word {index}: transcription {text!r:.60} holds an unpaired "
                              f"surrogate {surrogate!r} (a broken \\uXXXX escape), which is not text")
    return text


def _image_size(image: Path, labels: Path) -> tuple[tuple[int, int], int]:
    """((width, height) of ``image`` upright (its EXIF orientation applied, as ``load_image`` reads it),
    its EXIF orientation) from its header; ScoreInputError naming both files otherwise."""
    from PIL import Image, UnidentifiedImageError

    from training.data.pixels import QUARTER_TURNS, note_pixels

    try:
        with Image.open(image) as opened:
            width, height = opened.size
            note_pixels(str(image), width * height)
            orientation = opened.getexif().get(0x0112, 1)
            return ((height, width) if orientation in QUARTER_TURNS else (width, height)), orientation
    except FileNotFoundError:
        raise ScoreInputError(f"{labels}: image {image} not found") from None
    except IsADirectoryError:
        raise ScoreInputError(f"{labels}: image {image} is a folder") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ScoreInputError(f"{labels}: {image}: not a readable image ({exc})") from None


@functools.lru_cache(maxsize=2)
def _page_grey(image: Path, mtime_ns: int) -> np.ndarray:
    """A whole image, grey, kept while its boxes are cut in turn (``mtime_ns`` keys out a rewritten file)."""
    from evaluation.reader import load_image

    return load_image(image)[1]


def load_crop(crop: Crop, labels: str | os.PathLike = "") -> np.ndarray:
    """The crop as the greyscale array ``easyocr.Reader`` makes of an image file (its box's region)."""
    from evaluation.reader import load_image

    try:
        if crop.box is None:
            return load_image(crop.image)[1]
        x0, y0, x1, y1 = crop.box
        return _page_grey(crop.image, crop.image.stat().st_mtime_ns)[y0:y1, x0:x1].copy()
    except (ValueError, OSError) as exc:
        why = str(exc).removeprefix(f"{crop.image}: ")  # load_image names the file already
        raise ScoreInputError(f"{crop.where(labels)}: {crop.image}: "
                              + (why if why.startswith(("not a readable image", "cannot be read")) else f"not a readable image ({why})")) \
            from None


class CropEngine(Protocol):
    def read(self, grey: np.ndarray) -> str: ...


class RecognizerCrops:
    """A platform recogniser reading a whole crop the way ``easyocr.Reader.recognize`` does."""

    def __init__(self, spec: str, device: str = "cpu") -> None:
        from evaluation.reader import Recognition
        from training.checkpoint import load_recognizer

        self.recognition = Recognition(load_recognizer(spec, device), device=device)

    def read(self, grey: np.ndarray) -> str:
        height, width = grey.shape[:2]
        (_, text, _), = self.recognition.read_boxes(grey, [[0, width, 0, height]], [])
        return text


class TesseractCrops:
    """Tesseract 5 (kor+eng) in single-line mode."""

    def __init__(self) -> None:
        from evaluation.tesseract import tesseract_available

        if not tesseract_available():
            raise ScoreInputError("tesseract with kor+eng is not installed "
                                  "(apt-get install tesseract-ocr tesseract-ocr-kor)")

    def read(self, grey: np.ndarray) -> str:
        from evaluation.tesseract import read_crop_tesseract

        return read_crop_tesseract(grey)

    def read_many(self, greys: list[np.ndarray]) -> list[str]:
        """Each crop as ``read`` reads it, many to one tesseract process (``read_crops_tesseract``)."""
        from evaluation.tesseract import read_crops_tesseract

        return read_crops_tesseract(greys)


def make_crop_engine(spec: str, device: str = "cpu") -> CropEngine:
    """``tesseract`` -> Tesseract; anything else is a recogniser spec for ``load_recognizer``."""
    return TesseractCrops() if spec == TESSERACT else RecognizerCrops(spec, device)


@dataclass
class CropReport:
    """Scores per model and every crop's readings (``readings[model][i]`` for ``crops[i]``)."""

    crops: list[Crop]
    metrics: dict[str, dict[str, float]]
    readings: dict[str, list[str]]
    pictures: list[Path] = field(default_factory=list)

    def worst(self, count: int) -> list[int]:
        """Indices of the ``count`` worst crops: highest CER of the first model, then of the others."""
        models = list(self.readings)

        def key(i: int) -> tuple[float, float, int]:
            cers = [cer(self.crops[i].text, self.readings[m][i]) for m in models]
            rest = sum(cers[1:]) / (len(cers) - 1) if len(cers) > 1 else 0.0
            return -cers[0], -rest, i

        return sorted(range(len(self.crops)), key=key)[:count]

    def paired(self) -> dict[str, dict[str, Any]]:
        """Each model after the first against the first on the same crops (``paired_words``):
        words it reads exactly that the first misreads (``fixed``), the reverse (``broken``) and
        the two-sided sign test's ``p``; empty with one model."""
        models = list(self.readings)
        gts = [c.text for c in self.crops]
        return {label: {"against": models[0], **paired_words(gts, self.readings[models[0]], self.readings[label])}
                for label in models[1:]}


def score_crops(crops: list[Crop], models: dict[str, str], device: str = "cpu", progress: bool = True,
                labels: str | os.PathLike = "") -> CropReport:
    """Read every crop with every model (label -> spec) and score the readings. An engine that reads
    many crops at once (``read_many``: Tesseract) is handed ``BATCH`` crops at a time."""
    engines = {label: make_crop_engine(spec, device) for label, spec in models.items()}
    readings: dict[str, list[str]] = {label: [] for label in engines}
    batched = {label: engine for label, engine in engines.items() if hasattr(engine, "read_many")}
    pending: list[np.ndarray] = []  # crops the batched engines (Tesseract) have still to read

    bar = tqdm(total=len(crops), desc="evaluate-crops", unit="crop", disable=not progress)

    def read_pending() -> None:
        for label, engine in batched.items():
            readings[label].extend(engine.read_many(pending))
        bar.update(len(pending))  # a crop counts once every engine has read it
        pending.clear()

    with bar:
        for crop in crops:
            grey = load_crop(crop, labels)
            for label, engine in engines.items():
                if label not in batched:
                    readings[label].append(engine.read(grey))
            if not batched:
                bar.update(1)
                continue
            pending.append(grey)
            if len(pending) >= BATCH:
                read_pending()
        if pending:
            read_pending()
    gts = [c.text for c in crops]
    metrics = {label: recognition_scores(gts, texts) for label, texts in readings.items()}
    return CropReport(crops, metrics, readings)


def error_analysis(report: CropReport, top: int = 15) -> dict[str, dict[str, Any]]:
    """Per model: the most frequent character substitutions and where in the Hangul syllable
    they fall (``evaluation.analysis.confusions`` and ``jamo_confusions``)."""
    from evaluation.analysis import confusions, jamo_confusions

    out: dict[str, dict[str, Any]] = {}
    for label, texts in report.readings.items():
        pairs = [(crop.text, text) for crop, text in zip(report.crops, texts)]
        out[label] = {"characters": [{"gt": a, "pred": b, "count": n} for a, b, n in confusions(pairs, top)],
                      "jamo": jamo_confusions(pairs, top)}
    return out


def write_outputs(report: CropReport, out: str | os.PathLike, worst: int,
                  scores: dict[str, Any] | None = None) -> list[Path]:
    """``readings.tsv`` (every crop, ground truth and each model's reading; the image paths relative to
    ``out``, so it reads back as ``--labels``), ``confusions.json``
    (``error_analysis``), the worst crops drawn and, given ``scores``, ``scores.json``.

    The files replace an earlier run's in ``out`` only once all are written (``staged_files``):
    a full disk or a kill leaves the earlier run's files whole, and a new run never keeps an
    earlier run's ``worst_*.png``. Returns the pictures' final paths.
    """
    from evaluation.drawing import draw_crop_readings

    out = Path(out)
    with staged_files(out, written_by_a_run) as stage:
        tsv = stage / "readings.tsv"
        where = out / "readings.tsv"
        with tsv.open("w", encoding="utf-8", newline="") as fh:
            fh.write(tsv_row(["image", "text", *report.readings], str(where)))
            for i, crop in enumerate(report.crops):
                fh.write(tsv_row([crop.source(out), crop.text, *(texts[i] for texts in report.readings.values())],
                                 f"{where}: {crop.where()}"))
        (stage / "confusions.json").write_text(json.dumps(error_analysis(report), ensure_ascii=False, indent=1)
                                               + "\n", encoding="utf-8")
        drawn = []
        for rank, i in enumerate(report.worst(worst), start=1):
            crop = report.crops[i]
            readings = {label: (texts[i], cer(crop.text, texts[i])) for label, texts in report.readings.items()}
            name = crop.image.stem if crop.box is None else f"{crop.image.stem}_word{crop.line}"
            drawn.append(draw_crop_readings(crop.image, crop.text, readings,
                                            stage / f"worst_{rank:02d}_{name}.png", box=crop.box).name)
        if scores is not None:
            (stage / "scores.json").write_text(json.dumps(scores, ensure_ascii=False, indent=1) + "\n",
                                               encoding="utf-8")
    report.pictures.extend(out / name for name in drawn)
    return report.pictures


def written_by_a_run(name: str) -> bool:
    """The names ``write_outputs`` writes, which include ``score_pages.write_scores``' scores.json: an
    earlier run's copy, of either command, is replaced or removed, so one folder never holds one
    run's scores.json beside another run's readings."""
    return (name in {"readings.tsv", "confusions.json", "scores.json"}
            or (name.startswith("worst_") and name.endswith(".png")))
