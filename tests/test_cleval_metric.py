"""CLEval beside the IoU gate: merged boxes still earn character credit."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.cleval_metric import CLEvalAccumulator
from evaluation.metrics import score_page
from training.data.pages import Page, Word

REPO = Path(__file__).resolve().parents[1]
GT = Page("p.jpg", 200, 50, [Word((0, 0, 40, 20), "서울"), Word((50, 0, 40, 20), "평양")])


def _scores(pred_words):
    acc = CLEvalAccumulator()
    acc.update(GT, Page("p.jpg", 200, 50, pred_words))
    return acc.compute()


def test_perfect_reading_scores_one():
    scores = _scores(list(GT.words))
    assert scores["cleval_e2e_f1"] == pytest.approx(1.0) and scores["cleval_det_f1"] == pytest.approx(1.0)


def test_a_merged_box_keeps_character_credit_where_the_iou_gate_gives_none():
    merged = [Word((0, 0, 90, 20), "서울 평양")]
    assert score_page(GT, Page("p.jpg", 200, 50, merged)).f1 == 0.0
    scores = _scores(merged)
    assert scores["cleval_merged"] >= 1
    assert 0.5 < scores["cleval_e2e_f1"] < 1.0  # every character read, one granularity penalty


def test_wrong_text_lowers_e2e_but_not_detection():
    scores = _scores([Word((0, 0, 40, 20), "서을"), Word((50, 0, 40, 20), "평양")])
    assert scores["cleval_det_f1"] == pytest.approx(1.0)
    assert scores["cleval_e2e_f1"] < 1.0


def test_empty_prediction_scores_zero():
    scores = _scores([])
    assert scores["cleval_e2e_recall"] == 0.0 and scores["cleval_det_recall"] == 0.0


def test_spaces_inside_a_merged_box_are_not_wrong_characters():
    # AI-Hub labels hold one 어절 each, so the space a merged box reads has nothing to match
    spaced = _scores([Word((0, 0, 90, 20), "서울 평양")])
    assert spaced == _scores([Word((0, 0, 90, 20), "서울평양")])
    assert spaced["cleval_e2e_precision"] == pytest.approx((4 - 1) / 4)  # four letters read, one merge penalty


def test_gt_boxes_past_the_image_edge_are_clamped_like_the_iou_gate_clamps_them():
    gt = Page("p.jpg", 100, 50, [Word((-30, 0, 70, 20), "서울"), Word((50, 0, 80, 20), "평양"),
                                 Word((120, 0, 20, 20), "밖")])  # the last lies wholly outside the image
    acc = CLEvalAccumulator()
    acc.update(gt, Page("p.jpg", 100, 50, [Word((0, 0, 40, 20), "서울"), Word((50, 0, 50, 20), "평양")]))
    scores = acc.compute()
    assert scores["cleval_det_f1"] == pytest.approx(1.0) and scores["cleval_e2e_f1"] == pytest.approx(1.0)


def test_a_gt_box_marked_illegible_is_dont_care():
    marked = Page("p.jpg", 200, 50, [*GT.words, Word((100, 0, 40, 20), "###")])
    acc = CLEvalAccumulator()
    acc.update(marked, Page("p.jpg", 200, 50, list(GT.words)))
    assert acc.compute()["cleval_e2e_recall"] == pytest.approx(1.0)  # the unread ### box is not missed


def test_a_prediction_with_a_nan_corner_is_left_out_not_a_crash():
    broken = Word((float("nan"), 0, 40, 20), "서울")
    assert _scores([*GT.words, broken]) == _scores(list(GT.words))


SCORE_IN_A_PROCESS = """
import json, sys
import numba
from evaluation.cleval_metric import CLEvalAccumulator
from training.data.pages import Page, Word
gt = Page("p.jpg", 200, 50, [Word((0, 0, 40, 20), "서울"), Word((50, 0, 40, 20), "평양"), Word((100, 0, 40, 20), "부산")])
acc = CLEvalAccumulator()  # a merged box, a split word and a misread half: every jitted function runs
acc.update(gt, Page("p.jpg", 200, 50, [Word((0, 0, 90, 20), "서울 평양"), Word((100, 0, 20, 20), "부"),
                                       Word((120, 0, 20, 20), "선")]))
found = {}  # cleval.utils.lcs is also cleval.eval_functions.lcs, harmonic_mean also cleval.data's: one object each
for name, module in list(sys.modules.items()):
    for value in vars(module).values() if name.startswith("cleval") else ():
        if isinstance(value, numba.core.dispatcher.Dispatcher):
            found.setdefault(value.py_func.__module__ + "." + value.py_func.__name__, set()).add(value)
