"""Progress bars of the long jobs (qmop_tools/progress.py): drawn on a terminal, never under --quiet or in logs."""

import io

from conftest import Terminal, as_stderr

from qmop_tools.bench.cli import main as bench_main
from qmop_tools.progress import progress_bar

SMOKE_ARGS = ["--preset", "smoke", "--budgets", "16", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1",
              "--decode-tokens", "2", "--no-plot", "--no-components"]


def test_bar_only_on_a_terminal_and_never_when_quiet(monkeypatch):
    terminal = as_stderr(monkeypatch, Terminal())
    for _ in progress_bar(range(3), desc="work"):
        pass
    assert "work" in terminal.getvalue() and "3/3" in terminal.getvalue()
    terminal.seek(0), terminal.truncate()
    for _ in progress_bar(range(3), desc="work", quiet=True):
        pass
    assert terminal.getvalue() == ""
    log = as_stderr(monkeypatch, io.StringIO())  # not a terminal: a CI log or a redirected file
    for _ in progress_bar(range(3), desc="work"):
        pass
    assert log.getvalue() == ""


def test_benchmark_shows_its_steps_and_is_silent_under_quiet(tmp_path, capsys, monkeypatch):
    terminal = as_stderr(monkeypatch, Terminal())
    bench_main([*SMOKE_ARGS, "--output", str(tmp_path / "loud")])
    drawn = terminal.getvalue()
    assert "FLOPs" in drawn and "batch 1" in drawn
    assert "timing batch 1" in capsys.readouterr().out
    terminal.seek(0), terminal.truncate()
    bench_main([*SMOKE_ARGS, "--output", str(tmp_path / "quiet"), "--quiet"])
    out = capsys.readouterr().out
    assert terminal.getvalue() == "" and "timing batch" not in out
    assert "| QMoP M=16" in out or "QMoP M=16" in out  # the report itself is still printed
