"""The two-stage QMoP-LLaVA recipe on top of the Hugging Face Trainer.

    stage 1: vision tower, CLIP text encoder, LLM and lm_head frozen; projector (branches, expert MLPs, router) trained
    stage 2: projector + the LLM, in full, with LoRA, or with QLoRA (4-bit nf4 LLM + LoRA); LoRA only on the LLM's
             linears, the projector and router are trained in full and saved with the adapter

The router temperature follows `modeling_qmop.router_temperature_at(config, step / max_steps)` (Gumbel noise is on in
training mode only, as the model does it); router weights per branch, temperature and the auxiliary load-balancing
loss are logged next to the LM loss.
"""

import logging
import os
import re
import tempfile
from collections import defaultdict
from typing import Optional

import torch
from processing_qmop import move_into
from transformers import Trainer, TrainerCallback

logger = logging.getLogger(__name__)

# Modules kept out of 4-bit quantization under QLoRA: everything that is not the LLM's decoder (quantizing the
# small router and projector is pointless and they are trained in full). The list replaces transformers' default
# skip list, so lm_head is named explicitly. Full paths from the model root: 5.x matches from the start.
QLORA_SKIP_MODULES = ("model.vision_tower", "model.text_encoder", "model.projector", "lm_head")


def unwrap_qmop(model: torch.nn.Module) -> torch.nn.Module:
    """The QMoPForConditionalGeneration inside DDP / DeepSpeed / PEFT wrappers."""
    for _ in range(8):
        if hasattr(type(model), "set_router_temperature"):  # the class, not __getattr__ forwarding (PEFT does)
            return model
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, DeepSpeed engine
            model = model.module
        else:
            break
    raise TypeError(f"{type(model).__name__} is not (a wrapper around) a QMoP-LLaVA model.")


# ===================================================================================== what each stage trains
# Share of images whose router softmax puts more than this on one branch: a saturated router has no gradient left.
SATURATION_THRESHOLD = 0.99


@torch.no_grad()
def router_statistics(outputs, branches) -> dict:
    """The router's per-batch statistics from a QMoP forward's outputs: aux, z- and outcome loss (and a
    Mixture-of-Experts LLM's own balancing loss, 0 for a dense one), the saturated share of images
    and the mean weight per branch (`router_weight/<branch>`); empty when the model has no router or no images.
    Both trainers log these (`QMoPTrainer`, `QMoPSFTTrainer`)."""
    aux_loss = getattr(outputs, "aux_loss", None)
    weights = getattr(outputs, "router_weights", None)  # (N, num_branches)
    if aux_loss is None or weights is None or not weights.numel():
        return {}
    z_loss = getattr(outputs, "router_z_loss", None)
    outcome_loss = getattr(outputs, "router_outcome_loss", None)
    statistics = {
        "aux_loss": float(aux_loss),
        "router_z_loss": 0.0 if z_loss is None else float(z_loss),
        "router_outcome_loss": 0.0 if outcome_loss is None else float(outcome_loss),
        "llm_aux_loss": float(getattr(outputs, "llm_aux_loss", None) or 0.0),  # a Mixture-of-Experts LLM's balancing
        "smoes_loss": float(getattr(outputs, "smoes_loss", None) or 0.0),
        "router_saturated": float((outputs.router_probs.max(dim=-1).values > SATURATION_THRESHOLD).float().mean()),
    }
    for column, branch in enumerate(branches):
        statistics[f"router_weight/{branch}"] = float(weights[:, column].float().mean())
    return statistics


def configure_trainable(model: torch.nn.Module, stage: int, train_language_model: bool,
                        stage1_router: str = "uniform") -> None:
    """Stage 1: only the projector. Stage 2 with `train_language_model`: also the LLM and lm_head.
    (With LoRA, pass train_language_model=False: PEFT adds the trainable adapters afterwards.)
    `stage1_router="uniform"`: in stage 1 every branch gets equal weight and the router is frozen (see
    `ModelArguments.stage1_router`); stage 2 always routes."""
    core = unwrap_qmop(model)
    core.requires_grad_(False)
    core.model.projector.requires_grad_(True)
    uniform = stage == 1 and stage1_router == "uniform" and core.model.projector.router is not None
    if uniform:
        if not hasattr(core, "set_router_uniform"):
            raise ValueError(
                "This checkpoint's modeling_qmop.py predates `set_router_uniform`; re-save it with the current code "
                "or pass --stage1_router train."
            )
        core.model.projector.router.requires_grad_(False)
    if hasattr(core, "set_router_uniform"):
        core.set_router_uniform(uniform)
    if stage == 2 and train_language_model:
        core.model.language_model.requires_grad_(True)
        core.lm_head.requires_grad_(True)


