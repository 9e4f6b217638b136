"""Answer one question about one image with a QMoP-LLaVA checkpoint and report what the projector did.

Used by `scripts/demo.py` (the README's main command). Until a trained tiny checkpoint is committed, the default
model is a tiny checkpoint with random weights built locally: its answers are meaningless, the mechanics are real.
"""

import os

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_IMAGE = os.path.join(REPO_ROOT, "assets", "demo.png")
BUNDLED_CHECKPOINT = os.path.join(REPO_ROOT, "checkpoints", "qmop-tiny")
RANDOM_TINY_CHECKPOINT = os.path.join(REPO_ROOT, ".cache", "qmop-tiny-random")


def default_model() -> tuple[str, bool]:
    """(path, trained?): the committed trained tiny checkpoint if present, else a random tiny one built once."""
    if os.path.exists(os.path.join(BUNDLED_CHECKPOINT, "config.json")):
        return BUNDLED_CHECKPOINT, True
    if not os.path.exists(os.path.join(RANDOM_TINY_CHECKPOINT, "config.json")):
        from conversion.tiny import save_tiny_checkpoint

        save_tiny_checkpoint(RANDOM_TINY_CHECKPOINT, num_visual_tokens=16)
    return RANDOM_TINY_CHECKPOINT, False


def answer(model_path: str, image, question: str, num_visual_tokens=None, max_new_tokens: int = 20, device=None) -> dict:
    """Load through Auto* with trust_remote_code (as a Hub user does), answer, and report router weights and token
    counts. `image` is anything QMoPProcessor accepts (path, PIL image, bytes...)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    if device is not None:
        model.to(device)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, num_visual_tokens=num_visual_tokens).to(model.device)
    with torch.no_grad():
        analysis = model(**inputs)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = generated[0, inputs["input_ids"].shape[1]:]
    config = model.config
    budget = int((inputs["input_ids"][0] == config.image_token_id).sum())
    prompt_tokens = int(inputs["attention_mask"][0].sum())
    kept = analysis.kept_patch_indices
    return {
        "prompt": prompt,
        "answer": processor.decode(new_tokens, skip_special_tokens=True).strip(),
        "router_weights": dict(zip(config.branches, analysis.router_weights[0].tolist())),
        "visual_tokens": budget,
        "patches": config.num_patches,
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_uncompressed": prompt_tokens - budget + config.num_patches,
        "generated_tokens": int(new_tokens.numel()),
        "kept_patches": None if kept is None or int(kept[0, 0]) < 0 else kept[0].tolist(),
    }


def format_report(result: dict, model_path: str, trained: bool) -> str:
    weights = ", ".join(f"{name} {value:.3f}" for name, value in result["router_weights"].items())
    lines = [
        f"model:    {model_path}" + ("" if trained else "  (tiny, RANDOM weights: the answer is noise)"),
        f"prompt:   {result['prompt']!r}",
        f"answer:   {result['answer']!r}",
        f"router:   {weights}",
        f"tokens:   {result['visual_tokens']} visual tokens per image instead of {result['patches']} patches; "
        f"prompt {result['prompt_tokens']} tokens instead of {result['prompt_tokens_uncompressed']} "
        f"({result['prompt_tokens'] / result['prompt_tokens_uncompressed']:.0%} of the KV cache at prefill); "
        f"{result['generated_tokens']} generated",
    ]
    if result["kept_patches"] is not None:
        lines.append(f"pruning:  kept patches {result['kept_patches']}")
    return "\n".join(lines)
