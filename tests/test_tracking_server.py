"""The tracking server of mlflow/ run for real, without Docker: `mlflow/serve.sh` against the local
PostgreSQL and a `moto_server` S3 endpoint, the bucket made by `mlflow/create_buckets.py` (the same
two commands the compose stack runs).

A tiny model is trained and logged over HTTP; its artifacts must land in the bucket, the registry
alias must resolve, requests need credentials, and a restart on the same database and bucket loses
nothing. Skipped with the reason when PostgreSQL (PGHOST/PGPORT/PGUSER, default
127.0.0.1:5432 postgres) or the server packages are not there; fails instead where
KOCR_REQUIRE_POSTGRES=1 (CI).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import mlflow
import pytest

from tests.conftest import REPO, postgres_params, postgres_url

psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2-binary is not installed (make install)")
boto3 = pytest.importorskip("boto3", reason="boto3 is not installed (make install)")
pytest.importorskip("flask_wtf", reason="the mlflow[auth] extra is not installed (make install)")

BIN = Path(sys.executable).parent
MOTO = BIN / "moto_server"
SERVE = REPO / "mlflow" / "serve.sh"
CREATE_BUCKETS = REPO / "mlflow" / "create_buckets.py"
BUCKET = "kocr-mlflow"
ADMIN, PASSWORD = "admin", "kocr-test-" + uuid.uuid4().hex[:12]
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
MODEL_NAME = "ko-ocr-recognizer-server-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _get(url: str, auth: tuple[str, str] | None = None, body: dict | None = None) -> tuple[int, bytes]:
    """GET ``url``, or POST ``body`` as JSON there; the status and the answer's bytes."""
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={} if body is None else {"Content-Type": "application/json"})
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def database():
    """A new PostgreSQL database for this module, dropped afterwards."""
    params = postgres_params()
    admin = psycopg2.connect(dbname="postgres", connect_timeout=3, **params)
    admin.autocommit = True
    name = f"kocr_mlflow_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    yield postgres_url(params, name)
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 endpoint with the artifact bucket, made by the stack's own bucket script."""
    if not MOTO.exists():
        pytest.skip(f"{MOTO} not found: moto[server] is not installed (make install)")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{endpoint}/moto-api/", proc, log, timeout=30)
        made = subprocess.run([sys.executable, str(CREATE_BUCKETS), BUCKET, "--endpoint", endpoint],
                              env={**os.environ, **S3_KEYS}, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0 and f"bucket {BUCKET}: created" in made.stdout, made.stdout + made.stderr
        again = subprocess.run([sys.executable, str(CREATE_BUCKETS), BUCKET, "--endpoint", endpoint],
                               env={**os.environ, **S3_KEYS}, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and f"bucket {BUCKET}: exists" in again.stdout, again.stdout + again.stderr
        # a store outside us-east-1 (S3_REGION=ap-northeast-2) wants the region as the bucket's location
        seoul = subprocess.run([sys.executable, str(CREATE_BUCKETS), "kocr-seoul", "--endpoint", endpoint],
                               env={**os.environ, **S3_KEYS, "AWS_DEFAULT_REGION": "ap-northeast-2"},
                               capture_output=True, text=True, timeout=60)
        assert seoul.returncode == 0 and "bucket kocr-seoul: created" in seoul.stdout, seoul.stdout + seoul.stderr
        client = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in S3_KEYS.items()
                                                             if k != "AWS_DEFAULT_REGION"},
                              region_name=S3_KEYS["AWS_DEFAULT_REGION"])
        assert client.get_bucket_location(Bucket="kocr-seoul")["LocationConstraint"] == "ap-northeast-2"
        yield endpoint, client
    finally:
        _stop(proc)


