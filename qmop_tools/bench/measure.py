"""Measurements of one model at one budget: prefill (time to first token), decode, KV cache, memory, FLOPs.

Every prefill is called the way `generate` calls it: whole prompt, `use_cache=True`, logits of the last position
only. Timers synchronise the device before they start and before they stop. Inputs are already on the device, so
image preprocessing and tokenisation (the same work for both models) are not in the times.
"""

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from transformers import DynamicCache

from .flops import count_flops
from .models import BenchInputs


# ===================================================================================== timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device):
    """(result, seconds) of one call between two device synchronisations."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def median(values) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


# ===================================================================================== adapters
class ModelAdapter:
    """Uniform calls into QMoP-LLaVA or transformers' LLaVA: whole prefill, decode step, and the components."""

    kind: str

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.device = next(p.device for p in model.parameters())

    def prefill(self, inputs: BenchInputs):
        raise NotImplementedError

    def decode_step(self, token: torch.Tensor, cache):
        return self.model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)

    def next_token(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy next token (never the `<image>` placeholder, which needs pixels): (B, 1)."""
        logits = logits[:, -1].clone()  # (B, V)
        if self.config.image_token_id < logits.shape[-1]:
            logits[:, self.config.image_token_id] = float("-inf")
        return logits.argmax(dim=-1, keepdim=True)

    def _llm_prefill(self, input_ids: torch.Tensor, image_features: torch.Tensor):
        """Embed text, scatter the (N, M, D) image features into the placeholders, run the LLM and the head."""
        embeddings = self.model.get_input_embeddings()
        image_mask = input_ids == self.config.image_token_id  # (B, T + M)
        embeds = embeddings(input_ids.masked_fill(image_mask, 0))  # (B, T + M, D)
        mask = image_mask.unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, image_features.to(embeds.dtype))
        extra = self._llm_kwargs(image_mask, image_features.shape[1])
        hidden = self.model.model.language_model(inputs_embeds=embeds, use_cache=True, **extra).last_hidden_state
        return self.model.lm_head(hidden[:, -1:])  # (B, 1, V)

    def _llm_kwargs(self, image_mask: torch.Tensor, per_image: int) -> dict:
        return {}


class QMoPAdapter(ModelAdapter):
    kind = "qmop"

    def prefill(self, inputs: BenchInputs):
        return self.model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values,
                          query_input_ids=inputs.query_input_ids, use_cache=True, logits_to_keep=1)

    def components(self, inputs: BenchInputs) -> tuple:
        """Callables for the prefill's parts, each fed by the previous one's output (run in order)."""
        base, state = self.model.model, {}

        def text_encoder():  # first: tower pruning reads the question inside the vision tower
            state["query"] = base.get_query_embeds(inputs.query_input_ids, None) if self.config.uses_query else None

        def vision():
            state["vision"] = base.encode_vision(inputs.pixel_values, state["query"])

        def projector():
            state["scores"] = self._pruning_scores(state)
            scores, attention = state["scores"]
            hidden, positions = state["vision"].hidden, state["vision"].patch_positions
            state["projected"] = base.projector(hidden[:, 1:], hidden[:, 0], state["query"], inputs.num_visual_tokens,
                                                pruning_scores=scores, patch_attention=attention,
                                                patch_positions=positions)

        def llm():
            state["logits"] = self._llm_prefill(inputs.input_ids, state["projected"].image_features)

        parts = {"text_encoder": text_encoder, "vision_tower": vision, "router+branches": projector, "llm": llm}
        return parts, state

    def _llm_kwargs(self, image_mask: torch.Tensor, per_image: int) -> dict:
        """Mid-LLM pruning's plan, as QMoPModel.forward hands it to the language model (`llm_pruning_layer`)."""
        if not self.config.uses_llm_pruning:
            return {}
        from modeling_qmop import LLM_PRUNING_KWARG

        past = DynamicCache()  # a cache to continue, as in generate
        return {LLM_PRUNING_KWARG: self.model.model.llm_pruning_plan(image_mask, per_image, past_key_values=past),
                "past_key_values": past}

    def _pruning_scores(self, state: dict) -> tuple:
        """The pruning branch's scores (part of QMoP's own cost), on the patches the tower left."""
        if "pruning" not in self.config.branches:
            return None, None
        features = state["vision"]
        return self.model.model.pruning_scores(features.layer_input, features.feature_layer, state["query"],
                                               features.feature_layer_kept, patches=features.hidden[:, 1:])

    def router_flops(self, inputs: BenchInputs, state: dict) -> int:
        router = self.model.model.projector.router
        if router is None:
            return 0
        hidden = state["vision"].hidden
        return count_flops(router, hidden[:, 0], state["query"])[1]

    def meta_projector_flops(self, inputs: BenchInputs, state: dict) -> tuple:
        """On the meta device the router's choice is unknown: count the router and, for every image, the
        `router_top_k` most expensive branches (an upper bound). Returns (router FLOPs, branch FLOPs, branches)."""
        from .flops import branch_macs

        projector, config, budget = self.model.model.projector, self.config, inputs.num_visual_tokens
        patches, positions = state["vision"].hidden[:, 1:], state["vision"].patch_positions
        router = self.router_flops(inputs, state)
        ranked = sorted(config.branches, key=lambda b: branch_macs(config, b, budget))
        chosen = ranked[-config.router_top_k:] if config.uses_router else list(config.branches)
        flops = 0
        for name in chosen:
            if name == "pooling":
                flops += count_flops(projector.pooling_branch, patches, budget, positions)[1]
            elif name == "resampler":
                flops += count_flops(projector.resampler_branch, patches, budget, positions)[1]
            else:
                (scores, attention), score_flops = count_flops(self._pruning_scores, state)
                flops += score_flops + count_flops(projector.pruning_branch, patches, scores, attention, budget,
                                                   positions)[1]
        return router, flops, chosen


class LlavaAdapter(ModelAdapter):
    kind = "llava"

    def prefill(self, inputs: BenchInputs):
        return self.model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, use_cache=True,
                          logits_to_keep=1)

    def components(self, inputs: BenchInputs) -> tuple:
        base, state = self.model.model, {}
        layer = self.config.vision_feature_layer

        def vision():
            outputs = base.vision_tower(inputs.pixel_values, output_hidden_states=True)
            state["patches"] = outputs.hidden_states[layer][:, 1:]  # (N, P, Cv): CLS dropped ("default")

        def projector():
            state["features"] = base.multi_modal_projector(state["patches"])  # (N, P, D)

        def llm():
            state["logits"] = self._llm_prefill(inputs.input_ids, state["features"])

        return {"vision_tower": vision, "projector": projector, "llm": llm}, state


