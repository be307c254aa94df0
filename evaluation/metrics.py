"""OCR metrics: CER, end-to-end (detection + recognition) F1 and crop-level recognition scores.

End-to-end matching, per page: boxes are first clamped to the image when the ground-truth page's
size is known (AI-Hub labels run past the edges and below zero; ``prepare`` clamps them the same
way), then every (gt, pred) box pair that overlaps with IoU >= ``iou_threshold`` is a candidate;
pairs are taken greedily by decreasing IoU (ties by gt index, then pred index), each box used once.
A matched pair scores ``max(0, 1 - CER)``. Ground-truth words whose NFC text is empty or ``###``
(ICDAR's illegible mark, ``training.data.pages.unscored``) are ignored:
they take part in matching, but neither they nor the predictions matched to them are counted.
Ground-truth words with no area inside the image are ignored too. precision = score / |P|,
recall = score / |G|.

Example:
    >>> gt = [Word((0, 0, 10, 10), "서울"), Word((20, 0, 10, 10), "시청")]
    >>> pred = [Word((0, 0, 10, 10), "서울"), Word((20, 0, 10, 10), "시장")]
    >>> s = score_page(gt, pred)
    >>> s.score_sum, s.precision, s.recall, s.f1
    (1.5, 0.75, 0.75, 0.75)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from rapidfuzz.distance import Levenshtein

from training.data.pages import Page, Word, iter_page_files, nfc, on_image, read_page, unscored

Corners = tuple[float, float, float, float]
# Raised whenever a change to the scorer changes the scores of the same readings, so that promote
# re-scores a champion scored the old way (evaluation.evaluate.scoring_hash). 2: boxes clamped to
# the image, CLEval without inner whitespace. 3: ### words left out of the crop scores (cer, word_accuracy,
# norm_ed), as they are of the end-to-end ones. 4: boxes clamped to the image read, not to the label's
# image.width/height where they differ (training.data.pages.on_image).
SCORING_VERSION = 4
_EPS = 1e-9  # IoU exactly at the threshold must match despite float rounding


def cer(gt: str, pred: str) -> float:
    """Levenshtein distance over the NFC ground-truth length; can exceed 1.

    An empty ground truth divides by 1, so ``cer("", "ab") == 2.0`` and ``cer("", "") == 0.0``.

    >>> cer("서울시", "서울"), cer("가", "나다라")
    (0.3333333333333333, 3.0)
    """
    gt, pred = nfc(gt), nfc(pred)
    return Levenshtein.distance(gt, pred) / max(1, len(gt))


def iou(a: Corners, b: Corners) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when the union has no area.

    >>> iou((0, 0, 10, 10), (0, 0, 10, 5))
    0.5
    """
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = iw * ih if iw > 0 and ih > 0 else 0.0
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def in_image(words: list[Word], width: int, height: int) -> list[Word | None]:
    """Each word with its box clamped to a ``width`` x ``height`` image, or None where nothing of it
    lies inside or the box holds a NaN or infinite number; the words as they are when the size is
    unknown (0).

    >>> in_image([Word((-5, 2, 20, 10), "김해시"), Word((120, 0, 9, 9), "밖")], 100, 50)
    [Word(bbox=(0, 2, 15, 10), text='김해시', score=None), None]
    """
    kept: list[Word | None] = []
    for word in words:
        if not all(math.isfinite(v) for v in word.bbox):  # max(0, nan) is 0: a whole-page word
            kept.append(None)
            continue
        if width <= 0 or height <= 0:
            kept.append(word)
            continue
        x0, y0, x1, y1 = word.corners
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        kept.append(replace(word, bbox=(x0, y0, x1 - x0, y1 - y0)) if x1 > x0 and y1 > y0 else None)
    return kept


def f1_score(p: float, r: float) -> float:
    """Harmonic mean of precision and recall; 0 when both are 0."""
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


@dataclass
class PageScore:
    """One page's end-to-end tally; ``pairs`` holds the counted (gt index, pred index, score),
    ``ignored_pairs`` the (gt index, pred index) matches to an ignored word (``###``, empty, outside
    the image): such a reading is no error, and counts nowhere."""

    score_sum: float
    n_gt: int
    n_pred: int
    matched: int
    pairs: list[tuple[int, int, float]] = field(default_factory=list)
    ignored_pairs: list[tuple[int, int]] = field(default_factory=list)

    @property
    def precision(self) -> float:
        return self.score_sum / self.n_pred if self.n_pred else 0.0

    @property
    def recall(self) -> float:
        return self.score_sum / self.n_gt if self.n_gt else 0.0

    @property
    def f1(self) -> float:
        return f1_score(self.precision, self.recall)


