"""The ``evaluate`` stage: end-to-end scores of several recognisers on the same held-out pages.

Each page is detected once (CRAFT); every model then reads the same boxes, so differences come from
recognition alone. Recognition-only scores use the ground-truth boxes, cropped the way EasyOCR crops.

Outputs: ``<pred_dir>/<model>/<page>.json`` (predictions as page JSON), ``metrics/evaluate.json``
(``{"<model>": {"e2e_f1": …, "cer": …}, "eval_data_hash": …}``).

Example:
    >>> results = evaluate_models({"base": "english_g2"}, pages, "outputs/predictions")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm import tqdm

from evaluation.analysis import breakdown
from evaluation.cleval_metric import CLEvalAccumulator
from evaluation.drawing import draw_comparison
from evaluation.metrics import SCORING_VERSION, PageScore, e2e_scores, recognition_scores, score_page
from evaluation.reader import (
    Boxes,
    Detector,
    DetectorSettings,
    Recognition,
    load_image,
    results_to_page,
)
from evaluation.source_pages import split_pages
from evaluation.tesseract import (
    read_crops_tesseract,
    read_page_tesseract,
    tesseract_available,
)
from training.checkpoint import LoadedRecognizer, load_recognizer
from kocr.params import check_keys, require, section, typed
from training.data.pages import Page, crop_box, nfc, on_image, unscored, write_page


@dataclass(frozen=True)
class EvaluateConfig:
    """Knobs of the evaluate stage (``evaluate:`` in params.yaml); promote, export and tune read them too."""

    split: str = "test"                 # the split of splits.json scored
    iou_threshold: float = 0.5          # a detected box matches a word at IoU >= this, in (0, 1]
    worst_pages: int = 3                # pages drawn per model (0: none)
    baselines: tuple[str, ...] = ()     # other engines scored on the same pages (tesseract, a model spec)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "EvaluateConfig":
        """``evaluate:`` of the whole params mapping; ParamsError naming the key that cannot work."""
        cfg = section(params, "evaluate")
        check_keys("evaluate", cfg, cls.__dataclass_fields__)
        kinds = {"split": str, "iou_threshold": float, "worst_pages": int}
        values: dict[str, Any] = {k: typed(f"evaluate.{k}", v, kinds[k]) for k, v in cfg.items() if k in kinds}
        if "baselines" in cfg:
            baselines = cfg["baselines"] if cfg["baselines"] is not None else []
            require(isinstance(baselines, list) and all(isinstance(b, str) and b for b in baselines),
                    "evaluate.baselines", baselines, "a list of engine names, e.g. [tesseract] ([] for none)")
            values["baselines"] = tuple(baselines)
        config = cls(**values)
        require(0 < config.iou_threshold <= 1, "evaluate.iou_threshold", config.iou_threshold, "a value in (0, 1]")
        require(config.worst_pages >= 0, "evaluate.worst_pages", config.worst_pages, "a whole number >= 0")
        require(config.split in ("train", "val", "test"), "evaluate.split", config.split, "train, val or test")
        return config


@dataclass
class EvalPage:
    """A ground-truth page with its image path and a name for its prediction file."""

    name: str
    page: Page
    image: Path


def test_pages(source: str | os.PathLike, splits_file: str | os.PathLike, split: str = "test",
               cache: str | os.PathLike | None = None, limit: int | None = None) -> list[EvalPage]:
    """The pages ``prepare`` put in ``split`` (names in splits.json are relative to ``source``).

    ``source`` is a folder of pages, an unpacked AI-Hub tree or a folder of AI-Hub zips; images inside
    zips are extracted to ``cache`` (default ``.kocr/eval-images``, see ``evaluation.source_pages``).
    ``limit``: only the first so many pages of the split.
    """
    return [EvalPage(name, page, image)
            for name, page, image in split_pages(source, splits_file, split, cache, limit)]


def eval_set_hash(pages: list[EvalPage]) -> str:
    """MD5 over the evaluated pages' labels and image bytes: the identity of the evaluation set.

    Content only, in no particular order: the same pages hash the same whether they were read from
    AI-Hub's zips or from the unpacked tree (their names differ), and whatever their order."""
    per_page = sorted(_page_digest(item) for item in pages)
    return hashlib.md5("".join(per_page).encode()).hexdigest()


