"""Command-line parsing shared by the job scripts: ``--recipe NAME`` plus dotted overrides
(``--train.steps 200``), each documented in ``--help`` from the config's field docstrings."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from vlmray.config import (
    Config,
    ConfigError,
    apply_overrides,
    field_paths,
    unknown_field_message,
)
from vlmray.recipes import list_recipes, recipe

J = TypeVar("J")
R = TypeVar("R")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each dataclass field (the torchtitan-style field docstring)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())  # type: ignore[attr-defined]
    return docs


def _docs_for(cfg: Any, prefix: str = "") -> dict[str, str]:
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_docs_for(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = field_docs(type(cfg)).get(f.name, "")
    return out


def add_field_flags(group: Any, defaults: Any, *, skip: tuple[str, ...] = (),
                    show_defaults: bool = False) -> None:
    """One ``--dotted.name`` flag per field of a config dataclass, documented from its field
    docstring (plus the default's value when asked); unset flags stay out of the namespace."""
    for name, doc in _docs_for(defaults).items():
        if name in skip:
            continue
        if show_defaults:
            value = getattr(_walk(defaults, name), name.rsplit(".", 1)[-1])
            doc = f"{doc} (default: {value!r})"
        group.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar="V",
                           help=doc.replace("%", "%%"))


def _walk(cfg: Any, dotted: str) -> Any:
    for part in dotted.split(".")[:-1]:
        cfg = getattr(cfg, part)
    return cfg


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="clip_tiny",
                        help=f"recipe to start from (default clip_tiny); one of {list_recipes()}")
    parser.add_argument("--list-recipes", action="store_true", help="print recipe names and exit")
    parser.add_argument("--output", default=None, help="run directory (local path or s3://)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output from its latest checkpoint")
    group = parser.add_argument_group("config fields (dotted overrides; defaults from the recipe)")
    add_field_flags(group, Config(), skip=("recipe", "objectives"))
    group.add_argument("--objectives", dest="objectives", default=argparse.SUPPRESS, metavar="V",
                       help="objectives with weights: 'clip' or 'clip:1,siglip:0.5' or a JSON list")
    return parser


def parse_config(argv: list[str] | None, description: str) -> tuple[argparse.Namespace, Config]:
    """Parses flags into (namespace, validated-by-name Config); exits listing valid choices."""
    parser = build_parser(description)
    args, unknown = parser.parse_known_args(argv)
    if args.list_recipes:
        print("\n".join(list_recipes()))
        raise SystemExit(0)
    if unknown:
        flag = unknown[0].lstrip("-").split("=")[0]
        parser.error(unknown_field_message(flag, sorted(field_paths(Config()))))
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("recipe", "list_recipes", "output", "resume")}
    try:
        cfg = recipe(args.recipe, **overrides)
    except (ConfigError, KeyError) as e:
        parser.error(str(e))
    return args, cfg


def parse_job_config(argv: list[str] | None, defaults: Any, *, description: str,
                     group: str = "settings") -> Any:
    """A job script's flags: one ``--dotted.name`` per field of the ``defaults`` dataclass
    (documented, defaults shown); an unknown flag fails naming the valid ones; returns
    ``defaults`` with the given fields replaced (and the dataclasses' own checks run)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_field_flags(parser.add_argument_group(group), defaults, show_defaults=True)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].lstrip("-").split("=")[0]
        parser.error(unknown_field_message(flag, sorted(field_paths(defaults))))
    try:
        return apply_overrides(defaults, vars(args))
    except (ConfigError, ValueError) as e:
        parser.error(str(e))
        raise


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_job(run: Callable[[J], R], job: J) -> R:
    """Runs a data job (curate, rewrite, index); a bad setting or input ends the process with
    ``error: <why>`` and exit code 2 instead of a traceback."""
    try:
        return run(job)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        fail(str(e))


__all__ = ["add_field_flags", "build_parser", "fail", "field_docs", "parse_config", "parse_job_config",
           "run_job"]
