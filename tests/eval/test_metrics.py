"""Zero-shot and retrieval metrics against brute-force references, and evaluate() end to end.

    pytest tests/eval/test_metrics.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vlmray.config import ModelConfig
from vlmray.config.data import SyntheticConfig
from vlmray.data.decode import DecodeSpec
from vlmray.data.synthetic import CLASSNAMES, TEMPLATES, write_synthetic
from vlmray.data.tokenize import HashTokenizer
from vlmray.eval import HeldOut, evaluate, load_heldout, recall_at_k, topk_accuracy
from vlmray.eval.heldout import class_prompts
from vlmray.eval.metrics import class_embeddings
from vlmray.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ref_topk(logits: Tensor, labels: Tensor, k: int) -> float:
    """Brute force: a row is a hit when fewer than k classes score above its label."""
    hits = 0
    for row, y in zip(logits.tolist(), labels.tolist()):
        hits += sum(v > row[y] for v in row) < k
    return hits / len(labels)


def test_topk_accuracy_hand_computed() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0],                        # label 1: rank 1
                           [0.5, 0.2, 0.3],                        # label 2: rank 2
                           [0.1, 0.2, 0.7],                        # label 0: rank 3
                           [0.9, 0.05, 0.05]])                     # label 0: rank 1
    labels = torch.tensor([1, 2, 0, 0])
    assert topk_accuracy(logits, labels, (1, 2, 3)) == {1: 0.5, 2: 0.75, 3: 1.0}
    assert topk_accuracy(logits, labels, (5,)) == {5: 1.0}          # k > C: every row is a hit


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_accuracy_matches_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits, labels = torch.randn(50, 12, generator=g), torch.randint(0, 12, (50,), generator=g)
    got = topk_accuracy(logits, labels, (1, 3, 5))
    for k in (1, 3, 5):
        assert got[k] == pytest.approx(ref_topk(logits, labels, k))


def test_recall_at_k_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(30, 8, generator=g), dim=-1)
    got = recall_at_k(img, txt, (1, 5, 10))
    sims = (img @ txt.T).tolist()
    for k in (1, 5, 10):
        i2t = sum(sum(s > row[i] for s in row) < k for i, row in enumerate(sims)) / 30
        cols = list(zip(*sims))
        t2i = sum(sum(s > col[i] for s in col) < k for i, col in enumerate(cols)) / 30
        assert got[f"retrieval_i2t_r{k}"] == pytest.approx(i2t)
        assert got[f"retrieval_t2i_r{k}"] == pytest.approx(t2i)
    assert 0 < got["retrieval_i2t_r1"] < 1                          # a non-trivial case


def test_recall_is_perfect_for_identical_embeddings_and_directional() -> None:
    e = F.normalize(torch.randn(10, 4), dim=-1)
    assert set(recall_at_k(e, e).values()) == {1.0}
    sims = torch.tensor([[0.9, 0.1, 0.0],                           # image 0 -> text 0: hit
                         [0.8, 0.5, 0.0],                           # image 1 -> text 0: miss
                         [0.0, 0.0, 0.3]])                          # image 2 -> text 2: hit
    out = recall_at_k(torch.eye(3), sims.T, (1, 2))                 # img @ txt.T == sims
    assert out["retrieval_i2t_r1"] == pytest.approx(2 / 3)
    assert out["retrieval_t2i_r1"] == pytest.approx(1.0)           # each text: its own image
    assert out["retrieval_i2t_r2"] == pytest.approx(1.0)


def test_class_embeddings_average_templates() -> None:
    prompts = F.normalize(torch.randn(3 * 4, 5), dim=-1)            # 3 classes x 4 templates
    got = class_embeddings(prompts, 3)
    want = torch.stack([F.normalize(prompts[4 * c:4 * c + 4].mean(0), dim=0) for c in range(3)])
    torch.testing.assert_close(got, want)
    assert class_prompts(["red circle", "blue square"], ["a {}.", "the {}!"]) == [
        "a red circle.", "the red circle!", "a blue square.", "the blue square!"]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> tuple[HeldOut, HashTokenizer]:
    root = tmp_path_factory.mktemp("eval_ds")
    write_synthetic(SyntheticConfig(num_train=10, num_eval=40, image_size=32, shard_size=25),
                    str(root))
    tok = HashTokenizer(vocab_size=512, context_length=16)
    data = load_heldout(str(root / "eval"), DecodeSpec(image_size=32), tok, max_samples=1000)
    return data, tok


def test_load_heldout(heldout: tuple[HeldOut, HashTokenizer]) -> None:
    data, _ = heldout
    assert len(data) == 40 and data.rows_rejected == 0
    assert data.pixels.shape == (40, 3, 32, 32) and data.pixels.dtype == torch.uint8
    assert data.tokens.shape == data.token_mask.shape == (40, 16)
    assert data.classnames == CLASSNAMES and data.templates == TEMPLATES
    assert data.labels.min() >= 0 and data.labels.max() < 20


def test_evaluate_tiny_model(heldout: tuple[HeldOut, HashTokenizer]) -> None:
    data, tok = heldout
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(vision_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
                    text={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 64}, embed_dim=16),
        image_size=32, vocab_size=tok.vocab_size, context_length=tok.context_length)
    model.train()
    small = evaluate(model, data, tok, batch_size=16)              # several batches
    assert model.training                                           # mode restored
    keys = {"zero_shot_top1", "zero_shot_top5", "zero_shot_chance"} | {
        f"retrieval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert set(small) == keys
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in small.values())
    assert small["zero_shot_chance"] == pytest.approx(1 / 20)
    assert small["zero_shot_top1"] <= small["zero_shot_top5"]
    for d in ("i2t", "t2i"):
        r1, r5, r10 = (small[f"retrieval_{d}_r{k}"] for k in (1, 5, 10))
        assert r1 <= r5 <= r10
    big = evaluate(model, data, tok, batch_size=1000)               # batching changes nothing
    assert big == pytest.approx(small)

    # zero-shot top-1 against a plain recomputation
    model.eval()
    with torch.no_grad():
        img = model.encode_image(data.pixels)[0]
        ids, mask = tok([t.format(c) for c in data.classnames for t in data.templates])
        txt = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))[0]
        classes = F.normalize(txt.view(20, len(data.templates), -1).mean(1), dim=-1)
        pred = (img @ classes.T).argmax(1)
    assert small["zero_shot_top1"] == pytest.approx((pred == data.labels).float().mean().item())
