"""Train knobs the search tunes: lr warm-up, freezing, batch_max_length, focal CTC; params.yaml defaults."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.conftest import REPO
from training.charset import Charset
from training.crops import CropBatch, CropDataset
from training.data.lmdb_store import LmdbDataset, LmdbWriter
from training.optim import make_optimizer, make_scheduler
from training.train import TrainConfig, _seed_everything, build_model, ctc_loss, freeze_modules, train

KOREAN = Charset.named("korean_g2")
TINY = {"base": "scratch", "output_channel": 32, "hidden_size": 32, "batch_size": 4, "steps": 3, "val_every": 3}


def _train(prepared: Path, tmp: Path, **knobs) -> tuple[dict, Path]:
    config = TrainConfig(**{**TINY, **knobs})
    summary = train(config, prepared, tmp / "out", metrics_file=tmp / "m.json", plots_dir=tmp / "plots",
                    progress=False, log=False)
    return summary, tmp / "out" / "model.pt"


def test_params_yaml_defaults_change_nothing():
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    config = TrainConfig.from_params(params)
    assert (config.freeze, config.batch_max_length, config.focal_gamma) == ("none", 0, 0.0)
    assert 0 < config.warmup_steps < config.steps  # the demo fine-tunes ko_base with a short warm-up, then cosine
    assert params["train"]["use_tuned"] is False and config.tuned_keys == ()


def test_knobs_are_read_as_their_types_and_misspelt_or_impossible_ones_are_refused_by_name(tmp_path, monkeypatch,
                                                                                            capsys):
    from kocr.cli import main

    # YAML reads 1e-3 (no dot) as a string: it is the learning rate people write, so it is taken as one
    config = TrainConfig.from_params(yaml.safe_load("train: {lr: 1e-3, steps: '6', weight_decay: 0}"))
    assert (config.lr, config.steps, config.weight_decay) == (0.001, 6, 0.0)
    assert isinstance(config.lr, float) and isinstance(config.weight_decay, float)
    refused = {
        "train: {lerning_rate: 0.5}": "train: unknown keys ['lerning_rate']",  # was trained with the default lr
        "model: {hiden_size: 64}": "model: unknown keys ['hiden_size']",
        "train: {lr: fast}": "train.lr 'fast': expected a number",
        "train: {steps: 6.5}": "train.steps 6.5: expected a whole number",
        "train: {compile: maybe}": "train.compile 'maybe': expected true or false",
        "train: {val_every: 0}": "train.val_every 0: expected a whole number >= 1",  # was a ZeroDivisionError
        "train: {checkpoint_every: 0}": "train.checkpoint_every 0: expected a whole number >= 1",
        "train: {log_every: 0}": "train.log_every 0: expected a whole number >= 1",
    }
    for text, message in refused.items():
        with pytest.raises(ValueError) as info:
            TrainConfig.from_params(yaml.safe_load(text))
        assert str(info.value).startswith(f"params.yaml: {message}"), (text, str(info.value))
    # and kocr train says it in one line before anything runs
    (tmp_path / "params.yaml").write_text("train: {base: scratch, lerning_rate: 0.5}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kocr train: error: params.yaml: train: unknown keys ['lerning_rate']")
    assert not (tmp_path / "m").exists()


def test_warmup_grows_the_lr_linearly_then_holds():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = make_scheduler(optimizer, "constant", warmup_steps=4)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    optimizer = torch.optim.SGD([weight], lr=0.3)
    make_scheduler(optimizer, "constant", warmup_steps=0)
    assert optimizer.param_groups[0]["lr"] == 0.3


def test_freeze_keeps_the_frozen_part_bit_for_bit(prepared, tmp_path):
    knobs = {"freeze": "feature_extraction", "optimizer": "adam", "lr": 0.01}
    _seed_everything(0)
    initial = {k: v.clone() for k, v in build_model(TrainConfig(**{**TINY, **knobs}), 0)[0].state_dict().items()}
    _, checkpoint = _train(prepared, tmp_path, **knobs)
    trained = torch.load(checkpoint, map_location="cpu")["state_dict"]
    frozen = [k for k in initial if k.startswith("FeatureExtraction.")]
    assert any("running_mean" in k for k in frozen)  # BatchNorm statistics do not drift either
    for key in frozen:
        assert torch.equal(initial[key], trained[key]), key
    assert not torch.equal(initial["Prediction.weight"], trained["Prediction.weight"])
    assert any(not torch.equal(initial[k], trained[k]) for k in initial if k.startswith("SequenceModeling."))


def test_frozen_parameters_are_not_given_to_the_optimizer():
    config = TrainConfig(**{**TINY, "freeze": "both"})
    model = build_model(config, 0)[0]
    freeze_modules(model, "both")
    optimised = {id(p) for group in make_optimizer(model, config.optimizer, config.lr).param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.Prediction.parameters()}
    with pytest.raises(ValueError, match="train.freeze 'head'"):
        freeze_modules(model, "head")


def _png(h: int, w: int) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((h, w), 200, dtype=np.uint8))
    assert ok
    return buf.tobytes()


def test_batch_max_length_drops_longer_labels(tmp_path):
    hangul = [c for c in KOREAN.chars if "가" <= c <= "힣"]
    with LmdbWriter(tmp_path / "set") as writer:
        for n in (2, 5, 6, 9):
            writer.add(_png(32, 200), "".join(hangul[:n]))
    source = LmdbDataset(tmp_path / "set")
    assert len(CropDataset(source, KOREAN)) == 4
    limited = CropDataset(source, KOREAN, batch_max_length=5)
    assert [source.label(i) for i in limited.indices] == ["".join(hangul[:2]), "".join(hangul[:5])]
    assert limited.dropped == {"over_batch_max_length": 2}


def test_batch_max_length_filters_training_but_not_validation(prepared, tmp_path):
    full, _ = _train(prepared, tmp_path / "a", steps=1, val_every=1)
    short, _ = _train(prepared, tmp_path / "b", steps=1, val_every=1, batch_max_length=2)
    assert short["dropped_over_batch_max_length"] > 0
    assert short["train_samples"] == full["train_samples"] - short["dropped_over_batch_max_length"]
    assert short["val_n"] == full["val_n"]  # every trial is scored on the same validation samples


def _batch(seed: int = 0) -> tuple[torch.Tensor, CropBatch]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 12, 6, generator=generator)
    lengths = torch.tensor([2, 4, 3])
    targets = torch.randint(1, 6, (int(lengths.sum()),), generator=generator)
    return logits, CropBatch(torch.zeros(3, 1, 64, 52), targets, lengths, ["", "", ""])


def test_focal_ctc_weights_each_sample_by_how_badly_it_is_read():
    logits, batch = _batch()
    plain = ctc_loss(logits, batch, torch.device("cpu"))
    assert torch.allclose(ctc_loss(logits, batch, torch.device("cpu"), focal_gamma=0.0), plain)
    log_probs = F.log_softmax(logits, 2).permute(1, 0, 2)
    per_sample = F.ctc_loss(log_probs, batch.targets, torch.full((3,), 12), batch.target_lengths,
                            reduction="none") / batch.target_lengths
    assert torch.allclose(per_sample.mean(), plain)  # the per-sample form of reduction="mean"
    for gamma in (0.5, 2.0):
        expected = ((1 - torch.exp(-per_sample)) ** gamma * per_sample).mean()
        focal = ctc_loss(logits, batch, torch.device("cpu"), focal_gamma=gamma)
        assert torch.allclose(focal, expected) and focal < plain


def test_every_new_knob_trains_end_to_end(prepared, tmp_path):
    summary, checkpoint = _train(prepared, tmp_path, warmup_steps=2, freeze="sequence_modeling",
                                 batch_max_length=8, focal_gamma=1.5)
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"]) and checkpoint.is_file()
    meta = torch.load(checkpoint, map_location="cpu")["meta"]["train_config"]
    assert (meta["warmup_steps"], meta["freeze"], meta["batch_max_length"], meta["focal_gamma"]) == (2, "sequence_modeling", 8, 1.5)
