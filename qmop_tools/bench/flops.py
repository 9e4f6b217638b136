"""FLOPs two ways: torch's FLOP counter on the real forward, and the analytic count of shared/DESIGN.md section 6.

Convention: FLOPs = 2 x multiply-accumulates (what `torch.utils.flop_counter` reports). The paper's "0.94 TFLOPs at
144 tokens" counts multiply-accumulates of the visual tokens through Vicuna-7B: `paper_visual_llm_macs` gives it.

Per transformer layer with n tokens, width d, key/value width d_kv, FFN width m (QG-VTC Eq. 6, GQA-aware):
    projections 2·n·d² + 2·n·d·d_kv,  attention 2·n²·d,  FFN 2·n·d·m (GELU) or 3·n·d·m (SwiGLU)      [MACs]
Only matrix products are counted (as the FLOP counter does): norms, softmax and pooling are not.
With QG-VTC tower pruning (`config.tower_pruning_schedule`) each vision layer runs on the patches left before it, the
steps' scoring and recycling are charged to the vision tower, and the branches read the K patches left at the end.
With mid-LLM pruning (`config.llm_pruning_layer`) the LLM layers from that one on run on the kept positions, and the
ranking's projections and scores are charged to the LLM.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode


# ===================================================================================== analytic
def transformer_layer_macs(tokens: int, width: int, ffn_width: int, kv_width: Optional[int] = None,
                           gated_ffn: bool = False) -> int:
    kv_width = width if kv_width is None else kv_width
    projections = 2 * tokens * width * width + 2 * tokens * width * kv_width  # q, o; k, v
    attention = 2 * tokens * tokens * width  # scores and weighted sum over all heads
    ffn = (3 if gated_ffn else 2) * tokens * width * ffn_width
    return projections + attention + ffn


def _kv_width(llm_config) -> int:
    head_dim = getattr(llm_config, "head_dim", None) or llm_config.hidden_size // llm_config.num_attention_heads
    return (getattr(llm_config, "num_key_value_heads", None) or llm_config.num_attention_heads) * head_dim


def llm_prefill_macs(llm_config, tokens: int, logits_kept: int = 1, pruning: Optional["LLMPruning"] = None) -> int:
    """Llama-style decoder over `tokens` positions plus the LM head on the last `logits_kept` positions. With
    `pruning` (`llm_pruning_layer`), the layers from `pruning.layer` on run on `pruning.kept_tokens` positions, and
    that layer's ranking adds its q projection of the query rows, its k projection of every position and the
    query rows' scores against them."""
    width, ffn, kv_width = llm_config.hidden_size, llm_config.intermediate_size, _kv_width(llm_config)

    def layer(n: int) -> int:
        return transformer_layer_macs(n, width, ffn, kv_width, gated_ffn=True)

    head = logits_kept * width * llm_config.vocab_size
    if pruning is None:
        return llm_config.num_hidden_layers * layer(tokens) + head
    full, pruned = pruning.layer, llm_config.num_hidden_layers - pruning.layer
    ranking = pruning.query_rows * width * width + tokens * width * kv_width + pruning.query_rows * tokens * width
    return full * layer(tokens) + pruned * layer(pruning.kept_tokens) + ranking + head


@dataclass
class LLMPruning:
    """Mid-LLM pruning of one prompt, for the count: from decoder `layer` on, `kept_tokens` positions remain;
    `query_rows` text positions ranked the visual tokens."""

    layer: int
    kept_tokens: int
    query_rows: int

    @classmethod
    def of(cls, config, prompt_tokens: int, num_visual_tokens: int, query_rows: int) -> Optional["LLMPruning"]:
        """From a QMoPConfig (None without `llm_pruning_layer`); one image of `num_visual_tokens`."""
        if not getattr(config, "uses_llm_pruning", False):
            return None
        kept = prompt_tokens + min(config.llm_pruning_keep, num_visual_tokens)
        return cls(config.llm_pruning_layer, kept, query_rows)


def paper_visual_llm_macs(llm_config, visual_tokens: int) -> int:
    """The paper's Table 6 convention: the LLM layers over the visual tokens only (0.94 T at 144 for Vicuna-7B)."""
    return llm_config.num_hidden_layers * transformer_layer_macs(
        visual_tokens, llm_config.hidden_size, llm_config.intermediate_size, _kv_width(llm_config), gated_ffn=True
    )


