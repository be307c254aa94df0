"""LMDB recognition sets: the shared key layout, round trip, atomic publish, replace, errors."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
from torch.utils.data import DataLoader

from training.data.lmdb_store import LmdbDataset, LmdbWriteError, LmdbWriter

LABELS = ["서울특별시", "제2023-15호", "Kim"]


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(h, w), dtype=np.uint8) for h, w in ((20, 70), (31, 45), (16, 16))]


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def _write(path, images, labels) -> None:
    with LmdbWriter(path) as writer:
        for image, label in zip(images, labels):
            writer.add(_png(image), label)


def test_round_trip_labels_and_pixels(tmp_path):
    images = _images()
    _write(tmp_path / "set", images, LABELS)
    ds = LmdbDataset(tmp_path / "set")
    assert len(ds) == 3
    for i, (image, label) in enumerate(zip(images, LABELS)):
        got, got_label = ds[i]
        assert got_label == label and ds.label(i) == label
        assert got.dtype == np.uint8 and got.shape == image.shape
        assert np.array_equal(got, image)  # PNG is lossless
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds[-1]


def test_layout_is_one_based_and_counted(tmp_path):
    images = _images()
    _write(tmp_path / "set", images, LABELS)
    env = lmdb.open(str(tmp_path / "set"), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            keys = sorted(bytes(k) for k, _ in txn.cursor())
            assert txn.get(b"num-samples") == b"3"
            assert txn.get(b"image-000000000") is None and txn.get(b"label-000000000") is None
            for n, (image, label) in enumerate(zip(images, LABELS), start=1):
                assert txn.get(b"label-%09d" % n).decode("utf-8") == label
                assert txn.get(b"image-%09d" % n) == _png(image)
    finally:
        env.close()
    expected = [b"num-samples"] + [b"%s-%09d" % (kind, n) for kind in (b"image", b"label") for n in (1, 2, 3)]
    assert keys == sorted(expected)
    assert keys[0] == b"image-000000001"


def test_commits_in_chunks_keep_every_sample(tmp_path):
    image = _png(np.zeros((8, 8), np.uint8))
    with LmdbWriter(tmp_path / "set", commit_every=2) as writer:
        for i in range(5):
            writer.add(image, f"가{i}")
    ds = LmdbDataset(tmp_path / "set")
    assert [ds.label(i) for i in range(len(ds))] == [f"가{i}" for i in range(5)]


def test_empty_set_is_valid(tmp_path):
    with LmdbWriter(tmp_path / "empty"):
        pass
    assert len(LmdbDataset(tmp_path / "empty")) == 0


def test_failed_writer_leaves_nothing(tmp_path):
    path = tmp_path / "set"
    with pytest.raises(RuntimeError, match="boom"):
        with LmdbWriter(path) as writer:
            writer.add(_png(_images()[0]), "서울")
            assert (tmp_path / "set.partial").is_dir()  # work happens aside
            assert not path.exists()
            raise RuntimeError("boom")
    assert not path.exists()
    assert not (tmp_path / "set.partial").exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_set(tmp_path):
    path = tmp_path / "set"
    _write(path, _images(), LABELS)
    with pytest.raises(KeyboardInterrupt):
        with LmdbWriter(path) as writer:
            writer.add(_png(_images()[0]), "새것")
            raise KeyboardInterrupt
    ds = LmdbDataset(path)
    assert [ds.label(i) for i in range(len(ds))] == LABELS
    assert not (tmp_path / "set.partial").exists()


def test_a_disk_that_fills_while_finishing_keeps_the_previous_set_and_nothing_beside_it(tmp_path, monkeypatch):
    import errno

    from training.data import lmdb_store

    path = tmp_path / "set"
    _write(path, _images(), LABELS)

    def full(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lmdb_store, "fsync_path", full)  # close() fails after its commit
    with pytest.raises(OSError, match="No space left"):
        with LmdbWriter(path) as writer:
            writer.add(_png(_images()[0]), "새것")
    ds = LmdbDataset(path)
    assert [ds.label(i) for i in range(len(ds))] == LABELS
    assert not (tmp_path / "set.partial").exists()


@pytest.mark.parametrize("free,raised", [(1 << 20, OSError), (1 << 40, LmdbWriteError)])
def test_an_lmdb_io_error_on_a_nearly_full_disk_is_reported_as_a_full_disk(tmp_path, monkeypatch, free, raised):
    """LMDB reports ENOSPC on commit as "Input/output error"; with little room left it is a full disk."""
    import collections
    import errno

    from training.data import lmdb_store

    writer = LmdbWriter(tmp_path / "set")
    writer.add(_png(_images()[0]), "서울")
    real_txn = writer._txn

    class FailingTxn:
        def put(self, *args):
            return real_txn.put(*args)

        def commit(self):
            raise lmdb.Error("mdb_txn_commit: Input/output error")

        def abort(self):
            real_txn.abort()

    writer._txn = FailingTxn()
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(lmdb_store.shutil, "disk_usage", lambda path: usage(1 << 41, 0, free))
    with pytest.raises(raised) as info:
        writer.close()
    if raised is OSError:
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "set.partial" / "data.mdb")
    else:  # one line for kocr's error, naming the set and the samples lost
        assert str(info.value) == (f"{tmp_path / 'set.partial'}: LMDB could not commit samples 1-1 "
                                   "(Error: mdb_txn_commit: Input/output error)")
    writer.abort()
    assert not (tmp_path / "set.partial").exists()


FILE_SIZE_LIMITED = """
import resource, sys
import numpy as np, cv2
from kocr.cli import main
crops = sys.argv[1]
noise = np.random.default_rng(0).integers(0, 256, size=(64, 1200), dtype=np.uint8)  # ~77 KB as PNG
cv2.imwrite(crops + "/a.png", noise)
with open(crops + "/labels.tsv", "w", encoding="utf-8") as fh:
    fh.write("image\\ttext\\na.png\\t서울\\n")
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))  # ulimit -f 64: the set's one commit is larger
sys.exit(main(["import-crops", "--labels", crops + "/labels.tsv", "--out", sys.argv[2]]))
"""


def test_a_file_size_limit_hit_by_an_lmdb_commit_is_the_disk_full_line_naming_data_mdb(tmp_path):
    """Was: LMDB reports a short write (a disk that filled, a quota, ``ulimit -f``) as "Input/output error",
    and with room left on the disk ``kocr`` printed ``…set.partial: LMDB could not commit samples 1-1
    (Error: mdb_txn_commit: Input/output error)`` instead of the line naming the limit and the file."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    crops = tmp_path / "mine"
    crops.mkdir()
    run = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMITED, str(crops), str(tmp_path / "set")], cwd=repo,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"kocr import-crops: error: a file grew past the size limit (ulimit -f, or the filesystem's) writing "
        f"{tmp_path / 'set.partial' / 'data.mdb'}; raise the limit or write elsewhere and run the same command again")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no probe file left


