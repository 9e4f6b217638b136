"""The model API that transformers' LLaVA offers and tools rely on: output flags and tuples, `inputs_embeds` with
images, `get_image_features`, transformers' loss utilities (`shift_labels`, `num_items_in_batch`), CLIP's own
initialisation of missing tower weights, the `lm_head` tensor-parallel entry."""

import pytest
import torch
from conftest import make_image
from transformers import CLIPVisionConfig, CLIPVisionModel

from modeling_qmop import QMoPForConditionalGeneration

PROMPT = "USER: <image>\nWhat colour is the circle? ASSISTANT:"


@pytest.fixture
def inputs(tiny):
    _, processor = tiny
    return processor(images=[make_image(seed=1), make_image(seed=2)], text=[PROMPT, "USER: <image>\nHow many? ASSISTANT:"])


def test_config_flags_and_tuple_output(tiny, inputs):
    model, _ = tiny
    layers = model.config.text_config.num_hidden_layers
    model.config.output_hidden_states = True
    try:
        with torch.no_grad():
            out = model(**inputs)
            as_tuple = model(**inputs, return_dict=False)
    finally:
        model.config.output_hidden_states = False
    assert len(out.hidden_states) == layers + 1  # the config flag is honoured when the argument is None
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)
    with torch.no_grad():
        assert model(**inputs).hidden_states is None


def test_inputs_embeds_with_pixel_values_forward_and_generate(tiny, inputs):
    model, _ = tiny
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    by_embeds = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        reference = model(**inputs)
        out = model(**by_embeds, inputs_embeds=embeds)
    assert torch.allclose(out.logits, reference.logits, atol=1e-5)
    assert torch.equal(out.kept_patch_indices, reference.kept_patch_indices)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    from_embeds = model.generate(**by_embeds, inputs_embeds=embeds, max_new_tokens=4, do_sample=False)
    assert torch.equal(from_embeds[:, -4:], generated)


def test_get_image_features_follows_llava(tiny, inputs):
    model, _ = tiny
    config = model.config
    with torch.no_grad():
        out = model.get_image_features(inputs["pixel_values"], inputs["query_input_ids"], inputs["query_attention_mask"])
        full = model(**inputs)
        states = model.get_image_features(
            inputs["pixel_values"], inputs["query_input_ids"], inputs["query_attention_mask"], output_hidden_states=True
        )
        other_layer = model.get_image_features(
            inputs["pixel_values"], inputs["query_input_ids"], inputs["query_attention_mask"], vision_feature_layer=-1
        )
        no_query = model.get_image_features(inputs["pixel_values"])
        as_tuple = model.get_image_features(inputs["pixel_values"], inputs["query_input_ids"], return_dict=False)
    num_tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1
    assert out.last_hidden_state.shape == (2, num_tokens, config.vision_config.hidden_size)
    assert len(out.pooler_output) == 2 and out.pooler_output[0].shape == (16, config.text_config.hidden_size)
    assert torch.equal(torch.stack(out.pooler_output), out.image_features)
    assert torch.allclose(out.image_features, full.image_hidden_states)
    assert torch.equal(out.router_weights, full.router_weights)
    assert len(states.hidden_states) == config.vision_config.num_hidden_layers + 1
    assert torch.allclose(states.last_hidden_state, states.hidden_states[config.vision_feature_layer], atol=1e-6)
    assert torch.allclose(states.image_features, out.image_features, atol=1e-6)
    assert not torch.allclose(other_layer.last_hidden_state, out.last_hidden_state)
    assert no_query.image_features.shape == out.image_features.shape  # the empty question, as for captioning
    assert isinstance(as_tuple, tuple)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        model.get_image_features(inputs["pixel_values"], inputs["query_input_ids"], vision_feature_layer=[-1, -2])


def test_loss_uses_transformers_loss_utilities(tiny, inputs):
    model, _ = tiny
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        by_labels = model(**inputs, labels=labels)
        by_shift = model(**inputs, shift_labels=shift_labels)
        summed = model(**inputs, labels=labels, num_items_in_batch=torch.tensor(7))
    router = by_labels.loss - model.loss_function(
        logits=by_labels.logits, labels=labels.masked_fill(labels == model.config.image_token_id, -100),
        vocab_size=model.config.text_config.vocab_size,
    )
    assert by_shift.loss == pytest.approx(float(by_labels.loss), rel=1e-5)  # placeholders masked in both
    targets = labels[:, 1:].masked_fill(labels[:, 1:] == model.config.image_token_id, -100)
    total = torch.nn.functional.cross_entropy(
        by_labels.logits[:, :-1].reshape(-1, by_labels.logits.shape[-1]), targets.reshape(-1),
        ignore_index=-100, reduction="sum",
    )
    assert float(summed.loss - router) == pytest.approx(float(total / 7), rel=1e-4)


def test_missing_tower_weights_get_clips_initialisation(tmp_path, tiny):
    model, _ = tiny
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.vision_tower.")}
    loaded = QMoPForConditionalGeneration.from_pretrained(None, config=model.config, state_dict=state)
    tower = loaded.model.vision_tower
    clip = CLIPVisionModel(CLIPVisionConfig(**model.config.vision_config.to_dict()))
    reference = getattr(clip, "vision_model", clip)
    for name in ("embeddings.class_embedding", "encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.mlp.fc1.weight"):
        got, want = tower.get_parameter(name), reference.get_parameter(name)
        assert torch.isfinite(got).all(), name
        assert float(got.std()) == pytest.approx(float(want.std()), rel=0.35), name  # CLIP's std, not 0.02
    assert tower.dtype == torch.float32 and tower.device.type == "cpu" and tower._supports_sdpa


def test_lm_head_has_a_tensor_parallel_plan_entry():
    assert "lm_head" in QMoPForConditionalGeneration._tp_plan
