#!/usr/bin/env sh
# Small-scale MiSS method benchmark (see docs/benchmarks.md); a run finished in OUT is reused on restart, the
# pre-trained base is cached in CACHE by content hash. Every variable can be overridden from the environment,
# e.g. PRESET=quick sh scripts/bench_methods.sh; extra arguments go to the script.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TEXT=${TEXT:-$ROOT/../shared/data/tinyshakespeare.txt}
SFT=${SFT:-$ROOT/../shared/data/gsm8k_train.jsonl}
OUT=${OUT:-$ROOT/results/bench_methods}
CACHE=${CACHE:-$HOME/.cache/rwkv-peft/bench_methods}
PRESET=${PRESET:-full}
SPLIT_SEED=${SPLIT_SEED:-0}
PYTHON=${PYTHON:-python}
cd "$ROOT"
exec "$PYTHON" scripts/bench_methods.py --text "$TEXT" --sft "$SFT" --out "$OUT" --cache "$CACHE" --preset "$PRESET" --split_seed "$SPLIT_SEED" "$@"
