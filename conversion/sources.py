"""The inputs of a conversion: resolving `--llava`, `--clip` and `--vision-tower` (local folders or Hub downloads),
telling the llava-hf layout from the original LLaVA-1.5 one, reading weight files (safetensors or
`torch.load(weights_only=True)`; nothing else is unpickled), configs and tokenizers, gathered into `Sources`.
"""

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from conversion.settings import ConversionError, ConversionSettings, check_output_apart_from_sources

logger = logging.getLogger("qmop.conversion")

LLAVA_HF = "llava-hf"
ORIGINAL = "original"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


def resolve_checkpoint(name_or_path: str, token: Optional[str] = None) -> str:
    """A local folder as is; a Hub id is downloaded (config, tokenizer, processor and weight files only; the
    safetensors copy when a repo has both safetensors and .bin)."""
    if os.path.isdir(name_or_path):
        return os.path.abspath(name_or_path)
    if os.path.exists(name_or_path):
        raise ConversionError(f"{name_or_path!r} is a file; pass a checkpoint folder or a Hub repo id.")
    from huggingface_hub import HfApi, snapshot_download

    try:
        files = HfApi().list_repo_files(name_or_path, token=token)
    except Exception as error:  # noqa: BLE001 - the hub client raises many kinds; all mean "not found here"
        raise ConversionError(f"{name_or_path!r} is neither a local folder nor a readable Hub repo: {error}") from error
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    patterns = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    patterns += ["*.safetensors"] if has_safetensors else ["*.bin"]
    logger.info("downloading %s (%s)", name_or_path, ", ".join(patterns))
    return snapshot_download(name_or_path, allow_patterns=patterns, token=token)


