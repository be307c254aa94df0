"""What cleval's numba compile costs a process, without and with the on-disk cache of ``cache_cleval_jit``.

Three processes score the same generated pages with ``evaluation.cleval_metric.CLEvalAccumulator``
(ground-truth words in a grid; predictions that keep, misread, merge, split, drop and add words):
``uncached`` as cleval alone does it (``cache_cleval_jit`` turned off: every process compiles), then
``cold`` and ``warm`` with the cache on, in an empty cache folder: the first compiles and writes, the
second loads. Each times its imports (cleval, torch, torchmetrics: the same in all three), its first
scoring (compiles or cache loads included) and a second scoring of the same pages (compiled already);
``first - again`` is what the compile (or the load) costs. The scores of the three must be identical.

    python bench/cleval_jit_cache.py --pages 50
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
SYLLABLES = "가나다라마바사아자차카타파하서울평양부산시청김해도로"


def page_pairs(count: int, seed: int) -> list:
    """``count`` (ground truth, prediction) pages of 8 x 6 words, the prediction perturbed word by word."""
    from training.data.pages import Page, Word

    rng = random.Random(seed)
    pairs = []
    for n in range(count):
        gt, pred = [], []
        for row in range(8):
            words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(6)]
            col = 0
            while col < 6:
                text, box, fate = words[col], (10 + col * 100, 10 + row * 40, 90, 30), rng.random()
                gt.append(Word(box, text))
                if fate < 0.1 and col < 5:  # merged with the next word
                    gt.append(Word((box[0] + 100, box[1], 90, 30), words[col + 1]))
                    pred.append(Word((box[0], box[1], 190, 30), f"{text} {words[col + 1]}"))
                    col += 1
                elif fate < 0.2 and len(text) > 1:  # split in two
                    half = len(text) // 2
                    pred += [Word((box[0], box[1], 45, 30), text[:half]),
                             Word((box[0] + 45, box[1], 45, 30), text[half:])]
                elif fate < 0.3:  # misread
                    pred.append(Word(box, text[:-1] + rng.choice(SYLLABLES)))
                elif fate > 0.95:  # missed
                    pass
                else:
                    pred.append(Word(box, text))
                col += 1
        pred.append(Word((5, 5, 20, 20), "잡"))  # a false positive
        pairs.append((Page(f"{n}.jpg", 640, 360, gt), Page(f"{n}.jpg", 640, 360, pred)))
    return pairs


def child(mode: str, count: int, seed: int) -> dict:
    """One process's timings (seconds), the compile cache's hits and misses, and its scores."""
    start = time.perf_counter()
    import numba
    from numba.core.dispatcher import Dispatcher

    import evaluation.cleval_metric as cm

    if mode == "uncached":
        cm.cache_cleval_jit = lambda: None  # cleval as it comes: bare @njit
    pairs = page_pairs(count, seed)
    accumulators = [cm.CLEvalAccumulator(), cm.CLEvalAccumulator()]  # imports cleval, torch, torchmetrics
    imported = time.perf_counter()
    runs = []
    for acc in accumulators:
        t = time.perf_counter()
        for gt, pred in pairs:
            acc.update(gt, pred)
        runs.append((acc.compute(), time.perf_counter() - t))
    jit = {f"{d.py_func.__module__}.{d.py_func.__name__}": d for name, m in list(sys.modules.items())
           if name.startswith("cleval") for d in vars(m).values() if isinstance(d, Dispatcher)}
    return {"mode": mode, "import_s": imported - start, "first_s": runs[0][1], "again_s": runs[1][1],
            "compile_s": runs[0][1] - runs[1][1],
            "cache_hits": sum(sum(d.stats.cache_hits.values()) for d in jit.values()),
            "cache_misses": sum(sum(d.stats.cache_misses.values()) for d in jit.values()),
            "cache_dir": str(cm.jit_cache_dir()) if mode != "uncached" else None,
            "numba": numba.__version__, "scores": runs[0][0], "scores_again": runs[1][0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["uncached", "cold", "warm"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.pages, args.seed)))
        return
    with tempfile.TemporaryDirectory(prefix="kocr-jit-bench-") as cache:
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
        env.update(XDG_CACHE_HOME=cache, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
        results = {}
        for mode in ("uncached", "cold", "warm"):
            done = subprocess.run([sys.executable, __file__, "--child", mode, "--pages", str(args.pages),
                                   "--seed", str(args.seed)], capture_output=True, text=True, env=env, check=True)
            results[mode] = json.loads(done.stdout.splitlines()[-1])
    scores = {json.dumps(r[key], sort_keys=True) for r in results.values() for key in ("scores", "scores_again")}
    if len(scores) != 1:
        sys.exit(f"the scores differ between processes: {sorted(scores)}")
    uncached, cold, warm = results["uncached"], results["cold"], results["warm"]
    print(json.dumps({
        "pages": args.pages, "identical_scores": True, "scores": warm["scores"],
        "seconds": {mode: {k: round(r[k], 3) for k in ("import_s", "first_s", "again_s", "compile_s")}
                    for mode, r in results.items()},
        "cache": {mode: {"hits": r["cache_hits"], "misses": r["cache_misses"]} for mode, r in results.items()},
        "compile_ratio_uncached_to_warm": round(uncached["compile_s"] / warm["compile_s"], 1),
        "first_scoring_ratio_uncached_to_warm": round(uncached["first_s"] / warm["first_s"], 2),
        "first_scoring_ratio_cold_to_warm": round(cold["first_s"] / warm["first_s"], 2),
        "compile_s_saved_per_process": round(uncached["first_s"] - warm["first_s"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
