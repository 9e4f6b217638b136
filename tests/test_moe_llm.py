"""QMoP on Mixture-of-Experts language models (issue #16, item 1): any MoE causal LM that transformers builds from a
config works as `text_config`, with its own load-balancing loss, placement hints, generation and save/reload."""

import importlib.util
import math
import re
import inspect

import pytest
import torch

from conftest import make_image
from qmop_tools.testing.tiny import TINY_MOE, build_config, build_model, build_processor

PROMPT = "USER: <image>\nWhat is it? ASSISTANT:"


def _gates(model) -> list:
    """The MoE LLM's router weights, one per layer (`mlp.gate` in transformers 5.x, Mixtral's `block_sparse_moe.gate`
    in 4.57)."""
    gates = [p for name, p in model.named_parameters() if re.search(r"\.(mlp|block_sparse_moe)\.gate\.weight$", name)]
    assert len(gates) == model.config.text_config.num_hidden_layers
    return gates


def _tiny_moe(model_type, **kwargs):
    processor = build_processor()
    return build_model(build_config(processor, language_model=model_type, **kwargs)), processor


@pytest.fixture(scope="module", params=sorted(TINY_MOE))
def moe(request):
    return (request.param, *_tiny_moe(request.param))


def test_builds_the_moe_language_model_and_its_placement_hints(moe):
    model_type, model, _ = moe
    language_model = model.model.language_model
    assert language_model.config.model_type == model_type
    layer_class = type(language_model.layers[0]).__name__
    assert layer_class in model._no_split_modules  # device_map="auto" never splits a decoder layer (with its experts)
    assert "LlamaDecoderLayer" not in model._no_split_modules  # nothing of the default LLM is assumed


def test_generates_the_same_tokens_with_and_without_the_cache(moe):
    _, model, processor = moe
    inputs = processor(images=make_image(seed=1), text=PROMPT)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_batch_answers_as_each_sample_alone(moe):
    _, model, processor = moe
    images = [make_image(seed=1), make_image(seed=2)]
    texts = [PROMPT, "USER: <image>\nAnd which colour is the background of this picture? ASSISTANT:"]
    batch = processor(images=images, text=texts, padding=True)
    with torch.no_grad():
        together = model(**batch).logits
        for i in range(2):
            alone = model(**processor(images=images[i], text=texts[i])).logits
            length = alone.shape[1]
            rows = batch["attention_mask"][i].bool()  # this sample's own positions, wherever the padding is
            torch.testing.assert_close(together[i][rows][-length:], alone[0], rtol=1e-4, atol=1e-4)


def test_the_language_models_load_balancing_loss_is_added_as_its_own_head_would(moe):
    _, model, processor = moe
    inputs = processor(images=[make_image(seed=1), make_image(seed=2)], text=[PROMPT, PROMPT + " a dog"],
                       padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        plain = model(**inputs, labels=labels)
        routed = model(**inputs, labels=labels, output_router_logits=True)
    assert plain.llm_aux_loss is None and plain.llm_router_logits is None
    text_config = model.config.text_config
    assert len(routed.llm_router_logits) == text_config.num_hidden_layers
    balance = inspect.getmodule(type(model.model.language_model)).load_balancing_loss_func
    num_experts = getattr(text_config, "num_local_experts", None) or text_config.num_experts
    expected = balance(routed.llm_router_logits, num_experts, text_config.num_experts_per_tok, inputs["attention_mask"])
    torch.testing.assert_close(routed.llm_aux_loss, expected)
    assert routed.llm_aux_loss > 0
    torch.testing.assert_close(routed.loss, plain.loss + text_config.router_aux_loss_coef * expected)


def test_saves_and_reloads_through_the_auto_classes(moe, tmp_path):
    from transformers import AutoModelForImageTextToText

    model_type, model, processor = moe
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert reloaded.config.text_config.model_type == model_type
    inputs = processor(images=make_image(seed=3), text=PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


def test_training_on_an_moe_language_model_reaches_its_experts():
    model, processor = _tiny_moe("mixtral")
    model.config.text_config.output_router_logits = True  # as a user fine-tuning Mixtral sets it
    inputs = processor(images=make_image(seed=1), text=PROMPT + " a dog")
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    model.eval()
    assert out.llm_aux_loss is not None
    gate = _gates(model)[0]  # the first layer's router
    assert gate.grad.abs().sum() > 0  # the LLM's router learns from the balancing term


def test_the_trainers_count_the_llm_balancing_loss_as_a_router_term():
    """Gradient accumulation rescales the per-micro-batch router terms (`accumulation_scaled_loss`) and the logs
    subtract them from `lm_loss`: the MoE LLM's balancing loss is one of them."""
    from qmop_tools.train.trainer import router_loss, router_statistics

    model, processor = _tiny_moe("olmoe")
    inputs = processor(images=make_image(seed=1), text=PROMPT + " a dog")
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"], output_router_logits=True)
        dense = model(**inputs, labels=inputs["input_ids"])
    coef = model.config.text_config.router_aux_loss_coef
    torch.testing.assert_close(torch.as_tensor(router_loss(out, model.config)),
                               torch.as_tensor(router_loss(dense, model.config)) + coef * out.llm_aux_loss)
    assert router_statistics(out, model.config.branches)["llm_aux_loss"] == pytest.approx(float(out.llm_aux_loss))
    assert router_statistics(dense, model.config.branches)["llm_aux_loss"] == 0.0


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("model_type", sorted(TINY_MOE))
def test_4bit_quantizes_the_moe_language_model_only(model_type, tmp_path):
    """Width 64 (bitsandbytes' CPU 4-bit kernels fail on narrower projections, as in test_deployment.py)."""
    from transformers import BitsAndBytesConfig

    from qmop_tools.files import save_pretrained_atomically
    from modeling_qmop import QMoPForConditionalGeneration

    import transformers

    if model_type == "olmoe" and transformers.__version__.startswith("4."):
        pytest.skip("bitsandbytes' CPU 4-bit kernel kills the process (SIGFPE) on OLMoE's tiny per-expert linears "
                    "under transformers 4.57 (5.x fuses the experts into parameters it does not quantize)")
    model, processor = _tiny_moe(model_type, width=64)
    folder = save_pretrained_atomically(str(tmp_path / "moe"), model, processor)
    # bitsandbytes' CPU 4-bit kernel needs output widths divisible by its block: the routers' 4 outputs (a Linear in
    # transformers 4.57) and Qwen2-MoE's one-output shared-expert gate stay unquantized here (GPU kernels quantize them).
    settings = dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=[
        "vision_tower", "text_encoder", "projector", "lm_head", "gate", "shared_expert_gate"])
    quantized = QMoPForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, quantization_config=BitsAndBytesConfig(**settings)
    ).eval()
    names = [name for name, module in quantized.named_modules() if type(module).__name__ == "Linear4bit"]
    assert names and all(name.startswith("model.language_model.layers.") for name in names), names
    inputs = processor(images=make_image(seed=1), text=PROMPT)
    with torch.no_grad():
        tokens = quantized.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 3


