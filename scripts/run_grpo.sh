#!/bin/sh
# GRPO: reinforcement learning from rewards on prompts. Every variable below can be overridden from the
# environment, e.g. LOAD_MODEL=/models/rwkv7-g1-0.4b.pth DATA_FILE=gsm8k_prompts.jsonl sh scripts/run_grpo.sh
# With none set it runs the demo end to end: a tiny RWKV-7 base gets a short SFT on the demo's arithmetic
# problems (so that some rewards are not zero), then GRPO trains a MiSS adapter on it with the built-in
# rewards; the held-out reward (greedy) before and after is printed, the adapter merged, and one question asked.
LOAD_MODEL=${LOAD_MODEL:-out/demo/sft.pth}       # the policy to start from; the demo makes it when absent
DATA_FILE=${DATA_FILE:-out/demo/prompts.jsonl}   # {"prompt": str | messages, ...} per line
EVAL_DATA=${EVAL_DATA:-}                         # held-out prompts (greedy reward); the demo makes its own
EVAL_EVERY=${EVAL_EVERY:-30}
PROJ_DIR=${PROJ_DIR:-out/demo/grpo}
PEFT=${PEFT:-miss}                               # miss | lora | pissa | dora | state | full (full: KL_BETA=0)
MISS_CONFIG=${MISS_CONFIG:-'{"r":32,"mode":"balance"}'}
LORA_CONFIG=${LORA_CONFIG:-'{"r":32,"alpha":32}'}
PEFT_CONFIG=${PEFT_CONFIG:-}
REWARD=${REWARD:-"gsm8k format"}                 # module:function, path/file.py:function, gsm8k, format
REWARD_WEIGHTS=${REWARD_WEIGHTS:-"1 0.2"}        # one per REWARD
GRPO_LOSS=${GRPO_LOSS:-grpo}                     # grpo | dr_grpo | dapo
GROUP_SIZE=${GROUP_SIZE:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-32}
TEMPERATURE=${TEMPERATURE:-1.0}
TOP_P=${TOP_P:-1.0}
KL_BETA=${KL_BETA:-0.1}
PPO_EPOCHS=${PPO_EPOCHS:-1}
CTX_LEN=${CTX_LEN:-64}                           # longest prompt (tokens)
MICRO_BSZ=${MICRO_BSZ:-2}                        # prompts per micro-batch (x GROUP_SIZE completions)
ACCUMULATE=${ACCUMULATE:-1}
EPOCH_STEPS=${EPOCH_STEPS:-10}
EPOCH_COUNT=${EPOCH_COUNT:-9}
LR_INIT=${LR_INIT:-1e-3}
LR_FINAL=${LR_FINAL:-1e-3}
STRATEGY=${STRATEGY:-deepspeed_stage_1}
PRECISION=${PRECISION:-}                         # empty: bf16 on GPU, fp32 on CPU
ACCELERATOR=${ACCELERATOR:-}                     # empty: gpu if CUDA is available, else cpu
DEVICES=${DEVICES:-1}                            # > 1: several processes via torchrun (rollouts split)
OP=${OP:-auto}
SEED=${SEED:-42}
TENSORBOARD=${TENSORBOARD:-}
MERGE=${MERGE:-1}
QUESTION=${QUESTION:-"Mia has 7 marbles. She gets 6 more. How many marbles does Mia have now?"}
SFT_STEPS=${SFT_STEPS:-50}                       # demo: full fine-tuning steps of the SFT stage
DEMO_LAYERS=${DEMO_LAYERS:-2}
DEMO_EMBD=${DEMO_EMBD:-128}

. "$(dirname "$0")/env.sh"
set -e
if [ -z "$ACCELERATOR" ]; then
    if [ "$(python -c 'import torch; print(torch.cuda.is_available())')" = True ]; then ACCELERATOR=gpu; else ACCELERATOR=cpu; fi
fi
if [ -z "$PRECISION" ]; then
    if [ "$ACCELERATOR" = cpu ]; then PRECISION=fp32; else PRECISION=bf16; fi
