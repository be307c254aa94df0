"""The ko-base recipe (recipes/ko-base, kocr/recipe.py) and the checkpoint it ships (models/base)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import yaml

from evaluation.analysis import jamo_confusions
from evaluation.metrics import recognition_scores, sign_test_p
from kocr.atomic import OutFolderError
from kocr.recipe import evaluate_sets, export_crops, model_card, write_card
from kocr.recipe_ship import ShipError, judge, ship_release
from kocr.recipe_size import size_note, size_problem
from tests.conftest import REPO, realdata
from training.charset import Charset
from training.checkpoint import SHIPPED_MODELS, file_digest, load_recognizer
from training.data.fonts import find_fonts
from training.data.lmdb_store import LmdbDataset
from training.data.synth_lines import LinesConfig, generate_lines
from training.train import TrainConfig

RECIPE = REPO / "recipes" / "ko-base"
SHIPPED = REPO / "models" / "base"
SIZES = {"params.yaml": "gpu", "params-cpu.yaml": "cpu", "params-gpu-instalment.yaml": "gpu-instalment"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _keys(tree: object, prefix: str = "") -> set[str]:
    if not isinstance(tree, dict):
        return {prefix}
    return set().union(*(_keys(v, f"{prefix}{k}.") for k, v in tree.items()))


@pytest.mark.parametrize("name", sorted(SIZES))
def test_each_size_is_a_complete_valid_params_file_with_unseen_heldout_faces(name):
    params = yaml.safe_load((RECIPE / name).read_text(encoding="utf-8"))
    other = yaml.safe_load((RECIPE / "params.yaml").read_text(encoding="utf-8"))
    assert params["size"] == SIZES[name]
    assert _keys(params) == _keys(other)  # the two sizes differ in values only
    train_fonts = set(params["synth_lines"]["fonts"])
    sets = {s: LinesConfig.from_params({**params["synth_lines"], **params[s]})
            for s in ("synth_lines", "synth_lines_val", "synth_lines_heldout", "synth_lines_heldout_latin",
                      "synth_lines_heldout_signs")}
    heldout = set(sets["synth_lines_heldout"].fonts)
    assert {"UnPilgi.ttf"} <= heldout and {"NanumPen.ttf", "NanumBrush.ttf"} <= train_fonts  # handwriting both sides
    families = {Path(f).stem.lower() for f in heldout}  # UnPilgi also rules out UnPilgiBold and UnPilgia
    assert not [f for f in train_fonts if any(f.lower().startswith(family) for family in families)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pattern matching no installed file warns: fail on it
        assert len(find_fonts(sorted(train_fonts))) == len(train_fonts)
    assert len({c.seed for c in sets.values()}) == 5  # five different sets
    # the sign faces are held out whole (no Baedal-Minjok face trains) and installed by make system-deps
    signs = sets["synth_lines_heldout_signs"]
    assert len(signs.fonts) == 8 and not [f for f in train_fonts if f.upper().startswith("BM")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(find_fonts(list(signs.fonts))) == len(signs.fonts)
    assert signs.latin_words == 0 and signs.char_jitter == 0 and signs.arc == 0
    # training draws some Latin words; the held-out set none; its Latin twin only Latin, in the same faces
    assert sets["synth_lines"].latin_words > 0 == sets["synth_lines_heldout"].latin_words
    latin = sets["synth_lines_heldout_latin"]
    assert latin.latin_words == 1.0 and set(latin.fonts) == heldout
    config = TrainConfig.from_params(params)
    assert config.charset == "korean_g2" and config.steps > 0 and params["synth_lines"]["max_chars"] <= 25
    if SIZES[name] == "gpu":  # the full recipe starts over from EasyOCR's weights
        assert config.base in ("english_g2", "korean_g2")
    else:  # an instalment (CPU or GPU) continues the shipped base, is scored against it and
        # ships its mean with the start (the CPU size too since instalment 16: the start reads Latin as well)
        assert config.base == "ko_base" == params["recipe"]["reference"]
        assert config.average_with_base == 0.5
    # both instalment sizes score the same held-out set (held-out v2); the GPU size has its own, longer lines
    cpu = yaml.safe_load((RECIPE / "params-cpu.yaml").read_text(encoding="utf-8"))
    ours, theirs = ({**p["synth_lines"], **p["synth_lines_heldout"]} for p in (params, cpu))
    differs = {k for k in theirs if ours[k] != theirs[k]} - {"workers", "contact_sheet"}
    assert differs == ({"count", "words_per_line", "max_chars"} if SIZES[name] == "gpu" else set())
    # every size draws the same Latin and sign-face held-out sets
    for section in ("synth_lines_heldout_latin", "synth_lines_heldout_signs"):
        ours, theirs = ({**p["synth_lines"], **p[section]} for p in (params, cpu))
        assert {k for k in theirs if ours[k] != theirs[k]} - {"workers", "contact_sheet"} == set(), section


@pytest.fixture(scope="module")
def recipe_copy(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The working tree without models/ in a fresh git repository, and an environment with the venv's dvc."""
    root = tmp_path_factory.mktemp("recipe-copy")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file() and not rel.startswith("models/"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    bin_dir = Path(sys.executable).parent
    return root, {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_recipe_pipeline_dry_run_lists_every_stage_with_the_recipe_params(recipe_copy):
    root, env = recipe_copy
    done = subprocess.run(["dvc", "repro", "--dry", "--force", "recipes/ko-base/dvc.yaml"],
                          cwd=root, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    stages = yaml.safe_load((RECIPE / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert set(stages) == {"synth_train", "synth_val", "synth_heldout", "train", "evaluate", "card", "ship_check"}
    commands = [ln[2:] for ln in done.stdout.splitlines() if ln.startswith("> ")]
    assert len(commands) == len(stages)
    assert all(c.startswith("KOCR_PARAMS=recipes/ko-base/params.yaml ") for c in commands), commands
    # the two stages that cost hours at the GPU size check the machine before any work
    checked = [c for c in commands if c.startswith("KOCR_PARAMS=recipes/ko-base/params.yaml python -m kocr.recipe "
                                                   "check-size && ")]
    assert [c.split("&& ", 1)[1].split()[1:3] for c in checked] == [["kocr", "synth-lines"], ["kocr", "train"]]
    assert "${" not in done.stdout
    assert not (root / "recipes/ko-base/data").exists() and not (root / "recipes/ko-base/dvc.lock").exists()


def test_gpu_size_on_a_machine_without_cuda_stops_before_rendering_and_names_the_cpu_size(recipe_copy):
    root, env = recipe_copy
    env = {**env, "CUDA_VISIBLE_DEVICES": ""}  # no GPU for torch, whatever runs the tests
    done = subprocess.run(["dvc", "repro", "recipes/ko-base/dvc.yaml:synth_train"], cwd=root, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "recipes/ko-base/params.yaml: the `gpu` size (30000 steps x 256 = 7,680,000 images to train) needs a CUDA GPU" in out
    assert "params_file: params-cpu.yaml/' recipes/ko-base/dvc.yaml" in out and "~71 h" in out
    assert not (root / "recipes/ko-base/data/train").exists()
    # the CPU size fits; the override lets a GPU size render here anyway, and says so
    for params, extra, says in (("params-cpu.yaml", {}, "size `cpu` fits this machine"),
                                ("params.yaml", {"KOCR_RECIPE_ANY_MACHINE": "1"}, "run here anyway")):
        done = subprocess.run([sys.executable, "-m", "kocr.recipe", "check-size"], cwd=root, capture_output=True,
                              text=True, timeout=120, env={**env, **extra, "KOCR_PARAMS": f"recipes/ko-base/{params}"})
        assert done.returncode == 0 and says in done.stderr, done.stderr


@pytest.mark.parametrize("name", sorted(SIZES))
def test_size_check_wants_cuda_for_every_size_but_cpu_unless_training_is_pinned_to_the_cpu(name):
    params = yaml.safe_load((RECIPE / name).read_text(encoding="utf-8"))
    gpu = SIZES[name] != "cpu"
    problem = size_problem(params, name, cuda=False)
    assert (problem is not None) == gpu
    if gpu:
        images = params["train"]["steps"] * params["train"]["batch_size"]
        assert f"= {images:,} images to train" in problem and problem.startswith(f"{name}: the `{SIZES[name]}` size")
    assert size_problem(params, name, cuda=True) is None
    for device in ("cpu", "cpu:0"):  # asked for on purpose (torch.device spells it either way): runs
        pinned = {**params, "train": {**params["train"], "device": device}}
        assert size_problem(pinned, name, cuda=False) is None
    # the CPU size where a GPU is: it runs, with a note pointing at the GPU size
    assert (size_note(params, name, cuda=True) is not None) == (not gpu)
    assert size_note(params, name, cuda=False) is None
    # `train:` with every key commented out reads as the defaults (device auto), not an AttributeError
    assert (size_problem({**params, "train": None}, name, cuda=False) is not None) == gpu


def test_check_size_names_the_file_and_key_of_a_training_length_that_is_not_a_number(tmp_path, monkeypatch, capsys):
    """The recipe's first command: `train.steps: 30k` in a GPU size is one line naming it, exit 2, not a traceback."""
    import torch

    from kocr.recipe import main

    params = yaml.safe_load((RECIPE / "params.yaml").read_text(encoding="utf-8"))
    for key, value in (("steps", "30k"), ("batch_size", [256])):
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump({**params, "train": {**params["train"], key: value}}), encoding="utf-8")
        monkeypatch.setenv("KOCR_PARAMS", str(path))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(SystemExit) as stop:
            main(["check-size"])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err == f"python -m kocr.recipe check-size: error: {path}: train.{key} {value!r}: expected a whole number"

def test_labels_with_quotes_survive_export_scoring_and_readings_exactly(tmp_path, capsys):
    """A label's ``"`` is text: export-crops and readings.tsv used to CSV-quote it, so 5 crops of held-out v2
    (a label "이낙연" in quotes) were scored against the quoted form and counted wrong for every reader."""
    import cv2
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from evaluation.score_crops import read_labels, tsv_row
    from kocr.cli import main
    from training.data.lmdb_store import LmdbWriter

    labels = ['"이낙연"', '주목 "마라톤"', '"흘러" 28', '5"', "서울"]
    font = ImageFont.truetype(str(find_fonts(["UnBatang.ttf"])[0].path), 40)
    with LmdbWriter(tmp_path / "lmdb") as writer:
        with (writer.partial / "manifest.tsv").open("w", encoding="utf-8") as manifest:
            manifest.write("index\tfont\tbackground\tlabel\n")
            for i, text in enumerate(labels, start=1):
                page = Image.new("L", (48 * len(text) + 16, 64), 255)
                ImageDraw.Draw(page).text((8, 8), text, fill=0, font=font)
                writer.add(cv2.imencode(".png", np.asarray(page))[1].tobytes(), text)
                manifest.write(f"{i}\t{'UnBatang.ttf' if i % 2 else 'UnPilgi.ttf'}\twhite\t{text}\n")
    assert export_crops(tmp_path / "lmdb", tmp_path / "crops") == len(labels)
    crops = read_labels(tmp_path / "crops/labels.tsv")
    assert [c.text for c in crops] == labels
    assert [c.font for c in crops] == ["UnBatang.ttf", "UnPilgi.ttf"] * 2 + ["UnBatang.ttf"]
    assert main(["evaluate-crops", "--labels", str(tmp_path / "crops/labels.tsv"), "--model", "ko_base",
                 "--out", str(tmp_path / "out")]) == 0
    scores = json.loads(capsys.readouterr().out)["ko_base"]
    rows = [r.split("\t") for r in (tmp_path / "out/readings.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    assert [text for _, text, _ in rows] == labels
    assert scores["word_accuracy"] == sum(text == read for _, text, read in rows) / len(rows)
    with pytest.raises(ValueError, match="labels.tsv: field .* tab or line break"):
        tsv_row(["a.png", "two\tfields"], "labels.tsv")


@pytest.fixture(scope="module")
def heldout_crops(tmp_path_factory) -> Path:
    """Eight held-out-face words written as an LMDB set by synth-lines, then exported as crops."""
    root = tmp_path_factory.mktemp("heldout")
    config = LinesConfig.from_params({"count": 8, "seed": 2, "fonts": ["UnBatang.ttf", "UnPilgi.ttf"],
                                      "words_per_line": [1, 1], "workers": 1, "contact_sheet": 0})
    generate_lines(root / "lmdb", config, progress=False)
    assert export_crops(root / "lmdb", root / "crops") == 8
    return root


def test_export_crops_writes_every_sample_with_its_label_and_font(heldout_crops):
    import cv2

    dataset = LmdbDataset(heldout_crops / "lmdb")
    rows = (heldout_crops / "crops/labels.tsv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "image\ttext\tfont" and len(rows) == 9
    for i, row in enumerate(rows[1:]):
        image, text, font = row.split("\t")
        assert text == dataset[i][1] and font in ("UnBatang.ttf", "UnPilgi.ttf")
        assert (cv2.imread(str(heldout_crops / "crops" / image), cv2.IMREAD_GRAYSCALE) == dataset[i][0]).all()


def test_export_crops_that_fail_midway_keep_the_earlier_crops_whole(heldout_crops, tmp_path, monkeypatch):
    out = tmp_path / "crops"
    shutil.copytree(heldout_crops / "crops", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    written = []
    write_bytes = Path.write_bytes

    def write_until_full(path, data):  # the fourth crop meets a full disk half-way
        written.append(path)
        if len(written) < 4:
            return write_bytes(path, data)
        write_bytes(path, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", write_until_full)
    with pytest.raises(OSError, match="No space left on device") as raised:
        export_crops(heldout_crops / "lmdb", out)
    assert raised.value.filename == str(out / "000004.png")  # named as published, not in the hidden folder
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops"]  # nothing half-written left beside it


def test_a_stop_while_the_earlier_crops_are_removed_leaves_the_new_ones_whole(heldout_crops, tmp_path, monkeypatch):
    # was: the earlier folder was removed under its own name (shutil.rmtree) before the new one moved in, so a
    # SIGTERM or Ctrl-C (kocr.recipe makes them an exit) landing in the removal left half the earlier crops
    # beside a labels.tsv listing them all, and no new set
    out = tmp_path / "crops"
    shutil.copytree(heldout_crops / "crops", out)
    shutil.copy(out / "000001.png", out / "000009.png")  # the earlier set: one crop more than the new one
    real_rmtree = shutil.rmtree

    def removing_half_then_stopped(path, *args, **kwargs):
        if (Path(path) / "000009.png").exists():
            for name in sorted(os.listdir(path))[:5]:
                os.unlink(Path(path) / name)
            raise SystemExit(143)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", removing_half_then_stopped)
    with pytest.raises(SystemExit):
        export_crops(heldout_crops / "lmdb", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        p.name: p.read_bytes() for p in (heldout_crops / "crops").iterdir()}


def test_a_missing_or_wrong_type_input_is_one_line(tmp_path, monkeypatch, capsys):
    # was: a FileNotFoundError traceback (export-crops' LMDB set, card's checkpoint and metrics, the params file)
    from kocr.recipe import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KOCR_PARAMS", raising=False)
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    (tmp_path / "folder").mkdir()
    card = ["--train-metrics", "t.json", "--eval-metrics", "e.json", "--data", "d", "--out", "rel", "--command", "c"]
    for argv, problem in (
            (["export-crops", "missing_set", "--out", "x"], "missing_set: LMDB set folder not found"),
            (["export-crops", "afile", "--out", "x"],
             "afile: not a folder; give an LMDB set folder (as kocr synth-lines writes)"),
            (["export-crops", "folder", "--out", "x"], "folder: not an LMDB set (no data.mdb) nor a folder of shard-* sets"),
            (["card", "--model", "missing.pt", *card], "missing.pt: not found (run the recipe's train and evaluate "
                                                       "stages first)"),
            (["card", "--model", "folder", *card], "folder: a folder, expected a file"),
            (["check-size"], "params.yaml: params file not found (run from the project root)")):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2, argv
        assert capsys.readouterr().err.splitlines() == [f"python -m kocr.recipe {argv[0]}: error: {problem}"], argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]  # nothing written


def test_evaluate_of_a_model_that_names_no_checkpoint_is_one_line(heldout_crops, tmp_path, monkeypatch, capsys):
    # was: a ModelSpecError traceback for a missing --model, a folder, or a file that is no checkpoint
    from kocr.recipe import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KOCR_PARAMS", raising=False)
    (tmp_path / "params.yaml").write_text("recipe: {baselines: []}\n", encoding="utf-8")
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    (tmp_path / "folder").mkdir()
    for model, problem in (("missing.pt", "unknown model 'missing.pt': not a file"),
                           ("folder", "unknown model 'folder': not a file"),
                           ("afile", "afile: not a loadable PyTorch checkpoint")):
        with pytest.raises(SystemExit) as stopped:
            main(["evaluate", "--model", model, "--heldout", str(heldout_crops / "crops" / "labels.tsv"),
                  "--out", "out", "--metrics", "evaluate.json"])
        line = capsys.readouterr().err.splitlines()[-1]  # after MLflow's own log lines
        assert stopped.value.code == 2
        assert line.startswith(f"python -m kocr.recipe evaluate: error: {problem}"), line
    assert not (tmp_path / "evaluate.json").exists()


def test_export_crops_refuses_an_out_holding_other_files(heldout_crops, tmp_path, monkeypatch, capsys):
    # was: a folder of the user's given as --out was replaced whole by the crops, its files gone
    from kocr.recipe import main

    own = tmp_path / "own"
    (own / "notes").mkdir(parents=True)
    (own / "thesis.tex").write_text("mine", encoding="utf-8")
    (own / "000001.png").write_bytes(b"x")
    with pytest.raises(SystemExit) as stopped:
        main(["export-crops", str(heldout_crops / "lmdb"), "--out", str(own)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m kocr.recipe export-crops: error: --out {own}: holds 'notes' (2 such), which export-crops does "
        "not write; give a new folder (the crop folder there is replaced whole)")
    assert sorted(p.name for p in own.iterdir()) == ["000001.png", "notes", "thesis.tex"]
    (tmp_path / "link").symlink_to(heldout_crops / "crops")
    monkeypatch.chdir(own)
    for out, message in ((tmp_path / "link", "a symbolic link"), (Path("."), "the working folder")):
        with pytest.raises(OutFolderError, match=message):
            export_crops(heldout_crops / "lmdb", out)
    assert sorted(p.name for p in own.iterdir()) == ["000001.png", "notes", "thesis.tex"]
    export_crops(heldout_crops / "lmdb", tmp_path / "crops")  # a set of its own is replaced
    assert export_crops(heldout_crops / "lmdb", tmp_path / "crops") == 8


def _small_set(path: Path, count: int, manifest_order: list[int] | None = None) -> Path:
    """An LMDB set of ``count`` tiny crops with a synth-lines ``manifest.tsv`` (rows in ``manifest_order``)."""
    import cv2
    import numpy as np

    from training.data.lmdb_store import LmdbWriter

    crops = [cv2.imencode(".png", np.full((8, 8 + i), 255, np.uint8))[1].tobytes() for i in range(4)]
    with LmdbWriter(path) as writer:
        for i in range(count):
            writer.add(crops[i % 4], f"서울{i % 7}")
        order = manifest_order or list(range(1, count + 1))
        (writer.partial / "manifest.tsv").write_text(
            "index\tfont\tbackground\tlabel\n" + "".join(f"{i}\tface{i}.ttf\twhite\tx\n" for i in order),
            encoding="utf-8")
    return path


def _export_peak(lmdb: Path, out: Path) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        export_crops(lmdb, out)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_export_crops_memory_does_not_grow_with_the_set(tmp_path):
    """Was: every labels.tsv row (and the manifest's font of every sample) was held until the end, about
    400 bytes a sample: 1.8 GB for the 4.5 million crops of a prepared AI-Hub set. Rows now go to the file
    as the crops are written, and the manifest is read along with them."""
    small, large = 500, 2000
    export_crops(_small_set(tmp_path / "warm", 4), tmp_path / "warm_crops")  # imports and caches, outside the count
    peaks = [_export_peak(_small_set(tmp_path / f"lmdb{n}", n), tmp_path / f"crops{n}") for n in (small, large)]
    assert len((tmp_path / f"crops{large}/labels.tsv").read_text(encoding="utf-8").splitlines()) == large + 1
    growth = (peaks[1] - peaks[0]) / (large - small)
    assert growth < 40, f"peak grew {growth:.0f} bytes per sample ({peaks[0]:,} -> {peaks[1]:,} bytes)"


def test_export_crops_reads_a_manifest_in_any_order(tmp_path):
    lmdb = _small_set(tmp_path / "lmdb", 5, manifest_order=[3, 1, 5, 2, 3])  # 4 has no row; 3 twice: the last wins
    export_crops(lmdb, tmp_path / "crops")
    rows = [r.split("\t") for r in (tmp_path / "crops/labels.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    assert [font for _, _, font in rows] == ["face1.ttf", "face2.ttf", "face3.ttf", "", "face5.ttf"]
    lmdb = _small_set(tmp_path / "ordered", 5, manifest_order=[1, 2, 2, 5])
    export_crops(lmdb, tmp_path / "crops2")
    rows = [r.split("\t") for r in (tmp_path / "crops2/labels.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    assert [font for _, _, font in rows] == ["face1.ttf", "face2.ttf", "", "", "face5.ttf"]


CROPS_UNDER_A_LIMIT = """
import resource, sys
from kocr.recipe import export_crops
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))  # ulimit -f
try:
    export_crops(sys.argv[1], sys.argv[2])
except OSError as exc:
    print(exc.errno, exc.filename)
"""


def test_a_crop_cut_short_by_a_file_size_limit_fails_naming_it_and_publishes_nothing(heldout_crops, tmp_path):
    """Was: cv2.imwrite ignores a short write of the last bytes it buffered (fclose's error goes unread),
    so under ``ulimit -f`` (or on a disk that filled) a crop cut at the limit was reported written and
    the set published with a PNG that ends half-way."""
    out = tmp_path / "crops"
    shutil.copytree(heldout_crops / "crops", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    largest = max(out.glob("*.png"), key=lambda p: p.stat().st_size)
    limit = largest.stat().st_size - 1  # every file fits but the largest crop, short of its last byte
    assert sorted(p.stat().st_size for p in out.iterdir())[-2] < limit
    done = subprocess.run([sys.executable, "-c", CROPS_UNDER_A_LIMIT, str(heldout_crops / "lmdb"), str(out),
                           str(limit)], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(errno.EFBIG), str(largest)]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier crops, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops"]


RECIPE_UNDER_A_LIMIT = """
import resource, sys
from kocr.recipe import main
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))  # ulimit -f
main(sys.argv[2:])
"""


def test_python_m_kocr_recipe_reports_a_write_past_the_size_limit_in_kocrs_one_line(heldout_crops, tmp_path):
    """Was: ``python -m kocr.recipe export-crops`` on a full disk (or under ``ulimit -f``) ended in a
    traceback where ``kocr`` commands print one line."""
    out = tmp_path / "crops"
    largest = max((heldout_crops / "crops").glob("*.png"), key=lambda p: p.stat().st_size)
    done = subprocess.run([sys.executable, "-c", RECIPE_UNDER_A_LIMIT, str(largest.stat().st_size - 1), "export-crops",
                           str(heldout_crops / "lmdb"), "--out", str(out)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"python -m kocr.recipe export-crops: error: a file grew past the size limit (ulimit -f, or the "
        f"filesystem's) writing {out / largest.name}; raise the limit or write elsewhere and run the same command again")
    assert "Traceback" not in done.stderr


def test_generated_sets_draw_their_worst_crops_and_real_sets_every_crop(heldout_crops, hangul_checkpoint, tmp_path):
    labels = str(heldout_crops / "crops/labels.tsv")
    evaluate_sets(str(hangul_checkpoint), {"heldout": labels, "heldout_signs": labels, "street": labels},
                  baselines=(), out=tmp_path / "eval", worst=2)
    drawn = {name: len(list((tmp_path / "eval" / name).glob("worst_*.png"))) for name in ("heldout", "heldout_signs",
                                                                                         "street")}
    assert drawn == {"heldout": 2, "heldout_signs": 2, "street": 8}


def test_python_m_kocr_recipe_prints_kocrs_warnings_as_kocr_does(monkeypatch, capsys):
    """Was: "…/kocr/recipe.py:531: KocrWarning: font patterns … match no file …" and the source line under
    it, where kocr commands print one line (kocr.warnings_as_lines, which both now use)."""
    import kocr.recipe

    def check_size(args=None):  # a recipe step that meets a font pattern matching nothing
        find_fonts(["NanumGothic.ttf", "NoSuchFace.ttf"])

    monkeypatch.setattr(kocr.recipe, "cmd_check_size", check_size)
    shown = warnings.showwarning
    kocr.recipe.main(["check-size"])
    assert capsys.readouterr().err.splitlines() == [
        "python -m kocr.recipe check-size: warning: font patterns ['NoSuchFace.ttf'] match no file in "
        "['/usr/share/fonts']"]
    assert warnings.showwarning is shown  # outside the command, warnings show as before


def test_an_unknown_top_level_key_of_the_recipe_params_is_refused_naming_the_file_the_key_and_its_close_match(
        tmp_path, monkeypatch, capsys):
    """Was: `recipes:` for `recipe:` ignored by the helpers run by hand (the GPU instalment's evaluate and card),
    so evaluate ran with no baselines, reference or real sets and said nothing."""
    from kocr.recipe import load_recipe_params, main

    for name in SIZES:  # the committed sizes pass, as does a synth_lines_* section of one's own
        monkeypatch.setenv("KOCR_PARAMS", str(RECIPE / name))
        assert "recipe" in load_recipe_params()
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((RECIPE / "params-cpu.yaml").read_text(encoding="utf-8"))
    params["recipes"] = params.pop("recipe")
    params["synth_lines_heldout_mine"] = {"count": 5}
    Path("p.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    monkeypatch.setenv("KOCR_PARAMS", "p.yaml")
    for name in ("model.pt", "train.json", "eval.json", "h.tsv"):
        Path(name).write_text("{}", encoding="utf-8")
    for argv in (["evaluate", "--model", "model.pt", "--heldout", "h.tsv", "--out", "o", "--metrics", "m.json"],
                 ["card", "--model", "model.pt", "--train-metrics", "train.json", "--eval-metrics", "eval.json",
                  "--data", "data", "--out", "release", "--command", "…"],
                 ["check-size"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.splitlines()
        assert exit_.value.code == 2 and len(err) == 1, err
        assert err[0].startswith(f"python -m kocr.recipe {argv[0]}: error: p.yaml: top level: unknown keys ['recipes'] "
                                 "(known: model, recipe, size, synth_lines, "), err
        assert err[0].endswith("; 'recipes': did you mean 'recipe'?"), err
    assert not any(Path(p).exists() for p in ("o", "m.json", "release"))


def test_recipe_settings_with_a_typo_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from evaluation.reader import DetectorSettings
    from kocr.params import ParamsError
    from kocr.recipe import main

    with pytest.raises(ParamsError, match=r"recipe.detector: unknown keys \['add_margn'\]"):
        DetectorSettings.from_params({"add_margn": 0.3}, "recipe.detector")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("recipe:\n  baseline: [tesseract]\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--model", "ko_base", "--heldout", "h.tsv", "--out", "o", "--metrics", "m.json"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "python -m kocr.recipe evaluate: error: params.yaml: recipe: unknown keys ['baseline'] "
        "(known: baselines, detector, real_pages, real_sets, reference)"]
    assert not (tmp_path / "m.json").exists()


def test_python_m_kocr_recipe_ends_a_user_error_with_exit_2_as_kocr_does(tmp_path):
    """Was: exit 1 (a SystemExit with the line) where ``kocr`` commands, ``ship`` and ``check-size`` exit 2."""
    (tmp_path / "params.yaml").write_text("recipe:\n  baselines: tesseract\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "KOCR_PARAMS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-m", "kocr.recipe", "evaluate", "--model", "ko_base", "--heldout", "h.tsv",
                           "--out", "o", "--metrics", "m.json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert (done.returncode, done.stderr.splitlines()) == (2, [
        "python -m kocr.recipe evaluate: error: params.yaml: recipe.baselines 'tesseract': expected a list of engine "
        "names, e.g. [tesseract]"])


def test_evaluate_says_what_it_leaves_out_under_the_helpers_prefix(tmp_path, monkeypatch, capsys):
    """Was: "recipe evaluate: tesseract (kor+eng) not installed; …" (and "recipe evaluate: … skipped"), where
    the helper's other lines begin "python -m kocr.recipe evaluate:"; the missing engine is now a KocrWarning."""
    import evaluation.tesseract
    from kocr import KocrWarning, warnings_as_lines

    monkeypatch.setattr(evaluation.tesseract, "tesseract_available", lambda: False)
    with pytest.warns(KocrWarning, match=r"^tesseract \(kor\+eng\) not installed; its rows are left out$"):
        result = evaluate_sets("x.pt", {}, baselines=("tesseract",))
    assert result["models"] == {"recipe": "x.pt"}
    with warnings_as_lines("python -m kocr.recipe evaluate"), warnings.catch_warnings():
        warnings.simplefilter("always")
        evaluate_sets("x.pt", {"gone": str(tmp_path / "no.tsv")}, baselines=("tesseract",),
                      pages={"page": str(tmp_path / "no.png")})
    assert capsys.readouterr().err.splitlines() == [
        "python -m kocr.recipe evaluate: warning: tesseract (kor+eng) not installed; its rows are left out",
        f"python -m kocr.recipe evaluate: note: {tmp_path / 'no.tsv'} not found; set 'gone' skipped",
        f"python -m kocr.recipe evaluate: note: {tmp_path / 'no.png'} not found; page 'page' skipped"]


def test_evaluate_and_card_score_every_set_skip_missing_ones_and_ship_the_model(
        heldout_crops, hangul_checkpoint, tmp_path, monkeypatch, capsys):
    labels = heldout_crops / "crops/labels.tsv"
    result = evaluate_sets(str(hangul_checkpoint), {"heldout": str(labels), "gone": str(tmp_path / "no.tsv")},
                           reference="ko_base", baselines=(), out=tmp_path / "eval")
    assert result["skipped"] == {"gone": f"{tmp_path / 'no.tsv'} not found"}
    assert "set 'gone' skipped" in capsys.readouterr().err
    entry = result["sets"]["heldout"]
    from evaluation.score_crops import read_labels
    from kocr.recipe import set_identity
    assert (entry["n"], entry["sha256"]) == tuple(set_identity(labels, read_labels(labels)).values())  # what was scored
    readings = (tmp_path / "eval/heldout/readings.tsv").read_text(encoding="utf-8").splitlines()[1:]
    gts, recipe, reference = zip(*(r.split("\t")[1:4] for r in readings))
    assert entry["recipe"] == recognition_scores(list(gts), list(recipe))
    assert entry["reference"] == recognition_scores(list(gts), list(reference))
    assert sum(f["recipe"]["n"] for f in entry["by_font"].values()) == 8
    # crop by crop against the start: words only the recipe model reads right, and the reverse
    fixed = sum(r == g != f for g, r, f in zip(gts, recipe, reference))
    broken = sum(f == g != r for g, r, f in zip(gts, recipe, reference))
    assert (entry["vs_reference"]["fixed"], entry["vs_reference"]["broken"]) == (fixed, broken)
    assert broken > 0  # the tiny test model misreads words the shipped base reads
    by_font = entry["vs_reference"]["by_font"]
    assert set(by_font) == set(entry["by_font"]) and sum(p["fixed"] for p in by_font.values()) == fixed
    assert sum(p["broken"] for p in by_font.values()) == broken
    found = jamo_confusions(list(zip(gts, recipe)), 5)   # the recipe model's readings, not the reference's
    assert entry["jamo"]["positions"] == found["positions"]
    assert [tuple(t.values()) for t in entry["jamo"]["top"]] == found["top"]
    # the card spells out where in the syllable the model goes wrong (a lost final as "(none)")
    entry["jamo"] = {"positions": {"initial": 1, "medial": 0, "final": 3},
                     "top": [{"position": "final", "gt": "ㄹ", "read": "ㄱ", "count": 2},
                             {"position": "final", "gt": "ㅁ", "read": "-", "count": 1}]}

    params = yaml.safe_load((RECIPE / "params-cpu.yaml").read_text(encoding="utf-8"))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    monkeypatch.setenv("KOCR_PARAMS", str(tmp_path / "p.yaml"))
    (tmp_path / "train.json").write_text(json.dumps({"steps": 4, "best_val_cer": 0.5, "best_step": 4,
                                                      "train_seconds": 60.0, "validation_seconds": 6.0,
                                                      "base": "ko_base", "base_sha256": "0123456789abcdef",
                                                      "averaged_with_base": 0.5, "averaged_val_cer": 0.25,
                                                      "averaged_val_word_accuracy": 0.75}))
    (tmp_path / "eval.json").write_text(json.dumps(result))
    data = tmp_path / "data"
    data.mkdir()
    shutil.copytree(heldout_crops / "lmdb", data / "heldout")
    card = write_card(hangul_checkpoint, tmp_path / "train.json", tmp_path / "eval.json", data,
                      tmp_path / "ship", "ko_base", "dvc repro recipes/ko-base/dvc.yaml")
    text = card.read_text(encoding="utf-8")
    assert (tmp_path / "ship/ko_base.pt").read_bytes() == hangul_checkpoint.read_bytes()
    assert json.loads((tmp_path / "ship/metrics.json").read_text()) == result
    assert "Reduced CPU size" in text and "dvc repro recipes/ko-base/dvc.yaml" in text
    # the command alone trains the next instalment at a later commit: the card names the one it ran at
    from kocr.tracking import git_commit
    commit = git_commit()
    # (this checkout's own uncommitted edits are named instead of the checkout: the test below checks which)
    assert ((f"At commit `{commit}` (`git checkout {commit[:12]}` first" in text
             or f"At commit `{commit}` plus uncommitted changes to " in text) if commit else "At commit" not in text)
    assert f"(sha256 `{hashlib.sha256(hangul_checkpoint.read_bytes()).hexdigest()}`)" in text  # of the file shipped
    assert f"| ko_base (this) | 8 | {entry['recipe']['cer']:.4f} | {entry['recipe']['word_accuracy']:.4f}" in text
    assert "**gone**: skipped" in text and "held-out: 8 images" in text and "train 1.1 min" in text
    # the CPU size continues the shipped base: the card names that start by its hash and says where its card is
    assert "started from `ko_base` (sha256 0123456789abcdef…)" in text
    assert "This is a continuation" in text and "git history" in text
    # a run that ships the mean of the result and its start (train.average_with_base): the card says so
    assert ("0.5 x it + 0.5 x its start `ko_base` (`train.average_with_base`), which reads the val set at "
            "CER 0.2500, word accuracy 0.7500") in text
    assert ("by the jamo that differs: initial 1, medial 0, final 3; most frequent: final ㄹ→ㄱ (2), "
            "final ㅁ→(none) (1).") in text
    vs = entry["vs_reference"]
    assert (f"Against the reference (ko_base), words read right only by this model / only by the reference: "
            f"{vs['fixed']} fixed, {vs['broken']} broken (sign test p = {vs['p']:.2g}); UnBatang.ttf:") in text


def test_card_of_a_gpu_instalment_counts_the_sets_it_did_not_see_and_names_the_gpu(
        heldout_crops, hangul_checkpoint, tmp_path, monkeypatch):
    """The kit trains on a GPU machine whose rendered sets stay there: training's record counts them."""
    params = yaml.safe_load((RECIPE / "params-gpu-instalment.yaml").read_text(encoding="utf-8"))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    monkeypatch.setenv("KOCR_PARAMS", str(tmp_path / "p.yaml"))
    (tmp_path / "train.json").write_text(json.dumps({
        "steps": 5100, "best_val_cer": 0.01, "best_step": 5100, "train_seconds": 330.0, "validation_seconds": 9.0,
        "train_samples": 332345, "val_n": 5000, "base": "ko_base", "device": "cuda: NVIDIA H200",
        "train_mix": [{"path": "recipes/ko-base/data/train", "samples": 312345, "share": 0.7},
                      {"path": "data/hand/train", "samples": 20000, "share": 0.3}]}))  # real crops mixed in
    (tmp_path / "eval.json").write_text(json.dumps({"models": {"recipe": "model.pt"}, "sets": {},
                                                    "model_sha256": _sha256(hangul_checkpoint)}))
    data = tmp_path / "data"
    shutil.copytree(heldout_crops / "lmdb", data / "heldout")
    shutil.copytree(heldout_crops / "lmdb", data / "heldout_latin")
    shutil.copytree(heldout_crops / "lmdb", data / "heldout_signs")
    shutil.copytree(heldout_crops / "lmdb", data / "train")  # an earlier CPU run's set, left in this checkout
    text = write_card(hangul_checkpoint, tmp_path / "train.json", tmp_path / "eval.json", data, tmp_path / "ship",
                      "ko_base", "bench/recipe_gpu_time.py --keep …").read_text(encoding="utf-8")
    assert "- held-out Latin: 8 images in the unseen faces, every word in Latin script" in text
    assert "- held-out signs: 8 images in sign and menu display faces never trained on: BMDOHYEON_ttf.ttf" in text
    assert "synth_lines_heldout_latin:" in text and "synth_lines_heldout_signs:" in text  # their params too
    assert "Reduced CPU size" not in text and "**GPU instalment.**" in text
    assert "continues the shipped base for 5100 steps x 256 on 312,345 synthetic training images" in text
    assert "- train: 312,345 images" in text and "- val: 5,000 images" in text and "- held-out: 8 images" in text
    assert "Trained on cuda: NVIDIA H200." in text and "size: gpu-instalment" in text
    assert "- mixed into training (`train.mix`): `data/hand/train`, 20,000 samples, 30% of each epoch" in text
    assert "with the other sets listed under Data mixed in (`train.mix`)" in text


def test_card_stage_command_line_of_the_recipe_writes_the_release(heldout_crops, hangul_checkpoint, tmp_path,
                                                                   monkeypatch, capsys):
    """The card stage's own command line (dvc.yaml, vars filled in) run through ``main``: its ``--command``
    option overwrote the subcommand's name, so the stage always failed with a KeyError."""
    import shlex

    from kocr.recipe import main

    recipe = tmp_path / "recipe"
    cmd = yaml.safe_load((RECIPE / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["card"]["cmd"]
    env, *argv = shlex.split(cmd.replace("${recipe_dir}", str(recipe)).replace("${params_file}", "params-cpu.yaml"))
    assert env == f"KOCR_PARAMS={recipe}/params-cpu.yaml" and argv[:4] == ["python", "-m", "kocr.recipe", "card"]
    shutil.copytree(heldout_crops / "lmdb", recipe / "data/heldout")
    shutil.copyfile(RECIPE / "params-cpu.yaml", recipe / "params-cpu.yaml")
    monkeypatch.setenv("KOCR_PARAMS", str(recipe / "params-cpu.yaml"))
    (recipe / "model").mkdir()
    shutil.copyfile(hangul_checkpoint, recipe / "model/model.pt")
    (recipe / "metrics").mkdir()
    (recipe / "metrics/train.json").write_text(json.dumps({"steps": 4, "best_val_cer": 0.5, "best_step": 4}))
    (recipe / "metrics/evaluate.json").write_text(json.dumps({"models": {"recipe": "model.pt"}, "sets": {},
                                                              "model_sha256": _sha256(hangul_checkpoint)}))
    main(argv[3:])
    assert f"card: {recipe / 'release/MODEL_CARD.md'}" in capsys.readouterr().out
    card = (recipe / "release/MODEL_CARD.md").read_text(encoding="utf-8")
    assert f"dvc repro {recipe}/dvc.yaml   # with params_file: params-cpu.yaml in the vars of {recipe}/dvc.yaml" in card
    assert (recipe / "release/ko_base.pt").read_bytes() == hangul_checkpoint.read_bytes()
    assert (recipe / "release/metrics.json").is_file()


def test_card_and_ship_refuse_a_checkpoint_of_20_mb_or_more(hangul_checkpoint, tmp_path, monkeypatch, capsys):
    """A valid checkpoint with a large tensor in its meta: loadable, but not under 20 MB."""
    import torch

    from kocr.recipe import main

    payload = torch.load(hangul_checkpoint, map_location="cpu", weights_only=True)
    payload["meta"] = {"padding": torch.zeros(1_000_000)}  # 4 MB more: 20,0xx,xxx bytes
    big = tmp_path / "big.pt"
    torch.save(payload, big)
    size = big.stat().st_size
    assert 20_000_000 <= size < 20 * 1024 * 1024  # over 20 MB, under 20 MiB
    monkeypatch.setenv("KOCR_PARAMS", str(RECIPE / "params-cpu.yaml"))
    (tmp_path / "train.json").write_text("{}")
    (tmp_path / "eval.json").write_text(json.dumps({"models": {"recipe": "big.pt"}, "sets": {}}))
    with pytest.raises(SystemExit) as exit_:
        main(["card", "--model", str(big), "--train-metrics", str(tmp_path / "train.json"), "--eval-metrics",
              str(tmp_path / "eval.json"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "release"),
              "--command", "dvc repro"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m kocr.recipe card: error: {big}: {size:,} bytes ({size / 1e6:.1f} MB); a shipped base must be "
        "under 20 MB (20,000,000 bytes): save the model alone (no optimiser state or extra tensors in its meta), "
        "or a smaller architecture")
    assert not (tmp_path / "release").exists()
    release = _release(tmp_path / "rel", big, tmp_path / "labels.tsv", "# big\n")
    for args in ([], ["--check"], ["--force"]):  # nothing to replace yet: it would be shipped as it is
        with pytest.raises(SystemExit) as exit_:
            main(["ship", *args, "--release", str(release), "--to", str(tmp_path / "base")])
        assert exit_.value.code == 2 and f"ship: {release / 'ko_base.pt'}: {size:,} bytes" in capsys.readouterr().err
    assert not (tmp_path / "base").exists()


def test_card_lists_the_faces_a_heldout_set_holds_and_flags_one_its_params_name_but_it_lacks():
    """Was: a held-out set drawn without UnPilgi (not installed; synth-lines only warns) shown on the card as
    in UnBatang and UnPilgi, the faces of the params file, not those drawn."""
    params = {"size": "cpu", "synth_lines": {"fonts": ["NanumGothic.ttf"]},
              "synth_lines_heldout": {"fonts": ["UnBatang.ttf", "UnPilgi.ttf"]},
              "synth_lines_heldout_signs": {"fonts": ["BM*.ttf"]}}
    s = {"n": 4, "cer": 0.0, "word_accuracy": 1.0, "norm_ed": 0.0}
    sets = {"heldout": {"labels": "h.tsv", "n": 4, "recipe": s, "by_font": {"UnBatang.ttf": {"recipe": s}}},
            "heldout_signs": {"labels": "s.tsv", "n": 4, "recipe": s,
                              "by_font": {"BMJUA_ttf.ttf": {"recipe": s}, "BMHANNAPro.ttf": {"recipe": s}}}}
    text = model_card(params, {"steps": 1}, {"models": {"recipe": "m.pt"}, "sets": sets},
                      {"heldout": 4, "heldout_signs": 4}, "…", {}, 1.0, "ko_base")
    assert ("- held-out: 4 images in faces never trained on: UnBatang.ttf (**not in the set: UnPilgi.ttf**, named "
            "in `synth_lines_heldout.fonts` but not installed where the set was drawn; no score here is of it)") in text
    assert "**Not in this set: UnPilgi.ttf** (named in `synth_lines_heldout.fonts`" in text
    # a pattern matched by the faces drawn is no absence; the faces are those of the set, sorted
    assert "- held-out signs: 4 images in sign and menu display faces never trained on: BMHANNAPro.ttf, BMJUA_ttf.ttf\n" in text
    assert text.count("not in the set") == 1 and text.count("Not in this set") == 1


def test_card_names_synth_lines_fonts_for_an_absent_face_when_the_heldout_section_names_no_fonts():
    """A held-out section without ``fonts`` is drawn in synth_lines' (``kocr synth-lines --section`` starts from
    its keys): a face of that list missing from the set was said to be named in `synth_lines_heldout.fonts`,
    a key the params file does not have."""
    params = {"size": "cpu", "synth_lines": {"fonts": ["UnBatang.ttf", "UnPilgi.ttf"]},
              "synth_lines_heldout": {"count": 4}}
    s = {"n": 4, "cer": 0.0, "word_accuracy": 1.0, "norm_ed": 0.0}
    sets = {"heldout": {"labels": "h.tsv", "n": 4, "recipe": s, "by_font": {"UnBatang.ttf": {"recipe": s}}}}
    text = model_card(params, {"steps": 1}, {"models": {"recipe": "m.pt"}, "sets": sets},
                      {"heldout": 4}, "…", {}, 1.0, "ko_base")
    assert "**not in the set: UnPilgi.ttf**, named in `synth_lines.fonts` but not installed" in text
    assert "**Not in this set: UnPilgi.ttf** (named in `synth_lines.fonts`" in text
    assert "synth_lines_heldout.fonts" not in text


def test_synth_lines_warns_of_a_face_not_installed_naming_the_params_file_and_key(tmp_path, monkeypatch, capsys):
    """Was: "font patterns ['NoSuchFace.ttf'] match no file …", which named neither the params file nor the
    section whose fonts it came from, while the held-out set was drawn without that face."""
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    Path("p.yaml").write_text("synth_lines: {fonts: [NanumGothic.ttf], contact_sheet: 0, workers: 1}\n"
                              "synth_lines_heldout: {fonts: [UnBatang.ttf, NoSuchFace.ttf]}\n", encoding="utf-8")
    monkeypatch.setenv("KOCR_PARAMS", "p.yaml")
    assert main(["synth-lines", "--section", "synth_lines_heldout", "--out", "set", "--count", "2"]) == 0
    lines = [line.strip() for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "warning" in line]
    assert lines == ["kocr synth-lines: warning: p.yaml: synth_lines_heldout.fonts: font patterns ['NoSuchFace.ttf'] "
                     "match no file in ['/usr/share/fonts']; the set is drawn without them (its manifest.tsv lists the "
                     "faces drawn)"]


def test_card_says_when_the_tree_is_not_its_commit_and_counts_the_heldout_sets_as_scored(
        heldout_crops, hangul_checkpoint, tmp_path, monkeypatch):
    """The card named the commit as reproducing the run when the params or code had uncommitted changes,
    and counted the held-out sets rendered here at card time instead of those scored."""
    repo = tmp_path / "repo"
    (repo / "recipes/ko-base").mkdir(parents=True)
    shutil.copyfile(RECIPE / "params-cpu.yaml", repo / "recipes/ko-base/params-cpu.yaml")
    (repo / "recipes/ko-base/dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    (repo / "kocr").mkdir()
    (repo / "kocr/recipe.py").write_text("# the code\n", encoding="utf-8")
    (repo / "notes.txt").write_text("not read by the recipe\n", encoding="utf-8")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "the recipe")
    commit = git("rev-parse", "HEAD")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("KOCR_PARAMS", "recipes/ko-base/params-cpu.yaml")
    (tmp_path / "train.json").write_text(json.dumps({"steps": 4}))
    # scored on 1,000 held-out crops and 300 Latin ones (an older record: the reader's n); 8 are rendered here now
    (tmp_path / "eval.json").write_text(json.dumps({
        "models": {}, "model_sha256": _sha256(hangul_checkpoint),
        "sets": {"heldout": {"labels": "h.tsv", "n": 1000}, "heldout_latin": {"labels": "l.tsv", "recipe": {"n": 300}}}}))
    shutil.copytree(heldout_crops / "lmdb", tmp_path / "data/heldout")

    def card() -> str:
        return write_card(hangul_checkpoint, tmp_path / "train.json", tmp_path / "eval.json", tmp_path / "data",
                          tmp_path / "release", "ko_base", "dvc repro").read_text(encoding="utf-8")

    text = card()
    assert "- held-out: 1,000 images" in text and "- held-out Latin: 300 images" in text
    assert f"At commit `{commit}` (`git checkout {commit[:12]}` first" in text and "uncommitted" not in text
    (repo / "notes.txt").write_text("edited\n", encoding="utf-8")  # nothing the recipe reads
    assert f"At commit `{commit}` (`git checkout {commit[:12]}` first" in card()
    with (repo / "recipes/ko-base/params-cpu.yaml").open("a", encoding="utf-8") as fh:
        fh.write("# edited after the commit\n")
    (repo / "kocr/new.py").write_text("x = 1\n", encoding="utf-8")
    text = card()
    assert (f"At commit `{commit}` plus uncommitted changes to `kocr/new.py`, `recipes/ko-base/params-cpu.yaml`: "
            "that commit alone does not reproduce this checkpoint") in text
    assert "git checkout" not in text


@pytest.mark.skipif(not (SHIPPED / "ko_base.pt").is_file(), reason="models/base/ko_base.pt not built here")
def test_shipped_ko_base_loads_by_name_with_the_korean_charset_and_its_card():
    from kocr.recipe import MAX_CHECKPOINT_BYTES

    assert REPO / SHIPPED_MODELS["ko_base"] == SHIPPED / "ko_base.pt"
    assert (SHIPPED / "ko_base.pt").stat().st_size < MAX_CHECKPOINT_BYTES == 20_000_000  # "under 20 MB"
    loaded = load_recognizer("ko_base")
    assert loaded.charset.chars == Charset.named("korean_g2").chars and loaded.charset.name == "korean_g2"
    card = (SHIPPED / "MODEL_CARD.md").read_text(encoding="utf-8")
    metrics = json.loads((SHIPPED / "metrics.json").read_text(encoding="utf-8"))
    heldout = metrics["sets"]["heldout"]["recipe"]
    assert f"| ko_base (this) | {heldout['n']} | {heldout['cer']:.4f} |" in card
    assert "## Reproduce" in card and "dvc repro recipes/ko-base/dvc.yaml" in card


def test_shipped_ko_base_scores_on_real_crops_what_its_card_says():
    """The real crops are read now exactly as the recipe's evaluate stage read them."""
    if not (SHIPPED / "ko_base.pt").is_file():
        pytest.skip("models/base/ko_base.pt not built here")
    labels = realdata("paddleocr", "words.tsv")
    metrics = json.loads((SHIPPED / "metrics.json").read_text(encoding="utf-8"))
    now = evaluate_sets("ko_base", {"paddleocr": str(labels)}, baselines=())
    assert now["sets"]["paddleocr"]["recipe"] == metrics["sets"]["paddleocr"]["recipe"]


def test_synth_lines_section_overrides_the_synth_lines_keys(tmp_path, monkeypatch, capsys):
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        "synth_lines:\n  count: 50\n  seed: 0\n  fonts: [NanumGothic.ttf]\n  contact_sheet: 0\n  workers: 1\n"
        "held:\n  count: 4\n  fonts: [UnPilgi.ttf]\n", encoding="utf-8")
    assert main(["synth-lines", "--section", "held", "--out", "held"]) == 0
    manifest = (tmp_path / "held/manifest.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(LmdbDataset(tmp_path / "held")) == 4 and {r.split("\t")[1] for r in manifest} == {"UnPilgi.ttf"}
    capsys.readouterr()
    assert main(["synth-lines", "--section", "nope", "--out", "x"]) == 2
    assert capsys.readouterr().err.strip() == "kocr synth-lines: error: params.yaml: no section 'nope' (--section)"


def test_ko_base_name_without_the_file_says_how_to_make_it(tmp_path, monkeypatch):
    from training import checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(checkpoint.SHIPPED_MODELS, "ko_base", Path("models/base/absent.pt"))
    with pytest.raises(checkpoint.ModelSpecError, match=r"ko_base: models/base/absent.pt not found .*recipes/ko-base"):
        load_recognizer("ko_base")


def _paired(fixed: int, broken: int, **by_font: tuple[int, int]) -> dict:
    """A ``vs_reference`` entry with the real sign test's p, as evaluate_sets writes it."""
    entry = {"fixed": fixed, "broken": broken, "p": sign_test_p(fixed, broken)}
    if by_font:
        entry["by_font"] = {font: _paired(*split) for font, split in by_font.items()}
    return entry


@pytest.mark.parametrize("sets, ship, reason", [
    ({"heldout": _paired(30, 12)}, True, None),
    ({"heldout": _paired(12, 12)}, False, "all sets together: 12 fixed, 12 broken"),
    # more fixed overall, but one face of the held-out set is significantly worse
    ({"heldout": _paired(30, 20, UnBatang=(28, 4), UnPilgi=(2, 16))}, False, "heldout/UnPilgi: significantly worse"),
    # a small real set slightly worse is not significant: the pooled count decides
    ({"heldout": _paired(20, 10), "paddleocr": _paired(0, 3)}, True, None),
    ({"heldout": _paired(9, 10), "paddleocr": _paired(3, 0)}, True, None),
    ({"heldout": _paired(30, 12), "greengarnets": None}, False, "greengarnets: not compared"),
    ({}, False, "no set was compared"),
])
def test_the_ship_gate_wants_more_words_fixed_and_no_set_or_face_significantly_worse(sets, ship, reason):
    verdict = judge({"sets": {name: ({"vs_reference": p} if p else {}) for name, p in sets.items()}})
    assert verdict.ship is ship
    assert (reason is None and verdict.reasons == []) or any(reason in r for r in verdict.reasons), verdict.reasons
    compared = [p for p in sets.values() if p]
    assert verdict.fixed == sum(p["fixed"] for p in compared) and verdict.broken == sum(p["broken"] for p in compared)


def _release(folder: Path, checkpoint: Path, labels: Path, card: str) -> Path:
    folder.mkdir(parents=True)
    shutil.copyfile(checkpoint, folder / "ko_base.pt")
    (folder / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    _metrics(folder, {"sets": {"heldout": {"labels": str(labels)}}})
    return folder


def _metrics(folder: Path, metrics: dict) -> None:
    """A release's metrics.json, and a card naming its checkpoint, as the evaluate and card stages write them."""
    sha256 = hashlib.sha256((folder / "ko_base.pt").read_bytes()).hexdigest()
    (folder / "metrics.json").write_text(json.dumps({**metrics, "model_sha256": sha256}), encoding="utf-8")
    card = (folder / "MODEL_CARD.md").read_text(encoding="utf-8").split("checkpoint sha256 `")[0]
    (folder / "MODEL_CARD.md").write_text(f"{card}checkpoint sha256 `{sha256}`\n", encoding="utf-8")


@pytest.mark.skipif(not (SHIPPED / "ko_base.pt").is_file(), reason="models/base/ko_base.pt not built here")
def test_ship_gate_compares_on_the_base_sets_too_and_refuses_what_a_release_skipped(
        heldout_crops, hangul_checkpoint, tmp_path):
    labels = heldout_crops / "crops/labels.tsv"
    base = _release(tmp_path / "base", hangul_checkpoint, labels, "# base\n")
    # the shipped base was judged on a real set too; the release was evaluated without it mounted
    (base / "metrics.json").write_text(json.dumps({"sets": {"heldout": {"labels": str(labels)},
                                                            "real": {"labels": str(labels)}}}), encoding="utf-8")
    good = _release(tmp_path / "good", SHIPPED / "ko_base.pt", labels, "# good\n")
    metrics = {"sets": {"heldout": {"labels": str(labels)}}, "skipped": {"real": "../shared/real.tsv not found"}}
    _metrics(good, metrics)
    result = ship_release(good, base, check=True)
    assert result["ship"] and {line.split(":")[0] for line in result["sets"] if not line.startswith(" ")} >= {
        "heldout", "real"}
    # a set the release skipped that nothing names a file for: the gate cannot judge it, so it refuses
    metrics["skipped"]["street"] = "../shared/street.tsv not found"
    _metrics(good, metrics)
    result = ship_release(good, base, check=True)
    assert not result["ship"] and result["reasons"] == [
        "street: skipped when the release was evaluated (../shared/street.tsv not found); "
        "evaluate it again with the file there"]


@pytest.mark.skipif(not (SHIPPED / "ko_base.pt").is_file(), reason="models/base/ko_base.pt not built here")
def test_ship_replaces_the_base_only_by_a_release_that_reads_its_sets_better(
        heldout_crops, hangul_checkpoint, tmp_path, monkeypatch, capsys):
    from kocr.recipe import main

    labels = heldout_crops / "crops/labels.tsv"
    good = _release(tmp_path / "good", SHIPPED / "ko_base.pt", labels, "# good card\n")
    bad = _release(tmp_path / "bad", hangul_checkpoint, labels, "# bad card\n")
    base = tmp_path / "base"
    # no base yet: the first release is shipped as it is
    assert ship_release(bad, base)["shipped"] and (base / "ko_base.pt").read_bytes() == hangul_checkpoint.read_bytes()
    # the shipped base reads the held-out words the untrained one misreads: it replaces it
    result = ship_release(good, base)
    assert result["shipped"] and result["fixed"] > result["broken"] == 0
    assert result["base_sha256"] == file_digest(hangul_checkpoint)
    assert (base / "ko_base.pt").read_bytes() == (SHIPPED / "ko_base.pt").read_bytes()
    card = (base / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert card.startswith("# good card\n") and f"replacing the base with sha256 {file_digest(hangul_checkpoint)}" in card
    assert f"all sets together {result['fixed']} fixed, 0 broken" in card and "- heldout/UnPilgi.ttf:" in card
    assert json.loads((base / "metrics.json").read_text()) == json.loads((good / "metrics.json").read_text())
    assert not list(base.glob(".*shipping"))
    # the untrained release is refused by the CLI, and the base is left as it was
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    main(["ship", "--check", "--release", str(bad), "--to", str(base), "--json", str(tmp_path / "m/ship.json")])
    out, err = capsys.readouterr()
    assert json.loads(out) == json.loads((tmp_path / "m/ship.json").read_text()) and "the gate would refuse" in err
    assert json.loads(out)["ship"] is False and json.loads(out)["broken"] == result["fixed"]
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    with pytest.raises(SystemExit) as exit_:
        main(["ship", "--release", str(bad), "--to", str(base)])
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["shipped"] is False and "ship: refused" in err
    # refused for fixing nothing; with six or more words broken (of the eight) also as significantly worse
    assert f"all sets together: 0 fixed, {result['fixed']} broken" in err
    assert ("heldout: significantly worse" in err) == (sign_test_p(0, result["fixed"]) < 0.05)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    # a release that is already the base changes nothing
    assert ship_release(good, base) == {"ship": True, "shipped": False, "reasons": [],
                                        "note": f"{base / 'ko_base.pt'} is already this release"}
    # a disk that fills while copying: nothing shipped, nothing half-written
    real_copy = shutil.copyfile

    def copy_then_fill(src, dst):
        if str(dst).endswith("MODEL_CARD.md.shipping"):
            raise OSError(28, "No space left on device")
        return real_copy(src, dst)

    monkeypatch.setattr(shutil, "copyfile", copy_then_fill)
    with pytest.raises(ShipError, match="MODEL_CARD.md: could not write .No space left on device.; the shipped base"):
        ship_release(bad, base, force=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    # --force ships a refused release and its card says the gate refused it
    forced = ship_release(bad, base, force=True)
    assert forced["shipped"] and not forced["ship"]
    assert f"Shipped with --force although the gate refused it:** {forced['reasons'][0]}" in (
        base / "MODEL_CARD.md").read_text(encoding="utf-8")
    # a metrics file that is not the recipe's evaluation is named, not a traceback
    for broken_metrics, problem in (("{\"sets\": ", "not valid JSON"), ("[1, 2]", "not the recipe's evaluation"),
                                    ('{"sets": {"heldout": {"cer": 0.1}}}', "not the recipe's evaluation")):
        (bad / "metrics.json").write_text(broken_metrics, encoding="utf-8")
        with pytest.raises(ShipError, match=f"{bad / 'metrics.json'}: {problem}"):
            ship_release(bad, base)
    # a release whose sets are not here cannot be compared, and the CLI says which
    shutil.copyfile(SHIPPED / "ko_base.pt", bad / "ko_base.pt")
    _metrics(bad, {"sets": {"heldout": {"labels": str(tmp_path / "gone.tsv")}}})
    with pytest.raises(SystemExit) as exit_:
        main(["ship", "--release", str(bad), "--to", str(base)])
    assert exit_.value.code == 2
    assert f"labels not found: heldout ({tmp_path / 'gone.tsv'})" in capsys.readouterr().err
    # a set or a checkpoint that cannot be read is named with exit 2 (--check too), not a traceback
    (tmp_path / "bad.tsv").write_text("file\tlabel\n", encoding="utf-8")
    _metrics(bad, {"sets": {"heldout": {"labels": str(tmp_path / "bad.tsv")}}})
    for args, problem in ((["--check"], "bad.tsv:1: header"), ([], "bad.tsv:1: header")):
        with pytest.raises(SystemExit) as exit_:
            main(["ship", *args, "--release", str(bad), "--to", str(base)])
        assert exit_.value.code == 2 and "cannot compare the release with the shipped base" in capsys.readouterr().err
    (bad / "ko_base.pt").write_bytes(b"not a checkpoint")
    _metrics(bad, {"sets": {"heldout": {"labels": str(labels)}}})
    with pytest.raises(ShipError, match=f"{bad / 'ko_base.pt'}: not a loadable"):
        ship_release(bad, base, check=True)
    (bad / "metrics.json").write_bytes('{"sets": {"서울": {}}}'.encode("cp949"))
    with pytest.raises(ShipError, match=f"{bad / 'metrics.json'}: not UTF-8"):
        ship_release(bad, base)
    # a --json that is a folder or a --to that is a file: refused before anything is copied
    shutil.copyfile(hangul_checkpoint, bad / "ko_base.pt")
    _metrics(bad, {"sets": {"heldout": {"labels": str(labels)}}})
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    (tmp_path / "jsondir").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["ship", "--force", "--release", str(bad), "--to", str(base), "--json", str(tmp_path / "jsondir")])
    assert exit_.value.code == 2 and "a folder, expected a file name" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ShipError, match="taken: not a folder"):
        ship_release(bad, tmp_path / "taken")


@pytest.mark.skipif(not (SHIPPED / "ko_base.pt").is_file(), reason="models/base/ko_base.pt not built here")
def test_ship_gate_decides_on_the_sets_the_base_was_scored_on(heldout_crops, hangul_checkpoint, tmp_path):
    labels = heldout_crops / "crops/labels.tsv"
    digest = hashlib.sha256(labels.read_bytes())  # the labels file, then each image in the order it names them
    for row in labels.read_text(encoding="utf-8").splitlines()[1:]:
        digest.update((labels.parent / row.split("\t")[0]).read_bytes())
    identity = {"n": 8, "sha256": digest.hexdigest()}
    base = _release(tmp_path / "base", hangul_checkpoint, labels, "# base\n")
    (base / "metrics.json").write_text(json.dumps({"sets": {"heldout": {
        "labels": str(tmp_path / "base_set/labels.tsv"), "recipe": {"n": 40}}}}), encoding="utf-8")
    good = _release(tmp_path / "good", SHIPPED / "ko_base.pt", labels, "# good\n")
    _metrics(good, {"sets": {"heldout": {"labels": str(labels), **identity}}})
    # the release's eight crops under the name of the base's forty: not the same set, so not judged there
    result = ship_release(good, base, check=True)
    assert not result["ship"] and result["sets"] == []
    assert (f"heldout: the release was scored on another set than the base under this name (n: the release's 8, "
            f"the base's 40); the gate compares the two on the same sets only: evaluate the release on the base's "
            f"set ({tmp_path / 'base_set/labels.tsv'}) as well") in result["reasons"]
    # the set the two were scored on has changed on disk since (a label, then an image): not compared
    (base / "metrics.json").write_text(json.dumps({"sets": {}}), encoding="utf-8")
    changed = tmp_path / "changed"
    shutil.copytree(heldout_crops / "crops", changed)
    _metrics(good, {"sets": {"heldout": {"labels": str(changed / "labels.tsv"), **identity}}})
    rows = (changed / "labels.tsv").read_text(encoding="utf-8").splitlines()
    (changed / "labels.tsv").write_text("\n".join(rows[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(ShipError, match=r"changed since: heldout \(.*labels.tsv: n 8 when scored, 7 now; sha256"):
        ship_release(good, base, check=True)
    (changed / "labels.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (changed / "000001.png").write_bytes((changed / "000002.png").read_bytes())
    with pytest.raises(ShipError, match=r"changed since: heldout \(.*labels.tsv: sha256 [0-9a-f]{64} when scored"):
        ship_release(good, base, check=True)
    # as the evaluate stage records it
    from evaluation.score_crops import read_labels
    from kocr.recipe import set_identity

    assert set_identity(labels, read_labels(labels)) == identity


def test_ship_refuses_a_checkpoint_that_is_not_a_korean_base_like_the_shipped_one(
        heldout_crops, hangul_checkpoint, tmp_path, capsys):
    """Whatever the mode: a checkpoint with another charset, head or size, or weights that do not fit its
    config, is named in one line (exit 2), not shipped (first ships and --force too) nor a traceback."""
    import torch

    from kocr.recipe import main
    from training.checkpoint import save_checkpoint
    from training.model import Recognizer, RecognizerConfig

    labels = heldout_crops / "crops/labels.tsv"
    english = load_recognizer("english_g2")
    save_checkpoint(tmp_path / "english.pt", english.model, english.charset)
    payload = torch.load(tmp_path / "english.pt", map_location="cpu", weights_only=True)
    payload |= {"charset": Charset.named("korean_g2").chars, "charset_name": "korean_g2"}  # its 97-class head
    torch.save(payload, tmp_path / "head.pt")
    payload = torch.load(hangul_checkpoint, map_location="cpu", weights_only=True)
    payload["config"] = {**payload["config"], "hidden_size": 512}  # weights of 256
    torch.save(payload, tmp_path / "shapes.pt")
    small = RecognizerConfig(**{**payload["config"], "hidden_size": 128})
    save_checkpoint(tmp_path / "small.pt", Recognizer(small), Charset.named("korean_g2"))
    base = tmp_path / "base"
    cases = {"english.pt": "charset english_g2 (96 characters) is not the Korean base's, korean_g2 (1008 characters)",
             "head.pt": "the release cannot be loaded: ", "shapes.pt": "its weights do not fit the architecture"}
    for name, says in cases.items():
        release = _release(tmp_path / name.split(".")[0], tmp_path / name, labels, "# card\n")
        for args in ([], ["--check"], ["--force"]):
            with pytest.raises(SystemExit) as exit_:
                main(["ship", *args, "--release", str(release), "--to", str(base)])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, (name, args, err)
            assert not base.exists()
    # against a shipped base: its charset, and its architecture
    assert ship_release(_release(tmp_path / "first", hangul_checkpoint, labels, "# first\n"), base)["shipped"]
    release = _release(tmp_path / "small", tmp_path / "small.pt", labels, "# small\n")
    with pytest.raises(ShipError, match=r"small/ko_base.pt: another architecture than the shipped base's .*: hidden_size 128 "
                                        r"\(the base: 256\)"):
        ship_release(release, base, force=True)
    assert (base / "ko_base.pt").read_bytes() == hangul_checkpoint.read_bytes()


def test_card_and_ship_refuse_scores_and_cards_of_another_checkpoint(heldout_crops, hangul_checkpoint, tmp_path,
                                                                      monkeypatch):
    """A card stage stopped after the checkpoint was copied (or files of two releases put together) left a
    release whose metrics and card were another checkpoint's, and ship judged and shipped it."""
    from kocr.recipe import RecipeError

    labels = heldout_crops / "crops/labels.tsv"
    mixed = _release(tmp_path / "mixed", SHIPPED / "ko_base.pt", labels, "# the shipped base's card\n")
    shutil.copyfile(hangul_checkpoint, mixed / "ko_base.pt")  # a new checkpoint beside the earlier card and metrics
    for args in ({"check": True}, {"force": True}):
        with pytest.raises(ShipError, match=rf"metrics.json: the scores of another checkpoint \(sha256 "
                                            rf"{_sha256(SHIPPED / 'ko_base.pt')[:16]}…\) than .*mixed/ko_base.pt"):
            ship_release(mixed, tmp_path / "base", **args)
    card = (mixed / "MODEL_CARD.md").read_text(encoding="utf-8")
    _metrics(mixed, {"sets": {"heldout": {"labels": str(labels)}}})
    (mixed / "MODEL_CARD.md").write_text(card, encoding="utf-8")  # the metrics now fit, the card does not
    with pytest.raises(ShipError, match=r"MODEL_CARD.md: does not name .*ko_base.pt \(sha256 [0-9a-f]{16}…\): another"):
        ship_release(mixed, tmp_path / "base", check=True)
    (mixed / "metrics.json").write_text(json.dumps({"sets": {"heldout": {"labels": str(labels)}}}))
    with pytest.raises(ShipError, match="metrics.json: records no sha256 of the checkpoint it scored"):
        ship_release(mixed, tmp_path / "base", check=True)
    assert not (tmp_path / "base").exists()
    # the card stage refuses an evaluation of another checkpoint, before writing anything
    monkeypatch.setenv("KOCR_PARAMS", str(RECIPE / "params-cpu.yaml"))
    (tmp_path / "train.json").write_text("{}")
    for scored, says in ((_sha256(SHIPPED / "ko_base.pt"), "the scores of another checkpoint"),
                         (None, "records no sha256 of the checkpoint it scored")):
        (tmp_path / "eval.json").write_text(json.dumps({"models": {}, "sets": {}, "model_sha256": scored}))
        with pytest.raises(RecipeError, match=f"eval.json: {says}"):
            write_card(hangul_checkpoint, tmp_path / "train.json", tmp_path / "eval.json", tmp_path / "data",
                       tmp_path / "release", "ko_base", "dvc repro")
    assert not (tmp_path / "release").exists()


class _Killed(BaseException):
    """A kill -9 stand-in: no except clause of the code under test catches it."""


@pytest.mark.skipif(not (SHIPPED / "ko_base.pt").is_file(), reason="models/base/ko_base.pt not built here")
def test_a_ship_killed_midway_is_finished_by_the_next_one(heldout_crops, hangul_checkpoint, tmp_path, monkeypatch):
    labels = heldout_crops / "crops/labels.tsv"
    good = _release(tmp_path / "good", SHIPPED / "ko_base.pt", labels, "# good card\n")
    bad = _release(tmp_path / "bad", hangul_checkpoint, labels, "# bad card\n")
    base = tmp_path / "base"
    assert ship_release(bad, base)["shipped"]
    real_replace = os.replace
    moved = []

    def replace_then_die(src, dst):  # killed right after the first file is moved in
        real_replace(src, dst)
        moved.append(Path(dst).name)
        if Path(src).name.endswith(".shipping"):
            raise _Killed

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(_Killed):
        ship_release(good, base)
    monkeypatch.undo()
    assert moved[-1] != "ko_base.pt"  # the weights go last: a kill never leaves them beside the old card
    assert (base / "ko_base.pt").read_bytes() == hangul_checkpoint.read_bytes()
    # the next ship finishes the moves with the staged card (its Shipped section) and says so
    result = ship_release(good, base)
    assert result["note"] == f"{base / 'ko_base.pt'} is already this release" and "finished a ship" in result["finished"]
    assert (base / "ko_base.pt").read_bytes() == (SHIPPED / "ko_base.pt").read_bytes()
    assert (base / "metrics.json").read_bytes() == (good / "metrics.json").read_bytes()
    card = (base / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert card.startswith("# good card\n") and f"replacing the base with sha256 {file_digest(hangul_checkpoint)}" in card
    assert sorted(p.name for p in base.iterdir()) == ["MODEL_CARD.md", "ko_base.pt", "metrics.json"]
    # killed while staging (before any move): the base is whole, the next ship removes what was staged
    real_copy = shutil.copyfile

    def copy_then_die(src, dst):
        if str(dst).endswith("MODEL_CARD.md.shipping"):
            raise _Killed
        return real_copy(src, dst)

    monkeypatch.setattr(shutil, "copyfile", copy_then_die)
    with pytest.raises(_Killed):
        ship_release(bad, base, force=True)
    monkeypatch.undo()
    assert (base / ".ko_base.pt.shipping").is_file() or (base / ".metrics.json.shipping").is_file()
    assert ship_release(good, base)["note"] == f"{base / 'ko_base.pt'} is already this release"
    assert sorted(p.name for p in base.iterdir()) == ["MODEL_CARD.md", "ko_base.pt", "metrics.json"]
    # the weights of this release beside another card (a ship stopped before ships kept a journal):
    # "already this release" only when the card and metrics are too; the next ship copies them
    shutil.copyfile(bad / "MODEL_CARD.md", base / "MODEL_CARD.md")
    shutil.copyfile(bad / "metrics.json", tmp_path / "old-metrics.json")
    (base / "metrics.json").write_text(json.dumps({"sets": {}}), encoding="utf-8")
    assert not ship_release(good, base, check=True)["shipped"]
    assert (base / "MODEL_CARD.md").read_text(encoding="utf-8").startswith("# bad card\n")
    result = ship_release(good, base)
    assert result["shipped"] and "its card or metrics were not" in result["note"]
    assert (base / "metrics.json").read_bytes() == (good / "metrics.json").read_bytes()
    card = (base / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert card.startswith("# good card\n") and "the comparison with the base those weights replaced is not" in card
    # a shipped card edited by hand since (it still names its weights) is the release's: it is kept
    edited = card.replace("# good card\n", "# good card, a sentence corrected by hand\n")
    (base / "MODEL_CARD.md").write_text(edited, encoding="utf-8")
    assert ship_release(good, base)["note"] == f"{base / 'ko_base.pt'} is already this release"
    assert (base / "MODEL_CARD.md").read_text(encoding="utf-8") == edited
    # the staged files are not for git
    staging = ["models/base/.ko_base.pt.shipping", "models/base/.ko_base.journal.shipping"]
    ignored = subprocess.run(["git", "check-ignore", *staging], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == staging


@pytest.mark.skipif(not (SHIPPED / "ko_base.pt").is_file(), reason="models/base/ko_base.pt not built here")
def test_ship_gate_widens_word_boxes_by_the_margin_the_release_was_scored_with(hangul_checkpoint, tmp_path):
    from PIL import Image, ImageDraw, ImageFont

    from kocr.recipe_ship import compare_with_shipped

    face = find_fonts(["UnBatang.ttf"])[0]
    page = Image.new("L", (400, 120), 255)
    draw = ImageDraw.Draw(page)
    font = ImageFont.truetype(face.path, 48, index=face.index)
    draw.text((60, 30), "대한민국", font=font, fill=0)
    x0, y0, x1, y1 = draw.textbbox((60, 30), "대한민국", font=font)
    page.save(tmp_path / "page.png")
    cut = 0.4 * (y1 - y0)  # the box leaves out 40% of the first and last syllables' width
    word = {"points": [[x0 + cut, y0], [x1 - cut, y0], [x1 - cut, y1], [x0 + cut, y1]], "transcription": "대한민국"}
    (tmp_path / "boxes.json").write_text(json.dumps({"page.png": {"words": [word]}}, ensure_ascii=False), encoding="utf-8")
    metrics = {"sets": {"boxes": {"labels": str(tmp_path / "boxes.json")}}}
    read = {}
    for margin in (None, 0.5):  # an older release without the record: EasyOCR's 0.1, too little to take the cut back
        recorded = metrics if margin is None else {**metrics, "add_margin": margin}
        compared = compare_with_shipped(SHIPPED / "ko_base.pt", hangul_checkpoint, recorded)
        assert compared["add_margin"] == (margin or 0.1)
        read[margin] = compared["sets"]["boxes"]["recipe"]["word_accuracy"]
    assert read == {None: 0.0, 0.5: 1.0}


def test_evaluate_reads_each_real_page_end_to_end_and_the_card_shows_it_beside_the_ground_truth(
        hangul_checkpoint, tmp_path):
    page = realdata("paddleocr", "korean_1.jpg")
    gt = [line.strip() for line in page.with_suffix(".txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    result = evaluate_sets("ko_base", {}, reference=str(hangul_checkpoint), baselines=(), out=tmp_path / "eval",
                           pages={"handwritten_page": str(page), "gone": str(tmp_path / "gone.jpg")},
                           detector={"width_ths": 0.0})
    assert result["skipped"] == {"gone": f"{tmp_path / 'gone.jpg'} not found"}
    entry = result["pages"]["handwritten_page"]
    assert entry["gt_lines"] == gt and entry["recipe"]["gt_chars"] == sum(len(g.replace(" ", "")) for g in gt)
    # the shipped base reads the handwriting; the untrained reference does not: the labels are not swapped
    assert entry["recipe"]["char_f1"] > 0.6 > entry["reference"]["char_f1"]
    # the scores are those of the lines it read (order-free characters, nothing else)
    read = Counter("".join(entry["lines"]["recipe"]).replace(" ", ""))
    tp = sum((read & Counter("".join(gt).replace(" ", ""))).values())
    assert entry["recipe"]["char_precision"] == tp / sum(read.values())
    saved = json.loads((tmp_path / "eval/handwritten_page/scores.json").read_text(encoding="utf-8"))
    assert saved["recipe"]["per_page"][0]["lines"] == entry["lines"]["recipe"]
    # the detector settings reach CRAFT's box grouping: EasyOCR's default joins the words of a line into
    # one box, which the recogniser reads otherwise
    joined = evaluate_sets("ko_base", {}, baselines=(), pages={"p": str(page)}, detector={"width_ths": 0.5})
    assert joined["pages"]["p"]["lines"]["recipe"] != entry["lines"]["recipe"]
    params = yaml.safe_load((RECIPE / "params-cpu.yaml").read_text(encoding="utf-8"))
    text = model_card(params, {"steps": 4}, result, {}, "…", {}, 1.0, "ko_base")
    s = entry["recipe"]
    assert (f"| ko_base (this) | {s['gt_chars']} | {s['char_precision']:.4f} | {s['char_recall']:.4f} | "
            f"{s['char_f1']:.4f} | {s['line_cer']:.4f} |") in text
    assert "**handwritten_page** (`" in text and "**gone**: skipped" in text
    assert "```\n" + "\n".join(gt) + "\n---\n" + "\n".join(entry["lines"]["recipe"]) + "\n```" in text


def test_evaluate_stage_writes_its_metrics_and_logs_the_same_numbers_and_readings_to_mlflow(
        heldout_crops, hangul_checkpoint, tmp_path, monkeypatch, capsys):
    import mlflow

    from kocr.recipe import main

    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"recipe": {"baselines": [], "reference": "ko_base"}}),
                                     encoding="utf-8")
    monkeypatch.setenv("KOCR_PARAMS", str(tmp_path / "p.yaml"))
    labels = heldout_crops / "crops/labels.tsv"
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--model", "x.pt", "--heldout", str(labels), "--set", "heldout_latin",
              "--out", str(tmp_path / "eval"), "--metrics", str(tmp_path / "m.json")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m kocr.recipe evaluate: error: --set 'heldout_latin': expected NAME=LABELS")
    main(["evaluate", "--model", str(hangul_checkpoint), "--heldout", str(labels),
          "--set", f"heldout_latin={labels}", "--out", str(tmp_path / "eval"),
          "--metrics", str(tmp_path / "metrics/evaluate.json")])
    written = json.loads((tmp_path / "metrics/evaluate.json").read_text(encoding="utf-8"))
    assert written["model_sha256"] == _sha256(hangul_checkpoint)  # the checkpoint scored: what card and ship check
    heldout = written["sets"]["heldout"]
    # a --set is scored as the held-out set is (here the same crops, so the same scores), per face too
    latin = written["sets"]["heldout_latin"]
    assert latin["labels"] == str(labels) and latin["recipe"] == heldout["recipe"] and set(latin["by_font"])
    assert f"heldout: recipe cer {heldout['recipe']['cer']:.4f}" in capsys.readouterr().out
    run, = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`kocr.stage` = 'recipe_evaluate'")
    logged = run.data.metrics
    assert logged["sets.heldout.recipe.word_accuracy"] == heldout["recipe"]["word_accuracy"]
    assert logged["sets.heldout_latin.recipe.cer"] == latin["recipe"]["cer"]
    assert logged["sets.heldout.reference.cer"] == heldout["reference"]["cer"]
    assert logged["sets.heldout.vs_reference.broken"] == heldout["vs_reference"]["broken"] > 0
    font = next(iter(heldout["by_font"]))
    assert logged[f"sets.heldout.by_font.{font}.recipe.n"] == heldout["by_font"][font]["recipe"]["n"]
    assert run.data.params["recipe.reference"] == "ko_base"
    artifacts = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "got"))
    assert (Path(artifacts) / "evaluate/heldout/readings.tsv").read_bytes() == \
        (tmp_path / "eval/heldout/readings.tsv").read_bytes()
    assert json.loads((Path(artifacts) / "evaluate.json").read_text(encoding="utf-8")) == written


def test_evaluate_refuses_a_missing_heldout_or_set_labels_file_before_scoring(heldout_crops, tmp_path, monkeypatch,
                                                                             capsys):
    """Was: `--heldout` (or a `--set`) naming no file was skipped like a missing real set, exit 0, and the
    evaluation, its metrics and the card went on without the held-out faces the recipe is scored on."""
    from kocr.recipe import main

    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"recipe": {"baselines": []}}), encoding="utf-8")
    monkeypatch.setenv("KOCR_PARAMS", str(tmp_path / "p.yaml"))
    labels = str(heldout_crops / "crops/labels.tsv")
    gone = str(tmp_path / "heldout_crops/labels.tsv")
    for extra, flag in ((["--heldout", gone], f"--heldout {gone}"),
                        (["--heldout", labels, "--set", f"heldout_latin={gone}"], f"--set heldout_latin={gone}")):
        with pytest.raises(SystemExit) as stop:
            main(["evaluate", "--model", "ko_base", *extra, "--out", str(tmp_path / "eval"),
                  "--metrics", str(tmp_path / "m.json")])
        assert stop.value.code == 2
        assert capsys.readouterr().err.splitlines() == [
            f"python -m kocr.recipe evaluate: error: {flag}: labels file not found (run the recipe's synth_heldout "
            "stage)"]
        assert not (tmp_path / "m.json").exists() and not (tmp_path / "eval").exists()
