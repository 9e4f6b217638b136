"""What one conversion is asked to do (`ConversionSettings`), what it found (`ConversionReport`), the error every
failed check raises (`ConversionError`), and the checks that need no checkpoint: settings values, the output
location, `--max-shard-size` and `--config-override`. They all run before anything is downloaded, read or written.
"""

import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from configuration_qmop import BRANCH_ORDER, QMoPConfig
from qmop_tools.checks import is_square_budget

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Reference check tolerance on max |logit difference| when --atol is not given. Both models run the same
# operations in the same order, so float32 is expected to agree to rounding; half precision gets more room.
DEFAULT_ATOL = {torch.float32: 1e-5, torch.float16: 5e-2, torch.bfloat16: 5e-2}


class ConversionError(RuntimeError):
    """The inputs cannot be converted, or the converted model failed a check."""


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
    quiet: bool = False  # no progress bars (without it, bars are drawn only when stderr is a terminal)


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
    if not is_square_budget(budget):
        raise ValueError(f"--num-visual-tokens must be a positive perfect square (e.g. 64, 144), got {budget!r}.")
    parse_shard_size(settings.max_shard_size)
    if settings.verify_new_tokens < 1:
        raise ConversionError(f"--verify-new-tokens must be >= 1, got {settings.verify_new_tokens}.")
    if settings.atol is not None and not settings.atol >= 0:
        raise ConversionError(f"--atol must be >= 0, got {settings.atol}.")
    check_config_overrides(settings.config_overrides, settings.branches)
