"""Recognition sets in the LMDB layout deep-text-recognition-benchmark, PaddleOCR, MMOCR and parseq read.

Keys: ``image-%09d`` (encoded image bytes), ``label-%09d`` (UTF-8), ``num-samples`` (decimal),
1-based and contiguous. A set is written into ``<path>.partial`` and renamed when complete, so a
killed writer never leaves something that looks like a finished set.

Large sets are sharded: ``<split>/shard-00000/``, ``shard-00001/``… each a standard set, with
``<split>/index.json`` naming the shards once the writer finished. ``LmdbDataset`` reads either a
single set or such a folder of shards as one dataset.

Example:
    >>> with LmdbWriter("/tmp/demo_lmdb") as w:         # doctest: +SKIP
    ...     w.add(png_bytes, "서울")
    >>> LmdbDataset("/tmp/demo_lmdb")[0][1]             # doctest: +SKIP
    '서울'
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import io
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import cv2
import lmdb
import numpy as np
from PIL import Image

from kocr.atomic import (  # noqa: F401 - SetBusyError: importers name it here
    DISK_FULL, NEARLY_FULL, PartialFolder, SetBusyError, disk_full_errno, fsync_path, named_disk_errors)

_MAP_SIZE = 1 << 36  # 64 GiB of address space; LMDB files grow only as data is written
SHARD_INDEX = "index.json"
LMDB_FILES = frozenset({"data.mdb", "lock.mdb"})  # the files of one set (a folder LMDB opens)


def _content_digest(txn: lmdb.Transaction, count: int, where: str | os.PathLike) -> "hashlib._Hash":
    """The content hash of samples 1..``count`` read through ``txn`` (ValueError naming a missing one)."""
    digest = hashlib.sha256()
    for n in range(1, count + 1):
        image, label = txn.get(b"image-%09d" % n), txn.get(b"label-%09d" % n)
        if image is None or label is None:
            raise ValueError(f"{where}: sample {n} of {count} is missing")
        sample_digest(digest, image, label)
    return digest


def sample_digest(digest: "hashlib._Hash", image: bytes, label: bytes) -> None:
    """Feed one sample to a running content hash (length-prefixed, so boundaries cannot shift)."""
    digest.update(len(label).to_bytes(4, "little") + label + len(image).to_bytes(8, "little"))
    digest.update(image)




class LmdbWriteError(RuntimeError):
    """LMDB refused a commit with room left on the disk (an I/O error, a full map); names the set."""


def lmdb_disk_full(exc: lmdb.Error, folder: Path) -> OSError | None:
    """The ``OSError`` naming ``folder/data.mdb`` that LMDB's error ``exc`` is when a write failed for want
    of room, or None. LMDB reports a short write (a disk that filled, a used-up quota, a file-size limit:
    ``ulimit -f``) as "Input/output error" (EIO): then a probe write past the end of ``data.mdb`` beside it
    tells which (``kocr.atomic.disk_full_errno``), and with under ``NEARLY_FULL`` bytes free it is taken
    for a full disk as before. An errno LMDB got itself (ENOSPC, EDQUOT, EFBIG) is kept."""
    data = folder / "data.mdb"
    code = getattr(exc, "code", 0)
    if code == errno.EIO:
        try:
            code = disk_full_errno(folder, data.stat().st_size) or code
        except OSError:
            pass
    if code not in DISK_FULL:
        try:
            code = errno.ENOSPC if shutil.disk_usage(folder).free < NEARLY_FULL else code
        except OSError:
            pass
    if code not in DISK_FULL:
        return None
    return OSError(code, f"{os.strerror(code)} ({exc})", str(data))


class LmdbWriter:
    """Append (image bytes, label) pairs; ``close()`` writes ``num-samples`` and publishes the set.

    With ``resume_key`` (a digest of everything the samples depend on), a ``DIR.partial`` left by a
    killed writer with the same key is continued: the samples it committed are kept and ``count``
    starts after them (``resumed`` says how many). Any other ``DIR.partial``, or one whose LMDB is
    truncated or damaged, is discarded. Such a writer also keeps the samples it committed when the
    block it serves fails (Ctrl-C, a full disk), and holds an exclusive lock on ``.DIR.lock`` beside
    the set, so that a second writer of the same set stops with ``SetBusyError`` instead of taking
    the live ``DIR.partial`` for a killed one. The lock file also holds the key the partial set was
    started with, so the published set carries no file of the writer's (``kocr.atomic.PartialFolder``,
    which ``synth_pages`` writes its pages through too).
    """

    def __init__(self, path: str | os.PathLike, commit_every: int = 1000, resume_key: str | None = None,
                 lock: bool = False) -> None:
        self.path = Path(path)
        if self.path.is_symlink():  # publishing replaces the folder: it would have to delete the link
            raise LmdbWriteError(f"{self.path}: a symbolic link (to {os.readlink(self.path)}); give the folder "
                                 "itself, or a new path")
        self.commit_every = commit_every
        self.resumable = resume_key is not None
        self.folder = PartialFolder(self.path, lock=lock, keyed=self.resumable)  # lock: refuse a second writer too
        self.partial = self.folder.partial
        try:
            self._start(resume_key)
        except BaseException:  # a full disk, a bad path: no lock kept for a writer that never ran
            self.folder.unlock()
            raise

    def _start(self, resume_key: str | None) -> None:
        self.resumed = self._resumable_samples(resume_key) if resume_key else 0
        self.env: lmdb.Environment | None = None
        if self.resumed:
            try:
                self._open(self.resumed)  # reads every kept sample back: a damaged page shows here
            except (lmdb.Error, ValueError):
                if self.env is not None:
                    self.env.close()
                self.resumed = 0
        if not self.resumed:
            self.folder.restart(resume_key)
            self._open(0)
        self._txn = self.env.begin(write=True)

    def _open(self, count: int) -> None:
        try:
            self.env = lmdb.open(str(self.partial), map_size=_MAP_SIZE, subdir=True, lock=True)
        except lmdb.Error as exc:  # a disk too full for its first pages: one line naming data.mdb
            raise lmdb_disk_full(exc, self.partial) or exc
        self.count = self.committed = count
        self._rehash()

    def _rehash(self) -> None:
        """The content hash of the committed samples 1..count, read back (after a resume or truncate)."""
        with self.env.begin() as txn:
            self.digest = _content_digest(txn, self.count, self.partial)

    def _resumable_samples(self, resume_key: str) -> int:
        """Samples 1..n a killed writer of the same key committed to ``DIR.partial`` (0: none usable)."""
        if not self.folder.started_with(resume_key):
            return 0
        try:
            env = lmdb.open(str(self.partial), readonly=True, lock=False, subdir=True)
        except lmdb.Error:
            return 0
        try:
            # pages past the file's end (a truncated copy) would be a bus error when read, not an exception
            if (env.info()["last_pgno"] + 1) * env.stat()["psize"] > (self.partial / "data.mdb").stat().st_size:
                return 0
            with env.begin() as txn:
                n = env.stat()["entries"] // 2  # image and label per sample (and num-samples if close was cut short)
                whole = all(txn.get(b"%s-%09d" % (kind, i)) is not None for kind in (b"image", b"label")
                            for i in (1, n)) and txn.get(b"image-%09d" % (n + 1)) is None
                return n if whole else 0
        except (OSError, lmdb.Error):
            return 0
        finally:
            env.close()

    def truncate(self, count: int) -> None:
        """Drop the samples after the first ``count`` (a resume that keeps fewer than were committed)."""
        if count >= self.count:
            return
        for n in range(count + 1, self.count + 1):
            self._txn.delete(b"image-%09d" % n)
            self._txn.delete(b"label-%09d" % n)
        self._commit()
        self.count = count
        self._rehash()
        self._txn = self.env.begin(write=True)

    def sample(self, index: int) -> tuple[bytes, str]:
        """(image bytes, label) of committed or added sample ``index`` (1-based)."""
        image, label = self._txn.get(b"image-%09d" % index), self._txn.get(b"label-%09d" % index)
        if image is None or label is None:
            raise IndexError(index)
        return bytes(image), bytes(label).decode("utf-8")

    def add(self, image: bytes, label: str) -> None:
        """Append one sample."""
        self.count += 1
        encoded = label.encode("utf-8")
        self._txn.put(b"image-%09d" % self.count, image)
        self._txn.put(b"label-%09d" % self.count, encoded)
        sample_digest(self.digest, image, encoded)
        if self.count % self.commit_every == 0:
            self._commit()
            self._txn = self.env.begin(write=True)

    def close(self, extra: dict[str, bytes] | None = None) -> None:
        """Finish the set and move it to its final path, with ``extra`` files written inside it."""
        self._txn.put(b"num-samples", str(self.count).encode())
        self._commit()
        self.env.sync()
        self.env.close()
        (self.partial / "lock.mdb").unlink(missing_ok=True)  # readers need none; its bytes vary per run
        for name, data in (extra or {}).items():
            with named_disk_errors(self.partial / name):
                (self.partial / name).write_bytes(data)
        fsync_path(self.partial)
        self.folder.publish()

    def _commit(self) -> None:
        """Commit the write transaction. LMDB reports a full disk, a used-up quota or a file-size limit as
        an I/O error (``mdb_txn_commit: Input/output error``); that is raised as the OSError it is (ENOSPC,
        EDQUOT, EFBIG) naming ``data.mdb`` (``lmdb_disk_full``), which ``kocr`` reports in its disk-full
        line, any other error as ``LmdbWriteError`` naming the set and what its earlier commits keep."""
        try:
            self._txn.commit()
            self.committed = self.count
        except lmdb.Error as exc:
            full = lmdb_disk_full(exc, self.partial)
            if full is not None:
                raise full from exc
            raise LmdbWriteError(f"{self.partial}: LMDB could not commit samples {self.committed + 1}-{self.count} "
                                 f"({type(exc).__name__}: {exc})") from exc

    @property
    def sha256(self) -> str:
        """Hex content hash of the samples added so far (``lmdb_digest`` recomputes it from disk)."""
        return self.digest.hexdigest()

    def abort(self) -> None:
        """Drop everything written so far (also after a failed ``close``); a set already at ``path`` stays."""
        self._release()
        shutil.rmtree(self.partial, ignore_errors=True)

    def _release(self) -> None:
        """Drop the open transaction, close the set and let go of the lock; files stay as they are."""
        try:
            self._txn.abort()
            self.env.close()
        except lmdb.Error:  # already committed or closed by the close that failed
            pass
        self.folder.unlock()

    def __enter__(self) -> "LmdbWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._give_up()
            return
        try:
            self.close()
        except BaseException:  # a full disk while finishing: no half-written set left beside the old one
            self._give_up()
            raise

    def _give_up(self) -> None:
        """After an error or Ctrl-C: a resumable writer keeps what it committed for the next run."""
        if self.resumable and self.committed:
            self._release()
        else:
            self.abort()


def lmdb_parts(path: str | os.PathLike) -> list[Path]:
    """The LMDB sets behind ``path``: itself, or the shards of a shard folder in order."""
    path = Path(path)
    if (path / "data.mdb").is_file():
        return [path]
    index = path / SHARD_INDEX
    if index.is_file():
        try:
            names = [entry["name"] for entry in json.loads(index.read_text(encoding="utf-8"))["shards"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: unreadable shard index ({exc})") from exc
        parts = [path / name for name in names]
        missing = [p.name for p in parts if not (p / "data.mdb").is_file()]
        if missing:
            raise FileNotFoundError(f"{index}: shards {', '.join(missing)} are missing")
        return parts
    if path.is_dir():
        partial = sorted(p.name for p in path.glob("shard-*.partial"))
        if partial:
            raise ValueError(f"{path}: unfinished shard {partial[0]} (an interrupted prepare run; run it "
                             "again to finish)")
        parts = sorted(p for p in path.glob("shard-*") if (p / "data.mdb").is_file())
        if parts:
            return parts
    raise FileNotFoundError(f"{path}: not an LMDB set (no data.mdb) nor a folder of shard-* sets")


def lmdb_digest(path: str | os.PathLike) -> tuple[int, str]:
    """(samples, sha256) of one set's content read back from disk, as ``LmdbWriter.sha256`` hashes it."""
    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False)
    try:
        with env.begin() as txn:
            count = int(txn.get(b"num-samples"))
            return count, _content_digest(txn, count, path).hexdigest()
    finally:
        env.close()


