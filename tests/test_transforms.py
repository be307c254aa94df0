"""Training preprocessing must equal what easyocr.Reader feeds the recogniser, tensor for tensor."""

import numpy as np
import pytest
import torch

from kocr.easyocr_compat import import_easyocr
from training.data.transforms import collate_crops, prepare_crop


def _easyocr_tensor(crops: list[np.ndarray], height: int = 64) -> torch.Tensor:
    import_easyocr()
    from easyocr.recognition import AlignCollate
    from easyocr.utils import get_image_list
    from PIL import Image

    resized, max_width = [], 0
    for crop in crops:
        h, w = crop.shape
        items, width = get_image_list([[0, w, 0, h]], [], crop, model_height=height)
        resized.append(Image.fromarray(items[0][1], "L"))
        max_width = max(max_width, width)
    return AlignCollate(imgH=height, imgW=int(max_width), keep_ratio_with_pad=True)(resized)


@pytest.mark.parametrize("shape", [(30, 95), (64, 64), (17, 301), (80, 40), (33, 66)])
def test_single_crop_matches_easyocr(shape):
    rng = np.random.default_rng(sum(shape))
    crop = rng.integers(0, 256, size=shape, dtype=np.uint8)
    ours = collate_crops([prepare_crop(crop, 64)], 64)
    theirs = _easyocr_tensor([crop])
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_batch_pads_to_widest_like_easyocr():
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(20, 41), (25, 160), (30, 30)]]
    ours = collate_crops([prepare_crop(c, 64) for c in crops], 64)
    theirs = _easyocr_tensor(crops)
    assert ours.shape == theirs.shape == (3, 1, 64, 448)
    assert torch.allclose(ours, theirs, atol=1e-6)
