"""What ``CropDataset`` reads of every sample at its start, kept once per set version instead of once per process.

``CropDataset`` needs each sample's label and image size (its filters, the width buckets) and a digest of
every image (its ``fingerprint``, which a resumed run is checked against). Parsing each image's header and
hashing its bytes costs 50-130 µs a sample (minutes for the 4.5 million crops of the AI-Hub set), paid by
every ``kocr train``, every tuning trial and every resume. The first pass over a set writes the sizes, the
fingerprint and a digest of the labels to an index file; a later pass over the same, unchanged set reads
only the labels (no image) and takes the rest from the index.

The index lives outside the set (``index_dir()``), so neither DVC nor the content hash a run logs sees it,
and the writers that refuse a folder holding files of their own never meet it. It is used only while the
set's ``LmdbDataset.version()`` (each part's path, data.mdb's inode, size, mtime and ctime, LMDB's last
transaction id, the counts) is the one it was written for, the labels read hash as they did, and a few
images spread over the set have the sizes and digests it recorded; otherwise the set is read whole again
and the index rewritten.

Example:
    >>> rows = SampleRows(LmdbDataset("data/prepared/train"))   # doctest: +SKIP
    >>> sizes = [(h, w) for label, h, w in rows]                # doctest: +SKIP
    >>> rows.fingerprint, rows.from_index                        # doctest: +SKIP
    ('5d1e…', True)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from array import array
from pathlib import Path
from typing import IO, Any, Iterator

import PIL

from kocr.atomic import atomic_path
from kocr.set_cache import cache_dir as index_dir
from training.data.lmdb_store import LmdbDataset

MAGIC = b"kocr-set-index 1\n"
SPOTS = 16          # images re-hashed when an index is used: first, last and evenly between
_CHUNK = 1 << 16    # (height, width) pairs read or written at a time


class StaleIndex(Exception):
    """The labels read differ from those the index was written with: the set must be read whole."""


def index_path(source: LmdbDataset) -> Path | None:
    """The index file of the set at ``source.path`` (one per path: a set rewritten there replaces it)."""
    folder = index_dir()
    if folder is None:
        return None
    where = source.path.resolve()
    return folder / f"{where.name}-{hashlib.sha256(os.fsencode(where)).hexdigest()[:20]}.idx"


def spot_indices(count: int) -> list[int]:
    """The samples whose images are checked against an index of ``count`` samples."""
    return sorted({round(k * (count - 1) / (SPOTS - 1)) for k in range(SPOTS)}) if count else []


def _feed_label(digest: "hashlib._Hash", label: str) -> None:
    encoded = label.encode("utf-8", "surrogatepass")
    digest.update(len(encoded).to_bytes(4, "little") + encoded)


def _set_version(source: LmdbDataset) -> dict[str, Any]:
    """What an index is valid for: the set's version, the reader of image sizes (Pillow) and the checks its
    images passed (``checks``: 2 since a PNG cut short is refused, 3 since a JPEG cut short is, so an index
    written before does not vouch for a set holding one)."""
    return {"set": source.version(), "pillow": PIL.__version__, "checks": 3}


class SampleRows:
    """``(label, height, width)`` of each sample of ``source`` in order; ``fingerprint`` once iterated whole.

    From the set's index where one holds for the set as it is now (``from_index``; a ``StaleIndex`` at the
    end means the labels read were not the indexed ones), else from every sample, writing the index.
    The fingerprint digests every sample's label, image size and image bytes in order.
    """

    def __init__(self, source: LmdbDataset, use_index: bool = True) -> None:
        self.source, self.path = source, index_path(source)
        self.fingerprint = ""
        self._index: tuple[dict[str, Any], IO[bytes]] | None = self._load() if use_index else None
        self.from_index = self._index is not None

    def __iter__(self) -> Iterator[tuple[str, int, int]]:
        return self._indexed() if self._index is not None else self._scanned()

    def _load(self) -> tuple[dict[str, Any], IO[bytes]] | None:
        """The index's header and its file positioned at the sizes, when it holds for the set as it is."""
        if self.path is None:
            return None
        try:
            fh = self.path.open("rb")
        except OSError:
            return None
        try:
            if fh.readline() != MAGIC:
                raise ValueError("not an index")
            header = json.loads(fh.readline())
            count = self.source.num_samples
            if (header["version"] != json.loads(json.dumps(_set_version(self.source))) or header["count"] != count
                    or os.fstat(fh.fileno()).st_size != fh.tell() + 8 * count):
                raise ValueError("another set version")
            for index, image in header["spots"]:
                if self.source.image_digest(index).hex() != image:
                    raise ValueError("another image")
        except (OSError, ValueError, KeyError, TypeError):
            fh.close()
            return None
        return header, fh

    def _indexed(self) -> Iterator[tuple[str, int, int]]:
        header, fh = self._index
        labels = hashlib.sha256()
        pairs, at, left = array("i"), 0, 2 * header["count"]
        try:
            for label in self.source.labels():
                if at == len(pairs):
                    pairs, at = array("i"), 0
                    pairs.fromfile(fh, min(2 * _CHUNK, left))
                    left -= len(pairs)
                    if sys.byteorder == "big":
                        pairs.byteswap()
                _feed_label(labels, label)
                yield label, pairs[at], pairs[at + 1]
                at += 2
        finally:
            fh.close()
        if labels.hexdigest() != header["labels"]:
            raise StaleIndex(f"{self.source.path}: labels differ from its index {self.path}")
        self.fingerprint = header["fingerprint"]

    def _scanned(self) -> Iterator[tuple[str, int, int]]:
        version = _set_version(self.source)
        digest, labels = hashlib.sha256(), hashlib.sha256()
        spots, spot_rows = set(spot_indices(self.source.num_samples)), []
        store, pairs = self._scratch(), array("i")
        try:
            for i in range(self.source.num_samples):
                label, h, w, image = self.source.summary(i)
                digest.update(f"{label}\t{h}\t{w}\t{image.hex()}\n".encode("utf-8", "surrogatepass"))
                if store is not None:
                    _feed_label(labels, label)
                    if i in spots:
                        spot_rows.append([i, image.hex()])
                    if 0 <= h < 2**31 and 0 <= w < 2**31:
                        pairs.extend((h, w))
                    else:  # no int32: no index (no image format here has such sizes)
                        store = store.close()
                    if store is not None and len(pairs) >= 2 * _CHUNK:
                        store, pairs = self._spill(store, pairs), array("i")
                yield label, h, w
            self.fingerprint = digest.hexdigest()
            if store is not None:
                store = self._spill(store, pairs)
            if store is not None and _set_version(self.source) == version:  # not written to while read
                self._publish(store, {"version": version, "count": self.source.num_samples,
                                      "fingerprint": self.fingerprint, "labels": labels.hexdigest(),
                                      "spots": spot_rows})
        finally:
            if store is not None:
                store.close()

    def _scratch(self) -> IO[bytes] | None:
        """An unnamed file beside the index for the sizes (nothing left behind by a killed run), or None."""
        if self.path is None:
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return tempfile.TemporaryFile(dir=self.path.parent)
        except OSError:
            return None

    @staticmethod
    def _spill(store: IO[bytes], pairs: array) -> IO[bytes] | None:
        """Append ``pairs`` (little-endian int32) to ``store``; None when they cannot be written or kept."""
        try:
            if sys.byteorder == "big":
                pairs.byteswap()
            pairs.tofile(store)
            return store
        except OSError:
            store.close()
            return None

    def _publish(self, store: IO[bytes], header: dict[str, Any]) -> None:
        """Write the index atomically from ``header`` and the sizes in ``store``; a failure keeps none.
        Then drop the indexes of sets that are gone (a test's or a benchmark's temporary set)."""
        try:
            with atomic_path(self.path) as tmp, tmp.open("wb") as out:
                out.write(MAGIC + json.dumps(header).encode() + b"\n")
                store.seek(0)
                shutil.copyfileobj(store, out, 1 << 20)
        except OSError:
            return
        for other in self.path.parent.glob("*.idx"):
            if other != self.path and _orphaned(other):
                other.unlink(missing_ok=True)


def _orphaned(index: Path) -> bool:
    """Whether a part of the set ``index`` was written for has no data.mdb any more (False when unreadable)."""
    try:
        with index.open("rb") as fh:
            if fh.readline(64) != MAGIC:
                return False
            parts = json.loads(fh.readline(1 << 20))["version"]["set"]
        return any(not (Path(part[0]) / "data.mdb").is_file() for part in parts)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False
