"""The DVC hash of the data a stage reads, so an MLflow run names the exact data version.

Looked up in this order: the outs of ``dvc.lock`` (data produced by an earlier stage), a
``<path>.dvc`` file (data added with ``dvc add``), else a content hash computed here
(marked ``content:``), so a run outside DVC still records what it read.

Example:
    >>> dataset_hash("data/sample")      # doctest: +SKIP
    ('9f0c…', 'dvc.lock')
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import yaml


def _norm(path: str | os.PathLike) -> str:
    return os.path.normpath(str(path)).rstrip("/")


def _lock_outs(lock_file: Path) -> dict[str, str]:
    if not lock_file.is_file():
        return {}
    data = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    outs: dict[str, str] = {}
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs", []) or []:
            if "md5" in out:
                outs[_norm(out["path"])] = out["md5"]
    return outs


def content_hash(path: str | os.PathLike) -> str:
    """MD5 over the relative names and bytes of every file under ``path`` (or of one file)."""
    root = Path(path)
    digest = hashlib.md5()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        digest.update(os.fsencode(file.relative_to(root) if file != root else file.name))  # any bytes a name has
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def dataset_hash(path: str | os.PathLike, root: str | os.PathLike = ".") -> tuple[str, str]:
    """(hash, where it came from) for ``path``, relative to the DVC project ``root``."""
    root = Path(root)
    rel = _norm(os.path.relpath(path, root)) if os.path.isabs(str(path)) else _norm(path)
    outs = _lock_outs(root / "dvc.lock")
    if rel in outs:
        return outs[rel], "dvc.lock"
    for out, md5 in outs.items():  # a folder inside a tracked output: the output's hash + the subpath
        if rel.startswith(out + os.sep):
            return f"{md5}/{rel[len(out) + 1:]}", "dvc.lock"
    dvc_file = root / f"{rel}.dvc"
    if dvc_file.is_file():
        data = yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}
        for out in data.get("outs", []) or []:
            if "md5" in out:
                return out["md5"], dvc_file.name
    return "content:" + content_hash(root / rel), "computed"
