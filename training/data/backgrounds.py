"""Backgrounds for synthetic word and line images: plain white, Gaussian noise, quasicrystal, image.

The four kinds text-recognition-data-generator (trdg) users know, as float32 grey H x W arrays in
[0, 255], each drawn from a seeded ``numpy.random.Generator``. Every kind stays light enough for
dark ink to read on it (picture backgrounds are mapped into [150, 255]).

Example:
    >>> import numpy as np
    >>> make_background("quasicrystal", 32, 100, np.random.default_rng(0)).shape
    (32, 100)
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from training.data.lmdb_store import JPEG_END, JPEG_START, jpeg_cut_short

KINDS = ("white", "noise", "quasicrystal", "image")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def plain_white(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Flat paper, white to faintly grey."""
    return np.full((height, width), rng.uniform(238, 255), np.float32)


def gaussian_noise(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """trdg's noise background: a light mean with per-pixel Gaussian grain."""
    mean, sigma = rng.uniform(215, 245), rng.uniform(4, 12)
    return mean + rng.standard_normal((height, width), dtype=np.float32) * np.float32(sigma)


def quasicrystal(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A quasicrystal pattern: the sum of plane waves at evenly turned angles, kept light."""
    k = int(rng.integers(4, 8))
    period = rng.uniform(6, 30)
    depth = rng.uniform(25, 70)
    x = np.arange(width, dtype=np.float64)
    y = np.arange(height, dtype=np.float64)
    theta = rng.uniform(0, np.pi) + np.arange(k) * np.pi / k
    phase = rng.uniform(0, 2 * np.pi, k)
    fx = np.outer(np.cos(theta), x) * (2 * np.pi / period)  # k x W
    fy = np.outer(y, np.sin(theta)) * (2 * np.pi / period) + phase  # H x k
    # sum_j cos(fx_j + fy_j) = sum_j cos fy_j cos fx_j - sin fy_j sin fx_j: one matrix product
    left = np.concatenate([np.cos(fy), -np.sin(fy)], 1).astype(np.float32)
    right = np.concatenate([np.cos(fx), np.sin(fx)], 0).astype(np.float32)
    total = left @ right
    wave = (total / k + 1.0) * 0.5  # 0..1
    return 255.0 - wave * np.float32(depth)


@functools.lru_cache(maxsize=8)
def image_files(folder: str) -> tuple[str, ...]:
    """Picture files directly or deeper under ``folder``, sorted; ValueError when there are none, or naming
    a JPEG cut short among them (OpenCV would read its missing rows as flat grey, drawn behind the text)."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{folder}: background image folder does not exist")
    files = tuple(sorted(str(p) for p in root.rglob("*")
                         if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"{folder}: no background images ({', '.join(IMAGE_SUFFIXES)}) found")
    for path in files:
        if _jpeg_file_cut_short(path):
            raise ValueError(f"{path}: a JPEG cut short (truncated: no end-of-image marker after its image "
                             "data); replace it with a whole copy or remove it")
    return files


def _jpeg_file_cut_short(path: str) -> bool:
    """:func:`jpeg_cut_short` of the file at ``path``, from its first and last two bytes where they settle it
    (a whole JPEG, or no JPEG); a file that cannot be read is left to the decoder (False)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(2) != JPEG_START:
                return False
            fh.seek(-2, os.SEEK_END)
            if fh.read(2) == JPEG_END:
                return False
            fh.seek(0)
            return jpeg_cut_short(fh.read())
    except OSError:
        return False


@functools.lru_cache(maxsize=32)
def _load_grey(path: str) -> np.ndarray:
    image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"{path}: cannot read background image")
    return image


def picture(height: int, width: int, rng: np.random.Generator,
            files: Sequence[str | os.PathLike]) -> np.ndarray:
    """A random crop of one of ``files`` (scaled up when smaller), mapped to [150, 255]."""
    image = _load_grey(str(files[int(rng.integers(len(files)))]))
    h, w = image.shape
    scale = max(height / h, width / w, 1.0)
    if scale > 1.0:
        image = cv2.resize(image, (max(width, round(w * scale)), max(height, round(h * scale))),
                           interpolation=cv2.INTER_LINEAR)
        h, w = image.shape
    y = int(rng.integers(h - height + 1))
    x = int(rng.integers(w - width + 1))
    crop = image[y:y + height, x:x + width].astype(np.float32)
    return 150.0 + crop * np.float32(105.0 / 255.0)


def make_background(kind: str, height: int, width: int, rng: np.random.Generator,
                    images: Sequence[str | os.PathLike] = ()) -> np.ndarray:
    """A background of ``kind`` (one of ``KINDS``); ``image`` needs ``images`` (file paths)."""
    if kind == "white":
        return plain_white(height, width, rng)
    if kind == "noise":
        return gaussian_noise(height, width, rng)
    if kind == "quasicrystal":
        return quasicrystal(height, width, rng)
    if kind == "image":
        if not images:
            raise ValueError("background kind 'image' needs background_images (a folder of pictures)")
        return picture(height, width, rng, images)
    raise ValueError(f"unknown background kind {kind!r}; known: {', '.join(KINDS)}")
