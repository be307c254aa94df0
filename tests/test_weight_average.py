"""train.ema_decay (the moving average of the weights, what training validates and keeps, its resume) and
`kocr average-checkpoints` (the weighted mean of finished checkpoints)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch

from kocr import cli
from tests.test_train_engine import TINY as ENGINE_TINY
from tests.test_train_engine import _run
from training.charset import Charset
from training.checkpoint import load_recognizer, save_checkpoint
from training.model import Recognizer, RecognizerConfig
from training.train import TrainConfig, build_model
from training.weight_average import make_ema, warmed_decay

SHORT = {"steps": 6, "val_every": 6}


def test_the_average_follows_the_warmed_decay_and_copies_integer_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = make_ema(model, 0.5)
    expected = None
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(step + 1))
        model.train()(torch.randn(4, 3))  # moves BatchNorm's running stats and num_batches_tracked
        ema.update_parameters(model)
        current = model[0].weight.detach().clone()
        # the first update copies; update n (n >= 1) keeps warmed_decay(0.5, n) of the average
        expected = current if expected is None else torch.lerp(expected, current, 1 - warmed_decay(0.5, step))
    assert torch.allclose(ema.module[0].weight, expected)
    assert not torch.allclose(ema.module[0].weight, model[0].weight)
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked == 5
    assert not torch.equal(ema.module[1].running_mean, model[1].running_mean)  # statistics are averaged too
    assert [warmed_decay(0.999, n) for n in (0, 1, 8990, 10**6)] == pytest.approx([0.1, 2 / 11, 0.999, 0.999])


def test_decay_zero_is_off_and_out_of_range_is_refused():
    assert make_ema(torch.nn.Linear(1, 1), 0.0) is None
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=f"train.ema_decay {bad}"):
            make_ema(torch.nn.Linear(1, 1), bad)


def _val_rows(out: Path) -> list[dict[str, str]]:
    with (out / "plots" / "val.tsv").open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_training_keeps_the_average_and_reports_the_raw_weights_beside_it(prepared, tmp_path):
    plain = _run(prepared, tmp_path / "plain", **SHORT)
    averaged = _run(prepared, tmp_path / "ema", ema_decay=0.9, **SHORT)
    # the raw weights follow the same trajectory (the average draws no randomness): same raw score
    assert float(_val_rows(tmp_path / "ema")[-1]["raw_cer"]) == pytest.approx(plain["best_val_cer"], abs=1e-5)
    assert "raw_cer" not in _val_rows(tmp_path / "plain")[-1]
    raw = torch.load(tmp_path / "plain" / "model.pt", map_location="cpu")
    kept = torch.load(tmp_path / "ema" / "model.pt", map_location="cpu")
    assert kept["meta"]["train_config"]["ema_decay"] == 0.9
    assert set(kept["state_dict"]) == set(raw["state_dict"])  # a plain Recognizer checkpoint, loadable as any
    differs = [k for k in raw["state_dict"] if not torch.equal(raw["state_dict"][k], kept["state_dict"][k])]
    assert "Prediction.weight" in differs and averaged["best_val_cer"] == pytest.approx(
        float(_val_rows(tmp_path / "ema")[-1]["cer"]), abs=1e-5)


# -- kocr average-checkpoints: the weighted mean of finished checkpoints ---------------------------

TINY = dict(output_channel=16, hidden_size=16)


def _checkpoint(path: Path, seed: int, charset: Charset | None = None, **config) -> Path:
    charset = charset or Charset.named("english_g2")
    torch.manual_seed(seed)
    model = Recognizer(RecognizerConfig(num_class=len(charset.chars) + 1, **{**TINY, **config}))
    model.train()(torch.rand(2, 1, 64, 96))  # moves BatchNorm's running statistics away from 0 / 1
    return save_checkpoint(path, model, charset)


def test_average_checkpoints_writes_the_weighted_mean_of_every_float_tensor(tmp_path, capsys):
    a, b = _checkpoint(tmp_path / "a.pt", 1), _checkpoint(tmp_path / "b.pt", 2)
    out = tmp_path / "soup" / "mean.pt"
    assert cli.main(["average-checkpoints", str(a), str(b), "--out", str(out), "--weights", "1", "3"]) == 0
    reported = json.loads(capsys.readouterr().out)
    sa, sb = (load_recognizer(str(p)).model.state_dict() for p in (a, b))
    mean = load_recognizer(str(out))  # a plain checkpoint: loads, exports and scores as any
    averaged = 0
    for key, tensor in mean.model.state_dict().items():
        if tensor.is_floating_point():  # weights and BatchNorm statistics alike
            assert torch.allclose(tensor, 0.25 * sa[key] + 0.75 * sb[key], atol=1e-6), key
            averaged += not torch.equal(sa[key], sb[key])
        else:
            assert torch.equal(tensor, sa[key]), key  # num_batches_tracked: the first's
    assert averaged > 10 and mean.charset == Charset.named("english_g2")
    sources = torch.load(out, map_location="cpu")["meta"]["averaged_from"]
    assert sources == reported["averaged_from"] and [s["weight"] for s in sources] == [0.25, 0.75]
    assert sources[0]["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()[:16]


def test_average_checkpoints_refuses_what_cannot_be_averaged(tmp_path, capsys):
    a = _checkpoint(tmp_path / "a.pt", 1)
    wider = _checkpoint(tmp_path / "wider.pt", 2, hidden_size=32)
    reordered = Charset(Charset.named("english_g2").chars[::-1], "reordered")  # same size, other classes
    other = _checkpoint(tmp_path / "other.pt", 3, reordered)
    out = tmp_path / "mean.pt"
    korean = _checkpoint(tmp_path / "korean.pt", 4, Charset.named("korean_g2"))  # another size: another head
    cases = [([str(a), str(wider)], "wider.pt: architecture"), ([str(a), str(other)], "other.pt: charset reordered"),
             # was: "korean.pt: architecture RecognizerConfig(num_class=1009, …) differs from …(num_class=97, …)"
             ([str(a), str(korean)], "korean.pt: charset korean_g2 (1008 characters) differs from "
                                     f"{a}'s english_g2 (96)"),
             ([str(a)], "at least two"), ([str(a), str(a), "--weights", "1"], "expected 2 non-negative"),
             ([str(a), str(a), "--weights", "1", "-1"], "expected 2 non-negative"),
             # was: accepted, writing a checkpoint of NaN weights (NaN passes `w < 0` and `sum <= 0`; inf / inf is NaN)
             ([str(a), str(a), "--weights", "nan", "1"], "expected 2 non-negative finite"),
             ([str(a), str(a), "--weights", "inf", "1"], "expected 2 non-negative finite"),
             ([str(a), str(a), "--weights", "1e308", "1e308"], "expected 2 non-negative finite")]
    for argv, message in cases:
        try:
            code = cli.main(["average-checkpoints", *argv, "--out", str(out)])
        except SystemExit as exc:
            code = exc.code
        assert code == 2 and message in capsys.readouterr().err, argv
    assert not out.exists()  # nothing written for a refused average


def test_average_checkpoints_refuses_an_out_that_cannot_be_a_file_before_loading(tmp_path, capsys):
    a = _checkpoint(tmp_path / "a.pt", 1)
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    # was: a RuntimeError traceback from torch.save (invalid file name) for a folder, and a FileExistsError
    # traceback for a file standing where the folder goes, after every input had loaded
    for out, message in ((tmp_path, f"--out {tmp_path}: a folder; give the checkpoint file to write, e.g. "
                                    f"{tmp_path / 'mean.pt'}"),
                         (tmp_path / "notes.txt" / "mean.pt", f"--out {tmp_path / 'notes.txt' / 'mean.pt'}: its "
                                                               "folder is a file")):
        assert cli.main(["average-checkpoints", str(a), str(a), "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"kocr average-checkpoints: error: {message}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "notes.txt"]


# -- train.average_with_base: the kept checkpoint averaged with the start (WiSE-FT) -----------------

def test_training_can_keep_the_mean_of_its_best_checkpoint_and_its_start(prepared, tmp_path):
    scratch, charset, _ = build_model(TrainConfig(**ENGINE_TINY), 7)
    base = str(save_checkpoint(tmp_path / "base.pt", scratch, charset))  # a start with the same charset
    plain = _run(prepared, tmp_path / "plain", base=base, **SHORT)
    mixed = _run(prepared, tmp_path / "mixed", base=base, average_with_base=0.25, **SHORT)
    # the same run until the end (averaging draws nothing), then a quarter of the start mixed in
    assert mixed["best_val_cer"] == plain["best_val_cer"] and mixed["averaged_with_base"] == 0.25
    assert 0.0 <= mixed["averaged_val_cer"] <= 1.0 and "averaged_val_word_accuracy" in mixed
    start = load_recognizer(base).model  # the same charset: training started from exactly these weights
    best = torch.load(tmp_path / "plain" / "model.pt", map_location="cpu")["state_dict"]
    kept = torch.load(tmp_path / "mixed" / "model.pt", map_location="cpu")
    assert kept["meta"]["averaged_with_base"] == 0.25
    for key, tensor in kept["state_dict"].items():
        if tensor.is_floating_point():
            assert torch.allclose(tensor, 0.75 * best[key] + 0.25 * start.state_dict()[key], atol=1e-6), key
    assert json.loads((tmp_path / "mixed" / "m.json").read_text())["averaged_val_cer"] == mixed["averaged_val_cer"]


def test_average_with_base_out_of_range_or_without_a_base_is_refused(prepared, tmp_path):
    for knobs in ({"average_with_base": 1.0}, {"average_with_base": -0.5},
                  {"average_with_base": 0.5, "base": "scratch"}):
        with pytest.raises(ValueError, match="train.average_with_base"):
            _run(prepared, tmp_path / "bad", **SHORT, **knobs)
