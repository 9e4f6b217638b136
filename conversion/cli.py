"""Convert LLaVA-1.5 + a CLIP text encoder into a verified, Hub-ready QMoP-LLaVA checkpoint.

Example (the 7B model; about 20 GB of RAM and 31 GB of disk in float16, computed in docs/conversion.md):

    qmop convert \\
        --llava llava-hf/llava-1.5-7b-hf --clip openai/clip-vit-large-patch14-336 \\
        --output checkpoints/qmop-llava-1.5-7b-144 --num-visual-tokens 144 \\
        --branches pooling resampler pruning --dtype float16 [--push-to-hub me/qmop-llava-1.5-7b --private]

The original layout works the same way (its CLIP tower is taken from --clip, or --vision-tower):

    qmop convert --llava liuhaotian/llava-v1.5-7b \\
        --clip openai/clip-vit-large-patch14-336 --output checkpoints/qmop-from-original

Before anything is written, the converted weights with --num-visual-tokens <patches> --branches pooling must
reproduce transformers' LlavaForConditionalGeneration (max abs logit difference printed), and the requested model
runs a forward and a short generation; the saved folder is reloaded through Auto* (trust_remote_code) and checked
again before it is moved into place. Step lines and progress bars go to stderr (bars only on a terminal); the
check results and the final JSON report go to stdout. `python -m conversion` is the same command.
"""

import argparse
import json
import logging
import signal
import sys

from configuration_qmop import BRANCH_ORDER
from conversion.converter import convert
from conversion.settings import DTYPES, ConversionError, ConversionSettings


def _override(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (VALUE in JSON, e.g. router_top_k=1), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmop convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llava", required=True, help="llava-hf folder/Hub id, or an original LLaVA-1.5 folder/Hub id")
    parser.add_argument("--clip", required=True, help="CLIP checkpoint whose text tower and tokenizer read the question")
    parser.add_argument("--vision-tower", help="CLIP vision checkpoint when --llava has none (default: --clip)")
    parser.add_argument("--output", required=True, help="folder to write (created atomically)")
    parser.add_argument("--num-visual-tokens", type=int, default=144, help="budget M per image (a perfect square)")
    parser.add_argument("--branches", nargs="+", default=list(BRANCH_ORDER), choices=list(BRANCH_ORDER))
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: the LLaVA weights' dtype")
    parser.add_argument("--config-override", type=_override, action="append", default=[], metavar="KEY=VALUE",
                        help="further QMoPConfig fields, e.g. router_top_k=1 pruning_score='\"question_relevance\"'")
    parser.add_argument("--pad-to-square", action=argparse.BooleanOptionalAction, default=None,
                        help="LLaVA-1.5's expand2square (default: on for the original layout, the image processor's do_pad otherwise)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised resampler and router")
    parser.add_argument("--device", default="cpu", help="where the verification forwards run (cpu, cuda, cuda:1)")
    parser.add_argument("--atol", type=float, help="max abs logit difference allowed (default 1e-5 fp32, 5e-2 half)")
    parser.add_argument("--verify-new-tokens", type=int, default=8)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the finished folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    parser.add_argument("--base-model", help="base_model for the model card (default: --llava and --clip Hub ids)")
    parser.add_argument("--quiet", action="store_true",
                        help="no step lines or progress bars (bars are drawn only when stderr is a terminal); "
                             "results, warnings and errors are still printed")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    # SIGTERM runs the clean-up of the temporary folder like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    settings = ConversionSettings(
        llava=args.llava, clip=args.clip, vision_tower=args.vision_tower, output=args.output,
        num_visual_tokens=args.num_visual_tokens, branches=tuple(args.branches), dtype=args.dtype,
        config_overrides=dict(args.config_override), pad_to_square=args.pad_to_square,
        max_shard_size=args.max_shard_size, seed=args.seed, device=args.device, atol=args.atol,
        verify_new_tokens=args.verify_new_tokens, overwrite=args.overwrite, push_to_hub=args.push_to_hub,
        private=args.private, token=args.token, base_model=args.base_model, quiet=args.quiet,
    )
    try:
        report = convert(settings)
    except (ConversionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in vars(report).items() if k != "fresh_keys"}, indent=2))
    return 0
