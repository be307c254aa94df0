"""Text as it enters the platform: encodings, byte-order marks and malformed strings in every reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.score_crops import ScoreInputError, read_labels
from training.data.import_crops import import_crops
from training.data.lmdb_store import LmdbDataset
from training.data.prepare import PrepareConfig, prepare_pages

SURROGATE = '"\\ud800"'  # a JSON escape of half a surrogate pair: valid JSON, not text


def _page(root: Path, texts_json: list[str], name: str = "5350109-1994-0001-0001") -> None:
    """A 600x200 white page ``name`` with one 25x40 box per text (each given as a JSON literal)."""
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((200, 600), 255, np.uint8)).save(root / f"{name}.jpg")
    annotations = ", ".join(
        f'{{"id": {i}, "annotation.type": "rectangle", "annotation.text": {text}, '
        f'"annotation.bbox": [{10 + 40 * i}, 10, 25, 40]}}' for i, text in enumerate(texts_json, start=1))
    (root / f"{name}.json").write_text(
        f'{{"images": [{{"image.file.name": "{name}.jpg", "image.width": 600, "image.height": 200}}], '
        f'"annotations": [{annotations}]}}', encoding="utf-8")


def test_a_lone_surrogate_label_is_a_bad_annotation_not_a_crash(tmp_path):
    # "\ud800" parses as JSON; with out_of_charset: keep it reached the LMDB writer, whose UTF-8 encode
    # raised and stopped the whole stage (nothing in the input may stop prepare)
    _page(tmp_path / "src", ['"서울"', SURROGATE, '"시청"'])
    config = PrepareConfig(val_fraction=0, test_fraction=0, out_of_charset="keep")
    report = prepare_pages(tmp_path / "src", tmp_path / "out", config, progress=False)
    assert report["crops"]["train"] == 2
    bad = report["skipped"]["bad_annotation"]
    assert bad["count"] == 1 and bad["examples"][0].startswith("5350109-1994-0001-0001.json#2: ")
    assert "surrogate" in bad["examples"][0]
    ds = LmdbDataset(tmp_path / "out" / "train")
    assert [ds.label(i) for i in range(len(ds))] == ["서울", "시청"]


def test_a_lone_surrogate_in_box_labels_is_refused_naming_the_word(tmp_path):
    Image.fromarray(np.full((40, 120), 255, np.uint8)).save(tmp_path / "a.png")
    labels = tmp_path / "gt.json"
    labels.write_text('{"a.png": {"words": [{"points": [[0, 0], [100, 0], [100, 30], [0, 30]], '
                      f'"transcription": {SURROGATE}}}]}}}}', encoding="utf-8")
    with pytest.raises(ScoreInputError, match=r"gt\.json: a\.png word 1: .*surrogate"):
        read_labels(labels)
    with pytest.raises(ScoreInputError, match="surrogate"):  # import-crops used to crash in the LMDB writer
        import_crops(labels, tmp_path / "set", out_of_charset="keep", progress=False)
    assert not (tmp_path / "set").exists()
    json.loads(labels.read_text(encoding="utf-8"))  # the file itself is valid JSON


def test_box_labels_in_cp949_read_as_prepare_reads_page_json(tmp_path):
    # prepare (parse_page) accepts CP949 page JSON, as Korean Windows tools save it; evaluate-crops and
    # import-crops decoded the same file as UTF-8 only and refused it as "not JSON"
    Image.fromarray(np.full((40, 120), 255, np.uint8)).save(tmp_path / "a.png")
    page = {"images": [{"image.file.name": "a.png", "image.width": 120, "image.height": 40}],
            "annotations": [{"id": 1, "annotation.text": "서울", "annotation.bbox": [5, 5, 100, 30]}]}
    (tmp_path / "page.json").write_bytes(json.dumps(page, ensure_ascii=False).encode("cp949"))
    image_keyed = {"a.png": {"words": [{"points": [[5, 5], [105, 5], [105, 35], [5, 35]], "transcription": "시청"}]}}
    (tmp_path / "gt.json").write_bytes(json.dumps(image_keyed, ensure_ascii=False).encode("cp949"))
    assert [c.text for c in read_labels(tmp_path / "page.json")] == ["서울"]
    assert [c.text for c in read_labels(tmp_path / "gt.json")] == ["시청"]
    (tmp_path / "utf16.json").write_bytes(json.dumps(image_keyed, ensure_ascii=False).encode("utf-16"))
    with pytest.raises(ScoreInputError, match=r"utf16\.json: neither UTF-8 nor CP949"):
        read_labels(tmp_path / "utf16.json")


def test_cp949_text_files_are_refused_naming_file_line_and_encoding(tmp_path):
    # the messages gave a byte offset only ("not UTF-8 text (invalid start byte at byte 17)"): no line,
    # and no word that the file is CP949 (EUC-KR), the usual encoding of Korean text saved on Windows
    from evaluation.score_pages import find_pages
    from training.charset import Charset
    from training.data.degrade import SynthConfigError
    from training.data.synth_lines import load_texts

    Image.fromarray(np.full((40, 120), 255, np.uint8)).save(tmp_path / "a.png")
    tsv = tmp_path / "labels.tsv"
    tsv.write_bytes("\ufeffimage\ttext\r\na.png\tok\r\na.png\t서울\r\n".encode("cp949", errors="ignore"))
    with pytest.raises(ScoreInputError, match=r"labels\.tsv: not UTF-8 text \(.* at line 3, byte \d+\); it reads "
                                              r"as CP949 \(EUC-KR\): save it as UTF-8"):
        read_labels(tsv)
    (tmp_path / "a.txt").write_bytes("첫 줄\n서울\n".encode("cp949"))
    with pytest.raises(ScoreInputError, match=r"a\.txt: not UTF-8 text \(.* at line 1, byte \d+\); it reads as CP949"):
        find_pages(tmp_path, tmp_path)
    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"ok\n" + "서울\n".encode("cp949"))
    with pytest.raises(SynthConfigError, match=r"lines\.txt: synth_lines\.text_file is not UTF-8 text \(.* at line 2"):
        load_texts(lines, Charset.named("korean_g2"))
    latin1 = tmp_path / "latin1.tsv"  # neither: no CP949 claim
    latin1.write_bytes("image\ttext\na.png\tcafé\xff\n".encode("latin-1"))
    with pytest.raises(ScoreInputError, match=r"latin1\.tsv: not UTF-8 text \(.* at line 2, byte \d+\); save it as UTF-8$"):
        read_labels(latin1)


def test_an_lmdb_set_with_nfd_labels_trains_on_them_as_nfc(tmp_path):
    # a set written by another tool (deep-text-recognition-benchmark's create_lmdb_dataset on macOS)
    # may hold NFD jamo; training dropped every such sample as out_of_charset
    import unicodedata

    import cv2

    from training.charset import Charset
    from training.crops import CropDataset
    from training.data.lmdb_store import LmdbWriter

    png = cv2.imencode(".png", np.full((32, 128), 255, np.uint8))[1].tobytes()
    with LmdbWriter(tmp_path / "set") as writer:
        writer.add(png, unicodedata.normalize("NFD", "서울"))
        writer.add(png, "시청")
    korean = Charset.named("korean_g2")
    crops = CropDataset(LmdbDataset(tmp_path / "set"), korean)
    assert len(crops) == 2 and not crops.dropped
    batch = crops.collate([crops[0], crops[1]])
    assert batch.labels == ["서울", "시청"] and batch.target_lengths.tolist() == [2, 2]
