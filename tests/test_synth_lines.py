"""kocr synth-lines: LMDB output, determinism across seeds and worker counts, glyph coverage, knobs."""

from __future__ import annotations

import math
import random
import shutil
import unicodedata
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
from PIL import Image

from training.charset import Charset
from training.data.degrade import EFFECTS as _EFFECTS
from training.data.fonts import covers, find_fonts, subset_font
from training.data.lexicon import has_hangul
from training.data import synth_lines
from training.data.lmdb_store import LmdbDataset
from training.data.synth_lines import (LinesConfig, SynthConfigError, _ink_mask, add_edge_piece, add_rules,
                                       add_streak, bend, bend_strokes, clip_edge, colour_levels, embolden, generate_lines,
                                       glyph_jitter, load_texts, rotate, warp)

try:
    find_fonts(["NanumGothic.ttf", "UnBatang.ttf"])
except ValueError:  # pragma: no cover - only on machines without the Korean font packages
    pytest.skip("Korean fonts (fonts-nanum, fonts-unfonts-core) are not installed", allow_module_level=True)

FONTS = ["NanumGothic.ttf", "NanumMyeongjo.ttf", "NanumPen.ttf", "UnPilgi.ttf"]
CHARSET = Charset.named("korean_g2")
PLAIN = dict(degrade="off", distortion={"none": 1}, skew=0, margins=0, backgrounds={"white": 1})


def _config(**kw) -> LinesConfig:
    base = dict(count=24, seed=3, fonts=FONTS, workers=1, contact_sheet=8)
    base.update(kw)
    return LinesConfig.from_params(base)


def _cmap(face) -> set[int]:
    from fontTools.ttLib import TTFont

    with TTFont(face.path, fontNumber=face.index, lazy=True) as font:
        return set(font.getBestCmap())


