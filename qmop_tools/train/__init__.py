"""QMoP-LLaVA training: LLaVA conversation data, the two-stage recipe on the HF Trainer, LoRA/QLoRA, Hub output."""

from .arguments import DataArguments, ModelArguments
from .data import IGNORE_INDEX, TEMPLATES, LazyLLaVADataset, QMoPDataCollator, get_template, parse_conversations
from .run import TrainResult, main, parse_args, run
from .trainer import (
    QMoPTrainer,
    RouterTemperatureCallback,
    apply_lora,
    configure_trainable,
    lora_target_pattern,
    merge_lora_adapter,
    push_folder,
    router_loss,
    unwrap_qmop,
)

__all__ = [
    "DataArguments",
    "ModelArguments",
    "IGNORE_INDEX",
    "TEMPLATES",
    "LazyLLaVADataset",
    "QMoPDataCollator",
    "get_template",
    "parse_conversations",
    "TrainResult",
    "main",
    "parse_args",
    "run",
    "QMoPTrainer",
    "RouterTemperatureCallback",
    "apply_lora",
    "configure_trainable",
    "lora_target_pattern",
    "merge_lora_adapter",
    "push_folder",
    "router_loss",
    "unwrap_qmop",
]
