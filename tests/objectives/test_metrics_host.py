"""Objective metrics stay on the device: objectives and ObjectiveMix return detached 0-d
tensors, and ``host_metrics`` reads them all with one ``.tolist()``.

    pytest tests/objectives/test_metrics_host.py -q
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from vlmray.distributed import Dist
from vlmray.models.outputs import Outputs
from vlmray.objectives.base import host_metrics, stack_metrics
from vlmray.objectives.contrastive.clip import ClipLoss
from vlmray.objectives.contrastive.siglip import SigLipLoss
from vlmray.objectives.mix import ObjectiveMix

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
"""Tensor methods that copy a value to the host (a device sync on an accelerator)."""


@contextmanager
def counting_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter]:
    """Counts calls of ``READS`` on any tensor while the block runs."""
    calls: Counter = Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _name: str = name,
                    _original: object = original) -> object:
            calls[_name] += 1
            return _original(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        yield calls
    finally:
        monkeypatch.undo()


def _outputs(n: int = 6, d: int = 4) -> Outputs:
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    return Outputs(image_embeds=image, text_embeds=text, logit_scale=torch.tensor(10.0),
                   logit_bias=torch.tensor(-2.0))


def test_host_metrics_gives_what_item_and_tolist_give() -> None:
    metrics = {"f32": torch.tensor(0.1), "f64": torch.tensor(0.1, dtype=torch.float64),
               "bf16": torch.tensor(0.1, dtype=torch.bfloat16), "count": torch.tensor(7),
               "flag": torch.tensor(True), "vec": torch.tensor([[1.5, 2.5]]),
               "empty": torch.zeros(0), "plain": 3.0, "steps": 4}
    got = host_metrics(metrics)
    assert set(got) == set(metrics)
    for key, value in metrics.items():
        want = value.tolist() if isinstance(value, torch.Tensor) else value
        assert got[key] == want and type(got[key]) is type(want), key
    assert host_metrics({"lr": 0.1}) == {"lr": 0.1}


def test_host_metrics_reads_the_device_once(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = {f"m{i}": torch.tensor(float(i)) for i in range(20)}
    metrics["n"] = torch.tensor(3)
    with counting_reads(monkeypatch) as calls:
        got = host_metrics(metrics)
    assert calls == Counter(tolist=1)
    assert got["m7"] == 7.0 and got["n"] == 3


def test_stack_metrics_copies_and_detaches() -> None:
    buffer = torch.tensor(2.0, dtype=torch.float64)
    loss = torch.tensor(1.0, requires_grad=True) * 3
    got = stack_metrics(("a", "b"), (buffer, loss.double()))
    buffer.fill_(5.0)                                    # a buffer moving on later
    assert not any(v.requires_grad for v in got.values())
    assert all(v.ndim == 0 and v.dtype == torch.float64 for v in got.values())
    assert host_metrics(got) == {"a": 2.0, "b": 3.0}


def test_mix_returns_device_metrics_without_reading_them(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _outputs()
    mix = ObjectiveMix({"clip": ClipLoss(), "siglip": SigLipLoss()}, {"siglip": 0.5})
    with counting_reads(monkeypatch) as calls:
        result = mix({}, out, Dist())
    assert sum(calls.values()) == 0, calls
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad
               for v in result.metrics.values())
    host = host_metrics(result.metrics)
    clip, siglip = ClipLoss()({}, out, Dist()), SigLipLoss()({}, out, Dist())
    assert host["loss"] == (clip.loss + 0.5 * siglip.loss).float().item() == result.loss.item()
    assert host["loss/clip"] == clip.loss.float().item()
    assert host["loss/siglip"] == siglip.loss.float().item()
    for name, part in (("clip", clip), ("siglip", siglip)):
        for key, value in part.metrics.items():
            assert host[f"{name}/{key}"] == value.item()
            assert type(host[f"{name}/{key}"]) is float
