"""kocr.dvc_hashes: the data version a run logs is the one it read, also when a stage runs by hand."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kocr.dvc_hashes import content_hash, dataset_hash, dvc_record
from tests.conftest import permissions_bind

BIN = Path(sys.executable).parent


def _run(cwd: Path, *cmd: str) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DVC_STAGE", None)
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A git + DVC project with data/aihub added and a stage whose output is data/prepared."""
    root = tmp_path / "proj"
    (root / "data" / "aihub").mkdir(parents=True)
    (root / "data" / "aihub" / "a.json").write_text("page 1\n")
    _run(root, "git", "init", "-q", ".")
    _run(root, "dvc", "init", "-q")
    _run(root, "dvc", "add", "-q", "data/aihub")
    (root / "dvc.yaml").write_text("stages:\n  prepare:\n    cmd: mkdir -p data/prepared && cp data/aihub/*.json "
                                   "data/prepared/\n    deps: [data/aihub]\n    outs: [data/prepared]\n")
    _run(root, "dvc", "repro", "-q")
    monkeypatch.chdir(root)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    return root


def test_recorded_hashes_name_unchanged_data(project):
    import yaml

    recorded = yaml.safe_load((project / "data" / "aihub.dvc").read_text())["outs"][0]["md5"]
    locked = next(out["md5"] for out in yaml.safe_load((project / "dvc.lock").read_text())["stages"]["prepare"]["outs"]
                  if out["path"] == "data/prepared")
    assert recorded.endswith(".dir") and locked.endswith(".dir")
    assert dataset_hash("data/aihub") == (recorded, "aihub.dvc")  # the version DVC records, not any .dir string
    assert dataset_hash("data/prepared") == (locked, "dvc.lock")


def test_data_changed_since_its_record_logs_what_was_read(project, monkeypatch):
    recorded, _ = dataset_hash("data/aihub")
    lock_recorded, _ = dataset_hash("data/prepared")
    (project / "data" / "aihub" / "b.json").write_text("page 2\n")  # new pages, and no `dvc add`
    (project / "data" / "prepared" / "b.json").write_text("page 2\n")  # a stage rerun by hand
    with pytest.warns(UserWarning, match="data/aihub differs from what aihub.dvc records"):
        digest, origin = dataset_hash("data/aihub")
    assert digest == "content:" + content_hash("data/aihub") and digest != recorded
    assert origin == "computed: aihub.dvc is out of date"
    with pytest.warns(UserWarning, match=r"data/prepared differs from what dvc.lock \(stage prepare\) records"):
        digest, origin = dataset_hash("data/prepared")
    assert digest == "content:" + content_hash("data/prepared") and digest != lock_recorded
    # under `dvc repro` DVC reconciles its records before a stage runs: they are trusted as they are
    monkeypatch.setenv("DVC_STAGE", "train")
    assert dataset_hash("data/aihub") == (recorded, "aihub.dvc")


def test_content_hash_reads_linked_folders_as_prepare_does(tmp_path):
    """A source no DVC file versions is hashed here: what a linked folder holds is part of the data read."""
    src, elsewhere = tmp_path / "src", tmp_path / "other_disk" / "Validation"
    src.mkdir()
    elsewhere.mkdir(parents=True)
    (src / "a.json").write_text("page 1\n")
    (elsewhere / "b.json").write_text("page 2\n")
    (src / "Validation").symlink_to(elsewhere)
    (elsewhere / "loop").symlink_to(src)  # a link back up the tree: each real folder once
    before = content_hash(src)
    (elsewhere / "b.json").write_text("page 2, corrected\n")
    assert content_hash(src) != before
    copy = tmp_path / "copy"  # the same tree with the folder itself in place hashes the same
    (copy / "Validation").mkdir(parents=True)
    (copy / "a.json").write_text("page 1\n")
    (copy / "Validation" / "b.json").write_text("page 2, corrected\n")
    assert content_hash(copy) == content_hash(src)


def test_an_unreadable_file_or_folder_is_hashed_by_its_name(tmp_path):
    """prepare and evaluate log the hash before reading: a file they cannot read must not stop them there
    (prepare reports it as unreadable_file), and the hash still tells it from a readable source."""
    src = tmp_path / "src"
    (src / "locked").mkdir(parents=True)
    for name, text in (("a.json", "page 1"), ("b.json", "page 2"), ("locked/c.json", "page 3")):
        (src / name).write_text(text)
    readable = content_hash(src)
    code = "import sys; from kocr.dvc_hashes import dataset_hash; print(*dataset_hash(sys.argv[1]))"
    (src / "b.json").chmod(0)
    (src / "locked").chmod(0)
    try:
        runs = [subprocess.run(permissions_bind([sys.executable, "-c", code, str(src)]), cwd=tmp_path,
                               capture_output=True, text=True) for _ in range(2)]
    finally:
        (src / "b.json").chmod(0o644)
        (src / "locked").chmod(0o755)
    assert runs[0].returncode == 0, runs[0].stderr
    digest, origin = runs[0].stdout.split()
    assert origin == "computed" and digest.startswith("content:") and digest != "content:" + readable
    assert runs[1].stdout == runs[0].stdout  # the same for the same files


