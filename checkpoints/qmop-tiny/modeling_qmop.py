# Copyright 2026 The QMoP-LLaVA authors. Licensed under the Apache License, Version 2.0.
"""QMoP-LLaVA: LLaVA-1.5 with a Query Guided Mixture-of-Projector.

    image ─CLIP ViT─► hidden state `vision_feature_layer` ─► patches X (N, P, Cv), CLS v (N, Cv)
    question ─CLIP text encoder─► EOS embedding t (N, Ct)
    pooling branch   : X ─2-D average pool to √M×√M──────────────► (N, M, Cv) ─expert MLP─► (N, M, D)
    resampler branch : M queries cross-attend to X ─────────────► (N, M, Cv) ─expert MLP─► (N, M, D)
    pruning branch   : score patches, keep top-M in raster order ► (N, M, Cv) ─expert MLP─► (N, M, D)
    router           : g = top-k(softmax((MLP([LN v; LN t]) + Gumbel) / τ))                  (N, 3)
    tower pruning    : optional (QG-VTC, `tower_pruning_schedule`): at scheduled tower layers the same score and
                       selection as the pruning branch keep K < P patches; the branches then read K patches and
                       their grid positions (docs/compression.md)
    fusion           : Z = Σ_b g_b · branch_b(X)                                            (N, M, D)
    language model   : text embeddings with Z scattered into the M `<image>` placeholders of each image

Shapes use one alphabet: N images, B prompts, T text positions, P patches, S = 1 + P vision tokens, M visual
tokens kept per image, K patches left by tower pruning (K = P without it), Cv / Ct vision / text-encoder width,
D language-model width, H heads, h head width.
Sources: QMoP (arXiv, March 2026) and QG-VTC (arXiv 2504.00654) for Eq. 4-5; choices in shared/DESIGN.md.
"""

import contextlib
import functools
import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import (
    AutoModel,
    CLIPPreTrainedModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.modeling_utils import ModuleUtilsMixin
from transformers.utils import logging

try:  # remote code (transformers_modules.<repo>) or installed package
    from .configuration_qmop import BRANCH_ORDER, QMoPConfig
except ImportError:  # flat checkout on sys.path (tests, conversion scripts)
    from configuration_qmop import BRANCH_ORDER, QMoPConfig

logger = logging.get_logger(__name__)


# ===================================================================================== transformers versions
# The only place that branches on the transformers version (4.57.x and 5.x are supported).
TRANSFORMERS_V5 = int(transformers.__version__.split(".")[0]) >= 5
# 5.x tells prepare_inputs_for_generation whether this is the prefill; 4.x passes cache_position instead.
_GENERATE_HAS_FIRST_ITERATION = (
    "is_first_iteration" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
)


# Tensor-parallel style of `lm_head` (as transformers' LLaVA / Llama declare it in each version).
_LM_HEAD_TP_STYLE = "colwise_gather_output" if TRANSFORMERS_V5 else "colwise_rep"


class _CLIPTower(ModuleUtilsMixin):
    """4.x only: what tools read on a PreTrainedModel tower (attention support flags, `dtype`, `device`), for the
    unwrapped CLIP transformers below."""

    _supports_sdpa = CLIPPreTrainedModel._supports_sdpa
    _supports_flash_attn_2 = getattr(CLIPPreTrainedModel, "_supports_flash_attn_2", False)
    _supports_flex_attn = getattr(CLIPPreTrainedModel, "_supports_flex_attn", False)
    _supports_attention_backend = getattr(CLIPPreTrainedModel, "_supports_attention_backend", False)


if TRANSFORMERS_V5:
    # 5.x CLIPVisionModel / CLIPTextModel hold embeddings and encoder themselves: the same module paths and checkpoint
    # keys (`vision_tower.encoder.layers.0...`) as the unwrapped 4.x towers below.
    _VISION_TOWER_CLASS, _TEXT_ENCODER_CLASS = CLIPVisionModel, CLIPTextModel
else:
    # 4.x wraps them as `.vision_model` / `.text_model`; QMoP holds the inner transformers directly.
    from transformers.models.clip.modeling_clip import CLIPTextTransformer, CLIPVisionTransformer

    class QMoPCLIPVisionTower(_CLIPTower, CLIPVisionTransformer):
        pass

    class QMoPCLIPTextEncoder(_CLIPTower, CLIPTextTransformer):
        pass

    _VISION_TOWER_CLASS, _TEXT_ENCODER_CLASS = QMoPCLIPVisionTower, QMoPCLIPTextEncoder


def _build_clip_towers(config) -> tuple[nn.Module, nn.Module]:
    """The vision tower and the CLIP text encoder of a QMoPConfig."""
    if not TRANSFORMERS_V5:  # the plain 4.x towers do not resolve their attention implementation themselves
        for sub_config in (config.vision_config, config.text_encoder_config):
            if getattr(sub_config, "_attn_implementation", None) is None:
                sub_config._attn_implementation = config._attn_implementation
    return _VISION_TOWER_CLASS(config.vision_config), _TEXT_ENCODER_CLASS(config.text_encoder_config)


def _init_clip_module(module: nn.Module) -> bool:
    """4.x: initialise a module of an unwrapped CLIP tower with CLIP's own `_init_weights` (which reads only
    `self.config`, here the module's CLIP config). Returns whether it was a CLIP module. On 5.x the towers are CLIP
    PreTrainedModels and transformers dispatches to their own initialisation."""
    config = getattr(module, "config", None)
    if TRANSFORMERS_V5 or not isinstance(config, (CLIPVisionConfig, CLIPTextConfig)):
        return False
    CLIPPreTrainedModel._init_weights(module, module)
    return True


def _run_clip_encoder_layer(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """One CLIPEncoderLayer without masks: 5.x takes (hidden, mask) and returns a tensor, 4.x takes
    (hidden, mask, causal_mask) and returns a tuple."""
    out = layer(hidden_states, None) if TRANSFORMERS_V5 else layer(hidden_states, None, None)
    return out[0] if isinstance(out, tuple) else out


def _is_first_generation_step(kwargs: dict) -> bool:
    if _GENERATE_HAS_FIRST_ITERATION:
        return bool(kwargs.get("is_first_iteration", False))
    cache_position = kwargs.get("cache_position")
    return cache_position is None or int(cache_position[0]) == 0


# ===================================================================================== helpers
def _execution_device(module: nn.Module) -> Optional[torch.device]:
    """Device a module computes on: accelerate's hook device under device_map/offload, else its parameters'."""
    hook_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if hook_device is not None:
        return torch.device(hook_device) if not isinstance(hook_device, torch.device) else hook_device
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return None


def _to(tensor: Optional[torch.Tensor], device: Optional[torch.device]) -> Optional[torch.Tensor]:
    return tensor if tensor is None or device is None else tensor.to(device)


def _check_pixel_values(pixel_values: torch.Tensor) -> None:
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"`pixel_values` must be a tensor (from QMoPProcessor), got {type(pixel_values).__name__}.")
    if not torch.is_floating_point(pixel_values):
        raise TypeError(f"`pixel_values` must be a float tensor (from QMoPProcessor), got dtype {pixel_values.dtype}.")
    if pixel_values.ndim != 4:
        raise ValueError(
            f"`pixel_values` must have shape (num_images, channels, height, width), got {tuple(pixel_values.shape)}."
        )
    if pixel_values.device.type != "meta" and not bool(torch.isfinite(pixel_values).all()):
        raise ValueError(
            f"`pixel_values` hold {int((~torch.isfinite(pixel_values)).sum())} NaN or infinite value(s); a model fed "
            "non-finite pixels has no meaningful answer."
        )


def _check_token_ids(name: str, ids) -> None:
    """`input_ids` / `query_input_ids`: a (batch, sequence) integer tensor."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"`{name}` must be a tensor of token ids, got {type(ids).__name__}.")
    if torch.is_floating_point(ids) or ids.dtype == torch.bool:
        raise TypeError(f"`{name}` must be integer token ids, got dtype {ids.dtype}.")
    if ids.ndim != 2:
        raise ValueError(
            f"`{name}` must have shape (batch, sequence_length), got {tuple(ids.shape)}; add a batch dimension "
            "(`ids[None]`) for a single sequence."
        )


def _check_labels(labels, input_ids, inputs_embeds) -> None:
    """`labels` are token ids of the same (batch, sequence) shape as the inputs (-100 = ignored)."""
    if not isinstance(labels, torch.Tensor) or torch.is_floating_point(labels) or labels.dtype == torch.bool:
        kind = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"`labels` must be an integer tensor of token ids (-100 = ignored), got {kind}.")
    expected = tuple(input_ids.shape) if input_ids is not None else tuple(inputs_embeds.shape[:2])
    if tuple(labels.shape) != expected:
        raise ValueError(
            f"`labels` must have the inputs' shape (batch, sequence_length) = {expected}, got {tuple(labels.shape)}."
        )


@torch.no_grad()
def per_sample_lm_loss(logits: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample over its supervised targets, float32 (B,); NaN for a sample
    without any. `shift_labels` (B, T): position t holds the target of position t (-100: not supervised). One sample
    at a time, so the float32 copy of the logits is one (T, V) slice, not the batch's."""
    losses = []
    for sample_logits, targets in zip(logits, shift_labels):  # (T, V), (T,)
        supervised = targets != -100
        token_losses = F.cross_entropy(sample_logits.float(), targets.clamp(min=0), reduction="none")  # (T,)
        losses.append((token_losses * supervised).sum() / supervised.sum())  # 0 / 0 = NaN without targets
    return torch.stack(losses)


def outcome_regression_loss(
    router_logits: torch.Tensor, router_weights: torch.Tensor, sample_losses: torch.Tensor, image_samples: torch.Tensor
) -> torch.Tensor:
    """An outcome-trained router's loss: the squared error between the drawn branch's predicted loss (its negated
    logit) and the LM loss of the image's sample, averaged over the images whose sample has supervised targets.
    router_logits / router_weights (N, nb) with one-hot weights; sample_losses (B,); image_samples (N,) sample index
    of each image."""
    predicted = -(router_logits * router_weights).sum(dim=-1)  # (N,)
    target = sample_losses.to(predicted.device)[image_samples.to(predicted.device)].detach()  # (N,)
    valid = torch.isfinite(target)
    error = torch.where(valid, predicted - target.nan_to_num(), 0.0).pow(2)  # (N,)
    return error.sum() / valid.sum().clamp(min=1)


def router_temperature_at(config: QMoPConfig, progress: float) -> float:
    """Annealed router temperature at training progress in [0, 1] (shape: `router_temperature_schedule`)."""
    start, end = config.router_temperature, config.router_min_temperature
    progress = min(max(float(progress), 0.0), 1.0)
    schedule = config.router_temperature_schedule
    if schedule == "constant":
        return start
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "exponential":
        return start * (end / start) ** progress
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))  # cosine


def _check_unambiguous_budget(run_lengths: torch.Tensor, num_images: int, per_image: int, config_budget: int) -> None:
    """M is read from the placeholders. When some run of consecutive placeholders must hold several images, the split
    is a guess (4 images over one image's 16 placeholders would silently become 4 tokens each): accept it only at
    the config's budget."""
    if len(run_lengths) == num_images or per_image == config_budget:
        return
    raise ValueError(
        f"Image features and image tokens do not match: {num_images} images for {int(run_lengths.sum())} `<image>` "
        f"placeholders in {len(run_lengths)} run(s) of lengths {run_lengths.tolist()}. Each image needs its own "
        f"M placeholders (config budget {config_budget}); build prompts with QMoPProcessor, one `<image>` per image."
    )


# ===================================================================================== outputs
@dataclass
class QMoPProjectorOutput(ModelOutput):
    """
    image_features (`torch.FloatTensor` of shape `(num_images, M, D)`): fused visual tokens for the LLM.
    router_weights (`torch.FloatTensor` of shape `(num_images, num_branches)`): weight of each branch per image
        (columns follow `config.branches`; zero for branches the top-k dropped).
    router_probs (`torch.FloatTensor` of shape `(num_images, num_branches)`): router softmax before top-k.
    router_logits (`torch.FloatTensor` of shape `(num_images, num_branches)`): router logits before noise and
        temperature (what `qmop_tools.router_diagnostics` analyses).
    kept_patch_indices (`torch.LongTensor` of shape `(num_images, M)`): patches the pruning branch kept (indices on
        the full patch grid, also after tower pruning), in raster order; -1 for images whose router did not select
        pruning. `None` without a pruning branch.
    aux_loss (`torch.FloatTensor`): load-balancing loss of the router (`None` without a router).
    router_z_loss (`torch.FloatTensor`): z-loss of the router logits (`None` without a router).
    """

    image_features: Optional[torch.FloatTensor] = None
    router_weights: Optional[torch.FloatTensor] = None
    router_probs: Optional[torch.FloatTensor] = None
    router_logits: Optional[torch.FloatTensor] = None
    kept_patch_indices: Optional[torch.LongTensor] = None
    aux_loss: Optional[torch.FloatTensor] = None
    router_z_loss: Optional[torch.FloatTensor] = None


