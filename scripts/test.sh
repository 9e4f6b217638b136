#!/usr/bin/env bash
# Set up everything on a fresh machine, then run the test suite on transformers 5.x and on 4.57.x.
# Each run also loads a checkpoint saved by the other version (QMOP_OTHER_PYTHON); the transformers-5 run also
# runs lmms-eval (QMOP_LMMS_PYTHON, tests/test_lmms_eval.py) and vLLM with the plugin (QMOP_VLLM_PYTHON,
# tests/test_vllm_plugin.py), each from its own environment.
# The two runs are independent (each has its own fake Hub, HF cache and temporary folders) and go side by side, one
# torch thread each, the 4.57 run's output held in a log printed when it ends; QMOP_TEST_SERIAL=1 runs them one after
# the other with torch's default threads. Arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
ROOT="$(pwd)"
LMMS_PYTHON=""
if [[ "${QMOP_SKIP_LMMS:-0}" != "1" ]]; then
  LMMS_PYTHON="$ROOT/.venv-lmms/bin/python"
fi
VLLM_PYTHON=""
if [[ "${QMOP_SKIP_VLLM:-0}" != "1" ]]; then
  VLLM_PYTHON="$ROOT/.venv-vllm/bin/python"
fi
version() { "$1" -c 'import transformers; print("transformers", transformers.__version__)'; }

run_tf5() {
  echo "=== tests on $(version "$ROOT/.venv/bin/python")"
  QMOP_OTHER_PYTHON="$ROOT/.venv457/bin/python" QMOP_LMMS_PYTHON="$LMMS_PYTHON" QMOP_VLLM_PYTHON="$VLLM_PYTHON" \
    "$ROOT/.venv/bin/python" -m pytest tests -q -p no:cacheprovider --durations=10 "$@"
}
run_tf457() {
  echo "=== tests on $(version "$ROOT/.venv457/bin/python")"
  QMOP_OTHER_PYTHON="$ROOT/.venv/bin/python" "$ROOT/.venv457/bin/python" -m pytest tests -q -p no:cacheprovider \
    --durations=10 "$@"
}

status=0
if [[ "${QMOP_TEST_SERIAL:-0}" == "1" ]]; then
  run_tf5 "$@" || status=$?
  run_tf457 "$@" || status=$?
  exit $status
fi
log="$(mktemp -t qmop-tests-4.57-XXXXXX.log)"
OMP_NUM_THREADS=1 run_tf457 "$@" > "$log" 2>&1 &
pid457=$!
echo "(the transformers 4.57 run goes on beside this one; its output follows when both have ended: $log)"
OMP_NUM_THREADS=1 run_tf5 "$@" || status=$?
wait $pid457 || status=$?
cat "$log"
rm -f "$log"
exit $status
