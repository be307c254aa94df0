"""Tests for evaluation.metrics; every expected number is worked out by hand in a comment."""

from __future__ import annotations

import unicodedata

import pytest

from evaluation.metrics import (PageScore, cer, e2e_scores, iou, paired_words, recognition_scores,
                                score_folders, score_page, sign_test_p)
from training.data.pages import Page, Word, write_page

A = (0, 0, 10, 10)   # x, y, w, h
B = (20, 0, 10, 10)  # far from A
C = (40, 0, 10, 10)  # far from A and B


def test_cer_basic_and_above_one():
    assert cer("서울시", "서울") == pytest.approx(1 / 3)  # 1 deletion / 3 chars
    assert cer("가", "나다라") == 3.0                      # 1 sub + 2 ins = 3 / 1 char
    assert cer(" 서울 ", "서울") == 0.0                    # outer whitespace stripped
    assert cer("", "") == 0.0


def test_iou_values():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (0, 0, 10, 5)) == 0.5       # 50 / (100 + 50 - 50)
    assert iou((0, 0, 10, 10), (2, 0, 12, 10)) == pytest.approx(8 / 12)  # 80 / 120
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0     # touching edges only
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0          # no area, no division error


def test_perfect_page():
    gt = [Word(A, "서울"), Word(B, "시청")]
    s = score_page(gt, [Word(B, "시청"), Word(A, "서울")])
    # both pairs IoU 1, CER 0 -> score 2; P = 2/2, R = 2/2
    assert (s.score_sum, s.n_gt, s.n_pred, s.matched) == (2.0, 2, 2, 2)
    assert s.pairs == [(0, 1, 1.0), (1, 0, 1.0)]
    assert (s.precision, s.recall, s.f1) == (1.0, 1.0, 1.0)


def test_page_score_accepts_pages():
    gt = Page("p.jpg", 100, 50, [Word(A, "서울")])
    pred = Page("p.jpg", 100, 50, [Word(A, "서울")])
    assert score_page(gt, pred).f1 == 1.0


def test_no_match_below_threshold():
    # gt x 0..10, pred x 8..18: inter 2*10 = 20, union 100 + 100 - 20 = 180 -> IoU 0.111 < 0.5
    s = score_page([Word(A, "서울")], [Word((8, 0, 10, 10), "서울")])
    assert (s.score_sum, s.n_gt, s.n_pred, s.matched, s.pairs) == (0.0, 1, 1, 0, [])
    assert (s.precision, s.recall, s.f1) == (0.0, 0.0, 0.0)


def test_cer_above_one_scores_zero_not_negative():
    gt = [Word(A, "가"), Word(B, "서울")]
    pred = [Word(A, "나다라"), Word(B, "서울")]
    s = score_page(gt, pred)
    # pair A: CER 3 -> max(0, 1 - 3) = 0 (would be -2); pair B: 1 -> sum 1 (would be -1)
    assert s.pairs == [(0, 0, 0.0), (1, 1, 1.0)]
    assert s.score_sum == 1.0
    assert (s.precision, s.recall, s.f1) == (0.5, 0.5, 0.5)  # 1/2, 1/2, 2*.25/1


def test_empty_prediction_list():
    s = score_page([Word(A, "서울"), Word(B, "시청")], [])
    # |P| = 0 -> precision 0; score 0 / |G| 2 = 0; F1 0
    assert (s.n_gt, s.n_pred, s.matched) == (2, 0, 0)
    assert (s.precision, s.recall, s.f1) == (0.0, 0.0, 0.0)


def test_all_matches_score_zero():
    # each pair CER 1 ("가"->"나" is 1 sub / 1 char) -> score 0; P = R = 0, F1 0 (no 0/0)
    s = score_page([Word(A, "가"), Word(B, "다")], [Word(A, "나"), Word(B, "라")])
    assert (s.matched, s.score_sum) == (2, 0.0)
    assert (s.precision, s.recall, s.f1) == (0.0, 0.0, 0.0)


