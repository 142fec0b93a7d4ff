"""A torn checkpoint never blocks a resume: each checkpoint's manifest (sizes and sha256 of its
files, written last) is checked before it is used; ``find_latest`` falls back to the newest
intact one and prints which it skipped and why; the resume path skips a torn one that Ray's own
record names (the last test: a whole run on a real local Ray, where Ray's record of the run
names the torn checkpoint on ``--resume``). Checkpoints written before manifests are unverified
but usable when their zip archive is whole.

    pytest tests/train/test_checkpoint_integrity.py -q
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import ray.train
import torch
from torch import nn

import vlmray
from tests.train.test_checkpoint_storage import _upload
from tests.train.test_pipeline_ray import SMALL
from vlmray.config import Config
from vlmray.data.storage import filesystem
from vlmray.train.checkpoint import (
    MANIFEST,
    PROGRESS,
    STATE,
    IncompleteCheckpointError,
    Progress,
    find_latest,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from vlmray.train.history import read_events
from vlmray.train.restore import restore as _restore
from vlmray.train.state import build_state


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))


def _run(root: Path, steps: tuple[int, ...] = (10, 20)) -> dict[int, Path]:
    """Checkpoints ``root/ray/train/checkpoint_<step>``, the model seeded by its step."""
    out = {}
    for step in steps:
        model = _model(step)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        out[step] = save_checkpoint(root / "ray" / "train" / f"checkpoint_{step:06d}",
                                    model=model, optimizer=opt, scheduler=sched,
                                    progress=Progress(step=step), config={"step": step})
    return out


def _truncate(file: Path, keep: float = 0.5) -> int:
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])
    return len(data)


def _loaded_from(ckpt: Path | str, seed: int) -> bool:
    model = _model(99)
    load_checkpoint(ckpt, model=model)
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 _model(seed).state_dict().values()))


def test_a_truncated_state_falls_back_to_the_previous_checkpoint(tmp_path: Path, capsys) -> None:
    ck = _run(tmp_path)
    size = _truncate(ck[20] / STATE)
    assert find_latest(tmp_path) == ck[10]
    out = capsys.readouterr().out
    assert (f"checkpoint {ck[20]} (step 20) skipped: state.pt is {size // 2} bytes but "
            f"manifest.json records {size} (cut short") in out
    assert str(ck[10]) not in out
    assert _loaded_from(find_latest(tmp_path), seed=10)
    with pytest.raises(IncompleteCheckpointError, match="state.pt is .* bytes but"):
        load_checkpoint(ck[20], model=_model(0))


@pytest.mark.parametrize("damage", ["zeroed", "no_state", "empty_progress", "empty_manifest",
                                    "manifest_only"])
def test_every_kind_of_torn_copy_is_skipped(tmp_path: Path, capsys, damage: str) -> None:
    ck = _run(tmp_path)
    d = ck[20]
    if damage == "zeroed":              # NFS after a client crash: the size is right, the data not
        data = (d / STATE).read_bytes()
        (d / STATE).write_bytes(data[:100] + bytes(len(data) - 100))
    elif damage == "no_state":          # copied file by file: state.pt not there yet
        (d / STATE).unlink()
    elif damage == "empty_progress":
        (d / PROGRESS).write_text("")
    elif damage == "empty_manifest":
        (d / MANIFEST).write_text("")
    else:                               # only the manifest has arrived
        for name in (STATE, PROGRESS, "config.json"):
            (d / name).unlink()
    reason = {"zeroed": "does not match the sha256", "no_state": "state.pt is missing",
              "empty_progress": "progress.json is 0 bytes",
              "empty_manifest": "manifest.json is unreadable",
              "manifest_only": "state.pt is missing"}[damage]
    assert find_latest(tmp_path) == ck[10]
    out = capsys.readouterr().out
    assert f"checkpoint {d}" in out and "skipped" in out and reason in out
    assert reason in (verify_checkpoint(d) or "")
    with pytest.raises(IncompleteCheckpointError):
        load_checkpoint(d, model=_model(0))


def test_nothing_intact_finds_nothing(tmp_path: Path, capsys) -> None:
    ck = _run(tmp_path)
    for d in ck.values():
        _truncate(d / STATE)
    assert find_latest(tmp_path) is None
    assert capsys.readouterr().out.count("skipped") == 2


# --- checkpoints written before manifests ------------------------------------------------------


def _strip_manifests(ck: dict[int, Path]) -> None:
    for d in ck.values():
        (d / MANIFEST).unlink()


def test_an_old_checkpoint_without_a_manifest_is_used_when_its_zip_is_whole(tmp_path: Path,
                                                                            capsys) -> None:
    """Decision: unverified but usable. Nothing records what it should hold, so it is checked
    as torch.save wrote it: a complete zip archive whose members match their CRC-32s, and JSON
    files that parse."""
    ck = _run(tmp_path)
    _strip_manifests(ck)
    assert find_latest(tmp_path) == ck[20] and verify_checkpoint(ck[20]) is None
    assert _loaded_from(ck[20], seed=20)
    assert "skipped" not in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated", "zeroed"])
def test_a_torn_old_checkpoint_is_skipped(tmp_path: Path, capsys, damage: str) -> None:
    ck = _run(tmp_path)
    _strip_manifests(ck)
    if damage == "truncated":
        _truncate(ck[20] / STATE, keep=0.9)
        reason = "no manifest.json, and state.pt is not a complete zip archive"
    else:                               # zeros over one tensor's bytes: only its CRC-32 tells
        with zipfile.ZipFile(ck[20] / STATE) as z:
            info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
        data = bytearray((ck[20] / STATE).read_bytes())
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        data[start:start + info.compress_size] = bytes(info.compress_size)
        (ck[20] / STATE).write_bytes(bytes(data))
        reason = "fails its CRC-32"
    assert find_latest(tmp_path) == ck[10]
    assert reason in capsys.readouterr().out
    with pytest.raises(IncompleteCheckpointError, match="no manifest.json"):
        load_checkpoint(ck[20], model=_model(0))


# --- object storage -------------------------------------------------------------------------------


def test_on_s3_a_missing_or_short_object_falls_back_and_a_bad_hash_fails_the_load(
        s3_bucket: str, tmp_path: Path, capsys) -> None:
    """An object is written whole or not at all, so find_latest compares sizes and presence
    (no download); the sha256 is checked when the checkpoint is loaded."""
    ck = _run(tmp_path / "local", steps=(10, 20, 30))
    (ck[30] / STATE).unlink()                                   # still being copied
    _truncate(ck[20] / STATE)                                   # written short by hand
    root = f"{s3_bucket}/run"
    _upload(tmp_path / "local", root)
    latest = find_latest(root)
    assert latest == f"{root}/ray/train/checkpoint_000010"
    out = capsys.readouterr().out
    assert "checkpoint_000030 (step 30) skipped: state.pt is missing" in out
    assert "checkpoint_000020 (step 20) skipped: state.pt is" in out
    assert _loaded_from(latest, seed=10)

    fs, path = filesystem(f"{latest}/{STATE}")                  # same size, other bytes
    data = fs.cat_file(path)
    fs.pipe_file(path, data[:-64] + bytes(64))
    assert find_latest(root) == latest
    with pytest.raises(IncompleteCheckpointError, match="sha256"):
        load_checkpoint(latest, model=_model(0))


# --- the resume path ------------------------------------------------------------------------------


def _tiny_run(run: Path, steps: tuple[int, ...]) -> dict[int, Path]:
    """Checkpoints of the default config's model and objectives (what _restore rebuilds)."""
    cfg = Config()
    state = build_state(cfg, device=torch.device("cpu"))
    out = {}
    for step in steps:
        out[step] = save_checkpoint(run / "ray" / "train" / f"checkpoint_{step:06d}",
                                    model=state.core, optimizer=state.optimizer,
                                    scheduler=state.scheduler, progress=Progress(step=step),
                                    config=cfg.to_dict(), objectives=state.mix)
    return out


