"""``jobs/rewrite_captions.py`` on a real local Ray: the built-in data through the offline
backend (shards in input order, sidecars, stats, training resolves the output), parquet output
through the command line, and SmolLM2 through the transformers actor pool.

    pytest tests/rewrite/test_rewrite_job.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.rewrite_captions import main
from vlmray.api import resolve_data
from vlmray.config import ConfigError
from vlmray.config.curation import WriteConfig
from vlmray.config.data import SyntheticConfig
from vlmray.config.jobs import RewriteJobConfig
from vlmray.config.rewrite import RewriteConfig, SamplingConfig
from vlmray.data import schema
from vlmray.data.shards import iter_shards
from vlmray.pipelines.rewrite import run, validate_job
from vlmray.recipes import recipe
from vlmray.rewrite.validate import REASONS

SYN = SyntheticConfig(num_train=60, num_eval=8, shard_size=30)


@pytest.fixture(scope="module")
def offline(ray_local, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("rw") / "out")
    job = RewriteJobConfig(output=out, synthetic=SYN, write=WriteConfig(shard_size=25),
                           rewrite=RewriteConfig(k=2))
    return out, run(job)


def test_every_row_is_written_in_input_order(offline) -> None:
    out, stats = offline
    assert stats["rows_in"] == stats["rows_out"] == SYN.num_train
    assert stats["shards"] == 3 and stats["k"] == 2 and stats["backend"] == "offline"
    rows = list(iter_shards(str(Path(out, "shards"))))
    raw = list(iter_shards(str(Path(out, "raw", "train"))))
    assert [r[schema.KEY] for r in rows] == [r[schema.KEY] for r in raw]
    assert [r[schema.TEXT] for r in rows] == [r[schema.TEXT] for r in raw]
    assert [r[schema.IMAGE] for r in rows] == [r[schema.IMAGE] for r in raw]
    for r in rows:
        meta = json.loads(r[schema.META])
        aug, why = meta[schema.TEXTS_AUG], meta[schema.REWRITE_FALLBACKS]
        assert len(aug) == 3 and aug[0] == r[schema.TEXT] and len(why) == 2
        assert all(w in ("",) + REASONS for w in why)
        assert all(a == r[schema.TEXT] for a, w in zip(aug[1:], why) if w)
        assert meta["label"] == json.loads(raw[rows.index(r)][schema.META])["label"]
        assert schema.SYNTHETIC_CAPTION not in meta                # no captioner asked for


def test_stats_count_the_fallbacks_found_in_the_shards(offline) -> None:
    out, stats = offline
    metas = [json.loads(r[schema.META]) for r in iter_shards(str(Path(out, "shards")))]
    reasons = [w for m in metas for w in m[schema.REWRITE_FALLBACKS]]
    tally = stats["rewrites"]
    assert tally["total"] == len(reasons) == 2 * SYN.num_train
    assert tally["kept"] == reasons.count("") > SYN.num_train     # most rewrites are kept
    assert tally["fell_back"] == sum(tally["by_reason"].values()) == len(reasons) - tally["kept"]
    assert all(tally["by_reason"][w] == reasons.count(w) for w in tally["by_reason"])
    assert stats["generated_tokens"]["rewrites"] > 0 and stats["captions_per_s"] > 0
    assert len(stats["examples"]) == 5 and stats["examples"][0]["texts_aug"][0] == \
        stats["examples"][0]["text"]
    assert json.loads(Path(out, "stats.json").read_text())["rows_out"] == SYN.num_train


def test_training_resolves_the_output(offline, tmp_path) -> None:
    out, _ = offline
    cfg = recipe("clip_tiny", **{"data.source": out})
    train, held_out = resolve_data(cfg, str(tmp_path / "run"))
    assert (train, held_out) == (str(Path(out, "shards")), str(Path(out, "eval")))
    assert Path(held_out, "classes.json").is_file()
    assert len(list(iter_shards(held_out))) == SYN.num_eval


def test_command_line_parquet_output(ray_local, tmp_path, capsys) -> None:
    out = str(tmp_path / "pq")
    assert main(["--output", out, "--synthetic.num_train", "20", "--synthetic.num_eval", "4",
                 "--rewrite.k", "1", "--write.format", "parquet",
                 "--rewrite.validate.min_agreement", "0.3",         # + the off_topic actor
                 "--rewrite.captioner", "oracle"]) == 0
    assert "[rewrite] 20 rows in -> 20 out, k=1 (offline)" in capsys.readouterr().out
    table = pq.read_table(str(Path(out, "shards", "part-00000.parquet")))
    assert table.num_rows == 20
    for row in table.to_pylist():
        assert row[schema.TEXTS_AUG][0] == row[schema.TEXT] and len(row[schema.TEXTS_AUG]) == 2
        meta = json.loads(row[schema.META])
        assert meta[schema.TEXTS_AUG] == row[schema.TEXTS_AUG]
        assert meta[schema.SYNTHETIC_CAPTION] == row[schema.SYNTHETIC_CAPTION] != ""
        assert meta[schema.CAPTION_FALLBACK] == row[schema.CAPTION_FALLBACK]
    stats = json.loads(Path(out, "stats.json").read_text())
    assert stats["rewrites"]["total"] == 20 and stats["rewrites"]["kept"] >= 10
    assert stats["config"]["rewrite"]["validate"]["min_agreement"] == 0.3
    assert stats["captions"]["total"] == 20 and stats["generated_tokens"]["captions"] > 0


def test_rows_the_reader_refuses_are_rejected_and_counted(ray_local, tmp_path) -> None:
    """A key with '/' used to pass the read and fail the writer after all the work (and every
    rerun); the reader's reason now reaches the job: rejected, counted, written to rejects/."""
    import io

    import pyarrow as pa
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, "PNG")
    src = tmp_path / "in" / "train"
    src.mkdir(parents=True)
    keys = ["a0", "a1", "bad/key", "a3"]
    pq.write_table(pa.table({"key": keys, "image": [buf.getvalue()] * 4,
                             "text": [f"a red square number {i}" for i in range(4)]}),
                   src / "part-0.parquet")
    stats = run(RewriteJobConfig(input=str(src), output=str(tmp_path / "out"),
                                 rewrite=RewriteConfig(k=1)))
    assert (stats["rows_in"], stats["rows_out"], stats["rows_rejected"]) == (4, 3, 1)
    assert stats["reject_reasons"] == {"invalid_key": 1}
    written = [r[schema.KEY] for r in iter_shards(str(tmp_path / "out" / "shards"))]
    assert written == ["a0", "a1", "a3"]
    rejects = pq.read_table(str(tmp_path / "out" / "rejects")).to_pylist()
    assert [(r[schema.KEY], r[schema.REJECT_REASON]) for r in rejects] == [
        ("bad/key", "invalid_key")]


