"""Train QMoP-LLaVA: one function from parsed arguments to a finished Hub folder.

    qmop train --model_name_or_path CKPT --stage 1 --data_path data.json --image_folder images \\
        --output_dir out [any transformers.TrainingArguments flag]

Multi-process: `torchrun --nproc_per_node N -m qmop_tools train ...` or `accelerate launch ...`; DeepSpeed with
`--deepspeed configs/zero2.json` (or zero3.json); FSDP with `accelerate launch --config_file configs/fsdp.yaml`.
"""

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import HfArgumentParser, TrainingArguments, set_seed

from qmop_tools.checks import check_output_folder, require_qmop_checkpoint

from .arguments import DataArguments, ModelArguments
from .data import LazyLLaVADataset, QMoPDataCollator, check_llava_data
from .resume import resolve_resume
from processing_qmop import move_into

from .trainer import (
    QLORA_SKIP_MODULES,
    QMoPTrainer,
    apply_lora,
    configure_trainable,
    merge_lora_adapter,
    push_folder,
    trainable_summary,
    unwrap_qmop,
    write_model_card,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainResult:
    trainer: QMoPTrainer
    model: torch.nn.Module  # as trained (a PeftModel under LoRA)
    processor: object
    output_dir: str
    metrics: dict
    data_report: dict


def load_model_and_processor(model_args: ModelArguments, training_args: TrainingArguments):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    path = model_args.model_name_or_path
    config = AutoConfig.from_pretrained(path, trust_remote_code=True, **model_args.config_overrides())
    require_qmop_checkpoint(path, "--model_name_or_path", getattr(config, "model_type", None))
    # from_pretrained sets the overrides after the config's own checks: build it again so they are checked too.
    config = type(config).from_dict(config.to_dict())
    config.use_cache = False
    config.text_config.use_cache = False
    kwargs = {"config": config, "trust_remote_code": True}
    if model_args.torch_dtype:
        kwargs["dtype"] = DTYPES[model_args.torch_dtype]
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.tuning == "qlora":
        compute_dtype = torch.bfloat16 if training_args.bf16 else (torch.float16 if training_args.fp16 else torch.float32)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=list(QLORA_SKIP_MODULES),
        )
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    return model, processor


def prepare_training_arguments(training_args: TrainingArguments) -> bool:
    """Settings this model needs whatever the command line says; returns whether to push at the end."""
    # The collator needs the raw dataset items, not columns filtered by the model's forward signature.
    training_args.remove_unused_columns = False
    # With top-k routing a branch that no image in a batch selects gets no gradient on that rank.
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = True
    if training_args.gradient_checkpointing and training_args.gradient_checkpointing_kwargs is None:
        # Non-reentrant checkpointing works with frozen inputs (stage 1, LoRA) and with unused branches under DDP.
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    # The finished folder is pushed once at the end (not every checkpoint): see `push_folder`.
    push = bool(training_args.push_to_hub)
    if push and not training_args.hub_model_id:
        raise ValueError("`--push_to_hub` needs `--hub_model_id` (e.g. your-name/qmop-llava-7b-finetune).")
    training_args.push_to_hub = False
    return push


def build_dataset(data_args: DataArguments, model_args: ModelArguments, processor, config) -> LazyLLaVADataset:
    budgets = data_args.budgets()
    if budgets is not None:
        for budget in budgets:
            config.validate_num_visual_tokens(budget, "--train_budgets")
    return LazyLLaVADataset(
        data_path=data_args.data_path,
        processor=processor,
        image_folder=data_args.image_folder,
        template=data_args.template_for(model_args.stage),
        model_max_length=data_args.model_max_length,
        num_visual_tokens=max(budgets) if budgets else config.num_visual_tokens,
        require_image=model_args.stage == 1,
        pad_to_square=data_args.pad_to_square,
        cache_samples=data_args.cache_samples,
    )


def validate_run_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments):
    """Checks that need no model, before anything is loaded: the checkpoint, the data, the output folder and the
    checkpoint to resume from (returned: None or a complete checkpoint's path, see `resume.py`)."""
    require_qmop_checkpoint(model_args.model_name_or_path, "--model_name_or_path")
    check_llava_data(data_args.data_path)
    if data_args.image_folder is not None and not os.path.isdir(data_args.image_folder):
        raise FileNotFoundError(f"`--image_folder` {data_args.image_folder!r} is not a folder.")
    check_output_folder(training_args.output_dir, "--output_dir")
    return resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)


