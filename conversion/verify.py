"""The numerical checks a conversion must pass before anything is kept: a fixed verification picture and prompt, the
forward + greedy generation run on every model, LLaVA parity (QMoP at the full budget with the pooling branch must
give LLaVA's logits and tokens), the requested model's forward and generation, and the reload of the saved folder
through `Auto*` with `trust_remote_code=True`.
"""

import numpy as np
import torch

from conversion.settings import ConversionError

VERIFY_PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"


def verification_image(size: int):
    """A fixed, non-square test picture (so LLaVA-1.5's square padding is exercised): smooth colours plus blocks."""
    from PIL import Image

    height, width = size, size * 3 // 2
    y, x = np.mgrid[0:height, 0:width]
    red = 255 * x / max(width - 1, 1)
    green = 255 * y / max(height - 1, 1)
    blue = 255 * ((x // max(size // 6, 1) + y // max(size // 6, 1)) % 2)
    return Image.fromarray(np.stack([red, green, blue], axis=-1).astype("uint8"))


def verification_inputs(processor, image, budget: int, for_llava: bool = False) -> dict:
    """The processor's tensors for the verification prompt at `budget` visual tokens (LLaVA takes three of them)."""
    encoded = processor(images=image, text=VERIFY_PROMPT, num_visual_tokens=budget)
    keys = ("input_ids", "attention_mask", "pixel_values") if for_llava else tuple(encoded.keys())
    return {k: encoded[k] for k in keys}


@torch.no_grad()
def run_checks(model, inputs, device: str, new_tokens: int):
    """(last-position-independent full logits in float32 on CPU, greedy continuation ids)."""
    model.to(device)
    batch = {k: v.to(device) for k, v in inputs.items()}
    logits = model(**batch).logits.float().cpu()  # (B, T, V)
    generated = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    return logits, generated[:, batch["input_ids"].shape[1] :].cpu()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ConversionError(f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max())


def check_llava_parity(qmop, llava, atol: float, num_patches: int):
    """QMoP's and LLaVA's (logits, greedy tokens) from `run_checks` on the same inputs: returns (max abs logit
    difference, tokens equal), and raises unless the difference is within `atol` and the tokens are equal."""
    (qmop_logits, qmop_tokens), (llava_logits, llava_tokens) = qmop, llava
    reference_diff = max_abs_diff(qmop_logits, llava_logits)
    tokens_equal = bool(torch.equal(qmop_tokens, llava_tokens))
    print(f"reference check ({num_patches} tokens, pooling): max |logits - LLaVA logits| = {reference_diff:.3e} "
          f"(tolerance {atol:.0e}); greedy tokens equal: {tokens_equal}", flush=True)
    if not reference_diff <= atol or not tokens_equal:
        raise ConversionError(
            f"the converted model does not reproduce LLaVA: max abs logit diff {reference_diff:.3e} > {atol:.0e} "
            f"or greedy tokens differ ({qmop_tokens.tolist()} vs {llava_tokens.tolist()}). Nothing was written."
        )
    return reference_diff, tokens_equal


def check_requested_model(model, processor, inputs: dict, device: str, new_tokens: int):
    """The model as requested: a forward with finite logits and a short greedy generation. Returns (logits,
    generated text)."""
    logits, tokens = run_checks(model, inputs, device, new_tokens)
    if not torch.isfinite(logits).all():
        raise ConversionError("the converted model produced non-finite logits.")
    generated_text = processor.batch_decode(tokens, skip_special_tokens=True)[0]
    config = model.config
    print(f"requested model (M={config.num_visual_tokens}, branches={list(config.branches)}): logits "
          f"{tuple(logits.shape)}, greedy {new_tokens} tokens: {generated_text!r}", flush=True)
    return logits, generated_text


@torch.no_grad()
def verify_saved(folder: str, image, inputs: dict, expected_logits: torch.Tensor, dtype: torch.dtype, device: str,
                 atol: float) -> float:
    """Reload `folder` as a user would and return the max abs logit difference on the same inputs; raises when it
    exceeds `atol`. The reloaded processor must produce the same token ids as the one that was saved."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    reloaded_inputs = processor(images=image, text=VERIFY_PROMPT)
    for key, value in inputs.items():
        if not torch.equal(reloaded_inputs[key], value):
            raise ConversionError(f"the reloaded processor gives different {key!r} for the verification inputs.")
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval().to(device)
    batch = {k: v.to(device) for k, v in reloaded_inputs.items()}
    reload_diff = max_abs_diff(model(**batch).logits.float().cpu(), expected_logits)
    print(f"reload check (Auto* with trust_remote_code): max |logits - before saving| = {reload_diff:.3e}", flush=True)
    if not reload_diff <= atol:
        raise ConversionError(f"the saved folder does not reproduce the converted model (diff {reload_diff:.3e}).")
    return reload_diff
