#!/usr/bin/env bash
# Set up everything on a fresh machine, then answer a question about a bundled image with the bundled checkpoint.
#   bash scripts/demo.sh [--image PATH] [--question TEXT] [--model DIR_OR_HUB_ID] [--num-visual-tokens M]
set -euo pipefail
cd "$(dirname "$0")/.."
QMOP_SKIP_457=1 bash scripts/setup_env.sh
exec .venv/bin/python scripts/demo.py "$@"
