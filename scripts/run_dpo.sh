#!/bin/sh
# Preference tuning. Every variable below can be overridden from the environment, e.g.
#   SFT_MODEL=/models/rwkv7-g1-0.4b.pth DATA_FILE=pairs.jsonl EVAL_DATA=heldout.jsonl CTX_LEN=1024 sh scripts/run_dpo.sh
# With none set it runs the demo end to end (a few minutes on a laptop CPU, no download): SFT a MiSS
# adapter on the demo's arithmetic problems (scripts/run_miss.sh) and merge it, make preference pairs
# from the same problems (chosen: the worked solution; rejected: one computed with the wrong operations),
# train a fresh MiSS adapter on them with DPO (its reference: the SFT model, i.e. the adapter switched
# off), print the held-out reward accuracy before and after, merge, and answer a question with generate.
OBJECTIVE=${OBJECTIVE:-dpo}                      # dpo | orpo | simpo
BETA=${BETA:-}                                   # empty: the objective's default (dpo 0.1, orpo 0.1, simpo 2.0)
SFT_MODEL=${SFT_MODEL:-out/demo/dpo/sft.pth}     # the policy's start and DPO's reference; the demo makes it
SFT_STEPS=${SFT_STEPS:-150}                      # the demo's SFT run (when SFT_MODEL is the demo's and absent)
DATA_FILE=${DATA_FILE:-out/demo/pairs.jsonl}     # {"prompt", "chosen", "rejected"} jsonl; the demo makes its own
EVAL_DATA=${EVAL_DATA:-out/demo/pairs_eval.jsonl}
EVAL_EVERY=${EVAL_EVERY:-25}
PROJ_DIR=${PROJ_DIR:-out/demo/dpo/$OBJECTIVE}
MISS_CONFIG=${MISS_CONFIG:-'{"r":32,"mode":"balance"}'}
CTX_LEN=${CTX_LEN:-80}
MICRO_BSZ=${MICRO_BSZ:-4}
EPOCH_STEPS=${EPOCH_STEPS:-50}
EPOCH_COUNT=${EPOCH_COUNT:-2}
LR_INIT=${LR_INIT:-1e-2}
LR_FINAL=${LR_FINAL:-1e-3}
STRATEGY=${STRATEGY:-deepspeed_stage_1}
PRECISION=${PRECISION:-auto}                     # auto: bf16 where the CPU/GPU computes it natively, else fp32
ACCELERATOR=${ACCELERATOR:-}                     # empty: gpu if CUDA is available, else cpu
QUESTION=${QUESTION:-"Mia had 15 marbles and gave 6 of them to Tom. How many marbles does Mia have left?"}

. "$(dirname "$0")/env.sh"
set -e
if [ -z "$ACCELERATOR" ]; then
    if [ "$(python -c 'import torch; print(torch.cuda.is_available())')" = True ]; then ACCELERATOR=gpu; else ACCELERATOR=cpu; fi
fi
if [ ! -f "$SFT_MODEL" ]; then
    [ "$SFT_MODEL" = out/demo/dpo/sft.pth ] || { echo "error: SFT_MODEL=$SFT_MODEL not found" >&2; exit 1; }
    echo "[sft] a MiSS adapter on the demo problems, $SFT_STEPS steps"
    PROJ_DIR=out/demo/dpo/sft EPOCH_STEPS="$SFT_STEPS" EPOCH_COUNT=1 EVAL_EVERY="$SFT_STEPS" MERGE=0 \
        ACCELERATOR="$ACCELERATOR" PRECISION="$PRECISION" sh scripts/run_miss.sh
    BASE_MODEL=out/demo/base.pth PEFT_CHECKPOINT=out/demo/dpo/sft/rwkv-final.pth OUTPUT="$SFT_MODEL" VERIFY=0 \
        sh scripts/merge_miss.sh
fi
if [ "$DATA_FILE" = out/demo/pairs.jsonl ] && [ ! -f "$DATA_FILE" ]; then
    python -m rwkv_peft.data.demo --out "$DATA_FILE" --n 2000 --seed 2 --preference
fi
if [ "$EVAL_DATA" = out/demo/pairs_eval.jsonl ] && [ ! -f "$EVAL_DATA" ]; then
    python -m rwkv_peft.data.demo --out "$EVAL_DATA" --n 64 --seed 3 --preference
fi
echo "[$OBJECTIVE] a fresh MiSS adapter on $SFT_MODEL"
python -m rwkv_peft.train --load_model "$SFT_MODEL" --data_file "$DATA_FILE" --data_type preference \
    --objective "$OBJECTIVE" ${BETA:+--beta "$BETA"} --proj_dir "$PROJ_DIR" --peft miss --miss_config "$MISS_CONFIG" \
    --ctx_len "$CTX_LEN" --micro_bsz "$MICRO_BSZ" --epoch_steps "$EPOCH_STEPS" --epoch_count "$EPOCH_COUNT" \
    --lr_init "$LR_INIT" --lr_final "$LR_FINAL" --strategy "$STRATEGY" --precision "$PRECISION" \
    --accelerator "$ACCELERATOR" --eval_data "$EVAL_DATA" --eval_every "$EVAL_EVERY"
python - "$PROJ_DIR/train_log.jsonl" <<'EOF'
import json, sys
evals = [r for r in map(json.loads, open(sys.argv[1])) if "eval_rewards/accuracies" in r]
first, last = evals[0], evals[-1]
print(f"[eval] held-out reward accuracy {first['eval_rewards/accuracies']:.3f} (step {first['step']}) -> "
      f"{last['eval_rewards/accuracies']:.3f} (step {last['step']}); margin {last['eval_rewards/margins']:.3f}")
EOF
echo "[merge] folding $PROJ_DIR/rwkv-final.pth into $SFT_MODEL"
BASE_MODEL="$SFT_MODEL" PEFT_CHECKPOINT="$PROJ_DIR/rwkv-final.pth" OUTPUT="$PROJ_DIR/merged.pth" \
    QUESTION="$QUESTION" sh scripts/merge_miss.sh
echo "[generate] User: $QUESTION"
echo "$QUESTION" | python -m rwkv_peft.generate --model "$PROJ_DIR/merged.pth" --chat --temperature 0 --max_tokens 64
