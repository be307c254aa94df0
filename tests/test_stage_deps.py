"""Each DVC stage declares the project modules its command runs, so editing one re-runs the stage."""

from __future__ import annotations

import ast

import pytest
import yaml

from tests.conftest import REPO

RECIPE_DVC = "recipes/ko-base/dvc.yaml"

CLI, RECIPE = "kocr/cli.py:", "kocr/recipe.py:"
# the commands each stage runs: dvc.yaml, then the ko-base recipe's dvc.yaml
STAGE_COMMANDS = {
    ("dvc.yaml", "sample"): [CLI + "cmd_synth_pages"], ("dvc.yaml", "prepare"): [CLI + "cmd_prepare"],
    ("dvc.yaml", "train"): [CLI + "cmd_train"], ("dvc.yaml", "tune"): [CLI + "cmd_tune"],
    ("dvc.yaml", "evaluate"): [CLI + "cmd_evaluate"], ("dvc.yaml", "promote"): [CLI + "cmd_promote"],
    ("dvc.yaml", "export"): [CLI + "cmd_export"],
    (RECIPE_DVC, "synth_train"): [CLI + "cmd_synth_lines"],  # check-size, run first, is a guard
    (RECIPE_DVC, "synth_val"): [CLI + "cmd_synth_lines"],
    (RECIPE_DVC, "synth_heldout"): [CLI + "cmd_synth_lines", RECIPE + "cmd_export_crops"],
    (RECIPE_DVC, "train"): [CLI + "cmd_train"],
    (RECIPE_DVC, "evaluate"): [RECIPE + "cmd_evaluate"], (RECIPE_DVC, "card"): [RECIPE + "cmd_card"],
    (RECIPE_DVC, "ship_check"): [RECIPE + "cmd_ship"],
}
# plumbing that reads params, tracks, locks or dispatches, and computes no output
PLUMBING = {"kocr/cli.py", "kocr/params.py", "kocr/tracking.py", "kocr/dvc_hashes.py", "kocr/locks.py",
            "kocr/redact.py", "kocr/atomic.py", "kocr/set_cache.py", "kocr/stops.py"}
# train logs an MLflow model whose reading code (pages, detection) changes what it reads, not the weights
NOT_RETRAINED_FOR = {"train": {"evaluation/pyfunc_model.py", "evaluation/pyfunc_entry.py", "evaluation/reader.py",
                               "evaluation/fast_cpu.py", "kocr/easyocr_compat.py", "training/data/pages.py",
                               "training/data/pixels.py"}}


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


def _functions(module: str) -> tuple[ast.Module, dict[str, ast.FunctionDef]]:
    tree = ast.parse((REPO / module).read_text(encoding="utf-8"))
    return tree, {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def imported_files(entry: str) -> set[str]:
    """Every project file ``module.py:function`` imports, transitively: the imports of the function and
    of the module's functions it calls, the module's own top-level imports, then whole modules."""
    module, _, function = entry.partition(":")
    tree, functions = _functions(module)
    seen_functions, todo_functions, found = set(), [function], set()
    found |= _project_imports(ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))],
                                         type_ignores=[]))
    while todo_functions:
        name = todo_functions.pop()
        if name in seen_functions:
            continue
        seen_functions.add(name)
        found |= _project_imports(functions[name])
        todo_functions += [n.func.id for n in ast.walk(functions[name])
                           if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in functions]
    seen: set[str] = set()
    todo = list(found)
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += _project_imports(ast.parse((REPO / path).read_text(encoding="utf-8")))
    return {module} | {p for p in seen if not p.endswith("__init__.py")}  # the module itself, not all of it


@pytest.mark.parametrize("pipeline, stage", sorted(STAGE_COMMANDS))
def test_every_module_a_stage_runs_is_one_of_its_deps(pipeline, stage):
    text = (REPO / pipeline).read_text(encoding="utf-8").replace("${recipe_dir}", "recipes/ko-base")
    deps = yaml.safe_load(text)["stages"][stage].get("deps", [])
    covered = [d.rstrip("/") for d in deps]
    wanted = set().union(*map(imported_files, STAGE_COMMANDS[pipeline, stage]))
    wanted -= PLUMBING | NOT_RETRAINED_FOR.get(stage, set())
    missing = sorted(p for p in wanted if not any(p == d or p.startswith(d + "/") for d in covered))
    assert not missing, f"{pipeline} stage {stage}: add these deps (its commands import them): {missing}"


