"""`kocr tune`: a fleet of workers on one PostgreSQL study, a killed worker's trial retried, pruning,
best_params.yaml read back by train, trial runs nested in MLflow. Tiny model and data: ~1 s a trial."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from tests.conftest import REPO, postgres_params, postgres_url
from training.train import TrainConfig
from training.tune import TuneConfig, TuneError, make_storage, redact, run_trial, run_tune, suggest

SECRET = os.environ.get("PGPASSWORD") or "not-for-logs"
PARAMS = {
    "model": {"output_channel": 32, "hidden_size": 32},
    "train": {"base": "scratch", "steps": 6, "batch_size": 4, "val_every": 3, "optimizer": "adam", "lr": 0.001},
    "tune": {
        "metric": "val_cer", "direction": "minimize", "n_trials": 4, "steps_per_trial": 6, "report_every": 3,
        "pruner": "median", "median": {"n_startup_trials": 2, "n_warmup_steps": 0},
        "sampler": {"type": "tpe", "seed": 0}, "heartbeat_interval_s": 1, "grace_period_s": 3, "max_retry": 2,
        "space": {"optimizer": {"type": "categorical", "choices": ["adam", "adamw"]},
                  "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                  "warmup_steps": {"type": "int", "low": 0, "high": 2}},
    },
}


@pytest.fixture(scope="module")
def pg_url():
    """A fresh PostgreSQL database for this module, dropped afterwards; skips when the server is down."""
    import psycopg2

    params = postgres_params()
    admin = psycopg2.connect(dbname="postgres", connect_timeout=3, **params)
    admin.autocommit = True
    name = f"kocr_tune_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield postgres_url(params, name)
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def _project(path: Path, **tune) -> Path:
    """A folder with a params.yaml for `kocr tune` run as a subprocess there."""
    path.mkdir(parents=True, exist_ok=True)
    params = {**PARAMS, "tune": {**PARAMS["tune"], **tune}}
    (path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def _worker(project: Path, data: Path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kocr.cli", "tune", "--data", str(data), "--out", "tuning", *args],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _env(mlflow_uri: str) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "MLFLOW_ENABLE_TELEMETRY": "false",
           "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    env.pop("KOCR_PIPELINE_ID", None)
    env.pop("KOCR_PARAMS", None)
    # the MLflow store exists before workers start, so they never race to create its tables
    mlflow.MlflowClient(mlflow_uri).search_experiments()
    return env


@pytest.fixture(scope="module")
def two_workers(pg_url, prepared, tmp_path_factory):
    """Two worker processes started together on one study of 4 trials."""
    root = tmp_path_factory.mktemp("fleet")
    env = _env(f"sqlite:///{root / 'mlruns.db'}")
    # a generous grace period: on a loaded 2-core machine a 3 s one can fail a live trial as stale
    # machine 2 gives the URL with a password (a server that trusts the test host ignores it): it must not be logged
    urls = {1: pg_url, 2: re.sub(r"//([^:@/]+)(:[^@/]*)?@", rf"//\1:{SECRET}@", pg_url, count=1)}
    workers = [_worker(_project(root / f"machine{i}", heartbeat_interval_s=2, grace_period_s=30), prepared, env,
                       "--storage", urls[i], "--study", "fleet") for i in (1, 2)]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    return optuna.load_study(study_name="fleet", storage=pg_url), outputs, env["MLFLOW_TRACKING_URI"], root


def test_two_workers_finish_the_study_with_no_trial_lost_or_duplicated(two_workers):
    study, outputs, _, root = two_workers
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) + states.count(optuna.trial.TrialState.PRUNED) == 4
    assert len(trials) == 4  # nothing failed, running, waiting, or run beyond the budget
    assert sorted(t.number for t in trials) == list(range(4))
    for t in trials:
        assert t.value is not None or t.state == optuna.trial.TrialState.PRUNED, t
    ran = [ast.literal_eval(re.search(r"this worker ran (\{.*?\})", out).group(1)) for out in outputs]
    assert sum(n for r in ran for n in r.values()) == 4, outputs  # each trial was run by exactly one worker
    for machine in ("machine1", "machine2"):
        best = yaml.safe_load((root / machine / "tuning" / "best_params.yaml").read_text(encoding="utf-8"))
        assert best["study"] == "fleet" and set(best["train"]) == {"optimizer", "lr", "warmup_steps"}
        assert "@" in best["storage"]


def test_trial_runs_are_nested_under_their_workers_tune_run(two_workers, pg_url):
    study, _, mlflow_uri, _ = two_workers
    client = mlflow.MlflowClient(mlflow_uri)
    runs = {r.info.run_id: r for r in client.search_runs(
        [client.get_experiment_by_name("ko-ocr/tune").experiment_id], max_results=100)}
    tune_runs = {i for i, r in runs.items() if r.info.run_name == "tune"}
    assert len(tune_runs) == 2 and all(runs[i].data.tags["kocr.study"] == "fleet" for i in tune_runs)
    for i in tune_runs:  # the values the worker used (command-line overrides), the password left out
        assert runs[i].data.params["tune.study_name"] == "fleet"
        assert runs[i].data.params["tune.storage"].endswith(pg_url.rpartition("@")[2])
        assert not any(SECRET in value for value in {**runs[i].data.params, **runs[i].data.tags}.values())
    for trial in study.get_trials(deepcopy=False):
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["mlflow.parentRunId"] in tune_runs
        assert run.info.run_name == f"trial-{trial.number}"
        assert run.data.params["train.optimizer"] == trial.params["optimizer"]
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert run.data.metrics["best_val_cer"] == pytest.approx(trial.value) and run.info.status == "FINISHED"
    pictures = {a.path for i in tune_runs for a in client.list_artifacts(i, "tuning")}
    assert {"tuning/optimization_history.png", "tuning/param_importances.png", "tuning/best_params.yaml"} <= pictures


def test_a_killed_worker_leaves_the_study_consistent_and_its_trial_is_retried(pg_url, prepared, tmp_path, capsys,
                                                                            monkeypatch):
    env = _env(f"sqlite:///{tmp_path / 'mlruns.db'}")
    storage = optuna.storages.RDBStorage(pg_url)
    # a worker process on a trial far too long to finish before the kill
    doomed = _worker(_project(tmp_path / "a", steps_per_trial=100000, report_every=50000), prepared, env,
                     "--storage", pg_url, "--study", "killed", "--n-trials", "1")
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline and doomed.poll() is None, doomed.communicate()[0] if doomed.poll() else ""
        try:
            running = optuna.load_study(study_name="killed", storage=storage).get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            running = []
        # params are stored one by one as they are drawn; the trial's MLflow run id is set after the last,
        # so the kill cannot leave a trial with some params only (the retry draws the rest anew)
        if running and "mlflow_run_id" in running[0].user_attrs:
            break
        time.sleep(0.2)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    # the next worker (here in-process, on the same MLflow store) waits out the grace period, fails the
    # silent trial and its MLflow run, runs its retry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    config = TuneConfig.from_params(PARAMS["tune"]).with_overrides(storage=pg_url, study_name="killed", n_trials=1)
    capsys.readouterr()
    run_tune(config, PARAMS, prepared, tmp_path / "b", log=False)
    assert "trial 1 (retry of 0) complete" in capsys.readouterr().err
    first, retry = optuna.load_study(study_name="killed", storage=storage).get_trials(deepcopy=False)
    assert first.state == optuna.trial.TrialState.FAIL and retry.state == optuna.trial.TrialState.COMPLETE
    assert retry.params == first.params and retry.system_attrs["failed_trial"] == 0
    assert retry.value is not None
    # the dead worker's trial run ends FAILED, not RUNNING forever
    assert mlflow.MlflowClient().get_run(first.user_attrs["mlflow_run_id"]).info.status == "FAILED"


def test_a_killed_workers_trial_folder_goes_with_the_next_trial_and_a_live_workers_stays(prepared, tmp_path,
                                                                                        monkeypatch):
    # a SIGKILLed worker cannot remove its trial folder ($TMPDIR, checkpoints inside): killed runs used to
    # fill the disk; the next trial on the machine removes it, never the folder of a worker still running
    import tempfile

    from kocr.atomic import _namespace_tag

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**_env(f"sqlite:///{tmp_path / 'mlruns.db'}"), "TMPDIR": str(scratch)}
    doomed = _worker(_project(tmp_path / "a", steps_per_trial=100000, report_every=3), prepared, env,
                     "--n-trials", "1")
    deadline = time.monotonic() + 120
    while not any(scratch.rglob("model.pt")):  # its first checkpoint is written
        assert time.monotonic() < deadline and doomed.poll() is None, doomed.communicate()[0] if doomed.poll() else ""
        time.sleep(0.2)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    def trial_folders() -> list[Path]:  # torch keeps a cache in $TMPDIR too
        return [path for path in scratch.iterdir() if "kocr-trial-" in path.name]

    [killed] = trial_folders()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = scratch / f".kocr-trial-7.{_namespace_tag()}-{alive.pid}.0123abcd.tmp"  # another worker's trial
        live.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(scratch))
        config = TuneConfig.from_params(PARAMS["tune"]).with_overrides(n_trials=1)
        run_tune(config, PARAMS, prepared, tmp_path / "b", log=False)
        assert trial_folders() == [live], killed  # the killed one gone, this run's own removed
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")  # study.ask() by hand here
def test_a_trial_failed_as_stale_elsewhere_stops_without_crashing_its_worker(prepared, tmp_path):
    # a worker whose heartbeat came too late (a stalled machine) finds its trial failed by another
    config = TuneConfig.from_params(PARAMS["tune"])
    storage = make_storage(f"sqlite:///{tmp_path / 'optuna.db'}", config)
    study = optuna.create_study(storage=storage, study_name="stale")
    trial = study.ask()
    suggest(trial, config.space)  # it had started: knobs drawn, training under way
    storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    state, value, note = run_trial(trial, config, PARAMS, prepared, log=False)
    assert state == optuna.trial.TrialState.FAIL and value is None and note.startswith("lost: ")


def test_a_full_disk_stops_the_search_after_one_failed_trial(prepared, tmp_path, monkeypatch):
    import errno

    from training import tune as tune_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/kocr-trial-0-x/model.pt")

    monkeypatch.setattr(tune_module, "train", full)
    config = TuneConfig.from_params(PARAMS["tune"]).with_overrides(storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                                                                   study_name="full", n_trials=4)
    with pytest.raises(OSError) as info:  # was: three FAIL trials, then "three trials in a row failed"
        run_tune(config, PARAMS, prepared, tmp_path / "out", log=False)
    assert info.value.errno == errno.ENOSPC
    [trial] = optuna.load_study(study_name="full", storage=config.storage).get_trials(deepcopy=False)
    assert trial.state == optuna.trial.TrialState.FAIL and "No space left" in trial.user_attrs["error"]


def _sqlite_full() -> Exception:
    """A genuine SQLITE_FULL from sqlite itself, as a full disk under a database file raises it."""
    import sqlite3

    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (b BLOB)")
    db.execute("PRAGMA max_page_count = 2")  # no page beyond the table's
    try:
        db.execute("INSERT INTO t VALUES (?)", (b"x" * 10000,))
    except sqlite3.OperationalError as exc:
        assert exc.sqlite_errorname == "SQLITE_FULL"
        return exc
    raise AssertionError("sqlite wrote past max_page_count")


@pytest.fixture
def full_from_training(monkeypatch):
    """full(db_file): from the first trial's training on, each INSERT into that SQLite file fails with
    SQLITE_FULL (a disk that filled up: updates of existing rows still fit), at the DB-API boundary."""
    import sqlalchemy

    from training import tune as tune_module

    target: list[str] = []
    armed = []
    real_train = tune_module.train

    def fill(conn, cursor, statement, parameters, context, executemany):
        if armed and conn.engine.url.database in target and statement.lstrip().upper().startswith("INSERT"):
            raise _sqlite_full()

    def train(*args, **kwargs):
        armed.append(True)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(tune_module, "train", train)
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", fill)
    try:
        yield lambda db_file: target.append(str(db_file))
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", fill)


@pytest.mark.parametrize("store", ["mlflow", "optuna"])
def test_a_full_database_is_a_full_disk_naming_the_file_and_stops_the_search(store, prepared, tmp_path, monkeypatch,
                                                                             capsys, full_from_training):
    # SQLite's "database or disk is full" under MLflow's store or the Optuna storage arrives as SQLAlchemy's
    # OperationalError inside MlflowException / Optuna's StorageInternalError ("invalid data in the commit,
    # e.g. exceeding max length"): it was a traceback ending in that misleading StorageInternalError, and for
    # MLflow either a one-line MLflow error or three failed trials, then "three trials in a row failed" with
    # SQLAlchemy's multi-line message, the trial's MLflow run left active
    from kocr.cli import main

    project = _project(tmp_path / "p", study_name="full", n_trials=3)
    mlruns = tmp_path / "mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlruns}")
    monkeypatch.chdir(project)
    full = {"mlflow": mlruns, "optuna": project / "tuning" / "optuna.db"}[store]
    full_from_training(full)
    assert main(["tune", "--data", str(prepared)]) == 2
    err = capsys.readouterr().err
    assert f"kocr tune: error: no space left on the device writing {full}; free some" in err, err[-2000:]
    [trial] = optuna.load_study(study_name="full", storage=f"sqlite:///{project / 'tuning' / 'optuna.db'}").trials
    assert trial.state == optuna.trial.TrialState.FAIL  # one trial failed, then the search stopped
    if store == "mlflow":  # the trial's MLflow run was ended although the store took no more rows
        run = mlflow.MlflowClient(f"sqlite:///{mlruns}").get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED"


def test_other_database_errors_are_not_taken_for_a_full_disk(tmp_path):
    # a locked database, a missing table: SQLite OperationalErrors too, which must pass unchanged
    import sqlite3

    import sqlalchemy

    from kocr.atomic import database_full
    from training.tune import named_database_full

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'x.db'}", connect_args={"timeout": 0})
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("CREATE TABLE t (x INTEGER)"))
    holder = sqlite3.connect(tmp_path / "x.db")
    holder.execute("BEGIN EXCLUSIVE")
    errors = []
    for statement in ("INSERT INTO t VALUES (1)", "SELECT * FROM missing"):
        with pytest.raises(sqlalchemy.exc.OperationalError) as raised, named_database_full(str(engine.url)):
            with engine.begin() as connection:
                connection.execute(sqlalchemy.text(statement))
        errors.append(raised.value)
        holder.rollback()
    assert "database is locked" in str(errors[0]) and "no such table" in str(errors[1])
    assert not any(database_full(e) for e in errors)
    try:
        raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from \
            sqlalchemy.exc.OperationalError("INSERT", {}, _sqlite_full())
    except optuna.exceptions.StorageInternalError as exc:
        assert database_full(exc)
        with pytest.raises(OSError) as named, named_database_full(f"sqlite:///{tmp_path / 'optuna.db'}"):
            raise exc
        assert named.value.filename == str(tmp_path / "optuna.db") and named.value.__cause__ is exc


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")  # study.ask() by hand here
def test_a_running_trial_that_never_beat_is_retried_not_waited_on_forever(prepared, tmp_path, capsys):
    # a claimer killed between ask() and its first heartbeat, or a trial asked for by another tool:
    # no heartbeat, so Optuna never finds it stale, and every worker used to wait on it forever
    config = TuneConfig.from_params(PARAMS["tune"]).with_overrides(storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                                                                   study_name="orphan", n_trials=1)
    study = optuna.create_study(storage=make_storage(config.storage, config), study_name="orphan")
    study.ask()

    def hung(signum, frame):
        raise TimeoutError("run_tune still waits on the trial that never beat")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        run_tune(config, PARAMS, prepared, tmp_path / "out", log=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert "trial 1 (retry of 0) complete" in capsys.readouterr().err
    orphan, retry = optuna.load_study(study_name="orphan", storage=config.storage).get_trials(deepcopy=False)
    assert orphan.state == optuna.trial.TrialState.FAIL and retry.state == optuna.trial.TrialState.COMPLETE


def test_queued_trials_run_within_the_budget_and_a_resumed_study_runs_only_what_it_still_owes(prepared, tmp_path,
                                                                                            capsys):
    # n_trials counts the study's trials run (complete + pruned): queued trials (enqueue_trial, by hand or by
    # another tool) go first but count too, and those past the budget wait for a larger one
    config = TuneConfig.from_params(PARAMS["tune"]).with_overrides(storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                                                                   study_name="queued", n_trials=2)
    study = optuna.create_study(storage=config.storage, study_name="queued")
    for lr in (1e-3, 2e-3, 3e-3):
        study.enqueue_trial({"optimizer": "adam", "lr": lr, "warmup_steps": 0})
    run_tune(config, PARAMS, prepared, tmp_path, log=False)

    def trials() -> list[tuple[str, float | None]]:
        return [(t.state.name, t.params.get("lr")) for t in study.get_trials(deepcopy=False)]

    assert trials() == [("COMPLETE", 1e-3), ("COMPLETE", 2e-3), ("WAITING", None)]  # was: all three run
    assert "1 queued trial(s) left waiting" in capsys.readouterr().err
    run_tune(config.with_overrides(n_trials=3), PARAMS, prepared, tmp_path, log=False)  # resumed: one owed
    assert [state for state, _ in trials()] == ["COMPLETE"] * 3 and trials()[2][1] == 3e-3
    assert run_tune(config.with_overrides(n_trials=3), PARAMS, prepared, tmp_path, log=False)["ran"] == {}


@pytest.fixture(scope="module")
def pruned_study(prepared, tmp_path_factory):
    """Two sensible trials, then an absurd lr, on the embedded storage with the median pruner.

    The objective here is the validation loss: after 6 steps every tiny model still reads nothing
    (CER 1.0 for all), while the loss separates a diverged model by orders of magnitude.
    """
    out = tmp_path_factory.mktemp("tuning")
    params = {**PARAMS, "tune": {**PARAMS["tune"], "metric": "val_loss", "study_name": "prune", "n_trials": 3,
                                 "space": {"optimizer": {"type": "categorical", "choices": ["adam"]},
                                           "lr": {"type": "float", "low": 1e-4, "high": 20.0, "log": True}}}}
    config = TuneConfig.from_params(params["tune"])
    study = optuna.create_study(storage=f"sqlite:///{out / 'optuna.db'}", study_name="prune", direction="minimize")
    for lr in (1e-3, 3e-3, 10.0):
        study.enqueue_trial({"optimizer": "adam", "lr": lr})
    run_tune(config, params, prepared, out, log=False)
    return optuna.load_study(study_name="prune", storage=f"sqlite:///{out / 'optuna.db'}"), out


def test_pruning_stops_a_clearly_worse_trial_early(pruned_study):
    study, _ = pruned_study
    good1, good2, absurd = study.get_trials(deepcopy=False)
    assert good1.state == good2.state == optuna.trial.TrialState.COMPLETE
    assert absurd.params["lr"] == 10.0 and absurd.state == optuna.trial.TrialState.PRUNED
    assert max(absurd.intermediate_values) < 6  # stopped before its last step
    assert min(absurd.intermediate_values.values()) > 10 * max(good1.value, good2.value)


def test_best_params_are_written_and_train_uses_them(pruned_study, tmp_path):
    study, out = pruned_study
    best = yaml.safe_load((out / "best_params.yaml").read_text(encoding="utf-8"))
    assert set(best) >= {"study", "storage", "metric", "direction", "value", "trial", "trials", "train"}
    assert best["study"] == "prune" and best["metric"] == "val_loss" and best["direction"] == "minimize"
    assert best["trial"] == study.best_trial.number and best["value"] == pytest.approx(study.best_value)
    assert best["train"] == {"optimizer": "adam", "lr": study.best_trial.params["lr"]}
    assert best["trials"] == {"complete": 2, "pruned": 1, "fail": 0, "running": 0, "waiting": 0}

    params = {"model": PARAMS["model"], "train": {**PARAMS["train"], "lr": 0.5, "optimizer": "adadelta",
                                                    "use_tuned": True, "tuned_params": str(out / "best_params.yaml")}}
    config = TrainConfig.from_params(params)
    assert config.lr == best["train"]["lr"] and config.optimizer == "adam"
    assert config.steps == 6 and config.output_channel == 32  # the rest still comes from params.yaml
    assert config.tuned_keys == ("lr", "optimizer") and "study prune" in config.tuned_from
    assert TrainConfig.from_params({**params, "train": {**params["train"], "use_tuned": False}}).lr == 0.5
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        TrainConfig.from_params({"train": {"use_tuned": True, "tuned_params": str(tmp_path / "nowhere.yaml")}})


def test_conditional_entries_give_one_knob_a_range_per_optimizer():
    config = TuneConfig.from_params({**PARAMS["tune"], "space": {
        "lr": {"type": "float", "low": "1e-4", "high": "1e-2", "log": True, "when": {"optimizer": ["adam"]}},
        "lr_adadelta": {"type": "float", "low": 0.1, "high": 1.0, "key": "lr", "when": {"optimizer": "adadelta"}},
        "optimizer": {"type": "categorical", "choices": ["adadelta", "adam"]}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(20):
        knobs = suggest(study.ask(), config.space)
        assert set(knobs) == {"optimizer", "lr"}
        assert (0.1 <= knobs["lr"] <= 1.0) if knobs["optimizer"] == "adadelta" else (1e-4 <= knobs["lr"] <= 1e-2)
        seen.add(knobs["optimizer"])
    assert seen == {"adadelta", "adam"}


@pytest.mark.parametrize("change, message", [
    ({"metric": "e2e_f1", "direction": "maximize", "e2e_split": "test"}, "would leak them into model choice"),
    ({"direction": "maximize"}, "val_cer is improved by minimize"),
    ({"space": {"patience": {"type": "int", "low": 0, "high": 3}}}, "'patience' is not a searchable train knob"),
    ({"space": {"lr": {"type": "float", "low": 1e-4}}}, "needs low and high"),
    ({"pruner": "asha"}, "expected median, hyperband or none"),
])
def test_settings_errors_name_what_to_fix(change, message):
    with pytest.raises(TuneError, match=re.escape(message)):
        TuneConfig.from_params({**PARAMS["tune"], **change})


def test_cli_reports_a_settings_error_in_one_line(prepared, tmp_path, monkeypatch, capsys):
    from kocr.cli import main

    monkeypatch.chdir(_project(tmp_path / "p", metric="e2e_f1", e2e_split="test", direction="maximize"))
    assert main(["tune", "--data", str(prepared)]) == 2  # exit 2, as every refusal a user can fix
    err = capsys.readouterr().err.strip()
    assert err.startswith("kocr tune: error: params.yaml: tune.e2e_split test: ") and "\n" not in err


@pytest.mark.parametrize("where", ["no server", "no such database", "unknown option"])
def test_a_storage_that_cannot_be_opened_is_one_line_naming_it_without_its_password(where, prepared, tmp_path,
                                                                                 monkeypatch, capsys):
    # was: a traceback of some 150 lines ending in sqlalchemy.exc.OperationalError, exit 1 (for an
    # unknown query option, psycopg2's ProgrammingError "invalid dsn: invalid connection option")
    from kocr.cli import main

    if where == "no server":  # nothing listens on port 1
        url, shown = f"postgresql+psycopg2://kim:{SECRET}@127.0.0.1:1/optuna", "kim:***@127.0.0.1:1/optuna"
    else:
        params = postgres_params()
        database = "kocr_no_such_db" if where == "no such database" else "postgres?foo=bar"
        url = f"postgresql+psycopg2://{params['user']}:{SECRET}@{params['host']}:{params['port']}/{database}"
        shown = f"{params['user']}:***@{params['host']}:{params['port']}/{database}"
    monkeypatch.setattr("training.tune.time.sleep", lambda s: None)  # the retries of a race at table creation
    monkeypatch.chdir(_project(tmp_path / "p"))
    assert main(["tune", "--data", str(prepared), "--storage", url, "--study", "s"]) == 2
    err = capsys.readouterr().err.strip()  # MLflow may say it made its store's tables first (INFO lines)
    assert "Traceback" not in err and SECRET not in err, err
    line = err.splitlines()[-1]
    assert line.startswith(f"kocr tune: error: cannot open the Optuna storage postgresql+psycopg2://{shown}: "), err
    reason = {"no server": "Connection refused", "no such database": "kocr_no_such_db",
              "unknown option": 'invalid connection option "foo"'}[where]
    assert reason in line.removeprefix(f"kocr tune: error: cannot open the Optuna storage postgresql+psycopg2://{shown}"), line


def test_a_postgresql_storage_that_never_answers_is_given_up_after_the_connect_timeout(monkeypatch):
    # was: libpq's connect waited for ever on a port that accepts and never answers (on a host that drops
    # packets, some two minutes per try, and make_storage tried three times); now connect_timeout, once
    import socket
    import threading

    from kocr.locks import LockError, advisory_lock, connect_args

    assert connect_args("postgresql+psycopg2://kim@db/optuna") == {"connect_timeout": 10}  # the default
    assert connect_args("postgresql+psycopg2://kim@db/optuna?connect_timeout=60") == {}  # the URL's wins
    assert connect_args("sqlite:///optuna.db") == {}
    monkeypatch.setattr("kocr.locks.CONNECT_TIMEOUT_S", 2)  # libpq's least
    monkeypatch.setattr("training.tune.time.sleep", lambda s: None)
    config = TuneConfig.from_params(PARAMS["tune"])
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the TCP handshake; nothing ever answers PostgreSQL's
        port = silent.getsockname()[1]
        url = f"postgresql+psycopg2://kim:{SECRET}@127.0.0.1:{port}/optuna"
        for opened in (lambda: make_storage(url, config), lambda: advisory_lock(url, "x").__enter__()):
            raised: list[Exception] = []
            worker = threading.Thread(target=lambda: raised.append(pytest.raises(Exception, opened).value),
                                      daemon=True)
            started = time.monotonic()
            worker.start()
            worker.join(30)
            assert not worker.is_alive(), "still connecting after 30 s"
            assert time.monotonic() - started < 10
            shown = f"postgresql+psycopg2://kim:***@127.0.0.1:{port}/optuna"
            said = {TuneError: f"cannot open the Optuna storage {shown}", LockError: f"lock database {shown}"}
            assert str(raised[0]) == f'{said[type(raised[0])]}: connection to server at "127.0.0.1", port {port} ' \
                                     "failed: timeout expired", raised


def test_libpq_connect_timeout_from_the_environment_is_not_overridden(monkeypatch):
    """PGCONNECT_TIMEOUT (libpq's own setting) was overridden by the connect_timeout of 10 s kocr passes
    (connect_args win over the environment): PGCONNECT_TIMEOUT=2 waited 10 s on a port that never answers."""
    import socket

    from kocr.locks import LockError, advisory_lock, connect_args

    monkeypatch.setenv("PGCONNECT_TIMEOUT", "2")
    assert connect_args("postgresql+psycopg2://kim@db/optuna") == {}
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the TCP handshake; nothing ever answers PostgreSQL's
        url = f"postgresql+psycopg2://kim:{SECRET}@127.0.0.1:{silent.getsockname()[1]}/optuna"
        started = time.monotonic()
        with pytest.raises(LockError, match="timeout expired"):
            advisory_lock(url, "x").__enter__()
        assert time.monotonic() - started < 8


@pytest.mark.parametrize("entry, change", [
    ("optimizer", {"type": "categorical", "choices": ["adam", "adadelta"]}),  # other choices
    ("lr", {"type": "float", "low": 1e-4, "high": 1e-2}),  # not on a log scale
    ("warmup_steps", {"type": "float", "low": 0.0, "high": 2.0}),  # another type
])
def test_a_worker_whose_space_optuna_cannot_draw_in_the_study_is_refused_before_any_trial(entry, change, prepared,
                                                                                         tmp_path, capsys):
    # was: warned, then three trials in a row failed (ValueError: CategoricalDistribution does not support
    # dynamic value space), each left FAIL in the shared study
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    config = TuneConfig.from_params(PARAMS["tune"]).with_overrides(study_name="shared", n_trials=2)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="shared")
    study.set_user_attr("kocr.metric", "val_cer")
    study.set_user_attr("kocr.space", "another worker's")
    study.add_trial(optuna.trial.create_trial(
        params={"optimizer": "adam", "lr": 1e-3, "warmup_steps": 1}, value=0.9,
        distributions={"optimizer": CategoricalDistribution(["adam", "adamw"]),
                       "lr": FloatDistribution(1e-4, 1e-2, log=True), "warmup_steps": IntDistribution(0, 2)}))
    changed = TuneConfig.from_params({**PARAMS["tune"], "space": {**PARAMS["tune"]["space"], entry: change}})
    with pytest.raises(TuneError, match=rf"^tune.space.{entry} cannot join study shared: its trials drew {entry} "):
        run_tune(changed.with_overrides(study_name="shared", n_trials=3), PARAMS, prepared, tmp_path, log=False)
    assert [t.state.name for t in optuna.load_study(study_name="shared", storage=storage).get_trials()] \
        == ["COMPLETE"]  # no trial failed in the shared study
    run_tune(config, PARAMS, prepared, tmp_path, log=False)  # the study's own space still joins


def test_end_to_end_f1_objective_scores_trials_on_the_validation_pages(sample_pages, prepared, tmp_path):
    import json

    params = {**PARAMS, "data": {"source": str(sample_pages)},
              "tune": {**PARAMS["tune"], "metric": "e2e_f1", "direction": "maximize", "n_trials": 1,
                       "steps_per_trial": 2, "report_every": 2, "study_name": "e2e",
                       "space": {"lr": {"type": "float", "low": 1e-3, "high": 2e-3}}}}
    best = run_tune(TuneConfig.from_params(params["tune"]), params, prepared, tmp_path, log=False)
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    (trial,) = study.get_trials(deepcopy=False)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert trial.intermediate_values == {2: best["value"]} and 0.0 <= best["value"] <= 1.0
    val_pages = json.loads((prepared / "splits.json").read_text())["val"]
    assert val_pages and best["metric"] == "e2e_f1"


@pytest.mark.parametrize("evaluate", [None, {}, {"iou_threshold": 0.7}, {"iou_threshold": "high"}])
def test_e2e_trials_score_with_the_evaluate_stages_gate_and_a_null_section_is_its_defaults(sample_pages, prepared,
                                                                                          evaluate):
    # was: params.get("evaluate", {}).get(...): `evaluate:` with every key commented out (null) was an
    # AttributeError traceback, and a string gate reached the scorer unchecked
    from kocr.params import ParamsError
    from training.tune import e2e_scorer

    params = {**PARAMS, "data": {"source": str(sample_pages)}, "evaluate": evaluate}
    config = TuneConfig.from_params({**PARAMS["tune"], "metric": "e2e_f1", "direction": "maximize"})
    if evaluate and evaluate["iou_threshold"] == "high":
        with pytest.raises(ParamsError, match="evaluate.iou_threshold"):
            e2e_scorer(config, params, prepared)
        return
    scorer = e2e_scorer(config, params, prepared)
    assert scorer.iou_threshold == (evaluate or {}).get("iou_threshold", 0.5)


def test_a_storage_password_given_as_a_query_parameter_is_hidden_too():
    # psycopg2 takes ?password=… as well as user:…@; both must stay out of logs, MLflow and best_params.yaml
    from kocr.locks import LockError, advisory_lock

    url = "postgresql+psycopg2://kim@127.0.0.1:1/optuna?sslmode=disable&password=" + SECRET
    assert redact(url) == "postgresql+psycopg2://kim@127.0.0.1:1/optuna?sslmode=disable&password=***"
    assert SECRET not in redact(url.replace("kim@", f"kim:{SECRET}@"))
    with pytest.raises(LockError) as refused:  # nothing listens on port 1
        with advisory_lock(url, "query-password"):
            pass
    assert SECRET not in str(refused.value) and "password=***" in str(refused.value)


@pytest.mark.parametrize("password", ["s3c/ret", "s3c?ret", "s3c#ret", "s3c:r/et?x#y"])
def test_a_database_password_holding_slash_question_or_hash_is_hidden_where_mlflow_shows_it(password):
    """SQLAlchemy (so Optuna and the promotion lock) reads a database URL's password up to the first @,
    / ? # included, and connects with it; was: such a password stayed in the clear in the tune run's
    tune.storage param and kocr.storage tag and in the promote run's promote.lock_url param."""
    from sqlalchemy.engine import make_url

    from evaluation.promote import PromoteConfig
    from training.tune import recorded_storage

    url = f"postgresql+psycopg2://kim:{password}@db.example:5432/optuna"
    assert make_url(url).password == password  # a URL the storage and the lock really connect with
    shown = {"tune.storage": recorded_storage(url),
             "promote.lock_url": PromoteConfig.logged({"lock_url": url, "min_delta": 0.0})["lock_url"]}
    assert shown == dict.fromkeys(shown, "postgresql+psycopg2://kim:***@db.example:5432/optuna")
    # a tracking server's URL keeps RFC 3986's reading: the path after the host is not a password
    assert redact("http://127.0.0.1:5000/ajax-api/2.0/x@y") == "http://127.0.0.1:5000/ajax-api/2.0/x@y"


@pytest.mark.parametrize("user", ["kim@myserver", ""])
def test_a_database_password_after_a_user_holding_at_or_no_user_is_hidden_where_mlflow_shows_it(user):
    """SQLAlchemy reads a database URL's user up to the first : or /, so it may be empty or hold an @
    (Azure Database for PostgreSQL names its users kim@myserver), and connects with the password after
    it; was: hide_passwords wanted a user part without @ and not empty, and left such a password in the
    clear in the tune run's tune.storage param and the promote run's promote.lock_url param."""
    from sqlalchemy.engine import make_url

    from evaluation.promote import PromoteConfig
    from training.tune import recorded_storage

    url = f"postgresql+psycopg2://{user}:s3c/ret@db.example:5432/optuna"
    assert (make_url(url).username or "", make_url(url).password) == (user, "s3c/ret")
    shown = {"tune.storage": recorded_storage(url),
             "promote.lock_url": PromoteConfig.logged({"lock_url": url, "min_delta": 0.0})["lock_url"]}
    assert shown == dict.fromkeys(shown, f"postgresql+psycopg2://{user}:***@db.example:5432/optuna")
    # nor is more hidden than the password: a URL with no password, a path or key with an @ in it
    for kept in ("postgresql+psycopg2://kim@db.example/optuna", "sqlite:////data/x@y/optuna.db",
                 "s3://bucket/key@v2", "file:///tmp/a:b@c"):
        assert redact(kept) == kept


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_tied_trials_rank_by_val_loss_as_train_ranks_its_checkpoints(direction):
    # on short budgets val_cer ties at 1.0 are common: the file must not take whichever finished first
    from optuna.distributions import FloatDistribution

    from training.tune import TIE_BREAK, best_params_document

    metric = "val_cer" if direction == "minimize" else "val_word_accuracy"
    config = TuneConfig.from_params({**PARAMS["tune"], "metric": metric, "direction": direction})
    study = optuna.create_study(direction=direction)
    lr = {"lr": FloatDistribution(1e-4, 1e-2, log=True)}
    for value, loss, rate in ((1.0, 151.9, 3e-4), (1.0, 8.2, 2e-3), (1.0, 9.0, 5e-3)):
        study.add_trial(optuna.trial.create_trial(params={"lr": rate}, distributions=lr, value=value,
                                                  user_attrs={TIE_BREAK: loss}))
    doc = best_params_document(study, config, "sqlite:///x.db")
    assert doc["trial"] == 1 and doc["train"]["lr"] == 2e-3
    better = 0.5 if direction == "minimize" else 1.5  # a better value still wins whatever its loss
    study.add_trial(optuna.trial.create_trial(params={"lr": 1e-4}, distributions=lr, value=better,
                                              user_attrs={TIE_BREAK: 500.0}))
    assert best_params_document(study, config, "sqlite:///x.db")["trial"] == 3


def test_best_params_record_the_embedded_storage_relative_to_the_project_root(tmp_path, monkeypatch):
    # was: the absolute path of the checkout that ran tune (sqlite:////work/h146/.../tuning/optuna.db), so
    # the committed file named another machine's folder and changed between machines with the same study
    from optuna.distributions import FloatDistribution

    from training.tune import best_params_document, storage_url

    config = TuneConfig.from_params(PARAMS["tune"])
    docs = {}
    for name in ("one", "two"):  # two checkouts of one project, on two machines
        project = tmp_path / name
        (project / ".dvc").mkdir(parents=True)
        (project / "src").mkdir()
        monkeypatch.chdir(project)
        url = storage_url(config, "tuning")
        assert Path(url.removeprefix("sqlite:///")).is_absolute()
        study = optuna.create_study(storage=url, study_name="s")
        study.add_trial(optuna.trial.create_trial(params={"lr": 1e-3}, value=0.5,
                                                  distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True)}))
        docs[name] = best_params_document(study, config, url)
        assert docs[name]["storage"] == "sqlite:///tuning/optuna.db"
        # the recorded URL opens the study from the project root
        assert optuna.load_study(study_name="s", storage=docs[name]["storage"]).best_value == 0.5
        monkeypatch.chdir(project / "src")  # the root is the project's, not the current folder
        assert best_params_document(study, config, url)["storage"] == "sqlite:///tuning/optuna.db"
    assert docs["one"] == docs["two"]
    outside = f"sqlite:///{tmp_path / 'elsewhere.db'}"  # a file outside the project keeps its path
    assert best_params_document(study, config, outside)["storage"] == outside
    assert best_params_document(study, config, "sqlite:///studies/x.db")["storage"] == "sqlite:///studies/x.db"
    assert best_params_document(study, config, "postgresql+psycopg2://kim:s3cret@db/optuna")["storage"] \
        == "postgresql+psycopg2://kim:***@db/optuna"


