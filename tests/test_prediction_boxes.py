"""Prediction page JSON holds axis-aligned boxes inside the image, also for slanted and vertical words."""

from __future__ import annotations

import numpy as np

from evaluation.reader import results_to_page


def test_a_quad_past_the_edge_is_clipped_to_the_image():
    grey = np.zeros((255, 159), np.uint8)  # realdata greengarnets_crops/0_.jpg's size
    # the free (perspective-cut) quad CRAFT gives that vertical sign word: it runs 18 px below the image
    quad = [[9.16, 140.2], [150.1, 105.54], [163.83, 238.0], [22.9, 272.46]]
    page = results_to_page("0_.jpg", grey, [(quad, "OE", 0.34), ([[14, 44], [86, 44], [86, 142], [14, 142]], "시", 0.1)])
    for word in page.words:
        x, y, w, h = word.bbox
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 159 and y + h <= 255, word  # was y + h 272.46
    assert page.words[0].bbox == (9.16, 105.54, 149.84, 149.46)  # to the edges: 159 - 9.16, 255 - 105.54
    assert page.words[1].bbox == (14, 44, 72, 98)  # a box inside the image is its envelope, as before


def test_kocr_predicts_boxes_inside_a_real_vertical_sign(tmp_path):
    from tests.conftest import realdata
    from evaluation.reader import PageReader
    from training.checkpoint import load_recognizer

    image = realdata("greengarnets_crops", "0_.jpg")
    page = PageReader(load_recognizer("ko_base")).read(image)
    assert page.words
    for word in page.words:
        x0, y0, x1, y1 = word.corners
        assert 0 <= x0 < x1 <= page.width and 0 <= y0 < y1 <= page.height, word


def test_a_prediction_scores_the_same_in_memory_as_read_back_from_its_file(tmp_path):
    """evaluate scores its readings in memory and writes them (2 decimals) for `kocr score`: a box 4.996 high
    against a ground-truth box 10 high (IoU .4996 against .5000 after rounding) matched in one and not the other."""
    from evaluation.metrics import score_page
    from training.data.pages import Page, Word, read_page, write_page

    grey = np.zeros((50, 100), np.uint8)
    pred = results_to_page("p.png", grey, [([[0, 0], [10, 0], [10, 4.996], [0, 4.996]], "서울", 0.9)])
    write_page(pred, tmp_path / "p.json")
    back = read_page(tmp_path / "p.json")
    assert [w.bbox for w in back.words] == [w.bbox for w in pred.words]
    gt = Page("p.png", 100, 50, [Word((0, 0, 10, 10), "서울")])
    assert score_page(gt, pred, 0.5) == score_page(gt, back, 0.5)
