"""Generated-caption overlap on token ids: corpus BLEU-4 and unigram F1, and ids -> words.

Captioning objectives (``caption``, ``pali``) implement ``Captioner`` and report
``caption_metrics`` from their ``evaluate``; ``caption_examples`` shows a few captions as words.
The hash tokenizer cannot decode ids, so ``inverse_vocab`` maps each id back to the most
frequent word (among given texts) that hashes to it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from vlmray.data.tokenize import _WORD, BOS, EOS, PAD, Tokenizer

if TYPE_CHECKING:
    from vlmray.eval.heldout import HeldOut


class Captioner(Protocol):
    """An objective that can caption images with the decoder it owns."""

    def generate(self, model: nn.Module, pixels: Tensor, *, max_len: int, beam_size: int,
                 bos_id: int, eos_id: int, pad_id: int) -> Tensor:
        """pixels (B, 3, S, S) -> ids (B, max_len) = [BOS, y_1, ..., EOS, PAD...]."""
        ...


def special_tokens(tokenizer: Tokenizer) -> tuple[int, int, int]:
    """(bos, eos, pad) ids: the hash tokenizer's, or a Hugging Face tokenizer's (CLS/SEP when
    it has no BOS/EOS)."""
    hf = getattr(tokenizer, "_tok", None)
    if hf is None:
        return BOS, EOS, PAD
    bos = hf.bos_token_id if hf.bos_token_id is not None else hf.cls_token_id
    eos = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
    pad = hf.pad_token_id if hf.pad_token_id is not None else 0
    if bos is None or eos is None:
        raise ValueError("captioning needs a tokenizer with BOS/CLS and EOS/SEP tokens")
    return int(bos), int(eos), int(pad)


def content(ids: Sequence[int] | Tensor, *, eos_id: int,
            special_ids: Sequence[int]) -> list[int]:
    """The word ids of one caption: everything before the first EOS, specials dropped."""
    row = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    if eos_id in row:
        row = row[: row.index(eos_id)]
    skip = set(special_ids)
    return [int(i) for i in row if i not in skip]


def _ngrams(words: Sequence[int], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(hyps: Sequence[Sequence[int]], refs: Sequence[Sequence[int]]) -> float:
    """Corpus BLEU-4 (Papineni et al., 2002), one reference per hypothesis:
    BP * exp(mean_{n=1..4} log p_n), p_n = clipped n-gram matches / hypothesis n-grams summed
    over the corpus, BP = min(1, exp(1 - r/c)) for total lengths c (hyps) and r (refs).
    Smoothed as Lin & Och (2004): p_n = (m_n + 1) / (l_n + 1) for n >= 2; p_1 unsmoothed
    (no matching word at all -> 0)."""
    if len(hyps) != len(refs):
        raise ValueError(f"bleu4: {len(hyps)} hypotheses for {len(refs)} references")
    matches, totals = [0] * 4, [0] * 4
    c = sum(len(h) for h in hyps)
    r = sum(len(ref) for ref in refs)
    for hyp, ref in zip(hyps, refs):
        for n in range(1, 5):
            h, g = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(count, g[gram]) for gram, count in h.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if c == 0 or matches[0] == 0:
        return 0.0
    logs = [math.log(matches[0] / totals[0])]
    logs += [math.log((matches[n] + 1) / (totals[n] + 1)) for n in range(1, 4)]
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return bp * math.exp(sum(logs) / 4)


def unigram_f1(hyps: Sequence[Sequence[int]], refs: Sequence[Sequence[int]]) -> float:
    """Mean over pairs of the bag-of-words F1: overlap = sum_w min(#w in hyp, #w in ref),
    P = overlap / |hyp|, R = overlap / |ref|, F1 = 2PR / (P + R) (both empty: 1)."""
    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"unigram_f1: need as many (>= 1) hypotheses as references, got "
                         f"{len(hyps)} and {len(refs)}")
    scores = []
    for hyp, ref in zip(hyps, refs):
        if not hyp and not ref:
            scores.append(1.0)
            continue
        overlap = sum((Counter(hyp) & Counter(ref)).values())
        scores.append(0.0 if overlap == 0 else 2 * overlap / (len(hyp) + len(ref)))
    return sum(scores) / len(scores)


def inverse_vocab(tokenizer: Tokenizer, texts: Sequence[str]) -> dict[int, str]:
    """id -> the most frequent word among ``texts`` that the tokenizer maps to that single id
    (words split as the hash tokenizer splits them; words that become several ids are skipped).
    Ties go to the word seen first."""
    counts = Counter(w for text in texts for w in _WORD.findall(text.lower()))
    words = list(counts)
    if not words:
        return {}
    ids, mask = tokenizer(words)
    bos, eos, pad = special_tokens(tokenizer)
    vocab: dict[int, str] = {}
    for word, row, m in zip(words, ids, mask):
        found = content(row[: int(m.sum())].tolist(), eos_id=eos,
                        special_ids=tokenizer.special_ids)
        if len(found) == 1 and (found[0] not in vocab or counts[word] > counts[vocab[found[0]]]):
            vocab[found[0]] = word
    return vocab


def words_of(ids: Sequence[int] | Tensor, vocab: dict[int, str], *, eos_id: int = EOS,
             special_ids: Sequence[int] = (PAD, BOS, EOS)) -> str:
    """One caption's ids as words (``<id>`` for ids missing from ``vocab``)."""
    found = content(ids, eos_id=eos_id, special_ids=special_ids)
    return " ".join(vocab.get(i, f"<{i}>") for i in found)


@torch.no_grad()
def generate_both(objective: Captioner, model: nn.Module, pixels: Tensor, *, max_len: int,
                  beam_size: int, tokenizer: Tokenizer,
                  batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """(greedy ids, beam ids), each (N, max_len), for pixels (N, 3, S, S) in chunks."""
    bos, eos, pad = special_tokens(tokenizer)
    greedy, beam = [], []
    for i in range(0, len(pixels), batch_size):
        chunk = pixels[i:i + batch_size]
        for size, out in ((1, greedy), (beam_size, beam)):
            out.append(objective.generate(model, chunk, max_len=max_len, beam_size=size,
                                          bos_id=bos, eos_id=eos, pad_id=pad).cpu())
    return torch.cat(greedy), torch.cat(beam)


def caption_metrics(objective: Captioner, model: nn.Module, data: HeldOut,
                    tokenizer: Tokenizer, *, prefix: str, samples: int,
                    beam_size: int) -> dict[str, float]:
    """``{prefix}_bleu4_{greedy,beam}`` and ``{prefix}_f1_{greedy,beam}`` of the captions
    generated for the first ``samples`` held-out images against their paired captions."""
    n = min(samples, len(data))
    greedy, beam = generate_both(objective, model, data.pixels[:n],
                                 max_len=data.tokens.shape[1], beam_size=beam_size,
                                 tokenizer=tokenizer)
    _, eos, _ = special_tokens(tokenizer)
    specials = tokenizer.special_ids

    def words(rows: Tensor) -> list[list[int]]:
        return [content(r, eos_id=eos, special_ids=specials) for r in rows]

    refs = words(data.tokens[:n])
    metrics = {}
    for name, ids in (("greedy", greedy), ("beam", beam)):
        hyps = words(ids)
        metrics[f"{prefix}_bleu4_{name}"] = bleu4(hyps, refs)
        metrics[f"{prefix}_f1_{name}"] = unigram_f1(hyps, refs)
    return metrics


def caption_examples(objective: Captioner, model: nn.Module, data: HeldOut,
                     tokenizer: Tokenizer, n: int = 5, beam_size: int = 3) -> list[dict]:
    """For the first ``n`` held-out images: ``{"key", "reference", "greedy", "beam"}``, the
    captions as words (ids mapped back through ``inverse_vocab`` of the held-out texts).
    Objective and model run in eval mode and get their modes back."""
    n = min(n, len(data))
    modules = [m for m in (objective, model) if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    greedy, beam = generate_both(objective, model, data.pixels[:n],
                                 max_len=data.tokens.shape[1], beam_size=beam_size,
                                 tokenizer=tokenizer)
    for m, mode in zip(modules, modes):
        m.train(mode)
    vocab = inverse_vocab(tokenizer, data.texts)
    _, eos, _ = special_tokens(tokenizer)
    kw = {"eos_id": eos, "special_ids": tokenizer.special_ids}
    keys = data.keys or [str(i) for i in range(len(data))]
    return [{"key": keys[i], "reference": words_of(data.tokens[i], vocab, **kw),
             "greedy": words_of(greedy[i], vocab, **kw), "beam": words_of(beam[i], vocab, **kw)}
            for i in range(n)]


__all__ = ["Captioner", "bleu4", "caption_examples", "caption_metrics", "content",
           "generate_both", "inverse_vocab", "special_tokens", "unigram_f1", "words_of"]
