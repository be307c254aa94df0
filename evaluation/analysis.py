"""Where a model goes wrong: breakdowns by category and text kind, detection failures, confusions.

Example:
    >>> text_kind("서울"), text_kind("2024.03.15"), text_kind("CCTV"), text_kind("제2호")
    ('hangul', 'digits', 'latin', 'mixed')
    >>> jamo_confusions([("일을", "익은")])["top"]
    [('final', 'ㄹ', 'ㄱ', 1), ('final', 'ㄹ', 'ㄴ', 1)]
"""

from __future__ import annotations

import unicodedata
from collections import Counter, defaultdict
from typing import Any, Iterator

from rapidfuzz.distance import Levenshtein

from evaluation.metrics import PageScore, in_image
from training.data.pages import Page, Word, nfc, unscored

TEXT_KINDS = ("hangul", "digits", "latin", "mixed", "other")
JAMO_POSITIONS = ("initial", "medial", "final")
_INITIALS = "ㄱㄲㄴㄷㄸㄹㅁㅂㅃㅅㅆㅇㅈㅉㅊㅋㅌㅍㅎ"
_MEDIALS = "ㅏㅐㅑㅒㅓㅔㅕㅖㅗㅘㅙㅚㅛㅜㅝㅞㅟㅠㅡㅢㅣ"
_FINALS = ("-", *"ㄱㄲㄳㄴㄵㄶㄷㄹㄺㄻㄼㄽㄾㄿㅀㅁㅂㅄㅅㅆㅇㅈㅊㅋㅌㅍㅎ")  # "-": no final consonant


def text_kind(text: str) -> str:
    """``hangul``, ``digits`` or ``latin`` when one script carries the word (punctuation aside),
    ``other`` for another script alone (Hanja, Roman numerals) or punctuation only, else ``mixed``.

    >>> [text_kind(t) for t in ("김해시", "1994", "KTX", "漢字", "-", "3층")]
    ['hangul', 'digits', 'latin', 'other', 'other', 'mixed']
    """
    scripts = set()
    for char in nfc(text):
        if "\uac00" <= char <= "\ud7a3" or "\u1100" <= char <= "\u11ff" or "\u3130" <= char <= "\u318f":
            scripts.add("hangul")
        elif char.isdigit():
            scripts.add("digits")
        elif char.isascii() and char.isalpha():
            scripts.add("latin")
        elif unicodedata.category(char)[0] == "L":
            scripts.add("other")
    if not scripts:
        return "other"
    return scripts.pop() if len(scripts) == 1 else "mixed"


