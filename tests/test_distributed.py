"""Multi-process training on CPU (gloo): a 2-process run of our trainer equals a 1-process run with the same global
batch (losses, router statistics, final weights), with DDP and, where deepspeed is installed, with the shipped
ZeRO-2 config. The shipped FSDP config cannot run on CPU: it must fail with a clear error instead of silently
training data-parallel. See docs/training.md, "Distributed training"."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO_ROOT, free_port, run_launcher
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from qmop_tools.testing.tiny import build_tiny, save_tiny_checkpoint
from test_training import BUDGET, write_dataset

DRIVER = os.path.join(REPO_ROOT, "tests", "distributed_train_driver.py")
FSDP_CONFIG = os.path.join(REPO_ROOT, "configs", "fsdp.yaml")
TIMEOUT_S = 300
STEPS = 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    base = save_tiny_checkpoint(str(root / "base"), num_visual_tokens=BUDGET)
    # Image samples only: every micro-batch runs the router, so its per-batch terms are defined on every process.
    data_path, image_folder = write_dataset(str(root), num_image_samples=8, num_text_samples=0)
    return {"root": root, "base": base, "data": data_path, "images": image_folder}


def train_args(workspace, output_name, *extra, base=None):
    # Stage 2 in full: frozen CLIP towers next to a trained LLM and projector, as in the FSDP recipe. The router terms
    # are weighted up so that their scaling under several processes shows in the loss. Gumbel noise is off: each
    # process draws its own noise (seeded alike), so a 2-process run cannot draw the 1-process run's noise.
    return [
        "--model_name_or_path", base or workspace["base"], "--stage", "2",
        "--data_path", workspace["data"], "--image_folder", workspace["images"],
        "--output_dir", str(workspace["root"] / output_name), "--max_steps", str(STEPS),
        "--learning_rate", "1e-3", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
        "--router_gumbel_noise", "false", "--router_aux_loss_coef", "0.1", "--router_z_loss_coef", "0.1",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--seed", "0",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true", *extra,
    ]


def launch(workspace, launcher, args, name, env=None):
    """Run the driver under `launcher` (a command prefix) into the folder `name`; returns (completed process, report
    or None). A launch whose rank hit torch's rare native abort runs once more (conftest.run_launcher)."""
    result_path = workspace["root"] / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT, QMOP_RESULT=str(result_path), **(env or {}))
    try:
        completed = run_launcher([*launcher, DRIVER, *args], env=env, timeout=TIMEOUT_S,
                                 fresh_paths=[result_path, workspace["root"] / name])
    except subprocess.TimeoutExpired as error:
        stderr = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else (error.stderr or "")
        pytest.fail(f"{name}: no result after {TIMEOUT_S} s (a hung collective?)\n{stderr[-3000:]}")
    report = json.loads(result_path.read_text()) if result_path.exists() else None
    return completed, report


def torchrun(nproc):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def train_pair(workspace, name, base, two_launcher, two_extra, env=None):
    """The same training twice with global batch 2: two processes with one sample each, and one process
    accumulating two micro-batches of one. Returns both reports."""
    two, two_report = launch(workspace, two_launcher,
                             train_args(workspace, f"{name}-two", "--per_device_train_batch_size", "1", *two_extra,
                                        base=base), f"{name}-two", env)
    assert two.returncode == 0, two.stderr[-4000:]
    one, one_report = launch(workspace, [sys.executable],
                             train_args(workspace, f"{name}-one", "--per_device_train_batch_size", "1",
                                        "--gradient_accumulation_steps", "2", base=base), f"{name}-one", env)
    assert one.returncode == 0, one.stderr[-4000:]
    assert one_report["world_size"] == 1 and two_report["world_size"] == 2
    return two_report, one_report


