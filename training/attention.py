"""Attention (Attn) prediction head: an experiment option beside CTC (``model.prediction: attn``).

The head follows deep-text-recognition-benchmark's ``Attn`` stage: at each step an LSTMCell looks
at the BiLSTM context through additive attention, takes the previous character as a one-hot vector,
and a ``generator`` Linear turns its hidden state into class scores. Training feeds the true previous
character (teacher forcing); reading feeds back the argmax (greedy). Classes are ``[GO]`` (0, also
the padding of targets), ``[s]`` (1, end of text) and then the charset's characters in order, so
``num_class = len(charset) + 2``. EasyOCR reads CTC models only: an attention model trains and
evaluates inside the platform but cannot be exported (``check_exportable`` refuses it).

API for the trainer::

    codec = AttnCodec(charset)
    wanted = RecognizerConfig(num_class=num_class_for(charset, "attn"), prediction="attn", ...)
    model, info = checkpoint.start_from(load_recognizer(base), wanted, charset, seed)  # or Recognizer(wanted)
    # training step (batch_max_length L must be >= the longest label; CTC's 0 = "no limit" does not apply)
    decoder_input, target = codec.encode(batch.labels, L)                  # LongTensor [B, L+1] each
    logits = model(images, decoder_input.to(device), is_train=True, batch_max_length=L)  # [B, L+1, C]
    loss = attention_loss(logits, target.to(device))
    # validation / reading: greedy, no labels needed
    texts = codec.decode(model(images, is_train=False, batch_max_length=L))

Example:
    >>> from training.charset import Charset
    >>> codec = AttnCodec(Charset("가나다", "tiny"))
    >>> decoder_input, target = codec.encode(["나다"], batch_max_length=3)
    >>> decoder_input.tolist(), target.tolist()
    ([[0, 3, 4, 1]], [[3, 4, 1, 0]])
    >>> codec.decode_indices(target.tolist())
    ['나다']
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.charset import Charset

GO, EOS = "[GO]", "[s]"
GO_INDEX, EOS_INDEX = 0, 1
PAD_INDEX = GO_INDEX  # [GO] is never a target, so it doubles as the padding the loss ignores


def num_class_for(charset: Charset, prediction: str) -> int:
    """Output classes of a ``prediction`` head ("ctc" or "attn") over ``charset``."""
    if prediction == "ctc":
        return charset.num_class
    if prediction == "attn":
        return len(charset) + 2
    raise ValueError(f"model.prediction {prediction!r}: expected ctc or attn")


class AttnCodec:
    """Labels to decoder inputs and targets, and class scores back to text, for the attention head."""

    def __init__(self, charset: Charset) -> None:
        self.charset = charset
        self.tokens = [GO, EOS, *charset.chars]

    @property
    def num_class(self) -> int:
        """``[GO]``, ``[s]`` and every character."""
        return len(self.tokens)

    def encode(self, labels: Sequence[str], batch_max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder_input, target), LongTensors of shape (B, batch_max_length + 1).

        ``decoder_input`` is ``[GO] c1 … cn`` and ``target`` is ``c1 … cn [s]``, both padded with
        ``PAD_INDEX``. Raises ValueError for a label longer than ``batch_max_length`` and KeyError
        naming a character outside the charset.
        """
        if batch_max_length < 1:
            raise ValueError(f"batch_max_length must be at least 1 for the attention head, got {batch_max_length}")
        rows = torch.full((len(labels), batch_max_length + 2), PAD_INDEX, dtype=torch.long)
        for i, label in enumerate(labels):
            if len(label) > batch_max_length:
                raise ValueError(f"label {label!r} has {len(label)} characters, more than "
                                 f"batch_max_length {batch_max_length}")
            ids = [c + 1 for c in self.charset.encode(label)] + [EOS_INDEX]  # charset class i -> token i + 1
            rows[i, 1:1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
        return rows[:, :-1], rows[:, 1:]

    def decode_indices(self, rows: Iterable[Iterable[int]]) -> list[str]:
        """Text of each row of token indices, up to its first ``[s]`` (``[GO]`` tokens are skipped)."""
        texts = []
        for row in rows:
            chars = []
            for i in row:
                i = int(i)
                if i == EOS_INDEX:
                    break
                if i != GO_INDEX:
                    chars.append(self.tokens[i])
            texts.append("".join(chars))
        return texts

    def decode(self, logits: torch.Tensor) -> list[str]:
        """Greedy text of (B, steps, num_class) scores: the argmax of each step, stopping at ``[s]``."""
        if logits.dim() != 3 or logits.shape[2] != self.num_class:
            raise ValueError(f"expected logits (batch, steps, {self.num_class}), got {tuple(logits.shape)}")
        return self.decode_indices(logits.argmax(2).tolist())


def attention_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the non-padding positions of ``target`` (B, steps); padding is ignored."""
    if logits.shape[:2] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match target {tuple(target.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[2]), target.reshape(-1), ignore_index=PAD_INDEX)


class AttentionCell(nn.Module):
    """One decoding step: additive attention over the context, then an LSTMCell on [glimpse, one-hot]."""

    def __init__(self, input_size: int, hidden_size: int, num_embeddings: int) -> None:
        super().__init__()
        self.i2h = nn.Linear(input_size, hidden_size, bias=False)
        self.h2h = nn.Linear(hidden_size, hidden_size)
        self.score = nn.Linear(hidden_size, 1, bias=False)
        self.rnn = nn.LSTMCell(input_size + num_embeddings, hidden_size)

    def forward(self, state: tuple[torch.Tensor, torch.Tensor], context: torch.Tensor, context_proj: torch.Tensor,
                onehot: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Next (h, c) and the attention weights (B, T, 1); ``context_proj`` is ``i2h(context)``."""
        energy = self.score(torch.tanh(context_proj + self.h2h(state[0]).unsqueeze(1)))  # B, T, 1
        alpha = torch.softmax(energy, dim=1)
        glimpse = torch.bmm(alpha.transpose(1, 2), context).squeeze(1)                  # B, input_size
        return self.rnn(torch.cat([glimpse, onehot], dim=1), state), alpha


class AttentionHead(nn.Module):
    """The ``Prediction`` module of an attention recogniser: ``attention_cell`` + ``generator``."""

    def __init__(self, input_size: int, hidden_size: int, num_class: int) -> None:
        super().__init__()
        self.hidden_size, self.num_class = hidden_size, num_class
        self.attention_cell = AttentionCell(input_size, hidden_size, num_class)
        self.generator = nn.Linear(hidden_size, num_class)

    def forward(self, context: torch.Tensor, text: torch.Tensor | None = None, is_train: bool = False,
                batch_max_length: int = 25) -> torch.Tensor:
        """Scores (B, batch_max_length + 1, num_class) for context (B, T, input_size).

        With ``is_train``, ``text`` (the codec's decoder_input, (B, batch_max_length + 1)) is fed step
        by step (teacher forcing); otherwise each step's argmax is fed to the next, starting at ``[GO]``.
        """
        batch, steps = context.shape[0], batch_max_length + 1
        state = (context.new_zeros(batch, self.hidden_size), context.new_zeros(batch, self.hidden_size))
        context_proj = self.attention_cell.i2h(context)
        if is_train:
            if text is None or tuple(text.shape) != (batch, steps):
                got = "none" if text is None else tuple(text.shape)
                raise ValueError(f"teacher forcing needs text of shape ({batch}, {steps}) "
                                 f"(batch_max_length {batch_max_length} + 1), got {got}")
            hiddens = []
            for step in range(steps):
                onehot = F.one_hot(text[:, step], self.num_class).to(context.dtype)
                state, _ = self.attention_cell(state, context, context_proj, onehot)
                hiddens.append(state[0])
            return self.generator(torch.stack(hiddens, dim=1))
        token = torch.full((batch,), GO_INDEX, dtype=torch.long, device=context.device)
        scores = []
        for _ in range(steps):
            onehot = F.one_hot(token, self.num_class).to(context.dtype)
            state, _ = self.attention_cell(state, context, context_proj, onehot)
            step_scores = self.generator(state[0])
            scores.append(step_scores)
            token = step_scores.argmax(1)
        return torch.stack(scores, dim=1)