def test_a_completed_trial_records_the_val_loss_where_it_reached_its_value(prepared):
    import math

    from training.tune import TIE_BREAK

    config = TuneConfig.from_params(PARAMS["tune"])
    trial = optuna.create_study().ask()
    state, value, _ = run_trial(trial, config, PARAMS, prepared, log=False)
    assert state == optuna.trial.TrialState.COMPLETE and value is not None
    assert math.isfinite(trial.user_attrs[TIE_BREAK]) and trial.user_attrs[TIE_BREAK] > 0


def test_a_trial_run_carries_its_tune_runs_stage_commit_and_data_versions(prepared, monkeypatch):
    """Was: trial-N had only kocr.study and kocr.trial, none of the tags and inputs every run has."""
    from kocr.tracking import log_dataset, stage_run

    config = TuneConfig.from_params({**PARAMS["tune"], "steps_per_trial": 3})
    trial = optuna.create_study().ask()
    try:
        with stage_run("tune", experiment="ko-ocr/tune") as parent:
            for split in ("train", "val"):
                log_dataset(prepared / split, context=split)
            run_trial(trial, config, PARAMS, prepared, log=True)
        run = mlflow.get_run(trial.user_attrs["mlflow_run_id"])
        above = mlflow.get_run(parent.info.run_id)
    finally:
        mlflow.set_tracking_uri(None)
    assert run.data.tags["mlflow.parentRunId"] == above.info.run_id
    for tag in ("kocr.stage", "mlflow.source.git.commit", "kocr.data.train", "kocr.data.val"):
        assert run.data.tags[tag] == above.data.tags[tag], tag
    assert {(i.dataset.digest, i.dataset.name) for i in run.inputs.dataset_inputs} \
        == {(i.dataset.digest, i.dataset.name) for i in above.inputs.dataset_inputs} != set()