def test_dvc_record_names_what_versions_a_path(project, tmp_path):
    assert dvc_record("data/aihub") == dvc_record("data/aihub/Training") == os.path.join("data", "aihub.dvc")
    assert dvc_record("data/prepared/val") == "dvc.lock (stage prepare)"
    (project / "params.yaml").write_text("data:\n  made: data/made\n")
    with open(project / "dvc.yaml", "a") as fh:  # a stage not run yet: in dvc.yaml only, its out a template
        fh.write("  make:\n    cmd: mkdir -p ${data.made}\n    outs:\n      - ${data.made}:\n          persist: true\n")
    assert dvc_record(project / "data" / "made" / "x") == "dvc.yaml (stage make)"
    assert dvc_record("data/other") is None and dvc_record(tmp_path / "elsewhere") is None


def _full_read(src: Path) -> str:
    """The content hash as the full read computes it: MD5 over each file's relative name and bytes, in order."""
    import hashlib

    digest = hashlib.md5()
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        with open(file, "rb") as fh:  # not counted by counted_opens
            digest.update(os.fsencode(file.relative_to(src)) + fh.read())
    return digest.hexdigest()


@pytest.fixture
def counted_opens(monkeypatch) -> list[Path]:
    """The files opened for their bytes (as content_hash reads them), in order."""
    opened: list[Path] = []
    real_open = Path.open

    def counting(self, mode="r", *args, **kwargs):
        if mode == "rb":
            opened.append(self)
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting)
    return opened


def _set(tmp_path: Path) -> Path:
    src = tmp_path / "set"
    (src / "part").mkdir(parents=True)
    for name, data in (("data.mdb", os.urandom(3000)), ("lock.mdb", b"\0" * 64), ("part/data.mdb", os.urandom(500))):
        (src / name).write_bytes(data)
    return src


def test_a_second_hash_of_an_unchanged_set_reads_no_file(tmp_path, monkeypatch, counted_opens):
    """kocr train logs the content hash of a set outside DVC at every start: 3 s a GB read. Kept outside the
    set, it is taken from there while no file changed, byte-identical to the full read's."""
    import kocr.dvc_hashes as dvc_hashes

    monkeypatch.setattr(dvc_hashes, "RACY_NS", 0, raising=False)  # files written just now may be kept (see the racy test)
    src = _set(tmp_path)
    listing = sorted(src.rglob("*"))
    first = content_hash(src)
    assert first == _full_read(src) and len(counted_opens) == 3
    counted_opens.clear()
    assert content_hash(src) == first and counted_opens == []  # read again before: 3 files
    assert sorted(src.rglob("*")) == listing  # nothing written into the set: dvc status stays clean
    kept = list(Path(os.environ["KOCR_SET_INDEX_DIR"]).glob("*.md5"))
    assert len(kept) == 1 and kept[0].name.startswith("set-")

    time.sleep(0.05)  # past the tick of the file timestamps
    file = src / "part" / "data.mdb"
    before = file.stat()
    file.write_bytes(os.urandom(500))  # the same size, its mtime put back: only the ctime tells
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    changed = content_hash(src)
    assert changed != first and changed == _full_read(src) and len(counted_opens) == 3
    counted_opens.clear()
    (src / "new.txt").write_bytes(b"")  # a file more (or less, or renamed) is another listing
    assert content_hash(src) == _full_read(src) and len(counted_opens) == 4
    counted_opens.clear()
    (src / "new.txt").rename(src / "renamed.txt")
    assert content_hash(src) == _full_read(src) and len(counted_opens) == 4


def test_a_hash_of_files_changed_just_before_is_not_kept(tmp_path, counted_opens):
    """A file written within one tick of its timestamps before the read (a set hashed as it is written) may
    change again and keep them: such a set's hash is not kept; the next start reads it again."""
    src = _set(tmp_path)
    first = content_hash(src)
    counted_opens.clear()
    assert content_hash(src) == first and len(counted_opens) == 3
    assert list(Path(os.environ["KOCR_SET_INDEX_DIR"]).glob("*.md5")) == []


