"""The ``export`` stage: write a recogniser as an EasyOCR custom-model bundle.

Layout (what ``easyocr.Reader(..., model_storage_directory=DIR/model,
user_network_directory=DIR/user_network, recog_network=NAME)`` reads)::

    DIR/model/NAME.pth              state_dict, keys prefixed ``module.``
    DIR/user_network/NAME.py        ``Model(input_channel, output_channel, hidden_size, num_class)``
    DIR/user_network/NAME.yaml      network_params, imgH, lang_list, character_list
    DIR/README.md                   where to copy the files

``DIR`` holds one bundle: it is written beside ``DIR`` and takes its place in one rename, so a kill
never leaves a bundle mixing two exports; a ``DIR`` holding anything else is refused (``check_out``).
``export_easyocr`` checks its arguments (``check_export``), loads the model and writes the bundle
(``write_bundle``); ``kocr export-easyocr`` makes the same check once, before its slower model load.

Example:
    >>> export_easyocr("models:/ko-ocr-recognizer@champion", "models/easyocr", "ko_ocr")  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from kocr.atomic import OutFolderError, named_disk_errors, replaced_folder, temporary_name
from kocr.easyocr_compat import import_easyocr, offline_model_dir
from training import model as model_module
from training.checkpoint import LoadedRecognizer, load_recognizer
from training.model import Recognizer

_ADAPTER = '''

class Model(Recognizer):
    """EasyOCR's constructor signature over the platform's recogniser."""

    def __init__(self, input_channel, output_channel, hidden_size, num_class):
        super().__init__(RecognizerConfig(num_class=num_class, input_channel=input_channel,
                                          output_channel=output_channel, hidden_size=hidden_size))
'''


class ExportError(ValueError):
    """A model EasyOCR cannot run."""


def check_exportable(loaded: LoadedRecognizer) -> None:
    """Refuse what EasyOCR cannot read: anything but a greyscale CTC recogniser."""
    if not isinstance(loaded.model, Recognizer):
        raise ExportError(f"{loaded.source}: EasyOCR reads CTC recognisers only, not {type(loaded.model).__name__}")
    if loaded.config.prediction != "ctc":
        raise ExportError(f"{loaded.source}: EasyOCR reads CTC models only, and this model has an attention "
                          f"({loaded.config.prediction}) prediction head; train with `model.prediction: ctc` "
                          f"to export it")
    if loaded.config.input_channel != 1:
        raise ExportError(f"{loaded.source}: EasyOCR feeds greyscale crops; this model takes "
                          f"{loaded.config.input_channel} input channels")


def network_source() -> str:
    """Source of ``NAME.py``: the platform's model module plus EasyOCR's constructor signature."""
    return inspect.getsource(model_module) + _ADAPTER


DETECTOR = "craft_mlt_25k.pth"  # EasyOCR's CRAFT weights, copied in by ``with_detector``


def _bundle_paths(name: str) -> dict[str, Path]:
    """The bundle's own files, relative to its folder."""
    return {"pth": Path("model", f"{name}.pth"), "py": Path("user_network", f"{name}.py"),
            "yaml": Path("user_network", f"{name}.yaml"), "readme": Path("README.md")}


# what the README says the readtext settings it passes are (write_bundle's settings_from)
PARAMS_SETTINGS = "the detector settings the platform evaluated this model with (`detector:` in params.yaml)"
LOGGED_SETTINGS = ("the detector settings logged with this model in MLflow (its `detector.*` model config, which "
                   "`kocr predict` and `mlflow models serve` read it with)")


def shown_model(spec: str) -> str:
    """``spec`` as the bundle names what it was exported from: a model file's path relative to the
    working folder where it lies inside it, else its file name alone (an absolute path or one up
    through ``..`` told where the user keeps their files, and is wrong on another machine; the bundle
    also carries the file's sha256); any other spec (``models:/...``, ``runs:/...``, ``ko_base``) as it is.

    >>> shown_model("/home/kim/ckpt/best.pt"), shown_model("models/candidate/model.pt"), shown_model("models:/m/3")
    ('best.pt', 'models/candidate/model.pt', 'models:/m/3')
    """
    if ":/" in spec:
        return spec
    path = Path(spec)
    if not path.is_absolute() and ".." not in path.parts:
        return spec
    try:
        return Path(os.path.abspath(spec)).relative_to(os.path.abspath(".")).as_posix()
    except ValueError:
        return path.name


