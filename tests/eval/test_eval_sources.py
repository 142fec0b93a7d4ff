"""Held-out splits in the shapes people have, read by ``load_heldout`` (plain Python, no Ray):
``classes.json`` as an object or a plain list, ``classnames.json``, ``classnames.txt``,
sidecar labels by index or by name, ``templates.txt``, the built-in OpenAI CLIP templates, an
ImageNet-style folder; and what fails, naming the file looked for and the accepted shapes.

    pytest tests/eval/test_eval_sources.py -q
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlmray.config import ConfigError, ModelConfig
from vlmray.config.data import SyntheticConfig
from vlmray.data import schema
from vlmray.data.decode import DecodeSpec
from vlmray.data.shards import write_shard
from vlmray.data.synthetic import make_sample
from vlmray.data.tokenize import HashTokenizer
from vlmray.eval import EvalSourceError, evaluate, load_heldout
from vlmray.eval.heldout import HeldOut, class_prompts
from vlmray.eval.sources import check_eval_source, open_eval_source
from vlmray.eval.templates import DEFAULT_TEMPLATES
from vlmray.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYN = SyntheticConfig(num_train=4, num_eval=12, image_size=32, shard_size=12)
NAMES = ["red circle", "blue square", "green triangle"]
TOK = HashTokenizer(vocab_size=512, context_length=16)
SPEC = DecodeSpec(image_size=32)


def _load(root: Path, max_samples: int = 100) -> HeldOut:
    return load_heldout(str(root), SPEC, TOK, max_samples=max_samples)


def _shards(root: Path, labels: list[object]) -> Path:
    """``root`` with one shard of ``len(labels)`` rows; row i's sidecar is ``{"label":
    labels[i]}`` (none at all for ``...``)."""
    samples = []
    for i, label in enumerate(labels):
        s = dict(make_sample(SYN, "eval", i))
        s[schema.META] = None if label is ... else json.dumps({"label": label})
        samples.append(s)
    root.mkdir(parents=True, exist_ok=True)
    write_shard(str(root), "shard-00000.tar", samples)
    return root


def _image(i: int, fmt: str = "JPEG") -> bytes:
    img = Image.frombytes("RGB", (32, 32), bytes([(i * 40 + j) % 256 for j in range(32 * 32 * 3)]))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_classes_json_object_as_before(tmp_path: Path) -> None:
    root = _shards(tmp_path, [0, 1, 2, 1])
    (root / "classes.json").write_text(json.dumps({"classnames": NAMES,
                                                   "templates": ["a {}.", "the {}!"]}))
    data = _load(root)
    assert data.classnames == NAMES and data.templates == ["a {}.", "the {}!"]
    assert data.labels.tolist() == [0, 1, 2, 1] and len(data) == 4


@pytest.mark.parametrize("name, text", [
    ("classes.json", json.dumps(NAMES)),
    ("classnames.json", json.dumps(NAMES)),
    ("classnames.json", json.dumps({"classnames": NAMES})),
    ("classnames.txt", "red circle\n\nblue square  \ngreen triangle\n"),
])
def test_a_plain_list_of_names_takes_the_builtin_templates(tmp_path: Path, name: str,
                                                           text: str) -> None:
    root = _shards(tmp_path, [2, 0, 1])
    (root / name).write_text(text)
    data = _load(root)
    assert data.classnames == NAMES
    assert data.templates == list(DEFAULT_TEMPLATES)
    assert data.labels.tolist() == [2, 0, 1]


def test_templates_file_beside_a_list_of_names(tmp_path: Path) -> None:
    root = _shards(tmp_path, [0, 1])
    (root / "classnames.txt").write_text("\n".join(NAMES))
    (root / "templates.txt").write_text("a photo of a {}.\na {} drawn.\n")
    assert _load(root).templates == ["a photo of a {}.", "a {} drawn."]


def test_sidecar_labels_by_name_or_index_and_unlabelled_rows(tmp_path: Path) -> None:
    root = _shards(tmp_path, ["green_triangle", "Blue Square", 0, ..., "2"])
    (root / "classnames.txt").write_text("\n".join(NAMES))
    data = _load(root)
    assert data.labels.tolist() == [2, 1, 0, -1, 2]       # -1: no sidecar, retrieval only
    assert len(data) == 5


def test_builtin_templates_are_clips_80_imagenet_prompts() -> None:
    assert len(DEFAULT_TEMPLATES) == 80 == len(set(DEFAULT_TEMPLATES))
    assert all(t.count("{}") == 1 and t.format("x") != t for t in DEFAULT_TEMPLATES)
    assert {"a photo of a {}.", "itap of a {}.", "a bad photo of a {}.",
            "a {} in a video game.", "a tattoo of the {}."} <= set(DEFAULT_TEMPLATES)
    assert DEFAULT_TEMPLATES[0] == "a bad photo of a {}."
    assert len(class_prompts(NAMES, list(DEFAULT_TEMPLATES))) == 3 * 80


def _imagefolder(root: Path) -> Path:
    """<root>/<class>/<image>: 3 classes (3, 2 and 1 images; PNG, JPEG and a nested one) and a
    caption beside one image, plus a stray file."""
    for c, (folder, n) in enumerate([("red_circle", 3), ("blue_square", 2),
                                     ("green_triangle", 1)]):
        for i in range(n):
            sub = root / folder / ("nested" if (c, i) == (0, 2) else "")
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"img{i}.{'png' if i == 1 else 'JPG'}").write_bytes(
                _image(3 * c + i, "PNG" if i == 1 else "JPEG"))
    (root / "blue_square" / "img0.txt").write_text("a blue square on grey")
    (root / "README.md").write_text("not an image")
    return root


def test_imagenet_style_folder(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path / "val")
    src = open_eval_source(str(root))
    assert src.kind == "imagefolder" and src.classes_from == "folder names"
    data = _load(root)
    # sorted folders: blue_square 0, green_triangle 1, red_circle 2; dealt round-robin
    assert data.classnames == ["blue square", "green triangle", "red circle"]
    assert data.labels.tolist() == [0, 1, 2, 0, 2, 2]
    assert data.templates == list(DEFAULT_TEMPLATES)
    assert data.texts[0] == "a blue square on grey"
    assert data.texts[1] == "a photo of a green triangle."
    assert data.keys[0] == "blue_square_img0" and "red_circle_nested_img2" in data.keys
    assert data.pixels.shape == (6, 3, 32, 32) and data.rows_rejected == 0
    assert sorted(_load(root, max_samples=3).labels.tolist()) == [0, 1, 2]  # a prefix: all


def test_imagenet_style_folder_with_a_classnames_file(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path / "val")
    (root / "classnames.txt").write_text("square\ntriangle\ncircle\n")
    assert _load(root).classnames == ["square", "triangle", "circle"]
    (root / "classnames.txt").write_text("square\ntriangle\n")
    with pytest.raises(EvalSourceError, match="names 2 classes but there are 3 class folders"):
        _load(root)


@pytest.mark.parametrize("setup, message", [
    (lambda r: None, r"no class names \(looked for classes\.json, classnames\.json, "
                     r"classnames\.txt\)"),
    (lambda r: (r / "classes.json").write_text("{not json"), r"classes\.json is not JSON"),
    (lambda r: (r / "classes.json").write_text(json.dumps({"names": NAMES})),
     "an object without 'classnames'"),
    (lambda r: (r / "classnames.json").write_text("[]"), "no list of non-empty class-name"),
    (lambda r: (r / "classes.json").write_text(json.dumps({"classnames": NAMES,
                                                           "templates": ["a photo"]})),
     r"template 'a photo' needs exactly one '\{\}'"),
    (lambda r: (r / "classnames.txt").write_text("cat\ndog\n"),
     r"label 2 is outside the 2 classes"),
])
def test_what_fails_names_the_file_and_the_shapes(tmp_path: Path, setup, message: str) -> None:
    root = _shards(tmp_path, [0, 1, 2])
    setup(root)
    for call in (lambda: _load(root), lambda: check_eval_source(str(root), max_samples=10)):
        with pytest.raises(EvalSourceError, match=message) as e:
            call()
        assert "accepted shapes:" in str(e.value) and isinstance(e.value, ConfigError)


def test_unknown_label_name_no_labels_and_no_rows(tmp_path: Path) -> None:
    root = _shards(tmp_path / "a", ["purple hexagon"])
    (root / "classnames.txt").write_text("\n".join(NAMES))
    with pytest.raises(EvalSourceError, match="'purple hexagon' is not one of the 3 class"):
        _load(root)
    root = _shards(tmp_path / "b", [..., ...])
    (root / "classnames.txt").write_text("\n".join(NAMES))
    with pytest.raises(EvalSourceError, match="has a .?label"):
        _load(root)
    with pytest.raises(EvalSourceError, match="has a .?label"):
        check_eval_source(str(root), max_samples=10)
    (tmp_path / "c" / "empty_class").mkdir(parents=True)
    with pytest.raises(EvalSourceError, match=r"no \*\.tar shards and no <class>/<image>"):
        _load(tmp_path / "c")
    with pytest.raises(EvalSourceError, match="does not exist"):
        _load(tmp_path / "missing")


def test_zero_shot_counts_labelled_rows_only(tmp_path: Path) -> None:
    root = _shards(tmp_path, [0, 1, 2, ..., ..., 1])
    (root / "classnames.json").write_text(json.dumps(NAMES))
    data = _load(root)
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(vision_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
                    text={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 64}, embed_dim=16),
        image_size=32, vocab_size=TOK.vocab_size, context_length=TOK.context_length)
    got = evaluate(model, data, TOK, batch_size=4)
    keep = data.labels >= 0
    only = HeldOut(pixels=data.pixels[keep], tokens=data.tokens[keep],
                   token_mask=data.token_mask[keep], labels=data.labels[keep],
                   classnames=data.classnames, templates=data.templates)
    want = evaluate(model, only, TOK, batch_size=4)
    assert got["zero_shot_top1"] == pytest.approx(want["zero_shot_top1"])
    assert got["zero_shot_top5"] == pytest.approx(want["zero_shot_top5"])
    assert got["zero_shot_chance"] == pytest.approx(1 / 3)
    assert round(got["retrieval_i2t_r10"] * 6) == 6          # over all 6 rows: 6 of 6 in top 10
