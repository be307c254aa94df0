"""The in-training end-to-end scorer agrees with the evaluate stage on the same pages and model."""

from __future__ import annotations

from evaluation import evaluate
from evaluation.page_scorer import PageSetScorer
from training.checkpoint import load_recognizer


def test_scorer_gives_the_evaluate_stage_scores_and_leaves_train_mode_alone(sample_pages, prepared, hangul_checkpoint,
                                                                            tmp_path):
    pages = evaluate.test_pages(sample_pages, prepared / "splits.json", "val")
    expected = evaluate.evaluate_models({"m": str(hangul_checkpoint)}, pages, tmp_path / "pred")["m"].metrics
    loaded = load_recognizer(str(hangul_checkpoint))
    loaded.model.train()
    scores = PageSetScorer(pages)(loaded.model, loaded.charset)
    assert loaded.model.training  # the training loop continues in train mode
    assert expected["e2e_f1"] > 0  # the perturbed model reads something, so a wrong box order would show
    for key in ("e2e_f1", "e2e_precision", "e2e_recall", "e2e_f1_micro"):
        assert scores[key] == expected[key], key
