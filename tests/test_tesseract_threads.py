"""Tesseract runs with OMP_THREAD_LIMIT=1 unless the user set it (their value wins), and
bench/tesseract_threads.py sets the child's OpenMP variables itself in both of its arms.

A fake ``tesseract`` first on PATH records each call's environment; no real Tesseract is needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from evaluation import tesseract
from tests.conftest import REPO

FAKE = '''#!{python}
"""A stand-in for tesseract: logs its arguments and OpenMP variables, reads "text" from everything."""
import json, os, sys
from pathlib import Path

args = sys.argv[1:]
with open({log!r}, "a", encoding="utf-8") as log:
    log.write(json.dumps({{"args": args, "omp": {{k: v for k, v in os.environ.items() if k.startswith("OMP_")}},
                          "mark": os.environ.get("KOCR_FAKE_MARK")}}) + "\\n")
if args[0] == "--list-langs":
    print("List of available languages in \\"/fake/\\" (2):\\neng\\nkor")
    sys.exit(0)
text = "one" if os.environ.get("KOCR_FAKE_DIFFER") and os.environ.get("OMP_THREAD_LIMIT") == "1" else "text"
if args[0] == "-":
    sys.stdin.buffer.read()
if args[args.index("--psm") + 1] == "3":
    print("level\\tpage_num\\tblock_num\\tpar_num\\tline_num\\tword_num\\tleft\\ttop\\twidth\\theight\\tconf\\ttext")
    print(f"5\\t1\\t1\\t1\\t1\\t1\\t10\\t10\\t50\\t20\\t90.5\\t{{text}}")
elif args[0] == "-":
    print(text)
else:  # a list file: one page of text per image it names, form feeds between
    count = len(Path(args[0]).read_text(encoding="utf-8").split())
    sys.stdout.write("\\f".join([text + "\\n"] * count))
'''


@pytest.fixture
def fake_tesseract(tmp_path, monkeypatch) -> Path:
    """A fake ``tesseract`` first on PATH; returns the log it appends one JSON line a call to."""
    folder = tmp_path / "fakebin"
    folder.mkdir()
    log = tmp_path / "calls.jsonl"
    script = folder / "tesseract"
    script.write_text(FAKE.format(python=sys.executable, log=str(log)), encoding="utf-8")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KOCR_FAKE_MARK", "passed")
    return log


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


def _read_every_way(tmp_path: Path) -> None:
    """One crop alone, two crops as one batch and one page, through the module's public readers."""
    crop = np.full((30, 80), 255, np.uint8)
    assert tesseract.read_crop_tesseract(crop) == "text"
    assert tesseract.read_crops_tesseract([crop, crop]) == ["text", "text"]
    cv2.imwrite(str(tmp_path / "page.png"), np.full((100, 200), 255, np.uint8))
    assert [w.text for w in tesseract.read_page_tesseract(tmp_path / "page.png").words] == ["text"]


def test_tesseract_runs_single_threaded_by_default(fake_tesseract, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_THREAD_LIMIT", raising=False)
    _read_every_way(tmp_path)
    calls = _calls(fake_tesseract)
    assert [c["args"][0] for c in calls] == ["-", "crops.txt", "-"]  # a crop, a batch's list file, a page
    assert [c["omp"].get("OMP_THREAD_LIMIT") for c in calls] == ["1"] * 3
    assert all(c["mark"] == "passed" for c in calls)  # the rest of the environment goes through
    assert "OMP_THREAD_LIMIT" not in os.environ  # set for tesseract only, not in this process


@pytest.mark.parametrize("value", ["3", "1"])
def test_the_users_omp_thread_limit_wins(fake_tesseract, tmp_path, monkeypatch, value):
    monkeypatch.setenv("OMP_THREAD_LIMIT", value)
    _read_every_way(tmp_path)
    assert [c["omp"]["OMP_THREAD_LIMIT"] for c in _calls(fake_tesseract)] == [value] * 3


def _bench(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "tesseract_threads.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})


def test_the_benchmark_sets_the_childs_openmp_variables_in_both_arms(fake_tesseract, tmp_path):
    # the parent's OMP_* (the suite's OMP_NUM_THREADS=1, a user's limit) reach neither arm
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((30, 80), 255, np.uint8))
    (tmp_path / "labels.tsv").write_text("image\ttext\n" + "".join(f"{i}.png\tx\n" for i in range(3)),
                                         encoding="utf-8")
    args = ("--labels", "labels.tsv", "--batch", "2", "--pages", "0.png", "--repeat", "2")
    done = _bench(*args, cwd=tmp_path, OMP_NUM_THREADS="1", OMP_THREAD_LIMIT="3")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["differ"] == [] and report["crops"]["count"] == 3 and report["pages"]["count"] == 1
    assert report["omp_vars_removed"] == ["OMP_NUM_THREADS", "OMP_THREAD_LIMIT"]
    for mode in ("crops", "pages"):  # the ratio is of the unrounded times; the seconds shown are rounded to 0.01
        ratio, limit, default = (report[mode]["ratio"], report[mode]["limit"]["seconds"],
                                 report[mode]["default"]["seconds"])
        assert abs(ratio - limit / default) <= 0.005 * (1 + ratio) / (default - 0.005) + 0.0005, report[mode]
    read = [c["omp"] for c in _calls(fake_tesseract) if c["args"][0] != "--list-langs"]
    # 2 rounds x (2 batches + 1 page) x 2 arms, the arms alternating
    assert len(read) == 12 and read.count({}) == 6 and read.count({"OMP_THREAD_LIMIT": "1"}) == 6


def test_the_benchmark_exits_1_naming_what_reads_differently(fake_tesseract, tmp_path):
    cv2.imwrite(str(tmp_path / "0.png"), np.full((30, 80), 255, np.uint8))
    (tmp_path / "labels.tsv").write_text("image\ttext\n0.png\tx\n", encoding="utf-8")
    done = _bench("--labels", "labels.tsv", "--pages", "0.png", cwd=tmp_path, KOCR_FAKE_DIFFER="1")
    assert done.returncode == 1
    differ = json.loads(done.stdout)["differ"]
    assert differ == [{"crop": differ[0]["crop"], "default": "text", "limit": "one"},
                      {"page": "0.png", "words": [1, 1], "first_apart": 0,  # text, box, confidence
                       "default": ["text", 10.0, 10.0, 50.0, 20.0, 0.905],
                       "limit": ["one", 10.0, 10.0, 50.0, 20.0, 0.905]}]
