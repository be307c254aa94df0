"""Charset: sizes, parity with EasyOCR's own config, CTC encode/decode, head-row mapping."""

from __future__ import annotations

import importlib.util
import os
import string
import unicodedata
from pathlib import Path

import pytest

from training.charset import Charset

KOREAN = Charset.named("korean_g2")
ENGLISH = Charset.named("english_g2")


def _easyocr_config():
    """easyocr/config.py loaded on its own: importing the package needs the torchvision workaround."""
    spec = importlib.util.find_spec("easyocr")
    assert spec is not None and spec.origin, "easyocr is not installed"
    path = Path(spec.origin).with_name("config.py")
    config_spec = importlib.util.spec_from_file_location("_easyocr_config_under_test", path)
    module = importlib.util.module_from_spec(config_spec)
    saved = os.environ.get("LRU_CACHE_CAPACITY")
    try:
        config_spec.loader.exec_module(module)  # sets LRU_CACHE_CAPACITY as a side effect
    finally:
        if saved is None:
            os.environ.pop("LRU_CACHE_CAPACITY", None)
        else:
            os.environ["LRU_CACHE_CAPACITY"] = saved
    return module


# -- sizes and parity ----------------------------------------------------------------------------

def test_builtin_sizes():
    assert len(KOREAN) == 1008 and KOREAN.num_class == 1009
    assert len(ENGLISH) == 96 and ENGLISH.num_class == 97
    assert KOREAN.name == "korean_g2" and ENGLISH.name == "english_g2"


@pytest.mark.parametrize("name", ["korean_g2", "english_g2"])
def test_shipped_charset_equals_easyocr_config(name):
    config = _easyocr_config()
    theirs = config.recognition_models["gen2"][name]["characters"]
    ours = Charset.named(name).chars
    assert len(ours) == len(theirs)
    assert ours == theirs, next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)


def test_unknown_builtin_name_is_rejected():
    with pytest.raises(ValueError, match="korean_g3"):
        Charset.named("korean_g3")
    with pytest.raises(ValueError, match="neither built-in"):
        Charset.from_spec("/no/such/charset.txt")


def test_from_spec_reads_a_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("가나다abc\n", encoding="utf-8")
    cs = Charset.from_spec(str(path))
    assert cs.chars == "가나다abc" and cs.name == "mine" and cs.num_class == 7
    assert Charset.from_spec("english_g2") == ENGLISH


def test_a_charset_file_with_a_bom_or_crlf_keeps_its_classes(tmp_path):
    # Notepad's byte-order mark was read as a character: U+FEFF became class 1, every real character
    # moved one class up, and a checkpoint or EasyOCR bundle made with it decoded shifted text
    bom, crlf = tmp_path / "bom.txt", tmp_path / "crlf.txt"
    bom.write_bytes("\ufeff가나다abc\n".encode())
    crlf.write_bytes("가나다abc\r\n".encode())
    for path in (bom, crlf):
        cs = Charset.from_spec(str(path))
        assert cs.chars == "가나다abc" and cs.index["가"] == 1


def test_a_charset_file_in_cp949_or_nfd_is_refused_by_name(tmp_path):
    cp949, nfd = tmp_path / "cp949.txt", tmp_path / "nfd.txt"
    cp949.write_bytes("가나다".encode("cp949"))
    nfd.write_text(unicodedata.normalize("NFD", "각한"), encoding="utf-8")  # no jamo repeats: once accepted silently
    with pytest.raises(ValueError, match=r"cp949\.txt: not UTF-8 .*CP949"):
        Charset.from_spec(str(cp949))
    with pytest.raises(ValueError, match=r"nfd\.txt: holds decomposed Hangul"):
        Charset.from_spec(str(nfd))
    latin = tmp_path / "latin.txt"  # a combining mark of its own is no NFD Hangul
    latin.write_text("e\u0301a", encoding="utf-8")
    assert len(Charset.from_spec(str(latin))) == 3


# -- encode / decode -----------------------------------------------------------------------------

