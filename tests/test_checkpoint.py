"""Checkpoints: head transfer between charsets, save/load round trip, spec and architecture errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training import checkpoint as ckpt
from training.charset import Charset
from training.checkpoint import (ArchitectureMismatch, ModelSpecError, check_architecture,
                                 config_from_state_dict, load_recognizer, save_checkpoint,
                                 strip_module_prefix, transfer_head)
from training.model import Recognizer, RecognizerConfig

KOREAN = Charset.named("korean_g2")
ENGLISH = Charset.named("english_g2")
TINY = dict(output_channel=16, hidden_size=8)


@pytest.fixture(scope="module")
def english():
    return load_recognizer("english_g2")


@pytest.fixture(scope="module")
def transferred(english):
    model, info = transfer_head(english, KOREAN, seed=0)
    return model, info


def _tiny_model(charset: Charset, seed: int = 0) -> Recognizer:
    torch.manual_seed(seed)
    return Recognizer(RecognizerConfig(num_class=charset.num_class, **TINY))


# -- the base model --------------------------------------------------------------------------------

def test_english_g2_loads_offline_in_eval_mode(english):
    assert english.charset == ENGLISH and english.charset.name == "english_g2"
    assert english.config == RecognizerConfig(num_class=97)
    assert not english.model.training
    assert Path(english.meta["easyocr_file"]).name == "english_g2.pth"


def test_config_from_state_dict_reads_english_g2(english):
    raw = torch.load(english.meta["easyocr_file"], map_location="cpu", weights_only=True)
    assert any(k.startswith("module.") for k in raw)  # EasyOCR files carry DataParallel's prefix
    config = config_from_state_dict(raw)
    assert (config.num_class, config.input_channel, config.output_channel, config.hidden_size) == (97, 1, 256, 256)
    assert config.imgH == 64
    stripped = strip_module_prefix(raw)
    assert not any(k.startswith("module.") for k in stripped) and len(stripped) == len(raw)
    assert config_from_state_dict(stripped) == config
    # the loaded model holds exactly the file's weights
    for key, value in english.model.state_dict().items():
        assert torch.equal(value, stripped[key]), key


def test_config_from_state_dict_rejects_other_layouts():
    with pytest.raises(ModelSpecError, match="Prediction.weight"):
        config_from_state_dict({"FeatureExtraction.ConvNet.0.weight": torch.zeros(32, 1, 3, 3)})


def test_config_from_tiny_state_dict_round_trips():
    config = RecognizerConfig(num_class=12, output_channel=32, hidden_size=24)
    assert config_from_state_dict(Recognizer(config).state_dict()) == config


# -- head transfer ---------------------------------------------------------------------------------

def test_transfer_head_copies_shared_rows_bit_for_bit(english, transferred):
    model, info = transferred
    assert (info.old_classes, info.new_classes) == (97, 1009)
    assert info.rows_copied == 96  # blank + the 95 printable ASCII characters both charsets hold
    assert info.as_dict() == {"head_old_classes": 97, "head_new_classes": 1009, "head_rows_copied": 96}
    old_w, old_b = english.model.Prediction.weight, english.model.Prediction.bias
    new_w, new_b = model.Prediction.weight, model.Prediction.bias
    assert new_w.shape == (1009, 256) and new_b.shape == (1009,)
    assert torch.equal(new_w[0], old_w[0]) and torch.equal(new_b[0], old_b[0])  # blank to blank
    copied = 0
    for c in ENGLISH.chars:
        if c not in KOREAN.index:
            continue
        o, n = ENGLISH.index[c], KOREAN.index[c]
        assert torch.equal(new_w[n], old_w[o]), c
        assert torch.equal(new_b[n], old_b[o]), c
        copied += 1
    assert copied + 1 == info.rows_copied


def test_transfer_head_new_rows_start_below_every_old_row(english, transferred):
    model, _ = transferred
    old_b = english.model.Prediction.bias.detach()
    new_rows = [KOREAN.index[c] for c in KOREAN.chars if c not in ENGLISH.index]
    assert len(new_rows) == 1009 - 96
    new_b = model.Prediction.bias.detach()[new_rows]
    assert torch.all(new_b == old_b.min())
    new_w = model.Prediction.weight.detach()[new_rows]
    assert new_w.std() == pytest.approx(float(english.model.Prediction.weight.detach().std()), rel=0.1)


def test_transfer_head_keeps_body_bit_identical(english, transferred):
    model, _ = transferred
    base = english.model.state_dict()
    new = model.state_dict()
    body = [k for k in base if not k.startswith("Prediction.")]
    assert set(body) == {k for k in new if not k.startswith("Prediction.")}
    assert any("running_mean" in k for k in body)  # BatchNorm buffers are part of the body
    for key in body:
        assert torch.equal(new[key], base[key]), key


def test_transferred_model_reads_shared_classes_like_the_base(english, transferred):
    model, _ = transferred
    model.eval()
    torch.manual_seed(1)
    x = torch.rand(2, 1, 64, 128) * 2 - 1
    with torch.no_grad():
        base_logits = english.model(x)
        new_logits = model(x)
    pairs = KOREAN.shared_rows(ENGLISH)
    old_cols = torch.tensor([o for o, _ in pairs])
    new_cols = torch.tensor([n for _, n in pairs])
    torch.testing.assert_close(new_logits[..., new_cols], base_logits[..., old_cols], rtol=1e-4, atol=1e-4)


def test_transfer_head_is_deterministic_by_seed(english):
    a, _ = transfer_head(english, KOREAN, seed=3)
    b, _ = transfer_head(english, KOREAN, seed=3)
    c, _ = transfer_head(english, KOREAN, seed=4)
    assert torch.equal(a.Prediction.weight, b.Prediction.weight)
    assert not torch.equal(a.Prediction.weight, c.Prediction.weight)


# -- save / load -----------------------------------------------------------------------------------

def test_save_then_load_round_trips_exactly(tmp_path, transferred):
    model, info = transferred
    path = save_checkpoint(tmp_path / "run" / "model.pt", model, KOREAN, meta={"step": 7, **info.as_dict()})
    assert path == tmp_path / "run" / "model.pt" and path.is_file()
    assert not list(path.parent.glob("*.tmp"))  # the temp file was renamed, none left behind
    for spec in (str(path), str(path.parent)):  # the file, or a folder holding model.pt
        loaded = load_recognizer(spec)
        assert loaded.charset == KOREAN and loaded.charset.name == "korean_g2"
        assert loaded.config == model.config == RecognizerConfig(num_class=1009)
        assert loaded.meta == {"step": 7, **info.as_dict()}
        assert loaded.source == spec and not loaded.model.training
        saved = model.state_dict()
        restored = loaded.model.state_dict()
        assert saved.keys() == restored.keys()
        for key in saved:
            assert torch.equal(saved[key], restored[key]), key


def test_save_restores_custom_charset_and_tiny_config(tmp_path):
    cs = Charset("가나다ab", "mine")
    model = _tiny_model(cs)
    save_checkpoint(tmp_path / "m.pt", model, cs)
    loaded = load_recognizer(str(tmp_path / "m.pt"))
    assert loaded.charset.chars == "가나다ab" and loaded.charset.name == "mine"
    assert loaded.config == RecognizerConfig(num_class=6, **TINY)
    assert loaded.meta == {}


def test_save_overwrites_and_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    cs = Charset("abc", "abc")
    path = tmp_path / "model.pt"
    save_checkpoint(path, _tiny_model(cs, seed=0), cs)
    second = _tiny_model(cs, seed=1)
    save_checkpoint(path, second, cs)
    assert torch.equal(load_recognizer(str(path)).model.Prediction.weight, second.Prediction.weight)
    before = path.read_bytes()

    def killed_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(ckpt.torch, "save", killed_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _tiny_model(cs, seed=2), cs)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


AVERAGE_UNDER_A_LIMIT = """
import os, resource, sys
import torch
from kocr.cli import main
from training.charset import Charset
from training.checkpoint import save_checkpoint
from training.model import Recognizer, RecognizerConfig
folder = sys.argv[1]
cs = Charset("가나다ab", "mine")
for seed in (0, 1):
    torch.manual_seed(seed)
    save_checkpoint(f"{folder}/{seed}.pt", Recognizer(RecognizerConfig(num_class=6, output_channel=16, hidden_size=8)), cs)
