"""Score whole-page reading against plain-text ground truth without boxes: ``kocr evaluate-pages``.

Each page image ``<stem>.<ext>`` in the image folder has its ground truth in ``<stem>.txt`` of the
text folder, one text line per line. A recogniser reads the page end to end (CRAFT + recognition,
:class:`evaluation.reader.PageReader`; the detector runs once per page for all recognisers);
Tesseract reads it with its own layout analysis (``--psm 3``). Two scores need no boxes:

- **Order-free character precision / recall / F1**: the NFC text of each side as a multiset of its
  non-whitespace characters; ``tp = Σ_c min(gt[c], pred[c])``, precision = tp / |pred|,
  recall = tp / |gt|, F1 = 2PR / (P + R) (each 0 when its denominator is 0). Reading order, line
  breaks and word spacing do not count. Summed over pages (micro) for the set.
- **Line-matched CER**: predicted words are grouped into lines (:func:`group_lines`); ground-truth
  lines are the non-blank lines of the .txt. Both sides are compared with all whitespace removed.
  Each ground-truth line is matched to at most one predicted line, and each predicted line to at
  most one ground-truth line, by the assignment that minimises the total Levenshtein distance,
  where a ground-truth line left unmatched costs its length (it reads as deleted). line CER =
  Σ distance / Σ ground-truth characters, over all pages. No line costs more than its length, so
  line CER lies in [0, 1]. Unmatched predicted lines cost nothing here (extra text is what character
  precision measures).

Example:
    >>> char_counts("서울 시청", "시청 서울역")
    CharCounts(tp=4, gt=4, pred=5)
    >>> line_cer_counts(["서울 시청", "부산역"], ["부산억", "서울시청", "잡음"])
    (1, 7)
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rapidfuzz.distance import Levenshtein
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from evaluation.metrics import f1_score
from evaluation.reader import (
    Detector,
    DetectorSettings,
    PageReader,
    load_image,
    results_to_page,
)
from evaluation.score_crops import TESSERACT, ScoreInputError, nul_note, written_by_a_run
from kocr.atomic import staged_files
from training.charset import not_utf8, text_lines
from training.data.pages import Page, Word, nfc
from training.data.sources import AmbiguousName, find_file, name_key, stray_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
LINE_OVERLAP = 0.5  # a word joins a line when their vertical overlap is this share of the smaller height


def _squeeze(text: str) -> str:
    return "".join(nfc(text).split())


@dataclass(frozen=True)
class CharCounts:
    """Order-free character tallies of one page or of a set (summed)."""

    tp: int
    gt: int
    pred: int

    def __add__(self, other: "CharCounts") -> "CharCounts":
        return CharCounts(self.tp + other.tp, self.gt + other.gt, self.pred + other.pred)

    @property
    def precision(self) -> float:
        return self.tp / self.pred if self.pred else 0.0

    @property
    def recall(self) -> float:
        return self.tp / self.gt if self.gt else 0.0

    @property
    def f1(self) -> float:
        return f1_score(self.precision, self.recall)


def char_counts(gt: str, pred: str) -> CharCounts:
    """Multiset overlap of the non-whitespace characters of two texts (NFC)."""
    g, p = Counter(_squeeze(gt)), Counter(_squeeze(pred))
    return CharCounts(sum((g & p).values()), sum(g.values()), sum(p.values()))


def group_lines(words: list[Word], overlap: float = LINE_OVERLAP) -> list[str]:
    """Predicted words as text lines, top to bottom, each read left to right and joined by spaces.

    Words are taken by increasing vertical centre; a word joins the first line whose vertical span
    overlaps it by at least ``overlap`` of the smaller of the two heights (the line's span grows
    with each word), else it starts a new line.
    """
    lines: list[tuple[float, float, list[Word]]] = []  # (top, bottom, words)
    for word in sorted((w for w in words if w.text.strip()), key=lambda w: (w.bbox[1] + w.bbox[3] / 2, w.bbox[0])):
        _, y0, _, y1 = word.corners
        for k, (top, bottom, members) in enumerate(lines):
            shared = min(y1, bottom) - max(y0, top)
            if shared >= overlap * max(1e-9, min(y1 - y0, bottom - top)):
                members.append(word)
                lines[k] = (min(top, y0), max(bottom, y1), members)
                break
        else:
            lines.append((y0, y1, [word]))
    lines.sort(key=lambda line: line[0])
    return [" ".join(w.text.strip() for w in sorted(members, key=lambda w: w.bbox[0])) for _, _, members in lines]


def line_cer_counts(gt_lines: list[str], pred_lines: list[str]) -> tuple[int, int]:
    """(Σ edit distance, Σ ground-truth characters) of the optimal line matching (module doc)."""
    gts = [s for s in (_squeeze(line) for line in gt_lines) if s]
    preds = [s for s in (_squeeze(line) for line in pred_lines) if s]
    total = sum(len(g) for g in gts)
    if not gts:
        return 0, 0
    # columns: the predicted lines, then one "unmatched" column per ground-truth line
    cost = np.empty((len(gts), len(preds) + len(gts)), dtype=np.int64)
    for i, g in enumerate(gts):
        cost[i, :len(preds)] = [Levenshtein.distance(g, p) for p in preds]
        cost[i, len(preds):] = len(g)
    rows, cols = linear_sum_assignment(cost)
    return int(cost[rows, cols].sum()), total


@dataclass
class PageItem:
    """A page image and its ground-truth lines."""

    image: Path
    text_file: Path
    lines: list[str]


def read_page_item(image: Path, text_file: Path) -> PageItem:
    """A page image with its ground-truth lines from ``text_file`` (NFC, blank lines dropped). Lines end at
    LF, CR LF or CR only: a U+2028 line separator, U+2029, U+0085, a form feed, … inside a line is a space in
    it, with a warning (``charset.text_lines``), not the start of another ground-truth line."""
    if not text_file.is_file():
        raise ScoreInputError(f"{image}: no ground truth {text_file}")
    raw = text_file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ScoreInputError(f"{text_file}: {not_utf8(exc)}") from None
    if b"\0" in raw:  # valid UTF-8, but no text file holds NUL: UTF-16 without a BOM decodes so
        raise ScoreInputError(f"{text_file}: not UTF-8 text ({nul_note(raw)})")
    lines = text_lines(text, text_file)
    lines = [nfc(line.strip()) for line in lines if line.strip()]
    if not lines:  # nothing to recall: the page would score 0 and pull the set down unseen
        raise ScoreInputError(f"{text_file}: no ground-truth text for {image.name} (empty or blank lines only)")
    return PageItem(image, text_file, lines)


def find_pages(images: str | os.PathLike, texts: str | os.PathLike,
               skipped: list[tuple[str, str]] | None = None) -> list[PageItem]:
    """Every image in ``images`` with its ``<stem>.txt`` in ``texts`` (both required).

    Hidden and system files (``._scan.jpg`` that macOS leaves beside ``scan.jpg`` on a shared disk,
    ``.DS_Store``, ``Thumbs.db``) are not pages, as ``prepare`` takes none (``sources.stray_file``).
    Two images of one stem (``scan.jpg`` and ``scan.png``) would both be scored against
    ``scan.txt``, the page counted twice: ScoreInputError naming both. Stems that differ only in case
    or in NFC/NFD (``Scan.jpg`` and ``scan.png``) are one stem too: on a case-insensitive disk (Windows,
    macOS) ``Scan.txt`` and ``scan.txt`` are one file, and where they are two, which is whose is a guess.
    The ``.txt`` is found as ``prepare`` matches names (``sources.find_file``): the exact name, else the
    one that differs only in NFC/NFD or case (two such: ScoreInputError naming both). With ``skipped`` (a list),
    the files left out are appended to it as (reason, path), so the caller can say the set is
    smaller than the folders: ``no_image`` for a ``.txt`` in ``texts`` that no image has,
    ``not_a_page_image`` for a file in ``images`` of another type (``.gif``, ``.heic``, …).
    """
    images, texts = Path(images), Path(texts)
    for folder, what, flag in ((images, "image", "--images"), (texts, "text", "--text")):
        if not folder.is_dir():  # a file (the page itself, its .txt) is no folder: said so, not "not found"
            raise ScoreInputError(f"{folder}: " + (f"a file, not a folder ({flag} takes the {what} folder)"
                                                   if folder.exists() else f"{what} folder not found"))
    files = sorted(p for p in images.iterdir() if p.is_file() and not stray_file(p.name))
    pages = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    by_stem: dict[str, list[Path]] = {}
    for image in pages:  # Scan.jpg and scan.png are one stem: one file on a case-insensitive disk
        by_stem.setdefault(name_key(image.stem), []).append(image)
    twins = next((found for found in by_stem.values() if len(found) > 1), None)
    if twins:
        text_names = " or ".join(dict.fromkeys(str(texts / f"{p.stem}.txt") for p in twins))
        case = "" if len({p.stem for p in twins}) == 1 else " (names that differ only in case or in NFC/NFD are " \
                                                           "one name on Windows and macOS disks)"
        raise ScoreInputError(f"{' and '.join(str(p) for p in twins)}: two images of one stem{case} would both be "
                              f"scored against {text_names}; keep one of them in {images}")
    listings: dict[Path, dict[str, list[str]]] = {}  # texts listed once, not once per image (find_file)
    items = [read_page_item(image, _ground_truth(texts, image, listings)) for image in pages]
    if not items:
        raise ScoreInputError(f"{images}: no page images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if skipped is not None:
        matched = {item.text_file.name for item in items}
        same = images.resolve() == texts.resolve()
        skipped += [("not_a_page_image", str(p)) for p in files
                    if p.suffix.lower() not in IMAGE_SUFFIXES and not (same and p.suffix.lower() == ".txt")]
        skipped += [("no_image", str(p)) for p in sorted(texts.iterdir())
                    if p.suffix.lower() == ".txt" and p.is_file() and not stray_file(p.name) and p.name not in matched]
    return items


def _ground_truth(texts: Path, image: Path, listings: dict[Path, dict[str, list[str]]] | None = None) -> Path:
    """``<stem>.txt`` of ``image`` in ``texts``, matched as ``prepare`` matches names (NFC or NFD, any
    case: ``민원서류.jpg`` from a macOS zip finds ``민원서류.txt`` saved on Windows, ``scan.TXT`` too);
    the exact name when it is there. ScoreInputError naming both when two files fit equally."""
    try:
        return find_file(texts, f"{image.stem}.txt", listings) or texts / f"{image.stem}.txt"
    except AmbiguousName as exc:
        raise ScoreInputError(f"{image}: ground truth: {exc}") from None


def describe_skipped(skipped: list[tuple[str, str]], shown: int = 3) -> str:
    """``find_pages``' left-out files as one line: how many of each kind, the first ``shown`` named."""
    what = {"no_image": "ground-truth .txt with no image",
            "not_a_page_image": f"not a page image ({', '.join(sorted(IMAGE_SUFFIXES))})"}
    parts = []
    for reason, label in what.items():
        paths = [path for kind, path in skipped if kind == reason]
        if paths:
            more = f", … {len(paths) - shown} more" if len(paths) > shown else ""
            parts.append(f"{len(paths)} {label}: {', '.join(paths[:shown])}{more}")
    return "; ".join(parts)


