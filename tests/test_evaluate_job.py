"""``jobs/evaluate.py`` on runs stored on S3 (moto's server): the run's newest intact checkpoint
is found, read and scored on the run's own held-out split, exactly as from a local copy. A run
without a held-out split, or a malformed ``--eval-source``, is explained (status 2), not traced
back.

    pytest tests/test_evaluate_job.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.evaluate import main
from tests.tiny_checkpoint import save_tiny_checkpoint
from vlmray.config.data import SyntheticConfig
from vlmray.data.storage import filesystem
from vlmray.data.synthetic import write_synthetic
from vlmray.config import Config
from vlmray.data.shards import write_shard
from vlmray.data.synthetic import make_sample
from vlmray.train.checkpoint import STATE, Progress, save_checkpoint
from vlmray.train.state import build_core_model

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


def _run_without_eval(root: Path) -> Path:
    """A run trained on a source with ``train/`` and no ``eval/``: its checkpoint (step 2)."""
    (root / "ds" / "train").mkdir(parents=True)
    write_shard(str(root / "ds" / "train"), "shard-00000.tar",
                [make_sample(SYN, "train", i) for i in range(4)])
    cfg = Config()
    cfg.data.source = str(root / "ds")
    model = build_core_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    run = root / "run"
    save_checkpoint(run / "ray" / "checkpoint_000002", model=model, optimizer=opt,
                    scheduler=sched, progress=Progress(step=2), config=cfg.to_dict())
    return run


def test_a_run_without_eval_split_is_explained_not_traced_back(tmp_path: Path) -> None:
    run = _run_without_eval(tmp_path)
    done = subprocess.run([sys.executable, "jobs/evaluate.py", str(run)], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert "has no held-out split" in done.stderr and "pass --eval-source" in done.stderr
    assert '"eval": "none"' in done.stderr and "accepted shapes:" in done.stderr


def test_a_bad_eval_source_is_explained(local_run: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "eval").mkdir()
    write_shard(str(tmp_path / "eval"), "shard-00000.tar",
                [make_sample(SYN, "eval", i) for i in range(4)])        # no class names
    assert main([str(local_run), "--eval-source", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate: cannot evaluate on --eval-source: held-out split")
    assert "no class names (looked for classes.json, classnames.json, classnames.txt)" in err
    assert main([str(local_run), "--eval-source", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "eval" / "classnames.txt").write_text("\n".join(f"c{i}" for i in range(20)))
    assert _evaluate(capsys, str(local_run), "--eval-source", str(tmp_path / "eval"))[
        "eval_rows"] == 4
