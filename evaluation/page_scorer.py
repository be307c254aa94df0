"""End-to-end F1 of a model while it trains: CRAFT once up front, then recognition of the same boxes per call.

Detection does not depend on the recogniser, so a tuning study detects its pages once and every
validation of every trial only re-reads the boxes, exactly as the evaluate stage does.

Example:
    >>> scorer = PageSetScorer(test_pages("data/sample", "data/prepared/splits.json", "val"))  # doctest: +SKIP
    >>> scorer(model, charset)                                                                 # doctest: +SKIP
    {'e2e_f1': 0.31, 'e2e_f1_micro': 0.30, 'e2e_precision': 0.29, 'e2e_recall': 0.33}
"""

from __future__ import annotations

import torch

from evaluation.evaluate import EvalPage
from evaluation.metrics import e2e_scores, score_page
from evaluation.reader import Detector, DetectorSettings, Recognition, load_image, results_to_page
from training.charset import Charset
from training.checkpoint import LoadedRecognizer
from training.data.pages import on_image
from training.model import Recognizer


class PageSetScorer:
    """Callable ``(model, charset) -> {"e2e_f1", "e2e_precision", "e2e_recall"}`` and their ``_micro``
    twins (:func:`evaluation.metrics.e2e_scores`) on fixed pages."""

    def __init__(self, pages: list[EvalPage], settings: DetectorSettings = DetectorSettings(),
                 iou_threshold: float = 0.5, device: str = "cpu") -> None:
        if not pages:
            raise ValueError("no pages to score end to end")
        detector = Detector(settings, device)
        self.settings, self.iou_threshold, self.device = settings, iou_threshold, device
        self.items = []
        for item in pages:
            rgb, grey = load_image(item.image)
            # scored on the image it reads, as evaluate scores it (training.data.pages.on_image)
            self.items.append((on_image(item.page, width=grey.shape[1], height=grey.shape[0]), grey,
                               detector.detect(rgb)))

    def __call__(self, model: Recognizer, charset: Charset) -> dict[str, float]:
        was_training = model.training
        loaded = LoadedRecognizer(model, charset, model.config, "training model")
        device = str(next(model.parameters()).device)
        recognition = Recognition(loaded, self.settings, device)
        try:
            with torch.no_grad():
                scores = [score_page(page, results_to_page(page.image_name, grey,
                                                           recognition.read_boxes(grey, *boxes)),
                                     self.iou_threshold)
                          for page, grey, boxes in self.items]
        finally:
            model.train(was_training)
        return {k: v for k, v in e2e_scores(scores).items() if k.startswith("e2e_")}