_SHARED: dict[str, tuple[tuple[int, int], lmdb.Environment]] = {}
_SHARED_PID = os.getpid()


def shared_env(path: Path) -> lmdb.Environment:
    """One read-only environment per LMDB set and process, however many datasets read it.

    py-lmdb refuses to open the same set twice in one process, so datasets share handles. A set
    rewritten since it was opened (new data.mdb) gets a new handle. After a fork (DataLoader
    workers) the inherited handles are closed and reopened in the child; closing the child's copy
    of a read-only, lock-free environment leaves the parent's untouched.
    """
    global _SHARED_PID
    if _SHARED_PID != os.getpid():
        for _, env in _SHARED.values():
            env.close()
        _SHARED.clear()
        _SHARED_PID = os.getpid()
    key = str(path.resolve())
    stat = (path / "data.mdb").stat()
    version = (stat.st_ino, stat.st_mtime_ns)
    cached = _SHARED.get(key)
    if cached is not None and cached[0] == version:
        return cached[1]
    if cached is not None:
        cached[1].close()
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False, max_readers=64)
    except lmdb.Error as exc:
        raise ValueError(f"{path}: not a readable LMDB set ({exc})") from None
    _SHARED[key] = (version, env)
    return env


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: what every whole PNG ends with
JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"  # the SOI and EOI markers a whole JPEG begins and ends with
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length: TEM and the restart markers


