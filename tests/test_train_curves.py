"""The training curves picture logged to MLflow (kocr.cli._log_curves)."""

from __future__ import annotations


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
    _log_curves(tmp_path)
    (left, right), name = figures[0]
    assert name == "plots/train_curves.png"
    assert left.get_yscale() == "log" and len(left.get_lines()) == 2  # the raw steps and their rolling mean
    raw, mean = (line.get_ydata() for line in left.get_lines())
    assert abs(sum(raw[-5:]) / 5 - mean[-1]) < 0.05 and "loss" in left.get_ylabel()
    # centred, so a falling loss's mean does not trail above it: at step 50 it is the mean of steps 45-54
    assert abs(mean[49] - sum(raw[44:54]) / 10) < 1e-9
    assert right.get_ylim()[0] == 0 and right.get_ylim()[1] > 0
