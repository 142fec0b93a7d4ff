"""A small kustomize renderer for the tests: exactly the features ``k8s/`` uses, no more.

    docs = build(Path("k8s/overlays/gpu-multinode"))   # list of dicts, like `kustomize build`

Supported kustomization fields: ``resources`` (files, or directories holding a
kustomization), ``namespace``, ``labels`` (``pairs`` with ``includeSelectors: false``),
``patches`` (from ``path`` or inline ``patch``, with an optional ``target``) and
``replacements`` (whole-node copies between dotted field paths). Any other field raises, so
a manifest that starts using a new feature cannot be rendered silently wrong.

Patch semantics follow kustomize for custom resources (it has no schema, hence no merge keys,
for RayCluster/RayJob):

- JSON6902 (a list of ops): ``add``, ``remove``, ``replace``, ``test``;
- strategic merge (an object): maps merge recursively, ``null`` deletes a key, and a list
  replaces the whole list (it is *not* merged item by item by ``name``).

Order within one kustomization is kustomize's: resources (bases built first), patches,
namespace, labels, replacements. ``test_renderer_matches_kustomize`` checks the output
against the real binary wherever one is installed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

__all__ = ["KustomizeError", "build", "json6902", "strategic_merge"]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "patches",
                    "replacements"}
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole",
                  "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


class KustomizeError(ValueError):
    pass


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise KustomizeError(f"no kustomization file in {directory}")


def build(directory: Path) -> list[dict[str, Any]]:
    """Renders the kustomization in ``directory`` (like ``kustomize build directory``)."""
    directory = Path(directory)
    kfile = _kustomization_file(directory)
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(f"{kfile}: fields this renderer does not implement: {sorted(unknown)}")
    if k.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{kfile}: kind {k['kind']!r} is not supported")

    docs: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        target = (directory / entry).resolve()
        docs.extend(build(target) if target.is_dir() else load_docs(target))
    _check_unique(docs, kfile)

    for patch in k.get("patches", []):
        _apply_patch(docs, patch, directory)
    if "namespace" in k:
        for doc in docs:
            if doc.get("kind") not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = k["namespace"]
    for label in k.get("labels", []):
        extra = set(label) - {"pairs", "includeSelectors"}
        if extra or label.get("includeSelectors", False):
            raise KustomizeError(f"{kfile}: labels supports only pairs with includeSelectors: false")
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(
                {str(key): str(value) for key, value in label["pairs"].items()})
    for replacement in k.get("replacements", []):
        _apply_replacement(docs, replacement, kfile)
    return docs


def _ident(doc: dict[str, Any]) -> tuple[str, str]:
    return doc.get("kind", ""), doc.get("metadata", {}).get("name", "")


def _check_unique(docs: list[dict[str, Any]], where: Path) -> None:
    seen = set()
    for doc in docs:
        if _ident(doc) in seen:
            raise KustomizeError(f"{where}: duplicate resource {_ident(doc)}")
        seen.add(_ident(doc))


def _select(docs: list[dict[str, Any]], selector: dict[str, Any], what: str) -> list[dict[str, Any]]:
    unknown = set(selector) - {"kind", "name"}
    if unknown:
        raise KustomizeError(f"{what}: selector fields not implemented: {sorted(unknown)}")
    hits = [d for d in docs
            if all(_ident(d)[i] == selector[key] for i, key in enumerate(("kind", "name"))
                   if key in selector)]
    if not hits:
        raise KustomizeError(f"{what}: nothing matches {selector}")
    return hits


def _apply_patch(docs: list[dict[str, Any]], patch: dict[str, Any], directory: Path) -> None:
    unknown = set(patch) - {"path", "patch", "target"}
    if unknown or ("path" in patch) == ("patch" in patch):
        raise KustomizeError(f"patch {patch}: give exactly one of path/patch (and a target)")
    text = (directory / patch["path"]).read_text() if "path" in patch else patch["patch"]
    body = yaml.safe_load(text)
    if isinstance(body, list):  # JSON6902
        if "target" not in patch:
            raise KustomizeError(f"JSON6902 patch {patch} needs a target")
        for doc in _select(docs, patch["target"], f"patch {patch}"):
            _replace_in_place(doc, json6902(doc, body))
        return
    if not isinstance(body, dict):
        raise KustomizeError(f"patch {patch}: neither a list of ops nor an object")
    selector = patch.get("target") or {"kind": body.get("kind"), "name": body["metadata"]["name"]}
    for doc in _select(docs, selector, f"patch {patch}"):
        _replace_in_place(doc, strategic_merge(doc, body))


def _replace_in_place(doc: dict[str, Any], new: dict[str, Any]) -> None:
    """Swaps a document's content, keeping its place in the output list."""
    doc.clear()
    doc.update(new)


