#!/bin/sh
# Fold a MiSS adapter into its base model, then check the merged file in the `rwkv` runtime:
# max logit difference against the adapted model and a greedy answer to a demo question.
# Every variable below can be overridden from the environment, e.g.
#   PEFT_CHECKPOINT=out/demo/miss/rwkv-3.pth OUTPUT=/tmp/merged.pth sh scripts/merge_miss.sh
# With none set it merges the demo run of scripts/run_miss.sh.
BASE_MODEL=${BASE_MODEL:-out/demo/base.pth}
PEFT_CHECKPOINT=${PEFT_CHECKPOINT:-out/demo/miss/rwkv-final.pth}  # adapter_config.json beside it gives the mode
OUTPUT=${OUTPUT:-out/demo/merged.pth}  # .pth (what the runtimes load) or .safetensors
MODE=${MODE:-}          # balance|mini|bat_row|bat_col; empty: from adapter_config.json (or the .disha tensor)
QUESTION=${QUESTION:-}  # asked in the runtime check; empty: a demo question
N_TOKENS=${N_TOKENS:-48}
VERIFY=${VERIFY:-1}     # 0: merge only

. "$(dirname "$0")/env.sh"
set --
[ "$VERIFY" = 1 ] && set -- --verify --n_tokens "$N_TOKENS"
exec python merge/merge_miss.py --base_model "$BASE_MODEL" --peft_checkpoint "$PEFT_CHECKPOINT" --output "$OUTPUT" \
    --quiet ${MODE:+--mode "$MODE"} ${QUESTION:+--prompt "$QUESTION"} "$@"
