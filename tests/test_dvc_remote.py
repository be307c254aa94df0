"""The project's DVC remote (``storage`` in .dvc/config, an S3 URL) against a local ``moto_server``.

A throw-away git + DVC repository takes the project's ``.dvc/config``, ``dvc add``-s a small page
folder and runs a one-stage pipeline that splits it into ``data/prepared/{train,val,test}``. It is
pushed with the real ``dvc`` CLI, the endpoint and the keys given by environment only; a fresh
clone (no cache, no outputs, the shared-cache settings of docs/data.md) pulls one split, then
everything, and finds nothing to reproduce.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.conftest import REPO

boto3 = pytest.importorskip("boto3", reason="boto3 is not installed (make install)")

BIN = Path(sys.executable).parent
DVC, MOTO = BIN / "dvc", BIN / "moto_server"
KEYS = {"AWS_ACCESS_KEY_ID": "kocr-test-key", "AWS_SECRET_ACCESS_KEY": "kocr-test-secret-9f3a"}
SECRET_WORDS = ("access_key_id", "secret_access_key", "session_token", "password", "credentialpath",
                KEYS["AWS_ACCESS_KEY_ID"], KEYS["AWS_SECRET_ACCESS_KEY"])

SPLIT_SCRIPT = '''\
import json, pathlib, sys
src, out = pathlib.Path("data/aihub"), pathlib.Path("data/prepared")
pages = sorted(p.name for p in src.glob("*.json"))
splits = {"train": pages[:-2], "val": pages[-2:-1], "test": pages[-1:]}
for split, names in splits.items():
    (out / split).mkdir(parents=True, exist_ok=True)
    for name in names:
        (out / split / name).write_bytes((src / name).read_bytes())
(out / "splits.json").write_text(json.dumps(splits))
'''

PIPELINE = """\
stages:
  prepare:
    cmd: python split.py
    deps: [data/aihub, split.py]
    outs: [data/prepared]
"""
# a second pipeline never run, as recipes/ko-base/dvc.yaml: no dvc.lock, so its outputs have no hash
RECIPE = """\
stages:
  synth:
    cmd: mkdir -p data && echo made > data/set.txt
    outs: [data]
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """A moto S3 endpoint on a free port, stopped after the module."""
    if not MOTO.exists() or not DVC.exists():
        pytest.skip(f"{MOTO} or {DVC} not found: moto[server] and dvc[s3] are installed by make install")
    url = f"http://127.0.0.1:{_free_port()}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", url.rsplit(":", 1)[1]], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"moto_server exited:\n{log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, f"moto_server did not answer:\n{log.read_text()[-2000:]}"
                time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any AWS settings of the machine, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1",
               DVC_SITE_CACHE_DIR=str(tmp / "site-cache"), AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(tmp / "no-aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-credentials"),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com")
    env.update(extra)
    return env


