"""CLEval beside the IoU gate: merged boxes still earn character credit."""

from __future__ import annotations

import pytest

from evaluation.cleval_metric import CLEvalAccumulator
from evaluation.metrics import score_page
from training.data.pages import Page, Word

GT = Page("p.jpg", 200, 50, [Word((0, 0, 40, 20), "서울"), Word((50, 0, 40, 20), "평양")])


def _scores(pred_words):
    acc = CLEvalAccumulator()
    acc.update(GT, Page("p.jpg", 200, 50, pred_words))
    return acc.compute()


def test_perfect_reading_scores_one():
    scores = _scores(list(GT.words))
    assert scores["cleval_e2e_f1"] == pytest.approx(1.0) and scores["cleval_det_f1"] == pytest.approx(1.0)


def test_a_merged_box_keeps_character_credit_where_the_iou_gate_gives_none():
    merged = [Word((0, 0, 90, 20), "서울 평양")]
    assert score_page(GT, Page("p.jpg", 200, 50, merged)).f1 == 0.0
    scores = _scores(merged)
    assert scores["cleval_merged"] >= 1
    assert 0.5 < scores["cleval_e2e_f1"] < 1.0  # every character read, one granularity penalty


def test_wrong_text_lowers_e2e_but_not_detection():
    scores = _scores([Word((0, 0, 40, 20), "서을"), Word((50, 0, 40, 20), "평양")])
    assert scores["cleval_det_f1"] == pytest.approx(1.0)
    assert scores["cleval_e2e_f1"] < 1.0


def test_empty_prediction_scores_zero():
    scores = _scores([])
    assert scores["cleval_e2e_recall"] == 0.0 and scores["cleval_det_recall"] == 0.0


def test_spaces_inside_a_merged_box_are_not_wrong_characters():
    # AI-Hub labels hold one 어절 each, so the space a merged box reads has nothing to match
    spaced = _scores([Word((0, 0, 90, 20), "서울 평양")])
    assert spaced == _scores([Word((0, 0, 90, 20), "서울평양")])
    assert spaced["cleval_e2e_precision"] == pytest.approx((4 - 1) / 4)  # four letters read, one merge penalty


def test_gt_boxes_past_the_image_edge_are_clamped_like_the_iou_gate_clamps_them():
    gt = Page("p.jpg", 100, 50, [Word((-30, 0, 70, 20), "서울"), Word((50, 0, 80, 20), "평양"),
                                 Word((120, 0, 20, 20), "밖")])  # the last lies wholly outside the image
    acc = CLEvalAccumulator()
    acc.update(gt, Page("p.jpg", 100, 50, [Word((0, 0, 40, 20), "서울"), Word((50, 0, 50, 20), "평양")]))
    scores = acc.compute()
    assert scores["cleval_det_f1"] == pytest.approx(1.0) and scores["cleval_e2e_f1"] == pytest.approx(1.0)


def test_a_gt_box_marked_illegible_is_dont_care():
    marked = Page("p.jpg", 200, 50, [*GT.words, Word((100, 0, 40, 20), "###")])
    acc = CLEvalAccumulator()
    acc.update(marked, Page("p.jpg", 200, 50, list(GT.words)))
    assert acc.compute()["cleval_e2e_recall"] == pytest.approx(1.0)  # the unread ### box is not missed


def test_a_prediction_with_a_nan_corner_is_left_out_not_a_crash():
    broken = Word((float("nan"), 0, 40, 20), "서울")
    assert _scores([*GT.words, broken]) == _scores(list(GT.words))
