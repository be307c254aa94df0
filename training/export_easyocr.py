"""The ``export`` stage: write a recogniser as an EasyOCR custom-model bundle.

Layout (what ``easyocr.Reader(..., model_storage_directory=DIR/model,
user_network_directory=DIR/user_network, recog_network=NAME)`` reads)::

    DIR/model/NAME.pth              state_dict, keys prefixed ``module.``
    DIR/user_network/NAME.py        ``Model(input_channel, output_channel, hidden_size, num_class)``
    DIR/user_network/NAME.yaml      network_params, imgH, lang_list, character_list
    DIR/README.md                   where to copy the files

Example:
    >>> export_easyocr("models:/ko-ocr-recognizer@champion", "models/easyocr", "ko_ocr")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from kocr.atomic import atomic_path, named_disk_errors
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


def export_easyocr(model: str | LoadedRecognizer, out: str | os.PathLike, name: str,
                   lang_list: Sequence[str] = ("ko", "en"), with_detector: bool = False,
                   readtext_kwargs: dict[str, Any] | None = None, provenance: str | None = None) -> dict[str, str]:
    """Write the bundle for ``model`` (a spec or a loaded recogniser); returns the written paths.

    ``readtext_kwargs``: the detector settings the platform evaluated with, where they differ from
    EasyOCR's defaults; the README's ``readtext`` call passes them. ``provenance``: what was exported
    (registry version, checkpoint sha256), written in the README and atop the yaml; default the spec.
    """
    check_bundle_name(name)
    check_langs(lang_list)
    loaded = load_recognizer(model) if isinstance(model, str) else model
    check_exportable(loaded)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder")
    provenance = provenance or loaded.source
    model_dir, network_dir = out / "model", out / "user_network"
    for folder in (model_dir, network_dir):
        folder.mkdir(parents=True, exist_ok=True)
    state = {f"module.{k}": v.detach().cpu() for k, v in loaded.model.state_dict().items()}
    paths = {"pth": model_dir / f"{name}.pth", "py": network_dir / f"{name}.py",
             "yaml": network_dir / f"{name}.yaml", "readme": out / "README.md"}
    config = {"network_params": loaded.config.network_params(), "imgH": loaded.config.imgH,
              "lang_list": list(lang_list), "character_list": loaded.charset.chars}
    # every file written under a temporary name first and all renamed in at the end: a kill or a full
    # disk never leaves a new .pth beside an earlier export's yaml and README (a bundle that fails to
    # load, or loads under another model's provenance); other files in --out are left alone
    texts = {"py": network_source(),
             "yaml": f"# exported by kocr export-easyocr from {' '.join(provenance.split())}\n"
                     + yaml.safe_dump(config, allow_unicode=True, sort_keys=False),
             "readme": _readme(name, lang_list, loaded, readtext_kwargs or {}, provenance)}
    with contextlib.ExitStack() as stack:
        tmp = {key: stack.enter_context(atomic_path(path)) for key, path in paths.items()}
        with named_disk_errors(paths["pth"], tmp["pth"]):  # each write names its own file on a full disk
            torch.save(state, tmp["pth"])
        for key, text in texts.items():
            with named_disk_errors(paths[key], tmp[key]):
                tmp[key].write_text(text, encoding="utf-8")
        if with_detector:
            craft = model_dir / "craft_mlt_25k.pth"
            staged = stack.enter_context(atomic_path(craft))
            with named_disk_errors(craft, staged):
                shutil.copy2(Path(offline_model_dir()) / "craft_mlt_25k.pth", staged)
    return {k: str(v) for k, v in paths.items()}


def check_bundle_name(name: str) -> None:
    """ExportError unless EasyOCR would load ``name`` as this bundle: a Python identifier that is
    neither one of EasyOCR's own models (it would load its stock .pth, checked by md5, and ignore
    the bundle's network) nor a module already importable (EasyOCR appends the user_network folder
    to the end of sys.path, so ``test`` or ``string`` would import the standard library's)."""
    import importlib.util

    if not name.isidentifier():
        raise ExportError(f"bundle name {name!r} must be a Python identifier (EasyOCR imports NAME.py)")
    import_easyocr()
    from easyocr.config import recognition_models

    if name == "standard" or name in recognition_models["gen1"] or name in recognition_models["gen2"]:
        raise ExportError(f"bundle name {name!r} is one of EasyOCR's own models: easyocr.Reader would load its "
                          f"stock {name}.pth (or download it) and ignore this bundle; pick another, e.g. ko_ocr")
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
        and all(lo == hi for lo, hi in page.convert("RGBA").getextrema()[:3]):  # text only in alpha
    page = Image.alpha_composite(Image.new("RGBA", page.size, "white"), page.convert("RGBA"))
page.convert("RGB").save("upright.png")  # then reader.readtext("upright.png", ...)
"""


def _readme(name: str, lang_list: Sequence[str], loaded: LoadedRecognizer, readtext_kwargs: dict[str, Any],
            provenance: str) -> str:
    langs = ", ".join(repr(x) for x in lang_list)
    call = "".join(f", {k}={v!r}" for k, v in readtext_kwargs.items())
    settings = (f"\n`{call[2:]}`: the detector settings the platform evaluated this model with "
                "(`detector:` in params.yaml), where they differ from EasyOCR's defaults.\n") if call else ""
    return f"""# EasyOCR bundle `{name}`

Exported by `kocr export-easyocr` from {provenance} ({len(loaded.charset)} characters, imgH {loaded.config.imgH}).

Copy into EasyOCR's folders and load it by name:

```
cp model/{name}.pth ~/.EasyOCR/model/
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
as are 16-bit images and text drawn only in the alpha channel. Save such a page as the platform
reads it (`evaluation.reader.load_image`) and pass the saved file's path (a numpy array is not the
same: EasyOCR takes a 3-channel array for BGR):

```python
{UPRIGHT_SNIPPET}```
"""
