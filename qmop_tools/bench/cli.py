"""qmop bench --preset cpu --output outputs/bench   (GPU: --preset 7b --device cuda [--quantization nf4]; see
docs/benchmark.md). The measuring is in runner.py, the report in report.py."""

import argparse

from qmop_tools.checks import check_output_folder
from qmop_tools.progress import library_bars

from .report import write_outputs
from .runner import BenchSettings, run_benchmark


def parse_args(argv=None) -> BenchSettings:
    parser = argparse.ArgumentParser(
        prog="qmop bench",
        description="QMoP-LLaVA vs LLaVA-1.5 side by side: prefill FLOPs (counted and analytic), KV cache, time to "
                    "first token, decode tokens/s, peak memory, largest batch in a memory budget.")
    parser.add_argument("--preset", default="cpu", choices=["7b", "cpu", "smoke"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or meta (FLOPs and KV only)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the preset's")
    parser.add_argument("--attn-implementation", default="sdpa", help="the same on both models (sdpa, eager, ...)")
    parser.add_argument("--quantization", choices=["nf4"], help="bitsandbytes 4-bit LLM on both models")
    parser.add_argument("--budgets", type=int, nargs="+", help="QMoP visual tokens (perfect squares)")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--prompt-tokens", type=int, help="text tokens of the prompt (default 40)")
    parser.add_argument("--query-tokens", type=int, help="CLIP tokens of the question")
    parser.add_argument("--decode-tokens", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--memory-budget-gib", type=float)
    parser.add_argument("--qmop-path", help="QMoP-LLaVA checkpoint (folder or Hub id)")
    parser.add_argument("--llava-path", help="llava-hf checkpoint, e.g. llava-hf/llava-1.5-7b-hf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-components", dest="components", action="store_false",
                        help="skip timing QMoP's parts separately")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--tower-pruning", choices=["qg_vtc"],
                        help="also QMoP with QG-VTC tower pruning (composed) and the tower pruning alone (pooling)")
    parser.add_argument("--llm-pruning", metavar="LAYER:KEEP",
                        help="also QMoP with mid-LLM pruning (LearnPruner): from decoder LAYER on, KEEP visual tokens "
                             "per image (with --tower-pruning also both composed), e.g. 2:32")
    parser.add_argument("--compile-batch-sizes", type=int, nargs="*",
                        help="batch sizes of the generate() decode comparison, eager vs torch.compile with a static "
                             "cache (none: skip it; default: the preset's)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of that comparison")
    parser.add_argument("--output", default="outputs/bench", help="folder for efficiency.{md,json,png}")
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or step lines; only the report")
    args = vars(parser.parse_args(argv))
    output, plot, quiet = args.pop("output"), args.pop("plot"), args.pop("quiet")
    return BenchSettings(**args), output, plot, quiet


def main(argv=None):
    settings, output, plot, quiet = parse_args(argv)
    check_output_folder(output, "--output")  # before hours of measuring, not after
    with library_bars(quiet=quiet):
        results = run_benchmark(settings, log=(lambda line: None) if quiet else print, quiet=quiet)
    paths = write_outputs(results, output, plot=plot)
    with open(paths["markdown"]) as file:
        print(file.read())
    print("wrote", ", ".join(paths.values()))


if __name__ == "__main__":
    main()
