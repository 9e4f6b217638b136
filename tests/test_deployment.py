"""device_map placement, CPU/disk offload, bitsandbytes 4-bit/8-bit, dtypes (CPU versions of issue #3's checks)."""

import importlib.util
import os

import pytest
import torch
from conftest import make_image

from modeling_qmop import QMoPForConditionalGeneration
from processing_qmop import QMoPProcessor

PROMPT = "USER: <image>\nWhat colour is the circle? ASSISTANT:"
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    processor = QMoPProcessor.from_pretrained(tiny_checkpoint)
    inputs = processor(images=make_image(seed=2), text=PROMPT)
    model = QMoPForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    return inputs, _greedy(model, inputs)


def _greedy(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("device_map", ["auto", "balanced", "cpu"])
def test_device_map_strings(tiny_checkpoint, reference, device_map):
    inputs, expected = reference
    model = QMoPForConditionalGeneration.from_pretrained(tiny_checkpoint, device_map=device_map).eval()
    assert torch.equal(_greedy(model, inputs), expected)


def test_explicit_device_map_with_disk_offload(tiny_checkpoint, reference, tmp_path):
    inputs, expected = reference
    device_map = {
        "model.vision_tower": "cpu",
        "model.text_encoder": "cpu",
        "model.projector": "cpu",
        "model.language_model.embed_tokens": "cpu",
        "model.language_model.layers.0": "cpu",
        "model.language_model.layers.1": "disk",
        "model.language_model.norm": "disk",
        "model.language_model.rotary_emb": "cpu",
        "lm_head": "disk",
    }
    model = QMoPForConditionalGeneration.from_pretrained(
        tiny_checkpoint, device_map=device_map, offload_folder=str(tmp_path)
    ).eval()
    assert "disk" in set(model.hf_device_map.values())
    assert torch.equal(_greedy(model, inputs), expected)


def test_auto_map_with_memory_limit_offloads_and_matches(tiny_checkpoint, reference, tmp_path):
    inputs, expected = reference
    model = QMoPForConditionalGeneration.from_pretrained(
        tiny_checkpoint, device_map="auto", max_memory={"cpu": "350KB"}, offload_folder=str(tmp_path)
    ).eval()
    placement = model.hf_device_map
    assert "disk" in set(placement.values()), placement
    assert not any(key.startswith("model.projector.") for key in placement)  # the projector is never split
    assert placement.get("model.projector") == "disk" and placement.get("model.vision_tower") == "cpu"
    assert torch.equal(_greedy(model, inputs), expected)


def test_no_split_modules_cover_towers_and_llm(tiny):
    model, _ = tiny
    names = set(model._no_split_modules)
    assert {"QMoPProjector", "CLIPEncoderLayer", "LlamaDecoderLayer"} <= names


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtype_reaches_every_sub_model(tiny_checkpoint, reference, dtype):
    inputs, _ = reference
    model = QMoPForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=dtype).eval()
    for module in (model.model.vision_tower, model.model.text_encoder, model.model.projector, model.model.language_model):
        assert next(module.parameters()).dtype == dtype
    if dtype != torch.float16:  # fp16 matmuls on CPU are slow/partial; bf16 and fp32 must generate
        assert _greedy(model, inputs).shape == (1, 6)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attn_implementation_reaches_every_sub_model(tiny_checkpoint, implementation):
    model = QMoPForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation=implementation)
    for config in (model.config.vision_config, model.config.text_encoder_config, model.config.text_config):
        assert config._attn_implementation == implementation


# ------------------------------------------------------------------------------------------ bitsandbytes
def _quantized_module_names(model, cls_name):
    return [name for name, module in model.named_modules() if type(module).__name__ == cls_name]


def _bnb_config(**kwargs):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**kwargs)


@pytest.fixture(scope="module")
def bnb_checkpoint(tmp_path_factory):
    """Width 64: bitsandbytes' CPU 4-bit kernels fail on the 32-wide tiny model's 32->16 projections."""
    from qmop_tools.testing.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("bnb") / "qmop-tiny-bnb"), num_visual_tokens=16, width=64)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
