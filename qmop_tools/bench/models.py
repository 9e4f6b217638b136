"""Shapes and builders for the efficiency benchmark: QMoP-LLaVA and transformers' own LLaVA-1.5 side by side.

Both models are built from one `BenchShapes` (same CLIP vision tower, same Llama LLM), with random weights by
default, or loaded from checkpoints. QMoP is built once: its budget M is chosen per call by the number of
`<image>` placeholders, so 576, 144, 64 and 36 tokens all run through the same weights.

Devices: "meta" builds without materialising any weight (FLOP counting of 7B shapes on a laptop); "cpu"/"cuda"
materialise in the requested dtype directly on the device.
"""

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import CLIPTextConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:  # the remote-code modules live at the repository root
    sys.path.insert(0, REPO_ROOT)

from configuration_qmop import CLIP_L_336_VISION, CLIP_L_TEXT, VICUNA_7B, QMoPConfig  # noqa: E402
from modeling_qmop import QMoPForConditionalGeneration  # noqa: E402
from qmop_tools.checks import is_square_budget  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchShapes:
    """Architecture of both models (vision tower, CLIP text encoder for QMoP's router, Llama LLM)."""

    vision: dict  # CLIPVisionConfig kwargs
    text_encoder: dict  # CLIPTextConfig kwargs
    llm: dict  # LlamaConfig kwargs
    resampler_num_layers: int = 2  # QMoP's default (configuration_qmop.QMoPConfig)
    router_hidden_size: int = 512
    image_token_id: Optional[int] = None  # defaults to the LLM's last vocabulary id (never a sampled text token)

    @property
    def num_patches(self) -> int:
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2


@dataclass
class BenchPreset:
    """What one benchmark run measures; `--preset` picks one, flags override fields."""

    name: str
    shapes: BenchShapes
    budgets: tuple = (576, 144, 64, 36)  # QMoP visual tokens M; LLaVA always uses every patch
    batch_sizes: tuple = (1, 8, 32)
    prompt_tokens: int = 40  # text tokens T of the prompt (BOS included), plus the image placeholders
    query_tokens: int = 16  # CLIP tokens of the question read by QMoP's router (BOS and EOS included)
    decode_tokens: int = 32  # tokens generated after the first one, for decode tokens/s
    warmup: int = 2
    repeats: int = 5
    dtype: str = "bfloat16"
    memory_budget_gib: float = 24.0  # "largest batch that fits": e.g. a 24 GiB consumer GPU
    # Batch sizes of the generate() decode comparison, eager vs torch.compile with a static cache (empty: skipped).
    compile_batch_sizes: tuple = (1, 8)
    notes: list = field(default_factory=list)


def _preset_7b() -> BenchPreset:
    return BenchPreset(
        name="7b",
        shapes=BenchShapes(vision=dict(CLIP_L_336_VISION), text_encoder=dict(CLIP_L_TEXT), llm=dict(VICUNA_7B),
                           image_token_id=32000),
        notes=["CLIP ViT-L/14-336 + CLIP-L text + Vicuna-7B shapes (LLaVA-1.5-7B)"],
    )


