"""`python -m conversion ...` is `qmop convert ...` (conversion/cli.py)."""

import sys

from conversion.cli import main

sys.exit(main())
