"""Building the converted model: the QMoP config and processor from the sources, the source tensors read and renamed
into QMoP's key names, and the models assembled from them without copying: the requested QMoP model (strict: every
missing or unexpected key is reported; QMoP's own modules are freshly initialised under a seed) and, for the
original layout, transformers' `LlavaForConditionalGeneration` as the reference.
"""

from typing import Optional

import torch

from configuration_qmop import QMoPConfig
from conversion.keys import (
    CLIP_TEXT_RULES,
    CLIP_VISION_RULES,
    LLAVA_HF_RULES,
    ORIGINAL_RULES,
    PROJECTOR,
    SEPARATE_VISION_RULES,
    expert_keys,
    is_fresh_key,
    map_keys,
)
from conversion.settings import ConversionError
from conversion.sources import IMAGE_TOKEN, LLAVA_HF, Sources, iter_tensors, read_keys, weight_files
from modeling_qmop import QMoPForConditionalGeneration
from qmop_tools.progress import progress_bar


def build_qmop_config(sources: Sources, num_visual_tokens: int, branches, pad_to_square: bool, overrides=None) -> QMoPConfig:
    image_token_id = sources.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    overrides = dict(overrides or {})
    return QMoPConfig(
        vision_config=sources.vision_config.to_dict(),
        text_encoder_config=sources.text_encoder_config.to_dict(),
        text_config=sources.text_config.to_dict(),
        num_visual_tokens=num_visual_tokens,
        branches=list(branches),
        image_token_id=image_token_id,
        vision_feature_layer=sources.vision_feature_layer,
        projector_hidden_act="gelu",
        pad_to_square=pad_to_square,
        **overrides,
    )


def build_processor(sources: Sources, num_visual_tokens: int, pad_to_square: bool):
    from processing_qmop import QMoPProcessor

    return QMoPProcessor(
        image_processor=sources.image_processor,
        tokenizer=sources.tokenizer,
        query_tokenizer=sources.query_tokenizer,
        num_visual_tokens=num_visual_tokens,
        patch_size=sources.vision_config.patch_size,
        pad_to_square=pad_to_square,
    )


def _read_mapped(files, rules, source: str, folder: str, keep, dtype: Optional[torch.dtype], into: dict,
                 quiet: bool) -> Optional[torch.dtype]:
    """Add the tensors of `files` whose mapped name passes `keep` to `into`, cast to `dtype` as they are read
    (dtype None: the first floating tensor's dtype), with a bar over the tensors on a terminal unless `quiet`.
    Returns the dtype in use."""
    description = f"{source} {folder}"
    mapping = map_keys(read_keys(files), rules, description)
    tensors = progress_bar(iter_tensors(files), desc=f"reading {source}", total=len(mapping), unit="tensor",
                           quiet=quiet)
    for key, tensor in tensors:
        target = mapping[key]
        if target is None or not keep(target):
            continue
        if target in into:
            raise ConversionError(f"{description}: two keys map to {target!r} (the second is {key!r}).")
        if torch.is_floating_point(tensor):
            dtype = dtype or tensor.dtype
            tensor = tensor.to(dtype)
        into[target] = tensor
    return dtype


def read_converted_tensors(sources: Sources, dtype: Optional[torch.dtype], quiet: bool = False):
    """All mapped tensors in `dtype` (None: the LLaVA weights' dtype), keyed by QMoP names (the projector under
    the `@projector.` pseudo prefix). Returns (tensors, dtype)."""
    tensors = {}
    rules = LLAVA_HF_RULES if sources.layout == LLAVA_HF else ORIGINAL_RULES
    dtype = _read_mapped(sources.llava_files, rules, f"LLaVA ({sources.layout})", sources.llava_dir,
                         lambda target: True, dtype, tensors, quiet)
    dtype = dtype or torch.float32

    def from_clip(target: str) -> bool:  # the text tower always; the vision tower when LLaVA has none
        takes_vision = sources.vision_dir == sources.clip_dir and target.startswith("model.vision_tower.")
        return target.startswith("model.text_encoder.") or takes_vision

    _read_mapped(weight_files(sources.clip_dir), CLIP_TEXT_RULES + CLIP_VISION_RULES, "CLIP", sources.clip_dir,
                 from_clip, dtype, tensors, quiet)
    if sources.vision_dir is not None and sources.vision_dir != sources.clip_dir:
        _read_mapped(weight_files(sources.vision_dir), SEPARATE_VISION_RULES, "vision tower", sources.vision_dir,
                     lambda target: target.startswith("model.vision_tower."), dtype, tensors, quiet)
    if not any(k.startswith("model.vision_tower.") for k in tensors):
        raise ConversionError("no vision tower weights were found in the LLaVA checkpoint or the vision source.")
    if sources.num_added_tokens:
        _resize_vocabulary(tensors, sources.text_config.vocab_size)
    return tensors, dtype


