"""kocr.dvc_hashes: the data version a run logs is the one it read, also when a stage runs by hand."""

from __future__ import annotations

import os
import subprocess
import sys
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
