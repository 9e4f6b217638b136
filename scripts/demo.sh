#!/usr/bin/env bash
# Set up .venv on a fresh machine (the one environment the demo needs), then answer the bundled picture's questions with the bundled trained checkpoint
# (checkpoints/qmop-tiny) and write a picture of what the projector did (outputs/demo.png).
#   bash scripts/demo.sh [--image PATH] [--question TEXT]... [--model DIR_OR_HUB_ID] [--num-visual-tokens M] [--picture PNG]
set -euo pipefail
cd "$(dirname "$0")/.."
QMOP_SKIP_457=1 QMOP_SKIP_LMMS=1 QMOP_SKIP_VLLM=1 QMOP_SKIP_SPACE=1 bash scripts/setup_env.sh  # only what the demo needs
exec .venv/bin/qmop demo "$@"
