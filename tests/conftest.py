"""Shared fixtures: small generated pages and a recogniser that reads Hangul, built without training."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from training.charset import Charset
from training.checkpoint import load_recognizer, save_checkpoint, transfer_head

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"
FONTS = ["NanumGothic.ttf", "NanumMyeongjo.ttf", "NanumPen.ttf"]
_CALLER_MLFLOW = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
REQUIRE_POSTGRES_ENV = "KOCR_REQUIRE_POSTGRES"

# One intra-op thread for the session and, through the environment, for every process a test starts (kocr
# commands, training scripts, dvc stages), so a result computed in a subprocess still equals one computed here.
# The suite's models are small and the test machines have 2 shared cores: with 2 threads each parallel region's
# spinning barrier waits on a descheduled thread, which made tiny-model training 6-7x slower in CPU time on a
# loaded 2-core host. Set OMP_NUM_THREADS yourself to run the suite at another count (docs/development.md).
if "OMP_NUM_THREADS" not in os.environ:
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    torch.set_num_threads(1)


def postgres_params() -> dict[str, Any]:
    """psycopg2 settings of the test PostgreSQL server (PGHOST, PGPORT, PGUSER, PGPASSWORD; default
    postgres@127.0.0.1:5432), checked by connecting. Skips the test when it cannot be reached, or
    fails it where KOCR_REQUIRE_POSTGRES=1 (CI, where a skip would hide the multi-worker tests)."""
    psycopg2 = pytest.importorskip("psycopg2")
    params = {"host": os.environ.get("PGHOST", "127.0.0.1"), "port": int(os.environ.get("PGPORT", "5432")),
              "user": os.environ.get("PGUSER", "postgres"), "password": os.environ.get("PGPASSWORD", "")}
    try:
        psycopg2.connect(dbname="postgres", connect_timeout=3, **params).close()
    except psycopg2.OperationalError as exc:
        why = (f"PostgreSQL is not reachable at {params['host']}:{params['port']} as {params['user']} "
               f"(start it: pg_ctlcluster --skip-systemctl-redirect 15 main start): {' '.join(str(exc).split())}")
        if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
            pytest.fail(f"{why}; {REQUIRE_POSTGRES_ENV}=1 makes this a failure")
        pytest.skip(why)
    return params


def postgres_url(params: dict[str, Any], dbname: str) -> str:
    """SQLAlchemy URL (psycopg2 driver) of database ``dbname`` on the server ``params`` names."""
    auth = params["user"] + (f":{params['password']}" if params["password"] else "")
    return f"postgresql+psycopg2://{auth}@{params['host']}:{params['port']}/{dbname}"


def permissions_bind(cmd: list[str]) -> list[str]:
    """``cmd`` to run so that file permissions bind: as it is, or as root (who reads any file) under
    capsh, without the capabilities that override them. Skips the test as root without capsh."""
    if os.geteuid() != 0:
        return cmd
    capsh = shutil.which("capsh")
    if capsh is None:
        pytest.skip("running as root without capsh: a file's permissions do not stop root reading it")
    return [capsh, "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shlex.join(cmd)]


@contextlib.contextmanager
def interrupted_rename(monkeypatch, at: int, lands: str = "after") -> Iterator[list]:
    """For the block, ``os.replace`` raises SystemExit(143) (a SIGTERM, which ``kocr`` turns into an exit)
    just after its ``at``-th call (``lands="after"``) or instead of it; yields the destinations of the
    calls made so far. ``os.replace`` is itself again when the block ends."""
    real = os.replace
    renames: list = []

    def replace(src, dst, *args, **kwargs):
        renames.append(dst)
        if lands == "after":
            real(src, dst, *args, **kwargs)
        if len(renames) == at:
            raise SystemExit(143)
        if lands != "after":
            real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    try:
        yield renames
    finally:
        monkeypatch.setattr(os, "replace", real)


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path_factory, monkeypatch):
    """Every test gets its own MLflow store unless it sets one; nothing touches the project's mlruns.db.

    A command run in-process (``kocr.cli.main``) points MLflow at its store with ``set_tracking_uri``,
    a process-wide setting that outlives the test: forget it first, or a later test would read the
    earlier test's store while its subprocesses write to its own.
    """
    import mlflow

    mlflow.set_tracking_uri(None)  # also unsets its variable; set_registry_uri(None) leaves MLFLOW_REGISTRY_URI
    mlflow.set_registry_uri(None)
    for key in _CALLER_MLFLOW:
        os.environ.pop(key, None)
    os.environ.update({k: v for k, v in _CALLER_MLFLOW.items() if v})  # put back what the caller of pytest set
    if "MLFLOW_TRACKING_URI" not in os.environ:
        db = tmp_path_factory.mktemp("mlflow") / "mlruns.db"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("MLFLOW_ENABLE_TELEMETRY", "false")
    monkeypatch.delenv("KOCR_PIPELINE_ID", raising=False)
    monkeypatch.delenv("KOCR_PIPELINE_GROUP", raising=False)


@pytest.fixture(scope="session", autouse=True)
def _migrated_mlflow_template(tmp_path_factory):
    """A new SQLite MLflow store opened in this process gets its tables as a copy of one migrated store.

    MLflow creates a new store's tables, then runs every alembic migration (about 5 s, 10+ s on a loaded
    2-core host), and each test has a store of its own (``_isolated_mlflow``): the suite spent minutes
    migrating. The first new store of the session is migrated by MLflow itself into a template; every
    later new, empty store in this process is given the template's pages (SQLite's backup API), which is
    what MLflow's migrations would have written. Only an empty database is filled, and only in this process:
    a store that does not exist yet still does not (tests check that), and subprocesses (``kocr`` commands,
    workers racing to create a store) migrate as MLflow does.
    """
    import sqlite3

    import mlflow.store.model_registry.sqlalchemy_store as registry_store
    import sqlalchemy
    from mlflow.store.db import utils

    real = utils._initialize_tables
    template = tmp_path_factory.mktemp("mlflow-template") / "mlruns.db"

    def initialize(engine) -> None:
        url = engine.url
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:") \
                or sqlalchemy.inspect(engine).get_table_names():
            return real(engine)
        if not template.exists():  # migrated aside, then renamed: a migration that fails leaves no half template
            partial = template.with_name("partial.db")
            partial.unlink(missing_ok=True)
            made = sqlalchemy.create_engine(f"sqlite:///{partial}")
            try:
                real(made)
            finally:
                made.dispose()
            partial.replace(template)
        source, target = sqlite3.connect(template), engine.raw_connection()
        try:
            source.backup(target.driver_connection)
        finally:
            target.close()
            source.close()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, "_initialize_tables", initialize)
        patch.setattr(registry_store, "_initialize_tables", initialize)
        yield


@pytest.fixture(scope="session", autouse=True)
def _session_set_index(tmp_path_factory):
    """The set indexes ``CropDataset`` writes (training.data.set_index) go to a folder of the session, never
    to the user's ~/.cache: also those of module- and session-scoped fixtures, which train before any test."""
    earlier = os.environ.get("KOCR_SET_INDEX_DIR")
    os.environ["KOCR_SET_INDEX_DIR"] = str(tmp_path_factory.mktemp("set-index"))
    yield
    if earlier is None:
        os.environ.pop("KOCR_SET_INDEX_DIR", None)
    else:
        os.environ["KOCR_SET_INDEX_DIR"] = earlier