def lora_target_pattern(model: torch.nn.Module, leaf_names) -> str:
    """A PEFT `target_modules` regex matching exactly the LLM's linear layers named `leaf_names`
    (e.g. q_proj), so that the CLIP towers' q_proj/k_proj/v_proj never get adapters. Names the user chose must all
    exist; of the default names (`DEFAULT_LORA_TARGETS`, Llama's) those the LLM lacks are left out with a log line:
    a Mixture-of-Experts LLM in transformers 5.x holds its experts as fused parameters, not linear layers."""
    from .arguments import DEFAULT_LORA_TARGETS

    core = unwrap_qmop(model)
    found = set()
    for name, module in core.model.language_model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in leaf_names and isinstance(module, torch.nn.Linear):  # bnb Linear4bit subclasses nn.Linear
            found.add(leaf)
    missing = sorted(set(leaf_names) - found)
    if missing and found and set(leaf_names) == set(DEFAULT_LORA_TARGETS):
        logger.info("LoRA: the language model (%s) has no linear layers named %s; adapting %s",
                    type(core.model.language_model).__name__, missing, sorted(found))
    elif missing:
        raise ValueError(
            f"LoRA targets {missing} are not linear layers of the language model "
            f"({type(core.model.language_model).__name__}); check --lora_target_modules."
        )
    return r"model\.language_model\..*\.(" + "|".join(re.escape(n) for n in sorted(found)) + r")"