def vision_tower_macs(vision_config, layers_run: int, plan=()) -> int:
    """Patch embedding (a convolution) plus `layers_run` CLIP layers over CLS + patches; with a tower pruning `plan`
    [(layer, patches kept after it), ...] each layer runs on the patches left before it (QG-VTC Eq. 6's n̂_i)."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    width = vision_config.hidden_size
    conv = patches * vision_config.num_channels * vision_config.patch_size**2 * width
    counts = tower_patch_counts(patches, layers_run, plan)
    return conv + sum(transformer_layer_macs(n + 1, width, vision_config.intermediate_size) for n in counts)


def tower_patch_counts(patches: int, layers_run: int, plan=()) -> list:
    """Patches entering each of the `layers_run` vision layers under a tower pruning `plan`."""
    keep_after = dict(plan)
    counts = []
    for layer in range(layers_run):
        counts.append(patches)
        patches = keep_after.get(layer, patches)
    return counts


def _score_macs(score: str, patches: int, width: int, recycle: bool) -> int:
    """`score_patches` on one layer's input of 1 + `patches` tokens (the question MLP is charged by the caller)."""
    tokens = patches + 1
    macs = tokens * width * width  # keys of CLS and patches
    if score == "cls_attention":
        macs += width * width + tokens * width  # q of CLS, CLS -> all scores
    else:
        macs += width * width + patches * width  # q of the question, question -> patch scores
    if recycle:
        macs += patches * width * width + patches * tokens * width  # q of patches, patch -> all attention
    return macs


def tower_pruning_macs(config) -> int:
    """Per image: the steps of QG-VTC tower pruning (scores, recycling, the question MLP once), beside the layers."""
    plan = config.tower_pruning_plan
    if not plan:
        return 0
    width = config.vision_config.hidden_size
    counts = tower_patch_counts(config.num_patches, config.vision_feature_hidden_state_index, plan)
    macs = 0
    if config.tower_pruning_score == "question_relevance":
        macs += config.text_encoder_config.hidden_size * width + width * width  # question MLP: Ct -> Cv -> Cv
    for layer, keep in plan:
        before = counts[layer]
        macs += _score_macs(config.tower_pruning_score, before, width, config.tower_pruning_recycle)
        if config.tower_pruning_recycle:
            macs += keep * before * width  # kept rows of the attention @ patches (Eq. 5)
    return macs


def text_encoder_macs(text_config, query_tokens: int) -> int:
    return text_config.num_hidden_layers * transformer_layer_macs(
        query_tokens, text_config.hidden_size, text_config.intermediate_size
    )


def expert_macs(vision_width: int, llm_width: int, tokens: int) -> int:
    """LLaVA's mlp2x_gelu: Cv -> D -> D."""
    return tokens * vision_width * llm_width + tokens * llm_width * llm_width


def branch_macs(config, branch: str, num_tokens: int) -> int:
    """One image through one QMoP branch at budget M = `num_tokens` (expert MLP included)."""
    vision = config.vision_config
    width, patches = vision.hidden_size, config.num_tower_patches  # what the branches read
    expert = expert_macs(width, config.text_config.hidden_size, num_tokens)
    if branch == "pooling":
        return expert
    if branch == "resampler":
        per_layer = (2 * num_tokens * width * width  # q, o projections of the queries
                     + 2 * patches * width * width  # k, v projections of the patches
                     + 2 * num_tokens * patches * width  # cross-attention
                     + 2 * num_tokens * width * config.resampler_intermediate_size)  # FFN
        return config.resampler_num_layers * per_layer + expert
    if branch == "pruning":  # the scores are charged separately (pruning_score_macs): every image pays them
        recycled = num_tokens * patches * width if config.pruning_recycle and num_tokens < patches else 0
        return expert + recycled  # kept-row attention @ patches
    raise ValueError(f"unknown branch {branch!r}.")


def pruning_score_macs(config) -> int:
    """Per image, whenever the pruning branch exists: QMoPModel.pruning_scores runs beside the vision tower,
    before the router decides (feature layer's keys of all tokens, the scoring query, the scores), on the patches
    that enter the feature layer."""
    width = config.vision_config.hidden_size
    layers_run = config.vision_feature_hidden_state_index
    patches = tower_patch_counts(config.num_patches, layers_run, config.tower_pruning_plan)[layers_run - 1]
    if config.pruning_score == "random" and not config.pruning_recycle:
        return 0
    if config.pruning_score == "learned":  # the scorer MLP (Cv -> Cv -> 1) on the patches leaving the feature layer
        macs = config.num_tower_patches * (width * width + width)
        if config.pruning_recycle:  # the feature layer's keys and patch -> all attention, as "cls_attention" has
            macs += _score_macs("cls_attention", patches, width, True)
        return macs
    score = "question_relevance" if config.pruning_score == "random" else config.pruning_score
    scores = _score_macs(score, patches, width, config.pruning_recycle)
    if config.pruning_score == "random":  # keys and the patch attention only
        scores -= width * width + patches * width
    if config.pruning_score == "question_relevance":  # the branch's own question MLP (Ct -> Cv -> Cv)
        scores += config.text_encoder_config.hidden_size * width + width * width
    return scores


