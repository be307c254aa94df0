"""Error analysis: text kinds, detection failures, confusions, breakdowns, and the worst-page picture."""

from __future__ import annotations

import os
import unicodedata
from collections import Counter

from PIL import Image

from evaluation.analysis import breakdown, confusions, detection_failures, jamo_confusions, text_kind
from evaluation.drawing import EXACT, FOUND, MISSED, NOT_SCORED, UNMATCHED, WRONG, draw_comparison
from evaluation.metrics import score_page
from training.data.pages import Page, Word


def test_text_kind_by_script():
    assert text_kind("서울") == "hangul"
    assert text_kind(unicodedata.normalize("NFD", "서울")) == "hangul"
    assert text_kind("1,250") == "digits"
    assert text_kind("OCR") == "latin"
    assert text_kind("제2024-153호") == "mixed"
    assert text_kind("(주)") == "hangul"  # punctuation does not make a word mixed
    assert text_kind("---") == "other"


def test_detection_failures_split_merged_missed():
    gt = [Word((0, 0, 100, 20), "서울특별시"), Word((110, 0, 40, 20), "평양"), Word((160, 0, 40, 20), "부산"),
          Word((0, 50, 60, 20), "대구"), Word((300, 300, 10, 10), "")]
    pred = [Word((0, 0, 45, 20), "서울"), Word((55, 0, 45, 20), "특별시"),   # the first word in two pieces
            Word((108, 0, 94, 20), "평양 부산")]                              # two words in one box
    # 대구 has no overlapping prediction; the empty-text box is ignored
    assert detection_failures(gt, pred) == {"split": 1, "merged": 2, "missed": 1}


def test_confusions_count_substitutions_only():
    pairs = [("서울", "서을"), ("서울시", "서을시"), ("평양", "평양역")]
    assert confusions(pairs) == [("울", "을", 2)]


def test_jamo_confusions_split_each_syllable_substitution_into_its_parts():
    pairs = [("생년월일", "생년원익"),  # final ㄹ read as ㄴ, then as ㄱ
             ("남성", "난성"),          # final ㅁ read as ㄴ
             ("가게", "거게"),          # medial ㅏ read as ㅓ
             ("일", "익"), ("사과", "시과"), ("No.2", "No.9"),  # a digit swap is no jamo confusion
             ("하", "호"), ("서울", "서울역")]  # ㅏ→ㅗ; an insertion is no substitution
    result = jamo_confusions(pairs)
    assert result["positions"] == {"initial": 0, "medial": 3, "final": 4}
    assert result["top"][0] == ("final", "ㄹ", "ㄱ", 2)
    assert set(result["top"][1:]) == {("final", "ㄹ", "ㄴ", 1), ("final", "ㅁ", "ㄴ", 1),
                                      ("medial", "ㅏ", "ㅓ", 1), ("medial", "ㅏ", "ㅣ", 1),
                                      ("medial", "ㅏ", "ㅗ", 1)}
    # a syllable wrong in two parts counts in both; a lost final consonant reads as "-"
    assert jamo_confusions([("갈", "걱"), ("강", "가")])["top"] == [
        ("medial", "ㅏ", "ㅓ", 1), ("final", "ㄹ", "ㄱ", 1), ("final", "ㅇ", "-", 1)]
    assert jamo_confusions([("가", "가"), ("가", "")]) == {
        "positions": {"initial": 0, "medial": 0, "final": 0}, "top": []}


def test_breakdown_by_category_and_kind():
    gt_a = Page("a.jpg", 300, 100, [Word((0, 0, 50, 20), "서울"), Word((60, 0, 50, 20), "2024")], "민원")
    gt_b = Page("b.jpg", 300, 100, [Word((0, 0, 50, 20), "평양")], "행정")
    pred_a = Page("a.jpg", 300, 100, [Word((0, 0, 50, 20), "서울"), Word((60, 0, 50, 20), "2025")])
    pred_b = Page("b.jpg", 300, 100, [])
    scores = [score_page(gt_a, pred_a), score_page(gt_b, pred_b)]
    result = breakdown([gt_a, gt_b], [pred_a, pred_b], scores)
    # page a: scores 1 + (1 - 1/4) = 1.75 over 2 gt and 2 pred -> F1 0.875; page b: nothing predicted -> 0
    assert result["category_f1"] == {"민원": 0.875, "행정": 0.0}
    # hangul: 서울 scored 1, 평양 0, over 2 words; digits: 0.75 over 1
    assert result["kind_score"] == {"hangul": 0.5, "digits": 0.75}
    assert result["detection"]["missed"] == 1
    assert result["confusions"] == [{"gt": "4", "pred": "5", "count": 1}]