@pytest.mark.parametrize(
    "settings",
    [
        dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
        dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
             bnb_4bit_compute_dtype=torch.float32),
    ],
    ids=["nf4", "fp4-double-quant"],
)
def test_4bit_quantizes_only_llm_decoder_linears(bnb_checkpoint, reference, tmp_path, settings):
    inputs, _ = reference
    model = QMoPForConditionalGeneration.from_pretrained(
        bnb_checkpoint, quantization_config=_bnb_config(**settings), dtype=torch.float32
    )
    quantized = _quantized_module_names(model, "Linear4bit")
    assert quantized and all(name.startswith("model.language_model.layers.") for name in quantized), quantized
    assert type(model.lm_head).__name__ == "Linear"
    assert model.model.projector.router.linear_1.weight.dtype == torch.float32
    tokens = _greedy(model.eval(), inputs)
    assert tokens.shape == (1, 6)
    model.save_pretrained(tmp_path)  # pre-quantized checkpoint
    reloaded = QMoPForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()  # 4.57 defaults to fp16
    assert _quantized_module_names(reloaded, "Linear4bit") == quantized
    saved, loaded = model.state_dict(), reloaded.state_dict()
    packed = [f"{name}.weight" for name in quantized]
    assert all(torch.equal(saved[k].cpu(), loaded[k].cpu()) for k in packed)  # packed 4-bit weights, bit for bit
    with torch.no_grad():  # same packed weights; bitsandbytes' plain CPU kernel (no AVX-512 BF16) may sum the reloaded
        # model's first forward in another order: last-bit differences (seen under transformers 4.57.6 on an AVX2 CPU)
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-5)
    assert _greedy(reloaded, inputs).shape == (1, 6)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_user_skip_list_keeps_lm_head(tiny_checkpoint):
    config = _bnb_config(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                         llm_int8_skip_modules=["vision_tower", "text_encoder", "projector"])
    model = QMoPForConditionalGeneration.from_pretrained(tiny_checkpoint, quantization_config=config)
    assert type(model.lm_head).__name__ == "Linear"
    quantized = _quantized_module_names(model, "Linear4bit")
    assert quantized and all(n.startswith("model.language_model.layers.") for n in quantized), quantized
    assert config.llm_int8_skip_modules == ["vision_tower", "text_encoder", "projector"]  # caller's object untouched
    shorthand = QMoPForConditionalGeneration.from_pretrained(tiny_checkpoint, load_in_4bit=True)
    assert _quantized_module_names(shorthand, "Linear4bit")
    assert all(n.startswith("model.language_model.layers.") for n in _quantized_module_names(shorthand, "Linear4bit"))


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_8bit_quantizes_only_llm_decoder_linears(bnb_checkpoint, reference):
    inputs, _ = reference
    try:
        model = QMoPForConditionalGeneration.from_pretrained(bnb_checkpoint, quantization_config=_bnb_config(load_in_8bit=True))
    except (RuntimeError, ImportError, ValueError) as error:  # a bitsandbytes build without CPU int8 support
        pytest.skip(f"bitsandbytes 8-bit is not supported on this CPU build: {error}")
    quantized = _quantized_module_names(model, "Linear8bitLt")
    assert quantized and all(name.startswith("model.language_model.layers.") for name in quantized), quantized
    assert _greedy(model.eval(), inputs).shape == (1, 6)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
def test_gpu_check_script_path_on_cpu(tmp_path):
    from qmop_tools.gpu_check import build_random_checkpoint, check

    folder = build_random_checkpoint("tiny", str(tmp_path / "tiny-random"))
    for mode in ("bf16", "nf4"):
        report = check(folder, mode, "cpu", new_tokens=3)
        assert report["decode_tokens_per_s"] > 0 and (report["linear4bit_modules"] > 0) == (mode == "nf4")


@pytest.mark.gpu
def test_gpu_check_7b():
    from qmop_tools.gpu_check import build_random_checkpoint, check

    folder = build_random_checkpoint("7b", os.path.expanduser("~/.cache/qmop-7b-random"))
    for mode in ("bf16", "nf4"):
        check(folder, mode, "cuda")
