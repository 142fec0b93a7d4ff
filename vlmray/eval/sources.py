"""Held-out evaluation sources in the shapes people have (no Ray, no decoding).

A held-out split (``data.eval_source``, or a dataset root's ``eval/``) is a folder holding
either

- webdataset shards (``*.tar``: ``{key}.jpg``, ``{key}.txt`` caption, ``{key}.json`` sidecar
  whose ``label`` is a class index or a class name), or
- an ImageNet-style folder: ``<class folder>/<image>.jpg|.jpeg|.png|.webp`` (sub-folders
  allowed). Labels are the class folders' indices in sorted order; an image's caption is the
  ``<image>.txt`` beside it, else ``a photo of a <class name>.``;

and its class names and (optionally) prompt templates, read from the first of

- ``classes.json``: ``{"classnames": [...], "templates": [...]}`` (templates optional), or a
  plain JSON list of names;
- ``classnames.json``: the same two shapes;
- ``classnames.txt``: one name per line (blank lines skipped);
- for an ImageNet-style folder only, the class folders' names (``_`` read as a space).

Templates hold one ``{}`` where the class name goes; without any in ``classes.json`` or
``classnames.json``, ``templates.json`` (a JSON list) or ``templates.txt`` (one a line) gives
them, else the built-in OpenAI CLIP ImageNet set (:mod:`vlmray.eval.templates`). What is
missing or malformed raises :class:`EvalSourceError` (a ``ConfigError``) naming the file
looked for and these shapes; ``vlmray.api.run`` raises it before Ray starts.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from vlmray.config import ConfigError
from vlmray.data import schema
from vlmray.data.shards import iter_shard
from vlmray.data.storage import filesystem, to_uri
from vlmray.eval.templates import DEFAULT_TEMPLATES, DEFAULT_TEMPLATES_NAME

__all__ = ["ACCEPTED_SHAPES", "CLASS_FILES", "EvalSource", "EvalSourceError", "IMAGE_SUFFIXES",
           "TEMPLATE_FILES", "check_eval_source", "class_index", "iter_eval_rows",
           "open_eval_source", "row_label"]

CLASS_FILES = ("classes.json", "classnames.json", "classnames.txt")
"""Where class names are looked for, in this order."""
TEMPLATE_FILES = ("templates.json", "templates.txt")
"""Where templates are looked for when the class file has none, in this order."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
"""Image files of an ImageNet-style folder (any case)."""
ACCEPTED_SHAPES = (
    "accepted shapes: *.tar shards whose .json sidecars carry 'label' (a class index or name), "
    "or an ImageNet-style folder <class>/<image>.jpg; class names from classes.json "
    "({\"classnames\": [...], \"templates\": [...]} or a JSON list), classnames.json "
    "(the same), classnames.txt (one a line), or an ImageNet-style folder's names; templates "
    "from there, templates.json or templates.txt, else OpenAI CLIP's 80 ImageNet prompts")
"""The shapes, as errors name them."""


class EvalSourceError(ConfigError):
    """A held-out split that cannot be evaluated: what is missing, and the accepted shapes."""


@dataclass
class EvalSource:
    """A resolved held-out split: where its rows are and how its classes are named."""

    uri: str
    kind: Literal["shards", "imagefolder"]
    classnames: list[str]
    templates: list[str]
    classes_from: str
    """The file the class names came from, or ``folder names``."""
    templates_from: str
    files: list[str] = field(default_factory=list)
    """Shard URIs (``shards``), or image URIs in class round-robin order (``imagefolder``)."""
    file_labels: list[int] = field(default_factory=list)
    """``imagefolder``: each image's label."""
    captions: dict[str, str] = field(default_factory=dict)
    """``imagefolder``: image URI -> the URI of the ``.txt`` caption beside it."""

    def describe(self) -> str:
        """One line: the shape, the number of classes and where names and templates came from."""
        what = "shards" if self.kind == "shards" else "ImageNet-style folder"
        return (f"{self.uri} ({what}, {len(self.files)} files; {len(self.classnames)} classes "
                f"from {self.classes_from}; {len(self.templates)} templates from "
                f"{self.templates_from})")


def _fail(uri: str, what: str) -> EvalSourceError:
    return EvalSourceError(f"held-out split {uri!r}: {what}; {ACCEPTED_SHAPES}")


