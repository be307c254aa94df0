"""Labelled word crops a user already has, as an LMDB training set (``kocr import-crops``).

The input is what ``kocr evaluate-crops`` scores: a TSV with a header (``image``, ``text``) naming
crop images relative to it, or a ``.json`` of word boxes on whole images. Each crop is stored as the
greyscale PNG that ``easyocr.Reader`` would make of it (the reading path evaluation uses), under its
NFC label, so the set trains as ``--data``'s ``train/`` or ``val/`` or in ``train.mix``.

Rows the charset cannot express are dropped (or kept, ``out_of_charset: keep``); rows whose image
is missing (names matched as ``prepare`` matches them), ambiguous or does not decode, boxes with no area inside their image, and rows or boxes whose text is
``###`` (the illegible mark, ``dont_care``; ``evaluate-crops`` does not score them) are skipped; each is
counted with its first places in ``import.json`` inside the set, like ``prepare``'s report. A
malformed label file (a bad header, a row with too many fields) still stops the import, naming the line. The set is written beside ``out`` and moved in whole: a kill leaves none.

Example:
    >>> summary = import_crops("mycrops/labels.tsv", "data/own/train")   # doctest: +SKIP
    >>> summary["samples"], summary["skipped"]                            # doctest: +SKIP
    (412, {'out_of_charset': {'count': 3, 'examples': ['mycrops/labels.tsv:17 를 ...']}})
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import cv2
from tqdm import tqdm

from training.charset import Charset
from kocr.atomic import check_out_folder
from training.data.lmdb_store import LMDB_FILES, LmdbWriter
from training.data.prepare import Report

REPORT = "import.json"
SET_FILES = LMDB_FILES | {REPORT}  # what a set here holds: an --out holding anything else is refused


class CropImportError(ValueError):
    """Nothing usable to import, or a bad knob; names the file or the knob."""


def import_crops(labels: str | os.PathLike, out: str | os.PathLike, charset: str = "korean_g2",
                 out_of_charset: str = "drop", margin: float = 0.1, progress: bool = True) -> dict[str, Any]:
    """Write the crops listed in ``labels`` as an LMDB set at ``out``; returns the report.

    ``margin`` widens the boxes of a ``.json`` label file as EasyOCR widens detected boxes.
    Raises ``ScoreInputError`` for a label file that cannot be read (naming its line),
    ``OutFolderError`` for an ``out`` that is a file or a folder holding anything but such a set's files
    (``SET_FILES``: publishing the set replaces the folder whole), and ``CropImportError`` when no crop
    is left to write."""
    from evaluation.score_crops import ScoreInputError, iter_labels, load_crop

    if out_of_charset not in ("drop", "keep"):
        raise CropImportError(f"out_of_charset: {out_of_charset!r} is not drop or keep")
    try:
        chars = Charset.from_spec(charset)
    except ValueError as exc:
        raise CropImportError(f"--charset: {exc}") from None
    labels, out = Path(labels), Path(out)
    check_out_folder(out, SET_FILES.__contains__, "an LMDB set of import-crops does not", "a set")  # never a user's
    report = Report()  # prepare's tally: counts and first places by reason
    unusable = _Skipped(report)  # rows whose image is missing or unreadable, or whose box is unusable: counted, not kept
    rest = iter_labels(labels, margin, skipped=unusable)  # a row at a time: flat memory for millions of rows
    first = next(rest, None)  # the whole file is checked here: a malformed one stops before anything is written
    crops = itertools.chain([first] if first is not None else [], rest)

    def skip(reason: str, where: str) -> None:
        report.add(reason, where[:300])

    samples = rows = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with LmdbWriter(out, lock=True) as writer:  # a second import into the same set stops, named
        for crop in tqdm(crops, desc="import-crops", unit="crop", disable=not progress):
            rows += 1
            where = crop.where(str(labels))
            missing = chars.missing(crop.text)
            if missing and out_of_charset == "drop":
                skip("out_of_charset", f"{where} {''.join(sorted(missing))!r}")
                continue
            try:
                grey = load_crop(crop, str(labels))
            except ScoreInputError as exc:
                skip("image_unreadable", str(exc))
                continue
            if grey.size == 0:
                skip("zero_area_box", where)
                continue
            ok, png = cv2.imencode(".png", grey)
            if not ok:
                skip("image_unreadable", f"{where}: cannot encode the crop as PNG")
                continue
            writer.add(png.tobytes(), crop.text)
            samples += 1
            if missing:  # kept (out_of_charset: keep): counted once imported, so a row skipped above is counted once
                skip("out_of_charset", f"{where} {''.join(sorted(missing))!r}")
        skipped = report.as_dict()
        if not samples:
            raise CropImportError(f"{labels}: no crop left to import ({_tally(skipped) or 'no rows'}); "
                                  f"nothing written to {out}")
        summary = {"labels": str(labels), "charset": chars.name, "rows": rows + len(unusable), "samples": samples,
                   "skipped": skipped}
        (writer.partial / REPORT).write_text(json.dumps(summary, ensure_ascii=False, indent=1) + "\n",
                                             encoding="utf-8")  # moved in with the set
    return summary


class _Skipped:
    """``iter_labels``' ``skipped``: each (reason, where) goes straight into the report (counts and first places)."""

    def __init__(self, report: Report) -> None:
        self.report, self.count = report, 0

    def append(self, entry: tuple[str, str]) -> None:
        reason, where = entry
        self.report.add(reason, where[:300])
        self.count += 1

    def __len__(self) -> int:
        return self.count


def _tally(skipped: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{reason} {entry['count']}" for reason, entry in skipped.items())


def describe(summary: dict[str, Any], out: str | os.PathLike) -> str:
    """The one-line summary ``kocr import-crops`` prints."""
    skipped = _tally(summary["skipped"])
    return (f"import-crops: {summary['samples']} of {summary['rows']} crops -> {out}"
            + (f"; skipped or kept with a note: {skipped} (first places in {Path(out) / REPORT})" if skipped else ""))
