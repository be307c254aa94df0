"""Whole-or-nothing file writes: a temporary file beside the target, renamed over it when complete.

A kill, a full disk or an exception in the writer leaves the old file (or none) and no temporary
file; readers never see half a file. The temporary name is unique per writer (process id and a
random suffix), so two processes writing the same path do not write into each other's file, and
it is created with the usual permissions (the umask's), as a plain ``open`` would.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on leaving the block without error it replaces ``path``.

    ``durable`` fsyncs the file before the rename (checkpoints and resumable state, where a power
    cut must not leave an empty file under the final name). The temporary file is removed on any
    exit, including KeyboardInterrupt.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` whole or not at all; returns the path."""
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, durable: bool = False) -> Path:
    """Write ``text`` as UTF-8 to ``path`` whole or not at all; returns the path."""
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> Path:
    """Write ``data`` as UTF-8 JSON (Hangul kept readable) whole or not at all; returns the path."""
    return write_text(path, json.dumps(data, ensure_ascii=False, indent=indent))


@contextmanager
def staged_files(out: str | os.PathLike, earlier: Callable[[str], bool]) -> Iterator[Path]:
    """Yield a staging folder for one run's files; on success they replace the earlier run's in ``out``.

    Files are written into a hidden folder inside ``out`` (so the final renames cannot fail for
    want of space). When the block ends without error, each staged file is renamed into ``out`` and
    files of an earlier run that this one did not write (names ``earlier`` accepts) are removed, so
    ``out`` never mixes two runs. When it fails, ``out`` keeps the earlier run whole and the staging
    folder is removed. Other files in ``out`` are left alone.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".staging.{os.getpid()}.{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        yield stage
        written = {p.name for p in stage.iterdir()}
        for old in out.iterdir():
            if old.is_file() and old.name not in written and earlier(old.name):
                old.unlink()
        for name in sorted(written):
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
