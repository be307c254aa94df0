"""Optimizers and learning-rate schedules of the train stage.

Optimizers: Adadelta (lr 1.0, rho 0.95, eps 1e-8: how users run EasyOCR's trainer today), Adam,
AdamW. Schedules (``train.schedule``), each with ``train.warmup_steps`` of linear warm-up:
``constant`` (warm-up then the set lr), ``cosine`` (warm-up then cosine decay to
``MIN_LR_RATIO`` x lr at the last step), ``onecycle`` (PyTorch's OneCycleLR; its warm-up fraction
is warmup_steps / steps, 30% when 0).

Example:
    >>> w = torch.nn.Parameter(torch.zeros(1))
    >>> opt = torch.optim.SGD([w], lr=1.0)
    >>> s = make_scheduler(opt, "cosine", warmup_steps=2, total_steps=10)
    >>> opt.param_groups[0]["lr"]
    0.5
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine", "onecycle")
OPTIMIZERS = ("adadelta", "adam", "adamw")
MIN_LR_RATIO = 0.01


def make_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer over the parameters that require gradients (frozen parts are left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, rho=0.95, eps=1e-8, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"train.optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str = "constant", warmup_steps: int = 0,
                   total_steps: int = 1) -> torch.optim.lr_scheduler.LRScheduler:
    """The lr schedule, stepped once per optimizer step."""
    if kind == "onecycle":
        peak = [group["lr"] for group in optimizer.param_groups]
        pct = warmup_steps / total_steps if warmup_steps > 0 else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=max(total_steps, 2),
                                                   pct_start=min(max(pct, 1e-3), 0.99), anneal_strategy="cos",
                                                   cycle_momentum=False)
    if kind not in SCHEDULES:
        raise ValueError(f"train.schedule {kind!r}: expected one of {', '.join(SCHEDULES)}")

    def factor(done: int) -> float:
        if warmup_steps > 0 and done < warmup_steps:
            return (done + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        span = max(total_steps - warmup_steps - 1, 1)
        progress = min(max(done - warmup_steps, 0) / span, 1.0)
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