@dataclass
class PageResult:
    """One model's reading of one page (its text lines) and its tallies."""

    lines: list[str]
    gt_lines: int
    chars: CharCounts
    line_edits: int
    line_chars: int

    def as_dict(self, image: Path) -> dict:
        return {"image": str(image), "char_precision": self.chars.precision, "char_recall": self.chars.recall,
                "char_f1": self.chars.f1, "line_cer": self.line_edits / self.line_chars if self.line_chars else 0.0,
                "lines": self.lines}


def score_page_text(item: PageItem, predicted: Page) -> PageResult:
    """Both scores of one predicted page against its ground-truth lines."""
    lines = group_lines(predicted.words)
    edits, chars = line_cer_counts(item.lines, lines)
    return PageResult(lines, len(item.lines), char_counts("".join(item.lines), "".join(lines)), edits, chars)


def summarise(results: list[PageResult]) -> dict[str, float]:
    """Set-level scores of one model, summed over pages (micro)."""
    chars = sum((r.chars for r in results), CharCounts(0, 0, 0))
    edits, total = sum(r.line_edits for r in results), sum(r.line_chars for r in results)
    return {"pages": len(results), "char_precision": chars.precision, "char_recall": chars.recall,
            "char_f1": chars.f1, "line_cer": edits / total if total else 0.0, "gt_chars": chars.gt,
            "pred_chars": chars.pred, "gt_lines": sum(r.gt_lines for r in results),
            "pred_lines": sum(len(r.lines) for r in results)}


