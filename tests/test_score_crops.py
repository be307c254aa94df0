"""`kocr evaluate-crops`: labels TSV checks, EasyOCR-identical reading of real crops, the CLI."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.metrics import recognition_scores, sign_test_p
from evaluation.score_crops import (
    Crop,
    CropReport,
    ScoreInputError,
    iter_labels,
    read_labels,
    score_crops,
)
from kocr.cli import main
from tests.conftest import realdata


def _png(path, size=(60, 20)):
    Image.new("L", size, 255).save(path)
    return path


def test_labels_resolve_images_next_to_the_file_and_ignore_extra_columns(tmp_path):
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png")
    nfd = unicodedata.normalize("NFD", "서울")
    (tmp_path / "labels.tsv").write_text(f"note\timage\ttext\nx\timg/a.png\t {nfd} \n\n", encoding="utf-8")
    crops = read_labels(tmp_path / "labels.tsv")
    assert [(c.image, c.text, c.line, c.font) for c in crops] == [(tmp_path / "img" / "a.png", "서울", 2, "")]
    (tmp_path / "fonts.tsv").write_text("image\tfont\ttext\nimg/a.png\tUnPilgi.ttf\t서울\n", encoding="utf-8")
    assert [c.font for c in read_labels(tmp_path / "fonts.tsv")] == ["UnPilgi.ttf"]  # generated sets name the face


def test_a_row_marked_illegible_is_not_scored_as_a_box_marked_so_is_not(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "labels.tsv").write_text("image\ttext\na.png\t###\nb.png\t서울\n", encoding="utf-8")
    assert [(c.text, c.line) for c in read_labels(tmp_path / "labels.tsv")] == [("서울", 3)]  # was: '###' scored
    skipped: list[tuple[str, str]] = []
    read_labels(tmp_path / "labels.tsv", skipped=skipped)
    assert skipped == [("dont_care", f"{tmp_path / 'labels.tsv'}:2")]
    (tmp_path / "only.tsv").write_text("image\ttext\na.png\t ### \n", encoding="utf-8")
    with pytest.raises(ScoreInputError, match=r"only.tsv: no rows after the header but 1 marked ### \(not scored\)"):
        read_labels(tmp_path / "only.tsv")


@pytest.mark.parametrize("content,message", [
    ("file\tlabel\na.png\t서울\n", "labels.tsv:1: header"),
    ("image\ttext\na.png\t서울\na.png\n", "labels.tsv:3: 1 tab-separated field(s)"),
    ("image\ttext\na.png\t서울\nmissing.png\t부산\n", "labels.tsv:3: image"),
    ("image\ttext\na.png\t\n", "labels.tsv:2: empty text"),
    ("image\ttext\na.png\t서울\t역\n", "labels.tsv:2: 3 tab-separated field(s), expected 2 as in the header (a tab"),
    ("image\ttext\nsub\t서울\n", "labels.tsv:2: image .*sub is a folder"),
    ("image\ttext\n", "no rows after the header"),
])
def test_malformed_labels_name_the_file_and_line(tmp_path, content, message):
    _png(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "labels.tsv").write_text(content, encoding="utf-8")
    with pytest.raises(ScoreInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_labels(tmp_path / "labels.tsv")


def test_a_folder_as_labels_and_an_out_that_is_a_file_fail_before_any_crop_is_read(tmp_path, capsys):
    with pytest.raises(ScoreInputError, match="a folder, expected a labels file"):
        read_labels(tmp_path)
    _png(tmp_path / "a.png")
    (tmp_path / "labels.tsv").write_text("image\ttext\na.png\t서울\n", encoding="utf-8")
    (tmp_path / "taken").write_text("a file")
    assert main(["evaluate-crops", "--labels", str(tmp_path / "labels.tsv"), "--model", "no/such/model.pt",
                 "--out", str(tmp_path / "taken")]) == 2  # the bad --out is named, not the model after a long read
    assert f"--out {tmp_path / 'taken'}: cannot be made a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate-crops", "--labels", str(tmp_path / "labels.tsv"), "--worst", "-1"])
    assert "expected a count >= 0, got -1" in capsys.readouterr().err


def test_worst_ranks_by_the_first_model_then_the_others():
    crops = [Crop(Path(f"{i}.png"), t, i) for i, t in enumerate(["가나", "다라", "마바"])]
    report = CropReport(crops, {}, {"m": ["가나", "다X", "마X"], "b": ["가나", "다라", "XX"]})
    assert report.worst(2) == [2, 1]  # 1 and 2 tie on m (CER 0.5); b breaks the tie


def test_crops_read_exactly_as_easyocr_reader_recognize_reads_them():
    from kocr.easyocr_compat import import_easyocr, offline_model_dir

    labels = realdata("greengarnets_crops", "labels.tsv")
    crops = read_labels(labels)
    report = score_crops(crops, {"english_g2": "english_g2"}, progress=False)
    easyocr = import_easyocr()
    reader = easyocr.Reader(["en"], gpu=False, model_storage_directory=offline_model_dir(), recog_network="english_g2",
                            detector=False, download_enabled=False, quantize=False, verbose=False)
    theirs = [reader.recognize(str(c.image), detail=0)[0] for c in crops]
    assert report.readings["english_g2"] == theirs
    assert report.metrics["english_g2"] == recognition_scores([c.text for c in crops], theirs)
    # english_g2 has no Hangul in its charset: it cannot read one of these Korean signs right
    assert report.metrics["english_g2"]["word_accuracy"] == 0.0 and report.metrics["english_g2"]["n"] == 5


def test_cli_scores_models_and_tesseract_and_draws_the_worst(tmp_path, capsys):
    from evaluation.tesseract import tesseract_available

    labels = realdata("paddleocr", "words.tsv")
    baseline = ["--baseline", "tesseract"] if tesseract_available() else []
    assert main(["evaluate-crops", "--labels", str(labels), "--model", "english_g2", *baseline,
                 "--worst", "1", "--out", str(tmp_path / "out")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "out" / "scores.json").read_text(encoding="utf-8"))
    rows = (tmp_path / "out" / "readings.tsv").read_text(encoding="utf-8").splitlines()
    assert rows[0].split("\t") == ["image", "text", "english_g2", *baseline[1:]] and len(rows) == 3
    assert printed["english_g2"]["n"] == 2 and printed["english_g2"]["word_accuracy"] == 0.0
    pictures = list((tmp_path / "out").glob("worst_*.png"))
    assert len(pictures) == 1 and Image.open(pictures[0]).height > 96
    analysis = json.loads((tmp_path / "out" / "confusions.json").read_text(encoding="utf-8"))
    assert set(analysis) == set(printed) - {"paired"}  # one error analysis per scored model
    assert ("paired" in printed) == bool(baseline)  # a second model is compared with the first
    # english_g2 emits no Hangul, so it makes no syllable-for-syllable substitution to split
    assert analysis["english_g2"]["jamo"]["top"] == [] and analysis["english_g2"]["characters"]
    if baseline:  # Tesseract's Korean model reads printed Hangul; english_g2 cannot emit it at all
        assert printed["tesseract"]["word_accuracy"] > printed["english_g2"]["word_accuracy"]


def test_cli_compares_each_model_with_the_first_crop_by_crop(tmp_path, capsys):
    labels = realdata("greengarnets_crops", "labels.tsv")
    assert main(["evaluate-crops", "--labels", str(labels), "--model", "english_g2", "ko_base",
                 "--out", str(tmp_path / "out")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "out" / "scores.json").read_text(encoding="utf-8"))
    rows = [r.split("\t") for r in (tmp_path / "out" / "readings.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    fixed = sum(k == g != e for _, g, e, k in rows)
    broken = sum(e == g != k for _, g, e, k in rows)
    assert fixed >= 1  # ko_base reads Hangul signs english_g2 cannot spell
    assert printed["paired"] == {"ko_base": {"against": "english_g2", "fixed": fixed, "broken": broken,
                                             "p": sign_test_p(fixed, broken)}}
    assert set(printed) == {"english_g2", "ko_base", "paired"}


def test_cli_error_is_one_line_naming_file_and_line(tmp_path, capsys):
    (tmp_path / "labels.tsv").write_text("image\ttext\nnope.png\t서울\n", encoding="utf-8")
    assert main(["evaluate-crops", "--labels", str(tmp_path / "labels.tsv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'labels.tsv'}:2: image" in err and "nope.png" in err


def _page_json(path, image_name, size, boxes):
    """An AI-Hub page JSON listing ``boxes`` as (x, y, w, h, text)."""
    page = {"images": [{"image.file.name": image_name, "image.width": size[0], "image.height": size[1]}],
            "annotations": [{"id": i, "annotation.type": "rectangle", "annotation.text": text,
                             "annotation.bbox": [x, y, w, h]} for i, (x, y, w, h, text) in enumerate(boxes, start=1)]}
    path.write_text(json.dumps(page, ensure_ascii=False), encoding="utf-8")
    return path


def test_box_labels_cut_each_word_widened_as_easyocr_widens_detected_boxes(tmp_path):
    from evaluation.score_crops import load_crop

    image = Image.new("L", (200, 100), 255)
    image.paste(0, (20, 30, 80, 50))  # a black block where the first word lies
    image.save(tmp_path / "page.png")
    nfd = unicodedata.normalize("NFD", "서울")
    labels = _page_json(tmp_path / "page.json", "page.png", (200, 100), [
        (20, 30, 60, 20, nfd), (150, 80, 40, 20, "###"), (100, 10, 10, 10, ""), (-10, 70, 40, 40, "A-3")])
    crops = read_labels(labels)  # EasyOCR's add_margin: 0.1 x box height on every side
    assert [(c.text, c.line, c.box) for c in crops] == [("서울", 1, (18, 28, 82, 52)), ("A-3", 4, (0, 66, 34, 100))]
    assert crops[0].source(tmp_path / "out") == f"{tmp_path / 'page.png'}#18,28,82,52"
    grey = load_crop(crops[0])
    assert grey.shape == (24, 64) and (grey[2:22, 2:62] == 0).all() and (grey[0] == 255).all()
    assert [c.box for c in read_labels(labels, margin=0.0)][0] == (20, 30, 80, 50)


@pytest.mark.parametrize("content,message", [
    ("{not json", "page.json: not JSON"),
    ('{"page.png": {"words": [{"points": [[1, 2]], "text": "서울"}]}}', "page.json: page.png word 1: expected"),
    ('{"page.png": {"boxes": []}}', 'page.json: page.png: no "words" list'),
    ('{"gone.png": {"words": [{"points": [[1, 2], [9, 9]], "transcription": "서울"}]}}', "image .*gone.png not found"),
    ('{"page.png": {"words": [{"points": [[300, 2], [390, 20]], "transcription": "서울"}]}}',
     r"page.png word 1 \('서울'\): box .* lies outside the 200x100 image"),
    ('{"page.png": {"words": [{"points": [[201, 10], [260, 60]], "transcription": "서울"}]}}',  # within the margin
     r"page.png word 1 \('서울'\): box .* lies outside the 200x100 image"),  # was cut as a 4-pixel sliver
    ('{"page.png": {"words": [{"points": [[1, 2], [9, 9]], "transcription": "###"}]}}', "no labelled word boxes"),
    ('{"page.png": {"words": [{"points": [[5, 5], [5, 9]], "transcription": "서울"}]}}',
     r"page.png word 1 \('서울'\): box \[5.0, 5.0, 0.0, 4.0\] has no area"),
    ('{"images": [{"image.file.name": "page.png"}], "annotations": []}', "page.json.*image entry lacks"),
    ('{"page.png": {"words": [{"points": [[NaN, 2], [9, 9]], "transcription": "서울"}]}}',  # Python's json reads it
     r"page.png word 1 \('서울'\): box \[nan, .*\] is not finite"),
    ('{"images": [{"image.file.name": "page.png", "image.width": 200, "image.height": 100}], "annotations": '
     '[{"annotation.text": "서울", "annotation.bbox": [1, 2, 3, 4]}, {"annotation.text": "부산", '
     '"annotation.bbox": [Infinity, 2, 3, 4]}]}', r"page.png word 2 \('부산'\): box \[inf, .*\] is not finite"),
    ('{"page.png": {"words": [{"points": [[1, 2], [50, 30]], "transcription": "서\\n울"}]}}',  # scored, then lost
     r"page.png word 1: transcription '서\\n울' holds a tab or line break"),
])
def test_malformed_box_labels_name_the_file_image_and_word(tmp_path, content, message):
    _png(tmp_path / "page.png", (200, 100))
    (tmp_path / "page.json").write_text(content, encoding="utf-8")
    with pytest.raises(ScoreInputError, match=message):
        read_labels(tmp_path / "page.json")


def test_a_text_holding_a_unicode_line_separator_stays_one_row(tmp_path):
    # rows end at CR LF, LF or CR: U+2028 and NEL inside a text are characters of it, not row ends
    _png(tmp_path / "a.png")
    (tmp_path / "labels.tsv").write_text("image\ttext\ra.png\t서\u2028울\ra.png\t부\x85산\r", encoding="utf-8")
    assert [c.text for c in read_labels(tmp_path / "labels.tsv")] == ["서\u2028울", "부\x85산"]


@pytest.mark.parametrize("end", ["\r\n", "\r", "\n"])
def test_rows_read_a_line_at_a_time_keep_their_numbers_across_read_buffers(tmp_path, end):
    # iter_labels reads the file in buffers of a few KB: a CR LF split between two of them is one row end
    _png(tmp_path / "a.png")
    texts = ["서울" * (1 + i % 37) + "시" * (i % 5) for i in range(900)]
    body = "".join(f"a.png\t{text}{end}" + ("" if i % 97 else end) for i, text in enumerate(texts))  # blank rows too
    (tmp_path / "labels.tsv").write_bytes(("\ufeffimage\ttext" + end + body).encode())
    lines, number = [], 1
    for i in range(len(texts)):
        number += 1
        lines.append(number)
        number += 0 if i % 97 else 1
    crops = list(iter_labels(tmp_path / "labels.tsv", skipped=[]))
    assert [(c.line, c.text) for c in crops] == list(zip(lines, texts))
    assert [(c.line, c.text) for c in read_labels(tmp_path / "labels.tsv")] == list(zip(lines, texts))


def test_a_bad_byte_past_the_rows_read_so_far_stops_before_any_crop_is_given(tmp_path):
    _png(tmp_path / "a.png")
    rows = "".join(f"a.png\t서울{i}\n" for i in range(5000)).encode()
    (tmp_path / "labels.tsv").write_bytes(b"image\ttext\n" + rows + "a.png\t부산\n".encode("cp949"))
    crops = iter_labels(tmp_path / "labels.tsv", skipped=[])
    with pytest.raises(ScoreInputError, match=r"not UTF-8 text \(invalid start byte at line 5002, byte 83907\)"):
        next(crops)


def test_a_tesseract_that_runs_past_its_time_reads_nothing_and_the_run_goes_on(monkeypatch):
    import subprocess

    from evaluation import tesseract

    def stalls(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], kwargs.get("timeout"))

    monkeypatch.setattr(tesseract.subprocess, "run", stalls)
    with pytest.warns(UserWarning, match="tesseract ran past 120 s"):
        assert tesseract.read_crop_tesseract(np.full((4, 2000), 255, np.uint8)) == ""


def test_boxes_on_a_phone_photo_are_cut_from_the_image_as_it_is_seen(tmp_path):
    # stored 100 wide and 200 high with EXIF orientation 6: seen (and read) 200 wide and 100 high
    seen = Image.new("L", (200, 100), 255)
    seen.paste(0, (120, 30, 190, 60))  # the word, right of x 100: outside the stored frame
    exif = Image.Exif()
    exif[0x0112] = 6
    seen.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    (tmp_path / "gt.json").write_text('{"photo.jpg": {"words": [{"points": [[120, 30], [190, 60]], '
                                      '"transcription": "서울"}]}}', encoding="utf-8")
    import numpy as np

    from evaluation.drawing import draw_crop_readings
    from evaluation.score_crops import load_crop

    [crop] = read_labels(tmp_path / "gt.json", margin=0.0)
    assert crop.box == (120, 30, 190, 60)  # was clipped at the stored width: (120, 30, 100, …) gone
    grey = load_crop(crop, tmp_path / "gt.json")
    assert grey.shape == (30, 70) and grey.mean() < 20  # the black word, not the paper beside it
    drawn = draw_crop_readings(tmp_path / "photo.jpg", "서울", {"m": ("서울", 0.0)}, tmp_path / "w.png",
                               box=crop.box)
    with Image.open(drawn) as picture:  # the worst-crop picture shows the same region
        assert np.asarray(picture.convert("L"))[10:106, 10:200].mean() < 60


def test_a_corrupt_page_image_is_named_before_any_model_runs(tmp_path):
    (tmp_path / "page.png").write_bytes(b"\x89PNG not really")
    labels = tmp_path / "page.json"
    labels.write_text('{"page.png": {"words": [{"points": [[1, 2], [9, 9]], "transcription": "서울"}]}}')
    with pytest.raises(ScoreInputError, match=r"page.json: .*page.png: not a readable image"):
        read_labels(labels)


def test_cli_reads_the_words_of_a_real_road_sign_from_its_boxes(tmp_path, capsys):
    labels = realdata("easyocr", "gt.json")
    assert main(["evaluate-crops", "--labels", str(labels), "--model", "english_g2", "--worst", "2",
                 "--out", str(tmp_path / "out")]) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = [r.split("\t") for r in (tmp_path / "out" / "readings.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    assert [r[1] for r in rows] == ["서울", "평양", "Seoul", "Pyeongyang", "56Km", "205Km"]
    assert all(r[0].startswith(f"{labels.with_name('korean.png')}#") for r in rows)
    # english_g2 spells the Latin names only when each box holds its own word: a shifted or
    # unwidened box cuts letters, and a wrong image or order pairs them with other words
    readings = {gt: text for _, gt, text in rows}
    assert readings["Seoul"] == "Seoul" and readings["Pyeongyang"] == "Pyeongyang"
    assert printed["english_g2"]["n"] == 6
    pictures = sorted((tmp_path / "out").glob("worst_*.png"))
    assert [p.name for p in pictures][0].startswith("worst_01_korean_word") and len(pictures) == 2
    assert Image.open(pictures[0]).width < 629  # the word's region is drawn, not the whole photo


def test_outputs_replace_an_earlier_run_whole_or_not_at_all(tmp_path, monkeypatch):
    import errno

    import evaluation.drawing
    from evaluation.score_crops import write_outputs

    crops = [Crop(_png(tmp_path / f"{i}.png"), t, i + 2) for i, t in enumerate(["가나", "다라", "마바"])]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")

    def run(reading: str, worst: int):
        report = CropReport(crops, {}, {"m": ["가X", "다X", reading]})
        return write_outputs(report, out, worst, {"run": reading})

    first = run("마X", 3)
    assert sorted(p.name for p in out.glob("worst_*.png")) == sorted(p.name for p in first) and len(first) == 3
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real_draw, calls = evaluation.drawing.draw_crop_readings, []

    def disk_fills(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(evaluation.drawing, "draw_crop_readings", disk_fills)
    with pytest.raises(OSError):
        run("마바", 2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the first run, whole; no staging left

    monkeypatch.setattr(evaluation.drawing, "draw_crop_readings", real_draw)
    second = run("마바", 1)
    assert [p.name for p in out.glob("worst_*.png")] == [p.name for p in second]  # none of the first run's
    assert json.loads((out / "scores.json").read_text(encoding="utf-8")) == {"run": "마바"}
    assert (out / "readings.tsv").read_text(encoding="utf-8").splitlines()[-1].endswith("마바\t마바")
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", "readings.tsv", "confusions.json",
                                                           "scores.json", second[0].name])


def test_readings_name_images_relative_to_themselves_and_read_back_as_labels(tmp_path, monkeypatch, capsys):
    # was: readings.tsv named each image as the working folder saw it (mine/a.png), while --labels reads
    # a TSV's image paths relative to the TSV: given back as --labels it failed "image ../ev/mine/a.png not found"
    (tmp_path / "run" / "mine").mkdir(parents=True)
    Image.new("L", (80, 24), 255).save(tmp_path / "run" / "mine" / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "run" / "mine" / "labels.tsv").write_text(f"image\ttext\na.png\t서울\n{tmp_path / 'b.png'}\t부산\n",
                                                          encoding="utf-8")
    monkeypatch.chdir(tmp_path / "run")
    assert main(["evaluate-crops", "--labels", "mine/labels.tsv", "--out", "ev/crops"]) == 0
    first = json.loads(capsys.readouterr().out)
    rows = [r.split("\t") for r in Path("ev/crops/readings.tsv").read_text(encoding="utf-8").splitlines()]
    assert [r[:2] for r in rows] == [["image", "text"], ["../../mine/a.png", "서울"], [str(tmp_path / "b.png"), "부산"]]
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")  # another working folder: the paths are the file's, not the caller's
    assert [c.image.resolve() for c in read_labels("../run/ev/crops/readings.tsv")] == [
        (tmp_path / "run" / "mine" / "a.png").resolve(), (tmp_path / "b.png").resolve()]
    assert main(["evaluate-crops", "--labels", "../run/ev/crops/readings.tsv"]) == 0
    assert json.loads(capsys.readouterr().out) == first


@pytest.mark.parametrize("argv, scored, note", [
    (["--model", "a.pt", "--model", "b.pt"], ["a.pt", "b.pt"], ""),  # argparse kept the last --model only
    (["--model", "a.pt", "b.pt", "--model", "c.pt"], ["a.pt", "b.pt", "c.pt"], ""),
    ([], ["english_g2"], ""),
    (["--model", "a.pt", "--model", "a.pt", "--baseline", "tesseract"], ["a.pt", "tesseract"], "a.pt given more"),
])
def test_repeated_model_options_all_score_and_a_repeat_is_scored_once(tmp_path, capsys, monkeypatch, argv,
                                                                        scored, note):
    from evaluation import score_crops as module

    _png(tmp_path / "a.png")
    (tmp_path / "labels.tsv").write_text("image\ttext\na.png\t서울\n", encoding="utf-8")
    seen = []

    def fake(crops, models, **kwargs):
        seen.append(list(models))
        return module.CropReport(crops, {m: {"n": 1} for m in models}, {m: ["x"] for m in models})

    monkeypatch.setattr(module, "score_crops", fake)
    assert main(["evaluate-crops", "--labels", str(tmp_path / "labels.tsv"), *argv]) == 0
    assert seen == [scored]
    err = capsys.readouterr().err
    assert (note in err) if note else "given more than once" not in err


@pytest.mark.parametrize("text", ["서\t울", "서\n울", "서\r울"])  # inner: outer whitespace is stripped
def test_a_tab_or_line_break_in_a_page_json_word_is_refused_before_any_model_runs(tmp_path, capsys, monkeypatch,
                                                                                  text):
    from evaluation import score_crops as module

    _png(tmp_path / "page.png", (200, 100))
    labels = _page_json(tmp_path / "page.json", "page.png", (200, 100), [(20, 30, 60, 20, "부산"),
                                                                          (100, 30, 60, 20, text)])
    with pytest.raises(ScoreInputError, match=r"page.json: page.png word 2: transcription .* holds a tab or line"):
        read_labels(labels)
    monkeypatch.setattr(module, "make_crop_engine", lambda *a, **k: pytest.fail("a model ran first"))
    assert main(["evaluate-crops", "--labels", str(labels), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "page.png word 2" in err and "Traceback" not in err


def test_a_utf16_labels_file_without_a_bom_is_named_as_not_utf8(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "labels.tsv").write_bytes("image\ttext\na.png\tA-3\n".encode("utf-16-le"))
    with pytest.raises(ScoreInputError, match=r"labels\.tsv: not UTF-8 text \(NUL character at byte 1"):
        read_labels(tmp_path / "labels.tsv")


def test_crop_images_are_found_as_prepare_matches_names(tmp_path):
    # a crop stored NFD (a macOS zip), named NFC in the TSV; a Windows path with backslashes; X.JPG
    # on disk for the TSV's x.jpg: each was "image ... not found", naming the file ls lists
    (tmp_path / "이미지").mkdir()
    stored = _png(tmp_path / "이미지" / unicodedata.normalize("NFD", "서울.PNG"))
    windows = _png(tmp_path / "이미지" / "민원.JPG")
    (tmp_path / "labels.tsv").write_text(f"image\ttext\n{unicodedata.normalize('NFC', '이미지/서울.PNG')}\t서울\n"
                                         "이미지\\민원.jpg\t민원\n", encoding="utf-8")
    assert [(c.image, c.text) for c in read_labels(tmp_path / "labels.tsv")] == [(stored, "서울"), (windows, "민원")]
    # the exact name wins over one that differs only in case; two that fit only so are refused, both named
    exact = _png(tmp_path / "이미지" / "민원.jpg")
    assert [c.image for c in read_labels(tmp_path / "labels.tsv")] == [stored, exact]
    (tmp_path / "labels.tsv").write_text("image\ttext\n이미지/민원.Jpg\t민원\n", encoding="utf-8")
    with pytest.raises(ScoreInputError, match=r"labels.tsv:2: .*민원\.JPG and .*민원\.jpg: file names that differ "
                                              r"only in Unicode normalisation \(NFC/NFD\) or case both fit"):
        read_labels(tmp_path / "labels.tsv")
    skipped: list[tuple[str, str]] = []
    assert read_labels(tmp_path / "labels.tsv", skipped=skipped) == [] and [r for r, _ in skipped] == ["image_ambiguous"]


def test_a_page_json_finds_its_image_as_prepare_pairs_it(tmp_path):
    # X.JPG on disk beside a page JSON that says X.jpg: prepare pairs them; evaluate-crops said
    # "not found" (import-crops: "no crop left to import (image_unreadable 1)")
    Image.new("L", (200, 100), 255).save(tmp_path / "X.JPG", "JPEG")
    labels = _page_json(tmp_path / "X.json", "X.jpg", (200, 100), [(20, 30, 60, 20, "서울")])
    assert [(c.image, c.text) for c in read_labels(labels)] == [(tmp_path / "X.JPG", "서울")]
    skipped: list[tuple[str, str]] = []  # a missing image is image_missing, not image_unreadable
    gone = _page_json(tmp_path / "gone.json", "gone.jpg", (200, 100), [(20, 30, 60, 20, "서울")])
    assert read_labels(gone, skipped=skipped) == []
    assert skipped == [("image_missing", f"{gone}: image {tmp_path / 'gone.jpg'} not found")]


def test_a_page_json_falls_back_to_the_image_of_its_stem_as_prepare_does(tmp_path):
    # X.json naming X.jpg beside X.PNG (an 023-style "type" saying jpg, a scan converted to PNG): prepare
    # pairs them by the label's stem; evaluate-crops and import-crops said "image X.jpg not found"
    Image.new("L", (200, 100), 255).save(tmp_path / "X.PNG")
    labels = _page_json(tmp_path / "X.json", "X.jpg", (200, 100), [(20, 30, 60, 20, "서울")])
    assert [(c.image, c.text) for c in read_labels(labels)] == [(tmp_path / "X.PNG", "서울")]
    Image.new("L", (200, 100), 255).save(tmp_path / "named.png")  # the image it names wins over its stem's
    other = _page_json(tmp_path / "X2.json", "named.png", (200, 100), [(20, 30, 60, 20, "서울")])
    Image.new("L", (200, 100), 255).save(tmp_path / "X2.jpg")
    assert [c.image for c in read_labels(other)] == [tmp_path / "named.png"]
    for suffix in (".png", ".tif"):  # two images of its stem: which one is a guess
        Image.new("L", (200, 100), 255).save(tmp_path / f"Y{suffix}")
    two = _page_json(tmp_path / "Y.json", "Y.jpg", (200, 100), [(20, 30, 60, 20, "서울")])
    skipped: list[tuple[str, str]] = []
    assert read_labels(two, skipped=skipped) == [] and [r for r, _ in skipped] == ["image_ambiguous"]
    with pytest.raises(ScoreInputError, match=r"Y\.png and .*Y\.tif: Y\.json names Y\.jpg, which is not there"):
        read_labels(two)


def test_csv_quoting_is_undone_only_where_a_csv_writer_put_it(tmp_path):
    # a spreadsheet or pandas writes 민원 "서류" as "민원 ""서류""" (and old export-crops wrote the label
    # "이낙연" as """이낙연"""): was read with the quotes as part of the label
    _png(tmp_path / "a.png")
    rows = ['"민원 ""서류"""', '"""이낙연"""', '"허가"', '주목 "마라톤"', '"흘러', '5"', '"a"b"']
    (tmp_path / "labels.tsv").write_text("image\ttext\n" + "".join(f"a.png\t{r}\n" for r in rows), encoding="utf-8")
    assert [c.text for c in read_labels(tmp_path / "labels.tsv")] == [
        '민원 "서류"', '"이낙연"',
        '"허가"', '주목 "마라톤"', '"흘러', '5"', '"a"b"']  # a label's own quotes stay: no CSV writer writes these
    # a quote-all export (LibreOffice "quote all text cells", csv.QUOTE_ALL): the header says so
    (tmp_path / "all.tsv").write_text('"image"\t"text"\n"a.png"\t"허가"\n"a.png"\t" 민원 ""서류"" "\n',
                                      encoding="utf-8")
    assert [(c.image, c.text) for c in read_labels(tmp_path / "all.tsv")] == [
        (tmp_path / "a.png", "허가"), (tmp_path / "a.png", '민원 "서류"')]


def test_tsv_row_writes_every_label_so_it_reads_back_exactly(tmp_path):
    from evaluation.score_crops import tsv_row

    _png(tmp_path / "a.png")
    labels = ['"이낙연"', '"a""b"', '""', '"', '"x"""', 'say "hi"', "서울"]
    with (tmp_path / "labels.tsv").open("w", encoding="utf-8", newline="") as fh:
        fh.write(tsv_row(["image", "text"], "labels.tsv"))
        fh.writelines(tsv_row(["a.png", label], "labels.tsv") for label in labels)
    assert [c.text for c in read_labels(tmp_path / "labels.tsv")] == labels
    assert tsv_row(["a.png", '"이낙연"'], "x") == 'a.png\t"이낙연"\n'  # written as it is: nothing to mistake


def test_tsv_row_fields_with_outer_whitespace_read_back_exactly(tmp_path):
    """Was: tsv_row wrote a field with outer whitespace as it was and read_labels stripped it before
    undoing CSV quoting, so the file `` b.png`` was "not found" and the label ``"a""b" `` read as ``a"b``."""
    from evaluation.score_crops import tsv_field, tsv_row

    _png(tmp_path / " b.png")
    labels = ['"a""b" ', ' "x""y"', " 서울 ", "\u3000허가"]  # a text's own outer whitespace goes (NFC labels are stripped)
    with (tmp_path / "labels.tsv").open("w", encoding="utf-8", newline="") as fh:
        fh.write(tsv_row(["image", "text"], "labels.tsv"))
        fh.writelines(tsv_row([" b.png", label], "labels.tsv") for label in labels)
    crops = read_labels(tmp_path / "labels.tsv")
    assert [(c.image.name, c.text) for c in crops] == [(" b.png", label.strip()) for label in labels]
    for value in [*labels, " ", "x\u00a0", '"" ', '"허가"', '"a""b"', "서울"]:  # each field, byte for byte
        written = tsv_row(["a.png", value], "x").rstrip("\n").split("\t")[1]
        assert tsv_field(written.strip()) == value


def test_a_labels_file_lists_its_image_folder_once_not_once_per_row(tmp_path, folder_listings):
    # every row named NFC, every file stored NFD (a macOS zip): find_file listed the folder for each row,
    # N rows x N files name comparisons (4,000 crops: 40 s; 50,000: hours)
    names = [f"서울{i:03d}.png" for i in range(30)]
    for name in names:
        _png(tmp_path / unicodedata.normalize("NFD", name))
    (tmp_path / "labels.tsv").write_text("image\ttext\n" + "".join(f"{n}\t서울\n" for n in names)
                                         + "gone.png\t서울\n", encoding="utf-8")
    listed = folder_listings
    skipped: list[tuple[str, str]] = []
    assert len(read_labels(tmp_path / "labels.tsv", skipped=skipped)) == 30 and [r for r, _ in skipped] == ["image_missing"]
    assert listed == [tmp_path]  # was: 31 times


def test_the_progress_bar_counts_a_crop_once_every_engine_has_read_it(tmp_path, monkeypatch):
    # Tesseract reads crops in batches: the bar must not reach the end while its last batch is still unread
    import evaluation.score_crops as module

    for i in range(5):
        Image.fromarray(np.full((20, 40), 200, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "labels.tsv").write_text("image\ttext\n" + "".join(f"{i}.png\tx{i}\n" for i in range(5)),
                                         encoding="utf-8")
    bars = []

    class Bar(module.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    class Batched:
        def read_many(self, greys):
            done.append(bars[0].n)  # crops the bar shows read when this batch is read
            return ["x"] * len(greys)

    done: list[int] = []
    monkeypatch.setattr(module, "tqdm", Bar)
    monkeypatch.setattr(module, "BATCH", 2)
    monkeypatch.setattr(module, "make_crop_engine", lambda spec, device="cpu": Batched())
    report = module.score_crops(read_labels(tmp_path / "labels.tsv"), {"tesseract": "tesseract"}, progress=True)
    assert report.readings["tesseract"] == ["x"] * 5
    assert done == [0, 2, 4] and bars[0].n == 5


@pytest.mark.parametrize("schema", ["points", "page"])
def test_a_transcription_ending_in_a_line_break_or_tab_is_stripped_not_refused(tmp_path, schema):
    # outer whitespace is stripped from every label (docs/data.md "Label text"); prepare and evaluate read
    # the same page JSON so, while evaluate-crops refused it as holding a tab or line break
    _png(tmp_path / "page.png", (200, 100))
    nfd = unicodedata.normalize("NFD", "서울")
    if schema == "points":
        content = {"page.png": {"words": [{"points": [[1, 2], [50, 30]], "transcription": f" {nfd}\n"},
                                          {"points": [[60, 2], [120, 30]], "transcription": "부산\t"}]}}
    else:
        content = {"images": [{"image.file.name": "page.png", "image.width": 200, "image.height": 100}],
                   "annotations": [{"annotation.text": f" {nfd}\r\n", "annotation.bbox": [1, 2, 49, 28]},
                                   {"annotation.text": "부산\t", "annotation.bbox": [60, 2, 60, 28]}]}
    (tmp_path / "page.json").write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    assert [c.text for c in read_labels(tmp_path / "page.json")] == ["서울", "부산"]


def test_a_page_json_with_boxes_on_a_phone_photos_stored_pixels_is_left_out_as_prepare_leaves_it(tmp_path):
    # stored 60 wide and 120 high, EXIF orientation 6: seen 120 wide and 60 high; one label gives the
    # upright size and boxes, the other the stored size and boxes on the sideways pixels (a tool that
    # ignores EXIF). Was: the stored-frame boxes were cut from the upright image: one word 'outside the
    # image' (bad_box), the other scored on paper
    from evaluation.score_crops import load_crop, read_box_labels
    from training.data.pages import Page, Word, write_page

    upright = np.full((60, 120), 255, np.uint8)
    upright[20:40, 10:50] = 0
    upright[5:15, 60:110] = 0
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(upright).copy()).save(tmp_path / "p.jpg", quality=100, exif=exif.tobytes())
    write_page(Page("p.jpg", 120, 60, [Word((10.0, 20.0, 40.0, 20.0), "서울"), Word((60.0, 5.0, 50.0, 10.0), "평양")]),
               tmp_path / "upright.json")
    write_page(Page("p.jpg", 60, 120, [Word((20.0, 70.0, 20.0, 40.0), "서울"), Word((5.0, 10.0, 10.0, 50.0), "평양")]),
               tmp_path / "stored.json")
    crops = read_box_labels(tmp_path / "upright.json", margin=0.0)
    assert [load_crop(c).mean() < 20 for c in crops] == [True, True]  # the black words
    skipped: list = []
    assert read_box_labels(tmp_path / "stored.json", margin=0.0, skipped=skipped) == []
    assert [reason for reason, _ in skipped] == ["boxes_before_exif_turn"]
    assert "orientation 6" in skipped[0][1] and "stored.json: p.jpg: " in skipped[0][1]
