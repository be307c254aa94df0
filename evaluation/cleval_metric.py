"""CLEval (character-level detection + end-to-end, ``cleval`` package) beside the IoU-gated metric.

CLEval scores characters rather than whole boxes, so a phrase box that merges three words still
earns credit for the characters it read: it does not punish split and merged boxes the way an IoU
gate does. Ground-truth boxes with empty text or ``###`` are don't-care regions. Boxes are clamped to the
image as for the IoU-gated metric (``evaluation.metrics.in_image``), and ground-truth boxes with
nothing inside it are left out. Whitespace inside a text is left out on both sides: a box that
merges 서울 and 시청 reads "서울 시청", and AI-Hub's one-어절 labels hold no space to match it.

Example:
    >>> acc = CLEvalAccumulator()                    # doctest: +SKIP
    >>> acc.update(gt_page, pred_page)               # doctest: +SKIP
    >>> acc.compute()["cleval_e2e_f1"]               # doctest: +SKIP
"""

from __future__ import annotations

import math

import numpy as np

from kocr.easyocr_compat import register_torchvision_ops
from evaluation.metrics import in_image
from training.data.pages import Page, Word, nfc, unscored


def _letters(text: str) -> str:
    """The NFC text without whitespace: what CLEval matches character by character."""
    return "".join(nfc(text).split())


def _quads(words: list[Word]) -> np.ndarray:
    quads = [[x0, y0, x1, y0, x1, y1, x0, y1] for x0, y0, x1, y1 in (w.corners for w in words)]
    return np.asarray(quads, dtype=np.float32).reshape(-1, 8)


class CLEvalAccumulator:
    """Accumulates pages and returns CLEval detection and end-to-end precision, recall and F1."""

    def __init__(self, case_sensitive: bool = True) -> None:
        register_torchvision_ops()  # torchmetrics imports torchvision
        from cleval import CLEvalMetric

        self.metric = CLEvalMetric(case_sensitive=case_sensitive)

    def update(self, gt: Page, pred: Page) -> None:
        """Add one page (ground truth and prediction)."""
        gt_words = [w for w in in_image(gt.words, gt.width, gt.height) if w is not None]
        # a prediction past the edge stays as it is (a false positive); one with a NaN or infinite corner has
        # no place on the page for CLEval to score (the IoU gate counts it as an unmatched prediction)
        pred_words = [c or w for w, c in zip(pred.words, in_image(pred.words, gt.width, gt.height))
                      if all(math.isfinite(v) for v in w.bbox)]
        self.metric.update(_quads(pred_words), _quads(gt_words), [_letters(w.text) for w in pred_words],
                           [_letters(w.text) for w in gt_words], [unscored(w.text) or not _letters(w.text) for w in gt_words])

    def compute(self) -> dict[str, float]:
        """``cleval_{det,e2e}_{precision,recall,f1}`` plus split/merged box counts."""
        r = self.metric.compute()
        out = {}
        for kind in ("det", "e2e"):
            out[f"cleval_{kind}_precision"] = float(r[f"{kind}_p"])
            out[f"cleval_{kind}_recall"] = float(r[f"{kind}_r"])
            out[f"cleval_{kind}_f1"] = float(r[f"{kind}_h"])
        out["cleval_split"], out["cleval_merged"] = int(r["num_splitted"]), int(r["num_merged"])
        return out
