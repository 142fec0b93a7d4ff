"""The objective registry (names, params, choices) and ObjectiveMix's weights and metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vlmray._registry import UnknownNameError
from vlmray.config.objectives import ObjectiveSpec
from vlmray.distributed import Dist
from vlmray.models.outputs import Outputs
from vlmray.objectives import (
    OBJECTIVES,
    LossResult,
    Objective,
    ObjectiveMix,
    build_objective,
    list_objectives,
    register_objective,
    validate_spec,
    validate_specs,
)
from vlmray.objectives.contrastive.clip import ClipLoss
from vlmray.objectives.registry import _check_params


class Const(Objective):
    """Loss = value * sum(image_embeds) (so gradients show the weights); one metric."""

    needs = frozenset({"image_embeds"})

    def __init__(self, value: float, extra_need: str = "image_embeds") -> None:
        super().__init__()
        self.value = value
        self.needs = frozenset({"image_embeds", extra_need})

    def forward(self, batch: Mapping[str, Tensor], out: Outputs, dist: Dist) -> LossResult:
        return LossResult(self.value * out.image_embeds.sum(), {"value": self.value})


def _outputs() -> Outputs:
    g = torch.Generator().manual_seed(0)
    return Outputs(
        image_embeds=F.normalize(torch.randn(4, 3, generator=g), dim=-1).requires_grad_(),
        text_embeds=F.normalize(torch.randn(4, 3, generator=g), dim=-1),
        logit_scale=torch.tensor(10.0),
    )


def test_clip_is_registered() -> None:
    assert "clip" in list_objectives() and OBJECTIVES.get("clip") is ClipLoss
    assert ClipLoss.name == "clip"


def test_unknown_objective_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown objective 'clp'.*did you mean 'clip'.*valid: .*clip"):
        build_objective(ObjectiveSpec(name="clp"))


def test_build_passes_params_to_config() -> None:
    loss = build_objective(ObjectiveSpec(name="clip", params={"gather": "global", "label_smoothing": 0.1}))
    assert isinstance(loss, ClipLoss)
    assert (loss.cfg.gather, loss.cfg.label_smoothing) == ("global", 0.1)
    assert build_objective(ObjectiveSpec(name="clip")).cfg == ClipLoss.Config()


def test_unknown_param_names_valid_params() -> None:
    spec = ObjectiveSpec(name="clip", params={"gathr": "local"})
    with pytest.raises(UnknownNameError, match=r"no param 'gathr'.*'gather'.*valid params: gather, label_smoothing"):
        validate_spec(spec)
    with pytest.raises(ValueError, match="valid params"):
        build_objective(spec)


def test_bad_literal_names_valid_choices() -> None:
    spec = ObjectiveSpec(name="clip", params={"gather": "everywhere"})
    with pytest.raises(ValueError, match=r"'everywhere'.*valid choices: 'local', 'global', 'local_nograd'"):
        validate_spec(spec)


@pytest.mark.parametrize("params,match", [
    ({"label_smoothing": "0.1"}, "expects float"),
    ({"label_smoothing": True}, "expects float"),
    ({"label_smoothing": 1.0}, r"\[0, 1\)"),
])
def test_bad_values_raise(params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_spec(ObjectiveSpec(name="clip", params=params))


@pytest.mark.parametrize("weight", [-1.0, float("nan"), "1"])
def test_bad_weight_raises(weight: object) -> None:
    with pytest.raises(ValueError, match="weight"):
        validate_spec(ObjectiveSpec(name="clip", weight=weight))  # type: ignore[arg-type]


def test_config_checks_required_fields_and_bools() -> None:
    @dataclass(kw_only=True)
    class Config:
        mode: Literal["a", "b"]
        flag: bool = False
        steps: int = 1

    _check_params("demo", Config, {"mode": "a", "flag": True, "steps": 3})
    with pytest.raises(ValueError, match=r"missing required params \['mode'\]"):
        _check_params("demo", Config, {})
    with pytest.raises(ValueError, match="expects int"):
        _check_params("demo", Config, {"mode": "a", "steps": 1.5})


def test_validate_specs_rejects_duplicates_and_empty() -> None:
    with pytest.raises(ValueError, match="more than once"):
        validate_specs([ObjectiveSpec(name="clip"), ObjectiveSpec(name="clip", weight=2.0)])
    with pytest.raises(ValueError, match="at least one"):
        validate_specs([])


def test_register_rejects_duplicates_and_mismatched_names() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register_objective("clip")(type("Other", (Objective,), {}))
    with pytest.raises(ValueError, match="registers as"):
        register_objective("not_clip_either")(type("Named", (Objective,), {"name": "x"}))
    assert "not_clip_either" not in list_objectives()


def test_mix_weights_metrics_and_needs() -> None:
    mix = ObjectiveMix({"a": Const(2.0), "b": Const(3.0, "text_embeds")}, {"a": 0.5, "b": 2.0})
    assert mix.needs == {"image_embeds", "text_embeds"}
    out = _outputs()
    result = mix({}, out, Dist())
    s = out.image_embeds.sum().item()
    assert result.loss.item() == pytest.approx(0.5 * 2.0 * s + 2.0 * 3.0 * s, rel=1e-5)
    assert result.metrics == pytest.approx(
        {"loss": 7.0 * s, "loss/a": 2.0 * s, "loss/b": 3.0 * s, "a/value": 2.0, "b/value": 3.0}, rel=1e-5
    )
    result.loss.backward()
    torch.testing.assert_close(out.image_embeds.grad, torch.full((4, 3), 7.0))


def test_mix_from_specs_with_clip() -> None:
    mix = ObjectiveMix.from_specs([ObjectiveSpec(name="clip", weight=0.25)])
    out = _outputs()
    clip = ClipLoss()({}, out, Dist())
    result = mix({}, out, Dist())
    torch.testing.assert_close(result.loss, 0.25 * clip.loss)
    assert set(result.metrics) == {"loss", "loss/clip", "clip/acc_i2t", "clip/acc_t2i", "clip/logit_scale"}
    assert result.metrics["loss/clip"] == pytest.approx(clip.loss.item())
    assert mix.needs == ClipLoss.needs


def test_mix_rejects_stray_weights_and_empty() -> None:
    with pytest.raises(ValueError, match="unknown objectives"):
        ObjectiveMix({"a": Const(1.0)}, {"z": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        ObjectiveMix({})
