"""The run summary (``metrics.json``) carries every figure of the last evaluation, including
those the objectives and the model measure themselves, the best evaluation by zero-shot top-1
with its step, and ``"eval": "none"`` for a run that made none."""

from __future__ import annotations

from vlmray.api import _summarise


def test_summary_keeps_objective_eval_metrics_and_drops_training_metrics() -> None:
    rows = [
        {"step": 10, "loss": 3.0, "lr": 1e-3, "loss/caption": 5.0, "caption/token_acc": 0.2,
         "samples_per_s": 100.0},
        {"step": 20, "loss": 2.0, "lr": 1e-3, "loss/caption": 4.0, "caption/token_acc": 0.3,
         "samples_per_s": 120.0, "zero_shot_top1": 0.3, "zero_shot_chance": 0.05,
         "caption_bleu4_greedy": 0.12, "itm_accuracy": 0.5, "seg_miou": 0.02},
    ]
    summary = _summarise(rows, {"rows_in": 40}, wall_s=2.0)
    assert summary["zero_shot_top1"] == 0.3 and summary["rows_in"] == 40
    assert summary["caption_bleu4_greedy"] == 0.12
    assert summary["itm_accuracy"] == 0.5 and summary["seg_miou"] == 0.02
    assert summary["final_loss"] == 2.0 and summary["steps"] == 20
    assert "loss/caption" not in summary and "caption/token_acc" not in summary
    assert summary["samples_per_s"] in (100.0, 120.0)


def test_summary_holds_the_last_and_the_best_evaluation_with_their_steps() -> None:
    rows = [
        {"step": 100, "loss": 2.0, "zero_shot_top1": 0.5, "zero_shot_top5": 0.9,
         "retrieval_i2t_r1": 0.2},
        {"step": 150, "loss": 1.9},
        {"step": 200, "loss": 1.5, "zero_shot_top1": 0.867, "zero_shot_top5": 0.99,
         "retrieval_i2t_r1": 0.4},
        {"step": 300, "loss": 1.4, "zero_shot_top1": 0.867, "zero_shot_top5": 0.98},  # a tie
        {"step": 400, "loss": 1.3, "zero_shot_top1": 0.806, "zero_shot_top5": 0.97,
         "retrieval_i2t_r1": 0.5},
    ]
    summary = _summarise(rows, {}, wall_s=1.0)
    assert summary["zero_shot_top1"] == 0.806 and summary["last_eval_step"] == 400
    assert summary["retrieval_i2t_r1"] == 0.5                      # the last evaluation's
    assert summary["best_zero_shot_top1"] == 0.867 and summary["best_step"] == 200
    assert summary["best_eval"] == {"zero_shot_top1": 0.867, "zero_shot_top5": 0.99,
                                    "retrieval_i2t_r1": 0.4}
    assert summary["eval"] == "held-out" and summary["evaluations"] == 4


def test_summary_of_a_run_without_evaluation_says_none() -> None:
    summary = _summarise([{"step": 10, "loss": 3.0}], {}, wall_s=1.0)
    assert summary["eval"] == "none" and summary["evaluations"] == 0
    assert summary["zero_shot_top1"] is None and summary["best_zero_shot_top1"] is None
    assert summary["best_step"] is None and summary["last_eval_step"] is None
    assert summary["best_eval"] == {}
    assert _summarise([], {}, wall_s=0.0)["eval"] == "none"
