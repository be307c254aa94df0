"""AI-Hub ingestion at scale: zip archives, the Training/Validation tree, shards, manifest, workers, resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
import zipfile
from collections import Counter
from pathlib import Path

import lmdb
import pytest

from training.data.lmdb_store import LmdbDataset, SetBusyError, lmdb_digest
from training.data.pages import Page, PageError, Word, parse_page, read_page, write_page
from training.data.prepare import PrepareConfig, PrepareConfigError, prepare_pages, split_documents
from training.data.sources import member_name, read_member, scan_source
from training.data.synth_pages import generate_pages

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
SHARD = 10  # samples per shard in these tests: several shards per split


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flat")
    generate_pages(root, count=8, seed=5, fonts=["NanumGothic.ttf"], width=480, height=360,
                   font_size=(14, 22), progress=False)
    for path in root.glob("*.json"):  # a reported defect on every page: reports must survive a resume
        page = read_page(path)
        page.words[0].text = unicodedata.normalize("NFD", page.words[0].text)
        write_page(page, path)
    return root


def _run(src: Path, out: Path, **knobs) -> dict:
    return prepare_pages(src, out, PrepareConfig(**{"shard_size": SHARD, **knobs}), progress=False)


def _samples(out: Path, split: str) -> list[tuple[str, bytes]]:
    ds = LmdbDataset(out / split)
    return [(ds.label(i), ds[i][0].tobytes()) for i in range(len(ds))]


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def reference(pages, tmp_path_factory) -> Path:
    """An uninterrupted single-process run: what every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    _run(pages, out)
    return out


# -- shards and manifest -----------------------------------------------------------------------------

def test_splits_are_folders_of_standard_lmdb_shards(reference):
    manifest = _manifest(reference)
    total = 0
    for split in SPLITS:
        entry = manifest["splits"][split]
        names = [s["name"] for s in entry["shards"]]
        assert names == [f"shard-{i:05d}" for i in range(len(names))]
        assert sorted(p.name for p in (reference / split).iterdir()) == ["index.json", *names]
        assert all(s["samples"] == SHARD for s in entry["shards"][:-1]) and 0 < entry["shards"][-1]["samples"] <= SHARD
        joined = []
        for shard in entry["shards"]:  # each shard is a plain DTRB-layout LMDB any reader can open
            env = lmdb.open(str(reference / split / shard["name"]), readonly=True, lock=False)
            with env.begin() as txn:
                n = int(txn.get(b"num-samples"))
                keys = sorted(bytes(k) for k, _ in txn.cursor())
                joined += [txn.get(b"label-%09d" % i).decode() for i in range(1, n + 1)]
            env.close()
            assert n == shard["samples"]
            assert keys == sorted([b"num-samples"] + [b"%s-%09d" % (k, i) for k in (b"image", b"label")
                                                      for i in range(1, n + 1)])
            assert lmdb_digest(reference / split / shard["name"]) == (n, shard["sha256"])
        ds = LmdbDataset(reference / split)  # the split folder reads as one concatenated set
        assert len(ds) == entry["samples"] == sum(s["samples"] for s in entry["shards"])
        assert [ds.label(i) for i in range(len(ds))] == joined
        total += len(ds)
    assert manifest["splits"]["train"]["shards"].__len__() >= 3
    hist = manifest["label_length_histogram"]
    assert sum(sum(h.values()) for h in hist.values()) == total
    train_labels = [label for label, _ in _samples(reference, "train")]
    assert hist["train"] == {str(k): v for k, v in sorted(Counter(len(lb) for lb in train_labels).items())}
    coverage = manifest["charset"]["coverage"]["train"]
    train_chars = set("".join(train_labels))
    assert coverage["characters_seen"] == len(train_chars) > 0
    assert not set(manifest["charset"]["missing_from_train"]) & train_chars


def test_shard_boundaries_split_pages_exactly(pages, reference, tmp_path):
    """A bigger shard size changes the shards, not the samples or their order."""
    _run(pages, tmp_path / "big", shard_size=10_000)
    for split in SPLITS:
        assert _samples(tmp_path / "big", split) == _samples(reference, split)
        assert len(_manifest(tmp_path / "big")["splits"][split]["shards"]) == 1
    assert _manifest(tmp_path / "big")["content_sha256"] != _manifest(reference)["content_sha256"]


def test_two_workers_give_the_same_bytes(pages, reference, tmp_path):
    report = _run(pages, tmp_path / "w2", workers=2)
    assert _manifest(tmp_path / "w2") == _manifest(reference)
    assert report == json.loads((reference / "report.json").read_text(encoding="utf-8"))
    assert (tmp_path / "w2" / "splits.json").read_bytes() == (reference / "splits.json").read_bytes()
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "w2") for p in (tmp_path / "w2").rglob("*") if p.is_file())
    for rel in files:  # every byte, LMDB files included: DVC sees one data version whatever the workers
        assert (tmp_path / "w2" / rel).read_bytes() == (reference / rel).read_bytes(), rel


