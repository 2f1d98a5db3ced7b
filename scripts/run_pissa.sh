#!/bin/sh
# Train a PiSSA adapter: run_lora.sh with PEFT=pissa (LoRA started from the base's principal
# singular vectors; `"pissa_niter"` in LORA_CONFIG sets the SVD's iterations, default 4).
PEFT=pissa exec sh "$(dirname "$0")/run_lora.sh"