def apply_lora(model, r: int, alpha: int, dropout: float, targets, quantized: bool, gradient_checkpointing: bool):
    """Wrap the model with PEFT LoRA on the LLM's linears; the projector is a `modules_to_save` (trained in full
    and stored with the adapter)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_pattern(model, targets),
        modules_to_save=["projector"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainable_summary(model: torch.nn.Module) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_parameters": trainable, "total_parameters": total}


# ===================================================================================== router schedule
class RouterTemperatureCallback(TrainerCallback):
    """Anneals the router temperature with training progress (global step / max steps)."""

    def __init__(self, model: torch.nn.Module):
        self.core = unwrap_qmop(model)
        from_config = self.core.config
        self.temperature = from_config.router_temperature
        self._schedule = _router_schedule_function(self.core)

    def _update(self, state):
        progress = state.global_step / state.max_steps if state.max_steps else 0.0
        self.temperature = self._schedule(self.core.config, progress)
        self.core.set_router_temperature(self.temperature)

    def on_train_begin(self, args, state, control, **kwargs):
        self._update(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._update(state)


def _router_schedule_function(core: torch.nn.Module):
    """`router_temperature_at` from the model's own module (a local checkout or the Hub's remote code)."""
    import sys

    module = sys.modules[type(core).__module__]
    return module.router_temperature_at


# ===================================================================================== loss
def router_loss(outputs, config) -> torch.Tensor:
    """The router terms of QMoP's loss: `router_aux_loss_coef` · aux_loss + `router_z_loss_coef` · router_z_loss
    (+ `router_outcome_loss_coef` · router_outcome_loss for an outcome-trained router, + the text config's
    `router_aux_loss_coef` · llm_aux_loss for a Mixture-of-Experts LLM that outputs its router logits)."""
    total = 0.0
    if getattr(outputs, "aux_loss", None) is not None and config.router_aux_loss_coef > 0:
        total = total + config.router_aux_loss_coef * outputs.aux_loss
    if getattr(outputs, "router_z_loss", None) is not None and getattr(config, "router_z_loss_coef", 0.0) > 0:
        total = total + config.router_z_loss_coef * outputs.router_z_loss
    if getattr(outputs, "router_outcome_loss", None) is not None and getattr(config, "router_outcome_loss_coef", 0.0) > 0:
        total = total + config.router_outcome_loss_coef * outputs.router_outcome_loss
    if getattr(outputs, "llm_aux_loss", None) is not None:  # a Mixture-of-Experts LLM's own load balancing
        total = total + config.text_config.router_aux_loss_coef * outputs.llm_aux_loss
    if getattr(outputs, "smoes_loss", None) is not None:  # SMoES' modality-bin regulariser
        total = total + config.smoes_loss_coef * outputs.smoes_loss
    return total


def trainer_loss_scale(trainer: Trainer, num_items_in_batch) -> int:
    """The factor `Trainer.compute_loss` multiplied the model's loss by. With `average_tokens_across_devices` (the
    default) the LM loss is normalised by the token count of all processes, so the Trainer scales it by the number of
    processes, whose gradients are then averaged; the router terms, per-process means, are scaled with it."""
    args = trainer.args
    if not (getattr(args, "average_tokens_across_devices", False) and num_items_in_batch is not None
            and (trainer.model_accepts_loss_kwargs or trainer.compute_loss_func)):
        return 1
    if args.n_gpu > 1:
        return args.n_gpu
    # Tensor-parallel ranks share a batch and are not counted (transformers 5.x; 4.57 has no get_tp_size).
    tp_size = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
    return trainer.accelerator.num_processes // tp_size


def accumulation_scaled_loss(trainer: Trainer, model, loss, outputs, num_items_in_batch, config):
    """The model's loss for one micro-batch of a gradient-accumulation window on one process. With
    `num_items_in_batch` the Trainer does not divide the loss by the accumulation steps (the LM loss is already
    normalised over the whole window and all processes) and multiplies it by the number of processes
    (`trainer_loss_scale`). The router terms are per-micro-batch means, so they are weighted 1 / steps here instead:
    averaged over processes and summed over the window, they then count once per optimizer step, as in a
    one-process run with the same global batch."""
    # Set by the training loop (the last window of an epoch can be shorter than the setting).
    steps = getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)
    if model.training and num_items_in_batch is not None and trainer.model_accepts_loss_kwargs:
        scale = trainer_loss_scale(trainer, num_items_in_batch)
        if scale != 1 / steps:
            loss = loss - router_loss(outputs, config) * (scale - 1 / steps)
    return loss


# ===================================================================================== trainer
def check_distributed_engine(trainer: Trainer) -> None:
    """Refuse to train when FSDP or DeepSpeed was asked for but the Trainer's accelerator did not enable it.
    accelerate turns FSDP on only for accelerator devices (CUDA, XPU, NPU, ...): launched on CPU with an FSDP config
    (or `--fsdp`), it would otherwise train with plain DDP without a word."""
    args = trainer.args
    fsdp_requested = bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_requested and not trainer.is_fsdp_enabled:
        raise RuntimeError(
            f"FSDP was requested (accelerate config `distributed_type: FSDP` or `--fsdp`), but the Trainer runs as "
            f"{trainer.accelerator.distributed_type}: accelerate enables FSDP only on accelerator devices (CUDA, XPU, "
            "NPU, ...), and torch's FSDP needs one. On CPU, launch data-parallel without the FSDP config "
            "(`torchrun --nproc_per_node N` or `accelerate launch --num_processes N`), see docs/training.md."
        )
    if args.deepspeed and not trainer.is_deepspeed_enabled:
        raise RuntimeError(
            f"`--deepspeed {args.deepspeed}` was given, but the Trainer runs as {trainer.accelerator.distributed_type} "
            "without DeepSpeed; launch with `torchrun` or `deepspeed` (see docs/training.md)."
        )


class QMoPTrainer(Trainer):
    """HF Trainer that logs the router (mean weight per branch, temperature, aux loss, LM loss without the aux
    term) and can give the projector its own learning rate."""

    def __init__(self, *args, projector_lr: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        check_distributed_engine(self)
        self.core = unwrap_qmop(self.model)
        self.router_callback = RouterTemperatureCallback(self.model)
        self.add_callback(self.router_callback)
        self._router_sums = defaultdict(float)
        self._router_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = accumulation_scaled_loss(self, model, loss, outputs, num_items_in_batch, self.core.config)
        if model.training:
            self._record_router(outputs)
        return (loss, outputs) if return_outputs else loss

    def _record_router(self, outputs) -> None:
        statistics = router_statistics(outputs, self.core.config.branches)
        if not statistics:
            return
        for key, value in statistics.items():
            self._router_sums[key] += value
        self._router_count += 1

    def _router_means(self) -> dict:
        """Router statistics averaged over the micro-batches of every process since the last log (as the logged loss
        is). The training loop logs on every process at once, so the sums can be reduced here."""
        keys = ["aux_loss", "router_z_loss", "router_outcome_loss", "llm_aux_loss", "smoes_loss", "router_saturated"]
        keys += [f"router_weight/{branch}" for branch in self.core.config.branches]
        totals = torch.tensor([self._router_sums[key] for key in keys] + [float(self._router_count)],
                              dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        count = float(totals[-1])
        return {key: float(value) / count for key, value in zip(keys, totals[:-1])} if count else {}

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and "eval_loss" not in logs:
            # An outcome-trained router has no temperature in training (it draws branches; docs/training.md).
            if self.core.model.projector.router is not None and getattr(self.core.config, "router_training", "mixture") != "outcome":
                logs["router_temperature"] = round(self.router_callback.temperature, 6)
            means = self._router_means()
            if means:
                logs.update({key: round(value, 6) for key, value in means.items()})
                config = self.core.config
                router_loss = config.router_aux_loss_coef * means["aux_loss"]
                router_loss += getattr(config, "router_z_loss_coef", 0.0) * means["router_z_loss"]
                router_loss += getattr(config, "router_outcome_loss_coef", 0.0) * means["router_outcome_loss"]
                router_loss += getattr(config.text_config, "router_aux_loss_coef", 0.0) * means["llm_aux_loss"]
                router_loss += getattr(config, "smoes_loss_coef", 0.0) * means["smoes_loss"]
                logs["lm_loss"] = round(logs["loss"] - router_loss, 6)
            self._router_sums.clear()
            self._router_count = 0
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        if self.projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(*args, **kwargs)
        model = self.model
        decay = set(self.get_decay_parameter_names(model))
        groups = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            lr = self.projector_lr if ".projector." in f".{name}." else self.args.learning_rate
            weight_decay = self.args.weight_decay if name in decay else 0.0
            groups.setdefault((lr, weight_decay), []).append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        param_groups = [{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()]
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer


# ===================================================================================== outputs
def merge_lora_adapter(base_model: str, adapter_dir: str, output_dir: str, dtype: Optional[torch.dtype] = None) -> str:
    """Load the base model unquantized, apply the adapter (LoRA + trained projector), merge, and write a complete
    Hub folder (weights, config with auto_map, code files incl. the pipeline, processor) to `output_dir`."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = AutoModelForImageTextToText.from_pretrained(base_model, trust_remote_code=True, dtype=dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    processor = AutoProcessor.from_pretrained(adapter_dir, trust_remote_code=True)
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-merged-") as tmp:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        move_into(tmp, output_dir)
    return output_dir


