"""`kocr evaluate-pages`: order-free character F1 and line-matched CER by hand, then a real page."""

from __future__ import annotations

import json
import shutil
import unicodedata

import pytest

from evaluation.score_crops import ScoreInputError
from evaluation.score_pages import (
    CharCounts,
    char_counts,
    find_pages,
    group_lines,
    line_cer_counts,
)
from kocr.cli import main
from tests.conftest import realdata
from training.data.pages import Word


def test_char_counts_are_a_multiset_overlap_ignoring_order_and_spaces():
    # gt {가, 나, 다}; pred {가 ×2, 다, 라}: the second 가 and 라 are extra, 나 is missed
    c = char_counts("가나 다", "가가다라")
    assert c == CharCounts(tp=2, gt=3, pred=4)
    assert (c.precision, c.recall) == (0.5, 2 / 3) and c.f1 == pytest.approx(4 / 7)
    assert char_counts("서울 시청", "청시\n울서") == CharCounts(4, 4, 4)  # any order, any spacing
    assert char_counts(unicodedata.normalize("NFD", "한글"), "한글") == CharCounts(2, 2, 2)
    assert char_counts("가", "").f1 == 0.0 and char_counts("", "").precision == 0.0
    assert char_counts("ab", "ab") + char_counts("cd", "cx") == CharCounts(3, 4, 4)  # pages sum (micro)


def test_line_cer_matches_lines_optimally_not_greedily():
    # distances: abcd-abce 1, abcd-abcdzz 2, abxy-abce 2, abxy-abcdzz 4 (= unmatched).
    # Greedy (cheapest pair first) takes abcd-abce, then abxy pays 4: 5 edits. Optimal: 2 + 2.
    assert line_cer_counts(["abcd", "abxy"], ["abce", "abcdzz"]) == (4, 8)


def test_line_cer_ignores_order_and_spacing_and_charges_missing_lines_in_full():
    assert line_cer_counts(["서울 시청", "부산역"], ["부산억", "서울시청", "잡음"]) == (1, 7)  # extra line free
    assert line_cer_counts(["서울 시청", "부산역", ""], ["서울 시청"]) == (3, 7)  # 부산역 missed: 3
    assert line_cer_counts(["가나다"], ["xyz"]) == (3, 3)  # a match worse than none counts as none
    assert line_cer_counts([], ["잡음"]) == (0, 0)


def test_group_lines_orders_words_into_lines_by_vertical_overlap():
    words = [Word((120, 14, 40, 20), "시청"), Word((10, 60, 60, 22), "부산역"), Word((10, 10, 50, 20), "서울"),
             Word((80, 66, 30, 20), "앞"), Word((10, 34, 40, 8), " "), Word((200, 25, 30, 20), "x")]
    # "x" overlaps the first line by 9 px, less than half its 20 px: its own line, placed by its top
    assert group_lines(words) == ["서울 시청", "x", "부산역 앞"]


def test_find_pages_needs_a_text_per_image(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "txt").mkdir()
    (tmp_path / "img" / "p1.png").write_bytes(b"")
    (tmp_path / "img" / "notes.md").write_text("not an image")
    with pytest.raises(ScoreInputError, match="p1.png: no ground truth .*p1.txt"):
        find_pages(tmp_path / "img", tmp_path / "txt")
    (tmp_path / "txt" / "p1.txt").write_bytes("서울\n".encode("cp949"))
    with pytest.raises(ScoreInputError, match="p1.txt: not UTF-8"):
        find_pages(tmp_path / "img", tmp_path / "txt")
    (tmp_path / "txt" / "p1.txt").write_text(" 서울 \n\n시청\n", encoding="utf-8")
    (item,) = find_pages(tmp_path / "img", tmp_path / "txt")
    assert item.lines == ["서울", "시청"]
    (tmp_path / "txt" / "p1.txt").write_text(" \n\n", encoding="utf-8")  # would score 0 and drag the set down
    with pytest.raises(ScoreInputError, match="p1.txt: no ground-truth text for p1.png"):
        find_pages(tmp_path / "img", tmp_path / "txt")
    with pytest.raises(ScoreInputError, match="missing: image folder not found"):
        find_pages(tmp_path / "missing", tmp_path / "txt")
    # was "…p1.png: image folder not found" for a page given as --images: it is there, and it is a file
    with pytest.raises(ScoreInputError, match=r"p1.png: a file, not a folder \(--images takes the image folder\)$"):
        find_pages(tmp_path / "img" / "p1.png", tmp_path / "txt")
    with pytest.raises(ScoreInputError, match=r"p1.txt: a file, not a folder \(--text takes the text folder\)$"):
        find_pages(tmp_path / "img", tmp_path / "txt" / "p1.txt")


