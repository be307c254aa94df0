"""The attention head: codec, loss, a tiny model that learns to read, checkpoints, head start, export refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from training.attention import (EOS_INDEX, GO_INDEX, PAD_INDEX, AttentionHead, AttnCodec, attention_loss,
                                 num_class_for)
from training.charset import Charset
from training.checkpoint import (ArchitectureMismatch, LoadedRecognizer, check_architecture, config_from_state_dict,
                                 load_recognizer, save_checkpoint, start_attention_from, start_from, transfer_head)
from training.model import Recognizer, RecognizerConfig

KOREAN = Charset.named("korean_g2")
ENGLISH = Charset.named("english_g2")
TINY = dict(output_channel=16, hidden_size=16)


@pytest.fixture
def one_thread():
    """Tiny models train several times faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def english():
    return load_recognizer("english_g2")


def _attn_model(charset: Charset, seed: int = 0, **arch) -> Recognizer:
    torch.manual_seed(seed)
    config = RecognizerConfig(num_class=num_class_for(charset, "attn"), prediction="attn", **{**TINY, **arch})
    return Recognizer(config)


# -- codec and loss --------------------------------------------------------------------------------

def test_codec_tokens_and_class_count():
    codec = AttnCodec(KOREAN)
    assert codec.num_class == num_class_for(KOREAN, "attn") == 1010 == KOREAN.num_class + 1
    assert codec.tokens[GO_INDEX] == "[GO]" and codec.tokens[EOS_INDEX] == "[s]"
    assert codec.tokens[2:] == list(KOREAN.chars)
    assert num_class_for(KOREAN, "ctc") == 1009
    with pytest.raises(ValueError, match="'rnn'"):
        num_class_for(KOREAN, "rnn")


def test_encode_decode_round_trip_with_hangul_and_max_length_labels():
    codec = AttnCodec(KOREAN)
    labels = ["서울특별시", "김해시", "A-12", "", "가"]
    decoder_input, target = codec.encode(labels, batch_max_length=5)
    assert decoder_input.shape == target.shape == (5, 6) and target.dtype == torch.long
    assert torch.all(decoder_input[:, 0] == GO_INDEX)
    assert torch.equal(decoder_input[:, 1:], target[:, :-1])  # the decoder sees the previous target
    # "서울특별시" fills every step: five characters then [s], no padding
    assert target[0].tolist() == [KOREAN.index[c] + 1 for c in "서울특별시"] + [EOS_INDEX]
    assert target[3].tolist() == [EOS_INDEX] + [PAD_INDEX] * 5  # the empty label is just [s]
    assert codec.decode_indices(target.tolist()) == labels
    one_hot = torch.nn.functional.one_hot(target, codec.num_class).float()
    assert codec.decode(one_hot) == labels


def test_decode_stops_at_end_token_and_skips_go():
    codec = AttnCodec(Charset("가나다", "t"))
    rows = [[2, GO_INDEX, 3, EOS_INDEX, 4, 4], [EOS_INDEX, 2], [4, 4, 4]]
    assert codec.decode_indices(rows) == ["가나", "", "다다다"]
    with pytest.raises(ValueError, match="6"):
        codec.decode(torch.zeros(1, 3, 6))  # 3 characters + 2 tokens = 5 classes


def test_encode_rejects_long_labels_and_unknown_characters():
    codec = AttnCodec(KOREAN)
    with pytest.raises(ValueError) as info:
        codec.encode(["서울", "서울특별시청"], batch_max_length=5)
    assert "'서울특별시청'" in str(info.value) and "batch_max_length 5" in str(info.value)
    with pytest.raises(KeyError, match="'😀'"):
        codec.encode(["서울😀"], batch_max_length=5)
    with pytest.raises(ValueError, match="at least 1"):
        codec.encode(["a"], batch_max_length=0)


