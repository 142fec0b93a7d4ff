"""La-CLIP prompts: a rewrite instruction plus "meta-input-output" in-context examples.

Fan et al., 2023 ("Improving CLIP Training with Language Rewrites", Sec. 3.2) build each
rewrite prompt from a few caption -> rewrite pairs ("meta-input-output" examples) followed by
the caption to rewrite, and use a different example source per rewrite (ChatGPT, Bard, COCO and
human-written pairs), so the k rewrites of one caption differ in style. We do the same with a
chat model: a system message, ``shots`` example pairs as user/assistant turns from example set
``slot mod #sets``, then the caption as the last user turn. Deviation: La-CLIP prompted
LLaMA-7B with plain text completion; we use the model's chat template, and our built-in example
sets (``examples.json``) are written for vlmray in the four styles, not the paper's pairs.

    prompts = LaClipPrompts(RewriteConfig(k=2, shots=3))
    prompts.messages("a small red circle", slot=1)
    # [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...}, ...,
    #  {"role": "user", "content": "a small red circle"}]
"""

from __future__ import annotations

import json
import os
from typing import Any

from vlmray.config.rewrite import RewriteConfig

SYSTEM = ("You rewrite image captions. Rewrite the caption in different words, keeping every "
          "visual fact (objects, counts, colours, sizes, positions) and adding nothing. Answer "
          "with one sentence: only the new caption, no explanation.")
BUILTIN_EXAMPLES = os.path.join(os.path.dirname(__file__), "examples.json")

Pair = dict[str, str]


def _bad(path: str, why: str) -> ValueError:
    return ValueError(f"rewrite.examples={path!r}: {why}. Expected a JSON list of example "
                      'sets, each a non-empty list of {"input": caption, "output": rewrite} '
                      '(or {"sets": [...]}, a set may be {"pairs": [...]})')


def _check_set(path: str, i: int, raw: Any) -> list[Pair]:
    pairs = raw.get("pairs") if isinstance(raw, dict) else raw
    if not isinstance(pairs, list) or not pairs:
        raise _bad(path, f"set {i} is not a non-empty list of pairs")
    for j, p in enumerate(pairs):
        ok = (isinstance(p, dict) and set(p) >= {"input", "output"}
              and all(isinstance(p[f], str) and p[f].strip() for f in ("input", "output")))
        if not ok:
            raise _bad(path, f"set {i} pair {j} is not {{'input': str, 'output': str}}: {p!r}")
    return [{"input": p["input"].strip(), "output": p["output"].strip()} for p in pairs]


def load_examples(path: str = "") -> list[list[Pair]]:
    """The example sets of ``path`` (empty = the built-in four); checks their shape."""
    path = path or BUILTIN_EXAMPLES
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise _bad(path, "no such file") from None
    except json.JSONDecodeError as e:
        raise _bad(path, f"not valid JSON ({e})") from None
    sets = doc.get("sets") if isinstance(doc, dict) else doc
    if not isinstance(sets, list) or not sets:
        raise _bad(path, "no example sets")
    return [_check_set(path, i, s) for i, s in enumerate(sets)]


class LaClipPrompts:
    """:class:`vlmray.rewrite.base.PromptBuilder` of La-CLIP's in-context rewrite prompts."""

    def __init__(self, cfg: RewriteConfig) -> None:
        self.shots = cfg.shots
        self.sets = load_examples(cfg.examples)
        if any(len(s) < self.shots for s in self.sets):
            raise ValueError(f"rewrite.shots={self.shots} but an example set of "
                             f"{cfg.examples or BUILTIN_EXAMPLES!r} has only "
                             f"{min(len(s) for s in self.sets)} pairs")

    def examples(self, slot: int) -> list[Pair]:
        """The ``shots`` example pairs rewrite slot ``slot`` uses."""
        return self.sets[slot % len(self.sets)][:self.shots]

    def messages(self, caption: str, slot: int) -> list[dict[str, str]]:
        """System, then ``shots`` user/assistant example turns, then ``caption`` as a user turn
        (``1 + 2 * shots + 1`` messages)."""
        out = [{"role": "system", "content": SYSTEM}]
        for pair in self.examples(slot):
            out += [{"role": "user", "content": pair["input"]},
                    {"role": "assistant", "content": pair["output"]}]
        return out + [{"role": "user", "content": caption}]

    def example_texts(self) -> set[str]:
        """Every example input and output: a rewrite that copies one is an ``echo``."""
        return {p[f] for s in self.sets for p in s for f in ("input", "output")}


__all__ = ["BUILTIN_EXAMPLES", "LaClipPrompts", "SYSTEM", "load_examples"]