def test_a_cache_that_cannot_be_read_or_written_never_stops_a_run(tmp_path, monkeypatch, counted_opens):
    import kocr.dvc_hashes as dvc_hashes

    monkeypatch.setattr(dvc_hashes, "RACY_NS", 0, raising=False)
    src = _set(tmp_path)
    expected = _full_read(src)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("KOCR_SET_INDEX_DIR", str(tmp_path / "file" / "cache"))  # no folder can be made there
    assert content_hash(src) == content_hash(src) == expected and len(counted_opens) == 6
    monkeypatch.setenv("KOCR_SET_INDEX_DIR", "")  # keep nothing
    assert content_hash(src) == expected and len(counted_opens) == 9 and not (tmp_path / "file").is_dir()
    cache = tmp_path / "cache"
    monkeypatch.setenv("KOCR_SET_INDEX_DIR", str(cache))
    assert content_hash(src) == expected
    kept = next(cache.glob("*.md5"))
    for garbled in (b"", b"{\"magic\": ", b"[1, 2]", kept.read_bytes().replace(b'"key": "', b'"key": "0')):
        kept.write_bytes(garbled)
        counted_opens.clear()
        assert content_hash(src) == expected and len(counted_opens) == 3  # read whole, and kept again
        counted_opens.clear()
        assert content_hash(src) == expected and counted_opens == []
    gone = _set(tmp_path / "gone")  # the hash of a set that is no longer there goes with the next one kept
    content_hash(gone)
    import shutil

    shutil.rmtree(gone)
    (src / "lock.mdb").write_bytes(b"\1" * 64)
    time.sleep(0.01)
    content_hash(src)
    assert [p.name.split("-")[0] for p in cache.glob("*.md5")] == ["set"]


def test_a_set_whose_path_is_not_utf8_is_hashed_and_kept(tmp_path, monkeypatch, counted_opens):
    """Was: the kept hash's JSON named the set's path as UTF-8, and a path with other bytes (os.fsdecode's
    surrogates) raised UnicodeEncodeError out of content_hash: the run stopped where the full read had worked."""
    import kocr.dvc_hashes as dvc_hashes

    monkeypatch.setattr(dvc_hashes, "RACY_NS", 0, raising=False)
    src = Path(os.fsdecode(os.fsencode(tmp_path) + b"/set\xff"))
    (src / "part").mkdir(parents=True)
    (src / "part" / os.fsdecode(b"a\xfe.png")).write_bytes(b"x" * 10)
    expected = _full_read(src)
    assert content_hash(src) == expected and len(counted_opens) == 1
    counted_opens.clear()
    assert content_hash(src) == expected and counted_opens == []  # kept, and read back
    import shutil

    shutil.rmtree(src)
    other = _set(tmp_path)
    content_hash(other)  # the next hash kept drops the one of the set that is gone, path read back from its JSON
    assert [p.name.split("-")[0] for p in Path(os.environ["KOCR_SET_INDEX_DIR"]).glob("*.md5")] == ["set"]


def test_no_home_directory_keeps_no_hash_and_never_stops_a_run(tmp_path, monkeypatch, counted_opens):
    """Was: with neither KOCR_SET_INDEX_DIR nor XDG_CACHE_HOME set, and no home directory (no HOME, a user id
    without a passwd entry), Path.home()'s RuntimeError came out of content_hash: prepare and evaluate, which
    never needed a cache, stopped."""
    import kocr.dvc_hashes as dvc_hashes
    from kocr.set_cache import cache_dir

    monkeypatch.setattr(dvc_hashes, "RACY_NS", 0, raising=False)
    src = _set(tmp_path)
    for name in ("KOCR_SET_INDEX_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)

    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", classmethod(no_home))
    assert cache_dir() is None
    assert content_hash(src) == content_hash(src) == _full_read(src) and len(counted_opens) == 6  # nothing kept


def test_the_committed_results_are_the_ones_dvc_lock_records():
    """The results committed beside dvc.lock (metrics/, plots/, tuning/best_params.yaml) are the outputs
    it records, byte for byte: a dvc.lock written by another run (e.g. a tiny-params `dvc repro` of a
    test, committed with a code change) made `dvc status` and `dvc metrics diff` read every committed
    result as stale and named outputs nobody can fetch. Was: 479d5be and 75a6a1f committed such a lock
    (sample.count 12, train.steps 16) under the 60-page demo's metrics."""
    import hashlib

    import yaml

    from tests.conftest import REPO

    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.splitlines())
    lock = yaml.safe_load((REPO / "dvc.lock").read_text(encoding="utf-8"))
    outs = {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])
            if out["path"] in tracked}
    if not outs:
        pytest.skip("no committed result that dvc.lock records")
    differ = {path for path, md5 in outs.items() if hashlib.md5((REPO / path).read_bytes()).hexdigest() != md5}
    assert not differ, f"dvc.lock records other bytes for the committed {sorted(differ)}"
