"""Registry promotion: challenger always, champion only on merit on the same evaluation set."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from evaluation.promote import Candidate, PromoteConfig, promote
from evaluation.pyfunc_model import log_recognizer
from evaluation.reader import DetectorSettings
from kocr.tracking import configure_tracking
from tests.conftest import postgres_params, postgres_url


@pytest.fixture(scope="module")
def logged_uris(hangul_checkpoint, tmp_path_factory):
    """Three logged recogniser models in one throwaway store (module-scoped: logging takes seconds)."""
    db = tmp_path_factory.mktemp("registry") / "mlruns.db"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    mp.chdir(db.parent)  # a sqlite store's default experiment keeps artifacts in ./mlruns: not the checkout's
    configure_tracking()
    uris = []
    for _ in range(3):
        with mlflow.start_run() as run:
            uris.append((log_recognizer(hangul_checkpoint, DetectorSettings()).model_uri, run.info.run_id))
    yield f"sqlite:///{db}", uris
    mp.undo()


def _candidate(uri_run, score, data_hash="set-a"):
    return Candidate(uri_run[0], uri_run[1], score, data_hash)


def _no_rescore(uri):
    raise AssertionError(f"champion {uri} should not be re-scored on the same set")


def test_champion_moves_only_when_beaten_and_rescored_on_a_new_set(logged_uris, monkeypatch):
    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    name = "reg-test"
    config = PromoteConfig(model_name=name, min_delta=0.05)
    client = mlflow.MlflowClient()

    first = promote(_candidate(uris[0], 0.40), config, _no_rescore)
    assert first["promoted"] and first["reason"] == "no champion before it: the first champion"

    # 0.44 beats 0.40 but not by min_delta 0.05: champion stays, challenger moves
    second = promote(_candidate(uris[1], 0.44), config, _no_rescore)
    assert not second["promoted"] and second["champion_e2e_f1"] == pytest.approx(0.40)
    assert int(client.get_model_version_by_alias(name, "champion").version) == first["candidate_version"]
    assert int(client.get_model_version_by_alias(name, "challenger").version) == second["candidate_version"]
    version = client.get_model_version(name, second["candidate_version"])
    assert version.tags["decision"] == "not promoted" and version.tags["eval_data_hash"] == "set-a"

    # on another evaluation set the champion's recorded score is not comparable: it is re-scored
    asked = []

    def rescore(uri):
        asked.append(uri)
        return 0.30

    third = promote(_candidate(uris[2], 0.36, data_hash="set-b"), config, rescore)
    assert asked == [f"models:/{name}/{first['candidate_version']}"]
    assert third["promoted"] and third["champion_e2e_f1"] == pytest.approx(0.30)
    assert int(client.get_model_version_by_alias(name, "champion").version) == third["candidate_version"]


def test_a_champion_scored_another_way_is_rescored_on_the_same_set(logged_uris, monkeypatch):
    from evaluation.evaluate import scoring_hash

    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    config = PromoteConfig(model_name="reg-scoring")
    word_boxes = scoring_hash(DetectorSettings(width_ths=0.0), 0.5)
    assert word_boxes == scoring_hash(DetectorSettings(width_ths=0.0), 0.5)
    assert len({word_boxes, scoring_hash(DetectorSettings(), 0.5), scoring_hash(DetectorSettings(width_ths=0.0), 0.7)}) == 3
    # the champion came from before scorings were recorded (no tag): its 0.90 was another scorer's
    first = promote(_candidate(uris[0], 0.90), config, _no_rescore)
    asked = []

    def rescore(uri):
        asked.append(uri)
        return 0.50

    second = promote(Candidate(uris[1][0], uris[1][1], 0.60, "set-a", word_boxes), config, rescore)
    assert asked == [f"models:/reg-scoring/{first['candidate_version']}"] and second["promoted"]
    assert "scored another way" in second["reason"]
    # the same set scored the same way: the recorded score stands, no re-scoring
    third = promote(Candidate(uris[2][0], uris[2][1], 0.55, "set-a", word_boxes), config, _no_rescore)
    assert not third["promoted"] and third["champion_e2e_f1"] == pytest.approx(0.60)
    # other box grouping (EasyOCR's default width_ths) on the same set: re-scored again
    fourth = promote(Candidate(uris[0][0], uris[0][1], 0.65, "set-a", scoring_hash(DetectorSettings(), 0.5)),
                     config, rescore)
    assert len(asked) == 2 and fourth["promoted"]


def test_a_champion_rescored_on_a_set_is_not_rescored_again_there(logged_uris, monkeypatch):
    """Was: every promote on a set the champion had not been scored on re-scored it again (minutes of
    CRAFT + recognition each); its re-score is now kept on its version for that set and scoring."""
    import json

    import evaluation.promote

    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    client = mlflow.MlflowClient()
    config = PromoteConfig(model_name="reg-rescored", min_delta=0.5)  # no candidate beats the first champion
    champion = promote(_candidate(uris[0], 0.40, "set-a"), config, _no_rescore)["candidate_version"]
    asked = []

    def rescore(uri):
        asked.append(uri)
        return 0.30

    def candidate(data_hash, scoring_hash, score=0.35):
        return Candidate(uris[1][0], uris[1][1], score, data_hash, scoring_hash)

    second = promote(candidate("set-b", "way-1"), config, rescore)
    assert asked == [f"models:/reg-rescored/{champion}"] and second["champion_e2e_f1"] == pytest.approx(0.30)
    # the same set scored the same way: the score kept on the champion's version, not a second re-score
    third = promote(candidate("set-b", "way-1", 0.36), config, _no_rescore)
    assert not third["promoted"] and third["champion_e2e_f1"] == pytest.approx(0.30)
    assert "re-scored on this set by an earlier promote" in third["reason"]
    rescore_tag = evaluation.promote.rescore_tag
    tag = client.get_model_version("reg-rescored", champion).tags[rescore_tag("e2e_f1", "set-b", "way-1")]
    assert json.loads(tag) == {"e2e_f1": 0.30, "eval_data_hash": "set-b", "eval_scoring_hash": "way-1"}
    # another set, the same set scored another way, another metric: each is re-scored (once)
    promote(candidate("set-c", "way-1"), config, rescore)
    promote(candidate("set-b", "way-2"), config, rescore)
    promote(candidate("set-c", "way-1"), config, _no_rescore)
    assert len(asked) == 3
    promote(candidate("set-b", "way-1"), PromoteConfig(model_name="reg-rescored", metric="cer", min_delta=0.5),
            rescore)
    assert len(asked) == 4
    # a kept score whose value names another set or scoring (edited by hand, or garbled) is not trusted
    for stale in (json.dumps({"e2e_f1": 0.99, "eval_data_hash": "set-x", "eval_scoring_hash": "way-1"}),
                  json.dumps({"e2e_f1": 0.99, "eval_data_hash": "set-d", "eval_scoring_hash": "way-0"}),
                  "0.99", "{not json"):
        client.set_model_version_tag("reg-rescored", champion, rescore_tag("e2e_f1", "set-d", "way-1"), stale)
        decision = promote(candidate("set-d", "way-1"), config, rescore)
        assert decision["champion_e2e_f1"] == pytest.approx(0.30), stale
    assert len(asked) == 8


def test_logged_model_reads_pages_from_its_uri(logged_uris, sample_pages, monkeypatch):
    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    image = sorted(sample_pages.glob("*.jpg"))[0]
    pages = mlflow.pyfunc.load_model(uris[0][0]).predict([str(image)])
    assert len(pages) == 1
    page = pages[0]
    assert page["images"][0]["image.file.name"] == image.name
    assert page["annotations"] and all(len(a["annotation.bbox"]) == 4 for a in page["annotations"])


def test_the_logged_model_refuses_what_it_cannot_read_with_a_message_serving_passes_on(
        logged_uris, sample_pages, monkeypatch, tmp_path):
    import base64

    from mlflow.exceptions import MlflowException

    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    model = mlflow.pyfunc.load_model(uris[0][0])
    image = sorted(sample_pages.glob("*.jpg"))[0]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    small = _small_image_bytes(image)  # a word-sized image: its base64 is short enough to be a path
    assert len(base64.b64encode(small["PNG"])) < 4096
    cases = {str(tmp_path / "nope.png"): "image not found", str(tmp_path / "broken.png"): "not a readable image",
             "https://example.com/scan.jpg": "a URL; the model reads image files on its own machine",
             base64.b64encode(image.read_bytes()).decode(): "not a path (image bytes, as base64?)",
             # these were "<the whole base64>: image not found"
             base64.b64encode(small["PNG"]).decode(): "not a path (image bytes, as base64?)",
             base64.urlsafe_b64encode(small["JPEG"]).decode(): "not a path (image bytes, as base64?)",
             "data:image/png;base64," + base64.b64encode(small["PNG"]).decode(): "a data: URI (image bytes)",
             # a missing file whose name begins as base64 of BMP bytes ("Qk2" decodes to "BM"): was "not a path"
             "Qk2024scans/contract_0001_page0001.png": "image not found",  # in tmp_path, the working folder below
             "": "an empty string"}  # was ": is a folder, not an image" (the current folder)
    monkeypatch.chdir(tmp_path)
    for given, why in cases.items():
        # mlflow models serve answers an MlflowException with its message, anything else with a generic
        # "unexpected error" (these were FileNotFoundError, UnreadableImage and OSError "File name too long")
        with pytest.raises(MlflowException) as info:
            model.predict([str(image), given])
        assert info.value.error_code == "INVALID_PARAMETER_VALUE" and why in info.value.message
        assert len(info.value.message) < 400


def test_a_batch_is_checked_whole_before_its_first_page_is_read(logged_uris, sample_pages, monkeypatch, tmp_path):
    """Was: a missing last image failed only when reading reached it, after the pages before it were
    read (detected and recognised) and thrown away."""
    from mlflow.exceptions import MlflowException

    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    model = mlflow.pyfunc.load_model(uris[0][0])
    reader = model.unwrap_python_model().reader
    read: list = []
    real_read = reader.read
    monkeypatch.setattr(reader, "read", lambda path: read.append(path) or real_read(path))
    image = str(sorted(sample_pages.glob("*.jpg"))[0])
    (tmp_path / "folder.jpg").mkdir()
    for bad, why in ((tmp_path / "nope.png", "image not found"), (tmp_path / "folder.jpg", "is a folder, not an image")):
        with pytest.raises(MlflowException) as info:
            model.predict([image, image, str(bad)])
        assert info.value.error_code == "INVALID_PARAMETER_VALUE"
        assert info.value.message == f"{bad}: {why}"  # the one line reading it gave
        assert read == []
    assert len(model.predict([image])) == 1 and read == [image]  # the spy sees real reads


def test_an_image_that_cannot_be_opened_is_named_alike_checked_up_front_or_read(tmp_path):
    import subprocess
    import sys

    from tests.conftest import permissions_bind

    image = tmp_path / "locked.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    image.chmod(0)
    script = ("import sys\n"
              "from evaluation.reader import check_image_file, load_image\n"
              "for check in (check_image_file, load_image):\n"
              "    try:\n"
              "        check(sys.argv[1])\n"
              "    except Exception as exc:\n"
              "        print(type(exc).__name__, exc)\n")
    try:
        done = subprocess.run(permissions_bind([sys.executable, "-c", script, str(image)]), capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parents[1])
    finally:
        image.chmod(0o644)
    # load_image said "not a readable image (corrupt: [Errno 13] Permission denied: '…')"
    assert done.stdout.splitlines() == [f"UnreadableImage {image}: cannot be read (Permission denied)"] * 2, done.stderr


def _small_image_bytes(image: Path) -> dict[str, bytes]:
    """A 48x24 cut of ``image`` encoded in each format the model reads (what a client might send as base64)."""
    import io

    from PIL import Image

    cut = Image.open(image).convert("RGB").crop((0, 0, 48, 24))
    encoded = {}
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
        buffer = io.BytesIO()
        cut.save(buffer, fmt)
        encoded[fmt] = buffer.getvalue()
    return encoded


def test_image_bytes_sent_as_base64_are_told_from_paths_whatever_their_size(sample_pages, tmp_path, monkeypatch):
    import base64

    from evaluation.pyfunc_model import not_a_path

    for fmt, data in _small_image_bytes(sorted(sample_pages.glob("*.jpg"))[0]).items():
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            assert not_a_path(encode(data).decode()).startswith("not a path (image bytes, as base64?)"), fmt
    for path in ("scans/page 1.jpg", "/data/스캔 2024/0001.png", "Qk1-report.jpg", "abcdefghijklmnopqrstuvwxyz.png"):
        assert not_a_path(path) == "", path
    # a file whose name happens to read as base64 image bytes is still a path
    named = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(16)).decode().rstrip("=")
    monkeypatch.chdir(tmp_path)
    assert not_a_path(named).startswith("no such file, and not base64 of an image")
    (tmp_path / named).write_bytes(b"")
    assert not_a_path(named) == ""


def test_a_missing_file_whose_name_begins_as_image_bytes_in_base64_is_a_path(tmp_path, monkeypatch):
    """Was "not a path (image bytes, as base64?)": only the name's first 32 characters were decoded, and
    ``Qk2``/``Qk3`` decode to BMP's ``BM``, ``/9j/`` to JPEG's start; the rest of the name (a dot, an
    extension) is no base64, so it is a path, and the model then says the file is not there."""
    from evaluation.pyfunc_model import not_a_path

    monkeypatch.chdir(tmp_path)
    for name in ("Qk2024scans/contract_0001_page0001.png", "Qk3_scan_of_the_signed_contract_2024.jpg",
                 "/9j/scans/2024/batch_0001/page_0001.jpg", "R0lGODlhscans/2019/letters/scan_0003.gif"):
        assert not Path(name).exists()
        assert not_a_path(name) == "", name


def test_a_missing_file_whose_whole_name_is_base64_beginning_as_an_image_is_named_both_ways(tmp_path, monkeypatch):
    """Was "not a path (image bytes, as base64?)" for a file name that is base64 throughout and whose first
    bytes are an image's (``Qk2`` decodes to BMP's ``BM``): a client that sent the path of a missing file
    was told it had sent image bytes. The bytes do not open as an image, so the answer names both readings;
    image bytes that open are still told apart."""
    from mlflow.exceptions import MlflowException

    from evaluation.pyfunc_model import PageReaderModel, not_a_path

    monkeypatch.chdir(tmp_path)
    both = "no such file, and not base64 of an image (its first bytes are an image's, but it does not open as one)"
    for name in ("Qk2024scans/contract_0001_page", "R0lGODlhscans_2019_letters_0003",
                 "/9j/scans/2024/batch_0001/page_0001", "iVBORw0KGgo_scans_2024_page_0001"):
        assert not_a_path(name).startswith(both), name
        with pytest.raises(MlflowException) as raised:
            PageReaderModel().predict(None, [name])  # refused before any page is read: no reader needed
        assert raised.value.message.startswith(f"{name!r}: {both}"), raised.value.message
    one_pixel = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGP4DwABAQEAG7buVgAAAABJRU5ErkJggg=="
    assert not_a_path(one_pixel).startswith("not a path (image bytes, as base64?)")
    assert not_a_path(one_pixel.rstrip("=")).startswith("not a path (image bytes, as base64?)")  # unpadded too


RACER = """
import json, sys, time
from evaluation.promote import Candidate, PromoteConfig, promote
from kocr.tracking import configure_tracking

