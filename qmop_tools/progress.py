"""Progress bars of the long jobs (conversion, mini VTCBench, benchmark).

A bar is drawn on stderr when stderr is a terminal; under `--quiet` (`quiet=True`) and when stderr is not a
terminal (CI logs, output redirected to a file) there is none: there, the jobs' log lines are the record.
"""

import contextlib
import sys

from tqdm.auto import tqdm


def progress_bar(iterable=None, *, desc: str, total=None, unit: str = "it", quiet: bool = False, leave: bool = True):
    """tqdm on stderr; `disable=None` is tqdm's "only on a terminal"."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True,
                disable=True if quiet else None)


@contextlib.contextmanager
def library_bars(quiet: bool):
    """The same policy for transformers' own bars (loading weights, writing shards...), which do not look for a
    terminal themselves: off for the block under `quiet` or when stderr is not a terminal, then as they were;
    otherwise left as the user set them."""
    from transformers.utils import logging as hf_logging

    off = quiet or not sys.stderr.isatty()
    if not off or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
