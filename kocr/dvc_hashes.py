"""The DVC hash of the data a stage reads, so an MLflow run names the exact data version.

Looked up in this order: the outs of ``dvc.lock`` (data produced by an earlier stage), a
``<path>.dvc`` file (data added with ``dvc add``), else a content hash computed here
(marked ``content:``), so a run outside DVC still records what it read. ``dvc_record`` names
what versions a path, if anything does. A stage run by hand
(not under ``dvc repro``, which reconciles both files before it runs a stage) asks DVC whether
the data still matches its record; where it was changed since (new pages and no ``dvc add``, or
a stage rerun by hand), the content hash is logged instead, with a warning.

Example:
    >>> dataset_hash("data/sample")      # doctest: +SKIP
    ('9f0c…', 'dvc.lock')
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
import warnings
from pathlib import Path

import yaml

from kocr import KocrWarning
from kocr.atomic import holds_set_lock, write_text
from kocr.set_cache import cache_dir


def _norm(path: str | os.PathLike) -> str:
    return os.path.normpath(str(path)).rstrip("/")


def _lock_outs(lock_file: Path) -> dict[str, tuple[str, str]]:
    """Output path -> (its md5, the stage that wrote it) in ``lock_file``."""
    if not lock_file.is_file():
        return {}
    data = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    outs: dict[str, tuple[str, str]] = {}
    for name, stage in (data.get("stages") or {}).items():
        for out in stage.get("outs", []) or []:
            if "md5" in out:
                outs[_norm(out["path"])] = (out["md5"], name)
    return outs


def _yaml_outs(pipeline: Path, params_file: Path) -> dict[str, str]:
    """Output path -> the stage that writes it in ``pipeline`` (dvc.yaml), ``${key}`` read from
    ``params_file``; an output whose template it cannot fill (``foreach``, ``vars``) is left out."""
    if not pipeline.is_file():
        return {}
    data = yaml.safe_load(pipeline.read_text(encoding="utf-8")) or {}
    params = (yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}) if params_file.is_file() else {}

    def filled(match: re.Match) -> str:
        value: object = params
        for key in match.group(1).split("."):
            if not isinstance(value, dict) or key not in value:
                raise KeyError(match.group(1))
            value = value[key]
        return str(value)

    outs: dict[str, str] = {}
    for name, stage in (data.get("stages") or {}).items():
        if not isinstance(stage, dict):
            continue
        for out in stage.get("outs", []) or []:
            for path in out if isinstance(out, dict) else [out]:
                try:
                    outs[_norm(re.sub(r"\$\{\s*([\w.-]+)\s*\}", filled, str(path)))] = name
                except KeyError:
                    continue
    return outs


def _inside(rel: str, out: str) -> bool:
    return rel == out or rel.startswith(out + os.sep)


def dvc_record(path: str | os.PathLike, root: str | os.PathLike = ".") -> str | None:
    """What versions ``path`` with DVC: the ``.dvc`` file of it or of a folder above it, or the
    stage of ``root``'s dvc.lock or dvc.yaml whose output holds it; None when nothing does."""
    target = Path(os.path.abspath(path))
    for folder in (target, *target.parents):
        dvc_file = folder.parent / f"{folder.name}.dvc"
        if folder.name and dvc_file.is_file():
            return os.path.relpath(dvc_file)
    rel = _norm(os.path.relpath(target, os.path.abspath(root)))
    if rel == ".." or rel.startswith(".." + os.sep):
        return None
    for out, (_, stage) in _lock_outs(Path(root) / "dvc.lock").items():
        if _inside(rel, out):
            return f"dvc.lock (stage {stage})"
    for out, stage in _yaml_outs(Path(root) / "dvc.yaml", Path(root) / "params.yaml").items():
        if _inside(rel, out):
            return f"dvc.yaml (stage {stage})"
    return None


def _changed_since_recorded(root: Path, target: str, out: str) -> bool:
    """True when DVC finds ``out`` in the workspace modified since ``target`` (a .dvc file or a
    stage of dvc.lock) recorded it. False without asking under ``dvc repro`` (DVC_STAGE set:
    DVC has just reconciled its records) and where DVC cannot tell (no DVC project, a lock)."""
    if os.environ.get("DVC_STAGE"):
        return False
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            status = repo.status(targets=[target])
    except Exception:  # noqa: BLE001 - the record stays the best answer there
        return False
    return any(isinstance(entry, dict) and (entry.get("changed outs") or {}).get(out) == "modified"
               for entries in status.values() for entry in entries)


