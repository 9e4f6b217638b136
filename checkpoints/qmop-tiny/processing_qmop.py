# Copyright 2026 The QMoP-LLaVA authors. Licensed under the Apache License, Version 2.0.
"""QMoP-LLaVA processor: CLIP image processor, the LLM tokenizer and a CLIP tokenizer for the question.

    processor(images=..., text=..., queries=None, num_visual_tokens=None)
      -> input_ids, attention_mask            (B, T)   each `<image>` expanded to M placeholders, left padded
         pixel_values                         (N, 3, H, W)
         query_input_ids, query_attention_mask (N, ≤77) the question of the user turn holding each image

Decisions (shared/DESIGN.md sections 3-4):
- A prompt with images but no `<image>` at all gets one `<image>\\n` per image prepended (with a warning once);
  a prompt with some, but not as many as its images, is an error.
- The query is the user's question: for a raw prompt, the text of the user turn that holds the image, with
  image tokens and role markers removed; `queries=` overrides it. No question (captioning) = empty query.
- Questions longer than the CLIP context are truncated, with a warning once.
"""

import importlib
import json
import os
import re
import shutil
import sys
import tempfile
from io import BytesIO
from typing import Optional, Union

import numpy as np
import torch
import transformers
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, PretrainedConfig, ProcessorMixin
from transformers.processing_utils import ProcessingKwargs, Unpack
from transformers.utils import cached_file, logging

logger = logging.get_logger(__name__)

# ===================================================================================== transformers versions
# The only place that branches on the transformers version. 4.x finds sub-processors through `*_class`
# attributes; 5.x reads the __init__ signature and logs a deprecation for `image_processor_class`.
TRANSFORMERS_V5 = int(transformers.__version__.split(".")[0]) >= 5

# llava-hf's llava-1.5 chat template: "USER: <image>\n{question} ASSISTANT:" (no system prompt), except that an answer
# ends with the EOS token, as in LLaVA-1.5's own conversations ("ASSISTANT: {answer}</s>USER: ..."), inside the
# `{% generation %}` block: training on the assistant tokens (TRL's assistant_only_loss, prompt/completion) then
# teaches the model to stop. Prompts for generation (add_generation_prompt) are llava-hf's.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% generation %}"
    "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}{{ eos_token }}"
    "{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QUERY_TOKENIZER_SUBFOLDER = "query_tokenizer"
PROCESSOR_CONFIG_NAME = "processor_config.json"
# ProcessorMixin's chat-template files: the default template, named extra templates, the pre-jinja JSON file.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"
# ProcessorMixin's optional outputs for multimodal training tools (TRL's assistant masks, mm-token type ids).
_EXTRA_OUTPUTS = ("return_mm_token_type_ids", "return_text_replacement_offsets")
_SETTINGS = ("num_visual_tokens", "image_token", "patch_size", "pad_to_square", "query_max_length", "caption_prompt")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "trust_remote_code", "proxies")
# Role markers of the llava-1.5 / vicuna-v1 prompts: a turn runs from its marker to the next one.
# A marker follows the start, white space or a special token ("...</s>USER:").
_ROLE_MARKER = re.compile(r"(?:^|\s|(?<=>))(USER|ASSISTANT|SYSTEM|HUMAN|GPT)\s*:", re.IGNORECASE)

ImageInput = Union["PIL.Image.Image", np.ndarray, torch.Tensor, str, bytes]  # noqa: F821


class QMoPProcessorKwargs(ProcessingKwargs, total=False):
    """Keyword arguments of `QMoPProcessor.__call__`, routed by ProcessorMixin to the image processor (`do_normalize`,
    `size`, ...) or to the LLM tokenizer (`padding`, `padding_side`, `truncation`, `max_length`, ...). (The
    per-call overrides `num_visual_tokens` / `pad_to_square` of the processor's own settings are taken by
    `QMoPProcessor.__call__` before routing.)"""

    _defaults = {
        "text_kwargs": {"padding": True, "return_token_type_ids": False},
        "common_kwargs": {"return_tensors": "pt"},
    }


