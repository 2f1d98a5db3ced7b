# Sourced by the scripts: use the active Python if it already has the project's
# dependencies, else create ./.venv once and install them there.
# (POSIX sh; no bash-isms, since users run `sh scripts/...`.)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$VIRTUAL_ENV" ] && ! python3 -c "import torch, deepspeed, rwkv, rwkv_peft" 2>/dev/null; then
    if [ ! -x "$ROOT/.venv/bin/python" ]; then
        echo "[setup] creating $ROOT/.venv (first run only)"
        python3 -m venv "$ROOT/.venv" || exit 1
    fi
    . "$ROOT/.venv/bin/activate"
    STAMP="$ROOT/.venv/.rwkv_peft_installed"
    if [ ! -f "$STAMP" ] || [ "$ROOT/requirements.txt" -nt "$STAMP" ] || [ "$ROOT/requirements-dev.txt" -nt "$STAMP" ]; then
        echo "[setup] installing requirements into .venv (first run only; a few minutes)"
        python -m pip install -q --upgrade pip || exit 1
        # torch first and pinned, so nothing else pulls a different (multi-GB) build
        python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" || exit 1
        python -m pip install -q -r "$ROOT/requirements-dev.txt" || exit 1
        python -m pip install -q --no-deps --no-build-isolation -e "$ROOT" || exit 1
        touch "$STAMP"
    fi
fi
cd "$ROOT" || exit 1
