"""What a generated set's samples depend on besides their index, as one digest (a resume key).

``synth_lines`` and ``synth_pages`` draw sample ``i`` from the settings and ``i`` alone, so a run
killed mid-way is continued only by a run whose key matches the one its partial set was started
with (``kocr.atomic.PartialFolder``); any other change starts the set over.

Example:
    >>> generator_key({"seed": 0}, "korean_g2", [])   # doctest: +SKIP
    '3f1c…'
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import cv2

from training.charset import Charset


def generator_key(knobs: Mapping[str, Any], charset_name: str, files: Iterable[str | os.PathLike]) -> str:
    """Hex digest of ``knobs`` (JSON, keys sorted), the code that draws samples (``training/data/*.py``
    and ``training/charset.py``), the charset's characters, each of ``files`` (fonts, text, background
    images: path, size and mtime) and the versions of the libraries that draw and encode samples
    (wordfreq, Pillow and its FreeType, OpenCV, NumPy); one not installed counts as ``None`` (the
    GPU machine has no wordfreq: its sets are drawn from a word list, docs/recipe.md)."""
    digest = hashlib.sha256(json.dumps(dict(knobs), sort_keys=True, default=str).encode())
    here = Path(__file__).parent
    for module in [*sorted(here.glob("*.py")), here.parent / "charset.py"]:
        digest.update(module.read_bytes())
    digest.update(Charset.from_spec(charset_name).chars.encode())
    for path in map(Path, files):
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    from PIL import features

    versions = [installed_version(d) for d in ("wordfreq", "pillow", "numpy")]
    digest.update(repr([*versions, features.version("freetype2"), cv2.__version__]).encode())
    return digest.hexdigest()


def installed_version(distribution: str) -> str | None:
    """``distribution``'s installed version, or None where it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