def jpeg_cut_short(raw: bytes | memoryview) -> bool:
    r"""Whether ``raw`` is a JPEG that stops before its end-of-image marker (EOI): a partial download or copy.

    OpenCV's ``imdecode`` refuses such a buffer (None, with libjpeg's "Premature end of JPEG file" on
    stderr), ``imread`` fills its missing rows with grey, and Pillow raises "image file is truncated" only
    on a full decode. Bytes after the EOI are allowed (a phone's motion photo appends an MP4 of several
    MB, some cameras a trailer): where the last two bytes are not the EOI (~0.2 µs otherwise), the marker
    segments are walked to the first scan and what follows is searched for the EOI. Inside a scan's data
    a 0xFF byte is followed by 0x00 or a restart marker, so FF D9 there is the EOI, while an EXIF
    thumbnail's own EOI, in a segment before the scan, is skipped with its segment. Bytes whose segments
    do not walk are left to the decoder to refuse (False).

    >>> whole = JPEG_START + b"\xff\xe0\x00\x04JF" + b"\xff\xda\x00\x03\x01" + b"\x12\xff\x00\x34" + JPEG_END
    >>> jpeg_cut_short(whole), jpeg_cut_short(whole[:-3]), jpeg_cut_short(whole + b"ftypmp42" * 100)
    (False, True, False)
    """
    if raw[:2] != JPEG_START or raw[-2:] == JPEG_END:
        return False
    data, at = bytes(raw), 2
    while True:
        while data[at:at + 2] == b"\xff\xff":  # fill bytes before a marker
            at += 1
        if at + 2 > len(data):
            return True  # ends among its header segments
        if data[at] != 0xFF:
            return False
        marker = data[at + 1]
        if marker in _STANDALONE:
            at += 2
            continue
        if marker == 0xD9:  # an EOI before any scan: no image data at all, not one cut short
            return False
        if at + 4 > len(data):
            return True
        length = int.from_bytes(data[at + 2:at + 4], "big")
        if length < 2:
            return False
        if marker == 0xDA:  # start of scan: the image data, then (after any further scans) the EOI
            return data.find(JPEG_END, at + 2 + length) < 0
        at += 2 + length


