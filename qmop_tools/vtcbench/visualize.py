"""Pictures of what QMoP did for one image and one question (the QG-VTC Figure 4 idea): the patches the pruning
branch keeps, drawn over the image, next to the router's weight per branch.

    from qmop_tools.vtcbench.visualize import analyse, render_analysis
    result = analyse(model, processor, image, "what letter is in the top left corner?")
    render_analysis(result).save("analysis.png")

Pillow only (no plotting library), so the demo can draw it anywhere the model runs.
"""

import io
import math
from typing import Optional

import torch
from PIL import Image, ImageDraw, ImageFont

DIMMED = (128, 128, 128)
BRANCH_COLOURS = {"pooling": (66, 133, 244), "resampler": (244, 160, 0), "pruning": (219, 68, 55)}


@torch.no_grad()
def analyse(model, processor, image, question: str, num_visual_tokens: Optional[int] = None,
            max_new_tokens: int = 10) -> dict:
    """Answer `question` about `image` and collect what the projector did: router weights, the patches the pruning
    branch keeps (computed even when the router did not select the branch for this question, and marked so)."""
    from processing_qmop import _to_pil_rgb

    image = _to_pil_rgb(image, 0)  # path, URL, bytes, array or PIL: the picture needs the pixels
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, num_visual_tokens=num_visual_tokens, return_tensors="pt")
    inputs = inputs.to(model.device)
    config = model.config
    outputs = model(**inputs)
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    budget = int((inputs["input_ids"][0] == config.image_token_id).sum())
    weights = dict(zip(config.branches, outputs.router_weights[0].float().tolist()))
    kept, selected = None, False
    if "pruning" in config.branches:
        selected = weights.get("pruning", 0.0) > 0
        ran = outputs.kept_patch_indices  # -1 where the router did not run the branch for the image
        if selected and ran is not None and int(ran[0, 0]) >= 0:
            kept = ran[0].tolist()
        else:  # what the branch would keep: the scores only, no branch forward
            kept = pruning_kept_patches(model, inputs, budget)
    return {
        "image": image,
        "question": question,
        "answer": answer,
        "router_weights": weights,
        "router_mode": config.router_mode,
        "kept_patches": kept,
        "pruning_selected": selected,
        "visual_tokens": budget,
        "grid": config.patch_grid,
        "prompt": prompt,
        "prompt_tokens": int(inputs["attention_mask"][0].sum()),
        "generated_tokens": int(generated.shape[1] - inputs["input_ids"].shape[1]),
    }


@torch.no_grad()
def pruning_kept_patches(model, inputs, budget: int) -> list:
    """The M patches the pruning branch keeps for the first image of `inputs` (raster order)."""
    core = model.model
    hidden, layer_input, feature_layer = core.get_vision_features(inputs["pixel_values"][:1])
    query_embeds = None
    if core.config.uses_query:
        query_embeds = core.get_query_embeds(inputs["query_input_ids"][:1], inputs.get("query_attention_mask")[:1])
    scores, _ = core.pruning_scores(layer_input, feature_layer, query_embeds, patches=hidden[:1, 1:])
    return sorted(scores[0].topk(budget).indices.tolist())


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render_analysis(result: dict, image: Optional[Image.Image] = None, scale: int = 3, expected: Optional[str] = None) -> Image.Image:
    """A picture: the image with the pruning branch's kept patches (others dimmed), and the router's weights."""
    image = (image or result["image"]).convert("RGB")
    grid = result["grid"]
    side = grid * max(1, round(image.width * scale / grid))
    big = image.resize((side, side), Image.NEAREST)
    patch = side / grid
    kept = result.get("kept_patches")
    if kept is not None:
        mask = Image.new("L", big.size, 165)  # dropped patches: washed towards grey
        draw_mask = ImageDraw.Draw(mask)
        for index in kept:
            row, col = divmod(index, grid)
            draw_mask.rectangle([col * patch, row * patch, (col + 1) * patch - 1, (row + 1) * patch - 1], fill=0)
        big = Image.composite(Image.new("RGB", big.size, DIMMED), big, mask)
        draw_big = ImageDraw.Draw(big)
        for index in kept:
            row, col = divmod(index, grid)
            draw_big.rectangle([col * patch, row * patch, (col + 1) * patch - 1, (row + 1) * patch - 1],
                               outline=(255, 230, 0))
    panel_width = 330
    canvas = Image.new("RGB", (side + panel_width, max(side, 260)), (255, 255, 255))
    canvas.paste(big, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font, small = _font(15), _font(12)
    x, y = side + 14, 12
    for line in _wrap(f"Q: {result['question']}", 36):
        draw.text((x, y), line, fill=(0, 0, 0), font=font)
        y += 19
    answer = f"A: {result['answer']}"
    if expected is not None:
        answer += "  (right)" if result["answer"].strip().lower().startswith(expected.lower()) else f"  (expected {expected})"
    draw.text((x, y), answer, fill=(0, 0, 0), font=font)
    y += 30
    mode = {"query": "router (reads the question)", "vision": "router (image only)", "uniform": "equal weights"}
    draw.text((x, y), mode.get(result.get("router_mode"), "router") + ":", fill=(60, 60, 60), font=small)
    y += 20
    for name, weight in result["router_weights"].items():
        draw.text((x, y), f"{name:<9} {weight:.2f}", fill=(0, 0, 0), font=small)
        draw.rectangle([x + 120, y + 2, x + 120 + int(180 * weight), y + 13], fill=BRANCH_COLOURS.get(name, (90, 90, 90)))
        draw.rectangle([x + 120, y + 2, x + 300, y + 13], outline=(180, 180, 180))
        y += 20
    y += 10
    if kept is not None:
        note = "pruning branch: kept patches outlined, the others greyed" + ("" if result.get("pruning_selected") else " (branch not selected here)")
        for line in _wrap(note, 42):
            draw.text((x, y), line, fill=(60, 60, 60), font=small)
            y += 16
    draw.text((x, y), f"{result['visual_tokens']} visual tokens of {grid * grid} patches", fill=(60, 60, 60), font=small)
    return canvas


def _wrap(text: str, width: int) -> list:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def save_png(picture: Image.Image, path: str) -> str:
    """Write a PNG atomically (a temporary file renamed over `path`)."""
    from qmop_tools.bench.report import write_atomic

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return write_atomic(path, buffer.getvalue(), binary=True)


def contact_sheet(pictures: list, columns: int = 2) -> Image.Image:
    """Several pictures in a grid (white background)."""
    width = max(p.width for p in pictures)
    height = max(p.height for p in pictures)
    rows = math.ceil(len(pictures) / columns)
    sheet = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for i, picture in enumerate(pictures):
        sheet.paste(picture, ((i % columns) * width, (i // columns) * height))
    return sheet
