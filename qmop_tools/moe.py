"""How a Mixture-of-Experts language model inside QMoP routes visual and text tokens (issue #16, docs/moe.md).

Per layer, over the valid tokens of some batches:
- **specialisation**: the mutual information (bits) between a token's modality (an `<image>` position or text) and
  the expert bin of each expert its router selects (top-k); 0 when both modalities spread over the bins alike, at
  most the modality's entropy when each bin serves one modality;
- **cross-bin share**: the share of a token's top-k selections, its first choice aside, that fall outside the bin of
  its first choice. A bin is a group of consecutive experts, as expert parallelism places them on one device, so
  this is the share of extra expert-parallel dispatches (the communication proxy);
- **visual share per bin**: which share of each bin's selections are visual tokens.
"""

import math
from typing import Iterable, Optional

import torch


def _mutual_information_bits(joint: torch.Tensor) -> float:
    """Mutual information (bits) of a (2, bins) table of counts."""
    total = joint.sum()
    if total == 0:
        return 0.0
    p = joint / total
    independent = p.sum(dim=1, keepdim=True) * p.sum(dim=0, keepdim=True)
    nonzero = p > 0
    return float((p[nonzero] * (p[nonzero] / independent[nonzero]).log()).sum() / math.log(2))


class RoutingCounts:
    """Running counts for one layer: selections per (modality, bin), and cross-bin selections."""

    def __init__(self, bins: int):
        self.joint = torch.zeros(2, bins, dtype=torch.float64)  # rows: visual, text
        self.cross = 0.0
        self.others = 0.0

    def add(self, router_logits: torch.Tensor, visual: torch.Tensor, valid: torch.Tensor, top_k: int,
            bin_size: int) -> None:
        """router_logits (tokens, E); visual / valid (tokens,) bool."""
        chosen = router_logits.float().topk(top_k, dim=-1).indices[valid.to(router_logits.device)]  # (n, k)
        bins = (chosen // bin_size).cpu()  # (n, k)
        modality = (~visual[valid]).long().cpu()  # (n,) 0 visual, 1 text
        self.joint.index_put_((modality[:, None].expand_as(bins).reshape(-1), bins.reshape(-1)),
                              torch.ones(bins.numel(), dtype=torch.float64), accumulate=True)
        self.cross += float((bins[:, 1:] != bins[:, :1]).sum())
        self.others += bins[:, 1:].numel()

    def summary(self) -> dict:
        per_bin = self.joint.sum(dim=0)
        return {
            "specialisation_bits": _mutual_information_bits(self.joint),
            "cross_bin_share": self.cross / self.others if self.others else 0.0,
            "visual_share_per_bin": [float(v) for v in (self.joint[0] / per_bin.clamp(min=1))],
            "selections": int(self.joint.sum()),
        }


@torch.no_grad()
def modality_routing_statistics(model, batches: Iterable[dict], bin_size: Optional[int] = None) -> dict:
    """{"layers": [per-layer summary], "mean_specialisation_bits", "mean_cross_bin_share", "bin_size", "top_k"} of a
    QMoP model whose `text_config` is a Mixture-of-Experts LM, over `batches` (processor outputs). `bin_size`
    defaults to the config's SMoES bins (half the experts)."""
    config = model.config
    experts = config.num_llm_experts
    if experts is None:
        raise ValueError(f"the language model ({config.text_config.model_type}) is not a Mixture-of-Experts model.")
    bin_size = bin_size or config.smoes_experts_per_bin
    if experts % bin_size or not 1 <= bin_size < experts:
        raise ValueError(f"bin_size={bin_size} must divide the {experts} experts into at least two bins.")
    top_k = config.text_config.num_experts_per_tok
    counts = None
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            out = model(**batch, output_router_logits=True)
            if not out.llm_router_logits:
                raise ValueError("the language model returned no router logits (`output_router_logits`).")
            input_ids = batch["input_ids"]
            visual = model.model.image_placeholder_mask(input_ids).reshape(-1).cpu()
            mask = batch.get("attention_mask")
            valid = (torch.ones_like(input_ids) if mask is None else mask).bool().reshape(-1).cpu()
            if counts is None:
                counts = [RoutingCounts(experts // bin_size) for _ in out.llm_router_logits]
            for layer, logits in zip(counts, out.llm_router_logits):
                layer.add(logits, visual, valid, top_k, bin_size)
    finally:
        model.train(was_training)
    if counts is None:
        raise ValueError("no batches were given.")
    layers = [c.summary() for c in counts]
    return {
        "layers": layers,
        "mean_specialisation_bits": sum(l["specialisation_bits"] for l in layers) / len(layers),
        "mean_cross_bin_share": sum(l["cross_bin_share"] for l in layers) / len(layers),
        "bin_size": bin_size,
        "top_k": top_k,
    }


# The dense Llama config fields a Mixtral config shares.
_SHARED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                  "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
                  "attention_dropout")


def upcycle_to_mixtral(llm, num_experts: int = 4, top_k: int = 2, seed: int = 0):
    """Sparse upcycling (Komatsuzaki et al., 2023): a dense Llama causal LM becomes a Mixtral causal LM in which
    every expert of a layer is a copy of that layer's MLP, with a freshly initialised gate (seeded); everything else
    is copied. The top-k weights are renormalised to sum to one, so the upcycled model computes exactly the dense
    model's function whatever the routing, and the experts drift apart only as training sends them different tokens.
    Needs transformers' fused expert layout (`mlp.experts.gate_up_proj`, transformers 5.x)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    dense = llm.config.to_dict()
    config = MixtralConfig(**{k: dense[k] for k in _SHARED_FIELDS if k in dense}, num_local_experts=num_experts,
                           num_experts_per_tok=top_k, output_router_logits=True)
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(config)
    source, target = llm.state_dict(), moe.state_dict()
    for key in target:
        if key in source:
            target[key] = source[key]
        elif key.endswith("mlp.experts.gate_up_proj"):  # (E, 2I, D): gate rows, then up rows
            prefix = key[: -len("experts.gate_up_proj")]
            gate_up = torch.cat([source[prefix + "gate_proj.weight"], source[prefix + "up_proj.weight"]])
            target[key] = gate_up.expand(num_experts, -1, -1).clone()
        elif key.endswith("mlp.experts.down_proj"):  # (E, D, I)
            target[key] = source[key.replace("experts.down_proj", "down_proj.weight")].expand(num_experts, -1, -1).clone()
        elif not key.endswith("mlp.gate.weight"):
            raise ValueError(f"upcycling found no dense weight for {key} (transformers {_transformers_version()}: "
                             "the fused expert layout of transformers 5.x is needed).")
    moe.load_state_dict(target)
    return moe


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