def export_easyocr(model: str | LoadedRecognizer, out: str | os.PathLike, name: str,
                   lang_list: Sequence[str] = ("ko", "en"), with_detector: bool = False,
                   readtext_kwargs: dict[str, Any] | None = None, provenance: str | None = None,
                   settings_from: str | None = PARAMS_SETTINGS) -> dict[str, str]:
    """Write the bundle for ``model`` (a spec or a loaded recogniser); returns the written paths.

    ``check_export`` first (a spec is loaded only once it passes), then ``write_bundle``.
    """
    check_export(out, name, lang_list)  # before the model loads
    loaded = load_recognizer(model) if isinstance(model, str) else model
    return write_bundle(loaded, out, name, lang_list, with_detector, readtext_kwargs, provenance, settings_from)


def check_export(out: str | os.PathLike, name: str, lang_list: Sequence[str]) -> None:
    """What ``write_bundle`` needs checked, and what can be checked before a model loads: the bundle's
    name (``check_bundle_name``), ``lang_list`` (``check_langs``) and ``out`` (``check_out``). ExportError
    or OutFolderError naming the first mistake; ``kocr export-easyocr`` calls it before it loads the model."""
    check_bundle_name(name)
    check_langs(lang_list)
    check_out(out, name)


def write_bundle(loaded: LoadedRecognizer, out: str | os.PathLike, name: str,
                 lang_list: Sequence[str] = ("ko", "en"), with_detector: bool = False,
                 readtext_kwargs: dict[str, Any] | None = None, provenance: str | None = None,
                 settings_from: str | None = PARAMS_SETTINGS) -> dict[str, str]:
    """Write the bundle for ``loaded`` into ``out``, whose ``out``, ``name`` and ``lang_list`` passed
    ``check_export`` (they are not checked again here); returns the written paths.

    ``readtext_kwargs``: the detector settings to read with, where they differ from EasyOCR's defaults;
    the README's ``readtext`` call passes them, and says they are ``settings_from`` (``PARAMS_SETTINGS``,
    ``LOGGED_SETTINGS``), or, where that is None, that no settings were known and EasyOCR's defaults stand.
    ``provenance``: what was exported (registry version, checkpoint sha256), written in the README and
    atop the yaml; default the spec (``shown_model``: no folder outside the working one).
    """
    check_exportable(loaded)
    out = Path(out)
    provenance = provenance or shown_model(loaded.source)
    state = {f"module.{k}": v.detach().cpu() for k, v in loaded.model.state_dict().items()}
    paths = {key: out / rel for key, rel in _bundle_paths(name).items()}
    config = {"network_params": loaded.config.network_params(), "imgH": loaded.config.imgH,
              "lang_list": list(lang_list), "character_list": loaded.charset.chars}
    # the CRAFT weights: copied in by --with-detector, else kept when the folder held them (the
    # README says model_storage_directory must hold them: a user may have put them there by hand)
    detector = Path(offline_model_dir()) / DETECTOR if with_detector else out / "model" / DETECTOR
    keep_detector = with_detector or detector.is_file()
    # the whole bundle written in a folder beside --out, which it replaces in one rename: a kill or a
    # full disk never leaves a new .pth beside an earlier export's yaml and README (a bundle that fails
    # to load, or loads under another model's provenance); renaming the files in one after another did
    network = yaml.safe_dump(config, allow_unicode=True, sort_keys=False)
    if yaml.safe_load(network) != config:  # PyYAML writes U+0085 (NEL) raw there, and reads it back as a space
        network = yaml.safe_dump(config, sort_keys=False)  # every character outside ASCII escaped
    texts = {"py": network_source(),
             "yaml": f"# exported by kocr export-easyocr from {' '.join(provenance.split())}\n" + network,
             "readme": _readme(name, lang_list, loaded, readtext_kwargs or {}, provenance, settings_from,
                               keep_detector)}
    with replaced_folder(out) as stage:
        tmp = {key: stage / rel for key, rel in _bundle_paths(name).items()}
        for folder in ("model", "user_network"):
            (stage / folder).mkdir()
        with named_disk_errors(paths["pth"], tmp["pth"]):  # each write names its own file on a full disk
            torch.save(state, tmp["pth"])
        for key, text in texts.items():
            with named_disk_errors(paths[key], tmp[key]):
                tmp[key].write_text(text, encoding="utf-8")
        if keep_detector:
            with named_disk_errors(out / "model" / DETECTOR, stage / "model" / DETECTOR):
                shutil.copy2(detector, stage / "model" / DETECTOR)
    return {k: str(v) for k, v in paths.items()}


