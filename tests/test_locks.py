"""kocr.locks: a file lock whose file is removed by its holder still lets one process in at a time."""

from __future__ import annotations

import subprocess
import sys

from kocr.locks import database_lock, discard_database_lock, file_lock
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
