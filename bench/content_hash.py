"""The content hash a run logs for a set no DVC file versions (``kocr.dvc_hashes.content_hash``: what ``kocr train``
logs at every start and resume, ``kocr tune`` once, ``prepare`` and ``evaluate`` for their sources), cold and warm
on the same set: cold reads every byte and keeps the hash outside the set, warm finds every file's name, device,
inode, size, mtime and ctime unchanged and takes it from there.

Each set is one file of random bytes of ``--sizes`` MB (a crop set's ``data.mdb``) beside a small ``lock.mdb``,
read once before the cold pass, so both passes find it in the page cache: the ratio is the CPU saved, not disk
time (a cold disk makes the cold pass slower still). Each pass runs in a fresh process; both must give the same
hash, and that hash must be the one the full read gives with no cache kept (``KOCR_SET_INDEX_DIR=``).

    .venv/bin/python bench/content_hash.py --sizes 256 1024

Prints JSON: per size, seconds cold and warm, MB/s cold, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUN = """
import json, sys, time
from kocr.dvc_hashes import content_hash
start = time.perf_counter()
digest = content_hash(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - start, "hash": digest}))
"""


def make_set(path: Path, megabytes: int) -> Path:
    (path).mkdir(parents=True)
    with (path / "data.mdb").open("wb") as fh:
        for _ in range(megabytes):
            fh.write(os.urandom(1 << 20))
    (path / "lock.mdb").write_bytes(b"\0" * 8192)
    return path


def measure(path: Path, cache: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KOCR_SET_INDEX_DIR": cache}
    done = subprocess.run([sys.executable, "-c", RUN, str(path)], capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"content_hash failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="MB of each set")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for megabytes in args.sizes:
            path = make_set(Path(tmp) / f"set{megabytes}", megabytes)
            time.sleep(2.5)  # files written this shortly before a read are not kept (dvc_hashes.RACY_NS)
            plain = measure(path, "")  # the full read, keeping nothing; warms the page cache too
            cache = str(Path(tmp) / f"cache{megabytes}")
            cold, warm = measure(path, cache), measure(path, cache)
            if not cold["hash"] == warm["hash"] == plain["hash"]:
                raise RuntimeError(f"hashes differ: {plain['hash']} (no cache), {cold['hash']}, {warm['hash']}")
            results.append({"megabytes": megabytes, "cold_s": round(cold["seconds"], 4),
                            "cold_mb_per_s": round(megabytes / cold["seconds"]), "warm_s": round(warm["seconds"], 5),
                            "ratio": round(cold["seconds"] / warm["seconds"])})
    print(json.dumps({"host": os.uname().nodename, "load": os.getloadavg()[0], "sets": results}, indent=1))


if __name__ == "__main__":
    main()
