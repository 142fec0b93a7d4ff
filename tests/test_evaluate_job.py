"""``jobs/evaluate.py`` on runs stored on S3 (moto's server): the run's newest intact checkpoint
is found, read and scored on the run's own held-out split, exactly as from a local copy.

    pytest tests/test_evaluate_job.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.evaluate import main
from tests.tiny_checkpoint import save_tiny_checkpoint
from vlmray.config.data import SyntheticConfig
from vlmray.data.storage import filesystem
from vlmray.data.synthetic import write_synthetic
from vlmray.train.checkpoint import STATE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYN = SyntheticConfig(num_train=8, num_eval=24, image_size=48, shard_size=12)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """A run directory as training leaves it: its built-in data and a checkpoint (step 3)."""
    run = tmp_path_factory.mktemp("run")
    write_synthetic(SYN, str(run / "data"))
    save_tiny_checkpoint(run, step=3)
    return run


def _evaluate(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    assert main(list(argv)) == 0
    assert torch.is_grad_enabled()              # main() leaves the process as it found it
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _upload(local: Path, uri: str) -> None:
    """Every file under ``local`` to the same relative key under ``uri``."""
    fs, root = filesystem(uri)
    for f in local.rglob("*"):
        if f.is_file():
            fs.put_file(str(f), f"{root}/{f.relative_to(local).as_posix()}")


def test_evaluates_an_s3_run_as_its_local_copy(local_run: Path, s3_bucket: str,
                                               capsys: pytest.CaptureFixture) -> None:
    local = _evaluate(capsys, str(local_run))
    uri = f"{s3_bucket}/runs/a"
    _upload(local_run, uri)
    remote = _evaluate(capsys, uri)
    assert remote["checkpoint"] == f"{uri}/ray/checkpoint_000003"
    assert remote["step"] == 3 and remote["eval_rows"] == SYN.num_eval
    assert {k: v for k, v in remote.items() if k != "checkpoint"} == \
           {k: v for k, v in local.items() if k != "checkpoint"}

    direct = _evaluate(capsys, f"{uri}/ray/checkpoint_000003", "--eval-source",
                       f"{uri}/data/eval", "--max-samples", "10")
    assert direct["step"] == 3 and direct["eval_rows"] == 10


def test_a_torn_newest_checkpoint_on_s3_is_skipped(local_run: Path, s3_bucket: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    uri = f"{s3_bucket}/runs/b"
    _upload(local_run, uri)
    save_tiny_checkpoint(tmp_path, step=9)                 # a newer one whose state.pt never
    (tmp_path / "ray/checkpoint_000009" / STATE).unlink()  # reached the bucket
    _upload(tmp_path / "ray", f"{uri}/ray")
    assert main([uri]) == 0
    printed = capsys.readouterr().out
    assert f"checkpoint {uri}/ray/checkpoint_000009 (step 9) skipped: state.pt is missing" \
        in printed
    assert json.loads(printed.strip().splitlines()[-1])["checkpoint"].endswith("000003")


def test_no_checkpoint_on_s3_says_so(s3_bucket: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([f"{s3_bucket}/runs/none"])
    assert "no intact checkpoint under" in capsys.readouterr().err
