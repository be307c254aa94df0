"""Score recognisers on real labelled word crops: ``kocr evaluate-crops``.

The labels file is a TSV with a header line naming at least the columns ``image`` and ``text``
(further columns, e.g. ``note``, are ignored); each row is one crop, its image path relative to
the labels file. Every crop is read whole, exactly as ``easyocr.Reader.recognize(crop)`` reads an
image without boxes (the image as one box, EasyOCR's resizing, contrast retry and greedy decoding),
so a model's score here is the score it gets inside EasyOCR (``quantize=False``). Tesseract reads
the same crops in single-line mode (``--psm 7``).

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

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from evaluation.metrics import cer, paired_words, recognition_scores
from training.data.pages import nfc

TESSERACT = "tesseract"


class ScoreInputError(ValueError):
    """A labels file, ground-truth text or image that cannot be scored; the message names it."""


@dataclass
class Crop:
    """One labelled crop: its image, its NFC ground truth and where it was listed."""

    image: Path
    text: str
    line: int


def read_labels(path: str | os.PathLike) -> list[Crop]:
    """Rows of a labels TSV (header with ``image`` and ``text``), image paths resolved and checked."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise ScoreInputError(f"{path}: labels file not found") from None
    except UnicodeDecodeError as exc:
        raise ScoreInputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not lines:
        raise ScoreInputError(f"{path}: empty; expected a header line 'image<TAB>text'")
    header = lines[0].split("\t")
    if "image" not in header or "text" not in header:
        raise ScoreInputError(f"{path}:1: header {lines[0]!r:.80} lacks the columns 'image' and 'text' "
                              "(tab-separated)")
    col_image, col_text = header.index("image"), header.index("text")
    crops = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) <= max(col_image, col_text):
            raise ScoreInputError(f"{path}:{number}: {len(fields)} tab-separated field(s), expected "
                                  f"{len(header)} as in the header: {line!r:.80}")
        image, text = fields[col_image].strip(), nfc(fields[col_text].strip())
        if not image or not text:
            raise ScoreInputError(f"{path}:{number}: empty {'image path' if not image else 'text'}")
        image_path = path.parent / image
        if not image_path.is_file():
            raise ScoreInputError(f"{path}:{number}: image {image_path} not found")
        crops.append(Crop(image_path, text, number))
    if not crops:
        raise ScoreInputError(f"{path}: no rows after the header")
    return crops


def load_crop(crop: Crop, labels: str | os.PathLike = "") -> np.ndarray:
    """The crop as the greyscale array ``easyocr.Reader`` makes of an image file."""
    from evaluation.reader import load_image

    try:
        return load_image(crop.image)[1]
    except (ValueError, OSError) as exc:
        where = f"{labels}:{crop.line}: " if labels else ""
        raise ScoreInputError(f"{where}{crop.image}: not a readable image ({exc})") from None


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
    """Read every crop with every model (label -> spec) and score the readings."""
    engines = {label: make_crop_engine(spec, device) for label, spec in models.items()}
    readings: dict[str, list[str]] = {label: [] for label in engines}
    for crop in tqdm(crops, desc="evaluate-crops", unit="crop", disable=not progress):
        grey = load_crop(crop, labels)
        for label, engine in engines.items():
            readings[label].append(engine.read(grey))
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


def write_outputs(report: CropReport, out: str | os.PathLike, worst: int) -> list[Path]:
    """``readings.tsv`` (every crop, ground truth and each model's reading), ``confusions.json``
    (``error_analysis``) and the worst crops drawn."""
    from evaluation.drawing import draw_crop_readings

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "readings.tsv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(["image", "text", *report.readings])
        for i, crop in enumerate(report.crops):
            writer.writerow([str(crop.image), crop.text, *(texts[i] for texts in report.readings.values())])
    (out / "confusions.json").write_text(json.dumps(error_analysis(report), ensure_ascii=False, indent=1) + "\n",
                                         encoding="utf-8")
    for rank, i in enumerate(report.worst(worst), start=1):
        crop = report.crops[i]
        readings = {label: (texts[i], cer(crop.text, texts[i])) for label, texts in report.readings.items()}
        report.pictures.append(draw_crop_readings(crop.image, crop.text, readings,
                                                  out / f"worst_{rank:02d}_{crop.image.stem}.png"))
    return report.pictures