def write_model_card(folder: str, base_model: str, stage: int, tuning: str, adapter: bool, metrics: dict) -> None:
    lines = [
        "---",
        "library_name: " + ("peft" if adapter else "transformers"),
        "pipeline_tag: image-text-to-text",
        "tags:",
        "- qmop-llava",
        "- llava",
        "- visual-token-compression",
    ]
    if not os.path.isdir(base_model):  # a Hub id: link the card to it
        lines.append(f"base_model: {base_model}")
    lines += [
        "---",
        "",
        "# QMoP-LLaVA fine-tune",
        "",
        f"Trained from `{base_model}`: stage {stage}, "
        + ("projector and router only" if stage == 1 else f"projector, router and LLM ({tuning})")
        + ".",
        "",
    ]
    if adapter:
        lines += [
            "This folder is a PEFT adapter (LoRA on the LLM, projector and router in full). Load it on top of the base:",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            f'base = AutoModelForImageTextToText.from_pretrained("{base_model}", trust_remote_code=True)',
            'model = PeftModel.from_pretrained(base, "<this folder or repo>")',
            'processor = AutoProcessor.from_pretrained("<this folder or repo>", trust_remote_code=True)',
            "```",
        ]
    else:
        lines += [
            "```python",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            'model = AutoModelForImageTextToText.from_pretrained("<this folder or repo>", trust_remote_code=True)',
            'processor = AutoProcessor.from_pretrained("<this folder or repo>", trust_remote_code=True)',
            "```",
        ]
    if metrics:
        lines += ["", "Training metrics:", ""] + [f"- {key}: {value}" for key, value in sorted(metrics.items())]
    text = "\n".join(lines) + "\n"
    tmp = os.path.join(folder, ".README.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(folder, "README.md"))


def push_folder(folder: str, repo_id: str, token: Optional[str] = None, private: Optional[bool] = None,
                commit_message: str = "Upload QMoP-LLaVA fine-tune") -> str:
    """Upload a finished output folder (not its intermediate checkpoints or logs) to the Hub."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(
        folder_path=folder,
        repo_id=repo_id,
        commit_message=commit_message,
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**", ".tmp-*", ".tmp-*/**", "*.tmp"],
    )
    return repo_id
