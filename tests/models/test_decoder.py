"""TextDecoder, beam search, AttentionalPooler and the PaLI EncoderDecoder: causality, masks,
greedy decoding against a hand-unrolled argmax, beam search on a constructed case, shapes.

    pytest tests/models/test_decoder.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from vlmray.models.decoder import AttentionalPooler, TextDecoder, beam_search, sequence_score
from vlmray.models.encdec import EncoderDecoder

V, D, PAD, BOS, EOS = 12, 16, 0, 1, 2


def _decoder(seed: int = 0, **kw: int) -> TextDecoder:
    torch.manual_seed(seed)
    return TextDecoder(V, D, heads=2, max_len=10, **kw).double().eval()


def _memory(b: int = 3, m: int = 4, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, m, D, generator=g, dtype=torch.float64)


def test_causal_changing_a_later_token_leaves_earlier_logits() -> None:
    dec, mem = _decoder(), _memory()
    ids = torch.randint(3, V, (3, 7), generator=torch.Generator().manual_seed(0))
    logits = dec(ids, None, mem)
    assert logits.shape == (3, 7, V)
    for t in range(6):
        changed = ids.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1 - 3) % (V - 3) + 3
        new = dec(changed, None, mem)
        torch.testing.assert_close(new[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-12)
        assert (new[:, t + 1] - logits[:, t + 1]).abs().max() > 1e-6


def test_memory_mask_and_padding_respected() -> None:
    dec, mem = _decoder(), _memory()
    ids = torch.randint(3, V, (3, 5), generator=torch.Generator().manual_seed(2))
    mem_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    logits = dec(ids, None, mem, mem_mask)
    noisy = mem.masked_fill(~mem_mask[..., None], 5.0)      # masked slots must not matter
    torch.testing.assert_close(dec(ids, None, noisy, mem_mask), logits, rtol=0, atol=1e-12)
    assert (dec(ids, None, noisy) - logits).abs().max() > 1e-6   # without the mask they do
    # a masked row equals the same row decoded with its memory cut to the real slots
    torch.testing.assert_close(dec(ids[2:], None, mem[2:, :1])[0], logits[2], rtol=0,
                               atol=1e-12)
    # padded text keys are never attended to by real positions
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    ids_noisy = torch.where(mask.bool(), ids, 7)
    real = mask.bool()
    torch.testing.assert_close(dec(ids_noisy, mask, mem)[real], dec(ids, mask, mem)[real])


def _greedy_by_hand(dec: TextDecoder, mem: Tensor, max_len: int) -> Tensor:
    out = []
    for row in range(mem.shape[0]):
        seq = [BOS]
        while len(seq) < max_len and seq[-1] != EOS:
            logits = dec(torch.tensor([seq]), None, mem[row:row + 1])[0, -1].clone()
            logits[[BOS, PAD]] = -math.inf
            seq.append(int(logits.argmax()))
        out.append(seq + [PAD] * (max_len - len(seq)))
    return torch.tensor(out)


@pytest.mark.parametrize("seed", [0, 3])
def test_greedy_equals_hand_unrolled_argmax_and_beam1(seed: int) -> None:
    dec = _decoder(seed)
    with torch.no_grad():            # make EOS likely somewhere so stopping is exercised
        dec.head_bias[EOS] = 1.5
    mem = _memory(4, seed=seed)
    want = _greedy_by_hand(dec, mem, 8)
    got = dec.generate(mem, max_len=8, beam_size=1, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got[:, 0] == BOS).all() and not ((got == BOS)[:, 1:]).any()
    assert (got == EOS).any(), got       # some row stopped, padded after its EOS
    for row in got.tolist():
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1:])


def test_beam_scores_are_length_normalised_logprobs_of_its_output() -> None:
    dec, mem = _decoder(5), _memory(3, seed=5)
    with torch.no_grad():
        dec.head_bias[EOS] = 1.0

    def step(ids: Tensor) -> Tensor:
        return dec(ids, None, mem.repeat_interleave(3, 0))[:, -1].log_softmax(-1)

    ids, score = beam_search(step, 3, max_len=8, beam_size=3, bos_id=BOS, eos_id=EOS,
                             pad_id=PAD, banned=(BOS, PAD))
    want = sequence_score(lambda x: dec(x, None, mem).log_softmax(-1), ids, eos_id=EOS,
                          pad_id=PAD)
    torch.testing.assert_close(score, want.to(score.dtype), rtol=1e-5, atol=1e-6)
    greedy = dec.generate(mem, max_len=8, beam_size=1, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    greedy_score = sequence_score(lambda x: dec(x, None, mem).log_softmax(-1), greedy,
                                  eos_id=EOS, pad_id=PAD)
    assert (want >= greedy_score - 1e-9).all(), (want, greedy_score)


# A scripted next-token model over ids {0 PAD, 1 BOS, 2 EOS, 3 a, 4 b, 5 c}: greedy takes
# "a" (0.55) then "c" (0.35) then EOS: S = (ln .55 + ln .35 + ln 1) / 3 = -0.549; the beam
# finds "b" (0.45) EOS (0.95): S = (ln .45 + ln .95) / 2 = -0.425.
TABLE = {(BOS,): {3: 0.55, 4: 0.45}, (BOS, 3): {5: 0.35, 4: 0.34, EOS: 0.31},
         (BOS, 4): {EOS: 0.95, 5: 0.05}}


def _scripted(ids: Tensor) -> Tensor:
    rows = []
    for seq in ids.tolist():
        probs = TABLE.get(tuple(seq), {EOS: 1.0})
        row = torch.full((6,), 1e-12, dtype=torch.float64)
        for token, p in probs.items():
            row[token] = p
        rows.append((row / row.sum()).log())
    return torch.stack(rows)


def test_beam_beats_greedy_on_constructed_case() -> None:
    kw = dict(max_len=5, bos_id=BOS, eos_id=EOS, pad_id=PAD, banned=(BOS, PAD))
    greedy, g_score = beam_search(_scripted, 1, beam_size=1, **kw)
    beam, b_score = beam_search(_scripted, 1, beam_size=2, **kw)
    assert greedy.tolist() == [[BOS, 3, 5, EOS, PAD]]
    assert beam.tolist() == [[BOS, 4, EOS, PAD, PAD]]
    assert g_score.item() == pytest.approx((math.log(0.55) + math.log(0.35)) / 3, abs=1e-6)
    assert b_score.item() == pytest.approx((math.log(0.45) + math.log(0.95)) / 2, abs=1e-6)
    assert b_score.item() > g_score.item()


def test_attentional_pooler_shapes_and_token_order_invariance() -> None:
    torch.manual_seed(0)
    pool = AttentionalPooler(D, n_queries=5, heads=2).double()
    tokens = _memory(2, m=7)
    out = pool(tokens)
    assert out.shape == (2, 5, D)
    torch.testing.assert_close(pool(tokens.flip(1)), out)     # cross-attention: a set pooling
    with pytest.raises(ValueError, match="n_queries"):
        AttentionalPooler(D, n_queries=0)


def test_encoder_decoder_bidirectional_prefix_padding_and_generate() -> None:
    torch.manual_seed(0)
    model = EncoderDecoder(V, D, encoder_layers=1, decoder_layers=1, heads=2,
                           max_len=10).double().eval()
    assert model.encoder.embed is model.decoder.embed          # shared token embedding
    img = _memory(2, m=3)
    prefix = torch.tensor([[5, 6, 7], [8, 0, 0]])
    pmask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    memory, real = model.encode(img, prefix, pmask)
    assert memory.shape == (2, 6, D) and real.tolist() == [[True] * 6, [True] * 4 + [False] * 2]
    # bidirectional: the last prefix word changes the image positions' states
    changed, _ = model.encode(img, torch.tensor([[5, 6, 9], [8, 0, 0]]), pmask)
    assert (changed[0, :3] - memory[0, :3]).abs().max() > 1e-6
    # padded prefix slots change nothing real
    other, _ = model.encode(img, torch.tensor([[5, 6, 7], [8, 4, 4]]), pmask)
    torch.testing.assert_close(other[real], memory[real])
    target = torch.tensor([[BOS, 3, 4], [BOS, 5, EOS]])
    assert model(img, prefix, pmask, target).shape == (2, 3, V)
    empty = torch.zeros(2, 0, dtype=torch.long)
    ids = model.generate(img, empty, empty, max_len=6, beam_size=2, bos_id=BOS, eos_id=EOS,
                         pad_id=PAD)
    assert ids.shape == (2, 6) and (ids[:, 0] == BOS).all()


def test_decoder_errors() -> None:
    dec = _decoder()
    with pytest.raises(ValueError, match="max_len"):
        dec(torch.ones(1, 11, dtype=torch.long), None, _memory(1))
    with pytest.raises(ValueError, match="memory"):
        dec(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        TextDecoder(V, 10, heads=3)
    with pytest.raises(ValueError, match="layer"):
        TextDecoder(V, D, unimodal_layers=0, multimodal_layers=0)
    text_only = TextDecoder(V, D, unimodal_layers=1, multimodal_layers=0, heads=2)
    assert text_only(torch.ones(2, 3, dtype=torch.long)).shape == (2, 3, V)
