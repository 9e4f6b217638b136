"""The mini VTCBench's frozen foundation, trained here because no weights can be downloaded.

- Tokenizers (LLM and CLIP-style) trained on the dataset's text (`qmop_tools.testing.tiny.build_processor(corpus=...)`).
- A tiny CLIP (ViT on the 24 x 24 patch grid + text transformer) pre-trained on the train split, then frozen: its
  vision tower becomes QMoP's vision tower, its text transformer the router's text encoder, as QMoP freezes OpenAI's
  CLIP. Three losses, each standing in for a property real CLIP has and a 300-step contrastive run does not
  (../shared/research/fidelity_diagnosis.md, sections 1 and 5):
  - contrastive (InfoNCE both ways) between the image and one of its texts: the caption, or a question followed by
    its answer, so every question word has a trained embedding in the text encoder;
  - dense supervision of the feature layer (`vision_feature_layer` = -2): linear heads read, from each patch token,
    what covers the patch (`data.draw_labels`: kind, shape colour, tag letter, background colour and texture, row
    and column, whether a shape's centre is in it), and from the CLS token the picture's facts; real CLIP features
    carry object identity, text and position, which the contrastive run alone did not learn (row probe 8.7% against
    4.2% chance), and object detectors built on them find one point per object. Each patch head's
    classes are weighted by inverse frequency: 97% of patches are background, and unweighted the `kind` head reached
    96.6% accuracy while hardly marking the cross (4 patches of 576). Held-out accuracy is reported both plain and
    balanced (the mean of per-class recalls), the number that shows whether rare things are read;
  - a salience prior on the feature layer's CLS-to-patch attention (the pruning branch's score), pulled towards the
    patches that hold something (shapes, cross, tag): real CLIP's CLS attends to objects and text, the contrastive
    run's attended to background (0.2% of tag patches kept).
  The tower never sees a question's answer as a label of its own: the heads name what is drawn, not what is asked.
- A tiny Llama pre-trained as a language model on the train split's captions and question-answer text (no images),
  the stand-in for Vicuna: it knows the words and the answer format, not the pictures.

`base_checkpoint` assembles a QMoP-LLaVA checkpoint from them with a freshly initialised projector (seeded).
"""

import logging
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from modeling_qmop import _run_clip_encoder_layer
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, LlamaConfig, LlamaForCausalLM

logger = logging.getLogger(__name__)


# Bump when the pre-training changes: the foundation is rebuilt.
FOUNDATION_RECIPE = "dense-balanced+centre+salience+lit/4"


def foundation_recipe(glyph_target: str = "letter") -> str:
    """What foundations and runs are keyed by: FOUNDATION_RECIPE, with the glyph target when it is not "letter"."""
    return FOUNDATION_RECIPE if glyph_target == "letter" else f"{FOUNDATION_RECIPE}+{glyph_target}"


@dataclass(frozen=True)
class TowerShapes:
    vision_width: int = 64
    vision_layers: int = 4  # the feature layer (-2) is the output of layer 3
    text_width: int = 64
    text_layers: int = 2
    llm_width: int = 128
    llm_layers: int = 2
    heads: int = 4


def vision_config(shapes: TowerShapes, image_size: int, patch_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=shapes.vision_width, intermediate_size=4 * shapes.vision_width,
        num_hidden_layers=shapes.vision_layers, num_attention_heads=shapes.heads, image_size=image_size,
        patch_size=patch_size, projection_dim=shapes.vision_width,
    )


def text_encoder_config(shapes: TowerShapes, query_tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=shapes.text_width, intermediate_size=4 * shapes.text_width, num_hidden_layers=shapes.text_layers,
        num_attention_heads=shapes.heads, vocab_size=len(query_tokenizer), max_position_embeddings=77,
        projection_dim=shapes.text_width, bos_token_id=query_tokenizer.bos_token_id,
        eos_token_id=query_tokenizer.eos_token_id, pad_token_id=query_tokenizer.pad_token_id,
    )


