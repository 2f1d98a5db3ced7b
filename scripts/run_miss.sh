#!/bin/sh
# Train a MiSS adapter. Every variable below can be overridden from the environment, e.g.
#   LOAD_MODEL=/models/rwkv7-g1-1.5b.pth DATA_FILE=data/mydata DATA_TYPE=binidx CTX_LEN=1024 sh scripts/run_miss.sh
# With none set it runs the embedded demo end to end (a few minutes on a laptop CPU): creates a tiny
# RWKV-7 base, generates arithmetic word problems, trains MiSS on them, then merges the adapter.
LOAD_MODEL=${LOAD_MODEL:-out/demo/base.pth}   # base .pth; the demo creates it when absent
DATA_FILE=${DATA_FILE:-out/demo/demo.jsonl}   # a file, or the PREFIX of PREFIX.bin/.idx; the demo makes its own
DATA_TYPE=${DATA_TYPE:-sft}                   # binidx | jsonl | sft | chat
EVAL_DATA=${EVAL_DATA:-}                      # held-out file in the DATA_TYPE format; empty: none (the demo makes one)
EVAL_EVERY=${EVAL_EVERY:-50}                  # with EVAL_DATA: held-out loss + generations every N steps
EVAL_SAMPLES=${EVAL_SAMPLES:-2}
SAVE_BEST=${SAVE_BEST:-0}                     # 1: keep the lowest-eval-loss adapter as rwkv-best.pth
TENSORBOARD=${TENSORBOARD:-}                  # a directory: TensorBoard event files
PROJ_DIR=${PROJ_DIR:-out/demo/miss}
PEFT=${PEFT:-miss}                            # miss | lora | pissa | dora | state | full (run_lora.sh etc. set it)
MISS_CONFIG=${MISS_CONFIG:-'{"r":32,"mode":"balance"}'}
LORA_CONFIG=${LORA_CONFIG:-'{"r":32,"alpha":32}'}  # --peft lora | pissa | dora
PEFT_CONFIG=${PEFT_CONFIG:-}                  # --peft state | full
TRAIN_PARTS=${TRAIN_PARTS:-}                  # e.g. ln,time
CTX_LEN=${CTX_LEN:-64}
MICRO_BSZ=${MICRO_BSZ:-4}
ACCUMULATE=${ACCUMULATE:-1}
EPOCH_STEPS=${EPOCH_STEPS:-50}
EPOCH_COUNT=${EPOCH_COUNT:-5}
EPOCH_SAVE=${EPOCH_SAVE:-1}
LR_INIT=${LR_INIT:-3e-2}
LR_FINAL=${LR_FINAL:-3e-3}
WARMUP_STEPS=${WARMUP_STEPS:-0}
STRICT=${STRICT:-0}                           # 1: a malformed jsonl line stops the run
STRATEGY=${STRATEGY:-deepspeed_stage_1}
PRECISION=${PRECISION:-auto}                  # auto: bf16 where the CPU/GPU computes it natively, else fp32
ACCELERATOR=${ACCELERATOR:-}                  # empty: gpu if CUDA is available, else cpu
DEVICES=${DEVICES:-1}                         # > 1: several processes via torchrun
GRAD_CP=${GRAD_CP:-0}
OP=${OP:-auto}                                # WKV kernel: auto | cuda | cpu | torch | fla
SEED=${SEED:-42}
RESUME=${RESUME:-0}
WANDB=${WANDB:-}
MERGE=${MERGE:-1}                             # 0: do not merge at the end (MiSS; others print the command)
QUESTION=${QUESTION:-"Mia has 7 marbles. She gets 6 more. How many marbles does Mia have now?"}  # asked at the end
DEMO_LAYERS=${DEMO_LAYERS:-2}                 # size of the demo base (World vocab, 65536 tokens)
DEMO_EMBD=${DEMO_EMBD:-128}

