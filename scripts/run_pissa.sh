#!/bin/sh
# Train a pissa adapter with the same trainer and demo as run_miss.sh (see its variables, all
# overridable from the environment), e.g. LOAD_MODEL=... DATA_FILE=... sh scripts/run_pissa.sh
# The run ends by printing the merge command for its adapter.
PROJ_DIR=${PROJ_DIR:-out/demo/pissa}
LORA_CONFIG=${LORA_CONFIG:-'{"r":32,"alpha":32,"pissa_niter":4}'}
LR_INIT=${LR_INIT:-1e-2}
LR_FINAL=${LR_FINAL:-1e-3}
export PROJ_DIR LORA_CONFIG PEFT_CONFIG LR_INIT LR_FINAL
PEFT=pissa exec sh "$(dirname "$0")/run_miss.sh"
