"""Scan degradations: config parsing, determinism, and that each effect does what it says."""

from __future__ import annotations

import re

import numpy as np
import pytest

from training.data import degrade
from training.data.degrade import DegradeConfig, SynthConfigError

PAPER, INK = 245.0, 20.0
BOX = (20, 12, 100, 36)  # x0, y0, x1, y1 of the "word"


def _word(rgb: bool = False) -> np.ndarray:
    """Paper with a block of thin dark strokes inside BOX."""
    image = np.full((56, 128), PAPER, np.float32)
    x0, y0, x1, y1 = BOX
    for x in range(x0, x1, 6):
        image[y0:y1, x:x + 2] = INK
    return np.repeat(image[..., None], 3, 2) if rgb else image


def _only(name: str, **span) -> DegradeConfig:
    key = degrade.EFFECTS[name][0]
    spec = {"p": 1.0, key: span[key]} if key in span else 1.0
    return DegradeConfig.from_params({name: spec})


def _outside(image: np.ndarray, margin: int = 8) -> np.ndarray:
    x0, y0, x1, y1 = BOX
    keep = np.ones(image.shape[:2], bool)
    keep[max(0, y0 - margin):y1 + margin, max(0, x0 - margin):x1 + margin] = False
    return image[keep]


# -- config ------------------------------------------------------------------------------------

def test_off_values_disable_everything():
    for value in (None, False, "off", {}):
        assert not DegradeConfig.from_params(value).enabled
    image = _word()
    assert np.array_equal(degrade.apply(image, np.random.default_rng(0), DegradeConfig()), image)


def test_preset_off_in_a_mapping_reads_as_off():
    # YAML reads a bare `off` as False: {preset: off, blur: 0.5} must start from nothing, not fail
    config = DegradeConfig.from_params({"preset": False, "blur": 0.5})
    assert config.effect("blur").p == 0.5 and config.effect("jpeg").p == 0


def test_an_effect_written_off_is_turned_off_and_on_is_named_as_yaml_reads_it():
    # YAML 1.1 reads `scribble: off` as False: was refused ("expected a probability ... got False")
    for off in (False, "off"):
        assert DegradeConfig.from_params({"preset": "strong", "scribble": off}) == \
            DegradeConfig.from_params({"preset": "strong", "scribble": 0})
    # `degrade: on` / `yes` is True to YAML: the message says so instead of a bare "got True"
    for value, key in ((True, "sample.degrade"), ({"preset": True}, "sample.degrade.preset")):
        with pytest.raises(SynthConfigError, match=re.escape(f"{key}: expected a preset name")) as caught:
            DegradeConfig.from_params(value, "sample.degrade")
        assert "YAML's reading of on, yes or true" in str(caught.value)


def test_off_is_logged_as_off_whatever_its_spelling():
    for value in (False, None, "off"):
        assert degrade.logged(value) == "off"
    assert degrade.logged({"preset": False, "blur": 0.5, "scribble": False}) == {
        "preset": "off", "blur": 0.5, "scribble": 0.0}
    assert degrade.logged("mild") == "mild"


def test_presets_and_overrides():
    mild = DegradeConfig.from_params("mild")
    assert mild.enabled and 0 < mild.effect("jpeg").p < 1
    tuned = DegradeConfig.from_params({"preset": "mild", "jpeg": {"p": 0.9, "quality": [10, 20]},
                                       "scribble": 0})
    assert tuned.effect("jpeg") == degrade.Effect(0.9, (10.0, 20.0))
    assert tuned.effect("scribble").p == 0
    assert tuned.effect("blur") == mild.effect("blur")  # untouched effects keep the preset


@pytest.mark.parametrize("value, words", [
    ("medium", "unknown degrade preset 'medium'"),
    ({"smudge": 0.2}, "unknown effect 'smudge'"),
    ({"jpeg": 1.5}, "sample.degrade.jpeg: probability"),
    ({"jpeg": {"p": 0.5, "sigma": [1, 2]}}, "keys p and quality"),
    ({"blur": {"sigma": [2, 1]}}, "lo <= hi"),
    (3, "expected a preset name or a mapping"),
    # a range out of the effect's domain fails when read, not mid-run (cv2.error) or silently
    ({"jpeg": {"p": 0.5, "quality": 30}}, "sample.degrade.jpeg.quality: expected [lo, hi]"),
    ({"jpeg": {"p": 0.5, "quality": [150, 200]}}, "sample.degrade.jpeg.quality: each end must be in [1, 100]"),
    ({"blur": {"p": 1, "sigma": [0, 0]}}, "sample.degrade.blur.sigma: each end must be in (0, 50]"),
    ({"low_contrast": {"keep": [-1, -0.8]}}, "sample.degrade.low_contrast.keep: each end must be in (0, 1]"),
    ({"ink_bleed": {"strength": [0.5, 1.5]}}, "sample.degrade.ink_bleed.strength: each end must be in [0, 1]"),
    # was: accepted (NaN fails no comparison), and the effect drew NaN strengths
    ({"ink_bleed": {"strength": [float("nan"), 0.5]}}, "sample.degrade.ink_bleed.strength: expected [lo, hi] of finite"),
    ({"blur": {"p": 1, "sigma": ["nan", "nan"]}}, "sample.degrade.blur.sigma: expected [lo, hi] of finite"),
])
def test_bad_settings_name_the_key(value, words):
    with pytest.raises(SynthConfigError, match=re.escape(words)):
        DegradeConfig.from_params(value, "sample.degrade")