limit = os.path.getsize(f"{folder}/0.pt") // 2  # half a checkpoint
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(["average-checkpoints", f"{folder}/0.pt", f"{folder}/1.pt", "--out", f"{folder}/out/mean.pt"]))
"""


def test_a_checkpoint_cut_by_a_file_size_limit_is_the_disk_full_line_naming_it(tmp_path):
    """Was: torch.save turns the EFBIG of ``ulimit -f`` (and a used-up quota's EDQUOT) into a RuntimeError
    ("unexpected pos N vs M"), which was taken for a full disk only with under 16 MiB free, so with room on
    the disk ``kocr average-checkpoints`` (and ``kocr train`` saving its state or model.pt) ended in a
    traceback instead of the one line naming the limit and the file."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", AVERAGE_UNDER_A_LIMIT, str(tmp_path)], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1] == (
        "kocr average-checkpoints: error: a file grew past the size limit (ulimit -f, or the filesystem's) writing "
        f"{tmp_path / 'out' / 'mean.pt'}; raise the limit or write elsewhere and run the same command again")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no cut checkpoint, no probe file


# -- errors ----------------------------------------------------------------------------------------

def test_check_architecture_names_both_values():
    base = RecognizerConfig(num_class=97)
    check_architecture(base, RecognizerConfig(num_class=1009), "english_g2")  # head size may differ
    with pytest.raises(ArchitectureMismatch) as info:
        check_architecture(base, RecognizerConfig(num_class=1009, hidden_size=128), "english_g2")
    message = str(info.value)
    assert "english_g2" in message and "hidden_size" in message
    assert "256" in message and "128" in message
    assert "output_channel" not in message
    with pytest.raises(ArchitectureMismatch) as info:
        check_architecture(base, RecognizerConfig(num_class=97, output_channel=512, input_channel=3), "x")
    assert "output_channel: checkpoint 256 vs config 512" in str(info.value)
    assert "input_channel: checkpoint 1 vs config 3" in str(info.value)
    with pytest.raises(ArchitectureMismatch, match="imgH: checkpoint 64 vs config 32"):  # trained at one height,
        check_architecture(base, RecognizerConfig(num_class=97, imgH=32), "x")          # read at the other


