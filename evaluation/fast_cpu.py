"""Faster CPU forward passes for EasyOCR's CRAFT detector and the recogniser, same weights, same readings.

``accelerate(model)`` returns an inference copy of a network whose layers are swapped in place, so
the network's own ``forward`` (and its in-place ReLUs) run unchanged:

- ``nn.MaxPool2d`` -> :class:`ExactMaxPool`: the same maxima taken over strided views; bit for bit
  the output of ``max_pool2d``, without the index bookkeeping that makes PyTorch's CPU pool slow.
- with ``winograd=True`` (the detector): Conv2d + BatchNorm2d folded into one convolution; 3x3
  stride-1 convolutions through NNPACK's Winograd kernels (about 5x fewer multiplications than a
  direct convolution); 1x1 convolutions as one matrix product. The heatmap moves by a few 1e-6
  (float32 rounding), far below the score thresholds; ``tests/test_fast_cpu.py`` holds the boxes
  to easyocr's on real pages.

Example:
    >>> net = accelerate(get_detector("craft_mlt_25k.pth", quantize=False), winograd=True)  # doctest: +SKIP
    >>> fast = accelerate(loaded.model)       # exact pools only: bit-identical logits   # doctest: +SKIP
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def nnpack_ready() -> bool:
    """Whether NNPACK can run here; also initialises it (its convolution fails before that)."""
    try:
        return bool(torch._nnpack_available())
    except (AttributeError, RuntimeError):
        return False


class ExactMaxPool(nn.Module):
    """``nn.MaxPool2d`` as elementwise maxima of strided views: identical values, several times faster."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        self.pool = pool
        self.kernel, self.padding = _pair(pool.kernel_size), _pair(pool.padding)
        self.stride = _pair(pool.stride if pool.stride else pool.kernel_size)
        self.supported = _pair(pool.dilation) == (1, 1) and not pool.ceil_mode and not pool.return_indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.supported or x.dim() != 4 or not x.is_floating_point():
            return self.pool(x)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph), value=float("-inf"))
        rows, cols = (x.shape[-2] - kh) // sh + 1, (x.shape[-1] - kw) // sw + 1
        if rows < 1 or cols < 1:
            return self.pool(x)
        out = x[..., 0:sh * (rows - 1) + 1:sh, :]
        for i in range(1, kh):
            out = torch.maximum(out, x[..., i:i + sh * (rows - 1) + 1:sh, :])
        result = out[..., 0:sw * (cols - 1) + 1:sw]
        for j in range(1, kw):
            result = torch.maximum(result, out[..., j:j + sw * (cols - 1) + 1:sw])
        return result


class FastConv2d(nn.Module):
    """A Conv2d computed by NNPACK Winograd (3x3, stride 1) or one matrix product (1x1); else as is."""

    def __init__(self, conv: nn.Conv2d, winograd: bool) -> None:
        super().__init__()
        self.conv = conv
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=conv.weight.dtype)
        self.register_buffer("bias", bias.detach(), persistent=False)
        plain = conv.stride == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
        if plain and conv.kernel_size == (1, 1) and conv.padding == (0, 0):
            self.kind = "matmul"
        elif plain and winograd and conv.kernel_size == (3, 3) and conv.dilation == (1, 1):
            self.kind = "winograd"
        else:
            self.kind = "conv"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
            return self.conv(x)
        if self.kind == "matmul" and x.shape[0] == 1:
            _, channels, height, width = x.shape
            weight = self.conv.weight.reshape(self.conv.out_channels, channels)
            flat = torch.addmm(self.bias.unsqueeze(1), weight, x.reshape(channels, height * width))
            return flat.view(1, self.conv.out_channels, height, width)
        if self.kind == "winograd":
            return torch._nnpack_spatial_convolution(x.contiguous(), self.conv.weight, self.bias, self.conv.padding)
        return self.conv(x)


def accelerate(model: nn.Module, winograd: bool = False) -> nn.Module:
    """An eval-mode copy of ``model`` with the swaps of the module docstring; ``model`` is untouched.

    ``winograd=False`` swaps only the pools and shares ``model``'s parameters and buffers, so the copy
    computes exactly what ``model`` computes, also after ``model`` is trained further.
    """
    winograd = winograd and nnpack_ready()
    shared = {} if winograd else {id(t): t for t in [*model.parameters(), *model.buffers()]}
    fast = copy.deepcopy(model, shared).eval()
    for module in list(fast.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        if winograd:
            for first, second in zip(names, names[1:]):
                conv, norm = module._modules[first], module._modules[second]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    module._modules[first] = fuse_conv_bn_eval(conv, norm)
                    module._modules[second] = nn.Identity()
        for name in names:
            child = module._modules[name]
            if isinstance(child, nn.MaxPool2d):
                module._modules[name] = ExactMaxPool(child)
            elif winograd and isinstance(child, nn.Conv2d):
                module._modules[name] = FastConv2d(child, winograd=True)
    if winograd:
        for parameter in fast.parameters():
            parameter.requires_grad_(False)
    return fast