def _preset_cpu() -> BenchPreset:
    # 336 px / patch 14 keeps LLaVA's 24x24 = 576 patch grid, so the budgets mean what they mean at 7B; widths and
    # depths are cut so that the whole run takes a few minutes on two CPU cores. The LLM dominates the cost, as at 7B.
    vision = dict(CLIP_L_336_VISION, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
    text_encoder = dict(CLIP_L_TEXT, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
    llm = dict(VICUNA_7B, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=8)
    return BenchPreset(
        name="cpu", shapes=BenchShapes(vision=vision, text_encoder=text_encoder, llm=llm, resampler_num_layers=2,
                                       router_hidden_size=128, image_token_id=32000),
        batch_sizes=(1, 8, 32), decode_tokens=8, warmup=1, repeats=3, dtype="float32", memory_budget_gib=2.0,
        compile_batch_sizes=(1,),
        notes=["small CPU shapes: 576-patch grid at 336 px, vision width 128 x4 layers, LLM width 512 x4 layers"],
    )


def _preset_smoke() -> BenchPreset:
    # CI smoke test: an 8x8 = 64 patch grid, so the budgets are 64 (= LLaVA's token count), 16 and 4.
    vision = dict(CLIP_L_336_VISION, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=48, patch_size=6)
    text_encoder = dict(CLIP_L_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    llm = dict(VICUNA_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, pad_token_id=0)
    return BenchPreset(
        name="smoke", shapes=BenchShapes(vision=vision, text_encoder=text_encoder, llm=llm, resampler_num_layers=1,
                                         router_hidden_size=16),
        budgets=(64, 16, 4), batch_sizes=(1, 2), prompt_tokens=12, query_tokens=6, decode_tokens=2, warmup=1,
        repeats=1, dtype="float32", memory_budget_gib=0.25, compile_batch_sizes=(), notes=["tiny shapes for the CI smoke test"],
    )


PRESETS = {"7b": _preset_7b, "cpu": _preset_cpu, "smoke": _preset_smoke}


def get_preset(name: str) -> BenchPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}.")
    return PRESETS[name]()


# ===================================================================================== configs
def _image_token_id(shapes: BenchShapes) -> int:
    return shapes.image_token_id if shapes.image_token_id is not None else shapes.llm["vocab_size"] - 1


def qmop_config(shapes: BenchShapes, num_visual_tokens: int, attn_implementation: str = "sdpa",
                **overrides) -> QMoPConfig:
    """`overrides`: further QMoPConfig fields (the tower pruning variants' schedule and branches)."""
    config = QMoPConfig(
        vision_config=CLIPVisionConfig(**shapes.vision),
        text_encoder_config=CLIPTextConfig(**shapes.text_encoder),
        text_config=LlamaConfig(**shapes.llm),
        num_visual_tokens=num_visual_tokens,
        image_token_id=_image_token_id(shapes),
        resampler_num_layers=shapes.resampler_num_layers,
        router_hidden_size=shapes.router_hidden_size,
        **overrides,
    )
    _set_attention(config, attn_implementation)
    return config


def llava_config(shapes: BenchShapes, attn_implementation: str = "sdpa") -> LlavaConfig:
    """LLaVA-1.5 as transformers builds it: every patch of the penultimate layer (CLS dropped), mlp2x_gelu."""
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**shapes.vision),
        text_config=LlamaConfig(**shapes.llm),
        image_token_index=_image_token_id(shapes),
        image_seq_length=shapes.num_patches,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    _set_attention(config, attn_implementation)
    return config


def _set_attention(config, attn_implementation: str) -> None:
    """Same attention kernel on both sides, in every sub-model (4.57 and 5.x read `_attn_implementation`)."""
    for sub in [config, *(getattr(config, name, None) for name in ("vision_config", "text_encoder_config", "text_config"))]:
        if sub is not None:
            sub._attn_implementation = attn_implementation


# ===================================================================================== building
@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _materialise(model_cls, config, device: str, dtype: torch.dtype, seed: int):
    """Random weights built directly on `device` in `dtype` (meta: no memory at all)."""
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = model_cls(config)
    return model.eval().requires_grad_(False)


def build_qmop(shapes: BenchShapes, device: str, dtype: torch.dtype, seed: int = 0, attn_implementation: str = "sdpa",
               path: Optional[str] = None, quantization: Optional[str] = None, num_visual_tokens: Optional[int] = None,
               **overrides):
    """QMoP-LLaVA built at the largest budget (the resampler's query grid, default all patches); other budgets are
    chosen per call. `overrides`: further QMoPConfig fields."""
    if path:
        return _load(QMoPForConditionalGeneration, path, device, dtype, attn_implementation, quantization)
    config = qmop_config(shapes, num_visual_tokens or shapes.num_patches, attn_implementation, **overrides)
    # Passed straight through so that nf4 can free the bf16 copy once it is saved.
    return _maybe_quantize(_materialise(QMoPForConditionalGeneration, config, device, dtype, seed), device, dtype,
                           attn_implementation, quantization)


def build_llava(shapes: BenchShapes, device: str, dtype: torch.dtype, seed: int = 0, attn_implementation: str = "sdpa",
                path: Optional[str] = None, quantization: Optional[str] = None):
    if path:
        return _load(LlavaForConditionalGeneration, path, device, dtype, attn_implementation, quantization)
    model_config = llava_config(shapes, attn_implementation)
    return _maybe_quantize(_materialise(LlavaForConditionalGeneration, model_config, device, dtype, seed), device,
                           dtype, attn_implementation, quantization)


# Modules kept in bf16 under nf4 (only the LLM's decoder layers are quantized), as full module paths: 5.x matches
# a pattern from the start of the name or as its suffix, 4.57 as "pattern." inside it; these work on both.
NF4_SKIP_MODULES = ["model.vision_tower", "model.text_encoder", "model.projector", "model.multi_modal_projector",
                    "lm_head"]


def _quantization_config(quantization: Optional[str], dtype: torch.dtype):
    if quantization is None:
        return None
    if quantization != "nf4":
        raise ValueError(f"unknown quantization {quantization!r}; only 'nf4' (bitsandbytes 4-bit) is supported.")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=list(NF4_SKIP_MODULES))