def test_greedy_takes_highest_iou_first():
    # All boxes y 0..10, width 10.  gt0 x 0..10, gt1 x 3..13; pred0 x 2..12, pred1 x -3..7.
    # IoU(gt0, pred0) = 8/12 = .667, IoU(gt1, pred0) = 9/11 = .818,
    # IoU(gt0, pred1) = 7/13 = .538, IoU(gt1, pred1) = 4/16 = .25 (not a candidate).
    # Naive per-gt order: gt0 grabs its best pred0 ("가" vs "나": 0), gt1 is left with nothing
    # -> score 0.  Global greedy: gt1-pred0 (.818) then gt0-pred1 (.538) -> score 2.
    gt = [Word((0, 0, 10, 10), "가"), Word((3, 0, 10, 10), "나")]
    pred = [Word((2, 0, 10, 10), "나"), Word((-3, 0, 10, 10), "가")]
    s = score_page(gt, pred)
    assert s.pairs == [(0, 1, 1.0), (1, 0, 1.0)]
    assert (s.score_sum, s.matched, s.f1) == (2.0, 2, 1.0)


def test_iou_exactly_at_threshold_matches():
    # gt 10x10, pred 10x5 inside it: 50 / 100 = 0.5 exactly -> counts
    s = score_page([Word(A, "서울")], [Word((0, 0, 10, 5), "서울")])
    assert (s.matched, s.f1) == (1, 1.0)
    # gt x 0..3, pred x 1..4 (height 1): 2 / 4 = 0.5 -> counts
    s = score_page([Word((0, 0, 3, 1), "가")], [Word((1, 0, 3, 1), "가")])
    assert s.matched == 1
    # just below: 49 / 100 = 0.49 -> no match
    s = score_page([Word(A, "서울")], [Word((0, 0, 10, 4.9), "서울")])
    assert (s.matched, s.f1) == (0, 0.0)


def test_ignored_empty_gt_and_its_prediction():
    base = score_page([Word(A, "서울")], [Word(A, "서울")])
    # gt at B has whitespace-only text -> ignored; the pred on B is matched to it, so it is
    # neither a false positive nor counted: |G| = 1, |P| = 1, as without them
    s = score_page([Word(A, "서울"), Word(B, "  ")], [Word(A, "서울"), Word(B, "잡음")])
    assert (s.n_gt, s.n_pred, s.matched, s.score_sum) == (1, 1, 1, 1.0)
    assert (s.n_gt, s.n_pred, s.matched) == (base.n_gt, base.n_pred, base.matched)
    assert s.pairs == [(0, 0, 1.0)]
    assert s.f1 == 1.0
    # an unmatched prediction elsewhere still counts: |P| = 2 -> P = 1/2
    s = score_page([Word(A, "서울"), Word(B, "")], [Word(A, "서울"), Word(B, "잡음"), Word(C, "x")])
    assert (s.n_gt, s.n_pred, s.precision, s.recall) == (1, 2, 0.5, 1.0)


def test_a_gt_word_marked_illegible_is_ignored_like_an_empty_one():
    # ### (ICDAR's illegible mark): no reader can be asked to read it, so it is not a missed word,
    # and the prediction matched to it is not a false positive
    s = score_page([Word(A, "서울"), Word(B, " ### ")], [Word(A, "서울"), Word(B, "잡음")])
    assert (s.n_gt, s.n_pred, s.score_sum, s.f1) == (1, 1, 1.0, 1.0)
    # the match is kept apart from the counted ones, so a picture can tell that reading is no error
    assert (s.pairs, s.ignored_pairs) == ([(0, 0, 1.0)], [(1, 1)])
    assert score_page([Word(A, "서울"), Word(B, "##")], [Word(A, "서울")]).n_gt == 2  # only the exact mark


def test_nfd_equals_nfc():
    nfd = unicodedata.normalize("NFD", "한국")
    assert len(nfd) == 6 and nfd != "한국"   # 한 = ㅎㅏㄴ, 국 = ㄱㅜㄱ as jamo
    assert cer("한국", nfd) == 0.0
    assert cer(nfd, "한국") == 0.0
    s = score_page([Word(A, "한국")], [Word(A, nfd)])
    assert (s.score_sum, s.f1) == (1.0, 1.0)
    assert recognition_scores([nfd], ["한국"]) == {"n": 1, "cer": 0.0, "word_accuracy": 1.0,
                                                  "norm_ed": 1.0}


