"""Evaluation reads the held-out pages from AI-Hub's zip archives as it does from the unpacked tree."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from evaluation import evaluate
from evaluation.evaluate import EvalPage, eval_set_hash, evaluate_models
from tests.conftest import permissions_bind
from tests.test_ingest import CATEGORY, CODE, YEAR, _aihub_pages, _cp949_zip, _page_json
from training.data.pages import read_page
from training.data.prepare import PrepareConfig, prepare_pages
from training.data.synth_pages import generate_pages

FOLDER = f"{CATEGORY}/{CODE}/{YEAR}"
CONFIG = PrepareConfig(val_fraction=0.2, test_fraction=0.34, shard_size=1000)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Six generated pages as an AI-Hub download twice, zipped (CP949 names) and unpacked, each prepared."""
    flat = tmp_path_factory.mktemp("flat")
    generate_pages(flat, count=6, seed=11, fonts=["NanumGothic.ttf"], width=480, height=360,
                   font_size=(16, 24), progress=False)
    root = tmp_path_factory.mktemp("aihub")
    tree, zipped = root / "tree", root / "zips"
    labels, images = {}, {}
    for stem, page, jpg in _aihub_pages(flat):
        labels[f"{FOLDER}/{stem}.json"] = _page_json(page)
        images[f"{FOLDER}/{stem}.jpg"] = jpg
        for top, name, data in (("01.라벨링데이터(Json)", f"{stem}.json", labels[f"{FOLDER}/{stem}.json"]),
                                ("02.원천데이터(Jpg)", f"{stem}.jpg", jpg)):
            folder = tree / "Training" / top / FOLDER
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
    (zipped / "Training").mkdir(parents=True)
    _cp949_zip(zipped / "Training" / f"[라벨]Training_{CATEGORY}.zip", labels)
    names = sorted(images)  # the images over two archives, as AI-Hub splits big downloads
    _cp949_zip(zipped / "Training" / f"[원천]Training_{CATEGORY}1.zip", {k: images[k] for k in names[:3]})
    _cp949_zip(zipped / "Training" / f"[원천]Training_{CATEGORY}2.zip", {k: images[k] for k in names[3:]})
    for src in (tree, zipped):
        prepare_pages(src, root / f"prepared_{src.name}", CONFIG, progress=False)
    return {"tree": tree, "zips": zipped, "tree_splits": root / "prepared_tree" / "splits.json",
            "zips_splits": root / "prepared_zips" / "splits.json", "jpgs": images}


def _by_image(pages: list[EvalPage]) -> dict[str, EvalPage]:
    return {item.page.image_name: item for item in pages}


def test_zip_pages_equal_the_unpacked_tree_pages(sources, tmp_path):
    cache = tmp_path / "cache"
    from_zip = evaluate.test_pages(sources["zips"], sources["zips_splits"], "test", cache=cache)
    from_tree = evaluate.test_pages(sources["tree"], sources["tree_splits"], "test")
    assert len(from_zip) == len(from_tree) == 2
    names = json.loads(sources["zips_splits"].read_text(encoding="utf-8"))["test"]
    assert [item.name for item in from_zip] == names  # the split's order, named as in splits.json
    assert all(name.startswith(f"Training/[라벨]Training_{CATEGORY}.zip/{FOLDER}/") for name in names)
    zips, tree = _by_image(from_zip), _by_image(from_tree)
    assert set(zips) == set(tree)
    for image_name, item in zips.items():
        assert item.page.to_dict() == tree[image_name].page.to_dict() and item.page.words
        assert item.image.is_file() and item.image.is_relative_to(cache) and item.image.name == image_name
        assert item.image.read_bytes() == tree[image_name].image.read_bytes() == sources["jpgs"][f"{FOLDER}/{image_name}"]
        assert tree[image_name].image.is_relative_to(sources["tree"] / "Training" / "02.원천데이터(Jpg)")
    assert eval_set_hash(from_zip) == eval_set_hash(from_tree)  # content, not names
    assert eval_set_hash(from_zip[:1]) != eval_set_hash(from_zip)
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == sorted(zips)  # only the test images
    assert evaluate.test_pages(sources["zips"], sources["zips_splits"], "test", cache=cache, limit=1) == from_zip[:1]


