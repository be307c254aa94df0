"""An exponential moving average (EMA) of a model's weights, kept beside training (``train.ema_decay``).

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

from typing import Callable

import torch
from torch.optim.swa_utils import AveragedModel


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