def json6902(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """Applies RFC 6902 ``add``/``remove``/``replace``/``test`` ops to a copy of ``doc``."""
    out = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path")
        if kind not in ("add", "remove", "replace", "test") or not isinstance(path, str):
            raise KustomizeError(f"JSON6902 op not implemented: {op}")
        if path == "":
            raise KustomizeError("JSON6902 ops on the whole document are not implemented")
        parent, key = _walk(out, path)
        if kind == "test":
            if _get(parent, key, path) != op["value"]:
                raise KustomizeError(f"JSON6902 test failed at {path}: "
                                     f"{_get(parent, key, path)!r} != {op['value']!r}")
        elif kind == "remove":
            _get(parent, key, path)
            del parent[_index(parent, key, path)]
        elif kind == "replace":
            _get(parent, key, path)
            parent[_index(parent, key, path)] = copy.deepcopy(op["value"])
        elif isinstance(parent, list):  # add
            idx = len(parent) if key == "-" else _index(parent, key, path, allow_end=True)
            parent.insert(idx, copy.deepcopy(op["value"]))
        else:
            parent[key] = copy.deepcopy(op["value"])
    return out


def _walk(doc: Any, path: str) -> tuple[Any, str]:
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in path.lstrip("/").split("/")]
    node = doc
    for i, token in enumerate(tokens[:-1]):
        node = _get(node, token, "/" + "/".join(tokens[:i + 1]))
    return node, tokens[-1]


def _index(parent: Any, key: str, path: str, allow_end: bool = False) -> Any:
    if isinstance(parent, dict):
        return key
    if not key.isdigit() or int(key) > len(parent) - (0 if allow_end else 1):
        raise KustomizeError(f"JSON6902: bad index in {path}")
    return int(key)


def _get(node: Any, key: str, path: str) -> Any:
    if isinstance(node, dict):
        if key not in node:
            raise KustomizeError(f"JSON6902: {path} does not exist")
        return node[key]
    if isinstance(node, list):
        return node[_index(node, key, path)]
    raise KustomizeError(f"JSON6902: {path} goes through a scalar")


def strategic_merge(doc: Any, patch: Any) -> Any:
    """kustomize's strategic merge for a kind without schema: maps merge, lists replace."""
    if isinstance(doc, dict) and isinstance(patch, dict):
        out = copy.deepcopy(doc)
        for key, value in patch.items():
            if isinstance(key, str) and key.startswith("$"):
                raise KustomizeError(f"strategic-merge directive {key} not implemented")
            if value is None:
                out.pop(key, None)
            else:
                out[key] = strategic_merge(out.get(key), value)
        return out
    return copy.deepcopy(patch)


def _field_path(path: str) -> list[str]:
    parts = path.split(".")
    if any(not p or "[" in p or "]" in p for p in parts):
        raise KustomizeError(f"replacement fieldPath {path!r}: only plain dotted keys are implemented")
    return parts


def _apply_replacement(docs: list[dict[str, Any]], rep: dict[str, Any], where: Path) -> None:
    source = rep["source"]
    if set(rep) - {"source", "targets"} or set(source) - {"kind", "name", "fieldPath"}:
        raise KustomizeError(f"{where}: replacement fields not implemented: {rep}")
    (src,) = _select(docs, {k: source[k] for k in ("kind", "name") if k in source}, str(where))
    value: Any = src
    for part in _field_path(source.get("fieldPath", "metadata.name")):
        value = value[part]
    for target in rep["targets"]:
        if set(target) - {"select", "fieldPaths"}:
            raise KustomizeError(f"{where}: replacement target fields not implemented: {target}")
        for doc in _select(docs, target["select"], str(where)):
            for field_path in target["fieldPaths"]:
                *parents, last = _field_path(field_path)
                node = doc
                for part in parents:
                    node = node[part]
                if last not in node:
                    raise KustomizeError(f"{where}: {field_path} missing in {_ident(doc)}")
                node[last] = copy.deepcopy(value)
