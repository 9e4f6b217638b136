"""Shared test set-up: isolated HF cache, a fake Hub on 127.0.0.1 (started before huggingface_hub is imported),
the repository root on sys.path, and tiny QMoP-LLaVA models built locally."""

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings

_SESSION_DIR = tempfile.mkdtemp(prefix="qmop-tests-")
os.environ.setdefault("HF_HOME", os.path.join(_SESSION_DIR, "hf_home"))
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
for path in (REPO_ROOT, TESTS_DIR):
    if path not in sys.path:
        sys.path.insert(0, path)

from fake_hub import FakeHub  # noqa: E402

_HUB = FakeHub(os.path.join(_SESSION_DIR, "hub_store")).start()
os.environ["HF_ENDPOINT"] = _HUB.endpoint  # before huggingface_hub / transformers are imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs real checkpoints, network or a GPU (skipped by default)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("QMOP_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow/GPU test: set QMOP_RUN_SLOW=1 on a machine with weights and a GPU")
    for item in items:
        if "slow" in item.keywords or "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fake_hub():
    return _HUB


@pytest.fixture(scope="session")
def tiny():
    """(model, processor): tiny random QMoP-LLaVA, all three branches, budget 16 of 64 patches (eval mode)."""
    from qmop_tools.testing.tiny import build_tiny

    return build_tiny(num_visual_tokens=16)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny checkpoint folder (weights, config, processor, code), built once per session."""
    from qmop_tools.testing.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "qmop-tiny-ckpt"), num_visual_tokens=16)


def make_image(width=40, height=60, seed=0, mode="RGB"):
    from PIL import Image

    rng = np.random.RandomState(seed)
    array = (rng.rand(height, width, 3) * 255).astype("uint8")
    return Image.fromarray(array).convert(mode)


@pytest.fixture
def image():
    return make_image()


class Terminal(io.StringIO):
    """A stream that says it is a terminal, where progress bars are drawn (qmop_tools/progress.py)."""

    def isatty(self):
        return True


def as_stderr(monkeypatch, stream):
    """Make `stream` sys.stderr. Call it in the test body: pytest's capture re-installs its own sys.stderr between
    fixture set-up and the test."""
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A rare abort of one torchrun rank on CPU after the run has trained (its log printed, the main process saving):
# "terminate called without an active exception", SIGABRT, in native code, not in a Python frame. Seen here in 2 of
# about 110 two-process gloo launches on transformers 4.57.6 + torch 2.13.0 (one in CI); cause not found.
NATIVE_ABORT = "terminate called without an active exception"
PORT_OPTIONS = ("--master_port", "--main_process_port")


def run_launcher(command, *, env, timeout, fresh_paths=()):
    """Run a multi-process launch (torchrun, accelerate launch). If a rank died of the native abort above, warn,
    remove `fresh_paths` (what the launch writes, so nothing of the aborted one is read) and launch once more on a
    new rendezvous port; any other failure is returned as it is."""
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)
    if completed.returncode == 0 or NATIVE_ABORT not in completed.stderr or "SIGABRT" not in completed.stderr:
        return completed
    warnings.warn(f"a rank aborted in native code ({NATIVE_ABORT!r}); launching once more")
    for path in fresh_paths:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    command = list(command)
    for option in PORT_OPTIONS:
        if option in command:
            command[command.index(option) + 1] = str(free_port())
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)
