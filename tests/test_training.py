"""Training path (qmop_tools.train) on a tiny generated LLaVA dataset: data and labels, what each stage trains,
LoRA / QLoRA, loss going down, resume, 2-process DDP, outputs reloading in a fresh process, push to the fake Hub."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO_ROOT, free_port, make_image, run_launcher
from safetensors.torch import load_file
from transformers import TrainerCallback

from qmop_tools.testing.tiny import build_processor, save_tiny_checkpoint
from qmop_tools.train import IGNORE_INDEX, LazyLLaVADataset, QMoPDataCollator, main, parse_conversations

BUDGET = 4  # visual tokens per image: short sequences keep every run fast
ANSWERS = ["red", "green", "blue", "a cat", "three", "the letter q"]
QUESTIONS = ["what colour is the square?", "what is in the image?", "how many objects are there?"]


# ===================================================================================== generated data
def _conversation(question, answer, image=True):
    return [{"from": "human", "value": ("<image>\n" if image else "") + question}, {"from": "gpt", "value": answer}]


def write_dataset(folder, num_image_samples=8, num_text_samples=2, extra=()):
    """A LLaVA JSON (image samples, one multi-turn, text-only samples, `extra` raw samples) and its image folder."""
    images = os.path.join(folder, "images")
    os.makedirs(os.path.join(images, "sub"), exist_ok=True)
    samples = []
    for i in range(num_image_samples):
        make_image(40 + 4 * i, 60 - 2 * i, seed=i).save(os.path.join(images, "sub", f"{i}.png"))
        turns = _conversation(QUESTIONS[i % 3], ANSWERS[i % len(ANSWERS)])
        if i == 0:  # multi-turn, image token after the question
            turns = [{"from": "human", "value": "what is in the image?\n<image>"}, {"from": "gpt", "value": "a cat"},
                     {"from": "human", "value": "how many?"}, {"from": "gpt", "value": "three"}]
        samples.append({"id": f"img-{i}", "image": f"sub/{i}.png", "conversations": turns})
    for i in range(num_text_samples):
        samples.append({"id": f"txt-{i}", "conversations": _conversation("one two three", "four five", image=False)})
    samples.extend(extra)
    path = os.path.join(folder, "data.json")
    with open(path, "w") as f:
        json.dump(samples, f)
    return path, images


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    base = save_tiny_checkpoint(str(root / "qmop-train-base"), num_visual_tokens=BUDGET)
    data_path, image_folder = write_dataset(str(root))
    return {"root": root, "base": base, "data": data_path, "images": image_folder}


@pytest.fixture(scope="module")
def processor():
    return build_processor(num_visual_tokens=BUDGET)


def train(workspace, output_name, *extra, callbacks=None, stage=1):
    args = [
        "--model_name_or_path", workspace["base"], "--stage", str(stage),
        "--data_path", workspace["data"], "--image_folder", workspace["images"],
        "--output_dir", str(workspace["root"] / output_name),
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--lr_scheduler_type", "cosine",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--seed", "0",
        "--dataloader_num_workers", "0", "--disable_tqdm", "true",
    ]
    return main(args + [str(x) for x in extra], callbacks=callbacks)


def train_logs(result):
    return [entry for entry in result.trainer.state.log_history if "loss" in entry]


def run_python(code, timeout=240):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    completed = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                               env=env, cwd=REPO_ROOT, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout


# ===================================================================================== data
def test_vicuna_v1_labels_only_answers(workspace, processor):
    dataset = LazyLLaVADataset(workspace["data"], processor, workspace["images"], template="vicuna_v1")
    tokenizer = processor.tokenizer
    item = dataset[0]  # multi-turn, image token moved to the front of the first question
    text = tokenizer.decode(item["input_ids"])
    assert text.startswith("<s>A chat between a curious user and an artificial intelligence assistant.")
    assert " USER: " + "<image>" * BUDGET + "\nwhat is in the image? ASSISTANT: a cat</s>USER: how many? ASSISTANT: three</s>" in text
    targets = item["input_ids"][item["labels"] != IGNORE_INDEX]
    assert tokenizer.decode(targets).split() == ["a", "cat</s>", "three</s>"]
    assert not bool((item["labels"][item["input_ids"] == processor.image_token_id] != IGNORE_INDEX).any())
    # The router's query is the human turn, not the chat scaffolding or the answer.
    assert processor.query_tokenizer.decode(item["query_input_ids"][0], skip_special_tokens=True) == "what is in the image?"
    assert item["pixel_values"].shape == (1, 3, 48, 48)

    text_only = dataset[8]
    assert "pixel_values" not in text_only and processor.image_token_id not in text_only["input_ids"].tolist()
    assert tokenizer.decode(text_only["input_ids"][text_only["labels"] != IGNORE_INDEX]).strip() == "four five</s>"


def test_plain_template_and_collator(workspace, processor):
    dataset = LazyLLaVADataset(workspace["data"], processor, workspace["images"], template="plain", require_image=True)
    item = dataset[1]
    assert processor.tokenizer.decode(item["input_ids"]) == "<s>" + "<image>" * BUDGET + "green\n"
    assert processor.tokenizer.decode(item["input_ids"][item["labels"] != IGNORE_INDEX]) == "green\n"
    assert processor.query_tokenizer.decode(item["query_input_ids"][0], skip_special_tokens=True) == QUESTIONS[1]

    vicuna = LazyLLaVADataset(workspace["data"], processor, workspace["images"], template="vicuna_v1")
    items = [vicuna[8], vicuna[1], vicuna[0]]  # text-only, single-turn, multi-turn
    batch = QMoPDataCollator.from_processor(processor)(items)
    lengths = [len(i["input_ids"]) for i in items]
    assert batch["input_ids"].shape == (3, max(lengths))
    for row, n in enumerate(lengths):  # right padding: pads are masked out and never learned
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert bool((batch["labels"][row, n:] == IGNORE_INDEX).all())
        assert bool((batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all())
    assert batch["pixel_values"].shape[0] == batch["query_input_ids"].shape[0] == 2  # images only of samples 2, 3
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 2 * BUDGET


def test_bad_samples_are_skipped_and_counted(tmp_path, processor, caplog):
    with open(tmp_path / "corrupt.png", "wb") as f:
        f.write(b"this is not an image")
    bad = [
        {"id": "missing", "image": "nowhere.png", "conversations": _conversation("q", "a")},
        {"id": "corrupt", "image": "../corrupt.png", "conversations": _conversation("q", "a")},
        {"id": "no-placeholder", "image": "sub/0.png", "conversations": _conversation("q", "a", image=False)},
        {"id": "no-image", "conversations": _conversation("q", "a", image=True)},
        {"id": "empty-answer", "image": "sub/0.png", "conversations": _conversation("q", "  ")},
        {"id": "order", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "a"}]},
    ]
    data_path, images = write_dataset(str(tmp_path), num_image_samples=2, num_text_samples=0, extra=bad)
    dataset = LazyLLaVADataset(data_path, processor, images, template="vicuna_v1")
    with caplog.at_level("WARNING"):
        items = [dataset[i] for i in range(len(dataset))]
        items += [dataset[i] for i in range(len(dataset))]  # a second epoch: counted and warned once per sample
    assert dataset.report()["skipped"] == {
        "missing_image": 1, "corrupt_image": 1, "image_without_placeholder": 1, "placeholder_without_image": 1,
        "empty_answer": 1, "turn_order": 1,
    }
    assert sum("Skipping sample" in r.message for r in caplog.records) == 6
    # Every position still yields a good sample (the next usable one), so batches keep their size.
    assert len(items) == 2 * len(dataset) and all("pixel_values" in item for item in items)
    with pytest.raises(ValueError, match="empty"):
        parse_conversations({"conversations": _conversation("q", "")}, "<image>", has_image=True)


def test_cached_samples_equal_fresh_ones(workspace, processor, tmp_path):
    """`cache_samples`: every draw equals a fresh encoding, a picture's pixels are stored once for all its samples,
    a caller changing an item does not change the cache, and bad samples are still skipped."""
    plain = LazyLLaVADataset(workspace["data"], processor, workspace["images"], template="vicuna_v1")
    cached = LazyLLaVADataset(workspace["data"], processor, workspace["images"], template="vicuna_v1",
                              cache_samples=True)
    for epoch in range(2):
        for index in range(len(plain)):
            fresh, kept = plain[index], cached[index]
            assert fresh.keys() == kept.keys()
            for key in fresh:
                assert torch.equal(fresh[key], kept[key]), (epoch, index, key)
    cached[0].pop("labels")
    assert "labels" in cached[0]

    extra = [{"id": "missing", "image": "sub/none.png", "conversations": _conversation("q", "a")},
             {"id": "same-picture", "image": "sub/1.png", "conversations": _conversation("what colour?", "red")}]
    data_path, images = write_dataset(str(tmp_path), num_image_samples=2, num_text_samples=0, extra=extra)
    with_bad = LazyLLaVADataset(data_path, processor, images, template="vicuna_v1", cache_samples=True)
    items = [with_bad[i] for i in range(len(with_bad))] * 2
    assert items[1]["pixel_values"] is items[3]["pixel_values"]  # sub/1.png, stored once
    assert not torch.equal(items[1]["input_ids"], items[3]["input_ids"])
    assert with_bad.report()["skipped"] == {"missing_image": 1} and all("pixel_values" in item for item in items)


def test_overflow_is_cut_after_the_image_or_skipped(workspace, processor):
    long_answer = " ".join(["one two three four five"] * 20)
    sample = {"id": "long", "image": "sub/0.png", "conversations": _conversation("q", long_answer)}
    text_sample = {"id": "long-text", "conversations": _conversation("q", long_answer, image=False)}
    folder = workspace["root"] / "overflow"
    data_path, images = write_dataset(str(folder), num_image_samples=1, num_text_samples=0, extra=[sample, text_sample])

    dataset = LazyLLaVADataset(data_path, processor, images, template="plain", model_max_length=20)
    cut = dataset[1]
    assert len(cut["input_ids"]) == 20 and int((cut["input_ids"] == processor.image_token_id).sum()) == BUDGET
    assert dataset.report()["truncated"] == 1

    # The vicuna system prompt alone is longer than 20 tokens: the cut would fall before/inside the image.
    dataset = LazyLLaVADataset(data_path, processor, images, template="vicuna_v1", model_max_length=20)
    with pytest.raises(RuntimeError, match="unusable"):
        dataset[1]
    assert dataset.report()["skipped"] == {"overflow_inside_image": 2, "no_target_tokens": 1}
    assert dataset.report()["truncated"] == 0
    with pytest.raises(ValueError, match="model_max_length"):
        LazyLLaVADataset(data_path, processor, images, model_max_length=BUDGET)


# ===================================================================================== stages
@pytest.fixture(scope="module")
def stage1(workspace, fake_hub):
    """Stage 1, 4 steps; pushed to the fake Hub at the end (the trainer's --push_to_hub flags)."""
    return train(workspace, "stage1", "--max_steps", 4, "--push_to_hub", "--hub_model_id", "me/qmop-stage1",
                 "--hub_token", "x")


def test_stage1_trains_only_the_projector(workspace, stage1):
    before = load_file(os.path.join(workspace["base"], "model.safetensors"))
    after = load_file(os.path.join(stage1.output_dir, "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    frozen = [key for key in before if not key.startswith("model.projector.")]
    assert frozen and not changed.intersection(frozen), "a frozen parameter moved"
    projector = [key for key in before if key.startswith("model.projector.")]
    assert len(changed) >= len(projector) // 2, f"only {len(changed)} of {len(projector)} projector tensors trained"
    for branch in ("pooling", "resampler", "pruning"):  # uniform routing in stage 1: every expert trains
        assert any(key.startswith(f"model.projector.{branch}_branch.expert.") for key in changed)
    router = [key for key in before if key.startswith("model.projector.router.")]
    assert router and not changed.intersection(router), "the router moved on stage 1's constant query"
    for entry in train_logs(stage1):
        assert [entry[f"router_weight/{b}"] for b in ("pooling", "resampler", "pruning")] == [pytest.approx(1 / 3)] * 3
    # Text-only samples are skipped (and counted) in stage 1.
    assert stage1.data_report["skipped"] == {"text_only": 2}


def test_router_schedule_and_logging(workspace):
    routed = train(workspace, "stage1-routed", "--max_steps", 4, "--stage1_router", "train")
    before = load_file(os.path.join(workspace["base"], "model.safetensors"))
    after = load_file(os.path.join(routed.output_dir, "model.safetensors"))
    assert not torch.equal(before["model.projector.router.linear_2.weight"], after["model.projector.router.linear_2.weight"])
    logs = train_logs(routed)
    assert len(logs) == 4
    for entry in logs:
        assert {"aux_loss", "router_z_loss", "router_saturated", "lm_loss", "router_temperature",
                "router_weight/pooling", "router_weight/resampler", "router_weight/pruning"} <= entry.keys()
        weights = [entry[f"router_weight/{b}"] for b in ("pooling", "resampler", "pruning")]
        assert abs(sum(weights) - 1.0) < 1e-4  # each image's weights sum to one
        assert 0.0 <= entry["router_saturated"] <= 1.0
        assert entry["lm_loss"] == pytest.approx(entry["loss"] - 0.01 * entry["aux_loss"] - 0.001 * entry["router_z_loss"],
                                                 abs=1e-3)
    temperatures = [entry["router_temperature"] for entry in logs]
    assert temperatures[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(temperatures, temperatures[1:]))  # cosine annealing towards the floor
    assert temperatures[-1] == pytest.approx(0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi * 3 / 4)).item()), abs=1e-5)


