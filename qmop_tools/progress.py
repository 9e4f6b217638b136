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
def library_bars(enabled: bool):
    """transformers' own bars (loading weights, ...) on or off for the block, as they were afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()
