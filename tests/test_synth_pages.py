"""Synthetic page generator: determinism, label/image agreement, box geometry, fonts, lexicon."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.charset import Charset
from training.data import synth_pages
from training.data.fonts import FontFace, covers, find_fonts, load_font
from training.data.lexicon import has_hangul, load_lexicon, make_token
from training.data.pages import read_page
from training.data.synth_pages import CATEGORIES, generate_pages

try:
    find_fonts(["NanumGothic.ttf"])
except ValueError:  # pragma: no cover - only on machines without fonts-nanum
    pytest.skip("Korean fonts (fonts-nanum) are not installed", allow_module_level=True)

FONTS = ["NanumGothic.ttf", "NanumMyeongjo.ttf", "NanumPen*", "UnPilgi.ttf"]
SMALL = dict(width=480, height=360, font_size=(14, 22), progress=False)
CHARSET = Charset.named("korean_g2")


@pytest.fixture(scope="module")
def pages_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_pages(out, count=8, seed=3, fonts=FONTS, **SMALL)
    return out


def _pages(folder: Path):
    jsons = sorted(folder.glob("page_*.json"))
    assert jsons, f"no pages in {folder}"
    for path in jsons:
        page = read_page(path)
        image = np.asarray(Image.open(folder / page.image_name).convert("L"), dtype=np.float32)
        yield path, page, image


# -- determinism and files -------------------------------------------------------------------

def test_same_seed_gives_identical_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    paths_a = generate_pages(a, count=3, seed=11, fonts=FONTS, **SMALL)
    paths_b = generate_pages(b, count=3, seed=11, fonts=FONTS, **SMALL)
    assert [p.name for p in paths_a] == [p.name for p in paths_b] == [
        "page_00000.json", "page_00001.json", "page_00002.json"]
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert len(names) == 6  # one jpg and one json per page, no temp files left behind
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_pages_differ_between_seeds_and_indices(tmp_path):
    generate_pages(tmp_path / "a", count=2, seed=1, fonts=FONTS, **SMALL)
    generate_pages(tmp_path / "b", count=1, seed=2, fonts=FONTS, **SMALL)
    jpgs = [(tmp_path / "a" / "page_00000.jpg").read_bytes(),
            (tmp_path / "a" / "page_00001.jpg").read_bytes(),
            (tmp_path / "b" / "page_00000.jpg").read_bytes()]
    assert len(set(jpgs)) == 3


def test_rerun_overwrites_and_removes_stale_pages(tmp_path):
    generate_pages(tmp_path, count=3, seed=5, fonts=FONTS, **SMALL)
    first = (tmp_path / "page_00001.json").read_bytes()
    (tmp_path / "page_00001.jpg").write_bytes(b"garbage")
    generate_pages(tmp_path, count=2, seed=5, fonts=FONTS, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "page_00000.jpg", "page_00000.json", "page_00001.jpg", "page_00001.json"]
    assert (tmp_path / "page_00001.json").read_bytes() == first
    Image.open(tmp_path / "page_00001.jpg").verify()


def test_killed_run_never_leaves_json_without_its_image(tmp_path, monkeypatch):
    out = tmp_path / "pages"
    generate_pages(out, count=3, seed=5, fonts=FONTS, **SMALL)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save = Image.Image.save
    calls = {"n": 0}

    def flaky_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed while writing page 1")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        generate_pages(out, count=3, seed=6, fonts=FONTS, **SMALL)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier set, whole
    partial = tmp_path / "pages.partial"
    assert sorted(p.name for p in partial.iterdir()) == ["page_00000.jpg", "page_00000.json"]
    for path in partial.glob("*.json"):
        assert path.with_suffix(".jpg").is_file(), path


KILLED_PAGES = """
import os, signal, sys
from training.data import synth_pages
real = synth_pages.write_page
def write_page(*args, **kwargs):
    real(*args, **kwargs)
    if args[1].name == "page_00001.json":
        os.kill(os.getpid(), signal.SIGKILL)
synth_pages.write_page = write_page
synth_pages.generate_pages(sys.argv[1], count=4, seed=int(sys.argv[2]), fonts=["NanumGothic.ttf"],
                           width=480, height=360, font_size=(14, 22), progress=False)
