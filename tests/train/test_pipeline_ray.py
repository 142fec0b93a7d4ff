"""The whole run on a real local Ray: built-in data -> Ray Data ingest -> Ray Train -> eval.

One module-scoped Ray; small data and few steps so it stays quick on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import vlmray
from vlmray.train.history import read_history

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = {
    "model.vision_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
    "model.text": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "intermediate_size": 64},
    "model.embed_dim": 32,
}
"""A one-layer ViT and BERT at width 32: the model of the Ray end-to-end runs."""
SMALL = {
    "train.steps": 8, "train.batch_size": 32, "train.log_every": 2, "train.checkpoint_every": 4,
    "eval.every": 4, "eval.max_samples": 60, "data.synthetic.num_train": 400,
    "data.synthetic.num_eval": 60, "data.synthetic.shard_size": 200,
    "data.synthetic.corrupt_frac": 0.02, "data.synthetic.overlong_frac": 0.02,
    "data.curate": False,      # the plain stream's counts (clip_tiny curates by default)
    **TINY_MODEL,
}


@pytest.fixture(scope="module")
def first_run(ray_local, tmp_path_factory) -> vlmray.RunResult:
    cfg = vlmray.recipe("clip_tiny", **SMALL)
    return vlmray.run(cfg, output=str(tmp_path_factory.mktemp("run") / "out"))


def test_run_writes_metrics_and_accounts_for_every_row(first_run: vlmray.RunResult) -> None:
    m = json.loads((Path(first_run.run_dir) / "metrics.json").read_text())
    for key in ("zero_shot_top1", "zero_shot_chance", "retrieval_i2t_r1", "retrieval_t2i_r1",
                "samples_per_s", "wall_s", "rows_in", "rows_rejected"):
        assert m[key] is not None, key
    assert m["zero_shot_chance"] == pytest.approx(1 / 20)
    assert m["rows_in"] == 400
    assert m["rows_in"] == m["rows_accepted"] + m["rows_rejected"]
    # 2% corrupt images and 2% over-long captions in the generator's noise mix.
    assert m["reject_reasons"] == {"decode_error": 8, "text_too_long": 8}
    assert m["steps"] == 8 and m["samples_seen"] == 8 * 32


def test_rejects_are_written_with_reasons(first_run: vlmray.RunResult) -> None:
    table = pq.read_table(Path(first_run.run_dir) / "rejects")
    assert table.num_rows == 16
    assert set(table.column("reject_reason").to_pylist()) == {"decode_error", "text_too_long"}
    assert all(k.startswith("train-") for k in table.column("key").to_pylist())


def test_history_curves_and_checkpoint(first_run: vlmray.RunResult) -> None:
    run = Path(first_run.run_dir)
    rows = read_history(str(run))
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert all("zero_shot_top1" in r for r in rows if r["step"] in (4, 8))
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert first_run.checkpoint and (Path(first_run.checkpoint) / "state.pt").is_file()


def test_resume_continues_from_latest_checkpoint(first_run: vlmray.RunResult) -> None:
    cfg = vlmray.recipe("clip_tiny", **{**SMALL, "train.steps": 12})
    with pytest.raises(vlmray.ConfigError, match="--resume"):
        vlmray.run(cfg, output=first_run.run_dir)
    result = vlmray.run(cfg, output=first_run.run_dir, resume=True)
    steps = [r["step"] for r in read_history(result.run_dir)]
    assert steps == [2, 4, 6, 8, 10, 12]        # continued, not restarted, no step twice
    assert result.metrics["samples_seen"] == 12 * 32


def test_evaluate_job_scores_a_checkpoint(first_run: vlmray.RunResult) -> None:
    out = subprocess.run([sys.executable, "jobs/evaluate.py", first_run.run_dir],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["eval_rows"] == 60 and 0.0 <= m["zero_shot_top1"] <= 1.0
    assert m["step"] >= 8


def test_streamed_run_counts_each_row_once(ray_local, tmp_path) -> None:
    """The default: nothing materialised, 16 steps of 32 = 1.3 passes over the 384 accepted
    rows, so every row is read and some twice; each is still counted and written once."""
    cfg = vlmray.recipe("clip_tiny", **{**SMALL, "train.steps": 16, "data.shuffle_buffer": 0})
    result = vlmray.run(cfg, output=str(tmp_path / "streamed"))
    m = result.metrics
    assert m["streamed"] is True and m["steps"] == 16
    assert m["rows_in"] == 400 and m["rows_accepted"] == 384
    assert m["reject_reasons"] == {"decode_error": 8, "text_too_long": 8}
    keys = pq.read_table(Path(result.run_dir) / "rejects").column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 16


def test_cached_run_holds_the_rows_and_counts_them_all_first(ray_local, tmp_path) -> None:
    """``data.cache``: the explicit in-memory option; the counts are complete before step 1."""
    cfg = vlmray.recipe("clip_tiny", **{**SMALL, "train.steps": 2, "data.cache": True,
                                        "eval.every": 0, "train.checkpoint_every": 0})
    m = vlmray.run(cfg, output=str(tmp_path / "cached")).metrics
    assert "streamed" not in m and m["steps"] == 2
    assert (m["rows_in"], m["rows_accepted"], m["rows_rejected"]) == (400, 384, 16)


def test_old_stream_setting_is_gone_with_its_replacement_named() -> None:
    with pytest.raises(vlmray.ConfigError, match="cache"):
        vlmray.recipe("clip_tiny", **{"data.stream": True})