def router_macs(config) -> int:
    query_width = config.text_encoder_config.hidden_size if config.router_mode == "query" else 0
    inputs = config.vision_config.hidden_size + query_width
    return inputs * config.router_hidden_size + config.router_hidden_size * len(config.branches)


@dataclass
class AnalyticFlops:
    """Prefill FLOPs (2 x MACs) of one batch, by component."""

    vision_tower: int
    text_encoder: int
    router: int
    branches: int  # QMoP's branches, or LLaVA's projector
    llm: int

    @property
    def total(self) -> int:
        return self.vision_tower + self.text_encoder + self.router + self.branches + self.llm

    def as_dict(self) -> dict:
        return dict(vision_tower=self.vision_tower, text_encoder=self.text_encoder, router=self.router,
                    branches=self.branches, llm=self.llm, total=self.total)


def qmop_analytic_flops(config, batch_size: int, prompt_tokens: int, num_visual_tokens: int, query_tokens: int,
                        branch_images: Optional[dict] = None, query_rows: Optional[int] = None) -> AnalyticFlops:
    """`branch_images`: images that ran each branch (from the router's weights); default: every image runs the
    `router_top_k` most expensive branches (an upper bound). `query_rows`: text positions after the image, which
    rank the visual tokens with `llm_pruning_layer` (needed only then)."""
    if config.uses_llm_pruning and query_rows is None:
        raise ValueError("`query_rows` is needed to count a model with `llm_pruning_layer`.")
    pruning = LLMPruning.of(config, prompt_tokens, num_visual_tokens, query_rows)
    if branch_images is None:
        costs = sorted((branch_macs(config, b, num_visual_tokens), b) for b in config.branches)
        chosen = [b for _, b in costs[-config.router_top_k:]] if config.uses_router else list(config.branches)
        branch_images = {b: batch_size for b in chosen}
    uses_router = config.uses_router
    return AnalyticFlops(
        vision_tower=2 * batch_size * (
            vision_tower_macs(config.vision_config, config.vision_feature_hidden_state_index, config.tower_pruning_plan)
            + tower_pruning_macs(config)
        ),
        text_encoder=2 * batch_size * text_encoder_macs(config.text_encoder_config, query_tokens) if config.uses_query else 0,
        router=2 * batch_size * router_macs(config) if uses_router else 0,
        branches=2 * sum(n * branch_macs(config, b, num_visual_tokens) for b, n in branch_images.items())
        + (2 * batch_size * pruning_score_macs(config) if "pruning" in config.branches else 0),
        llm=2 * batch_size * llm_prefill_macs(config.text_config, prompt_tokens + num_visual_tokens, pruning=pruning),
    )


def llava_analytic_flops(config, batch_size: int, prompt_tokens: int) -> AnalyticFlops:
    """transformers' LLaVA runs every vision layer (it asks for all hidden states and takes the penultimate)."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return AnalyticFlops(
        vision_tower=2 * batch_size * vision_tower_macs(vision, vision.num_hidden_layers),
        text_encoder=0,
        router=0,
        branches=2 * batch_size * expert_macs(vision.hidden_size, config.text_config.hidden_size, patches),
        llm=2 * batch_size * llm_prefill_macs(config.text_config, prompt_tokens + patches),
    )


# ===================================================================================== counted
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's counter has no formula for the CPU flash-attention kernel: QKᵀ and AV, 2 FLOPs per MAC."""
    batch, heads, query_len, head_dim = query_shape
    key_len, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * query_len * key_len * (head_dim + value_dim)


def _custom_formulas() -> dict:
    formulas = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        formulas[op] = _cpu_sdpa_flops
    return formulas


def flop_counter() -> FlopCounterMode:
    """A quiet FlopCounterMode that also counts SDPA on CPU (`with flop_counter() as counter: ...`)."""
    return FlopCounterMode(display=False, custom_mapping=_custom_formulas())


def count_flops(fn, *args, **kwargs):
    """(result, FLOPs) of one call under the counter."""
    with flop_counter() as counter:
        result = fn(*args, **kwargs)
    return result, counter.get_total_flops()


def check_match(counted: int, analytic: int) -> float:
    """counted / analytic (1.0 = the formula explains every counted FLOP)."""
    return counted / analytic if analytic else math.nan