def test_worst_page_picture_shows_both_sides(tmp_path):
    image = tmp_path / "p.png"
    Image.new("RGB", (200, 100), (250, 250, 250)).save(image)
    gt = Page("p.png", 200, 100, [Word((10, 40, 60, 20), "서울")])
    pred = Page("p.png", 200, 100, [Word((12, 40, 60, 20), "서을", 0.4)])
    out = draw_comparison(image, gt, pred, "candidate: page F1 0.500", tmp_path / "out" / "w.png")
    with Image.open(out) as picture:
        assert picture.width == 2 * 200 + 10 and picture.height > 100
        pixels = picture.convert("RGB").load()
        # a blue edge round the found ground-truth word on the left, an orange one round its misreading on the right
        header = picture.height - 100
        assert pixels[10, header + 50] == FOUND and pixels[210 + 12, header + 50] == WRONG


def test_worst_page_picture_shows_the_page_the_models_read_for_16_bit_and_alpha_only_images(tmp_path):
    import numpy as np

    ink = np.full((100, 200), 60000, np.uint16)  # a 16-bit scan: light paper, one dark word
    ink[45:55, 150:190] = 3000
    Image.fromarray(ink).save(tmp_path / "deep.png")
    alpha = np.zeros((100, 200, 4), np.uint8)  # text only in the alpha channel, every colour black
    alpha[45:55, 150:190, 3] = 255
    Image.fromarray(alpha, "RGBA").save(tmp_path / "alpha.png")
    for name in ("deep.png", "alpha.png"):
        page = Page(name, 200, 100, [Word((150, 45, 40, 10), "서울")])
        out = draw_comparison(tmp_path / name, page, page, "m", tmp_path / f"w_{name}")
        with Image.open(out) as picture:
            grey = np.asarray(picture.convert("L"))
        body = grey[grey.shape[0] - 100:, :200]  # the left panel's page, below its heading
        # light paper with the dark word where the models read it: not a blank white or black page
        assert body[5:40, 5:140].mean() > 200 and body[47:53, 155:185].mean() < 100, name


def _detected_words(detector, image) -> list[Word]:
    from evaluation.reader import load_image

    horizontal, free = detector.detect(load_image(image)[0])
    boxes = [(x0, y0, x1, y1) for x0, x1, y0, y1 in horizontal]
    boxes += [(min(p[0] for p in q), min(p[1] for p in q), max(p[0] for p in q), max(p[1] for p in q)) for q in free]
    return [Word((x0, y0, x1 - x0, y1 - y0), "") for x0, y0, x1, y1 in boxes]


def test_the_params_detector_boxes_words_where_easyocrs_default_boxes_lines(sample_pages):
    """params.yaml's grouping (width_ths) gives one box per labelled word, as the IoU gate needs."""
    from evaluation.reader import Detector, DetectorSettings
    from kocr.params import load_params
    from training.data.pages import read_page

    ours = Detector(DetectorSettings.from_params(load_params()["detector"]))
    easyocr_default = Detector(DetectorSettings())
    totals = {"ours": Counter(), "default": Counter()}
    for path in sorted(sample_pages.glob("*.json"))[:3]:
        gt = read_page(path)
        image = path.with_name(gt.image_name)
        totals["ours"].update(detection_failures(gt.words, _detected_words(ours, image)))
        totals["default"].update(detection_failures(gt.words, _detected_words(easyocr_default, image)))
        totals["ours"]["words"] += len(gt.words)
    words = totals["ours"]["words"]
    assert totals["ours"]["merged"] + totals["ours"]["split"] <= 0.1 * words, totals
    assert totals["default"]["merged"] >= 3 * max(1, totals["ours"]["merged"]), totals  # the knob is what matters


def test_breakdown_counts_the_words_score_page_scored():
    # a label past the page edge is clamped as score_page clamps it; one wholly outside is not a word
    gt = Page("a.jpg", 100, 50, [Word((-40, 0, 80, 20), "서울"), Word((200, 0, 40, 20), "평양")], "민원")
    pred = Page("a.jpg", 100, 50, [Word((0, 0, 40, 20), "서울")])
    result = breakdown([gt], [pred], [score_page(gt, pred)])
    assert result["kind_score"] == {"hangul": 1.0} and result["kind_words"] == {"hangul": 1}
    assert result["detection"] == {"split": 0, "merged": 0, "missed": 0}


