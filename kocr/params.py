"""params.yaml: the one source of truth for every knob of every stage.

Example:
    >>> p = load_params()            # doctest: +SKIP
    >>> p["train"]["steps"]          # doctest: +SKIP
    300
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    """A params file that does not parse, or whose top level is not a mapping."""


def params_path(path: str | os.PathLike = PARAMS_FILE) -> Path:
    """The params file the stages read: ``KOCR_PARAMS`` when set, else ``path``."""
    return Path(os.environ.get("KOCR_PARAMS", path))


def load_params(path: str | os.PathLike = PARAMS_FILE, required: bool = True) -> dict[str, Any]:
    """Read params.yaml (``KOCR_PARAMS`` overrides the path).

    A missing file raises FileNotFoundError naming it, or gives ``{}`` (every default) when not
    ``required``, so ``kocr predict`` and ``kocr score`` work outside the project too.
    """
    path = params_path(path)
    if not path.is_file():
        if not required:
            return {}
        raise FileNotFoundError(f"{path}: params file not found (run from the project root)")
    with path.open(encoding="utf-8") as fh:
        try:
            params = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ParamsError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    return params


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept as strings), for MLflow params.

    A mapping keyed by paths (``train.mix``) stays one value, as JSON: MLflow refuses a name that
    holds ``//`` or ends in ``/``. Other keys, dotted file names too (``UnBatang.ttf``), nest.

    >>> flatten({"train": {"lr": 0.1, "mix": {"data/real/": 0.2}}})
    {'train.lr': 0.1, 'train.mix': '{"data/real/": 0.2}'}
    """
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and any("/" in str(k) or "\\" in str(k) for k in value):
            flat[name] = json.dumps(value, ensure_ascii=False, sort_keys=True)
        elif isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if not isinstance(value, (list, tuple)) else ",".join(map(str, value))
    return flat