def test_only_the_needed_members_are_read_and_extracted_files_are_reused(sources, tmp_path, monkeypatch):
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def counting_open(self, name, *args, **kwargs):
        opened.append(name if isinstance(name, str) else name.filename)
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)
    cache = tmp_path / "cache"
    first = evaluate.test_pages(sources["zips"], sources["zips_splits"], "test", cache=cache)
    assert len(opened) == 4  # two labels read, two images extracted: the scan read zip directories only
    stamps = {item.image: (item.image.stat().st_ino, item.image.stat().st_mtime_ns) for item in first}
    opened.clear()
    again = evaluate.test_pages(sources["zips"], sources["zips_splits"], "test", cache=cache)
    assert len(opened) == 2 and [item.image for item in again] == [item.image for item in first]
    assert {item.image: (item.image.stat().st_ino, item.image.stat().st_mtime_ns) for item in again} == stamps
    damaged = first[0].image  # same size, other bytes: caught by the CRC and extracted again
    original = damaged.read_bytes()
    damaged.write_bytes(bytes(len(original)))
    evaluate.test_pages(sources["zips"], sources["zips_splits"], "test", cache=cache)
    assert damaged.read_bytes() == original
    assert not [p for p in cache.rglob("*.tmp")]


def test_each_zip_directory_is_read_once_by_the_scan_not_again_to_extract_images(sources, tmp_path, monkeypatch):
    """The extractor opened each image archive whole (zipfile's ZipInfo of every member, about 850 bytes
    a member: 60 MB for one of AI-Hub's 70,000-member zips, held until the split was read); it reads each
    image at the place the scan found, as prepare does."""
    read: list[str] = []
    real = zipfile.ZipFile._RealGetContents

    def counting(self):
        read.append(Path(self.filename).name)
        return real(self)

    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", counting)
    found = evaluate.test_pages(sources["zips"], sources["zips_splits"], "test", cache=tmp_path / "cache")
    assert found and all(item.image.is_file() for item in found)
    assert sorted(read) == sorted(p.name for p in (sources["zips"] / "Training").glob("*.zip"))  # each once


def test_missing_page_or_image_names_the_file(sources, tmp_path):
    source = tmp_path / "zips"
    shutil.copytree(sources["zips"], source)
    splits = json.loads(sources["zips_splits"].read_text(encoding="utf-8"))
    gone = splits["test"][0]
    image = f"{Path(gone).stem}.jpg"
    for archive in (source / "Training").glob("[[]원천]*.zip"):
        with zipfile.ZipFile(archive) as zf:
            kept = {info.filename: zf.read(info) for info in zf.infolist()}
        os.remove(archive)
        with zipfile.ZipFile(archive, "w") as zf:  # rewritten with UTF-8 names, minus the test image
            for raw_name, data in kept.items():
                name = raw_name.encode("cp437").decode("cp949")
                if not name.endswith(image):
                    zf.writestr(name, data)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{gone}: image {image} missing")):
        evaluate.test_pages(source, sources["zips_splits"], "test", cache=tmp_path / "cache")
    listed = tmp_path / "splits.json"
    listed.write_text(json.dumps({"test": [gone.replace("0001.json", "9999.json")]}), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"9999\.json: page listed in .*splits\.json is missing"):
        evaluate.test_pages(source, listed, "test", cache=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"splits\.json: no 'val' split"):
        evaluate.test_pages(source, listed, "val")


def test_evaluate_models_reads_the_extracted_images(sources, tmp_path):
    """The evaluate stage's scoring (CRAFT, then english_g2) on a page read from the zips.

    (``kocr evaluate`` itself, base and candidate, took over 40 s on the 2-core sandbox; this covers
    the part that differs for zip sources: the image path handed to the loader, the page name.)"""
    from_zip = evaluate.test_pages(sources["zips"], sources["zips_splits"], "test", cache=tmp_path / "cache", limit=1)
    scored = evaluate_models({"base": "english_g2"}, from_zip, tmp_path / "pred", progress=False)["base"]
    prediction = read_page(tmp_path / "pred" / "base" / from_zip[0].name)  # under its splits.json name
    assert prediction.image_name == from_zip[0].page.image_name and prediction.words  # CRAFT found text
    assert scored.metrics["crops"] == len(from_zip[0].page.words) > 0