def test_bad_settings_fail_before_any_work(tmp_path) -> None:
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path), "--rewrite.backend", "bogus"])
    with pytest.raises(FileNotFoundError, match="not a directory with config.json"):
        validate_job(RewriteJobConfig(output=str(tmp_path), rewrite=RewriteConfig(
            backend="transformers", model=str(tmp_path / "none"), k=1)))
    with pytest.raises(ConfigError, match="nothing to do"):
        validate_job(RewriteJobConfig(output=str(tmp_path), rewrite=RewriteConfig(k=0)))
    with pytest.raises(ConfigError, match="--output is required"):
        validate_job(RewriteJobConfig())
    assert not Path(tmp_path, "raw").exists()


def test_smollm2_through_the_actor_pool(ray_local, tmp_path) -> None:
    out = str(tmp_path / "hf")
    job = RewriteJobConfig(
        output=out, synthetic=SyntheticConfig(num_train=6, num_eval=2, shard_size=6),
        rewrite=RewriteConfig(backend="transformers", model="smollm2", k=1, batch_size=6,
                              sampling=SamplingConfig(temperature=0.0, max_tokens=16)))
    stats = run(job)
    print("SmolLM2 job:", stats["captions_per_s"], "captions/s", stats["examples"])
    assert stats["rows_in"] == stats["rows_out"] == 6
    assert stats["generated_tokens"]["rewrites"] > 0 and stats["model"] == "smollm2"
    assert stats["rewrites"]["total"] == 6
    metas = [json.loads(r[schema.META]) for r in iter_shards(str(Path(out, "shards")))]
    assert len(metas) == 6 and all(len(m[schema.TEXTS_AUG]) == 2 for m in metas)
