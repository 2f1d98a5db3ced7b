#!/bin/sh
# GPU machine check of the WKV-7 (then WKV-6/5) CUDA kernels, under 5 minutes: builds it with nvcc (cached in
# ~/.cache/rwkv_peft/ops), compares forward, final state and all gradients with the CPU
# kernel, prints forward+backward tokens/s at B=8 T=4096 H=32 N=64 bf16.
#   sh scripts/gpu_check.sh            (PYTHON=/path/to/python to pick a CUDA-enabled torch)
set -e
cd "$(dirname "$0")/.."
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
command -v nvcc >/dev/null 2>&1 || { echo "gpu_check: nvcc not on PATH"; exit 2; }
timeout 190 "$PYTHON" -m rwkv_peft.ops.gpu_check "$@"
exec timeout 100 "$PYTHON" -m rwkv_peft.ops.gpu_check_wkv6 "$@"
