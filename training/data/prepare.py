"""The ``prepare`` stage: page JSON + images -> word-crop LMDB sets split by document.

Every page or word left out is counted under a named reason in ``report.json`` with the first
paths where it happened; bad input never stops the stage.

Outputs under ``out``: ``train/``, ``val/``, ``test/`` (LMDB sets), ``splits.json`` (which page
went where, relative to ``src``), ``report.json``.

Example:
    >>> report = prepare_pages("data/sample", "data/prepared", PrepareConfig())   # doctest: +SKIP
    >>> report["crops"]["train"]                                                   # doctest: +SKIP
    1432
"""

from __future__ import annotations

import json
import os
import random
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from training.charset import Charset
from training.data.lmdb_store import LmdbWriter
from training.data.pages import Page, PageError, crop_box, iter_page_files, read_page

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
EXAMPLES_KEPT = 10


@dataclass(frozen=True)
class PrepareConfig:
    """Knobs of the prepare stage (``prepare:`` in params.yaml)."""

    charset: str = "korean_g2"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    crop_margin: float = 0.1          # fraction of box height added on each side, like EasyOCR's add_margin
    out_of_charset: str = "drop"      # drop | keep
    image_format: str = ".png"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "PrepareConfig":
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Report:
    """Counts and first examples of everything kept or skipped."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_KEPT:
            self.examples[reason].append(where)

    def as_dict(self) -> dict[str, Any]:
        return {reason: {"count": self.counts[reason], "examples": self.examples[reason]}
                for reason in sorted(self.counts)}


def find_image(json_path: Path, page: Page, src: Path) -> Path | None:
    """The image of a page: beside its JSON, or in the mirrored 원천데이터 tree of an AI-Hub download."""
    candidates = [json_path.parent / page.image_name]
    candidates += [json_path.with_suffix(s) for s in IMAGE_SUFFIXES]
    rel = json_path.relative_to(src)
    if len(rel.parts) > 1 and "라벨링데이터" in rel.parts[0]:
        for top in src.iterdir():
            if top.is_dir() and "원천데이터" in top.name:
                mirrored = top.joinpath(*rel.parts[1:-1])
                candidates += [mirrored / page.image_name]
    return next((c for c in candidates if c.is_file()), None)


def load_grey(path: Path) -> np.ndarray:
    """Open an image whatever its mode (CMYK, 16-bit, palette), apply EXIF rotation, return uint8 grey."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            span = max(arr.max() - arr.min(), 1.0)
            return ((arr - arr.min()) / span * 255).astype(np.uint8)
        return np.asarray(img.convert("L"))


def split_documents(names: list[str], config: PrepareConfig) -> dict[str, str]:
    """Assign each page to a split by a seeded shuffle (never by crop, so no page feeds two splits)."""
    order = sorted(names)
    random.Random(config.seed).shuffle(order)
    n = len(order)
    n_test = round(n * config.test_fraction) if n >= 3 else 0
    n_val = round(n * config.val_fraction) if n >= 3 else 0
    if n >= 3:
        n_test, n_val = max(n_test, 1 if config.test_fraction > 0 else 0), max(n_val, 1 if config.val_fraction > 0 else 0)
    assignment = {}
    for i, name in enumerate(order):
        assignment[name] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return assignment


def _encode(crop: np.ndarray, suffix: str) -> bytes:
    ok, buf = cv2.imencode(suffix, crop)
    if not ok:
        raise ValueError(f"cannot encode crop as {suffix}")
    return buf.tobytes()


def _page_crops(page: Page, grey: np.ndarray, where: str, charset: Charset, config: PrepareConfig,
                report: Report) -> list[tuple[bytes, str]]:
    height, width = grey.shape
    if (page.width, page.height) != (width, height):
        report.add("image_size_differs_from_json", f"{where} ({page.width}x{page.height} vs {width}x{height})")
    crops = []
    for index, word in enumerate(page.words, start=1):
        at = f"{where}#{index}"
        raw = word.text.strip()
        text = unicodedata.normalize("NFC", raw)
        if not text:
            report.add("empty_text", at)
            continue
        if text != raw:
            report.add("nfd_normalised", at)
        if charset.missing(text):
            report.add("out_of_charset", f"{at} {''.join(sorted(charset.missing(text)))!r}")
            if config.out_of_charset == "drop":
                continue
        x, y, w, h = word.bbox
        if x < 0 or y < 0 or x + w > width or y + h > height:
            report.add("box_clipped", at)
        box = crop_box(word.bbox, config.crop_margin, width, height)
        if box is None:
            report.add("zero_area_box", at)
            continue
        x0, y0, x1, y1 = box
        crops.append((_encode(grey[y0:y1, x0:x1], config.image_format), text))
    return crops


def prepare_pages(src: str | os.PathLike, out: str | os.PathLike, config: PrepareConfig,
                  progress: bool = True) -> dict[str, Any]:
    """Run the stage; returns the report (also written to ``out/report.json``)."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source folder does not exist")
    charset = Charset.from_spec(config.charset)
    report = Report()
    for stray in sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() not in (".json", *IMAGE_SUFFIXES)):
        report.add("stray_file", str(stray.relative_to(src)))

    pages: dict[str, tuple[Page, Path]] = {}
    json_files = 0
    for json_path in iter_page_files(src):
        json_files += 1
        rel = str(json_path.relative_to(src))
        try:
            page = read_page(json_path)
        except PageError as exc:
            report.add(exc.reason, f"{rel}: {exc.detail}"[:300])
            continue
        except OSError as exc:
            report.add("unreadable_file", f"{rel}: {exc}")
            continue
        image_path = find_image(json_path, page, src)
        if image_path is None:
            report.add("image_missing", rel)
            continue
        try:  # a cheap integrity check, so a broken image never takes a page's place in a split
            with Image.open(image_path) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            report.add("image_corrupt", f"{image_path.relative_to(src)}: {type(exc).__name__}")
            continue
        pages[rel] = (page, image_path)

    assignment = split_documents(list(pages), config)
    out.mkdir(parents=True, exist_ok=True)
    writers = {split: LmdbWriter(out / split) for split in SPLITS}
    split_pages: dict[str, list[str]] = {split: [] for split in SPLITS}
    try:
        for rel in tqdm(sorted(pages), desc="prepare", unit="page", disable=not progress):
            page, image_path = pages[rel]
            try:
                grey = load_grey(image_path)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
                report.add("image_corrupt", f"{image_path.relative_to(src)}: {type(exc).__name__}")
                continue
            crops = _page_crops(page, grey, rel, charset, config, report)
            split = assignment[rel]
            split_pages[split].append(rel)
            for image_bytes, text in crops:
                writers[split].add(image_bytes, text)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.close()

    summary = {
        "source": str(src),
        "pages_found": json_files,
        "pages_used": sum(len(v) for v in split_pages.values()),
        "pages": {split: len(split_pages[split]) for split in SPLITS},
        "crops": {split: writers[split].count for split in SPLITS},
        "skipped": report.as_dict(),
    }
    _write_json(out / "splits.json", split_pages)
    _write_json(out / "report.json", summary)
    return summary


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)
