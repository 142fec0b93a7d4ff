"""Region-word grounding accuracy: the held-out sidecars' boxes parsed, and ``grounding_top1``
of a real tiny model (regionword_tiny's towers) against a one-box-at-a-time reference;
``ObjectiveMix.evaluate`` reports it through the ``regionword`` objective.

    pytest tests/eval/test_grounding.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.models.test_regions import reference_pool
from vlmray.config.data import SyntheticConfig
from vlmray.data import schema
from vlmray.data.decode import prepare_rows
from vlmray.data.ingest import decode_spec, tokenizer_for
from vlmray.data.synthetic import TEMPLATES, make_sample
from vlmray.data.synthetic_text import CLASSNAMES
from vlmray.eval.grounding import grounding_metrics, heldout_boxes
from vlmray.eval.heldout import HeldOut
from vlmray.recipes import recipe
from vlmray.train.state import build_state
from vlmray.validate import validate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _heldout(cfg, n: int = 12) -> HeldOut:
    syn = SyntheticConfig(num_train=n, num_eval=n, image_size=48, shard_size=n)
    samples = [make_sample(syn, "eval", i) for i in range(n)]
    rows = prepare_rows([s[schema.KEY] for s in samples], [s[schema.IMAGE] for s in samples],
                        [s[schema.TEXT] for s in samples], [s[schema.META] for s in samples],
                        decode_spec(cfg.data), tokenizer_for(cfg.data))
    metas = [s[schema.META] for s in samples]
    metas[1] = json.dumps({schema.LABEL: 3})          # a row without boxes is skipped
    return HeldOut(pixels=torch.from_numpy(rows[schema.PIXELS]),
                   tokens=torch.from_numpy(rows[schema.TOKENS]),
                   token_mask=torch.from_numpy(rows[schema.TOKEN_MASK]),
                   labels=torch.from_numpy(rows[schema.LABEL]), classnames=list(CLASSNAMES),
                   templates=list(TEMPLATES), metas=metas)


def test_heldout_boxes_parse_sidecars() -> None:
    cfg = validate(recipe("regionword_tiny"))
    data = _heldout(cfg)
    boxes, classes, keep = heldout_boxes(data)
    assert keep.tolist() == [i != 1 for i in range(len(data))]
    for row, meta in enumerate(data.metas):
        side = json.loads(meta)
        n = len(side.get(schema.BOXES, []))
        assert (classes[row] >= 0).sum() == n
        if n:
            torch.testing.assert_close(boxes[row, :n], torch.tensor(side[schema.BOXES]))
            assert (classes[row, :n] == CLASSNAMES.index(side[schema.PHRASES][0])).all()
            assert int(data.labels[row]) == CLASSNAMES.index(side[schema.PHRASES][0])


def test_grounding_top1_matches_per_box_reference() -> None:
    cfg = validate(recipe("regionword_tiny", **{"train.device": "cpu"}))
    state = build_state(cfg, device=torch.device("cpu"))
    model, obj = state.core.eval(), state.mix.objectives["regionword"]
    with torch.no_grad():                                  # a head that is not the identity
        obj.head.weight.add_(0.2 * torch.randn_like(obj.head.weight))
    data, tok = _heldout(cfg), tokenizer_for(cfg.data)
    got = grounding_metrics(model, data, tok, region_features=obj.region_features,
                            batch_size=5)
    assert got["grounding_chance"] == pytest.approx(1 / 20)

    hits = total = 0
    with torch.no_grad():
        phrases = []
        for name in CLASSNAMES:                          # one class name at a time
            ids, mask = (torch.from_numpy(a) for a in tok([name]))
            states = model.encode_text(ids, mask)[1][0]
            n_words = len(name.split())
            phrases.append(F.normalize(states[1:1 + n_words].double().mean(0), dim=0))
        phrase = torch.stack(phrases)
        gh, gw, _ = model.vision.patch_grid
        weight, bias = obj.head.weight.double(), obj.head.bias.double()
        for row, meta in enumerate(data.metas):
            side = json.loads(meta)
            tokens = model.encode_image(data.pixels[row:row + 1], tokens=True)[1].double()
            for box, name in zip(side.get(schema.BOXES, []), side.get(schema.PHRASES, [])):
                pooled = reference_pool(tokens, (gh, gw), torch.tensor([[box]]).double(), 1)
                region = F.normalize(weight @ pooled[0, 0] + bias, dim=0)
                hits += int((region @ phrase.T).argmax()) == CLASSNAMES.index(name)
                total += 1
    assert total > len(data)
    assert got["grounding_top1"] == pytest.approx(hits / total)
    metrics = state.mix.evaluate(model, data, tok)
    assert metrics["grounding_top1"] == pytest.approx(got["grounding_top1"])
