"""Whole-or-nothing file writes: a file written in a hidden folder beside the target, renamed over it.

A full disk, an exception, Ctrl-C or SIGTERM (``kocr`` turns it into an exit) leaves the old file
(or none) and nothing else; readers never see half a file. The hidden folder's name is unique per
writer (``.NAME.TAG-PID.HEX.tmp``, TAG naming the machine and PID namespace), so two processes
writing the same path never write into each other's file, and the file inside it has the target's own name: ``torch.save``, which names its
archive after the file, writes the same bytes as a plain save to the target. Files get the usual
permissions (the umask's), as a plain ``open`` gives.

A SIGKILL cannot be cleaned up after, so what a killed writer left is removed by the next write
to the same folder (``sweep_stale``; writers of many files in one folder sweep it once instead).
Scratch folders (``scratch_folder``: a tune trial's checkpoints in ``$TMPDIR``) are named the same
way, so what a killed process left there goes with the next one's.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # no room: the device, a quota, a size limit
NEARLY_FULL = 16 * 2**20  # bytes free under which a write that failed some other way is taken for a full disk
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<tag>[0-9a-f]{6})-(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")  # .NAME.TAG-PID.HEX.tmp
EARLIER = ".earlier"  # _swap_in's earlier folder, moved aside: .OUT.earlier.TAG-PID.HEX.tmp
FOREIGN_AGE_S = 7 * 24 * 3600  # another machine's or container's leftovers go after a week untouched


@functools.lru_cache(maxsize=1)
def _namespace_tag() -> str:
    """Six hex digits naming this machine and PID namespace: a PID means something only there
    (containers sharing a bind-mounted checkout each count from 1)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:6]


def _temp_name(name: str) -> str:
    return f".{name}.{_namespace_tag()}-{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process, or no real PID: keep it
        return True
    return True


def _abandoned(entry: os.DirEntry, tag: str, pid: int) -> bool:
    """Left by a writer that has ended: here, its PID is gone; elsewhere, it is untouched for a week."""
    if tag == _namespace_tag():
        return pid != os.getpid() and not _alive(pid)
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > FOREIGN_AGE_S
    except OSError:
        return False


def temporary_name(name: str) -> bool:
    """Whether ``name`` is one the writers here give their temporary folders (``.NAME.TAG-PID.HEX.tmp``)."""
    return _TEMP.match(name) is not None


