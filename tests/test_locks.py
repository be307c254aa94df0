"""kocr.locks: a file lock whose file is removed by its holder still lets one process in at a time."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from kocr.locks import database_lock, discard_database_lock, discard_unheld_lock_files, file_lock, _lock_file
from tests.conftest import REPO

COUNTER = """\
import sys, time
from pathlib import Path
from kocr.locks import file_lock
lock, counter = sys.argv[1], Path(sys.argv[2])
for i in range(40):
    with file_lock(lock, remove=i % 2 == 1):  # every other holder (each last one too) removes the file as it lets go
        n = int(counter.read_text())
        time.sleep(0.001)  # a lost update shows when two hold it at once
        counter.write_text(str(n + 1))
"""


def test_processes_removing_the_lock_file_as_they_let_go_never_hold_it_together(tmp_path):
    counter = tmp_path / "counter"
    counter.write_text("0")
    workers = [subprocess.Popen([sys.executable, "-c", COUNTER, str(tmp_path / "x.lock"), str(counter)],
                                env={"PYTHONPATH": str(REPO)}) for _ in range(4)]
    assert [w.wait(timeout=120) for w in workers] == [0] * 4
    assert counter.read_text() == "160"  # without the check that the file locked is still at the path: fewer
    assert not (tmp_path / "x.lock").exists()


def test_a_sqlite_databases_lock_file_is_discarded_and_made_anew_when_used_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with database_lock(url, "kocr-tune:study-1"):
        [path] = tmp_path.glob("optuna.db.*.lock")
    discard_database_lock(url, "kocr-tune:study-1")
    assert not path.exists()
    discard_database_lock(url, "kocr-tune:study-1")  # nothing there: nothing made
    assert not path.exists()
    with file_lock(path):
        pass
    assert path.exists()
    discard_database_lock("postgresql+psycopg2://u@127.0.0.1:1/x", "kocr-tune:study-1")  # no file: nothing to do


HOLD = """\
import sys, time
from kocr.locks import database_lock
with database_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_lock_files_nobody_holds_are_discarded_and_a_held_one_stays(tmp_path):
    """A SIGKILLed holder's lock file (the kernel let go of its lock) was left beside the database for good."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    names = ("kocr-tune:killed", "kocr-tune:alive")
    killed, alive = (Path(_lock_file(url, name)) for name in names)
    holders = [subprocess.Popen([sys.executable, "-c", HOLD, url, name], stdout=subprocess.PIPE, text=True,
                                env={"PYTHONPATH": str(REPO)}) for name in names]
    others = [tmp_path / name for name in ("optuna.db", "optuna.db-journal", "other.db.0123abcd.lock", "optuna.db.x.lock")]
    try:
        assert [h.stdout.readline() for h in holders] == ["held\n"] * 2
        holders[0].send_signal(signal.SIGKILL)
        holders[0].wait()
        for path in others:
            path.touch()
        assert killed.exists() and alive.exists()
        discard_unheld_lock_files(url)
        assert not killed.exists() and alive.exists() and all(path.exists() for path in others)
        with database_lock(url, names[0]):  # a lock file removed is made anew when used again
            assert killed.exists()
    finally:
        holders[1].kill()
        holders[1].wait()
    discard_unheld_lock_files(url)
    assert sorted(tmp_path.iterdir()) == sorted(others)
    discard_unheld_lock_files("postgresql+psycopg2://u@127.0.0.1:1/x")  # no file: nothing to do
