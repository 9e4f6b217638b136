"""Which checkpoint a resumed run starts from: the last *complete* `checkpoint-N` of the output folder.

A run killed while the Trainer writes `checkpoint-N` leaves that folder half-written. The Trainer writes
`trainer_state.json` last, so a checkpoint is complete when that file parses (with global step N) and every weight
file it holds can be opened. `--resume_from_checkpoint true` skips incomplete checkpoints with a warning and takes
the last complete one; an explicit path to an incomplete checkpoint is an error naming what is missing.
"""

import json
import logging
import os
import re
from typing import Optional

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def checkpoint_problem(folder: str) -> Optional[str]:
    """None for a complete checkpoint folder, else what is wrong with it."""
    if not os.path.isdir(folder):
        return "not a folder"
    state_path = os.path.join(folder, "trainer_state.json")
    try:
        with open(state_path) as f:
            state = json.load(f)
    except FileNotFoundError:
        return "no trainer_state.json (the save was interrupted)"
    except (OSError, ValueError) as error:
        return f"trainer_state.json is unreadable ({error})"
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(folder)))
    if match and state.get("global_step") != int(match.group(1)):
        return f"trainer_state.json records step {state.get('global_step')}, not {match.group(1)}"
    weights = [name for name in WEIGHT_FILES if os.path.exists(os.path.join(folder, name))]
    for index_name in WEIGHT_INDEXES:
        index_path = os.path.join(folder, index_name)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError) as error:
                return f"{index_name} is unreadable ({error})"
            missing = [shard for shard in shards if not os.path.exists(os.path.join(folder, shard))]
            if missing:
                return f"weight shard(s) {missing} are missing"
            weights += shards
    if not weights:
        return "no model weights"
    for name in weights:
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(os.path.join(folder, name))
            if problem:
                return f"{name} is unreadable ({problem})"
    return None


def _safetensors_problem(path: str) -> Optional[str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception as error:  # noqa: BLE001 - a truncated file raises SafetensorError or OSError
        return str(error)
    return None


def _checkpoints(output_dir: str) -> list:
    """checkpoint-N folders of output_dir, by step."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name))
             for name in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.match(name))]
    return [path for _, path in sorted(found)]


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The complete checkpoint with the highest step; incomplete later ones are skipped with a warning."""
    for path in reversed(_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("Not resuming from %s: %s. Trying the previous checkpoint.", path, problem)
    return None


def resolve_resume(resume, output_dir: str):
    """What to pass to Trainer.train(resume_from_checkpoint=...): None, or the path of a complete checkpoint."""
    if resume is None or resume is False:
        return None
    if isinstance(resume, str) and resume.lower() in ("false", "no", ""):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() in ("true", "latest", "yes")):
        path = last_complete_checkpoint(output_dir)
        if path is None:
            raise ValueError(
                f"`--resume_from_checkpoint true`: no complete checkpoint-N in --output_dir {output_dir!r} "
                f"(found {[os.path.basename(p) for p in _checkpoints(output_dir)] or 'none'})."
            )
        return path
    path = str(resume)
    if not os.path.exists(path):
        raise ValueError(f"`--resume_from_checkpoint` {path!r} does not exist.")
    problem = checkpoint_problem(path)
    if problem:
        raise ValueError(f"`--resume_from_checkpoint` {path!r} is not a complete checkpoint: {problem}.")
    return path