def test_trial_runs_show_every_knob_they_trained_with_and_the_tune_run_the_steps_trials_trained(
        prepared, tmp_path, monkeypatch):
    """Was: a trial run had only the knobs the sampler chose (train.lr), and the tune run showed
    params.yaml's train.steps (6) and val_every although every trial trained steps_per_trial (2)."""
    from kocr.cli import main

    space = {"optimizer": {"type": "categorical", "choices": ["adam"]},
             "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
             "warmup_steps": {"type": "int", "low": 1, "high": 2, "when": {"optimizer": ["adadelta"]}}}
    monkeypatch.chdir(_project(tmp_path / "p", n_trials=1, steps_per_trial=2, report_every=2, study_name="knobs",
                               space=space))
    assert main(["tune", "--data", str(prepared), "--out", "tuning"]) == 0
    runs = mlflow.search_runs(experiment_names=["ko-ocr/tune"], output_format="list")
    [parent] = [r for r in runs if r.info.run_name == "tune"]
    [run] = [r for r in runs if r.info.run_name == "trial-0"]
    [trial] = optuna.load_study(study_name="knobs", storage="sqlite:///tuning/optuna.db").get_trials()
    budget = {"train.steps": "2", "train.val_every": "2"}  # not params.yaml's 6 and 3
    fixed = {"train.batch_size": "4", "train.base": "scratch", "train.grad_clip": "5.0", "model.hidden_size": "32",
             "train.warmup_steps": "0"}  # warmup_steps: searched only with adadelta, so params.yaml's (default) 0
    for params in (parent.data.params, run.data.params):
        assert {k: params.get(k) for k in {**budget, **fixed}} == {**budget, **fixed}
        assert "train.use_tuned" not in params  # a trial never reads the tuned file
    assert run.data.params["train.lr"] == str(trial.params["lr"]) and run.data.params["train.optimizer"] == "adam"
    assert run.data.tags["kocr.searched"] == "lr,optimizer"
    # the tune run shows no value of the knobs every trial searches: params.yaml's trained no trial
    assert "train.lr" not in parent.data.params and "train.optimizer" not in parent.data.params