configure_tracking()
uri, run_id = sys.argv[1], sys.argv[2]

def slow_rescore(champion_uri):  # re-scoring a champion takes a while: the window two racers share
    time.sleep(3)
    return 0.40

decision = promote(Candidate(uri, run_id, 0.60, "set-new"), PromoteConfig(model_name="race"), slow_rescore)
print(json.dumps(decision))
"""


def test_two_racing_promotions_cannot_both_win(logged_uris, monkeypatch, tmp_path):
    import json
    import os
    import subprocess
    import sys

    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    first = promote(_candidate(uris[0], 0.40, data_hash="set-old"), PromoteConfig(model_name="race"), _no_rescore)
    assert first["promoted"]
    script = tmp_path / "racer.py"
    script.write_text(RACER, encoding="utf-8")
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    racers = [subprocess.Popen([sys.executable, str(script), *uris[i]], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    decisions = []
    for racer in racers:
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err[-2000:]
        decisions.append(json.loads(out.strip().splitlines()[-1]))
    # both beat the old champion (0.60 vs 0.40 re-scored), but only the first to decide may win;
    # the second then finds a champion scored 0.60 on the same set and does not beat it
    assert sorted(d["promoted"] for d in decisions) == [False, True]
    winner = next(d for d in decisions if d["promoted"])
    client = mlflow.MlflowClient()
    assert int(client.get_model_version_by_alias("race", "champion").version) == winner["candidate_version"]


@pytest.mark.parametrize("given", ["argument", "environment", "postgres-scheme"])
def test_postgres_advisory_lock_excludes_a_second_holder(given, monkeypatch):
    """The lock URL as promote.lock_url, or from KOCR_PROMOTE_LOCK_URL while tracking goes to an HTTP server."""
    import threading
    import time

    from evaluation.promote import LOCK_URL_ENV, promotion_lock

    url = postgres_url(postgres_params(), "postgres")
    events = []
    if given == "environment":  # written the natural way: SQLAlchemy 2.1 maps postgresql:// to psycopg 3
        monkeypatch.setenv(LOCK_URL_ENV, url.replace("postgresql+psycopg2://", "postgresql://"))
        monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://127.0.0.1:5000")
    if given == "postgres-scheme":  # Heroku's and many tools' spelling: was taken for no lock at all (a warning)
        monkeypatch.setenv(LOCK_URL_ENV, url.replace("postgresql+psycopg2://", "postgres://"))
        monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://127.0.0.1:5000")
    argument = url if given == "argument" else ""

    def holder(name: str, hold: float) -> None:
        with promotion_lock("pg-lock-test", argument):
            events.append((name, "in", time.monotonic()))
            time.sleep(hold)
            events.append((name, "out", time.monotonic()))

    first = threading.Thread(target=holder, args=("a", 1.5))
    first.start()
    time.sleep(0.5)
    second = threading.Thread(target=holder, args=("b", 0.0))
    second.start()
    first.join()
    second.join()
    order = [(n, e) for n, e, _ in events]
    assert order == [("a", "in"), ("a", "out"), ("b", "in"), ("b", "out")]


def test_a_lock_url_that_is_no_database_is_refused_not_ignored(monkeypatch):
    from evaluation.promote import LOCK_URL_ENV, promotion_lock
    from kocr.locks import LockError

    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://127.0.0.1:5000")
    monkeypatch.setenv(LOCK_URL_ENV, "mysql://kim:s3cret@db/locks")
    with pytest.raises(LockError, match=r"KOCR_PROMOTE_LOCK_URL mysql://kim:\*\*\*@db/locks: not a PostgreSQL"):
        with promotion_lock("m"):
            pass
    assert PromoteConfig.logged({"lock_url": "postgresql://kim:s3cret@db/x", "metric": "e2e_f1"}) == {
        "lock_url": "postgresql://kim:***@db/x", "metric": "e2e_f1"}  # was logged as it was, password and all


def test_a_lower_is_better_metric_promotes_the_lower_and_an_unknown_one_is_refused(logged_uris, monkeypatch):
    from kocr.params import ParamsError

    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    config = PromoteConfig(model_name="reg-cer", metric="cer")
    promote(_candidate(uris[0], 0.05), config, _no_rescore)
    worse = promote(_candidate(uris[1], 0.50), config, _no_rescore)
    assert not worse["promoted"] and "does not beat" in worse["reason"]  # was promoted: 0.50 - 0.05 > 0
    better = promote(_candidate(uris[2], 0.03), config, _no_rescore)
    assert better["promoted"]
    for typo in ("e2e_F1", "pages"):  # a misspelling, and a count that is no score
        with pytest.raises(ParamsError, match=f"promote.metric: '{typo}' is not a score"):
            PromoteConfig(metric=typo)


def test_a_lock_that_cannot_be_had_changes_nothing_in_the_registry(logged_uris, monkeypatch):
    from kocr.locks import LockError

    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    client = mlflow.MlflowClient()
    promote(_candidate(uris[0], 0.40), PromoteConfig(model_name="reg-locked"), _no_rescore)
    config = PromoteConfig(model_name="reg-locked", lock_url="postgresql://kocr_lock:s3cret@127.0.0.1:1/none")
    with pytest.raises(LockError) as info:
        promote(_candidate(uris[1], 0.90), config, _no_rescore)
    message = str(info.value)
    assert message.startswith("lock database postgresql+psycopg2://kocr_lock:***@127.0.0.1:1/none: ")
    assert "s3cret" not in message and len(message.splitlines()) == 1
    # before, the candidate was registered and made challenger before the lock failed: an orphan version
    assert [str(v.version) for v in client.search_model_versions("name='reg-locked'")] == ["1"]
    assert str(client.get_model_version_by_alias("reg-locked", "challenger").version) == "1"


def test_a_margin_of_exactly_min_delta_promotes_and_a_registry_error_is_not_no_champion(logged_uris, monkeypatch):
    from mlflow.exceptions import MlflowException

    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    config = PromoteConfig(model_name="reg-delta", min_delta=0.01)
    promote(_candidate(uris[0], 0.56), config, _no_rescore)
    decision = promote(_candidate(uris[1], 0.57), config, _no_rescore)  # 0.57 - 0.56 == 0.009999999999999898
    assert decision["promoted"], decision["reason"]

    def server_error(self, name, alias):
        raise MlflowException("internal error", error_code="INTERNAL_ERROR")

    monkeypatch.setattr(mlflow.MlflowClient, "get_model_version_by_alias", server_error)
    with pytest.raises(MlflowException, match="internal error"):  # was taken as "no champion yet": promoted
        promote(_candidate(uris[2], 0.10), config, _no_rescore)


def test_a_checkpoint_logged_under_another_name_loads_back_and_leaves_no_download_behind(
        hangul_checkpoint, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO

    renamed = tmp_path / "ko_base.pt"
    shutil.copyfile(hangul_checkpoint, renamed)
    script = (
        "import mlflow, sys\n"
        "from evaluation.pyfunc_model import log_recognizer\n"
        "from evaluation.reader import DetectorSettings\n"
        "from kocr.tracking import configure_tracking\n"
        "from training.checkpoint import load_recognizer\n"
        "configure_tracking()\n"
        "with mlflow.start_run() as run:\n"
        "    log_recognizer(sys.argv[1], DetectorSettings())\n"
        "loaded = load_recognizer(f'runs:/{run.info.run_id}/recognizer')\n"
        "print(loaded.path)\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script, str(renamed)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    downloaded = Path(done.stdout.strip().splitlines()[-1])
    assert downloaded.name == "model.pt"  # was "holds no model.pt": only kocr train named it so
    assert not downloaded.exists()  # the 16 MB copy went with the process (it used to stay in /tmp)
    # run outside a project, a models:/ spec names what is missing and creates no empty store
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env.pop("MLFLOW_TRACKING_URI")
    done = subprocess.run([sys.executable, "-m", "kocr.cli", "predict", str(tmp_path / "p.jpg"), "--model",
                           "models:/ko-ocr-recognizer@champion"], capture_output=True, text=True, env=env,
                          cwd=outside, timeout=300)
    assert done.returncode == 2 and "no MLflow store here" in done.stderr and "Traceback" not in done.stderr
    assert not (outside / "mlruns.db").exists()


def test_a_version_logged_by_an_older_kocr_under_its_own_file_name_loads(hangul_checkpoint, tmp_path, monkeypatch):
    """Before log_recognizer renamed the checkpoint to model.pt on logging, it logged the file as it was named
    (``ko_base.pt``): such a registered version reads pages through its pyfunc, and loads as a checkpoint
    (evaluate's champion, promote's re-scoring, export) from the artifact its MLmodel names; it was
    refused as 'its files were deleted from the store'."""
    import shutil

    from evaluation.pyfunc_model import ARTIFACT_NAME, PageReaderModel, _requirements
    from training.checkpoint import load_recognizer

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    configure_tracking()
    renamed = tmp_path / "ko_base.pt"
    shutil.copyfile(hangul_checkpoint, renamed)
    with mlflow.start_run():  # log_recognizer as it was: the file under its own name
        info = mlflow.pyfunc.log_model(name=ARTIFACT_NAME, python_model=PageReaderModel(),
                                       artifacts={"checkpoint": str(renamed)},
                                       model_config=DetectorSettings().readtext_kwargs(),
                                       pip_requirements=_requirements())
    version = mlflow.register_model(info.model_uri, "old-versions").version
    loaded = load_recognizer(f"models:/old-versions/{version}")
    assert Path(loaded.path).name == "ko_base.pt" and loaded.charset.name == "korean_g2"


def test_kocr_predict_reads_a_logged_model_through_its_pyfunc(logged_uris, sample_pages, tmp_path, monkeypatch,
                                                             capsys):
    import json
    import os
    import subprocess
    import sys

    from kocr.cli import main

    store, uris = logged_uris
    image = sorted(sample_pages.glob("*.jpg"))[0]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    done = subprocess.run([sys.executable, "-m", "kocr.cli", "predict", str(image), "--model", uris[0][0]],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    via_cli = json.loads(done.stdout.strip().splitlines()[-1])
    assert via_cli["annotations"]
    mlflow.set_tracking_uri(store)
    assert mlflow.pyfunc.load_model(uris[0][0]).predict([str(image)])[0] == via_cli
    # the real entry point read it above; a missing page beside a good one, through main() in this process
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = main(["predict", str(tmp_path / "gone.jpg"), str(image), "--model", uris[0][0]])
    captured = capsys.readouterr()
    assert code == 2 and f"{tmp_path / 'gone.jpg'}: image not found" in captured.err
    assert [json.loads(line) for line in captured.out.strip().splitlines()] == [via_cli]  # the good page still read


def test_a_registered_version_says_what_it_is_and_the_promote_run_names_it(logged_uris, monkeypatch, tmp_path):
    """Was: registry versions had no description, and the promote run did not name the version it made."""
    import json

    from kocr.cli import main

    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    client = mlflow.MlflowClient()
    client.set_tag(uris[2][1], "kocr.data.train", "md5-trainset")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("promote: {model_name: described}\n", encoding="utf-8")
    (tmp_path / "cand").mkdir()
    (tmp_path / "cand/mlflow.json").write_text(json.dumps({"model_uri": uris[2][0], "run_id": uris[2][1]}))
    (tmp_path / "eval.json").write_text(json.dumps({"candidate": {"e2e_f1": 0.61234}, "eval_data_hash": "evalset"}))
    assert main(["promote", "--candidate", "cand", "--metrics", "eval.json", "--source", "src", "--splits", "s.json",
                 "--out", "promote.json"]) == 0
    decision = json.loads((tmp_path / "promote.json").read_text())
    version = client.get_model_version("described", decision["candidate_version"])
    assert version.description == f"trained by run {uris[2][1]} on data md5-trainset; e2e_f1 0.6123 on eval set evalset"
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string="tags.`kocr.stage` = 'promote'")
    assert run.data.tags["kocr.registered_version"] == f"described/{decision['candidate_version']}"


def _promote_by_cli(tmp_path, uri_run, score):
    """``kocr promote`` in this process on ``uri_run`` scored ``score`` on eval set ``evalset``; its MLflow run."""
    import json

    from kocr.cli import main

    (tmp_path / "cand").mkdir(exist_ok=True)
    (tmp_path / "cand/mlflow.json").write_text(json.dumps({"model_uri": uri_run[0], "run_id": uri_run[1]}))
    (tmp_path / "eval.json").write_text(json.dumps({"candidate": {"e2e_f1": score}, "eval_data_hash": "evalset"}))
    assert main(["promote", "--candidate", "cand", "--metrics", "eval.json", "--source", "src", "--splits", "s.json",
                 "--out", "promote.json"]) == 0
    decision = json.loads((tmp_path / "promote.json").read_text())
    made = f"{decision['model_name']}/{decision['candidate_version']}"
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string=f"tags.`kocr.registered_version` = '{made}'")
    return decision, run


def test_the_promote_run_logs_the_scores_it_decided_on_as_metrics(logged_uris, monkeypatch, tmp_path):
    """Was: the promote run logged no metric (only promote.json and a decision tag), and promote.min_delta
    no param when params.yaml left it to its default: nothing to chart promotions over time by."""
    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("promote: {model_name: charted}\n", encoding="utf-8")
    first, run = _promote_by_cli(tmp_path, uris[0], 0.5)
    # a first champion: no champion's score, no delta (not a 0 that would chart as a tie)
    assert run.data.metrics == {"candidate_e2e_f1": 0.5, "promoted": 1.0}
    assert run.data.params["promote.min_delta"] == "0.0" and run.data.params["promote.metric"] == "e2e_f1"
    second, run = _promote_by_cli(tmp_path, uris[1], 0.45)
    assert not second["promoted"] and second["delta_e2e_f1"] == pytest.approx(-0.05)
    assert run.data.metrics == pytest.approx({"candidate_e2e_f1": 0.45, "champion_e2e_f1": 0.5,
                                              "delta_e2e_f1": -0.05, "promoted": 0.0})


def test_the_registered_model_is_described_once_and_a_description_written_by_hand_is_kept(logged_uris, monkeypatch):
    """Was: its versions had descriptions, the registered model none: nothing on its page said what it is
    or how to load it."""
    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    client = mlflow.MlflowClient()
    config = PromoteConfig(model_name="reg-described")
    promote(_candidate(uris[0], 0.40), config, _no_rescore)
    written = client.get_registered_model("reg-described").description
    assert written, "the registered model has no description"
    for said in ("`e2e_f1`", "promote.min_delta", 'mlflow.pyfunc.load_model("models:/reg-described@champion")',
                 "kocr export-easyocr --model models:/reg-described@champion", 'recog_network="ko_ocr"'):
        assert said in written, said
    client.update_registered_model("reg-described", description="Our production reader; ask Jiwoo first.")
    promote(_candidate(uris[1], 0.45), config, _no_rescore)  # an update: the hand-written one stays
    assert client.get_registered_model("reg-described").description == "Our production reader; ask Jiwoo first."
    client.update_registered_model("reg-described", description="")  # cleared: the next promote writes it anew
    promote(_candidate(uris[2], 0.50), PromoteConfig(model_name="reg-described", metric="cer"), lambda uri: 0.6)
    assert "`cer` (lower is better)" in client.get_registered_model("reg-described").description


def test_a_promote_run_again_decides_on_the_version_it_registered_not_a_second_one(logged_uris, monkeypatch):
    """Was: a promote killed (or stopped by a full disk writing metrics/promote.json) after it registered
    the candidate is run again by ``dvc repro`` (no dvc.lock entry), and registered the model a second
    time; when the first version had been made champion, the second "did not beat" it, so promote.json
    said "not promoted" of the champion, beside a version left without a decision."""
    import evaluation.promote

    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    client = mlflow.MlflowClient()
    config = PromoteConfig(model_name="reg-again")

    def versions():
        return sorted(int(v.version) for v in client.search_model_versions("name='reg-again'"))

    first = promote(_candidate(uris[0], 0.40), config, _no_rescore)
    assert promote(_candidate(uris[0], 0.40), config, _no_rescore) == first  # run again after champion moved
    assert versions() == [1] and first["promoted"]
    assert int(client.get_model_version_by_alias("reg-again", "champion").version) == 1

    def killed(*args):
        raise KeyboardInterrupt  # the kill after registering, before the decision

    decide = evaluation.promote._decide
    monkeypatch.setattr(evaluation.promote, "_decide", killed)
    with pytest.raises(KeyboardInterrupt):
        promote(_candidate(uris[1], 0.50), config, _no_rescore)
    monkeypatch.setattr(evaluation.promote, "_decide", decide)
    second = promote(_candidate(uris[1], 0.50), config, _no_rescore)
    assert versions() == [1, 2] and second["candidate_version"] == 2 and second["promoted"]
    assert second["champion_e2e_f1"] == pytest.approx(0.40) and "beats champion v1" in second["reason"]
    assert client.get_model_version("reg-again", 2).tags["decision"] == "promoted"
    # the same run scored anew (another set, another score) is another version, as before
    third = promote(_candidate(uris[1], 0.45, data_hash="set-b"), config, lambda uri: 0.30)
    assert versions() == [1, 2, 3] and third["candidate_version"] == 3


def test_a_promote_stopped_before_describing_its_version_describes_it_when_run_again(logged_uris, monkeypatch):
    """Was: a promote stopped (SIGTERM, which kocr makes an exit 143) between registering the candidate and
    writing the version's description was run again, decided on that version (registered_before) and
    left it without a description for good. A description written on the version by hand is kept."""
    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    client = mlflow.MlflowClient()
    config = PromoteConfig(model_name="reg-undescribed")

    def stopped(*args, **kwargs):
        raise SystemExit(143)

    with monkeypatch.context() as patch:
        patch.setattr(mlflow.MlflowClient, "update_model_version", stopped)
        with pytest.raises(SystemExit):
            promote(_candidate(uris[0], 0.40), config, _no_rescore)
    [version] = client.search_model_versions("name='reg-undescribed'")
    assert not version.description  # registered, not described: what the kill left
    decision = promote(_candidate(uris[0], 0.40), config, _no_rescore)
    assert decision["candidate_version"] == 1 and decision["promoted"]
    assert client.get_model_version("reg-undescribed", "1").description == (
        f"trained by run {uris[0][1]}; e2e_f1 0.4000 on eval set set-a")
    client.update_model_version("reg-undescribed", "1", description="Jiwoo's pick for the March release.")
    promote(_candidate(uris[0], 0.40), config, _no_rescore)  # run again: the version's own words stay
    assert client.get_model_version("reg-undescribed", "1").description == "Jiwoo's pick for the March release."
    assert [int(v.version) for v in client.search_model_versions("name='reg-undescribed'")] == [1]


def test_a_champion_promoted_by_an_older_kocr_is_restated_when_its_candidate_is_promoted_again(logged_uris,
                                                                                              monkeypatch):
    """A version made champion before promote kept its decision on it (no ``kocr.decision`` tag): the same
    candidate promoted again decides on that version, says it is champion already, and moves nothing."""
    from evaluation.promote import DECISION_TAG

    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    client = mlflow.MlflowClient()
    config = PromoteConfig(model_name="reg-older")
    first = promote(_candidate(uris[0], 0.40), config, _no_rescore)
    client.delete_model_version_tag("reg-older", str(first["candidate_version"]), DECISION_TAG)
    again = promote(_candidate(uris[0], 0.40), config, _no_rescore)
    assert [int(v.version) for v in client.search_model_versions("name='reg-older'")] == [1]
    assert again["promoted"] and again["candidate_version"] == again["champion_version"] == 1
    assert again["reason"] == "v1 is champion already: an earlier promote of this candidate promoted it"
    assert again["champion_e2e_f1"] == pytest.approx(0.40) and again["delta_e2e_f1"] is None
    assert int(client.get_model_version_by_alias("reg-older", "champion").version) == 1


def test_the_run_that_owns_the_model_carries_the_score_it_is_promoted_by(logged_uris, monkeypatch, tmp_path):
    """Was: only the evaluate run held the candidate's scores (candidate_e2e_f1); the train run its registry
    version names, and its logged model, had no e2e_f1, so comparing train runs in the UI could not show
    the metric the registry promotes by."""
    import json

    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("promote: {model_name: owned}\n", encoding="utf-8")
    (tmp_path / "cand").mkdir()
    (tmp_path / "cand/mlflow.json").write_text(json.dumps({"model_uri": uris[0][0], "run_id": uris[0][1]}))
    (tmp_path / "eval.json").write_text(json.dumps({
        "candidate": {"e2e_f1": 0.625, "cer": 0.0125, "pages": 6, "cleval_e2e_f1": float("nan")},
        "eval_data_hash": "evalset", "eval_scoring_hash": "scoring"}))
    from kocr.cli import main

    assert main(["promote", "--candidate", "cand", "--metrics", "eval.json", "--source", "src", "--splits", "s.json",
                 "--out", "promote.json"]) == 0
    client = mlflow.MlflowClient()
    version = client.get_model_version("owned", json.loads((tmp_path / "promote.json").read_text())["candidate_version"])
    owner = client.get_run(version.run_id)
    assert owner.info.run_id == uris[0][1]
    assert owner.data.metrics == {"e2e_f1": 0.625, "cer": 0.0125}  # the ranked scores, finite; no count
    assert owner.data.tags["eval_data_hash"] == "evalset" and owner.data.tags["eval_scoring_hash"] == "scoring"
    model = mlflow.get_logged_model(uris[0][0].removeprefix("models:/"))
    assert {m.key: m.value for m in model.metrics or []} == {"e2e_f1": 0.625, "cer": 0.0125}

def _first_champion(logged_uris, monkeypatch, tmp_path, name: str) -> tuple[list, str]:
    """The logged models' (uri, run) pairs, and the version of the first, promoted as ``name``'s champion
    (scored 0.50 on set-old) in the test's store, with ``tmp_path`` the working folder naming ``name``."""
    store, uris = logged_uris
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    configure_tracking()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(f"promote: {{model_name: {name}}}\n", encoding="utf-8")
    champion = promote(_candidate(uris[0], 0.50, "set-old"), PromoteConfig(model_name=name),
                       _no_rescore)["candidate_version"]
    return uris, champion


