"""Convert a LLaVA-1.5 checkpoint (llava-hf or the original liuhaotian layout) plus a CLIP checkpoint into
QMoP-LLaVA, verify it numerically, and write a complete, Hub-ready folder.

What comes from where:
    LLaVA vision tower (CLIP ViT)   -> model.vision_tower.*         (from --clip / --vision-tower when the
                                                                      original LLaVA checkpoint does not store it)
    LLaVA projector (mlp2x_gelu)    -> model.projector.<branch>_branch.expert.linear_{1,2}.*   (copied per branch)
    LLaVA language model + lm_head  -> model.language_model.*, lm_head.*
    CLIP text tower                 -> model.text_encoder.*        (its tokenizer becomes the query tokenizer)
    freshly initialised (seeded)    -> resampler cross-attention layers and query embedding, router,
                                       question projections of the "question_relevance" pruning score and of
                                       QG-VTC tower pruning (`projector.tower_pruner`)

Every source key is renamed by exactly one anchored regular expression (`KeyRule`); a key that matches no rule or
more than one is an error, so the result never depends on rule order. The QMoP model is then loaded strictly: any
key it expects that is neither mapped nor in the documented fresh set, and any mapped key it does not expect, is
reported in full.

Verification happens before anything is written: the converted weights, viewed as QMoP with
`num_visual_tokens = number of patches` and `branches = ["pooling"]`, must give the same logits (and greedy tokens)
as transformers' own `LlavaForConditionalGeneration` on fixed inputs; the requested model then runs a forward and
a short greedy generation. The folder is written to a temporary directory next to the output, reloaded through
`AutoModelForImageTextToText` / `AutoProcessor` with `trust_remote_code=True`, checked again, and only then moved
into place.
"""

import gc
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from configuration_qmop import BRANCH_ORDER, QMoPConfig
from modeling_qmop import QMoPForConditionalGeneration

logger = logging.getLogger("qmop.conversion")

LLAVA_HF = "llava-hf"
ORIGINAL = "original"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
PROJECTOR = "@projector."  # pseudo prefix: LLaVA's projector, copied into every branch's expert MLP
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Reference check tolerance on max |logit difference| when --atol is not given. Both models run the same
# operations in the same order, so float32 is expected to agree to rounding; half precision gets more room.
DEFAULT_ATOL = {torch.float32: 1e-5, torch.float16: 5e-2, torch.bfloat16: 5e-2}
VERIFY_PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
# Stage at which an environment variable can make the converter pause (used by the interruption test).
PAUSE_ENV = "QMOP_CONVERT_PAUSE_AFTER"


class ConversionError(RuntimeError):
    """The inputs cannot be converted, or the converted model failed a check."""


# ===================================================================================== settings
@dataclass
class ConversionSettings:
    """Everything one conversion needs. Paths may be local folders or Hub ids."""

    llava: str  # llava-hf LlavaForConditionalGeneration folder/id, or the original LLaVA-1.5 layout
    clip: str  # CLIP checkpoint (CLIPModel or CLIPTextModel): text tower + tokenizer become the query encoder
    output: str
    vision_tower: Optional[str] = None  # CLIP vision checkpoint for LLaVA checkpoints without one (default: clip)
    num_visual_tokens: int = 144
    branches: tuple = BRANCH_ORDER
    dtype: str = "auto"  # "auto" = the LLaVA weights' dtype
    config_overrides: dict = field(default_factory=dict)  # further QMoPConfig fields (router_top_k, ...)
    pad_to_square: Optional[bool] = None  # None: True for the original layout, the image processor's do_pad else
    pad_vocab_to_multiple_of: int = 64  # when <image>/<pad> are added (original layout), as llava-hf does
    max_shard_size: str = "5GB"
    seed: int = 0  # fresh weights (resampler, router)
    device: str = "cpu"  # where the verification forwards run
    atol: Optional[float] = None
    verify_new_tokens: int = 8
    overwrite: bool = False
    push_to_hub: Optional[str] = None
    private: bool = False
    token: Optional[str] = None
    base_model: Optional[str] = None  # for the model card; default: --llava when it is a Hub id


