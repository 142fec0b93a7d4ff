"""No job deletes its input: every job's check, before Ray starts, refuses an output that is an
input, lies inside one or holds one, and a folder holding files the job did not write; a
replaced output is deleted only once its replacement is complete (``publish``)."""

from __future__ import annotations

import json
import os
import runpy
from collections.abc import Callable
from pathlib import Path

import pytest

from vlmray.config import ConfigError
from vlmray.config.data import SyntheticConfig
from vlmray.config.jobs import CurateJobConfig, IndexJobConfig, RewriteJobConfig
from vlmray.config.retrieval import EmbedConfig
from vlmray.config.rewrite import RewriteConfig
from vlmray.data.outputs import check_apart, check_owner, claim_output, job_of
from vlmray.data.storage import exists, filesystem, join, publish, write_bytes_atomic
from vlmray.data.synthetic import write_synthetic

ROOT = Path(__file__).resolve().parents[2]


def _curate(input_: str, output: str) -> None:
    from vlmray.pipelines.curate import validate_job

    validate_job(CurateJobConfig(input=input_, output=output))


def _rewrite(input_: str, output: str) -> None:
    from vlmray.pipelines.rewrite import validate_job

    validate_job(RewriteJobConfig(input=input_, output=output, rewrite=RewriteConfig(k=1)))


def _index(input_: str, output: str) -> None:
    from vlmray.pipelines.index import validate_job

    embed = EmbedConfig(model="minilm", modality="text")
    validate_job(IndexJobConfig(input=input_, output=output, embed=embed))


def _pretrain(input_: str, output: str) -> None:
    from vlmray.api import _check_run_dir
    from vlmray.recipes import recipe

    _check_run_dir(output, False, recipe("clip_tiny", **{"data.source": input_}))


JOBS: dict[str, Callable[[str, str], None]] = {
    "curate": _curate, "rewrite": _rewrite, "index": _index, "pretrain": _pretrain}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny built-in dataset root (train/ and eval/ shards): a real input for every job."""
    root = tmp_path_factory.mktemp("data") / "ds"
    write_synthetic(SyntheticConfig(num_train=4, num_eval=2, shard_size=4, image_size=16),
                    str(root))
    return root


@pytest.mark.parametrize("job", JOBS)
def test_output_equal_to_the_input_is_refused(job: str, dataset: Path) -> None:
    with pytest.raises(ConfigError, match="is the input"):
        JOBS[job](str(dataset), str(dataset))
    assert sorted(p.name for p in dataset.iterdir()) == ["dataset.json", "eval", "train"]


@pytest.mark.parametrize("job", JOBS)
def test_output_inside_or_around_the_input_is_refused(job: str, dataset: Path) -> None:
    with pytest.raises(ConfigError, match="is inside the input"):
        JOBS[job](str(dataset), str(dataset / "out"))
    with pytest.raises(ConfigError, match="contains the input"):
        JOBS[job](str(dataset / "train"), str(dataset))
    assert not (dataset / "out").exists()


@pytest.mark.parametrize("job", JOBS)
def test_a_folder_of_foreign_files_is_refused(job: str, dataset: Path, tmp_path: Path) -> None:
    """A stray shard without ``_job.json`` (an unknown run), and another job's claimed output."""
    stray = tmp_path / "stray"
    (stray / "shards").mkdir(parents=True)
    (stray / "shards" / "part-00000.tar").write_bytes(b"not ours")
    with pytest.raises(ConfigError, match=r"no \w+ job wrote \(shards\) and no _job.json"):
        JOBS[job](str(dataset), str(stray))
    other = "index" if job != "index" else "curate"
    claim_output(str(tmp_path / "claimed"), other)
    with pytest.raises(ConfigError, match=f"holds a {other} job's output"):
        JOBS[job](str(dataset), str(tmp_path / "claimed"))
    assert (stray / "shards" / "part-00000.tar").read_bytes() == b"not ours"


@pytest.mark.parametrize("job", ["curate", "rewrite", "pretrain"])
def test_new_empty_and_own_outputs_are_accepted(job: str, dataset: Path, tmp_path: Path) -> None:
    train = str(dataset / "train")
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    for out in (tmp_path / "new", tmp_path / "empty"):
        JOBS[job](train, str(out))
    own = tmp_path / "own"
    if job == "pretrain":
        own.mkdir()
        (own / "config.json").write_text("{}")         # a run: continuing it takes --resume
        with pytest.raises(ConfigError, match="already holds a run"):
            JOBS[job](train, str(own))
    else:
        claim_output(str(own), job)
        (own / "shards").mkdir()
        JOBS[job](train, str(own))


def test_make_data_refuses_foreign_files(tmp_path: Path) -> None:
    main = runpy.run_path(str(ROOT / "jobs/make_data.py"), run_name="make_data")["main"]
    (tmp_path / "notes.txt").write_text("mine")
    args = ["--num-train", "4", "--num-eval", "2", "--shard-size", "4", "--image-size", "16"]
    with pytest.raises(SystemExit, match="no make_data job wrote"):
        main(["--output", str(tmp_path), *args])
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    main(["--output", str(tmp_path / "d"), *args])
    assert job_of(str(tmp_path / "d")) == "make_data"
    main(["--output", str(tmp_path / "d"), *args])        # its own dataset: written again


def test_locations_are_compared_by_folder() -> None:
    check_apart("/data/raw2", ["/data/raw"])                  # a sibling, not inside
    check_apart("s3://b/out", ["/b/out", "", "s3://b/outside"])
    with pytest.raises(ConfigError, match="is inside the input"):
        check_apart("/data/raw/curated", ["/data/raw/part-*.tar"])   # the folder a glob lists
    with pytest.raises(ConfigError, match="is the input"):
        check_apart("s3a://b/raw/", ["s3://b/raw"])


def test_a_symlink_to_the_input_is_the_input(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "raw")
    with pytest.raises(ConfigError, match="is the input"):
        check_apart(str(tmp_path / "link"), [str(tmp_path / "raw")])


def test_owner_checks(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_owner(str(tmp_path / "file"), "curate")
    old = tmp_path / "old-curation"                          # before jobs named themselves
    old.mkdir()
    (old / "_job.json").write_text(json.dumps({"fingerprint": "abc"}))
    check_owner(str(old), "curate")
    with pytest.raises(ConfigError, match="holds a curate job's output"):
        check_owner(str(old), "rewrite")


def _tree(root: str) -> dict[str, bytes]:
    fs, path = filesystem(root)
    return {f[len(path.rstrip("/")) + 1:]: fs.cat_file(f) for f in fs.find(path)}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_publish_replaces_only_once_the_new_tree_is_complete(where: str, tmp_path: Path,
                                                            request) -> None:
    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    for name, data in {"out/shards/part-0.tar": b"old", "out/shards/part-9.tar": b"stale",
                       "out/_incoming/shards/part-0.tar": b"new",
                       "out/_incoming/shards/sub/x": b"nested"}.items():
        write_bytes_atomic(join(root, name), data)
    publish(join(root, "out/_incoming/shards"), join(root, "out/shards"))
    assert _tree(join(root, "out/shards")) == {"part-0.tar": b"new", "sub/x": b"nested"}
    assert not exists(join(root, "out/_incoming/shards"))