def test_breakdown_leaves_out_words_marked_illegible_as_score_page_does():
    # a ### word is not scored (score_page ignores it): it counted as a kind "other" word scoring 0, and as
    # missed by the detector
    gt = Page("a.jpg", 100, 50, [Word((0, 0, 40, 20), "서울"), Word((50, 0, 40, 20), "###")], "민원")
    pred = Page("a.jpg", 100, 50, [Word((0, 0, 40, 20), "서울")])
    score = score_page(gt, pred)
    result = breakdown([gt], [pred], [score])
    assert score.n_gt == 1 and result["kind_words"] == {"hangul": 1} and result["kind_score"] == {"hangul": 1.0}
    assert result["detection"] == {"split": 0, "merged": 0, "missed": 0}


def _broken_boxes_page(name: str) -> Page:
    """A page whose labels hold a negative width, a negative height, a NaN corner and a box off the page."""
    return Page(name, 200, 100, [Word((10, 40, 60, 20), "서울"), Word((120, 40, -30, 20), "시청"),
                                 Word((90, 70, 20, -15), "구청"), Word((float("nan"), 5, 20, 10), "동"),
                                 Word((300, 40, 20, 20), "밖")])


def test_worst_page_picture_draws_broken_boxes_as_scoring_clamps_them(tmp_path):
    """Boxes scoring leaves out (negative size, NaN, off the page) are left out of the picture, not a crash."""
    Image.new("RGB", (200, 100), (250, 250, 250)).save(tmp_path / "p.png")
    gt = _broken_boxes_page("p.png")
    pred = Page("p.png", 200, 100, [Word((-20, 40, 90, 20), "서울"), Word((50, float("inf"), 9, 9), "?")])
    out = draw_comparison(tmp_path / "p.png", gt, pred, "m", tmp_path / "w.png")
    with Image.open(out) as picture:
        assert picture.width > 200


def test_evaluate_writes_metrics_and_pictures_for_a_page_with_broken_boxes(tmp_path, monkeypatch):
    from evaluation import evaluate
    from evaluation.evaluate import EvalPage, evaluate_models

    Image.new("RGB", (200, 100), (250, 250, 250)).save(tmp_path / "p.png")
    gt = _broken_boxes_page("p.png")

    class Reader:  # reads the one sound word, misread
        needs_detection = False

        def read_page(self, item, grey, detections):
            return Page(item.page.image_name, 200, 100, [Word((10, 40, 60, 20), "서을")])

        def read_crops(self, grey, boxes):
            return ["" for _ in boxes]

    monkeypatch.setattr(evaluate, "make_engine", lambda model, settings, device: Reader())
    scored = evaluate_models({"m": "echo"}, [EvalPage("p.png", gt, tmp_path / "p.png")], tmp_path / "pred",
                             progress=False, pictures_dir=tmp_path / "worst")["m"]
    assert scored.metrics["gt_words"] == 1 and [p.is_file() for p in scored.pictures] == [True]


def test_evaluate_scores_a_label_of_another_size_on_the_image_the_models_read(tmp_path, monkeypatch):
    """prepare keeps a label whose image.width differs from its image, boxes clipped to the real image
    (image_size_differs_from_json); evaluate clamped them to the label's 100 px instead: 시청 beyond it was
    ignored and its reading a false positive, 서울 across it matched on cut parts (IoU .25, not .625)."""
    from evaluation import evaluate
    from evaluation.evaluate import EvalPage, evaluate_models

    Image.new("RGB", (200, 50), (250, 250, 250)).save(tmp_path / "p.png")
    gt = Page("p.png", 100, 50, [Word((80, 0, 40, 20), "서울"), Word((150, 0, 40, 20), "시청")])

    class Reader:  # reads both words right, its boxes inside the 200 px image
        needs_detection = False

        def read_page(self, item, grey, detections):
            return Page(item.page.image_name, 200, 50, [Word((95, 0, 25, 20), "서울"), Word((150, 0, 40, 20), "시청")])

        def read_crops(self, grey, boxes):
            return ["" for _ in boxes]

    monkeypatch.setattr(evaluate, "make_engine", lambda model, settings, device: Reader())
    scored = evaluate_models({"m": "echo"}, [EvalPage("p.png", gt, tmp_path / "p.png")], tmp_path / "pred",
                             progress=False)["m"]
    assert (scored.metrics["gt_words"], scored.metrics["matched"], scored.metrics["e2e_f1"]) == (2, 2, 1.0)