def check_out(out: str | os.PathLike, name: str) -> None:
    """``OutFolderError`` unless ``out`` is new or holds a bundle ``name`` and nothing else, since the
    export replaces the folder whole: its files, ``model/craft_mlt_25k.pth``, the ``__pycache__`` that
    EasyOCR's import of ``NAME.py`` leaves, and what a killed writer left (``kocr.atomic``). Anything
    else (another bundle, stock models in ``~/.EasyOCR``, a project's README) would be deleted, and a
    linked ``out``, ``model`` or ``user_network`` would be replaced by a folder; those are refused,
    as is the working folder (``--out .``)."""
    out = Path(out)
    if out.is_symlink():  # replacing the folder would replace the link, not write where it points
        raise OutFolderError(f"--out {out}: a symbolic link (to {os.readlink(out)}); give the folder itself, "
                             "or a new path")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder")
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise OutFolderError(f"--out {out}: the working folder (or one above it), which the export would replace "
                             f"whole; give a new folder, e.g. {out / 'easyocr'}")
    own = {rel.as_posix() for rel in _bundle_paths(name).values()} | {f"model/{DETECTOR}"}
    folders = ("model", "user_network", "user_network/__pycache__")

    def ours(rel: str, is_dir: bool) -> bool:
        if is_dir:
            return rel in folders
        folder, _, file = rel.rpartition("/")
        return rel in own or (folder == folders[2] and file.startswith(f"{name}.") and file.endswith(".pyc"))

    foreign = []
    for folder, dirs, files in os.walk(out):  # a linked folder is listed, not entered
        here = Path(folder).relative_to(out)
        for entry in sorted(dirs + files):
            if temporary_name(entry):
                continue  # a killed writer's, gone with the folder
            linked_folder = entry in dirs and Path(folder, entry).is_symlink()  # a linked file goes, not its target
            if linked_folder or not ours((here / entry).as_posix(), entry in dirs):
                foreign.append((here / entry).as_posix())
        dirs[:] = [d for d in dirs if ours((here / d).as_posix(), True) and not Path(folder, d).is_symlink()]
    if foreign:
        raise OutFolderError(f"--out {out}: holds {foreign[0]!r} ({len(foreign)} such), which an export of "
                             f"{name} does not write, and the export replaces the folder whole; give a new "
                             "folder, then copy the bundle's files where you want them (its README says how)")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a bundle, or None. EasyOCR imports ``user_network/NAME.py`` with
    ``importlib.import_module(NAME)``, which takes any file name (``ko-ocr`` and ``1ko`` load) but reads
    a ``.`` as a package; a folder separator would put ``NAME.pth`` in another folder; and the README's
    copy commands take ``NAME`` unquoted. Letters (Hangul too), digits, ``_`` and ``-`` are safe, but
    not a ``-`` first: ``kocr export-easyocr --name -x`` (dvc.yaml's export stage passes ``--name
    ${export.name}``) and shell commands given ``-x.pth`` take it for an option.

    >>> name_problem("ko-ocr") is None, name_problem("ko.ocr")
    (True, "a '.' in it: EasyOCR imports user_network/NAME.py with importlib.import_module(NAME), which reads 'ko.ocr' as module 'ocr' of a package 'ko'")
    """
    if not name:
        return "empty"
    if "." in name:
        package, _, module = name.rpartition(".")
        return (f"a '.' in it: EasyOCR imports user_network/NAME.py with importlib.import_module(NAME), which reads "
                f"{name!r} as module {module!r} of a package {package!r}")
    if "/" in name or "\\" in name:
        return "a folder separator in it: model/NAME.pth and user_network/NAME.py would lie in another folder"
    if name.startswith("-"):
        return ("begins with '-', which kocr export-easyocr --name (dvc.yaml's export stage passes --name "
                "${export.name}) and shell commands given NAME.pth take for an option")
    if not re.fullmatch(r"[\w-]+", name):
        shown = "".join(sorted({c for c in name if not re.fullmatch(r"[\w-]", c)}))
        return (f"{shown!r} in it: the bundle README's copy commands (cp model/NAME.pth ...) take NAME unquoted; "
                "use letters, digits, '_' and '-'")
    return None


# recog_network names that easyocr.Reader and easyocr.recognition.get_recognizer test for by name after a
# user network's yaml is read: each builds EasyOCR's own module with its own sizes instead of NAME.py
EASYOCR_NETWORKS = {"generation1": "easyocr.model.model", "generation2": "easyocr.model.vgg_model"}


def check_bundle_name(name: str) -> None:
    """ExportError unless EasyOCR would load ``name`` as this bundle: a name of letters, digits, ``_``
    and ``-`` (:func:`name_problem`) that is neither one of EasyOCR's own models (it would load its stock .pth, checked by md5, and ignore
    the bundle's network), nor the name of one of their files, in any case (``korean`` is korean_g1's
    ``korean.pth``, ``craft_mlt_25k`` the detector's, which ``--with-detector`` copied over the recogniser;
    ``Korean_G2.pth`` is ``korean_g2.pth`` on macOS and Windows), nor a
    module already importable (EasyOCR appends the user_network folder to the end of sys.path, so
    ``test`` or ``string`` would import the standard library's), nor ``generation1`` or ``generation2``
    (``EASYOCR_NETWORKS``: Reader builds its own network for them)."""
    import importlib.util

    problem = name_problem(name)
    if problem:
        raise ExportError(f"bundle name {name!r}: {problem}; pick another, e.g. ko_ocr")
    import_easyocr()
    from easyocr.config import detection_models, recognition_models

    if name == "standard" or name in recognition_models["gen1"] or name in recognition_models["gen2"]:
        raise ExportError(f"bundle name {name!r} is one of EasyOCR's own models: easyocr.Reader would load its "
                          f"stock {name}.pth (or download it) and ignore this bundle; pick another, e.g. ko_ocr")
    if name in EASYOCR_NETWORKS:
        raise ExportError(f"bundle name {name!r} is the name EasyOCR gives its own network code: easyocr.Reader "
                          f"would build {EASYOCR_NETWORKS[name]} with its own sizes, not user_network/{name}.py, "
                          "and fail on this bundle's weights or read them with the wrong network; "
                          "pick another, e.g. ko_ocr")
    # keyed in lower case: on a file system that ignores case (macOS, Windows) Korean_G2.pth is korean_g2.pth
    files = {model["filename"].lower(): (key, model["filename"]) for models in (
        recognition_models["gen1"], recognition_models["gen2"], detection_models) for key, model in models.items()}
    if f"{name}.pth".lower() in files:
        key, file = files[f"{name}.pth".lower()]
        where = "" if file == f"{name}.pth" else \
            f" (on a file system that ignores case, as macOS and Windows do: {file})"
        raise ExportError(f"bundle name {name!r}: model/{name}.pth is{where} the file of EasyOCR's own {key} model; "
                          "in one model folder each replaces the other, and easyocr.Reader deletes the file whose "
                          "checksum is not its model's and downloads its own; pick another, e.g. ko_ocr")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        raise ExportError(f"bundle name {name!r} is already an importable module ({spec.origin or 'a package'}): "
                          f"EasyOCR would import it instead of {name}.py; pick another, e.g. ko_ocr")


def check_langs(lang_list: Sequence[str]) -> None:
    """ExportError unless ``lang_list`` is a list of one or more of EasyOCR's language codes (a
    string, ``lang_list: ko``, would be read letter by letter)."""
    if isinstance(lang_list, str) or not isinstance(lang_list, (list, tuple)):
        raise ExportError(f"export.lang_list: expected a list of EasyOCR language codes such as [ko, en], "
                          f"got {lang_list!r}")
    import_easyocr()
    from easyocr.config import all_lang_list

    unknown = [lang for lang in lang_list if lang not in all_lang_list]
    if not lang_list or unknown:
        raise ExportError(f"export.lang_list {list(lang_list)}: " + (f"not EasyOCR language codes: {unknown}"
                          if unknown else "empty") + " (e.g. [ko, en])")


UPRIGHT_SNIPPET = """import numpy as np
from PIL import Image, ImageOps