def score_page(gt: Page | list[Word], pred: Page | list[Word],
               iou_threshold: float = 0.5) -> PageScore:
    """Match ``pred`` words to ``gt`` words greedily by IoU and score the matches (see module doc)."""
    gw = gt.words if isinstance(gt, Page) else list(gt)
    pw = pred.words if isinstance(pred, Page) else list(pred)
    width, height = (gt.width, gt.height) if isinstance(gt, Page) else (0, 0)
    g_in, p_in = in_image(gw, width, height), in_image(pw, width, height)
    ignored = {i for i, (w, g) in enumerate(zip(gw, g_in)) if unscored(w.text) or g is None}
    candidates = []
    for i, g in enumerate(g_in):
        for j, p in enumerate(p_in):
            v = iou(g.corners, p.corners) if g is not None and p is not None else 0.0
            if v > 0 and v >= iou_threshold - _EPS:  # boxes that do not touch never match, even at 0
                candidates.append((-v, i, j))
    candidates.sort()
    used_g: set[int] = set()
    used_p: set[int] = set()
    pairs: list[tuple[int, int, float]] = []
    ignored_pairs: list[tuple[int, int]] = []
    for _, i, j in candidates:
        if i in used_g or j in used_p:
            continue
        used_g.add(i)
        used_p.add(j)
        if i in ignored:
            ignored_pairs.append((i, j))
        else:
            pairs.append((i, j, max(0.0, 1.0 - cer(gw[i].text, pw[j].text))))
    pairs.sort()
    ignored_pairs.sort()
    return PageScore(score_sum=sum(s for _, _, s in pairs), n_gt=len(gw) - len(ignored),
                     n_pred=len(pw) - len(ignored_pairs), matched=len(pairs), pairs=pairs,
                     ignored_pairs=ignored_pairs)


def e2e_scores(page_scores: list[PageScore]) -> dict[str, float]:
    """Macro means over pages with ground truth, and micro scores over all pages' sums."""
    with_gt = [s for s in page_scores if s.n_gt > 0]
    n = len(with_gt)
    score = sum(s.score_sum for s in page_scores)
    n_gt = sum(s.n_gt for s in page_scores)
    n_pred = sum(s.n_pred for s in page_scores)
    p_micro = score / n_pred if n_pred else 0.0
    r_micro = score / n_gt if n_gt else 0.0
    return {
        "e2e_f1": sum(s.f1 for s in with_gt) / n if n else 0.0,
        "e2e_precision": sum(s.precision for s in with_gt) / n if n else 0.0,
        "e2e_recall": sum(s.recall for s in with_gt) / n if n else 0.0,
        "e2e_f1_micro": f1_score(p_micro, r_micro),
        "e2e_precision_micro": p_micro,
        "e2e_recall_micro": r_micro,
        "pages": n,
        "gt_words": n_gt,
        "pred_words": n_pred,
        "matched": sum(s.matched for s in page_scores),
    }


