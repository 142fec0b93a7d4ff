"""``vlmray.run``'s checks before any Ray work or any file: a missing local source, and a
``--resume`` whose config the checkpoint cannot load into (``ray.init`` is replaced by a
failure, so reaching Ray fails the test; no Ray cluster, no training).

    pytest tests/train/test_run_checks.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vlmray
from vlmray.config import ConfigError
from vlmray.recipes import recipe
from vlmray.validate import check_resume

SMALL = {"train.steps": "20", "data.synthetic.num_train": "64", "data.synthetic.num_eval": "16"}


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("ray.init called: the bad setting reached Ray")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)


@pytest.mark.parametrize("field, value, message", [
    ("data.source", "missing", r"data\.source='.*missing': no input file, directory or glob"),
    ("data.source", "empty", r"data\.source='.*empty': no inputs at .* among 0 files"),
    ("data.extra_sources", '["missing"]', r"data\.extra_sources='.*missing': no input file"),
    ("data.eval_source", "missing", r"data\.eval_source='.*missing' does not exist"),
])
def test_a_missing_local_source_fails_before_ray_and_writes_nothing(
        no_ray: None, tmp_path: Path, field: str, value: str, message: str) -> None:
    (tmp_path / "empty").mkdir()
    value = value.replace("missing", str(tmp_path / "missing")).replace(
        "empty", str(tmp_path / "empty"))
    cfg = recipe("clip_tiny", **{**SMALL, field: value})
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        vlmray.run(cfg, output=str(out))
    assert not out.exists()                   # no config.json: a corrected rerun just runs


def _stored_run(tmp_path: Path, name: str = "clip_tiny", **overrides: str) -> Path:
    """A run directory as a started run leaves it: its config.json."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(recipe(name, **overrides).to_dict()))
    return run


def test_resume_refuses_a_model_change_before_ray_and_keeps_config_json(
        no_ray: None, tmp_path: Path) -> None:
    run = _stored_run(tmp_path, **SMALL)
    before = (run / "config.json").read_text()
    cfg = recipe("clip_tiny", **{**SMALL, "model.embed_dim": "64", "train.steps": "40"})
    with pytest.raises(ConfigError) as e:
        vlmray.run(cfg, output=str(run), resume=True)
    msg = str(e.value)
    assert "the checkpoint cannot load with these changes: model.embed_dim: 128 -> 64" in msg
    assert "model.image_proj.weight (128, 128) -> (64, 128)" in msg
    assert "train.steps" not in msg.split(". Undo")[0]           # an allowed change, not listed
    assert (run / "config.json").read_text() == before
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


@pytest.mark.parametrize("name, old, new, listed", [
    ("data.vocab_size", 8192, 4096, "data.vocab_size: 8192 -> 4096"),
    ("data.tokenizer", "hf:/elsewhere", "hash", "data.tokenizer: 'hf:/elsewhere' -> 'hash'"),
    ("data.image_size", 32, 48, "data.image_size: 32 -> 48"),
    ("model.vision_kwargs", {"patch_size": 8, "depth": 3}, {"patch_size": 8, "depth": 2},
     "model.vision_kwargs.depth: 3 -> 2"),
])
def test_resume_refuses_what_the_checkpoint_is_tied_to(tmp_path: Path, name: str, old: object,
                                                       new: object, listed: str) -> None:
    section, leaf = name.split(".")
    stored = recipe("clip_tiny").to_dict()
    stored[section][leaf] = old
    cfg = recipe("clip_tiny")
    setattr(getattr(cfg, section), leaf, new)
    with pytest.raises(ConfigError, match="cannot load with these changes") as e:
        check_resume(stored, cfg, str(tmp_path))
    assert listed in str(e.value)


def test_resume_tells_objective_params_that_size_weights_from_those_that_do_not(
        tmp_path: Path) -> None:
    stored = recipe("coca_tiny").to_dict()
    for overrides in ({"train.steps": "900", "train.log_every": "3", "train.lr": "1e-4"},
                      {"eval.every": "5", "eval.max_samples": "100", "eval.batch_size": "8"},
                      {"objectives": '[{"name": "clip", "weight": 0.5, "params": '
                                     '{"gather": "global"}}, {"name": "caption"}]'}):
        check_resume(stored, recipe("coca_tiny", **overrides), str(tmp_path))   # all allowed
    cfg = recipe("coca_tiny", objectives='[{"name": "clip"}, {"name": "caption", '
                                         '"params": {"multimodal_layers": 1}}]')
    with pytest.raises(ConfigError, match="cannot load with these changes: objectives") as e:
        check_resume(stored, cfg, str(tmp_path))
    assert "objectives.caption.decoder.blocks.2" in str(e.value)   # a block the change drops


def test_resume_takes_a_pipeline_filled_field_from_the_stored_run(tmp_path: Path) -> None:
    """RA-CLIP's reference width is 0 in the recipe and filled in by the retrieval plan: 0
    resumes with the stored width, another width is refused."""
    stored = recipe("raclip_tiny", **{"model.ra_ref_dim": "32"}).to_dict()
    check_resume(stored, recipe("raclip_tiny", **{"train.steps": "50"}), str(tmp_path))
    with pytest.raises(ConfigError, match="model.ra_ref_dim: 32 -> 16"):
        check_resume(stored, recipe("raclip_tiny", **{"model.ra_ref_dim": "16"}), str(tmp_path))