@pytest.fixture(autouse=True)
def _own_set_index(tmp_path_factory, monkeypatch):
    """Every test keeps its set indexes in a folder of its own, and starts with none."""
    monkeypatch.setenv("KOCR_SET_INDEX_DIR", str(tmp_path_factory.mktemp("set-index")))


@pytest.fixture(scope="session")
def sample_pages(tmp_path_factory) -> Path:
    """Six small generated pages in AI-Hub page-JSON format."""
    from training.data.synth_pages import generate_pages

    out = tmp_path_factory.mktemp("pages")
    generate_pages(out, count=6, seed=7, fonts=FONTS, width=640, height=420, progress=False)
    return out


@pytest.fixture(scope="session")
def prepared(sample_pages, tmp_path_factory) -> Path:
    """The sample pages as LMDB crop sets (train and val only), for tests that train tiny models."""
    from training.data.prepare import PrepareConfig, prepare_pages

    out = tmp_path_factory.mktemp("prepared")
    prepare_pages(sample_pages, out, PrepareConfig.from_params({"val_fraction": 0.2, "test_fraction": 0.0}),
                  progress=False)
    return out


@pytest.fixture(scope="session")
def hangul_checkpoint(tmp_path_factory) -> Path:
    """english_g2 moved to the korean_g2 head, with the new rows perturbed so it emits Hangul.

    Untrained, so it reads nonsense, but every class of the 1,009 can win the argmax: exactly what
    checks that an export keeps the charset order and the weights intact.
    """
    base = load_recognizer("english_g2")
    model, _ = transfer_head(base, Charset.named("korean_g2"), seed=3)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        model.Prediction.bias.add_(torch.rand(model.Prediction.bias.shape, generator=generator) * 6.0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, Charset.named("korean_g2"))
    return path


def realdata(*parts: str) -> Path:
    """A file of ../shared/realdata, or skip the test with a clear message when it is absent."""
    path = REALDATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (shared/realdata is read-only input beside the repository)")
    return path


@pytest.fixture
def folder_listings(monkeypatch) -> list:
    """The folders ``training.data.sources`` lists with ``os.listdir`` (``find_file``'s listings, not
    ``Path.iterdir``'s), in order, while the test runs."""
    import os

    import training.data.sources as sources

    listed: list = []

    class CountingOs:
        def __getattr__(self, name: str):
            return getattr(os, name)

        def listdir(self, path):
            listed.append(path)
            return os.listdir(path)

    monkeypatch.setattr(sources, "os", CountingOs())
    return listed