def recognition_scores(gts: list[str], preds: list[str]) -> dict[str, float]:
    """Crop-level scores: micro CER, exact-match word accuracy and ICDAR 2019 normalised ED.

    >>> recognition_scores(["서울", "시청"], ["서울", "시장"])
    {'n': 2, 'cer': 0.25, 'word_accuracy': 0.5, 'norm_ed': 0.75}
    """
    if len(gts) != len(preds):
        raise ValueError(f"{len(gts)} ground truths but {len(preds)} predictions")
    edits = chars = exact = 0
    norm = 0.0
    for g, p in zip(gts, preds):
        g, p = nfc(g), nfc(p)
        d = Levenshtein.distance(g, p)
        edits += d
        chars += len(g)
        exact += g == p
        norm += 1.0 - d / max(len(g), len(p)) if g or p else 1.0
    n = len(gts)
    return {"n": n, "cer": edits / chars if chars else 0.0,
            "word_accuracy": exact / n if n else 0.0, "norm_ed": norm / n if n else 0.0}


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven if each changed word
    were equally likely to go either way (ties, words both read alike, are left out).

    >>> round(sign_test_p(9, 1), 4), sign_test_p(3, 3), sign_test_p(0, 0)
    (0.0215, 1.0, 1.0)
    """
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_words(gts: list[str], reference: list[str], candidate: list[str]) -> dict[str, float]:
    """Which words ``candidate`` reads exactly where ``reference`` does not (``fixed``) and the
    reverse (``broken``), with the two-sided sign test's ``p`` on that split: whether two models
    differ on the same crops by more than the draw of which words changed.

    >>> paired_words(["서울", "시청", "구청"], ["서울", "시장", "구청"], ["서울", "시청", "구정"])
    {'fixed': 1, 'broken': 1, 'p': 1.0}
    """
    if not len(gts) == len(reference) == len(candidate):
        raise ValueError(f"{len(gts)} ground truths, {len(reference)} and {len(candidate)} readings")
    fixed = broken = 0
    for g, a, b in zip(gts, reference, candidate):
        right_a, right_b = nfc(a) == nfc(g), nfc(b) == nfc(g)
        fixed += right_b and not right_a
        broken += right_a and not right_b
    return {"fixed": fixed, "broken": broken, "p": sign_test_p(fixed, broken)}


def score_folders(gt_dir: str | os.PathLike, pred_dir: str | os.PathLike,
                  iou_threshold: float = 0.5) -> dict:
    """Score every page JSON under ``gt_dir`` against its prediction under ``pred_dir``.

    Predictions are found by the same relative path, else by a unique file stem; a page with no
    prediction counts as predicting nothing. Returns :func:`e2e_scores` merged with
    :func:`recognition_scores` over the counted matched pairs (``cer``, ``word_accuracy``,
    ``norm_ed``: None when no pair matched, as with line boxes against word labels) and
    ``missing_predictions`` (gt pages with no prediction file).

    A page is scored on its prediction's ``width``/``height`` where they differ from the label's: a
    prediction kocr writes (evaluate's ``--predictions``) holds the size of the image it read, which
    ``evaluate`` scores on (``training.data.pages.on_image``), so that both give a page whose label
    misstates its image's size the same score.
    """
    gt_root, pred_root = Path(gt_dir), Path(pred_dir)
    gt_paths = list(iter_page_files(gt_root))
    own = {p: q for p in gt_paths if (q := pred_root / p.relative_to(gt_root)).is_file()}  # at the page's own path
    claimed = set(own.values())
    by_stem: dict[str, list[Path]] = {}
    for path in iter_page_files(pred_root):
        if path not in claimed:
            by_stem.setdefault(path.stem, []).append(path)
    unmatched_stems: dict[str, list[Path]] = {}
    for path in gt_paths:
        if path not in own:
            unmatched_stems.setdefault(path.stem, []).append(path)
    scores: list[PageScore] = []
    gts: list[str] = []
    preds: list[str] = []
    missing = 0
    for gt_path in gt_paths:
        pred_path: Path | None = own.get(gt_path)
        if pred_path is None:
            same_stem = by_stem.get(gt_path.stem, [])
            if len(same_stem) > 1:
                raise ValueError(f"{gt_path}: several predictions share its stem: {same_stem}")
            if same_stem and len(unmatched_stems[gt_path.stem]) > 1:
                raise ValueError(f"{same_stem[0]}: its stem fits several pages with no prediction at their own "
                                 f"path: {unmatched_stems[gt_path.stem]}")
            pred_path = same_stem[0] if same_stem else None
        gt_page = read_page(gt_path)
        pred_page = read_page(pred_path) if pred_path is not None else None
        pred_words = pred_page.words if pred_page is not None else []
        if pred_page is not None:
            gt_page = on_image(gt_page, pred_page.width, pred_page.height)  # the image read
        missing += pred_path is None
        page_score = score_page(gt_page, pred_words, iou_threshold)
        scores.append(page_score)
        for i, j, _ in page_score.pairs:
            gts.append(gt_page.words[i].text)
            preds.append(pred_words[j].text)
    rec = recognition_scores(gts, preds) if gts else dict.fromkeys(("cer", "word_accuracy", "norm_ed"))
    return {**e2e_scores(scores), "cer": rec["cer"], "word_accuracy": rec["word_accuracy"],
            "norm_ed": rec["norm_ed"], "missing_predictions": missing}