def test_the_import_walk_sees_lazy_imports():
    """The CLI imports inside functions; a walk of module-level imports only would find nothing."""
    assert {"training/train.py", "training/crops.py", "training/data/lmdb_store.py"} <= imported_files(CLI + "cmd_train")
    assert "evaluation/parity.py" in imported_files(CLI + "cmd_export")
    assert "kocr/recipe_ship.py" in imported_files(RECIPE + "cmd_ship")  # through a function the command calls


def test_tune_reruns_when_the_iou_gate_of_its_e2e_objective_changes():
    # tune.metric e2e_f1 scores trials with evaluate.iou_threshold: a new gate must re-tune
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["tune"]
    assert "EvaluateConfig.from_params(params).iou_threshold" in (REPO / "training" / "tune.py").read_text(encoding="utf-8")
    assert {"evaluate", "evaluate.iou_threshold"} & set(stage["params"])


def _stage_params(stage: str) -> list[str]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage].get("params", [])


# train: keys a tune trial does not read: the budget tune replaces, the tuned-file switch, train's state folder,
# the number of processes kocr train starts under torchrun (a trial trains in one)
NOT_READ_BY_TUNE = {"steps", "val_every", "use_tuned", "tuned_params", "state_dir", "processes"}


def test_tune_declares_the_train_knobs_its_trials_read_and_no_others():
    # all of train: re-ran the search for a longer train.steps, and `dvc exp run -S train.use_tuned=true`
    # re-tuned, overwriting best_params.yaml with a study that did not make the model trained beside it
    declared = _stage_params("tune")
    assert "train" not in declared
    train_keys = set(yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["train"])
    assert {p.removeprefix("train.") for p in declared if p.startswith("train.")} == train_keys - NOT_READ_BY_TUNE


def test_a_tune_trial_ignores_the_train_keys_its_stage_leaves_out():
    from training.tune import TuneConfig, trial_config

    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    config = TuneConfig.from_params(params["tune"])
    train = {**params["train"], "use_tuned": True, "tuned_params": "no/such/best_params.yaml", "steps": 12345,
             "val_every": 678, "state_dir": "no/such/state"}
    trial = trial_config({**params, "train": train}, {}, config)
    assert (trial.steps, trial.val_every) == (config.steps_per_trial, config.report_every)
    assert trial.tuned_from == "" and trial.tuned_keys == ()  # the tuned file was never opened