def test_loss_ignores_padding_positions():
    codec = AttnCodec(Charset("가나다라", "t"))
    _, target = codec.encode(["가나다", "라"], batch_max_length=4)  # row 1 pads steps 2..4
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, codec.num_class, generator=generator)
    loss = attention_loss(logits, target)
    real = target != PAD_INDEX
    manual = torch.nn.functional.cross_entropy(logits[real], target[real])
    torch.testing.assert_close(loss, manual)
    padded = logits.clone()
    padded[1, 3] += torch.randn(codec.num_class, generator=generator) * 10
    assert target[1, 3] == PAD_INDEX and torch.equal(attention_loss(padded, target), loss)
    changed = logits.clone()
    changed[1, 1] += torch.randn(codec.num_class, generator=generator) * 10  # the [s] step of "라" counts
    assert not torch.allclose(attention_loss(changed, target), loss)


# -- the model ---------------------------------------------------------------------------------------

def test_attention_recognizer_shapes_and_teacher_forcing_checks():
    cs = Charset("가나다", "t")
    model = _attn_model(cs).eval()
    assert isinstance(model.Prediction, AttentionHead)
    x = torch.rand(2, 1, 64, 128)
    with torch.no_grad():
        assert model(x, batch_max_length=7).shape == (2, 8, 5)
        decoder_input, _ = AttnCodec(cs).encode(["가", "나다"], 7)
        assert model(x, decoder_input, is_train=True, batch_max_length=7).shape == (2, 8, 5)
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        model(x, decoder_input, is_train=True, batch_max_length=3)
    with pytest.raises(ValueError, match="none"):
        model(x, is_train=True, batch_max_length=7)
    with pytest.raises(ValueError, match="'transformer'"):
        RecognizerConfig(num_class=5, prediction="transformer")


def test_greedy_decoding_feeds_back_its_own_argmax():
    """Greedy scores equal teacher-forced scores when the teacher forces the greedy path itself."""
    model = _attn_model(Charset("가나다라마바사", "t"), seed=4).eval()
    x = torch.rand(3, 1, 64, 128)
    with torch.no_grad():
        greedy = model(x, batch_max_length=6)
        path = greedy.argmax(2)
        assert (path[:, :-1] != GO_INDEX).any()  # a non-[GO] token is fed back, or the check says nothing
        forced_input = torch.cat([torch.full((3, 1), GO_INDEX), path[:, :-1]], dim=1)
        forced = model(x, forced_input, is_train=True, batch_max_length=6)
        torch.testing.assert_close(forced, greedy)
        always_go = model(x, torch.full((3, 7), GO_INDEX), is_train=True, batch_max_length=6)
        assert not torch.allclose(always_go, greedy)


def test_ctc_forward_ignores_the_attention_arguments():
    model = Recognizer(RecognizerConfig(num_class=6, **TINY)).eval()
    assert isinstance(model.Prediction, torch.nn.Linear)
    x = torch.rand(2, 1, 64, 96)
    with torch.no_grad():
        plain = model(x)
        assert plain.shape == (2, 23, 6)
        assert torch.equal(model(x, torch.zeros(2, 26, dtype=torch.long), is_train=True, batch_max_length=3), plain)


def _render(words: list[str], height: int = 32) -> torch.Tensor:
    from training.data.fonts import find_fonts, load_font
    from training.data.transforms import collate_crops, prepare_crop

    font = load_font(find_fonts(["NanumGothic.ttf"])[0], 28)
    crops = []
    for word in words:
        image = Image.new("L", (140, 40), 255)
        ImageDraw.Draw(image).text((6, 4), word, font=font, fill=0)
        crops.append(prepare_crop(np.asarray(image), height))
    return collate_crops(crops, height)


