"""Peak memory of `kocr prepare-aihub`, per process, at two sizes: AI-Hub zips read in place, or a folder.

``--layout zips`` (the default): a source of N pages zipped the way AI-Hub ships them (``Training/[라벨]Training_인.허가.zip`` of page
JSON, ``Training/[원천]Training_인.허가.zip`` of JPEGs, five pages a document, member names under
``인.허가/<institution>/<year>/``) is made for each size: pages of two words on one tiny image, so a
large N costs seconds and what grows is only what is held per page. Each (size, workers) runs
``prepare_pages`` in a fresh process while a sampler reads the peak resident memory (``VmHWM``) of
that process and of each cropping worker every 0.05 s; the growth per page between the two sizes is
what the stage holds per page: in the calling process, and in each worker.

    .venv/bin/python bench/aihub_zip_memory.py --sizes 2000 8000 --workers 1 2 4

``--layout folder``: a flat folder of generated pages (1000 x 700, about 32 words each: real crops,
so the time is the cropping's too). A few pages are generated once; each size is made of many names
for them (each page JSON rewritten under a new name, its image a symbolic link), so 10,000 pages cost
seconds to make.

    .venv/bin/python bench/aihub_zip_memory.py --layout folder --sizes 1000 10000 --workers 2

Prints JSON: per workers and size, pages, crops, seconds, peak RSS of the calling process, of the largest worker
and of the whole tree in MB; per workers, the bytes per page each of those grows by.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CATEGORY = "인.허가"
PAGES_PER_DOCUMENT = 5

RUN = """
import json, sys
from training.data.prepare import PrepareConfig, prepare_pages
if __name__ == "__main__":
    report = prepare_pages(sys.argv[1], sys.argv[2], PrepareConfig(workers=int(sys.argv[3])), progress=False)
    print(json.dumps({"pages": report["pages_used"], "crops": sum(report["crops"].values())}))
"""


def _jpeg() -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("L", (160, 48), 255)
    ImageDraw.Draw(img).rectangle((10, 10, 70, 36), fill=0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def page_stem(i: int) -> str:
    """The AI-Hub name of page ``i``: ``<institution>-<year>-<document>-<page>``."""
    document, page = divmod(i, PAGES_PER_DOCUMENT)
    institution, number = divmod(document, 9999)
    return f"{5350109 + institution}-1994-{number + 1:04d}-{page + 1:04d}"


def make_zips(root: Path, count: int) -> Path:
    """A source of ``count`` pages in one label zip and one image zip, as AI-Hub ships them."""
    training = root / "Training"
    training.mkdir(parents=True)
    jpeg = _jpeg()
    labels = zipfile.ZipFile(training / f"[라벨]Training_{CATEGORY}.zip", "w", zipfile.ZIP_DEFLATED)
    images = zipfile.ZipFile(training / f"[원천]Training_{CATEGORY}.zip", "w", zipfile.ZIP_DEFLATED)
    with labels, images:
        for i in range(count):
            stem = page_stem(i)
            folder = f"{CATEGORY}/{stem.split('-')[0]}/1994"
            page = {"images": [{"image.file.name": f"{stem}.jpg", "image.width": 160, "image.height": 48,
                                "image.category": CATEGORY}],
                    "annotations": [{"id": 1, "annotation.type": "rectangle", "annotation.text": "서울",
                                     "annotation.ttype": "textType1", "annotation.bbox": [8, 8, 66, 30]},
                                    {"id": 2, "annotation.type": "rectangle", "annotation.text": "시청",
                                     "annotation.ttype": "textType1", "annotation.bbox": [80, 8, 70, 30]}]}
            labels.writestr(f"{folder}/{stem}.json", json.dumps(page, ensure_ascii=False))
            images.writestr(f"{folder}/{stem}.jpg", jpeg)
    return root


def make_folder(seed_pages: Path, out: Path, count: int) -> Path:
    """``count`` page names cycling over the generated pages: JSON copies, images as symbolic links."""
    from training.data.pages import read_page, write_page

    seeds = sorted(seed_pages.glob("page_*.json"))
    out.mkdir(parents=True)
    for i in range(count):
        seed = seeds[i % len(seeds)]
        page = read_page(seed)
        page.image_name = f"doc_{i:06d}.jpg"
        write_page(page, out / f"doc_{i:06d}.json")
        os.symlink(seed.with_suffix(".jpg").resolve(), out / page.image_name)
    return out


def make_sources(root: Path, sizes: list[int], layout: str, seed_pages: int = 8) -> dict[int, Path]:
    """A source of each size under ``root``, laid out as ``layout`` says (``zips`` or ``folder``)."""
    if layout == "zips":
        return {size: make_zips(root / f"src{size}", size) for size in sizes}
    from training.data.synth_pages import generate_pages

    generate_pages(root / "seeds", count=seed_pages, seed=0, fonts=["NanumGothic.ttf", "NanumPen.ttf"],
                   progress=False)
    return {size: make_folder(root / "seeds", root / f"src{size}", size) for size in sizes}


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    return children


def _hwm(pid: int) -> int:
    """Peak resident memory of ``pid`` in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _is_forkserver(pid: int) -> bool:
    try:
        return b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def measure(src: Path, out: Path, workers: int) -> dict[str, float]:
    """One run in a fresh process: seconds, peak RSS of it, of its largest worker, of all its processes."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(src), str(out), str(workers)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    peaks: dict[int, int] = {}
    workers_seen: set[int] = set()

    def sample() -> None:
        while proc.poll() is None:
            children = _children()
            tree, frontier = [proc.pid], [proc.pid]
            while frontier:
                pid = frontier.pop()
                below = children.get(pid, [])
                if pid != proc.pid and _is_forkserver(pid):
                    workers_seen.update(below)
                tree += below
                frontier += below
            for pid in tree:
                peaks[pid] = max(peaks.get(pid, 0), _hwm(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, _ = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed with exit code {proc.returncode}")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return {**json.loads(stdout.strip().splitlines()[-1]), "seconds": round(time.perf_counter() - start, 1),
            "content_sha256": manifest["content_sha256"],
            "splits_sha256": hashlib.sha256((out / "splits.json").read_bytes()).hexdigest(),
            "peak_rss_main_mb": round(peaks.get(proc.pid, 0) / 2**20, 1),
            "peak_rss_worker_mb": round(max((peaks[p] for p in workers_seen if p in peaks), default=0) / 2**20, 1),
            "peak_rss_all_processes_mb": round(sum(peaks.values()) / 2**20, 1)}


def per_page(runs: dict[int, dict], key: str) -> float:
    """Bytes per page ``key`` grows by between the two sizes."""
    (small, a), (large, b) = sorted(runs.items())
    return round((b[key] - a[key]) * 2**20 / (large - small))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 8000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layout", choices=("zips", "folder"), default="zips",
                        help="AI-Hub's label and image zips of tiny pages, or a folder of generated pages")
    parser.add_argument("--seed-pages", type=int, default=8, help="pages generated for --layout folder")
    args = parser.parse_args()
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sources = make_sources(root, args.sizes, args.layout, args.seed_pages)
        for workers in args.workers:
            runs = {size: measure(sources[size], root / f"out{size}_{workers}", workers) for size in args.sizes}
            results[workers] = {"runs": runs, "bytes_per_page": {
                key.removeprefix("peak_rss_").removesuffix("_mb"): per_page(runs, key)
                for key in ("peak_rss_main_mb", "peak_rss_worker_mb", "peak_rss_all_processes_mb")}}
    print(json.dumps({"layout": args.layout, "sizes": args.sizes, "machine_cpus": os.cpu_count(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
