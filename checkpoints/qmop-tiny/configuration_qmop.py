# Copyright 2026 The QMoP-LLaVA authors. Licensed under the Apache License, Version 2.0.
"""QMoP-LLaVA configuration.

One field per knob of the Query Guided Mixture-of-Projector (QMoP, arXiv March 2026). Where the paper is
silent, the default is this project's choice; shared/DESIGN.md section 2 explains each one.
"""

import math
from typing import Literal, Optional, get_args

from transformers import AutoConfig, CLIPTextConfig, CLIPVisionConfig, PretrainedConfig

BranchName = Literal["pooling", "resampler", "pruning"]
PruningScore = Literal["cls_attention", "question_relevance", "learned", "random"]
RouterMode = Literal["query", "vision", "uniform"]
TemperatureSchedule = Literal["cosine", "linear", "exponential", "constant"]
LogitCapMode = Literal["tanh", "normalize"]
RouterTraining = Literal["mixture", "outcome"]
RouterOutcomeBranches = Literal["sampled", "all"]
RouterInputNorm = Literal["layer", "standardize"]
SMoESModalityScore = Literal["gaussian"]
TowerPruningSchedule = Literal["off", "qg_vtc", "custom"]
TowerPruningScore = Literal["question_relevance", "cls_attention"]

# Canonical branch order: router logits and `router_weights` columns follow it (restricted to `branches`).
BRANCH_ORDER = get_args(BranchName)
DEFAULT_ROUTER_TOP_K = 2  # the paper mixes the two best branches per image
# QG-VTC Table 1: 6 pruning steps, every other layer, ending at LLaVA's feature layer, from 576 to 72 = 576 / 8 patches.
QG_VTC_STEPS = 6
QG_VTC_FINAL_FRACTION = 8  # the last step keeps num_patches // 8

# Shipped with every save so that `pipeline("image-to-text", model=..., trust_remote_code=True)` works on both
# transformers 4.57 and 5.x (the built-in task cannot caption from an image alone).
DEFAULT_CUSTOM_PIPELINES = {
    "image-to-text": {
        "impl": "pipeline_qmop.QMoPImageToTextPipeline",
        "pt": ["AutoModelForImageTextToText"],
        "tf": [],
        "type": "multimodal",
    }
}


# Defaults are LLaVA-1.5-7B's shapes: CLIP ViT-L/14-336, the CLIP-L text tower, Vicuna-7B (llava-hf vocabulary).
CLIP_L_336_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
    patch_size=14, projection_dim=768, hidden_act="quick_gelu",
)
CLIP_L_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
    max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    vocab_size=49408,
)
VICUNA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
    pad_token_id=32001, tie_word_embeddings=False,
)
_DEFAULTS = {"clip_vision_model": CLIP_L_336_VISION, "clip_text_model": CLIP_L_TEXT, "llama": VICUNA_7B}


def _sub_config(value, default_cls, default_model_type, field):
    """Accept a config object, a dict (with or without `model_type`) or None (LLaVA-1.5-7B's shapes)."""
    if value is None:
        value = dict(_DEFAULTS[default_model_type], model_type=default_model_type)
    if isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", default_model_type)
        if model_type == default_model_type and default_cls is not None:
            return default_cls(**value)
        return AutoConfig.for_model(model_type, **value)
    raise TypeError(f"`{field}` must be a PretrainedConfig, a dict or None, got {type(value).__name__}.")