def llm_config(shapes: TowerShapes, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=shapes.llm_width, intermediate_size=int(2.75 * shapes.llm_width),
        num_hidden_layers=shapes.llm_layers, num_attention_heads=shapes.heads, num_key_value_heads=shapes.heads,
        vocab_size=len(tokenizer), max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def load_pixels(processor, image_folder: str, records: list) -> torch.Tensor:
    images = [Image.open(os.path.join(image_folder, r["image"])).convert("RGB") for r in records]
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def _fit(name: str, model: torch.nn.Module, num_items: int, loss_of, steps: int, batch_size: int, lr: float,
         seed: int, log_every: int) -> dict:
    """AdamW with warm-up and cosine decay over `steps` batches of item indices drawn epoch by epoch (shuffled with
    `seed`); `loss_of(indices)` returns the batch loss. Leaves the model in eval mode; returns a report."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    rng = random.Random(seed)
    order, losses, start = [], [], time.time()
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(num_items), num_items)
        indices, order = order[:batch_size], order[batch_size:]
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr, warmup=max(1, steps // 20))
        loss = loss_of(indices)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = losses[-log_every:]
            logger.info("%s step %d/%d loss %.3f (%.0f s)", name, step + 1, steps, sum(recent) / len(recent),
                        time.time() - start)
    model.eval()
    return {"steps": steps, "batch_size": batch_size, "first_loss": losses[0],
            "last_loss": sum(losses[-10:]) / len(losses[-10:]), "seconds": time.time() - start}


# The tag's letter is the hardest thing the tower must read (a pattern across patches); its heads weigh this much more.
LETTER_LOSS_WEIGHT = 4.0
GLYPH_HEADS = ("letter", "ink")  # the heads LETTER_LOSS_WEIGHT applies to (`dense_heads`, `picture_heads`)


# Per-patch heads on the feature layer and per-picture heads on its CLS token: name -> number of classes.
def dense_heads(layout: str = "tag", glyph_target: str = "letter") -> dict:
    """With `glyph_target="ink"` the glyph patches' head names their ink pattern (`data.ink_labels`), not the letter."""
    from .data import BACKGROUNDS, GLYPHS, GRID, INK_CODES, OBJECT_COLOURS, TEXTURES, kinds

    glyph = {"ink": INK_CODES} if glyph_target == "ink" else {"letter": len(GLYPHS)}
    return {"kind": len(kinds(layout)), "shape_colour": len(OBJECT_COLOURS), **glyph,
            "background": len(BACKGROUNDS), "texture": len(TEXTURES), "row": GRID, "column": GRID, "centre": 2}


def picture_heads(layout: str = "tag", glyph_target: str = "letter") -> dict:
    """In layout "pair", or when the glyph head names ink, without the letter: the test there is whether a branch
    keeps the letter where it is drawn, so no token is trained to carry the tag's letter (data.py, layout "pair")."""
    from .data import BACKGROUNDS, GLYPHS, NUMBERS, TEXTURES

    heads = {"background": len(BACKGROUNDS), "texture": len(TEXTURES), "count": len(NUMBERS), "letter": len(GLYPHS),
             "cross_h": 2, "cross_v": 2}
    if layout == "pair" or glyph_target == "ink":
        del heads["letter"]
    return heads


def inverse_frequency(targets: torch.Tensor, classes: int) -> torch.Tensor:
    """Cross-entropy class weights (classes,): total / (classes x count), so each class weighs the same in sum;
    labels -1 are ignored, absent classes get the weight of a single occurrence."""
    counts = torch.bincount(targets[targets >= 0].flatten(), minlength=classes).float().clamp(min=1)
    return counts.sum() / (classes * counts)


def balanced_accuracy(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """The mean over the classes present in `target` (-1 ignored) of the share of that class predicted right."""
    recalls = [float((predicted[target == c] == c).float().mean()) for c in target[target >= 0].unique().tolist()]
    return sum(recalls) / max(1, len(recalls))


def picture_labels(record: dict) -> dict:
    from .data import BACKGROUNDS, GLYPHS, IMAGE_SIZE, TEXTURES

    x, y = record["cross"]
    return {"background": list(BACKGROUNDS).index(record["background"]), "texture": TEXTURES.index(record["texture"]),
            "count": len(record["shapes"]) - 1, "letter": list(GLYPHS).index(record["tag_letter"]),
            "cross_h": int(x >= IMAGE_SIZE / 2), "cross_v": int(y >= IMAGE_SIZE / 2)}


def record_texts(record: dict) -> list:
    """The texts paired with a picture in contrastive training: its caption and each question with its answer."""
    return [record["caption"]] + [f"{q['question']} {q['answer']}" for q in record["questions"]]


def feature_layer_cls_logits(vision_model, hidden_states: tuple, feature_index: int) -> torch.Tensor:
    """CLS-to-patch attention logits (N, H, P) of the feature layer, from its q/k applied to its input, the way
    `QMoPModel.pruning_scores` computes the pruning branch's score."""
    layer = vision_model.encoder.layers[feature_index - 1]
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden_states[feature_index - 1])  # (N, S, Cv)

    def heads(x):  # (N, L, Cv) -> (N, H, L, h)
        return x.view(x.shape[0], x.shape[1], attn.num_heads, -1).transpose(1, 2)

    query, keys = heads(attn.q_proj(normed[:, :1])), heads(attn.k_proj(normed[:, 1:]))  # (N,H,1,h), (N,H,P,h)
    return (query @ keys.transpose(-1, -2))[:, :, 0] * attn.head_dim**-0.5  # (N, H, P)


def _feature_index(num_layers: int, feature_layer: int) -> int:
    """Index into [embeddings, layer 1, ..., layer num_layers] of `vision_feature_layer` (negative counts from the end)."""
    return (feature_layer % (num_layers + 1)) or num_layers


def _run_to_feature_layer(vision_model, pixel_values: torch.Tensor, feature_index: int) -> list:
    """Hidden states up to the feature layer: [embeddings (after pre-LN), layer 1, ..., layer `feature_index`], as
    `QMoPModel.get_vision_features` runs the tower (later layers are never run by QMoP, so they are not trained)."""
    hidden = vision_model.pre_layrnorm(vision_model.embeddings(pixel_values))
    states = [hidden]
    for layer in vision_model.encoder.layers[:feature_index]:
        hidden = _run_clip_encoder_layer(layer, hidden)
        states.append(hidden)
    return states


def pretrain_clip(processor, image_folder: str, records: list, shapes: TowerShapes, steps: int, batch_size: int = 32,
                  lr: float = 2e-3, seed: int = 0, log_every: int = 25, feature_layer: int = -2,
                  salience_weight: float = 1.0, text_steps: int = 300, val_records=None,
                  glyph_target: str = "letter") -> tuple[CLIPModel, dict]:
    """The vision tower (dense + salience, up to the feature layer), then the text encoder (contrastive against the
    frozen feature layer's CLS token, LiT-style); see the module docstring. Returns the CLIP model and a report,
    with held-out checks on `val_records`: each dense head's accuracy, caption retrieval, what salience pruning keeps.
    `glyph_target`: what the glyph patches' head names (`dense_heads`)."""
    from .data import GLYPH_TARGETS, ink_labels, scene_from_dict

    if glyph_target not in GLYPH_TARGETS:
        raise ValueError(f"Unknown glyph target {glyph_target!r}; choose from {GLYPH_TARGETS}.")
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=text_encoder_config(shapes, processor.query_tokenizer).to_dict(),
        vision_config=vision_config(shapes, processor.image_processor.crop_size["height"], processor.patch_size).to_dict(),
        projection_dim=shapes.vision_width,
    )
    model = CLIPModel(config)
    vision = model.vision_model
    width = shapes.vision_width
    layout = "pair" if records[0].get("decoy_letter") else "tag"
    heads = dense_heads(layout, glyph_target)
    patch_heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, n) for name, n in heads.items()})
    cls_heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, n)
                                     for name, n in picture_heads(layout, glyph_target).items()})
    if glyph_target == "ink":  # the label maps on disk name letters; the ink map is drawn from each record's scene

        def with_ink(record):
            return {**record, "labels": {**record["labels"],
                                         "ink": ink_labels(scene_from_dict(record), record["labels"]["kind"])}}

        records, val_records = [with_ink(r) for r in records], val_records and [with_ink(r) for r in val_records]
    feature_index = _feature_index(shapes.vision_layers, feature_layer)
    used = torch.nn.ModuleList([vision.embeddings, vision.pre_layrnorm, *vision.encoder.layers[:feature_index]])
    trained = torch.nn.ModuleDict({"tower": used, "patch": patch_heads, "cls": cls_heads})

    pixels = load_pixels(processor, image_folder, records)
    patch_targets = {name: torch.tensor([[v for row in r["labels"][name] for v in row] for r in records])
                     for name in patch_heads}  # name -> (n, P)
    picture_targets = {name: torch.tensor([picture_labels(r)[name] for r in records]) for name in cls_heads}
    class_weights = {name: inverse_frequency(targets, heads[name]) for name, targets in patch_targets.items()}
    foreground = (patch_targets["kind"] > 0).float()  # (n, P)
    salience = foreground / foreground.sum(-1, keepdim=True).clamp(min=1)

    def vision_loss(indices):
        index = torch.tensor(indices)
        states = _run_to_feature_layer(vision, pixels[index], feature_index)
        features = states[feature_index]  # (N, S, Cv)
        loss = 0.0
        for name, head in patch_heads.items():
            weight = LETTER_LOSS_WEIGHT if name in GLYPH_HEADS else 1.0
            loss = loss + weight * F.cross_entropy(head(features[:, 1:]).flatten(0, 1), patch_targets[name][index].flatten(),
                                                   weight=class_weights[name], ignore_index=-1)
        for name, head in cls_heads.items():
            weight = LETTER_LOSS_WEIGHT if name in GLYPH_HEADS else 1.0
            loss = loss + weight * F.cross_entropy(head(features[:, 0]), picture_targets[name][index])
        logits = feature_layer_cls_logits(vision, states, feature_index)  # (N, H, P)
        log_attention = torch.log_softmax(logits.float(), dim=-1).mean(dim=1)  # (N, P), averaged over heads
        return loss - salience_weight * (salience[index] * log_attention).sum(-1).mean()

    report = {"vision": _fit("vision", trained, len(records), vision_loss, steps, batch_size, lr, seed, log_every)}
    trained.eval()

    # Text encoder, LiT-style: the tower is frozen; its feature-layer CLS is the image side of the contrastive loss.
    with torch.no_grad():
        cls = torch.cat([_run_to_feature_layer(vision, pixels[i:i + 64], feature_index)[feature_index][:, 0]
                         for i in range(0, len(records), 64)])  # (n, Cv)
    image_projection = torch.nn.Linear(width, config.projection_dim, bias=False)
    texts = [record_texts(r) for r in records]
    text_rng = random.Random(seed + 1)
    lit = torch.nn.ModuleDict({"text": model.text_model, "text_projection": model.text_projection,
                               "image_projection": image_projection})

    def text_loss(indices):
        chosen = [text_rng.choice(texts[i]) for i in indices]
        encoded = processor.query_tokenizer(chosen, padding=True, truncation=True, max_length=77, return_tensors="pt")
        pooled = model.text_model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).pooler_output
        text = F.normalize(model.text_projection(pooled), dim=-1)
        image = F.normalize(image_projection(cls[torch.tensor(indices)]), dim=-1)
        logits = model.logit_scale.exp().detach() * image @ text.T  # (N, N)
        target = torch.arange(len(indices))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    report["text"] = _fit("text", lit, len(records), text_loss, text_steps, 64, lr, seed, log_every)
    model.eval()
    if val_records:
        with torch.no_grad():
            val_pixels = load_pixels(processor, image_folder, val_records)
            states = _run_to_feature_layer(vision, val_pixels, feature_index)
            features = states[feature_index]
            accuracy = {}
            for name, head in patch_heads.items():
                target = torch.tensor([[v for row in r["labels"][name] for v in row] for r in val_records]).flatten()
                predicted = head(features[:, 1:]).flatten(0, 1).argmax(-1)
                accuracy[f"patch/{name}"] = round(float((predicted == target)[target >= 0].float().mean()), 4)
                accuracy[f"patch/{name}/balanced"] = round(balanced_accuracy(predicted, target), 4)
            for name, head in cls_heads.items():
                target = torch.tensor([picture_labels(r)[name] for r in val_records])
                predicted = head(features[:, 0]).argmax(-1)
                accuracy[f"picture/{name}"] = round(float((predicted == target).float().mean()), 4)
                accuracy[f"picture/{name}/balanced"] = round(balanced_accuracy(predicted, target), 4)
            report["val_head_accuracy"] = accuracy
            captions = processor.query_tokenizer([r["caption"] for r in val_records], padding=True, truncation=True,
                                                 max_length=77, return_tensors="pt")
            pooled = model.text_model(input_ids=captions["input_ids"], attention_mask=captions["attention_mask"]).pooler_output
            text = F.normalize(model.text_projection(pooled), dim=-1)
            image = F.normalize(image_projection(features[:, 0]), dim=-1)
            report["val_caption_retrieval_top1"] = round(float(((image @ text.T).argmax(-1) == torch.arange(
                len(val_records))).float().mean()), 4)
            report["val_caption_retrieval_chance"] = round(1 / len(val_records), 4)
    return model, report


