"""``vlmray.run`` checks the held-out split before Ray starts: a malformed or missing one is a
``ConfigError`` naming the file looked for and the accepted shapes; a run without one says so
at start and in ``metrics.json`` (``"eval": "none"``). ``ray.init`` is replaced by a failure
and ``vlmray.api.init_ray`` by a stop, so no Ray cluster starts and nothing trains.

    pytest tests/eval/test_eval_checks.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vlmray
from vlmray.config import ConfigError
from vlmray.config.data import SyntheticConfig
from vlmray.data import schema
from vlmray.data.shards import write_shard
from vlmray.data.synthetic import make_sample
from vlmray.recipes import recipe

SMALL = {"train.steps": "20", "data.synthetic.num_train": "64", "data.synthetic.num_eval": "16"}
SYN = SyntheticConfig(num_train=8, num_eval=8, image_size=32, shard_size=8)


class Stop(Exception):
    """Raised where the run would start Ray."""


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("ray.init called: the bad setting reached Ray")

    def stop() -> None:
        raise Stop

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr("vlmray.api.init_ray", stop)


def _split(root: Path, split: str = "eval", labelled: bool = True) -> Path:
    samples = [make_sample(SYN, split, i) for i in range(8)]
    if not labelled:
        samples = [{**s, schema.META: None} for s in samples]
    (root / split).mkdir(parents=True)
    write_shard(str(root / split), "shard-00000.tar", samples)
    return root / split


@pytest.mark.parametrize("make, message", [
    (lambda r: _split(r), r"classes\.json, classnames\.json, classnames\.txt"),
    (lambda r: r / "missing", r"'.*missing' does not exist"),
    (lambda r: (r / "empty").mkdir() or r / "empty", r"no \*\.tar shards and no <class>/<image>"),
])
def test_a_bad_eval_source_fails_before_ray(no_ray: None, tmp_path: Path, make,
                                            message: str) -> None:
    import ray

    held_out = make(tmp_path)
    cfg = recipe("clip_tiny", **{**SMALL, "data.eval_source": str(held_out)})
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message) as e:
        vlmray.run(cfg, output=str(out))
    assert str(e.value).startswith(f"data.eval_source={str(held_out)!r}: ")
    assert "accepted shapes:" in str(e.value)
    assert not ray.is_initialized() and not out.exists()


def test_a_source_whose_eval_folder_is_malformed_fails_before_ray(no_ray: None,
                                                                  tmp_path: Path) -> None:
    _split(tmp_path / "ds", "train")
    (_split(tmp_path / "ds") / "classnames.txt").write_text("only one class\n")
    cfg = recipe("clip_tiny", **{**SMALL, "data.source": str(tmp_path / "ds")})
    with pytest.raises(ConfigError, match=r"data.source's eval/=.*label \d+ is outside the 1 "):
        vlmray.run(cfg, output=str(tmp_path / "run"))


def test_unlabelled_eval_rows_fail_before_ray(no_ray: None, tmp_path: Path) -> None:
    held_out = _split(tmp_path, labelled=False)
    (held_out / "classnames.json").write_text(json.dumps(["a", "b"]))
    cfg = recipe("clip_tiny", **{**SMALL, "data.eval_source": str(held_out)})
    with pytest.raises(ConfigError, match="none of its first 8 rows has a 'label'"):
        vlmray.run(cfg, output=str(tmp_path / "run"))


def test_a_run_without_eval_split_says_so_at_start_and_in_metrics(
        no_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _split(tmp_path / "ds", "train")
    cfg = recipe("clip_tiny", **{**SMALL, "data.source": str(tmp_path / "ds")})
    with pytest.raises(Stop):
        vlmray.run(cfg, output=str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "[vlmray] no held-out split: data.eval_source is unset" in out
    assert '"eval": "none"' in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["eval"] == "none" and metrics["evaluations"] == 0
    assert metrics["zero_shot_top1"] is None and metrics["best_zero_shot_top1"] is None


def test_a_good_eval_source_is_named_at_start(no_ray: None, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    held_out = _split(tmp_path)
    (held_out / "classnames.txt").write_text("\n".join(f"class {i}" for i in range(20)))
    cfg = recipe("clip_tiny", **{**SMALL, "data.eval_source": str(held_out)})
    with pytest.raises(Stop):
        vlmray.run(cfg, output=str(tmp_path / "run"))
    line = next(x for x in capsys.readouterr().out.splitlines() if "held-out split" in x)
    assert f"[vlmray] held-out split: {held_out} (shards, 1 files; 20 classes from " \
           "classnames.txt; 80 templates from built-in: OpenAI CLIP" in line


def test_an_imagenet_style_folder_is_refused_where_raclip_needs_shards(no_ray: None,
                                                                      tmp_path: Path) -> None:
    for c in ("cat", "dog"):
        (tmp_path / "val" / c).mkdir(parents=True)
        (tmp_path / "val" / c / "a.jpg").write_bytes(make_sample(SYN, "eval", 0)[schema.IMAGE])
    cfg = recipe("clip_tiny", **{**SMALL, "data.eval_source": str(tmp_path / "val")})
    with pytest.raises(Stop):                 # fine for a plain run
        vlmray.run(cfg, output=str(tmp_path / "run"))
    cfg = recipe("raclip_tiny", **{**SMALL, "data.eval_source": str(tmp_path / "val")})
    with pytest.raises(ConfigError, match="is an ImageNet-style folder: RA-CLIP's held-out"):
        vlmray.run(cfg, output=str(tmp_path / "run2"))
