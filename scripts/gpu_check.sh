#!/bin/sh
# GPU machine check of every CUDA WKV kernel (WKV-7, WKV-6 and WKV-5 on it), under 5 minutes: builds them with
# nvcc (cached in ~/.cache/rwkv_peft/ops), compares forward, final state and all gradients with the CPU
# kernels, prints forward+backward tokens/s at B=8 T=4096 H=32 N=64 bf16.
#   sh scripts/gpu_check.sh [--families wkv7,wkv6,wkv5]   (PYTHON=/path/to/python to pick a CUDA-enabled torch)
set -e
cd "$(dirname "$0")/.."
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
command -v nvcc >/dev/null 2>&1 || { echo "gpu_check: nvcc not on PATH"; exit 2; }
exec timeout 290 "$PYTHON" -m rwkv_peft.ops.gpu_check "$@"