def assert_same_training(workspace, name, base, two_report, one_report):
    # The same samples reach the same steps in float32; what differs is the order of the sums (gradients summed
    # by the all-reduce, or accumulated in one process), about 1e-7 relative: 1e-5 leaves room for that and
    # still sees the router terms counted twice (their share of the loss here is about 2%).
    logs_two, logs_one = two_report["log"], one_report["log"]
    assert [e["step"] for e in logs_two] == [e["step"] for e in logs_one] == list(range(1, STEPS + 1))
    fields = ["loss", "grad_norm", "lm_loss", "aux_loss", "router_z_loss",
              "router_weight/pooling", "router_weight/resampler", "router_weight/pruning"]
    for a, b in zip(logs_two, logs_one):
        for field in fields:
            assert a[field] == pytest.approx(b[field], rel=1e-5, abs=1e-6), (a["step"], field, a[field], b[field])

    # Final weights (the full model.safetensors the main process saved): Adam moved them by up to lr per step
    # (about 2e-3 here); the runs agree to 1e-6.
    initial = load_file(os.path.join(base, "model.safetensors"))
    weights_two = load_file(str(workspace["root"] / f"{name}-two" / "model.safetensors"))
    weights_one = load_file(str(workspace["root"] / f"{name}-one" / "model.safetensors"))
    assert weights_two.keys() == weights_one.keys() == initial.keys()
    moved = max(float((weights_one[key] - initial[key]).abs().max()) for key in initial)
    assert moved > 1e-4, "training did not move the weights"
    for key in initial:
        torch.testing.assert_close(weights_two[key], weights_one[key], rtol=0, atol=1e-6, msg=key)

    # The multi-process run's folder loads as a model, with the weights it saved.
    reloaded = AutoModelForImageTextToText.from_pretrained(str(workspace["root"] / f"{name}-two"), trust_remote_code=True)
    state = reloaded.state_dict()
    for key in initial:
        assert torch.equal(state[key], weights_two[key]), key


def test_two_processes_equal_one_process_with_the_same_global_batch(workspace):
    two, one = train_pair(workspace, "ddp", workspace["base"], torchrun(2), ["--ddp_backend", "gloo"])
    assert (two["distributed_type"], one["distributed_type"]) == ("MULTI_CPU", "NO")
    assert_same_training(workspace, "ddp", workspace["base"], two, one)


def test_deepspeed_zero2_two_processes_equal_one_process(workspace):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not in the test environments (docs/training.md: .venv-ds)")
    # ZeRO-2 keeps the gradients in one flat buffer, so a parameter that gets no gradient in a step (the branch no
    # image routed to) gets a zero one, and Adam moves it by its momentum; torch's optimizer skips it. With every
    # branch selected (router_top_k = 3) each parameter has a gradient in every step and the two must agree.
    base = save_tiny_checkpoint(str(workspace["root"] / "base-top3"), num_visual_tokens=BUDGET, router_top_k=3)
    zero2 = os.path.join(REPO_ROOT, "configs", "zero2.json")
    two, one = train_pair(workspace, "zero2", base, torchrun(2), ["--deepspeed", zero2],
                          env={"DS_ACCELERATOR": "cpu"})
    assert two["distributed_type"] == "DEEPSPEED"
    assert_same_training(workspace, "zero2", base, two, one)


def test_shipped_fsdp_config_names_qmop_layers():
    config = yaml.safe_load(open(FSDP_CONFIG))
    fsdp = config["fsdp_config"]
    assert config["distributed_type"] == "FSDP" and fsdp["fsdp_use_orig_params"] is True  # frozen towers share units
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # save_pretrained writes one model.safetensors
    model, _ = build_tiny(num_visual_tokens=BUDGET)
    classes = {type(module).__name__ for module in model.modules()}
    wrapped = fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert wrapped and set(wrapped) <= classes, f"{set(wrapped) - classes} are not layers of QMoP-LLaVA"
    llm = {type(m).__name__ for m in model.model.language_model.modules()}
    vision = {type(m).__name__ for m in model.model.vision_tower.modules()}
    assert llm & set(wrapped) and vision & set(wrapped), "each decoder layer and each CLIP layer is its own unit"


def test_fsdp_config_on_cpu_fails_clearly(workspace):
    # The shipped config with its device settings turned off, as it would be tried on CPU. accelerate does not
    # enable FSDP without an accelerator device; the trainer must then refuse, not train with DDP.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CONFIG,
                "--num_processes", "2", "--mixed_precision", "no", "--fsdp_sync_module_states", "false",
                "--fsdp_cpu_ram_efficient_loading", "false", "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(free_port())]
    completed, report = launch(workspace, launcher, train_args(workspace, "fsdp", "--per_device_train_batch_size", "1"),
                               "fsdp")
    assert completed.returncode != 0 and report is None, "FSDP on CPU trained instead of failing"
    assert "accelerate enables FSDP only on accelerator devices" in completed.stderr + completed.stdout, \
        completed.stderr[-4000:]