@dataclass
class QMoPImageFeaturesOutput(BaseModelOutputWithPooling):
    """Output of `get_image_features`, LLaVA's layout plus what the projector decided:

    last_hidden_state (`torch.FloatTensor` of shape `(num_images, 1 + K, Cv)`): the vision tower's hidden state at
        `vision_feature_layer` (CLS first), which the branches read (K = P patches, fewer with tower pruning).
    pooler_output (`tuple(torch.FloatTensor)`): one `(M, D)` tensor per image, the visual tokens given to the LLM
        (as LLaVA's `pooler_output`).
    hidden_states / attentions: the vision tower's, when asked for (`output_hidden_states` / `output_attentions`).
    image_features (`torch.FloatTensor` of shape `(num_images, M, D)`): the same visual tokens, stacked.
    router_weights, router_probs, router_logits, kept_patch_indices, aux_loss, router_z_loss: see
        [`QMoPProjectorOutput`].
    """

    image_features: Optional[torch.FloatTensor] = None
    router_weights: Optional[torch.FloatTensor] = None
    router_probs: Optional[torch.FloatTensor] = None
    router_logits: Optional[torch.FloatTensor] = None
    kept_patch_indices: Optional[torch.LongTensor] = None
    aux_loss: Optional[torch.FloatTensor] = None
    router_z_loss: Optional[torch.FloatTensor] = None


@dataclass
class QMoPModelOutputWithPast(ModelOutput):
    """Output of [`QMoPModel`]: the language model's output plus what the projector decided (see
    [`QMoPProjectorOutput`]); the image fields are `None` on decode steps, where no image is processed."""

    last_hidden_state: Optional[torch.FloatTensor] = None
    past_key_values: Optional[object] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    image_hidden_states: Optional[torch.FloatTensor] = None
    router_weights: Optional[torch.FloatTensor] = None
    router_probs: Optional[torch.FloatTensor] = None
    router_logits: Optional[torch.FloatTensor] = None
    kept_patch_indices: Optional[torch.LongTensor] = None
    aux_loss: Optional[torch.FloatTensor] = None
    router_z_loss: Optional[torch.FloatTensor] = None
    llm_router_logits: Optional[tuple] = None


@dataclass
class QMoPCausalLMOutputWithPast(ModelOutput):
    """Output of [`QMoPForConditionalGeneration`]. `loss` = LM loss + `router_aux_loss_coef` · `aux_loss` +
    `router_z_loss_coef` · `router_z_loss` (+ `router_outcome_loss_coef` · `router_outcome_loss` for an
    outcome-trained router in training) when labels are given. With a Mixture-of-Experts language model that outputs
    its router logits (`output_router_logits`, from the call or `text_config`), `llm_router_logits` holds them per
    layer and `llm_aux_loss` is its own load-balancing loss (the model's `load_balancing_loss_func`), added to
    `loss` with `text_config.router_aux_loss_coef`, as the language model's own causal-LM head would. With
    `smoes_loss_coef` > 0, in training with labels, `smoes_loss` is SMoES' regulariser (`smoes_regularizer`), added
    with that weight."""

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    past_key_values: Optional[object] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    image_hidden_states: Optional[torch.FloatTensor] = None
    router_weights: Optional[torch.FloatTensor] = None
    router_probs: Optional[torch.FloatTensor] = None
    router_logits: Optional[torch.FloatTensor] = None
    kept_patch_indices: Optional[torch.LongTensor] = None
    aux_loss: Optional[torch.FloatTensor] = None
    router_z_loss: Optional[torch.FloatTensor] = None
    router_outcome_loss: Optional[torch.FloatTensor] = None
    llm_router_logits: Optional[tuple] = None
    llm_aux_loss: Optional[torch.FloatTensor] = None
    smoes_loss: Optional[torch.FloatTensor] = None


class QMoPVisionFeatures(NamedTuple):
    """What [`QMoPModel.encode_vision`] gives the projector."""

    hidden: torch.Tensor  # (N, 1 + K, Cv) the feature layer's output, CLS first
    layer_input: Optional[torch.Tensor]  # (N, 1 + K', Cv) its input (K' > K when the feature layer itself prunes)
    feature_layer: Optional[nn.Module]  # the feature layer (None when it is the embeddings)
    patch_positions: Optional[torch.Tensor]  # (N, K) grid indices of the patches left by tower pruning, or None
    feature_layer_kept: Optional[torch.Tensor]  # (N, K) which of the K' input patches the feature layer kept, or None


