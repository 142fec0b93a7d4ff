"""La-CLIP prompts (shape, example files) and every validation reason on hand-written outputs.

    pytest tests/rewrite/test_prompts_validate.py -q
"""

from __future__ import annotations

import json

import pytest

from vlmray.config.rewrite import RewriteConfig, ValidateConfig
from vlmray.rewrite.prompts import SYSTEM, LaClipPrompts, load_examples
from vlmray.rewrite.validate import (
    REASONS,
    Agreement,
    clean,
    repeat_fraction,
    validate_caption,
    validate_rewrite,
    validate_rewrites,
)

V = ValidateConfig()
ORIGINAL = "a small red circle on the left"


# --- prompts ---------------------------------------------------------------------------------

def test_messages_are_system_then_shots_then_the_caption() -> None:
    prompts = LaClipPrompts(RewriteConfig(k=2, shots=3))
    msgs = prompts.messages(ORIGINAL, slot=0)
    assert len(msgs) == 1 + 2 * 3 + 1
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert msgs[0]["content"] == SYSTEM and msgs[-1]["content"] == ORIGINAL
    assert [m["content"] for m in msgs[1:7:2]] == [p["input"] for p in prompts.examples(0)]


def test_each_slot_uses_its_own_example_set() -> None:
    prompts = LaClipPrompts(RewriteConfig(k=4, shots=2))
    assert len(prompts.sets) == 4 and all(len(s) >= 5 for s in prompts.sets)
    shots = [tuple(m["content"] for m in prompts.messages("x y", j)[1:-1]) for j in range(5)]
    assert len(set(shots[:4])) == 4                   # four sources, four different contexts
    assert shots[4] == shots[0]                       # slot j uses set j mod 4
    assert len(LaClipPrompts(RewriteConfig(shots=0)).messages("x y", 0)) == 2


def test_a_custom_examples_file_in_list_form(tmp_path) -> None:
    path = tmp_path / "ex.json"
    path.write_text(json.dumps([[{"input": "a dog", "output": "one dog"}],
                                [{"input": "a cat", "output": "one cat"}]]))
    prompts = LaClipPrompts(RewriteConfig(examples=str(path), shots=1))
    assert prompts.messages("a bird", 1)[1:3] == [{"role": "user", "content": "a cat"},
                                                  {"role": "assistant", "content": "one cat"}]
    assert prompts.example_texts() == {"a dog", "one dog", "a cat", "one cat"}


@pytest.mark.parametrize("content, match", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    ("[]", "no example sets"),
    ('{"sets": [[]]}', "set 0 is not a non-empty list"),
    ('[[{"input": "a dog"}]]', "set 0 pair 0"),
    ('[[{"input": "a dog", "output": ""}]]', "set 0 pair 0"),
    ('[[{"input": "a dog", "output": "one dog"}], "oops"]', "set 1"),
])
def test_bad_examples_files_fail_clearly(tmp_path, content, match) -> None:
    path = tmp_path / "ex.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        load_examples(str(path))
    assert "Expected a JSON list of example sets" in str(err.value)


def test_more_shots_than_pairs_fails(tmp_path) -> None:
    path = tmp_path / "ex.json"
    path.write_text('[[{"input": "a dog", "output": "one dog"}]]')
    with pytest.raises(ValueError, match="shots=2 but an example set"):
        LaClipPrompts(RewriteConfig(examples=str(path), shots=2))


# --- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("Sure, here is the rewritten caption: a circle that is small and red, at the left",
     "a circle that is small and red, at the left"),
    ('Rewritten caption: "a little red circle on the left side"',
     "a little red circle on the left side"),
    ("Sure! Here's a rewrite of the caption:\n\n1. a tiny red circle at the left\n2. other",
     "a tiny red circle at the left"),
    ("a little red circle on the left side\nI hope this helps!",
     "a little red circle on the left side"),
    ("This is a small red circle at the left", "This is a small red circle at the left"),
])
def test_chatter_is_stripped_and_the_caption_kept(raw, expected) -> None:
    assert clean(raw) == expected
    assert validate_rewrite(ORIGINAL, raw, V, ()) == (expected, "")