def _stale(root: Path, rel: str, where: str) -> tuple[str, str]:
    warnings.warn(f"{rel} differs from what {where} records (changed since `dvc add` or `dvc repro`); "
                  "logging its content hash instead", KocrWarning, stacklevel=3)
    return "content:" + content_hash(root / rel), f"computed: {where} is out of date"


def content_hash(path: str | os.PathLike) -> str:
    """MD5 over the relative names and bytes of every file under ``path`` (or of one file).

    Linked folders are followed, each real folder once, as ``prepare`` reads them. A file or folder
    that cannot be read (permissions, I/O) adds its name and an ``unreadable`` mark instead of its
    bytes, so the hash still names what was there and the command goes on to report it. The lock file of a
    set this process is writing there (``kocr.atomic.holds_set_lock``: ``prepare``'s ``--out`` inside its
    source) is left out, unread, as DVC leaves out ``.*.lock`` (.dvcignore).

    Reading every byte costs about 3 s a GB (minutes for a crop set of tens of GB, at every train start),
    so the hash is kept outside the set (``_recorded``) and taken from there, without reading a byte,
    while every file has the name, device, inode, size, mtime and ctime it had when it was read."""
    root = Path(path)
    started = time.time_ns()
    if root.is_file():
        entries = [(Path(root.name), root, _stat(root))]
    else:
        entries = sorted(_walk(root), key=lambda entry: entry[0])  # as sorted(Path) orders the names
    key = _stat_key(root, entries)
    known = _recorded(root, key, entries)
    if known:
        return known
    digest = hashlib.md5()
    whole = True  # every file and folder read: only then is the hash kept
    for rel, file, _ in entries:
        digest.update(os.fsencode(rel))  # any bytes a name has
        if file is None:
            digest.update(b"\0unreadable folder\0")
            whole = False
            continue
        try:
            with file.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError:
            digest.update(b"\0unreadable file\0")
            whole = False
    if whole and key is not None:
        _record(root, key, entries, started, digest.hexdigest())
    return digest.hexdigest()


HASH_CACHE_MAGIC = "kocr-content-hash 1"
RACY_NS = 2 * 10**9  # a file changed this shortly before the read began may change again within one tick of its
# timestamps (1-10 ms, more on network filesystems) and keep them all: its hash is not kept (git's "racy clean")


def _stat(file: Path) -> os.stat_result | None:
    try:
        return file.stat()
    except OSError:
        return None


def _stat_key(root: Path, entries: list[tuple[Path, Path | None, os.stat_result | None]]) -> str | None:
    """SHA-256 over the set's path and each file's name, device, inode, size, mtime and ctime: what changes
    whenever a file's bytes do (DVC's state database keys on inode, size and mtime); None when a file or
    folder could not be looked at."""
    key = hashlib.sha256(f"{HASH_CACHE_MAGIC}\0".encode() + os.fsencode(root.resolve()) + b"\0")
    for rel, file, st in entries:
        if file is None or st is None:
            return None
        key.update(os.fsencode(rel) + f"\0{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}\n"
                   .encode())
    return key.hexdigest()


def _hash_cache_path(root: Path) -> Path | None:
    folder = cache_dir()
    if folder is None:
        return None
    where = root.resolve()
    return folder / f"{where.name}-{hashlib.sha256(os.fsencode(where)).hexdigest()[:20]}.md5"


def _recorded(root: Path, key: str | None, entries: list[tuple[Path, Path | None, os.stat_result | None]]) -> str | None:
    """The hash kept for ``root`` when it was kept for ``key`` and this process may read every file
    (else a full read would mark some unreadable); None otherwise, or when the cache cannot be read."""
    cache = _hash_cache_path(root) if key is not None else None
    if cache is None:
        return None
    try:
        kept = json.loads(cache.read_text(encoding="utf-8"))
        if kept["magic"] != HASH_CACHE_MAGIC or kept["key"] != key or not re.fullmatch(r"[0-9a-f]{32}", kept["md5"]):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    effective = os.access in os.supports_effective_ids
    if not all(os.access(file, os.R_OK, effective_ids=effective) for _, file, _ in entries):
        return None
    return kept["md5"]


