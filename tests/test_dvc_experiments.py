"""DVC experiments (docs/tuning.md "Small grids"): runs of a queued or ``--temp`` experiment land in the
store of the user's checkout, tagged with the experiment's name.

``dvc exp run --queue`` and ``--temp`` run the pipeline in a copy of the project under
``.dvc/tmp/exps/``, deleted when the experiment ends; the embedded store went with it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from kocr import tracking
from tests.conftest import REPO

DVC = Path(sys.executable).parent / "dvc"

STAGE = '''\
import mlflow, pathlib, yaml
from kocr.tracking import stage_run
x = yaml.safe_load(open("params.yaml"))["x"]
with stage_run("probe", {"x": x}):
    mlflow.log_metric("score", x * 2)
    pathlib.Path("note.txt").write_text(f"x={x}")
    mlflow.log_artifact("note.txt")
pathlib.Path("score.json").write_text(f'{{"score": {x * 2}}}')
'''

PIPELINE = """\
stages:
  probe:
    cmd: python probe.py
    deps: [probe.py]
    params: [x]
    metrics:
      - score.json:
          cache: false
"""


def test_the_store_is_the_current_folder_outside_an_experiment_copy(tmp_path, monkeypatch):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # `dvc repro` sets it to the project it runs
    assert tracking.store_dir() == tmp_path / "sub"
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-dip")  # `dvc exp run` in the workspace: same project
    assert tracking.store_dir() == tmp_path / "sub"


def test_the_store_of_an_experiment_copy_is_the_users_checkout(tmp_path, monkeypatch):
    checkout = tmp_path / "project"
    copy = checkout / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    (copy / ".dvc").mkdir(parents=True)
    (copy / "stage").mkdir()
    monkeypatch.setenv("DVC_ROOT", str(checkout))
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-dip")
    monkeypatch.chdir(copy)
    assert tracking.store_dir() == checkout  # was: the copy, deleted with the experiment
    monkeypatch.chdir(copy / "stage")  # a stage with its own wdir
    assert tracking.store_dir() == checkout / "stage"
    monkeypatch.delenv("DVC_EXP_NAME")  # DVC_ROOT alone (inherited by some other program) moves nothing
    assert tracking.store_dir() == copy / "stage"


def test_a_registry_model_is_read_from_the_checkouts_store_in_an_experiment_copy(tmp_path, monkeypatch):
    """Was: "no mlruns.db in <copy>" for `models:/…` (train.base, export's champion) in a queued experiment."""
    from training.checkpoint import reading_store

    checkout = tmp_path / "project"
    copy = checkout / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    (copy / ".dvc").mkdir(parents=True)
    (checkout / "mlruns.db").touch()  # ignored by git, so never in the copy
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(checkout))
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-dip")
    monkeypatch.chdir(copy)
    try:
        assert reading_store("models:/ko-ocr-recognizer@champion") == f"sqlite:///{checkout / 'mlruns.db'}"
    finally:
        mlflow.set_tracking_uri(None)


