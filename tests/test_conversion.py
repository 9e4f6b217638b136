"""The converter (conversion/): tiny LLaVA-1.5 checkpoints (built with transformers' own LlavaForConditionalGeneration
and CLIPModel) in the llava-hf and the original layouts are converted, verified, reloaded, interrupted and pushed."""

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest
import torch

from conftest import REPO_ROOT

from conversion import DEFAULT_ATOL, ConversionError, ConversionSettings, convert
from conversion.assemble import assemble_qmop
from conversion.converter import PAUSE_ENV
from conversion.keys import CLIP_TEXT_RULES, LLAVA_HF_RULES, ORIGINAL_RULES, KeyRule, expert_keys, map_key, map_keys
from conversion.sources import LLAVA_HF, ORIGINAL
from qmop_tools.testing.tiny import _train_bpe, build_config, build_processor
from conversion.verify import verification_image

NUM_PATCHES = 64  # tiny CLIP: 48 px, patch 6


# ===================================================================================== tiny sources
def _tiny_configs():
    processor = build_processor(num_visual_tokens=16)
    return processor, build_config(processor)


def _original_tokenizer():
    """A Llama-like tokenizer as liuhaotian ships it: no `<image>` token and no pad token."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    raw = _train_bpe(["<unk>", "<s>", "</s>"], vocab_size=300)
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", raw.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _save_clip(folder, qmop_config, image_processor, query_tokenizer):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(1)
    clip = CLIPModel(CLIPConfig(
        text_config=qmop_config.text_encoder_config.to_dict(), vision_config=qmop_config.vision_config.to_dict(),
        projection_dim=32,
    ))
    clip.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    query_tokenizer.save_pretrained(folder)
    return clip


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny llava-hf checkpoint, tiny original-layout checkpoint (two .bin shards, no vision tower) and a CLIP."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("sources")
    processor, qconfig = _tiny_configs()
    clip_dir = str(root / "clip")
    clip = _save_clip(clip_dir, qconfig, processor.image_processor, processor.query_tokenizer)

    # llava-hf layout, written by transformers itself.
    torch.manual_seed(2)
    llava_config = LlavaConfig(
        vision_config=qconfig.vision_config.to_dict(), text_config=qconfig.text_config.to_dict(),
        image_token_index=processor.image_token_id, image_seq_length=NUM_PATCHES,
    )
    llava = LlavaForConditionalGeneration(llava_config).eval()
    hf_dir = str(root / "llava-hf")
    llava.save_pretrained(hf_dir)
    processor.tokenizer.save_pretrained(hf_dir)
    processor.image_processor.save_pretrained(hf_dir)

    # Original LLaVA-1.5 layout: LlavaLlamaForCausalLM keys, mm_* config fields, .bin shards, no CLIP inside.
    tokenizer = _original_tokenizer()
    text = qconfig.text_config.to_dict()
    text.update(vocab_size=len(tokenizer), pad_token_id=None)
    torch.manual_seed(3)
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in text.items() if k != "model_type"}))
    width, vision_width = qconfig.text_config.hidden_size, qconfig.vision_config.hidden_size
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints stored it
    state.update({
        "model.mm_projector.0.weight": torch.randn(width, vision_width) * 0.1, "model.mm_projector.0.bias": torch.randn(width) * 0.1,
        "model.mm_projector.2.weight": torch.randn(width, width) * 0.1, "model.mm_projector.2.bias": torch.randn(width) * 0.1,
    })
    orig_dir = root / "llava-original"
    orig_dir.mkdir()
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2], "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    for name, shard_keys in shards.items():
        torch.save({k: state[k] for k in shard_keys}, orig_dir / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (orig_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    original_config = dict(text, architectures=["LlavaLlamaForCausalLM"], model_type="llava", mm_hidden_size=vision_width,
                           mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                           mm_vision_tower=clip_dir, mm_use_im_start_end=False, mm_use_im_patch_token=False,
                           image_aspect_ratio="pad", tune_mm_mlp_adapter=False)
    (orig_dir / "config.json").write_text(json.dumps(original_config))
    tokenizer.save_pretrained(str(orig_dir))
    return {"root": root, "clip_dir": clip_dir, "clip": clip, "hf_dir": hf_dir, "llava": llava, "orig_dir": str(orig_dir),
            "orig_state": state, "orig_vocab": len(tokenizer), "processor": processor}


def _settings(src, name, **kwargs):
    values = dict(llava=src["hf_dir"], clip=src["clip_dir"], output=str(src["root"] / "out" / name), dtype="float32",
                  max_shard_size="100KB", verify_new_tokens=4)
    values.update(kwargs)
    return ConversionSettings(**values)


def _reload(folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=True)


# ===================================================================================== key rules
def test_rules_map_every_layout_and_reject_unknown_keys():
    hf_keys = {
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
        "model.vision_tower.embeddings.patch_embedding.weight": "model.vision_tower.embeddings.patch_embedding.weight",
        "multi_modal_projector.linear_2.bias": "@projector.linear_2.bias",
        "language_model.model.layers.3.self_attn.q_proj.weight": "model.language_model.layers.3.self_attn.q_proj.weight",
        "model.language_model.norm.weight": "model.language_model.norm.weight",
        "language_model.lm_head.weight": "lm_head.weight",
        "vision_tower.vision_model.embeddings.position_ids": None,
    }
    assert map_keys(hf_keys, LLAVA_HF_RULES, "llava-hf") == hf_keys
    original = {
        "model.layers.0.self_attn.rotary_emb.inv_freq": None,
        "model.layers.10.mlp.up_proj.weight": "model.language_model.layers.10.mlp.up_proj.weight",
        "model.mm_projector.0.weight": "@projector.linear_1.weight",
        "model.mm_projector.2.bias": "@projector.linear_2.bias",
        "model.vision_tower.vision_tower.vision_model.post_layernorm.bias": "model.vision_tower.post_layernorm.bias",
    }
    assert map_keys(original, ORIGINAL_RULES, "original") == original
    clip = {"text_model.final_layer_norm.weight": "model.text_encoder.final_layer_norm.weight",
            "encoder.layers.1.mlp.fc2.bias": "model.text_encoder.encoder.layers.1.mlp.fc2.bias", "logit_scale": None}
    assert map_keys(clip, CLIP_TEXT_RULES, "clip") == clip
    assert expert_keys("@projector.linear_1.weight", ["pooling", "pruning"]) == [
        "model.projector.pooling_branch.expert.linear_1.weight", "model.projector.pruning_branch.expert.linear_1.weight"]

    with pytest.raises(ConversionError, match="2 key.*model.mm_projector.1.weight.*xlm.layers.0"):
        map_keys(["model.mm_projector.1.weight", "xlm.layers.0", "lm_head.weight"], ORIGINAL_RULES, "x")
    with pytest.raises(ConversionError, match="several rules"):
        map_key("a.b", (KeyRule(r"^a\.(?P<x>.+)$", "{x}"), KeyRule(r"^a\.b$", None)))
    with pytest.raises(ValueError, match="anchored"):
        KeyRule(r"model\.", None)


def test_strict_load_reports_every_missing_and_unexpected_key(sources):
    _, qconfig = _tiny_configs()
    tensors = {f"model.text_encoder.{k}": v for k, v in sources["clip"].text_model.state_dict().items()
               if "position_ids" not in k}
    tensors["model.bogus.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError) as error:
        assemble_qmop(qconfig, tensors, torch.float32, seed=0)
    message = str(error.value)
    assert "unexpected (1): model.bogus.weight" in message
    assert "model.language_model.embed_tokens.weight" in message and "lm_head.weight" in message
    assert "model.projector.pooling_branch.expert.linear_1.weight" in message
    assert "model.projector.router" not in message  # fresh weights are not "missing"


# ===================================================================================== conversions
def test_convert_llava_hf_layout_matches_llava_and_reloads(sources):
    from transformers import LlavaForConditionalGeneration

    settings = _settings(sources, "hf-576-pooling", num_visual_tokens=NUM_PATCHES, branches=("pooling",))
    report = convert(settings)
    assert report.layout == LLAVA_HF and report.reference_tokens_equal
    assert report.reference_max_abs_diff <= 1e-5 and report.reload_max_abs_diff <= 1e-5
    assert report.fresh_keys == []  # pooling only: nothing QMoP adds is untrained

    out = report.output
    files = set(os.listdir(out))
    code = {"configuration_qmop.py", "modeling_qmop.py", "processing_qmop.py", "pipeline_qmop.py"}
    assert code <= files
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "processor_config.json",
            "preprocessor_config.json", "chat_template.jinja", "README.md"} <= files
    shards = [f for f in files if f.endswith(".safetensors")]
    index = json.loads(open(os.path.join(out, "model.safetensors.index.json")).read())
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert os.path.exists(os.path.join(out, "query_tokenizer", "tokenizer_config.json"))
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_qmop.QMoPForConditionalGeneration"
    assert config["num_visual_tokens"] == NUM_PATCHES and config["branches"] == ["pooling"]
    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\npipeline_tag: image-text-to-text\nlibrary_name: transformers")
    assert "64 visual tokens" in card and "pooling" in card and "@misc{li2026qmop" in card
    assert not [f for f in os.listdir(os.path.dirname(out)) if ".incomplete-" in f]

    # Independent check: the reloaded folder against the llava-hf model the test itself built.
    model, processor = _reload(out)
    image = verification_image(48)
    inputs = processor(images=image, text="USER: <image>\nWhat colour is the square? ASSISTANT:")
    llava = LlavaForConditionalGeneration.from_pretrained(sources["hf_dir"]).eval()
    with torch.no_grad():
        expected = llava(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         pixel_values=inputs["pixel_values"]).logits
        actual = model(**inputs).logits
    assert (actual - expected).abs().max().item() <= 1e-5
    assert processor.pad_to_square is False  # llava-hf does not pad


def test_convert_original_layout_adds_image_token_and_compresses(sources):
    settings = _settings(sources, "orig-16-all", llava=sources["orig_dir"], num_visual_tokens=16, dtype="auto",
                         max_shard_size="5GB")
    report = convert(settings)
    assert report.layout == ORIGINAL and report.dtype == "float32"
    assert report.reference_max_abs_diff <= 1e-5 and report.reference_tokens_equal and report.reload_max_abs_diff <= 1e-5
    assert any(k.startswith("model.projector.router.") for k in report.fresh_keys)
    assert any(k.startswith("model.projector.resampler_branch.layers.") for k in report.fresh_keys)

    model, processor = _reload(report.output)
    old_vocab, state = sources["orig_vocab"], sources["orig_state"]
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<image>") == old_vocab and tokenizer.pad_token == "<pad>"
    assert processor.pad_to_square is True and model.config.pad_to_square is True  # LLaVA-1.5 pads
    embed = model.model.language_model.embed_tokens.weight.detach()
    assert embed.shape[0] == 320  # 302 tokens padded to a multiple of 64
    torch.testing.assert_close(embed[:old_vocab], state["model.embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(embed[old_vocab:], state["model.embed_tokens.weight"].mean(0).expand(320 - old_vocab, -1))
    for branch in ("pooling", "resampler", "pruning"):
        expert = getattr(model.model.projector, f"{branch}_branch").expert
        torch.testing.assert_close(expert.linear_1.weight.detach(), state["model.mm_projector.0.weight"], rtol=0, atol=0)
        torch.testing.assert_close(expert.linear_2.bias.detach(), state["model.mm_projector.2.bias"], rtol=0, atol=0)
    clip_vision = sources["clip"].vision_model.state_dict()
    torch.testing.assert_close(model.model.vision_tower.encoder.layers[1].mlp.fc1.weight.detach(),
                               clip_vision["encoder.layers.1.mlp.fc1.weight"], rtol=0, atol=0)

    inputs = processor(images=verification_image(48), text="USER: <image>\nWhat is it? ASSISTANT:")
    assert int((inputs["input_ids"] == old_vocab).sum()) == 16
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_bad_inputs_are_named(sources):
    with pytest.raises(ConversionError, match="neither a llava-hf"):
        convert(_settings(sources, "bad-1", llava=sources["clip_dir"]))
    with pytest.raises(ConversionError, match="CLIPModel or CLIPTextModel"):
        convert(_settings(sources, "bad-2", clip=sources["hf_dir"]))
    existing = sources["root"] / "out" / "exists"
    existing.mkdir(parents=True)
    with pytest.raises(ConversionError, match="already exists"):
        convert(_settings(sources, "exists"))
    with pytest.raises(ValueError, match="perfect square"):
        convert(_settings(sources, "bad-3", num_visual_tokens=15))


def test_killed_conversion_leaves_no_complete_output(sources):
    parent = sources["root"] / "killed"
    for stage, sig in (("saved", signal.SIGKILL), ("verified", signal.SIGTERM)):
        output = parent / f"qmop-{stage}"
        env = dict(os.environ, **{PAUSE_ENV: stage})
        proc = subprocess.Popen(
            [sys.executable, "-m", "conversion", "--llava", sources["hf_dir"], "--clip", sources["clip_dir"], "--output", str(output),
             "--num-visual-tokens", "16", "--dtype", "float32", "--verify-new-tokens", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO_ROOT,
        )
        lines, deadline = [], time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("QMOP_CONVERT_PAUSED"):
                break
        assert lines and lines[-1].strip() == f"QMOP_CONVERT_PAUSED {stage}", "".join(lines[-20:])
        leftovers = [p for p in os.listdir(parent) if ".incomplete-" in p]
        assert leftovers  # weights were being written into the hidden temporary folder
        proc.send_signal(sig)
        proc.wait(timeout=60)
        proc.stdout.close()
        assert not output.exists()  # nothing that looks like a finished checkpoint
        remaining = [p for p in os.listdir(parent) if not p.startswith(".")]
        assert remaining == []
        if sig == signal.SIGTERM:  # a catchable signal also removes the temporary folder
            assert not [p for p in os.listdir(parent) if f"qmop-{stage}.incomplete-" in p]


def _read_all(fd: int, chunks: list) -> None:
    """Read a pseudo-terminal until its other end is closed (Linux raises EIO then)."""
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            return
        if not data:
            return
        chunks.append(data)


@pytest.mark.parametrize("quiet", [False, True], ids=["terminal", "quiet"])
def test_progress_goes_to_stderr_and_quiet_silences_it(sources, quiet):
    """With stderr on a terminal, `qmop convert` writes step lines and progress bars there (reading the tensors,
    transformers' loading and saving) and nothing of them to stdout; with --quiet there are none at all."""
    primary, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24 rows, 120 columns
    output = sources["root"] / "out" / f"progress-{'quiet' if quiet else 'terminal'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "conversion", "--llava", sources["hf_dir"], "--clip", sources["clip_dir"],
         "--output", str(output), "--num-visual-tokens", "16", "--dtype", "float32", "--verify-new-tokens", "2",
         *(["--quiet"] if quiet else [])],
        stdout=subprocess.PIPE, stderr=terminal, text=True, cwd=REPO_ROOT,
    )
    os.close(terminal)
    chunks = []
    reader = threading.Thread(target=_read_all, args=(primary, chunks))
    reader.start()
    stdout, _ = proc.communicate(timeout=300)
    reader.join(timeout=60)
    os.close(primary)
    stderr = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, stderr[-3000:]
    bar = re.compile(r"\d+%\|")  # tqdm's "100%|█████| 30/30"
    assert "reference check" in stdout and f"wrote {output}" in stdout
    assert not bar.search(stdout) and "step 1/" not in stdout
    if quiet:
        assert not bar.search(stderr) and "step " not in stderr, stderr
    else:
        assert "step 1/7: " in stderr and "step 7/7: reload check" in stderr, stderr
        assert re.search(r"reading LLaVA \(llava-hf\): +100%\|", stderr), stderr
        assert re.search(r"reading CLIP: +100%\|", stderr), stderr


