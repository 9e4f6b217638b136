"""QMoP on Mixture-of-Experts language models (issue #16, item 1): any MoE causal LM that transformers builds from a
config works as `text_config`, with its own load-balancing loss, placement hints, generation and save/reload."""

import importlib.util
import inspect

import pytest
import torch

from conftest import make_image
from conversion.tiny import TINY_MOE, build_config, build_model, build_processor

PROMPT = "USER: <image>\nWhat is it? ASSISTANT:"


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
    gate = model.model.language_model.layers[0].mlp.gate
    assert next(p for p in gate.parameters()).grad.abs().sum() > 0  # the LLM's router learns from the balancing term


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

    from conversion.tiny import save_pretrained_atomically
    from modeling_qmop import QMoPForConditionalGeneration

    model, processor = _tiny_moe(model_type, width=64)
    folder = save_pretrained_atomically(str(tmp_path / "moe"), model, processor)
    settings = dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    if model_type == "qwen2_moe":  # bitsandbytes' CPU kernel needs an output width divisible by its block: not 1
        settings["llm_int8_skip_modules"] = ["vision_tower", "text_encoder", "projector", "lm_head", "shared_expert_gate"]
    quantized = QMoPForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, quantization_config=BitsAndBytesConfig(**settings)
    ).eval()
    names = [name for name, module in quantized.named_modules() if type(module).__name__ == "Linear4bit"]
    assert names and all(name.startswith("model.language_model.layers.") for name in names), names
    inputs = processor(images=make_image(seed=1), text=PROMPT)
    with torch.no_grad():
        tokens = quantized.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 3