def test_a_test_page_word_with_a_nan_or_infinite_box_is_left_out_not_a_crash():
    # prepare reports such a word (bad_annotation) and keeps its page, so the test split can hold it
    from training.data.pages import Page, Word

    nan, inf = float("nan"), float("inf")
    page = Page("p.jpg", 200, 60, [Word((10, 10, 40, 20), "서울"), Word((nan, 10, 40, 20), "시청"),
                                   Word((10, 10, inf, 20), "구청")])
    boxes, texts = evaluate.gt_boxes(page, (60, 200), 0.1)  # was int(round(nan)): ValueError
    assert texts == ["서울"] and boxes == [[8, 52, 8, 32]]  # x0, x1, y0, y1 with the 2 px margin


def _split_pages_bound(source: Path, splits: Path, cache: Path) -> subprocess.CompletedProcess:
    """split_pages of the test split in a process that file permissions bind (also as root)."""
    code = ("import sys; from evaluation.source_pages import split_pages; "
            "print(len(split_pages(sys.argv[1], sys.argv[2], 'test', cache=sys.argv[3], progress=False)))")
    return subprocess.run(permissions_bind([sys.executable, "-c", code, str(source), str(splits), str(cache)]),
                          capture_output=True, text=True)


def test_a_label_image_or_folder_of_the_split_that_cannot_be_read_is_named_not_skipped(sources, tmp_path):
    """Was: PermissionError out of split_pages (a traceback from ``kocr evaluate``); a page dropped instead
    would score another set under the same split, so the error names the file and why."""
    source = tmp_path / "tree"
    shutil.copytree(sources["tree"], source)
    name = json.loads(sources["tree_splits"].read_text(encoding="utf-8"))["test"][0]
    label = source / name
    image = Path(str(label.with_suffix(".jpg")).replace("01.라벨링데이터(Json)", "02.원천데이터(Jpg)"))
    folder = label.parent
    assert image.is_file()
    splits, cache = sources["tree_splits"], tmp_path / "cache"
    for locked, message in ((label, f"{label}: cannot be read (Permission denied); it is in split 'test' of {splits}"),
                            (image, f"{image}: cannot be read (Permission denied); it is in split 'test' of {splits}"),
                            (folder, f"{label}: page listed in {splits} cannot be read, as {folder} "
                                     "(Permission denied) above it cannot be")):
        locked.chmod(0)
        try:
            done = _split_pages_bound(source, splits, cache)
        finally:
            locked.chmod(0o755 if locked.is_dir() else 0o644)
        assert done.returncode == 1 and "PermissionError" not in done.stderr, done.stderr
        assert done.stderr.splitlines()[-1].startswith(f"evaluation.source_pages.UnreadablePage: {message}")
    assert _split_pages_bound(source, splits, cache).stdout.strip() == "2"  # all readable again: every page


