"""The ``train`` stage: fine-tune the EasyOCR gen-2 recogniser on LMDB word crops, tracked in MLflow.

Starts from ``train.base`` (english_g2 by default), moves the head to ``train.charset`` keeping the
rows of shared characters, trains with CTC, validates every ``val_every`` steps and keeps the
checkpoint with the lowest validation CER.

Outputs: ``<out>/model.pt`` (best checkpoint), ``<out>/mlflow.json`` (run id and model URI),
``metrics/train.json``, ``plots/train/{loss,val}.tsv``.

Example:
    >>> summary = train(TrainConfig(steps=10), "data/prepared", "models/candidate")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ParamSpec, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from evaluation.metrics import recognition_scores
from kocr.atomic import atomic_path, write_text
from kocr.params import ParamsError, param_strings, require, typed
from kocr.params import section as params_section
from kocr.stops import STOPS  # what the DataLoader workers leave to the command
from training.charset import Charset
from training.attention import AttnCodec, attention_loss, num_class_for
from training.checkpoint import file_digest, load_recognizer, save_checkpoint, start_from
from training.crops import BucketBatchSampler, CropBatch, CropDataset, MixedCrops, check_batches_fill
from training.data.lmdb_store import LmdbDataset, lmdb_parts
from training.distributed import (DistContext, all_agree, broadcast_flag, init_distributed, leave_to, one_report,
                                  setup_agreed, shutdown, sum_over_ranks)
from training.model import Recognizer, RecognizerConfig
from training.optim import OPTIMIZERS, SCHEDULES, make_optimizer, make_scheduler
from training.resume import (DamagedState, config_differences, load_state, restore_rng, rng_state, save_bytes,
                             save_state, set_aside)
from training.weight_average import make_ema, mean_state_dict


@dataclass(frozen=True)
class TrainConfig:
    """Knobs of the train stage (``train:`` and ``model:`` in params.yaml)."""

    base: str = "english_g2"
    charset: str = "korean_g2"
    steps: int = 300
    batch_size: int = 16
    optimizer: str = "adam"          # adadelta | adam | adamw
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"       # constant | cosine | onecycle (each after warmup_steps)
    warmup_steps: int = 0            # linear lr warm-up over this many optimizer steps; 0 = none
    grad_clip: float = 5.0           # max gradient norm; 0 = no clipping
    val_every: int = 100
    patience: int = 0                # stop after this many validations without a better CER; 0 = never
    seed: int = 0
    num_workers: int = 0
    max_width: int = 1024
    device: str = "auto"
    precision: str = "auto"          # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    channels_last: bool = True       # CUDA only: NHWC convolutions
    compile: bool = False            # torch.compile the model
    augment: float = 0.0             # on-the-fly augmentation strength in [0, 1]; 0 = none
    freeze: str = "none"             # none | feature_extraction | sequence_modeling | both
    batch_max_length: int = 0        # drop training labels longer than this; 0 = what the model can align
    focal_gamma: float = 0.0         # 0 = plain CTC; > 0 = focal CTC, (1 - p)^gamma weighting
    ema_decay: float = 0.0           # > 0: validate and keep an exponential moving average of the weights
    average_with_base: float = 0.0   # > 0: the kept checkpoint is this share of the start plus the rest of the best
    mix: dict[str, float] = field(default_factory=dict)  # more LMDB training sets: {path: share of the samples}
    checkpoint_every: int = 50       # write the resumable state every N steps (and at each validation)
    log_every: int = 10              # loss and lr to MLflow every N steps (every step goes to plots/)
    log_samples: int = 8             # validation crops shown with their reading at each validation
    output_channel: int = 256
    hidden_size: int = 256
    input_channel: int = 1
    imgH: int = 64
    prediction: str = "ctc"          # model.prediction: ctc | attn (attention: experiments only, not exportable)
    tuned_from: str = ""             # set by ``train.use_tuned``: the file the tuned values came from
    tuned_keys: tuple[str, ...] = ()

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "TrainConfig":
        """``model:`` and ``train:`` merged; with ``train.use_tuned`` the tuned values override ``train:``.

        The tuned values are the ``train:`` mapping of ``train.tuned_params`` (default
        ``tuning/best_params.yaml``, written by ``kocr tune``).
        """
        section = params_section(params, "train")
        tuned_from, tuned_keys = "", ()
        extras = train_extras(section)
        if extras["use_tuned"]:
            path = Path(extras["tuned_params"])
            tuned = read_tuned(path)
            section.update(tuned["values"])
            tuned_from, tuned_keys = tuned["source"], tuple(sorted(tuned["values"]))
        model = params_section(params, "model")
        # train: may also set model: knobs (it overrides them); model: holds only its own
        for name, keys, allowed in (("model", model, MODEL_KNOBS),
                                    ("train", section, TRAIN_KNOBS | MODEL_KNOBS | TRAIN_EXTRAS)):
            unknown = sorted(set(keys) - allowed)
            if unknown:
                raise ParamsError(f"{name}: unknown keys {unknown} (misspelt? docs/training.md lists the knobs)")
        knobs = {k: _knob(k, v) for k, v in {**model, **section}.items() if k in MODEL_KNOBS | TRAIN_KNOBS}
        return cls(**knobs, tuned_from=tuned_from, tuned_keys=tuned_keys)

    def __post_init__(self) -> None:
        """ParamsError naming the first knob that cannot work: before any data is read or model built."""
        for name in ("steps", "batch_size", "val_every", "checkpoint_every", "log_every", "max_width"):
            require(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "a whole number >= 1")
        for name in ("warmup_steps", "patience", "batch_max_length", "num_workers", "log_samples"):
            require(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "a whole number >= 0")
        require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "0 (no clipping) or a positive max norm")
        require(self.lr > 0, "train.lr", self.lr, "a learning rate > 0")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        require(self.focal_gamma >= 0, "train.focal_gamma", self.focal_gamma, "0 (plain CTC) or a gamma > 0")
        require(0 <= self.seed < 2**32, "train.seed", self.seed, "a whole number in [0, 2**32 - 1]")
        require(self.optimizer in OPTIMIZERS, "train.optimizer", self.optimizer, f"one of {', '.join(OPTIMIZERS)}")
        require(self.schedule in SCHEDULES, "train.schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
        require(self.precision in PRECISIONS, "train.precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "train.device", self.device,
                "auto, cpu or cuda[:N]")
        require(0 <= self.augment <= 1, "train.augment", self.augment, "a strength in [0, 1]")
        require(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "0 (off) or a value in (0, 1), e.g. 0.999")
        require(0 <= self.average_with_base < 1 and not (self.average_with_base and self.base == "scratch"),
                "train.average_with_base", self.average_with_base,
                "0 (off) or a value in (0, 1), e.g. 0.5, with a base checkpoint to average with")
        require(self.freeze in FREEZE_CHOICES, "train.freeze", self.freeze, f"one of {', '.join(FREEZE_CHOICES)}")
        require(self.prediction in ("ctc", "attn"), "model.prediction", self.prediction, "ctc or attn")
        for name in ("output_channel", "hidden_size", "input_channel", "imgH"):
            require(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "a whole number >= 1")
        mix_shares(self.mix)


MODEL_KNOBS = frozenset({"output_channel", "hidden_size", "input_channel", "imgH", "prediction"})
TRAIN_KNOBS = frozenset(TrainConfig.__dataclass_fields__) - MODEL_KNOBS - {"tuned_from", "tuned_keys"}
TRAIN_EXTRAS = frozenset({"state_dir", "use_tuned", "tuned_params", "processes"})  # read by kocr train, not by the loop
_KNOB_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _knob(name: str, value: Any) -> Any:
    """``value`` as the type of ``TrainConfig.<name>``; ParamsError naming the knob when it is not one.

    YAML reads ``1e-3`` (no dot) as a string, so numbers written as text are taken as numbers."""
    kind = _KNOB_TYPES.get(TrainConfig.__dataclass_fields__[name].type)
    if name == "mix" and value is None:  # all its sets commented out: no mix, as a null section is its defaults
        return {}
    if kind is None:
        return value
    return typed(f"{'model' if name in MODEL_KNOBS else 'train'}.{name}", value, kind)


TUNED_PARAMS = "tuning/best_params.yaml"
P = ParamSpec("P")
R = TypeVar("R")
STATE_DIR = ".kocr/train-state"


def train_extras(section: dict[str, Any]) -> dict[str, Any]:
    """``train:``'s settings read by ``kocr train`` around the loop, typed (ParamsError naming a wrong one):
    ``state_dir`` (where the resumable state goes), ``use_tuned``, ``tuned_params`` and ``processes``."""
    return {"state_dir": typed("train.state_dir", section.get("state_dir", STATE_DIR), str),
            "processes": train_processes(section.get("processes", 1)),
            "use_tuned": typed("train.use_tuned", section.get("use_tuned", False), bool, optional=True) or False,
            "tuned_params": typed("train.tuned_params", section.get("tuned_params"), str, optional=True)
            or TUNED_PARAMS}


def train_processes(value: Any) -> int | str:
    """``train.processes``: a whole number >= 1 or ``auto``, else ParamsError naming it (``0``, ``-1``,
    ``"two"``, ``true``). How many processes ``kocr train`` starts under torchrun
    (:func:`training.distributed.processes_wanted` resolves ``auto``)."""
    if isinstance(value, str) and value == "auto":
        return value
    try:
        number = typed("train.processes", value, int)
    except ParamsError:
        number = 0
    require(number >= 1, "train.processes", value, "a whole number >= 1, or auto (one process per visible GPU)")
    return number


def knob_params(config: TrainConfig, leave_out: frozenset[str] = frozenset()) -> dict[str, str]:
    """Every ``train:`` and model knob of ``config`` as MLflow params, except ``leave_out``: ``train.<knob>``
    and ``model.<key>`` (a model knob under ``model.`` also where ``train:`` or a tuned file set it),
    with the value that trains (a default the file leaves out too; ``train.mix`` as JSON).

    The ``train`` run and every tune trial run log these, so runs of both compare in the MLflow UI on
    the same names and values.
    """
    knobs = {"train": {k: getattr(config, k) for k in sorted(TRAIN_KNOBS - leave_out)},
             "model": {k: getattr(config, k) for k in sorted(MODEL_KNOBS - leave_out)}}
    return param_strings(knobs)


def train_run_params(config: TrainConfig, section: dict[str, Any]) -> dict[str, str]:
    """The ``train`` run's ``train.*``/``model.*`` params: :func:`knob_params` of ``config`` (tuned
    values included) and the settings only ``kocr train`` reads (``state_dir``, ``use_tuned``,
    ``tuned_params``, ``processes``) as ``train_extras`` reads them from ``train:`` section ``section``."""
    return {**knob_params(config), **{f"train.{k}": str(v) for k, v in sorted(train_extras(section).items())}}


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FREEZE_CHOICES = {"none": (), "feature_extraction": ("FeatureExtraction",),
                  "sequence_modeling": ("SequenceModeling",), "both": ("FeatureExtraction", "SequenceModeling")}


def read_tuned(path: str | os.PathLike) -> dict[str, Any]:
    """The tuned ``train:`` values of a ``best_params.yaml``: ``{"values": {...}, "source": "<path> (study, trial)"}``.

    Raises FileNotFoundError naming the file (run ``kocr tune`` first) and ValueError when a key is
    not a train knob.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tuned params not found (train.use_tuned is true: run `kocr tune` first)")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    values = dict(data.get("train") or {})
    unknown = sorted(set(values) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{path}: not train knobs: {', '.join(unknown)}")
    return {"values": values, "source": f"{path} (study {data.get('study')}, trial {data.get('trial')})"}


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` on a machine without it raises ParamsError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"train.device {name!r}: this machine has no CUDA device (torch.cuda.is_available() "
                          "is false); use auto or cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ParamsError(f"train.device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def device_name(device: torch.device) -> str:
    """What trained: the GPU's name (``cuda: NVIDIA H200``) or ``cpu: N cores``, for metrics and model cards."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {os.cpu_count()} cores"


def _steady_rate(first: tuple[float, int, float] | None, ended: float, seen_here: int, validating: float,
                 world_size: int) -> float | None:
    """Images/s after the first step, which carries the loader's start-up: the rate a longer run keeps.

    None when no step followed the first (nothing to measure).
    """
    if first is None or seen_here <= first[1]:
        return None
    seconds = ended - first[0] - (validating - first[2])
    return round((seen_here - first[1]) * world_size / max(seconds, 1e-9), 2)


def freeze_modules(model: Recognizer, freeze: str) -> list[torch.nn.Module]:
    """Stop gradients into the parts named by ``train.freeze``; returns the frozen modules.

    Call before the optimizer is built (it only takes parameters that require gradients). The
    frozen modules should stay in eval mode while the rest trains (see ``_train_mode``), so their
    BatchNorm statistics do not drift either.
    """
    if freeze not in FREEZE_CHOICES:
        raise ValueError(f"train.freeze {freeze!r}: expected one of {', '.join(FREEZE_CHOICES)}")
    frozen = [getattr(model, name) for name in FREEZE_CHOICES[freeze]]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def _train_mode(model: torch.nn.Module, frozen: list[torch.nn.Module]) -> None:
    model.train()
    for module in frozen:
        module.eval()


def build_model(config: TrainConfig, seed: int) -> tuple[Recognizer, Charset, dict[str, Any]]:
    """The model to train: ``base`` with its head moved to ``charset``; raises on an architecture mismatch.

    A CTC checkpoint started as an attention model keeps its trunk and gets a fresh attention head.
    """
    charset = Charset.from_spec(config.charset)
    wanted = RecognizerConfig(num_class=num_class_for(charset, config.prediction), input_channel=config.input_channel,
                              output_channel=config.output_channel, hidden_size=config.hidden_size,
                              imgH=config.imgH, prediction=config.prediction)
    if config.base == "scratch":
        return Recognizer(wanted), charset, {"base": "scratch"}
    base = load_recognizer(config.base)
    model, transfer = start_from(base, wanted, charset, seed=seed)
    return model, charset, {"base": config.base, "base_sha256": file_digest(base.path), **transfer}


def loss_name(config: TrainConfig) -> str:
    """The loss ``Objective`` trains on, in words for the loss curve's axis.

    >>> loss_name(TrainConfig()), loss_name(TrainConfig(focal_gamma=2.0)), loss_name(TrainConfig(prediction="attn"))
    ('CTC loss', 'focal CTC loss (γ=2)', 'cross-entropy loss')
    """
    if config.prediction == "attn":  # attention decoding: per-character cross entropy; focal_gamma is CTC's
        return "cross-entropy loss"
    return f"focal CTC loss (γ={config.focal_gamma:g})" if config.focal_gamma > 0 else "CTC loss"


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers of :func:`train`'s summary as the MLflow metrics ``kocr train`` logs once, at the end.

    The checkpoint is kept for its validation CER, so its CER (the summary's ``val_cer``) is the lowest
    reached, ``best_val_cer``: what a tune trial and the tune run call the best ``val_cer`` they reached,
    one column in the MLflow UI. Its other scores are not the best those scores reached, and a trial
    tuning on one (``tune.metric: val_word_accuracy``) logs that best as ``best_val_word_accuracy``: here
    they are ``at_best_cer_val_word_accuracy``, ``at_best_cer_val_norm_ed``, ``at_best_cer_val_loss``.
    Every other number is ``final_<key>`` (``final_train_seconds``, ``final_val_dropped_<reason>``,
    ``final_val_n``), a key that says ``best_`` or ``final_`` already keeping its name (``final_loss``,
    ``best_step``). None of them is a name a per-step series has (``val_cer``, ``images_per_second``).
    ``averaged_val_*`` is left out: :func:`train` logs it itself. Texts are left out; a flag is 0 or 1.

    >>> summary_metrics({"best_val_cer": 0.1, "val_cer": 0.1, "val_word_accuracy": 0.8, "val_n": 9,
    ...                  "final_loss": 0.5, "base": "ko_base", "averaged_val_cer": 0.2})
    {'best_val_cer': 0.1, 'at_best_cer_val_word_accuracy': 0.8, 'final_val_n': 9.0, 'final_loss': 0.5}
    """
    metrics: dict[str, float] = {}
    for key, value in summary.items():
        if not isinstance(value, (int, float)) or key.startswith("averaged_val_"):
            continue
        if key.startswith(("best_", "final_")):
            name = key
        elif key.startswith("val_") and key != "val_n" and not key.startswith("val_dropped_"):
            # the kept checkpoint's scores, not the last validation's: the CER it was kept for is the best
            # CER reached; the others are that checkpoint's, not the best each reached
            name = "best_val_cer" if key == "val_cer" else f"at_best_cer_{key}"
        else:
            name = f"final_{key}"
        metrics[name] = float(value)
    return metrics


class Objective:
    """What the head trains on: CTC over the whole width, or attention decoding up to ``max_length`` characters."""

    def __init__(self, prediction: str, charset: Charset, max_length: int, focal_gamma: float = 0.0) -> None:
        self.attention = prediction == "attn"
        self.codec = AttnCodec(charset) if self.attention else None
        self.charset, self.max_length, self.focal_gamma = charset, max_length, focal_gamma

    def logits(self, model: torch.nn.Module, images: torch.Tensor, labels: list[str] | None = None) -> torch.Tensor:
        """Class scores: teacher-forced with ``labels`` (attention training), else the model's own reading."""
        if not self.attention:
            return model(images)
        if labels is None:
            return model(images, is_train=False, batch_max_length=self.max_length)
        decoder_input, _ = self.codec.encode(labels, self.max_length)
        return model(images, decoder_input.to(images.device), is_train=True, batch_max_length=self.max_length)

    def loss(self, logits: torch.Tensor, batch: CropBatch, device: torch.device, focal: bool = True) -> torch.Tensor:
        if not self.attention:
            return ctc_loss(logits, batch, device, self.focal_gamma if focal else 0.0)
        _, target = self.codec.encode(batch.labels, self.max_length)
        return attention_loss(logits, target.to(device))

    def decode(self, logits: torch.Tensor) -> list[str]:
        if self.attention:
            return self.codec.decode(logits)
        return self.charset.decode_batch(logits.argmax(2).cpu().tolist())


def ctc_loss(logits: torch.Tensor, batch: CropBatch, device: torch.device, focal_gamma: float = 0.0) -> torch.Tensor:
    """Mean CTC loss of a batch's logits (blank 0; impossible alignments give 0 instead of inf).

    With ``focal_gamma`` > 0, focal CTC: each sample's loss ``l`` (divided by its target length, as
    ``reduction="mean"`` does) is weighted by ``(1 - exp(-l)) ** focal_gamma``, so samples the model
    already reads well count less.
    """
    log_probs = F.log_softmax(logits, dim=2).permute(1, 0, 2)  # T, B, C
    input_lengths = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long)
    if focal_gamma <= 0:
        return F.ctc_loss(log_probs, batch.targets.to(device), input_lengths, batch.target_lengths,
                          blank=0, reduction="mean", zero_infinity=True)
    per_sample = F.ctc_loss(log_probs, batch.targets.to(device), input_lengths, batch.target_lengths,
                            blank=0, reduction="none", zero_infinity=True)
    per_sample = per_sample / batch.target_lengths.to(per_sample.device).clamp(min=1)
    weight = (1.0 - torch.exp(-per_sample)) ** focal_gamma
    return (weight * per_sample).mean()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device`` (None: plain fp32)."""
    choices = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if precision not in choices:
        raise ValueError(f"train.precision {precision!r}: expected auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return choices[precision]


@torch.no_grad()
def validate(model: Recognizer, loader: DataLoader, objective: Objective, device: torch.device,
             samples: int = 0) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Greedy-decode the validation set: (cer, word_accuracy, norm_ed, loss, n; the first ``samples`` (label, reading))."""
    model.eval()
    gts, preds, losses = [], [], []
    for batch in loader:
        images = batch.images.to(device)
        logits = objective.logits(model, images).float()
        preds += objective.decode(logits)
        gts += batch.labels
        if objective.attention:  # the loss of attention is taken teacher-forced, as in training
            logits = objective.logits(model, images, batch.labels).float()
        losses.append(float(objective.loss(logits, batch, device, focal=False)))
    scores = recognition_scores(gts, preds)
    scores["loss"] = float(np.mean(losses)) if losses else float("nan")
    return scores, list(zip(gts, preds))[:samples]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _leave_stops_to_the_command(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: it ignores Ctrl-C and SIGTERM, which reach the whole
    process group (a terminal's Ctrl-C, GNU ``timeout``, a CI runner cancelling a job, ``docker stop``
    through an init that forwards to the group). The command stops on them and ends its workers on the
    way out (their watchdog ends them once it is gone, even SIGKILLed). Was: a worker that died by the
    SIGTERM first made torch's SIGCHLD handler raise 'DataLoader worker (pid ...) is killed by signal:
    Terminated' in the command, alone or while it stopped: exit 1 and a traceback, the run FAILED
    instead of KILLED; a worker that Ctrl-C ended first, 'DataLoader worker ... exited unexpectedly'."""
    for signum in STOPS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOPS))  # blocked by _Loader while the worker started


class _Loader(DataLoader):
    """A DataLoader whose workers start with Ctrl-C and SIGTERM blocked (inherited through the fork),
    so that neither can end one before its ``worker_init_fn`` ignores them; a stop to the command
    meanwhile lands once they are started."""

    def __iter__(self):
        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread() \
                or not hasattr(signal, "pthread_sigmask"):
            return super().__iter__()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOPS))
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def end_workers(self) -> None:
        """Tell the workers to exit and wait for them (at most a few seconds), as the loader's deletion would.
        Done by :func:`train` on every way out: an exception keeps the loader alive in its traceback, and
        the Ctrl-C exit then met the workers in multiprocessing's exit handler, which SIGTERMs them (now
        ignored) and waits for ever."""
        iterator = getattr(self, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


_made = threading.local()  # the loaders that the current train() call of this thread made


def _ends_its_workers(func: Callable[P, R]) -> Callable[P, R]:
    """Wrap ``train`` so that the DataLoader workers it started are ended however it ends."""
    @functools.wraps(func)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        outer, _made.loaders = getattr(_made, "loaders", None), []
        try:
            return func(*args, **kwargs)
        finally:
            loaders, _made.loaders = _made.loaders, outer
            for loader in loaders:
                loader.end_workers()
    return run


def _loader(dataset: CropDataset, config: TrainConfig, device: torch.device,
            sampler: BucketBatchSampler | None = None) -> DataLoader:
    """Training batches from ``sampler`` (bucketed by width), else the whole set in order (validation)."""
    common = {"num_workers": config.num_workers, "collate_fn": dataset.collate,
              "pin_memory": device.type == "cuda", "persistent_workers": config.num_workers > 0}
    if config.num_workers > 0:
        common["prefetch_factor"] = 4
        if hasattr(signal, "pthread_sigmask"):  # POSIX: workers are forked, and signalled with the command
            common["worker_init_fn"] = _leave_stops_to_the_command
    if sampler is None:
        loader = _Loader(dataset, batch_size=config.batch_size, shuffle=False, **common)
    else:
        loader = _Loader(dataset, batch_sampler=sampler, **common)
    if getattr(_made, "loaders", None) is not None:
        _made.loaders.append(loader)
    return loader


def _write_tsv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)


@dataclass
class Progress:
    """Counters a resumed run continues from (saved in the training state)."""

    step: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"cer": math.inf, "step": 0})
    stale: int = 0                   # validations since the last improvement
    skipped_nonfinite: int = 0
    seen: float = 0.0                # images over all ranks
    seconds: float = 0.0             # training wall time before this process
    validation_seconds: float = 0.0  # validation wall time before this process
    loss_rows: list[dict[str, Any]] = field(default_factory=list)
    val_rows: list[dict[str, Any]] = field(default_factory=list)
    sample_rows: list[dict[str, Any]] = field(default_factory=list)
    run_id: str = ""                 # the MLflow run that saved the state: a resumed run supersedes it


def _training_crops(path: Path, config: TrainConfig, charset: Charset) -> CropDataset:
    crops = CropDataset(LmdbDataset(path), charset, config.imgH, config.max_width,
                        batch_max_length=config.batch_max_length, augment=config.augment, seed=config.seed)
    if len(crops) == 0:
        raise ValueError(f"{path}: no usable training samples (dropped: {dict(crops.dropped)})")
    return crops


def mix_shares(mix: dict[str, float]) -> list[tuple[Path, float]]:
    """``train.mix`` checked: each set's path and share, in order; the main set keeps the rest (> 0).

    >>> mix_shares({"data/replay": 0.25})
    [(PosixPath('data/replay'), 0.25)]
    """
    if not isinstance(mix, dict):
        raise ParamsError(f"train.mix: expected a mapping {{path: share}}, got {mix!r}")
    shares = []
    for path, share in mix.items():
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
            raise ParamsError(f"train.mix: {path}: share {share!r} must be a number between 0 and 1")
        shares.append((Path(path), float(share)))
    if sum(share for _, share in shares) >= 1:
        raise ParamsError(f"train.mix: shares add up to {sum(s for _, s in shares):g}; the main training set "
                         "needs the rest, so keep the sum below 1")
    return shares


def check_sets(config: TrainConfig, data_dir: str | os.PathLike) -> None:
    """Raise as training would on a set it reads that is not there (``DATA/train``, ``DATA/val`` and each
    ``train.mix`` set: a mistyped ``--data``), before ``kocr train`` removes or logs anything."""
    for path in (Path(data_dir) / "train", Path(data_dir) / "val", *(path for path, _ in mix_shares(config.mix))):
        lmdb_parts(path)


def _datasets(config: TrainConfig, data_dir: Path, charset: Charset) -> tuple[CropDataset | MixedCrops, CropDataset]:
    train_set: CropDataset | MixedCrops = _training_crops(data_dir / "train", config, charset)
    extra = mix_shares(config.mix)
    if extra:
        parts = [train_set, *(_training_crops(path, config, charset) for path, _ in extra)]
        train_set = MixedCrops(parts, [1 - sum(share for _, share in extra), *(share for _, share in extra)])
    # batch_max_length filters training only: validation stays the whole set, so runs (and tuning
    # trials) with different limits are scored on the same samples.
    val_set = CropDataset(LmdbDataset(data_dir / "val"), charset, config.imgH, config.max_width)
    return train_set, val_set


def _mix_report(train_set: CropDataset | MixedCrops) -> list[dict[str, Any]]:
    """What each training set brings under ``train.mix``: path, samples kept, share of each epoch."""
    if not isinstance(train_set, MixedCrops):
        return []
    return [{"path": str(part.source.path), "samples": n, "share": share}
            for part, (n, share) in zip(train_set.parts, train_set.blocks)]


def _worker_error_shortened(exc: Exception) -> None:
    """Cut a DataLoader worker's error (torch puts the worker's whole traceback in its message) to the
    original message, so ``kocr train`` still says it in one line (KOCR_TRACEBACK=1 keeps the whole)."""
    text = str(exc)
    if not text.startswith("Caught ") or "\nOriginal Traceback" not in text or isinstance(exc, KeyError):
        return
    found = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(type(exc).__name__)}: ", text, re.M))
    if found and not os.environ.get("KOCR_TRACEBACK"):
        exc.args = (text[found[-1].end():].strip(),)


def _short_worker_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Wrap ``func`` so that a DataLoader worker's error it raises says only the original message."""
    @functools.wraps(func)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            _worker_error_shortened(exc)
            raise
    return run


@one_report
@_short_worker_errors
@_ends_its_workers
def train(config: TrainConfig, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
          metrics_file: str | os.PathLike = "metrics/train.json", plots_dir: str | os.PathLike = "plots/train",
          progress: bool = True, log: bool = True,
          on_validation: Callable[[int, dict[str, float]], None] | None = None,
          state_file: str | os.PathLike | None = None, resume: bool = False,
          scorer: Callable[[Recognizer, Charset], dict[str, float]] | None = None,
          keep_state: bool = False) -> dict[str, Any]:
    """Run the stage; with ``log`` every number also goes to the active MLflow run (rank 0 only under torchrun).

    ``on_validation(step, scores)`` is called after each validation (scores: cer, word_accuracy,
    norm_ed, loss); an exception it raises (e.g. ``optuna.TrialPruned``) stops training and propagates.
    With ``state_file`` the resumable state is written there every ``checkpoint_every`` steps and at
    each validation, and removed when the run completes, unless ``keep_state`` (``kocr train`` keeps
    it until the model is logged to MLflow, then removes it with :func:`discard_state`); with
    ``resume`` a state found there (from the same config and data) is continued, else the run starts
    fresh and says why. A state saved at the end of a run (the last step, or an early stop that the
    current ``patience`` still calls) trains no further: the resumed run only writes the model,
    metrics and plots again. ``scorer(model, charset)`` adds scores to each validation (e.g.
    end-to-end F1, :mod:`evaluation.page_scorer`).
    """
    _seed_everything(config.seed)
    ctx = init_distributed(pick_device(config.device))
    device, main = ctx.device, ctx.is_main
    log = log and main
    if log:
        import mlflow
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if not 0.0 <= config.average_with_base < 1.0 or (config.average_with_base and config.base == "scratch"):
        raise ValueError(f"train.average_with_base {config.average_with_base}: expected 0 (off) or a value in "
                         "(0, 1), e.g. 0.5, with a base checkpoint to average with")
    core, charset, transfer = build_model(config, config.seed)
    if config.average_with_base and transfer.get("head_new_classes"):
        raise ValueError(f"train.average_with_base {config.average_with_base}: {config.base}'s head was rebuilt for "
                         f"{config.charset} ({transfer['head_rows_copied']} of {transfer['head_new_classes']} rows "
                         "copied), so a mean with it would weaken every character it never read; use 0 when the "
                         "charset changes")
    start = {k: v.detach().clone() for k, v in core.state_dict().items()} if config.average_with_base else None
    core.to(device)
    if config.channels_last and device.type == "cuda":
        core.to(memory_format=torch.channels_last)
    frozen = freeze_modules(core, config.freeze)
    _train_mode(core, frozen)
    train_set, val_set = _datasets(config, data_dir, charset)
    # checked before the ranks meet (_same_state_on_every_rank), where an error every rank makes is said once;
    # raised by the sampler below, after it, each rank said it
    check_batches_fill(len(train_set), config.batch_size, ctx.world_size)
    val_dropped = {f"val_dropped_{k}": v for k, v in sorted(val_set.dropped.items())}
    if val_dropped and main:
        print(f"train: warning: {sum(val_dropped.values())} of {len(val_set.source)} validation samples cannot be "
              f"scored and are left out of the val CER ({', '.join(f'{k}: {v}' for k, v in val_set.dropped.items())}); "
              "counted as val_dropped_<reason> (docs/training.md)", file=sys.stderr)
    if not len(val_set) and main:
        print(f"train: {data_dir / 'val'} holds no usable samples: the checkpoint kept is the one at the lowest "
              "training loss, which best_val_cer then holds", file=sys.stderr)
    amp_dtype = resolve_precision(config.precision, device)
    max_length = config.batch_max_length or train_set.longest_label
    val_length = max(max_length, val_set.longest_label)  # attention reads validation up to its longest label
    objective = Objective(config.prediction, charset, max_length, config.focal_gamma)
    val_objective = Objective(config.prediction, charset, val_length)
    info = {**transfer, "train_samples": len(train_set), "val_samples": len(val_set),
            "batch_max_length_used": max_length,
            "world_size": ctx.world_size, "global_batch_size": config.batch_size * ctx.world_size,
            "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            **{f"train_dropped_{k}": v for k, v in train_set.dropped.items()}, **val_dropped}
    mixed = _mix_report(train_set)
    if mixed:
        info["train_mix"] = ", ".join(f"{m['path']}: {m['samples']} samples, share {m['share']:g}" for m in mixed)
    if log:
        mlflow.log_params(info)
        mlflow.set_tag("device", str(device))
    if config.tuned_keys and main:
        used = {k: getattr(config, k) for k in config.tuned_keys}
        print(f"train: tuned values from {config.tuned_from}: "
              + ", ".join(f"{k}={v}" for k, v in used.items()), file=sys.stderr)
        if log:
            mlflow.log_params({f"tuned.{k}": v for k, v in used.items()})
            mlflow.set_tag("kocr.tuned_from", config.tuned_from)

    optimizer = make_optimizer(core, config.optimizer, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, config.schedule, config.warmup_steps, config.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    max_norm = config.grad_clip if config.grad_clip > 0 else math.inf  # inf: the norm is measured, never clipped
    signature = {"config": _resumable(config), "train_samples": len(train_set), "val_samples": len(val_set),
                 "world_size": ctx.world_size, "train_data": train_set.fingerprint, "val_data": val_set.fingerprint,
                 "base_sha256": transfer.get("base_sha256", "")}
    ema = make_ema(core, config.ema_decay) if main else None
    state = Progress()
    if resume and state_file is not None:
        state = _resume(Path(state_file), signature, core, optimizer, scheduler, scaler, ema,
                        out_dir if main else None, quiet=not main) or state
    _same_state_on_every_rank(state, Path(state_file) if resume and state_file is not None else None, ctx)
    resumed_at = state.step  # 0 for a fresh start
    if log:
        _take_over(state)
    finished = state.step >= config.steps or (config.patience > 0 and state.stale >= config.patience)
    if finished and main:
        print(f"train: the saved state ended its run at step {state.step}: nothing left to train, writing "
              "its model and metrics", file=sys.stderr)
    runner: torch.nn.Module = core
    if ctx.enabled:
        runner = torch.nn.parallel.DistributedDataParallel(
            core, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        runner = torch.compile(runner)

    sampler = BucketBatchSampler(train_set.widths, config.batch_size, config.steps, seed=config.seed,
                                 start=state.step, rank=ctx.rank, world_size=ctx.world_size, tagged=True,
                                 mix=getattr(train_set, "blocks", None))
    batches = [] if finished else _loader(train_set, config, device, sampler)
    val_loader = _loader(val_set, config, device)
    started, seen_here, validating_seconds = time.perf_counter(), 0, 0.0
    first: tuple[float, int, float] | None = None  # (time, images, validating) once step one is done
    bar = tqdm(total=config.steps, initial=state.step, desc="train", unit="step", disable=not (progress and main))
    stop = False
    for batch in batches:
        state.step += 1
        step = state.step
        lr = optimizer.param_groups[0]["lr"]  # the rate this step trains with (scheduler.step() moves it on)
        images = batch.images.to(device, non_blocking=True)
        if config.channels_last and device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = objective.logits(runner, images, batch.labels)
        loss = objective.loss(logits.float(), batch, device)
        optimizer.zero_grad(set_to_none=True)
        # every rank takes the same branch, or DDP's gradient all-reduce would wait forever
        if not all_agree(bool(torch.isfinite(loss)), ctx):
            state.skipped_nonfinite += 1
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(core.parameters(), max_norm)  # also the finiteness check
            if all_agree(bool(torch.isfinite(norm)), ctx) or scaler.is_enabled():
                scaler.step(optimizer)  # with fp16 the scaler itself skips inf gradients and lowers the scale
                scaler.update()
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(core)
            else:
                state.skipped_nonfinite += 1
        seen_here += len(batch.labels)
        if first is None:  # the loader's start-up and the first step's set-up lie before this
            first = (time.perf_counter(), seen_here, validating_seconds)
        loss_value = float(loss.detach())
        if ctx.enabled:  # the loss DDP's averaged gradient descends: the mean of every rank's batch loss
            loss_value = sum_over_ranks(loss_value, ctx) / ctx.world_size
        state.loss_rows.append({"step": step, "loss": round(loss_value, 5)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if log and (step % config.log_every == 0 or step == 1):
            mlflow.log_metrics({"loss": loss_value, "lr": lr}, step=step)
        validating = step % config.val_every == 0 or step == config.steps
        if validating:
            before = time.perf_counter()
            stop = _validation(config, state, core, frozen, val_loader, val_set, val_objective, device, ctx, out_dir,
                               transfer, log, on_validation, seen_here, scorer,
                               before - started - validating_seconds, ema)
            validating_seconds += time.perf_counter() - before
        if state_file is not None and main and (validating or step % config.checkpoint_every == 0):
            _save(Path(state_file), signature, state, core, optimizer, scheduler, scaler,
                  seen_here, time.perf_counter() - started - validating_seconds, ctx, ema, out_dir,
                  validating_seconds)
        if validating and broadcast_flag(stop, ctx):
            break
    bar.close()
    seen = state.seen + sum_over_ranks(seen_here, ctx)
    ended = time.perf_counter()
    elapsed = state.seconds + ended - started - validating_seconds  # training time only
    rate = round(seen / elapsed, 2)
    shutdown(ctx)
    best = state.best
    summary = {"steps": state.step, "best_step": best["step"], "best_val_cer": best["cer"],
               **{k: v for k, v in best.items() if k.startswith("val_")},
               "final_loss": state.loss_rows[-1]["loss"], "skipped_nonfinite_steps": state.skipped_nonfinite,
               "stopped_early": state.step < config.steps,
               "images_per_second": rate,
               "steady_images_per_second": _steady_rate(first, ended, seen_here, validating_seconds, ctx.world_size)
               or rate, "train_seconds": round(elapsed, 1),
               "validation_seconds": round(state.validation_seconds + validating_seconds, 1),
               "train_samples": len(train_set), **{f"dropped_{k}": v for k, v in train_set.dropped.items()},
               **val_dropped,
               "base": transfer["base"], "base_sha256": transfer.get("base_sha256", ""),
               "head_rows_copied": transfer.get("head_rows_copied", 0), "world_size": ctx.world_size,
               "batch_max_length_used": info["batch_max_length_used"]}
    if resumed_at:  # this process's MLflow run holds the curve from here on; loss.tsv and val.tsv hold it all
        summary["resumed_from_step"] = resumed_at
    summary["device"] = device_name(device)
    if mixed:
        summary["train_mix"] = mixed
    if device.type == "cuda":
        summary["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    if not main:
        return summary
    if start is not None:
        summary.update(_average_with_start(config, start, out_dir, charset, val_loader, val_objective, device, log))
    write_text(metrics_file, json.dumps(summary, indent=1))
    _write_tsv(Path(plots_dir) / "loss.tsv", state.loss_rows)
    _write_tsv(Path(plots_dir) / "val.tsv", state.val_rows)
    if state_file is not None and not keep_state:
        discard_state(state_file)  # the run is complete: nothing left to resume
    return summary


def discard_state(state_file: str | os.PathLike) -> None:
    """Remove a run's resumable state once nothing of the run is left to do (a missing file is fine)."""
    Path(state_file).unlink(missing_ok=True)


def _average_with_start(config: TrainConfig, start: dict[str, torch.Tensor], out_dir: Path, charset: Charset,
                        val_loader: DataLoader, objective: Objective, device: torch.device,
                        log: bool) -> dict[str, Any]:
    """Replace the kept checkpoint by ``average_with_base`` x the start + the rest x the best, and score it.

    Averaging a fine-tuned model with the weights it started from (WiSE-FT, Wortsman et al. 2022)
    trades a little of the training distribution for robustness off it; in the ko-base recipe the
    mean of a continuation and its start read unseen faces better than either (docs/recipe.md).
    """
    best = torch.load(out_dir / "model.pt", map_location=device, weights_only=True)
    model = Recognizer(RecognizerConfig(**best["config"])).to(device)
    share = config.average_with_base
    model.load_state_dict(mean_state_dict([best["state_dict"], start], [1.0 - share, share]))
    scores = validate(model, val_loader, objective, device)[0] if len(val_loader.dataset) else {}
    save_checkpoint(out_dir / "model.pt", model, charset,
                    meta={**best["meta"], "averaged_with_base": share})
    averaged = {f"averaged_val_{k}": v for k, v in scores.items() if k != "n"}
    if log:
        import mlflow

        mlflow.log_metrics(averaged)
    return {"averaged_with_base": share, **averaged}


def improves(best: dict[str, Any], cer: float, loss: float) -> bool:
    """Whether a validation beats the best so far: lower CER, or the same CER at a lower validation
    loss (small validation sets tie often; the surer model reads the same and survives int8 better)."""
    if best["step"] == 0:
        return True
    return cer < best["cer"] or (cer == best["cer"] and loss < best.get("val_loss", math.inf))


def _validation(config: TrainConfig, state: Progress, core: Recognizer, frozen: list[torch.nn.Module],
                val_loader: DataLoader, val_set: CropDataset, objective: Objective, device: torch.device,
                ctx: DistContext, out_dir: Path, transfer: dict[str, Any], log: bool,
                on_validation: Callable[[int, dict[str, float]], None] | None,
                seen_here: int, scorer: Callable[[Recognizer, Charset], dict[str, float]] | None,
                seconds: float, ema: torch.nn.Module | None = None) -> bool:
    """Validate on rank 0, keep the best checkpoint, track; True when early stopping says stop.

    With an EMA the averaged weights are the ones scored and kept; the raw weights' CER and word
    accuracy are logged beside them as ``raw_cer`` and ``raw_word_accuracy``.
    """
    rate = (state.seen + sum_over_ranks(seen_here, ctx)) / max(state.seconds + seconds, 1e-9)
    if not ctx.is_main:
        return False
    step = state.step
    kept = ema.module if ema is not None else core
    scores, samples = validate(kept, val_loader, objective, device, config.log_samples) if len(val_set) else ({}, [])
    if ema is not None and len(val_set):
        raw = validate(core, val_loader, objective, device)[0]
        scores.update({"raw_cer": raw["cer"], "raw_word_accuracy": raw["word_accuracy"]})
    if scorer is not None:
        scores.update(scorer(kept, objective.charset))
    _train_mode(core, frozen)
    state.val_rows.append({"step": step, **{k: round(v, 5) for k, v in scores.items() if k != "n"}})
    rows = [{"step": step, "label": gt, "reading": pred, "correct": gt == pred} for gt, pred in samples]
    state.sample_rows += rows
    cer = scores.get("cer", state.loss_rows[-1]["loss"])
    gained = improves(state.best, cer, math.inf)  # early stopping counts CER gains only: no loss wins a tie
    state.stale = 0 if gained else state.stale + 1
    if improves(state.best, cer, scores.get("loss", math.inf)):
        state.best = {"cer": cer, "step": step, **{f"val_{k}": v for k, v in scores.items()}}
        save_checkpoint(out_dir / "model.pt", kept, objective.charset,
                        meta={"step": step, "train_config": asdict(config), **transfer})
    if log:
        import mlflow

        extra = {"images_per_second": rate}
        if device.type == "cuda":
            extra["gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        mlflow.log_metrics({f"val_{k}": v for k, v in scores.items() if k != "n"} | extra, step=step)
        if rows:  # every validation's rows so far, replacing the file (no download of the logged one)
            _log_samples(state.sample_rows)
    if on_validation is not None:
        on_validation(step, scores)
    return config.patience > 0 and state.stale >= config.patience


def _take_over(state: Progress) -> None:
    """Make the active MLflow run the one the state belongs to (rank 0, logging).

    A resumed state names the run that saved it: that run is superseded (tagged, and ended as
    KILLED if its killed process left it RUNNING; :func:`kocr.tracking.supersede`), and the
    validation samples logged before the resume are logged again, so the new run's
    ``val_samples.json`` holds the whole run's, as an uninterrupted run's does.
    """
    import mlflow

    from kocr.tracking import supersede

    run = mlflow.active_run()
    if run is None:
        return
    if state.run_id and state.run_id != run.info.run_id:
        supersede(state.run_id, run.info.run_id)
    if state.sample_rows and state.run_id != run.info.run_id:
        _log_samples(state.sample_rows)
    state.run_id = run.info.run_id


def _log_samples(rows: list[dict[str, Any]]) -> None:
    """Log the run's validation samples so far as its ``val_samples.json`` table, replacing the file.

    The file and tag are what ``mlflow.log_table`` writes (the UI shows it as a table), but log_table
    appends: it first downloads the logged file, which printed a "Downloading artifacts" bar at every
    validation (every trial's, in a ``kocr tune`` worker's output) and fetched the whole table each time.
    The rows are all in memory (``Progress.sample_rows``, kept across a resume), so the file is written whole.
    """
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    columns = list(rows[0])
    table = {"columns": columns, "data": [[row[key] for key in columns] for row in rows]}  # pandas' "split" form
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "val_samples.json"
        path.write_text(json.dumps(table, separators=(",", ":")), encoding="utf-8")
        mlflow.log_artifact(str(path))
    mlflow.set_tag(MLFLOW_LOGGED_ARTIFACTS, json.dumps([{"path": "val_samples.json", "type": "table"}]))


def _resumable(config: TrainConfig) -> dict[str, Any]:
    values = asdict(config)
    if config.schedule == "constant":
        values.pop("steps")  # a constant-lr run may be resumed with more (or fewer) steps
    return values


def _save(path: Path, signature: dict[str, Any], state: Progress, core: Recognizer,
          optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
          seen_here: int, seconds: float, ctx: DistContext, ema: torch.nn.Module | None = None,
          out_dir: Path | None = None, validating: float = 0.0) -> None:
    """Write the resumable state, with the best checkpoint so far: ``dvc repro`` deletes the stage's
    outputs before it runs the stage again, so the state must not rely on ``out_dir/model.pt`` surviving."""
    counters = Progress(**{**vars(state), "seen": state.seen + seen_here * ctx.world_size,
                           "seconds": state.seconds + seconds,
                           "validation_seconds": state.validation_seconds + validating})
    kept = out_dir / "model.pt" if out_dir is not None and state.best["step"] else None
    save_state(path, {"signature": signature, "progress": vars(counters), "model": core.state_dict(),
                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                      "scaler": scaler.state_dict(), "rng": rng_state(),
                      "ema": ema.state_dict() if ema is not None else None,
                      "best_checkpoint": kept.read_bytes() if kept is not None and kept.is_file() else None})


class ResumeMismatch(ValueError):
    """The ranks of a torchrun job found different saved states (e.g. ``state_dir`` on a node's own disk)."""


def _same_state_on_every_rank(state: Progress, path: Path | None, ctx: DistContext) -> None:
    """Stop unless every rank resumed the same saved state, or every rank starts from step 0.

    Ranks at different steps would run different numbers of collectives and wait on each other until
    the process group's timeout (30 minutes by default), silently; rank 0 raises one line naming what
    each rank found instead, the others exit quietly. Also where the ranks meet once set up
    (:func:`training.distributed.setup_agreed`), so every rank comes here, resuming or not.
    """
    if not ctx.enabled:
        return
    key: str | None = None
    if path is None:
        found = "started from step 0"
    elif state.step:
        key = hashlib.sha256(json.dumps(vars(state), sort_keys=True, default=str).encode()).hexdigest()
        found = f"resumed {path} at step {state.step}"
    else:
        found = f"found a state of another run at {path}" if path.is_file() else f"found no saved state at {path}"

    outcomes = setup_agreed((key, found), ctx)
    if len({k for k, _ in outcomes}) == 1:
        return
    if not ctx.is_main:
        leave_to(ctx)
    ranks: dict[str, list[int]] = {}
    for rank, (_, said) in enumerate(outcomes):
        ranks.setdefault(said, []).append(rank)
    raise ResumeMismatch(
        "the ranks found different states to resume: "
        + "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))} {said}" for said, r in ranks.items())
        + "; every rank must read the same train.state_dir (on a filesystem all nodes share: docs/training.md, "
        "torchrun)")


def _resume(path: Path, signature: dict[str, Any], core: Recognizer, optimizer: torch.optim.Optimizer,
            scheduler: Any, scaler: torch.amp.GradScaler, ema: torch.nn.Module | None = None,
            out_dir: Path | None = None, quiet: bool = False) -> Progress | None:
    """Load a saved state into the objects; None (and a message) when there is none or it is another run's.

    With ``out_dir`` (rank 0) the best checkpoint saved with the state is written back as ``model.pt``.
    ``quiet`` (the other ranks under torchrun) leaves the messages to rank 0.
    """
    def say(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr)

    if not path.is_file():
        say(f"train: no saved state at {path}; starting from step 0")
        return None
    try:
        saved = load_state(path)
    except FileNotFoundError:  # another rank set it aside (below) since is_file()
        say(f"train: no saved state at {path}; starting from step 0")
        return None
    except DamagedState as exc:
        # kocr writes states atomically, so this is a disk fault, a cut copy or a foreign file: nothing in it
        # can be resumed, and left in place it would stop every later `dvc repro` the same way
        if not quiet:
            try:
                aside = set_aside(path)
            except OSError as err:
                raise ValueError(f"{exc}; it could not be moved aside ({err.strerror or err}): delete or move it "
                                 "to start the run from step 0") from None
            say(f"train: warning: {exc}; moved it to {aside} and starting from step 0 (from train.base: the "
                "steps it held are trained again); delete that file once looked at")
        return None
    old = saved["signature"]
    # a state written by an older kocr lacks what it did not record yet (the data digests since 7c1a771):
    # it cannot be told to be this run's, which is not the same as another run's (nothing "changed")
    unrecorded = [k for k in ("train_data", "val_data", "base_sha256") if k not in old]
    if unrecorded:
        say(f"train: {path} was written by an older kocr, which did not record {', '.join(unrecorded)}: it cannot be "
            "checked to be this run's; starting from step 0")
        return None
    changed = config_differences(old["config"], signature["config"])
    changed += [f"{k}: {old.get(k)} -> {signature[k]}" for k in ("train_samples", "val_samples", "world_size")
                if old.get(k) != signature[k]]
    changed += [f"{k} changed" for k in ("train_data", "val_data", "base_sha256") if old.get(k) != signature[k]]
    if changed:
        say(f"train: {path} belongs to another run ({'; '.join(changed)}); starting from step 0")
        return None
    # this run's state, but written by a kocr whose Progress had other fields (a newer one's, or an older one's
    # since dropped): counters this kocr does not know cannot be carried on; checked before any weights load
    unknown = sorted(map(str, set(saved["progress"]) - {f.name for f in fields(Progress)}))
    if unknown:
        say(f"train: {path} was written by another kocr, whose progress records {', '.join(unknown)}, which this "
            "kocr does not know: it cannot be resumed here; starting from step 0")
        return None
    core.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    if ema is not None:
        ema.load_state_dict(saved["ema"])
    restore_rng(saved["rng"])
    progress = Progress(**saved["progress"])
    if out_dir is not None and saved.get("best_checkpoint"):
        save_bytes(out_dir / "model.pt", saved["best_checkpoint"])
    say(f"train: resuming {path} at step {progress.step}")
    return progress