# ------------------------------------------------------------------------------------------ SMoES and its metrics
def test_smoes_config_is_checked():
    with pytest.raises(ValueError, match="needs a Mixture-of-Experts language model"):
        _tiny_moe_config("llama", smoes_loss_coef=0.1)
    with pytest.raises(ValueError, match="at least two bins"):
        _tiny_moe_config("mixtral", smoes_loss_coef=0.1, smoes_bin_size=3)
    with pytest.raises(ValueError, match="smoes_loss_coef"):
        _tiny_moe_config("mixtral", smoes_loss_coef=-1.0)
    with pytest.raises(ValueError, match="smoes_modality_score"):
        _tiny_moe_config("mixtral", smoes_loss_coef=0.1, smoes_modality_score="attention")
    config = _tiny_moe_config("mixtral", smoes_loss_coef=0.1)
    assert config.num_llm_experts == 4 and config.smoes_bins == 2


def _tiny_moe_config(model_type, **kwargs):
    return build_config(build_processor(), language_model=model_type, **kwargs)


def test_gaussian_modality_scores_separate_distinct_modalities_and_soften_when_they_fuse():
    from modeling_qmop import gaussian_modality_scores

    generator = torch.Generator().manual_seed(0)
    visual = torch.arange(200) < 100
    valid = torch.ones(200, dtype=torch.bool)
    apart = torch.randn(200, 16, generator=generator) + 3.0 * visual[:, None]
    fused = torch.randn(200, 16, generator=generator) + 0.1 * visual[:, None]
    sharp, soft = gaussian_modality_scores(apart, visual, valid), gaussian_modality_scores(fused, visual, valid)
    assert sharp[visual].min() > 0.9 and sharp[~visual].max() < 0.1
    assert (soft - 0.5).abs().mean() < (sharp - 0.5).abs().mean() / 4
    assert gaussian_modality_scores(apart, torch.zeros(200, dtype=torch.bool), valid) is None  # no visual token


def test_mutual_information_is_the_modality_entropy_when_each_bin_serves_one_modality():
    from modeling_qmop import modality_bin_mutual_information

    visual = torch.tensor([1.0, 1.0, 0.0, 0.0])
    separated = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    mixed = torch.full((4, 2), 0.5)
    ones = torch.ones(4)
    torch.testing.assert_close(modality_bin_mutual_information(visual, separated, ones), torch.tensor(math.log(2)))
    torch.testing.assert_close(modality_bin_mutual_information(visual, mixed, ones), torch.tensor(0.0), atol=1e-6,
                               rtol=0)
    # a token with weight 0 (padding) counts for nothing
    padded = torch.cat([separated, torch.tensor([[1.0, 0.0]])])
    torch.testing.assert_close(
        modality_bin_mutual_information(torch.cat([visual, torch.tensor([0.0])]), padded, torch.tensor([1.0] * 4 + [0.0])),
        torch.tensor(math.log(2)))


