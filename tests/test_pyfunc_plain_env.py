"""The logged pyfunc model is self-contained: it loads and reads pages where the project is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import mlflow
import pytest

from evaluation.pyfunc_model import log_recognizer
from evaluation.reader import DetectorSettings, PageReader
from kocr.tracking import configure_tracking
from tests.conftest import REALDATA, REPO

PACKAGES = ("kocr", "training", "evaluation")
# Run with `python -S`: the venv's site-packages goes on sys.path without its .pth files, so the project's
# editable install (a .pth finder) is not there; cwd and PYTHONPATH hold no checkout either.
PLAIN = """
import importlib.util, json, sys
sys.path.append(sys.argv[1])
found = [name for name in {packages!r} if importlib.util.find_spec(name) is not None]
assert not found, f"importable here: {{found}}"
import mlflow
pages = mlflow.pyfunc.load_model(sys.argv[2]).predict(sys.argv[3:])
files = sorted({{m.__file__ for n, m in sys.modules.items() if n.split(".")[0] in {packages!r}}})
print(json.dumps({{"pages": pages, "files": files}}, ensure_ascii=False))
"""


@pytest.fixture(scope="module")
def registered(hangul_checkpoint, sample_pages, tmp_path_factory):
    """A freshly logged model registered as ``plain-env@champion`` in a throwaway store; the images to read."""
    folder = tmp_path_factory.mktemp("plain-env")
    store = f"sqlite:///{folder / 'mlruns.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", store)
    mp.chdir(folder)  # a sqlite store's default experiment keeps artifacts in ./mlruns: not the checkout's
    configure_tracking()
    with mlflow.start_run():
        info = log_recognizer(hangul_checkpoint, DetectorSettings())
    version = mlflow.register_model(info.model_uri, "plain-env").version
    mlflow.MlflowClient().set_registered_model_alias("plain-env", "champion", version)
    mp.undo()
    crop = REALDATA / "greengarnets_crops" / "0.jpg"  # a real photographed word, where shared/realdata is
    images = [str(sorted(sample_pages.glob("*.jpg"))[0])] + ([str(crop)] if crop.is_file() else [])
    return store, "models:/plain-env@champion", images


def test_a_registered_model_reads_pages_where_the_project_is_not_installed(registered, tmp_path, monkeypatch):
    """Was: ``ModuleNotFoundError: No module named 'evaluation'`` from unpickling the model, anywhere but in
    a checkout (``mlflow models serve`` from a plain environment, a deployment image)."""
    site_packages = Path(sysconfig.get_paths()["purelib"])
    if any((site_packages / name).is_dir() for name in PACKAGES):
        pytest.skip(f"the project is installed into {site_packages} (not editable): no plain environment to make")
    store, uri, images = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run([sys.executable, "-S", "-c", PLAIN.format(packages=PACKAGES), str(site_packages),
                           uri, *images],
                          capture_output=True, text=True, env=env, cwd=elsewhere, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = json.loads(done.stdout.strip().splitlines()[-1])
    # every project module it ran is the copy logged with the model
    assert plain["files"] and all("/artifacts/code/" in Path(f).as_posix() for f in plain["files"]), plain["files"]

    # where the project is installed, its own code reads (the logged copy is not put on sys.path), the same pages
    path_before = list(sys.path)
    model = mlflow.pyfunc.load_model(uri)
    assert sys.path == path_before and isinstance(model.unwrap_python_model().reader, PageReader)
    assert model.predict(images) == plain["pages"]
    assert [page["images"][0]["image.file.name"] for page in plain["pages"]] == [Path(i).name for i in images]
    assert plain["pages"][0]["annotations"]


def test_make_serve_serves_a_registered_model_without_the_venv_on_path(registered, tmp_path):
    """``mlflow models serve`` starts ``uvicorn`` by name: run as ``.venv/bin/mlflow`` without ``.venv/bin`` on
    PATH it exited with code 127. ``make serve`` puts it there, and serves the model over HTTP."""
    import shutil
    import signal
    import socket
    import time
    import urllib.error
    import urllib.request

    store, uri, images = registered
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": os.pathsep.join([str(Path(make).parent), "/bin"])}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen([make, "-C", str(REPO), "serve", f"MODEL={uri}", f"PORT={port}"], env=env,
                                  cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def post(paths: list[str]) -> tuple[int, dict]:
        request = urllib.request.Request(f"{url}/invocations", json.dumps({"inputs": paths}).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(2)
        status, answer = post(images[:1])
        assert status == 200 and answer["predictions"][0]["annotations"], answer
        status, answer = post([str(tmp_path / "gone.jpg")])
        assert status == 400 and "image not found" in answer["message"], answer
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_the_models_pip_requirements_are_the_locks_pins_of_what_its_code_imports():
    """Was: ``torch==2.13.0+cpu`` (a local version PyPI has not: ``mlflow models serve``'s virtualenv could not
    install it) and no pillow, pyyaml or torchvision, which the logged code imports or easyocr does."""
    from evaluation.pyfunc_model import _requirements

    lock = set((REPO / "requirements.lock").read_text(encoding="utf-8").lower().replace("_", "-").split())
    pins = _requirements()
    assert {pin.split("==")[0] for pin in pins} >= {"torch", "torchvision", "easyocr", "pillow", "pyyaml", "mlflow"}
    assert [pin for pin in pins if pin not in lock] == []