def open_eval_source(uri: str) -> EvalSource:
    """Lists the held-out split at ``uri`` and reads its class names and templates; raises
    :class:`EvalSourceError` naming what is missing and the accepted shapes."""
    fs, root = filesystem(uri)
    if not fs.isdir(root):
        what = "is not a folder" if fs.exists(root) else "does not exist"
        raise EvalSourceError(f"held-out split {uri!r} {what}; {ACCEPTED_SHAPES}")
    entries = fs.ls(root, detail=True)
    names = {posixpath.basename(e["name"].rstrip("/")): e for e in entries}
    shards = sorted(to_uri(fs, e["name"]) for n, e in names.items()
                    if e["type"] == "file" and n.endswith(".tar"))
    folders = sorted(n for n, e in names.items() if e["type"] == "directory"
                     and not n.startswith((".", "_")))
    named = _class_file(uri, fs, root, set(names))
    if shards:
        if named is None:
            raise _fail(uri, f"{len(shards)} shards but no class names (looked for "
                             f"{', '.join(CLASS_FILES)})")
        names_, templates, classes_from = named
        tpl, tpl_from = _templates(uri, fs, root, set(names), templates)
        return EvalSource(uri, "shards", names_, tpl, classes_from=classes_from,
                          templates_from=tpl_from, files=shards)
    images, labels, captions = _folder_images(fs, root, folders)
    if not images:
        raise _fail(uri, f"no *.tar shards and no <class>/<image> files (looked for "
                         f"{', '.join(IMAGE_SUFFIXES)} under {len(folders)} sub-folders)")
    if named is None:
        names_, templates, classes_from = ([f.replace("_", " ") for f in folders], None,
                                           "folder names")
    else:
        names_, templates, classes_from = named
        if len(names_) != len(folders):
            raise _fail(uri, f"{classes_from} names {len(names_)} classes but there are "
                             f"{len(folders)} class folders")
    tpl, tpl_from = _templates(uri, fs, root, set(names), templates)
    return EvalSource(uri, "imagefolder", names_, tpl, classes_from=classes_from,
                      templates_from=tpl_from, files=images, file_labels=labels,
                      captions=captions)


def _read(fs: Any, path: str) -> str:
    with fs.open(path, "rb") as f:
        return f.read().decode("utf-8-sig")


def _class_file(uri: str, fs: Any, root: str,
                present: set[str]) -> tuple[list[str], list[str] | None, str] | None:
    """(class names, templates or None, file name) from the first class file present."""
    for name in CLASS_FILES:
        if name not in present:
            continue
        text = _read(fs, f"{root}/{name}")
        if name.endswith(".txt"):
            doc: Any = [line.strip() for line in text.splitlines() if line.strip()]
        else:
            try:
                doc = json.loads(text)
            except ValueError as e:
                raise _fail(uri, f"{name} is not JSON ({e})") from None
        templates = None
        if isinstance(doc, dict):
            if "classnames" not in doc:
                raise _fail(uri, f"{name} is an object without 'classnames'")
            templates = doc.get("templates")
            doc = doc["classnames"]
        if not isinstance(doc, list) or not doc or not all(isinstance(c, str) and c.strip()
                                                          for c in doc):
            raise _fail(uri, f"{name} holds no list of non-empty class-name strings")
        if templates is not None:
            templates = _check_templates(uri, name, templates)
        return [c.strip() for c in doc], templates, name
    return None


def _templates(uri: str, fs: Any, root: str, present: set[str],
               given: list[str] | None) -> tuple[list[str], str]:
    """(templates, where from): the class file's, a templates file's, or the built-in set."""
    if given:
        return given, "the class file"
    for name in TEMPLATE_FILES:
        if name in present:
            text = _read(fs, f"{root}/{name}")
            if name.endswith(".txt"):
                found: Any = [line.strip() for line in text.splitlines() if line.strip()]
            else:
                try:
                    found = json.loads(text)
                except ValueError as e:
                    raise _fail(uri, f"{name} is not JSON ({e})") from None
            return _check_templates(uri, name, found), name
    return list(DEFAULT_TEMPLATES), DEFAULT_TEMPLATES_NAME


def _check_templates(uri: str, name: str, templates: Any) -> list[str]:
    """The templates of ``name``, each a string formatting one class name; else an error."""
    if not isinstance(templates, list):
        raise _fail(uri, f"{name}: templates must be a list of strings with one '{{}}'")
    for t in templates:
        try:
            ok = isinstance(t, str) and t.count("{}") == 1 and t.format("x") != t
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise _fail(uri, f"{name}: template {t!r} needs exactly one '{{}}' and no other "
                             f"braces")
    return list(templates)