def _to_pil_rgb(image, index: int):
    """PIL RGB image from a PIL image, an array (HW, HWC or CHW with 1, 3 or 4 channels), a tensor, raw bytes, a
    path, a URL or base64 data. Anything else, or a source that cannot be read, is an error naming `images`."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(image, (bytes, bytearray)):
            image = Image.open(BytesIO(image))
            image.load()
        elif isinstance(image, str):
            image = _load_image_string(image, index)
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            image = _array_to_pil(image, index)
    except (UnidentifiedImageError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"`images`: image {index} could not be decoded (corrupt or unsupported bytes): {error}") from error
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"`images`: image {index} has unsupported type {type(image).__name__}; pass PIL images, numpy arrays, "
            "tensors, bytes, paths or URLs."
        )
    if image.width < 1 or image.height < 1:
        raise ValueError(f"`images`: image {index} is empty ({image.width}x{image.height}).")
    return image.convert("RGB")  # grayscale, palette, RGBA (alpha dropped, as LLaVA does), CMYK


def _load_image_string(source: str, index: int):
    """A local path, an http(s) URL or base64 data; a missing file or an unreachable URL is named as such."""
    from transformers.image_utils import load_image

    if source.startswith(("http://", "https://")):
        try:
            return load_image(source)
        except Exception as error:  # noqa: BLE001 - requests/httpx raise many kinds; all mean "not fetched"
            raise ValueError(f"`images`: image {index} could not be fetched from the URL {source!r}: {error}") from error
    if os.path.isfile(source):
        return load_image(source)
    if os.path.isdir(source):
        raise ValueError(f"`images`: image {index} is the folder {source!r}; pass an image file.")
    try:
        return load_image(source)  # base64 data (with or without a data: prefix)
    except Exception:  # noqa: BLE001 - not base64 either: report the most likely mistake, a wrong path
        raise FileNotFoundError(
            f"`images`: image {index} is the string {source[:200]!r}, which is not an existing file, an http(s) URL "
            "or base64 image data."
        ) from None


def _array_to_pil(array, index: int):
    """A PIL image from an HW / HWC / CHW array or tensor: uint8 values in [0, 255], or floats in [0, 1]."""
    from PIL import Image

    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.is_floating_point() and array.dtype != torch.float64:
            array = array.float()  # bfloat16 / float16 have no numpy equivalent that PIL reads
        array = array.numpy()
    shape = tuple(array.shape)
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"`images`: image {index} is an array of shape {shape}; expected (height, width), (height, width, C) "
            "or (C, height, width) with C = 1, 3 or 4."
        )
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"`images`: image {index} is an array of dtype {array.dtype}; expected uint8 or float.")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"`images`: image {index} holds NaN or infinite values.")
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError(
                f"`images`: image {index} is a float array with values in [{array.min():.3g}, {array.max():.3g}]; "
                "float images must lie in [0, 1] (or pass uint8 values in [0, 255])."
            )
        array = np.round(array * 255.0)
    elif array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(
            f"`images`: image {index} is an integer array with values in [{array.min()}, {array.max()}]; expected [0, 255]."
        )
    array = np.ascontiguousarray(array.astype(np.uint8))
    mode = "L" if array.shape[-1] == 1 else "RGB"
    return Image.fromarray(array[:, :, 0] if mode == "L" else array)  # L, RGB or RGBA from the shape


def expand_to_square(image, background: tuple):
    """LLaVA-1.5's `expand2square`: pad the shorter side, centred, with the image mean colour."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def extract_question(prompt: str, image_token: str, occurrence: int = 0) -> str:
    """The text of the user turn that holds image number `occurrence` of `prompt`, without image tokens or
    role markers; the whole prompt (without image tokens) when it has no role markers."""
    markers = list(_ROLE_MARKER.finditer(prompt))
    if not markers:
        turn = prompt
    else:
        spans = [(m.group(1).upper(), m.end(), nxt.start() if nxt else len(prompt))
                 for m, nxt in zip(markers, markers[1:] + [None])]
        image_positions = [m.start() for m in re.finditer(re.escape(image_token), prompt)]
        position = image_positions[occurrence] if occurrence < len(image_positions) else None
        turn = next((prompt[s:e] for role, s, e in spans if position is not None and s <= position < e), None)
        if turn is None:  # image before any marker: take the first user turn
            turn = next((prompt[s:e] for role, s, e in spans if role in ("USER", "HUMAN")), prompt)
    return " ".join(turn.replace(image_token, " ").split())