"""


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_killed_run_over_another_seed_leaves_that_set_whole_and_resumes_only_its_own(tmp_path, capfd):
    import subprocess
    import sys

    small = dict(fonts=["NanumGothic.ttf"], width=480, height=360, font_size=(14, 22), progress=False)
    ref = {seed: _files(generate_pages(tmp_path / f"ref{seed}", count=4, seed=seed, **small)[0].parent)
           for seed in (1, 2)}
    out = tmp_path / "set"

    def killed(seed: int) -> None:
        done = subprocess.run([sys.executable, "-c", KILLED_PAGES, str(out), str(seed)],
                              cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == -9

    generate_pages(out, count=4, seed=1, **small)
    killed(2)
    assert _files(out) == ref[1]  # was: pages 0-1 of seed 2 beside pages 2-3 of seed 1
    generate_pages(out, count=4, seed=1, **small)  # other settings than the partial set's: started over
    assert _files(out) == ref[1] and not (tmp_path / "set.partial").exists()
    killed(2)
    capfd.readouterr()
    generate_pages(out, count=4, seed=2, **small)  # the same settings: the two pages drawn are kept
    assert f"synth-pages: resuming {out}.partial: 2 of 4 pages kept from a killed run" in capfd.readouterr().err
    assert _files(out) == ref[2] and not (tmp_path / "set.partial").exists()


CUT_BY_A_LIMIT = """
import resource, sys
from training.data.synth_pages import generate_pages
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))  # ulimit -f
try:
    generate_pages(sys.argv[1], count=2, seed=5, fonts=["NanumGothic.ttf"], width=480, height=360,
                   font_size=(14, 22), progress=False)
except OSError as exc:
    print(exc.errno, exc.filename)
