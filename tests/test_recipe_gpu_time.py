"""bench/recipe_gpu_time.py: the GPU-size timing probe runs where the recipe's tools are missing, and projects right."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import REPO
from training.charset import Charset
from training.checkpoint import load_recognizer

spec = importlib.util.spec_from_file_location("recipe_gpu_time", REPO / "bench/recipe_gpu_time.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)

# Direct dependencies of the project that the GPU machine's image lacks and the probe must not need
# there (lmdb and RapidFuzz travel as wheels in the kit; torch, OpenCV, Pillow, PyYAML, tqdm are there).
ABSENT_THERE = ("wordfreq", "mlflow", "dvc", "easyocr", "easyocr_en_models", "optuna", "psycopg2")
BLOCK_HOOK = f"""
import importlib.metadata as metadata
import sys
from importlib.abc import MetaPathFinder
class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_THERE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)")
sys.meta_path.insert(0, Absent())
from_name = metadata.Distribution.from_name.__func__
def absent_from_name(cls, name):  # nor is their metadata there (importlib.metadata.version)
    if name.lower().replace("-", "_") in {ABSENT_THERE!r}:
        raise metadata.PackageNotFoundError(name)
    return from_name(cls, name)
metadata.Distribution.from_name = classmethod(absent_from_name)
"""


def _recipe() -> dict:
    return yaml.safe_load((REPO / "recipes/ko-base/params.yaml").read_text(encoding="utf-8"))


def test_projection_scales_each_measured_rate_to_the_recipes_full_size():
    params = _recipe()
    # every set the recipe's dvc.yaml renders (synth-lines without --section renders synth_lines:)
    dvc = (REPO / "recipes" / "ko-base" / "dvc.yaml").read_text(encoding="utf-8")
    rendered = {"synth_lines", *re.findall(r"synth-lines --section (\w+)", dvc)}
    assert set(probe.RENDERED) == rendered and len(rendered) == 5
    counts = sum(params[s]["count"] for s in rendered)
    cfg = params["train"]
    got = probe.project(params, render_ips=1000.0, train_ips=2000.0, val_seconds=3.0, val_measured=500)
    assert got["render_minutes"] == round(counts / 1000 / 60, 1)
    assert got["train_minutes"] == round(cfg["steps"] * cfg["batch_size"] / 2000 / 60, 1)
    n_val = probe.validations(cfg["steps"], cfg["val_every"])
    assert n_val == cfg["steps"] // cfg["val_every"] + (cfg["steps"] % cfg["val_every"] > 0)
    # each validation reads the recipe's whole val set: 3 s for 500 images measured
    assert got["validation_minutes"] == round(n_val * 3.0 * params["synth_lines_val"]["count"] / 500 / 60, 1)
    parts = got["render_minutes"] + got["train_minutes"] + got["validation_minutes"]
    assert abs(got["total_minutes"] - parts) <= 0.15  # each rounded on its own
    assert probe.validations(10, 4) == 3 and probe.validations(8, 4) == 2  # after step 4, 8 and the last


def test_probe_and_instalment_run_from_a_kit_without_the_lexicon_or_the_tracking_stack(tmp_path):
    params = _recipe()
    kit = tmp_path / "kit"
    packed = probe.pack_kit(params, kit, token_count=300, wheels=False)
    # every training face, cut to the charset: a fraction of the ~140 MB of the whole files
    assert sorted(packed["fonts"]) == sorted(params["synth_lines"]["fonts"]) and packed["font_mb"] < 30
    assert len((kit / "tokens.txt").read_text(encoding="utf-8").splitlines()) == 300
    small = dict(params)  # the recipe at a size that runs in seconds on the CPU
    small["synth_lines"] = {**params["synth_lines"], "workers": 2}
    small["train"] = {**params["train"], "batch_size": 4, "num_workers": 0, "augment": 0.0}
    tiny = tmp_path / "params.yaml"
    tiny.write_text(yaml.safe_dump(small, allow_unicode=True), encoding="utf-8")
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook/sitecustomize.py").write_text(BLOCK_HOOK, encoding="utf-8")
    out, index_dir = tmp_path / "result.json", tmp_path / "set-index"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/recipe_gpu_time.py"), "--params", str(tiny), "--render", "40",
         "--steps", "3", "--warmup", "1", "--base", "ko_base", "--device", "cpu", "--tokens", str(kit / "tokens.txt"),
         "--font-dir", str(kit / "fonts"), "--json", str(out), "--keep", str(tmp_path / "keep"),
         "--deadline-minutes", "9", "--max-steps", "4", "--validations", "2", "--set", "lr=0.0002",
         "--set", "ema_decay=0.9"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin",
                                                                     "PYTHONPATH": str(tmp_path / "hook"),
                                                                     "KOCR_SET_INDEX_DIR": str(index_dir)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    # the set indexes its training wrote (training.data.set_index) went to the test's folder, not to ~/.cache
    assert sorted(p.name.split("-")[0] for p in index_dir.glob("*.idx")) == ["train", "val"]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["faces"] == len(packed["fonts"]) and result["faces_missing"] == []
    assert result["render_workers"] == 2 and result["batch_size"] == 4 and result["steps"] == 3
    assert result["validation_images"] == 4  # --render // 10
    assert result["train_images_per_second"] > 0 and result["render_images_per_second"] > 0
    assert result["projected"] == probe.project(small, result["render_images_per_second"],
                                                result["train_images_per_second"], result["validation_seconds"],
                                                result["validation_images"])
    # the instalment: the steps that fit (capped here), the overrides, a checkpoint evaluate-crops reads
    inst = result["instalment"]
    assert inst["steps"] == 4 and inst["lr"] == 0.0002 and inst["ema_decay"] == 0.9
    val_rows = (tmp_path / "keep/val.tsv").read_text(encoding="utf-8").splitlines()
    assert [row.split("\t")[0] for row in val_rows[1:]] == ["2", "4"]  # validations=2 over 4 steps
    assert "raw_cer" in val_rows[0]  # the average is scored, the raw weights beside it
    loaded = load_recognizer(str(tmp_path / "keep/model.pt"))
    assert loaded.charset == Charset.named("korean_g2") and loaded.config.hidden_size == 256
    assert "instalment step 4/4: " in done.stdout and "raw_cer" in done.stdout  # progress in the output_tail


def test_instalment_knobs_are_checked_before_any_rendering():
    assert probe.train_overrides(["lr=5e-4", "ema_decay=0.999", "schedule=cosine"]) == {
        "lr": 5e-4, "ema_decay": 0.999, "schedule": "cosine"}
    for bad in ("learning_rate=0.1", "lr"):
        with pytest.raises(SystemExit, match=f"--set '{bad}'.*train: knob"):
            probe.train_overrides([bad])
    with pytest.raises(SystemExit, match="lr takes a number"):
        probe.train_overrides(["lr=fast"])
    for knob, flag in [("steps", "--max-steps"), ("val_every", "--validations"), ("base", "--base")]:
        with pytest.raises(SystemExit, match=f"sets {knob} itself; use {flag}"):  # the instalment overwrote it
            probe.train_overrides([f"{knob}=100"])


def test_memory_cap_is_refused_without_a_cuda_device():
    with pytest.raises(SystemExit, match="not a CUDA GPU"):
        probe.cap_gpu_memory(24, torch.device("cpu"))


def test_kit_words_carry_the_params_latin_share(tmp_path):
    from training.data.lexicon import has_hangul

    params = _recipe()
    params["synth_lines"] = {**params["synth_lines"], "latin_words": 0.0}
    probe.write_tokens(params, tmp_path / "plain.txt", 400)
    params["synth_lines"]["latin_words"] = 0.5
    probe.write_tokens(params, tmp_path / "latin.txt", 400)
    plain = (tmp_path / "plain.txt").read_text(encoding="utf-8").splitlines()
    latin = (tmp_path / "latin.txt").read_text(encoding="utf-8").splitlines()
    latin_only = [t for t in latin if not has_hangul(t) and any(c.isalpha() and c.islower() for c in t)]
    assert 120 <= len(latin_only) <= 280  # about half, as the GPU machine's renderer should draw them
    assert sum(not has_hangul(t) and any(c.isalpha() and c.islower() for c in t) for t in plain) < 40


def test_a_set_key_is_drawn_where_wordfreq_is_not_installed(monkeypatch):
    """The GPU machine has no wordfreq: its sets' resume key counts it as absent instead of failing."""
    import importlib.metadata

    from training.data.set_key import generator_key

    here = generator_key({"seed": 0}, "korean_g2", [])
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name == "wordfreq":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    there = generator_key({"seed": 0}, "korean_g2", [])
    assert len(there) == 64 and there != here


def test_the_documented_kit_folder_is_ignored_by_git_in_any_clone(tmp_path):
    """``--kit .gpuprobe`` (docs/recipe.md) packs ~22 MB of wheels, words and fonts into the checkout: a
    fresh clone's .gitignore keeps it out of commits (the device tool then takes it only by ``carry``)."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_bytes((REPO / ".gitignore").read_bytes())
    kit = [".gpuprobe/tokens.txt", ".gpuprobe/whl/lmdb.whl", ".gpuprobe/fonts/UnDotum.ttf"]
    ignored = subprocess.run(["git", "check-ignore", *kit], cwd=tmp_path, capture_output=True, text=True)
    assert ignored.stdout.split() == kit
