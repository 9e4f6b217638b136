"""Argument checks shared by the command lines (train, demo, bench): run before any model is loaded or anything is
written, each error naming the argument, the value and what is expected."""

import json
import math
import os


def is_square_budget(value) -> bool:
    """A visual-token budget M: a positive integer (not a bool) that is a perfect square (the pooled grid is √M×√M)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1 and math.isqrt(value) ** 2 == value


def looks_like_hub_id(name: str) -> bool:
    """`name` is an OWNER/NAME repository id as huggingface_hub validates it, and not a local path (its first part is
    no existing folder here)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1 or os.path.exists(name.split("/")[0]):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def nearest_existing_ancestor(path: str) -> str:
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    return ancestor


def check_output_folder(path: str, argument: str) -> None:
    """`path` is, or can be created as, a writable folder (not an existing file, not below a file)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{argument} {path!r} is an existing file; expected a folder.")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{argument} {path!r} is not writable.")
        return
    ancestor = nearest_existing_ancestor(path)
    if not os.path.isdir(ancestor):
        raise ValueError(f"{argument} {path!r} is below {ancestor!r}, which is a file, not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{argument} {path!r}: the folder {ancestor!r} is not writable.")


def check_output_file(path: str, argument: str) -> None:
    """`path` is a file that can be written: not a folder, its folder creatable and writable."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{argument} {path!r} is a folder; expected a file path.")
    ancestor = nearest_existing_ancestor(path)
    if not os.path.isdir(ancestor):
        raise ValueError(f"{argument} {path!r} is below {ancestor!r}, which is a file, not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{argument} {path!r}: the folder {ancestor!r} is not writable.")


def local_model_type(path: str):
    """`model_type` of a local checkpoint folder's config.json, or None (Hub id, or no config)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path) as f:
        return json.load(f).get("model_type")


def require_qmop_checkpoint(path: str, argument: str, model_type=None) -> None:
    """A QMoP-LLaVA checkpoint (model_type "qmop_llava"); a LLaVA checkpoint gets the conversion command."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{argument} {path!r} is a file; expected a checkpoint folder or a Hub id.")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{argument} {path!r} has no config.json: not a model checkpoint folder.")
    model_type = model_type or local_model_type(path)
    if model_type is None or model_type == "qmop_llava":
        return
    hint = ""
    if model_type == "llava":
        hint = (" It is a LLaVA checkpoint: convert it first, e.g. `qmop convert "
                f"--llava {path} --clip openai/clip-vit-large-patch14-336 --output qmop-checkpoint` (docs/conversion.md).")
    raise ValueError(f"{argument} {path!r} is a {model_type!r} checkpoint, not QMoP-LLaVA ('qmop_llava').{hint}")