def adapter_for(model) -> ModelAdapter:
    return QMoPAdapter(model) if hasattr(model.config, "text_encoder_config") else LlavaAdapter(model)


# ===================================================================================== KV cache
def kv_cache_bytes(cache) -> int:
    """Bytes of every key and value tensor held by a cache (5.x `layers`, 4.x `key_cache`, or legacy tuples)."""
    if cache is None:
        raise ValueError("the prefill returned no cache (use_cache=True was ignored)")
    tensors = []
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    elif hasattr(cache, "key_cache"):
        tensors = list(cache.key_cache) + list(cache.value_cache)
    else:
        tensors = [t for pair in cache for t in pair]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def kv_bytes_formula(llm_config, tokens: int, bytes_per_value: int, pruning=None) -> int:
    """2 (K and V) · layers · key/value width · tokens · bytes (shared/DESIGN.md section 6, GQA-aware); with mid-LLM
    `pruning` (flops.LLMPruning) the layers from `pruning.layer` on hold `pruning.kept_tokens`."""
    head_dim = getattr(llm_config, "head_dim", None) or llm_config.hidden_size // llm_config.num_attention_heads
    kv_heads = getattr(llm_config, "num_key_value_heads", None) or llm_config.num_attention_heads
    layers = llm_config.num_hidden_layers
    token_layers = layers * tokens if pruning is None else (
        pruning.layer * tokens + (layers - pruning.layer) * pruning.kept_tokens
    )
    return 2 * kv_heads * head_dim * token_layers * bytes_per_value


def weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# ===================================================================================== one run
@dataclass
class RunResult:
    ttft_s: float  # prefill of the whole prompt, images included, to the first token
    decode_s: float  # the following `decode_tokens` steps
    decode_tokens: int
    kv_bytes: int  # the cache right after prefill, whole batch
    peak_bytes: Optional[int]  # CUDA: peak allocated above what was allocated before the run
    components_s: Optional[dict] = None