def test_push_to_fake_hub_and_reload_uploaded_copy(sources, fake_hub):
    settings = _settings(sources, "pushed", num_visual_tokens=16, branches=("pooling", "pruning"),
                         push_to_hub="me/qmop-tiny-converted", token="x", private=True,
                         base_model="llava-hf/llava-1.5-7b-hf")
    report = convert(settings)
    assert report.pushed_to == "me/qmop-tiny-converted"
    uploaded = os.path.join(fake_hub.store, "me", "qmop-tiny-converted")
    assert set(os.listdir(report.output)) <= set(os.listdir(uploaded))
    card = open(os.path.join(uploaded, "README.md")).read()
    assert "base_model:\n- llava-hf/llava-1.5-7b-hf\ntags:" in card and "`router`" in card
    assert "--branches pooling pruning" in card
    model, processor = _reload(uploaded)
    assert model.config.branches == ["pooling", "pruning"]
    inputs = processor(images=verification_image(48), text="USER: <image>\nWhere is the dog? ASSISTANT:")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


# ===================================================================================== real checkpoints
@pytest.mark.slow
@pytest.mark.parametrize("llava", [os.environ.get("QMOP_LLAVA_HF", "llava-hf/llava-1.5-7b-hf"),
                                   os.environ.get("QMOP_LLAVA_ORIGINAL", "liuhaotian/llava-v1.5-7b")])
