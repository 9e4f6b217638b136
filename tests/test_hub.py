"""Saving, loading in a fresh process through Auto* + trust_remote_code, pushing to the (fake) Hub, pipelines."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, TESTS_DIR, make_image

SCRIPT = os.path.join(TESTS_DIR, "load_and_generate.py")
PROMPT = "USER: <image>\nWhat colour is the circle? ASSISTANT:"
CODE_FILES = {"configuration_qmop.py", "modeling_qmop.py", "processing_qmop.py", "pipeline_qmop.py"}


def _load_in_fresh_process(folder, python=sys.executable):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([python, SCRIPT, str(folder)], cwd="/", env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _reference(folder):
    from modeling_qmop import QMoPForConditionalGeneration
    from processing_qmop import QMoPProcessor

    model = QMoPForConditionalGeneration.from_pretrained(folder).eval()
    processor = QMoPProcessor.from_pretrained(folder)
    inputs = processor(images=make_image(width=40, height=60, seed=0), text=PROMPT)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()


def test_saved_folder_is_complete(tiny_checkpoint):
    files = set(os.listdir(tiny_checkpoint))
    assert CODE_FILES <= files
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json",
            "preprocessor_config.json", "tokenizer.json", "chat_template.jinja", "query_tokenizer"} <= files
    assert not [f for f in files if f.startswith(".")]
    config = json.load(open(os.path.join(tiny_checkpoint, "config.json")))
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoModelForCausalLM"}
    assert config["custom_pipelines"]["image-to-text"]["impl"] == "pipeline_qmop.QMoPImageToTextPipeline"
    processor_config = json.load(open(os.path.join(tiny_checkpoint, "processor_config.json")))
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_qmop.QMoPProcessor"


def test_fresh_process_loads_with_auto_classes(tiny_checkpoint):
    result = _load_in_fresh_process(tiny_checkpoint)
    assert result["classes"] == ["QMoPConfig", "QMoPForConditionalGeneration", "QMoPModel",
                                 "QMoPForConditionalGeneration", "QMoPProcessor"]
    assert result["module"].startswith("transformers_modules")  # the folder's code ran, not the checkout's
    assert result["tokens"] == _reference(tiny_checkpoint)


OTHER_PYTHON = os.environ.get("QMOP_OTHER_PYTHON")


@pytest.mark.skipif(not OTHER_PYTHON, reason="set QMOP_OTHER_PYTHON to the other transformers version's python")
def test_checkpoint_loads_in_the_other_transformers_version(tiny_checkpoint):
    here = _load_in_fresh_process(tiny_checkpoint)
    there = _load_in_fresh_process(tiny_checkpoint, python=OTHER_PYTHON)
    assert here["transformers"].split(".")[0] != there["transformers"].split(".")[0]
    assert there["tokens"] == here["tokens"]
    assert torch.allclose(torch.tensor(there["router_weights"]), torch.tensor(here["router_weights"]), atol=1e-5)


def test_push_to_fake_hub_and_reload(fake_hub):
    from qmop_tools.testing.tiny import build_tiny

    model, processor = build_tiny(num_visual_tokens=16, seed=3)
    repo = "me/qmop-tiny-push"
    model.push_to_hub(repo, token="fake-token")
    processor.push_to_hub(repo, token="fake-token")
    pushed = [c for c in fake_hub.commits() if c["repo"] == repo]
    files = set().union(*(c["files"] for c in pushed))
    assert CODE_FILES <= files
    assert {"config.json", "model.safetensors", "processor_config.json", "query_tokenizer/tokenizer.json",
            "tokenizer.json", "chat_template.jinja", "preprocessor_config.json"} <= files
    uploaded = os.path.join(fake_hub.store, repo)
    result = _load_in_fresh_process(uploaded)
    assert result["tokens"] == _reference(uploaded)


def test_save_pretrained_push_to_hub_flag(fake_hub, tmp_path):
    from qmop_tools.testing.tiny import build_tiny

    _, processor = build_tiny(num_visual_tokens=16)
    processor.save_pretrained(tmp_path / "proc", push_to_hub=True, repo_id="me/qmop-proc-only", token="fake-token")
    assert os.path.exists(os.path.join(fake_hub.store, "me/qmop-proc-only", "query_tokenizer", "tokenizer.json"))


@pytest.fixture(scope="module")
def pipelines(tiny_checkpoint):
    from transformers import pipeline

    chat = pipeline("image-text-to-text", model=tiny_checkpoint, trust_remote_code=True)
    caption = pipeline("image-to-text", model=tiny_checkpoint, trust_remote_code=True)
    return chat, caption


def test_image_text_to_text_pipeline(pipelines):
    chat, _ = pipelines
    image = make_image(seed=4)
    out = chat(images=image, text=PROMPT, max_new_tokens=4, return_full_text=False)
    assert isinstance(out[0]["generated_text"], str)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]
    out = chat(text=messages, max_new_tokens=4)
    assert out[0]["generated_text"][-1]["role"] == "assistant"
    batch = chat(images=[image, make_image(seed=5)], text=[PROMPT, PROMPT], max_new_tokens=4, return_full_text=False)
    assert len(batch) == 2


def test_image_to_text_pipeline_captions_an_image_alone(pipelines, tiny):
    _, caption = pipelines
    assert type(caption).__name__ == "QMoPImageToTextPipeline"
    out = caption(make_image(seed=6), max_new_tokens=4)
    assert isinstance(out[0]["generated_text"], str)
    many = caption([make_image(seed=6), make_image(seed=7)], max_new_tokens=4)
    assert len(many) == 2