def test_promote_compares_with_the_champion_score_evaluate_wrote_instead_of_reading_the_pages_again(
        logged_uris, monkeypatch, tmp_path):
    """Was: on a new evaluation set (every new data version) evaluate scored the champion beside the candidate,
    then promote read the same pages again to re-score it: minutes on real data for a score already in
    metrics/evaluate.json. A champion that moved since evaluate (another version) is still re-scored."""
    import json

    import evaluation.evaluate
    from evaluation.evaluate import ModelEvaluation
    from kocr.cli import main

    uris, champion = _first_champion(logged_uris, monkeypatch, tmp_path, "scored-beside")
    read = []

    def evaluate_models(models, *args, **kwargs):
        read.append(dict(models))
        return {label: ModelEvaluation({"e2e_f1": 0.58}, {}) for label in models}
    monkeypatch.setattr(evaluation.evaluate, "evaluate_models", evaluate_models)
    monkeypatch.setattr(evaluation.evaluate, "test_pages", lambda *args: ["page"])
    monkeypatch.setattr(evaluation.evaluate, "eval_set_hash", lambda pages: "set-newer")  # the pages evaluate read

    def promote_by_cli(uri_run, score, champion_version, eval_set):
        (tmp_path / "cand").mkdir(exist_ok=True)
        (tmp_path / "cand/mlflow.json").write_text(json.dumps({"model_uri": uri_run[0], "run_id": uri_run[1]}))
        (tmp_path / "eval.json").write_text(json.dumps({
            "candidate": {"e2e_f1": score}, "champion": {"e2e_f1": 0.55}, "eval_data_hash": eval_set,
            "champion_version": champion_version, "champion_run_id": uris[0][1]}))
        assert main(["promote", "--candidate", "cand", "--metrics", "eval.json", "--source", "src",
                     "--splits", "s.json", "--out", "promote.json"]) == 0
        return json.loads((tmp_path / "promote.json").read_text())

    decision = promote_by_cli(uris[1], 0.52, f"scored-beside/{champion}", "set-new")
    assert read == [] and decision["champion_e2e_f1"] == pytest.approx(0.55) and not decision["promoted"]
    assert "(scored on this set beside the candidate by evaluate)" in decision["reason"]
    decision = promote_by_cli(uris[2], 0.60, f"scored-beside/{int(champion) + 7}", "set-newer")  # alias moved since
    assert read == [{"champion": f"models:/scored-beside/{champion}"}]
    assert decision["champion_e2e_f1"] == pytest.approx(0.58) and decision["promoted"]


