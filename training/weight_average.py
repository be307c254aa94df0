"""Averages of a model's weights: an exponential moving average kept beside training (``train.ema_decay``),
and the plain weighted mean of finished checkpoints (``kocr average-checkpoints``).

The averaged copy is :class:`torch.optim.swa_utils.AveragedModel` with BatchNorm statistics averaged
too (``use_buffers``). Its decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates,
so early validations are not dominated by the starting weights when training starts far from them.

Example:
    >>> import torch
    >>> ema = make_ema(torch.nn.Linear(2, 1), 0.99)
    >>> ema.module.weight.shape
    torch.Size([1, 2])
    >>> make_ema(torch.nn.Linear(2, 1), 0.0) is None
    True
"""

from __future__ import annotations

import math

from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch.optim.swa_utils import AveragedModel

from training.model import Recognizer

if TYPE_CHECKING:
    from training.checkpoint import LoadedRecognizer


def warmed_decay(decay: float, updates: int) -> float:
    """The decay used after ``updates`` earlier updates: ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1 + updates) / (10 + updates))


def ema_update(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """The ``multi_avg_fn`` of :class:`AveragedModel`: ``avg <- d * avg + (1 - d) * current``.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are copied, not averaged.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        weight = 1.0 - warmed_decay(decay, int(num_averaged))
        if averaged and (averaged[0].is_floating_point() or averaged[0].is_complex()):
            torch._foreach_lerp_(averaged, current, weight)
        else:
            for mine, theirs in zip(averaged, current):
                mine.copy_(theirs)

    return update


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """An EMA copy of ``model`` to ``update_parameters(model)`` after each optimizer step; None when ``decay`` is 0."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"train.ema_decay {decay}: expected 0 (off) or a value in (0, 1), e.g. 0.999")
    if decay == 0.0:
        return None
    return AveragedModel(model, multi_avg_fn=ema_update(decay), use_buffers=True)


def average_recognizers(loaded: Sequence["LoadedRecognizer"],
                        weights: Sequence[float] | None = None) -> Recognizer:
    """One recogniser whose every floating-point tensor is the weighted mean of ``loaded``'s.

    Weights, biases and BatchNorm running statistics are averaged; integer buffers
    (``num_batches_tracked``) come from the first. ``weights`` (default: equal) are normalised to
    sum to 1. Meant for checkpoints trained from a common start (a "soup"); all must have the same
    architecture and charset, else :class:`~training.checkpoint.ArchitectureMismatch` names the
    one that differs.
    """
    from training.checkpoint import ArchitectureMismatch

    if len(loaded) < 2:
        raise ValueError(f"averaging needs at least two checkpoints, got {len(loaded)}")
    weights = [1.0] * len(loaded) if weights is None else list(weights)
    # NaN passes both comparisons (and inf normalises to NaN): either gave a checkpoint of NaN weights
    if (len(weights) != len(loaded) or not all(math.isfinite(w) and w >= 0 for w in weights)
            or not 0 < sum(weights) < math.inf):
        raise ValueError(f"weights {weights}: expected {len(loaded)} non-negative finite numbers, not all 0")
    first = loaded[0]
    for other in loaded[1:]:
        # a charset of another size makes a head of another size: named as the charset, not as num_class
        if replace(other.config, num_class=first.config.num_class) != first.config:
            raise ArchitectureMismatch(f"{other.source}: architecture {other.config} differs from "
                                       f"{first.source}'s {first.config}")
        if other.charset.chars != first.charset.chars:
            raise ArchitectureMismatch(f"{other.source}: charset {other.charset.name} "
                                       f"({len(other.charset.chars)} characters) differs from {first.source}'s "
                                       f"{first.charset.name} ({len(first.charset.chars)})")
        if other.config != first.config:  # the same charset with a head of another size: a damaged checkpoint
            raise ArchitectureMismatch(f"{other.source}: architecture {other.config} differs from "
                                       f"{first.source}'s {first.config}")
    model = Recognizer(first.config)
    model.load_state_dict(mean_state_dict([item.model.state_dict() for item in loaded], weights))
    return model.eval()


def mean_state_dict(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The weighted mean (``weights`` normalised to sum 1) of same-shaped state dicts' floating-point
    tensors, on the first's device and dtype; other tensors (integer buffers) are the first's."""
    total = float(sum(weights))
    mean = {}
    with torch.no_grad():
        for key, tensor in states[0].items():
            if tensor.is_floating_point():
                parts = [(w / total) * state[key].to(tensor.device, torch.float32) for w, state in zip(weights, states)]
                mean[key] = torch.stack(parts).sum(0).to(tensor.dtype)
            else:
                mean[key] = tensor.clone()
    return mean