def test_worst_page_pictures_are_named_by_rank_and_the_report_names_their_pages(tmp_path, monkeypatch):
    """Was: 01_<page>.png, so `dvc plots diff` paired no rank of two runs whose worst pages differ."""
    from evaluation import drawing, evaluate
    from evaluation.evaluate import EvalPage, evaluate_models
    from kocr.cli import evaluation_report

    items = []
    for name, text in (("a.png", "서을"), ("b.png", "서울")):  # a misread, b read exactly
        Image.new("RGB", (200, 100), (250, 250, 250)).save(tmp_path / name)
        items.append(EvalPage(name, Page(name, 200, 100, [Word((10, 40, 60, 20), "서울")]), tmp_path / name))

    class Reader:
        needs_detection = False

        def read_page(self, item, grey, detections):
            return Page(item.page.image_name, 200, 100, [Word((10, 40, 60, 20), "서을" if item.name == "a.png" else "서울")])

        def read_crops(self, grey, boxes):
            return ["" for _ in boxes]

    titles = []
    real = drawing.draw_comparison
    monkeypatch.setattr(evaluate, "make_engine", lambda model, settings, device: Reader())
    monkeypatch.setattr(evaluate, "draw_comparison", lambda *a: titles.append(a[3]) or real(*a))
    scored = evaluate_models({"m": "echo"}, items, tmp_path / "pred", progress=False,
                             pictures_dir=tmp_path / "worst", worst_pages=2)
    assert [p.relative_to(tmp_path / "worst").as_posix() for p in scored["m"].pictures] == ["m/01.png", "m/02.png"]
    assert titles == ["m worst 1: a.png, page F1 0.500", "m worst 2: b.png, page F1 1.000"]
    report = evaluation_report(scored, 2, "0" * 64)
    assert "worst pages (page F1): 01 a.png (0.500), 02 b.png (1.000)" in report


def test_worst_page_picture_colours_each_box_by_its_match(tmp_path):
    """Readings: exact green, misread orange, matched to no word red; ground truth: found blue, missed red."""
    Image.new("RGB", (400, 100), (250, 250, 250)).save(tmp_path / "p.png")
    gt = Page("p.png", 400, 100, [Word((10, 40, 60, 20), "서울"), Word((100, 40, 60, 20), "시청"),
                                  Word((200, 40, 60, 20), "구청")])
    pred = Page("p.png", 400, 100, [Word((10, 40, 60, 20), "서울"), Word((100, 40, 60, 20), "시장"),
                                    Word((300, 40, 60, 20), "잡음")])
    out = draw_comparison(tmp_path / "p.png", gt, pred, "m", tmp_path / "w.png")
    with Image.open(out) as picture:
        pixels, top = picture.convert("RGB").load(), picture.height - 100
        assert [pixels[x, top + 50] for x in (10, 100, 200)] == [FOUND, FOUND, MISSED]
        assert [pixels[410 + x, top + 50] for x in (10, 100, 300)] == [EXACT, WRONG, UNMATCHED]


def test_worst_page_picture_draws_a_reading_on_a_word_not_scored_grey_not_as_an_error(tmp_path):
    """Was: a reading matched to a ``###`` word was red, 'no word matched', on a page that scores F1 1.0."""
    Image.new("RGB", (400, 100), (250, 250, 250)).save(tmp_path / "p.png")
    gt = Page("p.png", 400, 100, [Word((10, 40, 60, 20), "서울"), Word((100, 40, 60, 20), "###"),
                                  Word((200, 40, 60, 20), "")])
    pred = Page("p.png", 400, 100, [Word((10, 40, 60, 20), "서울"), Word((100, 40, 60, 20), "장독"),
                                    Word((200, 40, 60, 20), "잡음"), Word((300, 40, 60, 20), "헛것")])
    score = score_page(gt, pred)
    # 장독 and 잡음 count nowhere; 헛것 alone counts against the page: P = 1/2, R = 1
    assert (score.n_gt, score.n_pred, score.score_sum) == (1, 2, 1.0) and score.ignored_pairs == [(1, 1), (2, 2)]
    out = draw_comparison(tmp_path / "p.png", gt, pred, "m: page F1 0.667", tmp_path / "w.png", score)
    with Image.open(out) as picture:
        pixels, top = picture.convert("RGB").load(), picture.height - 100
        assert [pixels[x, top + 50] for x in (10, 100, 200)] == [FOUND, NOT_SCORED, NOT_SCORED]
        assert [pixels[410 + x, top + 50] for x in (10, 100, 200, 300)] == [EXACT, NOT_SCORED, NOT_SCORED,
                                                                             UNMATCHED]


