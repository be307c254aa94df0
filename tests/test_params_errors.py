"""A mistake in params.yaml fails early, in one line naming the file, the full key and the problem (exit 2).

Each command here is given data folders that do not exist: a params error must be said before any data
is read, any model built or anything logged or registered in MLflow.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from kocr.params import ParamsError, check_keys, name_list, paths_by_name, section, typed, typed_settings

SPACE = {"lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True}}
FONTS = ["NanumGothic.ttf"]

CASES = [  # command, params, the message after "params.yaml: "
    ("promote", {"promote": {"min_delta": 0.01, "min_detla": 0.05}}, "promote: unknown keys ['min_detla']"),
    ("promote", {"promote": {"min_delta": "abc"}}, "promote.min_delta 'abc': expected a number"),
    ("prepare-aihub", {"prepare": {"val_fration": 0.5}}, "prepare: unknown keys ['val_fration']"),
    ("prepare-aihub", {"prepare": {"val_fraction": 0.6, "test_fraction": 0.6}},
     "prepare.val_fraction + test_fraction 1.2: expected below 1"),
    ("prepare-aihub", {"prepare": {"crop_margin": -1}}, "prepare.crop_margin -1.0: expected a share >= 0"),
    ("prepare-aihub", {"prepare": {"seed": "abc"}}, "prepare.seed 'abc': expected a whole number"),
    ("prepare-aihub", {"prepare": {"shard_size": "big"}}, "prepare.shard_size 'big': expected a whole number"),
    ("prepare-aihub", {"prepare": {"charset": "korean_g3"}}, "prepare.charset: charset 'korean_g3' is neither"),
    ("prepare-aihub", {"prepare": ["charset"]}, "prepare: expected a mapping of settings"),
    ("import-crops", {"prepare": {"out_of_charset": "ignore"}}, "prepare.out_of_charset 'ignore': expected drop or keep"),
    ("evaluate", {"evaluate": {"iou_treshold": 0.9}}, "evaluate: unknown keys ['iou_treshold']"),
    ("evaluate", {"evaluate": {"iou_threshold": 1.5}}, "evaluate.iou_threshold 1.5: expected a value in (0, 1]"),
    ("evaluate", {"evaluate": {"worst_pages": -1}}, "evaluate.worst_pages -1: expected a whole number >= 0"),
    ("evaluate", {"evaluate": {"baselines": "tesseract"}}, "evaluate.baselines 'tesseract': expected a list"),
    ("evaluate", {"promote": {"model_nam": "x"}}, "promote: unknown keys ['model_nam']"),
    ("export-easyocr", {"export": {"nmae": "x"}}, "export: unknown keys ['nmae']"),
    ("tune", {"tune": {"space": SPACE, "sampler": {"type": "tpe", "sede": 1}}},
     "tune.sampler: unknown keys ['sede']"),
    ("tune", {"tune": {"space": SPACE, "n_trials": "four"}}, "tune.n_trials 'four': expected a whole number"),
    ("tune", {"tune": {"space": SPACE, "timeout_s": -1}}, "tune.timeout_s -1.0: expected seconds > 0, or 0"),
    ("tune", {"tune": {"space": SPACE, "e2e_pages": 0}}, "tune.e2e_pages 0: expected a whole number >= 1"),
    ("tune", {"tune": {"space": {"optimizer": {"type": "categorical", "choices": ["adam", "sgd"]}}}},
     "tune.space.optimizer: 'sgd' cannot be train.optimizer (train.optimizer 'sgd': expected one of"),
    ("tune", {"tune": {"space": {"lr": {"type": "float", "low": 0, "high": 0.1}}}},
     "tune.space.lr: 0.0 cannot be train.lr (train.lr 0.0: expected a learning rate > 0)"),
    # NaN passes every comparison and inf passes low <= high: both reached Optuna, which failed every trial
    ("tune", {"tune": {"space": {"lr": {"type": "float", "low": 1.0e-4, "high": float("inf"), "log": True}}}},
     "tune.space.lr: high inf: low, high and step must be finite numbers"),
    ("tune", {"tune": {"space": {"lr": {"type": "float", "low": float("nan"), "high": 0.1}}}},
     "tune.space.lr: low nan: low, high and step must be finite numbers"),
    ("tune", {"tune": {"space": {"lr": {"type": "float", "low": 1.0e-4, "high": 0.1, "step": float("nan")}}}},
     "tune.space.lr: step nan: low, high and step must be finite numbers"),
    ("tune", {"tune": {"space": {"lr": {"type": "float", "low": 1.0e-4, "high": 0.1, "step": 0}}}},
     "tune.space.lr: step 0.0: expected a step > 0"),
    # a log scale with a grid step: Optuna refused every trial's draw ("step is not supported when log is true")
    ("tune", {"tune": {"space": {"lr": {"type": "float", "low": 1.0e-4, "high": 0.1, "log": True, "step": 1.0e-4}}}},
     "tune.space.lr: step 0.0001 with log: true: a log-scale entry takes no step (drop one of them)"),
    ("tune", {"tune": {"space": {"batch_size": {"type": "int", "low": 4, "high": 64, "log": True, "step": 4}}}},
     "tune.space.batch_size: step 4 with log: true: a log-scale entry takes no step (drop one of them; an int may "
     "have step 1)"),
    ("tune", {"tune": {"space": {"batch_size": {"type": "int", "low": 4, "high": float("inf")}}}},
     "tune.space.batch_size: low/high/step must be finite numbers"),
    ("tune", {"tune": {"space": SPACE}, "train": {"patience": -1}}, "train.patience -1: expected a whole number >= 0"),
    ("train", {"train": {"lr": 0}}, "train.lr 0.0: expected a learning rate > 0"),
    ("train", {"train": {"focal_gamma": -1}}, "train.focal_gamma -1.0: expected 0 (plain CTC) or a gamma > 0"),
    ("train", {"train": {"batch_max_length": -3}}, "train.batch_max_length -3: expected a whole number >= 0"),
    ("train", {"train": {"warmup_steps": -5}}, "train.warmup_steps -5: expected a whole number >= 0"),
    ("train", {"train": {"num_workers": -1}}, "train.num_workers -1: expected a whole number >= 0"),
    ("train", {"train": {"device": "gpu"}}, "train.device 'gpu': expected auto, cpu or cuda[:N]"),
    ("train", {"train": {"precision": "fp8"}}, "train.precision 'fp8': expected one of auto, fp32, bf16, fp16"),
    ("train", {"train": {"ema_decay": 1.5}}, "train.ema_decay 1.5: expected 0 (off) or a value in (0, 1)"),
    ("train", {"train": {"state_dir": None}}, "train.state_dir None: expected a string"),
    ("train", {"train": {"use_tuned": "yes"}}, "train.use_tuned 'yes': expected true or false"),
    # train.processes: refused before kocr train starts torchrun (or anything else)
    *[("train", {"train": {"processes": bad}},
       f"train.processes {bad!r}: expected a whole number >= 1, or auto (one process per visible GPU)")
      for bad in (0, -1, "two", True, 1.5, None)],
    ("train", {"train": "fast"}, "train: expected a mapping of settings, got 'fast'"),
    ("train", {"train": {"mix": {"data/x": 1.5}}}, "train.mix: data/x: share 1.5 must be a number between 0 and 1"),
    ("synth-lines", {"synth_lines": {"count": "ten"}}, "synth_lines.count 'ten': expected a whole number"),
    ("synth-lines", {"synth_lines": {"skew": "abc"}}, "synth_lines.skew 'abc': expected a number"),
    ("synth-lines", {"synth_lines": {"random_skew": "no"}}, "synth_lines.random_skew 'no': expected true or false"),
    ("synth-lines", {"synth_lines": {"fonts": None}}, "synth_lines.fonts None: expected a file-name pattern"),
    ("synth-lines", {"synth_lines": {"lexicon_top_n": 0}}, "synth_lines.lexicon_top_n must be >= 1"),
    ("synth-lines", {"synth_lines": {"distortion_amplitude": [-5, -1]}}, "synth_lines.distortion_amplitude must be >= 0"),
    ("synth-lines", {"synth_lines": {"background_images": "/nonexistent", "backgrounds": {"image": 1}}},
     "synth_lines.background_images '/nonexistent': no such folder"),
    ("synth-lines", {"synth_lines": {"charset_name": "nosuch", "fonts": FONTS}},
     "synth_lines.charset_name: charset 'nosuch' is neither"),
    ("synth-pages", {"sample": {"count": "ten", "fonts": FONTS}}, "sample.count 'ten': expected a whole number"),
    ("synth-pages", {"sample": {"fonts": ["NoSuch.ttf"]}}, "sample.fonts: no font file matches ['NoSuch.ttf']"),
    ("synth-pages", {"sample": {"fonts": FONTS, "charset_name": "nosuch"}},
     "sample.charset_name: charset 'nosuch' is neither"),
    ("synth-pages", {"sample": {"fonts": FONTS, "font_size": [40, 24]}}, "sample.font_size must be (lo, hi)"),
    ("synth-pages", {"sample": {"fonts": FONTS, "width": 100}}, "sample.width x height 100x700 is too small"),
    ("synth-pages", {"sample": None}, "sample.fonts is required"),
    ("evaluate", {"detector": {"text_threshold": "high"}}, "detector.text_threshold 'high': expected a number"),
    ("evaluate", {"detector": {"canvas_size": 1280.5}}, "detector.canvas_size 1280.5: expected a whole number"),
    ("evaluate", {"detector": {"widht_ths": 0.0}}, "detector: unknown keys ['widht_ths']"),
    ("evaluate", {"detector": [0.7]}, "detector: expected a mapping of settings"),
    ("promote", {"detector": {"min_size": "big"}}, "detector.min_size 'big': expected a whole number"),
    ("export-easyocr", {"detector": {"add_margin": True}}, "detector.add_margin True: expected a number"),
    ("import-crops", {"detector": {"add_margin": "wide"}}, "detector.add_margin 'wide': expected a number"),
    ("train", {"detector": {"link_threshold": "0.4x"}}, "detector.link_threshold '0.4x': expected a number"),
    ("tune", {"tune": {"space": SPACE, "metric": "e2e_f1", "direction": "maximize"},
              "detector": {"low_text": "low"}}, "detector.low_text 'low': expected a number"),
    ("prepare-aihub", {"data": {"sorce": "data/aihub"}}, "data: unknown keys ['sorce'] (known: prepared, source)"),
    ("prepare-aihub", {"data": {"source": 5}}, "data.source 5: expected a string"),
    ("prepare-aihub", {"data": "data/aihub"}, "data: expected a mapping of settings"),
    ("tune", {"tune": {"space": SPACE}, "data": {"prepard": "x"}}, "data: unknown keys ['prepard']"),
    ("tune", {"tune": {"space": SPACE}, "data": {"source": ""}}, "data.source '': expected a path"),
]

ARGS = {"promote": ["--candidate", "absent", "--metrics", "absent.json", "--source", "absent", "--splits", "absent"],
        "prepare-aihub": ["--src", "absent", "--out", "out"],
        "import-crops": ["--labels", "absent.tsv", "--out", "out"],
        "evaluate": ["--source", "absent", "--splits", "absent.json", "--candidate", "english_g2",
                     "--predictions", "pred"],
        "export-easyocr": ["--model", "english_g2", "--out", "out"],
        "tune": ["--data", "absent", "--out", "out"],
        "train": ["--data", "absent", "--out", "out"],
        "synth-lines": ["--out", "out"],
        "synth-pages": ["--out", "out"]}


def _run(command: str, params: dict, tmp_path: Path, monkeypatch, capsys, *extra: str) -> list[str]:
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KOCR_PARAMS", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    assert main([command, *ARGS[command], *extra]) == 2
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("command, params, message", CASES, ids=[f"{c[0]}:{c[2][:40]}" for c in CASES])
def test_a_params_mistake_is_one_line_naming_the_file_and_key_before_anything_runs(command, params, message,
                                                                                   tmp_path, monkeypatch, capsys):
    err = _run(command, params, tmp_path, monkeypatch, capsys)
    assert len(err) == 1 and err[0].startswith(f"kocr {command}: error: params.yaml: {message}"), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "pred").exists()
    store = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    assert not store.exists()  # no run started, nothing registered


RECIPE_CASES = [  # recipe: of the params file, the message after "params.yaml: "
    ({"baseline": ["tesseract"]}, "recipe: unknown keys ['baseline'] (known: baselines, detector, real_pages, "
                                  "real_sets, reference)"),
    ({"baselines": "tesseract"}, "recipe.baselines 'tesseract': expected a list of engine names"),
    ({"reference": 5}, "recipe.reference 5: expected a string or null"),
    ({"real_sets": ["a.tsv"]}, "recipe.real_sets ['a.tsv']: expected a mapping {name: path}"),
    ({"real_sets": {"street": None}}, "recipe.real_sets.street None: expected a path (a string)"),
    ({"real_pages": {"page": 3}}, "recipe.real_pages.page 3: expected a path (a string)"),
    ({"detector": {"add_margn": 0.3}}, "recipe.detector: unknown keys ['add_margn']"),
    ({"detector": {"add_margin": "wide"}}, "recipe.detector.add_margin 'wide': expected a number"),
    ({"detector": "width_ths"}, "recipe.detector: expected a mapping of settings"),
]


@pytest.mark.parametrize("recipe, message", RECIPE_CASES, ids=[c[1][:40] for c in RECIPE_CASES])
def test_a_recipe_settings_mistake_is_one_line_before_anything_runs(recipe, message, tmp_path, monkeypatch, capsys):
    from kocr.recipe import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KOCR_PARAMS", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"recipe": recipe}), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--model", "ko_base", "--heldout", "h.tsv", "--out", "out", "--metrics", "m.json"])
    assert exit_.value.code == 2  # as kocr's commands end a params mistake
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"python -m kocr.recipe evaluate: error: params.yaml: {message}")
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "out").exists()
    store = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    assert not store.exists()  # no run started


def test_errors_of_a_section_override_name_that_section(tmp_path, monkeypatch, capsys):
    params = {"synth_lines": {"count": 5}, "synth_lines_val": {"cont": 5}}
    err = _run("synth-lines", params, tmp_path, monkeypatch, capsys, "--section", "synth_lines_val")
    assert err == ["kocr synth-lines: error: params.yaml: synth_lines_val: unknown keys ['cont']; known: "
                   + err[0].split("known: ")[1]]
    params = {"synth_lines": {"count": 5}, "synth_lines_val": {"skew": 50}}
    err = _run("synth-lines", params, tmp_path, monkeypatch, capsys, "--section", "synth_lines_val")
    assert err == ["kocr synth-lines: error: params.yaml: synth_lines_val.skew must be below 45 degrees, got 50.0"]


def test_the_params_file_named_is_the_one_kocr_params_points_at(tmp_path, monkeypatch, capsys):
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("promote: {min_delta: abc}\n", encoding="utf-8")
    monkeypatch.setenv("KOCR_PARAMS", str(tmp_path / "mine.yaml"))
    assert main(["promote", *ARGS["promote"]]) == 2
    assert capsys.readouterr().err.strip() == (f"kocr promote: error: {tmp_path / 'mine.yaml'}: "
                                               "promote.min_delta 'abc': expected a number")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_train_on_cuda_without_it_is_one_line(tmp_path, monkeypatch, capsys):
    err = _run("train", {"train": {"device": "cuda"}}, tmp_path, monkeypatch, capsys)
    assert err == ["kocr train: error: params.yaml: train.device 'cuda': this machine has no CUDA device "
                   "(torch.cuda.is_available() is false); use auto or cpu"]


def test_a_null_section_is_every_default():
    """``train:`` with every key commented out is YAML null: the defaults, as an empty mapping."""
    from evaluation.evaluate import EvaluateConfig
    from training.data.prepare import PrepareConfig
    from training.data.synth_lines import LinesConfig
    from training.train import TrainConfig

    params = yaml.safe_load("train:\nprepare:\nevaluate:\nsynth_lines:\nmodel:\n")
    assert section(params, "train") == {} and section(params, "absent") == {}
    assert TrainConfig.from_params(params) == TrainConfig()
    # train.mix with every set commented out is null too: no mix, as the default {}
    assert TrainConfig.from_params(yaml.safe_load("train:\n  mix:\n  #  data/hand/train: 0.3\n")) == TrainConfig()
    assert PrepareConfig.from_params(section(params, "prepare")) == PrepareConfig()
    assert EvaluateConfig.from_params(params) == EvaluateConfig()
    assert LinesConfig.from_params(section(params, "synth_lines")) == LinesConfig()


def test_the_helpers():
    assert typed("a.b", "1e-3", float) == 0.001 and typed("a.b", "2", int) == 2 and typed("a.b", None, int, True) is None
    for value, kind in ((True, int), (1.5, int), ("x", float), (1, str), ("yes", bool)):
        with pytest.raises(ParamsError, match=r"^params.yaml: a.b "):
            typed("a.b", value, kind)
    with pytest.raises(ParamsError, match=r"^params.yaml: s: unknown keys \['z'\] \(known: a, b\)$"):
        check_keys("s", {"a": 1, "z": 2}, ("b", "a"))
    assert typed_settings("s", {"a": "2"}, {"a": int, "b": float}) == {"a": 2}
    assert name_list("s.n", None) == [] and paths_by_name("s.p", None) == {}
    with pytest.raises(ParamsError, match=r"^params.yaml: s.n 'ab': expected a list of names$"):
        name_list("s.n", "ab")  # not read letter by letter