jit = {name: {"copies": len(objects), "path": stats.cache_path, "hits": sum(stats.cache_hits.values()),
              "misses": sum(stats.cache_misses.values())}
       for name, objects in found.items() for stats in [next(iter(objects)).stats]}
print(json.dumps({"scores": acc.compute(), "jit": jit, "cleval": sys.modules["cleval"].__file__}))
"""
JITTED = {"cleval.utils.lcs", "cleval.utils.harmonic_mean", "cleval.eval_functions.one_to_one_match",
          "cleval.eval_functions.one_to_many_match", "cleval.eval_functions.many_to_one_match",
          "cleval.eval_functions.get_gran_score"}


def test_cleval_compiles_once_per_machine_and_afresh_when_its_source_changes(tmp_path):
    # a copy of the installed cleval, first on the path, so its source can change; nothing may be written into it
    package = tmp_path / "site" / "cleval"
    shutil.copytree(Path(importlib.util.find_spec("cleval").origin).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    before = sorted(p.name for p in package.iterdir())
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=os.pathsep.join([str(package.parent), str(REPO)]), XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONDONTWRITEBYTECODE="1")
    cache = tmp_path / "cache" / "kocr" / "numba"

    def score() -> dict:
        done = subprocess.run([sys.executable, "-c", SCORE_IN_A_PROCESS], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout.splitlines()[-1])
        assert out["cleval"] == str(package / "__init__.py") and set(out["jit"]) == JITTED
        assert all(f["copies"] == 1 and f["path"] and Path(f["path"]).parent == cache for f in out["jit"].values())
        return out

    first = score()
    assert all(f["misses"] >= 1 and f["hits"] == 0 for f in first["jit"].values())  # compiled here, and written
    assert {p.name.split("-")[0] for p in cache.glob("*/*.nbi")} == {name[len("cleval."):] for name in JITTED}
    second = score()
    assert second["scores"] == first["scores"]
    assert all(f["misses"] == 0 and f["hits"] == first["jit"][name]["misses"] for name, f in second["jit"].items())
    with (package / "utils.py").open("a", encoding="utf-8") as f:
        f.write("\n# an upgraded cleval\n")  # numba's index holds the source's content hash
    third = score()
    assert third["scores"] == first["scores"]
    recompiled = {name for name, f in third["jit"].items() if f["misses"] >= 1 and f["hits"] == 0}
    loaded = {name for name, f in third["jit"].items() if f["misses"] == 0 and f["hits"] >= 1}
    assert recompiled == {"cleval.utils.lcs", "cleval.utils.harmonic_mean"} and loaded == JITTED - recompiled
    assert sorted(p.name for p in package.iterdir()) == before


def _a_cleval_module(tmp_path, monkeypatch):
    """``cleval._kocr_test`` (its source under ``tmp_path/src``) with one bare ``@njit`` function, as cleval's
    are; cleval's own functions are swapped first (into the usual cache, as the tests above do), so that
    ``cache_cleval_jit`` finds only this one to swap."""
    import importlib.util

    CLEvalAccumulator()
    source = tmp_path / "src" / "kocr_test_jit.py"
    source.parent.mkdir()
    source.write_text("from numba import njit\n\n\n@njit\ndef add_one(x):\n    return x + 1\n", encoding="utf-8")
    spec = importlib.util.spec_from_file_location("cleval._kocr_test", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "cleval._kocr_test", module)
    return module


def test_a_compile_the_cache_cannot_keep_is_used_not_raised(tmp_path, monkeypatch):
    """Was: numba raises a failed write of its cache (a full disk) out of the call that compiled, so the
    first scoring failed with OSError where cleval alone compiles and scores."""
    import errno

    import numba
    from numba.core.caching import IndexDataCacheFile

    from evaluation.cleval_metric import cache_cleval_jit

    module = _a_cleval_module(tmp_path, monkeypatch)
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "cache"))

    def disk_full(self, name, data):
        raise OSError(errno.ENOSPC, "No space left on device", name)

    monkeypatch.setattr(IndexDataCacheFile, "_save_data", disk_full)
    assert cache_cleval_jit() == tmp_path / "cache"
    assert Path(module.add_one.stats.cache_path).parent == tmp_path / "cache"  # swapped
    assert module.add_one(1) == 2


def _loaded_again(module, monkeypatch):
    """``module`` (of ``_a_cleval_module``) loaded again from its source: a new dispatcher, as a new process has."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(module.__name__, module.__file__)
    again = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(again)
    monkeypatch.setitem(sys.modules, module.__name__, again)
    return again


@pytest.mark.parametrize("entry, damage", [("nbi", b""), ("nbi", 10), ("nbi", b"\x80\x04garbled"),
                                           ("nbc", b""), ("nbc", 100), ("nbc", b"\x80\x04garbled")])