@torch.no_grad()
def tower_probe_report(model: CLIPModel, processor, image_folder: str, records: list, feature_layer: int = -2,
                       budget: int = 36) -> dict:
    """What the frozen tower gives the branches, on held-out pictures: the share of tag patches among the `budget`
    patches its CLS attention ranks highest (what salience pruning keeps), and the share of all foreground."""
    from .data import GRID

    feature_index = _feature_index(model.config.vision_config.num_hidden_layers, feature_layer)
    pixels = load_pixels(processor, image_folder, records)
    states = _run_to_feature_layer(model.vision_model, pixels, feature_index)
    logits = feature_layer_cls_logits(model.vision_model, states, feature_index)
    scores = torch.softmax(logits.float(), dim=-1).mean(dim=1)  # (n, P)
    kept = scores.topk(budget, dim=-1).indices
    kinds = torch.tensor([[v for row in r["labels"]["kind"] for v in row] for r in records])  # (n, P)
    kept_kinds = kinds.gather(1, kept)
    tag_total = (kinds == 3).sum().clamp(min=1)
    fg_total = (kinds > 0).sum().clamp(min=1)
    return {"budget": budget, "grid": GRID,
            "tag_patches_kept": round(float((kept_kinds == 3).sum() / tag_total), 4),
            "foreground_patches_kept": round(float((kept_kinds > 0).sum() / fg_total), 4)}


