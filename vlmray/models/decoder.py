"""A causal text decoder (CoCa / PaLI style) with greedy and beam-search generation, and CoCa's
attentional pooler.

    decoder = TextDecoder(vocab_size=1024, dim=128, unimodal_layers=1, multimodal_layers=2)
    logits = decoder(ids, mask, memory, memory_mask)          # (B, L, V)
    ids = decoder.generate(memory, max_len=16, beam_size=3, bos_id=1, eos_id=2, pad_id=0)

``unimodal_layers`` blocks see only the text (causal self-attention); the ``multimodal_layers``
blocks after them also cross-attend to a memory (B, M, D): image tokens, an attentional
pooler's outputs, or an encoder's states. The LM head is tied to the token embedding.
Single-device code: no collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

StepFn = Callable[[Tensor], Tensor]
"""ids (N, t) -> log-probabilities (N, V) of the next token after each prefix."""


class Attention(nn.Module):
    """Multi-head attention with a boolean mask (True = may attend), any float dtype."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"attention: dim={dim} is not divisible by heads={heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, allow: Tensor | None) -> Tensor:
        """x (B, L, D), context (B, M, D), allow (B, 1, L, M) or (B, 1, 1, M) -> (B, L, D)."""
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)               # (B, H, L, d)
        k, v = self.kv(context).view(b, -1, 2, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=allow)                  # (B, H, L, d)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, MLP.

        x <- x + SelfAttn(LN(x));  [x <- x + CrossAttn(LN(x), LN(memory))];  x <- x + MLP(LN(x))
    """

    def __init__(self, dim: int, heads: int, *, cross: bool, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = max(1, int(dim * mlp_ratio))
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.cross = cross
        if cross:
            self.norm_cross = nn.LayerNorm(dim)
            self.norm_memory = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, allow: Tensor, memory: Tensor | None = None,
                memory_allow: Tensor | None = None) -> Tensor:
        """x (B, L, D), allow (B, 1, L, L); memory (B, M, D), memory_allow (B, 1, 1, M)."""
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, allow)
        if self.cross:
            if memory is None:
                raise ValueError("a cross-attention block needs a memory (B, M, D)")
            x = x + self.cross_attn(self.norm_cross(x), self.norm_memory(memory), memory_allow)
        return x + self.mlp(self.norm_mlp(x))


def self_attention_mask(mask: Tensor | None, length: int, *, causal: bool,
                        device: torch.device) -> Tensor:
    """(B or 1, 1, L, L) bool, True = query i may attend to key j: j <= i when ``causal``, and
    key j is real (``mask`` (B, L), nonzero = real). Every position may attend to itself, so
    no row is empty (padded queries produce unused but finite states)."""
    allow = torch.ones(length, length, dtype=torch.bool, device=device)
    if causal:
        allow = allow.tril()
    allow = allow[None, None]
    if mask is not None:
        allow = allow & mask.bool()[:, None, None, :]
    return allow | torch.eye(length, dtype=torch.bool, device=device)


def memory_attention_mask(memory_mask: Tensor | None) -> Tensor | None:
    """(B, M) nonzero = real memory slot -> (B, 1, 1, M) bool, or None (all real)."""
    return None if memory_mask is None else memory_mask.bool()[:, None, None, :]


class TextDecoder(nn.Module):
    """ids (B, L) -> next-token logits (B, L, V): token + learned position embeddings,
    ``unimodal_layers`` causal text blocks, ``multimodal_layers`` causal blocks with
    cross-attention to ``memory``, a final LayerNorm and the embedding-tied LM head (+ bias)."""

    def __init__(self, vocab_size: int, dim: int, *, unimodal_layers: int = 1,
                 multimodal_layers: int = 2, heads: int = 4, max_len: int = 64,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if vocab_size < 2 or dim < 1 or heads < 1 or max_len < 2:
            raise ValueError(f"TextDecoder needs vocab_size >= 2, dim >= 1, heads >= 1, "
                             f"max_len >= 2; got {vocab_size}, {dim}, {heads}, {max_len}")
        if unimodal_layers < 0 or multimodal_layers < 0 or unimodal_layers + multimodal_layers < 1:
            raise ValueError(f"TextDecoder needs >= 1 layer and no negative counts; got "
                             f"unimodal_layers={unimodal_layers}, "
                             f"multimodal_layers={multimodal_layers}")
        if dim % heads != 0:
            raise ValueError(f"TextDecoder: dim={dim} is not divisible by heads={heads}")
        self.vocab_size, self.dim, self.max_len = vocab_size, dim, max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.01)
        self.blocks = nn.ModuleList(
            [Block(dim, heads, cross=False, mlp_ratio=mlp_ratio) for _ in range(unimodal_layers)]
            + [Block(dim, heads, cross=True, mlp_ratio=mlp_ratio)
               for _ in range(multimodal_layers)])
        self.norm = nn.LayerNorm(dim)
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))

    @property
    def needs_memory(self) -> bool:
        return any(block.cross for block in self.blocks)

    def forward(self, ids: Tensor, mask: Tensor | None = None, memory: Tensor | None = None,
                memory_mask: Tensor | None = None) -> Tensor:
        """ids (B, L), mask (B, L) nonzero = real, memory (B, M, D), memory_mask (B, M) ->
        logits (B, L, V); position t sees tokens <= t only."""
        b, length = ids.shape
        if length > self.max_len:
            raise ValueError(f"TextDecoder: sequence of {length} tokens exceeds max_len="
                             f"{self.max_len}")
        if self.needs_memory and (memory is None or memory.ndim != 3 or memory.shape[0] != b):
            got = None if memory is None else tuple(memory.shape)
            raise ValueError(f"TextDecoder: need memory ({b}, M, {self.dim}), got {got}")
        x = self.embed(ids) + self.pos[:length]                                 # (B, L, D)
        allow = self.self_attention_mask(mask, length, ids.device)
        memory_allow = memory_attention_mask(memory_mask)
        for block in self.blocks:
            x = block(x, allow, memory, memory_allow)
        return F.linear(self.norm(x), self.embed.weight, self.head_bias)        # (B, L, V)

    @staticmethod
    def self_attention_mask(mask: Tensor | None, length: int, device: torch.device) -> Tensor:
        return self_attention_mask(mask, length, causal=True, device=device)

    @torch.no_grad()
    def generate(self, memory: Tensor | None, memory_mask: Tensor | None = None, *,
                 max_len: int, beam_size: int = 1, bos_id: int, eos_id: int,
                 pad_id: int) -> Tensor:
        """Captions for each memory row: ids (B, max_len) = [BOS, y_1, ..., EOS, PAD...]
        (no EOS when ``max_len`` is reached first). ``beam_size == 1`` is greedy decoding;
        larger beams keep the sequences of highest length-normalised log-probability
        (``beam_search``). BOS and PAD are never generated."""
        if memory is None:
            raise ValueError("generate needs a memory (B, M, D) to read the batch size from")
        b = memory.shape[0]
        memory = memory.repeat_interleave(beam_size, dim=0)                      # (B*K, M, D)
        if memory_mask is not None:
            memory_mask = memory_mask.repeat_interleave(beam_size, dim=0)

        def step(ids: Tensor) -> Tensor:
            return self(ids, None, memory, memory_mask)[:, -1].float().log_softmax(-1)

        ids, _ = beam_search(step, b, max_len=min(max_len, self.max_len), beam_size=beam_size,
                             bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                             banned=(bos_id, pad_id), device=memory.device)
        return ids


def beam_search(step: StepFn, batch: int, *, max_len: int, beam_size: int, bos_id: int,
                eos_id: int, pad_id: int, banned: Sequence[int] = (),
                device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Beam search ranked by length-normalised log-probability S(y) = (1/|y|) sum_t log p(y_t |
    y_<t), |y| = generated tokens including EOS. ``step`` maps ids (batch*K, t) (row b's K
    beams are rows b*K...b*K+K-1) to next-token log-probs (batch*K, V). Finished beams extend
    with PAD at no cost and keep their score; ``banned`` ids are never chosen. Returns the best
    beam per row, ids (batch, max_len) starting with BOS, and its score S (batch,).
    ``beam_size == 1`` is exactly greedy (argmax) decoding."""
    if beam_size < 1 or max_len < 2:
        raise ValueError(f"beam_search needs beam_size >= 1 and max_len >= 2, got {beam_size}, "
                         f"{max_len}")
    k = beam_size
    seqs = torch.full((batch, k, 1), bos_id, dtype=torch.long, device=device)
    cum = torch.full((batch, k), float("-inf"), device=device)
    cum[:, 0] = 0.0                                          # one live beam at the start
    length = torch.zeros(batch, k, device=device)
    done = torch.zeros(batch, k, dtype=torch.bool, device=device)
    for t in range(1, max_len):
        if bool(done.all()):
            break
        logp = step(seqs.view(batch * k, t)).view(batch, k, -1).to(cum.dtype)   # (B, K, V)
        if banned:
            ban = torch.tensor(list(banned), dtype=torch.long, device=logp.device)
            logp = logp.index_fill(-1, ban, float("-inf"))                  # not in place
        finished = torch.full_like(logp[0, 0], float("-inf"))
        finished[pad_id] = 0.0
        logp = torch.where(done[..., None], finished, logp)
        new_len = (length + (~done).to(length.dtype))[..., None]                # (B, K, 1)
        total = cum[..., None] + logp                                           # (B, K, V)
        score = (total / new_len.clamp(min=1.0)).view(batch, -1)
        top = score.topk(k, dim=1).indices                                      # (B, K)
        beam, token = top // logp.shape[-1], top % logp.shape[-1]
        seqs = torch.cat((seqs.gather(1, beam[..., None].expand(-1, -1, t)), token[..., None]),
                         dim=2)
        cum = total.view(batch, -1).gather(1, top)
        length = new_len.expand_as(logp).reshape(batch, -1).gather(1, top)
        done = done.gather(1, beam) | (token == eos_id)
    final = cum / length.clamp(min=1.0)                                         # (B, K)
    best = final.argmax(dim=1)
    rows = torch.arange(batch, device=seqs.device)
    out = torch.full((batch, max_len), pad_id, dtype=torch.long, device=seqs.device)
    out[:, : seqs.shape[2]] = seqs[rows, best]
    return out, final[rows, best]