def test_worst_page_picture_of_a_big_page_is_scaled_down_with_labels_the_size_of_its_words(tmp_path):
    """An A4 scan is drawn 1600 px wide a side; a label is about half its word's height (not the page
    height / 45), and a reading's confidence is not written after it."""
    import numpy as np

    Image.new("RGB", (2480, 3508), (255, 255, 255)).save(tmp_path / "a4.png")
    gt = Page("a4.png", 2480, 3508, [Word((400, 1000, 300, 36), "서울특별시")])
    pictures = []
    for score in (0.93, None):
        pred = Page("a4.png", 2480, 3508, [Word((400, 1000, 300, 36), "서울특별시", score)])
        out = draw_comparison(tmp_path / "a4.png", gt, pred, "m", tmp_path / f"w{score}.png")
        with Image.open(out) as picture:
            pictures.append(np.asarray(picture.convert("RGB")).astype(int))
    assert (pictures[0] == pictures[1]).all()  # the same picture with or without a confidence
    picture = pictures[0]
    assert picture.shape[1] <= 2 * 1600 + 10
    scale = 1600 / 2480
    page = picture[picture.shape[0] - round(3508 * scale):, :1600]  # the left panel's page
    box_top, box_height = round(1000 * scale), 36 * scale
    inked = np.nonzero((np.abs(page - 255).sum(axis=2) > 60).any(axis=1))[0]
    above = inked[inked < box_top - 1]
    assert len(above) and box_top - above.min() < 1.2 * box_height  # the label is no taller than the word


def test_a_crop_longer_than_the_picture_is_wide_keeps_its_shape(tmp_path):
    """A 25:1 line crop is drawn 1200 px wide and 48 high, not squashed to 1200 x 96."""
    import numpy as np

    from evaluation.drawing import draw_crop_readings

    Image.new("RGB", (2500, 100), (0, 0, 0)).save(tmp_path / "line.png")
    out = draw_crop_readings(tmp_path / "line.png", "서울", {"m": ("서울", 0.0)}, tmp_path / "w.png")
    with Image.open(out) as picture:
        rows = np.nonzero((np.asarray(picture.convert("L"))[:, 10:1210] < 20).all(axis=1))[0]  # the crop's rows
    assert len(rows) == 48


def _fonts_only(tmp_path, monkeypatch, *files: str):
    """Point the pictures' font search at a folder holding only ``files``; returns the drawing module."""
    from pathlib import Path

    from evaluation import drawing

    folder = tmp_path / "fonts"
    folder.mkdir()
    for path in files:
        (folder / Path(path).name).symlink_to(path)
    monkeypatch.setattr(drawing, "FONT_DIRS", (str(folder),), raising=False)
    drawing._font.cache_clear()  # the caller empties it again when done
    return drawing


def test_picture_labels_use_any_installed_hangul_face(tmp_path, monkeypatch):
    """Neither NanumGothic nor Noto CJK installed: another Hangul face draws the labels, not Pillow's default."""
    import pytest

    batang = "/usr/share/fonts/truetype/baekmuk/batang.ttf"
    dejavu = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    if not (os.path.isfile(batang) and os.path.isfile(dejavu)):
        pytest.skip("needs fonts-baekmuk and fonts-dejavu")
    drawing = _fonts_only(tmp_path, monkeypatch, dejavu, batang)
    try:
        assert drawing._font(20).path.endswith("batang.ttf")  # DejaVu, first in order, has no Hangul
    finally:
        drawing._font.cache_clear()


def test_picture_labels_without_a_hangul_face_warn_once(tmp_path, monkeypatch):
    import warnings

    dejavu = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    drawing = _fonts_only(tmp_path, monkeypatch, *([dejavu] if os.path.isfile(dejavu) else []))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            drawing._font(20), drawing._font(30)
        assert len([w for w in caught if "draws Hangul" in str(w.message)]) == 1
    finally:
        drawing._font.cache_clear()


def test_a_picture_on_a_full_disk_is_named(tmp_path, monkeypatch):
    """Was: Pillow's ENOSPC names no file, so ``kocr evaluate`` with its worst pages on a disk that filled
    said "no space left on the device writing its output" (it has no --out) and evaluate-crops --worst
    named none either."""
    import errno

    import pytest

    from evaluation.drawing import draw_crop_readings

    image = tmp_path / "p.png"
    Image.new("RGB", (200, 100), (250, 250, 250)).save(image)
    page = Page("p.png", 200, 100, [Word((10, 40, 60, 20), "서울")])

    def full_disk(self, fp, *args, **kwargs):  # what Pillow raises when the PNG does not fit
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    for out, draw in ((tmp_path / "worst" / "01_p.png", lambda out: draw_comparison(image, page, page, "x", out)),
                      (tmp_path / "crops" / "01.png", lambda out: draw_crop_readings(image, "서울", {}, out))):
        with pytest.raises(OSError) as info:
            draw(out)
        assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(out))