def score_pages(items: list[PageItem], models: dict[str, str], settings: DetectorSettings | None = None,
                device: str = "cpu", progress: bool = True) -> dict[str, dict]:
    """Read every page with every model (label -> recogniser spec or ``tesseract``) and score it.

    Recognisers read the boxes of one shared CRAFT pass per page, as :class:`PageReader` does.
    Returns, per model, :func:`summarise`'s scores plus ``per_page`` (scores and predicted lines).
    """
    from evaluation.tesseract import read_page_tesseract, tesseract_available
    from training.checkpoint import load_recognizer

    settings = settings or DetectorSettings()
    if TESSERACT in models.values() and not tesseract_available():
        raise ScoreInputError("tesseract with kor+eng is not installed (apt-get install tesseract-ocr tesseract-ocr-kor)")
    recognisers = {label: spec for label, spec in models.items() if spec != TESSERACT}
    detector = Detector(settings, device) if recognisers else None
    readers = {label: PageReader(load_recognizer(spec, device), settings, device, detector)
               for label, spec in recognisers.items()}
    results: dict[str, list[PageResult]] = {label: [] for label in models}
    for item in tqdm(items, desc="evaluate-pages", unit="page", disable=not progress):
        try:
            rgb, grey = load_image(item.image)
        except (ValueError, OSError) as exc:
            raise ScoreInputError(str(exc)) from None
        boxes = detector.detect(rgb) if detector is not None else ([], [])
        for label in models:
            if label in readers:
                page = results_to_page(item.image.name, grey, readers[label].recognition.read_boxes(grey, *boxes))
            else:
                page = read_page_tesseract(item.image)
            results[label].append(score_page_text(item, page))
    return {label: {**summarise(pages), "per_page": [r.as_dict(item.image) for item, r in zip(items, pages)]}
            for label, pages in results.items()}


def write_scores(scores: dict[str, dict], out: str | os.PathLike) -> Path:
    """``scores.json`` in ``out``, replacing an earlier run's files there as ``score_crops.write_outputs``
    does (``staged_files``): an evaluate-crops run's readings.tsv, confusions.json and worst_*.png
    are removed with its scores.json, so they never sit beside scores this run wrote."""
    with staged_files(out, written_by_a_run) as stage:
        (stage / "scores.json").write_text(json.dumps(scores, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return Path(out) / "scores.json"
