"""The `qmop` command (qmop_tools/cli.py): every job reachable from it, each `--help` complete, clear errors."""

import contextlib
import io
import os
import subprocess
import sys

import pytest

from qmop_tools import cli
from qmop_tools.serve import cli as serve_cli

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(argv) -> tuple:
    """(exit code, stdout, stderr) of `qmop *argv` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as stop:  # argparse exits with a code; SystemExit("message") exits 1 with the message
            code = stop.code if isinstance(stop.code, int) else 1
            if isinstance(stop.code, str):
                err.write(stop.code)
    return code, out.getvalue(), err.getvalue()


def test_help_lists_every_command():
    code, out, _ = run_cli(["--help"])
    assert code == 0
    for name, command in cli.COMMANDS.items():
        assert f"  {name} " in out and command.summary[:30] in out
    assert run_cli([])[0] == 2  # no command: the list, and a usage error


def test_unknown_command_is_named():
    code, _, err = run_cli(["trian"])
    assert code == 2 and "unknown command 'trian'" in err and "commands:" in err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS) + sorted(cli.ALIASES))
def test_every_command_has_its_own_help(name):
    """Each command's module imports without its optional extra and describes itself under its `qmop` name."""
    code, out, err = run_cli([name, "--help"])
    assert code == 0, err[-2000:]
    assert out.startswith(f"usage: qmop {cli.ALIASES.get(name, name)} "), out[:200]
    assert len(out.splitlines()) > 3  # options are listed, not only the usage line


def test_python_dash_m_is_the_same_command(tiny_checkpoint, tmp_path):
    """`python -m qmop_tools` runs a whole command end to end (the demo, on a tiny checkpoint) from any folder."""
    picture = tmp_path / "demo.png"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    completed = subprocess.run(
        [sys.executable, "-m", "qmop_tools", "ask", "--model", tiny_checkpoint, "--question", "What colour is it?",
         "--max-new-tokens", "2", "--picture", str(picture)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("answer:") == 1 and picture.stat().st_size > 1000


def test_installed_console_script():
    """Where the package is pip-installed (scripts/setup_env.sh installs it into .venv), `qmop` is on the PATH of
    the environment and is this command."""
    script = os.path.join(os.path.dirname(sys.executable), "qmop")
    if not os.path.exists(script):
        pytest.skip("this package is not pip-installed in this environment (no `qmop` script next to python)")
    completed = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0 and all(f"  {name} " in completed.stdout for name in cli.COMMANDS)


# ===================================================================================== qmop serve
def test_serve_builds_the_vllm_command():
    server = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "ckpt"]
    assert serve_cli.vllm_command("ckpt", 16, ["--port", "8123"]) == [
        *server, "--trust-remote-code", "--mm-processor-kwargs", '{"num_visual_tokens": 16}', "--port", "8123"]
    assert serve_cli.vllm_command("ckpt", None, ["--trust-remote-code"]) == [*server, "--trust-remote-code"]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--num-visual-tokens", "15"], "--num-visual-tokens must be a positive perfect square, got 15"),
        (["--num-visual-tokens", "16", "--mm-processor-kwargs", "{}"], "either as --num-visual-tokens or inside"),
    ],
)
def test_serve_rejects_bad_arguments_before_vllm(argv, fragment):
    code, _, err = run_cli(["serve", os.path.join(REPO_ROOT, "checkpoints", "qmop-tiny"), *argv])
    assert code == 2 and fragment in err


def test_serve_rejects_a_folder_that_is_not_a_checkpoint(tmp_path):
    code, _, err = run_cli(["serve", str(tmp_path)])
    assert code == 2 and "has no config.json" in err


def test_serve_without_vllm_says_what_to_install(monkeypatch):
    monkeypatch.setattr(serve_cli.importlib.util, "find_spec", lambda name: None)
    code, _, err = run_cli(["serve", os.path.join(REPO_ROOT, "checkpoints", "qmop-tiny")])
    assert code == 1 and "vLLM is not installed in this environment" in err


def test_serve_without_the_plugin_entry_point_says_so(monkeypatch):
    monkeypatch.setattr(serve_cli.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(serve_cli, "plugin_registered", lambda: False)
    code, _, err = run_cli(["serve", os.path.join(REPO_ROOT, "checkpoints", "qmop-tiny")])
    assert code == 1 and "entry point is not" in err and "pip install -e ." in err


def test_removed_shims_stay_removed():
    """One way to start each job: the old per-job scripts are gone (their jobs are `qmop` commands)."""
    for path in ("scripts/demo.py", "scripts/train_qmop.py", "scripts/gpu_check.py", "benchmarks/efficiency.py",
                 "conversion/convert_llava_to_qmop.py"):
        assert not os.path.exists(os.path.join(REPO_ROOT, path)), path


def test_tiny_writes_a_checkpoint_and_never_replaces_a_folder_with_files(tmp_path):
    code, out, _ = run_cli(["tiny", "--output", str(tmp_path / "tiny"), "--num-visual-tokens", "4"])
    assert code == 0 and os.path.isfile(tmp_path / "tiny" / "config.json")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["tiny", "--output", str(tmp_path / "mine")])
    assert code == 2 and "exists and is not empty" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