def test_the_tune_study_of_an_experiment_copy_is_kept_in_the_checkout_and_is_its_own(tmp_path, monkeypatch):
    """Was: the embedded Optuna storage (and a relative sqlite:/// tune.storage) was the copy's, deleted with
    it: the study, its trials and its resumability lost. In the checkout's storage, the experiments of a
    grid would then have joined one named study, mixing trials of other knobs and sharing one budget:
    each is its own study, named after it."""
    from training.tune import TuneConfig, make_storage, open_study, storage_url

    config = TuneConfig.from_params({"space": {"lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2}}})
    named = dataclasses.replace(config, study_name="ko-lr")
    checkout = tmp_path / "project"
    copy = checkout / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    (copy / ".dvc").mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(checkout))
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-dip")
    monkeypatch.chdir(copy)
    url = storage_url(config, "tuning")
    assert url == f"sqlite:///{checkout / 'tuning' / 'optuna.db'}"  # was: the copy's tuning/optuna.db
    relative = dataclasses.replace(config, storage="sqlite:///studies/optuna.db?timeout=5")
    assert storage_url(relative, "tuning") == f"sqlite:///{checkout / 'studies' / 'optuna.db'}?timeout=5"
    for kept in (f"sqlite:///{tmp_path / 'elsewhere.db'}", "postgresql+psycopg2://kocr:pw@db:5432/optuna"):
        assert storage_url(dataclasses.replace(config, storage=kept), "tuning") == kept
    storage = make_storage(url, config)
    first = open_study(named, storage, shared=False).study_name
    assert open_study(config, storage, shared=False).study_name.endswith("-lucky-dip")  # tune-<date>-<time>-…
    monkeypatch.setenv("DVC_EXP_NAME", "other-point")  # the next experiment of the grid
    assert (first, open_study(named, storage, shared=False).study_name) == ("ko-lr-lucky-dip", "ko-lr-other-point")

    monkeypatch.chdir(checkout)  # `dvc exp run` in the workspace, `dvc repro`: as before
    assert storage_url(relative, "tuning") == relative.storage
    assert storage_url(config, "tuning") == f"sqlite:///{checkout / 'tuning' / 'optuna.db'}"
    assert open_study(named, storage, shared=False).study_name == "ko-lr"
    monkeypatch.delenv("DVC_EXP_NAME")
    monkeypatch.chdir(copy)  # DVC_ROOT alone moves nothing
    assert storage_url(config, "tuning") == f"sqlite:///{copy / 'tuning' / 'optuna.db'}"


def test_the_runs_of_a_dvc_experiment_are_tagged_with_its_name(monkeypatch):
    monkeypatch.setenv("KOCR_PIPELINE_ID", "exp-tag")
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-dip")
    try:
        with tracking.stage_run("train") as run:
            parent = mlflow.get_run(run.data.tags["mlflow.parentRunId"])
        assert run.data.tags[tracking.DVC_EXP_TAG] == parent.data.tags[tracking.DVC_EXP_TAG] == "lucky-dip"
        monkeypatch.delenv("DVC_EXP_NAME")
        assert tracking.DVC_EXP_TAG not in tracking.stage_tags("train")  # a plain `dvc repro`
    finally:
        mlflow.set_tracking_uri(None)


def _run(args: list, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{args} failed in {cwd}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.skipif(not DVC.exists(), reason="dvc is installed by make install")
def test_a_temp_experiments_runs_land_in_the_checkouts_store_named_after_it(tmp_path):
    repo = tmp_path / "project"
    repo.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "KOCR_"))}
    env |= {"PYTHONPATH": str(REPO), "MLFLOW_ENABLE_TELEMETRY": "false", "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    (repo / "probe.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(PIPELINE)
    (repo / "params.yaml").write_text("x: 1\n")
    (repo / ".gitignore").write_text("/mlruns.db\n/mlartifacts/\nnote.txt\n")
    _run(["git", "init", "-q"], repo, env)
    _run([DVC, "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "probe"], repo, env)

    _run([DVC, "exp", "run", "--temp", "-n", "x-three", "-S", "x=3"], repo, env)
    assert not list((repo / ".dvc" / "tmp" / "exps").glob("tmp*"))  # DVC removed its copy
    assert (repo / "mlruns.db").is_file()  # was: no store here; the runs went with the copy
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlruns.db'}")
    try:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.`{tracking.DVC_EXP_TAG}` = 'x-three'")
        by_kind = {run.data.tags.get("kocr.kind", run.info.run_name): run for run in runs}
        assert set(by_kind) == {"pipeline", "probe"}  # the experiment's parent run and its stage's run
        probe = by_kind["probe"]
        assert probe.data.tags["mlflow.parentRunId"] == by_kind["pipeline"].info.run_id
        assert (probe.data.params["x"], probe.data.metrics["score"]) == ("3", 6.0)
        note = mlflow.artifacts.download_artifacts(run_id=probe.info.run_id, artifact_path="note.txt",
                                                   dst_path=str(tmp_path / "got"))
        assert Path(note).read_text() == "x=3"  # the artifact is in the checkout's mlartifacts/, not the copy
        assert Path(probe.info.artifact_uri.removeprefix("file://")).is_relative_to(repo / "mlartifacts")
    finally:
        mlflow.set_tracking_uri(None)