def test_a_trials_value_is_named_as_its_tune_runs_best(prepared, tmp_path, monkeypatch):
    """Was: a trial logged its value as ``value`` and the tune run the study's best as ``best_val_cer``,
    which a train run also logs: the trial rows had no column in common with either in the MLflow UI."""
    from kocr.cli import main

    # a DVC project of its own: the storage is recorded relative to the project root, which would otherwise be
    # whatever DVC project holds the temporary folder (a checkout, where TMPDIR lies inside one)
    (tmp_path / "p" / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(_project(tmp_path / "p", n_trials=1, steps_per_trial=2, report_every=2, study_name="named"))
    assert main(["tune", "--data", str(prepared), "--out", "tuning"]) == 0
    runs = mlflow.search_runs(experiment_names=["ko-ocr/tune"], output_format="list")
    [parent] = [r for r in runs if r.info.run_name == "tune"]
    [run] = [r for r in runs if r.info.run_name == "trial-0"]
    [trial] = optuna.load_study(study_name="named", storage="sqlite:///tuning/optuna.db").get_trials()
    assert "value" not in run.data.metrics
    assert run.data.metrics["best_val_cer"] == pytest.approx(trial.value) == parent.data.metrics["best_val_cer"]
    # the storage as best_params.yaml records it: relative inside the project, not this checkout's absolute path
    # (was: sqlite:////<checkout>/tuning/optuna.db, a value differing on every machine in the compare view)
    assert parent.data.tags["kocr.storage"] == "sqlite:///tuning/optuna.db"


def test_no_mlflow_column_means_one_thing_on_a_trial_and_another_on_a_train_run(prepared, tmp_path, monkeypatch):
    """Was: a trial tuning on val_word_accuracy logged the best word accuracy it reached as
    ``best_val_word_accuracy``, and a train run the word accuracy of the checkpoint it kept for its best
    CER under the same name. Now each shared name means the same on both (``best_val_cer``: the lowest
    val CER reached), and the train run's other scores at its kept checkpoint are ``at_best_cer_val_<x>``."""
    from kocr.cli import main
    from training.tune import METRICS

    project = _project(tmp_path / "p", n_trials=1, steps_per_trial=4, report_every=2, study_name="wa",
                       metric="val_word_accuracy", direction="maximize")
    monkeypatch.chdir(project)
    assert main(["tune", "--data", str(prepared), "--out", "tuning"]) == 0
    assert main(["train", "--data", str(prepared), "--out", "out", "--plots", "plots"]) == 0
    client = mlflow.MlflowClient()
    [trial] = [r for r in mlflow.search_runs(experiment_names=["ko-ocr/tune"], output_format="list")
               if r.info.run_name == "trial-0"]
    [train] = [r for r in mlflow.search_runs(experiment_names=["ko-ocr/finetune"], output_format="list")
               if r.info.run_name == "train"]
    curve = {m.step: m.value for m in client.get_metric_history(trial.info.run_id, "val_word_accuracy")}
    assert trial.data.metrics["best_val_word_accuracy"] == max(curve.values())
    # the train run: the scores at the step its best CER was reached, best_val_cer the lowest CER of its curve
    cer = {m.step: m.value for m in client.get_metric_history(train.info.run_id, "val_cer")}
    word = {m.step: m.value for m in client.get_metric_history(train.info.run_id, "val_word_accuracy")}
    kept = int(train.data.metrics["best_step"])
    assert train.data.metrics["best_val_cer"] == pytest.approx(min(cer.values())) == pytest.approx(cer[kept])
    assert train.data.metrics["at_best_cer_val_word_accuracy"] == pytest.approx(word[kept])
    assert "best_val_word_accuracy" not in train.data.metrics
    # whatever tune.metric is, the name its trials and tune run give their best is a train run's only as best_val_cer
    assert {f"best_{metric}" for metric in METRICS} & set(train.data.metrics) == {"best_val_cer"}


def test_the_study_pictures_name_the_metric_on_their_value_axis(monkeypatch):
    """Was: 'Objective Value' and 'Intermediate Value': a picture of a val_cer study (lower is better)
    looked like one of an e2e_f1 study (higher is better)."""
    from training.tune import log_study_figures

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        trial = study.ask()
        value = trial.suggest_float("lr", 1e-4, 1e-2, log=True) * 10 + trial.suggest_int("warmup_steps", 0, 2) / 10
        trial.report(value + 0.5, 1)
        study.tell(trial, value)
    labels = {}

    def logged(figure, name):
        ax = figure.axes[0]
        labels[name] = (ax.get_ylabel(), ax.get_xlabel(), [t.get_text() for t in ax.get_legend().get_texts()]
                        if ax.get_legend() else [])

    monkeypatch.setattr(mlflow, "log_figure", logged)
    log_study_figures(study, "val_cer")
    assert labels["tuning/optimization_history.png"][0] == "val_cer"
    assert labels["tuning/intermediate_values.png"][0] == "val_cer"
    assert labels["tuning/param_importances.png"][2] == ["val_cer"]  # the importances' legend, its value axis the params


def test_a_trial_whose_knobs_make_no_train_config_still_shows_them(prepared, monkeypatch):
    from kocr.params import ParamsError

    import training.tune

    def refuse(params, overrides, config):
        raise ParamsError("train.lr: refused")

    monkeypatch.setattr(training.tune, "trial_config", refuse)
    trial = optuna.create_study().ask()
    with mlflow.start_run():
        state, _, note = run_trial(trial, TuneConfig.from_params(PARAMS["tune"]), PARAMS, prepared, log=True)
    run = mlflow.get_run(trial.user_attrs["mlflow_run_id"])
    assert state == optuna.trial.TrialState.FAIL and "refused" in note and run.info.status == "FAILED"
    assert run.data.params == {f"train.{k}": str(v) for k, v in trial.params.items()}


@pytest.mark.parametrize("stop", [SystemExit(143), KeyboardInterrupt()], ids=["SIGTERM", "Ctrl-C"])
def test_a_trial_stopped_by_sigterm_or_ctrl_c_ends_its_run_as_killed(prepared, monkeypatch, stop):
    """Was: FAILED, as a trial whose training raised; a SIGTERM (an exit in kocr) or Ctrl-C stops it from outside."""
    import training.tune

    def stopped(*args, **kwargs):
        raise stop

    monkeypatch.setattr(training.tune, "train", stopped)
    trial = optuna.create_study().ask()
    with mlflow.start_run(), pytest.raises(type(stop)):
        run_trial(trial, TuneConfig.from_params(PARAMS["tune"]), PARAMS, prepared, log=True)
    assert mlflow.get_run(trial.user_attrs["mlflow_run_id"]).info.status == "KILLED"


def test_an_embedded_study_leaves_no_lock_file_beside_its_storage(prepared, tmp_path):
    """Was: tuning/optuna.db.<hash>.lock, the budget lock's file, stayed for good, one more per new study;
    a SIGKILLed worker's (its lock released by the kernel, the file left) stayed even after that fix."""
    config = TuneConfig.from_params({**PARAMS["tune"], "steps_per_trial": 2}).with_overrides(n_trials=1)
    (tmp_path / "tuning").mkdir()
    (tmp_path / "tuning" / "optuna.db.0123abcd.lock").touch()  # a killed worker's, of another study
    for _ in range(2):  # a new study per run
        run_tune(config, PARAMS, prepared, tmp_path / "tuning", log=False)
    assert len(optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'tuning' / 'optuna.db'}")) == 2
    assert sorted(p.name for p in (tmp_path / "tuning").iterdir()) == ["best_params.yaml", "optuna.db"]


def test_two_runs_of_one_second_each_get_a_new_study(tmp_path, monkeypatch):
    """Was: an unnamed study was named by the second alone and created with load_if_exists, so a run
    started in the same second as another on the same storage joined that one's study and budget (the
    suite's two quick runs did) instead of starting its own."""
    from training.tune import open_study

    config = TuneConfig.from_params({**PARAMS["tune"], "study_name": ""})
    storage = make_storage(f"sqlite:///{tmp_path / 'optuna.db'}", config)
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "tune-20261207-083350")
    names = [open_study(config, storage, shared=False).study_name for _ in range(3)]
    assert names == ["tune-20261207-083350", "tune-20261207-083350-2", "tune-20261207-083350-3"]
    assert len(optuna.get_all_study_summaries(storage)) == 3
    named = TuneConfig.from_params({**PARAMS["tune"], "study_name": "ko-lr"})
    assert {open_study(named, storage, shared=False).study_name for _ in range(2)} == {"ko-lr"}  # named: joined


