"""Crop preprocessing identical to what ``easyocr.Reader`` feeds the recogniser.

EasyOCR resizes each crop to the model height keeping its aspect ratio (``cv2.resize`` with flag 1,
bilinear), resizes again with PIL bicubic, scales to [-1, 1] and pads on the right by repeating the
last column up to a multiple of the height. Training on anything else is how a model with high
validation accuracy ends up reading badly inside EasyOCR, so training uses exactly this path;
``tests/test_transforms.py`` checks it tensor-for-tensor against easyocr's own code.

Example:
    >>> import numpy as np
    >>> x = collate_crops([prepare_crop(np.full((20, 50), 255, np.uint8), 64)], 64)
    >>> tuple(x.shape)
    (1, 1, 64, 192)
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from PIL import Image


def pad_width(width: int, height: int, model_height: int = 64) -> int:
    """Width EasyOCR pads a crop of this size to: ceil(aspect ratio, at least 1) x model height."""
    ratio = width / height
    return math.ceil(max(ratio, 1.0 / ratio)) * model_height


def prepare_crop(grey: np.ndarray, height: int = 64) -> tuple[np.ndarray, int]:
    """Resize a uint8 greyscale crop to ``height`` as EasyOCR does.

    Returns the float32 image in [-1, 1] and the width EasyOCR would pad it to.
    """
    h, w = grey.shape[:2]
    ratio = w / h
    if ratio < 1.0:  # EasyOCR's handling of vertical crops, reproduced as is
        grey = cv2.resize(grey, (height, int(height * (1.0 / ratio))), interpolation=cv2.INTER_LINEAR)
    else:
        grey = cv2.resize(grey, (int(height * ratio), height), interpolation=cv2.INTER_LINEAR)
    return align_collate(grey, height), pad_width(w, h, height)


def align_collate(grey: np.ndarray, height: int = 64, max_width: int | None = None) -> np.ndarray:
    """EasyOCR's AlignCollate step on a uint8 crop: PIL bicubic resize to ``height`` keeping the aspect
    ratio (width capped at ``max_width``), scaled to float32 in [-1, 1]."""
    pil = Image.fromarray(grey, "L")
    w, h = pil.size
    width = max(1, math.ceil(height * (w / float(h))))  # AlignCollate's own arithmetic
    if max_width is not None:
        width = min(width, max_width)
    pil = pil.resize((width, height), Image.BICUBIC)
    return (np.asarray(pil, dtype=np.float32) / 255.0 - 0.5) / 0.5


def collate_crops(crops: list[tuple[np.ndarray, int]], height: int = 64) -> torch.Tensor:
    """Stack prepared crops into (B, 1, H, W): EasyOCR's batch width, right-padded with the last column."""
    width = max(pad for _, pad in crops)
    batch = np.empty((len(crops), 1, height, width), dtype=np.float32)
    for i, (crop, _) in enumerate(crops):
        crop = crop[:, :width]  # EasyOCR caps a crop at the batch width
        w = crop.shape[1]
        batch[i, 0, :, :w] = crop
        batch[i, 0, :, w:] = crop[:, w - 1:w]
    return torch.from_numpy(batch)