def pretrain_llm(tokenizer, lines: list, shapes: TowerShapes, steps: int, batch_size: int = 64, lr: float = 2e-3,
                 seed: int = 0, log_every: int = 50) -> tuple[LlamaForCausalLM, dict]:
    """Causal language modelling on text lines (each `<s> line </s>`)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llm_config(shapes, tokenizer))

    def loss_of(indices):
        batch = [lines[i] + tokenizer.eos_token for i in indices]
        encoded = tokenizer(batch, padding=True, padding_side="right", return_tensors="pt")
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        return model(**encoded, labels=labels).loss

    return model, _fit("llm", model, len(lines), loss_of, steps, batch_size, lr, seed, log_every)


def base_checkpoint(output: str, processor, clip: CLIPModel, llm: LlamaForCausalLM, seed: int, **qmop_settings) -> str:
    """A QMoP-LLaVA folder: the frozen CLIP towers and the pre-trained LLM, a projector initialised with `seed`."""
    from configuration_qmop import QMoPConfig
    from qmop_tools.files import save_pretrained_atomically
    from qmop_tools.testing.tiny import build_model

    config = QMoPConfig(
        vision_config=clip.config.vision_config.to_dict(),
        text_encoder_config=clip.config.text_config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_id=processor.image_token_id,
        **qmop_settings,
    )
    model = build_model(config, seed=seed)  # seeded init, eval mode, generation ids from the LLM config
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    model.model.text_encoder.load_state_dict(clip.text_model.state_dict())
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    return save_pretrained_atomically(output, model, processor)
