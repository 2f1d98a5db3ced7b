#!/bin/sh
# Train a state adapter with the same trainer and demo as run_miss.sh (see its variables, all
# overridable from the environment), e.g. LOAD_MODEL=... DATA_FILE=... sh scripts/run_state.sh
# The run ends by printing the merge command for its adapter.
PROJ_DIR=${PROJ_DIR:-out/demo/state}
PEFT_CONFIG=${PEFT_CONFIG:-}
LR_INIT=${LR_INIT:-1e-1}
LR_FINAL=${LR_FINAL:-1e-2}
export PROJ_DIR LORA_CONFIG PEFT_CONFIG LR_INIT LR_FINAL
PEFT=state exec sh "$(dirname "$0")/run_miss.sh"