def sweep_stale(folder: str | os.PathLike, prefix: str = "") -> int:
    """Remove the temporary folders of writers in ``folder`` that have ended; returns how many.

    Only names of the form ``.NAME.TAG-PID.HEX.tmp`` (with NAME starting with ``prefix``) are
    touched: those made in this machine and PID namespace when no process of that PID runs, those
    made elsewhere (another container on a shared checkout, another machine on a shared disk) only
    after a week untouched. An earlier folder that a writer killed between ``_swap_in``'s two renames
    left aside is put back under its name instead (``_put_back_earlier``).
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    stale = [entry for entry in entries if (match := _TEMP.match(entry.name)) and entry.name.startswith(f".{prefix}")
             and _abandoned(entry, match["tag"], int(match["pid"]))]
    restored = _put_back_earlier(Path(folder), [entry.name for entry in entries], stale)
    for entry in stale:
        if entry.name not in restored:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


def _put_back_earlier(folder: Path, names: list[str], stale: list[os.DirEntry]) -> set[str]:
    """Put back under OUT an earlier folder that a killed ``_swap_in`` moved aside and did not replace;
    returns the names of the leftovers put back.

    Only where that can be told for sure: OUT is missing, exactly one ``.OUT.earlier.TAG-PID.HEX.tmp``
    is there (its writer ended), and the new folder its writer was about to move in is still there too:
    ``replaced_folder``'s stage of the same writer (``.OUT.TAG-PID.HEX.tmp``) or ``OUT.partial``
    (``PartialFolder``). A writer killed after the second rename moved its new folder in, so an OUT
    deleted since (by hand) is not brought back from a leftover that was on its way out."""
    asides: dict[str, list[str]] = {}
    for name in names:
        match = _TEMP.match(name)
        if match and match["name"].endswith(EARLIER) and match["name"] != EARLIER:
            asides.setdefault(match["name"][: -len(EARLIER)], []).append(name)
    ended = {entry.name for entry in stale}
    restored = set()
    for out, found in asides.items():
        if len(found) != 1 or found[0] not in ended or os.path.lexists(folder / out):
            continue
        writer = _TEMP.match(found[0]).group("tag", "pid")
        waiting = f"{out}.partial" in names or any(
            (match := _TEMP.match(name)) and match["name"] == out and match.group("tag", "pid") == writer for name in names)
        if waiting:
            try:
                os.rename(folder / found[0], folder / out)
            except OSError:
                continue
            restored.add(found[0])
    return restored


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False, sweep: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on leaving the block without error it replaces ``path``.

    ``durable`` fsyncs the file before the rename (checkpoints and resumable state, where a power
    cut must not leave an empty file under the final name). The temporary folder is removed on any
    exit that runs Python's cleanup. ``sweep`` first removes what killed writers left beside
    ``path`` (``sweep_stale``); a writer of thousands of files in one folder sweeps it once and
    passes False.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if sweep:
        sweep_stale(path.parent)
    folder = path.parent / _temp_name(path.name)
    folder.mkdir()
    tmp = folder / path.name
    try:
        with named_disk_errors(path, tmp):
            yield tmp
            if durable:
                fsync_path(tmp)
            os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def scratch_folder(name: str, parent: str | os.PathLike | None = None, sweep: str | None = None) -> Iterator[Path]:
    """Yield a new private folder ``.NAME.TAG-PID.HEX.tmp`` in ``parent`` (default: the system's
    temporary folder, ``$TMPDIR``), removed with all it holds when the block ends.

    A process killed by SIGKILL cannot remove its folder, so first the folders of ended processes
    whose NAME starts with ``sweep`` (default: ``name``) are removed from ``parent`` (``sweep_stale``:
    never a live process's, whoever runs it).
    """
    parent = Path(parent if parent is not None else tempfile.gettempdir())
    sweep_stale(parent, prefix=name if sweep is None else sweep)
    folder = parent / _temp_name(name)
    folder.mkdir(mode=0o700)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def named_disk_errors(path: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[None]:
    """Inside the block, a write that fails for want of room raises an ``OSError`` naming ``path``:
    ENOSPC, EDQUOT or EFBIG raised without a file name (or naming ``tmp``, its temporary stand-in),
    and torch.save's ``RuntimeError`` ("unexpected pos N vs M", "basic_ios::clear: iostream error"),
    which carries no errno: ENOSPC when under ``NEARLY_FULL`` bytes are free, else what a probe write
    past the end of the file being written meets (``disk_full_errno``: a used-up quota, a file-size limit
    such as ``ulimit -f``). A writer of several files staged together wraps each write, so the failing one
    is named."""
    path = Path(path)
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL and exc.filename in (None, str(tmp)):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except RuntimeError as exc:
        written = Path(tmp) if tmp is not None else path
        if shutil.disk_usage(written.parent).free < NEARLY_FULL:
            raise OSError(errno.ENOSPC, f"No space left on device ({exc})", str(path)) from exc
        try:  # torch.save's C++ writer turns EDQUOT and EFBIG into this RuntimeError too
            code = disk_full_errno(written.parent, written.stat().st_size if written.is_file() else 0)
        except OSError:
            code = None
        if code is not None:
            raise OSError(code, f"{os.strerror(code)} ({exc})", str(path)) from exc
        raise


def disk_full_errno(folder: str | os.PathLike, offset: int = 0) -> int | None:
    """Which of ``DISK_FULL`` a write of one 4 KiB block at ``offset`` of a new (sparse) file in ``folder``
    meets now (ENOSPC, EDQUOT, or EFBIG when ``offset`` is past the file-size limit), or None when it
    fits or fails otherwise. For a writer told only that a write fell short: LMDB reports a short write,
    which is what a disk that fills, a used-up quota or ``ulimit -f`` give, as "Input/output error".
    The probe file (``.room.TAG-PID.HEX.tmp``, swept if killed) is removed."""
    probe = Path(folder) / _temp_name("room")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return exc.errno if exc.errno in DISK_FULL else None
    try:
        block, at = memoryview(bytes(4096)), offset
        while block:  # a write that falls short (at the size limit) is tried on, to get its error
            written = os.pwrite(fd, block, at)
            if written <= 0:
                return None
            block, at = block[written:], at + written
        os.fsync(fd)  # a network or thin-provisioned disk may refuse the block only here
    except OSError as exc:
        return exc.errno if exc.errno in DISK_FULL else None
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    return None


def disk_full_line(prog: str, exc: OSError, out: str | None = None) -> str | None:
    """The one line a write that failed for want of room (``DISK_FULL``: a full disk, a used-up quota, a
    file-size limit) is reported in, ``PROG: error: … writing FILE; …``, naming the file the error names
    (else ``out``); None for any other OSError. ``kocr`` and ``python -m kocr.recipe`` print it, exit 2."""
    if exc.errno not in DISK_FULL:
        return None
    where = exc.filename or out or "its output"
    why, fix = {errno.EDQUOT: ("the disk quota is used up", "free some"),
                errno.EFBIG: ("a file grew past the size limit (ulimit -f, or the filesystem's)",
                              "raise the limit or write elsewhere")}.get(
        exc.errno, ("no space left on the device", "free some"))
    return f"{prog}: error: {why} writing {where}; {fix} and run the same command again"


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in blocks: how metrics, cards and run tags name a file."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, after a rename) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def database_full(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's "database or disk is full" (SQLITE_FULL) or was raised from it
    (``raise ... from``: SQLAlchemy's ``OperationalError``, and MLflow's ``MlflowException`` or Optuna's
    ``StorageInternalError`` raised from that). Other OperationalErrors (a locked database, a missing
    table) are not. The error does not say which file: whoever catches it knows what it was writing."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, sqlite3.Error) and getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        cause = cause.__cause__ or getattr(cause, "orig", None)  # orig: SQLAlchemy's DBAPIError's driver error
    return False


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = False, sweep: bool = True) -> Path:
    """Write ``data`` to ``path`` whole or not at all; returns the path."""
    with atomic_path(path, durable, sweep) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, durable: bool = False, sweep: bool = True) -> Path:
    """Write ``text`` as UTF-8 to ``path`` whole or not at all; returns the path."""
    with atomic_path(path, durable, sweep) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1, sweep: bool = True) -> Path:
    """Write ``data`` as UTF-8 JSON (Hangul kept readable) whole or not at all; returns the path."""
    return write_text(path, json.dumps(data, ensure_ascii=False, indent=indent), sweep=sweep)


@contextmanager
def _named_as_published(stage: Path, out: Path) -> Iterator[None]:
    """A write into the staging folder ``stage`` that fails for want of room names the file by the
    path it would have had in ``out`` (``outputs/worst_pages/base/01_p.png``), not by the hidden
    staging folder's, which is gone by the time anyone reads the message."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL and isinstance(exc.filename, str) and Path(exc.filename).is_relative_to(stage):
            raise OSError(exc.errno, exc.strerror, str(out / Path(exc.filename).relative_to(stage))) from exc
        raise


@contextmanager
def staged_files(out: str | os.PathLike, earlier: Callable[[str], bool]) -> Iterator[Path]:
    """Yield a staging folder for one run's files; on success they replace the earlier run's in ``out``.

    Files are written into a hidden folder inside ``out`` (so the final renames cannot fail for
    want of space). When the block ends without error, the earlier run's files (names ``earlier``
    accepts, and any file the new run replaces) are moved aside into a second hidden folder, each
    staged file is renamed into ``out``, and the earlier files are removed, so ``out`` never mixes
    two runs. When the block fails, ``out`` keeps the earlier run whole and the staging folder is
    removed; so it does when an exception (SIGTERM or Ctrl-C, which ``kocr`` turns into one) lands
    among the renames: the files moved in are taken out and the earlier ones put back. A name the
    run writes that is a folder in ``out`` is refused before anything in ``out`` changes. Other
    files in ``out`` are left alone (so the folder cannot be replaced whole, as ``replaced_folder``
    does). A SIGKILL among the renames cannot be undone: the earlier files it left aside are swept.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    stage = out / _temp_name("staging")
    stage.mkdir()
    try:
        with _named_as_published(stage, out):
            yield stage
        written = sorted(p.name for p in stage.iterdir())
        blocked = [name for name in written if (out / name).is_dir()]
        if blocked:
            raise IsADirectoryError(f"{out / blocked[0]}: a folder where this run writes a file; the earlier "
                                    "run's files are unchanged")
        names = set(written)
        aside = [old.name for old in out.iterdir()
                 if (old.name in names and (old.is_file() or old.is_symlink()))
                 or (old.name not in names and old.is_file() and earlier(old.name))]
        backup = out / _temp_name("staging.old")  # a killed writer's is swept (sweep_stale)
        backup.mkdir()
        try:
            for name in aside:
                os.replace(out / name, backup / name)
            for name in written:
                os.replace(stage / name, out / name)
        except BaseException:  # not all in: take the new files out, put the earlier ones back
            _put_back(stage, out, backup, written)
            raise
        finally:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _put_back(stage: Path, out: Path, backup: Path, written: list[str]) -> None:
    """Undo ``staged_files``' renames. The folders, not a count of the renames done, say where each
    file is (the exception may land just after a rename): a staged name gone from ``stage`` was
    moved into ``out`` and is taken out again, and whatever ``backup`` holds goes back to ``out``."""
    for name in written:
        if not (stage / name).exists() and not (stage / name).is_symlink():
            (out / name).unlink(missing_ok=True)
    for name in os.listdir(backup):
        os.replace(backup / name, out / name)


@contextmanager
def replaced_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a new, empty folder for one run's whole output (files and subfolders); when the block
    ends without error it takes the place of ``out`` and the earlier run's folder is removed, so
    ``out`` never mixes two runs (a model, page or picture the new run did not write is gone with
    the old folder). When the block fails, ``out`` is left as it was, and so it is when an exception
    (SIGTERM or Ctrl-C, which ``kocr`` turns into one) lands between moving the earlier folder aside
    and moving the new one in: the earlier one is put back (after a SIGKILL there, by the next sweep
    of the folder: ``_swap_in``). The folder always exists
    after a successful run, empty if nothing was written (DVC wants declared outputs)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out.parent)
    stage = out.parent / _temp_name(out.name)
    stage.mkdir()
    try:
        with _named_as_published(stage, out):
            yield stage
        _swap_in(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _swap_in(new: Path, out: Path) -> None:
    """Rename the folder ``new`` to ``out`` (beside it). An earlier ``out`` is first renamed aside, to a
    hidden ``.OUT.earlier.TAG-PID.HEX.tmp`` beside it, and removed only once the new folder is in, so
    ``out`` is at every moment the earlier folder whole, the new one whole, or (between the two renames)
    absent, never half removed however long the removal takes. An exception between the renames (SIGTERM
    or Ctrl-C, which ``kocr`` turns into one) puts the earlier folder back; after a SIGKILL there the next
    sweep of the folder puts it back (``sweep_stale``), and one killed in the middle of its removal is
    swept. The aside's name is used by nothing else (``staged_files`` keeps files in ``.staging.old``), so
    a sweep never takes another writer's leftover for an earlier folder."""
    old = out.parent / _temp_name(out.name + EARLIER)
    try:
        if out.exists() or out.is_symlink():
            os.replace(out, old)
        os.replace(new, out)
    except BaseException:  # the new folder is not in: put the earlier one back
        if new.exists() and (old.exists() or old.is_symlink()) and not (out.exists() or out.is_symlink()):
            os.replace(old, out)
        raise
    finally:
        if not new.exists():  # the new folder is in, also when an exception lands right after
            if old.is_symlink():
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)