def _load(model_cls, path, device, dtype, attn_implementation, quantization):
    if device == "meta":  # FLOPs and KV need only the checkpoint's shapes: build from its config, no weights
        config_cls = QMoPConfig if model_cls is QMoPForConditionalGeneration else LlavaConfig
        config = config_cls.from_pretrained(path)
        _set_attention(config, attn_implementation)
        return _materialise(model_cls, config, device, dtype, seed=0)
    kwargs = dict(attn_implementation=attn_implementation, device_map={"": device})
    kwargs["dtype" if _transformers_major() >= 5 else "torch_dtype"] = dtype
    quant = _quantization_config(quantization, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if model_cls is QMoPForConditionalGeneration:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, **kwargs).eval()
    return model_cls.from_pretrained(path, **kwargs).eval()


def _maybe_quantize(model, device, dtype, attn_implementation, quantization):
    """Random-weight nf4: bitsandbytes quantizes while loading, so save to a temporary folder and load back."""
    if quantization is None:
        return model
    if device == "meta":
        raise ValueError("nf4 needs materialised weights; run it with --device cuda (or cpu), not on meta.")
    with tempfile.TemporaryDirectory(prefix="qmop-bench-nf4-") as folder:
        model.save_pretrained(folder)
        del model
        return _load(type_of_saved(folder), folder, device, dtype, attn_implementation, quantization)


def type_of_saved(folder: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    return QMoPForConditionalGeneration if config.model_type == QMoPConfig.model_type else LlavaForConditionalGeneration


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


# ===================================================================================== inputs
TEXT_BEFORE_IMAGE = 2  # "<s> USER" before the placeholders


@dataclass
class BenchInputs:
    """Synthetic prefill inputs: T text tokens with M `<image>` placeholders after BOS and the first text token."""

    input_ids: torch.Tensor  # (B, T + M)
    pixel_values: torch.Tensor  # (B, 3, H, W)
    query_input_ids: Optional[torch.Tensor]  # (B, Q) CLIP tokens of the question (QMoP only)
    num_visual_tokens: int

    @property
    def sequence_length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def text_after_image(self) -> int:
        """Text positions after the placeholders (the question: they rank visual tokens with `llm_pruning_layer`)."""
        return self.sequence_length - self.num_visual_tokens - TEXT_BEFORE_IMAGE


def make_inputs(config, batch_size: int, prompt_tokens: int, num_visual_tokens: int, query_tokens: int,
                device: str, dtype: torch.dtype, seed: int = 0) -> BenchInputs:
    """Random token ids and pixels; `config` is the model's config (QMoPConfig or LlavaConfig)."""
    if prompt_tokens < 2:
        raise ValueError(f"`prompt_tokens` must be >= 2 (BOS and one text token), got {prompt_tokens}.")
    generator = torch.Generator().manual_seed(seed)
    text_config, vision_config = config.text_config, config.vision_config
    image_token_id = config.image_token_id
    # Text ids avoid the special low ids and the placeholder id.
    low, high = 3, min(text_config.vocab_size, image_token_id) - 1
    text = torch.randint(low, high, (batch_size, prompt_tokens), generator=generator)  # (B, T)
    text[:, 0] = text_config.bos_token_id if text_config.bos_token_id is not None else 1
    image = torch.full((batch_size, num_visual_tokens), image_token_id)  # (B, M)
    before = TEXT_BEFORE_IMAGE
    input_ids = torch.cat([text[:, :before], image, text[:, before:]], dim=1)  # (B, T + M): "<s> USER <image>... question"
    size = vision_config.image_size
    pixel_values = torch.randn((batch_size, vision_config.num_channels, size, size), generator=generator)
    query_input_ids = None
    encoder_config = getattr(config, "text_encoder_config", None)
    if encoder_config is not None:
        if query_tokens < 2:
            raise ValueError(f"`query_tokens` must be >= 2 (BOS and EOS), got {query_tokens}.")
        ids = torch.randint(3, encoder_config.vocab_size - 2, (batch_size, query_tokens), generator=generator)
        ids[:, 0], ids[:, -1] = encoder_config.bos_token_id, encoder_config.eos_token_id  # (B, Q)
        query_input_ids = ids.to(device)
    return BenchInputs(input_ids.to(device), pixel_values.to(device, dtype), query_input_ids, num_visual_tokens)


def compute_dtype(model) -> torch.dtype:
    """Dtype of the LLM's activations, hence of its KV cache (the embedding table is never quantized)."""
    return model.get_input_embeddings().weight.dtype


def square_budgets(budgets, num_patches: int) -> list:
    for budget in budgets:
        if not is_square_budget(budget) or budget > num_patches:
            raise ValueError(f"budget {budget} must be a perfect square in 1..{num_patches} (the patch grid).")
    return list(budgets)
