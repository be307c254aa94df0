"""Does the recipe's size fit this machine? ``python -m kocr.recipe check-size``, the first step of the
recipe's ``synth_train`` and ``train`` stages.

``recipes/ko-base/dvc.yaml`` reads the GPU size unless its ``params_file`` var is changed. On a
machine without CUDA that size would render a million images and then train 7.7M of them on the CPU
(about three days at the ~30 images/s two cores reach), so the check stops it before any work, names
the params file and says how to run the CPU size. ``KOCR_RECIPE_ANY_MACHINE=1`` lets a GPU size run
here anyway (to render its data on a CPU node, say). The CPU size on a GPU machine only gets a note.

Example:
    >>> size_problem({"size": "gpu", "train": {"steps": 30000, "batch_size": 256}}, "p.yaml", cuda=False)[:24]
    'p.yaml: the `gpu` size ('
"""

from __future__ import annotations

import os
from typing import Any
from kocr.params import section, typed

OVERRIDE = "KOCR_RECIPE_ANY_MACHINE"
CPU_IMAGES_PER_SECOND = 30.0  # what two CPU cores train the CRNN at: 12.8-35.6 images/s over 15 instalments
CPU_SIZE_FIX = ("sed -i 's/^  - params_file: .*/  - params_file: params-cpu.yaml/' recipes/ko-base/dvc.yaml "
                "(docs/recipe.md, \"Sizes\")")


def _wants_gpu(params: dict[str, Any]) -> bool:
    """A size other than ``cpu`` whose training is not pinned to the CPU by ``train.device``."""
    device = str(section(params, "train").get("device", "auto"))
    return params.get("size", "cpu") != "cpu" and device.split(":")[0] != "cpu"  # cpu, cpu:0


def size_problem(params: dict[str, Any], path: str, cuda: bool) -> str | None:
    """Why this params file's size should not run on this machine (``None`` when it should).

    A GPU size (``size`` not ``cpu``) with ``train.device`` ``auto`` or ``cuda…`` needs CUDA; without
    it the reason names the file, the images it would train and the hours that takes on two CPU cores.
    """
    if cuda or not _wants_gpu(params):
        return None
    train = section(params, "train")
    steps = typed("train.steps", train.get("steps", 0), int)  # a typo ('30k') is the file's line, not a traceback
    batch = typed("train.batch_size", train.get("batch_size", 1), int)
    images = steps * batch
    hours = images / CPU_IMAGES_PER_SECOND / 3600
    return (f"{path}: the `{params.get('size')}` size ({steps} steps x {batch} = "
            f"{images:,} images to train) needs a CUDA GPU, and torch finds none here: at the ~"
            f"{CPU_IMAGES_PER_SECOND:.0f} images/s two CPU cores train, that is ~{hours:,.0f} h. "
            f"Run the CPU size instead: {CPU_SIZE_FIX}; or set {OVERRIDE}=1 to run this size here anyway")


def size_note(params: dict[str, Any], path: str, cuda: bool) -> str | None:
    """A hint when the CPU size runs where a GPU is (it runs; the GPU size would be the better use)."""
    if cuda and params.get("size") == "cpu":
        return (f"{path}: the reduced `cpu` size on a machine with a CUDA GPU; the GPU size "
                "(recipes/ko-base/params.yaml) trains a base from english_g2 in under an hour there")
    return None


def overridden() -> bool:
    """``KOCR_RECIPE_ANY_MACHINE`` is set to 1 / true / yes: run a GPU size on this machine anyway."""
    return os.environ.get(OVERRIDE, "").strip().lower() in ("1", "true", "yes")


def check_size(path: str, params: dict[str, Any]) -> tuple[str | None, str | None]:
    """(problem, note) for ``params`` read from ``path`` on this machine (torch asked for CUDA).

    With ``KOCR_RECIPE_ANY_MACHINE`` set, a problem becomes a note that says it runs anyway.
    """
    import torch

    cuda = torch.cuda.is_available()
    problem, note = size_problem(params, path, cuda), size_note(params, path, cuda)
    if problem and overridden():
        return None, f"{path}: the `{params.get('size')}` size without a CUDA GPU, run here anyway ({OVERRIDE})"
    return problem, note