def _check_whole(raw: memoryview, part: Path, key: int) -> None:
    """ValueError naming the sample when its image is a PNG cut short (no IEND chunk at its end) or a JPEG
    cut short (no EOI marker after its image data: :func:`jpeg_cut_short`).

    The start scan reads only headers, which such an image still has; OpenCV fails on it only when its
    batch comes up, many steps in (``imdecode`` returns None for both), and a set repaired then is another
    set to a resume (its digest). Looking at the last bytes costs nothing next to the digest of them all.
    """
    # the last 8 bytes: ~1 µs; else a whole PNG with bytes after its IEND (some writers append data, and
    # OpenCV decodes it whatever their length; was: only 4 KiB searched, so more was refused as cut short)
    if raw[:8] == PNG_SIGNATURE and raw[-8:] != PNG_END and PNG_END not in raw.tobytes():
        raise ValueError(f"{part}: sample {key} holds a PNG cut short (it does not end with its IEND chunk)")
    if jpeg_cut_short(raw):
        raise ValueError(f"{part}: sample {key} holds a JPEG cut short (truncated: no end-of-image marker "
                         "after its image data)")


def _label(raw: bytes | None, part: Path, key: int) -> str:
    if raw is None:
        raise ValueError(f"{part}: sample {key} has no label")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{part}: sample {key}: label {raw[:20]!r} is not UTF-8") from None


