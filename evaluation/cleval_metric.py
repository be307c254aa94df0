"""CLEval (character-level detection + end-to-end, ``cleval`` package) beside the IoU-gated metric.

CLEval scores characters rather than whole boxes, so a phrase box that merges three words still
earns credit for the characters it read: it does not punish split and merged boxes the way an IoU
gate does. Ground-truth boxes with empty text or ``###`` are don't-care regions. Boxes are clamped to the
image as for the IoU-gated metric (``evaluation.metrics.in_image``), and ground-truth boxes with
nothing inside it are left out. Whitespace inside a text is left out on both sides: a box that
merges 서울 and 시청 reads "서울 시청", and AI-Hub's one-어절 labels hold no space to match it.

Example:
    >>> acc = CLEvalAccumulator()                    # doctest: +SKIP
    >>> acc.update(gt_page, pred_page)               # doctest: +SKIP
    >>> acc.compute()["cleval_e2e_f1"]               # doctest: +SKIP

cleval's numba functions (bare ``@njit``) would be compiled again in every process (seconds each time):
``cache_cleval_jit`` swaps them for ``cache=True`` copies of the same Python functions before their first
call, so the machine code is written once to ``jit_cache_dir()`` and loaded by every later process.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from kocr.easyocr_compat import register_torchvision_ops
from evaluation.metrics import in_image
from training.data.pages import Page, Word, nfc, unscored


def _letters(text: str) -> str:
    """The NFC text without whitespace: what CLEval matches character by character."""
    return "".join(nfc(text).split())


def _quads(words: list[Word]) -> np.ndarray:
    quads = [[x0, y0, x1, y0, x1, y1, x0, y1] for x0, y0, x1, y1 in (w.corners for w in words)]
    return np.asarray(quads, dtype=np.float32).reshape(-1, 8)


_SWAP_LOCK = threading.Lock()


def jit_cache_dir() -> Path | None:
    """Where the compiled cleval functions are kept: ``NUMBA_CACHE_DIR`` when set, else
    ``$XDG_CACHE_HOME/kocr/numba`` (``~/.cache/kocr/numba``); absolute, ``..`` resolved (numba keeps a
    compile under the folder as it is written, and ``_cached`` checks it is kept there). None where
    there is no home directory to hold it (cleval then compiles in every process, as by itself)."""
    import numba

    from kocr.set_cache import user_cache

    if numba.config.CACHE_DIR:  # NUMBA_CACHE_DIR, read when numba was imported
        return Path(os.path.abspath(numba.config.CACHE_DIR))
    return user_cache("numba")


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def cache_cleval_jit() -> Path | None:
    """Replace every numba function in the loaded ``cleval`` modules by ``njit(cache=True)`` of its
    ``py_func``, cached under ``jit_cache_dir()``; returns that folder, or None when it cannot be written
    (cleval then compiles in every process, as it does by itself). Safe to call again.

    numba keys a cached compile on the source file's content hash, numba's version, the function's
    bytecode, its argument types and the CPU, so a changed cleval or numba compiles afresh.
    """
    import numba
    from numba.core.dispatcher import Dispatcher

    root = jit_cache_dir()
    if root is None or not _writable(root):
        return None
    with _SWAP_LOCK:
        swapped: dict[int, Dispatcher] = {}
        user_dir, numba.config.CACHE_DIR = numba.config.CACHE_DIR, str(root)  # read by njit(cache=True) only
        # that folder only, never numba's next choice beside cleval's source (a numba that reads this setting)
        user_locators = getattr(numba.config, "CACHE_LOCATOR_CLASSES", None)
        numba.config.CACHE_LOCATOR_CLASSES = "UserProvidedCacheLocator"
        try:
            modules = [m for name, m in list(sys.modules.items())
                       if m is not None and (name == "cleval" or name.startswith("cleval."))]
            for module in modules:
                for attr, value in list(vars(module).items()):
                    if (isinstance(value, Dispatcher) and value.py_func.__module__.startswith("cleval")
                            and value.stats.cache_path is None):
                        if id(value) not in swapped:  # cleval.utils.lcs is also cleval.eval_functions.lcs
                            swapped[id(value)] = _cached(value, root)
                        setattr(module, attr, swapped[id(value)])
        finally:
            numba.config.CACHE_DIR, numba.config.CACHE_LOCATOR_CLASSES = user_dir, user_locators
    return root


def _cached(dispatcher, root: Path):
    """``njit(cache=True)`` of ``dispatcher``'s Python function with its options, kept under ``root``;
    itself if numba would keep it anywhere else (its folder for cleval there not writable, as one made by
    another user of a shared cache: numba then writes beside cleval's source, into site-packages) or
    nowhere. A compile it cannot write (a full disk) is used all the same, only not kept; a cached entry it
    cannot read (a cut or garbled ``.nbi`` or ``.nbc``, another user's file in a shared cache) is compiled
    again and written over where it can be."""
    import numba

    options = {k: v for k, v in dispatcher.targetoptions.items() if k != "nopython"}  # njit sets it
    try:
        cached = numba.njit(cache=True, **options)(dispatcher.py_func)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return dispatcher
    if cached.stats.cache_path is None or Path(cached.stats.cache_path).parent != root:
        return dispatcher
    cache = cached._cache
    load, save = cache.load_overload, cache.save_overload
    index_file = getattr(cache, "_cache_file", None)  # numba's IndexDataCacheFile (private, so not assumed)
    load_index = getattr(index_file, "_load_index", None)

    def load_or_compile(sig, target_context):
        try:
            return load(sig, target_context)
        except Exception:  # an entry cut short or garbled (a power cut, a full disk, a copied cache): compiled
            return None    # again, and the save after it writes the entry afresh

    def index_or_empty() -> dict:
        try:
            return load_index()
        except Exception:  # unreadable: as numba takes an index of another numba version, so the save after
            return {}      # the compile writes it afresh (not raises: numba reads it before writing)

    def save_or_skip(sig, data) -> None:
        with contextlib.suppress(OSError):  # as numba itself does on Windows for a file another process holds
            save(sig, data)

    # numba raises an unreadable entry out of the call that compiles (every later process, until the file
    # is removed by hand) and a failed write out of the call that compiled: both cost a compile here instead
    cache.load_overload, cache.save_overload = load_or_compile, save_or_skip
    if load_index is not None:
        index_file._load_index = index_or_empty
    return cached


class CLEvalAccumulator:
    """Accumulates pages and returns CLEval detection and end-to-end precision, recall and F1."""

    def __init__(self, case_sensitive: bool = True) -> None:
        register_torchvision_ops()  # torchmetrics imports torchvision
        from cleval import CLEvalMetric

        cache_cleval_jit()
        self.metric = CLEvalMetric(case_sensitive=case_sensitive)

    def update(self, gt: Page, pred: Page) -> None:
        """Add one page (ground truth and prediction)."""
        gt_words = [w for w in in_image(gt.words, gt.width, gt.height) if w is not None]
        # a prediction past the edge stays as it is (a false positive); one with a NaN or infinite corner has
        # no place on the page for CLEval to score (the IoU gate counts it as an unmatched prediction)
        pred_words = [c or w for w, c in zip(pred.words, in_image(pred.words, gt.width, gt.height))
                      if all(math.isfinite(v) for v in w.bbox)]
        self.metric.update(_quads(pred_words), _quads(gt_words), [_letters(w.text) for w in pred_words],
                           [_letters(w.text) for w in gt_words], [unscored(w.text) or not _letters(w.text) for w in gt_words])

    def compute(self) -> dict[str, float]:
        """``cleval_{det,e2e}_{precision,recall,f1}`` plus split/merged box counts."""
        r = self.metric.compute()
        out = {}
        for kind in ("det", "e2e"):
            out[f"cleval_{kind}_precision"] = float(r[f"{kind}_p"])
            out[f"cleval_{kind}_recall"] = float(r[f"{kind}_r"])
            out[f"cleval_{kind}_f1"] = float(r[f"{kind}_h"])
        out["cleval_split"], out["cleval_merged"] = int(r["num_splitted"]), int(r["num_merged"])
        return out
