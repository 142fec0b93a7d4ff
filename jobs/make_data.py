"""Write the built-in noisy image-text dataset (webdataset shards + manifests), local or s3://.

    python jobs/make_data.py --output /tmp/vlmray-data
    python jobs/make_data.py --output s3://bucket/vlmray-data --num-train 100000 --workers 8

Every SyntheticConfig field is a flag (``num_train`` -> ``--num-train``). Prints the dataset
summary (config, counts per split and noise kind) as one JSON line. The output must be new,
empty or a built-in dataset written before (``dataset.json`` or this job's ``_job.json``): a
folder holding anything else is refused before a file is written.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import typing

from vlmray.config import ConfigError
from vlmray.config.data import SyntheticConfig
from vlmray.data.outputs import check_output, claim_output
from vlmray.data.synthetic import write_synthetic

JOB = "make_data"


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field, by field name."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
            docs[stmt.target.id] = str(nxt.value.value).strip()
    return docs


def build_parser() -> argparse.ArgumentParser:
    """A parser with ``--output``, ``--workers`` and one flag per SyntheticConfig field."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", required=True, help="directory or s3:// URI to write under")
    parser.add_argument("--workers", type=int, default=1, help="processes generating shards")
    hints, docs = typing.get_type_hints(SyntheticConfig), _field_docs(SyntheticConfig)
    for field in dataclasses.fields(SyntheticConfig):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", dest=field.name, type=hints[field.name],
            default=field.default, help=docs.get(field.name, ""))
    return parser


def validate_output(output: str) -> None:
    """ConfigError unless ``output`` is new, empty, or a built-in dataset written before (this
    job writes shards over whatever has their names)."""
    check_output(output, [], job=JOB, markers=("dataset.json",))


def main(argv: list[str] | None = None) -> dict:
    """Parse flags, check the output, write the dataset, print and return its summary."""
    args = build_parser().parse_args(argv)
    names = [f.name for f in dataclasses.fields(SyntheticConfig)]
    try:
        cfg = SyntheticConfig(**{name: getattr(args, name) for name in names})
        validate_output(args.output)
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"make_data: {e}") from None
    claim_output(args.output, JOB)
    summary = write_synthetic(cfg, args.output, workers=args.workers)
    print(json.dumps({"output": args.output, **summary}, sort_keys=True))
    return summary


if __name__ == "__main__":
    main()