# ===================================================================================== branches
class QMoPExpertMLP(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu` projector, one per branch: Cv → D → D."""

    def __init__(self, config: QMoPConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (N, M, Cv) -> (N, M, D)
        return self.linear_2(self.act(self.linear_1(tokens)))


def pool_patch_grid(
    patches: torch.Tensor, side: int, positions: Optional[torch.Tensor] = None, grid: Optional[int] = None
) -> torch.Tensor:
    """Adaptive 2-D average pooling of a square patch grid: (N, P, C) -> (N, side², C).

    With `positions` (N, K), the raster indices of the patches left by tower pruning on a `grid`×`grid` grid,
    `patches` is (N, K, C) and each cell averages the kept patches inside it; a cell with none takes the average of
    all kept patches (the image's global mean, the coarsest pooling).
    """
    if positions is not None:
        return _pool_kept_patches(patches, side, positions, grid)
    num_images, num_patches, channels = patches.shape
    grid = math.isqrt(num_patches)
    # Channels-last (a view of the raster-ordered patches, no copy): the same sums as NCHW, an order of magnitude
    # faster on CPU than pooling a transposed copy.
    x = patches.reshape(num_images, grid, grid, channels).permute(0, 3, 1, 2)  # (N, C, √P, √P), channels-last
    x = F.adaptive_avg_pool2d(x, side)  # (N, C, side, side), channels-last
    return x.permute(0, 2, 3, 1).reshape(num_images, side * side, channels)  # (N, side², C)


def _pool_kept_patches(patches: torch.Tensor, side: int, positions: torch.Tensor, grid: int) -> torch.Tensor:
    num_images, _, channels = patches.shape
    values = patches.float()
    full = values.new_zeros(num_images, grid * grid, channels)  # (N, P, C)
    full = full.scatter(1, positions.unsqueeze(-1).expand(-1, -1, channels), values)  # (N, P, C), zero where pruned
    present = values.new_zeros(num_images, grid * grid, 1).scatter(1, positions.unsqueeze(-1), 1.0)  # (N, P, 1)
    # Average pooling of the values and of the presence mask: their ratio is the mean over the kept patches of a cell.
    sums, counts = pool_patch_grid(full, side), pool_patch_grid(present, side)  # (N, side², C), (N, side², 1)
    kept_mean = values.mean(dim=1, keepdim=True)  # (N, 1, C)
    pooled = torch.where(counts > 0, sums / counts.clamp_min(1e-6), kept_mean)  # (N, side², C)
    return pooled.to(patches.dtype)


class QMoPPoolingBranch(nn.Module):
    """Coarse global semantics: average-pool the 2-D patch grid to √M×√M (M = P is the identity: LLaVA-1.5).
    After tower pruning, each cell averages its kept patches (`pool_patch_grid`)."""

    def __init__(self, config: QMoPConfig):
        super().__init__()
        self.grid = config.patch_grid
        self.expert = QMoPExpertMLP(config)

    def forward(self, patches: torch.Tensor, num_tokens: int, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        # patches (N, K, Cv); positions (N, K) grid indices after tower pruning, None for the full grid (K = P)
        pooled = pool_patch_grid(patches, math.isqrt(num_tokens), positions, self.grid)  # (N, M, Cv)
        return self.expert(pooled)  # (N, M, D)


class QMoPCrossAttentionLayer(nn.Module):
    """Pre-norm block: queries attend to all patches (SDPA), then an FFN."""

    def __init__(self, config: QMoPConfig):
        super().__init__()
        width = config.vision_config.hidden_size
        self.num_heads = config.resampler_num_heads
        self.head_dim = width // self.num_heads
        eps = config.vision_config.layer_norm_eps
        self.query_norm = nn.LayerNorm(width, eps=eps)
        self.context_norm = nn.LayerNorm(width, eps=eps)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)
        self.ffn_norm = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, config.resampler_intermediate_size)
        self.act = ACT2FN[config.vision_config.hidden_act]
        self.fc2 = nn.Linear(config.resampler_intermediate_size, width)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, Cv) -> (N, H, L, h)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q_in, kv_in = self.query_norm(queries), self.context_norm(context)  # (N, M, Cv), (N, P, Cv)
        attended = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q_in)), self._heads(self.k_proj(kv_in)), self._heads(self.v_proj(kv_in))
        )  # (N, H, M, h)
        attended = attended.transpose(1, 2).reshape(queries.shape)  # (N, M, Cv)
        queries = queries + self.o_proj(attended)
        return queries + self.fc2(self.act(self.fc1(self.ffn_norm(queries))))


class QMoPResamplerBranch(nn.Module):
    """High-level semantics: M queries (pooled grid + learned position embedding) cross-attend to all patches.

    The learned embedding is stored for the training budget's grid and bilinearly resized for other budgets. After
    tower pruning, the queries start from the pooled kept patches and cross-attend to the kept patches only.
    """

    def __init__(self, config: QMoPConfig):
        super().__init__()
        self.query_init = config.resampler_query_init
        self.grid = config.patch_grid
        side = math.isqrt(config.num_visual_tokens)
        self.query_embed = nn.Parameter(torch.zeros(side * side, config.vision_config.hidden_size))
        self.layers = nn.ModuleList(QMoPCrossAttentionLayer(config) for _ in range(config.resampler_num_layers))
        self.norm = nn.LayerNorm(config.vision_config.hidden_size, eps=config.vision_config.layer_norm_eps)
        self.expert = QMoPExpertMLP(config)

    def query_embedding(self, side: int) -> torch.Tensor:  # -> (side², Cv)
        stored = math.isqrt(self.query_embed.shape[0])
        if side == stored:
            return self.query_embed
        grid = self.query_embed.T.reshape(1, -1, stored, stored)  # (1, Cv, s0, s0)
        grid = F.interpolate(grid.float(), size=(side, side), mode="bilinear", align_corners=False)
        return grid.reshape(-1, side * side).T.to(self.query_embed.dtype)  # (side², Cv)

    def forward(self, patches: torch.Tensor, num_tokens: int, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        # patches (N, K, Cv); positions (N, K) grid indices after tower pruning, None for the full grid (K = P)
        side = math.isqrt(num_tokens)
        queries = self.query_embedding(side).unsqueeze(0).to(patches.dtype)  # (1, M, Cv)
        if self.query_init == "pooled":
            queries = pool_patch_grid(patches, side, positions, self.grid) + queries  # (N, M, Cv)
        else:
            queries = queries.expand(patches.shape[0], -1, -1)  # (N, M, Cv)
        for layer in self.layers:
            queries = layer(queries, patches)
        return self.expert(self.norm(queries))  # (N, M, D)


class QMoPQuestionProjection(nn.Module):
    """MLP aligning the question's EOS embedding with the vision space (QG-VTC Section 3.2): Ct → Cv → Cv."""

    def __init__(self, text_width: int, vision_width: int, act: str):
        super().__init__()
        self.linear_1 = nn.Linear(text_width, vision_width)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(vision_width, vision_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class QMoPPatchScorer(nn.Module):
    """LearnPruner's learnable pruner: an MLP scoring each patch the vision encoder outputs, Cv → Cv → 1."""

    def __init__(self, vision_width: int, act: str):
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, vision_width)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(vision_width, 1, bias=False)  # a bias would be a constant shift: softmax drops it

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # (N, K, Cv) -> (N, K) softmax over the patches
        return self.linear_2(self.act(self.linear_1(patches))).squeeze(-1).softmax(dim=-1)


class QMoPPruningBranch(nn.Module):
    """Fine local detail: keep the M highest-scoring patches in raster order, optionally recycle the rest.

    Scores come from the feature layer's own query/key projections, recomputed by [`score_patches`] next to the
    vision tower, so the tower can run under SDPA or flash attention (it is never asked for attention weights):
      - "cls_attention": softmax(q_CLS · Kᵀ / √h) of the feature layer, averaged over heads, patch columns.
      - "question_relevance" (QG-VTC Eq. 4): q = W_Q · `question_proj`(t); C = softmax(q · K_patchesᵀ / √h). Top-M
        is not differentiable, so kept tokens are scaled by a straight-through factor (value 1) that trains the MLP.
      - "learned" (LearnPruner's pruner): `scorer`, an MLP on the feature layer's output patches, softmax over them;
        trained through the same straight-through factor.
    With `pruning_recycle` (QG-VTC Eq. 5): kept_i += Σ_{j dropped} A(i, j) · X_j, A the feature layer's attention.
    Selection and recycling are [`select_patches`], shared with tower pruning; after tower pruning the branch selects
    within the K patches the tower kept.
    """

    def __init__(self, config: QMoPConfig):
        super().__init__()
        self.score = config.pruning_score
        self.recycle = config.pruning_recycle
        if self.score == "question_relevance":
            text_width, vision_width = config.text_encoder_config.hidden_size, config.vision_config.hidden_size
            self.question_proj = QMoPQuestionProjection(text_width, vision_width, config.projector_hidden_act)
        if self.score == "learned":
            self.scorer = QMoPPatchScorer(config.vision_config.hidden_size, config.projector_hidden_act)
        self.expert = QMoPExpertMLP(config)

    def forward(
        self,
        patches: torch.Tensor,
        scores: torch.Tensor,
        patch_attention: Optional[torch.Tensor],
        num_tokens: int,
        positions: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # patches (N, K, Cv); scores (N, K); patch_attention (N, K, K) head-averaged, or None; positions (N, K) grid
        # indices after tower pruning, None for the full grid (K = P)
        tokens, kept = select_patches(
            patches,
            scores,
            patch_attention if self.recycle else None,
            num_tokens,
            straight_through=self.score in ("question_relevance", "learned"),
        )  # (N, M, Cv), (N, M)
        if positions is not None:
            kept = positions.gather(1, kept)  # (N, M) grid indices, still in raster order
        return self.expert(tokens), kept  # (N, M, D), (N, M)


# ===================================================================================== tower pruning (QG-VTC)
def score_patches(
    layer: nn.Module,
    layer_input: torch.Tensor,
    score: str,
    question: Optional[torch.Tensor] = None,
    with_attention: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Patch scores (N, K) of one CLIP encoder layer and, `with_attention`, its head-averaged patch-to-patch attention
    (N, K, K), recomputed from the layer's q/k projections of its input (N, 1 + K, Cv), CLS first:
      - "cls_attention": softmax(q_CLS · Kᵀ / √h), patch columns.
      - "question_relevance" (QG-VTC Eq. 4): C = softmax(W_Q · question · K_patchesᵀ / √h), `question` (N, Cv) the
        question already mapped into the vision space.
      - "random": uniform noise (random-k).
    Every weight is used through a module call (layer_norm1, q_proj, k_proj), never read directly: under CPU/disk
    offload accelerate hooks each of these modules and loads its weights only for that call."""
    attn = layer.self_attn
    num_heads, scale = attn.num_heads, attn.head_dim**-0.5

    def heads(x):  # (N, L, Cv) -> (N, H, L, h)
        return x.view(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)

    normed = layer.layer_norm1(layer_input)  # (N, 1 + K, Cv)
    keys = heads(attn.k_proj(normed))  # (N, H, 1 + K, h)
    if score == "random":
        scores = torch.rand(keys.shape[0], keys.shape[2] - 1, device=keys.device)  # (N, K)
    elif score == "cls_attention":
        cls_query = heads(attn.q_proj(normed[:, :1]))  # (N, H, 1, h)
        probs = torch.softmax((cls_query @ keys.transpose(-1, -2)).float() * scale, dim=-1)  # (N, H, 1, 1 + K)
        scores = probs.mean(dim=1)[:, 0, 1:]  # (N, K)
    else:
        query = heads(attn.q_proj(_to(question, normed.device).to(normed.dtype).unsqueeze(1)))  # (N, H, 1, h)
        logits = (query @ keys[:, :, 1:].transpose(-1, -2)).float() * scale  # (N, H, 1, K)
        scores = torch.softmax(logits, dim=-1).mean(dim=1)[:, 0]  # (N, K)
    patch_attention = None
    if with_attention:
        patch_queries = heads(attn.q_proj(normed[:, 1:]))  # (N, H, K, h)
        attention = torch.softmax((patch_queries @ keys.transpose(-1, -2)).float() * scale, dim=-1)  # (N, H, K, 1 + K)
        patch_attention = attention.mean(dim=1)[:, :, 1:]  # (N, K, K)
    return scores, patch_attention


def select_patches(
    patches: torch.Tensor,
    scores: torch.Tensor,
    patch_attention: Optional[torch.Tensor],
    keep: int,
    straight_through: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `keep` highest-scoring patches in raster order; with `patch_attention` recycle the dropped ones into
    them (QG-VTC Eq. 5: kept_i += Σ_{j dropped} A(i, j) · X_j). `straight_through`: top-k is not differentiable, so
    the kept tokens are scaled by 1 + s - stop_grad(s) (value 1), which trains what produced the scores.
    patches (N, K, C), scores (N, K), patch_attention (N, K, K) -> tokens (N, keep, C), kept indices (N, keep)."""
    kept = scores.topk(keep, dim=-1).indices.sort(dim=-1).values  # (N, k), raster order
    gather_index = kept.unsqueeze(-1).expand(-1, -1, patches.shape[-1])  # (N, k, C)
    tokens = patches.gather(1, gather_index)  # (N, k, C)

    if patch_attention is not None and keep < patches.shape[1]:
        rows = kept.unsqueeze(-1).expand(-1, -1, patch_attention.shape[-1])  # (N, k, K)
        attention = patch_attention.gather(1, rows)  # (N, k, K): kept patch -> every patch
        dropped = torch.ones_like(scores, dtype=torch.bool).scatter(1, kept, False)  # (N, K)
        attention = attention * dropped.unsqueeze(1)  # only what is dropped is recycled
        tokens = tokens + attention.to(patches.dtype) @ patches  # (N, k, C)

    if straight_through:
        kept_scores = scores.gather(1, kept).unsqueeze(-1)  # (N, k, 1)
        tokens = tokens * (1.0 + kept_scores - kept_scores.detach()).to(tokens.dtype)
    return tokens, kept


class QMoPTowerPruner(nn.Module):
    """QG-VTC's hierarchical compression inside the vision tower (`config.tower_pruning_schedule`).

    After each scheduled layer: score its output patches with the layer's own q/k (`score_patches`, Eq. 4 with the
    question when `tower_pruning_score="question_relevance"`), keep the top ones in raster order and recycle the
    dropped ones into them by the layer's attention (`select_patches`, Eq. 5). The CLS token is always kept, and not
    recycled into (as in the pruning branch), so the router reads the tower's own CLS of the pruned image. Held by
    the projector: its question MLP trains with the projector, is freshly initialised at conversion and is never
    quantized.
    """

    def __init__(self, config: QMoPConfig):
        super().__init__()
        self.keep_after_layer = dict(config.tower_pruning_plan)  # {encoder layer: patches kept}
        self.score = config.tower_pruning_score
        self.recycle = config.tower_pruning_recycle
        if self.score == "question_relevance":
            text_width, vision_width = config.text_encoder_config.hidden_size, config.vision_config.hidden_size
            self.question_proj = QMoPQuestionProjection(text_width, vision_width, config.projector_hidden_act)

    def question_vector(self, query_embeds: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The question's EOS embedding (N, Ct) mapped into the vision space (N, Cv); None for CLS scoring."""
        if self.score != "question_relevance":
            return None
        return self.question_proj(_to(query_embeds, _execution_device(self)).to(self.question_proj.linear_1.bias.dtype))

    def forward(
        self, layer: nn.Module, layer_input: torch.Tensor, layer_output: torch.Tensor, keep: int,
        question: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """layer_input, layer_output (N, 1 + K, Cv) -> output with `keep` patches (N, 1 + keep, Cv), and which of the
        K patches were kept (N, keep), in raster order."""
        scores, attention = score_patches(layer, layer_input, self.score, question, with_attention=self.recycle)
        patches, kept = select_patches(
            layer_output[:, 1:], scores.to(layer_output.device), _to(attention, layer_output.device), keep,
            straight_through=self.score == "question_relevance",
        )  # (N, keep, Cv), (N, keep)
        return torch.cat([layer_output[:, :1], patches], dim=1), kept


# ===================================================================================== router
class RouterOutput(NamedTuple):
    weights: torch.Tensor  # (N, nb) fusion weights (zero outside the top-k)
    probs: torch.Tensor  # (N, nb) softmax before top-k
    logits: torch.Tensor  # (N, nb) before noise and temperature
    balance_loss: torch.Tensor  # () load balancing
    z_loss: torch.Tensor  # () mean logsumexp²


class QMoPRunningStandardize(nn.Module):
    """`router_input_norm="standardize"`: each feature minus its running mean, over its running standard deviation.

    The statistics are buffers (saved with the checkpoint), as BatchNorm's. The output uses the statistics as they
    stand, gathered from earlier batches only, so it never depends on the other samples of its batch, and a batch of
    one works; before any update (mean 0, variance 1) it is the identity up to 1 / sqrt(1 + eps). Then
    `forward(x, update=True)` folds the batch's mean, and its mean squared deviation from the updated mean, into them
    (no gradient): a plain running average for the first 1/momentum updates, then an exponential one of rate
    `momentum`.
    """

    def __init__(self, width: int, momentum: float, eps: float = 1e-5):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(width))
        self.register_buffer("running_var", torch.ones(width))
        self.register_buffer("num_updates", torch.zeros(()))

    def reset(self) -> None:
        nn.init.zeros_(self.running_mean)
        nn.init.ones_(self.running_var)
        nn.init.zeros_(self.num_updates)

    def forward(self, x: torch.Tensor, update: bool = False) -> torch.Tensor:
        """x (N, C) -> (N, C) in float32."""
        x = x.float()
        out = (x - self.running_mean.float()) / torch.sqrt(self.running_var.float() + self.eps)
        if update:
            with torch.no_grad():  # the rate stays on the device: no host sync in the training step
                self.num_updates += 1
                rate = self.num_updates.reciprocal().clamp(min=self.momentum).to(self.running_mean.dtype)
                self.running_mean.lerp_(x.mean(dim=0).to(self.running_mean.dtype), rate)
                deviation = (x - self.running_mean.float()).pow(2).mean(dim=0)  # (C,)
                self.running_var.lerp_(deviation.to(self.running_var.dtype), rate)
        return out


class QueryGuidedRouter(nn.Module):
    """Query Guided Router (QGR): weights for each branch from the vision CLS token and the question's EOS.

    logits = Linear(GELU(Linear([LN(v); LN(t)])))                (N, num_branches), bounded if `router_logit_cap`
    (`router_input_norm="standardize"`: `[LN(v); LN(t)]` standardised by running statistics, `QMoPRunningStandardize`)
    training: probs = softmax((logits + Gumbel) / τ), τ annealed by the trainer (`temperature`)
    eval:     probs = softmax(logits / router_inference_temperature), deterministic
    weights = probs restricted to the top-k branches, renormalised.
    Losses (weighted by the config, added to the LM loss): switch-style load balancing
    num_branches · Σ_b fraction_routed_b · mean_prob_b, and the z-loss mean(logsumexp(logits)²) (ST-MoE).

    `uniform` (set by the trainer, e.g. for stage 1 whose query is one constant caption prompt): every branch gets
    weight 1/num_branches, so all experts train and the router learns nothing it would have to unlearn.

    `router_training="outcome"` (a contextual bandit): the logits are negated predicted LM losses, one per branch.
    training: each image gets one branch (weight 1), drawn uniformly with probability `router_exploration`, else the
              argmax; the head regresses the drawn branch's logit on the sample's negated LM loss
              (`outcome_regression_loss`). No temperature, noise, balancing or z-loss (reported as 0). With `uniform`
              (stage 1) every branch gets 1/num_branches, as for the mixture.
    eval:     as above with top-1: the branch with the lowest predicted loss.
    """

    def __init__(self, config: QMoPConfig):
        super().__init__()
        self.uses_query = config.router_mode == "query"
        self.num_branches = len(config.branches)
        self.top_k = config.router_top_k
        self.gumbel_noise = config.router_gumbel_noise
        self.eval_temperature = config.router_inference_temperature
        self.logit_cap = config.router_logit_cap
        self.logit_cap_mode = config.router_logit_cap_mode
        self.outcome = config.router_training == "outcome"
        self.exploration = config.router_exploration
        # Training state, set by the training loop (`QMoPForConditionalGeneration.set_router_temperature` /
        # `set_router_uniform`): the current temperature, and whether routing is replaced by equal weights.
        self.temperature = config.router_temperature
        self.uniform = False
        # `QMoPForConditionalGeneration.forced_branch`: every image goes through this branch column alone (None: routed).
        self.forced_branch: Optional[int] = None
        vision_width = config.vision_config.hidden_size
        text_width = config.text_encoder_config.hidden_size if self.uses_query else 0
        eps = config.vision_config.layer_norm_eps
        self.vision_norm = nn.LayerNorm(vision_width, eps=eps)
        if self.uses_query:
            self.query_norm = nn.LayerNorm(text_width, eps=eps)
        self.standardize = None
        if config.router_input_norm == "standardize":
            self.standardize = QMoPRunningStandardize(vision_width + text_width, config.router_input_norm_momentum)
        self.linear_1 = nn.Linear(vision_width + text_width, config.router_hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(config.router_hidden_size, self.num_branches)

    def logits(self, cls_token: torch.Tensor, query_embeds: Optional[torch.Tensor]) -> torch.Tensor:
        """Router logits before noise and temperature, (N, Cv) + (N, Ct) -> (N, num_branches), float32."""
        dtype = self.linear_2.bias.dtype  # a bias is never quantized (unlike a Linear weight under 4-bit)
        features = [self.vision_norm(cls_token.to(dtype))]  # (N, Cv)
        if self.uses_query:
            features.append(self.query_norm(query_embeds.to(dtype)))  # (N, Ct)
        features = torch.cat(features, dim=-1)  # (N, Cv + Ct)
        if self.standardize is not None:  # statistics of what the router is trained on: not stage 1's equal weights
            features = self.standardize(features, update=self.training and not self.uniform).to(dtype)
        logits = self.linear_2(self.act(self.linear_1(features))).float()  # (N, nb)
        if self.logit_cap is not None and self.logit_cap_mode == "normalize":
            centred = logits - logits.mean(dim=-1, keepdim=True)  # (N, nb)
            scale = centred.pow(2).mean(dim=-1, keepdim=True).add(1e-12).sqrt()  # (N, 1) root mean square
            logits = self.logit_cap * centred / scale
        elif self.logit_cap is not None:
            logits = self.logit_cap * torch.tanh(logits / self.logit_cap)
        return logits

    def _sample_branches(self, logits: torch.Tensor) -> torch.Tensor:
        """Outcome training: one branch per image, one-hot weights (N, nb); uniform with probability
        `router_exploration`, else the router's choice."""
        num_images = logits.shape[0]
        drawn = torch.randint(self.num_branches, (num_images,), device=logits.device)  # (N,)
        if self.exploration < 1.0:
            explore = torch.rand(num_images, device=logits.device) < self.exploration  # (N,)
            drawn = torch.where(explore, drawn, logits.argmax(dim=-1))
        return F.one_hot(drawn, self.num_branches).to(logits.dtype)

    def forward(self, cls_token: torch.Tensor, query_embeds: Optional[torch.Tensor]) -> RouterOutput:
        out = self._route(cls_token, query_embeds)
        if self.forced_branch is None:
            return out
        forced = F.one_hot(torch.full_like(out.logits[:, 0], self.forced_branch, dtype=torch.long), self.num_branches)
        return out._replace(weights=forced.to(out.weights.dtype))  # the logits and probabilities stay the router's

    def _route(self, cls_token: torch.Tensor, query_embeds: Optional[torch.Tensor]) -> RouterOutput:
        logits = self.logits(cls_token, query_embeds)  # (N, nb)
        if self.outcome:
            probs = torch.softmax(logits / self.eval_temperature, dim=-1)  # (N, nb) the preference, for statistics
            if self.training and self.uniform:  # stage 1: every expert aligned on every caption, as for a mixture
                weights = torch.full_like(logits, 1.0 / self.num_branches)
            elif self.training:
                weights = self._sample_branches(logits)
            else:
                weights = F.one_hot(logits.argmax(dim=-1), self.num_branches).to(logits.dtype)
            zero = logits.new_zeros(())
            return RouterOutput(weights, probs, logits, zero, zero)
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()

        if self.training:
            noisy = logits
            if self.gumbel_noise:
                uniform = torch.rand_like(logits).clamp_(1e-6, 1.0 - 1e-6)
                noisy = logits - torch.log(-torch.log(uniform))
            probs = torch.softmax(noisy / self.temperature, dim=-1)
        else:
            probs = torch.softmax(logits / self.eval_temperature, dim=-1)

        if self.uniform:
            selected = torch.ones_like(probs, dtype=torch.bool)  # (N, nb)
            weights = torch.full_like(probs, 1.0 / self.num_branches)
        else:
            top = probs.topk(self.top_k, dim=-1).indices  # (N, k)
            selected = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top, True)  # (N, nb)
            weights = probs * selected
            weights = weights / weights.sum(dim=-1, keepdim=True)  # (N, nb)

        fraction_routed = selected.float().mean(dim=0) / selected.sum(dim=-1).float().mean()  # (nb,)
        balance_loss = self.num_branches * (fraction_routed * probs.mean(dim=0)).sum()
        return RouterOutput(weights, probs, logits, balance_loss, z_loss)


# ===================================================================================== projector
class QMoPProjector(nn.Module):
    """The three branches, the router and MoE-style fusion: M tokens out per image (not 3·M).

    Two ways to compute the same fusion, picked per call by `uses_dense_path` (the rule is documented at
    `config.projector_dense_max_images`) unless `forward(dense=...)` says:
      - dense (inference on an accelerator at small batch, or under torch.compile): every branch runs on every image
        and is weighed by the router's weights, zero outside an image's top-k. Shapes do not depend on the routing
        and nothing waits for the device (no `nonzero`, no `.item()`), as CUDA graphs and full-graph compilation need.
      - routed (training, CPU, larger batches): a branch runs only on the images that selected it (one host sync per
        branch to learn which), which saves the unselected branches' compute.
    Both give the same tokens, weights and kept indices (tests/test_modeling.py compares them).

    With tower pruning the branches read the K patches the tower kept and their grid positions (N, K): pooling
    averages the kept patches of each cell, the resampler cross-attends to them, pruning selects among them. The router
    reads what it reads without tower pruning: the feature layer's CLS (computed over the kept patches) and the
    question. `tower_pruner` (the tower's question MLP) lives here, though it runs inside the vision tower.
    """

    def __init__(self, config: QMoPConfig):
        super().__init__()
        self.branches = list(config.branches)
        self.uses_query = config.uses_query
        self.router_mode = config.router_mode
        if "pooling" in self.branches:
            self.pooling_branch = QMoPPoolingBranch(config)
        if "resampler" in self.branches:
            self.resampler_branch = QMoPResamplerBranch(config)
        if "pruning" in self.branches:
            self.pruning_branch = QMoPPruningBranch(config)
        self.router = QueryGuidedRouter(config) if config.uses_router else None
        if config.uses_tower_pruning:
            self.tower_pruner = QMoPTowerPruner(config)
        self.output_width = config.text_config.hidden_size
        self.dense_max_images = config.projector_dense_max_images

    def uses_dense_path(self, num_images: int, device: torch.device) -> bool:
        """The rule of `config.projector_dense_max_images`: dense whenever torch.compile traces the projector
        (data-dependent shapes would break its graph); otherwise in eval mode, on an accelerator, for at most that
        many images. A CPU computes in the calling thread, so it has no device to wait for and no sync to save:
        there the routed path, which skips the unselected branches, is always faster."""
        if torch.compiler.is_compiling():
            return True
        return not self.training and device.type not in ("cpu", "meta") and num_images <= self.dense_max_images

    def _run_branch(self, name, patches, num_tokens, pruning_scores, patch_attention, positions):
        """One branch on the given images: (n, M, D) tokens and, for pruning, the kept patch indices (n, M)."""
        if name == "pooling":
            return self.pooling_branch(patches, num_tokens, positions), None
        if name == "resampler":
            return self.resampler_branch(patches, num_tokens, positions), None
        return self.pruning_branch(patches, pruning_scores, patch_attention, num_tokens, positions)

    def forward(
        self,
        patches: torch.Tensor,
        cls_token: torch.Tensor,
        query_embeds: Optional[torch.Tensor],
        num_tokens: int,
        pruning_scores: Optional[torch.Tensor] = None,
        patch_attention: Optional[torch.Tensor] = None,
        dense: Optional[bool] = None,
        patch_positions: Optional[torch.Tensor] = None,
    ) -> QMoPProjectorOutput:
        """patches (N, K, Cv), cls_token (N, Cv), query_embeds (N, Ct) or None; for the pruning branch, its patch
        scores (N, K) and, with recycling, the feature layer's patch-to-patch attention (N, K, K). `dense` forces
        the dense (True) or routed (False) computation; None applies `uses_dense_path`. `patch_positions` (N, K): grid
        indices of the patches left by tower pruning (None: the full grid, K = P)."""
        num_images = patches.shape[0]
        router_probs = router_logits = aux_loss = z_loss = None
        if self.router is not None:
            weights, router_probs, router_logits, aux_loss, z_loss = self.router(cls_token, query_embeds)  # (N, nb)
        else:  # single branch, or naive equal-weight fusion ("uniform")
            weights = patches.new_full((num_images, len(self.branches)), 1.0 / len(self.branches), dtype=torch.float32)

        expert_dtype = getattr(self, f"{self.branches[0]}_branch").expert.linear_2.bias.dtype
        fused = patches.new_zeros(num_images, num_tokens, self.output_width, dtype=expert_dtype)  # (N, M, D)
        kept_patch_indices = None
        if "pruning" in self.branches:
            kept_patch_indices = torch.full((num_images, num_tokens), -1, dtype=torch.long, device=patches.device)

        dense = self.uses_dense_path(num_images, patches.device) if dense is None else dense
        for column, name in enumerate(self.branches):
            selected = weights[:, column] > 0  # (N,) images that use this branch (False for NaN weights)
            if dense:
                out, kept = self._run_branch(
                    name, patches, num_tokens, pruning_scores, patch_attention, patch_positions
                )  # (N, M, D)
                gate = weights[:, column].to(out.dtype)[:, None, None]  # (N, 1, 1)
                # Unselected images add an exact zero (even where a branch they did not pick gives NaN/Inf).
                contribution = torch.where(selected[:, None, None], gate * out, 0.0)  # (N, M, D)
                # Under autocast (e.g. TRL's default bf16=True) the experts compute in the autocast dtype.
                fused = fused + contribution.to(fused.dtype)  # (N, M, D)
                if kept is not None:
                    kept_patch_indices = torch.where(selected[:, None], kept, -1)  # (N, M)
                continue
            rows = selected.nonzero().flatten()  # (n,)
            if rows.numel() == 0:
                continue
            # When every image chose this branch (always at batch 1) its inputs are used as they are: no gathered
            # copies, and a plain add instead of index_add.
            every = rows.numel() == num_images
            out, kept = self._run_branch(
                name,
                _select_rows(patches, rows, every),  # (n, P, Cv)
                num_tokens,
                _select_rows(pruning_scores, rows, every),
                _select_rows(patch_attention, rows, every),
                _select_rows(patch_positions, rows, every),
            )
            if kept is not None:
                kept_patch_indices = kept if every else kept_patch_indices.index_copy(0, rows, kept)  # (N, M)
            gate = _select_rows(weights[:, column], rows, every).to(out.dtype)[:, None, None]  # (n, 1, 1)
            contribution = (gate * out).to(fused.dtype)  # (n, M, D)
            fused = fused + contribution if every else fused.index_add(0, rows, contribution)  # (N, M, D)
        fused = _poison_unroutable_images(fused, weights)
        return QMoPProjectorOutput(
            image_features=fused,
            router_weights=weights,
            router_probs=router_probs,
            router_logits=router_logits,
            kept_patch_indices=kept_patch_indices,
            aux_loss=aux_loss,
            router_z_loss=z_loss,
        )


def _select_rows(x: Optional[torch.Tensor], rows: torch.Tensor, every: bool) -> Optional[torch.Tensor]:
    """The routed path's rows `rows` of `x` (None stays None); `x` itself when `every` row is selected."""
    return x if x is None or every else x[rows]


def _poison_unroutable_images(fused: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Images whose router weights are not finite (NaN/Inf weights in the checkpoint or the vision features) select no
    branch and would become all-zero tokens that look like a normal input: give them NaN tokens instead, so the
    logits are NaN, as in LLaVA with non-finite weights."""
    unroutable = ~torch.isfinite(weights).all(dim=-1)  # (N,)
    # Applied unconditionally: testing `unroutable.any()` first would wait for the device on every call.
    return fused.masked_fill(unroutable.to(fused.device)[:, None, None], float("nan"))  # (N, M, D)


# ===================================================================================== pruning inside the LLM
# LearnPruner's second step (`llm_pruning_layer`, docs/compression.md). The language model runs its own forward; a
# pre-hook on each decoder layer from `llm_pruning_layer` on rewrites that layer's inputs. The plan of one forward
# reaches the hooks as a keyword argument of the language model, which passes its extra keyword arguments to every
# decoder layer, so nothing is stored on the model between calls.
LLM_PRUNING_KWARG = "qmop_llm_pruning"


@dataclass
class LLMPruningPlan:
    """One forward of the language model with `llm_pruning_layer` set.

    Prefill (`image_mask` given): the first pruned layer's hook ranks each image's visual tokens and fills
    `kept_positions` / `masked` and the pruned layers' inputs; the later hooks reuse them. Continuing a cache
    (`image_mask` None): the pruned layers' caches are shorter than the sequence by the dropped tokens, and each hook
    drops those columns from the attention mask (left padding keeps them all at the right of the padding).
    """

    image_mask: Optional[torch.Tensor] = None  # (B, T) visual positions
    query_mask: Optional[torch.Tensor] = None  # (B, T) text positions whose attention ranks the visual tokens
    tokens_per_image: int = 0  # M
    keep: int = 0  # visual tokens kept per image, <= M
    continues: bool = False  # a cache was given: later calls continue it, so every sample must drop as many tokens
    kept_positions: Optional[torch.Tensor] = None  # (B, L) positions the pruned layers run on, increasing
    masked: Optional[torch.Tensor] = None  # (B, L) kept only to give every sample L positions; never attended
    uneven: bool = False  # some sample has `masked` positions
    pruned_inputs: Optional[dict] = None  # the pruned layers' attention mask and positions, made once

    def restore(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, D) states of a pruned layer -> (B, T, D), zeros at the dropped (and masked) positions."""
        if self.kept_positions is None or hidden.shape[1] != self.kept_positions.shape[1]:
            return hidden
        batch, length = self.image_mask.shape
        positions = self.kept_positions.to(hidden.device)
        hidden = hidden.masked_fill(self.masked.to(hidden.device)[..., None], 0)
        full = hidden.new_zeros(batch, length, hidden.shape[-1])  # (B, T, D)
        return full.scatter(1, positions[..., None].expand_as(hidden), hidden)


def _gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B or 1, T, ...) -> (B, L, ...) at `positions` (B, L) along dim 1."""
    x = x.expand(positions.shape[0], *x.shape[1:])
    index = positions.to(x.device).view(*positions.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


def text_to_vision_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple,
    attention_mask: Optional[torch.Tensor],
    query_mask: torch.Tensor,
) -> torch.Tensor:
    """(B, T) attention each position receives at `layer` from the query rows (`query_mask`), averaged over heads and
    rows. The layer's own input norm, q/k projections and rotary embedding, recomputed here for the query rows only,
    so the attention kernel (SDPA, flash) never has to return weights."""
    attn = layer.self_attn
    rope = getattr(inspect.getmodule(type(attn)), "apply_rotary_pos_emb", None)
    states = layer.input_layernorm(hidden)  # (B, T, D)
    batch, length, width = states.shape
    num_rows = max(int(query_mask.sum(1).max()), 1)
    rows = torch.argsort((~query_mask).to(torch.int8), dim=1, stable=True)[:, :num_rows]  # (B, Q) query rows first
    row_valid = query_mask.gather(1, rows)  # (B, Q)
    head_dim = attn.head_dim
    q = attn.q_proj(_gather_positions(states, rows)).view(batch, num_rows, -1, head_dim)  # (B, Q, H, h)
    k = attn.k_proj(states).view(batch, length, -1, head_dim)  # (B, T, Hkv, h)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, Q, h), (B, Hkv, T, h)
    cos, sin = position_embeddings  # (B or 1, T, h)
    q, _ = rope(q, q, _gather_positions(cos, rows), _gather_positions(sin, rows))
    k, _ = rope(k, k, cos.expand(batch, -1, -1), sin.expand(batch, -1, -1))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, T, h) grouped-query heads
    scores = (q @ k.transpose(-1, -2)).float() * getattr(attn, "scaling", head_dim**-0.5)  # (B, H, Q, T)

    if attention_mask is None:  # causal, no padding
        allowed = torch.arange(length, device=rows.device) <= rows[..., None]  # (B, Q, T)
    elif attention_mask.dim() == 2:  # flash attention: padding only
        causal = torch.arange(length, device=rows.device) <= rows[..., None]
        allowed = causal & attention_mask.to(rows.device).bool()[:, None, :]  # (B, Q, T)
    else:
        mask_rows = attention_mask.expand(batch, -1, -1, -1)[:, 0].to(rows.device)  # (B, T, T)
        mask_rows = mask_rows.gather(1, rows[..., None].expand(-1, -1, mask_rows.shape[-1]))[..., :length]  # (B, Q, T)
        allowed = mask_rows if mask_rows.dtype == torch.bool else mask_rows > torch.finfo(mask_rows.dtype).min / 2
    scores = scores.masked_fill(~allowed.to(scores.device)[:, None], float("-inf"))
    probs = scores.softmax(-1).masked_fill(~row_valid.to(scores.device)[:, None, :, None], 0)  # (B, H, Q, T)
    return probs.mean(1).sum(1)  # (B, T)


def _select_llm_tokens(plan: LLMPruningPlan, received: torch.Tensor) -> None:
    """Fill `plan.kept_positions` / `plan.masked`: each image keeps its `plan.keep` most attended visual tokens."""
    image_mask = plan.image_mask.to(received.device)  # (B, T)
    batch, length = image_mask.shape
    where = image_mask.nonzero()  # (N·M, 2) rows in sample order, then position order: images in order
    positions = where[:, 1].view(-1, plan.tokens_per_image)  # (N, M)
    samples = where[:, 0].view(-1, plan.tokens_per_image)  # (N, M)
    scores = received[samples, positions]  # (N, M)
    ranked = scores.argsort(dim=1, descending=True, stable=True)  # ties: the earlier token first
    dropped = positions.gather(1, ranked[:, plan.keep :])  # (N, M - r)
    drop = torch.zeros_like(image_mask)
    drop[samples[:, : dropped.shape[1]], dropped] = True  # (B, T)
    counts = drop.sum(1)  # (B,)
    if not bool(counts.any()):  # every image keeps all its tokens: the layers run as without pruning
        return
    fewest = int(counts.min())
    # A sample dropping more than the fewest keeps that many of its dropped tokens, masked out of every attention.
    masked = drop & (drop.cumsum(1) <= (counts - fewest)[:, None])  # (B, T)
    kept = ~drop | masked
    plan.kept_positions = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, : length - fewest]  # (B, L)
    plan.masked = masked.gather(1, plan.kept_positions)  # (B, L)
    plan.uneven = bool(plan.masked.any())
    if plan.uneven and plan.continues:
        raise ValueError(
            "`llm_pruning_layer`: the samples of a batch that starts a KV cache must hold the same number of images "
            f"(they would drop {counts.tolist()} visual tokens); generate them in separate batches."
        )


def _pruned_layer_inputs(plan: LLMPruningPlan, kwargs: dict, attn_implementation: Optional[str]) -> dict:
    """The inputs every pruned layer gets in place of the language model's: attention mask rows and columns,
    rotary embeddings and positions at `plan.kept_positions` (original positions: RoPE is unchanged)."""
    positions, masked = plan.kept_positions, plan.masked  # (B, L)
    batch, length = positions.shape
    inputs = {"position_embeddings": tuple(_gather_positions(x, positions) for x in kwargs["position_embeddings"])}
    if kwargs.get("position_ids") is not None:
        inputs["position_ids"] = _gather_positions(kwargs["position_ids"], positions)  # (B, L)
    if kwargs.get("cache_position") is not None:  # transformers 4.x: the pruned layers' cache holds L entries
        inputs["cache_position"] = torch.arange(length, device=kwargs["cache_position"].device)
    mask = kwargs.get("attention_mask")
    if mask is None:
        if plan.uneven and str(attn_implementation).startswith("flash"):
            mask = (~masked).long()  # (B, L)
        elif plan.uneven:
            mask = (positions[:, None, :, None] >= positions[:, None, None, :]) & ~masked[:, None, None, :]  # (B,1,L,L)
    elif not isinstance(mask, torch.Tensor):
        raise ValueError(f"`llm_pruning_layer` needs a tensor attention mask, got {type(mask).__name__} "
                         f"(attention implementation {attn_implementation!r}); use 'sdpa', 'eager' or flash attention.")
    elif mask.dim() == 2:  # flash attention: (B, T) padding
        mask = mask.gather(1, positions.to(mask.device)) * (~masked).to(mask.device, mask.dtype)  # (B, L)
    else:  # (B or 1, 1, T, T)
        mask = mask.expand(batch, -1, -1, -1)
        index = positions.to(mask.device)[:, None, :, None]
        mask = mask.gather(2, index.expand(-1, mask.shape[1], -1, mask.shape[3]))  # (B, 1, L, T)
        mask = mask.gather(3, index.transpose(2, 3).expand(-1, mask.shape[1], length, -1))  # (B, 1, L, L)
        hidden = masked.to(mask.device)[:, None, None, :]
        mask = mask & ~hidden if mask.dtype == torch.bool else mask.masked_fill(hidden, torch.finfo(mask.dtype).min)
    inputs["attention_mask"] = mask
    return inputs


def _continued_mask(mask: Optional[torch.Tensor], cached: int, num_new: int) -> Optional[torch.Tensor]:
    """A pruned layer continuing its cache: the mask's key columns are [past sequence, new tokens]; the cache holds
    the first `cached` kept positions, which with left padding are the padding and the kept tokens, in order."""
    if mask is None or not isinstance(mask, torch.Tensor):
        return mask
    past = mask.shape[-1] - num_new
    if cached >= past:
        return mask
    return torch.cat([mask[..., :cached], mask[..., past:]], dim=-1)


def _llm_pruning_pre_hook(module: nn.Module, args: tuple, kwargs: dict, layer_idx: int, first: bool):
    """Forward pre-hook of a decoder layer at or after `llm_pruning_layer` (registered by `QMoPModel`)."""
    plan = kwargs.pop(LLM_PRUNING_KWARG, None)
    if plan is None:
        return args, kwargs
    hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
    if plan.image_mask is None:
        cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
        if cache is not None:
            kwargs["attention_mask"] = _continued_mask(
                kwargs.get("attention_mask"), cache.get_seq_length(layer_idx), hidden.shape[1]
            )
        return args, kwargs
    if not first:  # a later pruned layer of the same forward: the first one made its inputs
        kwargs.update(plan.pruned_inputs)
        return args, kwargs
    if first:  # (again when gradient checkpointing recomputes the layer: the same selection)
        received = text_to_vision_attention(
            module, hidden, kwargs["position_embeddings"], kwargs.get("attention_mask"), plan.query_mask
        )
        _select_llm_tokens(plan, received)
        if plan.kept_positions is None:
            plan.pruned_inputs = {}
            return args, kwargs
        implementation = getattr(getattr(module.self_attn, "config", None), "_attn_implementation", None)
        plan.pruned_inputs = _pruned_layer_inputs(plan, kwargs, implementation)
        hidden = _gather_positions(hidden, plan.kept_positions)  # (B, L, D)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        kwargs.update(plan.pruned_inputs)
    return args, kwargs


def check_llm_pruning_layers(language_model: nn.Module, first_layer: int) -> nn.ModuleList:
    """The language model's decoder layers, checked for what mid-LLM pruning reads (clear error otherwise)."""
    layers = getattr(language_model, "layers", None)
    if layers is None:
        raise ValueError(f"`llm_pruning_layer`: {type(language_model).__name__} has no `layers` of decoder layers.")
    layer = layers[first_layer]
    attn = getattr(layer, "self_attn", None)
    missing = [name for name, owner in (("input_layernorm", layer), ("self_attn", layer)) if not hasattr(owner, name)]
    if attn is not None:
        missing += [f"self_attn.{n}" for n in ("q_proj", "k_proj", "head_dim") if not hasattr(attn, n)]
        if getattr(inspect.getmodule(type(attn)), "apply_rotary_pos_emb", None) is None:
            missing.append(f"apply_rotary_pos_emb in {type(attn).__module__}")
    if missing:
        raise ValueError(
            f"`llm_pruning_layer` ranks visual tokens with the decoder layer's own projections, and "
            f"{type(layer).__name__} lacks {missing}."
        )
    return layers


# ===================================================================================== SMoES (Mixture-of-Experts LLMs)
def expert_bin_probabilities(router_logits: torch.Tensor, bins: int) -> torch.Tensor:
    """(tokens, E) gate logits of one layer -> (tokens, bins): the router's probability of each bin of E / bins
    consecutive experts (expert parallelism places consecutive experts on one device)."""
    probs = router_logits.float().softmax(dim=-1)  # (tokens, E)
    return probs.view(probs.shape[0], bins, -1).sum(dim=-1)


@torch.no_grad()
def gaussian_modality_scores(hidden: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor) -> Optional[torch.Tensor]:
    """SMoES' Gaussian-statistics modality score of every token at one layer, (tokens,) in [0, 1] (1: visual).
    hidden (tokens, D); visual / valid (tokens,) bool. One diagonal Gaussian is fitted to the layer's valid visual
    tokens and one to its valid text tokens; the score is the sigmoid of the mean per-dimension log-likelihood ratio.
    None when the batch lacks one of the modalities."""
    hidden = hidden.float()
    groups = [hidden[valid & visual], hidden[valid & ~visual]]
    if min(len(group) for group in groups) < 2:
        return None
    log_likelihoods = []
    for group in groups:
        mean, var = group.mean(dim=0), group.var(dim=0) + 1e-5  # (D,)
        log_likelihoods.append(-0.5 * (var.log() + (hidden - mean).pow(2) / var).mean(dim=-1))  # (tokens,)
    return torch.sigmoid(log_likelihoods[0] - log_likelihoods[1])


def modality_bin_mutual_information(visual_score: torch.Tensor, bin_probs: torch.Tensor,
                                    weight: torch.Tensor) -> torch.Tensor:
    """Mutual information (nats) between a token's modality, visual with probability `visual_score` (tokens,), and
    the expert bin it is routed to, `bin_probs` (tokens, bins), over the tokens with `weight` (tokens,) 1."""
    modality = torch.stack([visual_score, 1 - visual_score], dim=-1)  # (tokens, 2)
    weight = weight.float()
    joint = torch.einsum("tm,tb,t->mb", modality, bin_probs, weight) / weight.sum().clamp(min=1)  # (2, bins)
    independent = joint.sum(dim=1, keepdim=True) * joint.sum(dim=0, keepdim=True)  # (2, bins)
    return (joint * ((joint + 1e-9).log() - (independent + 1e-9).log())).sum()


def smoes_regularizer(config, router_logits: tuple, hidden_states: tuple, visual: torch.Tensor,
                      valid: torch.Tensor) -> Optional[torch.Tensor]:
    """SMoES' loss term: minus the mean over layers of the modality-bin mutual information (nats), with a layer's
    soft modality scores from its input hidden states. router_logits: one (B*T, E) per layer; hidden_states: the
    language model's, (B, T, D) each, [i] the input of layer i; visual / valid (B, T). None without both modalities."""
    if len(router_logits) != config.text_config.num_hidden_layers:
        raise ValueError(
            f"SMoES needs a router in every layer: got router logits for {len(router_logits)} of "
            f"{config.text_config.num_hidden_layers} layers (dense layers such as Qwen2-MoE's `mlp_only_layers` "
            "are not supported)."
        )
    visual, valid = visual.reshape(-1), valid.reshape(-1)
    information = []
    for layer_logits, hidden in zip(router_logits, hidden_states):
        scores = gaussian_modality_scores(hidden.reshape(-1, hidden.shape[-1]), visual.to(hidden.device),
                                          valid.to(hidden.device))
        if scores is None:
            return None
        bins = expert_bin_probabilities(layer_logits, config.smoes_bins)  # (tokens, bins)
        information.append(modality_bin_mutual_information(scores.to(bins.device), bins, valid.to(bins.device)))
    return -torch.stack(information).mean()


# ===================================================================================== pre-trained base
class QMoPPreTrainedModel(PreTrainedModel):
    config_class = QMoPConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "QMoPProjector",
        "CLIPEncoderLayer",
        "CLIPVisionEmbeddings",
        "CLIPTextEmbeddings",
    ]  # + the language model's own (its decoder layer class), added per instance
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True  # 5.x name
    _supports_flash_attn_2 = True  # 4.x name
    _supports_flex_attn = True
    _supports_attention_backend = True
    _supports_cache_class = True
    _supports_static_cache = True
    # The decode step (text tokens on a cache: no image work) compiles as one graph with a static cache:
    # `generate(..., cache_implementation="static")` with a `compile_config`, tested in tests/test_compile.py. The
    # prefill, which encodes the images, runs eager there (as generate runs every prefill).
    _can_compile_fullgraph = True

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers 5.x initialises the modules of remote code conservatively: a module whose own parameters are
        # flagged as initialised is skipped. Applied to the CLIP sub-models, that skips CLIPAttention / CLIPMLP (they
        # hold no parameters of their own), so missing tower weights got the generic init instead of CLIP's.
        # `_init_weights` below uses torch.nn.init only, which honours the per-parameter flags: the conservative
        # path is not needed.
        return False

    def _init_weights(self, module):
        if _init_clip_module(module):  # 4.x: the unwrapped CLIP towers get CLIP's own initialisation
            return
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, QMoPResamplerBranch):
            nn.init.normal_(module.query_embed, std=std)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, QMoPRunningStandardize):
            module.reset()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with bitsandbytes quantization limited to the language model's linear
        layers by default: the vision tower, CLIP text encoder, projector/router and `lm_head` stay in the compute
        dtype. A user-given `llm_int8_skip_modules` is kept, with `lm_head` added if missing.
        `load_in_4bit=True` / `load_in_8bit=True` are accepted as shorthands for a `BitsAndBytesConfig`."""
        shorthand = {k: kwargs.pop(k) for k in ("load_in_4bit", "load_in_8bit") if k in kwargs}
        if any(shorthand.values()):
            from transformers import BitsAndBytesConfig

            if kwargs.get("quantization_config") is not None:
                raise ValueError("Pass either `quantization_config` or `load_in_4bit`/`load_in_8bit`, not both.")
            kwargs["quantization_config"] = BitsAndBytesConfig(**shorthand)
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = _skip_non_llm_modules(kwargs["quantization_config"])
        return super().from_pretrained(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights, config and code. The folder (and a push) always carries the remote-code files,
        `pipeline_qmop.py` included, and an `auto_map` that points at them, whatever the model was loaded from."""
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)


# Modules bitsandbytes must not quantize: they are small, precision-sensitive, and read by the router.
# transformers 5.x matches skip patterns from the start of a module's full name, 4.x anywhere in it: both spellings.
_TOP_LEVEL_MODULES = ("vision_tower", "text_encoder", "projector")
BNB_SKIP_MODULES = [f"model.{name}" for name in _TOP_LEVEL_MODULES] + list(_TOP_LEVEL_MODULES) + ["lm_head"]


def _skip_non_llm_modules(quantization_config):
    """A copy of a bitsandbytes config (object or dict) whose skip list protects BNB_SKIP_MODULES by default."""
    import copy

    is_dict = isinstance(quantization_config, dict)
    method = quantization_config.get("quant_method") if is_dict else getattr(quantization_config, "quant_method", None)
    method = getattr(method, "value", method)
    if method != "bitsandbytes":
        return quantization_config
    quantization_config = copy.deepcopy(quantization_config)
    skip = quantization_config.get("llm_int8_skip_modules") if is_dict else quantization_config.llm_int8_skip_modules
    if skip is None:
        skip = list(BNB_SKIP_MODULES)
    else:
        skip = list(skip)
        skip += [f"model.{name}" for name in skip if name in _TOP_LEVEL_MODULES and f"model.{name}" not in skip]
        if "lm_head" not in skip:  # a given list replaces transformers' default, which is what protects lm_head
            skip.append("lm_head")
    if is_dict:
        quantization_config["llm_int8_skip_modules"] = skip
    else:
        quantization_config.llm_int8_skip_modules = skip
    return quantization_config


def _pipeline_code_is_shipped():  # pragma: no cover - never called
    # The import below is never executed. transformers finds relative imports by reading this file, so it
    # copies pipeline_qmop.py next to modeling_qmop.py on every save and every remote-code load.
    from .pipeline_qmop import QMoPImageToTextPipeline  # noqa: F401


AUTO_MAP = {
    "AutoConfig": "configuration_qmop.QMoPConfig",
    "AutoModel": "modeling_qmop.QMoPModel",
    "AutoModelForImageTextToText": "modeling_qmop.QMoPForConditionalGeneration",
    "AutoModelForVision2Seq": "modeling_qmop.QMoPForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_qmop.QMoPForConditionalGeneration",
}


# ===================================================================================== model
class QMoPModel(QMoPPreTrainedModel):
    """Vision tower, CLIP text encoder, QMoP projector and the language model without its head."""

    def __init__(self, config: QMoPConfig):
        super().__init__(config)
        self.vision_tower, self.text_encoder = _build_clip_towers(config)
        self.projector = QMoPProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        lm_no_split = getattr(self.language_model, "_no_split_modules", None) or []
        self._no_split_modules = list(dict.fromkeys(list(self._no_split_modules) + list(lm_no_split)))
        if config.uses_llm_pruning:
            first = config.llm_pruning_layer
            layers = check_llm_pruning_layers(self.language_model, first)
            for index in range(first, len(layers)):
                hook = functools.partial(_llm_pruning_pre_hook, layer_idx=index, first=index == first)
                layers[index].register_forward_pre_hook(hook, with_kwargs=True)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_decoder(self):
        return self.language_model

    # ---------------------------------------------------------------------------------------- vision
    def get_vision_features(self, pixel_values: torch.Tensor):
        """Run the tower up to `vision_feature_layer` only (later layers are never run), on the full patch grid.

        Returns the feature layer's output (N, S, Cv), its input (N, S, Cv) (for the pruning scores; `None` when
        the feature layer is the embeddings) and the feature layer module. With tower pruning use `encode_vision`.
        """
        if self.config.uses_tower_pruning:
            raise ValueError(
                "`get_vision_features` returns the full patch grid; this model prunes inside the tower "
                f"(`tower_pruning_schedule={self.config.tower_pruning_schedule!r}`): use `encode_vision(pixel_values, "
                "query_embeds)`, which also returns the kept patches' grid positions."
            )
        return self.encode_vision(pixel_values)[:3]

    def encode_vision(
        self, pixel_values: torch.Tensor, query_embeds: Optional[torch.Tensor] = None
    ) -> QMoPVisionFeatures:
        """Run the tower layer by layer up to `vision_feature_layer`, pruning after the layers of
        `config.tower_pruning_plan` ([`QMoPTowerPruner`]; `query_embeds` (N, Ct) guide it with the question)."""
        tower = self.vision_tower
        _check_pixel_values(pixel_values)
        patch_weight = tower.embeddings.patch_embedding.weight  # a Conv2d: never quantized
        pixel_values = pixel_values.to(device=_execution_device(tower.embeddings), dtype=patch_weight.dtype)
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))  # (N, S, Cv)
        index = self.config.vision_feature_hidden_state_index
        pruner = getattr(self.projector, "tower_pruner", None)
        question = None if pruner is None else pruner.question_vector(query_embeds)  # (N, Cv) or None
        layer_input, feature_layer, positions, kept = None, None, None, None
        for number, layer in enumerate(tower.encoder.layers[:index]):
            layer_input, feature_layer = hidden, layer
            hidden = _run_clip_encoder_layer(layer, hidden)  # (N, 1 + K, Cv)
            kept = None
            if pruner is not None and number in pruner.keep_after_layer:
                hidden, kept = pruner(layer, layer_input, hidden, pruner.keep_after_layer[number], question)
                positions = kept if positions is None else positions.gather(1, kept)  # (N, K) grid indices
        return QMoPVisionFeatures(hidden, layer_input, feature_layer, positions, kept)

    def get_query_embeds(self, query_input_ids: torch.Tensor, query_attention_mask: Optional[torch.Tensor]):
        """EOS embedding of the question from the CLIP text encoder: (N, Ct)."""
        _check_token_ids("query_input_ids", query_input_ids)
        device = _execution_device(self.text_encoder)
        output = self.text_encoder(
            input_ids=_to(query_input_ids, device), attention_mask=_to(query_attention_mask, device)
        )
        return output.pooler_output  # (N, Ct)

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        query_input_ids: Optional[torch.Tensor] = None,
        query_attention_mask: Optional[torch.Tensor] = None,
        num_visual_tokens: Optional[int] = None,
        vision_feature_layer: Optional[int] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        """Compress images to `num_visual_tokens` (default: the config's budget) tokens each, guided by the query.

        Without `query_input_ids` every image gets the empty query (the captioning case of the processor), with a
        warning. `vision_feature_layer` overrides the config's feature layer for this call. Returns a
        [`QMoPImageFeaturesOutput`] (a tuple with `return_dict=False`).
        """
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        return_dict = self.config.return_dict if return_dict is None else return_dict
        num_visual_tokens = self.config.num_visual_tokens if num_visual_tokens is None else num_visual_tokens
        self.config.validate_num_visual_tokens(num_visual_tokens, "num_visual_tokens")
        _check_pixel_values(pixel_values)
        num_images = pixel_values.shape[0]
        query_embeds = None
        if query_input_ids is not None:
            _check_token_ids("query_input_ids", query_input_ids)
        if self.config.uses_query:
            if query_input_ids is None:
                query_input_ids, query_attention_mask = self._empty_queries(num_images, pixel_values.device)
            if query_input_ids.shape[0] != num_images:
                raise ValueError(
                    f"`query_input_ids` has {query_input_ids.shape[0]} rows but there are {num_images} images; "
                    "the processor returns one query row per image."
                )
            query_embeds = self.get_query_embeds(query_input_ids, query_attention_mask)

        default_layer = vision_feature_layer is None or vision_feature_layer == self.config.vision_feature_layer
        tower_hidden_states = tower_attentions = None
        positions = feature_layer_kept = None
        if default_layer and not (output_hidden_states or output_attentions) and self.config.uses_tower_pruning:
            hidden, layer_input, feature_layer, positions, feature_layer_kept = self.encode_vision(
                pixel_values, query_embeds
            )
        elif default_layer and not (output_hidden_states or output_attentions):
            # Through `get_vision_features`, the full-grid entry point that tools wrap (the mini VTCBench's cache).
            hidden, layer_input, feature_layer = self.get_vision_features(pixel_values)
        else:
            hidden, layer_input, feature_layer, tower_hidden_states, tower_attentions = self._run_vision_tower(
                pixel_values, vision_feature_layer, output_hidden_states, output_attentions
            )
        patches, cls_token = hidden[:, 1:], hidden[:, 0]  # (N, K, Cv), (N, Cv)
        if num_visual_tokens > patches.shape[1]:
            raise ValueError(
                f"`num_visual_tokens`={num_visual_tokens} is more than the {patches.shape[1]} patches left by tower "
                f"pruning (`tower_pruning_schedule={self.config.tower_pruning_schedule!r}`)."
            )
        scores, patch_attention = None, None
        if "pruning" in self.config.branches:
            scores, patch_attention = self.pruning_scores(
                layer_input, feature_layer, query_embeds, feature_layer_kept, patches=patches
            )
        device = _execution_device(self.projector)
        projected = self.projector(
            _to(patches, device),
            _to(cls_token, device),
            _to(query_embeds, device),
            num_visual_tokens,
            pruning_scores=_to(scores, device),
            patch_attention=_to(patch_attention, device),
            patch_positions=_to(positions, device),
        )
        output = QMoPImageFeaturesOutput(
            last_hidden_state=hidden,
            pooler_output=tuple(projected.image_features),  # one (M, D) per image, as LLaVA
            hidden_states=tower_hidden_states if output_hidden_states else None,
            attentions=tower_attentions if output_attentions else None,
            **projected,
        )
        return output if return_dict else output.to_tuple()

    def _empty_queries(self, num_images: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """`<BOS><EOS>` per image: what the processor gives an image without a question."""
        text_config = self.config.text_encoder_config
        bos, eos = getattr(text_config, "bos_token_id", None), getattr(text_config, "eos_token_id", None)
        if bos is None or eos is None:
            raise ValueError(
                "`pixel_values` were given without `query_input_ids`: the query-guided router reads the question "
                "through the CLIP text encoder. Build inputs with QMoPProcessor (it returns `query_input_ids` and "
                "`query_attention_mask`, one row per image)."
            )
        logger.warning_once(
            "`get_image_features` got no `query_input_ids`: the router reads an empty question (as for captioning). "
            "Pass the processor's `query_input_ids` to route by the question."
        )
        ids = torch.tensor([[bos, eos]], dtype=torch.long, device=device).expand(num_images, -1)  # (N, 2)
        return ids, torch.ones_like(ids)

    def _run_vision_tower(self, pixel_values, vision_feature_layer, output_hidden_states, output_attentions):
        """The whole tower, for callers who ask for its hidden states / attentions or another feature layer:
        (feature layer output, its input, the feature layer module, all hidden states, all attentions)."""
        num_states = self.config.vision_config.num_hidden_layers + 1
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        if not isinstance(layer, int) or isinstance(layer, bool) or not -num_states <= layer < num_states:
            raise ValueError(
                f"`vision_feature_layer` must be one integer index into the tower's {num_states} hidden states "
                f"(QMoP's branches read one layer), got {layer!r}."
            )
        if self.config.uses_tower_pruning:
            raise ValueError(
                "`output_hidden_states`, `output_attentions` and another `vision_feature_layer` run the whole vision "
                "tower on the full grid, which a model with tower pruning never does; call without them."
            )
        index = layer % num_states
        if index == 0 and "pruning" in self.config.branches:
            raise ValueError("`vision_feature_layer` must select a transformer layer (not the embeddings) for pruning.")
        tower = self.vision_tower
        patch_weight = tower.embeddings.patch_embedding.weight
        pixel_values = pixel_values.to(device=_execution_device(tower.embeddings), dtype=patch_weight.dtype)
        out = tower(pixel_values, output_hidden_states=True, output_attentions=output_attentions)
        states = out.hidden_states  # num_states x (N, S, Cv); states[0] is the encoder's input
        layer_input = states[index - 1] if index > 0 else None
        feature_layer = tower.encoder.layers[index - 1] if index > 0 else None
        return states[index], layer_input, feature_layer, states, out.attentions

    def pruning_scores(
        self,
        layer_input: torch.Tensor,
        feature_layer: nn.Module,
        query_embeds: Optional[torch.Tensor],
        feature_layer_kept: Optional[torch.Tensor] = None,
        patches: Optional[torch.Tensor] = None,
    ):
        """Patch scores (N, K) of the pruning branch and, with recycling, patch-to-patch attention (N, K, K), from the
        feature layer's q/k projections applied to its input (N, S, Cv). See [`QMoPPruningBranch`]. When tower pruning
        pruned the feature layer's own output, `feature_layer_kept` (N, K) restricts both to the K patches left.
        `pruning_score="learned"` scores the feature layer's output `patches` (N, K, Cv) instead, which it needs."""
        branch = self.projector.pruning_branch
        learned = branch.score == "learned"
        if learned and patches is None:
            raise ValueError("`pruning_score='learned'` scores the feature layer's output: pass `patches`.")
        scores = patch_attention = None
        if branch.score == "random" and not branch.recycle:  # random-k: no attention needed
            scores = torch.rand(layer_input.shape[0], layer_input.shape[1] - 1, device=layer_input.device)  # (N, K')
        elif not learned or branch.recycle:
            question = None
            if branch.score == "question_relevance":
                question = branch.question_proj(_to(query_embeds, layer_input.device).to(layer_input.dtype))  # (N, Cv)
            score = "cls_attention" if learned else branch.score  # learned: only the recycling attention is used
            scores, patch_attention = score_patches(
                feature_layer, layer_input, score, question, with_attention=branch.recycle
            )  # (N, K'), (N, K', K')
        if feature_layer_kept is not None:
            scores = scores.gather(1, feature_layer_kept) if scores is not None else None  # (N, K)
            if patch_attention is not None:
                num_kept = feature_layer_kept.shape[1]
                rows = feature_layer_kept.unsqueeze(-1).expand(-1, -1, patch_attention.shape[-1])  # (N, K, K')
                columns = feature_layer_kept.unsqueeze(1).expand(-1, num_kept, -1)  # (N, K, K)
                patch_attention = patch_attention.gather(1, rows).gather(2, columns)  # (N, K, K)
        if learned:
            scores = branch.scorer(patches)  # (N, K): already the patches left after tower pruning
        return scores, patch_attention

    # ---------------------------------------------------------------------------------------- merge
    def llm_pruning_plan(self, image_mask, per_image, attention_mask=None, past_key_values=None, query_mask=None) -> LLMPruningPlan:
        """The plan handed to the pruned decoder layers: a prefill plan when images are encoded in this call."""
        if past_key_values is not None and getattr(past_key_values, "is_compileable", False):
            raise ValueError(
                f"`llm_pruning_layer` needs a cache that grows per layer (DynamicCache); {type(past_key_values).__name__} "
                "indexes every layer by the same positions. Generate without `cache_implementation=\"static\"`."
            )
        if image_mask is None:
            return LLMPruningPlan()
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise ValueError(
                "`llm_pruning_layer`: images must be in the first forward of a sequence (this KV cache already holds "
                f"{past_key_values.get_seq_length()} positions)."
            )
        valid = torch.ones_like(image_mask) if attention_mask is None or attention_mask.dim() != 2 else attention_mask.bool()
        text = ~image_mask & valid.to(image_mask.device)  # (B, T)
        after_last_image = image_mask.flip(1).cumsum(1).flip(1) == 0  # (B, T) no image at or after
        queries = text & after_last_image
        if query_mask is not None:
            queries = queries & query_mask.to(queries.device)
        queries = torch.where(queries.any(1, keepdim=True), queries, text)  # no question after the image: all text
        return LLMPruningPlan(
            image_mask=image_mask,
            query_mask=queries,
            tokens_per_image=per_image,
            keep=min(self.config.llm_pruning_keep, per_image),
            continues=past_key_values is not None,
        )

    def image_placeholder_mask(
        self, input_ids: Optional[torch.Tensor], inputs_embeds: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(B, T) bool: the `<image>` placeholder positions, from `input_ids` or, as LLaVA's `get_placeholder_mask`
        does, from `inputs_embeds` (the positions equal to the embedding of `config.image_token_id`)."""
        token_id = self.config.image_token_id
        if input_ids is not None:
            return input_ids == token_id
        embeddings = self.get_input_embeddings()
        if not 0 <= token_id < embeddings.num_embeddings:
            raise ValueError(
                f"`inputs_embeds` with `pixel_values`: the image placeholders are found by the embedding of "
                f"`config.image_token_id`={token_id}, which is outside the {embeddings.num_embeddings}-token vocabulary. "
                "Pass `input_ids` instead."
            )
        token = embeddings(torch.tensor(token_id, device=_execution_device(embeddings)))  # (D,)
        return (inputs_embeds == token.to(inputs_embeds.device, inputs_embeds.dtype)).all(-1)  # (B, T)

    def _visual_tokens_per_image(self, image_mask: torch.Tensor, num_images: int) -> int:
        # M decides the shapes that follow, so the host must read it: one transfer of the (B, T) mask, then every
        # check on the host (instead of a device sync per count, `nonzero` and test).
        image_mask = image_mask.cpu()  # (B, T)
        num_placeholders = int(image_mask.sum())
        token_id = self.config.image_token_id
        if num_placeholders == 0:
            raise ValueError(
                f"`pixel_values` hold {num_images} image(s) but `input_ids` have no `<image>` placeholder "
                f"(id {token_id}). Build prompts with QMoPProcessor, which expands each `<image>` to M placeholders."
            )
        if num_placeholders % num_images:
            raise ValueError(
                f"Image features and image tokens do not match: {num_placeholders} `<image>` placeholders "
                f"for {num_images} images (every image needs the same number M of placeholders)."
            )
        per_image = num_placeholders // num_images
        try:
            self.config.validate_num_visual_tokens(per_image, "number of `<image>` placeholders per image")
        except ValueError as error:
            raise ValueError(
                f"Image features and image tokens do not match: {num_placeholders} `<image>` placeholders for "
                f"{num_images} image(s) would make {per_image} visual tokens per image, which is not a valid budget: "
                f"{error}"
            ) from None
        # Every run of consecutive placeholders must hold whole images.
        padded = F.pad(image_mask.int(), (1, 1))  # (B, T + 2)
        edges = padded[:, 1:] - padded[:, :-1]
        run_lengths = (edges == -1).nonzero()[:, 1] - (edges == 1).nonzero()[:, 1]
        if bool((run_lengths % per_image).any()):
            raise ValueError(
                f"Image features and image tokens do not match: runs of `<image>` placeholders of lengths "
                f"{run_lengths.tolist()} cannot be split into images of {per_image} tokens."
            )
        _check_unambiguous_budget(run_lengths, num_images, per_image, self.config.num_visual_tokens)
        return per_image

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        query_input_ids: Optional[torch.LongTensor] = None,
        query_attention_mask: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        llm_pruning_query_mask: Optional[torch.BoolTensor] = None,
        **kwargs,
    ) -> QMoPModelOutputWithPast:
        r"""
        llm_pruning_query_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            With `config.llm_pruning_layer`: the positions allowed to rank the visual tokens, among the text after each
            sample's last image (default: all of it). The generation head passes the prompt before the first
            supervised label, so training ranks with what inference will see.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if input_ids is not None:
            _check_token_ids("input_ids", input_ids)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict

        embeddings = self.get_input_embeddings()
        image_mask = None
        if input_ids is not None:
            input_ids = _to(input_ids, _execution_device(embeddings))
            image_mask = self.image_placeholder_mask(input_ids)  # (B, T)
            # Placeholder ids need not be inside the vocabulary: they are embedded as 0, then overwritten.
            inputs_embeds = embeddings(input_ids.masked_fill(image_mask, 0))  # (B, T, D)
        elif pixel_values is not None:
            image_mask = self.image_placeholder_mask(None, inputs_embeds)  # (B, T)

        projected, per_image = None, 0
        if pixel_values is not None:
            _check_pixel_values(pixel_values)
            if pixel_values.shape[0] > 0:
                if self.config.uses_query and query_input_ids is None:
                    raise ValueError(
                        "`pixel_values` were given without `query_input_ids`: the query-guided router reads the "
                        "question through the CLIP text encoder. Build inputs with QMoPProcessor (it returns "
                        "`query_input_ids` and `query_attention_mask`, one row per image)."
                    )
                per_image = self._visual_tokens_per_image(image_mask, pixel_values.shape[0])
                projected = self.get_image_features(
                    pixel_values, query_input_ids, query_attention_mask, num_visual_tokens=per_image, return_dict=True
                )
                features = projected.image_features.to(inputs_embeds.device, inputs_embeds.dtype)  # (N, M, D)
                scatter_mask = image_mask.to(inputs_embeds.device).unsqueeze(-1).expand_as(inputs_embeds)
                inputs_embeds = inputs_embeds.masked_scatter(scatter_mask, features)  # (B, T, D)
        # A decode step (a cache is given) never holds placeholders to check: testing the cache first keeps the step
        # free of host syncs, as full-graph compilation of the decode step needs.
        elif past_key_values is None and image_mask is not None and bool(image_mask.any()):
            raise ValueError(
                f"`input_ids` hold {int(image_mask.sum())} `<image>` placeholders but no `pixel_values` were given."
            )

        plan = None
        if self.config.uses_llm_pruning:
            plan = self.llm_pruning_plan(
                image_mask if projected is not None else None,
                per_image,
                attention_mask,
                past_key_values,
                llm_pruning_query_mask,
            )
            kwargs[LLM_PRUNING_KWARG] = plan
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        last_hidden_state, hidden_states, cache = outputs.last_hidden_state, outputs.hidden_states, outputs.past_key_values
        if plan is not None and plan.kept_positions is not None:
            # Back to the prompt's length (zeros where the pruned layers dropped a token), so logits, labels and
            # callers' masks line up with `input_ids` as without pruning.
            last_hidden_state = plan.restore(last_hidden_state)
            hidden_states = None if hidden_states is None else tuple(plan.restore(h) for h in hidden_states)
            if plan.uneven:  # rows padded with masked tokens: a later call could not tell them apart
                cache = None
        output = QMoPModelOutputWithPast(
            last_hidden_state=last_hidden_state,
            past_key_values=cache,
            hidden_states=hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=None if projected is None else projected.image_features,
            router_weights=None if projected is None else projected.router_weights,
            router_probs=None if projected is None else projected.router_probs,
            router_logits=None if projected is None else projected.router_logits,
            kept_patch_indices=None if projected is None else projected.kept_patch_indices,
            aux_loss=None if projected is None else projected.aux_loss,
            router_z_loss=None if projected is None else projected.router_z_loss,
            llm_router_logits=getattr(outputs, "router_logits", None),
        )
        return output if return_dict else output.to_tuple()


# ===================================================================================== generation head
class QMoPForConditionalGeneration(QMoPPreTrainedModel, GenerationMixin):
    """QMoP-LLaVA for image-text-to-text generation.

    Example:
        ```python
        >>> from transformers import AutoModelForImageTextToText, AutoProcessor
        >>> model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)
        >>> processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        >>> inputs = processor(images=image, text="USER: <image>\\nWhat is shown? ASSISTANT:")
        >>> out = model.generate(**inputs, max_new_tokens=20)
        >>> processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": _LM_HEAD_TP_STYLE}

    def __init__(self, config: QMoPConfig):
        super().__init__(config)
        self.model = QMoPModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self._no_split_modules = self.model._no_split_modules
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model.get_decoder()

    # Sub-modules by their paper names, for users and for PEFT target patterns.
    @property
    def vision_tower(self):
        return self.model.vision_tower

    @property
    def text_encoder(self):
        return self.model.text_encoder

    @property
    def projector(self):
        return self.model.projector

    @property
    def language_model(self):
        return self.model.language_model

    def get_image_features(self, pixel_values, query_input_ids=None, query_attention_mask=None, num_visual_tokens=None,
                           **kwargs):
        return self.model.get_image_features(
            pixel_values, query_input_ids, query_attention_mask, num_visual_tokens, **kwargs
        )

    def set_router_temperature(self, temperature: float) -> None:
        """Set the router's training temperature (the trainer anneals it; eval mode uses the config's floor)."""
        if self.model.projector.router is not None:
            if temperature <= 0:
                raise ValueError(f"router temperature must be > 0, got {temperature}.")
            self.model.projector.router.temperature = float(temperature)

    def set_router_uniform(self, uniform: bool) -> None:
        """Replace routing by equal weights over all branches (`True`) or restore the router (`False`). The trainer
        does this for stage 1, whose query is one constant prompt: a router trained there learns to route by picture
        alone (see docs/vtcbench.md)."""
        if self.model.projector.router is not None:
            self.model.projector.router.uniform = bool(uniform)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        query_input_ids: Optional[torch.LongTensor] = None,
        query_attention_mask: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values=None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep=0,
        **kwargs,
    ) -> QMoPCausalLMOutputWithPast:
        # Loss arguments of transformers' loss utilities (the Trainer passes them), not model inputs.
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if labels is not None:
            _check_labels(labels, input_ids, inputs_embeds)
        if self.config.uses_llm_pruning and (labels is not None or shift_labels is not None):
            # Rank the visual tokens with the prompt only, as inference will: not with the answer being learned.
            supervised = labels != -100 if labels is not None else F.pad(shift_labels[:, :-1] != -100, (1, 0))  # (B, T)
            kwargs["llm_pruning_query_mask"] = supervised.cumsum(1) == 0
        # A Mixture-of-Experts LLM's balancing loss when its router logits are asked for (call or text_config).
        moe = dict(balance=bool(kwargs.get("output_router_logits",
                                           getattr(self.config.text_config, "output_router_logits", False))),
                   smoes=self.training and self.config.smoes_loss_coef > 0
                   and (labels is not None or shift_labels is not None))
        if moe["smoes"]:  # SMoES reads every layer's router logits and input hidden states.
            kwargs["output_router_logits"] = True
            output_hidden_states = True
        model_inputs = dict(
            input_ids=input_ids,
            pixel_values=pixel_values,
            query_input_ids=query_input_ids,
            query_attention_mask=query_attention_mask,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        loss_inputs = dict(labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
        router = self.model.projector.router
        if (self.training and router is not None and router.outcome and not router.uniform
                and router.forced_branch is None and self.config.router_outcome_branches == "all"
                and pixel_values is not None and pixel_values.shape[0] > 0
                and (labels is not None or shift_labels is not None)):
            output = self._forward_every_branch(model_inputs, keep, loss_inputs, moe)
            return output if return_dict else output.to_tuple()

        outputs = self.model(**model_inputs)
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])  # (B, T', V)
        llm_aux_loss, smoes_loss = self._moe_losses(outputs, model_inputs, **moe)
        loss, router_outcome_loss = self._loss(
            outputs, logits, input_ids, inputs_embeds, pixel_values, llm_aux_loss=llm_aux_loss,
            smoes_loss=smoes_loss, **loss_inputs
        )
        output = QMoPCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            router_weights=outputs.router_weights,
            router_probs=outputs.router_probs,
            router_logits=outputs.router_logits,
            kept_patch_indices=outputs.kept_patch_indices,
            aux_loss=outputs.aux_loss,
            router_z_loss=outputs.router_z_loss,
            router_outcome_loss=router_outcome_loss,
            llm_router_logits=outputs.llm_router_logits,
            llm_aux_loss=llm_aux_loss,
            smoes_loss=smoes_loss,
        )
        return output if return_dict else output.to_tuple()

    def _llm_aux_loss(self, outputs, attention_mask) -> Optional[torch.Tensor]:
        """A Mixture-of-Experts language model's load-balancing loss over its router logits, computed by its own
        module's `load_balancing_loss_func` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE...); None for a dense model or
        when the router logits were not asked for."""
        router_logits = outputs.llm_router_logits
        if not router_logits:
            return None
        text_config = self.config.text_config
        balance = getattr(inspect.getmodule(type(self.model.language_model)), "load_balancing_loss_func", None)
        num_experts = self.config.num_llm_experts
        if balance is None or num_experts is None:
            return None
        # Padding is left out when every layer routed every position (mid-LLM pruning shortens the later layers).
        full_length = attention_mask is not None and attention_mask.dim() == 2 and all(
            layer_logits.shape[0] == attention_mask.numel() for layer_logits in router_logits
        )
        return balance(router_logits, num_experts, text_config.num_experts_per_tok,
                       attention_mask if full_length else None)

    def _moe_losses(self, outputs, model_inputs: dict, balance: bool, smoes: bool) -> tuple:
        """(llm_aux_loss, smoes_loss) of one language-model pass; each None where it does not apply (`balance`: the
        LLM's router logits were asked for; `smoes`: SMoES applies to this call)."""
        llm_aux_loss = self._llm_aux_loss(outputs, model_inputs["attention_mask"]) if balance else None
        smoes_loss = None
        if smoes and outputs.llm_router_logits and outputs.hidden_states is not None:
            visual = self.model.image_placeholder_mask(model_inputs["input_ids"], model_inputs["inputs_embeds"])  # (B, T)
            attention_mask = model_inputs["attention_mask"]
            valid = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else \
                torch.ones_like(visual)
            smoes_loss = smoes_regularizer(self.config, outputs.llm_router_logits, outputs.hidden_states, visual, valid)
        return llm_aux_loss, smoes_loss

    def _loss(self, outputs, logits, input_ids, inputs_embeds, pixel_values, labels, shift_labels, num_items_in_batch,
              llm_aux_loss=None, smoes_loss=None):
        """(loss, router_outcome_loss) of one language-model pass; (None, None) without labels."""
        if labels is None and shift_labels is None:
            return None, None
        # Never learn to predict placeholders: mask them in `labels` (B, T) and in `shift_labels` (B, T), whose
        # position t is the target of position t, i.e. the token at t + 1.
        if input_ids is not None or pixel_values is not None:
            placeholders = self.model.image_placeholder_mask(input_ids, inputs_embeds).to(logits.device)  # (B, T)
        else:  # text-only inputs_embeds
            placeholders = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
        if labels is not None:
            labels = labels.to(logits.device).masked_fill(placeholders, -100)
        if shift_labels is not None:
            next_is_placeholder = F.pad(placeholders[:, 1:], (0, 1), value=False)  # (B, T)
            shift_labels = shift_labels.to(logits.device).masked_fill(next_is_placeholder, -100)
        # transformers' causal-LM loss: shifts `labels` (or takes `shift_labels`), float32, and divides by
        # `num_items_in_batch` when the Trainer gives it (gradient-accumulation-exact normalisation).
        loss = self.loss_function(
            logits=logits,
            labels=labels,
            vocab_size=self.config.text_config.vocab_size,
            num_items_in_batch=num_items_in_batch,
            shift_labels=shift_labels,
        )
        if outputs.aux_loss is not None and self.config.router_aux_loss_coef > 0:
            loss = loss + self.config.router_aux_loss_coef * outputs.aux_loss.to(loss.device)
        if outputs.router_z_loss is not None and self.config.router_z_loss_coef > 0:
            loss = loss + self.config.router_z_loss_coef * outputs.router_z_loss.to(loss.device)
        if llm_aux_loss is not None:
            loss = loss + self.config.text_config.router_aux_loss_coef * llm_aux_loss.to(loss.device)
        if smoes_loss is not None:
            loss = loss + self.config.smoes_loss_coef * smoes_loss.to(loss.device)
        router = self.model.projector.router
        router_outcome_loss = None
        if (self.training and self.config.router_training == "outcome" and outputs.router_logits is not None
                and not router.uniform):  # stage 1's equal weights: no branch was drawn, nothing to regress
            targets = shift_labels if shift_labels is not None else F.pad(labels[:, 1:], (0, 1), value=-100)
            images_per_sample = placeholders.sum(dim=1) // outputs.image_hidden_states.shape[1]  # (B,)
            image_samples = torch.repeat_interleave(
                torch.arange(len(images_per_sample), device=images_per_sample.device), images_per_sample
            )  # (N,)
            router_outcome_loss = outcome_regression_loss(
                outputs.router_logits, outputs.router_weights, per_sample_lm_loss(logits, targets), image_samples
            )
            if self.config.router_outcome_loss_coef > 0:
                loss = loss + self.config.router_outcome_loss_coef * router_outcome_loss.to(loss.device)
        return loss, router_outcome_loss

    def _forward_every_branch(self, model_inputs: dict, keep, loss_inputs: dict, moe: dict) -> "QMoPCausalLMOutputWithPast":
        """Outcome training with `router_outcome_branches="all"`: one language-model pass per branch, every image
        forced through it. `loss` and `router_outcome_loss` are the means over the passes (each pass regresses its
        branch's logit on its own per-sample losses). `logits` (per sample) and `image_hidden_states` /
        `kept_patch_indices` (per image) are those of the pass through the branch the router would choose (a
        sample's first image decides for the sample); `router_weights` is that choice, one-hot. The cache, hidden
        states and attentions belong to no single routing and are None."""
        router = self.model.projector.router
        passes = []
        for column in range(router.num_branches):
            router.forced_branch = column
            try:
                outputs = self.model(**model_inputs)
            finally:
                router.forced_branch = None
            logits = self.lm_head(outputs.last_hidden_state[:, keep, :])  # (B, T', V)
            llm_aux_loss, smoes_loss = self._moe_losses(outputs, model_inputs, **moe)
            loss, outcome_loss = self._loss(
                outputs, logits, model_inputs["input_ids"], model_inputs["inputs_embeds"],
                model_inputs["pixel_values"], llm_aux_loss=llm_aux_loss, smoes_loss=smoes_loss, **loss_inputs,
            )
            passes.append((outputs, logits, loss, outcome_loss, llm_aux_loss, smoes_loss))

        first = passes[0][0]
        choice = first.router_logits.argmax(dim=-1)  # (N,) identical in every pass: the router sees the same inputs
        images = torch.arange(len(choice), device=choice.device)
        image_hidden_states = torch.stack([p[0].image_hidden_states for p in passes])[choice, images]  # (N, M, D)
        kept_patch_indices = None
        if first.kept_patch_indices is not None:
            kept_patch_indices = torch.stack([p[0].kept_patch_indices for p in passes])[choice, images]  # (N, M)
        all_logits = torch.stack([p[1] for p in passes])  # (nb, B, T', V)
        placeholders = self.model.image_placeholder_mask(model_inputs["input_ids"], model_inputs["inputs_embeds"])
        images_per_sample = placeholders.to(choice.device).sum(dim=1) // first.image_hidden_states.shape[1]  # (B,)
        first_image = (images_per_sample.cumsum(0) - images_per_sample).clamp(max=max(len(choice) - 1, 0))  # (B,)
        sample_choice = torch.where(images_per_sample > 0, choice[first_image], 0).to(all_logits.device)  # (B,)
        logits = all_logits[sample_choice, torch.arange(all_logits.shape[1], device=all_logits.device)]  # (B, T', V)
        return QMoPCausalLMOutputWithPast(
            loss=torch.stack([p[2] for p in passes]).mean(),
            logits=logits,
            image_hidden_states=image_hidden_states,
            router_weights=F.one_hot(choice, router.num_branches).to(first.router_weights.dtype),
            router_probs=first.router_probs,
            router_logits=first.router_logits,
            kept_patch_indices=kept_patch_indices,
            aux_loss=first.aux_loss,
            router_z_loss=first.router_z_loss,
            router_outcome_loss=torch.stack([p[3] for p in passes]).mean(),
            llm_aux_loss=None if passes[0][4] is None else torch.stack([p[4] for p in passes]).mean(),
            smoes_loss=None if passes[0][5] is None else torch.stack([p[5] for p in passes]).mean(),
        )

    @contextlib.contextmanager
    def forced_branch(self, branch: str):
        """Within the block every image goes through `branch` alone (weight 1), whatever the router says; the
        router still runs, so its logits and probabilities are reported unchanged. What the model answers through
        one branch: the mini VTCBench's forced-branch table, or a fixed budget policy at serving time."""
        router = self.model.projector.router
        if router is None:
            raise ValueError(f"this model has no router to force (branches {self.config.branches}, router_mode "
                             f"{self.config.router_mode!r}).")
        if branch not in self.config.branches:
            raise ValueError(f"unknown branch {branch!r}: this model has {self.config.branches}.")
        previous = router.forced_branch
        router.forced_branch = list(self.config.branches).index(branch)
        try:
            yield
        finally:
            router.forced_branch = previous

    def prepare_inputs_for_generation(
        self,
        input_ids,
        past_key_values=None,
        inputs_embeds=None,
        pixel_values=None,
        query_input_ids=None,
        query_attention_mask=None,
        attention_mask=None,
        **kwargs,
    ):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            **kwargs,
        )
        # Images are encoded once, at prefill; decode steps reuse the KV cache.
        if _is_first_generation_step(kwargs) or not kwargs.get("use_cache", True):
            model_inputs["pixel_values"] = pixel_values
            model_inputs["query_input_ids"] = query_input_ids
            model_inputs["query_attention_mask"] = query_attention_mask
        else:
            for key in ("pixel_values", "query_input_ids", "query_attention_mask"):
                model_inputs.pop(key, None)
        return model_inputs


QMoPModel.register_for_auto_class("AutoModel")
QMoPForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "QMoPProjectorOutput",
    "QMoPModelOutputWithPast",
    "QMoPCausalLMOutputWithPast",
    "QMoPPoolingBranch",
    "QMoPResamplerBranch",
    "QMoPPruningBranch",
    "QMoPTowerPruner",
    "QMoPVisionFeatures",
    "QueryGuidedRouter",
    "QMoPProjector",
    "QMoPPreTrainedModel",
    "QMoPModel",
    "QMoPForConditionalGeneration",
    "router_temperature_at",
]