@dataclass
class ConversionReport:
    output: str
    layout: str
    dtype: str
    reference_max_abs_diff: float
    reference_tokens_equal: bool
    reload_max_abs_diff: float
    generated_text: str
    fresh_keys: list
    num_parameters: int
    pushed_to: Optional[str] = None


# ===================================================================================== key mapping
@dataclass(frozen=True)
class KeyRule:
    """An anchored regex; `target` is a format string over its named groups, or None to drop the key."""

    pattern: str
    target: Optional[str]
    reason: str = ""

    def __post_init__(self):
        if not (self.pattern.startswith("^") and self.pattern.endswith("$")):
            raise ValueError(f"KeyRule patterns must be anchored with ^...$: {self.pattern!r}")

    @property
    def regex(self) -> re.Pattern:
        return re.compile(self.pattern)


_NOT_POSITION_IDS = r"(?!embeddings\.position_ids$)"
POSITION_IDS_REASON = "buffer recomputed by the model"

# llava-hf: the on-disk layout (4.x save, Hub repos), 4.57's in-memory layout and 5.x's in-memory layout.
LLAVA_HF_RULES = (
    KeyRule(
        r"^(?:model\.)?vision_tower\.(?!(?:vision_model\.)?embeddings\.position_ids$)(?:vision_model\.)?(?P<rest>.+)$",
        "model.vision_tower.{rest}",
    ),
    KeyRule(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?embeddings\.position_ids$", None, POSITION_IDS_REASON),
    KeyRule(
        r"^(?:model\.)?multi_modal_projector\.linear_(?P<i>[12])\.(?P<param>weight|bias)$", PROJECTOR + "linear_{i}.{param}"
    ),
    KeyRule(r"^language_model\.model\.(?P<rest>.+)$", "model.language_model.{rest}"),
    KeyRule(r"^model\.language_model\.(?P<rest>.+)$", "model.language_model.{rest}"),
    KeyRule(r"^(?:language_model\.)?lm_head\.weight$", "lm_head.weight"),
)

# liuhaotian/llava-v1.5-*: LlavaLlamaForCausalLM (a LlamaForCausalLM with `model.mm_projector` and, only when the
# tower was trained, `model.vision_tower.vision_tower.vision_model`).
ORIGINAL_RULES = (
    KeyRule(r"^model\.embed_tokens\.weight$", "model.language_model.embed_tokens.weight"),
    KeyRule(r"^model\.layers\.(?P<rest>\d+\.(?!self_attn\.rotary_emb\.).+)$", "model.language_model.layers.{rest}"),
    KeyRule(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$", None, "rotary buffer recomputed by the model"),
    KeyRule(r"^model\.norm\.weight$", "model.language_model.norm.weight"),
    KeyRule(r"^lm_head\.weight$", "lm_head.weight"),
    KeyRule(r"^model\.mm_projector\.0\.(?P<param>weight|bias)$", PROJECTOR + "linear_1.{param}"),
    KeyRule(r"^model\.mm_projector\.2\.(?P<param>weight|bias)$", PROJECTOR + "linear_2.{param}"),
    KeyRule(
        rf"^model\.vision_tower\.vision_tower\.vision_model\.(?P<rest>{_NOT_POSITION_IDS}.+)$", "model.vision_tower.{rest}"
    ),
    KeyRule(r"^model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids$", None, POSITION_IDS_REASON),
)

# CLIPModel (`text_model.*`, `vision_model.*`), 4.x CLIPTextModel (`text_model.*`), 5.x CLIPTextModel (unwrapped).
CLIP_TEXT_RULES = (
    KeyRule(rf"^text_model\.(?P<rest>{_NOT_POSITION_IDS}.+)$", "model.text_encoder.{rest}"),
    KeyRule(r"^(?P<rest>(?:embeddings\.(?!position_ids$)|encoder\.|final_layer_norm\.).+)$", "model.text_encoder.{rest}"),
    KeyRule(r"^(?:text_model\.)?embeddings\.position_ids$", None, POSITION_IDS_REASON),
    KeyRule(r"^text_projection\.weight$", None, "CLIP's contrastive head: QMoP reads the pooled EOS state"),
    KeyRule(r"^logit_scale$", None, "CLIP's contrastive temperature"),
)
CLIP_VISION_RULES = (
    KeyRule(rf"^vision_model\.(?P<rest>{_NOT_POSITION_IDS}.+)$", "model.vision_tower.{rest}"),
    KeyRule(r"^vision_model\.embeddings\.position_ids$", None, POSITION_IDS_REASON),
    KeyRule(r"^visual_projection\.weight$", None, "CLIP's contrastive head"),
)
# 5.x CLIPVisionModel saves unwrapped keys; only used for a separate --vision-tower checkpoint.
CLIP_VISION_UNWRAPPED_RULES = CLIP_VISION_RULES[:2] + (
    KeyRule(
        r"^(?P<rest>(?:embeddings\.(?!position_ids$)|encoder\.|pre_layrnorm\.|post_layernorm\.).+)$",
        "model.vision_tower.{rest}",
    ),
    KeyRule(r"^embeddings\.position_ids$", None, POSITION_IDS_REASON),
    KeyRule(r"^visual_projection\.weight$", None, "CLIP's contrastive head"),
)
# A separate --vision-tower checkpoint: a CLIPModel (its text half unused) or a CLIPVisionModel (4.x or 5.x keys).
SEPARATE_VISION_RULES = CLIP_VISION_UNWRAPPED_RULES + (
    KeyRule(r"^text_model\..+$", None, "the text tower comes from --clip"),
    KeyRule(r"^text_projection\.weight$", None, "CLIP's contrastive head"),
    KeyRule(r"^logit_scale$", None, "CLIP's contrastive temperature"),
)


def map_key(key: str, rules) -> Optional[str]:
    """The target of the one rule matching `key` (None: dropped). Raises when no rule or several rules match."""
    matches = [(rule, m) for rule in rules if (m := rule.regex.match(key))]
    if not matches:
        raise KeyError(key)
    if len(matches) > 1:
        raise ConversionError(f"key {key!r} matches several rules: {[r.pattern for r, _ in matches]}")
    rule, match = matches[0]
    return None if rule.target is None else rule.target.format(**match.groupdict())


def map_keys(keys, rules, source: str) -> dict:
    """{source key: target key or None}; every unmatched key is listed in one error."""
    mapping, unmatched = {}, []
    for key in keys:
        try:
            mapping[key] = map_key(key, rules)
        except KeyError:
            unmatched.append(key)
    if unmatched:
        raise ConversionError(
            f"{len(unmatched)} key(s) of {source} match no conversion rule (is this the right kind of checkpoint?): "
            + ", ".join(sorted(unmatched))
        )
    return mapping


def expert_keys(pseudo_key: str, branches) -> list:
    """`@projector.linear_1.weight` -> the same tensor name in every branch's expert MLP."""
    rest = pseudo_key[len(PROJECTOR) :]
    return [f"model.projector.{branch}_branch.expert.{rest}" for branch in branches]


def is_fresh_key(key: str) -> bool:
    """Weights QMoP adds to LLaVA, initialised at conversion time (everything in the projector but the experts)."""
    return key.startswith("model.projector.") and ".expert." not in key


# ===================================================================================== reading checkpoints
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


def iter_tensors(files, description: str):
    """Yield (key, tensor) from safetensors or `torch.load(weights_only=True)`; nothing else is unpickled."""
    from safetensors import safe_open

    for path in tqdm(files, desc=f"loading {description}", unit="shard", disable=len(files) < 2):
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


# ===================================================================================== sources
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


# ===================================================================================== config and processor
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


def verification_image(size: int):
    """A fixed, non-square test picture (so LLaVA-1.5's square padding is exercised): smooth colours plus blocks."""
    from PIL import Image

    height, width = size, size * 3 // 2
    y, x = np.mgrid[0:height, 0:width]
    red = 255 * x / max(width - 1, 1)
    green = 255 * y / max(height - 1, 1)
    blue = 255 * ((x // max(size // 6, 1) + y // max(size // 6, 1)) % 2)
    return Image.fromarray(np.stack([red, green, blue], axis=-1).astype("uint8"))


# ===================================================================================== weights
def _read_mapped(files, rules, description: str, keep, dtype: Optional[torch.dtype], into: dict) -> Optional[torch.dtype]:
    """Add the tensors of `files` whose mapped name passes `keep` to `into`, cast to `dtype` as they are read
    (dtype None: the first floating tensor's dtype). Returns the dtype in use."""
    mapping = map_keys(read_keys(files), rules, description)
    for key, tensor in iter_tensors(files, description):
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


def read_converted_tensors(sources: Sources, dtype: Optional[torch.dtype]):
    """All mapped tensors in `dtype` (None: the LLaVA weights' dtype), keyed by QMoP names (the projector under
    the `@projector.` pseudo prefix). Returns (tensors, dtype)."""
    tensors = {}
    rules = LLAVA_HF_RULES if sources.layout == LLAVA_HF else ORIGINAL_RULES
    dtype = _read_mapped(sources.llava_files, rules, f"LLaVA ({sources.layout}) {sources.llava_dir}",
                         lambda target: True, dtype, tensors)
    dtype = dtype or torch.float32

    def from_clip(target: str) -> bool:  # the text tower always; the vision tower when LLaVA has none
        takes_vision = sources.vision_dir == sources.clip_dir and target.startswith("model.vision_tower.")
        return target.startswith("model.text_encoder.") or takes_vision

    _read_mapped(weight_files(sources.clip_dir), CLIP_TEXT_RULES + CLIP_VISION_RULES, f"CLIP {sources.clip_dir}",
                 from_clip, dtype, tensors)
    if sources.vision_dir is not None and sources.vision_dir != sources.clip_dir:
        _read_mapped(weight_files(sources.vision_dir), SEPARATE_VISION_RULES, f"vision tower {sources.vision_dir}",
                     lambda target: target.startswith("model.vision_tower."), dtype, tensors)
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


# ===================================================================================== verification
@torch.no_grad()
def run_checks(model, inputs, device: str, new_tokens: int):
    """(last-position-independent full logits in float32 on CPU, greedy continuation ids)."""
    model.to(device)
    batch = {k: v.to(device) for k, v in inputs.items()}
    logits = model(**batch).logits.float().cpu()  # (B, T, V)
    generated = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    return logits, generated[:, batch["input_ids"].shape[1] :].cpu()


def _model_inputs(processor, image, budget: int, for_llava: bool = False):
    encoded = processor(images=image, text=VERIFY_PROMPT, num_visual_tokens=budget)
    keys = ("input_ids", "attention_mask", "pixel_values") if for_llava else tuple(encoded.keys())
    return {k: encoded[k] for k in keys}


# ===================================================================================== model card
def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not os.path.exists(name)


MODEL_CARD_TAGS = ("qmop", "llava", "visual-token-compression", "mixture-of-projectors", "custom_code")


def conversion_command(settings: ConversionSettings) -> str:
    """The command line that reproduces a conversion (paths as given; no token)."""
    parts = ["python conversion/convert_llava_to_qmop.py", f"--llava {settings.llava}", f"--clip {settings.clip}"]
    if settings.vision_tower:
        parts.append(f"--vision-tower {settings.vision_tower}")
    parts += [f"--output {os.path.basename(os.path.abspath(settings.output))}",
              f"--num-visual-tokens {settings.num_visual_tokens}", "--branches " + " ".join(settings.branches),
              f"--dtype {settings.dtype}", f"--seed {settings.seed}"]
    parts += [f"--config-override {k}={json.dumps(v)}" for k, v in settings.config_overrides.items()]
    if settings.pad_to_square is not None:
        parts.append("--pad-to-square" if settings.pad_to_square else "--no-pad-to-square")
    return " \\\n    ".join(parts)


def model_card(settings: ConversionSettings, config: QMoPConfig, summary: dict, fresh_keys) -> str:
    """README.md with Hub metadata (pipeline_tag, library_name, base_model, tags), budget, branches, provenance,
    verification results, usage and citation. `summary`: layout, dtype and the two max abs diffs."""
    base = [settings.base_model] if settings.base_model else [n for n in (settings.llava, settings.clip) if _looks_like_hub_id(n)]
    front_matter = ["pipeline_tag: image-text-to-text", "library_name: transformers"]
    if base:
        front_matter += ["base_model:"] + [f"- {b}" for b in base]
    front_matter += ["tags:"] + [f"- {tag}" for tag in MODEL_CARD_TAGS]
    branches = ", ".join(config.branches)
    # model.projector.resampler_branch.layers.0.q_proj.weight -> resampler_branch.layers
    fresh = sorted({".".join(k.split(".")[2:4]) if "_branch." in k else k.split(".")[2] for k in fresh_keys})
    header = "---\n" + "\n".join(front_matter) + "\n---\n"
    return header + f"""
# QMoP-LLaVA ({config.num_visual_tokens} visual tokens; branches: {branches})

LLaVA-1.5 with a Query Guided Mixture-of-Projector: the {config.num_patches} CLIP patch tokens of each image are
compressed to **{config.num_visual_tokens} tokens** by the {branches} branch(es), mixed per image by a router that
reads the user's question through a CLIP text encoder.

Converted with `conversion/convert_llava_to_qmop.py` from `{settings.llava}` (layout: {summary['layout']}) and
the text tower of `{settings.clip}`; weights in {summary['dtype']}.

- Each branch's expert MLP is a copy of LLaVA's projector (`mlp2x_gelu`).
- Freshly initialised (seed {settings.seed}), i.e. **untrained**: {', '.join(f'`{name}`' for name in fresh) or 'nothing'}.
  Until QMoP's two training stages have run, LLaVA-1.5's quality is only to be expected at the full budget
  ({config.num_patches} tokens) with the pooling branch; other budgets and branches need training.
- Verified before saving: with {config.num_patches} tokens and the pooling branch only, the converted weights give
  the logits of transformers' `LlavaForConditionalGeneration` (max abs diff {summary['reference_max_abs_diff']:.3g});
  the saved folder reloads through `Auto*` with `trust_remote_code=True` (max abs diff {summary['reload_max_abs_diff']:.3g}).

Reproduce with:

```bash
{conversion_command(settings)}
```

## Usage

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained(REPO, trust_remote_code=True, dtype="auto")
processor = AutoProcessor.from_pretrained(REPO, trust_remote_code=True)
inputs = processor(images=image, text="USER: <image>\\nWhat is shown? ASSISTANT:")
out = model.generate(**inputs, max_new_tokens=32)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

## License

The weights inherit the licenses of the base models (LLaVA-1.5 / Vicuna: Llama 2 Community License; CLIP: MIT).

## Citation

```bibtex
@misc{{li2026qmop,
  title  = {{QMoP: Query Guided Mixture-of-Projector for Efficient Visual Token Compression}},
  author = {{Li, Zhongyang and Li, Yaqian and Fang, Faming and Takezoe, Rinyoichi and Bo, Zi-Hao and Qian, Cheng and Guang, Mo and Zhang, Guixu and Long, Kaiwen}},
  year   = {{2026}},
  eprint = {{2603.21232}},
  archivePrefix = {{arXiv}}
}}
@inproceedings{{liu2024improved,
  title     = {{Improved Baselines with Visual Instruction Tuning}},
  author    = {{Liu, Haotian and Li, Chunyuan and Li, Yuheng and Lee, Yong Jae}},
  booktitle = {{CVPR}},
  year      = {{2024}}
}}
```
"""


# ===================================================================================== the conversion
def _pause_if_requested(stage: str) -> None:
    """Testing hook: with QMOP_CONVERT_PAUSE_AFTER=<stage>, announce the stage and wait (to be killed)."""
    if os.environ.get(PAUSE_ENV) == stage:
        print(f"QMOP_CONVERT_PAUSED {stage}", flush=True)
        time.sleep(3600)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ConversionError(f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max())


# ===================================================================================== early checks
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# Set by the converter itself from the sources and the command line: not overridable through --config-override.
_CONVERTER_FIELDS = {
    "vision_config": "--llava / --vision-tower", "text_encoder_config": "--clip", "text_config": "--llava",
    "num_visual_tokens": "--num-visual-tokens", "branches": "--branches", "image_token_id": "the tokenizer",
    "vision_feature_layer": "--llava's config", "projector_hidden_act": "LLaVA-1.5's projector",
    "pad_to_square": "--pad-to-square",
}


def parse_shard_size(value) -> int:
    """`--max-shard-size`: bytes as an integer or a string such as "5GB", "500MB", "2GiB"."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(value), flags=re.IGNORECASE)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ConversionError(
                f"--max-shard-size {value!r} is not a size; expected a number of bytes or e.g. 5GB, 500MB, 2GiB."
            )
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 1:
        raise ConversionError(f"--max-shard-size {value!r} must be at least 1 byte.")
    return size


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_apart_from_sources(output: str, sources: dict) -> None:
    """--output may be neither a source folder, nor inside one, nor contain one: --overwrite would delete it."""
    real_output = os.path.realpath(output)
    for argument, source in sources.items():
        if not source or not os.path.exists(source):
            continue  # a Hub id: checked again once downloaded
        real_source = os.path.realpath(source)
        if _inside(real_output, real_source) or _inside(real_source, real_output):
            relation = "is" if real_output == real_source else ("is inside" if _inside(real_output, real_source) else "contains")
            raise ConversionError(
                f"--output {output} {relation} the {argument} checkpoint {source}; write the converted model to a "
                "separate folder (the source is never replaced or deleted)."
            )


def check_output_location(output: str, overwrite: bool) -> None:
    """The output must not exist (unless --overwrite), and its parent must be, or become, a writable folder."""
    if os.path.lexists(output) and not overwrite:
        raise ConversionError(f"--output {output} already exists; pass --overwrite to replace it.")
    ancestor = os.path.dirname(output)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConversionError(f"--output {output} is below {ancestor}, which is a file, not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConversionError(f"--output {output}: the folder {ancestor} is not writable.")


def check_config_overrides(overrides: dict, branches) -> None:
    """Every --config-override key is a QMoPConfig field the converter does not set itself, and the values make a
    valid config together with --branches (checked on a config with the default shapes)."""
    import difflib
    import inspect

    from transformers import PretrainedConfig

    fields = set(inspect.signature(QMoPConfig.__init__).parameters) - {"self", "kwargs"}
    fields |= set(PretrainedConfig().to_dict())
    for key in overrides:
        if key in _CONVERTER_FIELDS:
            raise ConversionError(
                f"--config-override {key}: set by the converter from {_CONVERTER_FIELDS[key]}, not overridable."
            )
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConversionError(f"--config-override {key}: not a QMoPConfig field.{hint}")
    try:
        QMoPConfig(branches=list(branches), num_visual_tokens=1, **overrides)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"--config-override: {error}") from error


def validate_settings(settings: ConversionSettings) -> None:
    """Every check that needs no checkpoint, before anything is downloaded, read or written."""
    output = os.path.abspath(settings.output)
    check_output_location(output, settings.overwrite)
    check_output_apart_from_sources(
        output, {"--llava": settings.llava, "--clip": settings.clip, "--vision-tower": settings.vision_tower}
    )
    if settings.dtype != "auto" and settings.dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {['auto', *DTYPES]}, got {settings.dtype!r}.")
    budget = settings.num_visual_tokens
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1 or math.isqrt(budget) ** 2 != budget:
        raise ValueError(f"--num-visual-tokens must be a positive perfect square (e.g. 64, 144), got {budget!r}.")
    parse_shard_size(settings.max_shard_size)
    if settings.verify_new_tokens < 1:
        raise ConversionError(f"--verify-new-tokens must be >= 1, got {settings.verify_new_tokens}.")
    if settings.atol is not None and not settings.atol >= 0:
        raise ConversionError(f"--atol must be >= 0, got {settings.atol}.")
    check_config_overrides(settings.config_overrides, settings.branches)


def _move_into_place(staging: str, output: str, workdir: str, replace: Optional[os.stat_result]) -> None:
    """Move the finished folder to --output. With --overwrite, only the very folder that existed at the start is
    replaced; anything that appeared at --output during the run is left alone, and the result is kept beside it."""
    if os.path.lexists(output):
        current = os.lstat(output)
        if replace is None or (current.st_ino, current.st_dev) != (replace.st_ino, replace.st_dev):
            kept = tempfile.mkdtemp(dir=os.path.dirname(output), prefix=f"{os.path.basename(output)}.converted-")
            os.replace(staging, os.path.join(kept, "checkpoint"))
            raise ConversionError(
                f"--output {output} appeared while converting (another process?) and was left untouched; the "
                f"verified conversion is in {os.path.join(kept, 'checkpoint')}."
            )
        os.replace(output, os.path.join(workdir, "replaced"))  # --overwrite: deleted with the work dir
    os.replace(staging, output)


def convert(settings: ConversionSettings) -> ConversionReport:
    """Run the whole conversion; see the module docstring. Raises ConversionError on any failed check."""
    output = os.path.abspath(settings.output)
    validate_settings(settings)
    replace = os.lstat(output) if os.path.lexists(output) else None  # what --overwrite may replace
    branches = list(settings.branches)

    sources = load_sources(settings)
    pad_to_square = settings.pad_to_square
    if pad_to_square is None:
        pad_to_square = sources.layout == ORIGINAL or bool(getattr(sources.image_processor, "do_pad", False))
    config = build_qmop_config(sources, settings.num_visual_tokens, branches, pad_to_square, settings.config_overrides)
    reference_config = build_qmop_config(sources, config.num_patches, ["pooling"], pad_to_square)
    processor = build_processor(sources, settings.num_visual_tokens, pad_to_square)
    image = verification_image(sources.vision_config.image_size)
    reference_inputs = _model_inputs(processor, image, config.num_patches, for_llava=True)
    reference_inputs_qmop = _model_inputs(processor, image, config.num_patches)
    inputs = _model_inputs(processor, image, config.num_visual_tokens)
    new_tokens = settings.verify_new_tokens

    # 1. transformers' LLaVA on fixed inputs (llava-hf: loaded by transformers itself, independent of our rules).
    requested_dtype = None if settings.dtype == "auto" else DTYPES[settings.dtype]
    llava_logits = llava_tokens = None
    if sources.layout == LLAVA_HF:
        from transformers import LlavaForConditionalGeneration

        logger.info("running the llava-hf reference (transformers' LlavaForConditionalGeneration)")
        llava = LlavaForConditionalGeneration.from_pretrained(sources.llava_dir, dtype=requested_dtype or "auto").eval()
        llava_logits, llava_tokens = run_checks(llava, reference_inputs, settings.device, new_tokens)
        llava = None
        gc.collect()

    # 2. map every weight.
    tensors, dtype = read_converted_tensors(sources, requested_dtype)
    atol = settings.atol if settings.atol is not None else DEFAULT_ATOL[dtype]
    if sources.layout == ORIGINAL:
        logger.info("running the LLaVA reference on the converted weights (original layout)")
        llava = assemble_llava_reference(sources, config, tensors)
        llava_logits, llava_tokens = run_checks(llava, reference_inputs, settings.device, new_tokens)
        llava = None
        gc.collect()

    # 3. the same weights as QMoP with all patches and pooling only must be LLaVA.
    reference, _ = assemble_qmop(reference_config, tensors, dtype, settings.seed)
    qmop_logits, qmop_tokens = run_checks(reference, reference_inputs_qmop, settings.device, new_tokens)
    reference = None
    gc.collect()
    reference_diff = _max_diff(qmop_logits, llava_logits)
    tokens_equal = bool(torch.equal(qmop_tokens, llava_tokens))
    print(f"reference check ({config.num_patches} tokens, pooling): max |logits - LLaVA logits| = {reference_diff:.3e} "
          f"(tolerance {atol:.0e}); greedy tokens equal: {tokens_equal}", flush=True)
    if not reference_diff <= atol or not tokens_equal:
        raise ConversionError(
            f"the converted model does not reproduce LLaVA: max abs logit diff {reference_diff:.3e} > {atol:.0e} "
            f"or greedy tokens differ ({qmop_tokens.tolist()} vs {llava_tokens.tolist()}). Nothing was written."
        )

    # 4. the requested model: forward and a short generation.
    model, fresh = assemble_qmop(config, tensors, dtype, settings.seed)
    del tensors
    model.generation_config = sources.generation_config
    logits, tokens = run_checks(model, inputs, settings.device, new_tokens)
    if not torch.isfinite(logits).all():
        raise ConversionError("the converted model produced non-finite logits.")
    generated_text = processor.batch_decode(tokens, skip_special_tokens=True)[0]
    print(f"requested model (M={config.num_visual_tokens}, branches={branches}): logits {tuple(logits.shape)}, "
          f"greedy {new_tokens} tokens: {generated_text!r}", flush=True)
    model.to("cpu")
    num_parameters = sum(p.numel() for p in model.parameters())

    # 5. write to a temporary folder, reload it through Auto*, then move it into place.
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output)}.incomplete-")
    staging = os.path.join(workdir, "checkpoint")
    try:
        logger.info("saving %.2f GB of weights to %s", num_parameters * torch.finfo(dtype).bits / 8 / 1e9, staging)
        model.save_pretrained(staging, max_shard_size=parse_shard_size(settings.max_shard_size))
        processor.save_pretrained(staging)
        model = None
        gc.collect()
        _pause_if_requested("saved")

        reload_diff = verify_saved(staging, image, inputs, logits, dtype, settings.device)
        print(f"reload check (Auto* with trust_remote_code): max |logits - before saving| = {reload_diff:.3e}", flush=True)
        if not reload_diff <= atol:
            raise ConversionError(f"the saved folder does not reproduce the converted model (diff {reload_diff:.3e}).")
        summary = {"layout": sources.layout, "dtype": str(dtype).replace("torch.", ""),
                   "reference_max_abs_diff": reference_diff, "reload_max_abs_diff": reload_diff}
        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(model_card(settings, config, summary, fresh))
        _pause_if_requested("verified")
        _move_into_place(staging, output, workdir, replace)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {output}", flush=True)

    pushed = push_folder(output, settings.push_to_hub, settings.private, settings.token) if settings.push_to_hub else None
    return ConversionReport(
        output=output, layout=sources.layout, dtype=str(dtype).replace("torch.", ""),
        reference_max_abs_diff=reference_diff, reference_tokens_equal=tokens_equal, reload_max_abs_diff=reload_diff,
        generated_text=generated_text, fresh_keys=fresh, num_parameters=num_parameters, pushed_to=pushed,
    )


@torch.no_grad()
def verify_saved(folder: str, image, inputs: dict, expected_logits: torch.Tensor, dtype: torch.dtype, device: str) -> float:
    """Reload `folder` as a user would and return the max abs logit difference on the same inputs. The reloaded
    processor must produce the same token ids as the one that was saved."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    reloaded_inputs = processor(images=image, text=VERIFY_PROMPT)
    for key, value in inputs.items():
        if not torch.equal(reloaded_inputs[key], value):
            raise ConversionError(f"the reloaded processor gives different {key!r} for the verification inputs.")
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval().to(device)
    batch = {k: v.to(device) for k, v in reloaded_inputs.items()}
    logits = model(**batch).logits.float().cpu()
    return _max_diff(logits, expected_logits)


def push_folder(folder: str, repo_id: str, private: bool, token: Optional[str]) -> str:
    """Upload a finished folder (weights, code, processor, card) in one commit."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    api.upload_folder(folder_path=folder, repo_id=repo_id, token=token, commit_message="Add QMoP-LLaVA converted from LLaVA-1.5")
    print(f"pushed {folder} to {repo_id}", flush=True)
    return repo_id
