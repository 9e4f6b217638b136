"""Command-line configuration of QMoP-LLaVA training (parsed with transformers' HfArgumentParser together with
`transformers.TrainingArguments`, which carries the optimiser, schedule, precision, saving, resuming, DeepSpeed /
FSDP and Hub flags)."""

from dataclasses import dataclass, field
from typing import Literal, Optional

Stage = Literal[1, 2]
Tuning = Literal["full", "lora", "qlora"]
Dtype = Literal["float32", "bfloat16", "float16"]

# The LLM's linear layers LoRA adapts (Llama / Vicuna / Mistral / Qwen naming); the vision tower, the CLIP text
# encoder, the projector and lm_head are never adapted.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "QMoP-LLaVA checkpoint (folder or Hub id) holding weights, config, code and processor."}
    )
    stage: int = field(
        default=1,
        metadata={
            "help": "1: train the projector (branches, experts, router) with everything else frozen. "
            "2: also train the language model (see --tuning).",
            "choices": [1, 2],
        },
    )
    tuning: str = field(
        default="full",
        metadata={
            "help": "How stage 2 trains the LLM: full fine-tuning, LoRA, or QLoRA (4-bit nf4 LLM + LoRA). "
            "The projector and router are always trained in full.",
            "choices": ["full", "lora", "qlora"],
        },
    )
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={
            "help": "dtype the weights are loaded in (default float32). Use bfloat16 with DeepSpeed, which keeps "
            "float32 master weights.",
            "choices": ["float32", "bfloat16", "float16"],
        },
    )
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "e.g. sdpa, flash_attention_2 (default: transformers' choice)."}
    )
    projector_lr: Optional[float] = field(
        default=None,
        metadata={"help": "Learning rate of the projector and router (LLaVA's mm_projector_lr); default --learning_rate."},
    )
    lora_r: int = field(default=128, metadata={"help": "LoRA rank (LLaVA-1.5 LoRA recipe: 128)."})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha (LLaVA-1.5 LoRA recipe: 256)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default=",".join(DEFAULT_LORA_TARGETS),
        metadata={"help": "Comma-separated names of the LLM's linear layers that get LoRA (only inside the LLM)."},
    )
    merge_lora: bool = field(
        default=False,
        metadata={
            "help": "After LoRA/QLoRA training, write the merged full model to output_dir (the adapter goes to "
            "output_dir/adapter). Otherwise output_dir holds the adapter, which loads on top of the base model."
        },
    )
    # Router schedule overrides (default: the checkpoint's config values).
    router_temperature: Optional[float] = field(
        default=None, metadata={"help": "Router softmax temperature at the start of training."}
    )
    router_min_temperature: Optional[float] = field(
        default=None,
        metadata={"help": "Floor of the annealed temperature (also the eval temperature unless that is set)."},
    )
    router_eval_temperature: Optional[float] = field(
        default=None, metadata={"help": "Router softmax temperature at inference (saved in config.json)."}
    )
    router_temperature_schedule: Optional[str] = field(
        default=None,
        metadata={"help": "Shape of the annealing over training steps.", "choices": ["cosine", "linear", "exponential", "constant"]},
    )
    router_gumbel_noise: Optional[bool] = field(
        default=None, metadata={"help": "Add Gumbel noise to the router logits in training."}
    )
    router_aux_loss_coef: Optional[float] = field(
        default=None, metadata={"help": "Weight of the router's load-balancing loss."}
    )
    router_z_loss_coef: Optional[float] = field(
        default=None, metadata={"help": "Weight of the router z-loss (keeps router logits small, ST-MoE)."}
    )
    router_logit_cap: Optional[float] = field(
        default=None, metadata={"help": "Soft cap on router logits, cap * tanh(logits / cap)."}
    )
    router_logit_cap_mode: Optional[str] = field(
        default=None,
        metadata={"help": "How the cap bounds the logits: tanh, or normalize (centred, root mean square = cap: the "
                  "gradient never vanishes).", "choices": ["tanh", "normalize"]},
    )
    router_training: Optional[str] = field(
        default=None,
        metadata={"help": "How the router learns: mixture (the paper's top-k fusion, trained through the LM loss) or "
                  "outcome (one branch drawn per image; the router regresses each branch's LM loss and picks the "
                  "lowest at inference; needs --router_top_k 1).", "choices": ["mixture", "outcome"]},
    )
    router_top_k: Optional[int] = field(default=None, metadata={"help": "Branches mixed per image."})
    router_exploration: Optional[float] = field(
        default=None,
        metadata={"help": "Outcome training: probability of drawing a training image's branch uniformly."},
    )
    router_outcome_loss_coef: Optional[float] = field(
        default=None, metadata={"help": "Outcome training: weight of the router's loss-regression term."}
    )
    router_outcome_branches: Optional[str] = field(
        default=None,
        metadata={"help": "Outcome training: each image goes through one sampled branch, or through all of them "
                  "(one LM pass per branch; every branch's loss is regressed).", "choices": ["sampled", "all"]},
    )
    router_input_norm: Optional[str] = field(
        default=None,
        metadata={"help": "What the router reads: layer ([LN(v); LN(t)]) or standardize (then each feature "
                  "standardised by running statistics of the training inputs, so that the question's small offset "
                  "from CLIP's shared direction counts; the statistics start as the identity).",
                  "choices": ["layer", "standardize"]},
    )
    router_input_norm_momentum: Optional[float] = field(
        default=None, metadata={"help": "router_input_norm=standardize: exponential rate of the running statistics."}
    )
    stage1_router: str = field(
        default="uniform",
        metadata={
            "help": "Routing in stage 1, whose query is one constant caption prompt. uniform: equal weights over all "
            "branches and the router frozen, so every expert is aligned and the router starts stage 2 untrained "
            "(a router trained on a constant query can only learn to route by picture, and saturates). train: "
            "route and train the router as in stage 2.",
            "choices": ["uniform", "train"],
        },
    )

    def config_overrides(self) -> dict:
        names = (
            "router_temperature",
            "router_min_temperature",
            "router_temperature_schedule",
            "router_gumbel_noise",
            "router_aux_loss_coef",
            "router_eval_temperature",
            "router_z_loss_coef",
            "router_logit_cap",
            "router_logit_cap_mode",
            "router_training",
            "router_top_k",
            "router_exploration",
            "router_outcome_loss_coef",
            "router_outcome_branches",
            "router_input_norm",
            "router_input_norm_momentum",
        )
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def lora_targets(self) -> list:
        targets = [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]
        if not targets:
            raise ValueError("`--lora_target_modules` is empty; name the LLM's linear layers to adapt.")
        return targets

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"`--stage` must be 1 or 2, got {self.stage}.")
        if self.tuning not in ("full", "lora", "qlora"):
            raise ValueError(f"`--tuning` must be full, lora or qlora, got {self.tuning!r}.")
        if self.stage == 1 and self.tuning != "full":
            raise ValueError(
                f"`--tuning {self.tuning}` applies to stage 2 (the LLM is frozen in stage 1); use --stage 2."
            )
        if self.stage1_router not in ("uniform", "train"):
            raise ValueError(f"`--stage1_router` must be uniform or train, got {self.stage1_router!r}.")
        if self.merge_lora and self.tuning == "full":
            raise ValueError("`--merge_lora` needs `--tuning lora` or `--tuning qlora`.")
        if self.lora_r < 1 or self.lora_alpha < 1:
            raise ValueError(f"`--lora_r` and `--lora_alpha` must be >= 1, got {self.lora_r} and {self.lora_alpha}.")

    @property
    def uses_lora(self) -> bool:
        return self.tuning in ("lora", "qlora")


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "LLaVA conversation JSON (a list of samples, or JSON lines)."})
    image_folder: Optional[str] = field(
        default=None, metadata={"help": "Folder that the samples' relative `image` paths start from."}
    )
    template: Optional[str] = field(
        default=None,
        metadata={
            "help": "Conversation template: plain (stage 1 default), vicuna_v1 (stage 2 default) or llava_hf "
            "(vicuna_v1 without the system prompt, as processor.apply_chat_template renders it).",
            "choices": ["plain", "vicuna_v1", "llava_hf"],
        },
    )
    model_max_length: int = field(
        default=2048, metadata={"help": "Longest token sequence; longer samples are cut (counted) or skipped."}
    )
    pad_to_square: Optional[bool] = field(
        default=None,
        metadata={"help": "LLaVA-1.5's expand2square before the image processor (default: the processor's setting)."},
    )
    train_budgets: Optional[str] = field(
        default=None,
        metadata={
            "help": "Comma-separated visual-token budgets (perfect squares, e.g. 16,36,64,144): each batch is trained "
            "at one drawn from them, so the checkpoint answers at any of them (pick one per call with the processor's "
            "num_visual_tokens). Default: the checkpoint's num_visual_tokens only."
        },
    )

    cache_samples: bool = field(
        default=False,
        metadata={
            "help": "Keep every encoded sample (ids, labels, pixels once per picture) in memory after its first draw: "
            "for small data trained for several epochs, where preprocessing costs as much as the step."
        },
    )

    def budgets(self) -> Optional[tuple]:
        if self.train_budgets is None:
            return None
        try:
            budgets = tuple(int(b) for b in self.train_budgets.split(",") if b.strip())
        except ValueError:
            raise ValueError(f"`--train_budgets` must be comma-separated integers, got {self.train_budgets!r}.") from None
        if not budgets:
            raise ValueError("`--train_budgets` is empty; give e.g. 16,36,64,144.")
        return budgets

    def template_for(self, stage: int) -> str:
        return self.template or ("plain" if stage == 1 else "vicuna_v1")
