"""Each DVC stage declares the project modules its command runs, so editing one re-runs the stage."""

from __future__ import annotations

import ast

import pytest
import yaml

from tests.conftest import REPO

# the command of each stage in dvc.yaml (kocr/cli.py)
STAGE_COMMANDS = {"sample": "cmd_synth_pages", "prepare": "cmd_prepare", "train": "cmd_train", "tune": "cmd_tune",
                  "evaluate": "cmd_evaluate", "promote": "cmd_promote", "export": "cmd_export"}
# plumbing that reads params, tracks, locks or dispatches, and computes no output
PLUMBING = {"kocr/cli.py", "kocr/params.py", "kocr/tracking.py", "kocr/dvc_hashes.py", "kocr/locks.py"}
# train logs an MLflow model whose reading code (pages, detection) changes what it reads, not the weights
NOT_RETRAINED_FOR = {"train": {"evaluation/pyfunc_model.py", "evaluation/reader.py", "evaluation/fast_cpu.py",
                               "kocr/easyocr_compat.py", "training/data/pages.py"}}


def _module_file(name: str) -> str | None:
    for path in (REPO / (name.replace(".", "/") + ".py"), REPO / name.replace(".", "/") / "__init__.py"):
        if path.is_file():
            return str(path.relative_to(REPO))
    return None


def _project_imports(tree: ast.AST) -> set[str]:
    """Project modules imported anywhere in ``tree`` (function-level imports too: the CLI imports lazily)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {f for f in map(_module_file, names) if f}


def imported_files(function: str) -> set[str]:
    """Every project file the CLI function ``function`` imports, transitively."""
    cli = ast.parse((REPO / "kocr/cli.py").read_text(encoding="utf-8"))
    node = next(n for n in cli.body if isinstance(n, ast.FunctionDef) and n.name == function)
    seen: set[str] = set()
    todo = list(_project_imports(node))
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += _project_imports(ast.parse((REPO / path).read_text(encoding="utf-8")))
    return {p for p in seen if not p.endswith("__init__.py")}


@pytest.mark.parametrize("stage", sorted(STAGE_COMMANDS))
def test_every_module_a_stage_runs_is_one_of_its_deps(stage):
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage].get("deps", [])
    covered = [d.rstrip("/") for d in deps]
    wanted = imported_files(STAGE_COMMANDS[stage]) - PLUMBING - NOT_RETRAINED_FOR.get(stage, set())
    missing = sorted(p for p in wanted if not any(p == d or p.startswith(d + "/") for d in covered))
    assert not missing, f"dvc.yaml stage {stage}: add these deps (its command imports them): {missing}"


def test_the_import_walk_sees_lazy_imports():
    """The CLI imports inside functions; a walk of module-level imports only would find nothing."""
    assert {"training/train.py", "training/crops.py", "training/data/lmdb_store.py"} <= imported_files("cmd_train")
    assert "evaluation/parity.py" in imported_files("cmd_export")