def test_kocr_tune_study_names_only_a_study_nothing_else_names(monkeypatch):
    """$KOCR_TUNE_STUDY (the retrain workflow's per-run name, so a re-run continues the study) fills an
    empty tune.study_name; --study and a named study keep theirs; unset or blank, a new study per run."""
    config = TuneConfig.from_params({**PARAMS["tune"], "study_name": ""})
    assert config.with_env_study().study_name == ""
    monkeypatch.setenv("KOCR_TUNE_STUDY", " ")
    assert config.with_env_study().study_name == ""
    monkeypatch.setenv("KOCR_TUNE_STUDY", "gh-41-abc")
    assert config.with_env_study().study_name == "gh-41-abc"
    assert config.with_overrides(study_name="mine").with_env_study().study_name == "mine"
    assert TuneConfig.from_params({**PARAMS["tune"], "study_name": "ko-lr"}).with_env_study().study_name == "ko-lr"



def test_a_worker_stopped_by_sigterm_fails_its_trial_at_once_and_queues_its_retry(pg_url, prepared, tmp_path):
    """Was: the trial stayed RUNNING in the study until its heartbeat went stale (grace_period_s), while its
    MLflow run already ended KILLED: no other worker could retry it before then."""
    env = _env(f"sqlite:///{tmp_path / 'mlruns.db'}")
    storage = optuna.storages.RDBStorage(pg_url)
    # a long trial, and a grace period far longer than the test waits: only the worker itself can fail it
    doomed = _worker(_project(tmp_path / "a", steps_per_trial=100000, report_every=50000, grace_period_s=600),
                     prepared, env, "--storage", pg_url, "--study", "stopped", "--n-trials", "1")
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline and doomed.poll() is None, doomed.communicate()[0] if doomed.poll() else ""
        try:
            running = optuna.load_study(study_name="stopped", storage=storage).get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        except KeyError:
            running = []
        if running and "mlflow_run_id" in running[0].user_attrs:
            break
        time.sleep(0.2)
    doomed.send_signal(signal.SIGTERM)
    output = doomed.communicate(timeout=60)[0]
    assert doomed.returncode == 143 and "trial 0 stopped by SIGTERM: failed, and queued again" in output, output
    first, retry = optuna.load_study(study_name="stopped", storage=storage).get_trials(deepcopy=False)
    assert first.state == optuna.trial.TrialState.FAIL
    # queued with the same knobs, for the next worker to run first
    assert retry.state == optuna.trial.TrialState.WAITING and retry.system_attrs["failed_trial"] == 0
    assert retry.params == first.params
    run = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(first.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"


@pytest.mark.parametrize("stop", [SystemExit(143), KeyboardInterrupt()], ids=["SIGTERM", "Ctrl-C"])
def test_a_stopped_trial_of_an_embedded_study_is_failed_and_retried_by_the_next_run(prepared, tmp_path,
                                                                                   monkeypatch, stop):
    import training.tune

    def stopped(*args, **kwargs):
        raise stop

    config = TuneConfig.from_params({**PARAMS["tune"], "grace_period_s": 600}).with_overrides(
        study_name="stopped", n_trials=1)
    with monkeypatch.context() as patch:
        patch.setattr(training.tune, "train", stopped)
        with pytest.raises(type(stop)):
            run_tune(config, PARAMS, prepared, tmp_path, log=False)
    study = optuna.load_study(study_name="stopped", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.get_trials(deepcopy=False)] == ["FAIL", "WAITING"]
    summary = run_tune(config, PARAMS, prepared, tmp_path, log=False)  # at once, not grace_period_s later
    assert summary["ran"] == {"COMPLETE": 1} and summary["trial"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_params.yaml", "optuna.db"]  # its lock file gone


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_second_stop_while_the_stopped_trial_is_failed_still_queues_its_retry(prepared, tmp_path, monkeypatch,
                                                                                 signum):
    """Was: a second SIGTERM or Ctrl-C landing between the trial's FAIL and its retry (the stale-trial callback
    ends its MLflow run first) left it FAIL with no retry, for good: a failed trial never goes stale."""
    import training.tune
    from kocr.cli import _terminate_as_exit

    def stopped(*args, **kwargs):
        raise SystemExit(143) if signum == signal.SIGTERM else KeyboardInterrupt()

    def stopped_again(run_id):  # the second signal, while the retry is not queued yet
        os.kill(os.getpid(), signum)
        time.sleep(2)  # the handler runs here (or, deferred, once the retry is queued)

    config = TuneConfig.from_params({**PARAMS["tune"], "grace_period_s": 600}).with_overrides(
        study_name="stopped-twice", n_trials=1)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal (a script's job ignores it)
    try:
        with _terminate_as_exit(), monkeypatch.context() as patch:
            patch.setattr(training.tune, "train", stopped)
            patch.setattr(training.tune, "end_dead_run", stopped_again)
            with pytest.raises(SystemExit if signum == signal.SIGTERM else KeyboardInterrupt):
                run_tune(config, PARAMS, prepared, tmp_path, log=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    study = optuna.load_study(study_name="stopped-twice", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    first, *retry = study.get_trials(deepcopy=False)
    assert first.state.name == "FAIL" and [t.state.name for t in retry] == ["WAITING"]
    assert retry[0].system_attrs["failed_trial"] == 0 and retry[0].params == first.params


@pytest.mark.parametrize("stop", [SystemExit(143), KeyboardInterrupt()], ids=["SIGTERM", "Ctrl-C"])
def test_a_stopped_trial_whose_mlflow_run_cannot_be_ended_is_still_failed_and_queued_again(prepared, tmp_path,
                                                                                           monkeypatch, capsys, stop):
    """Was: the MLflow store failing as the stopped trial's run was ended (SQLite "database is locked" while
    another worker wrote to it, a tracking server down) replaced the SIGTERM or Ctrl-C by its error: the
    worker failed the trial without queueing its retry (a failed trial never goes stale: lost for good)
    and exited 2, not 143. Seen with two workers on one SQLite MLflow store, one of them SIGTERMed."""
    import training.tune

    store_down = []

    def stopped(*args, **kwargs):
        store_down.append(True)  # from here on every write to the store fails, as a locked SQLite file's do
        raise stop

    real = {"set_tag": mlflow.MlflowClient.set_tag, "set_terminated": mlflow.MlflowClient.set_terminated}
    config = TuneConfig.from_params({**PARAMS["tune"], "grace_period_s": 600}).with_overrides(
        study_name="stopped-store-down", n_trials=1)
    with mlflow.start_run(), monkeypatch.context() as patch:  # the worker's tune run, ended once the store is back
        patch.setattr(training.tune, "train", stopped)
        for name in real:
            patch.setattr(mlflow.MlflowClient, name,
                          lambda self, *a, _name=name, **k: _refuse(store_down, real[_name], self, *a, **k))
        with pytest.raises(type(stop)) as raised:
            run_tune(config, PARAMS, prepared, tmp_path, log=True)
    assert raised.value is stop  # the stop goes on (kocr tune exits 143), not the store's error (exit 2)
    err = capsys.readouterr().err
    assert "trial 0 stopped by" in err and "failed, and queued again" in err, err
    assert "trial 0: its MLflow run" in err and "could not be ended KILLED" in err  # said, in one line
    first, *retry = optuna.load_study(study_name="stopped-store-down",
                                      storage=f"sqlite:///{tmp_path / 'optuna.db'}").get_trials(deepcopy=False)
    assert first.state.name == "FAIL" and [t.state.name for t in retry] == ["WAITING"]
    assert retry[0].system_attrs["failed_trial"] == 0 and retry[0].params == first.params


def _refuse(down: list, method, client, *args, **kwargs):
    """``method`` of ``client``, or the error of a locked SQLite store once ``down`` holds something."""
    if down:
        raise mlflow.exceptions.MlflowException("(sqlite3.OperationalError) database is locked")
    return method(client, *args, **kwargs)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")  # study.ask() by hand here
def test_a_stop_while_a_worker_fails_a_dead_workers_trial_still_queues_its_retry(prepared, tmp_path, monkeypatch):
    """Was: a SIGTERM landing in claim_trial between a stale trial's FAIL and its retry (the callback ends the
    dead trial's MLflow run first) left that trial FAIL with no retry, for good, as a stop in the stopped
    worker's own handler did."""
    import training.tune
    from kocr.cli import _terminate_as_exit

    config = TuneConfig.from_params(PARAMS["tune"]).with_overrides(study_name="dead-worker", n_trials=1)
    storage = make_storage(f"sqlite:///{tmp_path / 'optuna.db'}", config)
    study = optuna.create_study(storage=storage, study_name="dead-worker")
    dead = study.ask()
    suggest(dead, config.space)
    storage.record_heartbeat(dead._trial_id)  # its worker beat once, then died
    time.sleep(config.grace_period_s + 1)

    def stopped(run_id):  # SIGTERM for this worker while it fails the dead one's trial
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2)

    with _terminate_as_exit(), monkeypatch.context() as patch:
        patch.setattr(training.tune, "end_dead_run", stopped)
        with pytest.raises(SystemExit):
            run_tune(config, PARAMS, prepared, tmp_path, log=False)
    first, *retry = optuna.load_study(study_name="dead-worker", storage=storage).get_trials(deepcopy=False)
    assert first.state.name == "FAIL" and [t.state.name for t in retry] == ["WAITING"]
    assert retry[0].system_attrs["failed_trial"] == 0 and retry[0].params == first.params


def test_the_tune_run_leaves_out_a_knob_its_conditional_entries_search_in_every_trial():
    """Was: only unconditional entries counted as searched, so with params.yaml's space (lr for adam and
    adamw, lr_adadelta setting lr for adadelta) the tune run showed params.yaml's train.lr, which no trial
    trained with. A knob searched for some choices only keeps params.yaml's value, which the others train with."""
    from training.tune import fixed_knob_params

    shipped = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    config = TuneConfig.from_params(shipped["tune"])
    params = fixed_knob_params(shipped, config)
    assert "train.lr" not in params and "train.optimizer" not in params
    assert params["train.weight_decay"] == str(float(shipped["train"]["weight_decay"]))  # not searched: kept
    partial = {**PARAMS["tune"], "space": {
        "optimizer": {"type": "categorical", "choices": ["adam", "adamw", "adadelta"]},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "when": {"optimizer": ["adam", "adamw"]}},
        "warmup_steps": {"type": "int", "low": 0, "high": 4},
        "augment": {"type": "float", "low": 0.0, "high": 0.5, "when": {"warmup_steps": [0, 1, 2, 3, 4]}}}}
    params = fixed_knob_params(PARAMS, TuneConfig.from_params(partial))
    assert params["train.lr"] == "0.001"  # adadelta trials train with it
    assert params["train.augment"] == "0.0"  # conditioned on an int entry: not listed as searched everywhere


def test_trials_logging_their_validation_samples_print_no_artifact_download_bars(prepared, tmp_path, monkeypatch,
                                                                                 capsys):
    """Was: every validation after a trial's first appended its samples with mlflow.log_table, which downloads
    the run's val_samples.json first: a "Downloading artifacts: 100%|...|" bar in the worker's output each time
    (from a local store as from a tracking server). The table still holds every validation's rows once."""
    from kocr.cli import main

    (tmp_path / "p" / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(_project(tmp_path / "p", n_trials=1, steps_per_trial=6, report_every=2, study_name="bars"))
    assert main(["tune", "--data", str(prepared), "--out", "tuning"]) == 0
    assert "Downloading artifacts" not in capsys.readouterr().err
    [run] = [r for r in mlflow.search_runs(experiment_names=["ko-ocr/tune"], output_format="list")
             if r.info.run_name == "trial-0"]
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="val_samples.json",
                                               dst_path=str(tmp_path / "d"))
    table = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    steps = [row[table["columns"].index("step")] for row in table["data"]]
    assert steps == sorted(steps) and set(steps) == {2, 4, 6} and len(steps) % 3 == 0
    assert run.data.tags["mlflow.loggedArtifacts"] == '[{"path": "val_samples.json", "type": "table"}]'


def test_best_params_record_the_steps_the_best_trial_trained_and_a_worker_of_another_budget_is_warned(
        prepared, tmp_path, capsys):
    """Was: workers with another tune.steps_per_trial joined the study silently, and best_params.yaml
    recorded the writing worker's steps_per_trial, not the steps its best trial trained."""
    tune = {**PARAMS["tune"], "study_name": "budgets", "n_trials": 1, "report_every": 2}
    run_tune(TuneConfig.from_params({**tune, "steps_per_trial": 2}), PARAMS, prepared, tmp_path / "tuning", log=False)
    capsys.readouterr()
    # a worker of another budget joins the spent study and rewrites the file
    run_tune(TuneConfig.from_params({**tune, "steps_per_trial": 4}), PARAMS, prepared, tmp_path / "tuning", log=False)
    said = capsys.readouterr().err
    doc = yaml.safe_load((tmp_path / "tuning" / "best_params.yaml").read_text())
    assert doc["trials"]["complete"] == 1 and doc["steps_per_trial"] == 2
    study = optuna.load_study(study_name="budgets", storage=f"sqlite:///{tmp_path / 'tuning' / 'optuna.db'}")
    assert study.trials[0].user_attrs["steps"] == 2
    assert "tune: warning: tune.steps_per_trial is 4; study budgets's complete trials trained 2 steps" in said


def test_a_tune_run_names_the_steps_its_studys_best_trial_trained(prepared, tmp_path, monkeypatch):
    """Was: a worker of another budget logged the study's best (best_val_cer, best.<knob>) beside only its
    own tune.steps_per_trial and train.steps, as if its best trial had trained those."""
    from kocr.cli import main

    tune = {"n_trials": 1, "report_every": 2, "study_name": "budgets"}
    monkeypatch.chdir(_project(tmp_path / "p", steps_per_trial=2, **tune))
    assert main(["tune", "--data", str(prepared), "--out", "tuning"]) == 0
    _project(tmp_path / "p", steps_per_trial=4, **tune)  # joins the spent study and writes its best again
    assert main(["tune", "--data", str(prepared), "--out", "tuning"]) == 0
    runs = mlflow.search_runs(experiment_names=["ko-ocr/tune"], output_format="list")
    [first, second] = sorted((r for r in runs if r.info.run_name == "tune"), key=lambda r: r.info.start_time)
    for run, own in ((first, "2"), (second, "4")):
        assert run.data.params["tune.steps_per_trial"] == run.data.params["train.steps"] == own
        assert run.data.params["best.steps_per_trial"] == "2"  # the only trial, the study's best, trained 2
