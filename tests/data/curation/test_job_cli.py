"""``jobs/curate.py`` flags: every knob documented, bad settings fail before any work, naming
the valid choices."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from vlmray.config import field_paths
from vlmray.config.jobs import CurateJobConfig

_spec = importlib.util.spec_from_file_location(
    "curate_job", Path(__file__).resolve().parents[3] / "jobs" / "curate.py")
curate_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(curate_job)


def test_flags_override_nested_fields() -> None:
    job = curate_job.parse(["--output", "o", "--image.min_side", "64", "--dedup.near", "false",
                            "--write.format", "parquet", "--text.scripts", '["latin", "greek"]'])
    assert (job.output, job.image.min_side, job.dedup.near) == ("o", 64, False)
    assert job.write.format == "parquet" and job.text.scripts == ["latin", "greek"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--image.resize", "foo"], "'none', 'keep_ratio', 'center_crop'"),
    (["--dedup.phash_threshold", "99"], "phash_threshold must be in [0, 16]"),
    (["--write.format", "csv"], "webdataset"),
    (["--imgae.min_side", "3"], "did you mean 'image.min_side'"),
    (["--write.shard_size", "0"], "shard_size must be > 0"),
])
def test_bad_settings_fail_naming_the_choices(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        curate_job.parse(["--output", "o", *argv])
    assert message in capsys.readouterr().err


def test_help_documents_every_field(capsys) -> None:
    with pytest.raises(SystemExit):
        curate_job.parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in field_paths(CurateJobConfig()):
        assert f"--{name} V" in text, name
    assert "(default: 4)" in text                      # dedup.phash_threshold


def test_missing_input_and_bad_model_fail_before_work(tmp_path) -> None:
    from vlmray.pipelines.curate import validate_job

    with pytest.raises(FileNotFoundError, match="no input"):
        validate_job(CurateJobConfig(input=str(tmp_path / "nope"), output=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="no vlmray checkpoint"):
        validate_job(curate_job.parse(["--output", "o", "--score.model", str(tmp_path)]))
    assert not (tmp_path / "o").exists()