def scoring_hash(settings: DetectorSettings, iou_threshold: float) -> str:
    """MD5 of how the set is scored: detector settings, IoU threshold and ``SCORING_VERSION``.

    Scores of one set are comparable only when this matches too: a champion scored with other box
    grouping, another threshold or an older scorer is re-scored before ``promote`` compares."""
    how = {"detector": asdict(settings), "iou_threshold": float(iou_threshold), "scoring_version": SCORING_VERSION}
    return hashlib.md5(json.dumps(how, sort_keys=True).encode()).hexdigest()


def _page_digest(item: EvalPage) -> str:
    digest = hashlib.md5(json.dumps(item.page.to_dict(), sort_keys=True, ensure_ascii=False).encode())
    digest.update(item.image.read_bytes())
    return digest.hexdigest()


def gt_boxes(page: Page, grey_shape: tuple[int, int], margin: float) -> tuple[list[list[int]], list[str]]:
    """Ground-truth boxes with EasyOCR's margin, in its horizontal_list form, and their texts.

    Words that are not scored (``training.data.pages.unscored``: empty or ``###``, ICDAR's illegible
    mark) are left out, as ``prepare`` and ``kocr evaluate-crops`` leave them out and the end-to-end
    metric ignores them: a ``###`` crop counted in ``cer`` as the text "###", which no reader gives."""
    height, width = grey_shape
    boxes, texts = [], []
    for word in page.words:
        text = nfc(word.text)
        box = crop_box(word.bbox, margin, width, height)
        if not unscored(text) and box is not None:
            boxes.append([box[0], box[2], box[1], box[3]])
            texts.append(text)
    return boxes, texts


@dataclass
class ModelEvaluation:
    """One model's scores on the evaluation set, its error analysis and its worst pages."""

    metrics: dict[str, float]
    analysis: dict[str, Any]
    worst: list[tuple[str, float]] = field(default_factory=list)  # (page name, page F1), worst first
    pictures: list[Path] = field(default_factory=list)


class RecognizerEngine:
    """A platform recogniser reading the shared CRAFT boxes, the EasyOCR way."""

    needs_detection = True

    def __init__(self, recognition: Recognition) -> None:
        self.recognition = recognition

    def read_page(self, item: EvalPage, grey: np.ndarray, detections: Boxes) -> Page:
        return results_to_page(item.page.image_name, grey, self.recognition.read_boxes(grey, *detections))

    def read_crops(self, grey: np.ndarray, boxes: list[list[int]]) -> list[str]:
        return [text for _, text, _ in self.recognition.read_boxes(grey, boxes, [])]


class TesseractEngine:
    """Tesseract 5 with its own layout analysis, on the same pages and crops."""

    needs_detection = False

    def read_page(self, item: EvalPage, grey: np.ndarray, detections: Boxes) -> Page:
        page = read_page_tesseract(item.image)
        page.image_name = item.page.image_name
        return page

    def read_crops(self, grey: np.ndarray, boxes: list[list[int]]) -> list[str]:
        return read_crops_tesseract([grey[y0:y1, x0:x1] for x0, x1, y0, y1 in boxes])


def make_engine(model: str | LoadedRecognizer, settings: DetectorSettings, device: str):
    """``tesseract`` -> TesseractEngine; any recogniser spec or loaded model -> RecognizerEngine."""
    if isinstance(model, str) and model == "tesseract":
        if not tesseract_available():
            raise RuntimeError("tesseract with kor+eng is not installed (apt-get install tesseract-ocr tesseract-ocr-kor)")
        return TesseractEngine()
    loaded = model if isinstance(model, LoadedRecognizer) else load_recognizer(model, device)
    return RecognizerEngine(Recognition(loaded, settings, device))


