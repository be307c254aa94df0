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
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from evaluation.metrics import recognition_scores
from training.charset import Charset
from training.checkpoint import check_architecture, load_recognizer, save_checkpoint, transfer_head
from training.crops import BucketBatchSampler, CropBatch, CropDataset
from training.data.lmdb_store import LmdbDataset
from training.model import Recognizer, RecognizerConfig


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
    grad_clip: float = 5.0
    val_every: int = 100
    seed: int = 0
    num_workers: int = 0
    max_width: int = 1024
    device: str = "auto"
    warmup_steps: int = 0            # linear lr warm-up over this many optimizer steps; 0 = none
    freeze: str = "none"             # none | feature_extraction | sequence_modeling | both
    batch_max_length: int = 0        # drop training labels longer than this; 0 = what the model can align
    focal_gamma: float = 0.0         # 0 = plain CTC; > 0 = focal CTC, (1 - p)^gamma weighting
    output_channel: int = 256
    hidden_size: int = 256
    input_channel: int = 1
    imgH: int = 64
    tuned_from: str = ""             # set by ``train.use_tuned``: the file the tuned values came from
    tuned_keys: tuple[str, ...] = ()

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "TrainConfig":
        """``model:`` and ``train:`` merged; with ``train.use_tuned`` the tuned values override ``train:``.

        The tuned values are the ``train:`` mapping of ``train.tuned_params`` (default
        ``tuning/best_params.yaml``, written by ``kocr tune``).
        """
        section = dict(params.get("train", {}))
        tuned_from, tuned_keys = "", ()
        if section.get("use_tuned"):
            path = Path(section.get("tuned_params") or TUNED_PARAMS)
            tuned = read_tuned(path)
            section.update(tuned["values"])
            tuned_from, tuned_keys = tuned["source"], tuple(sorted(tuned["values"]))
        merged = {**params.get("model", {}), **section}
        knobs = {k: v for k, v in merged.items() if k in cls.__dataclass_fields__ and not k.startswith("tuned_")}
        return cls(**knobs, tuned_from=tuned_from, tuned_keys=tuned_keys)


TUNED_PARAMS = "tuning/best_params.yaml"
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
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up: the lr grows from lr/warmup_steps to lr over ``warmup_steps`` optimizer steps, then stays."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: min(1.0, (done + 1) / warmup_steps) if warmup_steps > 0 else 1.0)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adadelta (as users run EasyOCR's trainer, lr 1.0), Adam or AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adadelta":
        return torch.optim.Adadelta(params, lr=config.lr, rho=0.95, eps=1e-8, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"train.optimizer {config.optimizer!r}: expected adadelta, adam or adamw")


def build_model(config: TrainConfig, seed: int) -> tuple[Recognizer, Charset, dict[str, Any]]:
    """The model to train: ``base`` with its head moved to ``charset``; raises on an architecture mismatch."""
    charset = Charset.from_spec(config.charset)
    wanted = RecognizerConfig(num_class=charset.num_class, input_channel=config.input_channel,
                              output_channel=config.output_channel, hidden_size=config.hidden_size,
                              imgH=config.imgH)
    if config.base == "scratch":
        return Recognizer(wanted), charset, {"base": "scratch"}
    base = load_recognizer(config.base)
    check_architecture(base.config, wanted, config.base)
    if base.charset == charset:
        return base.model, charset, {"base": config.base, "head_rows_copied": charset.num_class}
    model, transfer = transfer_head(base, charset, seed=seed)
    return model, charset, {"base": config.base, **transfer.as_dict()}


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


@torch.no_grad()
def validate(model: Recognizer, loader: DataLoader, charset: Charset, device: torch.device) -> dict[str, float]:
    """Greedy-decode the validation set; returns cer, word_accuracy, norm_ed, loss and n."""
    model.eval()
    gts, preds, losses = [], [], []
    for batch in loader:
        logits = model(batch.images.to(device))
        preds += charset.decode_batch(logits.argmax(2).cpu().tolist())
        gts += batch.labels
        losses.append(float(ctc_loss(logits, batch, device)))
    model.train()
    scores = recognition_scores(gts, preds)
    scores["loss"] = float(np.mean(losses)) if losses else float("nan")
    return scores


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _loader(dataset: CropDataset, config: TrainConfig, device: torch.device,
            num_batches: int | None = None) -> DataLoader:
    """Training batches bucketed by width when ``num_batches`` is given, else the set in order."""
    common = {"num_workers": config.num_workers, "collate_fn": dataset.collate,
              "pin_memory": device.type == "cuda", "persistent_workers": config.num_workers > 0}
    if num_batches is None:
        return DataLoader(dataset, batch_size=config.batch_size, shuffle=False, **common)
    sampler = BucketBatchSampler(dataset.widths, config.batch_size, num_batches, seed=config.seed)
    return DataLoader(dataset, batch_sampler=sampler, **common)