def _damage_member(archive: Path, ends_with: str) -> None:
    """Overwrite the middle of one member's compressed bytes: its CRC (or inflating it) fails."""
    with zipfile.ZipFile(archive) as zf:
        info = next(i for i in zf.infolist() if i.filename.encode("cp437").decode("cp949").endswith(ends_with))
    blob = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + int.from_bytes(blob[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(blob[info.header_offset + 28:info.header_offset + 30], "little")
    middle = start + info.compress_size // 2
    blob[middle:middle + 8] = bytes(b ^ 0xFF for b in blob[middle:middle + 8])
    archive.write_bytes(bytes(blob))


@pytest.mark.parametrize("kind", ["label", "image"])
def test_a_damaged_zip_member_of_the_split_is_named_in_one_error(sources, tmp_path, kind):
    """Was: a plain OSError without errno for an image (``kocr evaluate`` let it out as a traceback)
    and zipfile.BadZipFile or zlib.error for a label."""
    from evaluation.source_pages import UnreadablePage

    source = tmp_path / "zips"
    shutil.copytree(sources["zips"], source)
    name = json.loads(sources["zips_splits"].read_text(encoding="utf-8"))["test"][0]
    stem = Path(name).stem
    archives = "[[]라벨]*.zip" if kind == "label" else "[[]원천]*.zip"
    suffix = f"{stem}.json" if kind == "label" else f"{stem}.jpg"
    archive = next(a for a in (source / "Training").glob(archives)
                   if any(i.filename.encode("cp437").decode("cp949").endswith(suffix)
                          for i in zipfile.ZipFile(a).infolist()))
    _damage_member(archive, suffix)
    with pytest.raises(UnreadablePage, match=rf"{re.escape(str(archive))}/.*{re.escape(suffix)}: cannot be read \("):
        evaluate.test_pages(source, sources["zips_splits"], "test", cache=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no partial copy left in the cache


def test_an_unreadable_archive_whose_name_holds_a_colon_is_named_above_its_page(tmp_path):
    """Was: the place was parsed back out of its report entry (``NAME: why``) at the first ": ", so an
    archive named ``a: b.zip`` became ``a`` and a page of it "missing from the source", not unreadable."""
    from evaluation.source_pages import UnreadablePage, split_pages

    source = tmp_path / "src"
    (source / "Training").mkdir(parents=True)
    archive = source / "Training" / f"[라벨]Training: {CATEGORY}.zip"
    archive.write_bytes(b"not a zip")
    name = f"Training/{archive.name}/{FOLDER}/p.json"
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"test": [name]}), encoding="utf-8")
    with pytest.raises(UnreadablePage) as raised:
        split_pages(source, splits, "test", cache=tmp_path / "cache", progress=False)
    assert str(raised.value) == (f"{source / name}: page listed in {splits} cannot be read, as {archive} (File is "
                                 "not a zip file) above it cannot be; make it readable, or run prepare again")


def test_a_cache_that_cannot_be_written_is_named_in_one_line(sources, tmp_path, monkeypatch, capsys):
    """Was: NotADirectoryError or PermissionError out of the extraction, a traceback from ``kocr evaluate``
    (a file named ``.kocr`` in the project, a read-only checkout); now one line naming the folder, exit 2."""
    from evaluation.source_pages import UnwritableCache
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("evaluate: {split: test}\n", encoding="utf-8")
    (tmp_path / ".kocr").write_text("not a folder", encoding="utf-8")
    with pytest.raises(UnwritableCache, match=r"^\.kocr/eval-images: cannot write the images extracted from the "
                                              r"source's zips there \(Not a directory: \.kocr/eval-images/"):
        evaluate.test_pages(sources["zips"], sources["zips_splits"], "test")
    assert main(["evaluate", "--source", str(sources["zips"]), "--splits", str(sources["zips_splits"]),
                 "--candidate", "models/none", "--predictions", "predictions"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("kocr evaluate: error: .kocr/eval-images: cannot write") and "writable folder" in line
    (tmp_path / ".kocr").unlink()
    (tmp_path / ".kocr").mkdir(mode=0o555)  # read-only: binds only a process without root's override
    try:
        done = _split_pages_bound(sources["zips"], sources["zips_splits"], tmp_path / ".kocr" / "eval-images")
    finally:
        (tmp_path / ".kocr").chmod(0o755)
    assert done.returncode == 1 and "PermissionError" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        f"evaluation.source_pages.UnwritableCache: {tmp_path / '.kocr' / 'eval-images'}: cannot write the images "
        "extracted from the source's zips there (Permission denied")


def test_a_word_marked_illegible_gives_no_crop_to_the_recognition_scores():
    # prepare skips ### words and the end-to-end metric ignores them; the crop scores counted them as the
    # text "###", which no reader gives: a model reading every real word right got cer > 0
    from evaluation.metrics import recognition_scores
    from training.data.pages import Page, Word

    page = Page("p.jpg", 200, 60, [Word((10, 10, 40, 20), "서울"), Word((60, 10, 40, 20), " ### "),
                                   Word((110, 10, 40, 20), "  ")])
    boxes, texts = evaluate.gt_boxes(page, (60, 200), 0.1)
    assert texts == ["서울"] and boxes == [[8, 52, 8, 32]]
    assert recognition_scores(texts, ["서울"] * len(texts))["cer"] == 0.0