def test_cli_reads_a_real_page_end_to_end(tmp_path, capsys):
    from evaluation.tesseract import tesseract_available

    image, text = realdata("paddleocr", "korean_1.jpg"), realdata("paddleocr", "korean_1.txt")
    (tmp_path / "images").mkdir()
    (tmp_path / "text").mkdir()
    shutil.copy(image, tmp_path / "images")
    shutil.copy(text, tmp_path / "text")
    baseline = ["--baseline", "tesseract"] if tesseract_available() else []
    assert main(["evaluate-pages", "--images", str(tmp_path / "images"), "--text", str(tmp_path / "text"),
                 "--model", "english_g2", *baseline, "--out", str(tmp_path / "out")]) == 0
    printed = json.loads(capsys.readouterr().out)
    lines = [ln for ln in text.read_text(encoding="utf-8").splitlines() if ln.strip()]
    base = printed["english_g2"]
    assert base["pages"] == 1 and base["gt_lines"] == len(lines)
    assert base["gt_chars"] == sum(len("".join(ln.split())) for ln in lines)
    assert base["pred_lines"] > 0 and base["pred_chars"] > 0  # CRAFT found the handwriting
    # english_g2 cannot emit Hangul and the page is all Hangul: nothing it reads can count
    assert base["char_recall"] == 0.0 and base["line_cer"] == 1.0
    per_page = json.loads((tmp_path / "out" / "scores.json").read_text(encoding="utf-8"))["english_g2"]["per_page"]
    assert len(per_page) == 1 and len(per_page[0]["lines"]) == base["pred_lines"]
    if baseline:
        tess = printed["tesseract"]
        assert tess["char_f1"] > 0.5 and tess["line_cer"] < 0.5  # printed-like handwriting: Tesseract reads most


