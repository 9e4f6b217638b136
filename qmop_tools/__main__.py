"""python -m qmop_tools: the `qmop` command (qmop_tools/cli.py)."""

import sys

from qmop_tools.cli import main

sys.exit(main())