@pytest.mark.parametrize("original, raw, reason", [
    ("", "a red circle", "empty_input"),
    ("   ", "a red circle", "empty_input"),
    (ORIGINAL, "I'm sorry, but I cannot help with that.", "refusal"),
    (ORIGINAL, "As an AI language model, I see a red circle.", "refusal"),
    (ORIGINAL, "", "empty"),
    (ORIGINAL, "Sure! Here is the rewritten caption:", "empty"),
    (ORIGINAL, "circle", "empty"),
    (ORIGINAL, "The rewritten caption keeps every fact of the original.", "chatter"),
    (ORIGINAL, "Sure, I would be happy to help you today", "chatter"),
    (ORIGINAL, "A small, red circle on the LEFT!", "echo"),
    (ORIGINAL, "Caption: a small red circle on the left.", "echo"),
    (ORIGINAL, "a white coffee cup rests on a wooden table", "echo"),       # a prompt example
    (ORIGINAL, " ".join(["a red circle with a stripe"] * 7 + ["and more"]), "too_long"),
    (ORIGINAL, "a red red red red red circle", "repetition"),
    (ORIGINAL, "a red circle on the left a red circle on the left", "repetition"),
    ("a photo of 1 tiny green circle at the bottom.",               # seen from SmolLM2
     "a tiny green circle is at the bottom of a photo of a 1 small red circle at the bottom of "
     "a photo of a 1 small red circle at", "repetition"),
])
def test_every_reason_falls_back_to_the_original(original, raw, reason) -> None:
    examples = LaClipPrompts(RewriteConfig()).example_texts()
    assert reason in REASONS
    assert validate_rewrite(original, raw, V, examples) == (original, reason)


def test_reasons_tuple_and_limits() -> None:
    assert set(REASONS) == {"empty_input", "refusal", "empty", "chatter", "echo", "too_long",
                            "repetition", "off_topic"}
    ok = "one two three four five six"
    assert validate_rewrite("x y", ok, ValidateConfig(max_words=6), ()) == (ok, "")
    assert validate_rewrite("x y", ok, ValidateConfig(max_words=5), ()) == ("x y", "too_long")
    assert validate_rewrite("x y", ok, ValidateConfig(min_words=7, max_words=9), ())[1] == "empty"
    assert repeat_fraction("a dog and a cat".split()) == 0.0          # "a" twice: fine
    assert repeat_fraction("a b a b a b".split()) == 1.0
    two = "a red circle on the left and a red circle on the right"   # a 5-word run twice
    assert validate_rewrite(two, two.replace("and", "plus"), V, ()) == (
        two.replace("and", "plus"), "")                                # ... as in the original
    assert validate_rewrite("red circles", two, V, ()) == ("red circles", "repetition")
    with pytest.raises(ValueError, match="needs the agreement"):
        validate_rewrite("a red circle", "one red circle", ValidateConfig(min_agreement=0.5))


def test_captions_allow_agreeing_with_the_alt_text() -> None:
    assert validate_caption(ORIGINAL, "A small red circle on the left.", V) == (
        "A small red circle on the left.", "")
    assert validate_caption("", "a blue square", V) == ("a blue square", "")
    assert validate_caption(ORIGINAL, "I cannot see the image.", V) == (ORIGINAL, "refusal")
    assert validate_caption(ORIGINAL, "", V) == (ORIGINAL, "empty")
    assert validate_caption(ORIGINAL, "Caption: square square square square", V) == (
        ORIGINAL, "repetition")


def test_off_topic_uses_the_sentence_encoder_in_one_batch() -> None:
    cfg = ValidateConfig(min_agreement=0.5)
    originals = ["a small red circle on the left", "two big blue squares", "a green cross"]
    raws = ["on the left, a little red circle", "stock prices fell sharply on Monday",
            "I'm sorry, I cannot"]
    agree = Agreement()
    sims = agree(originals[:2], raws[:2])
    assert sims.shape == (2,) and sims[0] > 0.7 and sims[1] < 0.3
    out = validate_rewrites(originals, raws, cfg, (), agree)
    assert out == [("on the left, a little red circle", ""),
                   ("two big blue squares", "off_topic"), ("a green cross", "refusal")]
    assert validate_rewrites(originals, raws, ValidateConfig(), ())[1] == (raws[1], "")