class SetBusyError(RuntimeError):
    """Another live process is writing the same set."""


class OutFolderError(ValueError):
    """An ``--out`` a command will not replace: a symbolic link, or a folder holding files it did not write."""


def check_out_folder(out: str | os.PathLike, written_here: Callable[[str], bool], which: str, whole: str) -> None:
    """Refuse (``OutFolderError``) an ``--out`` that publishing a set into it would destroy: a file, or a
    folder holding a name ``written_here`` does not accept (a folder of the user's, ``.``), which
    ``PartialFolder.publish`` would replace whole; a killed writer's hidden ``.NAME.TAG-PID.HEX.tmp`` is
    no user's file and passes. The message says the folder ``holds 'NAME' (N such),
    which WHICH; give a new folder (WHOLE there is replaced whole)``. A missing ``out`` passes, and so does
    a symbolic link, which the writer refuses itself, naming its target.

    Example:
        >>> check_out_folder("data/own", {"data.mdb", "lock.mdb"}.__contains__,
        ...                  "an LMDB set does not", "a set")   # doctest: +SKIP
    """
    out = Path(out)
    if out.is_symlink() or not out.exists():
        return
    foreign = sorted(p.name for p in out.iterdir() if not written_here(p.name) and not temporary_name(p.name)) \
        if out.is_dir() else [""]
    if foreign:
        raise OutFolderError(f"--out {out}: " + (f"holds {foreign[0]!r} ({len(foreign)} such), which {which}"
                                                 if foreign[0] else "is a file")
                             + f"; give a new folder ({whole} there is replaced whole)")