def weight_files(folder: str) -> list:
    """Weight files of a folder, preferring safetensors; shards in index order."""
    layouts = (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))
    for index_name, single in layouts:
        index = os.path.join(folder, index_name)
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
            if missing:
                raise ConversionError(f"{folder}: the index {index_name} lists missing shard(s) {missing}.")
            return [os.path.join(folder, s) for s in shards]
        if os.path.exists(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
    raise ConversionError(
        f"{folder} holds no model.safetensors, pytorch_model.bin or sharded index: not a weights checkpoint."
    )


def _torch_load(path: str):
    """`torch.load(weights_only=True)`: tensors and plain containers only. Memory-mapped when the file is in the
    zip format (every torch >= 1.6 save); legacy files are read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def iter_tensors(files):
    """Yield (key, tensor) from safetensors or `torch.load(weights_only=True)`; nothing else is unpickled."""
    from safetensors import safe_open

    for path in files:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            state = _torch_load(path)
            if not isinstance(state, dict):
                raise ConversionError(f"{path} does not hold a state dict (got {type(state).__name__}).")
            yield from state.items()
            del state


def read_keys(files) -> list:
    """Key names only (cheap for safetensors; .bin shards are memory-mapped). A truncated or corrupt weight file is a
    ConversionError naming it, before any tensor is read."""
    from safetensors import safe_open

    keys = []
    for path in files:
        try:
            if path.endswith(".safetensors"):
                with safe_open(path, framework="pt") as f:
                    keys += list(f.keys())
            else:
                keys += list(_torch_load(path).keys())
        except Exception as error:  # noqa: BLE001 - safetensors and torch.load raise many kinds for a bad file
            raise ConversionError(
                f"{path} is not a readable weight file (truncated or corrupt? re-download it): {error}"
            ) from error
    return keys


def read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        raise ConversionError(f"{folder} has no {name}.")
    with open(path) as f:
        return json.load(f)


def detect_layout(llava_config: dict, folder: str) -> str:
    if llava_config.get("model_type") == "llava" and "text_config" in llava_config and "vision_config" in llava_config:
        return LLAVA_HF
    if "mm_projector_type" in llava_config or "mm_vision_tower" in llava_config or "mm_hidden_size" in llava_config:
        return ORIGINAL
    raise ConversionError(
        f"{folder}/config.json is neither a llava-hf LlavaConfig (text_config + vision_config) nor an original "
        f"LLaVA-1.5 config (mm_projector_type, mm_vision_tower); model_type={llava_config.get('model_type')!r}."
    )


@dataclass
class Sources:
    """The resolved inputs: folders, layout and the configs the QMoP config is assembled from."""

    layout: str
    llava_dir: str
    clip_dir: str
    vision_dir: Optional[str]  # None when the LLaVA checkpoint stores its vision tower
    llava_files: list
    vision_config: object
    text_config: object
    text_encoder_config: object
    vision_feature_layer: int
    image_processor: object
    tokenizer: object
    query_tokenizer: object
    generation_config: object
    num_added_tokens: int = 0


def _clip_sub_config(path: str, kind: str, source: str):
    """The CLIP text or vision config (`kind`: "text" / "vision") of a CLIPModel or a single-tower checkpoint."""
    from transformers import AutoConfig, CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    tower_cls = CLIPTextConfig if kind == "text" else CLIPVisionConfig
    config = AutoConfig.from_pretrained(path)
    if isinstance(config, CLIPConfig):
        return getattr(config, f"{kind}_config")
    if isinstance(config, tower_cls):
        return config
    raise ConversionError(
        f"{source} {path}: expected a CLIPModel or CLIP{kind.capitalize()}Model checkpoint, got {type(config).__name__}."
    )


def _original_text_config(raw: dict):
    """The Llama config inside an original LLaVA-1.5 config.json (the mm_* fields are LLaVA's own)."""
    from transformers import LlamaConfig

    if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConversionError(f"only LLaVA-1.5's mlp2x_gelu projector is supported, got {raw['mm_projector_type']!r}.")
    if raw.get("mm_vision_select_feature", "patch") != "patch":
        raise ConversionError(
            f"only mm_vision_select_feature='patch' is supported (QMoP drops CLS), got {raw['mm_vision_select_feature']!r}."
        )
    if raw.get("mm_use_im_start_end") or raw.get("mm_use_im_patch_token"):
        raise ConversionError("checkpoints with image start/end or patch tokens (mm_use_im_*) are not LLaVA-1.5 and unsupported.")
    skip = ("architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype")
    fields = {k: v for k, v in raw.items() if not k.startswith(("mm_", "tune_mm", "freeze_mm", "unfreeze_mm")) and k not in skip}
    for key in ("image_aspect_ratio", "image_grid_pinpoints", "use_mm_proj", "tokenizer_model_max_length",
                "tokenizer_padding_side", "max_length"):
        fields.pop(key, None)
    return LlamaConfig(**fields)


def _add_image_and_pad_tokens(tokenizer) -> int:
    """The original tokenizer has no `<image>` (the code splices id -200); add it and `<pad>` as llava-hf does."""
    from transformers import AddedToken

    before = len(tokenizer)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.unk_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return len(tokenizer) - before


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_tokenizer_files(folder: str, argument: str) -> None:
    """A tokenizer must come with the checkpoint: say which argument's folder lacks one, before anything is loaded."""
    if not any(os.path.exists(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise ConversionError(
            f"{argument} {folder} has no tokenizer (none of {list(TOKENIZER_FILES)}); the converted checkpoint needs "
            "the LLaVA tokenizer and the CLIP tokenizer. Copy the tokenizer files into that folder."
        )


def _load_llm_tokenizer(folder: str):
    """The LLaVA tokenizer. The original repos ship only a SentencePiece `tokenizer.model`: say what to install."""
    import importlib.util

    from transformers import AutoTokenizer

    sentencepiece_only = os.path.exists(os.path.join(folder, "tokenizer.model")) and not os.path.exists(
        os.path.join(folder, "tokenizer.json")
    )
    if sentencepiece_only and importlib.util.find_spec("sentencepiece") is None:
        raise ConversionError(
            f"{folder} has only a SentencePiece tokenizer.model (the original LLaVA-1.5 layout): "
            "`pip install sentencepiece protobuf` to read it."
        )
    return AutoTokenizer.from_pretrained(folder)


def load_sources(settings: ConversionSettings) -> Sources:
    """Resolve the checkpoints and read everything but the weights: layout, configs, tokenizers (the original
    layout's gets `<image>` and `<pad>`), image processor and generation config."""
    from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig, LlavaConfig

    llava_dir = resolve_checkpoint(settings.llava, settings.token)
    clip_dir = resolve_checkpoint(settings.clip, settings.token)
    check_output_apart_from_sources(os.path.abspath(settings.output), {"--llava": llava_dir, "--clip": clip_dir})
    check_tokenizer_files(llava_dir, "--llava")
    check_tokenizer_files(clip_dir, "--clip")
    raw = read_json(llava_dir, "config.json")
    layout = detect_layout(raw, llava_dir)
    llava_files = weight_files(llava_dir)
    llava_keys = read_keys(llava_files)
    has_vision = any("vision_tower." in k for k in llava_keys)
    vision_dir = None if has_vision else resolve_checkpoint(settings.vision_tower or settings.clip, settings.token)
    check_output_apart_from_sources(os.path.abspath(settings.output), {"--vision-tower": vision_dir})
    if has_vision and settings.vision_tower:
        logger.warning("%s stores its own vision tower; --vision-tower %s is not used", settings.llava, settings.vision_tower)

    tokenizer = _load_llm_tokenizer(llava_dir)
    num_added = 0
    if layout == LLAVA_HF:
        config = LlavaConfig.from_pretrained(llava_dir)
        if config.vision_feature_select_strategy != "default":
            raise ConversionError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: QMoP uses the patch "
                "tokens only ('default')."
            )
        if config.projector_hidden_act != "gelu" or not getattr(config, "multimodal_projector_bias", True):
            raise ConversionError("only LLaVA-1.5's projector (gelu, with biases) is supported.")
        if isinstance(config.vision_feature_layer, (list, tuple)):
            raise ConversionError("multi-layer vision features (a list vision_feature_layer) are not supported.")
        text_config, vision_feature_layer = config.text_config, config.vision_feature_layer
        vision_config = config.vision_config if has_vision else _clip_sub_config(vision_dir, "vision", "vision tower source")
        image_token_id = getattr(config, "image_token_id", None) or config.image_token_index
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_token_id:
            raise ConversionError(
                f"the llava-hf tokenizer maps {IMAGE_TOKEN} to {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)} but the "
                f"config's image token is {image_token_id}."
            )
    else:
        text_config = _original_text_config(raw)
        vision_feature_layer = raw.get("mm_vision_select_layer", -2)
        # The original config.json has no vision config: it comes from the CLIP checkpoint the tower comes from.
        vision_config = _clip_sub_config(vision_dir or clip_dir, "vision", "vision tower source")
        named = raw.get("mm_vision_tower")
        if vision_dir is not None and named and os.path.basename(named.rstrip("/")) not in vision_dir:
            logger.warning("the checkpoint was trained with vision tower %s; using %s", named, vision_dir)
        num_added = _add_image_and_pad_tokens(tokenizer)
        vocab = max(len(tokenizer), text_config.vocab_size)
        multiple = settings.pad_vocab_to_multiple_of
        text_config.vocab_size = int(math.ceil(vocab / multiple) * multiple) if num_added else text_config.vocab_size
    text_config.pad_token_id = tokenizer.pad_token_id

    image_source = llava_dir if os.path.exists(os.path.join(llava_dir, "preprocessor_config.json")) else (vision_dir or clip_dir)
    image_processor = AutoImageProcessor.from_pretrained(image_source)
    query_tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    if os.path.exists(os.path.join(llava_dir, "generation_config.json")):
        generation_config = GenerationConfig.from_pretrained(llava_dir)
    else:
        generation_config = GenerationConfig(bos_token_id=text_config.bos_token_id, eos_token_id=text_config.eos_token_id)
    generation_config.pad_token_id = tokenizer.pad_token_id
    return Sources(
        layout=layout, llava_dir=llava_dir, clip_dir=clip_dir, vision_dir=vision_dir, llava_files=llava_files,
        vision_config=vision_config, text_config=text_config, text_encoder_config=_clip_sub_config(clip_dir, "text", "--clip"),
        vision_feature_layer=vision_feature_layer, image_processor=image_processor, tokenizer=tokenizer,
        query_tokenizer=query_tokenizer, generation_config=generation_config, num_added_tokens=num_added,
    )