def test_resume_skips_a_torn_checkpoint_that_rays_record_names(
        tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray registered step 20 before its files reached the disk whole (an NFS client crash);
    the run's storage holds step 10 intact. The worker restores step 10 and says why."""
    run = tmp_path / "run"
    ck = _tiny_run(run, (10, 20))
    _truncate(ck[20] / STATE)
    monkeypatch.setattr(ray.train, "get_checkpoint",
                        lambda: ray.train.Checkpoint.from_directory(str(ck[20])))
    state = build_state(Config(), device=torch.device("cpu"))
    assert _restore(state, None, str(run)) == "storage"
    assert state.progress.step == 10
    out = capsys.readouterr().out
    assert f"checkpoint {ck[20]} (step 20) skipped: state.pt is" in out       # find_latest
    assert "ray checkpoint skipped: checkpoint" in out                      # the restore


def test_resume_with_every_checkpoint_torn_fails_rather_than_starting_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    ck = _tiny_run(run, (10,))
    _truncate(ck[10] / STATE)
    monkeypatch.setattr(ray.train, "get_checkpoint",
                        lambda: ray.train.Checkpoint.from_directory(str(ck[10])))
    state = build_state(Config(), device=torch.device("cpu"))
    with pytest.raises(IncompleteCheckpointError, match="no intact checkpoint among"):
        _restore(state, None, str(run))


def test_manifest_records_every_file(tmp_path: Path) -> None:
    d = _run(tmp_path, steps=(7,))[7]
    doc = json.loads((d / MANIFEST).read_text())
    assert doc["step"] == 7 and set(doc["files"]) == {STATE, PROGRESS, "config.json"}
    assert doc["files"][STATE]["size"] == (d / STATE).stat().st_size


def test_a_run_resumes_past_its_torn_newest_checkpoint(ray_local, tmp_path: Path) -> None:
    """End to end on a real local Ray: a run checkpoints steps 4 and 8, step 8's state.pt is
    cut short, and ``--resume`` continues from step 4 (whichever of Ray's record, the driver's
    ``--resume`` pick and the storage scan names it) to the end."""
    small = {**SMALL, "eval.every": 0}
    first = vlmray.run(vlmray.recipe("clip_tiny", **small), output=str(tmp_path / "run"))
    newest = Path(first.checkpoint)
    assert json.loads((newest / PROGRESS).read_text())["step"] == 8
    _truncate(newest / STATE)
    result = vlmray.run(vlmray.recipe("clip_tiny", **{**small, "train.steps": 12}),
                        output=first.run_dir, resume=True)
    starts = [(e["step"], e["source"]) for e in read_events(first.run_dir)
              if e["event"] == "start"]
    assert starts[0] == (0, "fresh") and starts[-1][0] == 4
    assert result.metrics["steps"] == 12
    assert json.loads(Path(result.checkpoint, PROGRESS).read_text())["step"] == 12