_WRITING: set[Path] = set()  # lock files of the sets this process is writing


def holds_set_lock(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the lock file of a set this process is writing (``take_set_lock``). Such a file
    is not to be opened here: closing any of a process's descriptors of a file lets go of its POSIX locks
    on it, so a reader of every file (a content hash) would let a second writer in."""
    return bool(_WRITING) and Path(path).name.endswith(".lock") and Path(path).resolve() in _WRITING


def still_at(handle: Any, path: str | os.PathLike) -> bool:
    """Whether the open file ``handle`` is still the file at ``path``: a lock taken on it counts only then.
    Its holder may have unlinked it (and another process made a new one there) while this process was
    opening it or waiting for its lock; a lock on the unlinked file excludes nobody who opens ``path`` now."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def locked_file(path: str | os.PathLike, lock: Callable[[Any], None], mode: str = "a") -> Any:
    """``path`` opened (created if absent) and locked by ``lock(handle)`` (``flock`` or ``lockf``, which may
    raise: the file is then closed); returns the open file. A lock taken on a file its holder removed
    meanwhile is taken again on the one at ``path`` now (``still_at``), so two processes never each hold
    one, the second on a file nobody opens any more."""
    while True:
        handle = open(path, mode, encoding="utf-8")
        try:
            lock(handle)
            if still_at(handle, path):
                return handle
        except BaseException:
            handle.close()
            raise
        handle.close()  # removed (and maybe made anew) by its holder while this process opened or waited for it


def set_lock_path(path: str | os.PathLike) -> Path:
    """``.DIR.lock`` beside the folder ``path`` (``DIR``): the file its writer locks (``take_set_lock``)."""
    path = Path(path)
    if path.name in ("", ".."):  # ".", or a path ending in "..": name the folder itself
        path = Path(os.path.abspath(path))
    return path.with_name(f".{path.name}.lock")


def _lock_holder(handle: Any) -> int | None:
    """The PID of the process holding a POSIX lock on the open file ``handle`` (``F_GETLK``), or None where it
    cannot be told: not Linux (another ``struct flock`` layout), the lock gone meanwhile, or a holder in
    another PID namespace (a container on a shared checkout), which the kernel may report as 0."""
    if not sys.platform.startswith("linux") or struct.calcsize("P") != 8:
        return None
    layout = "hhqqi4x"  # struct flock: l_type, l_whence, l_start, l_len, l_pid
    try:
        found = fcntl.fcntl(handle, fcntl.F_GETLK, struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        kind, _, _, _, pid = struct.unpack(layout, found)
    except (OSError, struct.error):
        return None
    return pid if kind != fcntl.F_UNLCK and pid > 0 else None


def take_set_lock(path: str | os.PathLike, writer: str = "another process", what: str = "this set") -> Any:
    """An exclusive POSIX record lock on ``.DIR.lock`` beside the folder ``path`` (``set_lock_path``),
    returned as the open file (``release_set_lock`` lets go): held by this process only (forked workers,
    which may outlive a SIGKILLed parent for a moment, do not hold it) and released when it dies, so a
    killed writer never blocks the next. A second taker, in this process or another, stops at once with
    ``SetBusyError``: ``DIR: WRITER is writing WHAT (PID N holds .DIR.lock); wait for it to finish or stop
    it`` (``it holds`` where the PID cannot be told). A lock taken on a file its holder removed meanwhile
    (``release_set_lock``) is taken again on the one at the path now (``locked_file``, as
    ``kocr.locks.file_lock`` takes its lock), so two writers never each hold one."""
    lock_path = set_lock_path(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)

    def busy(pid: int | None) -> SetBusyError:
        holder = f"PID {pid}" if pid else "it"
        return SetBusyError(f"{path}: {writer} is writing {what} ({holder} holds {lock_path}); "
                            "wait for it to finish or stop it")

    if lock_path.resolve() in _WRITING:  # POSIX locks do not exclude the process that holds them
        raise busy(os.getpid())

    def lock(handle) -> None:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise busy(_lock_holder(handle)) from None

    handle = locked_file(lock_path, lock, "a+")
    _WRITING.add(lock_path.resolve())
    return handle


def release_set_lock(handle: Any, remove: bool) -> None:
    """Let go of a lock ``take_set_lock`` returned; with ``remove``, its file is removed first (nothing is
    left beside the set: ``locked_file`` makes a waiting writer lock the next file, not the removed one)."""
    _WRITING.discard(Path(handle.name).resolve())
    if remove:
        Path(handle.name).unlink(missing_ok=True)
    handle.close()  # closing the file releases the lock


@contextmanager
def set_lock(path: str | os.PathLike, writer: str = "another process", what: str = "this set") -> Iterator[None]:
    """``take_set_lock`` for the block, its file removed after: for a writer that keeps no key in it.

    Example:
        >>> with set_lock("data/prepared", "another prepare", "this folder"):   # doctest: +SKIP
        ...     write_shards()
    """
    handle = take_set_lock(path, writer, what)
    try:
        yield
    finally:
        release_set_lock(handle, remove=True)


class PartialFolder:
    """``DIR.partial`` beside ``DIR``: a set is written there and replaces ``DIR`` whole (``publish``),
    so a kill never leaves a set mixing two runs, and never one that looks finished.

    With ``lock``, an exclusive lock on ``.DIR.lock`` beside the set is held until ``unlock`` or
    ``publish``, so that a second writer of the same set stops with ``SetBusyError`` instead of
    taking the live ``DIR.partial`` for a killed one. With ``keyed`` (a resumable set), the lock file
    also holds the key the partial set was started with (``restart``): a run killed there is
    continued only by a run of the same key (``started_with``), and the published set carries no
    file of the writer's; that lock file stays beside the set, an unkeyed one is removed.
    """

    def __init__(self, path: str | os.PathLike, lock: bool = False, keyed: bool = False) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.keyed = keyed
        self._lock = self._take_lock() if lock or keyed else None
        sweep_stale(self.path.parent, prefix=self.path.name)  # an earlier DIR a killed publish left aside: back or gone

    def _take_lock(self):
        """The set's lock (``take_set_lock``): a second writer of it stops with ``SetBusyError``."""
        return take_set_lock(self.path)

    def started_with(self, key: str) -> bool:
        """Whether ``DIR.partial`` exists and was started under ``key`` (by a run since killed)."""
        if not self.keyed or self._lock is None:
            return False
        try:
            self._lock.seek(0)
            return self._lock.read() == key and self.partial.is_dir()
        except (OSError, UnicodeDecodeError):
            return False

    def restart(self, key: str | None = None) -> None:
        """An empty ``DIR.partial``, started under ``key`` (a keyed folder's)."""
        if self.keyed:  # the old key goes before the old files: a kill between never pairs them wrongly
            self._lock.truncate(0)
            self._lock.flush()
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        if self.keyed:
            self._lock.write(key or "")
            self._lock.flush()

    def publish(self) -> None:
        """Move ``DIR.partial`` to ``DIR`` and let go of the lock. An earlier ``DIR`` is renamed aside
        first and removed after (``_swap_in``), so a kill while it is removed (minutes, for gigabytes of
        LMDB) leaves the new set whole under ``DIR``, never half the earlier one beside ``DIR.partial``."""
        _swap_in(self.partial, self.path)
        self.unlock()

    def unlock(self) -> None:
        """Let go of the lock (files stay as they are); an unkeyed lock file is removed."""
        if self._lock is not None:  # an unkeyed one holds no key to resume by: nothing left beside the set (dvc add)
            release_set_lock(self._lock, remove=not self.keyed)
            self._lock = None
