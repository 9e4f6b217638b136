import os
import subprocess
import sys

from conftest import REPO_ROOT

from qmop_tools.demo import answer, format_report


def test_answer_reports_router_and_token_counts(tiny_checkpoint):
    result = answer(tiny_checkpoint, os.path.join(REPO_ROOT, "assets", "demo.png"), "What colour is the circle?",
                    max_new_tokens=5)
    assert result["visual_tokens"] == 16 and result["patches"] == 64
    assert result["prompt_tokens_uncompressed"] - result["prompt_tokens"] == 48
    assert abs(sum(result["router_weights"].values()) - 1) < 1e-5
    assert 0 < result["generated_tokens"] <= 5
    assert "router:" in format_report(result, tiny_checkpoint, trained=False)
    assert answer(tiny_checkpoint, os.path.join(REPO_ROOT, "assets", "demo.png"), "Why?", num_visual_tokens=4,
                  max_new_tokens=2)["visual_tokens"] == 4


def test_demo_script_runs(tiny_checkpoint, tmp_path):
    picture = tmp_path / "analysis.png"
    result = subprocess.run(
        [sys.executable, "-m", "qmop_tools", "demo", "--model", tiny_checkpoint, "--max-new-tokens", "3",
         "--question", "What colour is the circle?", "--picture", str(picture)],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "answer:" in result.stdout and "visual tokens per image instead of 64 patches" in result.stdout
    assert result.stdout.count("answer:") == 1 and os.path.getsize(picture) > 1000


def test_bundled_checkpoint_carries_the_current_remote_code_and_template():
    """A Hub user of checkpoints/qmop-tiny runs the folder's own copies: they must be the repository's code."""
    import processing_qmop

    folder = os.path.join(REPO_ROOT, "checkpoints", "qmop-tiny")
    for name in ("configuration_qmop.py", "modeling_qmop.py", "processing_qmop.py", "pipeline_qmop.py"):
        with open(os.path.join(REPO_ROOT, name), "rb") as ours, open(os.path.join(folder, name), "rb") as bundled:
            assert ours.read() == bundled.read(), f"checkpoints/qmop-tiny/{name} is stale: copy the repository's file"
    with open(os.path.join(folder, "chat_template.jinja")) as f:
        assert f.read().strip() == processing_qmop.LLAVA_15_CHAT_TEMPLATE.strip()
