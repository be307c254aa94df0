"""The kocr command line: one-line errors a user can act on, and `kocr score` on page folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training.data.pages import Page, Word, write_page


def _kocr(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The real entry point in its own process: what a user's shell runs (each start imports torch, ~4 s)."""
    return subprocess.run([sys.executable, "-m", "kocr.cli", *args], capture_output=True, text=True, cwd=cwd)


def _kocr_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """``kocr ARGS`` run in this process through ``kocr.cli.main``: its exit status (argparse's SystemExit
    too) and what it printed, as ``_kocr`` returns them. An exception main lets out fails the test with
    its traceback, where the real process would have printed one."""
    from kocr.cli import main

    capsys.readouterr()  # only this command's output
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["kocr", *args], code, captured.out, captured.err)


def test_unknown_model_is_a_one_line_error(sample_pages, tmp_path):
    image = next(sample_pages.glob("*.jpg"))
    done = _kocr("predict", str(image), "--model", "no_such_model", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_model" in lines[0] and "Traceback" not in done.stderr


def test_predict_names_an_unreadable_image_in_one_line(tmp_path, capsys):
    from kocr.cli import main

    (tmp_path / "one_byte.jpg").write_bytes(b"x")  # the decoder raised struct.error: a traceback before
    assert main(["predict", str(tmp_path / "one_byte.jpg"), "--model", "english_g2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"kocr predict: error: {tmp_path / 'one_byte.jpg'}: not a readable image (corrupt, or not an image)"


def test_export_of_unknown_model_is_a_one_line_error(tmp_path, monkeypatch):
    # a real process on a store of its own that does not exist yet: it is made without MLflow's INFO lines,
    # which main() silences before MLflow is imported (in pytest's process MLflow is imported already and
    # says them). Was: silenced after kocr.tracking had imported MLflow, so a user's first command printed
    # "Creating initial MLflow database tables..."; the suite's shared store, made by an earlier test, hid it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'new.db'}")
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    done = _kocr("export-easyocr", "--model", "models:/nope@champion", "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert (tmp_path / "new.db").exists()  # the store was made by this command
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "models:/nope@champion" in done.stderr


def test_score_prints_the_metrics_of_two_folders(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    write_page(Page("a.jpg", 100, 100, [Word((0, 0, 40, 20), "서울"), Word((50, 0, 40, 20), "평양")]), gt / "a.json")
    # one exact match, one box elsewhere: precision 1/2, recall 1/2
    write_page(Page("a.jpg", 100, 100, [Word((0, 0, 40, 20), "서울"), Word((0, 60, 40, 20), "평양")]), pred / "a.json")
    done = _kocr("score", "--gt", str(gt), "--pred", str(pred))
    assert done.returncode == 0, done.stderr
    scores = json.loads(done.stdout)
    assert scores["e2e_precision"] == 0.5 and scores["e2e_recall"] == 0.5 and scores["e2e_f1"] == 0.5


def test_score_of_a_missing_or_empty_folder_is_an_error_not_zeros(tmp_path, capsys):
    from kocr.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["score", "--gt", str(tmp_path / "absent"), "--pred", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip() == f"kocr score: error: --gt {tmp_path / 'absent'}: no such folder"
    assert main(["score", "--gt", str(tmp_path / "empty"), "--pred", str(tmp_path / "empty")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "no page JSON under it" in captured.err
    write_page(Page("q.jpg", 100, 100, [Word((0, 0, 40, 20), "")]), tmp_path / "gt" / "q.json")  # empty text only
    assert main(["score", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "empty")]) == 2
    assert "1 page JSON files under it, none with a labelled word inside its image" in capsys.readouterr().err


def test_score_refuses_a_pred_folder_with_no_prediction_for_any_page_and_notes_some_missing(tmp_path, capsys):
    from kocr.cli import main

    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for name in ("a", "b"):
        write_page(Page(f"{name}.jpg", 100, 100, [Word((0, 0, 40, 20), "서울")]), gt / f"{name}.json")
    (pred / "candidate").mkdir(parents=True)  # predictions one folder down: --pred named its parent
    write_page(Page("a.jpg", 100, 100, [Word((0, 0, 40, 20), "서울")]), pred / "other" / "x.json")
    # was: exit 0 and e2e_f1 0.0, with only "missing_predictions": 2 in the JSON to say why
    assert main(["score", "--gt", str(gt), "--pred", str(pred / "candidate")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == (
        f"kocr score: error: --pred {pred / 'candidate'}: no prediction for any of the 2 pages under --gt {gt} "
        "(a page's prediction is the page JSON at its relative path, or of its file stem)")
    write_page(Page("a.jpg", 100, 100, [Word((0, 0, 40, 20), "서울")]), pred / "candidate" / "a.json")
    assert main(["score", "--gt", str(gt), "--pred", str(pred / "candidate")]) == 0  # one of two: scored, noted
    captured = capsys.readouterr()
    assert json.loads(captured.out)["missing_predictions"] == 1 and captured.err.strip() == (
        f"kocr score: note: 1 of 2 pages have no prediction under --pred {pred / 'candidate'}; each is scored as "
        "reading nothing")


def test_score_refuses_an_iou_threshold_outside_0_to_1(tmp_path, capsys):
    from kocr.cli import main

    gt = tmp_path / "gt"
    write_page(Page("a.jpg", 100, 100, [Word((0, 0, 40, 20), "서울")]), gt / "a.json")
    # was: accepted, so 50 (a percentage) or 1.5 matched no box and printed e2e_f1 0, as evaluate.iou_threshold
    # in params.yaml is refused outside (0, 1]
    for bad in ("50", "1.5", "0", "-0.5", "nan"):
        with pytest.raises(SystemExit) as exit_:
            main(["score", "--gt", str(gt), "--pred", str(gt), "--iou", bad])
        assert exit_.value.code == 2 and f"expected an IoU in (0, 1], got {bad}" in capsys.readouterr().err
    assert main(["score", "--gt", str(gt), "--pred", str(gt), "--iou", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["e2e_f1"] == 1.0


def test_a_misspelt_detector_setting_is_refused_not_run_with_easyocrs_default(tmp_path, monkeypatch, capsys):
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("detector:\n  widht_ths: 0.0\n", encoding="utf-8")
    (tmp_path / "labels.tsv").write_text("image\ttext\n", encoding="utf-8")
    assert main(["evaluate-crops", "--labels", "labels.tsv", "--model", "english_g2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kocr evaluate-crops: error: params.yaml: detector: unknown keys ['widht_ths'] (known: ")


@pytest.mark.parametrize("marked", [False, True])
def test_evaluate_refuses_a_split_with_no_labelled_word_before_reading_a_page(sample_pages, prepared, tmp_path,
                                                                             monkeypatch, capsys, marked):
    from dataclasses import replace

    from kocr.cli import main
    from training.data.pages import read_page

    source = tmp_path / "pages"
    shutil.copytree(sample_pages, source)
    for label in source.glob("*.json"):  # the labels emptied: every score would read 0, cer a perfect 0
        page = read_page(label)  # or every word marked ### (illegible), which no score counts either
        write_page(replace(page, words=[replace(w, text="###") for w in page.words] if marked else []), label)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("evaluate: {split: val}\n", encoding="utf-8")  # the fixture has no test split
    assert main(["evaluate", "--source", str(source), "--splits", str(prepared / "splits.json"),
                 "--candidate", "english_g2", "--predictions", "pred"]) == 2
    assert "hold no labelled word: nothing to score" in capsys.readouterr().err
    assert not (tmp_path / "pred").exists() and not (tmp_path / "metrics").exists()


def test_evaluate_names_a_page_image_it_cannot_read_in_one_line_before_scoring(sample_pages, prepared, tmp_path):
    """Was: a PermissionError traceback (main lets out an OSError that is not a full disk). A set scored
    without the page would be another set under the same name: refused, as a missing page is."""
    from tests.conftest import permissions_bind

    source = tmp_path / "pages"
    shutil.copytree(sample_pages, source)
    (tmp_path / "params.yaml").write_text("evaluate: {split: val, baselines: []}\n", encoding="utf-8")
    name = json.loads((prepared / "splits.json").read_text(encoding="utf-8"))["val"][0]
    image = source / f"{name.removesuffix('.json')}.jpg"
    image.chmod(0)
    try:
        done = subprocess.run(permissions_bind([sys.executable, "-m", "kocr.cli", "evaluate", "--source", "pages",
                                                "--splits", str(prepared / "splits.json"), "--candidate", "english_g2",
                                                "--predictions", "pred"]), capture_output=True, text=True, cwd=tmp_path)
    finally:
        image.chmod(0o644)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (f"kocr evaluate: error: pages/{image.name}: cannot be read (Permission denied); "
                                   f"it is in split 'val' of {prepared / 'splits.json'}, which is scored whole: make it "
                                   "readable, or run prepare again (it leaves out what it cannot read)")
    assert not (tmp_path / "pred").exists() and not (tmp_path / "metrics").exists()


def test_an_evaluate_run_names_the_candidate_champion_and_base_it_scored(sample_pages, prepared, tmp_path,
                                                                         monkeypatch):
    """Was: only the scores, so the run did not say which checkpoint, registry version or base they belong to;
    then the champion's version was looked up after scoring, so a promotion meanwhile mislabelled it."""
    import hashlib

    import mlflow

    import evaluation.evaluate
    import kocr.cli
    from evaluation.evaluate import ModelEvaluation
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cand").mkdir()
    (tmp_path / "cand/model.pt").write_bytes(b"candidate weights")
    (tmp_path / "cand/mlflow.json").write_text('{"run_id": "train-run-1", "model_uri": "models:/m-1"}')
    (tmp_path / "base.pt").write_bytes(b"base weights")
    (tmp_path / "params.yaml").write_text(f"evaluate: {{split: val, baselines: []}}\ntrain: {{base: {tmp_path}/base.pt}}\n"
                                          "promote: {model_name: scored-champion}\n", encoding="utf-8")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    client.create_registered_model("scored-champion")
    version = client.create_model_version("scored-champion", str(tmp_path / "cand"), run_id=None)
    client.set_registered_model_alias("scored-champion", "champion", version.version)
    scored = {}

    promoted = client.create_model_version("scored-champion", str(tmp_path / "cand"), run_id=None)

    def fake(models, *args, **kwargs):
        scored.update(models)
        # a promote elsewhere moves the alias while this run reads: it must not relabel what was scored
        client.set_registered_model_alias("scored-champion", "champion", promoted.version)
        return {label: ModelEvaluation({"cer": 0.1}, {}) for label in models}
    monkeypatch.setattr(evaluation.evaluate, "evaluate_models", fake)
    monkeypatch.setattr(kocr.cli, "evaluation_report", lambda *args: "report")
    assert main(["evaluate", "--source", str(sample_pages), "--splits", str(prepared / "splits.json"),
                 "--candidate", "cand/model.pt", "--predictions", "pred", "--metrics", "m.json",
                 "--pictures", "pics"]) == 0
    assert set(scored) == {"base", "candidate", "champion"}
    assert scored["champion"] == f"models:/scored-champion/{version.version}"  # pinned before scoring
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string="tags.`kocr.stage` = 'evaluate'")
    tags = run.data.tags
    assert tags["kocr.scored.candidate"] == "cand/model.pt"
    assert tags["kocr.scored.candidate.sha256"] == hashlib.sha256(b"candidate weights").hexdigest()
    assert tags["kocr.scored.candidate.run_id"] == "train-run-1"
    assert tags["kocr.scored.champion"] == f"models:/scored-champion/{version.version}"
    assert tags["kocr.scored.champion.version"] == f"scored-champion/{version.version}" != \
        f"scored-champion/{promoted.version}"
    assert tags["kocr.scored.base"] == f"{tmp_path}/base.pt"
    assert tags["kocr.scored.base.sha256"] == hashlib.sha256(b"base weights").hexdigest()


def test_evaluate_without_tesseract_warns_in_kocrs_one_line(sample_pages, prepared, tmp_path, monkeypatch, capsys):
    """Was: "kocr evaluate: tesseract … left out", not the "kocr evaluate: warning: …" of kocr's other warnings."""
    import evaluation.evaluate
    import evaluation.tesseract
    import kocr.cli
    from evaluation.evaluate import ModelEvaluation
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cand").mkdir()
    (tmp_path / "cand/model.pt").write_bytes(b"candidate weights")
    (tmp_path / "params.yaml").write_text("evaluate: {split: val, baselines: [tesseract]}\n"
                                          "promote: {model_name: no-tesseract}\n", encoding="utf-8")
    scored = {}

    def fake(models, *args, **kwargs):
        scored.update(models)
        return {label: ModelEvaluation({"cer": 0.1}, {}) for label in models}
    monkeypatch.setattr(evaluation.tesseract, "tesseract_available", lambda: False)
    monkeypatch.setattr(evaluation.evaluate, "evaluate_models", fake)
    monkeypatch.setattr(kocr.cli, "evaluation_report", lambda *args: "report")
    assert main(["evaluate", "--source", str(sample_pages), "--splits", str(prepared / "splits.json"),
                 "--candidate", "cand/model.pt", "--predictions", "pred", "--metrics", "m.json",
                 "--pictures", "pics"]) == 0
    assert "tesseract" not in scored
    assert "kocr evaluate: warning: tesseract (kor+eng) not installed; its baseline row is left out" in \
        capsys.readouterr().err.splitlines()


def test_evaluate_names_the_champion_version_it_scored_for_promote(sample_pages, prepared, tmp_path, monkeypatch,
                                                                    capsys):
    """metrics/evaluate.json says which registry version its champion row is (champion_version), so promote
    compares with that score rather than reading the pages again (was: it had no way to know the row's version)."""
    import evaluation.evaluate
    import kocr.cli
    from evaluation.evaluate import ModelEvaluation

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("evaluate: {split: val, baselines: []}\ntrain: {base: english_g2}\n"
                                          "promote: {model_name: named-row}\n", encoding="utf-8")
    monkeypatch.setattr(evaluation.evaluate, "evaluate_models",
                        lambda models, *args, **kwargs: {label: ModelEvaluation({"e2e_f1": 0.9}, {}) for label in models})
    monkeypatch.setattr(kocr.cli, "evaluation_report", lambda *args: "report")
    monkeypatch.setattr(kocr.cli, "_scored_model_tags", lambda models: {})
    evaluate = ["evaluate", "--source", str(sample_pages), "--splits", str(prepared / "splits.json"),
                "--candidate", "english_g2", "--predictions", "pred", "--metrics", "m.json", "--pictures", "pics"]
    for champion in ("models:/named-row/3", None):
        monkeypatch.setattr(kocr.cli, "_champion_uri",
                            lambda name, champion=champion: champion and (champion, "run-of-3"))
        done = _kocr_here(capsys, *evaluate)
        assert done.returncode == 0, done.stderr
        written = json.loads((tmp_path / "m.json").read_text())
        assert written.get("champion_version") == (champion and "named-row/3"), written
        assert written.get("champion_run_id") == (champion and "run-of-3"), written  # the version's run
        assert ("champion" in written) == bool(champion)


def test_promote_refuses_a_candidate_trained_again_since_evaluate_scored_it(sample_pages, prepared, tmp_path,
                                                                          monkeypatch, capsys):
    """Was: promote took metrics/evaluate.json's score for whatever mlflow.json named, so a candidate trained
    again by hand after evaluate (kocr train, then kocr promote) was registered, and could become champion,
    under the score of the model trained before it. evaluate now records the checkpoint it scored (sha256):
    a train run again to the same weights (a new run id; DVC then skips evaluate, whose deps are unchanged)
    is promoted under the score, which is still its own; it was refused by run id, stopping `dvc repro`."""
    import hashlib

    import mlflow

    import evaluation.evaluate
    import evaluation.promote
    import kocr.cli
    from evaluation.evaluate import ModelEvaluation

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cand").mkdir()
    (tmp_path / "cand/model.pt").write_bytes(b"candidate weights")
    (tmp_path / "cand/mlflow.json").write_text('{"run_id": "train-run-1", "model_uri": "models:/m-1"}')
    (tmp_path / "params.yaml").write_text("evaluate: {split: val, baselines: []}\ntrain: {base: english_g2}\n"
                                          "promote: {model_name: retrained-since}\n", encoding="utf-8")
    monkeypatch.setattr(evaluation.evaluate, "evaluate_models",
                        lambda models, *args, **kwargs: {label: ModelEvaluation({"e2e_f1": 0.9}, {}) for label in models})
    monkeypatch.setattr(kocr.cli, "evaluation_report", lambda *args: "report")
    done = _kocr_here(capsys, "evaluate", "--source", str(sample_pages), "--splits", str(prepared / "splits.json"),
                      "--candidate", "cand/model.pt", "--predictions", "pred", "--metrics", "m.json",
                      "--pictures", "pics")
    assert done.returncode == 0, done.stderr
    scored = hashlib.sha256(b"candidate weights").hexdigest()
    assert json.loads((tmp_path / "m.json").read_text())["candidate_sha256"] == scored
    promote = ["promote", "--candidate", "cand", "--metrics", "m.json", "--source", str(sample_pages),
               "--splits", str(prepared / "splits.json"), "--out", "promote.json"]
    # trained again by hand: a new model.pt and the new run's mlflow.json, evaluate not run since
    (tmp_path / "cand/model.pt").write_bytes(b"other weights")
    (tmp_path / "cand/mlflow.json").write_text('{"run_id": "train-run-2", "model_uri": "models:/m-2"}')
    done = _kocr_here(capsys, *promote)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"kocr promote: error: m.json scores the candidate checkpoint of sha256 {scored[:12]}, but cand/model.pt is "
        "another (trained again since): evaluate this candidate first (dvc repro evaluate), or it would be "
        "registered under another model's score"]
    assert not (tmp_path / "promote.json").exists()
    assert not mlflow.MlflowClient().search_registered_models(filter_string="name = 'retrained-since'")
    # trained again to the same weights: the score is this model's; promote goes on with the new run's model
    (tmp_path / "cand/model.pt").write_bytes(b"candidate weights")
    registered = []
    monkeypatch.setattr(evaluation.promote, "promote", lambda candidate, config, rescore, evaluated_champion=None, **hooks:
                        registered.append(candidate) or {"promoted": True, "reason": "first",
                                                         "candidate_version": "1", "candidate_score": 0.9})
    monkeypatch.setattr(evaluation.promote, "decision_metrics", lambda decision, metric: {})
    done = _kocr_here(capsys, *promote)
    assert done.returncode == 0, done.stderr
    assert [(c.model_uri, c.run_id, c.score) for c in registered] == [("models:/m-2", "train-run-2", 0.9)]


@pytest.mark.parametrize("stop_at", range(5))
def test_an_evaluate_run_stopped_while_publishing_leaves_no_metrics_beside_mixed_outputs(sample_pages, prepared,
                                                                                          tmp_path, monkeypatch,
                                                                                          stop_at):
    """Its two folders and three files are published one after another. Was: a SIGTERM between the two
    folders' swaps left this run's pictures beside the earlier run's predictions, and one after both left
    them under the earlier run's metrics/evaluate.json, which DVC and promote take for the run's scores.
    Stopped at each step: either everything is of one run, or there is no --metrics; a rerun mends it."""
    import evaluation.evaluate
    import kocr.atomic
    import kocr.cli
    from evaluation.evaluate import ModelEvaluation
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("evaluate: {split: val, baselines: []}\ntrain: {base: english_g2}\n"
                                          "promote: {model_name: no-champion-here}\n", encoding="utf-8")
    run = {"n": 0}

    def fake(models, pages, pred_dir, *args, pictures_dir=None, **kwargs):
        results = {}
        for label in models:
            (Path(pred_dir) / label).mkdir(parents=True)
            (Path(pred_dir) / label / "page.json").write_text(str(run["n"]))
            (Path(pictures_dir) / label).mkdir(parents=True)
            (Path(pictures_dir) / label / "01.png").write_text(str(run["n"]))
            results[label] = ModelEvaluation({"cer": run["n"]}, {"run": run["n"]}, [],
                                             [Path(pictures_dir) / label / "01.png"])
        return results
    monkeypatch.setattr(evaluation.evaluate, "evaluate_models", fake)
    monkeypatch.setattr(kocr.cli, "evaluation_report", lambda *args: f"report of run {run['n']}")

    def evaluate() -> int:
        return main(["evaluate", "--source", str(sample_pages), "--splits", str(prepared / "splits.json"),
                     "--candidate", "english_g2", "--predictions", "pred", "--metrics", "m/evaluate.json",
                     "--pictures", "pics"])

    def runs_seen() -> set[str]:
        return {(tmp_path / "pred/candidate/page.json").read_text(), (tmp_path / "pics/candidate/01.png").read_text(),
                str(json.loads((tmp_path / "m/evaluate.json").read_text())["candidate"]["cer"]),
                str(json.loads((tmp_path / "m/evaluate_analysis.json").read_text())["candidate"]["run"]),
                (tmp_path / "m/evaluate.md").read_text().removeprefix("report of run ")}

    run["n"] = 1
    assert evaluate() == 0 and runs_seen() == {"1"}
    # the publishing steps: each folder's swap (kocr.atomic._swap_in), each file's write (kocr.cli.write_text)
    steps = {"n": 0}

    def step(real):
        def stopped_at_its_turn(*args, **kwargs):
            if steps["n"] == stop_at:
                raise SystemExit(143)  # what kocr makes of a SIGTERM
            steps["n"] += 1
            return real(*args, **kwargs)
        return stopped_at_its_turn
    with monkeypatch.context() as patch:
        patch.setattr(kocr.atomic, "_swap_in", step(kocr.atomic._swap_in))
        patch.setattr(kocr.cli, "write_text", step(kocr.cli.write_text))
        run["n"] = 2
        with pytest.raises(SystemExit):
            evaluate()
    assert not (tmp_path / "m/evaluate.json").exists() or len(runs_seen()) == 1, runs_seen()
    assert (tmp_path / "pred/candidate").is_dir() and (tmp_path / "pics/candidate").is_dir()
    run["n"] = 3
    assert evaluate() == 0 and runs_seen() == {"3"}


def test_prepare_of_missing_folder_names_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text("prepare: {}\n", encoding="utf-8")
    # the real entry point once; the other refusals in this process (same main, same exit status and message)
    done = _kocr("prepare-aihub", "--src", str(tmp_path / "absent"), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert done.returncode == 2 and "absent" in done.stderr and "Traceback" not in done.stderr
    monkeypatch.chdir(tmp_path)
    for out, message in ((tmp_path / "params.yaml", "--out exists and is not a folder"),
                         (tmp_path, "--out is the source folder")):
        done = _kocr_here(capsys, "prepare-aihub", "--src", str(tmp_path), "--out", str(out))
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    (tmp_path / "empty").mkdir()  # a folder with no page: done, with a warning
    done = _kocr_here(capsys, "prepare-aihub", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert done.returncode == 0 and "warning: no usable page under" in done.stderr


def test_prepare_reports_what_it_cannot_read_and_goes_on(sample_pages, tmp_path):
    """A label, an image and a folder without read permission: each counted under its reason with the
    OS's words, none stopping the stage (the data hash logged first included)."""
    from tests.conftest import permissions_bind

    src = tmp_path / "src"
    shutil.copytree(sample_pages, src)
    (src / "locked").mkdir()
    shutil.move(src / "page_00003.jpg", src / "locked" / "page_00003.jpg")
    (tmp_path / "params.yaml").write_text("prepare: {}\n", encoding="utf-8")
    locked = [src / "page_00001.json", src / "page_00002.jpg", src / "locked"]
    for path in locked:
        path.chmod(0)
    try:
        done = subprocess.run(permissions_bind([sys.executable, "-m", "kocr.cli", "prepare-aihub", "--src", "src",
                                                "--out", "out"]), capture_output=True, text=True, cwd=tmp_path)
    finally:
        for path in locked:
            path.chmod(0o755)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    skipped = {reason: entry["examples"] for reason, entry in report["skipped"].items()}
    assert skipped["unreadable_file"] == ["page_00001.json: Permission denied", "page_00002.jpg: Permission denied"]
    assert skipped["unreadable_folder"] == ["locked: Permission denied"]  # not a folder with nothing below it
    assert skipped["image_missing"] == ["page_00003.json (its image may be in a folder reported as unreadable_folder)"]
    assert not {"stray_folder", "image_corrupt", "image_without_label"} & set(skipped)  # page_00001.jpg: its label's
    assert report["pages_used"] == 3


def test_commands_run_outside_the_project_say_they_use_easyocrs_detector_defaults(tmp_path, monkeypatch, capsys):
    """Without params.yaml the detector settings are EasyOCR's (width_ths 0.5 boxes lines): said, not silent."""
    from tests.conftest import REPO

    monkeypatch.delenv("KOCR_PARAMS", raising=False)
    monkeypatch.chdir(tmp_path)
    outside = _kocr_here(capsys, "export-easyocr", "--model", "english_g2", "--out", str(tmp_path / "a"))
    monkeypatch.chdir(REPO)
    inside = _kocr_here(capsys, "export-easyocr", "--model", "english_g2", "--out", str(tmp_path / "b"))
    assert outside.returncode == inside.returncode == 0, outside.stderr + inside.stderr
    assert "no params.yaml" in outside.stderr and "width_ths 0.5 boxes whole lines" in outside.stderr
    assert "no params.yaml" not in inside.stderr
    # the bundle's README passes the settings the platform evaluated with: the project's word boxes, or none
    assert "width_ths=0.0" in (tmp_path / "b" / "README.md").read_text(encoding="utf-8")
    outside_readme = (tmp_path / "a" / "README.md").read_text(encoding="utf-8")
    assert 'reader.readtext("page.jpg")' in outside_readme and "records no detector settings" in outside_readme


def test_synth_pages_refuses_a_misspelt_sample_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("sample: {count: 1, font_sizes: [20, 30]}\n", encoding="utf-8")
    done = _kocr_here(capsys, "synth-pages", "--out", str(tmp_path / "pages"))
    assert done.returncode == 2 and "unknown keys ['font_sizes']" in done.stderr
    assert not (tmp_path / "pages").exists()  # refused before anything was written


def test_synth_pages_logs_degrade_off_as_off_not_as_yamls_false(tmp_path, monkeypatch, capsys):
    """PyYAML reads params.yaml's bare `degrade: off` as False: the pages were the same as with "off", but
    the sample run logged sample.degrade False (and {preset: off} as preset False)."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    runs = {}
    for name, spelling in (("bare", "off"), ("quoted", '"off"'), ("mapping", "{preset: off, scribble: off}")):
        (tmp_path / "params.yaml").write_text(
            "sample: {count: 1, width: 240, height: 160, font_size: [14, 18], fonts: [NanumGothic.ttf], "
            f"contact_sheet: 0, degrade: {spelling}}}\n", encoding="utf-8")
        done = _kocr_here(capsys, "synth-pages", "--out", str(tmp_path / name))
        assert done.returncode == 0, done.stderr
        [run] = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                   filter_string="attributes.run_name = 'sample'", order_by=["start_time DESC"])[:1]
        runs[name] = run.data.params
    assert runs["bare"]["sample.degrade"] == runs["quoted"]["sample.degrade"] == "off"  # was: "False"
    assert (runs["mapping"]["sample.degrade.preset"], runs["mapping"]["sample.degrade.scribble"]) == ("off", "0.0")
    images = {name: sorted(p.read_bytes() for p in (tmp_path / name).glob("*.jpg")) for name in runs}
    assert images["bare"] == images["quoted"] == images["mapping"] and images["bare"]


def test_synth_pages_without_fonts_says_the_key_is_required(tmp_path):
    (tmp_path / "params.yaml").write_text("sample: {count: 1}\n", encoding="utf-8")
    done = _kocr("synth-pages", "--out", str(tmp_path / "pages"), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("kocr synth-pages: error: params.yaml: sample.fonts is required")
    assert not (tmp_path / "pages").exists()


def test_a_params_file_that_does_not_parse_is_one_line_naming_where(tmp_path, monkeypatch, capsys):
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("train:\n  steps: 10\n  lr: [0.1\n", encoding="utf-8")  # an edit left half done
    assert main(["train", "--data", "d", "--out", "m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kocr train: error: params.yaml: not valid YAML at line 4, column 1: ")
    (tmp_path / "params.yaml").write_text("- train\n", encoding="utf-8")
    assert main(["synth-pages", "--out", str(tmp_path / "pages")]) == 2
    assert capsys.readouterr().err.strip() == "kocr synth-pages: error: params.yaml: top level must be a mapping"

def test_a_full_disk_is_one_line_and_the_run_goes_on_when_there_is_room(sample_pages, tmp_path, monkeypatch, capsys):
    import errno

    from kocr.cli import main
    from training.data import lmdb_store

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("prepare: {shard_size: 10}\n", encoding="utf-8")
    add, calls = lmdb_store.LmdbWriter.add, [0]

    def filling_add(self, image, label):
        calls[0] += 1
        if calls[0] == 25:  # past two finished shards
            raise OSError(errno.ENOSPC, "No space left on device")
        add(self, image, label)

    monkeypatch.setattr(lmdb_store.LmdbWriter, "add", filling_add)
    args = ["prepare-aihub", "--src", str(sample_pages), "--out", "out", "--metrics", "m.json"]
    assert main(args) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert line == ("kocr prepare-aihub: error: no space left on the device writing out; free some and run the "
                    "same command again")
    kept = sorted((tmp_path / "out" / "train").glob("shard-?????"))
    assert len(kept) == 2 and not list((tmp_path / "out").rglob("*.tmp"))
    monkeypatch.setattr(lmdb_store.LmdbWriter, "add", add)
    assert main(args) == 0
    assert sorted((tmp_path / "out" / "train").glob("shard-?????"))[:2] == kept  # resumed, not redone


def test_a_tracking_server_that_cannot_be_reached_is_one_line_naming_it(tmp_path):
    import os

    from tests.conftest import REPO

    (tmp_path / "c").mkdir()
    (tmp_path / "c/mlflow.json").write_text('{"model_uri": "models:/m-1", "run_id": "r"}', encoding="utf-8")
    (tmp_path / "ev.json").write_text('{"candidate": {"e2e_f1": 0.5}, "eval_data_hash": "h"}', encoding="utf-8")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://kocr:s3cret@127.0.0.1:1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    done = subprocess.run([sys.executable, "-m", "kocr.cli", "promote", "--candidate", "c", "--metrics", "ev.json",
                           "--source", "s", "--splits", "x.json", "--out", "o.json"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    # promote takes its lock before it reads the registry: the unlocked-HTTP-store warning may come first
    lines = [line for line in done.stderr.strip().splitlines() if "promotion of ko-ocr-recognizer is not locked" not in line]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]  # was a 40-line traceback, exit 1
    assert lines[0].startswith("kocr promote: error: MLflow at http://kocr:***@127.0.0.1:1: ")
    assert "s3cret" not in done.stderr


def test_an_artifact_store_the_tracking_server_cannot_reach_is_named_in_the_one_line(tmp_path, monkeypatch, capsys):
    """The MLflow server stores artifacts in its S3 bucket (--artifacts-destination); with that endpoint down
    (or its keys refused) every artifact upload gets a 500, retried for minutes, then
    `kocr synth-lines: error: MLflow at http://…: API request to …/mlflow-artifacts/… failed … too many
    500 error responses`: the line named the tracking server alone, which answered every other request.
    The message MLflow raised in that run (moto_server stopped behind mlflow/serve.sh)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    raised = ("API request to http://127.0.0.1:36749/api/2.0/mlflow-artifacts/artifacts/1/a8ac/artifacts/"
              "contact_sheet.png failed with exception HTTPConnectionPool(host='127.0.0.1', port=36749): Max "
              "retries exceeded with url: /api/2.0/mlflow-artifacts/artifacts/1/a8ac/artifacts/contact_sheet.png "
              "(Caused by ResponseError('too many 500 error responses'))")

    def log_artifact(*args, **kwargs):
        raise MlflowException(raised)
    monkeypatch.setattr(mlflow, "log_artifact", log_artifact)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("synth_lines:\n  fonts: [NanumGothic.ttf]\n  contact_sheet: 2\n"
                                          "  workers: 1\n", encoding="utf-8")
    done = _kocr_here(capsys, "synth-lines", "--out", "lines", "--count", "2")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines, done.stderr
    assert lines[-1].startswith("kocr synth-lines: error: MLflow at sqlite:///"), lines[-1]
    assert "the server failed an artifact request (HTTP 500: most often its artifact store, mlflow server " \
           "--artifacts-destination" in lines[-1]
    assert raised in lines[-1]


def test_photos_as_phones_and_scanners_write_them_are_read_as_they_are_seen(sample_pages, tmp_path, monkeypatch):
    import cv2
    import numpy as np
    from PIL import Image

    from evaluation.reader import UnreadableImage, load_image

    page = Image.open(next(sample_pages.glob("*.jpg"))).convert("RGB")
    page.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone held sideways: stored turned, shown upright
    page.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.png", exif=exif)
    grey = np.asarray(page.convert("L"))
    cv2.imwrite(str(tmp_path / "deep.png"), grey.astype(np.uint16) * 257)  # a 16-bit scan
    ink = np.zeros(grey.shape + (4,), np.uint8)
    ink[..., 3] = 255 - grey  # black text drawn only in the alpha channel, on a transparent sheet
    Image.fromarray(ink, "RGBA").save(tmp_path / "clear.png")
    rgb, upright = load_image(tmp_path / "upright.png")
    for name in ("turned.png", "deep.png", "clear.png"):
        seen_rgb, seen = load_image(tmp_path / name)
        assert seen_rgb.shape == rgb.shape and seen_rgb.dtype == np.uint8, name
        # turned was cut in one frame and detected in the other; deep and clear gave no words at all
        assert np.abs(seen.astype(int) - upright).mean() < 1.5, name
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a scan past Pillow's limit: one line, not a traceback
    with pytest.raises(UnreadableImage, match=r"upright.png: not a readable image \(.*MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "upright.png")


def test_predict_writes_every_readable_page_and_refuses_outputs_that_clash(sample_pages, tmp_path, capsys):
    from kocr.cli import main

    good = sorted(sample_pages.glob("*.jpg"))[:2]
    (tmp_path / "bad.jpg").write_bytes(b"x")
    out = tmp_path / "out"
    assert main(["predict", str(good[0]), str(tmp_path / "bad.jpg"), str(good[1]), "--model", "english_g2",
                 "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(p.stem + ".json" for p in good)  # was: nothing written
    err = capsys.readouterr().err.strip().splitlines()
    assert f"kocr predict: error: {tmp_path / 'bad.jpg'}: not a readable image (corrupt, or not an image)" in err
    assert err[-1].startswith("kocr predict: error: 1 of 3 images could not be read")
    (tmp_path / "b").mkdir()
    shutil.copy(good[0], tmp_path / "b" / good[0].name)  # two folders' page_00000.jpg: one JSON name
    assert main(["predict", str(good[0]), str(tmp_path / "b" / good[0].name), "--model", "english_g2",
                 "--out", str(tmp_path / "clash")]) == 2
    assert "would both be written to" in capsys.readouterr().err and not (tmp_path / "clash").exists()


def test_predict_refuses_an_out_that_cannot_be_a_folder_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import training.checkpoint

    from kocr.cli import main

    def no_load(spec):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(training.checkpoint, "load_recognizer", no_load)
    (tmp_path / "out.json").write_text("{}", encoding="utf-8")
    # was: the page was read, then writing its JSON under the file failed with a FileExistsError traceback
    assert main(["predict", "page.png", "--model", "english_g2", "--out", str(tmp_path / "out.json")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"kocr predict: error: --out {tmp_path / 'out.json'}: cannot be made a folder (File exists)"]
    assert (tmp_path / "out.json").read_text(encoding="utf-8") == "{}"


@pytest.mark.parametrize("command", ["predict", "evaluate-pages", "evaluate-crops"])
def test_a_model_that_does_not_load_leaves_no_empty_out_folder_behind(command, tmp_path, monkeypatch, capsys):
    """Was: --out (and the folders above it) made before the model loaded, and left there empty when it did
    not; a folder that was there before is kept, empty or not."""
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    Path("bad.pt").write_bytes(b"not a checkpoint")
    Path("pages").mkdir()
    Path("pages/p.png").write_bytes(b"")
    Path("pages/p.txt").write_text("서울\n", encoding="utf-8")
    Path("labels.tsv").write_text("image\ttext\npages/p.png\t서울\n", encoding="utf-8")
    inputs = {"predict": ["pages/p.png"], "evaluate-pages": ["--images", "pages", "--text", "pages"],
              "evaluate-crops": ["--labels", "labels.tsv"]}[command]
    Path("there").mkdir()
    for out in ("new/out", "there"):
        assert main([command, *inputs, "--model", "bad.pt", "--out", out]) == 2
        assert "bad.pt: not a loadable PyTorch checkpoint" in capsys.readouterr().err
    assert not Path("new").exists()
    assert Path("there").is_dir()


def test_a_failed_run_removes_only_the_folders_its_own_mkdir_made(tmp_path, monkeypatch, capsys):
    """Was: the folders to remove were those missing when --out was looked at, by their names: with
    ``new/../there``, ``there`` (the user's, empty) was removed with ``new`` (that name was missing, as
    ``new`` was); so was a folder another process made between that look and the mkdir."""
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)
    Path("bad.pt").write_bytes(b"not a checkpoint")
    Path("p.png").write_bytes(b"")
    Path("there").mkdir()
    assert main(["predict", "p.png", "--model", "bad.pt", "--out", "new/../there"]) == 2
    assert "bad.pt: not a loadable PyTorch checkpoint" in capsys.readouterr().err
    assert Path("there").is_dir() and not Path("new").exists()


def test_scans_past_pillows_pixel_limit_are_one_line_for_the_command_not_a_warning_each(
        sample_pages, tmp_path, monkeypatch, recwarn, capsys):
    from PIL import Image

    from kocr.cli import main

    page = sorted(sample_pages.glob("*.jpg"))[0]
    with Image.open(page) as im:
        for n in range(2):  # two sizes: PIL warned once for each distinct size, so once per real scan
            im.resize((im.width + 8 * n, im.height)).save(tmp_path / f"scan{n}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", page_pixels := 640 * 420 - 1)  # past it, not past twice it
    assert main(["predict", str(tmp_path / "scan0.png"), str(tmp_path / "scan1.png"), "--model", "english_g2",
                 "--out", str(tmp_path / "out")]) == 0
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]  # was: 2
    err = capsys.readouterr().err
    assert f"kocr predict: 2 page images past Pillow's decompression-bomb limit ({page_pixels:,} pixels)" in err
    assert len(list((tmp_path / "out").glob("*.json"))) == 2


def test_prepare_workers_from_the_command_line_are_checked_there(tmp_path, capsys):
    from kocr.cli import main

    for bad in ("0", "-2"):  # 0 fell back to prepare.workers; -2 was blamed on params.yaml
        with pytest.raises(SystemExit) as exit_:
            main(["prepare-aihub", "--src", str(tmp_path), "--out", str(tmp_path / "out"), "--workers", bad])
        assert exit_.value.code == 2 and f"expected a count >= 1, got {bad}" in capsys.readouterr().err


def test_synth_counts_from_the_command_line_are_checked_there(tmp_path, capsys):
    from kocr.cli import main

    # was: "params.yaml: synth_lines.count must be >= 0, got -3", blaming a file that never said -3
    for argv, least in ((["synth-lines", "--count", "-3"], 1), (["synth-lines", "--workers", "-1"], 0),
                        (["synth-pages", "--count", "-2"], 1)):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"expected a count >= {least}, got {argv[-1]}" in err and "params.yaml" not in err


def test_synth_count_zero_is_refused_before_an_empty_set_is_written(tmp_path, monkeypatch, capsys):
    from kocr.cli import main

    # was: "synth-lines: wrote 0 images" (and "wrote 0 pages") with exit 0: an empty set train refuses later
    monkeypatch.chdir(tmp_path)
    for command in ("synth-lines", "synth-pages"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--count", "0", "--out", "out"])
        assert exit_.value.code == 2 and "--count: expected a count >= 1, got 0" in capsys.readouterr().err
    (tmp_path / "params.yaml").write_text("synth_lines:\n  count: 0\n  fonts: [NanumGothic.ttf]\n"
                                          "sample:\n  count: 0\n  fonts: [NanumGothic.ttf]\n", encoding="utf-8")
    assert main(["synth-lines", "--out", "out"]) == 2
    assert main(["synth-pages", "--out", "out"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "kocr synth-lines: error: params.yaml: synth_lines.count must be >= 1, got 0",
        "kocr synth-pages: error: params.yaml: sample.count must be >= 1, got 0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no set, no run store


def test_predict_without_a_candidate_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    from kocr.cli import main

    monkeypatch.chdir(tmp_path)  # a fresh clone before dvc repro: no models/candidate/model.pt
    assert main(["predict", "page.png"]) == 2
    err = capsys.readouterr().err
    assert "defaults to the pipeline's candidate, models/candidate/model.pt" in err and "--model" in err


def test_a_models_uri_that_cannot_be_fetched_names_the_server_without_its_password(tmp_path, capsys, monkeypatch):
    import socket

    from kocr.cli import main

    with socket.socket() as probe:  # a port nothing listens on: the request fails at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://kim:Secret-Pw-42@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "labels.tsv").write_text("image\ttext\na.png\t서울\n", encoding="utf-8")
    code = main(["evaluate-crops", "--labels", str(tmp_path / "labels.tsv"), "--model", "models:/kocr-x@champion"])
    err = capsys.readouterr().err
    assert code == 2 and f"kim:***@127.0.0.1:{port}" in err
    assert "Secret-Pw-42" not in err  # was: in the API request URL MLflow's message quotes


def test_score_names_an_ambiguous_stem_in_one_line(tmp_path, capsys):
    from kocr.cli import main

    page = Page("p.jpg", 100, 100, [Word((0, 0, 40, 20), "서울")])
    write_page(page, tmp_path / "gt" / "p.json")
    for folder in ("a", "b"):  # two predictions named p.json, neither at the page's own path
        write_page(page, tmp_path / "pred" / folder / "p.json")
    assert main(["score", "--gt", str(tmp_path / "gt"), "--pred", str(tmp_path / "pred")]) == 2  # was a traceback
    err = capsys.readouterr().err.strip()
    assert err.startswith("kocr score: error: ") and "several predictions share its stem" in err
    assert len(err.splitlines()) == 1