def test_index_layout_is_one_based_with_blank_at_zero():
    for cs in (KOREAN, ENGLISH):
        assert 0 not in cs.index.values()
        assert sorted(cs.index.values()) == list(range(1, cs.num_class))
        for c, i in cs.index.items():
            assert cs.chars[i - 1] == c
    assert ENGLISH.index["0"] == 1  # english_g2 starts with the digits
    assert KOREAN.index[" "] == 1  # korean_g2 starts with the space


@pytest.mark.parametrize("text", ["서울특별시", "제2023-15호", "(주)한국 Co.", "a", "가나다라마바사"])
def test_encode_then_decode_round_trip(text):
    encoded = KOREAN.encode(text)
    assert len(encoded) == len(text)
    assert all(1 <= i < KOREAN.num_class for i in encoded)
    # CTC best path with a blank after each character, so repeats survive
    path = [i for c in encoded for i in (c, 0)]
    assert KOREAN.decode_greedy(path) == text


def test_decode_greedy_collapses_repeats_but_keeps_blank_separated_ones():
    h, o = KOREAN.index["호"], KOREAN.index["오"]
    assert KOREAN.decode_greedy([h, h, h]) == "호"
    assert KOREAN.decode_greedy([h, 0, h]) == "호호"
    assert KOREAN.decode_greedy([0, 0, h, h, 0, 0, h, o, o, 0]) == "호호오"
    assert KOREAN.decode_greedy([0, 0, 0]) == ""
    assert KOREAN.decode_greedy([]) == ""
    # numpy / torch integer types decode like ints
    import numpy as np
    import torch
    assert KOREAN.decode_greedy(np.array([h, 0, h])) == "호호"
    assert KOREAN.decode_batch(torch.tensor([[h, h, 0, o], [0, o, 0, o]])) == ["호오", "오오"]


def test_encode_names_the_unknown_character():
    with pytest.raises(KeyError) as info:
        KOREAN.encode("한漢자")
    message = str(info.value)
    assert "'漢'" in message and "korean_g2" in message
    assert KOREAN.missing("한漢자字") == {"漢", "字"}
    assert KOREAN.missing("한자") == set()


def test_duplicate_and_empty_charsets_are_rejected():
    with pytest.raises(ValueError, match="repeats characters") as info:
        Charset("가나가다다", "dups")
    assert "'가다'" in str(info.value)
    with pytest.raises(ValueError, match="empty"):
        Charset("", "nothing")


def test_equality_is_by_characters():
    assert Charset("abc", "x") == Charset("abc", "y")
    assert Charset("abc") != Charset("acb")
    assert Charset("abc") != "abc"


# -- head row mapping ----------------------------------------------------------------------------

def test_shared_rows_english_to_korean():
    pairs = KOREAN.shared_rows(ENGLISH)  # (row in english, row in korean)
    assert pairs[0] == (0, 0)
    assert [p for p in pairs if 0 in p] == [(0, 0)]  # only blank maps to or from the blank
    mapping = dict((new, old) for old, new in pairs)
    assert len(mapping) == len(pairs) == 96  # blank + 95 printable ASCII; '€' is not in korean_g2
    for c in ["A", "z", "0", "9", " ", "~", "("]:
        assert mapping[KOREAN.index[c]] == ENGLISH.index[c] == ENGLISH.chars.find(c) + 1, c
        assert KOREAN.index[c] == KOREAN.chars.find(c) + 1, c
    shared = {KOREAN.chars[new - 1] for new in mapping if new}
    assert shared == set(string.printable[:95])
    # rows are unique on both sides
    assert len({o for o, _ in pairs}) == len({n for _, n in pairs}) == len(pairs)


def test_shared_rows_with_disjoint_charset_is_blank_only():
    assert Charset("가나다").shared_rows(Charset("abc")) == [(0, 0)]
    assert Charset("가나다").shared_rows(Charset("다가")) == [(0, 0), (2, 1), (1, 3)]
