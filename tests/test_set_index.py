"""The set index: a second CropDataset over an unchanged set reads no image, and a changed set is read again."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.charset import Charset
from training.crops import CropDataset
from training.data import set_index
from training.data.lmdb_store import LmdbDataset, LmdbWriter

KOREAN = Charset.named("korean_g2")
HANGUL = [c for c in KOREAN.chars if "가" <= c <= "힣"]


def _png(h: int, w: int, seed: int) -> bytes:
    ok, buf = cv2.imencode(".png", np.random.default_rng(seed).integers(0, 256, size=(h, w), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _samples(n: int = 40) -> list[tuple[bytes, str]]:
    """Kept and dropped samples of several widths (a label outside the charset, one too long, one empty)."""
    rows = []
    for i in range(n):
        label = "".join(HANGUL[i % 50:i % 50 + 1 + i % 6])
        if i % 9 == 4:
            label += "漢"
        if i % 13 == 5:
            label = HANGUL[0] * 40
        if i == 7:
            label = ""
        rows.append((_png(16 + i % 5, 20 + 7 * i, i), label))
    return rows


def _unchecked(n: int = 40) -> int:
    """A sample no spot check reads."""
    return next(i for i in range(n) if i not in set_index.spot_indices(n))


def _write(path: Path, samples: list[tuple[bytes, str]]) -> None:
    with LmdbWriter(path) as writer:
        for image, label in samples:
            writer.add(image, label)


@pytest.fixture
def reads(monkeypatch) -> dict[str, int]:
    """Count every image read of the start-up pass: header and digest (``summary``), digest alone."""
    counts = {"summary": 0, "image_digest": 0}
    for name in counts:
        real = getattr(LmdbDataset, name)

        def counted(self, index, _real=real, _name=name):
            counts[_name] += 1
            return _real(self, index)
        monkeypatch.setattr(LmdbDataset, name, counted)
    return counts


def _state(ds: CropDataset) -> tuple:
    return list(ds.indices), list(ds.widths), list(ds.dropped.items()), ds.longest_label, ds.fingerprint


def _fingerprint_as_before(path: Path) -> str:
    """The fingerprint as CropDataset computed it from every sample before the index existed."""
    source, digest = LmdbDataset(path), hashlib.sha256()
    for i in range(len(source)):
        label, h, w, image = source.summary(i)
        digest.update(f"{label}\t{h}\t{w}\t{image.hex()}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _unindexed(path: Path, monkeypatch, **kwargs) -> tuple:
    with monkeypatch.context() as m:
        m.setenv("KOCR_SET_INDEX_DIR", "")
        ds = CropDataset(LmdbDataset(path), KOREAN, **kwargs)
        assert not ds.from_index
        return _state(ds)


def test_a_second_dataset_on_an_unchanged_set_reads_no_image_header(tmp_path, reads, monkeypatch):
    _write(tmp_path / "set", _samples())
    listing = sorted(p.name for p in (tmp_path / "set").iterdir())
    first = CropDataset(LmdbDataset(tmp_path / "set"), KOREAN)
    assert reads["summary"] == 40
    assert first.dropped and first.fingerprint == _fingerprint_as_before(tmp_path / "set")
    reads.update(summary=0, image_digest=0)
    second = CropDataset(LmdbDataset(tmp_path / "set"), KOREAN)
    assert reads["summary"] == 0, "the second dataset read every image again"
    assert second.from_index and not first.from_index
    assert reads["image_digest"] == len(set_index.spot_indices(40)) == set_index.SPOTS  # the spot checks only
    assert _state(second) == _state(first) == _unindexed(tmp_path / "set", monkeypatch)
    # the filters are applied afresh to the indexed sizes: other settings, the same answers as a full read
    narrow = CropDataset(LmdbDataset(tmp_path / "set"), KOREAN, imgH=32, max_width=200, batch_max_length=3)
    assert narrow.from_index
    assert _state(narrow) == _unindexed(tmp_path / "set", monkeypatch, imgH=32, max_width=200, batch_max_length=3)
    # nothing was written into the set (DVC's hash and `dvc status` see the same files), one index beside none
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == listing
    assert [p.suffix for p in Path(os.environ["KOCR_SET_INDEX_DIR"]).iterdir()] == [".idx"]


def test_a_set_rewritten_at_the_same_path_is_read_again(tmp_path, reads, monkeypatch):
    samples = _samples()
    _write(tmp_path / "set", samples)
    before = CropDataset(LmdbDataset(tmp_path / "set"), KOREAN)
    # re-rendered: same count, labels and sizes, one image that no spot check reads has other pixels
    changed = _unchecked()
    samples[changed] = (_png(16 + changed % 5, 20 + 7 * changed, 999), samples[changed][1])
    _write(tmp_path / "set", samples)
    reads.update(summary=0)
    after = CropDataset(LmdbDataset(tmp_path / "set"), KOREAN)
    assert not after.from_index and reads["summary"] == 40
    assert after.fingerprint != before.fingerprint
    assert _state(after) == _unindexed(tmp_path / "set", monkeypatch)
    assert CropDataset(LmdbDataset(tmp_path / "set"), KOREAN).from_index  # its new index is used next



def test_an_index_written_before_a_jpeg_cut_short_was_refused_does_not_vouch_for_the_set(tmp_path, monkeypatch):
    # a kocr before the start scan refused a JPEG cut short wrote its index for such a set (checks 2); used now,
    # it would let that set train until the sample's batch came up and OpenCV returned None for it
    from training.data import lmdb_store

    ok, buf = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 256, size=(20, 60), dtype=np.uint8))
    samples = _samples()
    samples[_unchecked()] = (buf.tobytes()[: len(buf) * 6 // 10], samples[_unchecked()][1])  # no spot check reads it
    _write(tmp_path / "set", samples)
    with monkeypatch.context() as old_kocr:
        old_kocr.setattr(lmdb_store, "jpeg_cut_short", lambda raw: False)
        version = set_index._set_version
        old_kocr.setattr(set_index, "_set_version", lambda source: {**version(source), "checks": 2})
        assert not CropDataset(LmdbDataset(tmp_path / "set"), KOREAN).from_index  # the index written
        assert CropDataset(LmdbDataset(tmp_path / "set"), KOREAN).from_index
    with pytest.raises(ValueError, match=rf"sample {_unchecked() + 1} holds a JPEG cut short"):
        CropDataset(LmdbDataset(tmp_path / "set"), KOREAN)

def _put(path: Path, key: bytes, value: bytes) -> None:
    """Overwrite one key of the set in place, in another process (py-lmdb opens a set once a process)."""
    (path.parent / "value").write_bytes(value)
    code = ("import lmdb, sys, pathlib; env = lmdb.open(sys.argv[1], map_size=1 << 30)\n"
            "with env.begin(write=True) as txn: txn.put(sys.argv[2].encode(), pathlib.Path(sys.argv[3]).read_bytes())")
    subprocess.run([sys.executable, "-c", code, str(path), key.decode(), str(path.parent / "value")], check=True)


def test_a_set_written_in_place_is_read_again_even_with_its_mtime_put_back(tmp_path, reads, monkeypatch):
    _write(tmp_path / "set", _samples())
    before = CropDataset(LmdbDataset(tmp_path / "set"), KOREAN)
    data = tmp_path / "set" / "data.mdb"
    stat = data.stat()
    i = _unchecked()
    _put(tmp_path / "set", b"image-%09d" % (i + 1), _png(16 + i % 5, 20 + 7 * i, 999))  # same size, other pixels
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    reads.update(summary=0)
    after = CropDataset(LmdbDataset(tmp_path / "set"), KOREAN)
    assert not after.from_index and reads["summary"] == 40 and after.fingerprint != before.fingerprint
    assert _state(after) == _unindexed(tmp_path / "set", monkeypatch)


def test_what_the_set_version_misses_the_labels_and_spot_images_catch(tmp_path, reads, monkeypatch):
    _write(tmp_path / "set", _samples())
    CropDataset(LmdbDataset(tmp_path / "set"), KOREAN)
    monkeypatch.setattr(set_index, "_set_version", lambda source: {"same": "always"})
    CropDataset(LmdbDataset(tmp_path / "set"), KOREAN)  # an index written under the blind version
    # a relabelled sample: read from the index to its end, found out there, read again whole
    _put(tmp_path / "set", b"label-%09d" % 3, HANGUL[7].encode())
    reads.update(summary=0)
    relabelled = CropDataset(LmdbDataset(tmp_path / "set"), KOREAN)
    assert not relabelled.from_index and reads["summary"] == 40
    assert _state(relabelled) == _unindexed(tmp_path / "set", monkeypatch)
    # a spot image re-rendered: the index is refused before any row is taken from it
    _put(tmp_path / "set", b"image-%09d" % 40, _png(20, 300, 999))
    reads.update(summary=0)
    rerendered = CropDataset(LmdbDataset(tmp_path / "set"), KOREAN)
    assert not rerendered.from_index and reads["summary"] == 40
    assert _state(rerendered) == _unindexed(tmp_path / "set", monkeypatch)


def test_a_broken_or_unwritable_index_never_stops_training(tmp_path, monkeypatch):
    _write(tmp_path / "set", _samples())
    expected = _unindexed(tmp_path / "set", monkeypatch)
    CropDataset(LmdbDataset(tmp_path / "set"), KOREAN)
    index = set_index.index_path(LmdbDataset(tmp_path / "set"))
    index.write_bytes(index.read_bytes()[:-5])  # cut short
    cut = CropDataset(LmdbDataset(tmp_path / "set"), KOREAN)
    assert not cut.from_index and _state(cut) == expected
    assert CropDataset(LmdbDataset(tmp_path / "set"), KOREAN).from_index  # written whole again
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("KOCR_SET_INDEX_DIR", str(tmp_path / "file" / "index"))  # no folder can be made there
    for _ in range(2):
        ds = CropDataset(LmdbDataset(tmp_path / "set"), KOREAN)
        assert not ds.from_index and _state(ds) == expected


def test_a_folder_of_shards_is_indexed_as_one_set(tmp_path, reads, monkeypatch):
    samples = _samples()
    _write(tmp_path / "train" / "shard-00000", samples[:25])
    _write(tmp_path / "train" / "shard-00001", samples[25:])
    first = CropDataset(LmdbDataset(tmp_path / "train"), KOREAN)
    reads.update(summary=0)
    second = CropDataset(LmdbDataset(tmp_path / "train"), KOREAN)
    assert second.from_index and reads["summary"] == 0 and _state(second) == _state(first)
    _write(tmp_path / "train" / "shard-00001", samples[25:][::-1])  # one shard rewritten
    third = CropDataset(LmdbDataset(tmp_path / "train"), KOREAN)
    assert not third.from_index and _state(third) == _unindexed(tmp_path / "train", monkeypatch)
    assert third.fingerprint != first.fingerprint


def test_the_index_of_a_set_that_is_gone_is_dropped_when_another_is_written(tmp_path):
    for name in ("gone", "kept", "new"):
        _write(tmp_path / name, _samples(20))
    for name in ("gone", "kept"):
        CropDataset(LmdbDataset(tmp_path / name), KOREAN)
    indexes = {name: set_index.index_path(LmdbDataset(tmp_path / name)) for name in ("gone", "kept", "new")}
    shutil.rmtree(tmp_path / "gone")
    CropDataset(LmdbDataset(tmp_path / "new"), KOREAN)
    assert not indexes["gone"].exists() and indexes["kept"].exists() and indexes["new"].exists()
