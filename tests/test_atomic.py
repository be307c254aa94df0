"""Whole-or-nothing writes: the helper itself, and the writers that go through it."""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
from PIL import Image

from kocr.atomic import FOREIGN_AGE_S, _namespace_tag, atomic_path, replaced_folder, write_bytes, write_json
from tests.conftest import interrupted_rename
from training.data import synth_pages
from training.data.contact_sheet import write_sheet
from training.data.fonts import find_fonts
from training.data.pages import Page, Word, write_page


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def _full_disk(self: Path, text: str, *_args, **_kwargs):
    """``Path.write_text`` on a disk that fills half way through: half a file, then ENOSPC."""
    with open(self, "w", encoding="utf-8") as fh:
        fh.write(text[: len(text) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    write_json(target, {"pages": 3, "name": "서울"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"pages": 3, "name": "서울"}
    assert "서울" in target.read_text(encoding="utf-8")  # Hangul kept readable, not \\u escapes

    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"pages": ', encoding="utf-8")  # half written, then the writer dies
        raise RuntimeError("killed")
    assert json.loads(target.read_text(encoding="utf-8"))["pages"] == 3
    assert _leftovers(tmp_path) == []

    with pytest.raises(KeyboardInterrupt), atomic_path(target, durable=True) as tmp:
        tmp.write_bytes(b"x")
        raise KeyboardInterrupt
    assert json.loads(target.read_text(encoding="utf-8"))["pages"] == 3
    assert _leftovers(tmp_path) == []


def test_files_get_the_umask_permissions_like_a_plain_open(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        written = write_bytes(tmp_path / "sub" / "a.bin", b"abc", durable=True)
    finally:
        os.umask(old)
    assert written.read_bytes() == b"abc"  # the parent folder is created
    assert stat.S_IMODE(written.stat().st_mode) == 0o644  # not mkstemp's 0600


def test_two_writers_of_one_path_use_different_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "page.json"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        first.write_text("1")
        second.write_text("2")
    assert target.read_text() == "1"  # the outer block finishes last and wins whole
    assert _leftovers(tmp_path) == []


def _page() -> Page:
    return Page("p.jpg", 100, 50, [Word((1.0, 1.0, 20.0, 10.0), "서울")])


def test_write_page_on_a_full_disk_keeps_the_old_page(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "p.json"
    write_page(_page(), target)
    before = target.read_bytes()
    monkeypatch.setattr(Path, "write_text", _full_disk)
    with pytest.raises(OSError):
        write_page(Page("p.jpg", 100, 50, []), target)
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_an_image_save_that_fails_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    faces = find_fonts(["NanumGothic.ttf"])
    sheet = tmp_path / "sheet.png"
    write_sheet([(Image.new("L", (40, 20), 255), "가")], sheet, faces)
    before = sheet.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        if isinstance(fp, (str, os.PathLike)):
            Path(fp).write_bytes(b"\x89PNG half")
        else:  # synth-pages encodes its JPEG in memory
            fp.write(b"\xff\xd8 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        write_sheet([(Image.new("L", (40, 20), 0), "나")], sheet, faces)
    assert sheet.read_bytes() == before
    with pytest.raises(OSError):
        synth_pages.generate_pages(tmp_path / "pages", count=1, seed=0, fonts=["NanumGothic.ttf"],
                                   width=480, height=360, progress=False)
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "pages.partial") == []
    assert not list((tmp_path / "pages.partial").glob("*.json"))  # no JSON without its image
    assert not (tmp_path / "pages").exists()  # nothing published


def test_torch_save_through_atomic_path_writes_the_bytes_of_a_plain_save(tmp_path: Path) -> None:
    import torch

    state = {"w": torch.arange(6.0)}
    (tmp_path / "plain").mkdir()
    torch.save(state, tmp_path / "plain" / "ko_test.pth")
    with atomic_path(tmp_path / "ko_test.pth") as tmp:  # torch names its archive after the file it writes
        torch.save(state, tmp)
    assert (tmp_path / "ko_test.pth").read_bytes() == (tmp_path / "plain" / "ko_test.pth").read_bytes()


KILLED_WRITER = """
import os, signal, sys
from kocr.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
"""

TERMINATED_WRITER = """
import os, signal, sys
from kocr.cli import _terminate_as_exit
from kocr.atomic import atomic_path
with _terminate_as_exit(), atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half")
    os.kill(os.getpid(), signal.SIGTERM)
    signal.pause()
"""


def test_what_a_killed_writer_left_is_swept_by_the_next_write_and_sigterm_leaves_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    from kocr.atomic import sweep_stale

    repo = Path(__file__).resolve().parents[1]
    target = tmp_path / "metrics.json"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=repo, timeout=60)
    assert killed.returncode == -9 and len(_leftovers(tmp_path)) == 1 and not target.exists()
    tag = _namespace_tag()
    live = tmp_path / f".other.json.{tag}-{os.getppid()}.0123abcd.tmp"  # a live process's write in progress
    bogus = tmp_path / f".odd.json.{tag}-{10**12}.0123abcd.tmp"  # no real PID: left alone, and no crash
    for folder in (live, bogus):
        folder.mkdir()
    write_json(target, {"ok": True})
    assert sorted(_leftovers(tmp_path)) == sorted([live, bogus]) and json.loads(target.read_text()) == {"ok": True}
    assert sweep_stale(tmp_path) == 0 and live.is_dir()
    bogus.rmdir()

    terminated = subprocess.run([sys.executable, "-c", TERMINATED_WRITER, str(target)], cwd=repo, timeout=60)
    assert terminated.returncode == 143  # SIGTERM became an exit, so the temporary folder was removed
    assert _leftovers(tmp_path) == [live] and json.loads(target.read_text()) == {"ok": True}


def test_staged_files_refuse_a_folder_in_the_way_before_touching_the_earlier_run(tmp_path: Path) -> None:
    from kocr.atomic import staged_files

    out = tmp_path / "out"
    with staged_files(out, lambda name: name.endswith(".txt")) as stage:
        (stage / "a.txt").write_text("first")
    (out / "b.txt").mkdir()  # a folder named like a file the next run writes
    with pytest.raises(IsADirectoryError, match="b.txt: a folder"), staged_files(out, lambda n: True) as stage:
        (stage / "a.txt").write_text("second")
        (stage / "b.txt").write_text("second")
    assert (out / "a.txt").read_text() == "first" and (out / "b.txt").is_dir()
    assert _leftovers(out) == []


@pytest.mark.parametrize("lands", ["after", "instead of"])
def test_a_kill_among_the_renames_of_staged_files_leaves_the_whole_earlier_run_or_the_whole_new(
        tmp_path: Path, monkeypatch, lands: str) -> None:
    """Was: the staged files were renamed into ``out`` one after another once the earlier run's extra
    files had been removed, so a SIGTERM (an exit in ``kocr``) or Ctrl-C between two renames left the
    new readings.tsv beside the earlier run's confusions.json, and the earlier worst_02.png gone."""
    from kocr.atomic import staged_files

    out = tmp_path / "out"
    earlier = {"readings.tsv": "old", "confusions.json": "old", "worst_01.png": "old", "worst_02.png": "old"}
    new = {"readings.tsv": "new", "confusions.json": "new", "worst_01.png": "new", "scores.json": "new"}
    for kill_at in range(1, 20):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        (out / "notes.md").write_text("mine", encoding="utf-8")  # not a run's: left alone
        for name, text in earlier.items():
            (out / name).write_text(text, encoding="utf-8")
        try:  # SIGTERM lands just after (or instead of) the kill_at-th rename
            with interrupted_rename(monkeypatch, kill_at, lands), \
                    staged_files(out, lambda name: name != "notes.md") as stage:
                for name, text in new.items():
                    (stage / name).write_text(text, encoding="utf-8")
        except SystemExit:
            interrupted = True
        else:
            interrupted = False
        found = {p.name: p.read_text(encoding="utf-8") for p in out.iterdir()}
        assert found.pop("notes.md") == "mine"
        assert found == (earlier if interrupted else new), f"killed at rename {kill_at}"
        if not interrupted:
            break
    assert kill_at > len(earlier) + len(new)  # every rename was interrupted once


def test_another_containers_leftovers_wait_a_week_since_its_pids_mean_nothing_here(tmp_path: Path) -> None:
    from kocr.atomic import sweep_stale

    other = "f" * 6 if _namespace_tag() != "f" * 6 else "e" * 6
    fresh = tmp_path / f".state.pt.{other}-12345678.0123abcd.tmp"  # maybe a live writer in another container
    old = tmp_path / f".model.pt.{other}-1.0123abcd.tmp"
    for folder in (fresh, old):
        folder.mkdir()
    week_ago = time.time() - FOREIGN_AGE_S - 60
    os.utime(old, (week_ago, week_ago))
    assert sweep_stale(tmp_path) == 1
    assert fresh.is_dir() and not old.exists()


def test_a_replaced_folder_holds_only_the_new_run_and_a_failed_run_keeps_the_old(tmp_path: Path) -> None:
    out = tmp_path / "worst_pages"
    (out / "tesseract").mkdir(parents=True)
    (out / "tesseract" / "01_a.png").write_bytes(b"old")  # a baseline the new run leaves out
    (out / "base").mkdir()
    (out / "base" / "02_b.png").write_bytes(b"old")  # a rank the new run (worst_pages 1) does not draw
    with pytest.raises(RuntimeError):
        with replaced_folder(out) as stage:
            (stage / "base").mkdir()
            (stage / "base" / "01_c.png").write_bytes(b"new")
            raise RuntimeError("killed half way")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["base/02_b.png", "tesseract/01_a.png"]
    with replaced_folder(out) as stage:
        (stage / "base").mkdir()
        (stage / "base" / "01_c.png").write_bytes(b"new")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["base", "base/01_c.png"]
    with replaced_folder(tmp_path / "none_drawn"):
        pass
    assert (tmp_path / "none_drawn").is_dir()  # DVC wants its declared output even when empty
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none_drawn", "worst_pages"]  # no staging left


def test_a_kill_between_the_two_renames_of_a_replaced_folder_puts_the_earlier_one_back(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    """Was: a SIGTERM (an exit in ``kocr``) right after the earlier folder was moved aside left no ``out``
    at all, the earlier run in a hidden ``.old`` folder that the next write swept away."""
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "a.txt").write_text("old", encoding="utf-8")
    for kill_after, expected in ((1, "old"), (2, "new")):  # SIGTERM lands right after this rename
        with pytest.raises(SystemExit), interrupted_rename(monkeypatch, kill_after), replaced_folder(out) as stage:
            (stage / "a.txt").write_text("new", encoding="utf-8")
        assert (out / "a.txt").read_text(encoding="utf-8") == expected  # 1: moved aside and back; 2: swapped
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging or .old folder left


KILLED_PUBLISH = """
import os, signal, sys
from pathlib import Path
from kocr.atomic import PartialFolder
folder = PartialFolder(sys.argv[1])
folder.restart()
for i in range(4):
    (folder.partial / f"f{i}").write_text("new")
real = os.unlink
removed = []
def unlink(path, *args, **kwargs):  # SIGKILL half way through removing the earlier set
    real(path, *args, **kwargs)
    removed.append(path)
    if len(removed) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
os.unlink = unlink
folder.publish()
"""


def test_a_kill_while_publish_removes_the_earlier_set_leaves_the_new_one_whole(tmp_path: Path) -> None:
    """Was: ``publish`` removed the earlier ``DIR`` (minutes, for gigabytes of LMDB) before renaming
    ``DIR.partial`` to it, so a kill during the removal left half the earlier set under ``DIR``."""
    import subprocess
    import sys

    from kocr.atomic import PartialFolder

    repo = Path(__file__).resolve().parents[1]
    done = tmp_path / "set"
    done.mkdir()
    for i in range(4):
        (done / f"f{i}").write_text("old")
    killed = subprocess.run([sys.executable, "-c", KILLED_PUBLISH, str(done)], cwd=repo, timeout=60)
    assert killed.returncode == -9
    assert {p.name: p.read_text() for p in done.iterdir()} == {f"f{i}": "new" for i in range(4)}
    assert [p.name for p in _leftovers(tmp_path)] != []  # the earlier set, half removed, aside
    PartialFolder(done).unlock()  # the next writer of the set sweeps it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


KILLED_SWAP = """
import os, signal, sys
from pathlib import Path
from kocr.atomic import PartialFolder, replaced_folder
out, how, kill_after = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
real, renames = os.replace, []
def replace(src, dst, *args, **kwargs):  # SIGKILL right after the kill_after-th rename
    real(src, dst, *args, **kwargs)
    renames.append(dst)
    if len(renames) == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
if how == "replaced_folder":
    with replaced_folder(out) as stage:
        os.replace = replace
        (stage / "a.txt").write_text("new")
else:
    folder = PartialFolder(out)
    folder.restart()
    (folder.partial / "a.txt").write_text("new")
    os.replace = replace
    folder.publish()
"""


@pytest.mark.parametrize("how", ["replaced_folder", "publish"])
def test_a_sigkill_between_the_two_renames_leaves_the_earlier_folder_for_the_next_sweep_to_put_back(
        tmp_path: Path, how: str) -> None:
    """Was: a SIGKILL right after the earlier folder was moved aside left no ``out``, and the next write
    into its folder swept the hidden leftover: the earlier run was gone for good."""
    import subprocess
    import sys

    from kocr.atomic import PartialFolder

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "bundle"

    def killed_after(rename: int) -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        (out / "a.txt").write_text("old")
        run = subprocess.run([sys.executable, "-c", KILLED_SWAP, str(out), how, str(rename)], cwd=repo, timeout=60)
        assert run.returncode == -9

    killed_after(1)
    assert not out.exists()  # the earlier folder aside, the new one not yet in
    if how == "replaced_folder":
        write_json(tmp_path / "scores.json", {})  # any write into the folder sweeps it
    else:
        PartialFolder(out).unlock()  # the next writer of the set
    assert (out / "a.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []
    assert how == "replaced_folder" or (tmp_path / "bundle.partial" / "a.txt").read_text() == "new"  # kept, whole

    killed_after(2)  # the new folder went in: the earlier one, aside, is on its way out
    assert (out / "a.txt").read_text() == "new" and len(_leftovers(tmp_path)) == 1
    shutil.rmtree(out)  # and the folder is deleted by hand: not brought back from the leftover
    write_json(tmp_path / "scores.json", {})
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_sweep_puts_back_only_an_earlier_folder_it_can_tell_for_sure(tmp_path: Path) -> None:
    """Two killed writers' earlier folders for one name (which is the latest?), a leftover whose writer
    left no new folder waiting, another kind's ``.old`` (``staged_files``' files) stay swept as before."""
    from kocr.atomic import sweep_stale

    ended, other = subprocess_pid(), subprocess_pid()
    tag = _namespace_tag()
    leftovers = [f".twice.earlier.{tag}-{ended}.0123abcd.tmp", f".twice.earlier.{tag}-{other}.0123abcd.tmp",
                 f".twice.{tag}-{ended}.4567abcd.tmp", f".alone.earlier.{tag}-{ended}.0123abcd.tmp",
                 f".staging.old.{tag}-{ended}.0123abcd.tmp", f".staging.{tag}-{ended}.4567abcd.tmp"]
    for name in leftovers:
        (tmp_path / name).mkdir()
    assert sweep_stale(tmp_path) == len(leftovers)
    assert list(tmp_path.iterdir()) == []


def subprocess_pid() -> int:
    """The PID of a process that has ended (as far as it can be told: not reused yet)."""
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_a_full_disk_inside_a_staging_folder_names_the_file_as_it_would_be_published(tmp_path: Path) -> None:
    """Was: ``kocr evaluate`` on a disk that filled named the picture it was writing inside its hidden
    staging folder (``outputs/.worst_pages.TAG-PID.HEX.tmp/base/01_p.png``), gone by the time it is read."""
    from kocr.atomic import staged_files

    for stage_of, out in ((replaced_folder, tmp_path / "worst_pages"), (lambda o: staged_files(o, bool), tmp_path / "crops")):
        with pytest.raises(OSError) as info:
            with stage_of(out) as stage:
                raise OSError(errno.ENOSPC, "No space left on device", str(stage / "base" / "01_p.png"))
        assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(out / "base" / "01_p.png"))
        with pytest.raises(OSError) as info:  # other errors as they were
            with stage_of(out) as stage:
                raise OSError(errno.EACCES, "Permission denied", str(stage / "a.png"))
        assert info.value.filename == str(stage / "a.png")


def test_a_full_disk_is_reported_as_enospc_naming_the_target_whatever_the_writer_raised(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    import shutil as shutil_module
    from collections import namedtuple

    target = tmp_path / "model.pt"
    with pytest.raises(OSError) as info:  # Path.write_text and friends leave filename unset
        with atomic_path(target):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert info.value.errno == errno.EDQUOT and info.value.filename == str(target)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(OSError) as info:  # torch.save: RuntimeError "[enforce fail …] unexpected pos 896832 vs 896724"
        with atomic_path(target):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 896832 vs 896724")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**12, 10**9, 10**12 - 10**9))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # room to spare: a real error stays itself
        with atomic_path(target):
            raise RuntimeError("unexpected pos 1 vs 2")
    assert _leftovers(tmp_path) == [] and not target.exists()


def test_the_command_line_names_a_used_up_quota_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from evaluation import metrics
    from kocr.cli import main

    def quota(*args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "scores.json"))

    monkeypatch.setattr(metrics, "score_folders", quota)
    (tmp_path / "gt").mkdir()
    assert main(["score", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "gt")]) == 2  # was a traceback
    assert capsys.readouterr().err.strip() == (f"kocr score: error: the disk quota is used up writing "
                                               f"{tmp_path / 'scores.json'}; free some and run the same command again")


def test_a_scratch_folder_sweeps_only_its_own_kind_of_leftover_and_is_removed_after(tmp_path: Path) -> None:
    import subprocess
    import sys

    from kocr.atomic import scratch_folder

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, tag = int(ended.stdout), _namespace_tag()
    killed = tmp_path / f".kocr-trial-3.{tag}-{dead}.0123abcd.tmp"  # a killed tune trial's checkpoints
    write = tmp_path / f".model.pt.{tag}-{dead}.0123abcd.tmp"  # another kind: its own writers sweep it
    plain = tmp_path / "kocr-trial-4"  # not ours to judge: no PID in its name
    for folder in (killed, write, plain):
        folder.mkdir()
    with scratch_folder("kocr-trial-5", tmp_path, sweep="kocr-trial-") as folder:
        (folder / "model.pt").write_bytes(b"x")
        assert folder.parent == tmp_path and folder.name.startswith(".kocr-trial-5.") and not killed.exists()
        assert folder.stat().st_mode & 0o077 == 0  # private, as tempfile's folders are
    assert sorted(tmp_path.iterdir()) == sorted([write, plain])


def _hold_set_lock(out: str, take, release, released, hold_until) -> None:
    """A writer in its own process: takes the set's lock, says so, lets go when told (or holds on)."""
    from kocr.atomic import PartialFolder

    folder = PartialFolder(out, lock=True)
    take.set()
    if release is not None:
        release.wait(10)
        folder.unlock()  # removes the unkeyed .DIR.lock
        released.set()
    hold_until.wait(10)


def test_a_lock_file_removed_while_a_writer_locks_it_is_not_a_second_lock(tmp_path: Path, monkeypatch) -> None:
    # was: a writer that opened .set.lock just before its holder let go (unlocking removes the file) locked
    # the unlinked file, while a third writer made a new .set.lock and locked that: two writers of one set
    import fcntl
    import multiprocessing

    from kocr import atomic
    from kocr.atomic import PartialFolder, SetBusyError

    fork = multiprocessing.get_context("fork")
    out = str(tmp_path / "set")
    a_took, a_release, a_released, c_took, done = (fork.Event() for _ in range(5))
    a = fork.Process(target=_hold_set_lock, args=(out, a_took, a_release, a_released, done))
    a.start()
    assert a_took.wait(10)
    c = fork.Process(target=_hold_set_lock, args=(out, c_took, None, None, done))
    real_lockf, calls, me = fcntl.lockf, [], os.getpid()

    def opened_then_overtaken(handle, operation, *args):
        if os.getpid() != me:  # C, forked from here, locks as usual
            return real_lockf(handle, operation, *args)
        if not calls:  # this writer has opened A's lock file; A lets go, and C takes a new one
            a_release.set()
            assert a_released.wait(10)
            c.start()
            assert c_took.wait(10)
        calls.append(handle.name)
        return real_lockf(handle, operation, *args)

    monkeypatch.setattr(atomic.fcntl, "lockf", opened_then_overtaken)
    try:
        with pytest.raises(SetBusyError, match="another process is writing this set"):
            PartialFolder(out, lock=True).unlock()
    finally:
        done.set()
        a.join(10)
        c.join(10)
    assert len(calls) == 2  # the removed file locked, then the one C holds tried


def test_every_spelling_of_a_folder_names_the_one_lock_beside_it(tmp_path: Path, monkeypatch) -> None:
    # was: a path ending in '..' (out/train/..) was taken by name, its lock 'out/train/....lock' inside the folder,
    # so a second writer of out spelt so was not refused while the first held .out.lock
    from kocr.atomic import SetBusyError, set_lock, set_lock_path

    (tmp_path / "out" / "train").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    lock = tmp_path / ".out.lock"
    for spelling in ("out", "out/", "./out", "out/.", "out/train/..", "out/train/../", str(tmp_path / "out"),
                     f"{tmp_path}/out/train/.."):
        assert set_lock_path(spelling).resolve() == lock, spelling
    monkeypatch.chdir(tmp_path / "out" / "train")
    assert set_lock_path("..").resolve() == lock
    with set_lock(tmp_path / "out"):
        for spelling in ("..", "../train/..", "../../out"):
            with pytest.raises(SetBusyError, match="another process is writing this set"):
                set_lock(spelling).__enter__()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out", "train"]