def test_promote_refuses_to_rescore_the_champion_on_another_set_than_evaluate_scored_the_candidate_on(
        logged_uris, monkeypatch, tmp_path, capsys):
    """Was: a champion promote re-scored itself (the alias moved since evaluate, or evaluate scored none) was
    read from promote's own --source/--splits, whatever set evaluate had scored the candidate on: a hand-run
    promote with other splits compared the two scores across sets and kept the champion's score under the
    candidate's set hash. The set it reads must hash as metrics/evaluate.json's eval_data_hash."""
    import json

    from evaluation.evaluate import eval_set_hash
    from kocr.cli import main

    argv, champion, read, sets = _one_set_promote(logged_uris, monkeypatch, tmp_path, "one-set")
    evaluated = eval_set_hash(sets["a.json"])

    assert main([*argv, "--splits", "b.json"]) == 2
    error = capsys.readouterr().err
    assert f"are set {eval_set_hash(sets['b.json'])}, not set {evaluated} that eval.json scored" in error
    assert "pass the --source and --splits evaluate read, or run evaluate on this set" in error
    # the same pages scored another way (params.yaml's detector settings or IoU threshold changed since)
    (tmp_path / "eval.json").write_text(json.dumps({"candidate": {"e2e_f1": 0.45}, "eval_data_hash": evaluated,
                                                    "eval_scoring_hash": "another-way"}))
    assert main([*argv, "--splits", "a.json"]) == 2
    assert "must be re-scored the way eval.json scored the candidate" in capsys.readouterr().err
    assert read == [] and not (tmp_path / "promote.json").exists()
    tags = mlflow.MlflowClient().get_model_version("one-set", champion).tags
    assert not any(tag.startswith("rescored_") for tag in tags)  # no score kept under the candidate's set
    (tmp_path / "eval.json").write_text(json.dumps({"candidate": {"e2e_f1": 0.45}, "eval_data_hash": evaluated}))
    assert main([*argv, "--splits", "a.json"]) == 0  # the set evaluate read: re-scored and compared
    decision = json.loads((tmp_path / "promote.json").read_text())
    assert read == [{"champion": f"models:/one-set/{champion}"}] and decision["promoted"]


