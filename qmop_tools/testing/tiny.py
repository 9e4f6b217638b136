"""Tiny QMoP-LLaVA checkpoints built locally (nothing is downloaded): for tests and the demo.

    qmop tiny --output /tmp/qmop-tiny [--num-visual-tokens 16] [--branches pooling pruning]

Tokenizers are byte-level BPE models trained in milliseconds on a small built-in corpus: an LLM tokenizer with
`<s>`, `</s>`, `<unk>`, `<pad>` and `<image>`, and a CLIP-style query tokenizer (`<|startoftext|>`,
`<|endoftext|>`, padding with EOS as CLIP does). Towers: CLIP vision (48 px, patch 6 → 8×8 = 64 patches),
CLIP text and Llama, all 32 wide with 2 layers.
"""

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoConfig, CLIPImageProcessor, CLIPTextConfig, CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast  # noqa: E402

from configuration_qmop import QMoPConfig  # noqa: E402
from modeling_qmop import QMoPForConditionalGeneration  # noqa: E402
from processing_qmop import QMoPProcessor  # noqa: E402
from qmop_tools.files import save_pretrained_atomically  # noqa: E402

CORPUS = """
a chat between a curious user and an artificial intelligence assistant. the assistant gives helpful answers.
user: what is in the image? assistant: a red circle on a blue background.
what colour is the small square in the top left corner? it is green.
how many objects are there? there are three objects: a circle, a square and a triangle.
describe the picture. a photo of a cat sitting on a wooden table next to a cup of coffee.
which shape is left of the yellow star? the purple triangle. is the texture striped or dotted? striped.
what is the background? a grey stone wall. what letter is written on the sign? the letter q.
where is the dog? the dog is under the tree, to the right of the house. answer with a single word.
one two three four five six seven eight nine ten red green blue yellow orange purple black white grey
big small large tiny left right top bottom middle center above below near far inside outside
"""
LLM_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CLIP_SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]


def _train_bpe(special_tokens, vocab_size, lowercase=False, corpus=None) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=special_tokens[0] if special_tokens[0] == "<unk>" else None))
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = list(corpus) if corpus is not None else CORPUS.strip().splitlines() * 4
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer


def build_llm_tokenizer(corpus=None, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Llama-like: `<s>` prepended, `</s>` as EOS, `<image>` one special token, `<pad>` for padding. Trained on
    `corpus` (lines of text; default: a small built-in one)."""
    raw = _train_bpe(LLM_SPECIAL_TOKENS, vocab_size=vocab_size, corpus=corpus)
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", raw.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=2048,
    )


def build_query_tokenizer(corpus=None, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """CLIP-like: lowercased, `<|startoftext|> … <|endoftext|>`, padded with `<|endoftext|>`, 77 tokens."""
    raw = _train_bpe(CLIP_SPECIAL_TOKENS, vocab_size=vocab_size, lowercase=True, corpus=corpus)
    bos, eos = CLIP_SPECIAL_TOKENS
    raw.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, raw.token_to_id(bos)), (eos, raw.token_to_id(eos))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=bos,
        eos_token=eos,
        unk_token=eos,
        pad_token=eos,
        padding_side="right",
        model_max_length=77,
    )


def build_processor(num_visual_tokens: int = 16, image_size: int = 48, patch_size: int = 6, corpus=None,
                    **kwargs) -> QMoPProcessor:
    """The tiny processor; with `corpus` (lines of text) both tokenizers are trained on it instead of the built-in
    one, with vocabularies large enough to hold its words whole."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return QMoPProcessor(
        image_processor=image_processor,
        tokenizer=build_llm_tokenizer(corpus, vocab_size=400 if corpus is None else 1000),
        query_tokenizer=build_query_tokenizer(corpus, vocab_size=300 if corpus is None else 1000),
        num_visual_tokens=num_visual_tokens,
        patch_size=patch_size,
        **kwargs,
    )


# Tiny Mixture-of-Experts language models (`build_config(language_model=...)`): 4 experts, 2 per token, in every layer;
# every intermediate size becomes 2 x width, as the dense model's.
TINY_MOE = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 32},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
}


def build_config(processor: QMoPProcessor, image_size: int = 48, patch_size: int = 6, width: int = 32,
                 language_model: str = "llama", **kwargs) -> QMoPConfig:
    """`language_model`: "llama" (dense) or one of `TINY_MOE`'s model types, with the same widths."""
    tokenizer, query_tokenizer = processor.tokenizer, processor.query_tokenizer
    vision = CLIPVisionConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=width,
    )
    text_encoder = CLIPTextConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=len(query_tokenizer), max_position_embeddings=77, projection_dim=width,
        bos_token_id=query_tokenizer.bos_token_id, eos_token_id=query_tokenizer.eos_token_id,
        pad_token_id=query_tokenizer.pad_token_id,
    )
    text_fields = dict(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if language_model == "llama":
        text = LlamaConfig(**text_fields)
    elif language_model in TINY_MOE:
        moe = {k: 2 * width if k.endswith("intermediate_size") else v for k, v in TINY_MOE[language_model].items()}
        text = AutoConfig.for_model(language_model, **text_fields, **moe)
    else:
        raise ValueError(f"`language_model` must be 'llama' or one of {sorted(TINY_MOE)}, got {language_model!r}.")
    settings = dict(
        num_visual_tokens=processor.num_visual_tokens, router_hidden_size=16, resampler_num_layers=1,
        image_token_id=processor.image_token_id,
    )
    settings.update(kwargs)
    return QMoPConfig(vision_config=vision, text_encoder_config=text_encoder, text_config=text, **settings)


def build_model(config: QMoPConfig, seed: int = 0) -> QMoPForConditionalGeneration:
    torch.manual_seed(seed)
    model = QMoPForConditionalGeneration(config).eval()
    generation = model.generation_config
    generation.bos_token_id = config.text_config.bos_token_id
    generation.eos_token_id = config.text_config.eos_token_id
    generation.pad_token_id = config.text_config.pad_token_id
    return model


def build_tiny(num_visual_tokens: int = 16, seed: int = 0, processor_kwargs=None, **config_kwargs):
    """(model, processor) with random weights."""
    processor = build_processor(num_visual_tokens=num_visual_tokens, **(processor_kwargs or {}))
    return build_model(build_config(processor, **config_kwargs), seed=seed), processor


def save_tiny_checkpoint(output: str, **kwargs) -> str:
    """Write a complete checkpoint folder (weights, config, processor, code) atomically."""
    model, processor = build_tiny(**kwargs)
    return save_pretrained_atomically(output, model, processor)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="qmop tiny", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--num-visual-tokens", type=int, default=16)
    parser.add_argument("--branches", nargs="+", default=["pooling", "resampler", "pruning"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if os.path.isdir(args.output) and os.listdir(args.output):  # the write replaces the folder: never a user's files
        parser.error(f"--output {args.output!r} exists and is not empty; choose a new folder.")
    path = save_tiny_checkpoint(args.output, num_visual_tokens=args.num_visual_tokens, branches=args.branches, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