page = ImageOps.exif_transpose(Image.open("photo.jpg"))  # the EXIF turn applied
if page.mode.startswith(("I", "F")):  # 16-bit or float samples to 8 bits, scaled as the platform scales them
    deep = np.asarray(page, np.float64)
    top = 65535 if deep.max() > 255 else 1 if page.mode == "F" and deep.max() <= 1 else 255
    page = Image.fromarray((deep * 255 / top).clip(0, 255).round().astype(np.uint8))
if (page.mode in ("RGBA", "LA", "PA") or "transparency" in page.info) \\
        and page.convert("RGBA").getchannel("A").getextrema()[0] < 255:  # transparent: laid over white
    page = Image.alpha_composite(Image.new("RGBA", page.size, "white"), page.convert("RGBA"))
page.convert("RGB").save("upright.png")  # then reader.readtext("upright.png", ...)
"""


# how to read a page whose orientation is unknown: the whole page read at each turn, the turn whose boxes read
# with the highest mean confidence kept (READ_CALL: the README's readtext settings). rotation_info, which keeps
# each box's most confident turn, prefers rotated misreadings of upright words (docs/pipeline.md, "Rotated text")
TURN_SNIPPET = """from PIL import Image

def mean_confidence(result):
    return sum(confidence for _, _, confidence in result) / len(result) if result else 0.0

