"""kocr import-crops: a user's labelled crops (TSV or box JSON) as an LMDB set the trainer reads."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.charset import Charset
from training.crops import CropDataset
from training.data.import_crops import REPORT, CropImportError, import_crops
from training.data.lmdb_store import LmdbDataset
from kocr.atomic import OutFolderError
from tests.conftest import realdata



def _crop(path: Path, shade: int, size: tuple[int, int] = (96, 32)) -> None:
    pixels = np.full((size[1], size[0]), 255, np.uint8)
    pixels[8:24, 10:10 + shade // 4] = shade  # something to tell the crops apart
    Image.fromarray(pixels).save(path)


def test_crops_and_labels_arrive_in_order_as_the_reader_sees_them_and_train(tmp_path):
    from evaluation.reader import load_image

    crops = tmp_path / "mine"
    (crops / "sub").mkdir(parents=True)
    rows = [("a.png", "서울"), ("sub/b.png", unicodedata.normalize("NFD", "시청")), ("c.png", "를"), ("d.png", "평양")]
    for i, (name, _) in enumerate(rows):
        _crop(crops / name, 40 + 40 * i)
    (crops / "broken.png").write_bytes(b"not a png")
    body = "".join(f"{name}\t{text}\n" for name, text in rows) + "broken.png\t부산\ngone.png\t대구\n"
    (crops / "labels.tsv").write_text("image\ttext\n" + body, encoding="utf-8")
    summary = import_crops(crops / "labels.tsv", tmp_path / "set", progress=False)
    # 를 is not in korean_g2 (EasyOCR's own list): dropped and named; the broken and the missing image
    # skipped and named (a missing one stopped the whole import)
    assert summary["samples"] == 3 and summary["rows"] == 6
    assert summary["skipped"]["image_missing"]["examples"] == [
        f"{crops / 'labels.tsv'}:7: image {crops / 'gone.png'} not found"]
    assert summary["skipped"]["out_of_charset"]["examples"] == [f"{crops / 'labels.tsv'}:4 '를'"]
    assert summary["skipped"]["image_unreadable"]["examples"][0].startswith(f"{crops / 'labels.tsv'}:6: ")
    assert json.loads((tmp_path / "set" / REPORT).read_text(encoding="utf-8")) == summary
    data = LmdbDataset(tmp_path / "set")
    assert [data.label(i) for i in range(len(data))] == ["서울", "시청", "평양"]  # NFC, in the TSV's order
    for i, name in enumerate(["a.png", "sub/b.png", "d.png"]):
        assert np.array_equal(data[i][0], load_image(crops / name)[1])
    trainable = CropDataset(data, Charset.named("korean_g2"))
    assert len(trainable) == 3 and not trainable.dropped
    kept = import_crops(crops / "labels.tsv", tmp_path / "set", out_of_charset="keep", progress=False)
    assert kept["samples"] == 4 and kept["skipped"]["out_of_charset"]["count"] == 1  # replaced, counted
    (crops / "labels.tsv").write_text("image\ttext\n" + body + "broken.png\t를\n", encoding="utf-8")
    kept = import_crops(crops / "labels.tsv", tmp_path / "set", out_of_charset="keep", progress=False)
    # was: out_of_charset 2 ("kept") beside image_unreadable 2 for the broken image's row 를
    assert kept["samples"] == 4 and kept["skipped"]["out_of_charset"]["examples"] == [f"{crops / 'labels.tsv'}:4 '를'"]
    assert kept["skipped"]["image_unreadable"]["count"] == 2


def test_a_box_json_is_cropped_like_evaluate_crops(tmp_path):
    from evaluation.score_crops import load_crop, read_labels

    labels = realdata("easyocr", "gt.json")
    summary = import_crops(labels, tmp_path / "set", progress=False)
    data = LmdbDataset(tmp_path / "set")
    crops = read_labels(labels)
    assert summary["samples"] == len(crops) == len(data) and [data.label(i) for i in range(len(data))][:2] == ["서울", "평양"]
    assert all(np.array_equal(data[i][0], load_crop(c)) for i, c in enumerate(crops))
    mixed = tmp_path / "mixed"  # the same boxes on a second image that does not decode
    mixed.mkdir()
    shutil.copy(labels.with_name("korean.png"), mixed / "korean.png")
    (mixed / "bad.png").write_bytes(b"x")
    entries = json.loads(labels.read_text(encoding="utf-8"))
    (mixed / "gt.json").write_text(json.dumps({**entries, "bad.png": entries["korean.png"]}), encoding="utf-8")
    summary = import_crops(mixed / "gt.json", tmp_path / "mixed_set", progress=False)
    assert summary["samples"] == len(crops) and summary["skipped"]["image_unreadable"]["count"] == 1


def test_words_marked_illegible_are_skipped_and_tallied_from_a_tsv_as_from_box_json(tmp_path):
    crops = tmp_path / "mine"
    crops.mkdir()
    _crop(crops / "a.png", 100)
    _crop(crops / "b.png", 200)
    (crops / "labels.tsv").write_text("image\ttext\na.png\t###\nb.png\t서울\n", encoding="utf-8")
    summary = import_crops(crops / "labels.tsv", tmp_path / "set", progress=False)
    data = LmdbDataset(tmp_path / "set")
    assert [data.label(i) for i in range(len(data))] == ["서울"]  # was: '###' trained as text
    assert summary["rows"] == 2 and summary["skipped"] == {
        "dont_care": {"count": 1, "examples": [f"{crops / 'labels.tsv'}:2"]}}
    boxes = crops / "boxes.json"
    boxes.write_text(json.dumps({"a.png": {"words": [
        {"points": [[10, 8], [40, 24]], "transcription": "###"},
        {"points": [[40, 8], [90, 24]], "transcription": "서울"}]}}), encoding="utf-8")
    summary = import_crops(boxes, tmp_path / "boxes", progress=False)
    assert summary["samples"] == 1 and summary["rows"] == 2 and summary["skipped"] == {
        "dont_care": {"count": 1, "examples": [f"{boxes}: a.png word 1"]}}  # was: left out without a word
    (crops / "only.tsv").write_text("image\ttext\na.png\t###\n", encoding="utf-8")
    with pytest.raises(CropImportError, match=r"no crop left to import \(dont_care 1\)"):
        import_crops(crops / "only.tsv", tmp_path / "only", progress=False)


def test_nothing_is_written_over_a_folder_that_is_not_a_set_or_when_nothing_is_left(tmp_path):
    crops = tmp_path / "mine"
    crops.mkdir()
    _crop(crops / "a.png", 100)
    (crops / "labels.tsv").write_text("image\ttext\na.png\t를\n", encoding="utf-8")
    with pytest.raises(OutFolderError, match=r"holds 'a.png' \(2 such\), which an LMDB set of import-crops does not"):
        import_crops(crops / "labels.tsv", crops, progress=False)  # --out the crops' own folder
    assert sorted(p.name for p in crops.iterdir()) == ["a.png", "labels.tsv"]
    with pytest.raises(CropImportError, match=r"no crop left to import \(out_of_charset 1\)"):
        import_crops(crops / "labels.tsv", tmp_path / "set", progress=False)
    assert not (tmp_path / "set").exists() and not list(tmp_path.glob("set*"))
    with pytest.raises(CropImportError, match="--charset: charset 'klingon'"):
        import_crops(crops / "labels.tsv", tmp_path / "set", charset="klingon", progress=False)


def test_a_set_holding_a_file_of_the_users_is_refused_never_replaced(tmp_path, capsys):
    from kocr.cli import main

    # was: any folder holding a data.mdb was replaced whole, so a file put beside the set was deleted
    crops = tmp_path / "mine"
    crops.mkdir()
    _crop(crops / "a.png", 100)
    (crops / "labels.tsv").write_text("image\ttext\na.png\t서울\n", encoding="utf-8")
    labels, out = str(crops / "labels.tsv"), tmp_path / "set"
    assert main(["import-crops", "--labels", labels, "--out", str(out)]) == 0
    assert main(["import-crops", "--labels", labels, "--out", str(out)]) == 0  # its own set: replaced
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    (tmp_path / "file").write_text("mine", encoding="utf-8")
    capsys.readouterr()
    assert main(["import-crops", "--labels", labels, "--out", str(out)]) == 2
    assert main(["import-crops", "--labels", labels, "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"kocr import-crops: error: --out {out}: holds 'notes.txt' (1 such), which an LMDB set of import-crops "
        "does not; give a new folder (a set there is replaced whole)",
        f"kocr import-crops: error: --out {tmp_path / 'file'}: is a file; give a new folder (a set there is "
        "replaced whole)"]
    assert sorted(p.name for p in out.iterdir()) == ["data.mdb", REPORT, "notes.txt"]
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine" and LmdbDataset(out).label(0) == "서울"
    assert (tmp_path / "file").read_text(encoding="utf-8") == "mine"


def test_the_command_prints_its_tally_and_refuses_in_one_line(tmp_path, capsys):
    from kocr.cli import main

    crops = tmp_path / "mine"
    crops.mkdir()
    _crop(crops / "a.png", 100)
    shutil.copy(crops / "a.png", crops / "b.png")
    (crops / "labels.tsv").write_text("image\ttext\na.png\t서울\nb.png\t를\n", encoding="utf-8")
    assert main(["import-crops", "--labels", str(crops / "labels.tsv"), "--out", str(tmp_path / "set")]) == 0
    out = capsys.readouterr().out
    assert f"import-crops: 1 of 2 crops -> {tmp_path / 'set'}; skipped or kept with a note: out_of_charset 1" in out
    assert main(["import-crops", "--labels", str(crops / "labels.tsv"), "--out", str(crops)]) == 2
    assert "which an LMDB set of import-crops does not; give a new folder" in capsys.readouterr().err


def test_a_second_import_into_a_set_being_written_stops_and_a_link_is_refused(tmp_path, monkeypatch):
    from training.data import lmdb_store
    from training.data.lmdb_store import LmdbWriteError, SetBusyError

    crops = tmp_path / "mine"
    crops.mkdir()
    _crop(crops / "a.png", 100)
    (crops / "labels.tsv").write_text("image\ttext\na.png\t서울\n", encoding="utf-8")
    real_add = lmdb_store.LmdbWriter.add

    def add_while_another_starts(self, image, label):
        with pytest.raises(SetBusyError, match="another process is writing this set"):  # was: it deleted the
            import_crops(crops / "labels.tsv", tmp_path / "set", progress=False)      # first one's partial set
        real_add(self, image, label)

    monkeypatch.setattr(lmdb_store.LmdbWriter, "add", add_while_another_starts)
    assert import_crops(crops / "labels.tsv", tmp_path / "set", progress=False)["samples"] == 1
    monkeypatch.setattr(lmdb_store.LmdbWriter, "add", real_add)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "set"]  # no lock file left beside the set
    (tmp_path / "link").symlink_to(tmp_path / "set")
    with pytest.raises(LmdbWriteError, match="a symbolic link"):  # was: rmtree's traceback after the import
        import_crops(crops / "labels.tsv", tmp_path / "link", progress=False)
    assert LmdbDataset(tmp_path / "set").label(0) == "서울"


def test_crops_named_as_prepare_matches_names_are_imported(tmp_path):
    # the very names a macOS zip and a Windows TSV give: was "image_missing ... not found" for each
    crops = tmp_path / "mine"
    (crops / "이미지").mkdir(parents=True)
    _crop(crops / "이미지" / unicodedata.normalize("NFD", "서울.PNG"), 100)
    _crop(crops / "이미지" / "민원.JPG", 200)
    (crops / "labels.tsv").write_text("image\ttext\n이미지/서울.PNG\t서울\n이미지\\민원.jpg\t민원\n", encoding="utf-8")
    summary = import_crops(crops / "labels.tsv", tmp_path / "set", progress=False)
    assert summary["samples"] == 2 and summary["skipped"] == {}
    page = {"images": [{"image.file.name": "X.jpg", "image.width": 96, "image.height": 32}],
            "annotations": [{"id": 1, "annotation.type": "rectangle", "annotation.text": "서울",
                             "annotation.bbox": [10, 8, 40, 16]}]}
    _crop(crops / "X.JPG", 100)
    (crops / "X.json").write_text(json.dumps(page, ensure_ascii=False), encoding="utf-8")
    summary = import_crops(crops / "X.json", tmp_path / "page", progress=False)  # was: image_unreadable 1
    assert summary["samples"] == 1 and summary["skipped"] == {}


def _import_peak(labels: Path, out: Path) -> tuple[int, dict]:
    import tracemalloc

    tracemalloc.start()
    try:
        summary = import_crops(labels, out, progress=False)
        return tracemalloc.get_traced_memory()[1], summary
    finally:
        tracemalloc.stop()


def test_import_memory_does_not_grow_with_the_rows(tmp_path):
    """Was: every row was read into a Crop (and every skipped row into a list) before the first was
    written, about 700 bytes a row: 1.4 GB for a labels.tsv of 2 million crops. Rows are now read one at a
    time (the file is still checked whole first) and skipped ones only counted, with their first places."""
    crops = tmp_path / "crops"
    crops.mkdir()
    for i in range(3):
        _crop(crops / f"c{i}.png", 60 + 60 * i)
    sizes, peaks = (120, 480), []
    for n in (4, *sizes):  # the first only warms imports and caches
        rows = "".join(f"c{i % 3}.png\t서울{i % 7}\n" if i % 3 else f"gone{i}.png\t서울\n" for i in range(n))
        (crops / f"labels{n}.tsv").write_text("image\ttext\n" + rows, encoding="utf-8")
        peak, summary = _import_peak(crops / f"labels{n}.tsv", tmp_path / f"set{n}")
        assert summary["rows"] == n and summary["skipped"]["image_missing"]["count"] == (n + 2) // 3
        peaks.append(peak)
    growth = (peaks[2] - peaks[1]) / (sizes[1] - sizes[0])
    assert growth < 100, f"peak grew {growth:.0f} bytes per row ({peaks[1]:,} -> {peaks[2]:,} bytes)"