# -- determinism -------------------------------------------------------------------------------

def test_same_seed_same_result_other_seed_differs():
    config = DegradeConfig.from_params("strong")
    image = _word(rgb=True)
    runs = [degrade.apply(image, np.random.default_rng(s), config, [BOX]) for s in (4, 4, 5)]
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    assert runs[0].shape == image.shape and runs[0].dtype == np.float32
    assert runs[0].min() >= 0 and runs[0].max() <= 255


# -- effects -----------------------------------------------------------------------------------

def test_noise_has_the_requested_sigma():
    out = degrade.apply(np.full((200, 200), 128, np.float32), np.random.default_rng(1),
                        _only("noise", sigma=[6, 6]))
    assert abs(out.std() - 6) < 0.3 and abs(out.mean() - 128) < 0.5


def test_blur_softens_edges_and_keeps_the_mean():
    image = _word()
    out = degrade.apply(image, np.random.default_rng(1), _only("blur", sigma=[1.5, 1.5]))
    assert np.abs(np.diff(out, axis=1)).max() < 0.7 * np.abs(np.diff(image, axis=1)).max()
    assert abs(out.mean() - image.mean()) < 1.0


def test_low_contrast_keeps_the_asked_share_of_contrast():
    image = _word()
    out = degrade.apply(image, np.random.default_rng(2), _only("low_contrast", keep=[0.4, 0.4]))
    x0, y0 = BOX[:2]
    ink, paper = out[y0 + 2, x0], out[2, 2]
    assert abs((paper - ink) - 0.4 * (PAPER - INK)) < 1.0
    assert paper <= PAPER + 0.5 and ink > INK + 50


def test_jpeg_leaves_artefacts_but_the_picture():
    image = _word()
    out = degrade.apply(image, np.random.default_rng(3), _only("jpeg", quality=[15, 15]))
    assert not np.array_equal(out, image)
    assert np.abs(out - image).mean() < 12  # still the same picture
    assert (np.abs(out - image) > 2).mean() > 0.05  # ringing around the strokes


def test_ink_bleed_thickens_strokes():
    image = _word()
    out = degrade.apply(image, np.random.default_rng(4), _only("ink_bleed", strength=[0.8, 0.8]))
    assert (out < 128).sum() > 1.2 * (image < 128).sum()
    assert np.abs(_outside(out, 4) - PAPER).max() < 1.0  # only next to the ink


@pytest.mark.parametrize("rgb", [False, True])
def test_highlighter_tints_the_word_only(rgb):
    image = _word(rgb)
    out = degrade.apply(image, np.random.default_rng(5), _only("highlighter", opacity=[0.8, 0.8]), [BOX])
    x0, y0, x1, y1 = BOX
    paper_in_box = out[(y0 + y1) // 2, x0 + 3]  # a paper column between strokes
    assert np.min(paper_in_box) < PAPER - 3  # marker colour over the paper (some channel)
    assert np.abs(_outside(out, 12) - PAPER).max() < 1.0
    assert out[(y0 + y1) // 2, x0].max() <= INK + 0.5  # multiply blend: ink stays as dark


def test_scribble_crosses_the_word_with_dark_strokes():
    image = _word()
    out = degrade.apply(image, np.random.default_rng(6), _only("scribble", strokes=[2, 2]), [BOX])
    x0, y0, x1, y1 = BOX
    gaps = np.zeros(image.shape, bool)
    gaps[y0:y1, x0:x1] = image[y0:y1, x0:x1] == PAPER  # paper between the strokes
    assert (out[gaps] < 150).sum() > 20  # pen over the paper inside the word
    assert np.abs(_outside(out, 10) - PAPER).max() < 1.0


def test_underline_needs_a_box_and_sits_below_it():
    image = _word()
    config = _only("underline", thickness=[0.1, 0.1])
    assert np.array_equal(degrade.apply(image, np.random.default_rng(7), config), image)
    out = degrade.apply(image, np.random.default_rng(7), config, [BOX])
    changed = np.argwhere(np.abs(out - image) > 30)
    x0, y0, x1, y1 = BOX
    assert len(changed) > (x1 - x0)  # a line at least as long as the word
    assert changed[:, 0].min() >= y1 and changed[:, 0].max() <= y1 + 10
    assert out[y1:y1 + 10].min() < 100