def test_macro_vs_micro():
    page_a = score_page([Word(A, "가")], [Word(A, "가")])  # score 1, P 1, R 1, F1 1
    page_b = score_page([Word(A, "가"), Word(B, "나"), Word(C, "다")], [Word(A, "가")])
    # page_b: score 1, |P| 1, |G| 3 -> P 1, R 1/3, F1 = 2*(1/3)/(4/3) = 0.5
    assert page_b.f1 == pytest.approx(0.5)
    r = e2e_scores([page_a, page_b])
    assert r["e2e_f1"] == pytest.approx(0.75)              # (1 + 0.5) / 2
    assert r["e2e_precision"] == pytest.approx(1.0)        # (1 + 1) / 2
    assert r["e2e_recall"] == pytest.approx(2 / 3)         # (1 + 1/3) / 2
    assert r["e2e_precision_micro"] == pytest.approx(1.0)  # 2 / 2
    assert r["e2e_recall_micro"] == pytest.approx(0.5)     # 2 / 4
    assert r["e2e_f1_micro"] == pytest.approx(2 / 3)       # 2*1*.5 / 1.5
    assert (r["pages"], r["gt_words"], r["pred_words"], r["matched"]) == (2, 4, 2, 2)


def test_page_without_gt_excluded_from_macro():
    page_a = score_page([Word(A, "가")], [Word(A, "가")])   # F1 1
    page_c = score_page([], [Word(A, "잡음")])               # no gt: F1 0, |P| 1
    page_d = score_page([Word(A, " ")], [])                  # only an ignored gt: |G| 0
    r = e2e_scores([page_a, page_c, page_d])
    assert r["pages"] == 1
    assert (r["e2e_f1"], r["e2e_precision"], r["e2e_recall"]) == (1.0, 1.0, 1.0)  # page_a only
    # micro keeps page_c's false positive: P = 1/2, R = 1/1, F1 = 2*.5/1.5 = 2/3
    assert r["e2e_precision_micro"] == pytest.approx(0.5)
    assert r["e2e_recall_micro"] == pytest.approx(1.0)
    assert r["e2e_f1_micro"] == pytest.approx(2 / 3)
    assert (r["gt_words"], r["pred_words"], r["matched"]) == (1, 2, 1)


def test_e2e_scores_empty():
    r = e2e_scores([])
    assert all(v == 0 for v in r.values())
    assert set(r) == {"e2e_f1", "e2e_precision", "e2e_recall", "e2e_f1_micro",
                      "e2e_precision_micro", "e2e_recall_micro", "pages", "gt_words",
                      "pred_words", "matched"}


def test_page_score_properties_direct():
    s = PageScore(score_sum=1.5, n_gt=3, n_pred=2, matched=2)
    # P = 1.5/2 = .75, R = 1.5/3 = .5, F1 = 2*.375/1.25 = .6
    assert (s.precision, s.recall) == (0.75, 0.5)
    assert s.f1 == pytest.approx(0.6)


def test_recognition_scores():
    gts = ["서울", "가", "", "abc"]
    preds = ["서울", "나다", "", "ab"]
    r = recognition_scores(gts, preds)
    # ED: 0, 2 (1 sub + 1 ins), 0, 1 -> 3; gt chars 2 + 1 + 0 + 3 = 6 -> cer 3/6 = 0.5
    # exact: 서울, "" -> 2/4 = 0.5
    # norm_ed: 1 - 0/2 = 1, 1 - 2/2 = 0, both empty = 1, 1 - 1/3 = 2/3 -> (8/3)/4 = 2/3
    assert r["n"] == 4
    assert r["cer"] == pytest.approx(0.5)
    assert r["word_accuracy"] == pytest.approx(0.5)
    assert r["norm_ed"] == pytest.approx(2 / 3)