def _holds_media(value) -> bool:
    """Whether a `videos` / `audio` argument holds anything. None, empty lists and lists of empty lists (media
    gathered per prompt, as evaluation harnesses pass them) hold nothing, as transformers' LlavaProcessor reads them."""
    if isinstance(value, (list, tuple)):
        return any(_holds_media(item) for item in value)
    return value is not None


def _check_queries(queries) -> None:
    """`queries` is None, a string, or a list of strings (None or "" = no question for that image)."""
    if queries is None or isinstance(queries, str):
        return
    if not isinstance(queries, (list, tuple)) or not all(q is None or isinstance(q, str) for q in queries):
        raise TypeError(
            f"`queries` must be a string or a list of strings (one per image or one per prompt), got {queries!r:.200}."
        )


class QMoPProcessor(ProcessorMixin):
    r"""Processor for QMoP-LLaVA.

    Args:
        image_processor: CLIP image processor of the vision tower.
        tokenizer: the language model's tokenizer; must know `image_token` as a single (special) token.
        query_tokenizer: the CLIP tokenizer of the query encoder (saved in `query_tokenizer/`).
        chat_template (`str`, *optional*): defaults to llava-hf's llava-1.5 template.
        num_visual_tokens (`int`, defaults to 144): placeholders per image (the model's budget M).
        image_token (`str`, defaults to `"<image>"`).
        patch_size (`int`, defaults to 14): the vision tower's patch, to check that M fits the patch grid.
        pad_to_square (`bool`, defaults to `False`): LLaVA-1.5's `expand2square` before the image processor.
        query_max_length (`int`, defaults to 77): CLIP context; longer questions are truncated (warning once).
        caption_prompt (`str`): LLM prompt used when images come without text (captioning, empty query).
    """

    attributes = ["image_processor", "tokenizer", "query_tokenizer"]
    valid_processor_kwargs = QMoPProcessorKwargs
    if not TRANSFORMERS_V5:
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"
        query_tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        query_tokenizer=None,
        chat_template: Optional[str] = None,
        num_visual_tokens: int = 144,
        image_token: str = "<image>",
        patch_size: int = 14,
        pad_to_square: bool = False,
        query_max_length: int = 77,
        caption_prompt: str = "USER: <image>\n ASSISTANT:",
        **kwargs,
    ):
        if image_processor is None or tokenizer is None or query_tokenizer is None:
            raise ValueError("QMoPProcessor needs an image_processor, a tokenizer and a query_tokenizer.")
        self.num_visual_tokens = num_visual_tokens
        self.image_token = image_token
        self.patch_size = patch_size
        self.pad_to_square = pad_to_square
        self.query_max_length = query_max_length
        self.caption_prompt = caption_prompt
        tokenizer.padding_side = "left"  # batched generation (decoder-only models continue on the right)
        query_tokenizer.padding_side = "right"  # CLIP pools at the first EOS: padding must come after it
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no single token for the image placeholder {image_token!r}.")
        self.image_token_id = image_token_id
        super().__init__(image_processor, tokenizer, query_tokenizer, chat_template=chat_template or LLAVA_15_CHAT_TEMPLATE)

    # ---------------------------------------------------------------------------------------- budget
    @property
    def num_patches(self) -> int:
        crop = getattr(self.image_processor, "crop_size", None) or self.image_processor.size
        side = crop if isinstance(crop, int) else crop.get("height") or crop.get("shortest_edge")  # dict / SizeDict
        return (int(side) // self.patch_size) ** 2

    def _check_budget(self, num_visual_tokens) -> int:
        if not isinstance(num_visual_tokens, int) or isinstance(num_visual_tokens, bool) or num_visual_tokens < 1:
            raise ValueError(f"`num_visual_tokens` must be a positive integer, got {num_visual_tokens!r}.")
        side = int(round(num_visual_tokens**0.5))
        if side * side != num_visual_tokens:
            raise ValueError(f"`num_visual_tokens`={num_visual_tokens} is not a perfect square (e.g. 36, 64, 144).")
        if num_visual_tokens > self.num_patches:
            raise ValueError(
                f"`num_visual_tokens`={num_visual_tokens} is larger than the vision tower's {self.num_patches} patches."
            )
        return num_visual_tokens

    # ---------------------------------------------------------------------------------------- call
    def __call__(self, images=None, text=None, queries=None, **kwargs: Unpack[QMoPProcessorKwargs]) -> BatchFeature:
        """Keyword arguments (see [`QMoPProcessorKwargs`]): `num_visual_tokens` / `pad_to_square` for this call, and
        what ProcessorMixin routes: image-processor arguments to the image processor, tokenizer arguments to the LLM
        tokenizer (defaults: `padding=True`, the tokenizer's left padding side, `return_tensors="pt"`). The question
        rows are padded to the longest question, or to `query_max_length` with `padding="max_length"`, so that
        mapped datasets collate. Empty `videos` / `audio` (as evaluation harnesses pass; `audios` is the name
        lmms-eval uses) are accepted.

        As ProcessorMixin's outputs: `return_mm_token_type_ids=True` adds `mm_token_type_ids` (1 on placeholders, 0
        elsewhere) and `return_text_replacement_offsets=True` adds `text_replacement_offsets` (per prompt, where each
        `<image>` was expanded to M placeholders), which `apply_chat_template(..., return_assistant_tokens_mask=True)`
        needs to put `assistant_masks` on the answer tokens of the expanded text (TRL's `assistant_only_loss`)."""
        for modality in ("videos", "audio", "audios"):
            if _holds_media(kwargs.pop(modality, None)):
                raise ValueError(f"QMoPProcessor handles images and text only; got `{modality}`.")
        num_visual_tokens = kwargs.pop("num_visual_tokens", None)
        pad_to_square = kwargs.pop("pad_to_square", None)
        extra_outputs = {name: kwargs.pop(name, None) for name in _EXTRA_OUTPUTS}  # not tokenizer arguments
        _check_queries(queries)
        budget = self._check_budget(self.num_visual_tokens if num_visual_tokens is None else num_visual_tokens)
        pad_to_square = self.pad_to_square if pad_to_square is None else pad_to_square
        output_kwargs = self._merge_kwargs(QMoPProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, images_kwargs = output_kwargs["text_kwargs"], output_kwargs["images_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        text_kwargs.setdefault("return_token_type_ids", False)
        for name in _EXTRA_OUTPUTS:  # given directly, in text_kwargs, or as a class default (transformers 5.x)
            from_text_kwargs = text_kwargs.pop(name, None)
            value = extra_outputs[name] if extra_outputs[name] is not None else from_text_kwargs
            extra_outputs[name] = bool(getattr(self, name, False) if value is None else value)

        texts, per_sample_images = self._pair(images, text)
        prompts, query_texts, replacement_offsets = [], [], []
        for i, (prompt, sample_images) in enumerate(zip(texts, per_sample_images)):
            placeholders = prompt.count(self.image_token)
            prefix = ""
            if sample_images and placeholders == 0:
                logger.warning_once(
                    f"A prompt has images but no {self.image_token!r}: one {self.image_token!r} per image was "
                    "prepended. Use the chat template (processor.apply_chat_template) to place images."
                )
                prefix = f"{self.image_token}\n" * len(sample_images)
                placeholders = len(sample_images)
            if placeholders != len(sample_images):
                raise ValueError(
                    f"Prompt {i} has {placeholders} {self.image_token!r} placeholder(s) but {len(sample_images)} "
                    "image(s) were given for it."
                )
            query_texts += [extract_question(prefix + prompt, self.image_token, k) for k in range(placeholders)]
            expanded, offsets = self._expand_placeholders(prompt, prefix, budget)
            prompts.append(expanded)
            replacement_offsets.append(offsets)

        query_texts = self._queries(queries, query_texts, per_sample_images)
        encoding = self.tokenizer(prompts, return_tensors=return_tensors, **text_kwargs)
        for i, sample_images in enumerate(per_sample_images):
            found = sum(1 for t in encoding["input_ids"][i] if int(t) == self.image_token_id)
            if found != len(sample_images) * budget:
                raise ValueError(
                    f"Prompt {i} tokenized to {found} image placeholders instead of {len(sample_images)}x{budget}: "
                    f"the tokenizer must keep {self.image_token!r} as one special token."
                )
        data = dict(encoding)
        if extra_outputs["return_mm_token_type_ids"]:
            data["mm_token_type_ids"] = [[int(int(t) == self.image_token_id) for t in row] for row in encoding["input_ids"]]

        flat_images = [image for sample_images in per_sample_images for image in sample_images]
        if flat_images:
            pil_images = [_to_pil_rgb(image, k) for k, image in enumerate(flat_images)]
            if pad_to_square:
                mean = getattr(self.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
                background = tuple(int(round(255 * c)) for c in mean)
                pil_images = [expand_to_square(image, background) for image in pil_images]
            # RGB PIL images, channels last: said explicitly so a 1x1 or 3-pixel-wide image is not misread.
            images_kwargs.update(return_tensors="pt")
            images_kwargs.setdefault("input_data_format", "channels_last")
            data["pixel_values"] = self.image_processor(pil_images, **images_kwargs)["pixel_values"]
            data.update(self._tokenize_queries(query_texts, max_length_padding=text_kwargs.get("padding") == "max_length"))
        output = BatchFeature(data=data, tensor_type=return_tensors)
        if extra_outputs["return_text_replacement_offsets"]:
            output["text_replacement_offsets"] = replacement_offsets  # plain lists: never converted to tensors
        return output

    def _expand_placeholders(self, prompt: str, prefix: str, budget: int) -> tuple[str, list]:
        """`prefix + prompt` with every `<image>` repeated `budget` times, and where each replacement lies, in
        ProcessorMixin's `text_replacement_offsets` format: `span` in `prompt` (a prepended `prefix` is a replacement
        of the empty span (0, 0)), `new_span` in the expanded text."""
        expanded_token = self.image_token * budget
        pieces, offsets, cursor, new_length = [], [], 0, 0
        if prefix:
            expanded_prefix = prefix.replace(self.image_token, expanded_token)
            pieces.append(expanded_prefix)
            offsets.append({"type": "image", "span": (0, 0), "new_span": (0, len(expanded_prefix)), "text": "",
                            "replacement": expanded_prefix})
            new_length = len(expanded_prefix)
        for match in re.finditer(re.escape(self.image_token), prompt):
            start, end = match.span()
            pieces.append(prompt[cursor:start])
            new_start = new_length + start - cursor
            pieces.append(expanded_token)
            offsets.append({"type": "image", "span": (start, end), "new_span": (new_start, new_start + len(expanded_token)),
                            "text": self.image_token, "replacement": expanded_token})
            new_length = new_start + len(expanded_token)
            cursor = end
        pieces.append(prompt[cursor:])
        return "".join(pieces), offsets

    def _pair(self, images, text):
        """Normalise to (list of prompts, list of per-prompt image lists)."""
        if isinstance(text, str):
            texts = [text]
        elif text is None:
            texts = None
        elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            texts = list(text)
        else:
            raise TypeError("`text` must be a string or a list of strings.")

        if images is None:
            if texts is None:
                raise ValueError("Pass `images`, `text` or both.")
            return texts, [[] for _ in texts]
        nested = isinstance(images, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in images)
        if nested:
            groups = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
        else:
            flat = list(images) if isinstance(images, (list, tuple)) else [images]
            groups = None
        if texts is None or all(not t.strip() for t in texts):  # captioning: image(s) only
            groups = groups or [[image] for image in flat]
            if texts is not None and len(texts) != len(groups):
                raise ValueError(f"{len(texts)} prompts but {len(groups)} images (or image groups).")
            return [self.caption_prompt.replace(self.image_token, self.image_token * len(g)) for g in groups], groups
        if groups is not None:
            if len(groups) != len(texts):
                raise ValueError(f"{len(texts)} prompts but {len(groups)} image groups: give one group per prompt.")
            return texts, groups
        counts = [t.count(self.image_token) for t in texts]
        if sum(counts) == len(flat):  # images fill the placeholders in order
            groups, start = [], 0
            for count in counts:
                groups.append(flat[start : start + count])
                start += count
            return texts, groups
        if sum(counts) == 0 and len(flat) == len(texts):  # one image per prompt, placeholders to prepend
            return texts, [[image] for image in flat]
        raise ValueError(
            f"{len(flat)} images for {len(texts)} prompts holding {sum(counts)} {self.image_token!r} placeholders: "
            "the batch sizes disagree. Pass one image per placeholder, or nested lists (one list per prompt)."
        )

    def _queries(self, queries, extracted, per_sample_images):
        if queries is None:
            return extracted
        if isinstance(queries, str):
            queries = [queries]
        queries = list(queries)
        if len(queries) == len(extracted):  # one per image
            return [q or "" for q in queries]
        if len(queries) == len(per_sample_images):  # one per prompt, shared by its images
            return [q or "" for q, images in zip(queries, per_sample_images) for _ in images]
        raise ValueError(
            f"`queries` has {len(queries)} entries; give one per image ({len(extracted)}) or one per prompt "
            f"({len(per_sample_images)})."
        )

    def _tokenize_queries(self, query_texts, max_length_padding: bool = False):
        lengths = [len(ids) for ids in self.query_tokenizer(query_texts, add_special_tokens=True)["input_ids"]]
        if max(lengths) > self.query_max_length:
            logger.warning_once(
                f"A question is longer than the CLIP text encoder's {self.query_max_length} tokens "
                f"({max(lengths)}); it was truncated for the router."
            )
        encoded = self.query_tokenizer(
            query_texts,
            padding="max_length" if max_length_padding else True,
            truncation=True,
            max_length=self.query_max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"query_input_ids": encoded["input_ids"], "query_attention_mask": encoded["attention_mask"]}

    # ---------------------------------------------------------------------------------------- decoding
    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "query_input_ids", "query_attention_mask"]

    # ---------------------------------------------------------------------------------------- save / load
    def _processor_dict(self) -> dict:
        return {
            "processor_class": type(self).__name__,
            "auto_map": {"AutoProcessor": "processing_qmop.QMoPProcessor"},
            "num_visual_tokens": self.num_visual_tokens,
            "image_token": self.image_token,
            "patch_size": self.patch_size,
            "pad_to_square": self.pad_to_square,
            "query_max_length": self.query_max_length,
            "caption_prompt": self.caption_prompt,
        }

    def save_pretrained(self, save_directory, push_to_hub: bool = False, save_jinja_files: bool = True, **kwargs):
        """Same layout on transformers 4.57 and 5.x: image processor and LLM tokenizer at the root, the CLIP
        tokenizer in `query_tokenizer/`, `processor_config.json`, the chat template and this code file. The chat
        template is written as ProcessorMixin does: `chat_template.jinja` plus `additional_chat_templates/<name>.jinja`
        for named templates, or, with `save_jinja_files=False`, the legacy `chat_template.json` (one template only).
        Written to a temporary folder first, then moved into place."""
        if not save_jinja_files and isinstance(self.chat_template, dict) and len(self.chat_template) > 1:
            raise ValueError("Several chat templates cannot be saved in the legacy `chat_template.json`; "
                             "use `save_jinja_files=True`.")
        save_directory = str(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=save_directory, prefix=".tmp-processor-") as tmp:
            self.image_processor.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp, **({} if save_jinja_files else {"save_jinja_files": False}))
            self.query_tokenizer.save_pretrained(os.path.join(tmp, QUERY_TOKENIZER_SUBFOLDER))
            with open(os.path.join(tmp, PROCESSOR_CONFIG_NAME), "w") as f:
                json.dump(self._processor_dict(), f, indent=2, sort_keys=True)
            templates = self.chat_template if isinstance(self.chat_template, dict) else {"default": self.chat_template}
            if not save_jinja_files:
                with open(os.path.join(tmp, LEGACY_CHAT_TEMPLATE_FILE), "w") as f:
                    json.dump({"chat_template": templates["default"]}, f, indent=2)
                templates = {}
            for name, template in templates.items():
                if not name or os.path.basename(name) != name or name in (".", ".."):
                    raise ValueError(f"Chat template name {name!r} is not a plain file name.")  # ProcessorMixin's layout for one or several named templates
                path = os.path.join(tmp, CHAT_TEMPLATE_FILE if name == "default" else f"{CHAT_TEMPLATE_DIR}/{name}.jinja")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(template)
            shutil.copy(os.path.abspath(__file__).replace(".pyc", ".py"), os.path.join(tmp, "processing_qmop.py"))
            _make_portable(tmp)
            _make_portable(os.path.join(tmp, QUERY_TOKENIZER_SUBFOLDER))
            _point_at_processor(tmp)
            move_into(tmp, save_directory)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(save_directory))
            return self.push_to_hub(repo_id, **kwargs)
        return [os.path.join(save_directory, PROCESSOR_CONFIG_NAME)]  # as ProcessorMixin: the processor's config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load the three components and the settings. Keyword arguments: Hub arguments (`revision`, `token`, ...),
        the processor's settings (`num_visual_tokens`, `chat_template`, ...), and anything else for the components,
        as ProcessorMixin does (e.g. `do_normalize=False` for the image processor, `use_fast` for the tokenizers).
        The chat template is read from `chat_template.jinja` (plus named templates in `additional_chat_templates/`),
        or from a legacy `chat_template.json`."""
        kwargs = dict(kwargs)
        hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        subfolder = kwargs.pop("subfolder", None) or ""
        overrides = {k: kwargs.pop(k) for k in (*_SETTINGS, "chat_template") if k in kwargs}
        component_kwargs = kwargs  # what is left goes to the components, as in ProcessorMixin
        # The sub-processors are standard classes: no remote code unless the caller allows it explicitly.
        hub.setdefault("trust_remote_code", False)
        path = str(pretrained_model_name_or_path)
        file_hub = {k: v for k, v in hub.items() if k != "trust_remote_code"}
        settings = _read_processor_settings(path, subfolder, file_hub)
        for key in ("processor_class", "auto_map"):
            settings.pop(key, None)
        image_processor = AutoImageProcessor.from_pretrained(path, subfolder=subfolder, **hub, **component_kwargs)
        tokenizer_kwargs = dict(component_kwargs)
        if not hub["trust_remote_code"]:
            # AutoTokenizer reads the folder's model config, whose `qmop_llava` type needs remote code; refused, it
            # falls back to a plain config with a warning that the checkpoint may not fit. The tokenizer class comes
            # from tokenizer_config.json either way: give it the plain config at once.
            tokenizer_kwargs.setdefault("config", PretrainedConfig())
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder=subfolder, **hub, **tokenizer_kwargs)
        query_tokenizer = AutoTokenizer.from_pretrained(
            path, subfolder=f"{subfolder}/{QUERY_TOKENIZER_SUBFOLDER}" if subfolder else QUERY_TOKENIZER_SUBFOLDER,
            **hub, **tokenizer_kwargs,
        )
        template = cls._load_chat_template(path, subfolder, file_hub)
        if template is not None:
            settings["chat_template"] = template
        settings.update(overrides)
        return cls(image_processor=image_processor, tokenizer=tokenizer, query_tokenizer=query_tokenizer, **settings)

    @staticmethod
    def _load_chat_template(path: str, subfolder: str, file_hub: dict):
        """The chat template: a string, or a dict of named templates ("default" first) as ProcessorMixin keeps them."""

        def read(name):
            try:
                found = cached_file(path, name, subfolder=subfolder, **file_hub)
            except OSError:
                found = None
            if not found:
                return None
            with open(found) as f:
                return f.read()

        default = read(CHAT_TEMPLATE_FILE)
        if default is None:
            legacy = read(LEGACY_CHAT_TEMPLATE_FILE)
            default = json.loads(legacy)["chat_template"] if legacy is not None else None
        local = os.path.join(path, subfolder, CHAT_TEMPLATE_DIR)
        if os.path.isdir(os.path.join(path, subfolder)):
            names = [n[: -len(".jinja")] for n in sorted(os.listdir(local)) if n.endswith(".jinja")] if os.path.isdir(local) else []
        else:
            from transformers.utils.hub import list_repo_templates

            listed = list_repo_templates(
                path, local_files_only=bool(file_hub.get("local_files_only")), revision=file_hub.get("revision"),
                cache_dir=file_hub.get("cache_dir"), token=file_hub.get("token"),
            )
            names = sorted(n.rsplit("/", 1)[-1].removesuffix(".jinja") for n in listed)
        if not names:
            return default
        templates = {"default": default} if default is not None else {}
        templates.update({name: read(f"{CHAT_TEMPLATE_DIR}/{name}.jinja") for name in names})
        return templates


def _optional_file(path: str, name: str, subfolder: str, file_hub: dict) -> Optional[str]:
    try:
        return cached_file(path, name, subfolder=subfolder, **file_hub)
    except OSError:
        return None


def _read_processor_settings(path: str, subfolder: str, file_hub: dict) -> dict:
    """processor_config.json; without it (a folder copied without that file), the budget and image settings of the
    model's config.json, with a warning. Neither: an error naming the folder."""
    config_file = _optional_file(path, PROCESSOR_CONFIG_NAME, subfolder, file_hub)
    if config_file is not None:
        with open(config_file) as f:
            return json.load(f)
    model_config_file = _optional_file(path, "config.json", subfolder, file_hub)
    if model_config_file is None:
        raise OSError(
            f"{path} has no {PROCESSOR_CONFIG_NAME} and no config.json: it is not a QMoP-LLaVA processor folder "
            "(save one with QMoPProcessor.save_pretrained)."
        )
    with open(model_config_file) as f:
        model_config = json.load(f)
    settings = {key: model_config[key] for key in ("num_visual_tokens", "pad_to_square", "query_max_length") if key in model_config}
    patch_size = (model_config.get("vision_config") or {}).get("patch_size")
    if patch_size:
        settings["patch_size"] = patch_size
    logger.warning(
        f"{path} has no {PROCESSOR_CONFIG_NAME}; the processor settings were taken from config.json ({settings}). "
        "Save the processor again (processor.save_pretrained) to write the file."
    )
    return settings


def _point_at_processor(folder: str) -> None:
    """Name QMoPProcessor in the image processor and tokenizer configs too, so that AutoProcessor finds it even in a
    copy of the folder without processor_config.json (instead of returning a bare tokenizer)."""
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        config_path = os.path.join(folder, name)
        if not os.path.exists(config_path):
            continue
        with open(config_path) as f:
            config = json.load(f)
        config["processor_class"] = "QMoPProcessor"
        config["auto_map"] = dict(config.get("auto_map") or {}, AutoProcessor="processing_qmop.QMoPProcessor")
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)


