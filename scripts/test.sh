#!/usr/bin/env bash
# Set up everything on a fresh machine, then run the test suite on transformers 5.x and on 4.57.x.
# Each run also loads a checkpoint saved by the other version (QMOP_OTHER_PYTHON); the transformers-5 run also
# runs lmms-eval (QMOP_LMMS_PYTHON, tests/test_lmms_eval.py) and vLLM with the plugin (QMOP_VLLM_PYTHON,
# tests/test_vllm_plugin.py), each from its own environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
ROOT="$(pwd)"
status=0
LMMS_PYTHON=""
if [[ "${QMOP_SKIP_LMMS:-0}" != "1" ]]; then
  LMMS_PYTHON="$ROOT/.venv-lmms/bin/python"
fi
VLLM_PYTHON=""
if [[ "${QMOP_SKIP_VLLM:-0}" != "1" ]]; then
  VLLM_PYTHON="$ROOT/.venv-vllm/bin/python"
fi
echo "=== tests on $("$ROOT/.venv/bin/python" -c 'import transformers; print("transformers", transformers.__version__)')"
QMOP_OTHER_PYTHON="$ROOT/.venv457/bin/python" QMOP_LMMS_PYTHON="$LMMS_PYTHON" QMOP_VLLM_PYTHON="$VLLM_PYTHON" \
  "$ROOT/.venv/bin/python" -m pytest tests -q -p no:cacheprovider "$@" || status=$?
echo "=== tests on $("$ROOT/.venv457/bin/python" -c 'import transformers; print("transformers", transformers.__version__)')"
QMOP_OTHER_PYTHON="$ROOT/.venv/bin/python" "$ROOT/.venv457/bin/python" -m pytest tests -q -p no:cacheprovider "$@" || status=$?
exit $status