def test_recognition_scores_edge_cases():
    assert recognition_scores([], []) == {"n": 0, "cer": 0.0, "word_accuracy": 0.0,
                                          "norm_ed": 0.0}
    # long wrong prediction: ED 3 / 1 char -> cer 3; norm_ed 1 - 3/3 = 0
    r = recognition_scores(["가"], ["나다라"])
    assert (r["cer"], r["norm_ed"], r["word_accuracy"]) == (3.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        recognition_scores(["가"], [])


def _page(name, words):
    return Page(name, 100, 50, words)


def test_score_folders(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    write_page(_page("a.jpg", [Word(A, "서울"), Word(B, "시청")]), gt_dir / "a.json")
    write_page(_page("b.jpg", [Word(C, "가")]), gt_dir / "sub" / "b.json")
    write_page(_page("c.jpg", [Word(A, "나")]), gt_dir / "c.json")  # no prediction file
    write_page(_page("a.jpg", [Word(A, "서울"), Word(B, "시장")]), pred_dir / "a.json")
    write_page(_page("b.jpg", [Word(C, "가")]), pred_dir / "b.json")  # found by stem
    r = score_folders(gt_dir, pred_dir)
    # a: score 1 + (1 - 1/2) = 1.5, |G| 2, |P| 2 -> P = R = F1 = .75
    # b: score 1, |G| 1, |P| 1 -> F1 1
    # c: no prediction file -> |P| 0, |G| 1 -> P = R = F1 = 0
    assert r["pages"] == 3
    assert r["e2e_f1"] == pytest.approx(1.75 / 3)          # (.75 + 1 + 0) / 3
    assert r["e2e_precision"] == pytest.approx(1.75 / 3)
    assert r["e2e_recall"] == pytest.approx(1.75 / 3)
    # micro: score 2.5, |P| 3, |G| 4 -> P 5/6, R 5/8, F1 = (25/24) / (35/24) = 5/7
    assert r["e2e_precision_micro"] == pytest.approx(5 / 6)
    assert r["e2e_recall_micro"] == pytest.approx(5 / 8)
    assert r["e2e_f1_micro"] == pytest.approx(5 / 7)
    assert (r["gt_words"], r["pred_words"], r["matched"]) == (4, 3, 3)
    assert r["missing_predictions"] == 1
    # crops of matched pairs: (서울, 서울), (시청, 시장), (가, 가)
    # cer (0 + 1 + 0) / (2 + 2 + 1) = .2; word acc 2/3; norm_ed (1 + .5 + 1) / 3 = 5/6
    assert r["cer"] == pytest.approx(0.2)
    assert r["word_accuracy"] == pytest.approx(2 / 3)
    assert r["norm_ed"] == pytest.approx(5 / 6)


def test_kocr_score_scores_a_page_whose_label_misstates_its_size_as_evaluate_does(tmp_path):
    """A label saying 100 px wide on a 200 px image (prepare keeps it: image_size_differs_from_json) is
    scored by evaluate on the image's size (training.data.pages.on_image, 092eec6); evaluate's
    --predictions pages hold that size. `kocr score` of the same labels and predictions clamped both to
    the label's 100 px instead: the word past it ignored, the one across it matched on its cut parts only
    (e2e_f1 0.0 where evaluate says 1.0)."""
    from training.data.pages import on_image

    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    words = [Word((120, 10, 60, 20), "서울"), Word((70, 30, 60, 15), "시청")]  # past 100 px, across it
    label = Page("a.png", 100, 50, words)
    read = Page("a.png", 200, 50, words)  # as evaluate writes it: results_to_page gives the image's size
    write_page(label, gt_dir / "a.json")
    write_page(read, pred_dir / "a.json")
    by_evaluate = e2e_scores([score_page(on_image(label, 200, 50), read)])
    r = score_folders(gt_dir, pred_dir)
    assert by_evaluate["e2e_f1"] == pytest.approx(1.0)
    assert {k: r[k] for k in by_evaluate} == pytest.approx(by_evaluate)
    assert (r["cer"], r["word_accuracy"]) == (0.0, 1.0)


def test_score_evaluate_and_the_page_set_scorer_size_a_page_by_one_function(tmp_path, monkeypatch):
    """`kocr score` (score_folders) repeated evaluate's on_image inline; both now call
    training.data.pages.on_image, which evaluate and PageSetScorer import."""
    import evaluation.evaluate
    import evaluation.metrics
    import evaluation.page_scorer
    from training.data import pages

    assert evaluation.evaluate.on_image is evaluation.page_scorer.on_image is evaluation.metrics.on_image \
        is pages.on_image
    label = Page("a.png", 100, 50, [Word((10, 10, 20, 10), "서울")])
    assert pages.on_image(label, 100, 50) is label
    assert (pages.on_image(label, 200, 60).width, pages.on_image(label, 200, 60).height) == (200, 60)
    write_page(label, tmp_path / "gt" / "a.json")
    write_page(Page("a.png", 200, 50, label.words), tmp_path / "pred" / "a.json")
    seen = []
    monkeypatch.setattr(evaluation.metrics, "on_image", lambda page, w, h: seen.append((w, h)) or pages.on_image(page, w, h))
    assert score_folders(tmp_path / "gt", tmp_path / "pred")["e2e_f1"] == pytest.approx(1.0)
    assert seen == [(200, 50)]


def test_score_folders_prefers_relative_path_and_rejects_ambiguous_stem(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    write_page(_page("x.jpg", [Word(A, "가")]), gt_dir / "s1" / "x.json")
    write_page(_page("x.jpg", [Word(A, "가")]), pred_dir / "s1" / "x.json")  # same rel path
    write_page(_page("x.jpg", [Word(A, "틀림")]), pred_dir / "s2" / "x.json")
    r = score_folders(gt_dir, pred_dir)
    assert (r["e2e_f1"], r["missing_predictions"]) == (1.0, 0)  # s1/x.json used, not s2
    write_page(_page("x.jpg", [Word(A, "틀림")]), gt_dir / "s3" / "x.json")
    r = score_folders(gt_dir, pred_dir)  # s2/x.json is the one unclaimed x: s3's, by stem
    assert (r["e2e_f1"], r["missing_predictions"], r["pred_words"]) == (1.0, 0, 2)
    write_page(_page("x.jpg", [Word(A, "나")]), pred_dir / "s4" / "x.json")  # two unclaimed x predictions
    with pytest.raises(ValueError, match="several predictions share its stem"):
        score_folders(gt_dir, pred_dir)


def test_a_prediction_found_at_its_own_path_is_not_handed_to_another_page_by_stem(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    write_page(_page("p.jpg", [Word(A, "서울")]), gt_dir / "a" / "p.json")
    write_page(_page("p.jpg", [Word(B, "부산")]), gt_dir / "b" / "p.json")
    write_page(_page("p.jpg", [Word(A, "서울")]), pred_dir / "a" / "p.json")  # b/p.json has no prediction
    r = score_folders(gt_dir, pred_dir)
    # a: F1 1; b: nothing predicted, F1 0 -> macro .5; micro score 1, |P| 1, |G| 2 -> P 1, R .5, F1 2/3
    assert (r["missing_predictions"], r["pred_words"]) == (1, 1)  # was 0 and 2: a's words scored twice
    assert r["e2e_f1"] == pytest.approx(0.5) and r["e2e_f1_micro"] == pytest.approx(2 / 3)
    write_page(_page("p.jpg", [Word(B, "부산")]), gt_dir / "c" / "p.json")
    write_page(_page("p.jpg", [Word(B, "부산")]), pred_dir / "p.json")  # fits b and c alike
    with pytest.raises(ValueError, match="fits several pages"):
        score_folders(gt_dir, pred_dir)


def test_a_box_holding_nan_or_infinity_is_ignored_not_a_whole_page_word():
    # Python's JSON reader takes NaN and Infinity; max(0, nan) is 0 and min(100, nan) is 100
    nan, inf = float("nan"), float("inf")
    gt = Page("p.jpg", 100, 50, [Word((10, 10, 30, 10), "서울"), Word((nan, 10, 40, 20), "시청"),
                                 Word((0, 0, inf, 20), "구청")])
    whole_page = Word((0, 0, 100, 50), "시청")
    s = score_page(gt, [Word((10, 10, 30, 10), "서울"), whole_page])
    # 서울 matches; the broken words are ignored like empty ones; the whole-page box is a false positive
    assert (s.n_gt, s.n_pred, s.matched) == (1, 2, 1) and s.f1 == pytest.approx(2 / 3)
    assert score_page([Word((nan, 0, 5, 5), "가")], [Word(A, "가")]).n_gt == 0  # no page size either


def test_sign_test_matches_the_exact_binomial_test():
    from scipy.stats import binomtest

    for wins, losses in [(9, 1), (1, 9), (23, 20), (16, 37), (0, 5), (12, 12), (42, 25), (0, 1)]:
        assert sign_test_p(wins, losses) == pytest.approx(binomtest(wins, wins + losses).pvalue, rel=1e-9)
    assert sign_test_p(0, 0) == 1.0


def test_paired_words_counts_only_words_that_change_and_compares_in_nfc():
    import unicodedata

    gts = ["서울", "시청", "구청", "역사", unicodedata.normalize("NFD", "만행은")]
    reference = ["서울", "시장", "구청", "역서", "마행은"]
    candidate = ["서을", "시청", "구청", "역시", "만행은"]  # fixes 시청 and 만행은 (NFD truth), breaks 서울
    assert paired_words(gts, reference, candidate) == {"fixed": 2, "broken": 1, "p": 1.0}
    assert paired_words(gts, candidate, reference) == {"fixed": 1, "broken": 2, "p": 1.0}
    with pytest.raises(ValueError, match="5 ground truths, 5 and 4 readings"):
        paired_words(gts, reference, candidate[:4])


def test_gt_boxes_past_the_image_edge_are_clamped_before_the_iou_gate():
    # AI-Hub labels start below zero and run past the edge; EasyOCR's boxes never leave the image
    gt = Page("p.jpg", 100, 100, [Word((-60, 0, 100, 20), "김해시"), Word((60, 40, 100, 20), "시청"),
                                  Word((10, 70, 0, 20), "폭없음"), Word((150, 0, 30, 20), "밖")])
    pred = [Word((0, 0, 40, 20), "김해시"), Word((60, 40, 40, 20), "시청")]
    s = score_page(gt, pred)
    # raw IoU 800/2000 = .4 and 800/2000 = .4 fail the gate; clamped, both boxes are the predicted ones;
    # the zero-width word and the one wholly outside have nothing to match: ignored, like empty text
    assert (s.matched, s.n_gt, s.n_pred, s.f1) == (2, 2, 2, 1.0)
    assert score_page(list(gt.words), pred).matched == 0  # bare word lists: no page size, no clamping


def test_boxes_that_do_not_touch_never_match_even_at_iou_zero():
    s = score_page([Word(A, "가")], [Word((500, 500, 10, 10), "가")], iou_threshold=0)
    assert (s.matched, s.f1) == (0, 0.0)
    assert score_page([Word(A, "가")], [Word((5, 5, 10, 10), "가")], iou_threshold=0).matched == 1


def test_score_folders_gives_no_recognition_scores_when_no_pair_matched(tmp_path):
    # one line box over two word labels (EasyOCR's default grouping): IoU 200/440 < .5 for each word
    write_page(_page("a.jpg", [Word((0, 0, 20, 10), "서울"), Word((24, 0, 20, 10), "시청")]), tmp_path / "gt/a.json")
    write_page(_page("a.jpg", [Word((0, 0, 44, 10), "서울 시청")]), tmp_path / "pred/a.json")
    r = score_folders(tmp_path / "gt", tmp_path / "pred")
    assert (r["matched"], r["e2e_f1"]) == (0, 0.0)
    assert (r["cer"], r["word_accuracy"], r["norm_ed"]) == (None, None, None)  # was cer 0.0: "perfect"
