"""bench/: the ratios the benchmarks print are computed the right way, and they run where the docs run them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from tests.conftest import REPO


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_ratio_is_total_time_for_the_same_images_not_the_ratio_of_mean_rates():
    time_ratio = _bench("train_vs_reference").time_ratio
    # docs/training.md's H200 rounds: 100 steps x 192 images per round on both sides
    reference, engine = [822, 891], [1021, 4458]
    images = 100 * 192
    seconds = (sum(images / r for r in reference), sum(images / e for e in engine))
    assert time_ratio(reference, engine) == pytest.approx(seconds[0] / seconds[1])
    assert round(time_ratio(reference, engine), 2) == 1.94  # the mean of rates said 3.2x
    assert time_ratio([3.0, 3.0], [6.0, 6.0]) == pytest.approx(2.0)


def _run(script: str, *args: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # as the compose service runs them: the repo importable
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_ingest_ratio_is_taken_from_unrounded_times(tmp_path):
    done = _run("ingest_vs_reference.py", "--pages", "3", "--width", "640", "--height", "480", "--workers", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)["results"]
    rates = results["kocr_1p"]["crops_per_s"] / results["reference"]["crops_per_s"]
    assert results["kocr_1p"]["ratio_to_reference"] == pytest.approx(rates, rel=0.02)  # rounded seconds were 10% off


def test_the_page_benchmark_runs_with_the_repository_on_the_path(sample_pages, tmp_path):
    # a bundle named "bench" imported the repository's bench/ folder instead of its network file
    pages = tmp_path / "pages"
    pages.mkdir()
    for image in sorted(sample_pages.glob("*.jpg"))[:1]:
        (pages / image.name).write_bytes(image.read_bytes())
    done = _run("predict_vs_easyocr.py", "--model", "ko_base", "--pages", str(pages), "--limit", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["pages"] == 1
    (tmp_path / "empty").mkdir()
    done = _run("predict_vs_easyocr.py", "--model", "ko_base", "--pages", str(tmp_path / "empty"))
    assert done.returncode == 2 and "no .jpg/.jpeg/.png image there" in done.stderr and "Traceback" not in done.stderr


def test_bad_benchmark_inputs_are_named_not_tracebacks(tmp_path):
    labels = tmp_path / "labels.tsv"
    labels.write_text("image\ttext\n", encoding="utf-8")
    for script, args, words in (
            ("decoders.py", ["--labels", str(labels), "--decoders", "greedy", "beamSearch"], "--decoders 'beamSearch'"),
            ("ingest_vs_reference.py", ["--src", str(tmp_path)], "no page JSON there"),
            ("train_vs_reference.py", ["--data", str(tmp_path / "none"), "--steps", "1"], "no train/ set there")):
        done = _run(script, *args)
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, (script, done.stderr)


def test_the_tesseract_batch_benchmark_reads_the_same_texts_and_prints_the_ratio(tmp_path):
    import cv2
    import numpy as np

    from evaluation.tesseract import tesseract_available

    if not tesseract_available():
        pytest.skip("tesseract-ocr with kor+eng not installed (make system-deps installs it)")
    rows = []
    for i, word in enumerate(["Hello", "", "World 42"]):
        grey = np.full((40, 200), 255, np.uint8)
        cv2.putText(grey, word, (8, 30), cv2.FONT_HERSHEY_SIMPLEX, 1, 0, 2)
        cv2.imwrite(str(tmp_path / f"{i}.png"), grey)
        rows.append(f"{i}.png\t{word or 'blank'}\n")
    (tmp_path / "labels.tsv").write_text("image\ttext\n" + "".join(rows), encoding="utf-8")
    done = _run("tesseract_batch.py", "--labels", str(tmp_path / "labels.tsv"), "--batch", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["crops"] == report["same_text"] == 3 and report["differ"] == []
    assert report["ratio"] == pytest.approx(report["batched"]["seconds"] / report["per_crop"]["seconds"], abs=0.02)


def test_the_data_memory_benchmark_reports_bytes_per_item():
    done = _run("data_memory.py", "--sizes", "40", "160", "--commands", "export", "dataset")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)["results"]
    assert set(results) == {"export", "dataset"}
    for command in results.values():
        assert set(command["runs"]) == {"40", "160"} and isinstance(command["heap_bytes_per_item"], float)


def test_the_set_index_benchmark_starts_cold_then_warm_on_each_set(tmp_path):
    from training.data.lmdb_store import LmdbWriter

    with LmdbWriter(tmp_path / "crops") as writer:
        for i in range(5):
            writer.add(cv2.imencode(".png", np.full((20, 30 + 10 * i), 200, np.uint8))[1].tobytes(), "서울"[: 1 + i % 2])
    done = _run("set_index.py", "--sizes", "60", "120", "--crops", str(tmp_path / "crops"))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)["results"]
    assert set(results) == {"60", "120"}
    for size in results.values():  # the script itself checks that the warm pass used the index, same result
        assert size["cold_s"] > 0 and size["warm_s"] > 0 and size["ratio"] > 0


def test_prepare_workers_reading_aihub_zips_hold_nothing_per_page(tmp_path):
    """Each cropping worker held a copy of the source's index (every label's and image's name, the image
    lookup tables) and zipfile's directory of each archive it read: about 3.7 KB a page a worker, so 1.5 GB
    each at 400,000 pages. Now a worker gets the label and image of each page it reads, and reads a zip member
    at the place the scan found (peak resident memory of the largest worker, 1,000 and 5,000 pages)."""
    bench = _bench("aihub_zip_memory")
    runs = {size: bench.measure(bench.make_zips(tmp_path / f"src{size}", size), tmp_path / f"out{size}", 2)
            for size in (1000, 5000)}
    assert all(run["peak_rss_worker_mb"] > 0 and run["pages"] == size for size, run in runs.items())
    assert bench.per_page(runs, "peak_rss_worker_mb") < 1000, runs  # bytes a page; was 3,700


def test_the_prepare_memory_benchmark_also_measures_a_folder_of_generated_pages(tmp_path):
    """`--layout folder` (what was bench/ingest_memory.py): many names for a few generated pages, each
    size cropped by the workers in a fresh process, measured as the zips are."""
    done = _run("aihub_zip_memory.py", "--layout", "folder", "--sizes", "6", "12", "--workers", "2",
                "--seed-pages", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["layout"] == "folder"
    runs = report["results"]["2"]["runs"]
    assert [runs[size]["pages"] for size in ("6", "12")] == [6, 12]
    assert runs["12"]["crops"] == 2 * runs["6"]["crops"] > 0  # the same pages twice over: real crops
    for run in runs.values():
        assert 0 < run["peak_rss_main_mb"] < run["peak_rss_all_processes_mb"] and run["peak_rss_worker_mb"] > 0


def test_the_synth_benchmark_counts_the_cpu_time_of_its_render_workers(tmp_path):
    """synth_speed's CPU seconds are "this process and its workers". The render workers are the forkserver's
    children (training.data.workers.start_pool), which RUSAGE_CHILDREN never sees: a 2-worker run was
    counted at a fraction of the CPU that rendering the same samples in-process takes."""
    from kocr.params import load_params, section
    from training.data.synth_lines import LinesConfig, _context, generate_lines

    cpu_seconds = _bench("synth_speed")._cpu_seconds
    params = section(load_params(REPO / "params.yaml"), "synth_lines")
    spent = {}
    for workers in (1, 2):
        config = LinesConfig.from_params(params, count=300, seed=1, workers=workers, contact_sheet=0)
        _context(config)
        start = cpu_seconds()
        generate_lines(tmp_path / f"w{workers}", config, progress=False)
        spent[workers] = cpu_seconds() - start
    # the same 300 samples rendered by two workers cost at least most of what one process spends on them
    assert spent[2] >= 0.8 * spent[1], spent
