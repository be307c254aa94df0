"""Memory of the crop-level data commands at two sizes: what they hold per item must not grow needlessly.

Three commands that see one item per crop, each run in a fresh process on a generated input of N and
of 4N items (a few tiny crops named over and over, so making a million rows costs seconds):

- ``export``: ``python -m kocr.recipe export-crops`` of an LMDB set of N samples (with synth-lines'
  ``manifest.tsv``);
- ``import``: ``kocr import-crops`` of a labels.tsv of N rows naming three crops (a third of the rows
  name a missing image, so the skipped rows are counted too);
- ``dataset``: the index ``kocr train`` builds at its start (``CropDataset`` over an LMDB set of N samples).

For each, the peak of Python's heap (tracemalloc, which slows the run about 3x; LMDB's own pages and
the decoders' C buffers are not in it) and the peak resident memory (which also counts the pages of the
LMDB file read through its memory map, and grows with the set for that reason alone), then the heap's
growth per item between the two sizes: a few bytes means nothing is held per item.

    .venv/bin/python bench/data_memory.py --sizes 2000 8000

Prints JSON: per command and size, seconds, heap peak and peak RSS in MB; per command, heap bytes per item.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUN = """
import json, resource, sys, time, tracemalloc
from pathlib import Path
command, source, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if command == "export":
    from kocr.recipe import export_crops as run
    args = (source, out)
elif command == "import":
    from training.data.import_crops import import_crops
    run, args = (lambda labels, out: import_crops(labels, out, progress=False)), (source, out)
else:
    from training.charset import Charset
    from training.crops import CropDataset
    from training.data.lmdb_store import LmdbDataset
    run, args = (lambda path: CropDataset(LmdbDataset(path), Charset.from_spec("korean_g2"))), (source,)
import cv2  # noqa: F401 - imported before the count, as any long run has it
if command == "import":  # the reading path's first image imports EasyOCR: before the count too
    from kocr.easyocr_compat import import_easyocr
    import_easyocr()
tracemalloc.start()
start = time.perf_counter()
run(*args)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": round(seconds, 1), "heap_peak_mb": round(tracemalloc.get_traced_memory()[1] / 2**20, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def _pngs(count: int) -> list[bytes]:
    import cv2
    import numpy as np

    out = []
    for i in range(count):
        pixels = np.full((32, 96), 255, np.uint8)
        cv2.putText(pixels, str(i), (4, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.7, 0, 2)
        out.append(cv2.imencode(".png", pixels)[1].tobytes())
    return out


def make_lmdb(path: Path, count: int) -> Path:
    """An LMDB set of ``count`` samples cycling over four crops, with a synth-lines ``manifest.tsv``."""
    from training.data.lmdb_store import LmdbWriter

    crops = _pngs(4)
    with LmdbWriter(path) as writer:
        with (writer.partial / "manifest.tsv").open("w", encoding="utf-8") as manifest:
            manifest.write("index\tfont\tbackground\tlabel\n")
            for i in range(count):
                writer.add(crops[i % 4], "서울시청")
                manifest.write(f"{i + 1}\tNanumGothic.ttf\twhite\t서울시청\n")
    return path


def make_labels(folder: Path, count: int) -> Path:
    """A labels.tsv of ``count`` rows naming three crops beside it (every third row a missing image)."""
    folder.mkdir(parents=True)
    for i, png in enumerate(_pngs(3)):
        (folder / f"c{i}.png").write_bytes(png)
    labels = folder / "labels.tsv"
    with labels.open("w", encoding="utf-8") as fh:
        fh.write("image\ttext\n")
        for i in range(count):
            fh.write(f"c{i % 3}.png\t서울{i % 7}\n" if i % 3 else f"gone{i}.png\t서울\n")
    return labels


def measure(command: str, source: Path, out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KOCR_SET_INDEX_DIR": str(out.parent / "set-index")}  # a cold start
    done = subprocess.run([sys.executable, "-c", RUN, command, str(source), str(out)], capture_output=True, text=True,
                          cwd=REPO, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 8000])
    parser.add_argument("--commands", nargs="+", default=["export", "import", "dataset"],
                        choices=["export", "import", "dataset"])
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for command in args.commands:
            runs = {}
            for size in args.sizes:
                source = (make_labels(root / f"labels{size}", size) if command == "import"
                          else root / f"lmdb{size}" if (root / f"lmdb{size}").exists()
                          else make_lmdb(root / f"lmdb{size}", size))
                runs[size] = measure(command, source, root / f"{command}_out{size}")
            small, large = args.sizes
            growth = (runs[large]["heap_peak_mb"] - runs[small]["heap_peak_mb"]) * 2**20 / (large - small)
            results[command] = {"runs": runs, "heap_bytes_per_item": round(growth, 1)}
    print(json.dumps({"sizes": args.sizes, "machine_cpus": os.cpu_count(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
