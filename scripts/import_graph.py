"""The package-level import graph of a vlmray checkout: a table and a picture.

Every import of ``vlmray/`` (and a top-level ``pipelines/``, in checkouts that had one) is read
with ``ast`` at any depth (module level, in functions, under ``TYPE_CHECKING``) and counted per
(importing package, imported package). Packages are drawn bottom-up in layer order; an edge to
a later layer (upward) is red, and the packages on an import cycle are named.

    python scripts/import_graph.py                        # this checkout, today's layers
    python scripts/import_graph.py --root /tmp/old --layers design-v1 --png before.png
"""

from __future__ import annotations

import argparse
import ast
import json
from collections import Counter
from pathlib import Path

LAYERS = {
    # tests/test_layers.py and vlmray/__init__.py hold today's order
    "current": ["config", "_registry", "runtime", "distributed", "data", "eval", "models",
                "objectives", "train", "embedders", "rewrite", "retrieval", "validate", "recipes",
                "pipelines", "api", "vlmray", "cli"],
    # DESIGN.md's first order: config -> distributed -> data -> rewrite -> models -> objectives
    # -> eval -> train -> retrieval -> api / pipelines / recipes -> cli
    "design-v1": ["config", "_registry", "distributed", "data", "rewrite", "models",
                  "objectives", "eval", "train", "retrieval", "api", "pipelines", "recipes",
                  "recipes_generative", "recipes_rewrite", "vlmray", "cli"],
}


def unit(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "pipelines":
        return "pipelines"
    return parts[1] if len(parts) > 1 else "vlmray"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_edges(root: Path) -> tuple[Counter, dict[str, int]]:
    edges: Counter = Counter()
    kinds = Counter()
    for base in ("vlmray", "pipelines"):
        for path in sorted((root / base).rglob("*.py")) if (root / base).is_dir() else []:
            module = module_name(root, path)
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            tree = ast.parse(path.read_text())
            local = {id(n) for f in ast.walk(tree)
                     if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                     for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        b = package.split(".")
                        target = ".".join(b[:len(b) - (node.level - 1)]
                                          + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                elif isinstance(node, ast.Import):
                    target = node.names[0].name
                else:
                    continue
                if not target.startswith(("vlmray", "pipelines")):
                    continue
                kinds["function_level" if id(node) in local else "module_level"] += 1
                if unit(module) != unit(target):
                    edges[(unit(module), unit(target))] += 1
    return edges, dict(kinds)


def cycles(edges: Counter) -> list[list[str]]:
    """Strongly connected components of more than one package (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def draw(edges: Counter, order: list[str], title: str, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = [n for n in order if any(n in e for e in edges)]
    rank = {n: i for i, n in enumerate(nodes)}
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(nodes) + 1.5))
    for n, i in rank.items():
        ax.text(0, i, n, ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round", "fc": "white", "ec": "0.4"})
    for (a, b), count in sorted(edges.items()):
        if a not in rank or b not in rank:
            continue
        up = rank[b] > rank[a]
        bend = 0.35 if up else -0.35
        ax.annotate("", xy=(0, rank[b]), xytext=(0, rank[a]),
                    arrowprops={"arrowstyle": "->", "color": "red" if up else "0.6",
                                "lw": 0.6 + 0.15 * min(count, 10),
                                "connectionstyle": f"arc3,rad={bend}"})
    ax.set_xlim(-3, 3)
    ax.set_ylim(-1, len(nodes))
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--layers", choices=sorted(LAYERS), default="current")
    p.add_argument("--png", default="")
    p.add_argument("--label", default="", help="title of the picture (default: the root)")
    args = p.parse_args()
    edges, kinds = package_edges(Path(args.root))
    order = LAYERS[args.layers]
    rank = {n: i for i, n in enumerate(order)}
    upward = {f"{a}->{b}": n for (a, b), n in sorted(edges.items())
              if rank.get(b, -1) > rank.get(a, -1)}
    found = cycles(edges)
    if args.png:
        draw(edges, order, f"{args.label or Path(args.root).name}: {sum(upward.values())} upward imports "
             f"(red), {len(found)} package cycle(s)", Path(args.png))
    print(json.dumps({"root": args.root, "layers": args.layers, "imports": kinds,
                      "package_edges": len(edges), "upward": upward, "cycles": found}))


if __name__ == "__main__":
    main()
