"""The pages of one split of ``splits.json``, read back from the source ``prepare`` read them from.

Page names in splits.json are relative to ``data.source``: a file (``<page>.json``,
``Training/01.라벨링데이터(Json)/…/<page>.json``) or a member of an AI-Hub archive
(``Training/[라벨]Training_인.허가.zip/인.허가/…/<page>.json``). Labels are parsed with prepare's
parser and paired with their image by prepare's rule (``SourceIndex.find_image``), so evaluation
sees exactly the pages and images the split was made of.

An image stored in a zip is extracted, alone, to ``<cache>/<16 hex digits>/<file name>`` (the digits
name the archive and member), written aside and renamed, and reused on later runs while its size
and CRC-32 still match the archive's. The source is scanned (zip directories only, no member is
read) only when some page is not a plain file with its image beside it.

A page can only be scored whole, and a set scored without one of its pages is another set: a label or
image of the split that is there but cannot be read (permissions, I/O, a damaged zip member) raises
``UnreadablePage`` naming the file and why, before anything is scored, as a missing one raises
FileNotFoundError. Neither is skipped.

Example:
    >>> found = split_pages("data/aihub", "data/prepared/splits.json", "test")   # doctest: +SKIP
    >>> found[0][2]                                                              # doctest: +SKIP
    PosixPath('.kocr/eval-images/3f2a9c0d1e4b5a67/5350109-1994-0001-0001.jpg')
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from kocr.atomic import DISK_FULL, atomic_path
from training.data.pages import Page, parse_page
from training.data.sources import (READ_ERRORS, Member, SourceIndex, check_source_folder, open_member, read_member,
                                   scan_source, zip_info)

DEFAULT_CACHE = Path(".kocr") / "eval-images"
CHUNK = 1 << 20


class UnreadablePage(Exception):
    """A label or image of the split that is there but cannot be read; the message names the file and why."""


class UnwritableCache(Exception):
    """The cache that images are extracted to cannot be written (a read-only folder or disk, a file in
    its place); the message names it and why. A full disk is left to the caller's disk-full message."""


def unreadable_page(path: str | os.PathLike, exc: BaseException, split: str,
                    splits_file: str | os.PathLike) -> UnreadablePage:
    """The one-line error for ``path`` of ``split`` that raised ``exc`` when read."""
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    return UnreadablePage(f"{path}: cannot be read ({why}); it is in split {split!r} of {splits_file}, which is "
                          "scored whole: make it readable, or run prepare again (it leaves out what it cannot read)")


def split_names(splits_file: str | os.PathLike, split: str) -> list[str]:
    """The page names ``prepare`` put in ``split``; errors name the file and the split."""
    path = Path(splits_file)
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: splits file not found (run prepare first)") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not a splits file: {exc}") from exc
    if not isinstance(splits, dict) or not isinstance(splits.get(split), list):
        raise ValueError(f"{path}: no {split!r} split (has {sorted(splits) if isinstance(splits, dict) else 'none'})")
    return splits[split]


def split_pages(source: str | os.PathLike, splits_file: str | os.PathLike, split: str = "test",
                cache: str | os.PathLike | None = None, limit: int | None = None,
                progress: bool = True) -> list[tuple[str, Page, Path]]:
    """(name, page, image file) for the first ``limit`` (default: all) pages of ``split``, in order.

    Images inside zip archives are extracted to ``cache`` (default ``.kocr/eval-images``).
    Raises FileNotFoundError naming the page or image that is gone since prepare ran, UnreadablePage
    naming the one that cannot be read, UnwritableCache naming ``cache`` when an image cannot be
    extracted into it.
    """
    source = Path(source)
    check_source_folder(source)
    cache = Path(cache) if cache is not None else DEFAULT_CACHE
    names = split_names(splits_file, split)[:limit]
    found: dict[str, tuple[Page, Path]] = {}
    for name in names:  # plain files with their image beside them: no scan needed
        path = source / name
        if _is_file(path):
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise unreadable_page(path, exc, split, splits_file) from None
            page = _parse(raw, path)
            beside = path.parent / page.image_name
            if page.image_name and _is_file(beside):
                found[name] = page, _readable(beside, split, splits_file)
    rest = [name for name in names if name not in found]
    if rest:
        index = scan_source(source, exclude=cache)  # a cache inside the source is no input
        labels = {label.name: label for label in index.labels}
        with _Extractor(source, cache) as extractor:
            for name in tqdm(rest, desc=f"{split} pages", unit="page", disable=not progress or len(rest) < 50):
                found[name] = _resolve(source, index, labels, name, split, splits_file, extractor)
    return [(name, *found[name]) for name in names]


