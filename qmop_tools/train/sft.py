"""TRL's SFTTrainer for QMoP-LLaVA: same datasets, collators and arguments as for llava-hf models.

    from qmop_tools.train.sft import QMoPSFTTrainer      # instead of `from trl import SFTTrainer`
    trainer = QMoPSFTTrainer(model=model, args=SFTConfig(...), train_dataset=dataset, processing_class=processor)

What it changes, and why a subclass (docs/training.md, "TRL"):
- The loss is the model's own: LM loss + `router_aux_loss_coef` · load balancing + `router_z_loss_coef` · z-loss.
  SFTTrainer 1.16 replaces `model.forward` by a fused LM head that runs the backbone and scores the labels itself;
  QMoP's router terms never reach that loss (TRL adds a Mixtral-style aux loss only for MoE language models), and
  it cannot be reached from the model without patching TRL. Here the forward is the model's, once per step.
- Labels on `<image>` placeholders are set to -100 in the batch, before the Trainer counts `num_items_in_batch`:
  the loss is then normalised by the trained tokens only (the model ignores placeholders anyway, the count did not).
- The router temperature is annealed with the global step (`RouterTemperatureCallback`, as in `QMoPTrainer`).
- The router terms are per-batch means: under gradient accumulation with `num_items_in_batch` (where the Trainer
  does not divide the loss by the accumulation steps) they are divided by the steps, as TRL does for MoE aux losses.
TRL's metrics (entropy, mean_token_accuracy, num_tokens) are kept, and the router's are added to the logs.
"""

import torch
from transformers import Trainer
from trl import SFTTrainer

from .data import IGNORE_INDEX
from .trainer import (RouterTemperatureCallback, accumulation_scaled_loss, check_distributed_engine, router_statistics,
                      unwrap_qmop)


class PlaceholderLabelMasking:
    """A data collator around another: labels on the image placeholders of `input_ids` become -100, and so does the
    first label of each row, which a causal LM never predicts (transformers 4.57's Trainer counts it in
    `num_items_in_batch`, 5.x does not: masked, both normalise the loss by the same, predicted, tokens)."""

    def __init__(self, collator, image_token_id: int):
        self.collator = collator
        self.image_token_id = image_token_id

    def __call__(self, examples):
        batch = self.collator(examples)
        if "labels" in batch and "input_ids" in batch:
            placeholders = batch["input_ids"] == self.image_token_id  # (B, T)
            batch["labels"] = batch["labels"].masked_fill(placeholders, IGNORE_INDEX)
            batch["labels"][:, 0] = IGNORE_INDEX
        return batch

    def __getattr__(self, name):  # the wrapped collator's settings (max_length, processor, ...)
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


class QMoPSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` that optimises QMoP-LLaVA's own loss (placeholders masked, router aux and z-losses included)
    and anneals the router temperature. Takes exactly SFTTrainer's arguments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.loss_type != "nll" or self.compute_loss_func is not None or self.label_smoother is not None:
            raise ValueError(
                "QMoPSFTTrainer optimises the model's own loss (LM loss + router terms): `loss_type='dft'`, "
                "`label_smoothing_factor` and `compute_loss_func` are not supported."
            )
        check_distributed_engine(self)
        self.core = unwrap_qmop(self.model)
        self.data_collator = PlaceholderLabelMasking(self.data_collator, self.core.config.image_token_id)
        self.router_callback = RouterTemperatureCallback(self.model)
        self.add_callback(self.router_callback)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["use_cache"] = False
        # Trainer's compute_loss (SFTTrainer's own would take the fused LM head): the model's forward and loss, with
        # `num_items_in_batch` passed to the model and the multi-process scaling of `average_tokens_across_devices`.
        loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = accumulation_scaled_loss(self, model, loss, outputs, num_items_in_batch, self.core.config)
        self._record_metrics(inputs, outputs)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _record_metrics(self, inputs, outputs) -> None:
        """TRL's metrics (entropy and accuracy of the next-token prediction on label positions, tokens seen) and the
        router's (`router_statistics`: aux and z-loss, saturated share, mean weight per branch; and the temperature); SFTTrainer.log averages them per logging step."""
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        labels = inputs["labels"][:, 1:].to(outputs.logits.device)  # (B, T-1)
        mask = labels != IGNORE_INDEX
        logits = outputs.logits[:, :-1][mask].float()  # (n, V)
        num_valid = self.accelerator.gather_for_metrics(mask.sum()).sum()
        log_probs = torch.log_softmax(logits, dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1).sum()
        correct = (logits.argmax(-1) == labels[mask]).sum()
        entropy = self.accelerator.gather_for_metrics(entropy).sum()
        correct = self.accelerator.gather_for_metrics(correct).sum()
        metrics["entropy"].append((entropy / num_valid).item() if num_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.core.model.projector.router is None:
            return
        if mode == "train":
            metrics["router_temperature"].append(self.router_callback.temperature)
        statistics = router_statistics(outputs, self.core.config.branches)
        if statistics:  # means over the processes, one gather for all of them
            values = torch.tensor(list(statistics.values()), dtype=torch.float64, device=self.accelerator.device)
            values = self.accelerator.gather(values).view(-1, len(statistics)).mean(0)  # (processes * k,) -> (k,)
            for name, value in zip(statistics, values.tolist()):
                metrics[name].append(value)


__all__ = ["QMoPSFTTrainer", "PlaceholderLabelMasking"]