def test_cli_error_names_the_missing_text(tmp_path, capsys):
    (tmp_path / "p.jpg").write_bytes(b"")
    assert main(["evaluate-pages", "--images", str(tmp_path), "--text", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "p.jpg: no ground truth" in err and "p.txt" in err


@pytest.mark.parametrize("content, why", [(b"", "the file is empty"), (b"\xff\xd8\xff" + bytes(range(256)) * 4, "corrupt, or not an image"),
                                          (b"x", "corrupt, or not an image")])  # one byte: a struct.error inside
def test_cli_names_an_unreadable_page_image_and_why(tmp_path, capsys, content, why):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "p.jpg").write_bytes(content)
    (tmp_path / "p.txt").write_text("서울\n", encoding="utf-8")
    assert main(["evaluate-pages", "--images", str(tmp_path / "img"), "--text", str(tmp_path), "--model", "english_g2"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path / 'img' / 'p.jpg'}: not a readable image ({why}" in err.splitlines()[-1]  # after the progress bar
    assert "Traceback" not in err and "pip install" not in err


def test_cli_refuses_an_out_that_cannot_be_a_folder_before_reading(tmp_path, capsys, monkeypatch):
    from evaluation import score_pages

    (tmp_path / "p.jpg").write_bytes(b"")
    (tmp_path / "p.txt").write_text("서울\n", encoding="utf-8")
    (tmp_path / "taken").write_text("a file")
    monkeypatch.setattr(score_pages, "score_pages", lambda *a, **k: pytest.fail("read before --out was checked"))
    assert main(["evaluate-pages", "--images", str(tmp_path), "--text", str(tmp_path),
                 "--out", str(tmp_path / "taken")]) == 2
    assert f"--out {tmp_path / 'taken'}: cannot be made a folder" in capsys.readouterr().err


def test_two_images_of_one_stem_are_refused_not_scored_twice(tmp_path):
    for name in ("scan.jpg", "scan.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "scan.txt").write_text("서울\n", encoding="utf-8")
    with pytest.raises(ScoreInputError, match=r"scan\.jpg and .*scan\.png: two images of one stem .*scan\.txt"):
        find_pages(tmp_path, tmp_path)


def test_images_whose_stems_differ_only_in_case_are_one_stem(tmp_path):
    # Scan.jpg beside scan.png: on a Windows or macOS disk Scan.txt and scan.txt are one file, so
    # both images would be scored against it; where they are two files, which is whose is a guess
    for name in ("Scan.jpg", "scan.png"):
        (tmp_path / name).write_bytes(b"")
    for name in ("Scan.txt", "scan.txt"):
        (tmp_path / name).write_text("서울\n", encoding="utf-8")
    with pytest.raises(ScoreInputError, match=r"Scan\.jpg and .*scan\.png: two images of one stem \(names that "
                                              r"differ only in case .*Scan\.txt or .*scan\.txt"):
        find_pages(tmp_path, tmp_path)
    (tmp_path / "Scan.txt").unlink()  # one text: still refused, naming both images, not "no ground truth"
    with pytest.raises(ScoreInputError, match=r"Scan\.jpg and .*scan\.png: two images of one stem"):
        find_pages(tmp_path, tmp_path)
    # one image whose text differs in case only from another .txt: that .txt is left out, as before
    (tmp_path / "scan.png").unlink()
    (tmp_path / "SCAN.txt").write_text("서울\n", encoding="utf-8")
    (tmp_path / "Scan.txt").write_text("서울\n", encoding="utf-8")
    skipped = []
    assert [(i.image.name, i.text_file.name) for i in find_pages(tmp_path, tmp_path, skipped)] == [
        ("Scan.jpg", "Scan.txt")]
    assert sorted(skipped) == [("no_image", str(tmp_path / n)) for n in ("SCAN.txt", "scan.txt")]


def test_files_left_out_of_the_set_are_named_on_stderr(tmp_path, capsys, monkeypatch):
    from evaluation import score_pages

    (tmp_path / "img").mkdir()
    (tmp_path / "txt").mkdir()
    (tmp_path / "img" / "p1.png").write_bytes(b"")
    for name in ("p2.gif", "p3.heic"):  # pages of a type not read: their .txt is there, unused
        (tmp_path / "img" / name).write_bytes(b"GIF89a")
    for stem in ("p1", "p2", "p3", "p4"):
        (tmp_path / "txt" / f"{stem}.txt").write_text("서울\n", encoding="utf-8")
    skipped = []
    assert [i.image.name for i in find_pages(tmp_path / "img", tmp_path / "txt", skipped)] == ["p1.png"]
    assert sorted(skipped) == [("no_image", str(tmp_path / "txt" / f"{s}.txt")) for s in ("p2", "p3", "p4")] + [
        ("not_a_page_image", str(tmp_path / "img" / n)) for n in ("p2.gif", "p3.heic")]
    monkeypatch.setattr(score_pages, "score_pages", lambda items, models, settings: {
        m: {"pages": len(items)} for m in models})
    assert main(["evaluate-pages", "--images", str(tmp_path / "img"), "--text", str(tmp_path / "txt")]) == 0
    err = capsys.readouterr().err
    assert "note: not scored: 3 ground-truth .txt with no image" in err and "2 not a page image" in err
    assert "p3.heic" in err and "p1.txt" not in err
    # one folder for both: the page's own .txt is ground truth, not a stray file
    (tmp_path / "both").mkdir()
    (tmp_path / "both" / "a.png").write_bytes(b"")
    (tmp_path / "both" / "a.txt").write_text("서울\n", encoding="utf-8")
    skipped = []
    find_pages(tmp_path / "both", tmp_path / "both", skipped)
    assert skipped == []


def test_hidden_and_system_files_are_not_pages(tmp_path):
    # a folder copied from a Mac to a USB stick: ._scan.jpg is AppleDouble metadata, not a page
    (tmp_path / "scan.jpg").write_bytes(b"")
    (tmp_path / "scan.txt").write_text("서울\n", encoding="utf-8")
    for name in ("._scan.jpg", ".hidden.png", "Thumbs.db", ".DS_Store", "._scan.txt"):
        (tmp_path / name).write_bytes(b"\x00\x05\x16\x07")
    skipped = []
    assert [i.image.name for i in find_pages(tmp_path, tmp_path, skipped)] == ["scan.jpg"]
    assert skipped == []  # skipped as prepare skips them, not counted as pages left out


def test_utf16_ground_truth_without_a_bom_is_not_taken_as_text(tmp_path):
    # Notepad's "Unicode" without BOM: Latin text decodes as valid UTF-8 with a NUL after every letter
    (tmp_path / "p.png").write_bytes(b"")
    (tmp_path / "p.txt").write_bytes("SEOUL 2024\nA-3\n".encode("utf-16-le"))
    with pytest.raises(ScoreInputError, match=r"p\.txt: not UTF-8 text \(NUL character at byte 1; UTF-16"):
        find_pages(tmp_path, tmp_path)


def test_ground_truth_lines_end_at_lf_or_cr_only_and_other_breaks_are_spaces_within(tmp_path):
    # str.splitlines also cut at U+2028, U+0085, a form feed, …: one text line became two ground-truth lines,
    # each scored alone, so a page read perfectly as one line lost half its characters in line_cer
    (tmp_path / "p.png").write_bytes(b"")
    (tmp_path / "p.txt").write_bytes("서울\u2028시청\r\n부산\x0c광역시\r인천\n대구\x85중구\u2029\n".encode())
    with pytest.warns(UserWarning, match=r"p\.txt: 3 lines \(lines 1, 2, 4\) hold a line or page break .*"
                                         r"U\+000C, U\+0085, U\+2028, U\+2029"):
        [item] = find_pages(tmp_path, tmp_path)
    assert item.lines == ["서울 시청", "부산 광역시", "인천", "대구 중구"]
    edits, chars = line_cer_counts(item.lines, ["서울시청", "부산광역시", "인천", "대구중구"])
    assert (edits, chars) == (0, 15)
    assert char_counts("".join(item.lines), "서울시청부산광역시인천대구중구").f1 == 1.0


def test_scores_into_an_evaluate_crops_folder_replace_that_runs_files(tmp_path, capsys, monkeypatch):
    from evaluation import score_pages

    (tmp_path / "p.png").write_bytes(b"")
    (tmp_path / "p.txt").write_text("서울\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("readings.tsv", "confusions.json", "worst_01_sign.png", "scores.json", "my_notes.txt"):
        (out / name).write_text("an evaluate-crops run's" if name != "my_notes.txt" else "the user's")
    monkeypatch.setattr(score_pages, "score_pages", lambda items, models, settings: {
        m: {"pages": len(items), "per_page": []} for m in models})
    assert main(["evaluate-pages", "--images", str(tmp_path), "--text", str(tmp_path), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["my_notes.txt", "scores.json"]
    assert json.loads((out / "scores.json").read_text(encoding="utf-8")) == {"english_g2": {"pages": 1, "per_page": []}}


def test_ground_truth_is_found_as_prepare_matches_names(tmp_path):
    # 민원서류.jpg from a macOS zip (NFD) beside 민원서류.txt typed on Windows (NFC): was "no ground
    # truth <the very file ls lists>"; SCAN.TXT for scan.png likewise
    nfd, nfc_ = unicodedata.normalize("NFD", "민원서류"), unicodedata.normalize("NFC", "민원서류")
    (tmp_path / f"{nfd}.jpg").write_bytes(b"")
    (tmp_path / f"{nfc_}.txt").write_text("민원\n", encoding="utf-8")
    (tmp_path / "scan.png").write_bytes(b"")
    (tmp_path / "SCAN.TXT").write_text("서울\n", encoding="utf-8")
    skipped = []
    found = find_pages(tmp_path, tmp_path, skipped)
    assert sorted((i.image.name, i.text_file.name, i.lines) for i in found) == sorted([
        (f"{nfd}.jpg", f"{nfc_}.txt", ["민원"]), ("scan.png", "SCAN.TXT", ["서울"])])
    assert skipped == []  # the matched texts are not "no_image"
    # the exact name wins; two texts that fit only by NFC/NFD or case are refused, naming both
    (tmp_path / "scan.txt").write_text("exact\n", encoding="utf-8")
    assert [i.lines for i in find_pages(tmp_path, tmp_path) if i.image.name == "scan.png"] == [["exact"]]
    half = unicodedata.normalize("NFD", "민") + "원서류"  # neither the image's NFD nor NFC
    (tmp_path / f"{half}.txt").write_text("민원\n", encoding="utf-8")
    first, second = sorted([f"{nfc_}.txt", f"{half}.txt"])
    with pytest.raises(ScoreInputError, match=rf"{nfd}\.jpg: ground truth: .*{first} and .*{second}: file "
                                              r"names that differ only in Unicode normalisation"):
        find_pages(tmp_path, tmp_path)
    # two images whose stems differ only in NFC/NFD are one stem, as names that differ in case are
    (tmp_path / f"{nfc_}.png").write_bytes(b"")
    with pytest.raises(ScoreInputError, match="two images of one stem"):
        find_pages(tmp_path, tmp_path)


def test_the_text_folder_is_listed_once_not_once_per_page(tmp_path, folder_listings):
    # pages from a macOS zip (NFD) beside texts typed on Windows (NFC): find_file listed the folder for each
    for i in range(20):
        (tmp_path / unicodedata.normalize("NFD", f"민원{i:02d}.jpg")).write_bytes(b"")
        (tmp_path / f"민원{i:02d}.txt").write_text("민원\n", encoding="utf-8")
    listed = folder_listings
    assert len(find_pages(tmp_path, tmp_path)) == 20
    assert listed == [tmp_path]  # was: 20 times