def _folder_images(fs: Any, root: str,
                   folders: list[str]) -> tuple[list[str], list[int], dict[str, str]]:
    """Images of each class folder (sorted), dealt round-robin across classes so any prefix
    covers every class; their labels; and the ``.txt`` caption beside each, if any."""
    per_class: list[list[str]] = []
    captions: dict[str, str] = {}
    for folder in folders:
        files = sorted(fs.find(f"{root}/{folder}"))
        texts = {f[:-4] for f in files if f.endswith(".txt")}
        images = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
        for f in images:
            stem = f.rsplit(".", 1)[0]
            if stem in texts:
                captions[to_uri(fs, f)] = to_uri(fs, stem + ".txt")
        per_class.append([to_uri(fs, f) for f in images])
    out, labels = [], []
    for i in range(max((len(c) for c in per_class), default=0)):
        for label, images in enumerate(per_class):
            if i < len(images):
                out.append(images[i])
                labels.append(label)
    return out, labels, captions


def iter_eval_rows(src: EvalSource) -> Iterator[dict[str, Any]]:
    """The split's rows as ``{KEY, IMAGE, TEXT, META}`` dicts (shard order, or the folder's
    class round-robin); an ImageNet-style folder's sidecar is ``{"label": <index>}``."""
    if src.kind == "shards":
        for shard in src.files:
            yield from iter_shard(shard)
        return
    root = filesystem(src.uri)[1]
    for uri, label in zip(src.files, src.file_labels):
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as f:
            image = f.read()
        cap = src.captions.get(uri)
        text = _read(fs, filesystem(cap)[1]).strip() if cap else \
            f"a photo of a {src.classnames[label]}."
        rel = path[len(root):].lstrip("/").rsplit(".", 1)[0]
        yield {schema.KEY: rel.replace("/", "_").replace(".", "_"), schema.IMAGE: image,
               schema.TEXT: text, schema.META: json.dumps({schema.LABEL: label})}


def row_label(meta: object, classnames: list[str], index: dict[str, int] | None = None) -> int:
    """A row's class index from its sidecar's ``label`` (an index, or a class name; ``_`` and
    case ignored), -1 when it has none (or a negative one); raises ``ValueError`` for one
    outside the classes."""
    if isinstance(meta, (bytes, bytearray)):
        meta = bytes(meta).decode("utf-8", errors="replace")
    try:
        doc = json.loads(meta) if isinstance(meta, str) and meta.strip() else {}
    except ValueError:
        return -1
    value = doc.get(schema.LABEL) if isinstance(doc, dict) else None
    if value is None or isinstance(value, bool):
        return -1
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        index = index if index is not None else class_index(classnames)
        found = index.get(_norm(value))
        if found is None:
            raise ValueError(f"label {value!r} is not one of the {len(classnames)} class names")
        return found
    try:
        label = int(value)
    except (TypeError, ValueError):
        return -1
    if label < 0:
        return -1
    if label >= len(classnames):
        raise ValueError(f"label {label} is outside the {len(classnames)} classes "
                         f"(0..{len(classnames) - 1})")
    return label


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def class_index(classnames: list[str]) -> dict[str, int]:
    """Normalised class name (``_`` as space, lower case, single spaces) -> its first index:
    how :func:`row_label` reads a label given by name."""
    index: dict[str, int] = {}
    for i, c in enumerate(classnames):
        index.setdefault(_norm(c), i)
    return index


def check_eval_source(uri: str, *, max_samples: int = 0) -> EvalSource:
    """:func:`open_eval_source`, then (``max_samples`` > 0) the labels of its first
    ``max_samples`` rows: at least one labelled, none outside the classes. Raises
    :class:`EvalSourceError`."""
    src = open_eval_source(uri)
    if max_samples <= 0 or src.kind == "imagefolder":
        return src
    index, labelled, seen = class_index(src.classnames), 0, 0
    for row in iter_eval_rows(src):
        if seen >= max_samples:
            break
        seen += 1
        try:
            labelled += row_label(row.get(schema.META), src.classnames, index) >= 0
        except ValueError as e:
            raise _fail(uri, f"row {row[schema.KEY]!r}: {e} (from {src.classes_from})") from None
    if seen == 0:
        raise _fail(uri, "its shards hold no rows")
    if labelled == 0:
        raise _fail(uri, f"none of its first {seen} rows has a 'label' in its .json sidecar")
    return src
