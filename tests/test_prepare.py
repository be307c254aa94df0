"""The prepare stage on generated pages with planted defects: report, splits, LMDB contents, images."""

from __future__ import annotations

import json
import signal
import shutil
import unicodedata
import zlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from training.charset import Charset
from training.data.lmdb_store import LmdbDataset
from training.data.pages import Page, Word, read_page, write_page
from training.data.prepare import PrepareConfig, load_grey, prepare_pages, split_documents
from training.data.synth_pages import generate_pages

FONTS = ["NanumGothic.ttf", "NanumPen.ttf"]
W, H = 480, 360
KOREAN = Charset.named("korean_g2")

NFC_WORD = "갈대밭길"                 # planted in NFD form
PROBE = ("검사용단어", (100.0, 200.0, 80.0, 30.0))   # a normal box whose crop we measure
NEGATIVE = ("음수좌표", (-5.0, -3.0, 60.0, 20.0))
OUTSIDE = ("바깥상자", (600.0, 400.0, 20.0, 10.0))     # wholly past the 480x360 image
HANJA = ("漢", (200.0, 100.0, 30.0, 30.0))
CLIPPED = ("오른쪽끝", (440.0, 200.0, 80.0, 25.0))     # runs past the right edge: clipped and kept
SPLIT_NAMES = ("train", "val", "test")