class Server:
    """`mlflow/serve.sh` as a child process that can be stopped and started again."""

    def __init__(self, database: str, endpoint: str, workdir: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.env = {**os.environ, **S3_KEYS,
                    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "MLFLOW_BACKEND_STORE_URI": database,
                    "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/artifacts",
                    "MLFLOW_S3_ENDPOINT_URL": endpoint,
                    "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
                    "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
                    "MLFLOW_PORT": str(self.port)}
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                     "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID"):
            self.env.pop(name, None)
        self.proc: subprocess.Popen | None = None
        self.starts: list[float] = []

    def start(self) -> None:
        log = self.workdir / f"server-{len(self.starts)}.log"
        began = time.monotonic()
        with log.open("w") as out:
            self.proc = subprocess.Popen(["bash", str(SERVE)], env=self.env, cwd=self.workdir, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        _wait_http(f"{self.url}/health", self.proc, log, timeout=90)
        self.starts.append(time.monotonic() - began)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            assert self.proc.returncode is not None


@pytest.fixture(scope="module")
def server(database, s3, tmp_path_factory):
    srv = Server(database, s3[0], tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def as_client(server, monkeypatch):
    """Point this test's MLflow client at the server, with the admin's credentials."""
    from mlflow.tracking._model_registry import utils as registry_utils

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    # configure_tracking() in other tests leaves a SQLite registry URI behind (global and env var)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", server.url)
    mlflow.set_tracking_uri(server.url)
    yield mlflow.MlflowClient(server.url, registry_uri=server.url)
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def logged(server, sample_pages, tmp_path_factory):
    """A real (tiny) training run logged over HTTP, its checkpoint logged and registered as champion."""
    from evaluation.pyfunc_model import log_recognizer
    from evaluation.reader import DetectorSettings
    from mlflow.tracking._model_registry import utils as registry_utils
    from training.data.prepare import PrepareConfig, prepare_pages
    from training.train import TrainConfig, train

    work = tmp_path_factory.mktemp("server-run")
    prepare_pages(sample_pages, work / "prepared", PrepareConfig(val_fraction=0.2, test_fraction=0.2),
                  progress=False)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", server.url)
    mp.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    mp.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    mp.setattr(registry_utils, "_registry_uri", None)
    mp.setenv("MLFLOW_REGISTRY_URI", server.url)
    mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    try:
        mlflow.set_tracking_uri(server.url)
        client = mlflow.MlflowClient(server.url, registry_uri=server.url)
        experiment_id = client.create_experiment("ko-ocr/server-test")  # not set_experiment: no global state
        config = TrainConfig(base="scratch", output_channel=32, hidden_size=32, steps=4, batch_size=4,
                             val_every=2, max_width=256, log_every=1)
        with mlflow.start_run(experiment_id=experiment_id, run_name="train") as run:
            summary = train(config, work / "prepared", work / "candidate", metrics_file=work / "train.json",
                            plots_dir=work / "plots", progress=False, log=True)
            info = log_recognizer(work / "candidate" / "model.pt", DetectorSettings())
        version = mlflow.register_model(info.model_uri, MODEL_NAME)
        client.set_registered_model_alias(MODEL_NAME, "champion", version.version)
        yield {"run_id": run.info.run_id, "model_uri": info.model_uri, "model_id": info.model_id,
               "version": str(version.version), "summary": summary,
               "checkpoint_bytes": (work / "candidate" / "model.pt").read_bytes()}
    finally:
        mlflow.set_tracking_uri(None)
        mp.undo()


def test_requests_need_credentials(server):
    url = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=5"
    assert _get(url)[0] == 401
    assert _get(url, (ADMIN, "wrong-password"))[0] == 401
    status, body = _get(url, (ADMIN, PASSWORD))
    assert status == 200 and "experiments" in json.loads(body)
    assert _get(f"{server.url}/health")[0] == 200  # health checks need no credentials


def test_training_run_logs_over_http_and_artifacts_land_in_the_bucket(logged, as_client, s3):
    run = as_client.get_run(logged["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train_samples"] == str(logged["summary"]["train_samples"])
    assert [m.step for m in as_client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert "val_cer" in run.data.metrics
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: clients need no S3 keys

    keys = [obj["Key"] for obj in s3[1].list_objects_v2(Bucket=BUCKET, Prefix="artifacts/")["Contents"]]
    model_keys = [k for k in keys if f"/{logged['model_id']}/" in k]
    assert any(k.endswith("/MLmodel") for k in model_keys), keys
    checkpoint = [k for k in model_keys if k.endswith("model.pt")]
    assert len(checkpoint) == 1, keys
    body = s3[1].get_object(Bucket=BUCKET, Key=checkpoint[0])["Body"].read()
    assert body == logged["checkpoint_bytes"]


def test_registry_alias_resolves(logged, as_client):
    version = as_client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.version == logged["version"]
    assert version.run_id == logged["run_id"]
    local = mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion")
    assert (Path(local) / "MLmodel").is_file()


def test_a_teammate_logs_runs_once_granted_but_cannot_move_champion(server, logged, as_client):
    # docs/gpu-server.md "Users": the account, then EDIT on every experiment; the registry stays READ
    api, admin = f"{server.url}/api", (ADMIN, PASSWORD)
    kim = ("kim", "kim-" + uuid.uuid4().hex)
    assert _get(f"{api}/2.0/mlflow/users/create", admin, {"username": kim[0], "password": kim[1]})[0] == 200
    experiment_id = as_client.get_run(logged["run_id"]).info.experiment_id
    create_run = (f"{api}/2.0/mlflow/runs/create", kim, {"experiment_id": experiment_id})
    assert _get(*create_run)[0] == 403  # the default READ: a teammate's stages could log nothing
    grant = {"username": kim[0], "resource_type": "experiment", "resource_id": "*", "permission": "EDIT"}
    assert _get(f"{api}/3.0/mlflow/users/permissions/grant", admin, grant)[0] == 200
    status, body = _get(*create_run)
    assert status == 200, body
    assert _get(f"{api}/2.0/mlflow/experiments/create", kim, {"name": "kim/scratch"})[0] == 200
    alias = {"name": MODEL_NAME, "alias": "champion", "version": logged["version"]}
    assert _get(f"{api}/2.0/mlflow/registered-models/alias", kim, alias)[0] == 403


def test_a_password_in_the_tracking_uri_is_never_printed(server, tmp_path):
    # MLflow prints "View run … at: <tracking URI>/#/experiments/…" as each run ends, userinfo and all
    (tmp_path / "params.yaml").write_text("sample:\n  fonts: [NanumGothic.ttf]\n  width: 320\n  height: 240\n",
                                          encoding="utf-8")
    host = server.url.removeprefix("http://")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://{ADMIN}:{PASSWORD}@{host}", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", None)
    done = subprocess.run([str(BIN / "kocr"), "synth-pages", "--out", str(tmp_path / "pages"), "--count", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert PASSWORD not in done.stdout + done.stderr


def test_restart_loses_nothing(server, logged, as_client):
    before = as_client.get_run(logged["run_id"])
    server.stop()
    assert _wait_down(server.url)
    server.start()
    url = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=5"
    assert _get(url)[0] == 401 and _get(url, (ADMIN, PASSWORD))[0] == 200  # the admin user survived
    after = as_client.get_run(logged["run_id"])
    assert after.data.metrics == before.data.metrics and after.data.params == before.data.params
    assert len(as_client.get_metric_history(logged["run_id"], "loss")) == 4
    assert as_client.get_model_version_by_alias(MODEL_NAME, "champion").version == logged["version"]
    assert [m.name for m in as_client.search_registered_models(f"name = '{MODEL_NAME}'")] == [MODEL_NAME]
    local = mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion")
    found = list(Path(local).rglob("model.pt"))
    assert len(found) == 1 and found[0].read_bytes() == logged["checkpoint_bytes"]
    assert max(server.starts) < 60, server.starts


def _wait_down(url: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
        except (urllib.error.URLError, OSError):
            return True
        time.sleep(0.2)
    return False