@pytest.mark.parametrize("short_write", [errno.ENOSPC, errno.EDQUOT, None])
def test_an_lmdb_short_write_is_named_by_what_a_probe_write_beside_it_meets(tmp_path, monkeypatch, short_write):
    """A used-up quota leaves the disk with room (the NEARLY_FULL guess cannot see it): a probe write says."""
    from kocr import atomic
    from training.data import lmdb_store

    folder = tmp_path / "set.partial"
    folder.mkdir()
    (folder / "data.mdb").write_bytes(b"x" * 8192)
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        if short_write is not None:
            raise OSError(short_write, os.strerror(short_write))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(atomic.os, "pwrite", pwrite)
    short = lmdb.Error("mdb_txn_commit: Input/output error")
    short.code = errno.EIO  # as py-lmdb raises it
    full = lmdb_store.lmdb_disk_full(short, folder)
    if short_write is None:  # room, quota and size to spare: a real I/O error
        assert full is None
    else:
        assert (full.errno, full.filename) == (short_write, str(folder / "data.mdb"))
        assert "mdb_txn_commit" in full.strerror
    assert sorted(p.name for p in folder.iterdir()) == ["data.mdb"]  # the probe file is gone


def test_second_write_replaces_the_first(tmp_path):
    path = tmp_path / "set"
    _write(path, _images(), LABELS)
    new = [np.full((10, 30), 200, np.uint8)]
    _write(path, new, ["부산"])
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            assert txn.get(b"num-samples") == b"1"
            assert txn.get(b"label-000000002") is None  # nothing of the old set survives
    finally:
        env.close()
    ds = LmdbDataset(path)
    assert len(ds) == 1
    image, label = ds[0]
    assert label == "부산" and np.array_equal(image, new[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_stale_partial_folder_is_cleared(tmp_path):
    stale = tmp_path / "set.partial"
    stale.mkdir()
    (stale / "junk.bin").write_bytes(b"left by a killed run")
    _write(tmp_path / "set", _images()[:1], LABELS[:1])
    assert not stale.exists()
    assert len(LmdbDataset(tmp_path / "set")) == 1


def test_missing_set_names_the_path(tmp_path):
    folder = tmp_path / "not_a_set"
    folder.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        LmdbDataset(folder)
    assert str(folder) in str(info.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LmdbDataset(tmp_path / "nowhere")


def test_set_without_num_samples_is_rejected(tmp_path):
    env = lmdb.open(str(tmp_path / "raw"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"image-000000001", _png(_images()[0]))
        txn.put(b"label-000000001", "서울".encode())
    env.close()
    with pytest.raises(ValueError, match="num-samples"):
        LmdbDataset(tmp_path / "raw")


def test_a_negative_num_samples_is_refused_naming_the_set(tmp_path):
    _write(tmp_path / "set", _images(), LABELS)
    env = lmdb.open(str(tmp_path / "set"))
    with env.begin(write=True) as txn:
        txn.put(b"num-samples", b"-3")  # was: read as an empty set, so kocr train ran with "no validation samples"
    env.close()
    with pytest.raises(ValueError, match=r"set: num-samples b'-3' is not a count of samples"):
        LmdbDataset(tmp_path / "set")


def test_undecodable_image_is_reported(tmp_path):
    with LmdbWriter(tmp_path / "set") as writer:
        writer.add(b"not an image", "서울")
    ds = LmdbDataset(tmp_path / "set")
    assert ds.label(0) == "서울"
    with pytest.raises(ValueError, match="sample 1"):
        ds[0]


def test_an_empty_image_is_reported_by_set_and_sample_not_as_an_opencv_assertion(tmp_path):
    with LmdbWriter(tmp_path / "set") as writer:
        writer.add(_png(_images()[0]), "서울")
        writer.add(b"", "부산")  # another tool's writer that stored a 0-byte file
    ds = LmdbDataset(tmp_path / "set")
    with pytest.raises(ValueError, match=r"set: sample 2 holds an empty image"):
        ds[1]
    with pytest.raises(ValueError, match="sample 2"):
        ds.size(1)  # the header read falls back to decoding


def _refused_by_the_start_scan(tmp_path: Path, whole: bytes, with_tail: bytes, cut: bytes, shape: tuple[int, int],
                               kind: str) -> None:
    """A set of ``whole``, ``with_tail`` (bytes after the image's end: whole still) and ``cut`` (cut short): the
    second decodes and passes; the third, whose header still reads, is what training met mid-run, and the
    start scan (headers and digests only) now refuses it, naming it a ``kind`` cut short."""
    from training.charset import Charset
    from training.crops import CropDataset

    with LmdbWriter(tmp_path / "set") as writer:
        writer.add(whole, "서울")
        writer.add(with_tail, "부산")
        writer.add(cut, "대구")
    ds = LmdbDataset(tmp_path / "set")
    assert ds[1][0].shape == shape and ds.size(1) == shape
    with pytest.raises(ValueError, match="sample 3 holds an undecodable image"):  # what training met, mid-run
        ds[2]
    with pytest.raises(ValueError, match=rf"set: sample 3 holds a {kind} cut short \("):
        CropDataset(ds, Charset.named("korean_g2"))
    with pytest.raises(ValueError, match=rf"set: sample 3 holds a {kind} cut short \("):
        ds.size(2)


def test_a_png_cut_short_is_refused_by_the_start_scan_not_when_its_batch_comes_up(tmp_path):
    # its header still reads, so the start scan (headers and digests only) passed it and OpenCV stopped
    # training when its batch came up, many steps in, where a set repaired is another set to --resume
    whole = [_png(image) for image in _images()]
    _refused_by_the_start_scan(tmp_path, whole[0], whole[1] + b"\0" * 100, whole[2][: len(whole[2]) * 2 // 3],
                               (31, 45), "PNG")  # bytes after IEND: a whole image still


def _jpeg(image: np.ndarray, **pil_options) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", **pil_options)
    return buf.getvalue()


MOTION_PHOTO_TAIL = b"\0\0\0\x18ftypmp42" + bytes(range(256)) * 4096  # a phone's MP4 after the EOI (1 MiB here)


def test_a_jpeg_cut_short_is_refused_by_the_start_scan_not_when_its_batch_comes_up(tmp_path):
    # its header still reads, so the start scan passed it, and OpenCV's imdecode returns None for it: training
    # stopped with "undecodable image" when its batch came up, many steps in (a repaired set is another set to
    # --resume). Bytes after the EOI (motion photos, camera trailers) keep an image whole.
    whole = _jpeg(np.tile(np.linspace(0, 255, 90, dtype=np.uint8), (40, 1)))
    _refused_by_the_start_scan(tmp_path, whole, whole + MOTION_PHOTO_TAIL, whole[: len(whole) * 6 // 10], (40, 90),
                               "JPEG")  # the last: a partial download


def test_jpeg_cut_short_at_any_length_and_whole_with_any_tail():
    from training.data.lmdb_store import jpeg_cut_short

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(48, 64), dtype=np.uint8)
    # baseline; progressive (several scans, tables between them); an EXIF block holding a thumbnail's own
    # EOI before the image data, which must not be taken for the image's end; restart markers in the data
    thumbnail = b"Exif\0\0" + b"\xff\xd8\xff\xdb" + bytes(8) + b"\xff\xd9"
    for whole in (_jpeg(image), _jpeg(image, progressive=True), _jpeg(image, exif=thumbnail),
                  cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])[1].tobytes()):
        assert not jpeg_cut_short(whole)
        for tail in (b"\0", bytes(7), MOTION_PHOTO_TAIL, MOTION_PHOTO_TAIL + b"\xff\xd8\xff"):
            assert not jpeg_cut_short(whole + tail)
            assert not jpeg_cut_short(memoryview(whole + tail))  # as LMDB hands it over
        # every cut but one ending exactly at the thumbnail's EOI, taken for the image's end (the ~0.2 µs path);
        # that one holds no frame header, so its header read fails and the start scan decodes it and refuses it
        cut = [n for n in range(2, len(whole) - 1) if not jpeg_cut_short(whole[:n]) and whole[n - 2:n] != b"\xff\xd9"]
        assert cut == [], f"cut at {cut[:5]} not seen as cut short"
    assert not jpeg_cut_short(_png(image)) and not jpeg_cut_short(b"not an image")

def test_a_png_with_many_bytes_after_its_iend_is_not_refused_as_cut_short(tmp_path):
    # OpenCV decodes a PNG whatever follows its IEND chunk (a writer's appended data, a padded copy), so the
    # start scan must pass it however long that tail is
    from training.charset import Charset
    from training.crops import CropDataset

    whole = [_png(image) for image in _images()]
    with LmdbWriter(tmp_path / "set") as writer:
        writer.add(whole[0], "서울")
        writer.add(whole[1] + bytes(range(256)) * 64, "부산")  # 16 KiB after IEND
    ds = LmdbDataset(tmp_path / "set")
    assert ds[1][0].shape == (31, 45)  # what training reads decodes
    assert ds.size(1) == (31, 45) and ds.summary(1)[1:3] == (31, 45)
    assert len(CropDataset(ds, Charset.named("korean_g2"))) == 2


def test_dataset_pickles_without_its_environment(tmp_path):
    _write(tmp_path / "set", _images(), LABELS)
    ds = LmdbDataset(tmp_path / "set")
    ds[0]
    state = pickle.loads(pickle.dumps(ds)).__dict__
    assert state["_env"] is None  # an open environment is never shipped to a spawned worker
    assert state["num_samples"] == 3 and state["path"] == tmp_path / "set"


def test_forked_dataloader_workers_read_the_set(tmp_path):
    # The parent has the environment open (CropDataset scans every sample before training);
    # forked workers inherit that handle and must still be able to read.
    images = _images() * 2
    labels = [f"{label}{i}" for i, label in enumerate(LABELS * 2)]
    _write(tmp_path / "set", images, labels)
    ds = LmdbDataset(tmp_path / "set")
    assert ds[0][1] == labels[0]
    loader = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork",
                        collate_fn=lambda items: [(image.shape, label) for image, label in items])
    got = [item for batch in loader for item in batch]
    assert got == [(image.shape, label) for image, label in zip(images, labels)]
    assert ds[5][1] == labels[5]  # the parent's handle still works after the workers ran


# -- folders of shards -------------------------------------------------------------------------------

def _shards(folder, sizes) -> list[str]:
    labels = []
    for n, size in enumerate(sizes):
        chunk = [f"{n}-{i}" for i in range(size)]
        _write(folder / f"shard-{n:05d}", [np.full((4, 4 + i), n, np.uint8) for i in range(size)], chunk)
        labels += chunk
    return labels


def test_folder_of_shards_reads_as_one_set(tmp_path):
    labels = _shards(tmp_path / "train", [3, 1, 2])
    ds = LmdbDataset(tmp_path / "train")
    assert len(ds) == 6 and [ds.label(i) for i in range(6)] == labels
    image, label = ds[3]  # the first sample of the second shard
    assert label == "1-0" and image.shape == (4, 4) and image.max() == 1
    assert ds[5][1] == "2-1" and ds[0][1] == "0-0"
    with pytest.raises(IndexError):
        ds[6]
    state = pickle.loads(pickle.dumps(ds)).__dict__
    assert state["_env"] is None and state["num_samples"] == 6


def test_interrupted_shard_folder_is_refused(tmp_path):
    _shards(tmp_path / "train", [2])
    (tmp_path / "train" / "shard-00001.partial").mkdir()
    with pytest.raises(ValueError, match="shard-00001.partial"):
        LmdbDataset(tmp_path / "train")


def test_shard_index_is_authoritative(tmp_path):
    _shards(tmp_path / "train", [2, 2])
    (tmp_path / "train" / "index.json").write_text(json.dumps({"shards": [{"name": "shard-00001"}]}))
    ds = LmdbDataset(tmp_path / "train")
    assert [ds.label(i) for i in range(len(ds))] == ["1-0", "1-1"]
    (tmp_path / "train" / "index.json").write_text(json.dumps({"shards": [{"name": "shard-00002"}]}))
    with pytest.raises(FileNotFoundError, match="shard-00002"):
        LmdbDataset(tmp_path / "train")


def test_several_datasets_over_one_set_in_one_process(tmp_path):
    images = _images()
    _write(tmp_path / "set", images, LABELS)
    first, second = LmdbDataset(tmp_path / "set"), LmdbDataset(tmp_path / "set")
    assert first[1][1] == second[1][1] == LABELS[1]
    _write(tmp_path / "set", images[:2], ["다시", "쓰기"])  # rewritten while the others are open
    assert LmdbDataset(tmp_path / "set")[0][1] == "다시"


def test_sizes_come_from_headers_and_match_the_pixels(tmp_path):
    images = _images()
    with LmdbWriter(tmp_path / "set") as writer:
        for image, label in zip(images, LABELS):
            writer.add(_png(image), label)
        ok, jpg = cv2.imencode(".jpg", images[0])
        writer.add(jpg.tobytes(), "jpeg")
    ds = LmdbDataset(tmp_path / "set")
    assert [ds.size(i) for i in range(len(ds))] == [ds[i][0].shape for i in range(len(ds))]


def _killed_resumable(path, samples: int, key: str = "k") -> None:
    """A resumable writer stopped (Ctrl-C) after ``samples`` samples, committing every 4."""
    with pytest.raises(KeyboardInterrupt), LmdbWriter(path, commit_every=4, resume_key=key) as writer:
        for n in range(samples):
            writer.add(_png(np.full((8, 8), n % 256, np.uint8)), f"s{n}")
        raise KeyboardInterrupt


def test_a_resumable_writer_keeps_its_commits_and_takes_them_back_under_the_same_key(tmp_path):
    _killed_resumable(tmp_path / "set", 10)
    again = LmdbWriter(tmp_path / "set", commit_every=4, resume_key="k")
    assert again.resumed == again.count == 8  # two commits of 4; the last two samples were never committed
    assert again.sample(8) == (_png(np.full((8, 8), 7, np.uint8)), "s7")
    with LmdbWriter(tmp_path / "other", resume_key="k") as fresh:
        for n in range(8):
            fresh.add(_png(np.full((8, 8), n, np.uint8)), f"s{n}")
    assert again.sha256 == fresh.sha256  # the content hash is read back for the kept samples
    again.abort()
    _killed_resumable(tmp_path / "set", 10)
    assert LmdbWriter(tmp_path / "set", resume_key="another").resumed == 0  # other settings: start over


@pytest.mark.parametrize("damage", ["truncated", "scribbled", "finished but not published"])
def test_a_damaged_partial_set_is_started_over_not_crashed_on(tmp_path, damage):
    _killed_resumable(tmp_path / "set", 400)
    data = tmp_path / "set.partial" / "data.mdb"
    if damage == "truncated":  # reading pages past the end would be a bus error, not an exception
        with data.open("r+b") as fh:
            fh.truncate(data.stat().st_size // 2)
    elif damage == "scribbled":
        with data.open("r+b") as fh:
            fh.seek(3 * 4096)
            fh.write(b"\xff" * 8192)
    else:  # a kill inside close(): num-samples was committed, the rename never came
        env = lmdb.open(str(tmp_path / "set.partial"))
        with env.begin(write=True) as txn:
            txn.put(b"num-samples", b"400")
        env.close()
    writer = LmdbWriter(tmp_path / "set", commit_every=4, resume_key="k")
    assert writer.resumed == (400 if damage == "finished but not published" else 0)
    writer.add(_png(np.zeros((8, 8), np.uint8)), "next")
    writer.close()
    assert len(LmdbDataset(tmp_path / "set")) == writer.count


def test_a_second_writer_of_a_live_resumable_set_is_refused(tmp_path):
    from training.data.lmdb_store import SetBusyError

    (tmp_path / "set.partial").write_text("a file in the way")
    with pytest.raises(OSError):  # DIR.partial cannot be made: the writer never runs, and keeps no lock
        LmdbWriter(tmp_path / "set", resume_key="k")
    (tmp_path / "set.partial").unlink()
    first = LmdbWriter(tmp_path / "set", resume_key="k")
    with pytest.raises(SetBusyError, match="another process is writing this set"):
        LmdbWriter(tmp_path / "set", resume_key="k")
    first.add(_png(np.zeros((8, 8), np.uint8)), "a")
    first.close()
    with LmdbWriter(tmp_path / "set", resume_key="k") as second:  # the lock went with the first writer
        second.add(_png(np.zeros((8, 8), np.uint8)), "b")
    assert LmdbDataset(tmp_path / "set").label(0) == "b"


def test_a_writer_in_another_process_holds_the_set_until_it_dies(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from training.data.lmdb_store import SetBusyError

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom training.data.lmdb_store import LmdbWriter\n"
                               f"w = LmdbWriter({str(tmp_path / 'set')!r}, resume_key='k')\nprint('ready', flush=True)\n"
                               "time.sleep(60)"], cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"ready"
        with pytest.raises(SetBusyError, match="another process is writing this set"):
            LmdbWriter(tmp_path / "set", resume_key="k")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    LmdbWriter(tmp_path / "set", resume_key="k").abort()  # its lock died with it


def test_a_kill_while_the_set_is_being_published_keeps_its_samples(tmp_path, monkeypatch):
    import training.data.lmdb_store as store

    def killed(path):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(store, "fsync_path", killed)  # num-samples committed, the rename never done
        with pytest.raises(KeyboardInterrupt), LmdbWriter(tmp_path / "set", commit_every=10, resume_key="k") as w:
            for n in range(25):
                w.add(_png(np.full((8, 8), n, np.uint8)), f"s{n}")
    again = LmdbWriter(tmp_path / "set", commit_every=10, resume_key="k")
    assert again.resumed == 25
    again.close()
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["data.mdb"]  # no file of the writer's
