"""Tracking helpers: the dataset insert race, deleted experiments, and passwords kept out of printed links."""

from __future__ import annotations

import json
import os
import time

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
    assert [d.dataset.digest for d in logged] == [tracking.dataset_digest(digest)]

    monkeypatch.setattr(mlflow, "log_input", lambda *a, **k: (_ for _ in ()).throw(MlflowException("denied")))
    with mlflow.start_run(), pytest.raises(MlflowException, match="denied"):
        tracking.log_dataset(tmp_path / "set", context="train")


def test_the_train_and_val_sets_of_one_prepared_folder_get_their_own_dataset_digests(tmp_path, monkeypatch):
    """train/ and val/ inside data/prepared (one dvc.lock output, md5 X.dir) are logged as X.dir/train and
    X.dir/val; MLflow's Datasets view showed both with X.dir, their first 36 characters."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_STAGE", "train")  # as under dvc repro: dvc.lock's record is taken as it is
    lock = {"schema": "2.0", "stages": {"prepare": {"cmd": "kocr prepare-aihub", "outs": [
        {"path": "data/prepared", "md5": "0123456789abcdef0123456789abcdef.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(json.dumps(lock), encoding="utf-8")
    for split in ("train", "val", "test"):
        (tmp_path / "data" / "prepared" / split).mkdir(parents=True)

    def logged() -> dict[str, str]:
        with mlflow.start_run() as run:
            for split in ("train", "val"):
                tracking.log_dataset(f"data/prepared/{split}", context=split)
        return {d.dataset.name: d.dataset.digest for d in mlflow.get_run(run.info.run_id).inputs.dataset_inputs}

    first, again = logged(), logged()
    assert set(first) == {"data/prepared/train", "data/prepared/val"}
    assert first["data/prepared/train"] != first["data/prepared/val"]
    assert first == again  # the same set, the same digest, run after run
    assert all(len(digest) <= 36 for digest in first.values())
    assert mlflow.get_run(mlflow.last_active_run().info.run_id).data.tags["kocr.data.train"] == \
        "0123456789abcdef0123456789abcdef.dir/train"  # the tag keeps the whole hash
    lock["stages"]["prepare"]["outs"][0]["md5"] = "fedcba9876543210fedcba9876543210.dir"  # another version
    (tmp_path / "dvc.lock").write_text(json.dumps(lock), encoding="utf-8")
    assert set(logged().values()).isdisjoint(first.values())


def test_a_mix_keyed_by_paths_is_one_param_whatever_its_slashes():
    import json

    mix = {"/data/real/": 0.2, "data//synth": 0.1}  # a tab-completed folder; MLflow refused these as names
    with tracking.stage_run("train", {"train": {"lr": 0.1, "mix": mix}, "model": {"imgH": 64}}) as run:
        pass
    params = mlflow.get_run(run.info.run_id).data.params
    assert json.loads(params["train.mix"]) == mix
    assert (params["train.lr"], params["model.imgH"]) == ("0.1", "64")


def test_a_deleted_experiment_is_named_with_the_way_out(tmp_path, monkeypatch):
    from kocr.tracking import configure_tracking, ensure_experiment

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    configure_tracking()
    try:
        experiment_id = ensure_experiment("ko-ocr/finetune")
        mlflow.delete_experiment(experiment_id)  # deleted in the UI; the name stays taken
        with pytest.raises(mlflow.exceptions.MlflowException) as info:
            ensure_experiment("ko-ocr/finetune")  # was: its id, then "must be in the 'active' state" per stage
        assert f"'ko-ocr/finetune' (id {experiment_id}) was deleted" in info.value.message
        assert f"mlflow experiments restore --experiment-id {experiment_id}" in info.value.message
    finally:
        mlflow.set_tracking_uri(None)


def test_a_password_in_the_tracking_uri_turns_off_mlflows_printed_run_links(tmp_path, monkeypatch):
    from kocr.tracking import configure_tracking

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://kim:s3cret@127.0.0.1:5000")
    try:
        configure_tracking()
        assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"  # "View run at http://kim:s3cret@…"
        monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # password in MLFLOW_TRACKING_PASSWORD
        configure_tracking()
        assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ  # the link is worth printing then
    finally:
        mlflow.set_tracking_uri(None)


def test_a_stage_run_ends_the_runs_of_that_stage_a_dead_process_left_running(tmp_path, monkeypatch):
    import socket
    import subprocess

    from kocr.tracking import PIPELINE_KEY_TAG, stage_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("KOCR_PIPELINE_ID", "resumed-after-an-outage")
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid no process holds now
    try:
        with stage_run("train") as first:
            parent, experiment = first.data.tags["mlflow.parentRunId"], first.info.experiment_id
        client = mlflow.MlflowClient()
        here = socket.gethostname()
        left = {name: client.create_run(experiment, run_name="train", tags={
            "mlflow.parentRunId": parent, "kocr.stage": "train", "kocr.host": host, "kocr.pid": str(pid)}).info.run_id
            for name, host, pid in [("dead", here, gone.pid), ("alive", here, os.getpid()),
                                    ("elsewhere", "gpu-server-2", gone.pid)]}
        with stage_run("train") as again:
            pass
        status = {name: client.get_run(run_id).info.status for name, run_id in left.items()}
        # was: all three RUNNING for ever in the UI beside the run that took over
        assert status == {"dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING"}
        assert client.get_run(left["dead"]).data.tags["kocr.superseded_by"] == again.info.run_id
        assert client.get_run(parent).data.tags[PIPELINE_KEY_TAG] == "resumed-after-an-outage"
    finally:
        mlflow.set_tracking_uri(None)


def _dead_process_here(tmp_path, monkeypatch, pipeline_id: str):
    """A project in ``tmp_path`` on the local store under pipeline ``pipeline_id``, and a process that has
    ended: (it, this host's name, this process's PID space)."""
    import socket
    import subprocess

    from kocr.tracking import pid_space

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("KOCR_PIPELINE_ID", pipeline_id)
    gone = subprocess.Popen(["true"])
    gone.wait()
    space = pid_space()
    assert space is not None
    return gone, socket.gethostname(), space


def test_a_dead_stage_run_of_another_pipeline_is_ended_only_in_this_pid_space(tmp_path, monkeypatch):
    """A stage run names the PID space its PID is in: a dead one of another pipeline run is ended when
    that is this process's; one of another PID namespace (a container with the host's name) is not
    judged, nor is a tune trial (its worker's stale-trial check ends it)."""
    from kocr.tracking import PID_SPACE_TAG, stage_run

    gone, here, space = _dead_process_here(tmp_path, monkeypatch, "repro-1")
    try:
        with stage_run("evaluate") as first:
            experiment = first.info.experiment_id
        assert first.data.tags[PID_SPACE_TAG] == space
        client = mlflow.MlflowClient()
        old_parent = first.data.tags["mlflow.parentRunId"]
        base = {"mlflow.parentRunId": old_parent, "kocr.stage": "evaluate", "kocr.host": here}
        left = {name: client.create_run(experiment, run_name="evaluate", tags=base | extra).info.run_id
                for name, extra in [("dead", {"kocr.pid": str(gone.pid), PID_SPACE_TAG: space}),
                                    ("my_pid", {"kocr.pid": str(os.getpid()), PID_SPACE_TAG: space}),
                                    ("container", {"kocr.pid": str(gone.pid), PID_SPACE_TAG: "boot/4026532999"}),
                                    ("alive", {"kocr.pid": str(os.getppid()), PID_SPACE_TAG: space}),
                                    ("trial", {"kocr.pid": str(gone.pid), PID_SPACE_TAG: space, "kocr.trial": "0"}),
                                    ("untagged", {"kocr.pid": str(gone.pid)})]}
        monkeypatch.setenv("KOCR_PIPELINE_ID", "repro-2")  # the next dvc repro: another pipeline run
        with stage_run("evaluate") as again:
            pass
        status = {name: client.get_run(run_id).info.status for name, run_id in left.items()}
        # was: all RUNNING; untagged (an older kocr's, no PID space) is judged only under its own pipeline run
        assert status == {"dead": "KILLED", "my_pid": "KILLED", "container": "RUNNING", "alive": "RUNNING",
                          "trial": "RUNNING", "untagged": "RUNNING"}
        assert again.data.tags["mlflow.parentRunId"] != old_parent
        assert client.get_run(left["dead"]).data.tags["kocr.superseded_by"] == again.info.run_id
    finally:
        mlflow.set_tracking_uri(None)


def test_the_trials_of_a_dead_tune_run_end_with_it(tmp_path, monkeypatch):
    """A SIGKILLed `dvc repro` leaves its tune run and the trial it was training RUNNING; the next tune
    stage ends the tune run as KILLED, and now its trials whose process is gone too. Was: the trial stayed
    RUNNING for ever under its KILLED tune run (with tune.study_name empty every run searches a new study,
    so no later worker of that study ever ended it). A trial whose process still runs is left alone."""
    from kocr.tracking import PID_SPACE_TAG, stage_run

    gone, here, space = _dead_process_here(tmp_path, monkeypatch, "repro-killed")
    try:
        with stage_run("tune", experiment="ko-ocr/tune") as first:
            experiment = first.info.experiment_id
        client = mlflow.MlflowClient()
        worker = {"kocr.stage": "tune", "kocr.host": here, "kocr.pid": str(gone.pid), PID_SPACE_TAG: space}
        dead_tune = client.create_run(experiment, run_name="tune", tags=worker | {
            "mlflow.parentRunId": first.data.tags["mlflow.parentRunId"]}).info.run_id
        trials = {name: client.create_run(experiment, run_name=name, tags=worker | extra | {
            "mlflow.parentRunId": dead_tune, "kocr.trial": name[-1]}).info.run_id
            for name, extra in [("trial-0", {}), ("trial-1", {"kocr.pid": str(os.getppid())})]}
        client.set_terminated(trials["trial-0"], "FINISHED")  # an earlier trial of that worker, done
        trials["trial-2"] = client.create_run(experiment, run_name="trial-2", tags=worker | {
            "mlflow.parentRunId": dead_tune, "kocr.trial": "2"}).info.run_id
        monkeypatch.setenv("KOCR_PIPELINE_ID", "repro-next")
        with stage_run("tune", experiment="ko-ocr/tune") as again:
            pass
        status = {name: client.get_run(run_id).info.status for name, run_id in trials.items()}
        assert client.get_run(dead_tune).info.status == "KILLED"
        assert status == {"trial-0": "FINISHED", "trial-1": "RUNNING", "trial-2": "KILLED"}
        assert client.get_run(trials["trial-2"]).data.tags["kocr.superseded_by"] == again.info.run_id
    finally:
        mlflow.set_tracking_uri(None)


def test_a_stage_run_again_under_its_pipeline_run_after_a_reboot_ends_the_run_the_reboot_killed(tmp_path, monkeypatch):
    """A reboot (power cut, a preempted VM brought back) kills every process: a stage run of the same
    pipeline run (the same KOCR_PIPELINE_ID) on this host, whose PID space names an earlier boot, is ended
    as before kocr.pid_space existed; was RUNNING for ever, and so was its pipeline run, after a rerun that
    passed. A container's (this boot, another namespace) is still left alone, and so is an earlier boot's
    run under another pipeline run (a cloned machine of this name may be running it)."""
    from kocr.tracking import PID_SPACE_TAG, stage_run

    gone, here, space = _dead_process_here(tmp_path, monkeypatch, "repro-after-reboot")
    boot, namespace = space.split("/")
    earlier_boot = f"00000000-0000-4000-8000-000000000000/{namespace}"
    try:
        with stage_run("evaluate") as first:
            experiment, parent = first.info.experiment_id, first.data.tags["mlflow.parentRunId"]
        client = mlflow.MlflowClient()
        monkeypatch.setenv("KOCR_PIPELINE_ID", "another-repro")
        with stage_run("evaluate") as other:
            other_parent = other.data.tags["mlflow.parentRunId"]
        monkeypatch.setenv("KOCR_PIPELINE_ID", "repro-after-reboot")
        base = {"kocr.stage": "evaluate", "kocr.host": here, "kocr.pid": str(gone.pid)}
        left = {name: client.create_run(experiment, run_name="evaluate", tags=base | extra).info.run_id
                for name, extra in [("rebooted", {"mlflow.parentRunId": parent, PID_SPACE_TAG: earlier_boot}),
                                    ("container", {"mlflow.parentRunId": parent, PID_SPACE_TAG: f"{boot}/4026532999"}),
                                    ("clone", {"mlflow.parentRunId": other_parent, PID_SPACE_TAG: earlier_boot})]}
        client.update_run(parent, "RUNNING")  # as the reboot left it
        with stage_run("evaluate") as again:
            pass
        status = {name: client.get_run(run_id).info.status for name, run_id in left.items()}
        assert status == {"rebooted": "KILLED", "container": "RUNNING", "clone": "RUNNING"}
        assert client.get_run(left["rebooted"]).data.tags["kocr.superseded_by"] == again.info.run_id
        assert again.data.tags["mlflow.parentRunId"] == parent
        client.set_terminated(left["container"], "KILLED")  # (only to see the pipeline run follow its stages)
        with stage_run("evaluate"):
            pass
        assert client.get_run(parent).info.status == "FINISHED"
    finally:
        mlflow.set_tracking_uri(None)


def test_the_pipeline_run_is_running_while_a_stage_runs_and_ends_as_its_stages_do(monkeypatch):
    """Was: FINISHED after the first stage, while later stages ran, after one failed or was killed."""
    from kocr.tracking import stage_run

    monkeypatch.setenv("KOCR_PIPELINE_ID", "parent-status")
    client = mlflow.MlflowClient()
    try:
        with stage_run("prepare") as first:
            parent, experiment = first.data.tags["mlflow.parentRunId"], first.info.experiment_id
        assert client.get_run(parent).info.status == "FINISHED"
        with stage_run("train"):
            assert client.get_run(parent).info.status == "RUNNING"  # was FINISHED
        with pytest.raises(RuntimeError), stage_run("evaluate"):
            raise RuntimeError("boom")
        assert client.get_run(parent).info.status == "FAILED"
        with stage_run("evaluate"):  # run again, and it passes: its latest run counts
            pass
        assert client.get_run(parent).info.status == "FINISHED"
        # a stage whose process was SIGKILLed leaves its run RUNNING: the pipeline has not finished
        client.create_run(experiment, run_name="export", tags={"mlflow.parentRunId": parent, "kocr.stage": "export"})
        with stage_run("promote"):
            pass
        assert client.get_run(parent).info.status == "RUNNING"
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("stop", [SystemExit(143), KeyboardInterrupt()], ids=["SIGTERM", "Ctrl-C"])
def test_a_stopped_stage_still_stops_when_the_store_cannot_end_its_runs(monkeypatch, capsys, stop):
    """Was: a SIGTERM or Ctrl-C landing while the MLflow store was busy or down (SQLite "database is locked"
    while another tune worker wrote to it) was replaced by the store's error as the stage run and its
    pipeline run were ended: kocr exited 2 ("MLflow at ...: database is locked"), not 143."""
    from kocr.tracking import stage_run

    monkeypatch.setenv("KOCR_PIPELINE_ID", "stopped-store-down")
    real, down = mlflow.MlflowClient.set_terminated, []

    def set_terminated(self, *args, **kwargs):
        if down:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", set_terminated)
    try:
        with pytest.raises(type(stop)) as raised, stage_run("tune") as run:
            down.append(True)  # from here on the store refuses every end of a run
            raise stop
        assert raised.value is stop and mlflow.active_run() is None
        err = capsys.readouterr().err
        assert f"its tune run {run.info.run_id} could not be ended KILLED" in err
        assert "database is locked" in err
        down.clear()
        with pytest.raises(MlflowException, match="database is locked"), stage_run("tune"):
            down.append(True)  # not stopped: the store's error is raised, as before
            raise RuntimeError("boom")
    finally:
        mlflow.set_tracking_uri(None)


def test_the_default_empty_train_mix_is_logged_as_a_param(monkeypatch):
    """docs/training.md: MLflow records train.mix as one JSON param; the default {} was left out."""
    from kocr.tracking import stage_run

    try:
        with stage_run("train", {"train": {"lr": 0.1, "mix": {}}}) as run:
            pass
        params = mlflow.get_run(run.info.run_id).data.params
        assert params["train.mix"] == "{}" and params["train.lr"] == "0.1"
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_tracking_uri_is_refused_naming_the_variable(tmp_path, value):
    """`MLFLOW_TRACKING_URI: ${{ secrets.X }}` with the secret missing gives "": `kocr promote` used to take it
    for unset, register the candidate in a new mlruns.db in the checkout and call it the first champion."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "candidate").mkdir()
    (tmp_path / "candidate" / "mlflow.json").write_text(json.dumps(
        {"model_uri": "runs:/0123456789abcdef/recognizer", "run_id": "0123456789abcdef"}))
    (tmp_path / "evaluate.json").write_text(json.dumps(
        {"candidate": {"e2e_f1": 0.5}, "eval_data_hash": "d", "eval_scoring_hash": "s"}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": value, "PYTHONPATH": str(REPO)}
    env.pop("KOCR_TRACEBACK", None)
    done = subprocess.run([sys.executable, "-m", "kocr.cli", "promote", "--candidate", "candidate", "--metrics",
                           "evaluate.json", "--source", "pages", "--splits", "splits.json", "--out", "promote.json"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("kocr promote: error: MLFLOW_TRACKING_URI is set but empty"), lines
    assert not (tmp_path / "mlruns.db").exists() and not (tmp_path / "promote.json").exists()


def test_the_logged_models_detector_settings_are_params_named_as_params_yaml_names_them(hangul_checkpoint):
    """Was: the pyfunc's model_config logged them bare (text_threshold, width_ths, …) on the train run, while
    evaluate and export log detector.text_threshold: two UI columns for one knob, neither on every run."""
    from evaluation.pyfunc_model import log_recognizer
    from evaluation.reader import DetectorSettings
    from kocr.tracking import stage_run

    settings = DetectorSettings(width_ths=0.0, canvas_size=1280)
    try:
        with stage_run("train", {"train": {"lr": 0.1}}) as run:
            info = log_recognizer(hangul_checkpoint, settings)
        params = mlflow.get_run(run.info.run_id).data.params
        loaded = mlflow.pyfunc.load_model(info.model_uri).unwrap_python_model()
    finally:
        mlflow.set_tracking_uri(None)
    names = settings.readtext_kwargs()
    assert not set(params) & set(names), sorted(set(params) & set(names))
    assert {k: params[f"detector.{k}"] for k in names} == {k: str(v) for k, v in names.items()}
    assert loaded.reader.detector.settings == settings  # read back from the prefixed model_config
    from evaluation.pyfunc_model import settings_from_config

    assert settings_from_config(names) == settings  # a model logged before the prefix still loads its settings


def test_one_pipeline_is_one_parent_run_though_tune_logs_to_its_own_experiment(monkeypatch):
    """Was: the parent was looked up in the stage's experiment, so a `dvc repro` that ran tune (ko-ocr/tune)
    made a second `dvc-repro` parent there, and the first one showed FINISHED while tune ran."""
    from kocr.tracking import PIPELINE_KEY_TAG, stage_run

    monkeypatch.setenv("KOCR_PIPELINE_ID", "one-repro")
    client = mlflow.MlflowClient()
    try:
        with stage_run("train") as train:
            parent = train.data.tags["mlflow.parentRunId"]
        with stage_run("tune", experiment="ko-ocr/tune") as tune:
            assert client.get_run(parent).info.status == "RUNNING"  # was FINISHED
        with stage_run("evaluate") as evaluate:
            pass
        parents = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                     filter_string=f"tags.`{PIPELINE_KEY_TAG}` = 'one-repro'")
        assert [run.info.run_id for run in parents] == [parent]  # was two: one per experiment
        assert tune.data.tags["mlflow.parentRunId"] == evaluate.data.tags["mlflow.parentRunId"] == parent
        assert tune.info.experiment_id == mlflow.get_experiment_by_name("ko-ocr/tune").experiment_id
        assert client.get_run(parent).info.status == "FINISHED"
        with pytest.raises(RuntimeError), stage_run("tune", experiment="ko-ocr/tune"):
            raise RuntimeError("boom")
        assert client.get_run(parent).info.status == "FAILED"  # its stage runs in the other experiment count
    finally:
        mlflow.set_tracking_uri(None)


def test_a_reopened_pipeline_run_has_no_end_time_until_it_ends_again(monkeypatch):
    """Was: reopened RUNNING with the end time of the stage before, so the UI showed that old span as its
    duration while a later stage ran, and for good when that stage was killed."""
    import time

    from kocr.tracking import stage_run

    monkeypatch.setenv("KOCR_PIPELINE_ID", "reopened")
    client = mlflow.MlflowClient()
    try:
        with stage_run("prepare") as first:
            parent = first.data.tags["mlflow.parentRunId"]
        ended = client.get_run(parent).info.end_time
        assert ended
        time.sleep(0.05)
        with stage_run("train") as train:
            info = client.get_run(parent).info
            assert (info.status, info.end_time or None) == ("RUNNING", None)  # was ("RUNNING", ended)
        info = client.get_run(parent).info
        assert info.status == "FINISHED" and info.end_time >= client.get_run(train.info.run_id).info.end_time > ended
    finally:
        mlflow.set_tracking_uri(None)


def test_end_pipeline_ends_what_a_killed_pipeline_left_running_and_nothing_else(tmp_path, monkeypatch):
    """A CI job that failed or was cancelled: its stage processes died without ending their runs, which the
    UI showed RUNNING for ever, with their pipeline run. `kocr end-pipeline` ends them; other pipelines' stay."""
    import signal
    import subprocess
    import sys

    from kocr.cli import main
    from kocr.tracking import stage_run
    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KOCR_PIPELINE_ID", "gh-7-1")
    client = mlflow.MlflowClient()
    try:
        with stage_run("prepare") as prepare:
            parent = prepare.data.tags["mlflow.parentRunId"]
        with pytest.raises(RuntimeError), stage_run("tune", experiment="ko-ocr/tune") as tune:
            raise RuntimeError("boom")  # a stage that ended itself keeps its status
        trial = client.create_run(tune.info.experiment_id, run_name="trial-0",
                                  tags={"mlflow.parentRunId": tune.info.run_id}).info.run_id  # left by a killed worker
        stage = subprocess.Popen([sys.executable, "-c", (
            "import sys, time\nfrom kocr.tracking import stage_run\n"
            "with stage_run('train') as run:\n    print(run.info.run_id, flush=True)\n    time.sleep(600)\n")],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        train = stage.stdout.readline().strip()
        stage.send_signal(signal.SIGKILL)  # what removing the job's container does
        stage.wait()
        monkeypatch.setenv("KOCR_PIPELINE_ID", "gh-8-1")
        with stage_run("evaluate") as other:  # another pipeline, still going
            assert client.get_run(parent).info.status == "RUNNING"
            monkeypatch.setenv("KOCR_PIPELINE_ID", "gh-7-1")
            assert main(["end-pipeline", "--status", "KILLED", "--reason", "job cancelled"]) == 0
            status = {name: client.get_run(run_id).info.status for name, run_id in [
                ("parent", parent), ("prepare", prepare.info.run_id), ("tune", tune.info.run_id), ("trial", trial),
                ("train", train), ("other", other.info.run_id)]}
            # was: parent, trial and train RUNNING for ever
            assert status == {"parent": "KILLED", "prepare": "FINISHED", "tune": "FAILED", "trial": "KILLED",
                              "train": "KILLED", "other": "RUNNING"}
            assert {client.get_run(run_id).data.tags.get("kocr.ended_by") for run_id in (parent, trial, train)} \
                == {"job cancelled"}
            assert "kocr.ended_by" not in client.get_run(prepare.info.run_id).data.tags
            assert tracking.end_pipeline("gh-7-1", "FAILED") == []  # nothing RUNNING is left
            assert tracking.end_pipeline("no-such-pipeline", "FAILED") == []
        monkeypatch.delenv("KOCR_PIPELINE_ID")
        assert main(["end-pipeline", "--status", "FAILED"]) == 2  # which pipeline: said, not guessed
        with stage_run("sample") as by_hand:  # no pipeline id: a parent keyed "manual", as every hand-run stage's
            assert main(["end-pipeline", "--status", "KILLED", "--pipeline-id", "manual"]) == 2
            assert client.get_run(by_hand.data.tags["mlflow.parentRunId"]).info.status == "RUNNING"  # was: KILLED
        with pytest.raises(ValueError, match="expected FAILED or KILLED"):
            tracking.end_pipeline("gh-7-1", "FINISHED")
    finally:
        mlflow.set_tracking_uri(None)


_DEAD_PIPELINES = """\
import os, sys, time
from kocr.tracking import stage_run

for spec in sys.argv[1:]:  # one process per pipeline, each started once the one before is training
    ready, said = os.pipe()
    if os.fork() == 0:
        key, group = spec.split("|")
        for name, value in (("KOCR_PIPELINE_ID", key), ("KOCR_PIPELINE_GROUP", group)):
            os.environ.pop(name, None)
            if value:
                os.environ[name] = value
        with stage_run("prepare"):
            pass
        with stage_run("train") as run:
            print(spec, run.data.tags["mlflow.parentRunId"], run.info.run_id, flush=True)
            os.write(said, b"x")
            time.sleep(600)
    os.read(ready, 1)
time.sleep(600)
"""


def test_end_pipeline_stale_in_group_ends_only_other_running_pipelines_of_the_group(tmp_path, monkeypatch):
    """A retrain runner whose machine went down: nothing in its job ended its runs, which stayed RUNNING unless
    that same workflow run was re-run. Pipelines of one group (the workflow's concurrency group) never run at
    once, so the next run's `kocr end-pipeline --stale-in-group` ends the group's other RUNNING pipelines, and
    nothing outside it: another branch's or repository's group, runs from before the tag, `manual`, its own."""
    import signal
    import subprocess
    import sys

    from kocr.cli import main
    from kocr.tracking import PIPELINE_GROUP_TAG, stage_run
    from tests.conftest import REPO

    group = "org/ko-ocr:retrain-refs/heads/main"
    specs = {"stale": f"gh-40-1|{group}", "branch": "gh-50-1|org/ko-ocr:retrain-refs/heads/exp",
             "repo": "gh-60-1|org/fork:retrain-refs/heads/main", "untagged": "gh-39-1|", "manual": f"|{group}"}
    client = mlflow.MlflowClient()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KOCR_PIPELINE_GROUP", group)
    try:
        monkeypatch.setenv("KOCR_PIPELINE_ID", "gh-38-1")
        with stage_run("prepare") as done:  # a run of the group that ended as it should
            finished = done.data.tags["mlflow.parentRunId"]
        dead = subprocess.Popen([sys.executable, "-c", _DEAD_PIPELINES, *specs.values()], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
        try:
            lines = [dead.stdout.readline().split() for _ in specs]
        finally:
            os.killpg(dead.pid, signal.SIGKILL)  # the runner's machine goes down: no step of the job runs
            dead.wait()
        runs = {name: next((parent, train) for spec, parent, train in lines if spec == value)
                for name, value in specs.items()}
        parents = {name: client.get_run(parent) for name, (parent, _) in runs.items()}
        assert parents["stale"].data.tags[PIPELINE_GROUP_TAG] == group
        assert PIPELINE_GROUP_TAG not in parents["untagged"].data.tags  # no KOCR_PIPELINE_GROUP: no tag
        assert PIPELINE_GROUP_TAG not in parents["manual"].data.tags  # a stage run by hand is in no group
        assert parents["manual"].data.tags[tracking.PIPELINE_KEY_TAG] == "manual"

        monkeypatch.setenv("KOCR_PIPELINE_ID", "gh-41-1")
        with stage_run("prepare") as own:  # the new run of the group, training
            monkeypatch.delenv("KOCR_PIPELINE_GROUP")
            assert main(["end-pipeline", "--status", "KILLED", "--stale-in-group"]) == 2  # which group: not guessed
            assert main(["end-pipeline", "--status", "KILLED", "--stale-in-group", ""]) == 2
            monkeypatch.setenv("KOCR_PIPELINE_GROUP", group)
            assert main(["end-pipeline", "--status", "KILLED", "--stale-in-group",
                         "--reason", "retrain run 41 attempt 1 started in the group"]) == 0
            status = {name: (client.get_run(parent).info.status, client.get_run(train).info.status)
                      for name, (parent, train) in runs.items()}
            own_parent = own.data.tags["mlflow.parentRunId"]
            assert client.get_run(own_parent).info.status == "RUNNING"
            assert client.get_run(own.info.run_id).info.status == "RUNNING"
        assert status == {"stale": ("KILLED", "KILLED"), "branch": ("RUNNING", "RUNNING"),
                          "repo": ("RUNNING", "RUNNING"), "untagged": ("RUNNING", "RUNNING"),
                          "manual": ("RUNNING", "RUNNING")}
        for run_id in runs["stale"]:
            assert client.get_run(run_id).data.tags["kocr.ended_by"] == "retrain run 41 attempt 1 started in the group"
        stale_prepare = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=(
            f"tags.mlflow.parentRunId = '{runs['stale'][0]}' and tags.`kocr.stage` = 'prepare'"))
        assert [run.info.status for run in stale_prepare] == ["FINISHED"]  # ended runs keep their status
        assert "kocr.ended_by" not in client.get_run(finished).data.tags
        assert client.get_run(finished).info.status == "FINISHED"
        assert tracking.end_stale_in_group(group, {"gh-41-1"}, "KILLED", "again") == {}  # nothing stale is left

        # the group named on the command line; the key kept is --pipeline-id's
        other = "org/ko-ocr:retrain-refs/heads/exp"
        assert main(["end-pipeline", "--status", "FAILED", "--stale-in-group", other, "--pipeline-id", "gh-50-1"]) == 0
        assert client.get_run(runs["branch"][0]).info.status == "RUNNING"
        assert tracking.end_stale_in_group(other, set(), "FAILED", "gone") == {"gh-50-1": list(runs["branch"][::-1])}
        assert client.get_run(runs["repo"][0]).info.status == "RUNNING"
        assert tracking.end_stale_in_group("refs/heads/a'b\"c", set(), "KILLED", "x") == {}  # no filter holds it
        with pytest.raises(ValueError, match="no pipeline group"):
            tracking.end_stale_in_group("", set(), "KILLED", "x")
        with pytest.raises(ValueError, match="expected FAILED or KILLED"):
            tracking.end_stale_in_group(group, set(), "FINISHED", "x")
    finally:
        mlflow.set_tracking_uri(None)


def test_a_pipeline_key_with_a_quote_finds_its_own_parent_and_no_other(monkeypatch):
    """Was: the key went into the search filter in single quotes as it was, so a KOCR_PIPELINE_ID holding a
    ``'`` failed every stage (MLflow: invalid clause) and one written as a clause found another pipeline's
    parent run; a key no filter can hold is refused in one line naming where it was set."""
    from kocr.cli import main
    from kocr.tracking import TrackingConfigError, stage_run

    client = mlflow.MlflowClient()
    try:
        parents = {}
        for key in ("x", "it's", "x' and tags.`kocr.kind` = 'pipeline", "x' and tags.`kocr.kind` = 'pipeline"):
            monkeypatch.setenv("KOCR_PIPELINE_ID", key)
            with stage_run("train") as run:
                parent = run.data.tags["mlflow.parentRunId"]
            assert parents.setdefault(key, parent) == parent  # the same key: the same parent
            assert client.get_run(parent).data.tags[tracking.PIPELINE_KEY_TAG] == key
        assert len(set(parents.values())) == 3  # was: the third key found the parent of "x"
        with stage_run("evaluate") as run:  # still the same key: its stage runs nest under one parent
            assert run.data.tags["mlflow.parentRunId"] == parents["x' and tags.`kocr.kind` = 'pipeline"]
        assert tracking.end_pipeline("it's", "KILLED") == []  # was: MlflowException

        monkeypatch.setenv("KOCR_PIPELINE_ID", "say \"it's\"")
        with pytest.raises(TrackingConfigError, match="KOCR_PIPELINE_ID: pipeline key .* both a ' and a \""):
            with stage_run("train"):
                pass
        monkeypatch.delenv("KOCR_PIPELINE_ID")
        assert main(["end-pipeline", "--status", "KILLED", "--pipeline-id", "say \"it's\""]) == 2
    finally:
        mlflow.set_tracking_uri(None)


OPENER = """\
import pathlib, sys, time
import mlflow
from kocr.tracking import configure_tracking, ensure_experiment
go = pathlib.Path(sys.argv[1])
pathlib.Path(sys.argv[2]).touch()
while not go.exists():  # every process has imported MLflow: they open the new store together
    time.sleep(0.01)
configure_tracking()
with mlflow.start_run(experiment_id=ensure_experiment("ko-ocr/finetune")):
    mlflow.log_metric("m", 1.0)
"""


def test_processes_opening_a_new_embedded_store_together_all_get_it(tmp_path):
    """Two DVC queue workers (or kocr tune workers) starting on a fresh checkout: MLflow migrates a new
    SQLite store unlocked, and the process that lost the race died on "duplicate column name"."""
    import subprocess
    import sys

    from tests.conftest import REPO

    (tmp_path / "opener.py").write_text(OPENER, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "KOCR_"))}
    env |= {"PYTHONPATH": str(REPO), "MLFLOW_ENABLE_TELEMETRY": "false"}
    go = tmp_path / "go"
    openers = [subprocess.Popen([sys.executable, "opener.py", str(go), f"ready-{i}"], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)  # every one has imported MLflow
    go.touch()
    outputs = [opener.communicate(timeout=180)[0] for opener in openers]
    for opener, output in zip(openers, outputs):
        assert opener.returncode == 0, output[-2000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("ko-ocr/finetune")
    assert len(client.search_runs([experiment.experiment_id])) == 3


def _dvc_parent(monkeypatch, pid: int) -> None:
    """This process runs as a stage of a `dvc repro` of ``pid``, started at a fixed second."""
    class Dvc:
        def __init__(self):
            self.pid = pid

        def cmdline(self):
            return ["/usr/bin/python3", "/usr/local/bin/dvc", "repro"]

        def create_time(self):
            return 1765000000.25

    class Me:
        def parents(self):
            return [Dvc()]

    monkeypatch.delenv("KOCR_PIPELINE_ID", raising=False)
    monkeypatch.setattr(tracking.psutil, "Process", Me)


def test_the_same_dvc_pid_and_second_on_two_hosts_are_two_pipeline_runs(monkeypatch):
    """Was: the key was dvc-<pid>-<start second>, so a dvc of one PID started in the same second on two
    machines logging to one tracking server gathered both pipelines' stages under one parent run."""
    import socket

    from kocr.tracking import pipeline_key, stage_run

    _dvc_parent(monkeypatch, 4242)  # the `dvc repro` process that launched the stage, the same on both machines
    keys, parents = {}, {}
    for host in ("gpu-a", "gpu-b"):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        keys[host] = pipeline_key()
        assert pipeline_key() == keys[host]  # the stages of one dvc repro on one machine share it
        try:
            for stage in ("prepare", "train"):
                with stage_run(stage) as run:
                    parents.setdefault(host, set()).add(run.data.tags["mlflow.parentRunId"])
        finally:
            mlflow.set_tracking_uri(None)
    assert keys["gpu-a"] != keys["gpu-b"] and all("4242" in key for key in keys.values())
    assert len(parents["gpu-a"]) == len(parents["gpu-b"]) == 1  # one parent run per dvc repro
    assert parents["gpu-a"] != parents["gpu-b"]  # was one for both machines


def test_the_same_dvc_pid_and_second_in_two_containers_of_one_host_name_are_two_pipeline_runs(monkeypatch):
    """Two containers of one host name (--network host, or --hostname) number their processes alike: a dvc
    of the same PID started in the same second in each. Was: dvc-<host>-<pid>-<start>, one key for both."""
    import socket

    from kocr.tracking import pipeline_key

    _dvc_parent(monkeypatch, 7)
    monkeypatch.setattr(socket, "gethostname", lambda: "runner")
    keys = {}
    for space in ("boot-1/4026532001", "boot-1/4026532002"):
        monkeypatch.setattr(tracking, "pid_space", lambda space=space: space)
        keys[space] = pipeline_key()
        assert pipeline_key() == keys[space]  # the stages of one dvc repro share it
    assert len(set(keys.values())) == 2 and all(key.startswith("dvc-runner-") for key in keys.values())


@pytest.mark.parametrize("code", ["500", "502", "503", "504"])
def test_an_artifact_request_the_server_answers_with_a_5xx_is_not_blamed_on_its_artifact_store_alone(code):
    """Was: every 5xx to an /mlflow-artifacts/ request said "the server could not reach its artifact store".
    A 500 is most often the store, but the server also looks up the user and experiment in its database
    first (basic auth): the hint says "most often" and points to the server's log. A 502/503/504 is a
    gateway's answer (a reverse proxy, or the server down or overloaded), not the store's."""
    retried = ("API request to http://s:5000/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/model.pt failed "
               f"with exception ... (Caused by ResponseError('too many {code} error responses'))")
    once = f"API request to http://s:5000/api/2.0/mlflow-artifacts/artifacts/1/abc/x.png failed with error code {code} != 200"
    for message in (retried, once):
        hint = tracking.artifact_store_hint(message)
        if code == "500":
            assert hint.startswith("the server failed an artifact request (HTTP 500: most often its artifact store")
            assert "the server's log says what failed" in hint
        else:
            assert hint.startswith(f"the server, or a proxy in front of it, was unavailable (HTTP {code} ")
            assert "artifact store" not in hint and "proxy's log or the server's" in hint
    assert tracking.artifact_store_hint(f"API request to http://s:5000/api/2.0/mlflow/runs/create failed "
                                        f"with error code {code} != 200") == ""  # not an artifact request