def test_loss_decreases_in_stage2(workspace):
    result = train(workspace, "stage2-full", "--max_steps", 12, "--learning_rate", "5e-3",
                   "--lr_scheduler_type", "constant", stage=2)
    losses = [entry["lm_loss"] if "lm_loss" in entry else entry["loss"] for entry in train_logs(result)]
    assert len(losses) == 12
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.85 * first, f"loss did not go down: {first:.3f} -> {last:.3f}"


def test_lora_trains_llm_adapters_and_projector_then_merges(workspace):
    result = train(workspace, "stage2-lora", "--max_steps", 3, "--tuning", "lora", "--lora_r", 4, "--lora_alpha", 8,
                   "--merge_lora", "true", "--projector_lr", "2e-3", stage=2)
    trainable = [name for name, p in result.model.named_parameters() if p.requires_grad]
    lora = [name for name in trainable if "lora_" in name]
    assert lora and all(".language_model." in name for name in lora)  # never the CLIP q/k/v projections
    assert all("lora_" in name or ".projector.modules_to_save." in name for name in trainable)
    lrs = sorted({group["initial_lr"] for group in result.trainer.optimizer.param_groups})
    assert lrs == [1e-3, 2e-3]  # the projector has its own learning rate (--projector_lr)

    adapter = load_file(os.path.join(result.output_dir, "adapter", "adapter_model.safetensors"))
    assert any("projector" in key for key in adapter) and any("lora_A" in key for key in adapter)
    assert os.path.exists(os.path.join(result.output_dir, "pipeline_qmop.py"))
    assert os.path.exists(os.path.join(result.output_dir, "query_tokenizer", "tokenizer.json"))
    config = json.load(open(os.path.join(result.output_dir, "config.json")))
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_qmop.QMoPForConditionalGeneration"
    assert not os.path.exists(os.path.join(result.output_dir, ".tmp-final"))

    # Fresh process: the merged folder loads through Auto* with no missing keys, and equals base + adapter.
    out = run_python(f"""
        import torch
        from PIL import Image
        from peft import PeftModel
        from transformers import AutoModelForImageTextToText, AutoProcessor
        merged_dir, base_dir = {result.output_dir!r}, {workspace['base']!r}
        merged, info = AutoModelForImageTextToText.from_pretrained(merged_dir, trust_remote_code=True,
                                                                   output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        processor = AutoProcessor.from_pretrained(merged_dir, trust_remote_code=True)
        base = AutoModelForImageTextToText.from_pretrained(base_dir, trust_remote_code=True)
        adapted = PeftModel.from_pretrained(base, merged_dir + "/adapter").eval()
        image = Image.open({os.path.join(workspace['images'], 'sub', '1.png')!r})
        inputs = processor(images=image, text="USER: <image>\\nwhat is in the image? ASSISTANT:")
        with torch.no_grad():
            a = merged.eval()(**inputs).logits
            b = adapted(**inputs).logits
            c = AutoModelForImageTextToText.from_pretrained(base_dir, trust_remote_code=True).eval()(**inputs).logits
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
        assert not torch.allclose(a, c, atol=1e-4)  # training changed the model
        print("ok", merged.generate(**inputs, max_new_tokens=3, do_sample=False).shape)
    """)
    assert out.startswith("ok")