def _run(args: list, cwd: Path, env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if ok:
        assert done.returncode == 0, f"{args} failed in {cwd}:\n{done.stdout}\n{done.stderr}"
    return done


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _origin(tmp: Path, env: dict[str, str], pipeline: bool = True) -> Path:
    """A git + DVC repository with the project's .dvc/config, a dvc-added page folder and one stage."""
    repo = tmp / "origin"
    (repo / "data" / "aihub").mkdir(parents=True)
    _run(["git", "init", "-q"], repo, env)
    _run([DVC, "init", "-q"], repo, env)
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    for i in range(5):
        (repo / "data" / "aihub" / f"page_{i}.json").write_text(f'{{"annotations": [{{"id": {i}}}]}}')
    _run([DVC, "add", "-q", "data/aihub"], repo, env)
    if not pipeline:
        return repo
    (repo / "split.py").write_text(SPLIT_SCRIPT)
    (repo / "dvc.yaml").write_text(PIPELINE)
    (repo / "recipe").mkdir()
    (repo / "recipe" / "dvc.yaml").write_text(RECIPE)
    _run([DVC, "repro", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "data and pipeline"], repo, env)
    return repo


def test_project_remote_config_carries_no_credentials():
    config = (REPO / ".dvc" / "config").read_text(encoding="utf-8")
    assert "['remote \"storage\"']" in config and "remote = storage" in config
    assert "url = s3://" in config
    for word in SECRET_WORDS[:5]:
        assert word not in config.lower(), word
    assert "/config.local" in (REPO / ".dvc" / ".gitignore").read_text().split()


def test_push_then_pull_one_split_then_all_into_a_fresh_clone(tmp_path, endpoint):
    env = _env(tmp_path, AWS_ENDPOINT_URL_S3=endpoint, AWS_DEFAULT_REGION="us-east-1", **KEYS)
    url = _run([DVC, "config", "remote.storage.url"], REPO, env).stdout.strip()
    bucket, prefix = urlparse(url).netloc, urlparse(url).path.strip("/")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=bucket)

    origin = _origin(tmp_path, env)
    _run([DVC, "push"], origin, env)
    cached = {p.relative_to(origin / ".dvc" / "cache").as_posix()  # runs/ (the run cache) stays local
              for p in (origin / ".dvc" / "cache" / "files").rglob("*") if p.is_file()}
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    assert {obj["Key"][len(prefix) + 1:] for obj in listed.get("Contents", [])} == cached
    assert len(cached) == 5 + 2 + 1  # 5 pages (shared by both folders), splits.json, two .dir manifests
    for path in (origin / ".dvc" / "config", origin / "dvc.lock", origin / "data" / "aihub.dvc"):
        text = path.read_text(encoding="utf-8").lower()
        assert not any(word.lower() in text for word in SECRET_WORDS), path

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    assert not (clone / "data" / "prepared").exists() and not (clone / ".dvc" / "cache").exists()
    shared = tmp_path / "shared-cache"
    _run([DVC, "cache", "dir", "--local", shared], clone, env)
    _run([DVC, "config", "--local", "cache.shared", "group"], clone, env)
    _run([DVC, "config", "--local", "cache.type", "reflink,hardlink,symlink,copy"], clone, env)

    _run([DVC, "pull", "data/prepared/val"], clone, env)
    assert set(_files(clone / "data" / "prepared")) == {"val/page_3.json"}
    assert not (clone / "data" / "aihub").exists()

    # the commands docs/data.md gives: a plain pull or status also takes in the never-run recipe
    docs = (REPO / "docs" / "data.md").read_text(encoding="utf-8")
    assert "dvc pull --with-deps dvc.yaml" in docs and "`dvc status dvc.yaml` reports" in docs
    plain = _run([DVC, "pull"], clone, env, ok=False)
    assert plain.returncode == 1 and "Checkout failed for following targets:\nrecipe/data" in plain.stderr, plain
    assert "recipe/dvc.yaml:synth" in _run([DVC, "status"], clone, env).stdout
    for folder in ("data/aihub", "data/prepared"):  # what the plain pull linked before it failed
        shutil.rmtree(clone / folder)
    _run([DVC, "pull", "--with-deps", "dvc.yaml"], clone, env)
    for folder in ("data/aihub", "data/prepared"):
        assert _files(clone / folder) == _files(origin / folder), folder
    page = clone / "data" / "prepared" / "train" / "page_0.json"
    assert page.stat().st_nlink >= 2 or page.is_symlink()  # linked from the cache, not copied
    assert (shared / "files").stat().st_mode & 0o2070 == 0o2070  # group-writable, setgid: a shared cache

    status = _run([DVC, "status", "dvc.yaml"], clone, env).stdout
    assert "Data and pipelines are up to date." in status, status
    repro = _run([DVC, "repro"], clone, env).stdout
    assert "Running stage" not in repro and "Stage 'prepare' didn't change, skipping" in repro, repro
    assert "Cache and remote 'storage' are in sync." in _run([DVC, "status", "-c"], clone, env).stdout


def test_without_keys_in_the_environment_the_remote_refuses(tmp_path, endpoint):
    env = _env(tmp_path, AWS_ENDPOINT_URL_S3=endpoint, AWS_DEFAULT_REGION="us-east-1")
    origin = _origin(tmp_path, env, pipeline=False)
    done = _run([DVC, "push"], origin, env, ok=False)
    assert done.returncode != 0 and "Unable to locate credentials" in done.stdout + done.stderr


