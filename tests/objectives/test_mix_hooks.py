"""ObjectiveMix.prepare (columns objectives add before the forward) and ObjectiveMix.evaluate
(held-out metrics from the objectives' own parts)."""

from __future__ import annotations

import pytest
import torch

from vlmray.objectives import LossResult, Objective, ObjectiveMix


class _Masker(Objective):
    name = "masker_test"

    def __init__(self, fill: bool, metric: str = "") -> None:
        super().__init__()
        self.fill, self.metric = fill, metric
        self.seen_training: list[bool] = []

    def prepare(self, batch):
        return {"patch_mask": torch.full((2, 4), self.fill), "seen": batch["x"] + 1}

    def forward(self, batch, out, dist):
        return LossResult(loss=torch.zeros(()))

    def evaluate(self, model, data, tokenizer):
        self.seen_training.append(self.training)
        return {self.metric: 1.0} if self.metric else {}


def test_prepare_adds_columns_first_objective_wins_and_never_replaces_batch() -> None:
    first, second = _Masker(True), _Masker(False)
    mix = ObjectiveMix({"a": first, "b": second})
    batch = {"x": torch.zeros(2), "seen": torch.full((2,), 7.0)}
    out = mix.prepare(batch)
    assert out["patch_mask"].all()                      # a's mask, shared with b
    assert torch.equal(out["seen"], torch.full((2,), 7.0))   # the batch's column is kept
    assert set(batch) == {"x", "seen"}                  # the input mapping is not changed


def test_evaluate_merges_metrics_in_eval_mode_and_rejects_clashes() -> None:
    a, b = _Masker(True, "a_acc"), _Masker(True, "b_acc")
    mix = ObjectiveMix({"a": a, "b": b}).train()
    assert mix.evaluate(torch.nn.Linear(1, 1), None, None) == {"a_acc": 1.0, "b_acc": 1.0}
    assert a.seen_training == [False] and a.training    # evaluated in eval mode, restored
    clash = ObjectiveMix({"a": _Masker(True, "acc"), "b": _Masker(True, "acc")})
    with pytest.raises(ValueError, match="acc"):
        clash.evaluate(torch.nn.Linear(1, 1), None, None)
