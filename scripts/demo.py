"""Answer a question about an image with QMoP-LLaVA; print the answer, router weights and token counts.

    python scripts/demo.py [--image assets/demo.png] [--question "What colour is the circle?"] [--model DIR_OR_HUB_ID]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qmop_tools.demo import DEFAULT_IMAGE, answer, default_model, format_report  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="path or URL of the image")
    parser.add_argument("--question", default="What colour is the circle?")
    parser.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: the bundled tiny one)")
    parser.add_argument("--num-visual-tokens", type=int, default=None, help="budget M (default: the checkpoint's)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args(argv)
    model, trained = (args.model, True) if args.model else default_model()
    result = answer(model, args.image, args.question, args.num_visual_tokens, args.max_new_tokens)
    print(format_report(result, model, trained))


if __name__ == "__main__":
    main()
