"""The whole `dvc repro` on a temporary copy of the project with tiny params, twice."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.conftest import REPO

TINY = {
    "sample": {"count": 10, "width": 560, "height": 400},
    "train": {"steps": 6, "batch_size": 4, "val_every": 3},
    "prepare": {"val_fraction": 0.2, "test_fraction": 0.2},
    "tune": {"n_trials": 2, "steps_per_trial": 2, "report_every": 2},
}


def _copy_project(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for rel in filter(None, files):
        if rel.startswith(("metrics/", "plots/")) or rel == "dvc.lock":
            continue  # the copy starts with no results, as a fresh pipeline does
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)


def _set_params(project: Path, changes: dict) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    for section, values in changes.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")


def _commit_all(project: Path) -> None:
    """Make ``project`` a git repository with everything committed, as a clone is."""
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)


def _tool_env() -> dict:
    """The environment with this virtualenv's tools (``kocr``, ``dvc``) first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _repro(project: Path, env: dict) -> str:
    done = subprocess.run([str(Path(sys.executable).with_name("dvc")), "repro"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = tmp_path_factory.mktemp("project")
    _copy_project(project)
    _set_params(project, TINY)
    env = {**_tool_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlruns.db'}"}
    env.pop("KOCR_PIPELINE_ID", None)
    _commit_all(project)
    first = _repro(project, env)
    return project, env, first


def test_every_stage_runs_and_writes_its_outputs(project):
    project, _, log = project
    for stage in ("sample", "prepare", "train", "evaluate", "promote", "export"):
        assert f"Running stage '{stage}'" in log
    evaluated = json.loads((project / "metrics/evaluate.json").read_text())
    for model in ("base", "candidate"):
        for key in ("e2e_f1", "e2e_precision", "e2e_recall", "e2e_f1_micro", "cer", "word_accuracy", "norm_ed"):
            assert 0.0 <= evaluated[model][key] <= (1.0 if key != "cer" else 10.0), (model, key)
    assert evaluated["pages"] == len(json.loads((project / "data/prepared/splits.json").read_text())["test"])
    assert len(list((project / "outputs/predictions/candidate").glob("*.json"))) == evaluated["pages"]
    bundle = project / "models/easyocr"
    for rel in ("model/ko_ocr.pth", "user_network/ko_ocr.py", "user_network/ko_ocr.yaml", "README.md"):
        assert (bundle / rel).is_file(), rel
    promoted = json.loads((project / "metrics/promote.json").read_text())
    assert promoted["promoted"] is True and promoted["reason"] == "no champion before it: the first champion"
    assert f"v{promoted['candidate_version']} is champion; no champion before it" in log  # was "is challenger"


def test_one_parent_run_with_a_child_per_stage(project):
    project, env, _ = project
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["ko-ocr/finetune"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {"sample", "prepare", "train", "evaluate", "promote", "export"}
    export = json.loads((project / "metrics" / "export.json").read_text())
    assert children["export"].data.metrics["int8_agreement"] == export["int8_agreement"]  # the parity check, tracked
    assert children["export"].data.tags["kocr.exported_model"].endswith("@champion")
    train = children["train"]
    assert train.data.params["train.steps"] == "6"
    assert "mlflow.source.git.commit" in train.data.tags
    contexts = {{t.key: t.value for t in i.tags}["mlflow.data.context"]
                for i in train.inputs.dataset_inputs}
    assert contexts == {"train", "val"}
    # the prepared set's DVC hash from dvc.lock names the training data
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    prepared_md5 = next(o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
    assert train.data.tags["kocr.data.train"] == f"{prepared_md5}/train"


def test_second_repro_does_nothing(project):
    project, env, _ = project
    log = _repro(project, env)
    assert "Running stage" not in log


def test_registry_moves_champion_only_on_merit(project):
    project, env, _ = project
    _set_params(project, {"train": {"steps": 3}, "promote": {"min_delta": 2.0}})  # an impossible margin
    log = _repro(project, env)
    assert "Running stage 'train'" in log and "Running stage 'sample'" not in log
    decision = json.loads((project / "metrics/promote.json").read_text())
    assert decision["promoted"] is False and decision["candidate_version"] == 2
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert int(client.get_model_version_by_alias("ko-ocr-recognizer", "champion").version) == 1
    challenger = client.get_model_version_by_alias("ko-ocr-recognizer", "challenger")
    assert int(challenger.version) == 2 and challenger.tags["decision"] == "not promoted"


KILL_HOOK = """
import os, signal
if os.environ.get("KILL_AT_SAMPLE"):  # SIGKILL the process that writes its KILL_AT_SAMPLE-th crop
    from training.data import lmdb_store
    add, calls = lmdb_store.LmdbWriter.add, [0]
    def killing_add(self, image, label):
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_AT_SAMPLE"]):
            os.kill(os.getpid(), signal.SIGKILL)
        add(self, image, label)
    lmdb_store.LmdbWriter.add = killing_add
"""


def test_killed_repro_resumes_prepare_from_its_finished_shards(tmp_path):
    project, shard = tmp_path / "project", 20
    _copy_project(project)
    _set_params(project, {**TINY, "prepare": {**TINY["prepare"], "shard_size": shard}})
    _commit_all(project)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK, encoding="utf-8")  # imported by every Python it starts
    env = _tool_env()
    dvc = [str(Path(sys.executable).with_name("dvc")), "repro", "prepare"]
    killed = subprocess.run(dvc, cwd=project, capture_output=True, text=True, timeout=600,
                            env={**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")])),
                                 "KILL_AT_SAMPLE": str(2 * shard + 5)})  # the caller's PYTHONPATH kept: same code
    # -9 when DVC's shell execs the command (bash), 137 when it forks and reports the signal (dash, SHELL unset)
    assert killed.returncode != 0 and re.search(r"exited with (-9|137)\b", killed.stderr), killed.stdout + killed.stderr
    train = project / "data/prepared/train"
    finished = sorted(train.glob("shard-?????"))
    assert [p.name for p in finished] == ["shard-00000", "shard-00001"]
    kept = {p: (p / "data.mdb").stat().st_ino for p in finished}

    done = subprocess.run(dvc, cwd=project, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {p: (p / "data.mdb").stat().st_ino for p in finished} == kept  # kept by DVC and by prepare
    reference = tmp_path / "reference"  # the same stage uninterrupted
    subprocess.run(["kocr", "prepare-aihub", "--src", "data/sample", "--out", str(reference)], cwd=project,
                   env=env, check=True, capture_output=True, timeout=600)
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    out = project / "data/prepared"
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert all((out / rel).read_bytes() == (reference / rel).read_bytes() for rel in files)
