"""The training curves picture logged to MLflow (kocr.cli._log_curves)."""

from __future__ import annotations

from pathlib import Path


def test_training_curves_smooth_the_loss_on_a_log_axis_and_start_cer_at_zero(tmp_path, monkeypatch):
    """The per-step loss gets a rolling mean over it and a log axis; a CER of 0 throughout is drawn
    on an axis from 0 (it spanned -0.04..0.04)."""
    import math

    import mlflow

    from kocr.cli import _log_curves

    (tmp_path / "loss.tsv").write_text("step\tloss\n" + "".join(
        f"{s}\t{20 * math.exp(-s / 40) + (s % 3) * 0.1 + 0.01}\n" for s in range(1, 201)), encoding="utf-8")
    (tmp_path / "val.tsv").write_text("step\tcer\n" + "".join(f"{s}\t0.0\n" for s in (50, 100, 150, 200)),
                                      encoding="utf-8")
    figures = []
    monkeypatch.setattr(mlflow, "log_figure", lambda fig, name: figures.append((fig.axes, name)))
    _log_curves(tmp_path, "CTC loss")
    (left, right), name = figures[0]
    assert name == "plots/train_curves.png"
    assert left.get_yscale() == "log" and len(left.get_lines()) == 2  # the raw steps and their rolling mean
    raw, mean = (line.get_ydata() for line in left.get_lines())
    assert abs(sum(raw[-5:]) / 5 - mean[-1]) < 0.05 and left.get_ylabel() == "CTC loss"
    # centred, so a falling loss's mean does not trail above it: at step 50 it is the mean of steps 45-54
    assert abs(mean[49] - sum(raw[44:54]) / 10) < 1e-9
    assert right.get_ylim()[0] == 0 and right.get_ylim()[1] > 0


def _curves(tmp_path):
    (tmp_path / "loss.tsv").write_text("step\tloss\n1\t3.0\n2\t2.0\n", encoding="utf-8")
    (tmp_path / "val.tsv").write_text("step\tcer\n2\t0.5\n", encoding="utf-8")


def _fake_train(monkeypatch, summary: dict) -> None:
    """``kocr train`` without training: training.train.train writes an empty model.pt and the curves and
    returns ``summary``; the model is not logged, and the (empty) data folders are not checked as sets."""
    import evaluation.pyfunc_model
    import training.train

    class Logged:
        model_uri = "models:/m-1"

    def trained(config, data, out, plots_dir=None, **kwargs):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "model.pt").write_bytes(b"")
        Path(plots_dir).mkdir(parents=True, exist_ok=True)
        _curves(Path(plots_dir))
        return summary

    monkeypatch.setattr(training.train, "train", trained)
    monkeypatch.setattr(training.train, "check_sets", lambda config, data: None)
    monkeypatch.setattr(evaluation.pyfunc_model, "log_recognizer", lambda *args, **kwargs: Logged())


def test_train_labels_the_loss_curve_with_the_loss_it_trained_on(tmp_path, monkeypatch):
    """Was: 'training loss' whatever the loss; now CTC, focal CTC (with its gamma) or cross-entropy,
    from the train params, as `kocr train` logs the picture."""
    import mlflow
    import yaml

    from kocr.cli import main

    labels = []
    _fake_train(monkeypatch, {"best_val_cer": 0.5, "best_step": 2, "stopped_early": False, "images_per_second": 1.0,
                              "world_size": 1})
    monkeypatch.setattr(mlflow, "log_figure", lambda fig, name: labels.append(fig.axes[0].get_ylabel()))
    monkeypatch.chdir(tmp_path)
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True, exist_ok=True)
    for train, model, label in (({}, {}, "CTC loss"), ({"focal_gamma": 1.5}, {}, "focal CTC loss (γ=1.5)"),
                                ({"focal_gamma": 1.5}, {"prediction": "attn"}, "cross-entropy loss")):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"device": "cpu", **train}, "model": model}),
                                              encoding="utf-8")
        assert main(["train", "--data", "data", "--out", "out", "--plots", "plots"]) == 0
        assert labels.pop() == label


def test_train_run_names_the_kept_checkpoints_scores_best_and_prefixes_final_once(tmp_path, monkeypatch):
    """Was: every summary number got ``final_`` in front, so the run showed ``final_final_loss``, and the
    kept checkpoint's scores twice, as ``final_best_val_cer`` and ``final_val_cer`` (which read as the
    last validation's, and matched neither the tune run's ``best_val_cer`` nor the trials')."""
    import mlflow
    import yaml

    from kocr.cli import main

    _fake_train(monkeypatch, {"steps": 2, "best_step": 2, "best_val_cer": 0.5, "val_n": 4, "val_cer": 0.5,
                              "val_word_accuracy": 0.25, "val_loss": 1.5, "val_dropped_too_long": 1, "final_loss": 2.0,
                              "stopped_early": False, "images_per_second": 1.0, "world_size": 1, "base": "scratch"})
    monkeypatch.setattr(mlflow, "log_figure", lambda fig, name: None)
    monkeypatch.chdir(tmp_path)
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True, exist_ok=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"device": "cpu"}}), encoding="utf-8")
    assert main(["train", "--data", "data", "--out", "out", "--plots", "plots"]) == 0
    [run] = [r for r in mlflow.search_runs(experiment_names=["ko-ocr/finetune"], output_format="list")
             if r.info.run_name == "train"]
    logged = {k: v for k, v in run.data.metrics.items() if not k.startswith("system/")}  # MLflow's own
    assert logged == {
        "final_steps": 2, "best_step": 2, "best_val_cer": 0.5, "final_val_n": 4, "at_best_cer_val_word_accuracy": 0.25,
        "at_best_cer_val_loss": 1.5, "final_val_dropped_too_long": 1, "final_loss": 2.0, "final_stopped_early": 0,
        "final_images_per_second": 1.0, "final_world_size": 1}