def _one_set_promote(logged_uris, monkeypatch, tmp_path, name: str):
    """A first champion of ``name`` (on set-old), a candidate whose eval.json scores it on pages ``a.json``
    holds, and the ``kocr promote`` arguments but --splits (``a.json``, or ``b.json``: other pages); the
    champion's version, the models re-scored (evaluate_models is a stand-in that scores 0.40) and the two page
    sets by file name."""
    import json

    import evaluation.evaluate
    from evaluation.evaluate import EvalPage, ModelEvaluation, eval_set_hash
    from training.data.pages import Page

    uris, champion = _first_champion(logged_uris, monkeypatch, tmp_path, name)
    sets = {}
    for split in ("a", "b"):
        (tmp_path / f"{split}.png").write_bytes(f"pixels of {split}".encode())
        sets[f"{split}.json"] = [EvalPage(split, Page(f"{split}.png", 8, 8), tmp_path / f"{split}.png")]
    read = []

    def evaluate_models(models, *args, **kwargs):
        read.append(dict(models))
        return {label: ModelEvaluation({"e2e_f1": 0.40}, {}) for label in models}
    monkeypatch.setattr(evaluation.evaluate, "evaluate_models", evaluate_models)
    monkeypatch.setattr(evaluation.evaluate, "test_pages", lambda source, splits, split: sets[splits])
    (tmp_path / "cand").mkdir()
    (tmp_path / "cand/mlflow.json").write_text(json.dumps({"model_uri": uris[1][0], "run_id": uris[1][1]}))
    (tmp_path / "eval.json").write_text(json.dumps({"candidate": {"e2e_f1": 0.45},
                                                    "eval_data_hash": eval_set_hash(sets["a.json"])}))
    argv = ["promote", "--candidate", "cand", "--metrics", "eval.json", "--source", "src", "--out", "promote.json"]
    return argv, champion, read, sets