"""


def test_an_image_cut_short_by_a_file_size_limit_fails_naming_it_and_publishes_nothing(tmp_path):
    """Was: Pillow's JPEG encoder ignores a short write, so under ``ulimit -f`` (or on a disk that filled
    mid-image) each image was cut at the limit without an error, its JSON written whole beside it, and
    the set published as finished: pages whose image ends half-way."""
    import errno
    import subprocess
    import sys

    small = dict(fonts=["NanumGothic.ttf"], width=480, height=360, font_size=(14, 22), progress=False)
    ref = generate_pages(tmp_path / "ref", count=2, seed=5, **small)
    limit = max(p.stat().st_size for p in ref) + 1  # every JSON fits under it, no image does
    assert limit < min(p.with_suffix(".jpg").stat().st_size for p in ref)
    out = tmp_path / "set"
    done = subprocess.run([sys.executable, "-c", CUT_BY_A_LIMIT, str(out), str(limit)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(errno.EFBIG), str(tmp_path / "set.partial" / "page_00000.jpg")]
    assert not out.exists() and not list((tmp_path / "set.partial").iterdir())  # no cut image, no page
    generate_pages(out, count=2, seed=5, **small)  # room again: the same set as uninterrupted
    assert _files(out) == _files(ref[0].parent)


def test_a_folder_holding_other_files_is_refused_never_replaced(tmp_path):
    from kocr.atomic import OutFolderError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutFolderError, match=r"holds 'notes.txt' \(1 such\), which synth-pages does not write"):
        generate_pages(tmp_path, count=1, seed=0, fonts=FONTS, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_the_command_refuses_such_a_folder_before_its_mlflow_run(tmp_path, monkeypatch, capsys):
    """Was: kocr synth-pages found the folder of the user's only inside generate_pages, with its run
    started, so each refusal left a FAILED sample run (and a FAILED parent) in MLflow; synth-lines,
    prepare-aihub and import-crops refuse their --out before a run."""
    import os

    import mlflow

    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(f"sample: {{fonts: {FONTS}}}\n", encoding="utf-8")
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "notes.txt").write_text("mine")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])

    def sample_runs() -> list[str]:
        return [r.info.run_id for r in mlflow.search_runs(search_all_experiments=True, output_format="list",
                                                          filter_string="tags.`kocr.stage` = 'sample'")]

    before = sample_runs()
    assert main(["synth-pages", "--out", "own", "--count", "1"]) == 2
    assert "holds 'notes.txt' (1 such), which synth-pages does not write" in capsys.readouterr().err
    assert sample_runs() == before
    assert [p.name for p in (tmp_path / "own").iterdir()] == ["notes.txt"]


# -- page content ------------------------------------------------------------------------------

def test_json_parses_and_matches_image(pages_dir):
    for path, page, image in _pages(pages_dir):
        assert page.image_name == path.with_suffix(".jpg").name
        with Image.open(pages_dir / page.image_name) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert (page.width, page.height) == im.size == (480, 360)
        assert page.category in CATEGORIES
        for key in ("image.make.code", "image.make.year"):
            assert isinstance(page.extra[key], str) and page.extra[key]
        raw = json.loads(path.read_text(encoding="utf-8"))
        for ann in raw["annotations"]:
            assert all(isinstance(v, int) for v in ann["annotation.bbox"]), ann
        assert len(page.words) >= 3


def test_boxes_inside_positive_and_disjoint(pages_dir):
    for path, page, _ in _pages(pages_dir):
        boxes = [w.bbox for w in page.words]
        for x, y, w, h in boxes:
            assert w >= 1 and h >= 1, (path.name, (x, y, w, h))
            assert x >= 0 and y >= 0 and x + w <= page.width and y + h <= page.height
        for i, (ax, ay, aw, ah) in enumerate(boxes):
            for bx, by, bw, bh in boxes[i + 1:]:
                overlap = min(ax + aw, bx + bw) > max(ax, bx) and min(ay + ah, by + bh) > max(ay, by)
                assert not overlap, (path.name, (ax, ay, aw, ah), (bx, by, bw, bh))


def test_words_are_clean_and_in_charset(pages_dir):
    texts = [w.text for _, page, _ in _pages(pages_dir) for w in page.words]
    assert len(texts) >= 30
    for text in texts:
        assert text and text == unicodedata.normalize("NFC", text) and text == text.strip()
        assert not any(c.isspace() for c in text), text
        assert not CHARSET.missing(text), text
    hangul = sum(has_hangul(t) for t in texts) / len(texts)
    assert hangul > 0.6, hangul
    assert any(any(c.isdigit() for c in t) for t in texts)  # numbers and dates appear too


def test_boxes_sit_on_ink(pages_dir):
    for path, page, image in _pages(pages_dir):
        free = np.ones(image.shape, bool)
        for w in page.words:
            x, y, bw, bh = map(int, w.bbox)
            free[y:y + bh, x:x + bw] = False
        background = float(np.median(image[free]))
        assert background > 180, (path.name, background)
        for w in page.words:
            x, y, bw, bh = map(int, w.bbox)
            crop = image[y:y + bh, x:x + bw]
            # thin strokes cover little of their box, so the mean margin is modest; the share
            # of clearly dark pixels and the darkest stroke show that real text sits inside
            assert crop.mean() < background - 8, (path.name, w.text, crop.mean(), background)
            assert (crop < background - 60).mean() > 0.03, (path.name, w.text)
            assert crop.min() < background - 80, (path.name, w.text)
            # tight boxes: the outer band of each box still holds ink on every side
            band_h, band_w = max(2, bh // 6), max(2, bw // 6)
            for side in (crop[:band_h], crop[-band_h:], crop[:, :band_w], crop[:, -band_w:]):
                assert side.min() < background - 25, (path.name, w.text, w.bbox)


def test_default_page_has_a_document_sized_word_count(tmp_path):
    paths = generate_pages(tmp_path, count=3, seed=0, fonts=FONTS, progress=False)
    counts = [len(read_page(p).words) for p in paths]
    assert all(8 <= n <= 50 for n in counts), counts
    with Image.open(tmp_path / "page_00000.jpg") as im:
        assert im.size == (1000, 700)


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="font_size"):
        generate_pages(tmp_path, 1, 0, FONTS, font_size=(30, 20), progress=False)
    with pytest.raises(ValueError, match="charset"):
        generate_pages(tmp_path, 1, 0, FONTS, charset_name="no_such_charset", progress=False)


# -- fonts -------------------------------------------------------------------------------------

def test_find_fonts_names_pattern_when_nothing_matches(tmp_path):
    with pytest.raises(ValueError, match="NoSuchFontXyz") as info:
        find_fonts(["NoSuchFontXyz*.ttf"])
    assert "/usr/share/fonts" in str(info.value)
    with pytest.raises(ValueError, match="NanumGothic"):
        find_fonts(["NanumGothic.ttf"], font_dirs=[str(tmp_path)])


def test_find_fonts_matches_case_insensitively_and_dedups():
    faces = find_fonts(["nanumgothic.TTF", "NanumGothic.ttf"])
    assert len(faces) == 1 and Path(faces[0].path).name == "NanumGothic.ttf"
    assert faces[0].index == 0 and faces[0].name


def test_handwriting_pattern_resolves():
    faces = find_fonts(["NanumPen*"])
    assert any(Path(f.path).name == "NanumPen.ttf" for f in faces)
    assert all(covers(f, "서울특별시") for f in faces)


def test_noto_cjk_collection_uses_korean_face():
    try:
        faces = find_fonts(["NotoSansCJK-Regular.ttc"])
    except ValueError:
        pytest.skip("fonts-noto-cjk not installed")
    assert faces[0].index == 1 and "KR" in faces[0].name
    assert covers(faces[0], "한국어") and load_font(faces[0], 20).getbbox("한")[2] > 0


def test_covers_reports_missing_glyphs():
    gothic = find_fonts(["NanumGothic.ttf"])[0]
    assert covers(gothic, "한글 등록번호: 1,250")
    assert covers(gothic, " ")
    assert not covers(gothic, "😀")
    assert not covers(gothic, "서울😀")
    myeongjo = find_fonts(["NanumMyeongjo.ttf"])[0]
    assert not covers(myeongjo, "漢")  # this face has no Hanja
    assert not covers(FontFace(gothic.path), "\u0e01")  # Thai


# -- lexicon -----------------------------------------------------------------------------------

def test_lexicon_is_in_charset_and_weighted():
    words, weights = load_lexicon(CHARSET, top_n=5000)
    assert len(words) == len(weights) > 1000
    assert len(set(words)) == len(words)
    assert all(len(w) >= 2 and has_hangul(w) and not CHARSET.missing(w) for w in words)
    assert abs(sum(weights) - 1.0) < 1e-9 and min(weights) > 0
    assert weights[0] / weights[-1] < 1000  # flattened: the head does not swamp the tail


def test_make_token_is_deterministic_and_varied():
    words, weights = load_lexicon(CHARSET, top_n=5000)
    one = [make_token(random.Random(7), words, weights, CHARSET) for _ in range(3)]
    assert len(set(one)) == 1
    rng_a, rng_b = random.Random(42), random.Random(42)
    a = [make_token(rng_a, words, weights, CHARSET) for _ in range(2000)]
    b = [make_token(rng_b, words, weights, CHARSET) for _ in range(2000)]
    assert a == b
    assert all(t and not any(c.isspace() for c in t) and not CHARSET.missing(t) for t in a)
    share = lambda pred: sum(map(pred, a)) / len(a)  # noqa: E731
    lexicon = set(words)
    assert 0.35 < share(lambda t: t in lexicon) < 0.85
    assert 0.03 < share(lambda t: any(c.isdigit() for c in t)) < 0.35
    assert 0.01 < share(lambda t: t.isascii() and any(c.isalpha() for c in t)) < 0.15
    assert 0.03 < share(lambda t: has_hangul(t) and any(c in "():,.\"'[]<>" for c in t)) < 0.3
    assert share(has_hangul) > 0.75


def test_tokens_uncovered_by_a_font_are_redrawn(tmp_path, monkeypatch):
    real = synth_pages.covers
    monkeypatch.setattr(synth_pages, "covers", lambda face, text: real(face, text) and "이" not in text)
    paths = generate_pages(tmp_path, count=2, seed=9, fonts=["NanumGothic.ttf"], **SMALL)
    texts = [w.text for p in paths for w in read_page(p).words]
    assert texts and not any("이" in t for t in texts)


# -- scan wear and contact sheet -----------------------------------------------------------------

def test_degrade_changes_images_but_never_the_labels(tmp_path):
    generate_pages(tmp_path / "clean", count=2, seed=4, fonts=FONTS, **SMALL)
    generate_pages(tmp_path / "off", count=2, seed=4, fonts=FONTS, degrade="off", **SMALL)
    generate_pages(tmp_path / "worn", count=2, seed=4, fonts=FONTS,
                   degrade={"preset": "strong", "noise": {"p": 1, "sigma": [6, 6]}}, **SMALL)
    for name in ("page_00000", "page_00001"):
        clean = (tmp_path / "clean" / f"{name}.jpg").read_bytes()
        assert (tmp_path / "off" / f"{name}.jpg").read_bytes() == clean
        assert (tmp_path / "worn" / f"{name}.json").read_bytes() == (tmp_path / "clean" / f"{name}.json").read_bytes()
        a = np.asarray(Image.open(tmp_path / "clean" / f"{name}.jpg").convert("L"), np.float32)
        b = np.asarray(Image.open(tmp_path / "worn" / f"{name}.jpg").convert("L"), np.float32)
        assert (b - a).std() > 4  # the forced sensor noise at least
        assert abs(b.mean() - a.mean()) < 15  # still the same page


def test_bad_degrade_setting_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="sample.degrade: unknown effect 'smear'"):
        generate_pages(tmp_path, 1, 0, FONTS, degrade={"smear": 0.5}, progress=False)


def test_contact_sheet_of_pages(tmp_path):
    generate_pages(tmp_path, count=3, seed=2, fonts=FONTS, contact_sheet=2, **SMALL)
    with Image.open(tmp_path / "contact_sheet.png") as sheet:
        rgb = np.asarray(sheet.convert("RGB")).astype(int)
        assert sheet.width == 2 * (360 + 12)  # two thumbnails side by side
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    assert red.sum() > 200  # word boxes outlined
    generate_pages(tmp_path, count=3, seed=2, fonts=FONTS, **SMALL)
    assert not (tmp_path / "contact_sheet.png").exists()  # a run without a sheet drops the stale one


def test_prepare_takes_the_contact_sheet_for_what_it_is(tmp_path):
    import json

    from training.data.prepare import PrepareConfig, prepare_pages

    generate_pages(tmp_path / "pages", count=3, seed=2, fonts=FONTS, contact_sheet=2, **SMALL)
    prepare_pages(tmp_path / "pages", tmp_path / "prepared", PrepareConfig(), progress=False)
    report = json.loads((tmp_path / "prepared" / "report.json").read_text(encoding="utf-8"))
    assert "contact_sheet.png" not in json.dumps(report)  # not a page image without a label
