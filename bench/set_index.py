"""Start-up of ``CropDataset`` (what ``kocr train``, each tuning trial and each resume pay before step one), cold
and warm on the same set: cold reads every image (header and digest) and writes the set index, warm reads
the labels and takes sizes and fingerprint from the index (training/data/set_index.py).

Sets of each size are written by cycling over the crops of a small ``kocr synth-lines`` set (real
rendered crops, so header parsing and hashing cost what they cost on such images), or over ``--crops``,
an LMDB set of your own. The set's file is read once before the cold pass, so both passes find it in the
page cache: the ratio is the CPU the index saves, not disk time (a cold disk makes the cold pass slower
still). Each pass runs in a fresh process; both must give the same kept samples, widths and fingerprint.

    .venv/bin/python bench/set_index.py --sizes 20000 80000

Prints JSON: per size, seconds and µs a sample cold and warm, and their ratio.
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
import hashlib, json, sys, time
from training.charset import Charset
from training.crops import CropDataset
from training.data.lmdb_store import LmdbDataset
charset = Charset.from_spec("korean_g2")
start = time.perf_counter()
ds = CropDataset(LmdbDataset(sys.argv[1]), charset)
seconds = time.perf_counter() - start
state = hashlib.sha256(repr((list(ds.indices), list(ds.widths), sorted(ds.dropped.items()), ds.longest_label,
                             ds.fingerprint)).encode()).hexdigest()
print(json.dumps({"seconds": seconds, "from_index": ds.from_index, "state": state}))
"""


def synth_crops(folder: Path, count: int) -> Path:
    """A ``kocr synth-lines`` set of ``count`` crops (the repository's params.yaml settings)."""
    done = subprocess.run([sys.executable, "-m", "kocr.cli", "synth-lines", "--out", str(folder), "--count", str(count),
                           "--workers", "1"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise RuntimeError(f"synth-lines failed: {done.stderr[-2000:]}")
    return folder


def cycled_set(crops: Path, path: Path, count: int) -> Path:
    """An LMDB set of ``count`` samples cycling over the samples of the set at ``crops``."""
    import lmdb

    from training.data.lmdb_store import LmdbWriter, lmdb_parts

    samples = []
    for part in lmdb_parts(crops):
        env = lmdb.open(str(part), readonly=True, lock=False)
        with env.begin() as txn:
            n = int(txn.get(b"num-samples"))
            samples += [(bytes(txn.get(b"image-%09d" % k)), bytes(txn.get(b"label-%09d" % k)).decode()) for k in
                        range(1, n + 1)]
        env.close()
    with LmdbWriter(path) as writer:
        for i in range(count):
            writer.add(*samples[i % len(samples)])
    return path


def measure(path: Path, index_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KOCR_SET_INDEX_DIR": str(index_dir)}
    done = subprocess.run([sys.executable, "-c", RUN, str(path)], capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"CropDataset failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 80000])
    parser.add_argument("--crops", type=Path, help="an LMDB set whose samples the sets cycle over (default: "
                        "a synth-lines set of --synth crops)")
    parser.add_argument("--synth", type=int, default=500)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        crops = args.crops or synth_crops(root / "crops", args.synth)
        for size in args.sizes:
            path = cycled_set(crops, root / f"set{size}", size)
            (path / "data.mdb").read_bytes()  # in the page cache for both passes
            cold, warm = measure(path, root / "index"), measure(path, root / "index")
            if cold["from_index"] or not warm["from_index"] or cold["state"] != warm["state"]:
                raise RuntimeError(f"size {size}: cold {cold}, warm {warm}: the index was not used, or changed the result")
            results[size] = {"cold_s": round(cold["seconds"], 3), "warm_s": round(warm["seconds"], 3),
                             "cold_us_per_sample": round(cold["seconds"] / size * 1e6, 1),
                             "warm_us_per_sample": round(warm["seconds"] / size * 1e6, 1),
                             "ratio": round(cold["seconds"] / warm["seconds"], 1)}
    print(json.dumps({"sizes": args.sizes, "machine_cpus": os.cpu_count(),
                      "load_average": [round(x, 1) for x in os.getloadavg()], "results": results}, indent=1))


if __name__ == "__main__":
    main()