def run(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
        callbacks: Optional[list] = None) -> TrainResult:
    """Train as the arguments say and write the finished folder; `callbacks` are extra TrainerCallbacks."""
    resume = validate_run_arguments(model_args, data_args, training_args)
    push = prepare_training_arguments(training_args)
    set_seed(training_args.seed)  # before the model is touched: LoRA initialisation is random

    model, processor = load_model_and_processor(model_args, training_args)
    config = unwrap_qmop(model).config
    train_dataset = build_dataset(data_args, model_args, processor, config)

    configure_trainable(model, model_args.stage, train_language_model=not model_args.uses_lora,
                        stage1_router=model_args.stage1_router)
    if model_args.uses_lora:
        model = apply_lora(
            model,
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            targets=model_args.lora_targets(),
            quantized=model_args.tuning == "qlora",
            gradient_checkpointing=training_args.gradient_checkpointing,
        )
    logger.info("Stage %d (%s): %s", model_args.stage, model_args.tuning, trainable_summary(model))

    trainer = QMoPTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=QMoPDataCollator.from_processor(processor, budgets=data_args.budgets(), seed=training_args.seed),
        processing_class=processor,
        projector_lr=model_args.projector_lr,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    data_report = train_dataset.report()
    metrics["skipped_samples"] = data_report["num_skipped"]
    metrics["truncated_samples"] = data_report["truncated"]
    if data_report["num_skipped"]:
        logger.warning("Skipped samples in this process: %s", data_report["skipped"])
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    output_dir = save_outputs(trainer, model_args, training_args, processor, metrics)
    if push and trainer.is_world_process_zero():
        push_folder(output_dir, training_args.hub_model_id, token=training_args.hub_token,
                    private=training_args.hub_private_repo)
    return TrainResult(trainer, trainer.model, processor, output_dir, metrics, data_report)


def save_outputs(trainer: QMoPTrainer, model_args: ModelArguments, training_args: TrainingArguments, processor,
                 metrics: dict) -> str:
    """A complete Hub folder in output_dir: weights, config with auto_map, code files incl. the pipeline, the
    processor and a model card. Under LoRA: the adapter (+ projector) there, or with --merge_lora the merged model
    there and the adapter in output_dir/adapter. Written to temporary folders and moved into place."""
    output_dir = training_args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    is_main = trainer.is_world_process_zero()
    adapter_dir = os.path.join(output_dir, "adapter") if model_args.merge_lora else output_dir
    # Every rank takes part in save_model (DeepSpeed ZeRO-3 gathers the shards); only the main one writes.
    staging = os.path.join(output_dir, ".tmp-final")
    trainer.save_model(staging)
    if is_main:
        move_into(staging, adapter_dir)
        _remove_empty_tree(staging)
        write_model_card(adapter_dir, model_args.model_name_or_path, model_args.stage, model_args.tuning,
                         adapter=model_args.uses_lora, metrics=_card_metrics(metrics))
        if model_args.merge_lora:
            dtype = DTYPES[model_args.torch_dtype] if model_args.torch_dtype else None
            merge_lora_adapter(model_args.model_name_or_path, adapter_dir, output_dir, dtype=dtype)
            write_model_card(output_dir, model_args.model_name_or_path, model_args.stage, model_args.tuning,
                             adapter=False, metrics=_card_metrics(metrics))
    trainer.accelerator.wait_for_everyone()
    return output_dir


def _remove_empty_tree(path: str) -> None:
    for root, dirs, _ in os.walk(path, topdown=False):
        for name in dirs:
            os.rmdir(os.path.join(root, name))
    if os.path.isdir(path):
        os.rmdir(path)


def _card_metrics(metrics: dict) -> dict:
    keep = ("train_loss", "train_runtime", "epoch", "skipped_samples", "truncated_samples")
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in metrics.items() if key in keep}


def parse_args(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), prog="qmop train")
    if argv is not None and len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = os.path.abspath(argv[0])
        if path.endswith(".json"):
            return parser.parse_json_file(path)
        return parser.parse_yaml_file(path)
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv=None, callbacks: Optional[list] = None) -> TrainResult:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, training_args = parse_args(argv)
    return run(model_args, data_args, training_args, callbacks=callbacks)
