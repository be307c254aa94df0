"""Dataset logging survives the insert race of two processes logging the same new dataset at once."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from kocr import tracking


def test_a_lost_insert_race_is_retried_and_other_errors_are_not(tmp_path, monkeypatch):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "a.txt").write_text("x", encoding="utf-8")
    real, calls = mlflow.log_input, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # what the SQL store raises when another process inserted the row first
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", racing)
    with mlflow.start_run() as run:
        digest = tracking.log_dataset(tmp_path / "set", context="train")
    assert len(calls) == 2
    logged = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert [d.dataset.digest for d in logged] == [digest[:36]]

    monkeypatch.setattr(mlflow, "log_input", lambda *a, **k: (_ for _ in ()).throw(MlflowException("denied")))
    with mlflow.start_run(), pytest.raises(MlflowException, match="denied"):
        tracking.log_dataset(tmp_path / "set", context="train")


def test_a_mix_keyed_by_paths_is_one_param_whatever_its_slashes():
    import json

    mix = {"/data/real/": 0.2, "data//synth": 0.1}  # a tab-completed folder; MLflow refused these as names
    with tracking.stage_run("train", {"train": {"lr": 0.1, "mix": mix}, "model": {"imgH": 64}}) as run:
        pass
    params = mlflow.get_run(run.info.run_id).data.params
    assert json.loads(params["train.mix"]) == mix
    assert (params["train.lr"], params["model.imgH"]) == ("0.1", "64")