def test_unknown_spec_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSpecError) as info:
        load_recognizer("no_such_model_xyz")
    assert "'no_such_model_xyz'" in str(info.value)


def test_garbage_file_names_its_path(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00\x01not a torch file at all" * 10)
    with pytest.raises(ModelSpecError) as info:
        load_recognizer(str(path))
    assert str(path) in str(info.value)


def test_state_dict_not_named_after_a_charset_is_rejected(tmp_path):
    path = tmp_path / "my_model.pth"
    torch.save(_tiny_model(ENGLISH).state_dict(), path)
    with pytest.raises(ModelSpecError) as info:
        load_recognizer(str(path))
    assert str(path) in str(info.value) and "named after" in str(info.value)


def test_a_trainer_checkpoint_wrapping_its_weights_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "korean_g2.pth"  # EasyOCR's trainer saves {"model": ..., "optimizer": ...} in places
    torch.save({"model": _tiny_model(ENGLISH).state_dict(), "optimizer": {}}, path)
    with pytest.raises(ModelSpecError) as info:
        load_recognizer(str(path))
    assert str(info.value).startswith(f"{path}: not an EasyOCR gen-2")  # was: no path at all
    assert "under 'model'" in str(info.value)


def test_a_missing_pretrained_file_lists_every_place_looked_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("EASYOCR_MODULE_PATH", str(tmp_path / "easyocr_home"))
    with pytest.raises(ModelSpecError) as info:
        load_recognizer("korean_g2")
    for place in ckpt.pretrained_places("korean_g2"):
        assert str(place) in str(info.value)
    assert str(tmp_path / "easyocr_home" / "model" / "korean_g2.pth") in str(info.value)  # was left out


def test_a_missing_korean_g2_says_how_to_get_it_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("EASYOCR_MODULE_PATH", raising=False)
    monkeypatch.delenv("MODULE_PATH", raising=False)
    with pytest.raises(ModelSpecError) as info:
        load_recognizer("korean_g2")
    message = str(info.value)  # was: only the places looked in, nothing on where the file comes from
    assert "easyocr.Reader(['ko'])" in message and "~/.EasyOCR/model/" in message
    assert "models/pretrained/korean_g2.pth" in message and "EASYOCR_MODULE_PATH" in message
    assert "\n" not in message  # one line, as every kocr error


def _write_korean_g2_pth(path: Path, seed: int = 0) -> Recognizer:
    """A file in EasyOCR's korean_g2.pth layout (a small one): a bare state_dict of the korean_g2 head's
    1,009 classes, every key prefixed ``module.`` and every tensor tagged ``cuda:0`` as in EasyOCR's
    released files (saved from DataParallel on a GPU); loading it needs ``map_location``."""
    import collections

    import torch.serialization as serialization

    model = _tiny_model(KOREAN, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = collections.OrderedDict((f"module.{k}", v) for k, v in model.state_dict().items())
    real_tag = serialization.location_tag
    serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(state, path)
    finally:
        serialization.location_tag = real_tag
    return model


def test_korean_g2_in_the_projects_models_pretrained_is_found_from_any_folder(tmp_path, monkeypatch):
    """As ko_base is: the commands run elsewhere (kocr predict in a folder of scans) find the checkout's copy."""
    project = tmp_path / "project"
    made = _write_korean_g2_pth(project / "models" / "pretrained" / "korean_g2.pth")
    monkeypatch.setattr(ckpt, "PACKAGE_ROOT", project, raising=False)
    (tmp_path / "scans").mkdir()
    monkeypatch.chdir(tmp_path / "scans")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EASYOCR_MODULE_PATH", raising=False)
    monkeypatch.delenv("MODULE_PATH", raising=False)
    loaded = load_recognizer("korean_g2")  # was: not found, naming models/pretrained/korean_g2.pth (of ./scans)
    assert Path(loaded.path) == project / "models" / "pretrained" / "korean_g2.pth"
    assert loaded.charset == KOREAN and loaded.config.num_class == 1009
    for key, value in made.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_training_from_korean_g2_where_easyocr_keeps_it_uses_its_weights_unchanged(tmp_path, monkeypatch):
    """train.base korean_g2: ~/.EasyOCR/model/ (or $EASYOCR_MODULE_PATH/model/, first), no head transfer
    for the same charset, and the run records the name and the file's sha256."""
    import hashlib

    from training.train import TrainConfig, build_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EASYOCR_MODULE_PATH", raising=False)
    monkeypatch.delenv("MODULE_PATH", raising=False)
    monkeypatch.setattr(ckpt, "PACKAGE_ROOT", tmp_path)
    home_file = tmp_path / "home" / ".EasyOCR" / "model" / "korean_g2.pth"
    made = _write_korean_g2_pth(home_file, seed=1)
    config = TrainConfig(base="korean_g2", charset="korean_g2", **TINY)
    model, charset, info = build_model(config, seed=0)
    assert charset == KOREAN
    assert info == {"base": "korean_g2", "base_sha256": hashlib.sha256(home_file.read_bytes()).hexdigest()[:16],
                    "head_rows_copied": 1009}
    for key, value in made.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    module_file = tmp_path / "easyocr" / "model" / "korean_g2.pth"
    _write_korean_g2_pth(module_file, seed=2)
    monkeypatch.setenv("EASYOCR_MODULE_PATH", str(tmp_path / "easyocr"))
    assert load_recognizer("korean_g2").path == str(module_file)
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/easyocr, set where no shell expands it (.env, CI's env):
    monkeypatch.setenv("EASYOCR_MODULE_PATH", "~/easyocr")  # was looked for in ./~/easyocr/model
    assert load_recognizer("korean_g2").path == str(module_file)


def test_checkpoint_whose_head_misfits_its_charset_is_rejected(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, _tiny_model(Charset("abcd")), Charset("abc", "abc"))
    with pytest.raises(ArchitectureMismatch) as info:
        load_recognizer(str(path))
    assert "5 classes" in str(info.value) and "needs 4" in str(info.value)


def test_training_records_which_file_it_started_from(tmp_path):
    """build_model names the base and hashes the file it read, so a continued base keeps its lineage."""
    import hashlib

    from training.train import TrainConfig, build_model

    first = _tiny_model(KOREAN, seed=1)
    save_checkpoint(tmp_path / "a.pt", first, KOREAN)
    config = TrainConfig(base=str(tmp_path / "a.pt"), charset="korean_g2", output_channel=16, hidden_size=8)
    _, _, info = build_model(config, seed=0)
    assert info["base"] == str(tmp_path / "a.pt")
    assert info["base_sha256"] == hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest()[:16]
    save_checkpoint(tmp_path / "a.pt", _tiny_model(KOREAN, seed=2), KOREAN)  # same name, other weights
    assert build_model(config, seed=0)[2]["base_sha256"] != info["base_sha256"]


def test_a_base_under_the_users_home_written_with_a_tilde_is_found(tmp_path, monkeypatch):
    """train.base: ~/models/mine.pt in params.yaml (no shell expands it) names the file in $HOME."""
    from training.train import TrainConfig, build_model

    monkeypatch.setenv("HOME", str(tmp_path))
    save_checkpoint(tmp_path / "models" / "mine.pt", _tiny_model(KOREAN, seed=1), KOREAN)
    assert load_recognizer("~/models/mine.pt").path == str(tmp_path / "models" / "mine.pt")  # was: unknown model
    config = TrainConfig(base="~/models/mine.pt", charset="korean_g2", output_channel=16, hidden_size=8)
    assert build_model(config, seed=0)[2]["base"] == "~/models/mine.pt"  # recorded as written


def test_a_tilde_path_of_no_user_here_is_an_unknown_model_not_a_traceback():
    # `~models/mine.pt` (a slash left out): Path.expanduser raised RuntimeError "Could not determine home directory"
    with pytest.raises(ModelSpecError, match=r"unknown model '~kocr-no-such-user/mine\.pt'"):
        load_recognizer("~kocr-no-such-user/mine.pt")


def test_an_exported_easyocr_bundle_loads_as_the_checkpoint_it_was_exported_from(tmp_path, capsys):
    import shutil

    from PIL import Image

    from kocr.cli import main
    from training.export_easyocr import export_easyocr

    charset = Charset("가나다라서울ABC123", "tiny_chars")
    torch.manual_seed(0)
    model = Recognizer(RecognizerConfig(num_class=charset.num_class, imgH=32, **TINY))
    with torch.no_grad():
        model.Prediction.bias.copy_(torch.linspace(-1, 1, charset.num_class))  # some class beats the blank
    checkpoint = save_checkpoint(tmp_path / "model.pt", model.eval(), charset)
    bundle = tmp_path / "bundle"
    export_easyocr(str(checkpoint), bundle, "kocr_tiny", with_detector=True)  # craft_mlt_25k.pth has no yaml
    original = load_recognizer(str(checkpoint))
    for spec in (bundle, bundle / "model" / "kocr_tiny.pth"):
        loaded = load_recognizer(str(spec))
        assert loaded.charset.chars == charset.chars and loaded.config == original.config  # imgH 32 from the yaml
        assert all(torch.equal(v, original.model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
        assert loaded.path == str(bundle / "model" / "kocr_tiny.pth")
    # scored by evaluate-crops exactly as the checkpoint it came from
    Image.new("L", (80, 24), 255).save(tmp_path / "a.png")
    (tmp_path / "labels.tsv").write_text("image\ttext\na.png\t서울\n", encoding="utf-8")
    assert main(["evaluate-crops", "--labels", str(tmp_path / "labels.tsv"), "--model", str(checkpoint),
                 "--model", str(bundle), "--out", str(tmp_path / "out")]) == 0
    rows = (tmp_path / "out" / "readings.tsv").read_text(encoding="utf-8").splitlines()
    assert rows[1].split("\t")[2] == rows[1].split("\t")[3] != ""
    capsys.readouterr()
    # a bundle folder of two recognisers, and a .pth without its yaml, say what to pass instead
    shutil.copy(bundle / "model" / "kocr_tiny.pth", bundle / "model" / "other.pth")
    shutil.copy(bundle / "user_network" / "kocr_tiny.yaml", bundle / "user_network" / "other.yaml")
    with pytest.raises(ModelSpecError, match=r"2 recognisers \(kocr_tiny, other\); pass one, e.g. .*kocr_tiny.pth"):
        load_recognizer(str(bundle))
    (bundle / "user_network" / "other.yaml").write_text("network_params: {hidden_size: 99}\ncharacter_list: 가나\n")
    with pytest.raises(ArchitectureMismatch, match=r"other.yaml does not describe the weights.*hidden_size: yaml 99"):
        load_recognizer(str(bundle / "model" / "other.pth"))
    (bundle / "user_network" / "other.yaml").unlink()
    with pytest.raises(ModelSpecError, match=r"other.pth: neither .* nor an EasyOCR bundle's model/NAME.pth with its"):
        load_recognizer(str(bundle / "model" / "other.pth"))


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:  # a port nothing listens on: each connection is refused at once
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("command,real_process", [(["evaluate-crops", "--labels", "labels.tsv"], True),
                                                  (["predict", "a.png"], False)],
                         ids=["evaluate-crops-subprocess", "predict-in-process"])
def test_a_model_fetched_from_a_server_that_is_down_fails_within_seconds_and_says_what_it_fetched(
        tmp_path, monkeypatch, capsys, command, real_process):
    """evaluate-crops through the real entry point; predict (its own loading code, the same cap) through
    ``main`` in this process, with the same environment: no MLFLOW_HTTP_REQUEST_* of the user's."""
    import os
    import subprocess
    import sys
    import time

    from kocr.cli import main

    port = _closed_port()
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "labels.tsv").write_text("image\ttext\na.png\t서울\n", encoding="utf-8")
    for key in [k for k in os.environ if k.startswith("MLFLOW_HTTP_REQUEST")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://kim:Secret-Pw-42@127.0.0.1:{port}")
    argv = [*command, "--model", "models:/kocr-x@champion"]
    start = time.monotonic()
    if real_process:
        done = subprocess.run([sys.executable, "-m", "kocr.cli", *argv], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)  # MLflow's own retries took about 4 minutes
        code, stderr = done.returncode, done.stderr
    else:
        monkeypatch.chdir(tmp_path)
        capsys.readouterr()
        code, stderr = main(argv), capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 60
    first, last = stderr.strip().splitlines()[0], stderr.strip().splitlines()[-1]
    assert first == f"kocr: fetching models:/kocr-x@champion from http://kim:***@127.0.0.1:{port}"
    assert "cannot load 'models:/kocr-x@champion'" in last and "Secret-Pw-42" not in stderr
    assert not [k for k in os.environ if k.startswith("MLFLOW_HTTP_REQUEST")]  # the cap ended with the fetch


def test_the_fetch_caps_only_the_http_settings_the_user_left_unset(monkeypatch, capsys):
    import os

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    with ckpt.quick_fetch("models:/m@champion", "https://mlflow.example"):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == ckpt.FETCH_HTTP_SETTINGS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
    assert capsys.readouterr().err == "kocr: fetching models:/m@champion from https://mlflow.example\n"
    with ckpt.quick_fetch("runs:/x/recognizer", "sqlite:///mlruns.db"):  # local: nothing said, nothing capped
        assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert capsys.readouterr().err == ""


def test_a_model_download_the_server_answers_with_a_5xx_names_its_artifact_store(monkeypatch):
    """A champion's download (evaluate, promote, export) through an MLflow server whose artifact store is down
    ends in MLflow's "too many 500 error responses" on /mlflow-artifacts/: the one line said "cannot load …"
    with MLflow's message only (was: the artifact-store hint reached kocr's MLflow line, never this one,
    though a model's download is the artifact request kocr makes most). The message, as MLflow 3.17 raised it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    import training.checkpoint as checkpoint

    raised = ("API request to http://127.0.0.1:38917/api/2.0/mlflow-artifacts/artifacts failed with exception "
              "HTTPConnectionPool(host='127.0.0.1', port=38917): Max retries exceeded with url: /api/2.0/"
              "mlflow-artifacts/artifacts?path=1%2Fabc%2Fartifacts%2Fmodel.pt (Caused by ResponseError('too many "
              "500 error responses'))")

    def download_artifacts(**kwargs):
        raise MlflowException(raised)
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download_artifacts)
    monkeypatch.setattr(checkpoint, "reading_store", lambda uri: "sqlite:///local.db")
    with pytest.raises(checkpoint.ModelSpecError) as failed:
        checkpoint._download_mlflow_model("models:/kocr-x/3")
    assert str(failed.value) == ("cannot load 'models:/kocr-x/3' from MLflow at sqlite:///local.db: the server failed "
                                 "an artifact request (HTTP 500: most often its artifact store, mlflow server "
                                 "--artifacts-destination, e.g. s3://mlflow/artifacts, its S3 endpoint down or its "
                                 "keys refused; the server's log says what failed): " + raised)