def test_qlora_quantizes_only_the_llm_and_trains(workspace):
    result = train(workspace, "stage2-qlora", "--max_steps", 2, "--tuning", "qlora", "--lora_r", 4, "--lora_alpha", 8,
                   stage=2)
    quantized = [name for name, module in result.model.named_modules() if type(module).__name__ == "Linear4bit"]
    assert quantized and all(".language_model." in name for name in quantized)
    losses = [entry["loss"] for entry in train_logs(result)]
    assert len(losses) == 2 and all(loss == loss and loss < 100 for loss in losses)
    assert os.path.exists(os.path.join(result.output_dir, "adapter_model.safetensors"))
    assert json.load(open(os.path.join(result.output_dir, "adapter_config.json")))["base_model_name_or_path"] == workspace["base"]


# ===================================================================================== resume, DDP, Hub
class _StopAfter(TrainerCallback):
    """Simulates an interruption: training ends after `step` steps (a checkpoint is saved there)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_equals_uninterrupted(workspace):
    # Stage 1: Gumbel noise, the router temperature, the cosine schedule and the data order all depend on the step.
    common = ("--max_steps", 4, "--save_strategy", "steps", "--save_steps", 2)
    full = train(workspace, "resume-full", *common)
    train(workspace, "resume-cut", *common, callbacks=[_StopAfter(2)])
    checkpoint = workspace["root"] / "resume-cut" / "checkpoint-2"
    assert checkpoint.is_dir() and not (workspace["root"] / "resume-cut" / "checkpoint-4").exists()
    resumed = train(workspace, "resume-cut", *common, "--resume_from_checkpoint", checkpoint)

    # The resumed run's history holds steps 1-2 from the checkpoint and 3-4 trained after resuming.
    assert [e["step"] for e in train_logs(resumed)] == [1, 2, 3, 4]
    assert [e["loss"] for e in train_logs(resumed)] == [e["loss"] for e in train_logs(full)]
    a = load_file(str(workspace["root"] / "resume-full" / "model.safetensors"))
    b = load_file(str(workspace["root"] / "resume-cut" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_process_ddp_run_agrees_with_itself(workspace, tmp_path):
    driver = tmp_path / "ddp_driver.py"
    driver.write_text(textwrap.dedent(f"""
        import hashlib, json, os, sys
        sys.path.insert(0, {REPO_ROOT!r})
        import torch
        import torch.distributed as dist
        from qmop_tools.train import main
        result = main(sys.argv[1:])
        digest = hashlib.sha256()
        for name, param in sorted(result.trainer.model.named_parameters()):
            digest.update(name.encode()); digest.update(param.detach().cpu().numpy().tobytes())
        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(os.path.join({str(tmp_path)!r}, f"rank{{rank}}.json"), "w") as f:
            json.dump({{"world_size": dist.get_world_size() if dist.is_initialized() else 1,
                       "digest": digest.hexdigest(), "losses": [e["loss"] for e in result.trainer.state.log_history if "loss" in e]}}, f)
    """))
    output = workspace["root"] / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), str(driver),
        "--model_name_or_path", workspace["base"], "--stage", "1", "--data_path", workspace["data"],
        "--image_folder", workspace["images"], "--output_dir", str(output), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--ddp_backend", "gloo", "--disable_tqdm", "true",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    completed = run_launcher(command, env=env, timeout=300,
                             fresh_paths=[output, *(tmp_path / f"rank{r}.json" for r in (0, 1))])
    assert completed.returncode == 0, completed.stderr[-4000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept both replicas identical
    assert len(ranks[0]["losses"]) == 2 and (output / "model.safetensors").exists()


def test_push_reloads_from_the_fake_hub(stage1, fake_hub):
    pushed = os.path.join(fake_hub.store, "me", "qmop-stage1")
    files = set(os.listdir(pushed))
    assert {"config.json", "model.safetensors", "modeling_qmop.py", "configuration_qmop.py", "pipeline_qmop.py",
            "processing_qmop.py", "processor_config.json", "tokenizer.json", "README.md"} <= files
    assert not any(name.startswith(("checkpoint-", ".tmp")) for name in files)
    assert "pipeline_tag: image-text-to-text" in open(os.path.join(pushed, "README.md")).read()
    out = run_python(f"""
        import torch
        from PIL import Image
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
        path = {pushed!r}
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
        trained = load_file({os.path.join(stage1.output_dir, 'model.safetensors')!r})
        for key, value in model.state_dict().items():
            if key in trained:
                assert torch.equal(value, trained[key]), key
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        captioner = pipeline("image-to-text", model=path, trust_remote_code=True)
        print("ok", captioner(Image.new("RGB", (30, 30), "red"), generate_kwargs={{"max_new_tokens": 2}}))
    """)
    assert out.startswith("ok")


def test_bad_arguments_are_rejected(workspace):
    with pytest.raises(ValueError, match="stage 2"):
        train(workspace, "bad", "--max_steps", 1, "--tuning", "lora")
    with pytest.raises(ValueError, match="hub_model_id"):
        train(workspace, "bad", "--max_steps", 1, "--push_to_hub")
    with pytest.raises(FileNotFoundError, match="data_path"):
        main(["--model_name_or_path", workspace["base"], "--data_path", "/nonexistent.json", "--output_dir",
              str(workspace["root"] / "bad"), "--use_cpu"])


def test_collator_trains_each_batch_at_one_sampled_budget(processor):
    from qmop_tools.train.data import QMoPDataCollator

    image_id = processor.image_token_id
    items = []
    for n_text in (3, 5):  # two samples, one image of 16 placeholders each (max budget 16)
        ids = torch.tensor([1] + [image_id] * 16 + list(range(10, 10 + n_text)))
        labels = torch.full_like(ids, -100)
        labels[-1] = ids[-1]
        items.append({"input_ids": ids, "labels": labels})
    collator = QMoPDataCollator.from_processor(processor, budgets=(4, 9, 16), seed=0)
    seen = set()
    for _ in range(30):
        batch = collator([dict(item) for item in items])
        per_row = (batch["input_ids"] == image_id).sum(dim=1)
        assert per_row[0] == per_row[1]  # one budget per batch
        seen.add(int(per_row[0]))
        # the text and the answer labels survive; only placeholders go
        kept = batch["input_ids"][0][batch["attention_mask"][0] == 1]
        assert kept[0] == 1 and kept[-3:].tolist() == [10, 11, 12]
        assert batch["labels"][1][batch["attention_mask"][1] == 1][-1] == 14
    assert seen == {4, 9, 16}
    with pytest.raises(ValueError, match="max\\(budgets\\)"):
        QMoPDataCollator.from_processor(processor, budgets=(4, 9), seed=0)([dict(items[0])])