class QMoPConfig(PretrainedConfig):
    r"""Configuration of [`QMoPForConditionalGeneration`]: a LLaVA-1.5 model whose projector compresses the
    vision tower's patch tokens to `num_visual_tokens` with three branches mixed by a query-guided router.

    Args:
        vision_config (`CLIPVisionConfig` or `dict`, *optional*):
            The vision tower (CLIP ViT-L/14-336 in LLaVA-1.5). Its patch grid must be square.
        text_encoder_config (`CLIPTextConfig` or `dict`, *optional*):
            The CLIP text encoder that reads the user's question for the router (frozen; 77 tokens).
        text_config (`PretrainedConfig` or `dict`, *optional*):
            Any causal language model config (`model_type` picks the class); Llama (Vicuna) by default.
        num_visual_tokens (`int`, *optional*, defaults to 144):
            Training budget M: visual tokens per image after compression. A perfect square, at most the
            number of patches. A call may use another square budget through the processor's placeholders.
        branches (`list[str]`, *optional*, defaults to all three):
            Non-empty subset of `"pooling"`, `"resampler"`, `"pruning"`. One branch is the single-strategy
            baseline (no router is built).
        image_token_id (`int`, *optional*, defaults to 32000):
            Id of the `<image>` placeholder in the language model's vocabulary (llava-hf convention).
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Hidden state of the vision tower taken as features (-2 = penultimate layer, as in LLaVA-1.5).
            Layers after it are never run.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of each branch's expert MLP (LLaVA's `mlp2x_gelu`).
        resampler_num_layers (`int`, *optional*, defaults to 2):
            Cross-attention layers in the resampler branch.
        resampler_num_heads (`int`, *optional*):
            Heads of the resampler's cross-attention; defaults to the vision tower's.
        resampler_intermediate_size (`int`, *optional*):
            FFN width of the resampler layers; defaults to the vision tower's.
        resampler_query_init (`str`, *optional*, defaults to `"pooled"`):
            `"pooled"`: queries start from the pooled patch grid plus a learned position embedding (any
            square budget works). `"learned"`: Perceiver-style learned queries only (interpolated from the
            training grid when another budget is asked for).
        pruning_score (`str`, *optional*, defaults to `"cls_attention"`):
            How the pruning branch ranks patches. `"cls_attention"`: CLS-to-patch attention of the feature
            layer, recomputed from its q/k (works under SDPA/flash). `"question_relevance"`: QG-VTC Eq. 4,
            the question's EOS embedding mapped into the vision space by a learned MLP, queried against
            the feature layer's keys. `"learned"`: LearnPruner's learnable pruner after the vision encoder, a small
            MLP (`pruning_branch.scorer`, Cv → Cv → 1) scoring each output patch, softmax over the patches; trained
            by the language-model loss through the same straight-through factor. `"random"`: M patches drawn
            uniformly at random on every call (random-k, the
            baseline UniPruneBench finds strong); outputs then differ between calls.
        pruning_recycle (`bool`, *optional*, defaults to `False`):
            QG-VTC Eq. 5: add the dropped patches back into the kept ones, weighted by attention.
        router_mode (`str`, *optional*, defaults to `"query"`):
            `"query"`: the paper's Query Guided Router (vision CLS + question EOS). `"vision"`: ablation
            that sees only the image. `"uniform"`: naive equal-weight fusion of all branches (no router).
        router_hidden_size (`int`, *optional*, defaults to 512): hidden width of the router MLP.
        router_top_k (`int`, *optional*):
            Branches kept per image; their weights are renormalised. Equal to the number of branches = dense.
            Defaults to 2, or to the number of branches when there are fewer (a single-branch baseline needs no
            setting).
        router_temperature (`float`, *optional*, defaults to 1.0): softmax temperature at the start of training.
        router_min_temperature (`float`, *optional*, defaults to 0.1):
            Floor of the annealed temperature (and the eval temperature when `router_eval_temperature` is unset).
        router_eval_temperature (`float`, *optional*):
            Softmax temperature in eval mode (inference). Unset: `router_min_temperature`, as in checkpoints written
            before this field existed. A low value makes routing a hard choice; the mini VTCBench uses 1.0 so that
            the weights shown at inference are the router's actual preference between its top-k branches.
        router_temperature_schedule (`str`, *optional*, defaults to `"cosine"`):
            How training anneals the temperature from `router_temperature` to `router_min_temperature`.
        router_gumbel_noise (`bool`, *optional*, defaults to `True`): add Gumbel noise to router logits in training.
        router_aux_loss_coef (`float`, *optional*, defaults to 0.01):
            Weight of the switch-style load-balancing loss added to the LM loss when labels are given. Balancing
            per batch can be met by sending different pictures to different branches whatever the question; keep
            it small (or 0) when the question should decide.
        router_z_loss_coef (`float`, *optional*, defaults to 0.001):
            Weight of the router z-loss (ST-MoE): mean of logsumexp(logits)² over images, added to the loss when
            labels are given. It keeps the logits small, so the softmax does not saturate and the router keeps a
            gradient after the early steps.
        router_logit_cap (`float`, *optional*):
            Soft cap on router logits, `cap · tanh(logits / cap)` (training and inference). Bounds the gap between
            branches to `2 · cap` so no temperature schedule can drive the softmax into a hard choice. Unset: no cap.
        router_logit_cap_mode (`str`, *optional*, defaults to `"tanh"`):
            How `router_logit_cap` bounds the logits. `"tanh"`: as above; a logit driven far past the cap saturates
            and gets no gradient (measured in the mini VTCBench: every logit pinned at ±cap, routing constant).
            `"normalize"`: the logits are centred over the branches and scaled to a root-mean-square of `cap`, so
            the router sets only their direction; the gap stays bounded (at most `cap · sqrt(2 · branches)`) and the
            gradient never vanishes, however large the raw logits grow.
        router_training (`str`, *optional*, defaults to `"mixture"`):
            How the router learns. `"mixture"`: the paper's; the top-k branches are mixed by the router's weights and
            the router learns through the language-model loss of that mixture. The language model adapts to the
            branches the router already prefers, which reinforces the preference: in the mini VTCBench every such
            router ended routing every question alike. `"outcome"`: a contextual bandit. In training each image gets
            one branch, drawn uniformly with probability `router_exploration` (else the router's choice), so the
            language model learns to read every branch; the router's logit for the drawn branch regresses the negated
            language-model loss of that sample (squared error, weight `router_outcome_loss_coef`, the target
            detached). At inference the router picks the branch with the lowest predicted loss for this picture and
            question. Needs `router_top_k=1` (the language model never saw a mixture) and no `router_logit_cap`
            (the logits are loss predictions); the temperature, Gumbel noise, z-loss and load balancing do not apply
            (the losses are reported as 0). In stage 1 with an equal-weight router (`set_router_uniform`, the
            trainer's default) every branch gets weight 1/num_branches, as for the mixture, so every expert is
            aligned on every caption.
        router_exploration (`float`, *optional*, defaults to 1.0):
            `"outcome"` only: probability that a training image's branch is drawn uniformly at random instead of
            chosen by the router. 1.0 trains every branch equally and gives the router unbiased loss estimates.
        router_outcome_loss_coef (`float`, *optional*, defaults to 1.0):
            `"outcome"` only: weight of the router's loss-regression term added to the language-model loss.
        router_outcome_branches (`str`, *optional*, defaults to `"sampled"`):
            `"outcome"` only: which branches a training image goes through. `"sampled"`: one, drawn as
            `router_exploration` says (one language-model pass per batch). `"all"`: every branch, one language-model
            pass each (the cost of the language model's forward and backward times the number of branches, and as
            many activation graphs held until the backward); the language-model loss is the mean over the branches
            and the router regresses every branch's loss on every image (full information: no exploration is needed,
            `router_exploration` is ignored). Each branch then gets the data of a single-branch run: in the mini
            VTCBench one randomly drawn branch per image left the language model unable to read the background
            colour through any branch (docs/vtcbench.md).
        router_input_norm (`str`, *optional*, defaults to `"layer"`):
            What the router reads. `"layer"`: `[LN(v); LN(t)]`, each vector normalised on its own (checkpoints
            without this field). `"standardize"`: the same, then every feature standardised with running statistics
            of the training inputs, `(x - mean) / sqrt(var + 1e-5)`. CLIP's question embeddings share one large
            direction (in the mini VTCBench the mean embeddings of "letter on the tag" and "tag at the top or bottom"
            questions have cosine 0.998), so after LayerNorm the question's signal is a small offset that the router
            learns slowly; standardising makes it as large as the picture's. The statistics (buffers, saved with the
            checkpoint, as BatchNorm's) are updated after each training forward, not under the trainer's
            equal-weight stage 1 (whose one constant caption prompt would set the question's variance to zero), by a
            running average that becomes an exponential one of rate `router_input_norm_momentum`. A forward uses the
            statistics of earlier batches, so an output never depends on the other samples of its batch and any
            batch size works (1 included). Before any update they are mean 0 and variance 1: the identity (up to 1 / sqrt(1 + 1e-5)).
        router_input_norm_momentum (`float`, *optional*, defaults to 0.01):
            `"standardize"` only: the exponential rate of the running statistics, in (0, 1].
        query_max_length (`int`, *optional*, defaults to 77): CLIP text encoder's context (longer questions are truncated).
        projector_dense_max_images (`int`, *optional*, defaults to 8):
            How the projector computes the router's choice at inference (eval mode) on an accelerator. Batches of at
            most this many images run every branch on every image and weigh each by the router's weights (zero
            outside the top-k): static shapes and no host synchronisation, as CUDA graphs and
            `torch.compile(fullgraph=True)` need, for up to `len(branches) - router_top_k` extra branch passes per
            image. Larger batches, training, and the CPU (which has no device to wait for) run each branch only on
            the images routed to it (one host sync per branch). Under torch.compile the dense path is always used.
            Both give the same outputs; 0 = the routed path except under torch.compile.
        pad_to_square (`bool`, *optional*, defaults to `False`):
            Default of the processor's LLaVA-1.5 `expand2square` (the original repo pads; llava-hf does not).
        tower_pruning_schedule (`str`, *optional*, defaults to `"off"`):
            QG-VTC's hierarchical compression inside the vision tower (docs/compression.md). At each scheduled layer,
            the layer's output patches are scored (`tower_pruning_score`, QG-VTC Eq. 4), the top ones kept in raster
            order and, with `tower_pruning_recycle`, the dropped ones added into the kept ones by attention weight
            (Eq. 5); later layers and the projector see only the kept patches and their grid positions.
            `"off"`: the full grid (outputs identical to checkpoints without these fields). `"qg_vtc"`: Table 1
            scaled to any tower: one step every other layer, counted back from the feature layer (which is the last
            step), at most 6 steps and none in the first half of the layers run; the step j of n keeps
            `P - round(j * (P - P // 8) / n)` patches (CLIP-L/336, feature layer -2: layers 12, 14, ..., 22 keep
            492, 408, 324, 240, 156, 72). `"custom"`: `tower_pruning_layers` and `tower_pruning_keep`.
        tower_pruning_layers (`list[int]`, *optional*):
            `"custom"` only: the encoder layers (0-based, as in QG-VTC Table 1) whose output is pruned, strictly
            increasing, each run (up to the feature layer).
        tower_pruning_keep (`list[int]`, *optional*):
            `"custom"` only: patches kept after each of `tower_pruning_layers`, strictly decreasing, below the number of
            patches; the last one must be at least `num_visual_tokens`.
        tower_pruning_score (`str`, *optional*, defaults to `"question_relevance"`):
            How a step ranks patches, with the pruned layer's own query/key projections. `"question_relevance"`:
            QG-VTC Eq. 4, the question's EOS embedding mapped into the vision space by a learned MLP
            (`projector.tower_pruner.question_proj`, trained with the projector). `"cls_attention"`: the CLS token's
            attention (no question, no learned weights).
        tower_pruning_recycle (`bool`, *optional*, defaults to `True`):
            QG-VTC Eq. 5 at every step: kept_i += Σ_{j dropped} A(i, j) · X_j, A the pruned layer's attention.
        llm_pruning_layer (`int`, *optional*):
            LearnPruner's second step, inside the language model (docs/compression.md). Decoder layers before this one
            (0-based) see every visual token; at its input the text after each image (the question at inference; the
            prompt before the first supervised token in training) ranks the image's visual tokens by the attention it
            pays them, recomputed from the layer's own query/key projections, and this layer and all later ones keep
            only the top `llm_pruning_keep` per image, in their original order and positions. Their KV cache holds
            only the kept tokens. Needs a growing cache (`DynamicCache`, the default); the pruned positions of
            `last_hidden_state` (and of later `hidden_states`) are zeros. Unset: every layer sees every token.
        llm_pruning_keep (`int`, *optional*, defaults to 16):
            Visual tokens each image keeps from `llm_pruning_layer` on (all of them when an image has fewer).
        smoes_loss_coef (`float`, *optional*, defaults to 0.0):
            SMoES (Soft Modality-guided Expert Specialization) for a Mixture-of-Experts `text_config`: weight of the
            regulariser that, in training with labels, maximises in every layer the mutual information between a
            token's soft modality score and the expert bin its router sends it to (the loss adds
            `-smoes_loss_coef` x the mean over layers, in nats). 0 turns it off. The paper gives only its abstract;
            the choices made here are documented in docs/moe.md.
        smoes_bin_size (`int`, *optional*):
            Experts per bin: consecutive experts, as expert parallelism places them on one device. Defaults to half
            the experts (two bins). Must divide the number of experts.
        smoes_modality_score (`str`, *optional*, defaults to `"gaussian"`):
            How a token's soft modality score is computed per layer. `"gaussian"`: one diagonal Gaussian fitted to the
            layer's visual tokens and one to its text tokens (statistics of the batch, no gradient); the score is the
            sigmoid of the mean per-dimension log-likelihood ratio, so it is sharp where the layer keeps the
            modalities apart and softens where it fuses them. (The paper's attention-based score is not built.)
    """

    model_type = "qmop_llava"
    sub_configs = {"vision_config": AutoConfig, "text_encoder_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_encoder_config=None,
        text_config=None,
        num_visual_tokens: int = 144,
        branches=("pooling", "resampler", "pruning"),
        image_token_id: int = 32000,
        vision_feature_layer: int = -2,
        projector_hidden_act: str = "gelu",
        resampler_num_layers: int = 2,
        resampler_num_heads=None,
        resampler_intermediate_size=None,
        resampler_query_init: Literal["pooled", "learned"] = "pooled",
        pruning_score: PruningScore = "cls_attention",
        pruning_recycle: bool = False,
        router_mode: RouterMode = "query",
        router_hidden_size: int = 512,
        router_top_k: Optional[int] = None,
        router_temperature: float = 1.0,
        router_min_temperature: float = 0.1,
        router_temperature_schedule: TemperatureSchedule = "cosine",
        router_gumbel_noise: bool = True,
        router_aux_loss_coef: float = 0.01,
        router_eval_temperature: Optional[float] = None,
        router_z_loss_coef: float = 0.001,
        router_logit_cap: Optional[float] = None,
        router_logit_cap_mode: LogitCapMode = "tanh",
        router_training: RouterTraining = "mixture",
        router_exploration: float = 1.0,
        router_outcome_loss_coef: float = 1.0,
        router_outcome_branches: RouterOutcomeBranches = "sampled",
        router_input_norm: RouterInputNorm = "layer",
        router_input_norm_momentum: float = 0.01,
        query_max_length: int = 77,
        projector_dense_max_images: int = 8,
        pad_to_square: bool = False,
        tower_pruning_schedule: TowerPruningSchedule = "off",
        tower_pruning_layers: Optional[list] = None,
        tower_pruning_keep: Optional[list] = None,
        tower_pruning_score: TowerPruningScore = "question_relevance",
        tower_pruning_recycle: bool = True,
        llm_pruning_layer: Optional[int] = None,
        llm_pruning_keep: int = 16,
        smoes_loss_coef: float = 0.0,
        smoes_bin_size: Optional[int] = None,
        smoes_modality_score: SMoESModalityScore = "gaussian",
        custom_pipelines=None,
        **kwargs,
    ):
        self.vision_config = _sub_config(vision_config, CLIPVisionConfig, "clip_vision_model", "vision_config")
        self.text_encoder_config = _sub_config(
            text_encoder_config, CLIPTextConfig, "clip_text_model", "text_encoder_config"
        )
        self.text_config = _sub_config(text_config, None, "llama", "text_config")

        self.num_visual_tokens = num_visual_tokens
        self.branches = [b for b in BRANCH_ORDER if b in list(branches)] if not isinstance(branches, str) else branches
        self.image_token_id = image_token_id
        self.vision_feature_layer = vision_feature_layer
        self.projector_hidden_act = projector_hidden_act
        self.resampler_num_layers = resampler_num_layers
        self.resampler_num_heads = resampler_num_heads or self.vision_config.num_attention_heads
        self.resampler_intermediate_size = resampler_intermediate_size or self.vision_config.intermediate_size
        self.resampler_query_init = resampler_query_init
        self.pruning_score = pruning_score
        self.pruning_recycle = pruning_recycle
        self.router_mode = router_mode
        self.router_hidden_size = router_hidden_size
        branch_count = len(self.branches) if isinstance(self.branches, (list, tuple)) else 0
        # An outcome-trained router picks one branch: the language model was trained on single branches only.
        default_top_k = 1 if router_training == "outcome" else DEFAULT_ROUTER_TOP_K
        self.router_top_k = router_top_k if router_top_k is not None else max(1, min(default_top_k, branch_count))
        self.router_temperature = router_temperature
        self.router_min_temperature = router_min_temperature
        self.router_temperature_schedule = router_temperature_schedule
        self.router_gumbel_noise = router_gumbel_noise
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_eval_temperature = router_eval_temperature
        self.router_z_loss_coef = router_z_loss_coef
        self.router_logit_cap = router_logit_cap
        self.router_logit_cap_mode = router_logit_cap_mode
        self.router_training = router_training
        self.router_exploration = router_exploration
        self.router_outcome_loss_coef = router_outcome_loss_coef
        self.router_outcome_branches = router_outcome_branches
        self.router_input_norm = router_input_norm
        self.router_input_norm_momentum = router_input_norm_momentum
        self.query_max_length = query_max_length
        self.projector_dense_max_images = projector_dense_max_images
        self.pad_to_square = pad_to_square
        self.tower_pruning_schedule = tower_pruning_schedule
        self.tower_pruning_layers = None if tower_pruning_layers is None else list(tower_pruning_layers)
        self.tower_pruning_keep = None if tower_pruning_keep is None else list(tower_pruning_keep)
        self.tower_pruning_score = tower_pruning_score
        self.tower_pruning_recycle = tower_pruning_recycle
        self.llm_pruning_layer = llm_pruning_layer
        self.llm_pruning_keep = llm_pruning_keep
        self.smoes_loss_coef = smoes_loss_coef
        self.smoes_bin_size = smoes_bin_size
        self.smoes_modality_score = smoes_modality_score

        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
        # Set after super().__init__: 4.x's PretrainedConfig pops and re-sets `custom_pipelines` itself.
        self.custom_pipelines = custom_pipelines if custom_pipelines is not None else DEFAULT_CUSTOM_PIPELINES
        self._validate(branches)

    # ------------------------------------------------------------------------------------------ derived sizes
    @property
    def patch_grid(self) -> int:
        """Side of the vision tower's patch grid (24 for CLIP-L/14 at 336 px)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def num_patches(self) -> int:
        return self.patch_grid**2

    @property
    def num_llm_experts(self) -> Optional[int]:
        """Experts per layer of a Mixture-of-Experts language model (Mixtral's `num_local_experts`, Qwen-MoE's and
        OLMoE's `num_experts`); None for a dense one."""
        text = self.text_config
        return getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)

    @property
    def smoes_experts_per_bin(self) -> int:
        """Experts per SMoES bin: `smoes_bin_size`, else half the experts (two bins)."""
        return self.smoes_bin_size or self.num_llm_experts // 2

    @property
    def smoes_bins(self) -> int:
        """Number of SMoES expert bins."""
        return self.num_llm_experts // self.smoes_experts_per_bin

    @property
    def vision_feature_hidden_state_index(self) -> int:
        """Index into the tower's hidden states (embeddings output is 0): vision layers actually run."""
        num_states = self.vision_config.num_hidden_layers + 1
        return self.vision_feature_layer % num_states

    @property
    def router_inference_temperature(self) -> float:
        """Temperature of the router's softmax in eval mode."""
        if self.router_eval_temperature is None:
            return self.router_min_temperature
        return self.router_eval_temperature

    @property
    def uses_router(self) -> bool:
        return len(self.branches) > 1 and self.router_mode != "uniform"

    @property
    def uses_llm_pruning(self) -> bool:
        return self.llm_pruning_layer is not None

    @property
    def uses_tower_pruning(self) -> bool:
        return self.tower_pruning_schedule != "off"

    @property
    def tower_pruning_plan(self) -> list:
        """[(encoder layer, patches kept after it), ...] in layer order; empty when `tower_pruning_schedule` is off."""
        if self.tower_pruning_schedule == "custom":
            return list(zip(self.tower_pruning_layers, self.tower_pruning_keep))
        if self.tower_pruning_schedule == "off":
            return []
        layers_run = self.vision_feature_hidden_state_index
        feature_layer = layers_run - 1  # 0-based index of the last layer run
        layers = [layer for layer in range(feature_layer, layers_run // 2 - 1, -2)][:QG_VTC_STEPS][::-1]
        patches, steps = self.num_patches, len(layers)
        removed = patches - patches // QG_VTC_FINAL_FRACTION
        return [(layer, patches - round(step * removed / steps)) for step, layer in enumerate(layers, start=1)]

    @property
    def num_tower_patches(self) -> int:
        """Patches that leave the vision tower: all of them, or the last step's keep count."""
        plan = self.tower_pruning_plan
        return plan[-1][1] if plan else self.num_patches

    @property
    def uses_query(self) -> bool:
        """Whether the CLIP text encoder must run (and `query_input_ids` are required)."""
        return (
            (self.uses_router and self.router_mode == "query")
            or ("pruning" in self.branches and self.pruning_score == "question_relevance")
            or (self.uses_tower_pruning and self.tower_pruning_score == "question_relevance")
        )

    def get_text_config(self, *args, **kwargs):
        # The language model's config, for generation and cache set-up (the CLIP text encoder is not it).
        return self.text_config

    # ------------------------------------------------------------------------------------------ validation
    def validate_num_visual_tokens(self, num_visual_tokens: int, field: str = "num_visual_tokens") -> None:
        """Raise a ValueError naming `field` unless the budget is a positive square within the patch grid."""
        if not isinstance(num_visual_tokens, int) or isinstance(num_visual_tokens, bool) or num_visual_tokens < 1:
            raise ValueError(f"`{field}` must be a positive integer, got {num_visual_tokens!r}.")
        side = math.isqrt(num_visual_tokens)
        if side * side != num_visual_tokens:
            raise ValueError(
                f"`{field}`={num_visual_tokens} is not a perfect square; QMoP pools to a square grid "
                f"(e.g. 36, 64, 144, 576)."
            )
        if num_visual_tokens > self.num_patches:
            raise ValueError(
                f"`{field}`={num_visual_tokens} is larger than the vision tower's {self.num_patches} patches "
                f"({self.patch_grid}x{self.patch_grid})."
            )

    # Numeric and boolean fields, type-checked before any arithmetic on them (a JSON or CLI string such as "2" is an
    # error naming the field, not a TypeError from a comparison).
    _INT_FIELDS = ("image_token_id", "vision_feature_layer", "resampler_num_layers", "resampler_num_heads",
                   "resampler_intermediate_size", "router_hidden_size", "router_top_k", "query_max_length",
                   "projector_dense_max_images")
    _FLOAT_FIELDS = ("router_temperature", "router_min_temperature", "router_aux_loss_coef", "router_z_loss_coef",
                     "router_exploration", "router_outcome_loss_coef", "smoes_loss_coef",
                     "router_input_norm_momentum")
    _OPTIONAL_FLOAT_FIELDS = ("router_eval_temperature", "router_logit_cap")
    _BOOL_FIELDS = ("pruning_recycle", "router_gumbel_noise", "pad_to_square", "tower_pruning_recycle")

    def _check_field_types(self) -> None:
        for field in self._INT_FIELDS:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"`{field}` must be an integer, got {value!r} ({type(value).__name__}).")
        for field in self._FLOAT_FIELDS + self._OPTIONAL_FLOAT_FIELDS:
            value = getattr(self, field)
            if value is None and field in self._OPTIONAL_FLOAT_FIELDS:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise TypeError(f"`{field}` must be a finite number, got {value!r} ({type(value).__name__}).")
        for field in self._BOOL_FIELDS:
            value = getattr(self, field)
            if not isinstance(value, bool):
                raise TypeError(f"`{field}` must be True or False, got {value!r} ({type(value).__name__}).")

    def _validate(self, branches_arg) -> None:
        self._check_field_types()
        if isinstance(branches_arg, str) or not branches_arg:
            raise ValueError(f"`branches` must be a non-empty list drawn from {list(BRANCH_ORDER)}, got {branches_arg!r}.")
        unknown = [b for b in branches_arg if b not in BRANCH_ORDER]
        if unknown:
            raise ValueError(f"`branches` has unknown branch(es) {unknown}; choose from {list(BRANCH_ORDER)}.")
        if len(set(branches_arg)) != len(list(branches_arg)):
            raise ValueError(f"`branches` lists a branch twice: {list(branches_arg)}.")
        vc = self.vision_config
        if vc.image_size % vc.patch_size:
            raise ValueError(
                f"`vision_config.image_size`={vc.image_size} is not a multiple of `patch_size`={vc.patch_size}."
            )
        self.validate_num_visual_tokens(self.num_visual_tokens)
        if not -(vc.num_hidden_layers + 1) <= self.vision_feature_layer <= vc.num_hidden_layers:
            raise ValueError(
                f"`vision_feature_layer`={self.vision_feature_layer} is outside the tower's "
                f"{vc.num_hidden_layers + 1} hidden states."
            )
        if self.vision_feature_hidden_state_index == 0 and "pruning" in self.branches:
            raise ValueError("`vision_feature_layer` must select a transformer layer (not the embeddings) for pruning.")
        choices = {
            "resampler_query_init": ("pooled", "learned"),
            "pruning_score": get_args(PruningScore),
            "router_mode": get_args(RouterMode),
            "router_temperature_schedule": get_args(TemperatureSchedule),
            "router_logit_cap_mode": get_args(LogitCapMode),
            "router_training": get_args(RouterTraining),
            "router_outcome_branches": get_args(RouterOutcomeBranches),
            "router_input_norm": get_args(RouterInputNorm),
            "smoes_modality_score": get_args(SMoESModalityScore),
            "tower_pruning_schedule": get_args(TowerPruningSchedule),
            "tower_pruning_score": get_args(TowerPruningScore),
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"`{field}` must be one of {list(allowed)}, got {getattr(self, field)!r}.")
        if not 1 <= self.router_top_k <= len(self.branches):
            raise ValueError(
                f"`router_top_k`={self.router_top_k} must be between 1 and the number of branches "
                f"({len(self.branches)}: {self.branches})."
            )
        if self.router_min_temperature <= 0 or self.router_temperature < self.router_min_temperature:
            raise ValueError(
                f"`router_min_temperature` must be > 0 and <= `router_temperature`; got "
                f"{self.router_min_temperature} and {self.router_temperature}."
            )
        for field in ("resampler_num_layers", "router_hidden_size", "query_max_length"):
            if getattr(self, field) < 1:
                raise ValueError(f"`{field}` must be >= 1, got {getattr(self, field)}.")
        if self.projector_dense_max_images < 0:
            raise ValueError(f"`projector_dense_max_images` must be >= 0, got {self.projector_dense_max_images}.")
        if vc.hidden_size % self.resampler_num_heads:
            raise ValueError(
                f"`resampler_num_heads`={self.resampler_num_heads} does not divide the vision width {vc.hidden_size}."
            )
        self._validate_router_training()
        for field in ("router_aux_loss_coef", "router_z_loss_coef", "router_outcome_loss_coef"):
            if getattr(self, field) < 0:
                raise ValueError(f"`{field}` must be >= 0, got {getattr(self, field)}.")
        for field in ("router_eval_temperature", "router_logit_cap"):
            if getattr(self, field) is not None and not getattr(self, field) > 0:
                raise ValueError(f"`{field}` must be > 0 or None, got {getattr(self, field)}.")
        self._validate_tower_pruning()
        self._validate_llm_pruning()
        self._validate_smoes()
        max_pos = getattr(self.text_encoder_config, "max_position_embeddings", None)
        if max_pos is not None and self.query_max_length > max_pos:
            raise ValueError(
                f"`query_max_length`={self.query_max_length} exceeds the text encoder's {max_pos} positions."
            )


    def _validate_router_training(self) -> None:
        if not 0.0 < self.router_input_norm_momentum <= 1.0:
            raise ValueError(
                f"`router_input_norm_momentum` must be in (0, 1], got {self.router_input_norm_momentum}."
            )
        if not 0.0 <= self.router_exploration <= 1.0:
            raise ValueError(f"`router_exploration` must be between 0 and 1, got {self.router_exploration}.")
        if self.router_outcome_branches != "sampled" and self.router_training != "outcome":
            raise ValueError(
                f"`router_outcome_branches`={self.router_outcome_branches!r} applies to `router_training`='outcome' "
                f"only (got {self.router_training!r})."
            )
        if self.router_training != "outcome" or not self.uses_router:
            return
        if self.router_top_k != 1:
            raise ValueError(
                f"`router_training`='outcome' trains the language model on one branch per image, so the router must "
                f"pick one at inference: set `router_top_k`=1 (got {self.router_top_k})."
            )
        if self.router_logit_cap is not None:
            raise ValueError(
                "`router_training`='outcome' makes the router's logits predicted (negated) losses, which a cap would "
                f"clip: set `router_logit_cap`=None (got {self.router_logit_cap})."
            )

    def _validate_smoes(self) -> None:
        if self.smoes_loss_coef < 0:
            raise ValueError(f"`smoes_loss_coef` must be >= 0, got {self.smoes_loss_coef}.")
        bin_size = self.smoes_bin_size
        if bin_size is not None and (not isinstance(bin_size, int) or isinstance(bin_size, bool) or bin_size < 1):
            raise ValueError(f"`smoes_bin_size` must be an integer >= 1 or None, got {bin_size!r}.")
        if self.smoes_loss_coef == 0 and bin_size is None:
            return
        experts = self.num_llm_experts
        if experts is None:
            raise ValueError(
                f"SMoES (`smoes_loss_coef`, `smoes_bin_size`) needs a Mixture-of-Experts language model; "
                f"`text_config` ({self.text_config.model_type}) has no `num_local_experts` / `num_experts`."
            )
        size = self.smoes_experts_per_bin
        if not 1 <= size < experts or experts % size:
            raise ValueError(
                f"`smoes_bin_size`={size} must divide the language model's {experts} experts into at least two bins."
            )
        if self.uses_llm_pruning and self.smoes_loss_coef > 0:
            raise ValueError("SMoES reads every layer's tokens; it cannot be combined with `llm_pruning_layer`.")

    def _validate_llm_pruning(self) -> None:
        layer, keep = self.llm_pruning_layer, self.llm_pruning_keep
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"`llm_pruning_keep` must be an integer >= 1, got {keep!r}.")
        if layer is None:
            return
        num_layers = getattr(self.text_config, "num_hidden_layers", None)
        if not isinstance(layer, int) or isinstance(layer, bool) or num_layers is None or not 1 <= layer < num_layers:
            raise ValueError(
                f"`llm_pruning_layer` must be a decoder layer index in [1, {num_layers}) of the language model (the "
                f"layers before it see every visual token), or None; got {layer!r}."
            )

    def _validate_tower_pruning(self) -> None:
        layers, keep = self.tower_pruning_layers, self.tower_pruning_keep
        if self.tower_pruning_schedule != "custom":
            if layers is not None or keep is not None:
                raise ValueError(
                    f"`tower_pruning_layers` / `tower_pruning_keep` are read only with `tower_pruning_schedule="
                    f"\"custom\"`, got schedule {self.tower_pruning_schedule!r}."
                )
        else:
            for field, values in (("tower_pruning_layers", layers), ("tower_pruning_keep", keep)):
                if not values or any(not isinstance(v, int) or isinstance(v, bool) for v in values):
                    raise ValueError(f"`{field}` must be a non-empty list of integers, got {values!r}.")
            if len(layers) != len(keep):
                raise ValueError(
                    f"`tower_pruning_layers` ({len(layers)}) and `tower_pruning_keep` ({len(keep)}) differ in length."
                )
            layers_run = self.vision_feature_hidden_state_index
            if any(b <= a for a, b in zip(layers, layers[1:])) or not 0 <= layers[0] or layers[-1] >= layers_run:
                raise ValueError(
                    f"`tower_pruning_layers`={layers} must be strictly increasing encoder layers among the "
                    f"{layers_run} run up to `vision_feature_layer` (0 to {layers_run - 1})."
                )
            if any(b >= a for a, b in zip(keep, keep[1:])) or keep[0] >= self.num_patches or keep[-1] < 1:
                raise ValueError(
                    f"`tower_pruning_keep`={keep} must be strictly decreasing, below the {self.num_patches} patches "
                    "and at least 1."
                )
        if not self.uses_tower_pruning:
            return
        if not self.tower_pruning_plan:
            raise ValueError("`tower_pruning_schedule=\"qg_vtc\"` needs a transformer layer before the feature layer.")
        if self.num_tower_patches < self.num_visual_tokens:
            raise ValueError(
                f"Tower pruning keeps {self.num_tower_patches} patches but "
                f"`num_visual_tokens`={self.num_visual_tokens}: "
                f"the projector cannot make more tokens than it reads (plan {self.tower_pruning_plan})."
            )


QMoPConfig.register_for_auto_class()

__all__ = ["QMoPConfig"]
