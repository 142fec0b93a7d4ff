"""Config, recipes and the CLI: typed overrides, name checks before Ray, ``--help`` from docstrings.

    pytest tests/test_config.py -q
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmray.cli import build_parser, field_docs
from vlmray.config import (
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ObjectiveSpec,
    SyntheticConfig,
    TrainConfig,
    apply_overrides,
    field_paths,
    parse_objectives,
    parse_value,
)
from vlmray.recipes import list_recipes, recipe
from vlmray.validate import validate

ROOT = Path(__file__).resolve().parents[1]


# --- dotted overrides parse by the field's type -----------------------------------------------


def test_overrides_parse_int_float_str_and_nested() -> None:
    cfg = recipe("clip_tiny", **{"train.steps": "7", "train.lr": "1e-3",
                                 "train.cpus_per_worker": "2", "data.tokenizer": "hash",
                                 "data.synthetic.num_train": "120"})
    assert cfg.train.steps == 7 and type(cfg.train.steps) is int
    assert cfg.train.lr == 1e-3 and type(cfg.train.lr) is float
    assert cfg.train.cpus_per_worker == 2.0 and type(cfg.train.cpus_per_worker) is float
    assert cfg.data.synthetic.num_train == 120 and isinstance(cfg.data.synthetic, SyntheticConfig)


def test_overrides_return_a_copy_and_accept_typed_values() -> None:
    base = recipe("clip_tiny")
    cfg = apply_overrides(base, {"train.steps": 11, "model.vision_kwargs": {"depth": 1}})
    assert (cfg.train.steps, cfg.model.vision_kwargs) == (11, {"depth": 1})
    assert base.train.steps == TrainConfig().steps                 # the input is untouched
    assert base.model.vision_kwargs == ModelConfig().vision_kwargs


def test_override_int_field_rejects_a_float_string() -> None:
    with pytest.raises(ConfigError, match=r"train\.steps: cannot read '3\.5' as int"):
        recipe("clip_tiny", **{"train.steps": "3.5"})


@pytest.mark.parametrize("text, value", [("true", True), ("False", False), ("1", True),
                                         ("0", False), ("yes", True), ("NO", False)])
def test_parse_bool(text: str, value: bool) -> None:
    assert parse_value(bool, text, "x.flag") is value


def test_parse_bool_rejects_other_words() -> None:
    with pytest.raises(ConfigError, match=r"x\.flag: cannot read 'maybe' as bool"):
        parse_value(bool, "maybe", "x.flag")


def test_literal_override_and_its_choices() -> None:
    assert recipe("clip_tiny", **{"model.text_pooling": "first"}).model.text_pooling == "first"
    with pytest.raises(ConfigError) as e:
        recipe("clip_tiny", **{"model.text_pooling": "max"})
    assert "model.text_pooling" in str(e.value) and "['mean', 'first']" in str(e.value)
    with pytest.raises(ConfigError, match=r"\['auto', 'cpu', 'gpu'\]"):
        recipe("clip_tiny", **{"train.device": "tpu"})


def test_dict_fields_parse_json() -> None:
    text = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64}
    cfg = recipe("clip_tiny", **{"model.vision_kwargs": '{"patch_size": 8, "depth": 1}',
                                 "model.text": json.dumps(text)})
    assert cfg.model.vision_kwargs == {"patch_size": 8, "depth": 1}
    assert cfg.model.text == text
    with pytest.raises(ConfigError, match="model.vision_kwargs: cannot read"):
        recipe("clip_tiny", **{"model.vision_kwargs": "{depth: 1}"})


def test_objectives_parse_weights_and_json() -> None:
    assert parse_objectives("clip:1.0") == [ObjectiveSpec(name="clip", weight=1.0)]
    assert parse_objectives(" clip , other:0.25 ") == [
        ObjectiveSpec(name="clip", weight=1.0), ObjectiveSpec(name="other", weight=0.25)]
    cfg = recipe("clip_tiny", objectives='[{"name": "clip", "weight": 2, '
                                         '"params": {"gather": "global"}}]')
    assert cfg.objectives == [ObjectiveSpec(name="clip", weight=2, params={"gather": "global"})]
    assert recipe("clip_tiny", objectives="clip:0.5").objectives == [
        ObjectiveSpec(name="clip", weight=0.5)]
    with pytest.raises(ConfigError, match="objectives: cannot read 'clip:heavy'"):
        recipe("clip_tiny", objectives="clip:heavy")


def test_objectives_json_with_a_bad_key_is_a_config_error() -> None:
    """BUG: ObjectiveSpec(**d) raises TypeError, which parse_value does not turn into a
    ConfigError, so ``--objectives '[{"nam": "clip"}]'`` dies with a traceback."""
    with pytest.raises(ConfigError, match="objectives"):
        recipe("clip_tiny", objectives='[{"nam": "clip"}]')


def test_unknown_field_suggests_and_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as e:
        recipe("clip_tiny", **{"train.stepz": "3"})
    msg = str(e.value)
    assert "unknown config field 'train.stepz'" in msg
    assert "did you mean 'train.steps'" in msg
    valid = msg.split("valid: ", 1)[1].split(", ")
    assert valid == sorted(field_paths(Config()))                   # every name, none cut off
    assert {"train.steps", "model.vision", "data.synthetic.seed", "objectives"} <= set(valid)


def test_unknown_recipe_names_valid_recipes() -> None:
    assert {"clip_tiny", "clip_vit_b16"} <= set(list_recipes())
    with pytest.raises(KeyError) as e:
        recipe("clip_tny")
    msg = str(e.value)
    assert "unknown recipe 'clip_tny'" in msg and "did you mean 'clip_tiny'" in msg
    assert all(name in msg for name in list_recipes())


# --- validate(): names checked before any work -------------------------------------------------


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_validates(name: str) -> None:
    cfg = recipe(name)
    assert validate(cfg) is cfg and cfg.recipe == name


def test_validate_rejects_unknown_timm_model() -> None:
    cfg = recipe("clip_tiny", **{"model.vision": "vit_tiny_patch16_22"})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert "unknown timm model 'vit_tiny_patch16_22'" in msg
    assert "did you mean" in msg and "'vit_tiny_patch16_224'" in msg and "valid: " in msg


def test_validate_rejects_unknown_transformers_model_type() -> None:
    cfg = recipe("clip_tiny", **{"model.text": '{"model_type": "bertt", "hidden_size": 32}'})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert "unknown transformers model_type 'bertt'" in msg and "'bert'" in msg
    assert "valid: " in msg


def test_validate_rejects_unknown_objective_as_config_error() -> None:
    """BUG: validate() calls validate_spec without wrapping, so an unknown objective raises
    UnknownNameError (a KeyError/ValueError), not the documented ConfigError; jobs/pretrain.py
    only catches ConfigError and prints a traceback."""
    cfg = recipe("clip_tiny", objectives="clp")
    with pytest.raises(ValueError) as e:                            # raises: names the choices
        validate(cfg)
    assert "unknown objective 'clp'" in str(e.value) and "clip, " in str(e.value)
    assert "valid: " in str(e.value)
    assert isinstance(e.value, ConfigError), f"validate raised {type(e.value).__name__}"


def test_validate_rejects_duplicate_objectives() -> None:
    """BUG: validate() checks specs one by one, so ``clip,clip`` passes and only fails in
    ObjectiveMix.from_specs on the Ray workers."""
    cfg = recipe("clip_tiny", objectives="clip,clip:0.5")
    with pytest.raises(ConfigError, match="more than once"):
        validate(cfg)


def test_validate_checks_literals_ranges_and_paths(tmp_path: Path) -> None:
    cfg = recipe("clip_tiny")
    cfg.train.precision = "fp16"                                    # set directly, not parsed
    with pytest.raises(ConfigError, match=r"train\.precision: 'fp16' is not one of"):
        validate(cfg)
    bad = [({"train.steps": "0"}, "train.steps must be an int >= 1"),
           ({"train.lr": "nan"}, "train.lr must be a finite number in (0, 1]"),
           ({"train.batch_size": "10", "train.num_workers": "3"}, "not divisible"),
           ({"data.tokenizer": "bpe"}, "'hash', 'hf:<local directory>'"),
           ({"model.vision_weights": str(tmp_path / "none.pt")}, "is not a file"),
           ({"model.text_weights": str(tmp_path / "no_dir")}, "is not a local directory"),
           ({"objectives": ""}, "at least one objective")]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(recipe("clip_tiny", **overrides))


# --- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_recipes())
def test_to_dict_from_dict_round_trip(name: str) -> None:
    objectives = '[{"name": "clip", "weight": 0.5, "params": {"gather": "global"}}]'
    cfg = recipe(name, objectives=objectives)
    back = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert isinstance(back.data, DataConfig) and isinstance(back.eval, EvalConfig)
    assert isinstance(back.data.synthetic, SyntheticConfig)
    assert isinstance(back.objectives[0], ObjectiveSpec)


def test_from_dict_rejects_unknown_fields() -> None:
    d = Config().to_dict()
    d["train"]["stepz"] = 3
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['stepz'\] in TrainConfig"):
        Config.from_dict(d)


# --- CLI ----------------------------------------------------------------------------------------


def test_help_shows_field_docstrings() -> None:
    parser = build_parser("test")
    actions = {a.dest: a for a in parser._actions}
    assert actions["train.steps"].help == "Optimiser steps in the whole run."
    assert actions["model.text_pooling"].help == field_docs(ModelConfig)["text_pooling"]
    text = " ".join(parser.format_help().split())
    assert "--train.steps V Optimiser steps in the whole run." in text
    assert "--data.synthetic.num_train V Number of train samples." in text
    for name in field_paths(Config()):                              # every field is documented
        if name not in ("recipe", "objectives"):
            assert actions[name].help, f"--{name} has no help"


_GUARD = ("import runpy, sys, ray\n"
          "def _no_ray(*a, **k): raise SystemExit('RAY_INIT_CALLED')\n"
          "ray.init = _no_ray\n"
          "sys.argv = ['jobs/pretrain.py', *sys.argv[1:]]\n"
          "runpy.run_path('jobs/pretrain.py', run_name='__main__')\n")
_CLI_CASES = {
    "list": ["--list-recipes"],
    "field": ["--train.stepz", "3"],
    "vision": ["--model.vision", "not_a_model"],
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Runs jobs/pretrain.py once per case, concurrently, with ``ray.init`` replaced by an exit
    and Ray's temp dir inside a fresh directory: case -> (process, wall seconds, temp dir)."""
    procs = {}
    for case, args in _CLI_CASES.items():
        tmp = tmp_path_factory.mktemp(f"cli_{case}")
        env = {**os.environ, "RAY_TMPDIR": str(tmp / "raytmp"), "TMPDIR": str(tmp),
               "OMP_NUM_THREADS": "1"}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen([sys.executable, "-c", _GUARD, *args], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[case] = (proc, time.monotonic(), tmp)
    out = {}
    for case, (proc, t0, tmp) in procs.items():
        stdout, stderr = proc.communicate(timeout=90)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        out[case] = (done, time.monotonic() - t0, tmp)
    return out


def _assert_no_ray(proc: subprocess.CompletedProcess, tmp: Path) -> None:
    out = proc.stdout + proc.stderr
    assert "RAY_INIT_CALLED" not in out
    assert "Started a local Ray instance" not in out and "Connecting to existing Ray" not in out
    assert not list(tmp.rglob("session_*")), "a Ray session directory was created"


def test_cli_list_recipes(cli: dict[str, tuple]) -> None:
    proc, _, tmp = cli["list"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == list_recipes()
    _assert_no_ray(proc, tmp)


@pytest.mark.parametrize("case, expected", [
    ("field", ["unknown config field 'train.stepz'", "did you mean 'train.steps'",
               "train.warmup_steps"]),
    ("vision", ["unknown timm model 'not_a_model'", "valid: ", " in all)"]),
])
def test_cli_bad_names_fail_fast_before_ray(cli: dict[str, tuple], case: str,
                                            expected: list[str]) -> None:
    proc, _, tmp = cli[case]
    assert proc.returncode == 2, proc.stderr[-2000:]
    for text in expected:
        assert text in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    _assert_no_ray(proc, tmp)


def test_cli_unknown_objective_exits_cleanly(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    """In-process main(): BUG (see test_validate_rejects_unknown_objective_as_config_error):
    the UnknownNameError escapes main() as a traceback instead of ``error: ...`` and exit 2."""
    import runpy

    import ray

    def no_ray(*a: object, **k: object) -> None:
        raise AssertionError("ray.init called: the bad objective reached run()")

    monkeypatch.setattr(ray, "init", no_ray)
    main = runpy.run_path(str(ROOT / "jobs" / "pretrain.py"))["main"]
    with pytest.raises(SystemExit) as e:
        main(["--objectives", "clp"])
    assert e.value.code == 2
    assert "unknown objective 'clp'" in capsys.readouterr().err