def _const(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _section_read(node: ast.AST) -> str | None:
    """The section a ``params.get("S", …)``, ``params["S"]`` or ``section(params, "S")`` expression reads."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        inner, name = node.func.value, node.args and _const(node.args[0])
    elif isinstance(node, ast.Subscript):
        inner, name = node.value, _const(node.slice)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "section" and len(node.args) == 2:
        inner, name = node.args[0], _const(node.args[1])
    else:
        return None
    params = (isinstance(inner, ast.Name) and inner.id == "params") or (  # or load_params(…) read in place
        isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name) and inner.func.id == "load_params")
    return name if params and name else None


def _config_section(class_name: str) -> str | None:
    """The section ``ClassName.from_params(params)`` reads (its own ``section(params, "S")``), from the
    project's modules."""
    for path in sorted(REPO.glob("[a-z]*/*.py")):
        text = path.read_text(encoding="utf-8")
        if f"class {class_name}" not in text:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.name == class_name:
                for inner in ast.walk(node):
                    if (found := _section_read(inner)) is not None:
                        return found
    return None


def _config_read(node: ast.AST) -> str | None:
    """The section a ``Cls.from_params(params)`` or ``Cls.from_params(<a section>)`` call reads."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_params"
            and isinstance(node.func.value, ast.Name) and node.args):
        return None
    arg = node.args[0]
    return _config_section(node.func.value.id) if isinstance(arg, ast.Name) and arg.id == "params" else _section_read(arg)


def params_keys_read(entry: str) -> set[str]:
    """``section.key`` of every ``params.get("section", …).get("key", …)`` (or ``params["section"]["key"]``,
    ``section(params, "section").get("key")``, a name bound to such a section then read by key, or an
    attribute of a config built by ``Cls.from_params`` of a section or of ``params``) in
    ``module.py:function`` and the module's functions it calls."""
    module, _, function = entry.partition(":")
    _, functions = _functions(module)
    seen, todo, keys = set(), [function], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        sections, configs = {}, {}  # names bound to a section's mapping, and to a config of a section
        bound = set()  # from_params calls whose config is bound to a name (then read by attribute)
        for node in ast.walk(functions[name]):
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
                continue
            pairs = [(node.targets[0], node.value)]
            if isinstance(node.targets[0], ast.Tuple) and isinstance(node.value, ast.Tuple) \
                    and len(node.targets[0].elts) == len(node.value.elts):  # a, b = X.from_params(params), …
                pairs = list(zip(node.targets[0].elts, node.value.elts))
            for target, value in pairs:
                if not isinstance(target, ast.Name):
                    continue
                if (found := _section_read(value)) is not None:
                    sections[target.id] = found
                elif (found := _config_read(value)) is not None:
                    configs[target.id] = found
                    bound.add(value)
        methods = {n.func for n in ast.walk(functions[name]) if isinstance(n, ast.Call)}
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.Attribute) and node not in methods and isinstance(node.value, ast.Call):
                bound.add(node.value)  # ``Cls.from_params(<a section>).key`` reads that key, not the whole section
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                todo.append(node.func.id)
            outer = key = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                outer, key = node.func.value, node.args and _const(node.args[0])
            elif isinstance(node, ast.Subscript):
                outer, key = node.value, _const(node.slice)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                config = configs.get(node.value.id) if isinstance(node.value, ast.Name) else _config_read(node.value)
                if config:
                    keys.add(f"{config}.{node.attr}")
            if node not in bound and isinstance(node, ast.Call) and node.args and not isinstance(node.args[0], ast.Name) \
                    and (found := _config_read(node)) is not None:
                # a config of a section built and handed on (``return Settings.from_params(params.get("detector"))``):
                # what reads it is out of sight, so the whole section counts as read
                keys.add(found)
            if outer is None or not key:
                continue
            section_name = (sections.get(outer.id) if isinstance(outer, ast.Name) else _section_read(outer))
            if section_name:
                keys.add(f"{section_name}.{key}")
    return keys


@pytest.mark.parametrize("stage", sorted(s for p, s in STAGE_COMMANDS if p == "dvc.yaml"))
def test_every_params_key_a_stage_command_reads_is_declared(stage):
    # evaluate reads promote.model_name to find the registry champion it scores beside the candidate
    declared = set(_stage_params(stage))
    read = set().union(*map(params_keys_read, STAGE_COMMANDS["dvc.yaml", stage]))
    missing = sorted(k for k in read if k not in declared and k.partition(".")[0] not in declared)
    assert not missing, f"dvc.yaml stage {stage}: add these params (its command reads them): {missing}"


def test_the_params_walk_sees_chained_reads():
    assert {"train.base", "promote.model_name", "evaluate.split"} <= params_keys_read(CLI + "cmd_evaluate")
    assert {"export.lang_list", "evaluate.split"} <= params_keys_read(CLI + "cmd_export")
    # a config bound in a tuple assignment, a section's config handed on by a helper (_settings), and
    # section(load_params(), …) read in place: each was invisible to the walk, so promote's rescoring
    # of the champion read evaluate.* and detector undeclared without a failing test
    assert {"evaluate.split", "evaluate.iou_threshold", "detector"} <= params_keys_read(CLI + "cmd_promote")
    assert {"sample.count", "sample.fonts"} <= params_keys_read(CLI + "cmd_synth_pages")


def test_the_params_walk_reads_one_key_of_a_config_built_in_place(tmp_path):
    # Cls.from_params(<a section>).key reads that key: the whole section is counted only for a config
    # handed on (returned, passed, bound where the walk cannot follow, or a method called on it)
    module = tmp_path / "stage.py"
    module.write_text(
        "def chained(params):\n"
        "    return EvaluateConfig.from_params(params['evaluate']).iou_threshold\n"
        "def handed_on(params):\n"
        "    return EvaluateConfig.from_params(section(params, 'evaluate'))\n"
        "def method(params):\n"
        "    return EvaluateConfig.from_params(params['evaluate']).with_overrides(x=1)\n", encoding="utf-8")
    assert params_keys_read(f"{module}:chained") == {"evaluate.iou_threshold"}
    assert params_keys_read(f"{module}:handed_on") == {"evaluate"}
    assert "evaluate" in params_keys_read(f"{module}:method")
