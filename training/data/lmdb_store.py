"""Recognition sets in the LMDB layout deep-text-recognition-benchmark, PaddleOCR, MMOCR and parseq read.

Keys: ``image-%09d`` (encoded image bytes), ``label-%09d`` (UTF-8), ``num-samples`` (decimal),
1-based and contiguous. A set is written into ``<path>.partial`` and renamed when complete, so a
killed writer never leaves something that looks like a finished set.

Example:
    >>> with LmdbWriter("/tmp/demo_lmdb") as w:         # doctest: +SKIP
    ...     w.add(png_bytes, "서울")
    >>> LmdbDataset("/tmp/demo_lmdb")[0][1]             # doctest: +SKIP
    '서울'
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import lmdb
import numpy as np

_MAP_SIZE = 1 << 36  # 64 GiB of address space; LMDB files grow only as data is written


class LmdbWriter:
    """Append (image bytes, label) pairs; ``close()`` writes ``num-samples`` and publishes the set."""

    def __init__(self, path: str | os.PathLike, commit_every: int = 1000) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        self.env = lmdb.open(str(self.partial), map_size=_MAP_SIZE, subdir=True, lock=True)
        self.count = 0
        self.commit_every = commit_every
        self._txn = self.env.begin(write=True)

    def add(self, image: bytes, label: str) -> None:
        """Append one sample."""
        self.count += 1
        self._txn.put(b"image-%09d" % self.count, image)
        self._txn.put(b"label-%09d" % self.count, label.encode("utf-8"))
        if self.count % self.commit_every == 0:
            self._txn.commit()
            self._txn = self.env.begin(write=True)

    def close(self) -> None:
        """Finish the set and move it to its final path."""
        self._txn.put(b"num-samples", str(self.count).encode())
        self._txn.commit()
        self.env.sync()
        self.env.close()
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        """Drop everything written so far."""
        self._txn.abort()
        self.env.close()
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> "LmdbWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class LmdbDataset:
    """Read-only random access to one LMDB set: ``ds[i] -> (grey uint8 HxW array, label)``.

    The environment opens lazily in each process, so the object can be handed to DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"{self.path}: not an LMDB set (no data.mdb)")
        self._env: lmdb.Environment | None = None
        self._pid = -1
        with self._open().begin() as txn:
            raw = txn.get(b"num-samples")
        if raw is None:
            raise ValueError(f"{self.path}: LMDB set has no num-samples key")
        self.num_samples = int(raw)

    def _open(self) -> lmdb.Environment:
        if self._env is None or self._pid != os.getpid():
            if self._env is not None:
                # A handle inherited through fork (DataLoader workers): py-lmdb refuses a second
                # open of the same files in one process until it is closed. Closing the child's
                # copy of a read-only, lock-free environment leaves the parent's untouched.
                self._env.close()
            self._env = lmdb.open(str(self.path), readonly=True, lock=False, readahead=False,
                                  meminit=False, max_readers=64)
            self._pid = os.getpid()
        return self._env

    def __len__(self) -> int:
        return self.num_samples

    def label(self, index: int) -> str:
        """Label of sample ``index`` (0-based) without decoding the image."""
        with self._open().begin() as txn:
            return txn.get(b"label-%09d" % (index + 1)).decode("utf-8")

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        key = index + 1
        with self._open().begin() as txn:
            raw = txn.get(b"image-%09d" % key)
            label = txn.get(b"label-%09d" % key).decode("utf-8")
        image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise ValueError(f"{self.path}: sample {key} holds an undecodable image")
        return image, label

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_env"] = None
        return state