. "$(dirname "$0")/env.sh"
set -e
if [ -z "$ACCELERATOR" ]; then
    if [ "$(python -c 'import torch; print(torch.cuda.is_available())')" = True ]; then ACCELERATOR=gpu; else ACCELERATOR=cpu; fi
fi
if [ ! -f "$LOAD_MODEL" ]; then
    [ "$LOAD_MODEL" = out/demo/base.pth ] || { echo "error: LOAD_MODEL=$LOAD_MODEL not found" >&2; exit 1; }
    mkdir -p out/demo
    echo "[demo] creating a tiny RWKV-7 base: $LOAD_MODEL"
    python -m rwkv_peft.tools.init_model --version x070 --n_layer "$DEMO_LAYERS" --n_embd "$DEMO_EMBD" \
        --vocab_size 65536 --output_std 0.02 --out "$LOAD_MODEL"
fi
if [ "$DATA_FILE" = out/demo/demo.jsonl ] && [ ! -f "$DATA_FILE" ]; then  # others: the trainer checks
    mkdir -p out/demo
    echo "[demo] generating arithmetic word problems: $DATA_FILE"
    python -m rwkv_peft.data.demo --out "$DATA_FILE" --n 3000 --seed 0
fi
if [ "$DATA_FILE" = out/demo/demo.jsonl ] && [ -z "$EVAL_DATA" ]; then
    EVAL_DATA=out/demo/demo_eval.jsonl
    [ -f "$EVAL_DATA" ] || python -m rwkv_peft.data.demo --out "$EVAL_DATA" --n 32 --seed 1
fi
if [ "$DEVICES" -gt 1 ]; then
    set -- python -m torch.distributed.run --nproc_per_node "$DEVICES" -m rwkv_peft.train
else
    set -- python -m rwkv_peft.train
fi
"$@" --load_model "$LOAD_MODEL" --data_file "$DATA_FILE" --data_type "$DATA_TYPE" --strict "$STRICT" \
    --proj_dir "$PROJ_DIR" \
    --peft "$PEFT" --miss_config "$MISS_CONFIG" --lora_config "$LORA_CONFIG" --peft_config "$PEFT_CONFIG" \
    ${TRAIN_PARTS:+--train_parts "$TRAIN_PARTS"} \
    --ctx_len "$CTX_LEN" --micro_bsz "$MICRO_BSZ" --accumulate_grad_batches "$ACCUMULATE" \
    --epoch_steps "$EPOCH_STEPS" --epoch_count "$EPOCH_COUNT" --epoch_save "$EPOCH_SAVE" \
    --lr_init "$LR_INIT" --lr_final "$LR_FINAL" --warmup_steps "$WARMUP_STEPS" \
    --strategy "$STRATEGY" --precision "$PRECISION" --accelerator "$ACCELERATOR" --devices "$DEVICES" \
    --grad_cp "$GRAD_CP" --op "$OP" --random_seed "$SEED" --resume "$RESUME" ${WANDB:+--wandb "$WANDB"} \
    ${EVAL_DATA:+--eval_data "$EVAL_DATA" --eval_every "$EVAL_EVERY" --eval_samples "$EVAL_SAMPLES"} \
    ${EVAL_DATA:+--save_best "$SAVE_BEST"} ${TENSORBOARD:+--tensorboard "$TENSORBOARD"}
if [ "$MERGE" = 1 ] && [ "$PEFT" = miss ]; then
    echo "[merge] folding $PROJ_DIR/rwkv-final.pth into $LOAD_MODEL"
    QUESTION="$QUESTION" BASE_MODEL="$LOAD_MODEL" PEFT_CHECKPOINT="$PROJ_DIR/rwkv-final.pth" sh scripts/merge_miss.sh
    echo "[generate] User: $QUESTION"
    echo "$QUESTION" | python -m rwkv_peft.generate --model "${OUTPUT:-out/demo/merged.pth}" --chat \
        --temperature 0 --max_tokens 64
fi
