#!/bin/sh
# Our exports in the runtimes people deploy with, beyond the default test run: GGUF files run in llama.cpp
# (llama-cpp-python) and give the `rwkv` runtime's logits (F32 <= 1e-4; F16 / Q8_0 within their rounding).
# Installs llama-cpp-python once: pip compiles llama.cpp from source (15-35 min on 2 cores; cached by pip
# afterwards; PIP_FIND_LINKS=DIR picks up a wheel built before). Then runs the tests marked `runtime`.
set -e
. "$(dirname "$0")/env.sh"
LLAMA_CPP_PYTHON=0.3.36
if ! python -c "import llama_cpp" 2>/dev/null; then
    echo "[setup] installing llama-cpp-python==$LLAMA_CPP_PYTHON (compiles llama.cpp unless a wheel is found)"
    python -m pip install "llama-cpp-python==$LLAMA_CPP_PYTHON"
fi
exec python -m pytest tests/test_export_runtime.py -m runtime -q -rA -s "$@"
