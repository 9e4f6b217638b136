"""Efficiency benchmark, QMoP-LLaVA vs LLaVA-1.5:  python benchmarks/efficiency.py --preset cpu --output outputs/bench
(GPU: --preset 7b --device cuda [--quantization nf4]). All logic is in qmop_tools/bench."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qmop_tools.bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main()