def test_rerun_over_a_finished_output_changes_nothing(pages, reference, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(reference, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("data.mdb")}
    _run(pages, out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("data.mdb")} == before  # shards kept, not rewritten
    assert _manifest(out) == _manifest(reference)
    _run(pages, out, crop_margin=0.0)  # other knobs: the old shards are not reused
    assert _manifest(out)["content_sha256"] != _manifest(reference)["content_sha256"]
    assert all(p.stat().st_mtime_ns != before.get(p) for p in out.rglob("data.mdb"))


def test_output_inside_the_source_is_not_read_as_input(pages, reference, tmp_path):
    src = tmp_path / "data"
    shutil.copytree(pages, src)
    _run(src, src / "prepared")
    report = _run(src, src / "prepared")  # the second run sees the first one's JSON and LMDB files
    assert report["pages_found"] == 8 and report["skipped"] == json.loads(
        (reference / "report.json").read_text(encoding="utf-8"))["skipped"]
    assert _manifest(src / "prepared") == _manifest(reference)


def test_older_single_lmdb_output_is_replaced(pages, reference, tmp_path):
    out = tmp_path / "old"
    (out / "train").mkdir(parents=True)
    env = lmdb.open(str(out / "train"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"num-samples", b"0")
    env.close()
    _run(pages, out)
    assert not (out / "train" / "data.mdb").exists()
    assert _manifest(out) == _manifest(reference)


# -- killed runs resume ------------------------------------------------------------------------------

KILLER = """
import os, signal, sys
from training.data import lmdb_store
from training.data.prepare import PrepareConfig, prepare_pages
src, out, kill_at, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
add, calls = lmdb_store.LmdbWriter.add, [0]
def killing_add(self, image, label):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    add(self, image, label)
lmdb_store.LmdbWriter.add = killing_add
prepare_pages(src, out, PrepareConfig(shard_size=int(sys.argv[5]), workers=workers), progress=False)
"""


def _mid_page_boundary(reference: Path) -> int:
    """The number of the first train shard that ends inside a page (its last page goes on in the next)."""
    for n in range(len(_manifest(reference)["splits"]["train"]["shards"])):
        saved = json.loads((reference / "train" / f"shard-{n:05d}" / "kocr-shard.json").read_text(encoding="utf-8"))
        if saved["state"]["skip"] > 0:
            return n
    raise AssertionError("no shard boundary inside a page: change SHARD")


@pytest.mark.parametrize("where,workers", [("inside the first shard", 2), ("after a shard that ends mid-page", 1)])
def test_killed_run_resumes_to_the_same_result(pages, reference, tmp_path, where, workers):
    kill_at = SHARD // 2 if where == "inside the first shard" else (_mid_page_boundary(reference) + 1) * SHARD + 3
    out = tmp_path / "out"
    log = tmp_path / "stderr.txt"
    with log.open("wb") as err:  # a file, not a pipe: orphaned workers must not hold the test up
        proc = subprocess.run([sys.executable, "-c", KILLER, str(pages), str(out), str(kill_at), str(workers),
                               str(SHARD)], cwd=REPO, stderr=err, timeout=120)
    assert proc.returncode == -signal.SIGKILL, log.read_text()
    finished = sorted((out / "train").glob("shard-?????"))
    assert len(finished) == (kill_at - 1) // SHARD  # shards completed before the kill, none after
    assert (out / "train" / f"shard-{len(finished):05d}.partial").is_dir()
    assert not (out / "manifest.json").exists()
    with pytest.raises(ValueError, match="interrupted"):  # a half-written split is never read as complete
        LmdbDataset(out / "train")
    kept = {p: p.stat().st_mtime_ns for p in finished}
    report = _run(pages, out)
    assert {p: p.stat().st_mtime_ns for p in finished} == kept  # finished shards were skipped, not redone
    assert _manifest(out) == _manifest(reference)
    assert report == json.loads((reference / "report.json").read_text(encoding="utf-8"))
    assert not list(out.rglob("*.partial"))
    _same_files(out, reference)
    for split in SPLITS:
        for shard in _manifest(out)["splits"][split]["shards"]:
            assert lmdb_digest(out / split / shard["name"]) == (shard["samples"], shard["sha256"])


def _same_files(out: Path, reference: Path) -> None:
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert all((out / rel).read_bytes() == (reference / rel).read_bytes() for rel in files)


@pytest.mark.parametrize("how", ["killed in the test split", "run again when finished"])
def test_a_run_over_finished_splits_leaves_them_as_they_were(pages, reference, tmp_path, how):
    """Each finished split keeps its shard index, whichever split a resume starts in."""
    out = tmp_path / "out"
    if how == "killed in the test split":  # after its first shard: train and val are finished
        splits = _manifest(reference)["splits"]
        assert len(splits["test"]["shards"]) > 1
        kill_at = splits["train"]["samples"] + splits["val"]["samples"] + SHARD + 2
        with (tmp_path / "stderr.txt").open("wb") as err:
            proc = subprocess.run([sys.executable, "-c", KILLER, str(pages), str(out), str(kill_at), "1", str(SHARD)],
                                  cwd=REPO, stderr=err, timeout=120)
        assert proc.returncode == -signal.SIGKILL
    else:
        _run(pages, out)
    _run(pages, out)
    _same_files(out, reference)
    assert len(LmdbDataset(out / "train")) == _manifest(reference)["splits"]["train"]["samples"]


HOLDER = """
import os, sys, time
from pathlib import Path
from training.data import lmdb_store
from training.data.prepare import PrepareConfig, prepare_pages
src, out, hold_at, said = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
add, calls = lmdb_store.LmdbWriter.add, [0]
def holding_add(self, image, label):
    calls[0] += 1
    if calls[0] == hold_at:  # mid-write, a shard finished before: say so and wait to be killed
        said.write_text(str(os.getpid()))
        time.sleep(60)
    add(self, image, label)
lmdb_store.LmdbWriter.add = holding_add
prepare_pages(src, out, PrepareConfig(shard_size=int(sys.argv[5])), progress=False)
"""


def test_a_second_prepare_of_the_same_out_stops_while_the_first_writes_and_a_killed_one_resumes(
        pages, reference, tmp_path, monkeypatch, capsys):
    # was: the second run (same --src or another) cleared the shards the first one was writing, as another
    # run's: the first ended with exit 0 and a manifest listing shards no longer there, the second with
    # "No such file or directory: ...shard-00105.partial"
    from kocr.cli import main

    out, said = tmp_path / "out", tmp_path / "holding"
    with (tmp_path / "stderr.txt").open("wb") as err:
        first = subprocess.Popen([sys.executable, "-c", HOLDER, str(pages), str(out), str(SHARD + 3), str(said),
                                  str(SHARD)], cwd=REPO, stderr=err)
    try:
        for _ in range(600):
            if said.exists() or first.poll() is not None:
                break
            time.sleep(0.05)
        assert said.exists(), (tmp_path / "stderr.txt").read_text()
        written = sorted(p.relative_to(out) for p in out.rglob("*"))
        other = tmp_path / "other"  # a run of another source, as well
        shutil.copytree(pages, other)
        shutil.copy(other / "page_00000.json", other / "page_00099.json")
        shutil.copy(other / "page_00000.jpg", other / "page_00099.jpg")
        monkeypatch.chdir(tmp_path)
        (tmp_path / "params.yaml").write_text(f"prepare: {{shard_size: {SHARD}}}\n", encoding="utf-8")
        for src in (pages, other):
            assert main(["prepare-aihub", "--src", str(src), "--out", str(out)]) == 2
            [line] = capsys.readouterr().err.splitlines()
            assert line == (f"kocr prepare-aihub: error: {out}: another prepare is writing this folder (PID "
                            f"{first.pid} holds {tmp_path / '.out.lock'}); wait for it to finish or stop it")
            with pytest.raises(SetBusyError, match="another prepare is writing this folder"):
                _run(src, out)
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == written  # the first one's files untouched
        assert not (tmp_path / "mlruns.db").exists()  # refused before an MLflow run was started
    finally:
        first.kill()
        first.wait()
    finished = out / "train" / "shard-00000"
    kept = finished.stat().st_mtime_ns
    report = _run(pages, out)  # the killed run's lock file left beside out: taken, and the run resumed
    assert finished.stat().st_mtime_ns == kept
    assert report == json.loads((reference / "report.json").read_text(encoding="utf-8"))
    _same_files(out, reference)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no lock file left


def test_an_out_given_through_a_link_is_locked_as_the_folder_it_names(pages, tmp_path):
    # was: the lock was taken beside the name given, so --out lnk (a link to real) took .lnk.lock while another
    # prepare wrote real under .real.lock, and the two cleared each other's shards
    from training.data.prepare import prepare_lock

    (tmp_path / "real").mkdir()
    (tmp_path / "lnk").symlink_to("real")
    with prepare_lock(tmp_path / "real"):
        with pytest.raises(SetBusyError, match=f"holds {re.escape(str(tmp_path / '.real.lock'))}"):
            _run(pages, tmp_path / "lnk")
    with prepare_lock(tmp_path / "lnk"):
        with pytest.raises(SetBusyError, match="another prepare is writing this folder"):
            _run(pages, tmp_path / "real")
    src = tmp_path / "src"  # a linked --out inside the source: its lock file there is no stray file either
    shutil.copytree(pages, src)
    (src / "deep" / "prepared").mkdir(parents=True)
    (src / "out").symlink_to("deep/prepared")
    unlocked = scan_source(src, exclude=src / "out").stray
    with prepare_lock(src / "out"):
        assert (src / "deep" / ".prepared.lock").exists()
        assert scan_source(src, exclude=src / "out").stray == unlocked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lnk", "real", "src"]


def test_an_out_inside_the_source_stays_locked_while_its_source_is_hashed(pages, tmp_path, monkeypatch):
    # was: kocr prepare-aihub logged the source's content hash, which opened and closed every file there, the
    # lock file beside an --out inside the source too; closing any descriptor of a file lets go of the process's
    # POSIX lock on it, so a second prepare of the same --out went on while this one wrote
    from kocr.cli import main
    from training.data import prepare

    src = tmp_path / "src"
    shutil.copytree(pages, src)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(f"prepare: {{shard_size: {SHARD}}}\n", encoding="utf-8")
    second = "from kocr.atomic import take_set_lock; take_set_lock('src/prepared')"
    tries, real = [], prepare._prepare

    def then_a_second_writer(*args, **kwargs):
        tries.append(subprocess.run([sys.executable, "-c", second], cwd=tmp_path, capture_output=True, text=True,
                                    env={**os.environ, "PYTHONPATH": str(REPO)}))
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare, "_prepare", then_a_second_writer)
    assert main(["prepare-aihub", "--src", "src", "--out", "src/prepared"]) == 0
    [tried] = tries
    assert tried.returncode == 1 and "SetBusyError: src/prepared: another process is writing" in tried.stderr, \
        tried.stderr  # refused: this run holds the lock
    assert not (src / ".prepared.lock").exists()


def test_failure_inside_a_worker_run_leaves_no_partial_shard(pages, reference, tmp_path, monkeypatch):
    from training.data import lmdb_store

    add, calls = lmdb_store.LmdbWriter.add, [0]

    def failing_add(self, image, label):
        calls[0] += 1
        if calls[0] == SHARD + 3:
            raise OSError("disk full")
        add(self, image, label)

    monkeypatch.setattr(lmdb_store.LmdbWriter, "add", failing_add)
    with pytest.raises(OSError, match="disk full"):
        _run(pages, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out" / "train").iterdir()] == ["shard-00000"]
    monkeypatch.setattr(lmdb_store.LmdbWriter, "add", add)
    _run(pages, tmp_path / "out")
    assert _manifest(tmp_path / "out") == _manifest(reference)


# -- AI-Hub downloads: the tree and the zip archives ---------------------------------------------------

CATEGORY, CODE, YEAR = "인.허가", "5350109", "1994"


def _aihub_pages(pages: Path) -> list[tuple[str, Page, bytes]]:
    """The generated pages renamed the AI-Hub way (document id file names)."""
    out = []
    for i, path in enumerate(sorted(pages.glob("page_*.json"))):
        page = read_page(path)
        stem = f"{CODE}-{YEAR}-{i + 1:04d}-0001"
        page.image_name = f"{stem}.jpg"
        out.append((stem, page, path.with_suffix(".jpg").read_bytes()))
    return out


def _cp949_zip(path: Path, files: dict[str, bytes]) -> None:
    """A zip whose member names are CP949 bytes without the UTF-8 flag, as Korean Windows tools write them."""
    placeholders = {}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, (name, data) in enumerate(files.items()):
            raw = name.encode("cp949")
            stand_in = f"Q{i:0{len(raw) - 1}d}"
            placeholders[stand_in.encode()] = raw
            zf.writestr(stand_in, data)
    blob = path.read_bytes()
    for stand_in, raw in placeholders.items():
        assert blob.count(stand_in) == 2  # local header and central directory
        blob = blob.replace(stand_in, raw)
    path.write_bytes(blob)


def _page_json(page: Page, encoding: str = "utf-8") -> bytes:
    text = json.dumps(page.to_dict(), ensure_ascii=False)
    if encoding == "cp949":  # CP949 has no decomposed jamo
        text = unicodedata.normalize("NFC", text)
    return text.encode(encoding)


@pytest.fixture(scope="module")
def zipped(pages, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zips")
    (root / "Training").mkdir()
    labels, images = {}, {}
    for n, (stem, page, jpg) in enumerate(_aihub_pages(pages)):
        folder = f"{CATEGORY}/{CODE}/{YEAR}"
        labels[f"{folder}/{stem}.json"] = _page_json(page, "cp949" if n == 0 else "utf-8")  # one CP949 JSON
        images[f"{folder}/{stem}.jpg"] = jpg
    labels["__MACOSX/인.허가/._x.json"] = b"\x00\x05\x16\x07"
    labels["읽어보세요.txt"] = "라벨 설명".encode("cp949")
    _cp949_zip(root / "Training" / f"[라벨]Training_{CATEGORY}.zip", labels)
    names = sorted(images)  # images spread over two archives, as AI-Hub splits big downloads
    _cp949_zip(root / "Training" / f"[원천]Training_{CATEGORY}1.zip", {k: images[k] for k in names[:5]})
    _cp949_zip(root / "Training" / f"[원천]Training_{CATEGORY}2.zip", {k: images[k] for k in names[5:]})
    return root


def test_cp949_member_names_are_decoded(zipped):
    with zipfile.ZipFile(zipped / "Training" / f"[라벨]Training_{CATEGORY}.zip") as zf:
        infos = zf.infolist()
    assert not any(info.flag_bits & 0x800 for info in infos)
    assert not any(CATEGORY in info.filename for info in infos)  # zipfile alone garbles them (CP437)
    assert {member_name(info) for info in infos} >= {f"{CATEGORY}/{CODE}/{YEAR}/{CODE}-{YEAR}-0001-0001.json",
                                                     "읽어보세요.txt"}


def test_zip_archives_give_the_same_crops_as_the_unpacked_tree(pages, zipped, tmp_path):
    tree = tmp_path / "tree"
    for stem, page, jpg in _aihub_pages(pages):
        for top, name, data in (("01.라벨링데이터(Json)", f"{stem}.json", _page_json(page)),
                                ("02.원천데이터(Jpg)", f"{stem}.jpg", jpg)):
            folder = tree / "Training" / top / CATEGORY / CODE / YEAR
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
    from_tree = _run(tree, tmp_path / "out_tree")
    from_zip = _run(zipped, tmp_path / "out_zip", workers=2)
    assert from_zip["pages_used"] == from_tree["pages_used"] == 8
    assert from_zip["crops"] == from_tree["crops"] and sum(from_zip["crops"].values()) > 0
    for split in SPLITS:
        assert _samples(tmp_path / "out_zip", split) == _samples(tmp_path / "out_tree", split)
    skipped = from_zip["skipped"]
    assert skipped["stray_file"]["examples"] == [f"Training/[라벨]Training_{CATEGORY}.zip/읽어보세요.txt"]
    assert skipped["stray_folder"]["examples"] == [f"Training/[라벨]Training_{CATEGORY}.zip/__MACOSX"]
    assert {"image_missing", "image_without_label", "malformed_json", "bad_encoding"}.isdisjoint(skipped)
    splits = json.loads((tmp_path / "out_zip" / "splits.json").read_text(encoding="utf-8"))
    first = f"Training/[라벨]Training_{CATEGORY}.zip/{CATEGORY}/{CODE}/{YEAR}/{CODE}-{YEAR}-0001-0001.json"
    assert first in [name for split in SPLITS for name in splits[split]]  # the CP949 JSON was read


def test_a_zip_inside_a_zip_is_named_as_such_not_as_a_stray_file(zipped, tmp_path):
    # was: stray_file, which the report's table defines as "not JSON, not an image, not a zip", and no page
    src = tmp_path / "src"
    src.mkdir()
    with zipfile.ZipFile(src / "공공행정문서 OCR.zip", "w") as outer:
        for archive in sorted((zipped / "Training").iterdir()):
            outer.write(archive, f"Training/{archive.name}")
    report = _run(src, tmp_path / "out")
    inner = [f"공공행정문서 OCR.zip/Training/{archive.name}" for archive in sorted((zipped / "Training").iterdir())]
    assert report["skipped"]["archive_in_archive"] == {"count": 3, "examples": inner}
    assert "stray_file" not in report["skipped"] and report["pages_found"] == 0


def _damage_member(archive: Path, name: str) -> None:
    """Flip bytes in the middle of one member's compressed data: inflating it, or its CRC-32, fails."""
    with zipfile.ZipFile(archive) as zf:
        info = next(i for i in zf.infolist() if member_name(i) == name)
    blob = bytearray(archive.read_bytes())
    at = info.header_offset
    start = at + 30 + int.from_bytes(blob[at + 26:at + 28], "little") + int.from_bytes(blob[at + 28:at + 30], "little")
    middle = start + info.compress_size // 2
    blob[middle:middle + 8] = bytes(b ^ 0xFF for b in blob[middle:middle + 8])
    archive.write_bytes(bytes(blob))


def test_a_damaged_zip_member_is_named_as_damaged_compressed_data(zipped, tmp_path):
    """Was ``image_corrupt`` "…jpg: error: Error -3 while decompressing data: …" (zlib's words, or
    zipfile's "BadZipFile: Bad CRC-32"), and the same for a label under ``unreadable_file``, whose image
    was then reported again as ``image_without_label``."""
    src = tmp_path / "zips"
    shutil.copytree(zipped, src)
    folder = f"{CATEGORY}/{CODE}/{YEAR}"
    labels, images = f"Training/[라벨]Training_{CATEGORY}.zip", f"Training/[원천]Training_{CATEGORY}1.zip"
    _damage_member(src / images, f"{folder}/{CODE}-{YEAR}-0001-0001.jpg")
    _damage_member(src / labels, f"{folder}/{CODE}-{YEAR}-0002-0001.json")
    report = _run(src, tmp_path / "out")
    skipped = {reason: entry["examples"] for reason, entry in report["skipped"].items()}
    for reason, name in (("image_corrupt", f"{images}/{folder}/{CODE}-{YEAR}-0001-0001.jpg"),
                         ("unreadable_file", f"{labels}/{folder}/{CODE}-{YEAR}-0002-0001.json")):
        assert len(skipped[reason]) == 1 and skipped[reason][0].startswith(f"{name}: damaged compressed data in ZIP ("), \
            skipped[reason]
    assert report["pages_used"] == 6
    assert "image_without_label" not in skipped  # was: the unreadable label's image, as if it had no label


def test_tree_pairs_by_mirrored_path_and_reports_orphans(pages, tmp_path):
    """Training and Validation hold the same folder names; a page's image is the one in its own tree."""
    src = tmp_path / "aihub"
    items = _aihub_pages(pages)
    for part, chunk in (("Training", items[:4]), ("Validation", items[4:])):
        for stem, page, jpg in chunk:
            labels = src / part / "01.라벨링데이터(Json)" / CATEGORY / CODE / YEAR
            images = src / part / "02.원천데이터(Jpg)" / CATEGORY / CODE / YEAR
            labels.mkdir(parents=True, exist_ok=True)
            images.mkdir(parents=True, exist_ok=True)
            write_page(page, labels / f"{stem}.json")
            (images / f"{stem}.jpg").write_bytes(jpg)
    # the same document id in both trees: each label must take its own tree's image
    stem, page, jpg = items[0]
    twin = src / "Validation" / "02.원천데이터(Jpg)" / CATEGORY / CODE / YEAR / f"{stem}.jpg"
    twin.write_bytes(items[5][2])
    (src / "Validation" / "02.원천데이터(Jpg)" / CATEGORY / CODE / YEAR / "9999-unlabelled.jpg").write_bytes(jpg)
    (src / "Training" / ".ipynb_checkpoints").mkdir()
    (src / "Training" / "Thumbs.db").write_bytes(b"\0")
    index = scan_source(src)
    label = next(m for m in index.labels if m.name.startswith("Training/") and stem in m.name)
    found, ambiguous = index.find_image(label, page.image_name)
    assert index.images[found].name.startswith("Training/02.원천데이터(Jpg)/") and not ambiguous
    report = _run(src, tmp_path / "out")
    skipped = report["skipped"]
    assert report["pages_used"] == 8
    assert skipped["image_without_label"]["examples"] == [
        f"Validation/02.원천데이터(Jpg)/{CATEGORY}/{CODE}/{YEAR}/{stem}.jpg",
        f"Validation/02.원천데이터(Jpg)/{CATEGORY}/{CODE}/{YEAR}/9999-unlabelled.jpg"]
    assert skipped["stray_folder"]["examples"] == ["Training/.ipynb_checkpoints"]
    assert skipped["stray_file"]["examples"] == ["Training/Thumbs.db"]


def test_unreadable_archive_and_twice_claimed_image_are_reported(pages, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("page_00000", "page_00001"):
        for suffix in (".json", ".jpg"):
            shutil.copy(pages / (name + suffix), src / (name + suffix))
    shutil.copy(pages / "page_00000.json", src / "copy_of_0.json")  # names page_00000.jpg too
    (src / "[원천]broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    report = _run(src, tmp_path / "out")
    skipped = report["skipped"]
    assert report["pages_used"] == 2
    # copy_of_0.json comes first by name, but page_00000.jpg is page_00000.json's by its stem
    assert skipped["image_used_twice"]["examples"] == ["copy_of_0.json (already page_00000.json)"]
    [broken] = skipped["archive_unreadable"]["examples"]
    assert broken.startswith("[원천]broken.zip: ")


def _mirrored(src: Path, part: str, stem: str, page: Page, image: bytes, suffix: str = ".jpg") -> None:
    """One page in AI-Hub's tree: its label under 01.라벨링데이터, its image under 02.원천데이터."""
    for top, name, data in (("01.라벨링데이터(Json)", f"{stem}.json", _page_json(page)),
                            ("02.원천데이터(Jpg)", f"{stem}{suffix}", image)):
        folder = src / part / top / CATEGORY / CODE / YEAR
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def _png(jpg: bytes) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpg)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_label_takes_its_own_folders_image_over_one_elsewhere_with_the_name_it_gives(pages, tmp_path):
    (stem, page, jpg), (_, other, other_jpg) = _aihub_pages(pages)[:2]
    src = tmp_path / "aihub"
    _mirrored(src, "Training", stem, page, _png(jpg), ".png")  # the label says .jpg; its image is a PNG
    other.image_name = page.image_name
    _mirrored(src, "Validation", stem, other, other_jpg)  # the same document id in Validation, as a .jpg
    index = scan_source(src)
    label = next(m for m in index.labels if m.name.startswith("Training/"))
    found, ambiguous = index.find_image(label, page.image_name)
    assert index.images[found].name.endswith(f"Training/02.원천데이터(Jpg)/{CATEGORY}/{CODE}/{YEAR}/{stem}.png")
    report = _run(src, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    # was: the Training label cropped from Validation's .jpg, Validation's page dropped as image_used_twice
    assert report["pages_used"] == 2
    assert {"image_used_twice", "image_without_label"}.isdisjoint(report["skipped"])


def test_a_label_that_does_not_parse_never_takes_a_usable_pages_image(pages, tmp_path):
    stem, page, jpg = _aihub_pages(pages)[0]
    src = tmp_path / "aihub"
    _mirrored(src, "Validation", stem, page, jpg)
    broken = src / "Training" / "01.라벨링데이터(Json)" / CATEGORY / CODE / YEAR / f"{stem}.json"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(_page_json(page)[:50])  # a truncated download, and no Training image
    report = _run(src, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    assert report["pages_used"] == 1  # was 0: the broken label claimed Validation's image first
    assert "malformed_json" in report["skipped"] and "image_used_twice" not in report["skipped"]


def test_zip_members_named_with_backslashes_pair(pages, tmp_path):
    (stem, page, jpg), = _aihub_pages(pages)[:1]
    src = tmp_path / "aihub"
    src.mkdir()
    with zipfile.ZipFile(src / f"[라벨]Training_{CATEGORY}.zip", "w") as zf:  # as PowerShell 5 writes them
        zf.writestr(f"{CATEGORY}\\{CODE}\\{YEAR}\\{stem}.json", _page_json(page))
    with zipfile.ZipFile(src / f"[원천]Training_{CATEGORY}.zip", "w") as zf:
        zf.writestr(f"원천\\{CATEGORY}\\{CODE}\\{YEAR}\\{stem}.jpg", jpg)
    report = _run(src, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    assert report["pages_used"] == 1 and {"image_missing", "image_without_label"}.isdisjoint(report["skipped"])


def test_a_label_corrected_in_place_is_read_again(pages, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(pages, src)
    _run(src, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    label = src / "page_00003.json"
    data = json.loads(label.read_text(encoding="utf-8"))
    word = next(a for a in data["annotations"] if re.fullmatch(r"[가-힣]{2,}", a["annotation.text"]))
    fixed = ("대" if word["annotation.text"][0] != "대" else "부") + word["annotation.text"][1:]
    before = label.stat().st_size
    label.write_text(label.read_text(encoding="utf-8").replace(word["annotation.text"], fixed, 1), encoding="utf-8")
    assert label.stat().st_size == before  # a typo fixed: the same size, names unchanged
    _run(src, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    labels = [text for text, _ in _samples(tmp_path / "out", "train")]
    assert fixed in labels  # was: the shards of the first run kept, with the old text
    assert _samples(tmp_path / "out", "train") == _samples(_fresh(src, tmp_path / "fresh"), "train")


def _fresh(src: Path, out: Path) -> Path:
    _run(src, out, val_fraction=0.0, test_fraction=0.0)
    return out


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("edited", ["test", "val"])
def test_a_label_corrected_in_one_split_leaves_the_splits_before_it_as_they_were(pages, tmp_path, edited):
    """DVC hashes train/ and val/ for train and tune: a label fixed on a test page must not change
    them (the run key of every shard covered every split's pages, so both were rewritten: a retrain)."""
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(pages, src)
    _run(src, out)
    label = src / json.loads((out / "splits.json").read_text(encoding="utf-8"))[edited][0]
    data = json.loads(label.read_text(encoding="utf-8"))
    word = next(a for a in data["annotations"] if re.fullmatch(r"[가-힣]{2,}", a["annotation.text"]))
    fixed = ("대" if word["annotation.text"][0] != "대" else "부") + word["annotation.text"][1:]
    label.write_text(label.read_text(encoding="utf-8").replace(word["annotation.text"], fixed, 1), encoding="utf-8")
    before = {split: _folder_bytes(out / split) for split in SPLITS}
    written = {p: p.stat().st_mtime_ns for p in out.rglob("data.mdb")}
    _run(src, out)
    earlier = SPLITS[:SPLITS.index(edited)]
    for split in earlier:
        assert _folder_bytes(out / split) == before[split], split
        assert all(p.stat().st_mtime_ns == t for p, t in written.items() if p.parts[-3] == split)  # kept
    assert _folder_bytes(out / edited) != before[edited]
    assert fixed in [text for text, _ in _samples(out, edited)]
    fresh = tmp_path / "fresh"  # what is kept and what is redone make the output of one run on the fixed pages
    _run(src, fresh)
    _same_files(out, fresh)


def test_a_linked_folder_is_read_and_a_link_loop_ends(pages, tmp_path):
    elsewhere = tmp_path / "big_disk"
    shutil.copytree(pages, elsewhere)
    src = tmp_path / "src"
    src.mkdir()
    (src / "Training").symlink_to(elsewhere)  # the data on another mount
    (elsewhere / "loop").symlink_to(src)
    report = _run(src, tmp_path / "out")
    assert report["pages_used"] == 8 and "stray_folder" not in report["skipped"]


def _sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DVC_STAGE", None)
    return subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def test_a_linked_folder_in_a_source_dvc_versions_stops_prepare(pages, tmp_path, monkeypatch, capsys):
    """DVC does not follow a linked folder: `dvc add` leaves its files out and `dvc status` misses their
    changes. Pages read from it would be in no data version, so prepare refuses before reading any. A
    linked file is not refused: DVC hashes the file it points to (and `dvc add` puts the file in its place)."""
    import yaml

    project = tmp_path / "proj"
    src, elsewhere = project / "data" / "aihub", tmp_path / "other_disk" / "Validation"
    (src / "Training").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    stems = sorted(p.stem for p in pages.glob("*.json"))
    for i, stem in enumerate(stems):
        for suffix in (".json", ".jpg"):
            shutil.copy(pages / f"{stem}{suffix}", (elsewhere if i >= 6 else src / "Training") / f"{stem}{suffix}")
    (src / "Validation").symlink_to(elsewhere)  # the download's Validation half on another disk
    _sh(project, "git", "init", "-q", ".")
    _sh(project, "dvc", "init", "-q")
    _sh(project, "dvc", "add", "-q", "data/aihub")
    assert yaml.safe_load((src.parent / "aihub.dvc").read_text())["outs"][0]["nfiles"] == 12  # none of the 4 linked
    linked_image = src / "Training" / f"{stems[0]}.jpg"  # an image moved out after `dvc add`, a link in its place
    shutil.move(linked_image, tmp_path / "other_disk" / linked_image.name)
    linked_image.symlink_to(tmp_path / "other_disk" / linked_image.name)
    assert _sh(project, "dvc", "status").strip() == "Data and pipelines are up to date."  # its bytes, read through
    monkeypatch.chdir(project)
    from kocr.cli import main

    (project / "params.yaml").write_text("prepare: {}\n")
    assert main(["prepare-aihub", "--src", "data/aihub", "--out", "data/prepared"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("kocr prepare-aihub: error: data/aihub/Validation is a link to ")
    with pytest.raises(PrepareConfigError) as refused:
        _run(Path("data/aihub"), Path("data/prepared"))
    assert str(refused.value).startswith(
        f"data/aihub/Validation is a link to {elsewhere}: data/aihub is versioned by data/aihub.dvc, and DVC does "
        "not follow a linked folder, so the data version, `dvc push` and the logged data hash would leave out the "
        "pages prepare reads there; ")
    assert str(refused.value).endswith("`dvc add data/aihub` again")
    assert not Path("data/prepared").exists()  # refused before anything was read or written
    (src / "Validation").unlink()  # the folder itself in its place: read, and versioned
    shutil.copytree(elsewhere, src / "Validation")
    assert _run(Path("data/aihub"), Path("data/prepared"))["pages_used"] == 8


# -- word-level defects that are new -------------------------------------------------------------------

def _one_page(pages: Path, src: Path) -> dict:
    """``src/p.jpg`` (a generated page) and its page JSON as a dict, to be spoiled and written as p.json."""
    src.mkdir()
    shutil.copy(pages / "page_00000.jpg", src / "p.jpg")
    data = read_page(pages / "page_00000.json").to_dict()
    data["images"][0]["image.file.name"] = "p.jpg"
    return data


def test_bad_annotations_are_skipped_not_the_page(pages, tmp_path):
    src = tmp_path / "src"
    data = _one_page(pages, src)
    good = len(data["annotations"])
    data["annotations"].append({"id": 99, "annotation.text": "상자없음"})                  # no bbox key
    data["annotations"].append({"id": 100, "annotation.text": "세개", "annotation.bbox": [1, 2, 3]})
    (src / "p.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    nan = read_page(pages / "page_00001.json")
    nan.image_name = "q.jpg"
    nan.words = [Word((float("nan"), 5.0, 10.0, 10.0), "서울"), Word((10.0, 10.0, 40.0, 20.0), "부산")]
    write_page(nan, src / "q.json")
    shutil.copy(pages / "page_00001.jpg", src / "q.jpg")
    report = _run(src, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    assert report["crops"]["train"] == good + 1
    examples = report["skipped"]["bad_annotation"]["examples"]
    assert [e.split(":")[0] for e in examples] == [f"p.json#{good + 1}", f"p.json#{good + 2}", "q.json#1"]


def test_defects_are_reported_at_each_annotations_place_in_the_file(pages, tmp_path):
    """A skipped annotation keeps the numbers of the ones after it; a label that is not text is skipped."""
    src = tmp_path / "src"
    data = _one_page(pages, src)
    anns = data["annotations"]
    anns.insert(0, {"id": 0, "annotation.text": ["서울"], "annotation.bbox": [1, 2, 30, 10]})  # a list, not text
    anns.insert(1, {"id": 1, "annotation.text": True, "annotation.bbox": [1, 2, 30, 10]})
    anns.insert(2, {"id": 2, "annotation.text": "", "annotation.bbox": [1, 2, 30, 10]})        # third in the file
    anns.insert(3, {"id": 3, "annotation.text": " ### ", "annotation.bbox": [1, 2, 30, 10]})   # the illegible mark
    (src / "p.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    report = _run(src, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    bad = report["skipped"]["bad_annotation"]["examples"]
    assert bad == ['p.json#1: annotation.text ["서울"] is not a string', "p.json#2: annotation.text true is not a string"]
    assert report["skipped"]["empty_text"]["examples"] == ["p.json#3"]
    assert report["skipped"]["dont_care"]["examples"] == ["p.json#4"]
    labels = {LmdbDataset(tmp_path / "out" / "train").label(i) for i in range(report["crops"]["train"])}
    assert "['서울']" not in labels and "True" not in labels and "###" not in labels


def test_names_that_are_not_utf8_are_reported_and_the_rest_is_read(pages, reference, tmp_path):
    """A name in CP949 bytes (unzipped on a Korean Windows machine) must not stop the run."""
    from kocr.dvc_hashes import content_hash

    src = tmp_path / "src"
    shutil.copytree(pages, src)
    raw = os.fsencode(src) + b"/" + "읽어보세요".encode("cp949")
    with open(raw + b".txt", "wb") as fh:
        fh.write(b"x")
    os.mkdir(raw)
    report = _run(src, tmp_path / "out")
    assert sorted(report["skipped"]["undecodable_name"]["examples"]) == [r"\xc0\xd0\xbe\xee\xba\xb8\xbc\xbc\xbf\xe4",
                                                                        r"\xc0\xd0\xbe\xee\xba\xb8\xbc\xbc\xbf\xe4.txt"]
    assert _manifest(tmp_path / "out")["splits"] == _manifest(reference)["splits"]
    assert content_hash(src) != content_hash(pages)  # the MLflow input hash reads such names too


def test_a_folder_holding_only_names_that_are_not_utf8_is_not_called_stray(pages, tmp_path):
    # was: stray_folder 'Training' beside undecodable_name, as if the folder held nothing of the download
    src = tmp_path / "src"
    (src / "Training").mkdir(parents=True)
    shutil.copytree(pages, os.fsdecode(os.fsencode(src / "Training") + b"/" + "01.라벨링데이터".encode("cp949")))
    (src / "Training" / "Other").mkdir()
    with open(os.fsencode(src / "Training" / "Other") + b"/" + "설명.txt".encode("cp949"), "wb") as fh:
        fh.write(b"x")
    (src / "Empty" / "Inner").mkdir(parents=True)
    report = _run(src, tmp_path / "out")
    assert report["skipped"]["undecodable_name"]["count"] == 2
    assert report["skipped"]["stray_folder"]["examples"] == ["Empty"]  # a folder that holds nothing still is


def test_cp949_page_json_and_the_newer_ocr_schema(tmp_path):
    page = Page("a.jpg", 100, 50, [Word((1.0, 2.0, 30.0, 10.0), "김해시")], category="인.허가")
    assert parse_page(_page_json(page, "cp949")).words[0].text == "김해시"
    newer = {"Images": {"identifier": "IMG_OCR_53_4PR_09180", "type": "png", "width": 640, "height": 480},
             "bbox": [{"data": "서울", "id": 1, "x": [10, 50, 50, 10], "y": [20, 20, 44, 44]},
                      {"data": "부산", "x": [1, 2], "y": [3]},
                      {"data": "대구", "x": "1234", "y": "5678"}]}  # strings, not lists: not read digit by digit
    bad: list = []
    parsed = parse_page(json.dumps(newer, ensure_ascii=False).encode(), "n.json", bad=bad)
    assert parsed.image_name == "IMG_OCR_53_4PR_09180.png" and (parsed.width, parsed.height) == (640, 480)
    assert [(w.bbox, w.text) for w in parsed.words] == [((10.0, 20.0, 40.0, 24.0), "서울")]
    assert [i for i, _ in bad] == [2, 3] and "are not lists of numbers" in bad[1][1]
    old = {"images": [{"image.file.name": "a.jpg", "image.width": 100, "image.height": 50}],
           "annotations": [{"annotation.text": "서울", "annotation.bbox": "oops"}]}
    bad = []
    assert parse_page(json.dumps(old, ensure_ascii=False).encode(), "o.json", bad=bad).words == []
    assert bad == [(1, 'annotation bbox "oops" is not a list of 4 numbers')]


def test_a_newer_schema_box_of_two_corners_is_their_rectangle_and_a_single_point_is_no_box(tmp_path):
    """Two points are read as the rectangle the two opposite corners span (either order), a polygon's points
    (3, 5) as its bounding box; one point is no box and is skipped as bad_annotation. Was: one point gave a
    zero-area box, reported as zero_area_box, as if it had a size."""
    src = tmp_path / "src"
    src.mkdir()
    from PIL import Image

    Image.new("L", (200, 100), 255).save(src / "p.png")
    boxes = [{"data": "서울", "x": [10, 50], "y": [5, 25]},            # 2 corners
             {"data": "부산", "x": [150, 110], "y": [60, 30]},          # 2 corners, the other diagonal's order
             {"data": "대구", "x": [10, 50, 50, 10], "y": [40, 40, 60, 60]},
             {"data": "하나", "x": [10], "y": [5]},
             {"data": "세점", "x": [60, 90, 90], "y": [5, 5, 25]},
             {"data": "다섯", "x": [100, 140, 140, 100, 120], "y": [70, 70, 90, 90, 95]}]
    newer = {"Images": {"identifier": "p", "type": "png", "width": 200, "height": 100}, "bbox": boxes}
    (src / "p.json").write_text(json.dumps(newer, ensure_ascii=False), encoding="utf-8")
    bad: list = []
    parsed = parse_page((src / "p.json").read_bytes(), "p.json", bad=bad)
    assert [(w.text, w.bbox) for w in parsed.words] == [
        ("서울", (10.0, 5.0, 40.0, 20.0)), ("부산", (110.0, 30.0, 40.0, 30.0)), ("대구", (10.0, 40.0, 40.0, 20.0)),
        ("세점", (60.0, 5.0, 30.0, 20.0)), ("다섯", (100.0, 70.0, 40.0, 25.0))]
    assert [i for i, _ in bad] == [4] and "give 1 point" in bad[0][1], bad
    report = prepare_pages(src, tmp_path / "out", PrepareConfig(val_fraction=0.0, test_fraction=0.0),
                           progress=False)
    assert report["crops"]["train"] == 5 and "zero_area_box" not in report["skipped"]
    assert [e.split(":")[0] for e in report["skipped"]["bad_annotation"]["examples"]] == ["p.json#4"]


def test_a_bbox_coordinate_that_is_not_a_number_drops_its_word_not_the_page():
    """Was: ``true`` read as 1, a point ``[x, y]`` as "annotation … lacks a valid bbox", and an integer
    too large for a float an OverflowError that took the whole page (page_failed in prepare)."""
    huge = "9" * 400
    raw = ('{"images": [{"image.file.name": "a.jpg", "image.width": 100, "image.height": 50}], "annotations": ['
           '{"annotation.text": "서울", "annotation.bbox": [1, 2, 30, 10]},'
           '{"annotation.text": "부산", "annotation.bbox": [true, 2, 30, 10]},'
           '{"annotation.text": "대구", "annotation.bbox": [[1, 2], [31, 2], [31, 12], [1, 12]]},'
           f'{{"annotation.text": "인천", "annotation.bbox": [{huge}, 2, 30, 10]}},'
           '{"annotation.text": "광주", "annotation.bbox": ["1", "2", "30", "10"]}]}')  # numbers as text: read
    bad: list = []
    page = parse_page(raw.encode(), "o.json", bad=bad)
    assert [(w.text, w.bbox) for w in page.words] == [("서울", (1.0, 2.0, 30.0, 10.0)), ("광주", (1.0, 2.0, 30.0, 10.0))]
    assert [i for i, _ in bad] == [2, 3, 4] and all("is not a list of 4 numbers" in detail for _, detail in bad)
    newer = ('{"Images": {"identifier": "n", "width": 100, "height": 50}, "Bbox": ['
             '{"data": "서울", "x": [1, 31, 31, 1], "y": [2, 2, 12, 12]},'
             '{"data": "부산", "x": [true, 31, 31, 1], "y": [2, 2, 12, 12]},'
             f'{{"data": "인천", "x": [1, 31, 31, {huge}], "y": [2, 2, 12, 12]}}]}}')
    bad = []
    assert [w.text for w in parse_page(newer.encode(), "n.json", bad=bad).words] == ["서울"]
    assert [i for i, _ in bad] == [2, 3] and all("are not lists of numbers" in detail for _, detail in bad)


def test_an_integer_of_more_digits_than_python_converts_drops_its_word_not_the_page(pages, tmp_path):
    """Was: ``json.loads`` raised ValueError ("Exceeds the limit (4300 digits) for integer string
    conversion"), so prepare skipped the whole page as ``unreadable_file`` (a file it had read)."""
    src = tmp_path / "src"
    shutil.copytree(pages, src)
    label = sorted(src.glob("*.json"))[0]
    data = json.loads(label.read_text(encoding="utf-8"))
    words = len(data["annotations"])
    data["annotations"][1]["annotation.bbox"][0] = 0  # written as 5,000 digits below
    raw = json.dumps(data, ensure_ascii=False).replace('"annotation.bbox": [0,', f'"annotation.bbox": [{"9" * 5000},', 1)
    label.write_text(raw, encoding="utf-8")
    bad: list = []
    assert len(parse_page(raw.encode(), label.name, bad=bad).words) == words and not bad  # the box is infinite
    report = _run(src, tmp_path / "out")
    assert "unreadable_file" not in report["skipped"] and report["pages_used"] == 8
    assert report["skipped"]["bad_annotation"]["examples"] == [f"{label.name}#2: bbox (inf, "
                                                               f"{', '.join(str(float(v)) for v in data['annotations'][1]['annotation.bbox'][1:])})"]


_IMAGE = {"image.file.name": "a.jpg", "image.width": 100, "image.height": 50}
_IMAGES = {"identifier": "a", "type": "jpg", "width": 100, "height": 50}


@pytest.mark.parametrize("data, message", [
    ([_IMAGE], "top level is a list, not an object"),
    ({"annotations": []}, "no 'images' list (공공행정문서 schema) nor 'Images' object (AI-Hub OCR schema)"),
    ({"images": _IMAGE, "annotations": []}, "'images' is an object, not a list"),
    ({"images": [], "annotations": []}, "'images' is an empty list"),
    ({"images": ["a.jpg"], "annotations": []}, "'images' entry 1 is a string, not an object"),
    ({"images": [_IMAGE], "annotations": {}}, "'annotations' is an object, not a list"),
    ({"images": [_IMAGE], "annotations": None}, "'annotations' is null, not a list"),
    # the newer AI-Hub OCR schema: was "missing 'images' list" (the other schema's key) and "'bbox'" for 'Bbox'
    ({"Images": [_IMAGES], "Bbox": []}, "'Images' is a list, not an object"),
    ({"Images": None, "bbox": []}, "'Images' is null, not an object"),
    ({"Images": {"width": 100, "height": 50}, "Bbox": []}, "'Images' lacks 'identifier'"),
    ({"Images": _IMAGES, "Bbox": {"x": [1], "y": [2]}}, "'Bbox' is an object, not a list"),
    ({"Images": _IMAGES, "bbox": None}, "'bbox' is null, not a list"),
])
def test_bad_schema_names_the_files_own_key_and_what_is_wrong_with_it(data, message):
    with pytest.raises(PageError) as caught:
        parse_page(json.dumps(data, ensure_ascii=False).encode(), "p.json", bad=[])
    assert (caught.value.reason, caught.value.detail) == ("bad_schema", message)


def test_a_category_written_decomposed_is_the_same_category():
    # 인.허가 in NFD (a label edited on a Mac) was a second category: prepare.stratify: category split
    # its documents as a separate small category, and the evaluation's per-category rows parted too
    pages = [{"images": [{"image.file.name": "a.jpg", "image.width": 100, "image.height": 50,
                          "image.category": category}], "annotations": []}
             for category in ("인.허가", unicodedata.normalize("NFD", "인.허가"), " 인.허가 ")]
    assert {parse_page(json.dumps(page, ensure_ascii=False).encode()).category for page in pages} == {"인.허가"}


@pytest.mark.parametrize("width,message", [
    ("1000.0", None), (1000.0, None), ("1000", None),
    ("1000.5", 'image entry image.width "1000.5" is not a positive whole number of pixels'),
    (0, "image entry image.width 0 is not a positive whole number of pixels"),
    (True, "image entry image.width true is not"), ("wide", 'image.width "wide" is not'), (None, "null is not"),
    (10**400, "is not a positive whole number"), ("9" * 400, "is not a positive"),  # before: OverflowError
])
def test_page_sizes_written_as_text_or_floats_are_read_and_others_are_named(width, message):
    raw = json.dumps({"images": [{"image.file.name": "a.jpg", "image.width": width, "image.height": 50}],
                      "annotations": []}).encode()
    if message is None:
        assert (parse_page(raw, "p.json").width, parse_page(raw, "p.json").height) == (1000, 50)
    else:  # before: "lacks a valid invalid literal for int() with base 10", or 1000.5 silently cut to 1000
        with pytest.raises(PageError, match=re.escape(message)) as caught:
            parse_page(raw, "p.json")
        assert caught.value.reason == "bad_schema" and "p.json" in str(caught.value)
    newer = json.dumps({"Images": {"identifier": "x", "width": width, "height": 480}, "bbox": []}).encode()
    if message is None:
        assert parse_page(newer, "n.json").width == 1000
    else:
        with pytest.raises(PageError, match="'Images' width"):
            parse_page(newer, "n.json")


# -- stratified split ----------------------------------------------------------------------------------

def test_stratified_split_keeps_category_proportions():
    names = [f"doc_{i:03d}.json" for i in range(100)]
    categories = {name: ("인.허가" if i < 80 else "회계.예산") for i, name in enumerate(names)}
    config = PrepareConfig(stratify="category", seed=3)
    a = split_documents(names, config, categories)
    assert a == split_documents(list(reversed(names)), config, categories)
    for category, size in (("인.허가", 80), ("회계.예산", 20)):
        mine = [a[n] for n in names if categories[n] == category]
        assert (mine.count("val"), mine.count("test")) == (round(size * 0.1), round(size * 0.1)), category
    assert a != split_documents(names, PrepareConfig(stratify="category", seed=4), categories)
    # without stratification a category can end up with no validation page at all
    plain = [split_documents(names, PrepareConfig(seed=s), categories) for s in range(30)]
    assert any(sum(p[n] == "val" for n in names[80:]) != 2 for p in plain)


def test_every_page_of_a_document_goes_to_one_split():
    # AI-Hub names pages <institution>-<year>-<document>-<page>: pages of one form must not straddle
    # train and test (the split used to be by page)
    names = [f"Training/{CODE}-{YEAR}-{d:04d}-{p:04d}.json" for d in range(1, 21) for p in range(1, 1 + d % 4 + 1)]
    names += [f"other/scan_{i}.json" for i in range(5)]  # names of no document pattern: each its own
    assignment = split_documents(names, PrepareConfig(val_fraction=0.2, test_fraction=0.2, seed=1))
    by_document = {}
    for name, split in assignment.items():
        by_document.setdefault(re.sub(r"-\d{4}\.json$", "", name), set()).add(split)
    assert all(len(splits) == 1 for splits in by_document.values())
    documents = Counter(next(iter(s)) for s in by_document.values())
    assert (documents["val"], documents["test"]) == (5, 5)  # the fractions count the 25 documents


def test_bad_knobs_name_the_params_key():
    with pytest.raises(ValueError, match="prepare.stratify"):
        PrepareConfig(stratify="folder")
    with pytest.raises(ValueError, match="prepare.shard_size"):
        PrepareConfig(shard_size=0)


def test_a_label_that_copied_another_pages_image_name_leaves_that_image_to_its_own_page(pages, tmp_path):
    (stem, page, jpg), (_, other, _) = _aihub_pages(pages)[:2]
    src = tmp_path / "aihub"
    _mirrored(src, "Training", stem, page, jpg)
    label = src / "Training" / "01.라벨링데이터(Json)" / "민원" / "1111111" / "2000" / "1111111-2000-0001-0001.json"
    label.parent.mkdir(parents=True)
    other.image_name = page.image_name  # file.name pasted from the other page; sorts first (민원 < 인.허가)
    label.write_bytes(_page_json(other))
    report = _run(src, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    written = [label for label, _ in _samples(tmp_path / "out", "train")]
    # was: the 민원 label cropped its own words from this page's image, and this page was skipped
    assert written == [unicodedata.normalize("NFC", w.text) for w in page.words if w.text.strip()]
    assert report["skipped"]["image_used_twice"]["examples"] == [
        f"Training/01.라벨링데이터(Json)/민원/1111111/2000/1111111-2000-0001-0001.json (already "
        f"Training/01.라벨링데이터(Json)/{CATEGORY}/{CODE}/{YEAR}/{stem}.json)"]


def test_an_out_whose_split_folders_hold_the_source_is_refused_and_the_source_kept(pages, tmp_path):
    for src, out in ((tmp_path / "data" / "train", tmp_path / "data"),  # the user's pages in data/train
                     (tmp_path / "d2" / "val" / "aihub", tmp_path / "d2")):
        shutil.copytree(pages, src)
        before = sorted(p.name for p in src.iterdir())
        with pytest.raises(ValueError, match=r"lies in .*(train|val), which prepare empties"):
            _run(src, out)
        assert sorted(p.name for p in src.iterdir()) == before  # was: every page deleted, then "image_corrupt"
    assert _run(tmp_path / "data" / "train", tmp_path)["pages_used"] == 8  # <tmp>/train is not the source
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        _run(src / "page_00000.jpg", tmp_path / "out")


def test_an_empty_or_non_image_file_is_reported_in_words_that_do_not_change_between_runs(pages, tmp_path):
    src = tmp_path / "src"
    data = _one_page(pages, src)
    (src / "p.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (src / "p.jpg").write_bytes(b"")
    for name, body in (("q", b"<html>404</html>"),):
        data["images"][0]["image.file.name"] = f"{name}.jpg"
        (src / f"{name}.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        (src / f"{name}.jpg").write_bytes(body)
    reports = [(tmp_path / f"out{i}" / "report.json") for i in range(2)]
    for i, path in enumerate(reports):
        _run(src, path.parent, workers=1 + i)
    assert reports[0].read_bytes() == reports[1].read_bytes()  # was: PIL's message held a memory address
    assert json.loads(reports[0].read_text(encoding="utf-8"))["skipped"]["image_corrupt"]["examples"] == [
        "p.jpg: the file is empty", "q.jpg: not an image in a format PIL reads (or its header is damaged)"]


def test_a_page_over_the_decompression_bomb_limit_is_too_large_not_corrupt(pages, tmp_path, monkeypatch):
    from PIL import Image

    src = tmp_path / "src"
    (src / "p.json").parent.mkdir()
    data = _one_page(pages, tmp_path / "one")
    shutil.copytree(tmp_path / "one", src, dirs_exist_ok=True)
    (src / "p.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 480 * 360 // 3)  # errors past twice this: a 480x360 page
    report = _run(src, tmp_path / "out")
    [entry] = report["skipped"]["image_too_large"]["examples"]
    assert entry.startswith("p.jpg: Image size (172800 pixels) exceeds limit") and "Scale the scan down" in entry
    assert "image_corrupt" not in report["skipped"]


def test_pages_past_the_pixel_warning_limit_are_counted_once_each_not_warned_about(pages, tmp_path, monkeypatch,
                                                                                    recwarn, capsys):
    from PIL import Image

    from training.data.pixels import large_pages

    src = tmp_path / "src"
    data = _one_page(pages, src)
    for n, name in enumerate("pq"):  # two sizes: PIL warned once for each distinct size
        with Image.open(pages / "page_00000.jpg") as im:
            im.resize((480 + 8 * n, 360)).save(src / f"{name}.jpg")
        data["images"][0]["image.file.name"] = f"{name}.jpg"
        (src / f"{name}.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 480 * 360 - 1)  # both past it, neither past twice it
    with large_pages("kocr prepare-aihub") as seen:
        report = _run(src, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    assert report["pages_used"] == 2 and len(seen) == 2 and "image_too_large" not in report["skipped"]
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]  # was: 2 (4 opens)
    assert "kocr prepare-aihub: 2 page images past Pillow's decompression-bomb limit" in capsys.readouterr().err


def test_text_drawn_only_in_alpha_is_cropped_as_evaluation_reads_it_not_black(pages, tmp_path):
    import numpy as np
    from PIL import Image

    from evaluation.reader import mended_pixels
    from training.data.prepare import load_grey

    src = tmp_path / "src"
    data = _one_page(pages, src)
    grey = np.asarray(Image.open(src / "p.jpg").convert("L"))
    rgba = np.zeros((*grey.shape, 4), np.uint8)
    rgba[..., 3] = 255 - grey  # black ink, all of it in the alpha channel (a logo export)
    Image.fromarray(rgba, "RGBA").save(src / "p.png")
    (src / "p.jpg").unlink()
    data["images"][0]["image.file.name"] = "p.png"
    (src / "p.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    assert np.array_equal(load_grey(src / "p.png"), mended_pixels(src / "p.png")[1])  # was: all 0
    _run(src, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    crops = [np.frombuffer(image, np.uint8) for _, image in _samples(tmp_path / "out", "train")]
    assert crops and all(c.max() - c.min() > 100 for c in crops)  # ink on paper, not black on black


def test_the_shard_key_covers_every_module_the_crops_come_from():
    # pixels.py mends every image before it is cropped: a change to it must re-crop, not resume
    import ast

    from training.data import prepare

    tree = ast.parse(Path(prepare.__file__).read_text(encoding="utf-8"))
    imported = {node.module.rsplit(".", 1)[-1] + ".py" for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("training.data.")}
    assert imported and imported | {"prepare.py"} <= set(prepare.KEYED_MODULES)


def test_an_encrypted_zip_member_is_named_in_the_error_as_zipfile_names_it(tmp_path):
    """read_member reads a member by its recorded place (a ZipInfo): zipfile's error for an encrypted one
    would show that ZipInfo's repr (sizes and all) in report.json; it names the member, as before."""
    with zipfile.ZipFile(tmp_path / "enc.zip", "w") as zf:
        zf.writestr("d/page.jpg", b"scrambled")
    blob = bytearray((tmp_path / "enc.zip").read_bytes())
    for at in (6, blob.find(b"PK\x01\x02") + 8):  # flag bit 0 (encrypted) in the local header and the directory
        blob[at] |= 1
    (tmp_path / "enc.zip").write_bytes(bytes(blob))
    member = scan_source(tmp_path).images[0]
    with pytest.raises(RuntimeError) as caught:
        read_member(tmp_path, member)
    assert str(caught.value) == "File 'd/page.jpg' is encrypted, password required for extraction"
