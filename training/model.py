"""EasyOCR generation-2 recogniser (None-VGG-BiLSTM-CTC) with EasyOCR's state_dict key layout.

Keys: ``FeatureExtraction.ConvNet.*``, ``SequenceModeling.{0,1}.{rnn,linear}.*``, ``Prediction.*``,
so a state_dict loads into ``easyocr.model.vgg_model.Model`` and back. ``prediction="attn"`` swaps
the CTC Linear for an attention decoder (``training/attention.py``, an experiment EasyOCR cannot read).

Example:
    >>> import torch
    >>> m = Recognizer(RecognizerConfig(num_class=1009))
    >>> m(torch.zeros(2, 1, 64, 128)).shape
    torch.Size([2, 31, 1009])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RecognizerConfig:
    """Architecture knobs; the defaults are EasyOCR gen-2 (korean_g2 / english_g2)."""

    num_class: int
    input_channel: int = 1
    output_channel: int = 256
    hidden_size: int = 256
    imgH: int = 64
    prediction: str = "ctc"  # ctc | attn

    def __post_init__(self) -> None:
        if self.prediction not in ("ctc", "attn"):
            raise ValueError(f"model.prediction {self.prediction!r}: expected ctc or attn")

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)

    def network_params(self) -> dict[str, int]:
        """The ``network_params`` block of an EasyOCR custom-model YAML."""
        return {"input_channel": self.input_channel, "output_channel": self.output_channel,
                "hidden_size": self.hidden_size}


class BidirectionalLSTM(nn.Module):
    """BiLSTM followed by a linear projection (``rnn`` and ``linear`` as in EasyOCR)."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(input_size, hidden_size, bidirectional=True, batch_first=True)
        self.linear = nn.Linear(hidden_size * 2, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # as EasyOCR's own BiLSTM does: under torch.nn.DataParallel (EasyOCR wraps the recogniser in it
        # on GPU) each replica's LSTM weights are no longer one contiguous block, and cuDNN warns and
        # copies them on every call; a no-op on CPU. EasyOCR's int8 (dynamic quantized) LSTM has no
        # flatten_parameters, so it is skipped there rather than failing the bundle on CPU.
        flatten = getattr(self.rnn, "flatten_parameters", None)
        if flatten is not None:
            flatten()
        recurrent, _ = self.rnn(x)
        return self.linear(recurrent)


class VGGFeatureExtractor(nn.Module):
    """EasyOCR's VGG trunk: height /16 then a 2x2 valid conv, width /4 - 1."""

    def __init__(self, input_channel: int, output_channel: int) -> None:
        super().__init__()
        c = [output_channel // 8, output_channel // 4, output_channel // 2, output_channel]
        self.ConvNet = nn.Sequential(
            nn.Conv2d(input_channel, c[0], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(c[0], c[1], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(c[1], c[2], 3, 1, 1), nn.ReLU(True),
            nn.Conv2d(c[2], c[2], 3, 1, 1), nn.ReLU(True), nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[2], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(True),
            nn.Conv2d(c[3], c[3], 3, 1, 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(True),
            nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c[3], c[3], 2, 1, 0), nn.ReLU(True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ConvNet(x)


class Recognizer(nn.Module):
    """None-VGG-BiLSTM-CTC (or -Attn). ``forward(images, text=None)`` returns logits (batch, time, num_class).

    With ``prediction="attn"`` the time axis is the decoder's ``batch_max_length + 1`` steps and
    ``text``/``is_train`` drive teacher forcing (see ``training.attention``); CTC ignores both.
    """

    def __init__(self, config: RecognizerConfig) -> None:
        super().__init__()
        self.config = config
        self.FeatureExtraction = VGGFeatureExtractor(config.input_channel, config.output_channel)
        self.AdaptiveAvgPool = nn.AdaptiveAvgPool2d((None, 1))
        self.SequenceModeling = nn.Sequential(
            BidirectionalLSTM(config.output_channel, config.hidden_size, config.hidden_size),
            BidirectionalLSTM(config.hidden_size, config.hidden_size, config.hidden_size))
        if config.prediction == "attn":
            from training.attention import AttentionHead  # imported here: EasyOCR bundles are CTC-only

            self.Prediction = AttentionHead(config.hidden_size, config.hidden_size, config.num_class)
        else:
            self.Prediction = nn.Linear(config.hidden_size, config.num_class)

    def forward(self, images: torch.Tensor, text: torch.Tensor | None = None, is_train: bool = False,
                batch_max_length: int = 25) -> torch.Tensor:
        # ``text`` is accepted (and ignored by CTC) because EasyOCR calls model(image, text_for_pred).
        feature = self.FeatureExtraction(images)                      # B, C, H', W'
        feature = self.AdaptiveAvgPool(feature.permute(0, 3, 1, 2))   # B, W', C, 1
        context = self.SequenceModeling(feature.squeeze(3))           # B, W', hidden
        if self.config.prediction == "attn":
            return self.Prediction(context.contiguous(), text, is_train, batch_max_length)
        return self.Prediction(context.contiguous())


def output_length(width: int) -> int:
    """Time steps the model emits for an input of ``width`` pixels."""
    return width // 4 - 1
