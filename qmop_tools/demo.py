"""qmop demo: answer questions about an image with a QMoP-LLaVA checkpoint; print the answers, router weights, kept
patches and token counts, and write a picture of what the projector did.

    qmop demo [--image assets/demo.png] [--question "what letter is in the top left corner?"]...
              [--model DIR_OR_HUB_ID] [--num-visual-tokens M] [--picture outputs/demo.png]

Without --question, the bundled image's five questions (one per mini-VTCBench dimension) are asked. The default model
is the trained tiny checkpoint committed under `checkpoints/qmop-tiny` (mini VTCBench, `qmop vtcbench`); without it, a
tiny checkpoint with random weights is built locally and the demo says that its answers are noise. The Space
(app.py) answers through the same functions.
"""

import argparse
import json
import os


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_IMAGE = os.path.join(REPO_ROOT, "assets", "demo.png")
BUNDLED_CHECKPOINT = os.path.join(REPO_ROOT, "checkpoints", "qmop-tiny")
RANDOM_TINY_CHECKPOINT = os.path.join(REPO_ROOT, ".cache", "qmop-tiny-random")
DEFAULT_PICTURE = os.path.join("outputs", "demo.png")


def default_model() -> tuple[str, bool]:
    """(path, trained?): the committed trained tiny checkpoint if present, else a random tiny one built once."""
    if os.path.exists(os.path.join(BUNDLED_CHECKPOINT, "config.json")):
        return BUNDLED_CHECKPOINT, True
    if not os.path.exists(os.path.join(RANDOM_TINY_CHECKPOINT, "config.json")):
        from qmop_tools.testing.tiny import save_tiny_checkpoint

        save_tiny_checkpoint(RANDOM_TINY_CHECKPOINT, num_visual_tokens=16)
    return RANDOM_TINY_CHECKPOINT, False


# The bundled picture (a test-split scene of the mini VTCBench, never trained on) and its five questions, one per
# dimension, with the answers the scene's generator knows (assets/demo.json).
DEMO_SPEC = os.path.join(REPO_ROOT, "assets", "demo.json")


def _default_questions() -> tuple:
    if os.path.exists(DEMO_SPEC):
        with open(DEMO_SPEC) as f:
            return tuple(json.load(f)["questions"])
    return ("what colour is the background?",)


DEFAULT_QUESTIONS = _default_questions()


def check_arguments(model_path: str, image, num_visual_tokens, max_new_tokens: int, picture: str = "") -> None:
    """The demo's arguments, before any model is loaded."""
    from qmop_tools.checks import check_output_file, is_square_budget, require_qmop_checkpoint

    require_qmop_checkpoint(model_path, "--model")
    if isinstance(image, str) and not image.startswith(("http://", "https://")) and not os.path.isfile(image):
        raise FileNotFoundError(f"--image {image!r} is not an existing file or an http(s) URL.")
    if num_visual_tokens is not None and not is_square_budget(num_visual_tokens):
        raise ValueError(f"--num-visual-tokens must be a positive perfect square (e.g. 16, 36, 144), got {num_visual_tokens}.")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}.")
    if picture:
        check_output_file(picture, "--picture")


def load(model_path: str, device=None):
    """(model, processor) through Auto* with trust_remote_code, as a Hub user loads them."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from qmop_tools.checks import require_qmop_checkpoint

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=True)
    require_qmop_checkpoint(model_path, "--model", getattr(config, "model_type", None))
    model = AutoModelForImageTextToText.from_pretrained(model_path, trust_remote_code=True).eval()
    if device is not None:
        model.to(device)
    return model, AutoProcessor.from_pretrained(model_path, trust_remote_code=True)


def answer_with(model, processor, image, question: str, num_visual_tokens=None, max_new_tokens: int = 20) -> dict:
    """Answer and report router weights, the patches the pruning branch keeps and token counts. `image` is anything
    QMoPProcessor accepts (path, URL, PIL image, bytes...). The result also feeds
    `qmop_tools.vtcbench.visualize.render_analysis`."""
    from qmop_tools.vtcbench.visualize import analyse

    result = analyse(model, processor, image, question, num_visual_tokens, max_new_tokens)
    result["patches"] = model.config.num_patches
    result["prompt_tokens_uncompressed"] = result["prompt_tokens"] - result["visual_tokens"] + model.config.num_patches
    return result


def answer(model_path: str, image, question: str, num_visual_tokens=None, max_new_tokens: int = 20, device=None) -> dict:
    """`answer_with` on a checkpoint folder or Hub id."""
    model, processor = load(model_path, device)
    return answer_with(model, processor, image, question, num_visual_tokens, max_new_tokens)


def format_model_line(model_path: str, trained: bool) -> str:
    shown = os.path.relpath(model_path) if os.path.isabs(model_path) and model_path.startswith(os.getcwd()) else model_path
    return f"model:    {shown}" + ("" if trained else "  (tiny, RANDOM weights: the answer is noise)")


def format_report(result: dict, model_path: str, trained: bool, with_model: bool = True) -> str:
    weights = ", ".join(f"{name} {value:.3f}" for name, value in result["router_weights"].items())
    lines = [format_model_line(model_path, trained)] if with_model else []
    lines += [
        f"prompt:   {result['prompt']!r}",
        f"answer:   {result['answer']!r}",
        f"router:   {weights}",
        f"tokens:   {result['visual_tokens']} visual tokens per image instead of {result['patches']} patches; "
        f"prompt {result['prompt_tokens']} tokens instead of {result['prompt_tokens_uncompressed']} "
        f"({result['prompt_tokens'] / result['prompt_tokens_uncompressed']:.0%} of the KV cache at prefill); "
        f"{result['generated_tokens']} generated",
    ]
    if result["kept_patches"] is not None:
        selected = "" if result["pruning_selected"] else " (the router did not select the pruning branch here)"
        lines.append(f"pruning:  keeps patches {result['kept_patches']}{selected}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="qmop demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="path or URL of the image")
    parser.add_argument("--question", action="append", help="repeatable (default: the five bundled questions)")
    parser.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: the bundled tiny one)")
    parser.add_argument("--num-visual-tokens", type=int, default=None, help="budget M (default: the checkpoint's)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--picture", default=DEFAULT_PICTURE, help="where to write the picture ('' for none)")
    args = parser.parse_args(argv)
    if args.model:  # before a random tiny checkpoint is built for nothing
        check_arguments(args.model, args.image, args.num_visual_tokens, args.max_new_tokens, args.picture)
    path, trained = (args.model, True) if args.model else default_model()
    check_arguments(path, args.image, args.num_visual_tokens, args.max_new_tokens, args.picture)
    model, processor = load(path)
    print(format_model_line(path, trained) + "\n")
    results = []
    for question in args.question or DEFAULT_QUESTIONS:
        result = answer_with(model, processor, args.image, question, args.num_visual_tokens, args.max_new_tokens)
        print(format_report(result, path, trained, with_model=False) + "\n")
        results.append(result)
    if args.picture:
        from qmop_tools.vtcbench.visualize import contact_sheet, render_analysis, save_png

        save_png(contact_sheet([render_analysis(r) for r in results], columns=1 if len(results) == 1 else 2), args.picture)
        print(f"picture:  {args.picture} (kept patches of the pruning branch over the image, router weights)")