def _manifest(out: Path) -> list[dict[str, str]]:
    lines = (out / "manifest.tsv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    assert header == ["index", "font", "background", "label"]
    return [dict(zip(header, line.split("\t", 3))) for line in lines[1:]]


@pytest.fixture(scope="module")
def lines_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lines") / "set"
    generate_lines(out, _config(count=60, words_per_line=[1, 3], max_chars=20), progress=False)
    return out


# -- output layout -----------------------------------------------------------------------------

def test_standard_lmdb_layout_with_nfc_labels(lines_set):
    env = lmdb.open(str(lines_set), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(b"num-samples") == b"60"
        keys = [k for k, _ in txn.cursor()]
    env.close()
    expected = {b"num-samples"} | {b"%s-%09d" % (kind, i) for kind in (b"image", b"label") for i in range(1, 61)}
    assert set(keys) == expected  # 1-based, contiguous, nothing else
    ds = LmdbDataset(lines_set)
    rows = _manifest(lines_set)
    assert [r["index"] for r in rows] == [str(i) for i in range(1, 61)]
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.dtype == np.uint8 and image.shape[0] == 64 and image.shape[1] >= 8
        assert label == unicodedata.normalize("NFC", label) == label.strip() and "  " not in label
        assert not CHARSET.missing(label), label
        assert 1 <= len(label.split(" ")) <= 3 and len(label) <= 20
        assert rows[i]["label"] == label
        assert covers(find_fonts([rows[i]["font"]])[0], label)
    labels = [ds.label(i) for i in range(len(ds))]
    assert sum(map(has_hangul, labels)) > 0.6 * len(labels)
    assert any(any(c.isdigit() for c in t) for t in labels)  # numbers and dates in the mix
    assert any(" " in t for t in labels) and any(" " not in t for t in labels)
    assert len({r["font"] for r in rows}) >= 3  # print and handwriting faces both used


def test_image_shows_dark_text_on_light_paper(lines_set):
    ds = LmdbDataset(lines_set)
    for i in range(10):
        image, label = ds[i]
        paper = np.percentile(image, 90)
        assert paper > 150, (label, paper)
        assert image.min() < paper - 60, label  # ink present
        assert (image < paper - 40).mean() < 0.6, label  # mostly paper


def test_invert_draws_light_text_on_a_dark_ground_for_its_share_only(tmp_path):
    plain = tmp_path / "plain"
    generate_lines(plain, _config(count=12, **PLAIN), progress=False)
    inverted = tmp_path / "inverted"
    generate_lines(inverted, _config(count=12, invert=1.0, **PLAIN), progress=False)
    a, b = LmdbDataset(plain), LmdbDataset(inverted)
    for i in range(len(a)):
        (pa, la), (pb, lb) = a[i], b[i]
        assert la == lb and pa.shape == pb.shape  # same text and geometry, only the tone flips
        assert np.median(pa) > 200 and np.median(pb) < 55, la
        assert np.abs(pb.astype(int) - (255 - pa.astype(int))).max() <= 1
    mixed = tmp_path / "mixed"
    generate_lines(mixed, _config(count=40, invert=0.5, **PLAIN), progress=False)
    dark = sum(np.median(LmdbDataset(mixed)[i][0]) < 128 for i in range(40))
    assert 8 <= dark <= 32
    with pytest.raises(SynthConfigError, match="synth_lines.invert"):
        _config(invert=1.5)


@pytest.mark.parametrize("key, value", [("distortion_amplitude", [float("nan"), 4.0]),
                                        ("distortion_period", [float("nan"), 6.0]),
                                        ("letter_spacing_em", ["nan", 0.1]),
                                        ("words_per_line", [1, float("inf")])])
def test_a_range_that_is_not_finite_is_named_when_read_not_mid_run(key, value):
    # was: NaN passed every range check (a comparison with NaN is False), and a render worker failed on it
    # with "ValueError: cannot convert float NaN to integer"; int(inf) raised an OverflowError traceback
    with pytest.raises(SynthConfigError, match=f"synth_lines.{key}: expected \\[lo, hi\\]"):
        _config(**{key: value})


@pytest.mark.parametrize("key, value", [("backgrounds", {"white": 1.0, "noise": float("nan")}),
                                        ("backgrounds", {"white": float("inf")}),
                                        ("distortion", {"none": 1e308, "sine": 1e308})])
def test_a_kind_weight_that_is_not_finite_is_named_when_read_not_mid_run(key, value):
    # was: accepted (NaN passes `v < 0` and `sum <= 0`), and the render worker stopped on
    # random.choices' "ValueError: Total of weights must be finite"
    with pytest.raises(SynthConfigError, match=f"synth_lines.{key}: weights must be finite"):
        _config(**{key: value})


def test_contact_sheet_grid(lines_set):
    with Image.open(lines_set / "contact_sheet.png") as sheet:
        assert sheet.format == "PNG"
        width, height = sheet.size
        grey = np.asarray(sheet.convert("L"))
    assert width == 4 * (256 + 12)
    assert height == 2 * (64 + 16 + 18)  # 8 samples in two rows of four, each with a caption line
    caption_band = grey[6 + 64 + 6:6 + 64 + 6 + 16, 6:6 + 256]
    assert (caption_band < 100).any()  # the label is printed under the first sample


# -- determinism -------------------------------------------------------------------------------

def test_same_seed_identical_bytes_other_seed_differs(tmp_path):
    config = _config()
    generate_lines(tmp_path / "a", config, progress=False)
    generate_lines(tmp_path / "b", config, progress=False)
    generate_lines(tmp_path / "c", _config(seed=4), progress=False)
    for name in ("data.mdb", "manifest.tsv", "contact_sheet.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "data.mdb").read_bytes() != (tmp_path / "c" / "data.mdb").read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_worker_count_does_not_change_the_set(tmp_path):
    generate_lines(tmp_path / "one", _config(count=40, workers=1, degrade="strong"), progress=False)
    generate_lines(tmp_path / "two", _config(count=40, workers=2, degrade="strong"), progress=False)
    for name in ("data.mdb", "manifest.tsv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def _killed_after(monkeypatch, samples: int, commit_every: int = 8) -> None:
    """Commit every ``commit_every`` samples and stop the run (Ctrl-C) when sample ``samples`` is drawn."""
    import functools

    import training.data.synth_lines as synth

    real = synth.iter_samples

    def interrupted(config, start=0, stop=None, workers=None):
        for i, sample in enumerate(real(config, start, stop, workers), start=start):
            if i == samples:
                raise KeyboardInterrupt
            yield sample

    monkeypatch.setattr(synth, "iter_samples", interrupted)
    monkeypatch.setattr(synth, "LmdbWriter", functools.partial(synth.LmdbWriter, commit_every=commit_every))


def test_a_killed_run_resumes_with_the_same_samples(tmp_path, monkeypatch):
    from training.data.lmdb_store import lmdb_digest

    config = _config(count=40, degrade="strong")
    reference = generate_lines(tmp_path / "ref", config, progress=False)
    with monkeypatch.context() as patch:
        _killed_after(patch, 21)  # 16 samples committed, 21 manifest rows in the buffer or on disk
        with pytest.raises(KeyboardInterrupt):
            generate_lines(tmp_path / "set", config, progress=False)
    assert (tmp_path / "set.partial" / "data.mdb").is_file() and not (tmp_path / "set").exists()
    with monkeypatch.context() as patch:  # a second kill, after the manifest lost rows the LMDB kept
        _killed_after(patch, 30)
        manifest = tmp_path / "set.partial" / "manifest.tsv"
        manifest.write_text("".join(manifest.read_text(encoding="utf-8").splitlines(True)[:11]), encoding="utf-8")
        with pytest.raises(KeyboardInterrupt):
            generate_lines(tmp_path / "set", config, progress=False)
    resumed = generate_lines(tmp_path / "set", config, progress=False)
    assert resumed["resumed"] == 24  # 10 kept from the first kill, 24 committed by the second
    assert lmdb_digest(tmp_path / "set") == lmdb_digest(tmp_path / "ref")
    for name in ("manifest.tsv", "contact_sheet.png"):
        assert (tmp_path / "set" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert {k: resumed[k] for k in ("fonts", "backgrounds")} == {k: reference[k] for k in ("fonts", "backgrounds")}
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert not (tmp_path / "set.partial").exists()


def test_a_killed_run_of_other_knobs_or_a_smaller_count_is_not_mixed_in(tmp_path, monkeypatch):
    from training.data.lmdb_store import lmdb_digest

    with monkeypatch.context() as patch:
        _killed_after(patch, 20)
        with pytest.raises(KeyboardInterrupt):
            generate_lines(tmp_path / "set", _config(count=40), progress=False)
    other = generate_lines(tmp_path / "set", _config(count=40, skew=0), progress=False)
    assert other["resumed"] == 0  # another skew draws other images: started over
    assert lmdb_digest(tmp_path / "set") == lmdb_digest(generate_lines(tmp_path / "o", _config(count=40, skew=0),
                                                                        progress=False)["out"])
    with monkeypatch.context() as patch:
        _killed_after(patch, 20)
        with pytest.raises(KeyboardInterrupt):
            generate_lines(tmp_path / "small", _config(count=40), progress=False)
    smaller = generate_lines(tmp_path / "small", _config(count=12), progress=False)
    assert smaller["resumed"] == 12 and lmdb_digest(tmp_path / "small")[0] == 12
    assert lmdb_digest(tmp_path / "small") == lmdb_digest(generate_lines(tmp_path / "s12", _config(count=12),
                                                                          progress=False)["out"])


def test_faces_cut_to_the_charset_draw_the_same_set_byte_for_byte(tmp_path):
    # EunjinNakseo and NanumMyeongjo store side bearings that differ from their outlines' bounds, so
    # a cut that recomputes bounds moves glyphs; the Noto collection's Korean face is its second
    names = ["EunjinNakseo.ttf", "NanumMyeongjo.ttf", "NotoSansCJK-Bold.ttc"]
    try:
        faces = find_fonts(names)
    except ValueError:  # pragma: no cover - only on machines without fonts-alee / fonts-noto-cjk
        pytest.skip("EunjinNakseo (fonts-alee) or Noto Sans CJK (fonts-noto-cjk) is not installed")
    (tmp_path / "cut").mkdir()
    for face in {Path(f.path) for f in faces}:
        subset_font(face, tmp_path / "cut" / face.name, CHARSET.chars + " ")
        assert (tmp_path / "cut" / face.name).stat().st_size < face.stat().st_size / 3
    kw = dict(count=60, fonts=names, words_per_line=[1, 3], contact_sheet=0)
    generate_lines(tmp_path / "whole", _config(**kw), progress=False)
    generate_lines(tmp_path / "cut-set", _config(**kw, font_dirs=[str(tmp_path / "cut")]), progress=False)
    assert {r["font"] for r in _manifest(tmp_path / "cut-set")} == set(names)
    for name in ("data.mdb", "manifest.tsv"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "cut-set" / name).read_bytes(), name


CUT_FONT_UNDER_A_LIMIT = """
import resource, sys
from training.data.fonts import subset_font
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))  # ulimit -f
try:
    subset_font(sys.argv[1], sys.argv[2], "가나다라마바사 ")
except OSError as exc:
    print(exc.errno, exc.filename)
"""


def test_a_font_cut_short_by_a_file_size_limit_fails_naming_it_and_leaves_the_earlier_file(tmp_path):
    """Was: under ``ulimit -f`` (or on a disk that filled) fontTools' save raised EFBIG naming no file
    and left the font cut at the limit under ``dst``, where synth-lines' ``font_dirs`` would pick it up."""
    import errno
    import subprocess
    import sys

    src = find_fonts(["NanumMyeongjo.ttf"])[0].path
    whole = tmp_path / "whole.ttf"
    subset_font(src, whole, "가나다라마바사 ")
    dst = tmp_path / "cut" / "NanumMyeongjo.ttf"
    dst.parent.mkdir()
    dst.write_bytes(b"an earlier cut")
    limit = whole.stat().st_size // 2
    done = subprocess.run([sys.executable, "-c", CUT_FONT_UNDER_A_LIMIT, src, str(dst), str(limit)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(errno.EFBIG), str(dst)]
    assert dst.read_bytes() == b"an earlier cut" and [p.name for p in dst.parent.iterdir()] == [dst.name]


KILLED_BEFORE_THE_RENAME = """
import os, signal, sys
from training.data.fonts import subset_font
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # kill -9 (the OOM killer) before the rename
subset_font(sys.argv[1], sys.argv[2], "가나다라 ")
"""


def test_a_font_a_killed_subset_font_left_in_its_hidden_folder_is_no_face(tmp_path):
    """Was: a subset_font killed (SIGKILL) while writing left its font in atomic_path's hidden folder
    beside dst (``.NAME.TAG-PID.HEX.tmp/NAME``, cut short when killed mid-write), and find_fonts, which
    walks font_dirs recursively, took it as a second face of dst's folder, until a later write there
    swept it."""
    import subprocess
    import sys

    src = find_fonts(["NanumMyeongjo.ttf"])[0].path
    dst = tmp_path / "cut" / "NanumMyeongjo.ttf"
    subset_font(src, dst, "가나다 ")
    done = subprocess.run([sys.executable, "-c", KILLED_BEFORE_THE_RENAME, src, str(dst)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert [p.name for p in dst.parent.iterdir() if p.is_dir()]  # the killed writer's folder is there
    assert [f.path for f in find_fonts(["*.ttf"], [dst.parent])] == [str(dst)]


# -- glyph coverage ----------------------------------------------------------------------------

def test_string_is_never_drawn_in_a_font_missing_a_glyph(tmp_path):
    # NanumMyeongjo has no Hanja, UnBatang has them: "漢字" may only ever come out of UnBatang
    myeongjo, batang = find_fonts(["NanumMyeongjo.ttf"])[0], find_fonts(["UnBatang.ttf"])[0]
    assert not covers(myeongjo, "漢") and covers(batang, "漢")
    charset = tmp_path / "ko_hanja.txt"
    charset.write_text(CHARSET.chars + "漢字", encoding="utf-8")
    texts = tmp_path / "texts.txt"
    texts.write_text("漢字\n서울 漢字\n서울\n", encoding="utf-8")
    generate_lines(tmp_path / "set", _config(count=40, fonts=["NanumMyeongjo.ttf", "UnBatang.ttf"],
                                             text_file=str(texts), charset_name=str(charset),
                                             words_per_line=[1, 1]), progress=False)
    rows = _manifest(tmp_path / "set")
    hanja = [r for r in rows if "漢" in r["label"]]
    assert hanja and all(r["font"] == "UnBatang.ttf" for r in hanja)
    assert any(r["font"] == "NanumMyeongjo.ttf" for r in rows)  # it still draws what it covers
    assert {r["label"] for r in rows} == {"漢字", "서울 漢字", "서울"}


def test_a_backslash_is_never_drawn_by_a_face_that_draws_it_as_won_or_slash(tmp_path):
    # Korean faces keep KS X 1003's won sign at U+005C; a label "\\" drawn there would teach ₩ -> \\
    won, slash, true = (find_fonts([name])[0] for name in ("NanumGothic.ttf", "BMHANNAPro.ttf", "UnDotum.ttf"))
    assert 0x5C in _cmap(won) and 0x5C in _cmap(slash)
    assert not covers(won, "C:\\") and not covers(slash, "C:\\") and covers(true, "C:\\")
    texts = tmp_path / "texts.txt"
    texts.write_text("C:\\문서\\보고서\n", encoding="utf-8")
    generate_lines(tmp_path / "set", _config(count=12, fonts=["NanumGothic.ttf", "BMHANNAPro.ttf", "UnDotum.ttf"],
                                             text_file=str(texts), words_per_line=[1, 1]), progress=False)
    assert {r["font"] for r in _manifest(tmp_path / "set")} == {"UnDotum.ttf"}


def test_a_tilde_is_never_drawn_by_a_face_that_draws_it_as_a_dash(tmp_path):
    # Baekmuk Dotum maps U+007E to a flat dash: a label "~" drawn there would teach dash -> ~
    dash, wave = (find_fonts([name])[0] for name in ("dotum.ttf", "gulim.ttf"))
    if "baekmuk" not in dash.path or "baekmuk" not in wave.path:
        pytest.skip("needs fonts-baekmuk (scripts/install_system_deps.sh)")
    assert 0x7E in _cmap(dash) and 0x7E in _cmap(wave)
    assert not covers(dash, "9~18시") and covers(wave, "9~18시") and covers(dash, "9-18시")
    texts = tmp_path / "texts.txt"
    texts.write_text("9~18시\n", encoding="utf-8")
    generate_lines(tmp_path / "set", _config(count=12, fonts=["dotum.ttf", "gulim.ttf"], text_file=str(texts),
                                             words_per_line=[1, 1]), progress=False)
    assert {r["font"] for r in _manifest(tmp_path / "set")} == {"gulim.ttf"}


def test_text_no_font_can_draw_is_an_error(tmp_path):
    charset = tmp_path / "ko_hanja.txt"
    charset.write_text(CHARSET.chars + "漢字", encoding="utf-8")
    texts = tmp_path / "texts.txt"
    texts.write_text("漢字\n", encoding="utf-8")
    with pytest.raises(SynthConfigError, match="NanumMyeongjo"):
        generate_lines(tmp_path / "set", _config(count=2, fonts=["NanumMyeongjo.ttf"], text_file=str(texts),
                                                 charset_name=str(charset)), progress=False)
    assert not (tmp_path / "set").exists() and not (tmp_path / "set.partial").exists()


def test_text_file_lines_that_cannot_be_drawn_are_dropped_and_named(tmp_path):
    # outside the charset, or longer than max_chars (25: a label may not pass it), never drawn
    texts = tmp_path / "texts.txt"
    long = "서울특별시 종로구 세종대로 209 정부서울청사 본관"
    texts.write_text(f"서울\n漢字\n  부산   광역시 \n{long}\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="1 lines hold characters outside .*; 1 lines are longer than synth_lines"):
        generate_lines(tmp_path / "set", _config(count=12, text_file=str(texts), words_per_line=[1, 1]),
                       progress=False)
    assert {r["label"] for r in _manifest(tmp_path / "set")} == {"서울", "부산 광역시"}
    texts.write_text(f"{long}\n", encoding="utf-8")
    with pytest.raises(SynthConfigError, match="longer than synth_lines.max_chars \\(25\\)"):
        generate_lines(tmp_path / "none", _config(count=6, text_file=str(texts)), progress=False)


def test_the_command_prints_its_warnings_as_one_line_each(tmp_path, monkeypatch, capsys):
    from kocr.cli import main

    # was: "…/synth_lines.py:320: UserWarning: texts.txt: 1 lines hold …" after the progress bar's half line,
    # then the source line under it: "  ctx.texts = load_texts(config.text_file, charset, config.max_chars)"
    monkeypatch.chdir(tmp_path)
    Path("texts.txt").write_text("서울\n漢字\n", encoding="utf-8")
    Path("params.yaml").write_text("synth_lines:\n  fonts: [NanumGothic.ttf, NoSuchFace.ttf]\n  text_file: texts.txt\n"
                                   "  contact_sheet: 0\n  workers: 1\n", encoding="utf-8")
    assert main(["synth-lines", "--out", "set", "--count", "2"]) == 0
    lines = [line.strip() for line in capsys.readouterr().err.replace("\r", "\n").splitlines()]
    assert [line for line in lines if "warn" in line.lower() or "load_texts" in line or "find_fonts" in line] == [
        "kocr synth-lines: warning: params.yaml: synth_lines.fonts: font patterns ['NoSuchFace.ttf'] match no file "
        "in ['/usr/share/fonts']; the set is drawn without them (its manifest.tsv lists the faces drawn)",
        "kocr synth-lines: warning: texts.txt: 1 lines hold characters outside charset 'korean_g2'; skipped"]


def test_text_file_with_a_byte_order_mark_keeps_its_first_line(tmp_path, recwarn):
    # Notepad's BOM stuck to the first line, whose U+FEFF is outside every charset: the line was
    # dropped with a warning about out-of-charset characters the user never wrote
    texts = tmp_path / "texts.txt"
    texts.write_bytes("\ufeff서울\r\n시청\r\n".encode())
    assert load_texts(texts, Charset.named("korean_g2")) == ["서울", "시청"]
    assert not [w for w in recwarn if "outside" in str(w.message)]


def test_text_file_lines_end_at_lf_or_cr_lf_only_and_other_breaks_are_named(tmp_path):
    # str.splitlines also cut at U+2028, U+0085, form feed, …: a line holding one became two strings unsaid
    texts = tmp_path / "texts.txt"
    texts.write_bytes("서울\u2028시청\n부산\x0c광역시\r\n인천\n대구\x85중구\u2029\n".encode())
    with pytest.warns(UserWarning, match=r"texts.txt: 3 lines \(lines 1, 2, 4\) hold a line or page break .*"
                                         r"U\+000C, U\+0085, U\+2028, U\+2029"):
        got = load_texts(texts, Charset.named("korean_g2"))
    assert got == ["서울 시청", "부산 광역시", "인천", "대구 중구"]


def test_degrade_off_is_logged_as_off_as_sample_degrade_is_whatever_its_spelling():
    # synth_lines.degrade: off was logged to MLflow as {} (DegradeConfig.as_params), sample.degrade: off as off
    from kocr.tracking import param_strings
    from training.data.degrade import logged

    for value in (False, None, "off", {"preset": "off"}, {"preset": "mild", **dict.fromkeys(_EFFECTS, 0)}):
        logged_params = param_strings({"synth_lines": LinesConfig.from_params({"degrade": value}, {}).as_params()})
        assert {k: v for k, v in logged_params.items() if "degrade" in k} == {"synth_lines.degrade": "off"}
    assert logged(False) == "off"  # what sample.degrade: off logs
    mild = param_strings({"synth_lines": LinesConfig.from_params({"degrade": "mild"}, {}).as_params()})
    assert float(mild["synth_lines.degrade.jpeg.p"]) > 0  # a degradation that can happen keeps its effects


def test_weights_written_in_another_key_order_draw_the_same_set(tmp_path):
    # equal mappings are equal settings (one resume key, one DVC params value): they must draw one set
    kinds = {"white": 0.3, "noise": 0.4, "quasicrystal": 0.3}
    shapes = {"none": 0.4, "sine": 0.2, "cosine": 0.2, "random": 0.2}
    a = _config(count=12, backgrounds=kinds, distortion=shapes)
    b = _config(count=12, backgrounds=dict(reversed(kinds.items())), distortion=dict(reversed(shapes.items())))
    assert a == b
    generate_lines(tmp_path / "a", a, progress=False)
    synth_lines._CTX = None  # as in a fresh process: the cached context holds a's mapping
    generate_lines(tmp_path / "b", b, progress=False)
    assert _manifest(tmp_path / "a") == _manifest(tmp_path / "b")
    assert all(np.array_equal(LmdbDataset(tmp_path / "a")[i][0], LmdbDataset(tmp_path / "b")[i][0])
               for i in range(12))


# -- knobs ---------------------------------------------------------------------------------------

def test_height_zero_keeps_the_rendered_size_and_height_scales(tmp_path):
    generate_lines(tmp_path / "h0", _config(count=8, height=0, font_size=[40, 40], **PLAIN), progress=False)
    generate_lines(tmp_path / "h32", _config(count=8, height=32, **PLAIN), progress=False)
    natural = [LmdbDataset(tmp_path / "h0")[i][0].shape[0] for i in range(8)]
    assert all(20 <= h <= 60 for h in natural) and len(set(natural)) > 1  # ink height of 40-px type
    assert {LmdbDataset(tmp_path / "h32")[i][0].shape[0] for i in range(8)} == {32}


def test_skew_turns_the_text(tmp_path):
    straight = _config(count=6, height=0, words_per_line=[3, 3], **PLAIN)
    turned = _config(count=6, height=0, words_per_line=[3, 3], **{**PLAIN, "skew": 12},
                     random_skew=False)
    generate_lines(tmp_path / "s", straight, progress=False)
    generate_lines(tmp_path / "t", turned, progress=False)
    a, b = LmdbDataset(tmp_path / "s"), LmdbDataset(tmp_path / "t")
    for i in range(6):
        (img_a, label_a), (img_b, label_b) = a[i], b[i]
        assert label_a == label_b  # same text, only the angle differs
        # a 12-degree turn of a wide line adds about 0.2 x its width to its height
        assert img_b.shape[0] > img_a.shape[0] + 0.12 * img_a.shape[1], label_a


def test_margins_leave_paper_around_the_ink(tmp_path):
    tight = _config(count=12, height=0, **{**PLAIN, "margins": [0, 0, 0, 0]})
    roomy = _config(count=12, height=0, **{**PLAIN, "margins": [12, 12, 12, 12]})
    generate_lines(tmp_path / "tight", tight, progress=False)
    generate_lines(tmp_path / "roomy", roomy, progress=False)
    grown = []
    for (a, label_a), (b, label_b) in zip(LmdbDataset(tmp_path / "tight"), LmdbDataset(tmp_path / "roomy")):
        assert label_a == label_b
        for edge in (a[0], a[-1], a[:, 0], a[:, -1]):  # no margin: the ink box touches every edge
            assert edge.min() < a.max(), label_a  # plain white paper is one flat value
        dh, dw = b.shape[0] - a.shape[0], b.shape[1] - a.shape[1]
        assert 0 <= dh <= 24 and 0 <= dw <= 24, (label_a, dh, dw)
        grown.append(dh + dw)
    assert np.mean(grown) > 12  # each side drawn from 0..12: about 24 in all on average


def test_background_kinds(tmp_path):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    cv2.imwrite(str(pictures / "black.png"), np.zeros((40, 60), np.uint8))
    kinds = {"white": lambda e: e.std() < 0.6 and e.mean() >= 237,
             "noise": lambda e: e.std() > 2.5,
             "image": lambda e: abs(e.mean() - 150) < 1.5}  # black picture mapped to 150
    for kind, check in kinds.items():
        out = tmp_path / kind
        generate_lines(out, _config(count=6, **{**PLAIN, "margins": [10, 10, 10, 10], "backgrounds": {kind: 1}},
                                    background_images=str(pictures), font_size=[30, 30], height=0),
                       progress=False)
        assert {r["background"] for r in _manifest(out)} == {kind}
        for image, _ in LmdbDataset(out):
            top = image[:2].astype(np.float32)  # paper above the ink
            assert check(top), (kind, top.mean(), top.std())



def test_a_background_jpeg_cut_short_stops_before_anything_is_written_and_one_with_a_tail_is_drawn(tmp_path):
    # was: OpenCV's imread read its missing rows as flat grey (libjpeg's "Premature end of JPEG file" on stderr),
    # and that grey was drawn behind the text of every sample that picked the picture
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    ok, buf = cv2.imencode(".jpg", np.tile(np.linspace(0, 255, 120, dtype=np.uint8), (80, 1)))
    whole = buf.tobytes()
    (pictures / "motion.jpg").write_bytes(whole + b"\0\0\0\x18ftypmp42" + bytes(range(256)) * 4096)  # bytes after EOI
    settings = dict(count=4, **{**PLAIN, "backgrounds": {"image": 1}}, background_images=str(pictures),
                    font_size=[30, 30], height=0)
    generate_lines(tmp_path / "kept", _config(**settings), progress=False)
    assert {r["background"] for r in _manifest(tmp_path / "kept")} == {"image"}
    pictures = tmp_path / "more"  # another folder: the listing of one is kept for the process
    shutil.copytree(tmp_path / "pictures", pictures)
    (pictures / "partial.jpg").write_bytes(whole[: len(whole) * 6 // 10])  # a partial download
    settings["background_images"] = str(pictures)
    with pytest.raises(SynthConfigError, match=r"synth_lines.background_images: .*partial\.jpg: a JPEG cut short "
                                               r"\(truncated"):
        generate_lines(tmp_path / "out", _config(**settings), progress=False)
    assert not (tmp_path / "out").exists()

def test_the_command_refuses_a_background_folder_before_its_mlflow_run(tmp_path, monkeypatch, capsys):
    """Was: a JPEG cut short among the background pictures (or a folder with none) was found only inside
    generate_lines, with the synth_lines run started, so each refusal left a FAILED run and a FAILED parent
    in MLflow; the charset and fonts are checked before the run (check_sources), as synth-pages checks --out."""
    import os

    import mlflow

    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pics").mkdir()
    whole = cv2.imencode(".jpg", np.tile(np.linspace(0, 255, 120, dtype=np.uint8), (80, 1)))[1].tobytes()
    (tmp_path / "pics" / "partial.jpg").write_bytes(whole[: len(whole) * 6 // 10])  # a partial download
    (tmp_path / "empty").mkdir()
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])

    def runs() -> list[str]:
        return [r.info.run_id for r in mlflow.search_runs(search_all_experiments=True, output_format="list")]

    before = runs()
    for folder, said in (("pics", "pics/partial.jpg: a JPEG cut short (truncated"), ("empty", "no background images")):
        (tmp_path / "params.yaml").write_text(
            f"synth_lines:\n  fonts: [NanumGothic.ttf]\n  backgrounds: {{image: 1}}\n  background_images: {folder}\n"
            "  contact_sheet: 0\n  workers: 1\n", encoding="utf-8")
        assert main(["synth-lines", "--out", "set", "--count", "2"]) == 2
        assert said in capsys.readouterr().err
        assert runs() == before
        assert not (tmp_path / "set").exists()


def test_sine_warp_bends_a_straight_stroke():
    mask = np.zeros((10, 120), np.float32)
    mask[4:6] = 255
    bent = warp(mask, "sine", 3.0, 60.0, np.random.default_rng(0))
    rows = np.arange(bent.shape[0])[:, None]
    centre = (bent * rows).sum(0) / bent.sum(0)
    offset = centre - centre[0]
    assert abs(offset[15] - -3) < 0.3 and abs(offset[45] - 3) < 0.3 and abs(offset[30]) < 0.3
    assert warp(mask, "none", 3.0, 60.0, np.random.default_rng(0)) is mask


def test_rotate_keeps_all_the_ink():
    mask = np.zeros((20, 100), np.float32)
    mask[8:12, 5:95] = 255
    turned = rotate(mask, 15)
    assert turned.shape[0] > 20 + 0.2 * 90
    assert abs(turned.sum() - mask.sum()) < 0.02 * mask.sum()


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of the runs of inked columns, left to right."""
    inked = (mask > 64).any(axis=0).astype(int)
    edges = np.flatnonzero(np.diff(np.r_[0, inked, 0]))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _gaps(mask: np.ndarray) -> list[int]:
    """Widths of the runs of empty columns between inked ones."""
    runs = _runs(mask)
    return [start - stop for (_, stop), (start, _) in zip(runs, runs[1:])]


def test_letter_spacing_opens_gaps_between_letters_wider_between_words():
    face = find_fonts(["NanumGothic.ttf"])[0]
    size, tracking = 40, 20.0
    tight = _ink_mask("가나다", face, size)
    spaced = _ink_mask("가나다", face, size, tracking)
    assert abs(spaced.shape[1] - tight.shape[1] - 2 * tracking) <= 3  # two gaps, each wider by the tracking
    assert spaced.shape[0] == tight.shape[0]
    wide = [g for g in _gaps(spaced) if g >= tracking - 3]
    assert len(wide) == 2 and not [g for g in _gaps(tight) if g >= tracking - 3]  # one per pair of letters
    word = [g for g in _gaps(_ink_mask("가 나", face, size, tracking)) if g >= tracking - 3]
    assert len(word) == 1 and word[0] >= 3 * tracking - 3  # a word space is wider than letter spacing


def test_letter_spaced_set_keeps_labels_without_the_spaces(tmp_path):
    out = tmp_path / "spaced"
    config = _config(count=10, letter_spacing=1.0, letter_spacing_em=[0.6, 0.6], words_per_line=[1, 1], **PLAIN)
    generate_lines(out, config, progress=False)
    plain = tmp_path / "plain"
    generate_lines(plain, _config(count=10, words_per_line=[1, 1], **PLAIN), progress=False)
    a, b = LmdbDataset(plain), LmdbDataset(out)
    for i in range(10):
        (pa, la), (pb, lb) = a[i], b[i]
        assert la == lb and " " not in lb  # same one-word text; the drawn gaps are not in the label
        if len(la) > 1:
            assert pb.shape[1] > pa.shape[1] + 0.3 * pa.shape[0] * (len(la) - 1), la


def test_colour_levels_keep_the_gap_inside_the_grey_range():
    rng = random.Random(0)
    pairs = [colour_levels(rng, (60.0, 200.0)) for _ in range(500)]
    for ground, text in pairs:
        assert 0 <= ground <= 255 and 0 <= text <= 255
        assert abs(ground - text) >= 60 - 1e-9
    assert sum(text > ground for ground, text in pairs) > 100  # light on dark and dark on light
    assert sum(text < ground for ground, text in pairs) > 100


def test_colour_moves_ground_and_text_levels_for_its_share(tmp_path):
    out = tmp_path / "colour"
    generate_lines(out, _config(count=30, colour=1.0, colour_contrast=[80, 120], **PLAIN), progress=False)
    grounds = [float(np.median(LmdbDataset(out)[i][0])) for i in range(30)]
    assert min(grounds) < 100 and max(grounds) > 150 and np.std(grounds) > 30  # plain white is all ~255
    for i in range(30):
        image = LmdbDataset(out)[i][0].astype(float)
        ground = np.median(image)
        assert np.abs(image - ground).max() >= 70, i  # the text stands off the ground by the contrast


def test_rules_draw_lines_beside_the_text_leaving_it_intact():
    text = np.zeros((40, 100), np.float32)
    text[10:30, 20:80] = 255
    for seed in range(30):
        ruled = add_rules(text.copy(), random.Random(seed), size=40)
        assert ruled.shape[0] > 40 or ruled.shape[1] > 100  # grown by gap + thickness on some side
        assert (ruled > 0).sum() > (text > 0).sum()
        # the text block is still there, intact, somewhere in the grown mask
        found = any((ruled[r:r + 20, c:c + 60] == 255).all()
                    for r in range(ruled.shape[0] - 19) for c in range(ruled.shape[1] - 59)
                    if ruled[r, c] == 255)
        assert found, seed
        edge = np.concatenate([ruled[0], ruled[-1], ruled[:, 0], ruled[:, -1]])
        assert (edge > 0).any(), seed  # a rule sits on the outer edge


def _columns(mask: np.ndarray, min_gap: int = 14) -> list[tuple[int, int]]:
    """(start, stop) of the inked column runs split by gaps of ``min_gap`` or more: one per letter
    of a loosely set word (a syllable's own parts, as ㄱ and ㅏ in 가, sit closer)."""
    merged: list[tuple[int, int]] = []
    for a, b in _runs(mask):
        if merged and a - merged[-1][1] < min_gap:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def test_char_jitter_moves_each_letter_on_its_own_and_none_draws_the_plain_word():
    face = find_fonts(["NanumGothic.ttf"])[0]
    size, tracking, text = 40, 16.0, "가나다"
    plain = _ink_mask(text, face, size, tracking)
    still = _ink_mask(text, face, size, tracking, [(0.0, 1.0, 0.0)] * 3)
    assert abs(still.shape[1] - plain.shape[1]) <= 2 and abs(still.shape[0] - plain.shape[0]) <= 2
    assert abs(still.sum() - plain.sum()) < 0.03 * plain.sum()  # zero jitter is the plain drawing
    # the middle letter dropped by a quarter of the size: the word grows that much taller, and
    # that letter's ink starts lower than its neighbours'
    dropped = _ink_mask(text, face, size, tracking, [(0.0, 1.0, 0.0), (0.25, 1.0, 0.0), (0.0, 1.0, 0.0)])
    assert abs(dropped.shape[0] - plain.shape[0] - 0.25 * size) <= 2
    tops = [int(np.flatnonzero((dropped[:, a:b] > 64).any(axis=1))[0]) for a, b in _columns(dropped)]
    assert len(tops) == 3 and tops[1] - min(tops[0], tops[2]) >= 0.25 * size - 2
    # a bigger middle letter is wider, and a turned one covers other pixels than the upright one
    grown = _ink_mask(text, face, size, tracking, [(0.0, 1.0, 0.0), (0.0, 1.3, 0.0), (0.0, 1.0, 0.0)])
    widths = [b - a for a, b in _columns(grown)]
    plain_widths = [b - a for a, b in _columns(plain)]
    assert widths[1] >= 1.2 * plain_widths[1] and abs(widths[0] - plain_widths[0]) <= 1
    turned = _ink_mask("가", face, size, 0.0, [(0.0, 1.0, 10.0)])
    upright = _ink_mask("가", face, size, 0.0, [(0.0, 1.0, 0.0)])
    assert turned.shape != upright.shape and abs(turned.sum() - upright.sum()) < 0.05 * upright.sum()


def test_glyph_jitter_draws_within_its_amount():
    rng = random.Random(0)
    draws = [j for _ in range(200) for j in glyph_jitter(rng, 5, (0.05, 0.05))]
    shifts, scales, degrees = (np.array(v) for v in zip(*draws))
    assert 0.035 < shifts.std() < 0.065 and abs(shifts.mean()) < 0.01
    assert scales.min() >= 1 - 0.075 - 1e-9 and scales.max() <= 1 + 0.075 + 1e-9 and scales.std() > 0.03
    assert 1.5 < degrees.std() < 2.5
    assert glyph_jitter(random.Random(0), 3, (0.0, 0.0)) == [(0.0, 1.0, 0.0)] * 3


def test_streak_wipes_a_band_of_strokes_across_the_middle_and_nothing_else():
    ink = np.zeros((64, 200), np.float32)  # solid ink everywhere: the band shows where it wiped
    paper = np.full_like(ink, 200.0)
    for seed in range(40):
        out = add_streak(ink, paper, random.Random(seed), (0.04, 0.12))
        wiped = np.flatnonzero(out.min(axis=1) > 0)
        assert wiped.size and (np.diff(wiped) == 1).all(), seed  # one unbroken band ...
        assert (out[wiped] == out[wiped][:, :1]).all()  # ... crossing the image end to end
        assert 16 - 4 <= wiped.mean() <= 48 + 4, seed  # centred in the middle half
        assert 2 <= wiped.size <= 0.12 * 64 + 4, seed
        core = out[wiped].max()
        assert 0.7 * 200 - 1 <= core <= 230 + 1e-3, seed  # the strokes there fade to the lifted paper
        assert (out[np.setdiff1d(np.arange(64), wiped)] == 0).all()  # ink elsewhere untouched


def _ink_rows(mask: np.ndarray) -> np.ndarray:
    """Per column, the mean row of the ink (NaN where a column has none)."""
    rows = np.arange(mask.shape[0], dtype=np.float64)[:, None]
    weight = mask.sum(axis=0)
    return np.where(weight > 0, (mask * rows).sum(axis=0) / np.maximum(weight, 1e-9), np.nan)


@pytest.mark.parametrize("degrees", [30.0, 60.0])
def test_bend_arches_a_line_up_or_sags_it_and_keeps_its_ink(degrees):
    bar = np.zeros((12, 240), np.float32)
    bar[2:10] = 255.0  # a straight stroke along the whole line
    for sign in (1, -1):
        out = bend(bar, sign * degrees)
        centre = _ink_rows(out)
        cols = np.flatnonzero(~np.isnan(centre))
        ends = np.nanmean(np.r_[centre[cols[:20]], centre[cols[-20:]]])
        middle = np.nanmean(centre[cols[len(cols) // 2 - 10:len(cols) // 2 + 10]])
        # on a circle the ends drop below (arch) or rise above (sag) the middle by r(1 - cos(half angle))
        drop = 240 / math.radians(degrees) * (1 - math.cos(math.radians(degrees) / 2))
        assert sign * (ends - middle) == pytest.approx(drop, rel=0.25), (sign, ends, middle)
        assert out.sum() == pytest.approx(bar.sum(), rel=0.08)  # the middle row keeps its length
        assert out.shape[1] < bar.shape[1] + 8  # a chord is shorter than its arc
    assert bend(bar, 0.2) is bar  # too small to draw: the mask as it was


def test_bend_turns_short_words_less_than_asked():
    word = np.zeros((40, 60), np.float32)
    word[5:35, 5:55] = 255.0
    out = bend(word, 170.0)  # capped at width / height radians, so the inner edge keeps a radius
    assert out.max() > 0 and out.shape[0] < 3 * word.shape[0]
    assert out.sum() == pytest.approx(word.sum(), rel=0.1)


def test_edge_piece_shows_the_glyph_side_facing_the_text_flush_with_one_edge():
    text = np.zeros((40, 100), np.float32)
    text[10:30, 10:90] = 50.0
    glyph = np.tile(100.0 + np.arange(50, dtype=np.float32), (30, 1))  # each column says where it was
    sides = set()
    for seed in range(30):
        out = add_edge_piece(text, glyph, random.Random(seed), (0.2, 0.4), 40)
        grown = out.shape[1] - text.shape[1]
        left = out[:, 0].max() > 0
        sides.add(left)
        shown = np.flatnonzero((out >= 100).any(axis=0))
        k = shown.size
        assert 0.2 * 50 - 1 <= k <= 0.4 * 50 + 1, seed  # that share of the glyph's width
        edge = np.arange(k) if left else np.arange(out.shape[1] - k, out.shape[1])
        assert (shown == edge).all(), seed  # flush with the image's edge
        facing = np.arange(50 - k, 50) if left else np.arange(k)  # a neighbour on the left shows its right side
        assert (out[:, shown].max(axis=0) == 100 + facing).all(), seed
        assert 1 + k <= grown <= 10 + k, seed  # a gap of 1 to size/4 between
        x = grown if left else 0
        found = any(np.array_equal(out[r:r + 40, x:x + 100], text) for r in range(out.shape[0] - 39))
        assert found, seed  # the text is all there, unchanged
    assert sides == {True, False}


def test_bend_strokes_moves_strokes_within_the_shift_and_keeps_every_letter_in_place():
    face = find_fonts(["NanumGothic.ttf"])[0]
    size = 48
    word = _ink_mask("가나다", face, size, 16.0)  # letter-spaced: each letter its own column run
    shift = 0.08 * size
    bent = bend_strokes(word, np.random.default_rng(0), shift, size / 3)
    pad = int(math.ceil(shift)) + 1
    assert bent.shape == (word.shape[0] + 2 * pad, word.shape[1] + 2 * pad)
    placed = np.pad(word, pad)
    assert not np.array_equal(bent > 128, placed > 128)  # the strokes moved ...
    assert bent.sum() == pytest.approx(word.sum(), rel=0.15)  # ... and kept about their ink
    near = cv2.dilate((placed > 64).astype(np.uint8), np.ones((2 * pad + 1, 2 * pad + 1), np.uint8))
    assert (bent[near == 0] <= 4).all()  # no ink further from the letter than the shift
    letters, bent_letters = _columns(placed), _columns(bent)
    assert len(bent_letters) == len(letters) == 3  # the three letters stay three, in their places
    assert all(abs((a + b) / 2 - (c + d) / 2) <= shift for (a, b), (c, d) in zip(letters, bent_letters))
    again = bend_strokes(word, np.random.default_rng(0), shift, size / 3)
    assert np.array_equal(bent, again)  # the field comes from the generator it is given
    assert bend_strokes(word, np.random.default_rng(0), 0.0, size / 3) is word


def test_embolden_thickens_every_stroke_by_the_radius_and_keeps_the_letters_apart():
    face = find_fonts(["NanumGothic.ttf"])[0]
    size = 48
    word = _ink_mask("기발 ILsan", face, size, 16.0)  # letter-spaced: each letter its own column run
    heavy = embolden(word, 0.045 * size)  # radius 2 px
    assert heavy.shape == (word.shape[0] + 4, word.shape[1] + 4)  # grown so no ink is cut
    placed = np.pad(word, 2)
    inked, heavier = placed > 128, heavy > 128
    assert (heavier | ~inked).all()  # every stroke pixel stays ink ...
    assert heavier.sum() > 1.6 * inked.sum()  # ... and the strokes are much thicker (a regular face made heavy)
    near = cv2.dilate((placed > 0).astype(np.uint8), np.ones((5, 5), np.uint8))  # antialiased edges included
    assert (heavy[near == 0] == 0).all()  # no ink further out than the radius
    assert len(_columns(heavy)) == len(_columns(placed)) == 7  # 기 발 I L s a n stay apart, in place
    assert embolden(word, 0.4) is word  # under half a pixel: the face as it is


def test_clip_edge_cuts_its_share_of_the_height_off_the_top_or_the_bottom():
    mask = np.tile(np.arange(50, dtype=np.float32)[:, None], (1, 30))  # each row says where it was
    sides = set()
    for seed in range(40):
        out, side = clip_edge(mask, random.Random(seed), (0.1, 0.2))
        cut = 50 - out.shape[0]
        assert 5 <= cut <= 10 and out.shape[1] == 30, seed
        kept = np.arange(cut, 50) if side == "top" else np.arange(0, 50 - cut)
        assert (out[:, 0] == kept).all(), seed  # the rest of the text is untouched
        sides.add(side)
    assert sides == {"top", "bottom"}
    line = np.ones((1, 30), np.float32)
    assert all(clip_edge(line, random.Random(seed), (0.3, 0.3))[0].shape == (1, 30) for seed in range(4))


def _pieces(mask: np.ndarray) -> list[tuple[int, int, int]]:
    """(left, top, height) of each 8-connected piece of ink (coverage above 64), left to right."""
    count, _labels, stats, _ = cv2.connectedComponentsWithStats((mask > 64).astype(np.uint8), connectivity=8)
    return sorted((int(s[cv2.CC_STAT_LEFT]), int(s[cv2.CC_STAT_TOP]), int(s[cv2.CC_STAT_HEIGHT])) for s in stats[1:])


@pytest.mark.parametrize("text, degrees", [("흐름 2005.12.03.", -4.0), ("학내 1987.03.18", 0.0), ("학내 1987.03.18", 4.0)])
def test_clip_edge_never_wipes_out_a_small_mark_the_label_keeps(text, degrees):
    # a date's dots sit below Hangul, and on a tilted line the marks at one end sit lowest or highest:
    # a cut of 12% of the height took whole periods and hyphens off while the label kept them
    face = find_fonts(["NanumGothic.ttf"])[0]
    mask = synth_lines._crop_ink(rotate(_ink_mask(text, face, 48), degrees))
    before = _pieces(mask)
    for seed in range(30):
        out, side = clip_edge(mask, random.Random(seed), (0.12, 0.12))
        cut = mask.shape[0] - out.shape[0]
        assert len(_pieces(out)) >= len(before), (seed, side, cut)  # no piece of ink gone (a cut may split one) ...
        kept = mask[cut:] if side == "top" else mask[:mask.shape[0] - cut]
        assert np.array_equal(out, kept)  # ... and the cut is still a cut of whole rows at that side
        for _left, top, height in before:  # at least half of each piece's rows stay
            rows = range(top, top + height)
            stay = [r for r in rows if (r >= cut if side == "top" else r < mask.shape[0] - cut)]
            assert 2 * len(stay) >= height, (seed, side, cut, top, height)


def test_edge_clip_leaves_the_cut_flush_with_the_image_edge(tmp_path):
    roomy = {**PLAIN, "margins": [10, 4, 10, 4]}
    on_edge = {}
    for name, share in (("plain", 0.0), ("clip", 1.0)):
        generate_lines(tmp_path / name, _config(count=12, height=0, edge_clip=share, edge_clip_share=[0.1, 0.1],
                                                **roomy), progress=False)
        on_edge[name] = [image[0].min() < image.max() or image[-1].min() < image.max()  # ink on an edge row
                         for image, _label in LmdbDataset(tmp_path / name)]
    assert all(on_edge["clip"])  # no paper margin on the cut side
    assert sum(on_edge["plain"]) <= 4  # without it, margins of 0-10 rows mostly keep paper at both edges


@pytest.mark.parametrize("knob, on", [
    ("char_jitter", {"char_jitter": 1.0, "char_jitter_amount": [0.1, 0.1]}),
    ("streak", {"streak": 1.0, "streak_width": [0.1, 0.1]}),
    ("arc", {"arc": 1.0, "arc_degrees": [40, 40]}),
    ("edge_clutter", {"edge_clutter": 1.0, "edge_clutter_share": [0.3, 0.3]}),
    ("edge_clip", {"edge_clip": 1.0, "edge_clip_share": [0.1, 0.1]}),
    ("stroke_warp", {"stroke_warp": 1.0, "stroke_warp_amount": [0.06, 0.06]}),
    ("embolden", {"embolden": 1.0, "embolden_amount": [0.03, 0.03]}),
])
def test_a_share_knob_changes_only_its_images_and_keeps_the_labels(tmp_path, knob, on):
    generate_lines(tmp_path / "plain", _config(count=12, **PLAIN), progress=False)
    generate_lines(tmp_path / "none", _config(count=12, **{**on, knob: 0.0}, **PLAIN), progress=False)
    assert (tmp_path / "plain" / "data.mdb").read_bytes() == (tmp_path / "none" / "data.mdb").read_bytes()
    generate_lines(tmp_path / "all", _config(count=12, **on, **PLAIN), progress=False)
    plain, changed_set = LmdbDataset(tmp_path / "plain"), LmdbDataset(tmp_path / "all")
    changed = 0
    for i in range(12):
        (pa, la), (pb, lb) = plain[i], changed_set[i]
        assert la == lb  # the text drawn is the same; only how it looks changes
        changed += pa.shape != pb.shape or not np.array_equal(pa, pb)
    assert changed >= 10


def test_latin_words_replace_that_share_of_words_with_latin_script_and_leave_the_rest(tmp_path):
    generate_lines(tmp_path / "plain", _config(count=12, **PLAIN), progress=False)
    generate_lines(tmp_path / "none", _config(count=12, latin_words=0.0, **PLAIN), progress=False)
    assert (tmp_path / "plain" / "data.mdb").read_bytes() == (tmp_path / "none" / "data.mdb").read_bytes()
    generate_lines(tmp_path / "latin", _config(count=40, latin_words=1.0, **PLAIN), progress=False)
    labels = [label for _image, label in LmdbDataset(tmp_path / "latin")]
    assert len(labels) == 40 and not any(has_hangul(label) for label in labels)
    assert not any(CHARSET.missing(label) for label in labels)
    words = [w for label in labels for w in label.split(" ")]
    assert sum(w.isalpha() and w[0].isupper() and w[1:].islower() for w in words) >= 5  # Seoul-like title case
    assert sum(any(c.isdigit() for c in w) for w in words) >= 3  # measures such as 56Km
    generate_lines(tmp_path / "half", _config(count=40, latin_words=0.5, **PLAIN), progress=False)
    half = [label for _image, label in LmdbDataset(tmp_path / "half")]
    assert 0 < sum(has_hangul(label) for label in half) < 40  # the rest of the lines keep their Hangul


@pytest.mark.parametrize("params, words", [
    ({"color": 1}, "unknown keys ['color']"),
    ({"letter_spacing": -0.1}, "synth_lines.letter_spacing is a share"),
    ({"letter_spacing_em": [-1, 0.5]}, "synth_lines.letter_spacing_em must be >= 0"),
    ({"colour_contrast": [0, 300]}, "synth_lines.colour_contrast"),
    ({"rules": 2}, "synth_lines.rules is a share"),
    ({"char_jitter": 1.5}, "synth_lines.char_jitter is a share"),
    ({"char_jitter_amount": [0.1, 0.5]}, "synth_lines.char_jitter_amount must be"),
    ({"streak": -0.2}, "synth_lines.streak is a share"),
    ({"streak_width": [0, 0.1]}, "synth_lines.streak_width must be"),
    ({"arc": 1.2}, "synth_lines.arc is a share"),
    ({"arc_degrees": [0, 30]}, "synth_lines.arc_degrees must be"),
    ({"edge_clutter_share": [0.5, 1.0]}, "synth_lines.edge_clutter_share must be"),
    ({"edge_clip": 1.5}, "synth_lines.edge_clip is a share"),
    ({"edge_clip_share": [0.1, 0.5]}, "synth_lines.edge_clip_share must be"),
    ({"stroke_warp": -0.5}, "synth_lines.stroke_warp is a share"),
    ({"latin_words": 1.5}, "synth_lines.latin_words is a share"),
    ({"embolden": 2}, "synth_lines.embolden is a share"),
    ({"embolden_amount": [0.02, 0.2]}, "synth_lines.embolden_amount must be"),
    ({"stroke_warp_amount": [0.0, 0.1]}, "synth_lines.stroke_warp_amount must be"),
    ({"words_per_line": [3, 1]}, "synth_lines.words_per_line: lo 3 is above hi 1"),
    ({"backgrounds": {"image": 1}}, "background_images names no folder"),
    ({"backgrounds": {"marble": 1}}, "unknown kinds ['marble']"),
    ({"distortion": {"sine": 0, "none": 0}}, "not all 0"),
    ({"degrade": {"jpeg": 2}}, "synth_lines.degrade.jpeg"),
    ({"margins": [1, 2]}, "synth_lines.margins"),
    ({"image_format": "gif"}, "synth_lines.image_format"),
])
def test_bad_settings_name_the_key(params, words):
    with pytest.raises(SynthConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        LinesConfig.from_params(params)


def test_missing_fonts_and_charset_are_config_errors(tmp_path):
    with pytest.raises(SynthConfigError, match="NoSuchFace"):
        generate_lines(tmp_path / "x", _config(fonts=["NoSuchFace*.ttf"]), progress=False)
    with pytest.raises(SynthConfigError, match="no_such_charset"):
        generate_lines(tmp_path / "x", _config(charset_name="no_such_charset"), progress=False)


def test_jpg_format(tmp_path):
    generate_lines(tmp_path / "j", _config(count=3, image_format="jpg", contact_sheet=0), progress=False)
    env = lmdb.open(str(tmp_path / "j"), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(b"image-000000001")[:3] == b"\xff\xd8\xff"
    env.close()
    assert not (tmp_path / "j" / "contact_sheet.png").exists()


# -- command line --------------------------------------------------------------------------------

def test_cli_writes_the_set_and_reports_bad_params_in_one_line(tmp_path, monkeypatch, capsys):
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        "synth_lines:\n  count: 50\n  seed: 2\n  fonts: [NanumGothic.ttf]\n  contact_sheet: 4\n", encoding="utf-8")
    assert main(["synth-lines", "--out", "lines", "--count", "5", "--workers", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("synth-lines: wrote 5 images to lines in ")
    assert len(LmdbDataset(tmp_path / "lines")) == 5 and (tmp_path / "lines" / "contact_sheet.png").is_file()
    import mlflow

    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string="tags.`kocr.stage` = 'synth_lines'")
    # was images_per_s: train logs its rate as images_per_second, and the compare view showed two columns
    assert run.data.metrics["images_per_second"] > 0 and "images_per_s" not in run.data.metrics
    assert run.data.metrics["samples"] == 5 and run.data.metrics["resumed_samples"] == 0
    (tmp_path / "params.yaml").write_text("synth_lines:\n  skew: 50\n", encoding="utf-8")
    assert main(["synth-lines", "--out", "bad"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "kocr synth-lines: error: params.yaml: synth_lines.skew must be below 45 degrees, got 50.0"]


def test_an_out_holding_other_files_or_a_file_is_refused_never_replaced(tmp_path, monkeypatch, capsys):
    from kocr.cli import main

    # was: the set replaced the folder whole when it was published, deleting the user's files in it;
    # a file was rmtree'd at the end of the run and failed with a NotADirectoryError traceback
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("synth_lines:\n  fonts: [NanumGothic.ttf]\n  contact_sheet: 0\n",
                                          encoding="utf-8")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "scan.jpg").write_bytes(b"my scan")
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["synth-lines", "--out", "mine", "--count", "2", "--workers", "1"]) == 2
    assert main(["synth-lines", "--out", "notes.txt", "--count", "2", "--workers", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "kocr synth-lines: error: --out mine: holds 'scan.jpg' (1 such), which an LMDB set of synth-lines does "
        "not; give a new folder (a set there is replaced whole)",
        "kocr synth-lines: error: --out notes.txt: is a file; give a new folder (a set there is replaced whole)"]
    assert [p.name for p in mine.iterdir()] == ["scan.jpg"] and (mine / "scan.jpg").read_bytes() == b"my scan"
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert not (tmp_path / "mine.partial").exists()
    # a set synth-lines wrote is still replaced by the next run
    assert main(["synth-lines", "--out", "mine2", "--count", "2", "--workers", "1"]) == 0
    assert main(["synth-lines", "--out", "mine2", "--count", "3", "--workers", "1"]) == 0
    assert len(LmdbDataset(tmp_path / "mine2")) == 3


def test_a_set_holding_a_killed_writers_temporary_folder_is_replaced_not_refused(tmp_path, monkeypatch):
    """Was: refused as 'holds .contact_sheet.png.TAG-PID.HEX.tmp ... which an LMDB set of synth-lines does not'.
    A run killed while writing its contact sheet leaves atomic_path's hidden folder in DIR.partial; a run resumed
    in another container (another host name and PID namespace: kept for a week, not swept) publishes it with
    the set, and every later run over that set was refused."""
    from kocr import atomic
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("synth_lines:\n  fonts: [NanumGothic.ttf]\n  contact_sheet: 0\n",
                                          encoding="utf-8")
    assert main(["synth-lines", "--out", "set", "--count", "2", "--workers", "1"]) == 0
    # another container's writer: a namespace tag not this process's (_namespace_tag is cached per process, so a
    # host name patched here would not change it) and a PID that means nothing here
    here = atomic._namespace_tag()
    tag = format((int(here, 16) + 1) % 0x1000000, "06x")
    left = tmp_path / "set" / f".contact_sheet.png.{tag}-1.0123abcd.tmp"
    assert atomic.temporary_name(left.name) and tag != here
    left.mkdir()
    (left / "contact_sheet.png").write_bytes(b"cut mid-write")
    assert main(["synth-lines", "--out", "set", "--count", "3", "--workers", "1"]) == 0
    assert len(LmdbDataset(tmp_path / "set")) == 3 and not left.exists()  # gone with the folder it was in


KILLER = """
import functools, os, signal, sys
import training.data.synth_lines as synth
from training.data.synth_lines import LinesConfig, generate_lines
add, calls = synth.LmdbWriter.add, [0]
def killing_add(self, image, label):
    calls[0] += 1
    if calls[0] == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    add(self, image, label)
synth.LmdbWriter.add = killing_add
synth.LmdbWriter = functools.partial(synth.LmdbWriter, commit_every=8)
generate_lines(sys.argv[1], LinesConfig.from_params(dict(count=40, seed=3, fonts=%r, workers=2, contact_sheet=8)),
               progress=False)
""" % FONTS


def test_a_run_killed_by_sigkill_resumes_after_its_last_commit(tmp_path, capsys):
    import signal
    import subprocess
    import sys

    from training.data.lmdb_store import lmdb_digest

    repo = Path(__file__).resolve().parents[1]
    with (tmp_path / "stderr.txt").open("wb") as err:  # a file, not a pipe: orphaned workers must not hold it up
        proc = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path / "set"), "27"], cwd=repo, stderr=err,
                              timeout=120)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()
    summary = generate_lines(tmp_path / "set", _config(count=40, workers=2), progress=False)
    assert summary["resumed"] == 24  # three commits of 8 before the kill; the manifest had flushed their rows
    assert "resuming" in capsys.readouterr().err
    generate_lines(tmp_path / "ref", _config(count=40), progress=False)
    assert lmdb_digest(tmp_path / "set") == lmdb_digest(tmp_path / "ref")
    assert (tmp_path / "set" / "manifest.tsv").read_bytes() == (tmp_path / "ref" / "manifest.tsv").read_bytes()


def test_ctrl_c_ends_kocr_synth_lines_and_its_render_workers_with_one_line(tmp_path):
    """Ctrl-C at a terminal reaches the whole foreground group, the render pool's workers too. Was: the
    parent's KeyboardInterrupt traceback and one more per worker (``Process ForkPoolWorker-1: ...``)."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    err = tmp_path / "err.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "KOCR_PARAMS": str(REPO / "params.yaml")}
    with err.open("w") as sink:  # SIGINT at its default, as at a terminal (a script's job would ignore it)
        proc = subprocess.Popen([sys.executable, "-m", "kocr.cli", "synth-lines", "--out", "lines", "--count",
                                 "1000000", "--workers", "2"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                stderr=sink, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and max(map(int, re.findall(r"(\d+)/1000000", err.read_text())), default=0) < 300:
            assert time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # while the workers render
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = err.read_text()
    assert proc.returncode == -signal.SIGINT, text[-3000:]  # after its line, it dies by SIGINT as Python does
    assert "Traceback" not in text and "ForkPoolWorker" not in text, text[-3000:]
    assert text.strip().splitlines()[-1] == "kocr synth-lines: interrupted"


def test_ctrl_c_on_kocr_in_a_shell_loop_stops_the_loop(tmp_path):
    """bash goes on after a command that exits (even with 130) and stops when its command died by SIGINT:
    ``for f in ...; do kocr ...; done`` must stop at Ctrl-C. Was: kocr exited 130 and the loop went on."""
    import os
    import re
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    err = tmp_path / "err.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "KOCR_PARAMS": str(REPO / "params.yaml"), "PY": sys.executable}
    loop = ('for n in 1 2; do if [ $n = 2 ]; then touch went-on; break; fi; '
            '"$PY" -m kocr.cli synth-lines --out lines --count 1000000 --workers 1; done; touch after-loop')
    with err.open("w") as sink:  # SIGINT at its default, as at a terminal
        proc = subprocess.Popen(["bash", "-c", loop], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                stderr=sink, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and max(map(int, re.findall(r"(\d+)/1000000", err.read_text())), default=0) < 50:
            assert time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = err.read_text()
    assert text.strip().splitlines()[-1] == "kocr synth-lines: interrupted", text[-3000:]
    assert not (tmp_path / "went-on").exists() and not (tmp_path / "after-loop").exists(), text[-3000:]
    assert proc.returncode == -signal.SIGINT  # bash itself stopped by the Ctrl-C


SIGTERM_TO_THE_WORKERS_AS_THEY_RENDER = """
import multiprocessing, os, signal, sys
from tests.stops import stop_workers_then_command
from training.data import synth_lines
from kocr.cli import main

real = synth_lines.iter_samples


def iter_samples(config, start=0, stop=None, workers=None):
    for i, sample in enumerate(real(config, start, stop, workers), start=start):
        if i == int(os.environ["KILL_AT"]):  # a sample past the first commit is drawn
            workers = [p.pid for p in multiprocessing.active_children()]
            if os.environ.get("STOP") == "kill-one":  # the OOM killer, or a crash in a renderer
                os.kill(min(workers), signal.SIGKILL)
            else:
                stop_workers_then_command(workers)
        yield sample


synth_lines.iter_samples = iter_samples
synth_lines.LmdbWriter.__init__.__defaults__ = (8, *synth_lines.LmdbWriter.__init__.__defaults__[1:])  # commit_every
sys.argv = ["kocr", *sys.argv[1:]]
sys.exit(main())
"""


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the workers' state in /proc")
def test_sigterm_to_the_group_as_workers_render_ends_synth_lines_with_143_and_a_rerun_resumes(tmp_path):
    """GNU ``timeout`` (and a CI runner cancelling a job) sends SIGTERM to the whole process group. Was: the
    render workers died by it, and one killed while it sent its images back held the result queue's lock,
    which ``Pool.terminate`` then waited on for ever: ``kocr synth-lines`` hung, its MLflow run RUNNING. The
    workers now leave SIGTERM to the command, which ends them on its way out."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO
    from training.data.lmdb_store import lmdb_digest

    env = {**os.environ, "PYTHONPATH": str(REPO), "KOCR_PARAMS": str(REPO / "params.yaml"), "KILL_AT": "20"}
    command = ["synth-lines", "--out", "lines", "--count", "40", "--seed", "3", "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_TO_THE_WORKERS_AS_THEY_RENDER, *command], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("kocr synth-lines hung after the SIGTERM: " + proc.communicate()[1][-3000:])
    assert json.loads((tmp_path / "alive.json").read_text()) == [True, True], err[-3000:]
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    deadline = time.monotonic() + 10
    while True:  # the workers ended with it (an orphan that init has not reaped yet is gone)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "workers left behind"
        time.sleep(0.1)
    env["KILL_AT"] = "-1"  # the rerun goes on after the 16 samples committed, as if it had never been stopped
    rerun = subprocess.run([sys.executable, "-c", SIGTERM_TO_THE_WORKERS_AS_THEY_RENDER, *command], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stderr and "after sample 16 of 40" in rerun.stderr, rerun.stderr[-3000:]
    from kocr.params import load_params, section
    from training.data.synth_lines import LinesConfig, generate_lines

    config = LinesConfig.from_params(section(load_params(REPO / "params.yaml"), "synth_lines"), count=40, seed=3,
                                     workers=1)
    generate_lines(tmp_path / "ref", config, progress=False)
    assert lmdb_digest(tmp_path / "lines") == lmdb_digest(tmp_path / "ref")
    assert (tmp_path / "lines" / "manifest.tsv").read_bytes() == (tmp_path / "ref" / "manifest.tsv").read_bytes()


def test_a_render_worker_killed_fails_synth_lines_instead_of_hanging(tmp_path):
    """A worker killed mid-run breaks the pool; the executor ends the others with SIGTERM, which they keep
    blocked: was, ``kocr synth-lines`` then hung in the pool's shutdown instead of failing."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "KOCR_PARAMS": str(REPO / "params.yaml"), "KILL_AT": "20",
           "STOP": "kill-one"}
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_TO_THE_WORKERS_AS_THEY_RENDER, "synth-lines", "--out",
                             "lines", "--count", "2000", "--seed", "3", "--workers", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("kocr synth-lines hung after a worker was killed: " + proc.communicate()[1][-3000:])
    assert proc.returncode not in (0, 143), err[-3000:]
    assert "BrokenProcessPool" in err or "terminated abruptly" in err, err[-3000:]


def test_a_section_whose_fonts_match_nothing_is_named_in_the_error(tmp_path, monkeypatch, capsys):
    """`kocr synth-lines --section synth_lines_heldout` whose own `fonts` match no installed file names
    synth_lines_heldout.fonts, the key to fix; was synth_lines.fonts, the training faces, which were fine."""
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        "synth_lines:\n  fonts: [NanumGothic.ttf]\n  contact_sheet: 0\n  workers: 1\n"
        "synth_lines_heldout:\n  fonts: [NoSuchFaceA.ttf, NoSuchFaceB.ttf]\n", encoding="utf-8")
    assert main(["synth-lines", "--section", "synth_lines_heldout", "--out", "set", "--count", "2"]) == 2
    err = capsys.readouterr().err
    assert "params.yaml: synth_lines_heldout.fonts: no font file matches ['NoSuchFaceA.ttf', 'NoSuchFaceB.ttf']" in err
    assert not (tmp_path / "set").exists()
    # the same patterns under synth_lines itself are still named synth_lines.fonts
    (tmp_path / "params.yaml").write_text(
        "synth_lines:\n  fonts: [NoSuchFaceA.ttf]\n  contact_sheet: 0\n  workers: 1\n", encoding="utf-8")
    assert main(["synth-lines", "--out", "set", "--count", "2"]) == 2
    assert "params.yaml: synth_lines.fonts: no font file matches ['NoSuchFaceA.ttf']" in capsys.readouterr().err
