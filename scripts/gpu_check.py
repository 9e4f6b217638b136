"""One-command deployment check (bf16 and nf4, device_map="auto") of a 7B-shaped QMoP-LLaVA with random weights.

    python scripts/gpu_check.py --preset 7b [--folder /tmp/qmop-7b-random] [--modes bf16 nf4]
"""

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers  # noqa: E402

from qmop_tools.gpu_check import build_random_checkpoint, check  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--folder", default=None, help="where the random checkpoint is written (reused if present)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", nargs="+", choices=["bf16", "nf4"], default=["bf16", "nf4"])
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    folder = args.folder or os.path.join(os.path.expanduser("~"), ".cache", f"qmop-{args.preset}-random")
    build_random_checkpoint(args.preset, folder)
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}))
    for mode in args.modes:
        print(json.dumps(check(folder, mode, args.device, args.new_tokens)))


if __name__ == "__main__":
    main()