def evaluate_models(models: dict[str, str | LoadedRecognizer], pages: list[EvalPage],
                    pred_dir: str | os.PathLike, settings: DetectorSettings = DetectorSettings(),
                    device: str = "cpu", iou_threshold: float = 0.5, progress: bool = True,
                    detector: Detector | None = None, pictures_dir: str | os.PathLike | None = None,
                    worst_pages: int = 3) -> dict[str, ModelEvaluation]:
    """Score every model (a recogniser spec, a loaded recogniser or ``tesseract``) on ``pages``.

    Predictions go to ``pred_dir/<model>/``. CRAFT runs once per page and every recogniser reads the
    same boxes. With ``pictures_dir``, each model's ``worst_pages`` lowest-F1 pages are drawn there, as
    ``<model>/<rank>.png`` (``01.png`` the worst), the page named in the picture's title.
    """
    engines = {label: make_engine(m, settings, device) for label, m in models.items()}
    if detector is None and any(e.needs_detection for e in engines.values()):
        detector = Detector(settings, device)
    page_scores: dict[str, list[PageScore]] = {label: [] for label in engines}
    clevals = {label: CLEvalAccumulator() for label in engines}
    predictions: dict[str, list[Page]] = {label: [] for label in engines}
    crop_texts: dict[str, tuple[list[str], list[str]]] = {label: ([], []) for label in engines}
    gt_pages: list[Page] = []
    for item in tqdm(pages, desc="evaluate", unit="page", disable=not progress):
        rgb, grey = load_image(item.image)
        # boxes clamped to the image read, as prepare clamps them
        gt_pages.append(gt_page := on_image(item.page, width=grey.shape[1], height=grey.shape[0]))
        detections = detector.detect(rgb) if detector is not None else ([], [])
        crop_boxes, gt_texts = gt_boxes(item.page, grey.shape, settings.add_margin)
        for label, engine in engines.items():
            pred = engine.read_page(item, grey, detections)
            write_page(pred, Path(pred_dir) / label / item.name)
            predictions[label].append(pred)
            page_scores[label].append(score_page(gt_page, pred, iou_threshold))
            clevals[label].update(gt_page, pred)
            crop_texts[label][0].extend(gt_texts)
            crop_texts[label][1].extend(engine.read_crops(grey, crop_boxes))
    results = {}
    for label in engines:
        crops = recognition_scores(*crop_texts[label])
        metrics = {**e2e_scores(page_scores[label]), "cer": crops["cer"],
                   "word_accuracy": crops["word_accuracy"], "norm_ed": crops["norm_ed"], "crops": crops["n"],
                   **clevals[label].compute()}
        ranked = sorted(((item.name, score.f1, i) for i, (item, score) in enumerate(zip(pages, page_scores[label]))
                         if score.n_gt), key=lambda x: (x[1], x[0]))[:worst_pages]
        evaluation = ModelEvaluation(metrics, breakdown(gt_pages, predictions[label], page_scores[label]),
                                     [(name, f1) for name, f1, _ in ranked])
        if pictures_dir is not None:
            for rank, (name, f1, i) in enumerate(ranked, start=1):
                # named by rank alone, so `dvc plots diff` pairs each run's worst page with another's (a name
                # with the page in it was in one run only); the page is in the title and in evaluate.md
                out = Path(pictures_dir) / label / f"{rank:02d}.png"
                evaluation.pictures.append(draw_comparison(pages[i].image, gt_pages[i], predictions[label][i],
                                                           f"{label} worst {rank}: {name}, page F1 {f1:.3f}", out,
                                                           page_scores[label][i]))
        results[label] = evaluation
    return results