def _crop_rect(bbox, margin, width, height):
    """Expected crop: the box grown by margin x height on every side, clamped to the image."""
    x, y, w, h = bbox
    m = margin * h
    x0, y0 = max(0, round(x - m)), max(0, round(y - m))
    x1, y1 = min(width, round(x + w + m)), min(height, round(y + h + m))
    return x0, y0, x1, y1


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    generate_pages(root, count=6, seed=21, fonts=FONTS, width=W, height=H, font_size=(14, 22), progress=False)
    texts = {w.text for p in root.glob("page_*.json") for w in read_page(p).words}
    assert not texts & {NFC_WORD, PROBE[0], NEGATIVE[0], OUTSIDE[0], HANJA[0], CLIPPED[0]}

    # a page carrying every word-level defect, drawn on a copy of a generated image
    page = read_page(root / "page_00000.json")
    shutil.copy(root / "page_00000.jpg", root / "defects.jpg")
    page.image_name = "defects.jpg"
    page.words = [
        Word(PROBE[1], PROBE[0]),
        Word((300.0, 40.0, 90.0, 25.0), unicodedata.normalize("NFD", NFC_WORD)),
        Word((20.0, 300.0, 40.0, 20.0), "   "),
        Word(NEGATIVE[1], NEGATIVE[0]),
        Word(OUTSIDE[1], OUTSIDE[0]),
        Word(HANJA[1], HANJA[0]),
        Word(CLIPPED[1], CLIPPED[0]),
    ]
    write_page(page, root / "defects.json")

    # page-level defects
    text = (root / "page_00001.json").read_text(encoding="utf-8")
    (root / "broken.json").write_text(text[: len(text) // 2], encoding="utf-8")
    corrupt = read_page(root / "page_00002.json")
    corrupt.image_name = "corrupt.jpg"
    write_page(corrupt, root / "corrupt.json")
    (root / "corrupt.jpg").write_bytes((root / "page_00002.jpg").read_bytes()[:40])
    orphan = read_page(root / "page_00003.json")
    orphan.image_name = "orphan.jpg"
    write_page(orphan, root / "orphan.json")
    (root / "notes.txt").write_text("scanned on the 3rd floor", encoding="utf-8")
    (root / "empty_folder").mkdir()
    return root


def _run(src: Path, out: Path, **overrides):
    return prepare_pages(src, out, PrepareConfig(**overrides), progress=False)


@pytest.fixture(scope="module")
def dropped(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared_drop")
    return out, _run(src, out)


def _lmdb_items(out: Path) -> list[tuple[str, str, np.ndarray]]:
    items = []
    for split in SPLIT_NAMES:
        ds = LmdbDataset(out / split)
        items += [(split, *ds[i][::-1]) for i in range(len(ds))]
    return items  # (split, label, image)


def _generated_words(src: Path) -> int:
    return sum(len(read_page(p).words) for p in src.glob("page_*.json"))


# -- report ------------------------------------------------------------------------------------------

def test_report_names_every_defect(dropped):
    out, report = dropped
    on_disk = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert on_disk == report
    skipped = report["skipped"]

    def examples(reason):
        assert reason in skipped, (reason, sorted(skipped))
        assert skipped[reason]["count"] == len(skipped[reason]["examples"])
        return skipped[reason]["examples"]

    assert examples("stray_file") == ["notes.txt"]
    [malformed] = examples("malformed_json")
    assert malformed.startswith("broken.json: ")
    [corrupt] = examples("image_corrupt")
    assert corrupt.startswith("corrupt.jpg")
    assert examples("image_missing") == ["orphan.json"]
    assert examples("empty_text") == ["defects.json#3"]
    assert examples("nfd_normalised") == ["defects.json#2"]
    assert examples("zero_area_box") == ["defects.json#5"]  # wholly outside: skipped, so not "clipped, kept"
    assert examples("negative_coordinates") == ["defects.json#4"]
    assert examples("box_clipped") == ["defects.json#7"]
    [oov] = examples("out_of_charset")
    assert oov.startswith("defects.json#6") and "漢" in oov
    assert "image_size_differs_from_json" not in skipped
    assert examples("stray_folder") == ["empty_folder"]


# reasons that leave a whole page out: each label found is used, wordless, or counted under one of them
PAGE_REASONS = {"malformed_json", "bad_encoding", "bad_schema", "unreadable_file", "image_missing", "image_used_twice",
                "image_corrupt", "image_too_large", "page_failed"}


def _pages_add_up(report) -> None:
    left_out = sum(v["count"] for k, v in report["skipped"].items() if k in PAGE_REASONS)
    assert report["pages_found"] == report["pages_used"] + report["pages_without_crops"] + left_out, report


def test_page_counts(dropped):
    _, report = dropped
    # 6 generated + defects + corrupt + orphan + broken; corrupt, orphan and broken are not used
    assert report["pages_found"] == 10
    assert report["pages_used"] == 7 == sum(report["pages"].values())
    _pages_add_up(report)


@pytest.mark.parametrize("step", ["_read_label_or_raise", "_check_image_or_raise"])
def test_a_page_that_fails_in_the_scan_is_counted_once_with_its_image(tmp_path, monkeypatch, step):
    """Was: a page whose label or image check raised something unforeseen (page_failed) left its image
    unclaimed, so the same page was counted again as image_without_label and the counts did not add up."""
    from training.data import prepare

    src = tmp_path / "src"
    src.mkdir()
    for stem in "ab":
        Image.new("L", (200, 100), 255).save(src / f"{stem}.png")
        write_page(read_page_like(stem, ["서울"]), src / f"{stem}.json")
    real = getattr(prepare, step)

    def failing(first, *rest):
        name = first.name if hasattr(first, "name") else first
        if name.startswith("b"):
            raise RuntimeError("unforeseen")
        return real(first, *rest)

    monkeypatch.setattr(prepare, step, failing)
    report = _run(src, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    assert report["skipped"]["page_failed"]["count"] == 1
    assert report["skipped"]["page_failed"]["examples"][0].startswith("b.json: RuntimeError: unforeseen")
    assert "image_without_label" not in report["skipped"]  # was: b.png, a second count of the same page
    assert report["pages_used"] == 1
    _pages_add_up(report)


def test_a_page_whose_every_word_was_dropped_is_not_counted_as_used(tmp_path, monkeypatch, capsys):
    """Was: pages_used counted every page read whole, so pages of ``###``, of characters outside the charset
    or without annotations counted as used though they gave no crop (4 pages used, 1 crop)."""
    from kocr.cli import main

    src = tmp_path / "src"
    src.mkdir()
    for stem, texts in [("a", ["서울"]), ("b", ["###"]), ("c", ["☃", "###"]), ("d", [])]:
        Image.new("L", (200, 100), 255).save(src / f"{stem}.png")
        write_page(read_page_like(stem, texts), src / f"{stem}.json")
    report = _run(src, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    assert (report["pages_used"], report["pages_without_crops"], report["crops"]["train"]) == (1, 3, 1)
    assert report["pages"]["train"] == 4  # splits.json keeps them: evaluate scores the words they have
    assert len(json.loads((tmp_path / "out" / "splits.json").read_text(encoding="utf-8"))["train"]) == 4
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("prepare: {}\n", encoding="utf-8")
    for stem in "ac":
        (src / f"{stem}.json").unlink()
    assert main(["prepare-aihub", "--src", "src", "--out", "only_wordless", "--metrics", "m.json"]) == 0  # no crop
    metrics = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))  # dvc metrics diff and MLflow see it too
    assert (metrics["pages_used"], metrics["pages_without_crops"]) == (0, 2)
    captured = capsys.readouterr()
    assert "prepare: 0 pages -> crops" in captured.out and "(2 more pages gave no crop" in captured.out
    assert "warning: no usable page under src: none gave a crop" in captured.err  # was: no warning


def read_page_like(stem: str, texts: list[str]):
    """A 200x100 page ``<stem>.png`` with one box per text."""
    from training.data.pages import Page

    return Page(f"{stem}.png", 200, 100, words=[Word((20.0 + 50 * i, 30.0, 40.0, 20.0), t) for i, t in enumerate(texts)])


def test_the_metrics_and_console_tell_repairs_from_drops(src, tmp_path, monkeypatch, capsys):
    # was: "skipped_nfd_normalised" and "skipped: ... nfd_normalised 1" for a word NFC-normalised and kept
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("prepare: {}\n", encoding="utf-8")
    assert main(["prepare-aihub", "--src", str(src), "--out", "out", "--metrics", "m.json"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in metrics.items() if k.startswith("kept_")} == {
        "kept_nfd_normalised": 1, "kept_negative_coordinates": 1, "kept_box_clipped": 1}
    assert metrics["skipped_zero_area_box"] == 1 and metrics["skipped_out_of_charset"] == 1
    assert not {"skipped_nfd_normalised", "skipped_negative_coordinates", "skipped_box_clipped"} & set(metrics)
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("prepare: ")]
    skipped, kept = line.split("; skipped: ")[1].split("; kept with a repair or note: ")
    assert "nfd_normalised" not in skipped and "zero_area_box 1" in skipped
    assert kept == "box_clipped 1, negative_coordinates 1, nfd_normalised 1"
    # kept, counted: with out_of_charset: keep the word is no longer "skipped"
    (tmp_path / "params.yaml").write_text("prepare: {out_of_charset: keep}\n", encoding="utf-8")
    assert main(["prepare-aihub", "--src", str(src), "--out", "keep", "--metrics", "k.json"]) == 0
    assert json.loads((tmp_path / "k.json").read_text(encoding="utf-8"))["kept_out_of_charset"] == 1


def test_the_prepare_run_logs_the_source_and_output_it_was_given(src, tmp_path, monkeypatch):
    """Was: the run logged params.yaml's data.source and data.prepared whatever --src and --out said, so a
    prepare run by hand on another folder (a new delivery, a subset) named in MLflow pages it never read."""
    import os

    import mlflow

    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("data: {source: data/sample, prepared: data/prepared}\nprepare: {}\n",
                                          encoding="utf-8")
    assert main(["prepare-aihub", "--src", str(src), "--out", "delivery2"]) == 0
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1,
                               filter_string="tags.`kocr.stage` = 'prepare'", order_by=["attributes.start_time DESC"])
    assert (run.data.params["data.source"], run.data.params["data.prepared"]) == (str(src), "delivery2")
    # data: is still checked: a misspelt key stops the command, as docs/data.md says
    (tmp_path / "params.yaml").write_text("data: {sorce: data/sample}\nprepare: {}\n", encoding="utf-8")
    assert main(["prepare-aihub", "--src", str(src), "--out", "delivery3"]) == 2
    assert not (tmp_path / "delivery3").exists()


# -- splits ------------------------------------------------------------------------------------------

def test_splits_hold_each_usable_page_once(src, dropped):
    out, report = dropped
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    assert sorted(splits) == sorted(SPLIT_NAMES)
    used = [name for split in SPLIT_NAMES for name in splits[split]]
    assert len(used) == len(set(used))  # no page in two splits
    expected = {p.name for p in src.glob("page_*.json")} | {"defects.json"}
    assert set(used) == expected
    assert {"corrupt.json", "broken.json", "orphan.json"}.isdisjoint(used)
    assert {split: len(splits[split]) for split in SPLIT_NAMES} == report["pages"]
    assert all(splits[split] for split in ("val", "test")) or report["pages_used"] < 3


def test_crops_follow_their_page_split(src, dropped):
    out, _ = dropped
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    defect_labels = [PROBE[0], NFC_WORD, NEGATIVE[0], CLIPPED[0]]
    for split in SPLIT_NAMES:
        expected = Counter()
        for name in splits[split]:
            if name == "defects.json":
                expected.update(defect_labels)
            else:
                expected.update(w.text for w in read_page(src / name).words)
        got = Counter(label for s, label, _ in _lmdb_items(out) if s == split)
        assert got == expected, split


def test_same_seed_same_splits_and_sets(src, dropped, tmp_path):
    out, _ = dropped
    _run(src, tmp_path / "again")
    assert (tmp_path / "again" / "splits.json").read_bytes() == (out / "splits.json").read_bytes()
    first = [(s, label, image.tobytes()) for s, label, image in _lmdb_items(out)]
    second = [(s, label, image.tobytes()) for s, label, image in _lmdb_items(tmp_path / "again")]
    assert first == second
    assert not list((tmp_path / "again").glob("*.partial")) and not list(out.glob("*.partial"))


def test_split_documents_by_seed():
    names = [f"doc_{i:03d}.json" for i in range(60)]
    a = split_documents(names, PrepareConfig(seed=0))
    assert a == split_documents(list(reversed(names)), PrepareConfig(seed=0))  # input order is irrelevant
    b = split_documents(names, PrepareConfig(seed=1))
    assert a != b
    for assignment in (a, b):
        assert set(assignment) == set(names)
        counts = {s: sum(v == s for v in assignment.values()) for s in SPLIT_NAMES}
        assert counts == {"train": 48, "val": 6, "test": 6}
    few = split_documents(["a", "b", "c"], PrepareConfig(val_fraction=0.05, test_fraction=0.05))
    assert sorted(few.values()) == ["test", "train", "val"]  # small sets still get a val and a test page
    assert set(split_documents(["a", "b"], PrepareConfig()).values()) == {"train"}


# -- LMDB contents -----------------------------------------------------------------------------------

def test_crop_count_equals_usable_words(src, dropped):
    out, report = dropped
    items = _lmdb_items(out)
    # every generated word is usable; the defect page adds the probe, the NFD word, the
    # negative-coordinate box and the clipped one (empty, wholly outside and out-of-charset are dropped)
    expected = _generated_words(src) + 4
    assert len(items) == expected == sum(report["crops"].values())
    assert {s: sum(i[0] == s for i in items) for s in SPLIT_NAMES} == report["crops"]


def test_labels_are_nfc_and_out_of_charset_dropped(dropped):
    out, _ = dropped
    labels = [label for _, label, _ in _lmdb_items(out)]
    assert NFC_WORD in labels
    assert unicodedata.normalize("NFD", NFC_WORD) not in labels
    assert all(label == unicodedata.normalize("NFC", label) for label in labels)
    assert HANJA[0] not in labels and not any(KOREAN.missing(label) for label in labels)
    assert OUTSIDE[0] not in labels
    assert all(label.strip() == label and label for label in labels)


def test_out_of_charset_kept_on_request(src, dropped, tmp_path):
    out_drop, _ = dropped
    report = _run(src, tmp_path / "keep", out_of_charset="keep")
    labels = [label for _, label, _ in _lmdb_items(tmp_path / "keep")]
    assert labels.count(HANJA[0]) == 1
    assert len(labels) == len(_lmdb_items(out_drop)) + 1 == sum(report["crops"].values())
    assert report["skipped"]["out_of_charset"]["count"] == 1  # still reported


def test_crop_is_the_box_plus_margin(src, dropped):
    out, _ = dropped
    page_grey = cv2.imread(str(src / "defects.jpg"), cv2.IMREAD_GRAYSCALE)  # libjpeg's luma, like prepare
    crops = {label: image for _, label, image in _lmdb_items(out)}
    for label, bbox in (PROBE, NEGATIVE):
        x0, y0, x1, y1 = _crop_rect(bbox, 0.1, W, H)
        assert crops[label].shape == (y1 - y0, x1 - x0), label
        assert np.array_equal(crops[label], page_grey[y0:y1, x0:x1]), label  # PNG crops are lossless
    assert crops[PROBE[0]].shape == (36, 86)  # 30 + 2*3 high, 80 + 2*3 wide
    assert crops[NEGATIVE[0]].shape == (19, 57)  # clamped at the top-left corner


def test_margin_is_configurable(src, tmp_path):
    _run(src, tmp_path / "m0", crop_margin=0.0)
    crops = {label: image for _, label, image in _lmdb_items(tmp_path / "m0")}
    assert crops[PROBE[0]].shape == (30, 80)


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        prepare_pages(tmp_path / "no_such_dir", tmp_path / "out", PrepareConfig(), progress=False)


def test_aihub_tree_finds_images_in_the_mirrored_folder(src, tmp_path):
    root = tmp_path / "aihub"
    labels = root / "01.라벨링데이터(Json)" / "인.허가" / "5350109" / "1994"
    images = root / "02.원천데이터(Jpg)" / "인.허가" / "5350109" / "1994"
    labels.mkdir(parents=True)
    images.mkdir(parents=True)
    page = read_page(src / "page_00004.json")
    page.image_name = "5350109-1994-0001-0001.jpg"
    write_page(page, labels / "5350109-1994-0001-0001.json")
    shutil.copy(src / "page_00004.jpg", images / page.image_name)
    report = _run(root, tmp_path / "out")
    assert report["pages_used"] == 1 and "image_missing" not in report["skipped"]
    assert sum(report["crops"].values()) == len(page.words)


# -- image loading -----------------------------------------------------------------------------------

def test_load_grey_cmyk_jpeg(tmp_path):
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[:, 20:] = 255
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb, "RGB").convert("CMYK").save(path, format="JPEG", quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    grey = load_grey(path)
    assert grey.dtype == np.uint8 and grey.shape == (30, 40)
    assert grey[:, :15].mean() < 40 and grey[:, 25:].mean() > 215


def test_load_grey_16bit_png_scales_from_16_bits_as_evaluation_does(tmp_path):
    ramp = np.tile(np.linspace(1000, 60000, 50).astype(np.uint16), (10, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    grey = load_grey(path)
    assert grey.dtype == np.uint8 and grey.shape == (10, 50)
    # 1000 and 60000 of 65535: 4 and 233, not clipped to white, and not stretched to 0-255 as prepare
    # once did, while evaluate (training.data.pixels.mend) and EasyOCR's own reading keep the scan's range
    assert grey.min() == 4 and grey.max() == 233
    assert np.all(np.diff(grey[0].astype(int)) >= 0) and len(np.unique(grey[0])) > 40


def test_load_grey_palette_and_rgba(tmp_path):
    rgb = np.zeros((8, 12, 3), np.uint8)
    rgb[:, 6:] = (255, 255, 255)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "a.png")
    for name in ("p.png", "a.png"):
        grey = load_grey(tmp_path / name)
        assert grey.shape == (8, 12) and grey[:, :6].max() == 0 and grey[:, 6:].min() == 255


def test_load_grey_applies_exif_rotation(tmp_path):
    stored = np.full((20, 40), 255, np.uint8)  # 40 wide, 20 high as stored
    stored[:5, :5] = 0  # mark the stored top-left corner
    img = Image.fromarray(stored, "L")
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, format="JPEG", quality=100, exif=exif)
    grey = load_grey(path)
    assert grey.shape == (40, 20)  # transposed: now 20 wide, 40 high
    assert grey[:5, -5:].mean() < 60  # the stored top-left is now top-right
    assert grey[:5, :5].mean() > 200


def _exif_page(root: Path, stem: str, boxes_on: str) -> list[str]:
    """A phone photo stored sideways (EXIF orientation 6 turns it upright), its label's boxes on the upright
    image (as viewers show it) or on the stored pixels (a tool that ignores EXIF, as OpenCV does)."""
    upright = np.full((60, 120), 255, np.uint8)
    upright[20:40, 10:50] = 0  # the word: ink inside its box, paper around it
    stored = Image.fromarray(np.rot90(upright).copy(), "L")  # 60 wide, 120 high as stored
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(root / f"{stem}.jpg", format="JPEG", quality=100, exif=exif)
    if boxes_on == "upright":
        width, height, box = 120, 60, (10.0, 20.0, 40.0, 20.0)
    else:  # the same word where it lies in the stored pixels (np.rot90: upright x, y -> stored y, 119 - x)
        width, height, box = 60, 120, (20.0, 70.0, 20.0, 40.0)
    write_page(Page(f"{stem}.jpg", width, height, [Word(box, "서울")]), root / f"{stem}.json")
    return [stem]


def test_boxes_on_the_stored_pixels_of_an_exif_turned_image_are_not_cropped_from_the_upright_one(tmp_path):
    # was: kept with image_size_differs_from_json, the box cropped from the upright image: blank paper
    # labelled 서울, trained on
    root = tmp_path / "src"
    root.mkdir()
    _exif_page(root, "upright", "upright")
    _exif_page(root, "stored", "stored")
    out = tmp_path / "out"
    report = prepare_pages(root, out, PrepareConfig(val_fraction=0.0, test_fraction=0.0, crop_margin=0.0),
                           progress=False)
    skipped = report["skipped"]
    assert "image_size_differs_from_json" not in skipped
    assert skipped["boxes_before_exif_turn"]["count"] == 1
    assert skipped["boxes_before_exif_turn"]["examples"][0].startswith("stored.json: ")
    assert "orientation 6" in skipped["boxes_before_exif_turn"]["examples"][0]
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    assert splits["train"] == ["upright.json"]  # left out whole, as a page whose image fails: never scored either
    ds = LmdbDataset(out / "train")
    assert len(ds) == 1 and ds.label(0) == "서울"
    assert np.asarray(ds[0][0]).mean() < 60  # the upright box holds the word's ink


def test_corrupt_image_raises_for_the_stage_to_report(tmp_path):
    path = tmp_path / "bad.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    with pytest.raises((OSError, ValueError, SyntaxError)):
        load_grey(path)


def test_corrupt_page_does_not_empty_a_split(src, tmp_path):
    root = tmp_path / "small"
    root.mkdir()
    for name in ("page_00000", "page_00001", "page_00002", "corrupt"):
        for suffix in (".json", ".jpg"):
            shutil.copy(src / (name + suffix), root / (name + suffix))
    names = sorted(p.name for p in root.glob("*.json"))
    # the first seed whose assignment sends the corrupt page to val or test
    seed = next(s for s in range(100)
                if split_documents(names, PrepareConfig(seed=s))["corrupt.json"] != "train")
    report = _run(root, tmp_path / "out", seed=seed)
    assert report["pages_used"] == 3 and "image_corrupt" in report["skipped"]
    assert report["pages"]["val"] >= 1 and report["pages"]["test"] >= 1, report["pages"]


def test_a_decomposed_word_that_is_dropped_is_not_also_counted_as_kept_normalised(tmp_path):
    # was: kept_nfd_normalised 3 beside skipped_out_of_charset 1 and skipped_zero_area_box 1 for these words
    root = tmp_path / "src"
    generate_pages(root, count=1, seed=21, fonts=FONTS, width=W, height=H, font_size=(14, 22), progress=False)
    page = read_page(root / "page_00000.json")
    nfd = unicodedata.normalize("NFD", NFC_WORD)
    page.words = [Word((300.0, 40.0, 90.0, 25.0), nfd),          # normalised and kept
                  Word(HANJA[1], HANJA[0] + nfd),                # out of the charset: dropped
                  Word(OUTSIDE[1], nfd)]                         # no area in the image: dropped
    write_page(page, root / "page_00000.json")
    report = prepare_pages(root, tmp_path / "out", PrepareConfig(val_fraction=0.0, test_fraction=0.0), progress=False)
    counts = {reason: entry["count"] for reason, entry in report["skipped"].items()}
    assert counts == {"nfd_normalised": 1, "out_of_charset": 1, "zero_area_box": 1}
    assert report["crops"]["train"] == 1


def test_under_keep_a_word_out_of_the_charset_that_is_dropped_is_not_counted_as_kept(tmp_path):
    # was: kept_out_of_charset 3 beside skipped_zero_area_box 1 and skipped_bad_annotation 1 for three words,
    # so kept + skipped counted five words where the page had three
    root = tmp_path / "src"
    generate_pages(root, count=1, seed=21, fonts=FONTS, width=W, height=H, font_size=(14, 22), progress=False)
    page = read_page(root / "page_00000.json")
    page.words = [Word(HANJA[1], HANJA[0]),                                 # kept, noted
                  Word((200.0, 100.0, 0.0, 30.0), HANJA[0]),                # no area: dropped
                  Word((200.0, 100.0, float("nan"), 30.0), HANJA[0])]       # no box: dropped
    write_page(page, root / "page_00000.json")
    config = PrepareConfig(val_fraction=0.0, test_fraction=0.0, out_of_charset="keep")
    report = prepare_pages(root, tmp_path / "out", config, progress=False)
    counts = {reason: entry["count"] for reason, entry in report["skipped"].items()}
    assert counts == {"out_of_charset": 1, "zero_area_box": 1, "bad_annotation": 1}
    assert report["crops"]["train"] == 1


@pytest.mark.parametrize("error, entry", [
    (PermissionError(13, "Permission denied", "/abs/src/page_00004.jpg"),
     ("unreadable_file", "page_00004.jpg: Permission denied")),           # no absolute path in the report
    (zlib.error("Error -3 while decompressing data: invalid block type"),  # a zip member that does not inflate
     ("image_corrupt", "page_00004.jpg: damaged compressed data in ZIP (Error -3 while decompressing data: "
                       "invalid block type)")),  # was "error: Error -3 …": not saying the zip's copy is damaged
])
def test_an_image_that_cannot_be_read_is_reported_alike_when_scanned_and_when_cropped(src, monkeypatch, error, entry):
    from training.data import prepare
    from training.data.sources import scan_source

    monkeypatch.setattr(prepare, "_WORKER", {})
    index = scan_source(src)
    prepare._init_worker(src, PrepareConfig())
    scanned = prepare._pair(None, False, index)
    label, meta, found, entries = next(entry for entry in scanned if entry[0].name == "page_00004.json")
    assert meta is not None and entries == ()

    def read_member(root, member):
        if member.name.endswith(".jpg"):
            raise error
        return (root / member.path).read_bytes()

    monkeypatch.setattr(prepare, "read_member", read_member)
    assert prepare._pair(None, False, index)[scanned.index((label, meta, found, entries))] \
        == (label, None, found, (entry,))  # the scan: its image claimed, not "without label"
    assert prepare._crop_page(meta) == ([], [entry], False)     # unreadable since the scan


def test_the_source_index_is_let_go_before_the_shards_are_written(tmp_path, monkeypatch):
    """The calling process held the whole scan (every label and image, the image lookup table) while it
    wrote the shards, a few hundred bytes a page of the source; what writing needs is in the pages."""
    import gc
    import weakref

    from training.data import prepare

    generate_pages(tmp_path / "src", count=3, seed=5, fonts=FONTS[:1], width=W, height=H, progress=False)
    held: list[weakref.ref] = []
    alive_while_writing: list[bool] = []
    real_scan, real_write = prepare.scan_source, prepare._write_shards

    def scan(*args, **kwargs):
        index = real_scan(*args, **kwargs)
        held.append(weakref.ref(index))
        return index

    def write(*args, **kwargs):
        gc.collect()
        alive_while_writing.append(held[0]() is not None)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(prepare, "scan_source", scan)
    monkeypatch.setattr(prepare, "_write_shards", write)
    report = prepare_pages(tmp_path / "src", tmp_path / "out", PrepareConfig(), progress=False)
    assert alive_while_writing == [False]
    assert report["pages_found"] == report["images_found"] == 3 and sum(report["crops"].values()) > 0


CTRL_C_AS_THE_FORKSERVER_STARTS = """
import os, signal, sys, time
import multiprocessing.forkserver as forkserver
from kocr.cli import main

real, sent = forkserver._forkserver.ensure_running, []


def ensure_running():
    real()
    if sent:
        return
    sent.append(True)
    pid, deadline = forkserver._forkserver._forkserver_pid, time.monotonic() + 60
    while time.monotonic() < deadline:  # until its Python set its Ctrl-C handler: it then imports the preload
        with open(f"/proc/{pid}/status") as fh:
            caught = int(next(line for line in fh if line.startswith("SigCgt:")).split()[1], 16)
        if caught & (1 << (signal.SIGINT - 1)):
            break
        time.sleep(0.002)
    os.killpg(0, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group


forkserver._forkserver.ensure_running = forkserver.ensure_running = ensure_running
sys.argv = ["kocr", *sys.argv[1:]]
main()
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the forkserver's signal state in /proc")
def test_ctrl_c_as_the_cropping_processes_start_ends_prepare_with_one_line(tmp_path):
    """Ctrl-C reaches the whole foreground group, the forkserver and the workers too. Was: a Ctrl-C in
    the first seconds of ``kocr prepare-aihub --workers N`` also printed the forkserver's
    KeyboardInterrupt traceback (it was importing training.data.prepare, its preload), or a worker's."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    generate_pages(tmp_path / "src", count=4, seed=5, fonts=FONTS[:1], width=W, height=H, progress=False)
    err = tmp_path / "err.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "KOCR_PARAMS": str(REPO / "params.yaml")}
    with err.open("w") as sink:  # SIGINT at its default, as at a terminal (a script's job would ignore it)
        proc = subprocess.Popen([sys.executable, "-c", CTRL_C_AS_THE_FORKSERVER_STARTS, "prepare-aihub",
                                 "--src", "src", "--out", "out", "--workers", "2"], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=sink, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    left = ["not waited for"]
    try:
        proc.wait(timeout=300)
        deadline = time.monotonic() + 60
        while True:  # the forkserver and workers gone too (an orphan that init has not reaped yet is gone)
            left = [line for line in subprocess.run(["ps", "-o", "stat=,args=", "-s", str(proc.pid)],
                                                    capture_output=True, text=True).stdout.splitlines()
                    if not line.lstrip().startswith("Z")]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None or left:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    text = err.read_text()
    assert proc.returncode == -signal.SIGINT, text[-3000:]
    assert "Traceback" not in text and "Error" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == "kocr prepare-aihub: interrupted", text[-3000:]
    assert not left, left


STOP_THE_WORKERS_AS_THEY_CROP = """
import os, signal, sys
from tests.stops import stop_workers_then_command
from training.data import prepare
from kocr.cli import main

real, sent = prepare.ordered_map, []


def ordered_map(func, items, pool, *args, **kwargs):
    for result in real(func, items, pool, *args, **kwargs):
        if func is prepare._crop_page and pool is not None and not sent:  # the first page is cropped
            sent.append(True)
            if os.environ["STOP"] == "kill-one":  # as the OOM killer, or a crash in a decoder
                os.kill(sorted(pool._processes)[0], signal.SIGKILL)
            else:
                stop_workers_then_command(list(pool._processes))
        yield result


prepare.ordered_map = ordered_map
sys.argv = ["kocr", *sys.argv[1:]]
sys.exit(main())
"""


def _prepare_stopped(tmp_path: Path, pages: int, stop: str, timeout: float):
    """``kocr prepare-aihub --workers 2`` on ``pages`` generated pages, its workers stopped (``stop``: SIGTERM
    to them all and then to the command, or ``kill-one``) once the first page is cropped; the finished process."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    generate_pages(tmp_path / "src", count=pages, seed=5, fonts=FONTS[:1], width=W, height=H, progress=False)
    env = {**os.environ, "PYTHONPATH": str(REPO), "KOCR_PARAMS": str(REPO / "params.yaml"), "STOP": stop}
    try:
        return subprocess.run([sys.executable, "-c", STOP_THE_WORKERS_AS_THEY_CROP, "prepare-aihub", "--src", "src",
                               "--out", "out", "--workers", "2"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"kocr prepare-aihub hung after its workers were stopped ({stop}): {str(exc.stderr)[-2000:]}")


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the workers' state in /proc")
def test_sigterm_to_the_group_as_pages_are_cropped_ends_prepare_with_143_not_a_hang(tmp_path):
    """GNU ``timeout`` (and a CI runner cancelling a job) sends SIGTERM to the whole process group. Was:
    the cropping workers died by it, and one killed while it sent its crops back left the pool's result
    reader waiting for the rest of that message for ever: ``kocr prepare-aihub`` hung in the pool's
    shutdown, its MLflow run RUNNING. The workers now leave SIGTERM to the command, which ends them."""
    proc = _prepare_stopped(tmp_path, 6, "sigterm", timeout=300)
    assert json.loads((tmp_path / "alive.json").read_text()) == [True, True], proc.stderr[-3000:]
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "manifest.json").exists()  # stopped, not finished


A_LATER_FORKSERVER_PROCESS = """
import json, multiprocessing, signal, time
from training.data.workers import end_pool, start_pool

pool = start_pool(2, int, ())
masks = [pool.submit(signal.pthread_sigmask, signal.SIG_BLOCK, []).result() for _ in range(4)]
end_pool(pool)
later = multiprocessing.get_context("forkserver").Process(target=time.sleep, args=(60,))
later.start()
later.terminate()  # SIGTERM
later.join(20)
print(json.dumps({"workers_block_sigterm": [signal.SIGTERM in mask for mask in masks], "later": later.exitcode}))
later.kill()
"""


def test_a_forkserver_process_started_after_the_pool_still_dies_by_sigterm():
    """The pool's forkserver is started with Ctrl-C and SIGTERM blocked, for its workers, and outlives the
    pool. Was: every process a program (a library caller of prepare_pages or generate_lines) later started
    through it inherited them blocked, and its terminate() or a ``kill PID`` did nothing."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, "-c", A_LATER_FORKSERVER_PROCESS], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {"workers_block_sigterm": [True] * 4, "later": -signal.SIGTERM}


def test_a_cropping_worker_killed_fails_prepare_instead_of_hanging(tmp_path):
    """A worker killed mid-run (the OOM killer, a crash in a decoder) breaks the pool. The executor ends the
    other workers with SIGTERM, which they keep blocked (_start_pool): was, its manager thread waited on
    them for ever (one blocked on the queue lock the dead one held, or on sending crops nobody read) and
    ``kocr prepare-aihub`` hung in the pool's shutdown instead of failing."""
    proc = _prepare_stopped(tmp_path, 40, "kill-one", timeout=150)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "BrokenProcessPool" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_webp_page_image_is_cropped_as_its_png_twin(tmp_path):
    # was: the .webp taken for a stray file and its page left out as image_missing, while evaluate-pages
    # and predict read WebP pages
    root = tmp_path / "src"
    root.mkdir()
    page = np.full((60, 120), 255, np.uint8)
    page[20:40, 10:50] = 0
    for stem, suffix in (("1111111-2000-0001-0001", ".png"), ("1111111-2000-0002-0001", ".webp")):
        Image.fromarray(page).save(root / f"{stem}{suffix}", lossless=True)
        write_page(Page(f"{stem}{suffix}", 120, 60, [Word((10.0, 20.0, 40.0, 20.0), "서울")]), root / f"{stem}.json")
    report = prepare_pages(root, tmp_path / "out", PrepareConfig(val_fraction=0.0, test_fraction=0.0),
                           progress=False)
    assert report["skipped"] == {} and report["pages_used"] == 2
    ds = LmdbDataset(tmp_path / "out" / "train")
    assert len(ds) == 2 and np.array_equal(np.asarray(ds[0][0]), np.asarray(ds[1][0]))