@torch.inference_mode()
def run_once(adapter: ModelAdapter, inputs: BenchInputs, decode_tokens: int, with_components: bool) -> RunResult:
    device = adapter.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)

    def first_token():
        out = adapter.prefill(inputs)
        return out, adapter.next_token(out.logits)

    (out, token), ttft = timed(first_token, device)
    cache = out.past_key_values
    kv = kv_cache_bytes(cache)

    def decode():
        nonlocal token, cache
        for _ in range(decode_tokens):
            step = adapter.decode_step(token, cache)
            cache, token = step.past_key_values, adapter.next_token(step.logits)
        return token

    _, decode_s = timed(decode, device)
    peak = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - allocated_before
    del out, cache

    components = None
    if with_components:
        parts, _ = adapter.components(inputs)
        components = {name: timed(part, device)[1] for name, part in parts.items()}
    return RunResult(ttft, decode_s, decode_tokens, kv, peak, components)


@torch.inference_mode()
def count_prefill_flops(adapter: ModelAdapter, inputs: BenchInputs) -> dict:
    """Counted FLOPs of the prefill: by component (direct calls, as the forward makes them) and, off the meta
    device, of the whole forward in one piece (the two must agree)."""
    parts, state = adapter.components(inputs)
    counted, note = {}, None
    meta = adapter.device.type == "meta"
    for name, part in parts.items():
        if meta and name == "router+branches":
            router, branches, chosen = adapter.meta_projector_flops(inputs, state)
            counted["router"], counted["branches"] = router, branches
            note = f"meta device: router's choice unknown, counted the top-{len(chosen)} costliest branches {chosen}"
            continue
        if meta and name == "llm":
            counted["llm"] = count_flops(_meta_llm, adapter, inputs, state)[1]
            continue
        counted[name] = count_flops(part)[1]
        if name == "router+branches":
            counted["router"] = adapter.router_flops(inputs, state)
            counted["branches"] = counted.pop("router+branches") - counted["router"]
    if "projector" in counted:  # LLaVA's projector is its only "branch"
        counted["branches"] = counted.pop("projector")
    counted.setdefault("text_encoder", 0)
    counted.setdefault("router", 0)
    counted["total"] = sum(counted.values())
    whole = None if meta else count_flops(adapter.prefill, inputs)[1]
    branch_images = None
    if adapter.kind == "qmop" and not meta:
        weights = state["projected"].router_weights  # (N, nb)
        if adapter.model.model.projector.uses_dense_path(weights.shape[0], adapter.device):
            # Dense path (accelerator, small batch): every branch ran on every image, masked by the weights.
            branch_images = {b: weights.shape[0] for b in adapter.config.branches}
        else:
            branch_images = {b: int((weights[:, i] > 0).sum()) for i, b in enumerate(adapter.config.branches)}
    return dict(components=counted, whole_forward=whole, branch_images=branch_images, note=note)


def _meta_llm(adapter: ModelAdapter, inputs: BenchInputs, state: dict):
    """LLM prefill on meta tensors, layer by layer. The placeholder scatter is data-dependent and 4.57's rotary
    embedding cannot run on meta (it opens an autocast context for the tensor's device), so the layers get
    embeddings and rotary angles of the right shapes; the angles are not matrix products either way."""
    text_config = adapter.config.text_config
    llm = adapter.model.model.language_model
    dtype = adapter.model.lm_head.weight.dtype
    batch, tokens = inputs.input_ids.shape
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    hidden = torch.empty(batch, tokens, text_config.hidden_size, device="meta", dtype=dtype)  # (B, T + M, D)
    angles = torch.empty(batch, tokens, head_dim, device="meta", dtype=dtype)  # cos and sin: (B, T + M, h)
    pruning = _meta_llm_pruning(adapter.config, inputs)
    for index, layer in enumerate(llm.layers):
        if pruning is not None and index == pruning.layer:
            # The ranking's matrix products (modeling_qmop.text_to_vision_attention) on tensors of its shapes; then
            # this layer and the later ones run on the kept positions.
            attn = layer.self_attn
            q = attn.q_proj(hidden[:, : pruning.query_rows]).view(batch, pruning.query_rows, -1, head_dim)
            k = attn.k_proj(hidden).view(batch, tokens, -1, head_dim)
            k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
            _ = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)  # (B, H, Q, T)
            hidden, angles = hidden[:, : pruning.kept_tokens], angles[:, : pruning.kept_tokens]
        out = layer(hidden, attention_mask=None, position_embeddings=(angles, angles))
        hidden = out[0] if isinstance(out, tuple) else out
    return adapter.model.lm_head(llm.norm(hidden[:, -1:]))  # (B, 1, V)


def _meta_llm_pruning(config, inputs: BenchInputs):
    from .flops import LLMPruning

    if not getattr(config, "uses_llm_pruning", False):
        return None
    return LLMPruning.of(config, inputs.sequence_length - inputs.num_visual_tokens, inputs.num_visual_tokens,
                         inputs.text_after_image)
