"""The run summary (``metrics.json``) carries every figure of the last evaluation, including
those the objectives and the model measure themselves."""

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
