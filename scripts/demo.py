"""Answer questions about an image with QMoP-LLaVA; print the answers, router weights, kept patches and token
counts, and write a picture of what the projector did.

    python scripts/demo.py [--image assets/demo.png] [--question "what letter is in the top left corner?"]
                           [--model DIR_OR_HUB_ID] [--picture outputs/demo.png]

Without --question, the bundled image's five questions (one per mini-VTCBench dimension) are asked.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qmop_tools.demo import (  # noqa: E402
    DEFAULT_IMAGE, DEFAULT_QUESTIONS, answer_with, check_arguments, default_model, format_model_line, format_report,
    load,
)

DEFAULT_PICTURE = os.path.join("outputs", "demo.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="path or URL of the image")
    parser.add_argument("--question", action="append", help="repeatable (default: the five bundled questions)")
    parser.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: the bundled tiny one)")
    parser.add_argument("--num-visual-tokens", type=int, default=None, help="budget M (default: the checkpoint's)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--picture", default=DEFAULT_PICTURE, help="where to write the picture ('' for none)")
    args = parser.parse_args(argv)
    if args.model:
        check_arguments(args.model, args.image, args.num_visual_tokens, args.max_new_tokens, args.picture)
    path, trained = (args.model, True) if args.model else default_model()
    check_arguments(path, args.image, args.num_visual_tokens, args.max_new_tokens, args.picture)
    model, processor = load(path)
    print(format_model_line(path, trained) + "\n")
    results = []
    for question in args.question or DEFAULT_QUESTIONS:
        result = answer_with(model, processor, args.image, question, args.num_visual_tokens, args.max_new_tokens)
        print(format_report(result, path, trained, with_model=False) + "\n")
        results.append(result)
    if args.picture:
        from qmop_tools.vtcbench.visualize import contact_sheet, render_analysis, save_png

        save_png(contact_sheet([render_analysis(r) for r in results], columns=1 if len(results) == 1 else 2), args.picture)
        print(f"picture:  {args.picture} (kept patches of the pruning branch over the image, router weights)")


if __name__ == "__main__":
    main()