def _record(root: Path, key: str, entries: list[tuple[Path, Path | None, os.stat_result | None]], started: int,
            digest: str) -> None:
    """Keep ``digest`` for ``root`` under ``key`` (atomically), unless a file changed while it was read or too
    shortly before (``RACY_NS``); then drop the kept hashes of sets that are gone. A cache that cannot be
    written keeps nothing: the next run reads the set again."""
    cache = _hash_cache_path(root)
    if cache is None:
        return
    latest = max((max(st.st_mtime_ns, st.st_ctime_ns) for _, _, st in entries), default=0)
    if latest > started - RACY_NS or _stat_key(root, [(rel, file, _stat(file)) for rel, file, _ in entries]) != key:
        return
    try:
        # ASCII JSON: a path that is not UTF-8 (os.fsdecode's surrogates) is kept as \udcXX escapes and read back
        write_text(cache, json.dumps({"magic": HASH_CACHE_MAGIC, "path": os.fsdecode(root.resolve()), "key": key,
                                      "md5": digest}))
        for other in cache.parent.glob("*.md5"):
            if other != cache and _hash_orphaned(other):
                other.unlink(missing_ok=True)
    except (OSError, ValueError):  # ValueError: UnicodeError, never a reason to stop the run
        return


def _hash_orphaned(kept: Path) -> bool:
    """Whether the set a kept hash was written for is gone (False when the file cannot be read)."""
    try:
        return not os.path.exists(json.loads(kept.read_text(encoding="utf-8"))["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def first_visit(folder: Path, seen: set[Path]) -> bool:
    """True the first time a real folder is met, which it adds to ``seen`` (a link back up the tree
    would loop forever). The guard of both walks that follow linked folders, this hash's and the
    source scan of ``prepare`` (training.data.sources), so both read the same real folders."""
    real = folder.resolve()
    if real in seen:
        return False
    seen.add(real)
    return True


def _walk(root: Path) -> list[tuple[Path, Path | None, os.stat_result | None]]:
    """(name relative to ``root``, the file, its stat or None) of each file below it, linked folders
    followed once each; (name, None, None) for a folder that cannot be listed."""
    found: list[tuple[Path, Path | None, os.stat_result | None]] = []
    seen = {root.resolve()}
    unlisted: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unlisted.append):
        folder = Path(dirpath)
        dirnames[:] = [d for d in sorted(dirnames) if first_visit(folder / d, seen)]
        for name in filenames:
            file = folder / name
            if holds_set_lock(file):  # this process's lock beside a set it writes there: reading it would let go
                continue
            try:
                st = file.stat()
                if not stat.S_ISREG(st.st_mode):
                    continue
            except FileNotFoundError:  # a dangling link
                continue
            except OSError:  # hashed as unreadable
                st = None
            found.append((file.relative_to(root), file, st))
    found += [(Path(error.filename).relative_to(root), None, None) for error in unlisted if error.filename]
    return found


def dataset_hash(path: str | os.PathLike, root: str | os.PathLike = ".") -> tuple[str, str]:
    """(hash, where it came from) for ``path``, relative to the DVC project ``root``."""
    root = Path(root)
    rel = _norm(os.path.relpath(path, root)) if os.path.isabs(str(path)) else _norm(path)
    outs = _lock_outs(root / "dvc.lock")
    for out, (md5, stage) in outs.items():  # the output, or a folder inside it: its hash + the subpath
        if _inside(rel, out):
            if _changed_since_recorded(root, stage, out):
                return _stale(root, rel, f"dvc.lock (stage {stage})")
            return (md5 if rel == out else f"{md5}/{rel[len(out) + 1:]}"), "dvc.lock"
    dvc_file = root / f"{rel}.dvc"
    if dvc_file.is_file():
        data = yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}
        for out in data.get("outs", []) or []:
            if "md5" in out:
                if _changed_since_recorded(root, os.path.relpath(dvc_file, root), rel):
                    return _stale(root, rel, dvc_file.name)
                return out["md5"], dvc_file.name
    return "content:" + content_hash(root / rel), "computed"