def move_into(source_dir: str, target_dir: str) -> None:
    """Move every file of `source_dir` into `target_dir` (same file system), replacing files of the same name."""
    for root, _, files in os.walk(source_dir):
        for name in files:
            source = os.path.join(root, name)
            target = os.path.join(target_dir, os.path.relpath(source, source_dir))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(source, target)


def _make_portable(folder: str) -> None:
    """Version shims for files written by transformers 5.x, so that 4.57 reads them too: a generic fast tokenizer
    is saved as "TokenizersBackend" (unknown to 4.x) and, without torchvision, the image processor as "...Pil"."""
    tokenizer_config = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(tokenizer_config):
        with open(tokenizer_config) as f:
            config = json.load(f)
        if config.get("tokenizer_class") == "TokenizersBackend":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            with open(tokenizer_config, "w") as f:
                json.dump(config, f, indent=2)
    image_config = os.path.join(folder, "preprocessor_config.json")
    if os.path.exists(image_config):
        with open(image_config) as f:
            config = json.load(f)
        kind = config.get("image_processor_type", "")
        if kind.endswith("Pil") or kind.endswith("Fast"):
            config["image_processor_type"] = kind[: -len("Pil")] if kind.endswith("Pil") else kind[: -len("Fast")]
            with open(image_config, "w") as f:
                json.dump(config, f, indent=2)


def _bind_module_to_its_package() -> None:
    """Make this module's classes picklable by reference when it runs as remote code.

    transformers executes remote code as `transformers_modules.<repo>.<revision>.processing_qmop` in `sys.modules` but
    does not bind it on its parent package, so pickle-by-name lookups (`getattr(package, "processing_qmop")`, as dill
    does) fail. dill, which datasets uses to fingerprint `dataset.map(...)` functions, then serialises the class by
    value, which recurses, and datasets falls back to a random fingerprint: no caching. Binding the module, as the
    import system does for ordinary imports, gives the processor a stable fingerprint."""
    package_name, _, child = __name__.rpartition(".")
    module = sys.modules.get(__name__)
    if not package_name.startswith("transformers_modules") or module is None:
        return
    try:
        package = importlib.import_module(package_name)
    except ImportError:
        return
    if getattr(package, child, None) is not module:
        setattr(package, child, module)


_bind_module_to_its_package()

__all__ = ["QMoPProcessor", "extract_question", "expand_to_square", "move_into"]