def _parse(raw: bytes, where: str | os.PathLike) -> Page:
    return parse_page(raw, where, bad=[])  # like prepare: an unusable annotation drops the word, not the page


def _is_file(path: Path) -> bool:
    """Path.is_file, False (not raising) where a folder above cannot be searched: the scan then says which."""
    try:
        return path.is_file()
    except OSError:
        return False


def _readable(path: Path, split: str, splits_file: str | os.PathLike) -> Path:
    """``path``, once a byte of it has been read; UnreadablePage naming it when that fails."""
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise unreadable_page(path, exc, split, splits_file) from None
    return path


def _unreadable_places(source: Path, index: SourceIndex, name: str | None = None) -> list[str]:
    """The folders and zips the scan could not read, each with why (only those above ``name`` when given)."""
    return [f"{source / place.where} ({place.why})" for place in index.unreadable
            if name is None or place.where == "." or name.startswith(f"{place.where}/")]


def _resolve(source: Path, index: SourceIndex, labels: dict[str, Member], name: str, split: str,
             splits_file: str | os.PathLike, extractor: "_Extractor") -> tuple[Page, Path]:
    label = labels.get(name)
    if label is None:
        if above := _unreadable_places(source, index, name):
            raise UnreadablePage(f"{source / name}: page listed in {splits_file} cannot be read, as {above[0]} "
                                 "above it cannot be; make it readable, or run prepare again")
        raise FileNotFoundError(f"{source / name}: page listed in {splits_file} is missing from the source "
                                "since prepare ran")
    try:
        raw = read_member(source, label)
    except READ_ERRORS as exc:
        raise unreadable_page(source / label.name, exc, split, splits_file) from None
    page = _parse(raw, source / name)
    found, _ = index.find_image(label, page.image_name)
    if found is None:
        unlisted = _unreadable_places(source, index)
        maybe = f" (or in a folder or zip that cannot be read: {', '.join(unlisted)})" if unlisted else ""
        raise FileNotFoundError(f"{source / name}: image {page.image_name} missing from the source since "
                                f"prepare ran{maybe}")
    image = index.images[found]
    if not image.archive:
        return page, _readable(source / image.path, split, splits_file)
    try:
        return page, extractor.path(image)
    except _ArchiveReadError as error:
        raise unreadable_page(source / image.name, error.cause, split, splits_file) from None


class _ArchiveReadError(Exception):
    """Reading an archive or member failed (``cause``), as opposed to writing its copy into the cache."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Extractor:
    """Single images out of zip archives into the cache, each member read at the place the scan found
    (``training.data.sources.open_member``), so no archive's directory is held: one of 70,000 members
    costs about 850 bytes a member while it is open."""

    def __init__(self, source: Path, cache: Path) -> None:
        self.source, self.cache = source, cache

    def __enter__(self) -> "_Extractor":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def path(self, member: Member) -> Path:
        """The cached copy of ``member``, extracted now unless an intact copy is already there."""
        info = zip_info(member)
        key = hashlib.sha256(f"{member.archive}\0{member.path}".encode()).hexdigest()[:16]
        out = self.cache / key / PurePosixPath(member.name).name
        if _intact(out, info):
            return out
        try:
            with atomic_path(out) as tmp, open(tmp, "wb") as dst:  # a write error (a full disk) is no read error
                try:
                    src = open_member(self.source, member)
                except READ_ERRORS as exc:
                    raise _ArchiveReadError(exc) from exc
                with src:
                    while True:
                        try:
                            chunk = src.read(CHUNK)  # zipfile checks the CRC at the end
                        except READ_ERRORS as exc:
                            raise _ArchiveReadError(exc) from exc
                        if not chunk:
                            break
                        dst.write(chunk)
        except OSError as exc:  # was a traceback from kocr evaluate (a read-only folder, a file named .kocr)
            if exc.errno in DISK_FULL:
                raise
            why = exc.strerror or type(exc).__name__
            raise UnwritableCache(f"{self.cache}: cannot write the images extracted from the source's zips "
                                  f"there ({why}: {exc.filename or out}); make it a writable folder") from None
        return out


def _intact(path: Path, info: zipfile.ZipInfo) -> bool:
    try:
        if path.stat().st_size != info.file_size:
            return False
        crc = 0
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                crc = zlib.crc32(chunk, crc)
    except OSError:
        return False
    return crc == info.CRC
