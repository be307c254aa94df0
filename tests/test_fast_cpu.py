"""The fast CPU reading path returns what easyocr's own code returns: same boxes, same text."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from evaluation.fast_cpu import ExactMaxPool, accelerate
from evaluation.reader import Detector, DetectorSettings, Recognition, load_image
from kocr.easyocr_compat import import_easyocr
from tests.conftest import realdata
from training.checkpoint import load_recognizer
from training.data.pages import read_page


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), ((2, 1), (2, 1), 0), (3, 1, 1), (3, 2, 1)])
def test_exact_max_pool_is_bit_identical(kernel, stride, padding):
    pool = nn.MaxPool2d(kernel, stride, padding)
    x = torch.randn(2, 5, 17, 23, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ExactMaxPool(pool)(x), pool(x))


def test_pool_only_copy_shares_weights_and_computes_the_same(hangul_checkpoint):
    model = load_recognizer(str(hangul_checkpoint)).model
    fast = accelerate(model)
    x = torch.randn(3, 1, 64, 200, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
        model.Prediction.bias.add_(1.0)  # the copy follows further training of the original
        assert torch.equal(fast(x), model(x))
    assert any(isinstance(m, ExactMaxPool) for m in fast.modules())
    assert not any(isinstance(m, ExactMaxPool) for m in model.modules())


def _real_quads() -> tuple[np.ndarray, list[list[list[int]]]]:
    """korean.png and its ground-truth quads, each also skewed so that the perspective warp is exercised."""
    image = realdata("easyocr", "korean.png")
    words = json.loads(realdata("easyocr", "gt.json").read_text(encoding="utf-8"))["korean.png"]["words"]
    quads = []
    for word in words:
        (x0, y0), (x1, _), (_, y1), _ = word["points"]
        quads += [[[x0, y0], [x1, y0], [x1, y1], [x0, y1]], [[x0, y0 + 6], [x1, y0], [x1, y1 - 6], [x0, y1]]]
    return load_image(image)[1], quads


@pytest.mark.parametrize("contrast_ths", [0.1, 1.0])  # 1.0: every box also takes easyocr's low-contrast retry
def test_fast_recognition_reads_like_easyocr_get_text(hangul_checkpoint, sample_pages, contrast_ths):
    get_image_list = import_easyocr().utils.get_image_list
    loaded = load_recognizer(str(hangul_checkpoint))
    settings = DetectorSettings(contrast_ths=contrast_ths)
    one_by_one, batched = Recognition(loaded, settings, batch_size=1), Recognition(loaded, settings)
    page = sorted(sample_pages.glob("*.json"))[0]
    words = [[int(x), int(x + w), int(y), int(y + h)] for x, y, w, h in (word.bbox for word in read_page(page).words)]
    real_grey, quads = _real_quads()
    inputs = [(real_grey, [], quads), (load_image(page.with_suffix(".jpg"))[1], words[:16], quads[:2])]
    hangul = False
    for grey, horizontal, free in inputs:
        reference = one_by_one.read_boxes_easyocr(grey, horizontal, free)
        assert len(reference) == len(horizontal) + len(free) > 0
        # one box per pass: bit for bit easyocr's result, confidence included
        assert one_by_one.read_boxes(grey, horizontal, free) == reference
        fast = batched.read_boxes(grey, horizontal, free)
        assert [(box, text) for box, text, _ in fast] == [(box, text) for box, text, _ in reference]
        assert [c for _, _, c in fast] == pytest.approx([c for _, _, c in reference], rel=1e-4, abs=1e-6)
        hangul |= any(ord(c) >= 0xAC00 for _, text, _ in fast for c in text)
    widths = [get_image_list([b], [], inputs[1][0], loaded.config.imgH)[1] for b in inputs[1][1]]
    assert len(set(widths)) < len(widths)  # some boxes of the generated page shared a batch
    assert hangul  # the Hangul classes were exercised


def test_fast_detector_finds_easyocr_boxes_on_real_and_generated_pages(sample_pages):
    slow, fast = Detector(fast=False), Detector()
    for path in [realdata("easyocr", "korean.png"), sorted(sample_pages.glob("*.jpg"))[0]]:
        rgb, _ = load_image(path)
        expected = slow.detect(rgb)
        assert fast.detect(rgb) == expected and len(expected[0]) + len(expected[1]) > 0, path
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 3, 96, 128)).astype(np.float32))
    with torch.no_grad():
        assert float((fast.net(x)[0] - slow.net(x)[0]).abs().max()) < 1e-4  # float32 rounding, not a new model
