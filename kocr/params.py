"""params.yaml: the one source of truth for every knob of every stage.

Example:
    >>> p = load_params()            # doctest: +SKIP
    >>> p["train"]["steps"]          # doctest: +SKIP
    300
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    """A params file that does not parse, or a setting of it that cannot work: one line for the user.

    The message starts with the params file (``KOCR_PARAMS`` or params.yaml) unless it names it
    already, then the full key (``promote.min_delta``) and the problem; ``kocr`` prints it and exits 2.
    """

    def __init__(self, message: str) -> None:
        file = str(params_path())
        self.detail = message.removeprefix(f"{file}: ")  # the key and the problem, without the file
        super().__init__(f"{file}: {self.detail}")


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
    holds ``//`` or ends in ``/``. Other keys, dotted file names too (``UnBatang.ttf``), nest. An
    empty mapping inside a section (``train.mix: {}``, the default) is the value ``{}``, not left out;
    an empty or absent section (``detector: {}``) still gives nothing.

    >>> flatten({"train": {"lr": 0.1, "mix": {"data/real/": 0.2}}})
    {'train.lr': 0.1, 'train.mix': '{"data/real/": 0.2}'}
    >>> flatten({"train": {"mix": {}}, "detector": {}})
    {'train.mix': '{}'}
    """
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and ((not value and prefix) or any("/" in str(k) or "\\" in str(k) for k in value)):
            flat[name] = json.dumps(value, ensure_ascii=False, sort_keys=True)
        elif isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if not isinstance(value, (list, tuple)) else ",".join(map(str, value))
    return flat


def param_strings(params: dict[str, Any]) -> dict[str, str]:
    """``params`` flattened (:func:`flatten`) to MLflow param strings, each cut to MLflow's 6,000 characters.

    >>> param_strings({"train": {"lr": 0.1, "mix": {}}})
    {'train.lr': '0.1', 'train.mix': '{}'}
    """
    return {k: str(v)[:6000] for k, v in flatten(params).items()}


def section(params: Mapping[str, Any], name: str, where: str | None = None) -> dict[str, Any]:
    """``params[name]`` as a new dict: ``{}`` when absent or null (every default, as when all its keys
    are commented out); ParamsError naming ``where`` (default ``name``; ``recipe.detector`` for a
    section inside another) when it is anything but a mapping."""
    value = params.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ParamsError(f"{where or name}: expected a mapping of settings, got {value!r}")
    return dict(value)


def check_keys(where: str, values: Mapping[str, Any], known: Iterable[str], suggest: bool = False) -> None:
    """ParamsError naming the keys of ``values`` not in ``known``: a typo must not run on a default.

    With ``suggest``, each unknown key close to a known one is followed by it (``'recipes': did you
    mean 'recipe'?``).

    >>> check_keys("top level", {"recipes": {}}, ["recipe", "train"], suggest=True)
    Traceback (most recent call last):
    ...
    kocr.params.ParamsError: params.yaml: top level: unknown keys ['recipes'] (known: recipe, train); 'recipes': did you mean 'recipe'?
    """
    known = sorted(known)
    unknown = sorted(set(values) - set(known), key=str)
    if unknown:
        hints = ""
        if suggest:
            import difflib

            close = {str(k): difflib.get_close_matches(str(k), known, n=1) for k in unknown}
            hints = "".join(f"; {k!r}: did you mean {m[0]!r}?" for k, m in close.items() if m)
        raise ParamsError(f"{where}: unknown keys {unknown} (known: {', '.join(known)}){hints}")


_EXPECTED = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def typed(key: str, value: Any, kind: type, optional: bool = False) -> Any:
    """``value`` as ``kind`` (int, float, bool or str), else ParamsError naming ``key``.

    Numbers written as text are taken as numbers (YAML 1.1 reads ``1e-3`` as a string); a bool is
    never a number, a float with a fraction never a whole number. None passes when ``optional``.

    >>> typed("train.lr", "1e-3", float)
    0.001
    """
    if value is None and optional:
        return None
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    if kind in (int, float) and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if kind is float and math.isfinite(number):
            return number
        if kind is int and math.isfinite(number) and number.is_integer():
            return int(number)
    raise ParamsError(f"{key} {value!r}: expected {_EXPECTED[kind]}" + (" or null" if optional else ""))


def typed_settings(where: str, values: Mapping[str, Any], kinds: Mapping[str, type]) -> dict[str, Any]:
    """``values`` checked whole: a key not in ``kinds`` is refused (:func:`check_keys`), each value is
    read as its kind (:func:`typed`, ParamsError naming ``where.key``).

    >>> typed_settings("detector", {"canvas_size": "1280"}, {"canvas_size": int, "mag_ratio": float})
    {'canvas_size': 1280}
    """
    check_keys(where, values, kinds)
    return {key: typed(f"{where}.{key}", value, kinds[key]) for key, value in values.items()}


def name_list(key: str, value: Any, expected: str = "a list of names") -> list[str]:
    """``value`` as a list of non-empty strings (``[]`` when null), else ParamsError naming ``key``.

    A lone string is refused, not read letter by letter.
    """
    if value is None:
        return []
    require(isinstance(value, list) and all(isinstance(v, str) and v for v in value), key, value, expected)
    return list(value)


def paths_by_name(key: str, value: Any) -> dict[str, str]:
    """``value`` as a mapping ``{name: path}`` of non-empty strings (``{}`` when null), else ParamsError
    naming ``key`` (and the name whose path is wrong)."""
    if value is None:
        return {}
    require(isinstance(value, Mapping), key, value, "a mapping {name: path}")
    for name, path in value.items():
        require(isinstance(path, str) and bool(path), f"{key}.{name}", path, "a path (a string)")
    return {str(name): path for name, path in value.items()}


DATA_KEYS = {"source": str, "prepared": str}  # data: the pages (dvc.yaml's ${data.source}) and the prepared sets


def data_section(params: Mapping[str, Any]) -> dict[str, str]:
    """``data:`` checked: only ``source`` and ``prepared``, each a path; ``{}`` when absent or null.

    A typo (``sorce``) must not leave ``kocr tune``'s e2e scorer on the default data/sample pages.
    """
    values = typed_settings("data", section(params, "data"), DATA_KEYS)
    for key, value in values.items():
        require(bool(value), f"data.{key}", value, "a path")
    return values


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """ParamsError ``key value: expected ...`` unless ``ok``."""
    if not ok:
        raise ParamsError(f"{key} {value!r}: expected {expected}")