def _area(box: tuple[float, float, float, float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _intersection(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    return _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def detection_failures(gt: list[Word], pred: list[Word], inside: float = 0.5) -> dict[str, int]:
    """Counts of ground-truth words that were ``split``, ``merged`` or ``missed`` by the detector.

    - split: two or more predictions each lie at least ``inside`` within the word;
    - merged: one prediction holds at least ``inside`` of this word and of another word too;
    - missed: no prediction overlaps the word at all.

    Words that are not scored (empty or ``###``, ``training.data.pages.unscored``) are not counted.
    """
    words = [w for w in gt if not unscored(w.text)]
    counts = Counter(split=0, merged=0, missed=0)
    merged: set[int] = set()
    for p in pred:
        held = [i for i, w in enumerate(words)
                if _intersection(w.corners, p.corners) >= inside * max(_area(w.corners), 1e-9)]
        if len(held) >= 2:
            merged.update(held)
    for i, word in enumerate(words):
        overlaps = [p for p in pred if _intersection(word.corners, p.corners) > 0]
        if not overlaps:
            counts["missed"] += 1
        elif sum(_intersection(word.corners, p.corners) >= inside * max(_area(p.corners), 1e-9)
                 for p in overlaps) >= 2:
            counts["split"] += 1
    counts["merged"] = len(merged)
    return dict(counts)


def _substitutions(pairs: list[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """(ground-truth character, read character) of every substitution in the Levenshtein edit
    ops of each (ground truth, reading) pair, after NFC; insertions and deletions are skipped."""
    for gt, pred in pairs:
        gt, pred = nfc(gt), nfc(pred)
        for op in Levenshtein.editops(gt, pred):
            if op.tag == "replace":
                yield gt[op.src_pos], pred[op.dest_pos]


def confusions(pairs: list[tuple[str, str]], top: int = 15) -> list[tuple[str, str, int]]:
    """Most frequent (ground truth, predicted) character substitutions over matched word pairs."""
    counter = Counter(_substitutions(pairs))
    return [(a, b, n) for (a, b), n in counter.most_common(top)]


def _jamo(syllable: str) -> tuple[str, str, str] | None:
    """(initial, medial, final) of a precomposed Hangul syllable (final "-" when it has none)."""
    index = ord(syllable) - 0xAC00
    if not 0 <= index < 11172:
        return None
    return _INITIALS[index // 588], _MEDIALS[index % 588 // 28], _FINALS[index % 28]


def jamo_confusions(pairs: list[tuple[str, str]], top: int = 15) -> dict[str, Any]:
    """Which part of a Hangul syllable a model misreads, over (ground truth, reading) pairs.

    Every substitution of one syllable by another (Levenshtein edit ops after NFC) is split into
    its initial, medial and final jamo: ``positions`` counts the substitutions that differ in each
    part (one substitution can count in several), ``top`` lists the most frequent
    (position, ground-truth jamo, read jamo, count). A face that draws a final ㄹ as a cursive
    stroke shows up as ("final", "ㄹ", "ㄱ", n) however many syllables carry it.
    """
    positions: Counter[str] = Counter({name: 0 for name in JAMO_POSITIONS})
    counter: Counter[tuple[str, str, str]] = Counter()
    for gt_char, pred_char in _substitutions(pairs):
        a, b = _jamo(gt_char), _jamo(pred_char)
        if a is None or b is None:
            continue
        for name, x, y in zip(JAMO_POSITIONS, a, b):
            if x != y:
                positions[name] += 1
                counter[(name, x, y)] += 1
    return {"positions": dict(positions),
            "top": [(name, x, y, n) for (name, x, y), n in counter.most_common(top)]}


def breakdown(gt_pages: list[Page], pred_pages: list[Page], scores: list[PageScore]) -> dict[str, Any]:
    """Per-category page F1, per-text-kind word score, detection failures and top confusions."""
    by_category: dict[str, list[float]] = defaultdict(list)
    kind_total: Counter[str] = Counter()
    kind_score: defaultdict[str, float] = defaultdict(float)
    failures: Counter[str] = Counter()
    matched_text: list[tuple[str, str]] = []
    for gt, pred, score in zip(gt_pages, pred_pages, scores):
        if score.n_gt:
            by_category[gt.category or "(none)"].append(score.f1)
        gt_in = in_image(gt.words, gt.width, gt.height)  # the boxes score_page scored
        failures.update(detection_failures([w for w in gt_in if w is not None],
                                           [w for w in in_image(pred.words, gt.width, gt.height) if w is not None]))
        for word in gt_in:
            if word is not None and not unscored(word.text):  # as score_page counts them
                kind_total[text_kind(word.text)] += 1
        for gi, pi, value in score.pairs:
            kind_score[text_kind(gt.words[gi].text)] += value
            matched_text.append((gt.words[gi].text, pred.words[pi].text))
    return {
        "category_f1": {c: sum(v) / len(v) for c, v in sorted(by_category.items())},
        "category_pages": {c: len(v) for c, v in sorted(by_category.items())},
        "kind_score": {k: kind_score[k] / kind_total[k] for k in TEXT_KINDS if kind_total[k]},
        "kind_words": {k: kind_total[k] for k in TEXT_KINDS if kind_total[k]},
        "detection": {k: failures.get(k, 0) for k in ("split", "merged", "missed")},
        "confusions": [{"gt": a, "pred": b, "count": n} for a, b, n in confusions(matched_text)],
    }
