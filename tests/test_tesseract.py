"""Tesseract's crops read many to one process (`read_crops_tesseract`): the same texts, crop for crop, as
one process a crop, and a batch that goes wrong read again one by one."""

from __future__ import annotations

import subprocess
import warnings

import cv2
import numpy as np
import pytest

from evaluation import tesseract

pytestmark = pytest.mark.skipif(not tesseract.tesseract_available(),
                                reason="tesseract-ocr with kor+eng not installed (make system-deps installs it)")

WORDS = ["Hello", None, "World 42", "Seoul 7", "KOCR"]  # None: a crop tesseract reads as nothing


def _crop(word: str | None) -> np.ndarray:
    if word is None:
        return np.full((10, 10), 255, np.uint8)
    grey = np.full((40, 40 + 22 * len(word)), 255, np.uint8)
    cv2.putText(grey, word, (8, 30), cv2.FONT_HERSHEY_SIMPLEX, 1, 0, 2)
    return grey


@pytest.fixture(scope="module")
def crops() -> tuple[list[np.ndarray], list[str]]:
    """The crops and each one's text read by its own tesseract process."""
    greys = [_crop(word) for word in WORDS]
    return greys, [tesseract.read_crop_tesseract(grey) for grey in greys]


@pytest.fixture
def tmpdir_checked(tmp_path, monkeypatch):
    """TMPDIR for the batches' folders, checked empty after the test."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tesseract.tempfile, "tempdir", str(folder))
    yield folder
    assert list(folder.iterdir()) == []


def test_the_test_crops_read_apart(crops):
    # what the alignment tests below rest on: every crop's own text differs, the blank reads nothing
    _, alone = crops
    assert len(set(alone)) == len(alone) and alone[1] == "" and all(alone[i] for i in (0, 2, 3, 4))


@pytest.mark.parametrize("batch", [tesseract.BATCH, 3, 2])
def test_a_batch_reads_each_crop_as_its_own_process_does(crops, batch, tmpdir_checked, monkeypatch):
    # 3: the blank in the middle of the first batch; 2: the blank last in a batch and a batch of one last
    greys, alone = crops
    runs = []
    real = subprocess.run
    monkeypatch.setattr(tesseract.subprocess, "run", lambda cmd, *a, **k: (runs.append(cmd), real(cmd, *a, **k))[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read by the batches themselves, not by the one-by-one fallback
        assert tesseract.read_crops_tesseract(greys, batch=batch) == alone
    assert len(runs) == -(-len(greys) // batch)
    assert tesseract.read_crops_tesseract([]) == []


def _real_run_except_batches(change):
    """subprocess.run as it is for one crop; for a batch's list file, ``change(real run)``."""
    real = subprocess.run

    def run(cmd, *args, **kwargs):
        return change(cmd, real, *args, **kwargs) if "crops.txt" in cmd else real(cmd, *args, **kwargs)
    return run


def test_a_batch_whose_page_count_is_off_is_read_one_by_one(crops, monkeypatch, tmpdir_checked):
    greys, alone = crops

    def one_page_short(cmd, real, *args, **kwargs):
        done = real(cmd, *args, **kwargs)
        head, _, tail = done.stdout.rpartition(tesseract.PAGE_SEPARATOR.encode())
        return subprocess.CompletedProcess(cmd, 0, head + tail, done.stderr)

    monkeypatch.setattr(tesseract.subprocess, "run", _real_run_except_batches(one_page_short))
    with pytest.warns(UserWarning, match="tesseract gave 4 pages on a batch of 5 crops; reading them one by one"):
        assert tesseract.read_crops_tesseract(greys) == alone


def test_a_batch_that_runs_past_its_time_is_read_one_by_one(crops, monkeypatch, tmpdir_checked):
    # a degenerate crop can stall a batch: its other crops are still read, not counted as nothing
    greys, alone = crops

    def stalls(cmd, real, *args, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))

    monkeypatch.setattr(tesseract.subprocess, "run", _real_run_except_batches(stalls))
    with pytest.warns(UserWarning, match=r"tesseract ran past 125 s on a batch of 5 crops; reading them one by one"):
        assert tesseract.read_crops_tesseract(greys) == alone


def test_a_crop_that_runs_past_its_time_alone_too_reads_nothing_and_the_run_goes_on(monkeypatch, tmpdir_checked):
    def stalls(cmd, *args, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))

    monkeypatch.setattr(tesseract.subprocess, "run", stalls)
    with pytest.warns(UserWarning) as caught:
        assert tesseract.read_crops_tesseract([np.full((4, 2000), 255, np.uint8)] * 3) == ["", "", ""]
    assert [str(w.message) for w in caught] == [
        "tesseract ran past 123 s on a batch of 3 crops; reading them one by one",
        *["tesseract ran past 120 s on one image (--psm 7); counted as reading nothing"] * 3]


def test_a_failing_batch_is_read_one_by_one_where_the_failure_names_the_problem(crops, tmpdir_checked):
    greys, _ = crops
    with pytest.warns(UserWarning, match=r"tesseract failed \(.*'nosuchlang'.*\) on a batch of 5 crops"), \
            pytest.raises(RuntimeError, match="(?s)tesseract failed: .*Failed loading language 'nosuchlang'"):
        tesseract.read_crops_tesseract(greys, langs="nosuchlang")


def test_evaluate_crops_and_the_pipelines_evaluate_read_crops_in_batches_in_order(crops, tmp_path, monkeypatch):
    from evaluation import score_crops
    from evaluation.evaluate import TesseractEngine

    greys, alone = crops
    rows = []
    for i, grey in enumerate(greys):
        cv2.imwrite(str(tmp_path / f"{i}.png"), grey)
        rows.append(f"{i}.png\t{WORDS[i] or 'blank'}\n")
    (tmp_path / "labels.tsv").write_text("image\ttext\n" + "".join(rows), encoding="utf-8")
    lists = []
    real = subprocess.run
    monkeypatch.setattr(tesseract.subprocess, "run",
                        lambda cmd, *a, **k: (lists.append(cmd), real(cmd, *a, **k))[1])
    monkeypatch.setattr(score_crops, "BATCH", 2)  # crops handed over 2 at a time: 2, 2 and the last one
    report = score_crops.score_crops(score_crops.read_labels(tmp_path / "labels.tsv"), {"tesseract": "tesseract"},
                                     progress=False)
    assert report.readings["tesseract"] == alone
    assert sum("crops.txt" in cmd for cmd in lists) == 2 and len(lists) == 3
    # the pipeline's evaluate: one page's ground-truth boxes (x0, x1, y0, y1), read in one batch
    page = np.full((sum(g.shape[0] for g in greys), max(g.shape[1] for g in greys)), 255, np.uint8)
    boxes, y = [], 0
    for grey in greys:
        page[y:y + grey.shape[0], :grey.shape[1]] = grey
        boxes.append([0, grey.shape[1], y, y + grey.shape[0]])
        y += grey.shape[0]
    lists.clear()
    assert TesseractEngine().read_crops(page, boxes) == alone
    assert len(lists) == 1
