"""A run whose every row is rejected fails clearly before Ray Train starts, and a failing run
still writes ``metrics.json`` with its error (a real local Ray; 48 built-in rows).

    pytest tests/train/test_run_failures.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vlmray
from tests.train.test_pipeline_ray import TINY_MODEL
from vlmray.api import _check_run_dir

TINY = {"train.steps": 2, "train.batch_size": 8, "eval.max_samples": 8,
        "data.synthetic.num_train": 48, "data.synthetic.num_eval": 8,
        "data.synthetic.shard_size": 48, **TINY_MODEL}


def test_every_row_rejected_fails_before_training_and_writes_metrics(
        ray_local: None, tmp_path: Path) -> None:
    cfg = vlmray.recipe("clip_tiny", **TINY, **{"data.min_image_side": 1000})   # images: 64 px
    run = tmp_path / "run"
    with pytest.raises(vlmray.ConfigError, match="every row of the training source 'builtin' "
                                                 r"was rejected \(48 rows in") as e:
        vlmray.run(cfg, output=str(run))
    assert "image_too_small" in str(e.value) and "data.min_image_side" in str(e.value)
    m = json.loads((run / "metrics.json").read_text())
    assert m["failed"] is True and m["error"].startswith("ConfigError: every row")
    assert m["steps"] == 0 and m["skipped_steps"] == 0 and m["wall_s"] > 0
    assert not (run / "ray").exists() and not (run / "events.jsonl").exists()  # no Ray Train
    assert not (run / "config.json").exists()
    _check_run_dir(str(run), False, cfg)     # the corrected rerun may use the same directory