def test_tiny_attention_model_learns_to_read_four_words(one_thread):
    """Teacher-forced training and greedy decoding agree: after training, decoding returns the labels."""
    words = ["서울", "김해시", "2026", "행정"]
    charset = Charset("".join(dict.fromkeys("".join(words))), "words")
    codec = AttnCodec(charset)
    images = _render(words)
    model = _attn_model(charset, seed=0, output_channel=32, hidden_size=32, imgH=32)  # seeds 0-4 read by ~150 steps
    decoder_input, target = codec.encode(words, batch_max_length=4)  # "2026" fills every step
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, read = [], []
    for step in range(400):
        model.train()
        loss = attention_loss(model(images, decoder_input, is_train=True, batch_max_length=4), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step >= 50 and step % 10 == 0:
            model.eval()
            with torch.no_grad():
                read = codec.decode(model(images, batch_max_length=4))
            if read == words:
                break
    assert read == words, f"after {step + 1} steps (loss {losses[-1]:.3f}) the model reads {read}"
    assert losses[-1] < losses[0] / 5


# -- checkpoints -------------------------------------------------------------------------------------

def test_attention_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    cs = Charset("가나다라마ab", "mine")
    model = _attn_model(cs, seed=1).eval()
    path = save_checkpoint(tmp_path / "model.pt", model, cs, meta={"prediction": "attn"})
    loaded = load_recognizer(str(path))
    assert loaded.config == model.config and loaded.config.prediction == "attn"
    assert loaded.config.num_class == 9 and loaded.charset == cs
    assert config_from_state_dict(model.state_dict()) == model.config  # the head type is read off the keys
    x = torch.rand(3, 1, 64, 160)
    decoder_input, _ = AttnCodec(cs).encode(["가나", "ab", "마"], 6)
    with torch.no_grad():
        assert torch.equal(loaded.model(x, batch_max_length=6), model(x, batch_max_length=6))
        assert torch.equal(loaded.model(x, decoder_input, is_train=True, batch_max_length=6),
                           model(x, decoder_input, is_train=True, batch_max_length=6))


def test_checkpoint_config_and_weights_must_agree_on_the_head(tmp_path):
    cs = Charset("abc", "abc")
    payload_path = save_checkpoint(tmp_path / "model.pt", _attn_model(cs), cs)
    payload = torch.load(payload_path, weights_only=True)
    payload["config"]["prediction"] = "ctc"
    torch.save(payload, tmp_path / "lying.pt")
    with pytest.raises(ArchitectureMismatch) as info:
        load_recognizer(str(tmp_path / "lying.pt"))
    assert "lying.pt" in str(info.value) and "ctc" in str(info.value) and "attn" in str(info.value)
    # a checkpoint written before the attention head existed has no prediction key: read as CTC
    save_checkpoint(tmp_path / "old.pt", Recognizer(RecognizerConfig(num_class=4, **TINY)), cs)
    payload = torch.load(tmp_path / "old.pt", weights_only=True)
    del payload["config"]["prediction"]
    torch.save(payload, tmp_path / "old.pt")
    assert load_recognizer(str(tmp_path / "old.pt")).config.prediction == "ctc"


def test_check_architecture_names_ctc_and_attn():
    ctc = RecognizerConfig(num_class=97)
    attn = RecognizerConfig(num_class=1010, prediction="attn")
    with pytest.raises(ArchitectureMismatch) as info:
        check_architecture(ctc, attn, "english_g2")
    assert "english_g2" in str(info.value) and "prediction: checkpoint ctc vs config attn" in str(info.value)
    check_architecture(ctc, attn, "english_g2", compare_prediction=False)  # the trunk fits


def test_head_start_from_english_g2_keeps_the_trunk_bit_identical(english):
    before = {k: v.clone() for k, v in english.model.state_dict().items()}
    model, info = start_attention_from(english, KOREAN, seed=0)
    assert model.config == RecognizerConfig(num_class=1010, prediction="attn")
    assert isinstance(model.Prediction, AttentionHead)
    base, new = english.model.state_dict(), model.state_dict()
    trunk = [k for k in base if not k.startswith("Prediction.")]
    assert any("running_var" in k for k in trunk) and any(k.startswith("SequenceModeling.") for k in trunk)
    assert set(trunk) == {k for k in new if not k.startswith("Prediction.")}
    for key in trunk:
        assert torch.equal(new[key], base[key]), key
    assert info["kept_modules"] == "FeatureExtraction,SequenceModeling" and info["kept_tensors"] == len(trunk)
    assert (info["head_old_prediction"], info["head_old_classes"], info["head_new_classes"]) == ("ctc", 97, 1010)
    assert all(torch.equal(v, before[k]) for k, v in english.model.state_dict().items())  # base untouched
    # the fresh head depends on the seed only, not on the global RNG
    torch.manual_seed(123)
    again, _ = start_attention_from(english, KOREAN, seed=0)
    other, _ = start_attention_from(english, KOREAN, seed=1)
    gen = "Prediction.generator.weight"
    assert torch.equal(again.state_dict()[gen], new[gen]) and not torch.equal(other.state_dict()[gen], new[gen])
    # start_from picks this path for an attn run on a CTC checkpoint and refuses the reverse
    via, _ = start_from(english, RecognizerConfig(num_class=1010, prediction="attn"), KOREAN, seed=0)
    assert torch.equal(via.state_dict()[gen], new[gen])
    loaded_attn = LoadedRecognizer(model, KOREAN, model.config, "attn.pt")
    with pytest.raises(ArchitectureMismatch, match="prediction: checkpoint attn vs config ctc"):
        start_from(loaded_attn, RecognizerConfig(num_class=1009), KOREAN)


def test_attention_head_moves_to_a_new_charset_keeping_shared_tokens(tmp_path):
    old_cs, new_cs = Charset("가나다ab", "old"), Charset("라b나", "new")
    path = save_checkpoint(tmp_path / "m.pt", _attn_model(old_cs, seed=2), old_cs)
    base = load_recognizer(str(path))
    model, transfer = transfer_head(base, new_cs, seed=0)
    assert model.config.num_class == 5 and model.config.prediction == "attn"
    assert (transfer.old_classes, transfer.new_classes, transfer.rows_copied) == (7, 5, 4)  # [GO] [s] 나 b
    old, new = base.model.state_dict(), model.state_dict()
    pairs = [(0, 0), (1, 1), (3, 4), (6, 3)]  # old token -> new token: [GO], [s], 나, b
    width = TINY["hidden_size"]  # the LSTMCell input is [glimpse (hidden), one-hot (classes)]
    for o, n in pairs:
        assert torch.equal(new["Prediction.generator.weight"][n], old["Prediction.generator.weight"][o])
        assert torch.equal(new["Prediction.generator.bias"][n], old["Prediction.generator.bias"][o])
        ih_old, ih_new = old["Prediction.attention_cell.rnn.weight_ih"], new["Prediction.attention_cell.rnn.weight_ih"]
        assert torch.equal(ih_new[:, width + n], ih_old[:, width + o])
    assert torch.equal(ih_new[:, :width], ih_old[:, :width])
    for key in old:
        if key not in ("Prediction.generator.weight", "Prediction.generator.bias",
                       "Prediction.attention_cell.rnn.weight_ih"):
            assert torch.equal(new[key], old[key]), key
    assert new["Prediction.generator.bias"][2] == old["Prediction.generator.bias"].min()  # 라 is new


# -- export ------------------------------------------------------------------------------------------

def test_export_easyocr_refuses_an_attention_checkpoint(tmp_path, monkeypatch, capsys):
    # main() in this process: the real `kocr export-easyocr` entry point is run by tests/test_cli.py
    from kocr.cli import main

    cs = Charset("가나다", "t")
    path = save_checkpoint(tmp_path / "attn" / "model.pt", _attn_model(cs), cs)
    out = tmp_path / "bundle"
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = main(["export-easyocr", "--model", str(path), "--out", str(out)])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr
    assert str(path) in lines[0] and "CTC models only" in lines[0] and "model.prediction: ctc" in lines[0]
    assert not out.exists()  # refused before anything was written
