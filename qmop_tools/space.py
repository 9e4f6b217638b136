"""qmop space: the Gradio demo (app.py at the repository root) as a Hugging Face Space: run it locally, export a
self-contained Space folder, push it.

    qmop space run [--model DIR_OR_HUB_ID] [--host 127.0.0.1] [--port 7860] [--quiet]
    qmop space export OUT [--model DIR_OR_HUB_ID] [--overwrite] [--push-to-hub OWNER/NAME]

An exported Space holds app.py, the modules of this package it imports (copied, so the Space does not need this
package installed), the bundled picture and its questions, the checkpoint (copied; or a Hub id, recorded), a
requirements.txt with the versions the app was tested with and a README.md with the Space's front matter. The
helpers the app needs besides its page (which checkpoint, which budgets) live here, so the Space copies this file too:
it imports only the standard library at module level.
"""

import argparse
import json
import math
import os
import re
import shutil
from typing import Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACE_REQUIREMENTS = os.path.join(REPO_ROOT, "requirements", "space.txt")  # gradio pinned as tested
# Written by export_space next to app.py: {"model": checkpoint folder inside the Space, or a Hub id}.
SPACE_SETTINGS = os.path.join(REPO_ROOT, "space.json")

# What an exported Space holds besides its checkpoint: app.py and everything it imports from this repository.
# tests/test_space.py checks that every repository import in these files is among them.
SPACE_FILES = (
    "app.py",
    "processing_qmop.py",  # qmop_tools.vtcbench.visualize reads images with its `_to_pil_rgb`
    "qmop_tools/__init__.py",
    "qmop_tools/checks.py",
    "qmop_tools/demo.py",
    "qmop_tools/files.py",
    "qmop_tools/space.py",
    "qmop_tools/vtcbench/__init__.py",
    "qmop_tools/vtcbench/visualize.py",
    "assets/demo.png",
    "assets/demo.json",
)
# The Space's requirements.txt besides gradio (pinned from requirements/space.txt). gradio 6 needs
# huggingface_hub >= 1.16, which transformers 4.57 refuses: the Space runs on transformers 5 (tested: 5.23).
RUNTIME_REQUIREMENTS = ("transformers>=5,<6", "torch>=2.4", "safetensors", "tokenizers", "pillow", "numpy")
SPACE_CARD = """---
title: QMoP-LLaVA
emoji: 🗜️
colorFrom: blue
colorTo: red
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
license: apache-2.0
short_description: {short_description}
{models}---

# QMoP-LLaVA

Ask a question about an image. A LLaVA-1.5 whose projector compresses the image's patches to a budget of M visual
tokens with three branches (pooling, resampler, pruning), mixed by a router that reads the question, answers it; the
page shows the answer, the patches the pruning branch keeps, the router's weight per branch and how many tokens the
language model reads instead of the uncompressed image.

Model: `{model}`{model_note}. Written by `qmop space export` (qmop_tools/space.py).
"""
SHORT_DESCRIPTION = "LLaVA-1.5 that compresses visual tokens by the question"  # the Hub allows 60 characters


# ---------------------------------------------------------------------------------------------- the app's helpers

def valid_budgets(num_patches: int) -> list:
    """The budgets a checkpoint accepts: the perfect squares M = k*k up to its patch count."""
    return [k * k for k in range(1, math.isqrt(num_patches) + 1)]


def snap_budget(value: float, num_patches: int) -> int:
    """The valid budget nearest to `value` (the smaller one on a tie), so a slider can offer every integer."""
    return min(valid_budgets(num_patches), key=lambda m: (abs(m - value), m))


def resolve_model(model: Optional[str] = None) -> tuple:
    """(checkpoint, trained?) the app serves: `model`, else $QMOP_SPACE_MODEL, else the one recorded by
    `export_space` in space.json, else the bundled trained tiny checkpoint (`qmop_tools.demo.default_model`)."""
    from qmop_tools.checks import require_qmop_checkpoint
    from qmop_tools.demo import default_model

    model = model or os.environ.get("QMOP_SPACE_MODEL") or _recorded_model()
    if not model:
        return default_model()
    require_qmop_checkpoint(model, "--model")
    return model, True


def _recorded_model() -> Optional[str]:
    if not os.path.isfile(SPACE_SETTINGS):
        return None
    with open(SPACE_SETTINGS) as f:
        model = json.load(f)["model"]
    local = os.path.join(REPO_ROOT, model)  # a folder inside the Space, or a Hub id
    return local if os.path.isdir(local) else model


# ---------------------------------------------------------------------------------------------- export and push

def tested_gradio_version() -> str:
    """The gradio version pinned in requirements/space.txt (the one the browser test ran)."""
    with open(SPACE_REQUIREMENTS) as f:
        for line in f:
            found = re.match(r"\s*gradio\s*==\s*([^\s#;]+)", line)
            if found:
                return found.group(1)
    raise ValueError(f"{SPACE_REQUIREMENTS} pins no gradio version (expected a line `gradio==X.Y.Z`).")


