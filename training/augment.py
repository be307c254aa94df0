"""On-the-fly augmentation of word crops: blur, sharpen, contrast, noise, small rotation and shear.

One knob, ``train.augment`` (strength in [0, 1]), scales every operation; 0 returns the crop
untouched. Each operation fires with its own probability and draws its magnitude from a generator
seeded by (run seed, step, position in the batch), so a resumed run and any number of loader
workers see exactly the augmentations an uninterrupted single-process run sees.

Augmentation works on the raw greyscale crop, before EasyOCR's resize and padding
(``training.data.transforms.prepare_crop``), so what the model sees stays in EasyOCR's format.

Example:
    >>> import numpy as np
    >>> crop = np.full((32, 96), 255, np.uint8)
    >>> augment_crop(crop, 0.0, np.random.default_rng(0)) is crop
    True
    >>> augment_crop(crop, 1.0, np.random.default_rng(0)).dtype
    dtype('uint8')
"""

from __future__ import annotations

import math

import cv2
import numpy as np

# (probability, largest magnitude at strength 1) of each operation
BLUR = (0.3, 1.2)          # Gaussian sigma in pixels
SHARPEN = (0.2, 1.0)       # unsharp-mask amount
CONTRAST = (0.4, 0.6)      # the range pulled towards the mean (0.6: down to 40% contrast)
NOISE = (0.3, 12.0)        # Gaussian noise std in grey levels
ROTATE = (0.3, 3.0)        # degrees either way
SHEAR = (0.3, 0.3)         # horizontal shear factor either way


def sample_rng(seed: int, step: int, slot: int) -> np.random.Generator:
    """The generator for the ``slot``-th crop of training step ``step``: independent of workers and restarts."""
    return np.random.default_rng((seed, step, slot))


def augment_crop(grey: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A randomly degraded and slightly warped copy of a uint8 greyscale crop; ``strength`` 0 is identity."""
    if strength <= 0:
        return grey
    if not 0 < strength <= 1:
        raise ValueError(f"train.augment {strength}: expected a strength in [0, 1]")
    image = grey.astype(np.float32)
    degrees = rng.uniform(-1, 1) * ROTATE[1] * strength if rng.random() < ROTATE[0] else 0.0
    shear = rng.uniform(-1, 1) * SHEAR[1] * strength if rng.random() < SHEAR[0] else 0.0
    if degrees or shear:
        image = _warp(image, degrees, shear)
    if rng.random() < BLUR[0]:
        sigma = max(0.3, rng.uniform(0, BLUR[1] * strength))
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    if rng.random() < SHARPEN[0]:
        soft = cv2.GaussianBlur(image, (0, 0), 1.0)
        image = image + rng.uniform(0, SHARPEN[1] * strength) * (image - soft)
    if rng.random() < CONTRAST[0]:
        keep = 1.0 - rng.uniform(0, CONTRAST[1] * strength)
        mean = float(image.mean())
        image = mean + (image - mean) * keep + rng.uniform(-20, 20) * strength
    if rng.random() < NOISE[0]:
        image = image + rng.normal(0, rng.uniform(0, NOISE[1] * strength), image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _warp(image: np.ndarray, degrees: float, shear: float) -> np.ndarray:
    """Rotate and shear about the centre onto a canvas large enough to keep every pixel, edges replicated."""
    h, w = image.shape
    rad = math.radians(degrees)
    cos, sin = math.cos(rad), math.sin(rad)
    matrix = np.array([[cos, -sin + shear, 0.0], [sin, cos, 0.0]], np.float32)
    corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], np.float32) - [w / 2, h / 2]
    moved = corners @ matrix[:, :2].T
    new_w = int(math.ceil(moved[:, 0].max() - moved[:, 0].min()))
    new_h = int(math.ceil(moved[:, 1].max() - moved[:, 1].min()))
    matrix[:, 2] = [new_w / 2, new_h / 2] - matrix[:, :2] @ [w / 2, h / 2]
    return cv2.warpAffine(image, matrix, (max(new_w, 1), max(new_h, 1)), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
