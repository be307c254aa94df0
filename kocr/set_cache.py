"""Where kocr keeps what it learnt of a data set, outside the set: ``CropDataset``'s set indexes
(training.data.set_index) and the content hashes of sets no DVC file versions (kocr.dvc_hashes).

Nothing is written into a set, so ``dvc status`` stays clean and the hash of the set is unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path | None:
    """``KOCR_SET_INDEX_DIR`` when set (empty: keep nothing), else ``$XDG_CACHE_HOME/kocr/set-index``
    (``~/.cache/kocr/set-index``); None (keep nothing) when neither is set and there is no home directory
    (no ``HOME``, a user id without a passwd entry), where ``Path.home()`` raises RuntimeError."""
    value = os.environ.get("KOCR_SET_INDEX_DIR")
    if value is not None:
        return Path(os.path.abspath(value)) if value else None
    try:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:
        return None
    return Path(os.path.abspath(Path(cache) / "kocr" / "set-index"))
