"""The mini VTCBench's frozen foundation, trained here because no weights can be downloaded.

- Tokenizers (LLM and CLIP-style) trained on the dataset's text (`conversion.tiny.build_processor(corpus=...)`).
- A tiny CLIP (ViT on the 24 x 24 patch grid + text transformer) pre-trained contrastively on image-caption pairs
  of the train split, then frozen: its vision tower becomes QMoP's vision tower, its text transformer the router's
  text encoder, as QMoP freezes OpenAI's CLIP.
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
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, LlamaConfig, LlamaForCausalLM

logger = logging.getLogger(__name__)


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
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
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


def pretrain_clip(processor, image_folder: str, records: list, shapes: TowerShapes, steps: int, batch_size: int = 64,
                  lr: float = 2e-3, seed: int = 0, log_every: int = 25) -> tuple[CLIPModel, dict]:
    """Contrastive (InfoNCE both ways) pre-training on (image, caption) pairs; returns the model and a report."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=text_encoder_config(shapes, processor.query_tokenizer).to_dict(),
        vision_config=vision_config(shapes, processor.image_processor.crop_size["height"], processor.patch_size).to_dict(),
        projection_dim=shapes.vision_width,
    )
    model = CLIPModel(config)
    pixels = load_pixels(processor, image_folder, records)
    captions = processor.query_tokenizer([r["caption"] for r in records], padding=True, truncation=True,
                                         max_length=77, return_tensors="pt")

    def loss_of(indices):
        index = torch.tensor(indices)
        return model(input_ids=captions["input_ids"][index], attention_mask=captions["attention_mask"][index],
                     pixel_values=pixels[index], return_loss=True).loss

    return model, _fit("clip", model, len(records), loss_of, steps, batch_size, lr, seed, log_every)


@torch.no_grad()
def clip_retrieval_accuracy(model: CLIPModel, processor, image_folder: str, records: list) -> float:
    """Image-to-caption top-1 retrieval among `records` (a sanity check of the pre-training)."""
    pixels = load_pixels(processor, image_folder, records)
    captions = processor.query_tokenizer([r["caption"] for r in records], padding=True, return_tensors="pt")
    out = model(input_ids=captions["input_ids"], attention_mask=captions["attention_mask"], pixel_values=pixels)
    return (out.logits_per_image.argmax(-1) == torch.arange(len(records))).float().mean().item()


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
    from conversion.tiny import build_model, save_pretrained_atomically

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
