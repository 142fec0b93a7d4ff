"""The import graph keeps the layers of ``vlmray/__init__.py`` (and DESIGN.md, section Layers).

Every import in ``vlmray/`` is read with ``ast``: at module level, inside functions and under
``TYPE_CHECKING`` alike, since a lazy import that climbs a layer is still a dependency. An edge
from a module to a module of a later layer fails; so does a cycle between packages, and
``vlmray.config`` importing anything of vlmray outside itself.

    pytest tests/test_layers.py -q
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vlmray"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("config", ("config",)),
    ("base", ("_registry", "runtime")),
    ("distributed", ("distributed",)),
    ("data", ("data",)),
    ("eval", ("eval",)),
    ("models", ("models",)),
    ("objectives", ("objectives",)),
    ("train", ("train",)),
    ("embedders", ("embedders",)),
    ("rewrite", ("rewrite",)),
    ("retrieval", ("retrieval",)),
    ("compose", ("", "api", "validate", "recipes", "pipelines")),
    ("cli", ("cli",)),
]
"""Layer name -> the ``vlmray.<unit>`` packages and modules in it, bottom first ("" is
``vlmray/__init__.py``). A module may import its own layer and the layers before it."""

RANK = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}
NAME = {unit: name for name, units in LAYERS for unit in units}


def unit_of(module: str) -> str:
    """``vlmray.data.curation.score`` -> ``data``; ``vlmray`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported vlmray module, line) for every import in the file, at any depth."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
    return [(t, line) for t, line in found if t == "vlmray" or t.startswith("vlmray.")]


def edges() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) over every file of the package."""
    return [(module_name(path), target, line)
            for path in sorted(PACKAGE.rglob("*.py"))
            for target, line in imports(path)]


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units - set(RANK) == set(), "add new packages/modules to LAYERS (and the docs)"
    assert len(edges()) > 300          # the walk sees the real graph, not an empty one


def test_no_import_climbs_a_layer() -> None:
    upward = [f"{src} (line {line}, layer {NAME[unit_of(src)]}) imports {dst} "
              f"(layer {NAME[unit_of(dst)]})"
              for src, dst, line in edges()
              if RANK[unit_of(dst)] > RANK[unit_of(src)]]
    assert upward == []


def test_no_cycles_between_packages() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst, _ in edges():
        if unit_of(src) != unit_of(dst):
            graph[unit_of(src)].add(unit_of(dst))
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(u or "vlmray" for u in cycle or [])


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_config_is_a_leaf() -> None:
    """Importing the config tree loads no other part of vlmray (nor torch or Ray)."""
    code = ("import sys, vlmray.config; print('\\n'.join(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('vlmray', 'torch', 'ray'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    assert "vlmray.config.run" in out
    assert [m for m in out if m != "vlmray" and not m.startswith("vlmray.config")] == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "config").glob("*.py")), ids=lambda p: p.name)
def test_config_modules_import_only_config(path: Path) -> None:
    assert [t for t, _ in imports(path) if not t.startswith("vlmray.config")] == []