def test_the_retrain_pull_stops_naming_the_remote_when_the_data_version_was_never_pushed(tmp_path, endpoint):
    """A `dvc add` committed without `dvc push`: the retrain workflow's `dvc pull --allow-missing` passed it with
    a warning ("Everything is up to date.", exit 0) and `dvc repro` then stopped on "missing data 'source':
    data/aihub". Its step now fails on the missing data version, naming the remote; once pushed, it passes."""
    import yaml

    env = _env(tmp_path, AWS_ENDPOINT_URL_S3=endpoint, AWS_DEFAULT_REGION="us-east-1", **KEYS)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"])
    url = _run([DVC, "config", "remote.storage.url"], REPO, env).stdout.strip()
    bucket = urlparse(url).netloc
    if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=bucket)
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "retrain.yml").read_text(encoding="utf-8"))
    [pull] = [step["run"] for step in workflow["jobs"]["retrain"]["steps"] if step.get("name") == "dvc pull"]

    origin = _origin(tmp_path, env, pipeline=False)
    (origin / "data" / "aihub" / "page_9.json").write_text('{"annotations": [{"id": 9}]}')  # a version of its own
    _run([DVC, "add", "-q", "data/aihub"], origin, env)
    _run(["git", "add", "-A"], origin, env)
    _run(["git", "commit", "-qm", "new data, not pushed"], origin, env)
    clone = tmp_path / "runner"
    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    done = _run(["bash", "-eo", "pipefail", "-c", pull], clone, env, ok=False)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("::error::")]
    assert done.returncode == 1 and errors == [
        f"::error::not on the DVC remote 'storage' ({url}): the data of data/aihub.dvc (dvc push it from the "
        "machine that ran dvc add; docs/gpu-server.md, section 3)"], done.stdout + done.stderr

    _run([DVC, "push"], origin, env)
    _run(["bash", "-eo", "pipefail", "-c", pull], clone, env)
    assert _files(clone / "data" / "aihub") == _files(origin / "data" / "aihub")


def _pull_step() -> str:
    """The retrain workflow's `dvc pull` step, as the runner's bash runs it."""
    import yaml

    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "retrain.yml").read_text(encoding="utf-8"))
    [pull] = [step["run"] for step in workflow["jobs"]["retrain"]["steps"] if step.get("name") == "dvc pull"]
    return pull


def test_the_retrain_pull_takes_a_pushed_data_version_whose_name_is_korean_or_has_a_space(tmp_path, endpoint):
    """git ls-files quotes a path with non-ASCII bytes ("data/\\355\\225\\234….dvc"), so the step's strict pull
    was given a name that is no file and said the pushed data of "data/\\355…" was not on the remote. The
    names now come NUL-separated, as git has them; a pull that fails for another reason shows DVC's output."""
    env = _env(tmp_path, AWS_ENDPOINT_URL_S3=endpoint, AWS_DEFAULT_REGION="us-east-1", **KEYS)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"])
    bucket = urlparse(_run([DVC, "config", "remote.storage.url"], REPO, env).stdout.strip()).netloc
    if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=bucket)
    origin = _origin(tmp_path, env, pipeline=False)
    for name in ("한글 페이지", "scan set"):
        (origin / "data" / name).mkdir()
        (origin / "data" / name / "p.json").write_text(f'{{"name": "{name}"}}', encoding="utf-8")
        _run([DVC, "add", "-q", f"data/{name}"], origin, env)
    _run(["git", "add", "-A"], origin, env)
    _run(["git", "commit", "-qm", "named data"], origin, env)
    _run([DVC, "push"], origin, env)
    clone = tmp_path / "runner"
    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    done = _run(["bash", "-eo", "pipefail", "-c", _pull_step()], clone, env, ok=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("한글 페이지", "scan set", "aihub"):
        assert _files(clone / "data" / name) == _files(origin / "data" / name), name

    # the strict pulls after the first fetch nothing again (the data are in the cache): a pull now says so
    again = _run([DVC, "pull", "data/한글 페이지.dvc"], clone, env)
    assert "fetched" not in again.stdout + again.stderr and "up to date" in again.stdout, again.stdout