fi
if [ "$LOAD_MODEL" = out/demo/sft.pth ] && [ ! -f "$LOAD_MODEL" ]; then
    mkdir -p out/demo
    [ -f out/demo/base.pth ] || python -m rwkv_peft.tools.init_model --version x070 --n_layer "$DEMO_LAYERS" \
        --n_embd "$DEMO_EMBD" --vocab_size 65536 --output_std 0.02 --out out/demo/base.pth
    [ -f out/demo/demo.jsonl ] || python -m rwkv_peft.data.demo --out out/demo/demo.jsonl --n 3000 --seed 0
    echo "[sft] $SFT_STEPS steps of full fine-tuning on the demo problems: out/demo/sft"
    python -m rwkv_peft.train --load_model out/demo/base.pth --data_file out/demo/demo.jsonl --data_type sft \
        --proj_dir out/demo/sft --peft full --ctx_len 64 --micro_bsz 4 --epoch_steps "$SFT_STEPS" --epoch_count 1 \
        --lr_init 2e-3 --lr_final 2e-4 --strategy "$STRATEGY" --precision "$PRECISION" \
        --accelerator "$ACCELERATOR" --op "$OP" --random_seed "$SEED"
    python merge/merge_miss.py --base_model out/demo/base.pth --peft_checkpoint out/demo/sft/rwkv-final.pth \
        --output "$LOAD_MODEL"
fi
[ -f "$LOAD_MODEL" ] || { echo "error: LOAD_MODEL=$LOAD_MODEL not found" >&2; exit 1; }
if [ "$DATA_FILE" = out/demo/prompts.jsonl ]; then
    mkdir -p out/demo
    [ -f "$DATA_FILE" ] || python -m rwkv_peft.data.demo --out "$DATA_FILE" --n 3000 --seed 0 --prompts
    if [ -z "$EVAL_DATA" ]; then
        EVAL_DATA=out/demo/prompts_eval.jsonl
        [ -f "$EVAL_DATA" ] || python -m rwkv_peft.data.demo --out "$EVAL_DATA" --n 16 --seed 1 --prompts
    fi
fi
if [ "$DEVICES" -gt 1 ]; then
    set -- python -m torch.distributed.run --nproc_per_node "$DEVICES" -m rwkv_peft.train
else
    set -- python -m rwkv_peft.train
fi
# shellcheck disable=SC2086  # REWARD and REWARD_WEIGHTS are lists of words
"$@" --load_model "$LOAD_MODEL" --data_file "$DATA_FILE" --data_type prompts --objective grpo \
    --reward $REWARD ${REWARD_WEIGHTS:+--reward_weights $REWARD_WEIGHTS} --grpo_loss "$GRPO_LOSS" \
    --group_size "$GROUP_SIZE" --max_new_tokens "$MAX_NEW_TOKENS" --temperature "$TEMPERATURE" --top_p "$TOP_P" \
    --kl_beta "$KL_BETA" --ppo_epochs "$PPO_EPOCHS" --proj_dir "$PROJ_DIR" \
    --peft "$PEFT" --miss_config "$MISS_CONFIG" --lora_config "$LORA_CONFIG" --peft_config "$PEFT_CONFIG" \
    --ctx_len "$CTX_LEN" --micro_bsz "$MICRO_BSZ" --accumulate_grad_batches "$ACCUMULATE" \
    --epoch_steps "$EPOCH_STEPS" --epoch_count "$EPOCH_COUNT" --lr_init "$LR_INIT" --lr_final "$LR_FINAL" \
    --strategy "$STRATEGY" --precision "$PRECISION" --accelerator "$ACCELERATOR" --devices "$DEVICES" \
    --op "$OP" --random_seed "$SEED" ${TENSORBOARD:+--tensorboard "$TENSORBOARD"} \
    ${EVAL_DATA:+--eval_data "$EVAL_DATA" --eval_every "$EVAL_EVERY"}
if [ -n "$EVAL_DATA" ]; then
    python - "$PROJ_DIR/train_log.jsonl" <<'PY'
import json, sys
evals = [r for r in map(json.loads, open(sys.argv[1])) if "eval_reward" in r]
first, last = evals[0], evals[-1]
print(f"[grpo] held-out reward (greedy): {first['eval_reward']:.3f} at step {first['step']} -> "
      f"{last['eval_reward']:.3f} at step {last['step']}")
PY
fi
if [ "$MERGE" = 1 ] && [ "$PEFT" != state ]; then
    python merge/merge_miss.py --base_model "$LOAD_MODEL" --peft_checkpoint "$PROJ_DIR/rwkv-final.pth" \
        --output "$PROJ_DIR/merged.pth"
    echo "[generate] User: $QUESTION"
    echo "$QUESTION" | python -m rwkv_peft.generate --model "$PROJ_DIR/merged.pth" --chat --temperature 0 \
        --max_tokens "$MAX_NEW_TOKENS"
fi