def test_a_rescoring_refused_for_another_set_registers_nothing_and_moves_no_alias(logged_uris, monkeypatch, tmp_path,
                                                                                  capsys):
    """Was: the refusal came from the re-score, after the candidate was registered and made ``challenger``:
    a refused promote left a new version without a decision and moved the alias. It is now decided under
    the lock before anything is written."""
    from kocr.cli import main

    argv, champion, read, _ = _one_set_promote(logged_uris, monkeypatch, tmp_path, "refused-early")
    client = mlflow.MlflowClient()
    assert main([*argv, "--splits", "b.json"]) == 2
    assert "not set" in capsys.readouterr().err and read == []
    assert [str(v.version) for v in client.search_model_versions("name='refused-early'")] == [str(champion)]
    assert str(client.get_model_version_by_alias("refused-early", "challenger").version) == str(champion)
    assert main([*argv, "--splits", "a.json"]) == 0  # the set evaluate read: registered, re-scored, compared
    assert read == [{"champion": f"models:/refused-early/{champion}"}]
    assert len(client.search_model_versions("name='refused-early'")) == 2


def test_a_refused_promote_starts_no_run_and_one_that_fails_ends_its_run_failed(logged_uris, monkeypatch, tmp_path,
                                                                                capsys):
    """Was: kocr promote started its MLflow run first, so a refusal that wrote nothing (the champion's re-scoring
    on other pages than evaluate's, a lock URL that is no database) left a FAILED promote run beside the ones
    that failed registering or deciding. A refusal now starts no run; an error after the run began fails it."""
    import evaluation.evaluate
    from kocr.cli import main

    argv, champion, read, _ = _one_set_promote(logged_uris, monkeypatch, tmp_path, "run-less")

    def promote_runs():
        return mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string="params.`promote.model_name` = 'run-less'")

    assert main([*argv, "--splits", "b.json"]) == 2 and "not set" in capsys.readouterr().err
    (tmp_path / "params.yaml").write_text("promote: {model_name: run-less, lock_url: 'mysql://kim@db/locks'}\n",
                                          encoding="utf-8")
    assert main([*argv, "--splits", "a.json"]) == 2 and "not a PostgreSQL" in capsys.readouterr().err
    assert promote_runs() == []
    (tmp_path / "params.yaml").write_text("promote: {model_name: run-less}\n", encoding="utf-8")

    def unreadable(*args, **kwargs):
        raise RuntimeError("the champion's weights are gone")
    monkeypatch.setattr(evaluation.evaluate, "evaluate_models", unreadable)
    with pytest.raises(RuntimeError, match="weights are gone"):  # a crash re-scoring: the run ends FAILED
        main([*argv, "--splits", "a.json"])
    assert [run.info.status for run in promote_runs()] == ["FAILED"]

    def server_error(self, name, alias):
        raise mlflow.exceptions.MlflowException("internal error", error_code="INTERNAL_ERROR")
    monkeypatch.setattr(mlflow.MlflowClient, "get_model_version_by_alias", server_error)
    assert main([*argv, "--splits", "a.json"]) == 2  # the registry unreadable, before any write: a FAILED run too
    assert "internal error" in capsys.readouterr().err
    assert [run.info.status for run in promote_runs()] == ["FAILED", "FAILED"]


