"""`qmop`: one command for every job of the package (`python -m qmop_tools` is the same command).

    qmop demo                      answer the bundled picture's questions with the bundled checkpoint
    qmop convert --llava ... --clip ... --output DIR
    qmop train --model_name_or_path DIR --stage 1 ...
    qmop COMMAND --help            every option of one command

Each command lives in the module named in COMMANDS and is imported only when it runs, so `qmop --help` is instant
and a command whose extra is not installed (vLLM, lmms-eval, gradio) fails alone, with a message saying what to
install.
"""

import importlib
import sys
from typing import NamedTuple, Optional


class Command(NamedTuple):
    module: str  # imported when the command runs; its `main(argv)` parses the rest of the command line
    summary: str


COMMANDS = {
    "demo": Command("qmop_tools.demo", "answer questions about an image; print router weights, kept patches, token "
                                       "counts; draw what the projector did"),
    "convert": Command("conversion.cli", "LLaVA-1.5 (llava-hf or original) + a CLIP text encoder -> a verified "
                                         "QMoP-LLaVA checkpoint, optionally pushed to the Hub"),
    "train": Command("qmop_tools.train.run", "stage 1 (projector) or stage 2 (projector + LLM: full, LoRA, QLoRA); "
                                             "accelerate / torchrun / DeepSpeed / FSDP"),
    "bench": Command("qmop_tools.bench.cli", "efficiency vs LLaVA-1.5: prefill FLOPs, KV cache, TTFT, decode, memory"),
    "bench-vllm": Command("qmop_tools.bench.vllm_serving", "serving benchmark through vLLM at several budgets "
                                                           "(needs vLLM)"),
    "vtcbench": Command("qmop_tools.vtcbench.cli", "the mini VTCBench from nothing to results (resumable)"),
    "reader-probe": Command("qmop_tools.vtcbench.reader_probe", "can an LLM of the mini VTCBench's size read a "
                                                                "question dimension from the tower's tokens at all?"),
    "router": Command("qmop_tools.vtcbench.router_diagnostics", "does the router read the question? variance "
                                                                "shares, branch per question type, saturation, MI"),
    "serve": Command("qmop_tools.serve.cli", "serve a checkpoint with vLLM's OpenAI-compatible server (needs vLLM)"),
    "space": Command("qmop_tools.space", "the Gradio demo: run it locally, or export / push a Hugging Face Space"),
    "lmms-task": Command("qmop_tools.lmms.task", "write the mini VTCBench as an lmms-eval task folder"),
    "gpu-check": Command("qmop_tools.gpu_check", "load a 7B-shaped random checkpoint in bf16 and nf4 with "
                                                 "device_map='auto' and check placement, memory, speed"),
    "tiny": Command("qmop_tools.testing.tiny", "write a tiny random checkpoint built locally (for tests and trials)"),
}
ALIASES = {"ask": "demo"}


def usage() -> str:
    width = max(map(len, COMMANDS)) + 2
    lines = [__doc__.strip().split("\n")[0], "", "usage: qmop COMMAND [OPTIONS]   (qmop COMMAND --help for its options)",
             "", "commands:"]
    lines += [f"  {name:<{width}}{command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "aliases: " + ", ".join(f"{alias} = {name}" for alias, name in ALIASES.items())]
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"qmop-llava {version('qmop-llava')}")
        except PackageNotFoundError:  # run from a checkout that was not pip-installed
            print("qmop-llava (not installed; run from a checkout)")
        return 0
    name = ALIASES.get(argv[0], argv[0])
    if name not in COMMANDS:
        print(f"qmop: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    result = importlib.import_module(COMMANDS[name].module).main(argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
