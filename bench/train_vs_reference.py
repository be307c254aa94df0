"""Training images/s of the platform's engine against the loop users run today, same model and data, one run.

The reference reproduces the settings of deep-text-recognition-benchmark's train.py / EasyOCR's
trainer as users run them: single-process loading (PIL decode of each LMDB image), every image
resized with kept ratio and padded to imgW 600, fp32, Adadelta (lr 1.0). The engine is
``training.train.train`` with its defaults: width-bucketed batches padded per batch, EasyOCR's
exact preprocessing, DataLoader worker processes (``--workers``), autocast on GPU. Both start
from the same english_g2 weights with the korean_g2 head on the same LMDB set, and run the same
number of steps at the same batch size; rounds alternate (reference, engine, reference, engine)
so machine noise hits both alike. Validation time is not counted on either side.

    .venv/bin/python bench/train_vs_reference.py                       # generates a small set in /tmp
    .venv/bin/python bench/train_vs_reference.py --data data/prepared --steps 40 --batch 32

Prints JSON: images/s of each side per round, the ratio, and the setup.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout without the install

from training.data.lmdb_store import shared_env  # noqa: E402
from training.train import TrainConfig, build_model, pick_device, train  # noqa: E402

REFERENCE_IMG_W = 600


class ReferenceLmdb(Dataset):
    """DTRB-style LMDB dataset: PIL images, labels as stored."""

    def __init__(self, root: Path) -> None:
        self.roots = sorted(p.parent for p in root.rglob("data.mdb"))
        self.index: list[tuple[int, int]] = []
        self.labels: list[str] = []
        for r, path in enumerate(self.roots):
            with shared_env(path).begin() as txn:  # py-lmdb allows one handle per set and process
                n = int(txn.get(b"num-samples"))
                self.labels += [txn.get(b"label-%09d" % k).decode("utf-8") for k in range(1, n + 1)]
            self.index += [(r, k) for k in range(1, n + 1)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Image.Image, str]:
        r, key = self.index[i]
        with shared_env(self.roots[r]).begin() as txn:
            raw = txn.get(b"image-%09d" % key)
            label = txn.get(b"label-%09d" % key).decode("utf-8")
        return Image.open(io.BytesIO(raw)).convert("L"), label


def reference_collate(items, imgH: int = 64, imgW: int = REFERENCE_IMG_W):
    """Keep-ratio resize to imgH, width capped at imgW, right-padded with the last column to imgW."""
    batch = torch.empty(len(items), 1, imgH, imgW)
    for b, (image, _) in enumerate(items):
        w, h = image.size
        resized_w = min(imgW, math.ceil(imgH * w / h))
        arr = np.asarray(image.resize((resized_w, imgH), Image.BICUBIC), np.float32) / 255.0
        tensor = (torch.from_numpy(arr) - 0.5) / 0.5
        batch[b, 0, :, :resized_w] = tensor
        batch[b, 0, :, resized_w:] = tensor[:, -1:]
    return batch, [label for _, label in items]


def reference_loop(config: TrainConfig, data: Path, steps: int, device: torch.device) -> float:
    """Images/s of the reference training loop."""
    torch.manual_seed(config.seed)
    model, charset, _ = build_model(config, config.seed)
    model.to(device).train()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0, rho=0.95, eps=1e-8)
    dataset = ReferenceLmdb(data / "train")
    keep = [i for i, label in enumerate(dataset.labels) if label and not charset.missing(label)]
    loader = DataLoader(torch.utils.data.Subset(dataset, keep), batch_size=config.batch_size, shuffle=True,
                        num_workers=0, collate_fn=reference_collate, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    done, seen, started = 0, 0, time.perf_counter()
    while done < steps:
        for images, labels in loader:
            encoded = [charset.encode(label) for label in labels]
            targets = torch.tensor([c for seq in encoded for c in seq])
            lengths = torch.tensor([len(seq) for seq in encoded])
            logits = model(images.to(device))
            log_probs = logits.log_softmax(2).permute(1, 0, 2)
            loss = F.ctc_loss(log_probs, targets, torch.full((len(labels),), logits.shape[1]), lengths,
                              zero_infinity=True)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            done, seen = done + 1, seen + len(labels)
            if done == steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def engine_run(config: TrainConfig, data: Path, work: Path) -> dict:
    summary = train(config, data, work / "engine", metrics_file=work / "engine.json", plots_dir=work / "plots",
                    progress=False, log=False)
    return summary


def _sample_data(work: Path, pages: int) -> Path:
    from training.data.prepare import PrepareConfig, prepare_pages
    from training.data.synth_pages import generate_pages

    from kocr.params import load_params

    fonts = load_params()["sample"]["fonts"]
    generate_pages(work / "pages", count=pages, seed=11, fonts=fonts, progress=False)
    prepare_pages(work / "pages", work / "prepared", PrepareConfig.from_params({"val_fraction": 0.05,
                                                                                "test_fraction": 0.0}),
                  progress=False)
    return work / "prepared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="prepared folder with train/ and val/ (default: generate --pages pages)")
    parser.add_argument("--pages", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="engine DataLoader workers")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--base", default="english_g2",
                        help="starting weights of both sides (ko_base: same shapes, for machines without english_g2)")
    args = parser.parse_args()
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="kocr-bench-train-") as tmp:
        work = Path(tmp)
        data = Path(args.data) if args.data else _sample_data(work, args.pages)
        if not (data / "train").is_dir():
            parser.error(f"--data {data}: no train/ set there (kocr prepare-aihub's output folder)")
        common = {"base": args.base, "charset": "korean_g2", "batch_size": args.batch, "steps": args.steps,
                  "device": args.device, "seed": 0}
        engine_config = TrainConfig(**common, optimizer="adadelta", lr=1.0, val_every=args.steps,
                                    num_workers=args.workers)
        reference, engine = [], []
        for _ in range(args.rounds):
            reference.append(round(reference_loop(TrainConfig(**common), data, args.steps, device), 2))
            summary = engine_run(engine_config, data, work)
            engine.append(summary["images_per_second"])
        result = {"device": str(device), "base": args.base, "torch_threads": torch.get_num_threads(), "steps": args.steps,
                  "batch": args.batch, "engine_workers": args.workers, "train_samples": summary["train_samples"],
                  "reference_images_per_second": reference, "engine_images_per_second": engine,
                  "ratio": round(time_ratio(reference, engine), 2)}
        if device.type == "cuda":
            result["engine_peak_gpu_memory_mib"] = summary.get("peak_gpu_memory_mib")
        print(json.dumps(result, indent=1))


def time_ratio(reference: list[float], engine: list[float]) -> float:
    """How many times less time the engine took for the same images: every round trains the same
    steps x batch on both sides, so the total time of a side is proportional to the sum of 1 / rate
    (the ratio of mean rates would let the fastest round dominate)."""
    return sum(1.0 / r for r in reference) / sum(1.0 / e for e in engine)


if __name__ == "__main__":
    main()