def test_kocr_promote_reads_the_embedded_store_it_registers_in(hangul_checkpoint, tmp_path, monkeypatch):
    """kocr promote takes its lock and reads the registry (the champion, an earlier registration) before its
    run starts: the store is configured first, so with MLFLOW_TRACKING_URI unset the lock is the embedded
    store's and no mlflow.db (MLflow's own default) is made beside it. Two promotes in fresh processes: the
    second finds the first's champion."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    configure_tracking()
    uris = []
    for _ in range(2):
        with mlflow.start_run() as run:
            uris.append((log_recognizer(hangul_checkpoint, DetectorSettings()).model_uri, run.info.run_id))
    (tmp_path / "params.yaml").write_text("promote: {model_name: embedded}\n", encoding="utf-8")
    (tmp_path / "cand").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONPATH": str(REPO)}
    decisions = []
    for (uri, run_id), score in zip(uris, (0.5, 0.4)):
        (tmp_path / "cand/mlflow.json").write_text(json.dumps({"model_uri": uri, "run_id": run_id}))
        (tmp_path / "eval.json").write_text(json.dumps({"candidate": {"e2e_f1": score}, "eval_data_hash": "e"}))
        done = subprocess.run([sys.executable, "-m", "kocr.cli", "promote", "--candidate", "cand", "--metrics",
                               "eval.json", "--source", "s", "--splits", "s.json", "--out", "promote.json"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        decisions.append(json.loads((tmp_path / "promote.json").read_text()))
    assert [d["promoted"] for d in decisions] == [True, False] and decisions[1]["champion_version"] == 1
    assert not (tmp_path / "mlflow.db").exists()  # MLflow's own default store: its lock was taken there


def test_a_champion_of_a_registered_model_made_again_is_not_compared_on_the_score_of_its_version_number(
        logged_uris, monkeypatch, tmp_path):
    """Was: promote took evaluate's score of the champion when the alias named the version number evaluate
    had scored (``champion_version``) alone; a registered model deleted and made again between evaluate
    and promote numbers its versions from 1 anew, so another run's version 1 was compared on the score of
    the version 1 evaluate read. evaluate records the version's run (``champion_run_id``), which must match."""
    import json

    import evaluation.evaluate
    from evaluation.evaluate import ModelEvaluation
    from kocr.cli import main

    uris, champion = _first_champion(logged_uris, monkeypatch, tmp_path, "made-again")
    client = mlflow.MlflowClient()
    scored = client.get_model_version("made-again", champion)  # the version evaluate scores at 0.55 on set-new
    client.delete_registered_model("made-again")
    again = promote(_candidate(uris[2], 0.30), PromoteConfig(model_name="made-again"), _no_rescore)
    assert again["promoted"] and again["candidate_version"] == int(champion)  # the same number, another run's
    read = []

    def evaluate_models(models, *args, **kwargs):
        read.append(dict(models))
        return {label: ModelEvaluation({"e2e_f1": 0.20}, {}) for label in models}
    monkeypatch.setattr(evaluation.evaluate, "evaluate_models", evaluate_models)
    monkeypatch.setattr(evaluation.evaluate, "test_pages", lambda *args: ["page"])
    monkeypatch.setattr(evaluation.evaluate, "eval_set_hash", lambda pages: "set-new")
    (tmp_path / "cand").mkdir()
    (tmp_path / "cand/mlflow.json").write_text(json.dumps({"model_uri": uris[1][0], "run_id": uris[1][1]}))
    (tmp_path / "eval.json").write_text(json.dumps({
        "candidate": {"e2e_f1": 0.50}, "champion": {"e2e_f1": 0.55}, "eval_data_hash": "set-new",
        "champion_version": f"made-again/{champion}", "champion_run_id": scored.run_id}))
    assert main(["promote", "--candidate", "cand", "--metrics", "eval.json", "--source", "src",
                 "--splits", "s.json", "--out", "promote.json"]) == 0
    decision = json.loads((tmp_path / "promote.json").read_text())
    assert read == [{"champion": f"models:/made-again/{champion}"}]  # re-scored: 0.20, not the other's 0.55
    assert decision["promoted"] and decision["champion_e2e_f1"] == pytest.approx(0.20)