def test_routing_statistics_read_specialisation_and_cross_bin_dispatch():
    from qmop_tools.moe import RoutingCounts

    visual = torch.tensor([True, True, False, False])
    valid = torch.ones(4, dtype=torch.bool)
    # Visual tokens pick experts 0 and 1 (bin 0), text tokens 2 and 3 (bin 1): specialised, no cross-bin dispatch.
    specialised = torch.tensor([[9.0, 8.0, 0.0, 0.0]] * 2 + [[0.0, 0.0, 9.0, 8.0]] * 2)
    counts = RoutingCounts(bins=2)
    counts.add(specialised, visual, valid, top_k=2, bin_size=2)
    summary = counts.summary()
    assert summary["specialisation_bits"] == pytest.approx(1.0) and summary["cross_bin_share"] == 0.0
    assert summary["visual_share_per_bin"] == [1.0, 0.0]
    # Every token picks experts 0 and 2: one bin each time, both modalities alike.
    spread = torch.tensor([[9.0, 0.0, 8.0, 0.0]] * 4)
    counts = RoutingCounts(bins=2)
    counts.add(spread, visual, valid, top_k=2, bin_size=2)
    assert counts.summary()["specialisation_bits"] == pytest.approx(0.0) and counts.summary()["cross_bin_share"] == 1.0


def test_smoes_training_adds_the_regulariser_and_raises_specialisation():
    from modeling_qmop import smoes_regularizer
    from qmop_tools.moe import modality_routing_statistics

    model, processor = _tiny_moe("mixtral", smoes_loss_coef=1.0, router_gumbel_noise=False)  # deterministic training
    texts = [PROMPT + " a red dog on the grass", PROMPT + " two blue squares"]
    batch = processor(images=[make_image(seed=1), make_image(seed=2)], text=texts, padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    before = modality_routing_statistics(model, [batch])
    assert len(before["layers"]) == 2 and before["top_k"] == 2 and before["bin_size"] == 2

    model.train()
    out = model(**batch, labels=labels)
    visual = model.model.image_placeholder_mask(batch["input_ids"])
    expected = smoes_regularizer(model.config, out.llm_router_logits, out.hidden_states, visual,
                                 batch["attention_mask"].bool())
    torch.testing.assert_close(out.smoes_loss, expected)
    assert out.smoes_loss < 0  # minus the mutual information
    with torch.no_grad():
        model.config.smoes_loss_coef = 0.0
        plain = model(**batch, labels=labels)
        model.config.smoes_loss_coef = 1.0
    assert plain.smoes_loss is None
    torch.testing.assert_close(out.loss, plain.loss + out.smoes_loss, rtol=1e-5, atol=1e-5)

    # Only the regulariser, a few steps: the routing specialises by modality.
    gates = _gates(model)
    optimizer = torch.optim.Adam(gates, lr=0.05)
    for _ in range(30):
        loss = model(**batch, labels=labels).smoes_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    after = modality_routing_statistics(model, [batch])
    assert after["mean_specialisation_bits"] > before["mean_specialisation_bits"] + 0.1, (before, after)


@pytest.mark.skipif(not hasattr(__import__("transformers"), "MixtralConfig")
                    or __import__("transformers").__version__.startswith("4."),
                    reason="upcycling writes transformers 5.x's fused expert layout")
def test_upcycling_a_dense_llm_keeps_its_function():
    from transformers import LlamaConfig, LlamaForCausalLM

    from qmop_tools.moe import upcycle_to_mixtral

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50)).eval()
    moe = upcycle_to_mixtral(dense, num_experts=4, top_k=2, seed=1).eval()
    assert moe.config.num_local_experts == 4 and moe.config.output_router_logits
    ids = torch.randint(50, (2, 9))
    with torch.no_grad():
        out = moe(ids)
        torch.testing.assert_close(out.logits, dense(ids).logits, rtol=1e-4, atol=1e-5)
    assert len(out.router_logits) == 2 and out.aux_loss > 0  # a real router, whose choice does not change the output


def test_lora_with_the_default_targets_adapts_what_an_moe_llm_has():
    """The default LoRA targets are Llama's names; an MoE LLM whose experts are fused parameters (transformers 5.x)
    lacks gate/up/down_proj linears: they are left out. Targets the user names must all exist."""
    pytest.importorskip("peft")
    from qmop_tools.train.arguments import DEFAULT_LORA_TARGETS
    from qmop_tools.train.trainer import apply_lora

    model, processor = _tiny_moe("mixtral")
    linears = {name.rsplit(".", 1)[-1] for name, module in model.model.language_model.named_modules()
               if isinstance(module, torch.nn.Linear)}
    with pytest.raises(ValueError, match="not linear layers"):
        apply_lora(model, 4, 8, 0.0, ["q_proj", "w9"], quantized=False, gradient_checkpointing=False)
    peft_model = apply_lora(model, 4, 8, 0.0, DEFAULT_LORA_TARGETS, quantized=False, gradient_checkpointing=False)
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in peft_model.named_parameters()
               if ".lora_A." in name}
    assert adapted == linears & set(DEFAULT_LORA_TARGETS) and {"q_proj", "v_proj"} <= adapted
    inputs = processor(images=make_image(seed=1), text=PROMPT + " a dog")
    peft_model.train()
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for name, p in peft_model.named_parameters() if ".lora_B." in name)