class LmdbDataset:
    """Read-only random access to one LMDB set or a folder of shards: ``ds[i] -> (grey HxW uint8, label)``.

    The environments open lazily in each process, so the object can be handed to DataLoader workers;
    any number of datasets over the same set can be open at once.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.parts = lmdb_parts(self.path)
        self._env: list[lmdb.Environment] | None = None
        self._pid = -1
        counts = []
        for part, env in zip(self.parts, self._open()):
            with env.begin() as txn:
                raw = txn.get(b"num-samples")
            if raw is None:
                raise ValueError(f"{part}: LMDB set has no num-samples key")
            try:
                count = int(raw)
            except ValueError:
                raise ValueError(f"{part}: num-samples {bytes(raw)[:20]!r} is not a number") from None
            if count < 0:  # read as an empty set (train: "no validation samples"), or shifting a later shard's keys
                raise ValueError(f"{part}: num-samples {bytes(raw)[:20]!r} is not a count of samples")
            counts.append(count)
        self._starts = [0, *itertools.accumulate(counts)][:-1]  # first global index of each part
        self.num_samples = sum(counts)

    def _open(self) -> list[lmdb.Environment]:
        if self._env is None or self._pid != os.getpid():
            self._env = [shared_env(part) for part in self.parts]
            self._pid = os.getpid()
        return self._env

    def _locate(self, index: int) -> tuple[lmdb.Environment, int, Path]:
        shard = bisect.bisect_right(self._starts, index) - 1
        return self._open()[shard], index - self._starts[shard] + 1, self.parts[shard]

    def __len__(self) -> int:
        return self.num_samples

    def _counts(self) -> list[int]:
        return [end - start for start, end in zip(self._starts, [*self._starts[1:], self.num_samples])]

    def version(self) -> list[list]:
        """What changes whenever a part of the set is written, read without reading a sample: per part its
        resolved path, ``data.mdb``'s device, inode, size, mtime and ctime (ns; a write, a copy over it, a
        rename or a ``touch`` that puts the mtime back all move the ctime), LMDB's last transaction id and
        last page, and its num-samples."""
        version = []
        for part, env, count in zip(self.parts, self._open(), self._counts()):
            stat = (part / "data.mdb").stat()
            info = env.info()
            version.append([str(part.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns,
                            stat.st_ctime_ns, info["last_txnid"], info["last_pgno"], count])
        return version

    def labels(self) -> Iterator[str]:
        """Every sample's label in order, one read transaction per part, no image read."""
        for part, env, count in zip(self.parts, self._open(), self._counts()):
            with env.begin() as txn:
                for key in range(1, count + 1):
                    yield _label(txn.get(b"label-%09d" % key), part, key)

    def label(self, index: int) -> str:
        """Label of sample ``index`` (0-based) without decoding the image."""
        env, key, part = self._locate(index)
        with env.begin() as txn:
            return _label(txn.get(b"label-%09d" % key), part, key)

    def size(self, index: int) -> tuple[int, int]:
        """(height, width) of sample ``index`` from the image header, without decoding the pixels."""
        env, key, part = self._locate(index)
        with env.begin(buffers=True) as txn:
            raw = txn.get(b"image-%09d" % key)
            if raw is None:
                raise ValueError(f"{part}: sample {key} has no image")
            _check_whole(raw, part, key)
            return self._header_size(raw, index)

    def _header_size(self, raw: memoryview, index: int) -> tuple[int, int]:
        try:
            width, height = Image.open(io.BytesIO(bytes(raw[:65536]))).size
        except (OSError, SyntaxError):
            width = height = 0
        if not (width and height):  # a header PIL cannot parse: decode the whole image
            height, width = self[index][0].shape[:2]
        return height, width

    def image_digest(self, index: int) -> bytes:
        """16-byte BLAKE2b of sample ``index``'s encoded image, as ``summary`` gives it, without its header read."""
        env, key, part = self._locate(index)
        with env.begin(buffers=True) as txn:
            raw = txn.get(b"image-%09d" % key)
            if raw is None:
                raise ValueError(f"{part}: sample {key} has no image")
            return hashlib.blake2b(raw, digest_size=16).digest()

    def summary(self, index: int) -> tuple[str, int, int, bytes]:
        """(label, height, width, 16-byte BLAKE2b of the encoded image) of sample ``index``, in one read.

        What a training state is checked against on resume: a set re-rendered with the same labels and
        sizes (another degradation, another font) has other image bytes.
        """
        env, key, part = self._locate(index)
        with env.begin(buffers=True) as txn:
            raw, encoded = txn.get(b"image-%09d" % key), txn.get(b"label-%09d" % key)
            if raw is None:
                raise ValueError(f"{part}: sample {key} has no image")
            label = _label(None if encoded is None else bytes(encoded), part, key)
            _check_whole(raw, part, key)
            digest = hashlib.blake2b(raw, digest_size=16).digest()
            height, width = self._header_size(raw, index)
        return label, height, width, digest

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        env, key, part = self._locate(index)
        with env.begin() as txn:
            raw = txn.get(b"image-%09d" % key)
            label = _label(txn.get(b"label-%09d" % key), part, key)
        if raw is None:
            raise ValueError(f"{part}: sample {key} has no image")
        if not raw:  # OpenCV asserts on an empty buffer (a cv2.error naming neither set nor sample)
            raise ValueError(f"{part}: sample {key} holds an empty image (0 bytes)")
        image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise ValueError(f"{part}: sample {key} holds an undecodable image")
        return image, label

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_env"] = None
        return state