def _resize_vocabulary(tensors: dict, vocab_size: int) -> None:
    """New rows of the input embeddings and the LM head = mean of the existing rows (so the added `<image>`,
    `<pad>` and padding rows are neutral; `<image>` rows are never used: image features replace them)."""
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        old = tensors[key]  # (V_old, D)
        if old.shape[0] >= vocab_size:
            continue
        extra = old.float().mean(dim=0, keepdim=True).expand(vocab_size - old.shape[0], -1).to(old.dtype)
        tensors[key] = torch.cat([old, extra], dim=0)  # (V, D)


def _empty_model(model_cls, config):
    """Parameters on the meta device, buffers real: weights are assigned afterwards without a second copy."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = model_cls(config)
    return model


def assemble_qmop(config: QMoPConfig, tensors: dict, dtype: torch.dtype, seed: int):
    """QMoP model whose weights are `tensors` (shared, not copied) plus freshly initialised QMoP weights.
    Strict: every missing or unexpected key is reported. Returns (model, sorted fresh keys)."""
    model = _empty_model(QMoPForConditionalGeneration, config)
    model_state = model.state_dict()
    expected = set(model_state)
    state = {}
    for key, tensor in tensors.items():
        if key.startswith(PROJECTOR):
            for target in expert_keys(key, config.branches):
                state[target] = tensor.clone()  # one independent copy per branch expert
        else:
            state[key] = tensor
    unexpected = sorted(set(state) - expected)
    missing = expected - set(state)
    fresh = sorted(k for k in missing if is_fresh_key(k))
    not_fresh = sorted(missing - set(fresh))
    if unexpected or not_fresh:
        raise ConversionError(
            "strict load failed.\n"
            f"  missing ({len(not_fresh)}): {', '.join(not_fresh) or '-'}\n"
            f"  unexpected ({len(unexpected)}): {', '.join(unexpected) or '-'}"
        )
    shapes = [(k, tuple(state[k].shape), tuple(model_state[k].shape)) for k in state]
    bad = [f"{k}: checkpoint {a} vs model {b}" for k, a, b in shapes if a != b]
    if bad:
        raise ConversionError(f"shape mismatch for {len(bad)} key(s):\n  " + "\n  ".join(bad))
    model.load_state_dict(state, strict=False, assign=True)

    torch.manual_seed(seed)
    for module in model.modules():  # materialise and initialise what the checkpoint does not provide
        own = list(module.named_parameters(recurse=False))
        on_meta = [p.device.type == "meta" for _, p in own]
        if any(on_meta) and not all(on_meta):  # never re-initialise a module the checkpoint partly provides
            raise ConversionError(f"{type(module).__name__} is only partly in the checkpoint: {[n for n, _ in own]}")
        if own and all(on_meta):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
            for name, param in own:
                initialised = getattr(module, name).data.to(dtype)
                setattr(module, name, torch.nn.Parameter(initialised, requires_grad=param.requires_grad))
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise ConversionError(f"parameters left uninitialised: {leftover}")
    return model.eval(), fresh


def assemble_llava_reference(sources: Sources, config: QMoPConfig, tensors: dict):
    """transformers' LlavaForConditionalGeneration on the converted tensors (shared): the reference for the
    original layout, which transformers cannot load itself."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    llava_config = LlavaConfig(
        vision_config=sources.vision_config.to_dict(),
        text_config=sources.text_config.to_dict(),
        image_token_index=config.image_token_id,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=config.num_patches,
    )
    model = _empty_model(LlavaForConditionalGeneration, llava_config)
    mapping = map_keys(model.state_dict().keys(), LLAVA_HF_RULES, "transformers' LlavaForConditionalGeneration")
    state = {key: tensors[target] for key, target in mapping.items() if target is not None}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()