def test_convert_real_llava_1_5_7b(llava, tmp_path):
    """Network + about 16 GB of RAM (a GPU makes the seven verification forwards fast): the 7B conversion at M=576,
    pooling only, must reproduce LLaVA in float16 within the default half-precision tolerance."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = ConversionSettings(
        llava=llava, clip=os.environ.get("QMOP_CLIP", "openai/clip-vit-large-patch14-336"), output=str(tmp_path / "qmop"),
        num_visual_tokens=576, branches=("pooling",), dtype="float16", device=device,
    )
    report = convert(settings)
    assert report.reference_tokens_equal and report.reference_max_abs_diff <= DEFAULT_ATOL[torch.float16]
    assert report.reload_max_abs_diff <= DEFAULT_ATOL[torch.float16]


def test_half_precision_conversion_and_cli_arguments(sources):
    from safetensors import safe_open

    from conversion.cli import build_parser

    args = build_parser().parse_args(["--llava", "a", "--clip", "b", "--output", "c", "--config-override", "router_top_k=1",
                                      "--config-override", 'pruning_score="question_relevance"', "--no-pad-to-square"])
    assert dict(args.config_override) == {"router_top_k": 1, "pruning_score": "question_relevance"}
    assert args.pad_to_square is False and args.branches == ["pooling", "resampler", "pruning"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--llava", "a", "--clip", "b", "--output", "c", "--branches", "pooling", "mlp"])

    settings = _settings(sources, "bf16", dtype="bfloat16", num_visual_tokens=16, branches=("pooling", "pruning"),
                         config_overrides=dict(pruning_score="question_relevance", router_top_k=1), max_shard_size="5GB",
                         overwrite=True)
    os.makedirs(settings.output)
    open(os.path.join(settings.output, "stale.txt"), "w").close()
    report = convert(settings)
    assert not os.path.exists(os.path.join(report.output, "stale.txt"))  # --overwrite replaced the old folder
    assert report.dtype == "bfloat16" and report.reference_max_abs_diff <= DEFAULT_ATOL[torch.bfloat16]
    assert any(".question_proj." in k for k in report.fresh_keys)
    with safe_open(os.path.join(report.output, "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.projector.router.linear_1.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.text_encoder.final_layer_norm.weight").dtype == torch.bfloat16
    assert json.loads(open(os.path.join(report.output, "config.json")).read())["router_top_k"] == 1