page = Image.open("page.jpg").convert("RGB")
readings = {}
for turn in (0, 90, 180, 270):  # counter-clockwise
    page.rotate(turn, expand=True).save(f"turned_{turn}.png")
    readings[turn] = reader.readtext(f"turned_{turn}.png"READ_CALL)
turn = max(readings, key=lambda t: mean_confidence(readings[t]))
result = readings[turn]  # boxes in the coordinates of turned_{turn}.png
"""


def _readme(name: str, lang_list: Sequence[str], loaded: LoadedRecognizer, readtext_kwargs: dict[str, Any],
            provenance: str, settings_from: str | None = PARAMS_SETTINGS, detector: bool = False) -> str:
    langs = ", ".join(repr(x) for x in lang_list)
    call = "".join(f", {k}={v!r}" for k, v in readtext_kwargs.items())
    settings = (f"\n`{call[2:]}`: {settings_from or 'the detector settings given to the export'}, where they "
                "differ from EasyOCR's defaults.\n") if call else ""
    if not call and settings_from is None:
        settings = ("\nThe model records no detector settings and the export read no params.yaml, so the call "
                    "keeps EasyOCR's defaults, which box a line's words together (`width_ths=0.5`); pass the "
                    "settings the model was evaluated with (`detector:` in its project's params.yaml).\n")
    return f"""# EasyOCR bundle `{name}`

Exported by `kocr export-easyocr` from {provenance} ({len(loaded.charset)} characters, imgH {loaded.config.imgH}).

Copy into EasyOCR's folders (made here, for a machine where EasyOCR has not run yet) and load it by name:

```
mkdir -p ~/.EasyOCR/model ~/.EasyOCR/user_network
cp model/{name}.pth{f" model/{DETECTOR}" if detector else ""} ~/.EasyOCR/model/
cp user_network/{name}.py user_network/{name}.yaml ~/.EasyOCR/user_network/
```

```python
import easyocr
reader = easyocr.Reader([{langs}], recog_network="{name}")
print(reader.readtext("page.jpg"{call}))
```
{settings}
Or point EasyOCR at this folder without copying:
`easyocr.Reader([{langs}], recog_network="{name}", model_storage_directory="model",
user_network_directory="user_network")` (the CRAFT detector `craft_mlt_25k.pth` must be in
`model/` too, or pass `detector=False`).

On CPU EasyOCR quantizes the recogniser to int8 by default; pass `quantize=False` to read exactly
as the platform evaluated it. That holds for ordinary 8-bit images given by path (a grey image
with an alpha channel is not ordinary: EasyOCR fails on its two channels). A phone photo
stored sideways with an EXIF orientation is read wrongly by EasyOCR itself (it finds boxes on the
unrotated colour image and cuts them from the rotated grey one, and can fail in `cv2.resize`),
as are 16-bit images, transparent ones (EasyOCR reads the colour under a clear pixel, often black: laid over
white here, as viewers show them), CMYK scans (their C, M and Y channels
taken for R, G and B), 1-bit scans and compressed TIFFs (refused) and 16-bit RGB TIFFs. Save such a page as the platform
reads it (`evaluation.reader.load_image`) and pass the saved file's path (a numpy array is not the
same: EasyOCR takes a 3-channel array for BGR):

```python
{UPRIGHT_SNIPPET}```

Do not pass `rotation_info` (e.g. `[90, 180, 270]`) to read upright pages: EasyOCR reads each box
once more at each angle and keeps the reading with the highest confidence, and its confidence (the
product of the best probabilities of the non-blank frames, to the power 2/sqrt(frames)) favours
short readings. A word turned by 90 or 270 degrees is a narrow image a few frames wide, read as one
confident junk character, which can outscore the right upright reading. With the platform's base
model ko_base, 5 of 12 upright real word crops took a rotated reading (4 of them read right
upright); EasyOCR's own `english_g2` does the same (1 of the 4 Latin words among them it reads
right). For a page that may be turned as a whole, read it at each turn and keep the turn whose boxes
read with the highest mean confidence (ko_base on two real pages: upright 0.82 against at most 0.46
turned, 0.84 against at most 0.32):

```python
{TURN_SNIPPET.replace("READ_CALL", call)}```
"""