def export_space(output_dir: str, model: Optional[str] = None, overwrite: bool = False) -> str:
    """Write a self-contained Hugging Face Space (Gradio SDK) to `output_dir` and return its path.

    `model`: a local QMoP-LLaVA checkpoint folder (copied into the Space) or a Hub id (recorded; the Space downloads
    it); default the bundled trained tiny checkpoint. Everything is written to a temporary folder beside
    `output_dir` and moved into place at the end, so a failure leaves nothing half-written. An existing non-empty
    `output_dir` is an error unless `overwrite=True`, which replaces it."""
    from qmop_tools.checks import check_output_folder, looks_like_hub_id, require_qmop_checkpoint
    from qmop_tools.demo import default_model
    from qmop_tools.files import atomic_folder

    output_dir = os.path.abspath(output_dir)
    check_output_folder(output_dir, "output folder")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir!r} exists and is not empty: choose another folder, or overwrite=True "
                              "(--overwrite) to replace it.")
    trained = True
    if model is None:
        model, trained = default_model()
    if not os.path.isdir(model) and not looks_like_hub_id(model):
        raise ValueError(f"--model {model!r} is neither a checkpoint folder nor a Hub id (owner/name).")
    require_qmop_checkpoint(model, "--model")
    for source in (REPO_ROOT, model):  # a folder replaced by the export must not hold what it copies
        if os.path.isdir(source) and _inside(os.path.realpath(source), os.path.realpath(output_dir)):
            raise ValueError(f"output folder {output_dir!r} holds {source!r}, which the export copies: choose "
                             "another folder.")
    missing = [relative for relative in SPACE_FILES if not os.path.isfile(os.path.join(REPO_ROOT, relative))]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing under {REPO_ROOT}: export a Space from a checkout of "
                                "this repository (`pip install -e .` from the checkout).")
    gradio_version = tested_gradio_version()

    with atomic_folder(output_dir) as staging:  # built beside, moved into place when complete
        for relative in SPACE_FILES:
            os.makedirs(os.path.dirname(os.path.join(staging, relative)), exist_ok=True)
            shutil.copy2(os.path.join(REPO_ROOT, relative), os.path.join(staging, relative))
        if os.path.isdir(model):
            recorded = f"checkpoints/{os.path.basename(os.path.normpath(model))}"
            shutil.copytree(model, os.path.join(staging, recorded), ignore=shutil.ignore_patterns("__pycache__"))
        else:
            recorded = model
        with open(os.path.join(staging, "space.json"), "w") as f:
            json.dump({"model": recorded}, f, indent=1)
            f.write("\n")
        with open(os.path.join(staging, "requirements.txt"), "w") as f:
            f.write("# written by `qmop space export`: the versions the app was tested with\n")
            f.write("\n".join((f"gradio=={gradio_version}",) + RUNTIME_REQUIREMENTS) + "\n")
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:  # the emoji
            f.write(SPACE_CARD.format(
                gradio_version=gradio_version, short_description=SHORT_DESCRIPTION, model=recorded,
                models="" if os.path.isdir(model) else f"models:\n- {model}\n",
                model_note="" if trained else " (tiny, RANDOM weights: its answers are noise)",
            ))
    return output_dir


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def push_space(folder: str, repo_id: str, private: bool = False) -> str:
    """Upload an exported Space folder to the Hub Space `repo_id` (created if missing) and return its URL."""
    from huggingface_hub import HfApi

    check_hub_id(repo_id, "--push-to-hub")
    api = HfApi()
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="space",
                      commit_message="Upload QMoP-LLaVA Space (qmop space export)")
    return f"https://huggingface.co/spaces/{repo_id}"


def check_hub_id(repo_id: str, argument: str) -> None:
    from qmop_tools.checks import looks_like_hub_id

    if not looks_like_hub_id(repo_id):
        raise ValueError(f"{argument} {repo_id!r} is not a Hub repository id: expected OWNER/NAME "
                         "(letters, digits, '.', '_', '-').")


# ---------------------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qmop space", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True, metavar="{run,export}")
    # `run` passes every option on to app.py's own parser (main), --help included
    actions.add_parser("run", add_help=False, help="serve the app locally (app.py's options: run --help)")
    export = actions.add_parser("export", help="write a Space folder (and push it with --push-to-hub)")
    export.add_argument("output_dir", help="the Space folder to write")
    export.add_argument("--model", default=None,
                        help="checkpoint folder (copied) or Hub id (recorded) (default: the bundled tiny one)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    export.add_argument("--push-to-hub", metavar="OWNER/NAME", default=None,
                        help="then upload the folder to this Hub Space (created if missing; needs a login)")
    export.add_argument("--private", action="store_true", help="with --push-to-hub: create the Space private")
    return parser


def main(argv: Optional[list] = None) -> None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.action == "run":
        return _load_app().main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:  # the arguments' errors, all raised before anything is written
        if args.push_to_hub is not None:
            check_hub_id(args.push_to_hub, "--push-to-hub")
        folder = export_space(args.output_dir, args.model, args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        parser.error(str(error))
    print(f"wrote the Space to {folder}; run it there with `python app.py`")
    if args.push_to_hub is not None:
        print(f"pushed: {push_space(folder, args.push_to_hub, args.private)}")


def _load_app():
    """app.py (the Space's entry point, at the repository root, outside this package)."""
    import importlib.util

    path = os.path.join(REPO_ROOT, "app.py")
    if not os.path.isfile(path):
        raise SystemExit(f"qmop space: {path} is missing: the app lives at the root of a checkout of this repository "
                         "(install it with `pip install -e .` from the checkout).")
    spec = importlib.util.spec_from_file_location("app", path)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    return app


if __name__ == "__main__":
    main()
