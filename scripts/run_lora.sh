#!/bin/sh
# Train a LoRA-family adapter (PEFT=lora, the default, | pissa | dora) with the same trainer and demo
# as run_miss.sh (see its variables, all overridable from the environment), e.g.
#   LOAD_MODEL=... DATA_FILE=... sh scripts/run_lora.sh      PEFT=dora sh scripts/run_lora.sh
# The run ends by printing the merge command for its adapter.
PEFT=${PEFT:-lora}
PROJ_DIR=${PROJ_DIR:-out/demo/$PEFT}
LORA_CONFIG=${LORA_CONFIG:-'{"r":32,"alpha":32}'}
LR_INIT=${LR_INIT:-1e-2}
LR_FINAL=${LR_FINAL:-1e-3}
export PEFT PROJ_DIR LORA_CONFIG PEFT_CONFIG LR_INIT LR_FINAL
exec sh "$(dirname "$0")/run_miss.sh"