def sequence_score(logp_of: StepFn, ids: Tensor, *, eos_id: int, pad_id: int) -> Tensor:
    """Length-normalised log-probability S (B,) of finished or cut sequences ids (B, T) =
    [BOS, y_1, ..., (EOS), PAD...], with ``logp_of(ids)`` -> log-probs (B, T, V) of every
    position's next token (teacher forcing)."""
    logp = logp_of(ids)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)           # (B, T-1)
    target = ids[:, 1:]
    after_eos = (target == eos_id).long().cumsum(1) - (target == eos_id).long()
    real = (after_eos == 0) & (target != pad_id)
    return (logp * real).sum(1) / real.sum(1).clamp(min=1)


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler: ``n_queries`` learnable queries cross-attend to the image
    tokens (B, N, D) -> (B, n_queries, D), then a LayerNorm."""

    def __init__(self, dim: int, n_queries: int, heads: int = 4) -> None:
        super().__init__()
        if n_queries < 1:
            raise ValueError(f"AttentionalPooler needs n_queries >= 1, got {n_queries}")
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * 0.02)
        self.norm_in = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, N, D) -> pooled (B, n_queries, D)."""
        q = self.queries.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return self.norm_out(self.attn(q, self.norm_in(tokens), None))


__all__ = ["AttentionalPooler", "Attention", "Block", "TextDecoder", "beam_search",
           "memory_attention_mask", "self_attention_mask", "sequence_score"]