def test_a_cut_or_garbled_cache_entry_costs_a_compile_not_a_crash(entry, damage, tmp_path, monkeypatch):
    """Was: numba raised an unreadable index (.nbi) or compile (.nbc) out of the first call (UnpicklingError,
    EOFError), in every later process until the file was removed by hand: a power cut or a full disk on a
    filesystem without atomic rename, or a copied cache, stopped every evaluate for good."""
    import numba

    from evaluation.cleval_metric import cache_cleval_jit

    module = _a_cleval_module(tmp_path, monkeypatch)
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "cache"))
    cache_cleval_jit()
    assert module.add_one(1) == 2
    [path] = (tmp_path / "cache").rglob(f"*.{entry}")
    whole = path.read_bytes()
    if isinstance(damage, int):  # cut short
        path.write_bytes(whole[:damage])
    else:
        path.write_bytes(damage)
    module = _loaded_again(module, monkeypatch)
    cache_cleval_jit()
    assert module.add_one(1) == 2  # compiled again
    assert sum(module.add_one.stats.cache_misses.values()) == 1
    module = _loaded_again(module, monkeypatch)  # the next process loads what that compile wrote
    cache_cleval_jit()
    assert module.add_one(1) == 2 and sum(module.add_one.stats.cache_hits.values()) == 1


def test_nothing_is_cached_beside_cleval_when_its_folder_in_the_cache_cannot_be_used(tmp_path, monkeypatch):
    """Was: where numba's folder for cleval under the cache could not be written (made by another user
    of a shared cache) numba kept the compile beside cleval's source instead, in site-packages; cleval
    now compiles in every process there, as it does by itself."""
    import numba
    from numba.core.caching import _CacheLocator

    from evaluation.cleval_metric import cache_cleval_jit

    module = _a_cleval_module(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    cache.mkdir()
    # a file where numba's folder for the module's source goes (as root, a read-only folder would not stop it)
    (cache / _CacheLocator.get_suitable_cache_subpath(module.__file__)).write_text("", encoding="utf-8")
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(cache))
    cache_cleval_jit()
    assert module.add_one(1) == 2
    assert module.add_one.stats.cache_path is None  # left as it was: compiled here, kept nowhere
    assert not [p.name for p in (tmp_path / "src").rglob("*.nb*")]


def test_a_cache_folder_named_through_dot_dot_is_used(tmp_path, monkeypatch):
    """``NUMBA_CACHE_DIR=../cache`` (or one through ``x/..``): numba keeps the compile under the folder as
    written, which the check that it is kept there compared with the folder made absolute, ``..`` resolved;
    the two differed, so the cleval functions were left uncached (compiled in every process)."""
    import numba

    from evaluation.cleval_metric import cache_cleval_jit

    module = _a_cleval_module(tmp_path, monkeypatch)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(numba.config, "CACHE_DIR", "../cache")
    root = cache_cleval_jit()
    assert module.add_one.stats.cache_path is not None  # swapped: was left as it was, kept nowhere
    assert Path(module.add_one.stats.cache_path).parent.resolve() == root.resolve() == tmp_path / "cache"
    assert module.add_one(1) == 2
    assert [p.suffix for p in (tmp_path / "cache").rglob("*.nb*")]  # kept there


def test_a_cached_compile_that_cannot_be_read_is_compiled_again_not_raised(tmp_path, monkeypatch):
    """A shared cache where another user's index file cannot be read (written under umask 077 into a
    folder this user can write): numba raised the PermissionError out of the call, failing the scoring."""
    import errno

    import numba
    from numba.core.caching import IndexDataCacheFile

    from evaluation.cleval_metric import cache_cleval_jit

    module = _a_cleval_module(tmp_path, monkeypatch)
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "cache"))

    def unreadable(self):
        raise PermissionError(errno.EACCES, "Permission denied", self._index_path)

    monkeypatch.setattr(IndexDataCacheFile, "_load_index", unreadable)
    assert cache_cleval_jit() == tmp_path / "cache"
    assert Path(module.add_one.stats.cache_path).parent == tmp_path / "cache"  # swapped
    assert module.add_one(1) == 2


def test_no_home_directory_leaves_cleval_compiling_per_process_and_scoring(monkeypatch):
    # was: jit_cache_dir called Path.home(), which raises RuntimeError where there is no HOME and the user id
    # has no passwd entry (a container run with a host user's id), so every evaluate stopped before scoring
    import numba

    from evaluation import cleval_metric

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert cleval_metric.jit_cache_dir() is None and cleval_metric.cache_cleval_jit() is None
    assert _scores(list(GT.words))["cleval_e2e_f1"] == pytest.approx(1.0)
