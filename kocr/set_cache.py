"""Where kocr keeps what it learnt of a data set, outside the set: ``CropDataset``'s set indexes
(training.data.set_index) and the content hashes of sets no DVC file versions (kocr.dvc_hashes).

Nothing is written into a set, so ``dvc status`` stays clean and the hash of the set is unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path


def user_cache(*parts: str) -> Path | None:
    """``$XDG_CACHE_HOME/kocr/PARTS`` (``~/.cache/kocr/PARTS``), absolute; None when ``XDG_CACHE_HOME`` is
    unset and there is no home directory (no ``HOME``, a user id without a passwd entry, as a container
    run with a host user's id can be), where ``Path.home()`` raises RuntimeError."""
    try:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:
        return None
    return Path(os.path.abspath(Path(cache, "kocr", *parts)))


def cache_dir() -> Path | None:
    """``KOCR_SET_INDEX_DIR`` when set (empty: keep nothing), else ``user_cache("set-index")``
    (``~/.cache/kocr/set-index``; None, keep nothing, where there is no home directory)."""
    value = os.environ.get("KOCR_SET_INDEX_DIR")
    if value is not None:
        return Path(os.path.abspath(value)) if value else None
    return user_cache("set-index")