def _write_tsv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)


def train(config: TrainConfig, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
          metrics_file: str | os.PathLike = "metrics/train.json", plots_dir: str | os.PathLike = "plots/train",
          progress: bool = True, log: bool = True,
          on_validation: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Run the stage; with ``log`` every number also goes to the active MLflow run.

    ``on_validation(step, scores)`` is called after each validation (scores: cer, word_accuracy,
    norm_ed, loss); an exception it raises (e.g. ``optuna.TrialPruned``) stops training and propagates.
    """
    if log:
        import mlflow

    _seed_everything(config.seed)
    device = pick_device(config.device)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    model, charset, transfer = build_model(config, config.seed)
    model.to(device)
    frozen = freeze_modules(model, config.freeze)
    _train_mode(model, frozen)
    train_set = CropDataset(LmdbDataset(data_dir / "train"), charset, config.imgH, config.max_width,
                            batch_max_length=config.batch_max_length)
    # batch_max_length filters training only: validation stays the whole set, so runs (and tuning
    # trials) with different limits are scored on the same samples.
    val_set = CropDataset(LmdbDataset(data_dir / "val"), charset, config.imgH, config.max_width)
    if len(train_set) == 0:
        raise ValueError(f"{data_dir / 'train'}: no usable training samples (dropped: {dict(train_set.dropped)})")
    info = {**transfer, "device": str(device), "train_samples": len(train_set), "val_samples": len(val_set),
            **{f"train_dropped_{k}": v for k, v in train_set.dropped.items()}}
    if log:
        mlflow.log_params({k: v for k, v in info.items() if k != "device"})
        mlflow.set_tag("device", str(device))
    if config.tuned_keys:
        used = {k: getattr(config, k) for k in config.tuned_keys}
        print(f"train: tuned values from {config.tuned_from}: "
              + ", ".join(f"{k}={v}" for k, v in used.items()), file=sys.stderr)
        if log:
            mlflow.log_params({f"tuned.{k}": v for k, v in used.items()})
            mlflow.set_tag("kocr.tuned_from", config.tuned_from)

    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config.warmup_steps)
    batches = _loader(train_set, config, device, num_batches=config.steps)
    val_loader = _loader(val_set, config, device)
    loss_rows, val_rows = [], []
    best = {"cer": math.inf, "step": 0}
    skipped_nonfinite = 0
    started, seen = time.perf_counter(), 0
    bar = tqdm(total=config.steps, desc="train", unit="step", disable=not progress)
    step = 0
    for batch in batches:
        step += 1
        loss = ctc_loss(model(batch.images.to(device, non_blocking=True)), batch, device, config.focal_gamma)
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            skipped_nonfinite += 1
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
        seen += len(batch.labels)
        loss_value = float(loss)
        loss_rows.append({"step": step, "loss": round(loss_value, 5)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if log:
            mlflow.log_metrics({"loss": loss_value, "lr": optimizer.param_groups[0]["lr"]}, step=step)
        if step % config.val_every == 0 or step == config.steps:
            scores = validate(model, val_loader, charset, device) if len(val_set) else {}
            _train_mode(model, frozen)
            rate = seen / (time.perf_counter() - started)
            val_rows.append({"step": step, **{k: round(v, 5) for k, v in scores.items() if k != "n"}})
            if log:
                mlflow.log_metrics({f"val_{k}": v for k, v in scores.items() if k != "n"} |
                                   {"images_per_second": rate}, step=step)
            cer = scores.get("cer", loss_value)
            if cer < best["cer"] or best["step"] == 0:
                best = {"cer": cer, "step": step, **{f"val_{k}": v for k, v in scores.items()}}
                save_checkpoint(out_dir / "model.pt", model, charset,
                                meta={"step": step, "train_config": asdict(config), **transfer})
            if on_validation is not None:
                on_validation(step, scores)
    bar.close()
    elapsed = time.perf_counter() - started
    summary = {"steps": step, "best_step": best["step"], "best_val_cer": best["cer"],
               **{k: v for k, v in best.items() if k.startswith("val_")},
               "final_loss": loss_rows[-1]["loss"], "skipped_nonfinite_steps": skipped_nonfinite,
               "images_per_second": round(seen / elapsed, 2), "train_seconds": round(elapsed, 1),
               "train_samples": len(train_set), **{f"dropped_{k}": v for k, v in train_set.dropped.items()},
               "head_rows_copied": transfer.get("head_rows_copied", 0)}
    Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics_file).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    _write_tsv(Path(plots_dir) / "loss.tsv", loss_rows)
    _write_tsv(Path(plots_dir) / "val.tsv", val_rows)
    return summary
