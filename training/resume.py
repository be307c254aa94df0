"""The resumable training state: model, optimizer, scheduler, grad scaler, RNG state, counters, best checkpoint.

``kocr train --resume`` continues a killed run from its last state file, so that it ends exactly
where an uninterrupted run ends (same batches, same augmentations, same weights). The file is
written atomically (temporary file, fsync, rename): a kill while writing leaves the previous state.

Example:
    >>> save_state("/tmp/state.pt", {"step": 3})          # doctest: +SKIP
    >>> load_state("/tmp/state.pt")["step"]                # doctest: +SKIP
    3
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kocr.atomic import atomic_path, write_bytes

# train: knobs a resumed run may change; any other difference means the saved state belongs to another run
RESUMABLE_CHANGES = frozenset({"val_every", "patience", "checkpoint_every", "num_workers", "log_every",
                               "log_samples", "device", "compile", "tuned_from", "tuned_keys"})


def save_state(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """``torch.save`` whole or not at all: a fsynced temporary file beside ``path``, renamed over it."""
    with atomic_path(path, durable=True) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def save_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` the same way: a kill leaves the old file or the new one, never half."""
    return write_bytes(path, data, durable=True)


class DamagedState(ValueError):
    """The file was read but holds no training state: cut short or overwritten (a disk fault, a copy
    that stopped), or another kind of file. :func:`save_state` never leaves one, so nothing in it can
    be resumed; ``kocr train --resume`` sets it aside and starts from step 0."""


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """A state written by :func:`save_state` (weights_only is off: it holds RNG states and counters).

    Raises FileNotFoundError when there is none, :class:`DamagedState` when the file is no state, and
    ValueError when it cannot be read at all (permissions, an I/O error: the state may be whole).
    """
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except OSError as exc:  # the file could not be read: it may be a whole state, so it is left as it is
        raise ValueError(f"{path}: cannot read the training state ({exc.strerror or exc}); fix that and run "
                         "again, or move the file away to start the run from step 0") from None
    except Exception as exc:  # a truncated or foreign file: say which and why
        why = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
        raise DamagedState(f"{path}: not a readable training state ({type(exc).__name__}: {why})") from None
    if not isinstance(saved, dict) or not {"signature", "progress"} <= set(saved):
        raise DamagedState(f"{path}: not a training state (a {type(saved).__name__} without its signature "
                           "and progress)")
    odd = [k for k in ("signature", "progress") if not isinstance(saved[k], dict)]
    if odd:  # a foreign file that happens to use the names: what resume reads from them is not there
        raise DamagedState(f"{path}: not a training state (its {' and '.join(odd)} "
                           f"{'is not a mapping' if len(odd) == 1 else 'are not mappings'})")
    return saved


def set_aside(path: str | os.PathLike) -> Path:
    """Rename a damaged state to ``<name>.damaged`` (replacing an older one) and return the new path."""
    path = Path(path)
    aside = path.with_name(path.name + ".damaged")
    os.replace(path, aside)
    return aside


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Knobs whose values differ between a saved run and this one, other than those a resume may change."""
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    return sorted(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k))


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
