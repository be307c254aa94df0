"""Registry promotion: challenger always, champion only on merit on the same evaluation set."""

from __future__ import annotations

import mlflow
import pytest

from evaluation.promote import Candidate, PromoteConfig, promote
from evaluation.pyfunc_model import log_recognizer
from evaluation.reader import DetectorSettings
from kocr.tracking import configure_tracking


@pytest.fixture(scope="module")
def logged_uris(hangul_checkpoint, tmp_path_factory):
    """Three logged recogniser models in one throwaway store (module-scoped: logging takes seconds)."""
    db = tmp_path_factory.mktemp("registry") / "mlruns.db"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
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
    assert first["promoted"] and first["reason"] == "no champion yet"

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
